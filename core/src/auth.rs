//! Identity and authorization of the Hypha server (server spec §1.3, §2.1-2.3, §6), sans-IO.
//!
//! Everything a server needs to decide *who* a caller is and *what* it may do, without
//! touching a socket, a store or the clock:
//!
//! * [`UserInfo`] / [`ScopeInfo`] / [`Permission`]: the identity model, serialized exactly
//!   as the Python server dumps it (the server stamps it as `user` into every routed frame
//!   and into `connection_info`, and peers read it);
//! * [`JwtConfig`]: HS256 tokens with the Python server's claim set, so that a token
//!   minted by either server with the same secret works on the other
//!   ([`generate_token`] / [`parse_token`] are the default-config shortcuts);
//! * [`AuthContext::authenticate_handshake`] and [`Authenticated::admit`]: the websocket
//!   handshake decision (§2.2) as two pure steps around the server's own workspace lookup;
//! * [`AuthContext::http_caller`] and [`extract_http_token`]: the HTTP caller identity (§1.3);
//! * [`plan_child_token`] / [`generate_child_token`]: the manager's `generate_token` (§6.4);
//! * anonymous users, the root token and its startup strength check.
//!
//! Time comes in as unix seconds (`now: f64`, see [`unix_seconds`]); revocation comes in as a
//! predicate, because the revocation list lives in the server's store.
//!
//! Error texts are the Python server's where the spec records them: peers and upstream tests
//! match on them (the hypha-rpc client shows the handshake `message` verbatim).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use indexmap::IndexMap;
use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map as JsonMap, Value as Json};

use crate::value::{Map, Value};

/// Default `iss` claim (`AUTH0_ISSUER` of the Python server).
pub const DEFAULT_ISSUER: &str = "https://amun.ai/";
/// Default `aud` claim (`AUTH0_AUDIENCE` of the Python server).
pub const DEFAULT_AUDIENCE: &str = "https://amun-ai.eu.auth0.com/api/v2/";
/// Default prefix of the custom claims (`AUTH0_NAMESPACE`): `{NS}roles`, `{NS}email`, `{NS}parent`.
pub const DEFAULT_NAMESPACE: &str = "https://amun.ai/";
/// The `gty` claim every hypha token carries.
pub const GRANT_TYPE: &str = "client-credentials";
/// Lifetime of the reconnection token sent in `connection_info` (§6.3), seconds.
pub const RECONNECTION_TOKEN_LIFE_TIME: f64 = 172_800.0;
/// Default lifetime of a `generate_token()` token (§6.3), seconds.
pub const DEFAULT_TOKEN_LIFE_TIME: f64 = 3600.0;
/// Informational lifetime of an anonymous user (`expires_at` = now + this; not enforced).
pub const ANONYMOUS_LIFE_TIME: f64 = 600.0;
/// The role that marks anonymous users (`is_anonymous` is derived from it).
pub const ANONYMOUS_ROLE: &str = "anonymous";
/// The role that grants `"*": "a"`.
pub const ADMIN_ROLE: &str = "admin";
/// The root user's id (root token and the server's internal peers).
pub const ROOT_USER_ID: &str = "root";
/// The prefix of anonymous user ids (with a **z**, as upstream).
pub const ANONYMOUS_ID_PREFIX: &str = "anonymouz-";
/// The workspace of anonymous HTTP callers.
pub const ANONYMOUS_WORKSPACE: &str = "ws-anonymous";
/// The public workspace (hosts `hypha-login`, `queue`, ...).
pub const PUBLIC_WORKSPACE: &str = "public";
/// The wildcard workspace: `"*"` in `scope.workspaces` means every workspace.
pub const ALL_WORKSPACES: &str = "*";
/// Minimum length of a `--root-token`.
pub const ROOT_TOKEN_MIN_LEN: usize = 32;
/// Root tokens shorter than this must not contain a [`WEAK_ROOT_TOKEN_PATTERNS`] entry.
pub const ROOT_TOKEN_STRONG_LEN: usize = 64;
/// Substrings that make a short root token weak (checked case-insensitively).
pub const WEAK_ROOT_TOKEN_PATTERNS: [&str; 10] =
    ["test", "root", "admin", "password", "token", "secret", "123", "abc", "hypha", "default"];
/// Longest close reason a websocket close frame can carry (125-byte payload minus the code).
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

/// Unix seconds of a `SystemTime`, for drivers that hold one (this module never reads the clock).
pub fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// The personal workspace of a user: `ws-user-{id}`. Its owner always has `a` there.
pub fn personal_workspace(user_id: &str) -> String {
    format!("ws-user-{user_id}")
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Why a token, a scope or an authorization rule failed.
///
/// `Display` gives the bare upstream text (no prefix); [`HandshakeError`] adds the
/// websocket prefixes and [`AuthError::http_status`] the HTTP mapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is not three base64url segments with a JSON-object header (python-jose's
    /// `get_unverified_header` text, which upstream calls first).
    #[error("Error decoding token headers.")]
    HeaderDecode,
    /// The header has no `alg`.
    #[error("No algorithm was specified in the JWS header.")]
    MissingAlgorithm,
    /// The header's `alg` is not HS256 (upstream would try Auth0 RS256 keys; we do not).
    #[error("The specified alg value is not allowed")]
    AlgorithmNotAllowed,
    /// The HMAC does not match: signed with another secret, or tampered with.
    #[error("Signature verification failed.")]
    SignatureFailed,
    /// The payload is not a JSON object.
    #[error("Invalid payload string: {0}")]
    InvalidPayload(String),
    /// A registered claim has the wrong type or is missing (python-jose texts where it has one).
    #[error("{0}")]
    InvalidClaim(String),
    /// `exp` is in the past (no leeway). Upstream replaces python-jose's text with this one.
    #[error("The token has expired. Please fetch a new one")]
    Expired,
    /// `nbf` is in the future.
    #[error("The token is not yet valid (nbf)")]
    NotYetValid,
    /// `aud` is missing or does not contain the configured audience.
    #[error("Invalid audience")]
    InvalidAudience,
    /// `iss` is not the configured issuer.
    #[error("Invalid issuer")]
    InvalidIssuer,
    /// The token is on the revocation list.
    #[error("Token has been revoked")]
    Revoked,
    /// A hypha claim (`sub`, roles, email, parent, scope) has a shape upstream's `UserInfo`
    /// model would reject.
    #[error("Invalid token claims: {0}")]
    InvalidUserClaims(String),
    /// A `scope` entry that does not parse (e.g. `ws:x#bogus`).
    #[error("Invalid scope entry: {0}")]
    InvalidScope(String),
    /// A specialized token (an extra scope containing `:`) used for general access.
    #[error(
        "Specialized token with scopes [{}] cannot be used for general workspace access. This token can only be used for its intended purpose.",
        .0.join(", ")
    )]
    SpecializedToken(Vec<String>),
    /// The token carries `cid:` and the connection asked for another client id.
    #[error("Client id mismatch: this token is restricted to client with client_id='{0}'")]
    ClientIdRestricted(String),
    /// The token carries `wid:` and the connection asked for another workspace.
    #[error(
        "Current workspace encoded in the token ({token}) does not match the specified workspace ({requested})"
    )]
    WorkspaceMismatch {
        /// The token's `wid`.
        token: String,
        /// The workspace the payload asked for.
        requested: String,
    },
    /// A reconnection token presented for another workspace than its `wid`.
    #[error("Invalid scope, workspace mismatch: {requested} != {token}")]
    ReconnectWorkspaceMismatch {
        /// The workspace the payload asked for.
        requested: String,
        /// The token's `wid`.
        token: String,
    },
    /// A reconnection token presented with another client id than its `cid`.
    #[error("Client id mismatch, disconnecting")]
    ReconnectClientMismatch,
    /// A reconnection token without `wid:` or `cid:` (not one the server issued).
    #[error("Invalid reconnection token: the scope must contain {0}")]
    ReconnectScopeIncomplete(&'static str),
    /// `generate_token`: the caller has no permission at all on the target workspace.
    #[error("You do not have any permission for workspace: {0}")]
    NoPermission(String),
    /// `generate_token`: the caller can read/write the target workspace but is not admin.
    #[error("Only admin can generate token.")]
    OnlyAdmin,
    /// `generate_token`: the config does not validate (pydantic `TokenConfig` text).
    #[error("1 validation error for TokenConfig\n{0}")]
    InvalidTokenConfig(String),
    /// `--root-token` shorter than [`ROOT_TOKEN_MIN_LEN`].
    #[error("The root token must be at least 32 characters long (got {0})")]
    RootTokenTooShort(usize),
    /// `--root-token` shorter than [`ROOT_TOKEN_STRONG_LEN`] containing a common pattern.
    #[error("The root token is weak: it contains the common pattern '{0}'; use a random token of 64 characters or more")]
    RootTokenWeak(&'static str),
    /// Signing failed inside the crypto library (cannot happen for HMAC; kept to avoid panics).
    #[error("Failed to sign the token: {0}")]
    Signing(String),
}

impl AuthError {
    /// True for the errors upstream raises as an HTTP 401 from its token validator: over
    /// the websocket they become `Authentication error: ...` with close code 1008; all other
    /// errors become `Failed to authenticate user: ...` with close code 1001.
    pub fn is_credential_error(&self) -> bool {
        matches!(
            self,
            AuthError::HeaderDecode
                | AuthError::MissingAlgorithm
                | AuthError::AlgorithmNotAllowed
                | AuthError::SignatureFailed
                | AuthError::InvalidPayload(_)
                | AuthError::InvalidClaim(_)
                | AuthError::Expired
                | AuthError::NotYetValid
                | AuthError::InvalidAudience
                | AuthError::InvalidIssuer
        )
    }

    /// The HTTP status for a failed HTTP caller identification (§1.3): 401 for every token
    /// problem (revoked included: upstream answers 500 there, the spec recommends 401),
    /// 403 for the permission errors, 400 for a bad `generate_token` config, 500 otherwise.
    pub fn http_status(&self) -> u16 {
        match self {
            AuthError::NoPermission(_) | AuthError::OnlyAdmin => 403,
            AuthError::InvalidTokenConfig(_) => 400,
            AuthError::RootTokenTooShort(_) | AuthError::RootTokenWeak(_) | AuthError::Signing(_) => 500,
            _ => 401,
        }
    }

    /// The Python exception class upstream raises, for RPC error texts of the form
    /// `"{class}: {message}"`.
    pub fn exception_name(&self) -> &'static str {
        match self {
            AuthError::NoPermission(_) | AuthError::OnlyAdmin => "PermissionError",
            AuthError::InvalidTokenConfig(_) => "ValidationError",
            _ => "Exception",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Permission, ScopeInfo, UserInfo
// ---------------------------------------------------------------------------------------

/// A permission level on a workspace. Ordered: `Read < ReadWrite < Admin`, so "satisfies"
/// is `>=` and "the stronger of two" is `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// `r`: list and use the workspace's services.
    Read,
    /// `rw`: also register services and change things.
    ReadWrite,
    /// `a`: everything, including minting tokens for the workspace.
    Admin,
}

impl Permission {
    /// The wire form: `r`, `rw` or `a` (scope dumps and `ws:{ws}#{perm}` entries).
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "r",
            Permission::ReadWrite => "rw",
            Permission::Admin => "a",
        }
    }

    /// Parses the wire form (`r`/`rw`/`a`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "r" => Some(Permission::Read),
            "rw" => Some(Permission::ReadWrite),
            "a" => Some(Permission::Admin),
            _ => None,
        }
    }

    /// Parses the names `generate_token` configs use: `read`, `read_write`, `admin`.
    pub fn from_config_name(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Permission::Read),
            "read_write" => Some(Permission::ReadWrite),
            "admin" => Some(Permission::Admin),
            _ => None,
        }
    }

    /// True when holding `self` is enough for an operation that needs `need`.
    pub fn satisfies(self, need: Permission) -> bool {
        self >= need
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Permission {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Permission {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Permission::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid permission {s:?}: expected r, rw or a")))
    }
}

/// What a user may do and where it is connected: upstream's `ScopeInfo`.
///
/// Field order is the dump order (`current_workspace, workspaces, client_id, extra_scopes`);
/// `workspaces` keeps insertion order because upstream's dict does and peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ScopeInfo {
    /// The workspace the scope is bound to (`wid:` in a token; the connection's workspace
    /// after the handshake).
    #[serde(default)]
    pub current_workspace: Option<String>,
    /// Permission per workspace id; the key `"*"` applies to every workspace.
    #[serde(default)]
    pub workspaces: IndexMap<String, Permission>,
    /// The client id the scope is restricted to (`cid:`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Other scope entries, verbatim. `None` for users not made from a token (anonymous,
    /// root), `Some([])` for parsed tokens, as upstream dumps them.
    #[serde(default)]
    pub extra_scopes: Option<Vec<String>>,
}

impl ScopeInfo {
    /// Parses a token's `scope` claim: space-separated `ws:{ws}#{r|rw|a}`, `cid:{id}`,
    /// `wid:{ws}`, anything else kept as an extra scope (in order). Empty entries (double
    /// spaces) are skipped.
    pub fn parse(scope: &str) -> Result<Self, AuthError> {
        let mut out = ScopeInfo { extra_scopes: Some(Vec::new()), ..ScopeInfo::default() };
        for entry in scope.split(' ').filter(|e| !e.is_empty()) {
            if let Some(rest) = entry.strip_prefix("ws:") {
                let (ws, perm) = rest.split_once('#').ok_or_else(|| AuthError::InvalidScope(entry.into()))?;
                let perm = Permission::parse(perm).ok_or_else(|| AuthError::InvalidScope(entry.into()))?;
                if ws.is_empty() {
                    return Err(AuthError::InvalidScope(entry.into()));
                }
                out.workspaces.insert(ws.to_owned(), perm);
            } else if let Some(cid) = entry.strip_prefix("cid:") {
                out.client_id = Some(cid.to_owned());
            } else if let Some(wid) = entry.strip_prefix("wid:") {
                out.current_workspace = Some(wid.to_owned());
            } else if let Some(extra) = out.extra_scopes.as_mut() {
                extra.push(entry.to_owned());
            }
        }
        Ok(out)
    }

    /// The `scope` claim for this scope, in the order the Python server emits it: every
    /// `ws:` entry (map order), then `cid:`, then `wid:` (from `current_workspace`), then the
    /// extra scopes.
    pub fn to_scope_string(&self) -> String {
        let mut parts: Vec<String> =
            self.workspaces.iter().map(|(ws, p)| format!("ws:{ws}#{}", p.as_str())).collect();
        if let Some(cid) = &self.client_id {
            parts.push(format!("cid:{cid}"));
        }
        if let Some(wid) = &self.current_workspace {
            parts.push(format!("wid:{wid}"));
        }
        parts.extend(self.extra_scopes.iter().flatten().cloned());
        parts.join(" ")
    }

    /// The extra scopes that make this a *specialized* token (those containing `:`, e.g.
    /// `file:download`): such tokens are for one purpose and refused for general access.
    pub fn specialized_scopes(&self) -> Vec<String> {
        self.extra_scopes.iter().flatten().filter(|s| s.contains(':')).cloned().collect()
    }

    /// The effective permission on `ws`: the stronger of the `"*"` entry and the `ws` entry.
    pub fn permission(&self, ws: &str) -> Option<Permission> {
        let star = self.workspaces.get(ALL_WORKSPACES).copied();
        let own = self.workspaces.get(ws).copied();
        star.max(own)
    }
}

/// An authenticated (or anonymous) user: upstream's `UserInfo`.
///
/// Serializes with upstream's keys, order and nulls (`expires_at` as a float), because the
/// server stamps this dump into every routed frame (`user`) and into `connection_info`,
/// and services read it from their `context`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserInfo {
    /// The user id (`sub`).
    pub id: String,
    /// Roles (`{NS}roles`): `anonymous`, `admin`, or anything an identity provider sets.
    #[serde(default)]
    pub roles: Vec<String>,
    /// `"anonymous" in roles`, kept as a field because it is part of the dump.
    #[serde(default)]
    pub is_anonymous: bool,
    /// Permissions and binding.
    #[serde(default)]
    pub scope: ScopeInfo,
    /// Email (`{NS}email`).
    #[serde(default)]
    pub email: Option<String>,
    /// The user that minted this user's token (`{NS}parent`), for child tokens.
    #[serde(default)]
    pub parent: Option<String>,
    /// Unix seconds when the identity expires (token `exp`; anonymous: creation + 600).
    #[serde(default)]
    pub expires_at: Option<f64>,
    /// The token's `wid`, if it had one (independent of `scope.current_workspace`, which the
    /// handshake overwrites with the connection's workspace).
    #[serde(default)]
    pub current_workspace: Option<String>,
}

impl UserInfo {
    /// A user with the given id, no roles and an empty scope (`extra_scopes: null`).
    pub fn new(id: impl Into<String>) -> Self {
        UserInfo {
            id: id.into(),
            roles: Vec::new(),
            is_anonymous: false,
            scope: ScopeInfo::default(),
            email: None,
            parent: None,
            expires_at: None,
            current_workspace: None,
        }
    }

    /// `ws-user-{id}`.
    pub fn personal_workspace(&self) -> String {
        personal_workspace(&self.id)
    }

    /// Has the `admin` role.
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == ADMIN_ROLE)
    }

    /// The effective permission on `ws` (stronger of `"*"` and `ws`), if any.
    pub fn permission(&self, ws: &str) -> Option<Permission> {
        self.scope.permission(ws)
    }

    /// Whether the user holds at least `need` on `ws`.
    pub fn check(&self, ws: &str, need: Permission) -> bool {
        self.permission(ws).is_some_and(|p| p.satisfies(need))
    }

    /// The dump as JSON (what `connection_info.user` and `/assets/config.json` carry).
    pub fn to_json(&self) -> Json {
        fn opt(s: &Option<String>) -> Json {
            s.as_ref().map_or(Json::Null, |s| Json::String(s.clone()))
        }
        let mut ws = JsonMap::new();
        for (k, p) in &self.scope.workspaces {
            ws.insert(k.clone(), Json::String(p.as_str().to_owned()));
        }
        let mut scope = JsonMap::new();
        scope.insert("current_workspace".into(), opt(&self.scope.current_workspace));
        scope.insert("workspaces".into(), Json::Object(ws));
        scope.insert("client_id".into(), opt(&self.scope.client_id));
        scope.insert(
            "extra_scopes".into(),
            self.scope
                .extra_scopes
                .as_ref()
                .map_or(Json::Null, |v| Json::Array(v.iter().map(|s| Json::String(s.clone())).collect())),
        );
        let mut m = JsonMap::new();
        m.insert("id".into(), Json::String(self.id.clone()));
        m.insert("roles".into(), Json::Array(self.roles.iter().map(|r| Json::String(r.clone())).collect()));
        m.insert("is_anonymous".into(), Json::Bool(self.is_anonymous));
        m.insert("scope".into(), Json::Object(scope));
        m.insert("email".into(), opt(&self.email));
        m.insert("parent".into(), opt(&self.parent));
        m.insert(
            "expires_at".into(),
            self.expires_at.and_then(serde_json::Number::from_f64).map_or(Json::Null, Json::Number),
        );
        m.insert("current_workspace".into(), opt(&self.current_workspace));
        Json::Object(m)
    }

    /// The dump as a wire [`Value`], for the `user` field the router stamps into every frame.
    /// Built directly (infallible) rather than through serde.
    pub fn to_value(&self) -> Value {
        fn opt(s: &Option<String>) -> Value {
            s.as_ref().map_or(Value::Nil, |s| Value::Str(s.clone()))
        }
        let strs = |v: &[String]| Value::List(v.iter().map(|s| Value::Str(s.clone())).collect());
        let mut ws = Map::new();
        for (k, p) in &self.scope.workspaces {
            ws.insert(k.clone(), Value::Str(p.as_str().to_owned()));
        }
        let mut scope = Map::new();
        scope.insert("current_workspace".into(), opt(&self.scope.current_workspace));
        scope.insert("workspaces".into(), Value::Map(ws));
        scope.insert("client_id".into(), opt(&self.scope.client_id));
        scope.insert("extra_scopes".into(), self.scope.extra_scopes.as_deref().map_or(Value::Nil, strs));
        let mut m = Map::new();
        m.insert("id".into(), Value::Str(self.id.clone()));
        m.insert("roles".into(), strs(&self.roles));
        m.insert("is_anonymous".into(), Value::Bool(self.is_anonymous));
        m.insert("scope".into(), Value::Map(scope));
        m.insert("email".into(), opt(&self.email));
        m.insert("parent".into(), opt(&self.parent));
        m.insert("expires_at".into(), self.expires_at.map_or(Value::Nil, Value::F64));
        m.insert("current_workspace".into(), opt(&self.current_workspace));
        Value::Map(m)
    }
}

/// Whether `user` owns `ws` for the purpose of minting tokens (§6.1/§6.4): its id or email
/// is in the workspace's `owners`, or `ws` is the personal workspace of the user or of its
/// parent (so a child token of alice still owns `ws-user-alice`).
pub fn is_workspace_owner(user: &UserInfo, ws: &str, owners: &[String]) -> bool {
    owners.iter().any(|o| *o == user.id || user.email.as_deref() == Some(o.as_str()))
        || ws == user.personal_workspace()
        || user.parent.as_deref().is_some_and(|p| ws == personal_workspace(p))
}

// ---------------------------------------------------------------------------------------
// Well-known users
// ---------------------------------------------------------------------------------------

const ADJECTIVES: [&str; 64] = [
    "agile", "bold", "brave", "bright", "calm", "clever", "cosmic", "crisp", "curious", "daring", "eager",
    "early", "fancy", "fast", "fierce", "gentle", "giddy", "glad", "golden", "grand", "happy", "harsh",
    "hidden", "humble", "jolly", "keen", "kind", "lively", "lucky", "mellow", "merry", "mighty", "modest",
    "noble", "odd", "patient", "plucky", "polite", "proud", "quick", "quiet", "rapid", "rare", "rosy",
    "rustic", "shiny", "silent", "silly", "sleek", "smart", "snappy", "solid", "spicy", "steady", "sunny",
    "swift", "tame", "tidy", "tiny", "vivid", "warm", "wild", "wise", "witty",
];

const NOUNS: [&str; 64] = [
    "badger", "beetle", "breeze", "cactus", "canyon", "cedar", "cloud", "clover", "comet", "coral",
    "crystal", "daisy", "delta", "dune", "ember", "falcon", "fern", "forest", "fox", "garden", "glacier",
    "harbor", "heron", "island", "lagoon", "lantern", "lynx", "maple", "marten", "meadow", "mesa", "moon",
    "nebula", "oak", "orchid", "otter", "owl", "panda", "pebble", "pine", "planet", "prairie", "quartz",
    "raven", "river", "robin", "rocket", "salmon", "seal", "sequoia", "sparrow", "spruce", "star", "storm",
    "summit", "thistle", "tiger", "tulip", "valley", "walrus", "willow", "wombat", "yak", "zebra",
];

/// A readable random id `{adjective}-{noun}-{8 digits}` (e.g. `clever-fox-12345678`), the
/// shape upstream uses for user ids, manager ids and child-token ids.
pub fn readable_id() -> String {
    readable_id_with(&mut rand::rng())
}

/// [`readable_id`] with a caller-provided RNG (deterministic tests).
pub fn readable_id_with<R: Rng + ?Sized>(rng: &mut R) -> String {
    let adj = ADJECTIVES[rng.random_range(0..ADJECTIVES.len())];
    let noun = NOUNS[rng.random_range(0..NOUNS.len())];
    let n: u32 = rng.random_range(0..100_000_000);
    format!("{adj}-{noun}-{n:08}")
}

/// A fresh anonymous user (§2.2): id `anonymouz-{readable id}`, role `anonymous`,
/// `expires_at = now + 600`, admin of its own throw-away workspace `ws-user-{id}`.
pub fn anonymous_user(now: f64) -> UserInfo {
    anonymous_user_with_id(format!("{ANONYMOUS_ID_PREFIX}{}", readable_id()), now)
}

/// [`anonymous_user`] with a given id (tests, or ids minted elsewhere).
pub fn anonymous_user_with_id(id: impl Into<String>, now: f64) -> UserInfo {
    let mut user = UserInfo::new(id);
    user.roles = vec![ANONYMOUS_ROLE.to_owned()];
    user.is_anonymous = true;
    user.expires_at = Some(now + ANONYMOUS_LIFE_TIME);
    let own = user.personal_workspace();
    user.scope.current_workspace = Some(own.clone());
    user.scope.workspaces.insert(own, Permission::Admin);
    user
}

/// The fixed identity of HTTP callers without a token (§1.3 step 2): `anonymouz-http`,
/// read-only on `ws-anonymous`, no expiry.
pub fn anonymous_http_user() -> UserInfo {
    let mut user = UserInfo::new(format!("{ANONYMOUS_ID_PREFIX}http"));
    user.roles = vec![ANONYMOUS_ROLE.to_owned()];
    user.is_anonymous = true;
    user.scope.current_workspace = Some(ANONYMOUS_WORKSPACE.to_owned());
    user.scope.workspaces.insert(ANONYMOUS_WORKSPACE.to_owned(), Permission::Read);
    user
}

/// The user a `--root-token` authenticates as: `root`, role `admin`, `"*": "a"`, bound to
/// `ws-user-root` (so a root websocket client lands there, §2.2), no expiry.
pub fn root_token_user() -> UserInfo {
    let mut user = UserInfo::new(ROOT_USER_ID);
    user.roles = vec![ADMIN_ROLE.to_owned()];
    user.scope.workspaces.insert(ALL_WORKSPACES.to_owned(), Permission::Admin);
    user.scope.current_workspace = Some(personal_workspace(ROOT_USER_ID));
    user
}

/// The server's own identity, stamped as `user` on the manager's and native peers' frames
/// (§6.1): `root`, `admin`, `"*": "a"`, `scope.current_workspace = "*"`.
pub fn internal_root_user() -> UserInfo {
    let mut user = root_token_user();
    user.scope.current_workspace = Some(ALL_WORKSPACES.to_owned());
    user
}

/// Startup check of `--root-token` (§6.2): at least 32 characters, and when shorter than 64
/// free of the common patterns (case-insensitive). A weak root token is a full admin
/// credential that is easy to guess, so the server refuses to start with one.
pub fn check_root_token_strength(token: &str) -> Result<(), AuthError> {
    let len = token.chars().count();
    if len < ROOT_TOKEN_MIN_LEN {
        return Err(AuthError::RootTokenTooShort(len));
    }
    if len < ROOT_TOKEN_STRONG_LEN {
        let lower = token.to_lowercase();
        if let Some(p) = WEAK_ROOT_TOKEN_PATTERNS.iter().find(|p| lower.contains(*p)) {
            return Err(AuthError::RootTokenWeak(p));
        }
    }
    Ok(())
}

/// Verbatim comparison of a presented token with the configured root token, in time
/// independent of where they differ (the root token is a full admin credential).
pub fn is_root_token(presented: &str, root_token: Option<&str>) -> bool {
    let Some(root) = root_token else { return false };
    let (a, b) = (presented.as_bytes(), root.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------------------

/// The exact header bytes python-jose writes (sorted keys, compact separators): keeping them
/// identical makes our tokens byte-for-byte equal to upstream's for the same claims.
const JWT_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// Token settings: the HS256 secret and the claim names/values, with upstream's defaults.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtConfig {
    secret: String,
    /// `iss` written and required (`AUTH0_ISSUER`).
    pub issuer: String,
    /// `aud` written and required (`AUTH0_AUDIENCE`).
    pub audience: String,
    /// Prefix of the custom claims (`AUTH0_NAMESPACE`).
    pub namespace: String,
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("JwtConfig")
            .field("secret", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl JwtConfig {
    /// Settings with `secret` (`HYPHA_JWT_SECRET`/`JWT_SECRET`) and upstream's default issuer,
    /// audience and namespace.
    pub fn new(secret: impl Into<String>) -> Self {
        JwtConfig {
            secret: secret.into(),
            issuer: DEFAULT_ISSUER.to_owned(),
            audience: DEFAULT_AUDIENCE.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
        }
    }

    fn claim(&self, name: &str) -> String {
        format!("{}{name}", self.namespace)
    }

    /// The claim set for `user`, in upstream's order: `iss, sub, aud, iat, exp, scope, gty,
    /// {NS}roles, {NS}email[, {NS}parent]`. `iat = floor(now)`, `exp = floor(now + expires_in)`.
    pub fn claims(&self, user: &UserInfo, expires_in: f64, now: f64) -> JsonMap<String, Json> {
        let mut c = JsonMap::new();
        c.insert("iss".into(), Json::String(self.issuer.clone()));
        c.insert("sub".into(), Json::String(user.id.clone()));
        c.insert("aud".into(), Json::String(self.audience.clone()));
        c.insert("iat".into(), Json::from(now.floor() as i64));
        c.insert("exp".into(), Json::from((now + expires_in).floor() as i64));
        c.insert("scope".into(), Json::String(user.scope.to_scope_string()));
        c.insert("gty".into(), Json::String(GRANT_TYPE.to_owned()));
        c.insert(self.claim("roles"), Json::Array(user.roles.iter().cloned().map(Json::String).collect()));
        c.insert(self.claim("email"), user.email.clone().map_or(Json::Null, Json::String));
        if let Some(parent) = &user.parent {
            c.insert(self.claim("parent"), Json::String(parent.clone()));
        }
        c
    }

    /// Signs `user` into an HS256 JWT valid for `expires_in` seconds from `now`. The scope
    /// claim is `user.scope` as [`ScopeInfo::to_scope_string`] writes it (`wid:` comes from
    /// `scope.current_workspace`).
    pub fn encode(&self, user: &UserInfo, expires_in: f64, now: f64) -> Result<String, AuthError> {
        self.sign_claims(&Json::Object(self.claims(user, expires_in, now)))
    }

    /// Signs an arbitrary claim object with this secret (python-jose's serialization), for
    /// callers that add claims and for tests that forge tokens.
    pub fn sign_claims(&self, claims: &Json) -> Result<String, AuthError> {
        let payload = python_json(claims);
        let signing_input =
            format!("{}.{}", b64url_encode(JWT_HEADER.as_bytes()), b64url_encode(payload.as_bytes()));
        let key = jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes());
        let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
            .map_err(|e| AuthError::Signing(e.to_string()))?;
        Ok(format!("{signing_input}.{sig}"))
    }

    /// Verifies a JWT and returns its claims, in python-jose's order of checks: structure and
    /// header, `alg`, signature, payload JSON, then `iat`, `nbf`, `exp`, `aud`, `iss`, `sub`,
    /// against `now` with no leeway (`exp` is expired when `trunc(exp) < floor(now)`).
    ///
    /// Stricter than python-jose in two places, both irrelevant to tokens either server
    /// mints: `exp` and `aud` are required (python-jose skips the check when absent).
    pub fn verify(&self, token: &str, now: f64) -> Result<JsonMap<String, Json>, AuthError> {
        let token = token.trim();
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::HeaderDecode);
        };
        // python-jose decodes all three segments before anything else.
        let header = b64url_decode(h).ok_or(AuthError::HeaderDecode)?;
        let payload = b64url_decode(p).ok_or(AuthError::HeaderDecode)?;
        b64url_decode(s).ok_or(AuthError::HeaderDecode)?;
        let header: Json = serde_json::from_slice(&header).map_err(|_| AuthError::HeaderDecode)?;
        let header = header.as_object().ok_or(AuthError::HeaderDecode)?;
        match header.get("alg") {
            None | Some(Json::Null) => return Err(AuthError::MissingAlgorithm),
            Some(Json::String(a)) if a == "HS256" => {}
            Some(_) => return Err(AuthError::AlgorithmNotAllowed),
        }
        let signing_input = &token[..h.len() + 1 + p.len()];
        let key = jsonwebtoken::DecodingKey::from_secret(self.secret.as_bytes());
        let ok =
            jsonwebtoken::crypto::verify(s, signing_input.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
                .unwrap_or(false);
        if !ok {
            return Err(AuthError::SignatureFailed);
        }
        let claims: Json =
            serde_json::from_slice(&payload).map_err(|e| AuthError::InvalidPayload(e.to_string()))?;
        let Json::Object(claims) = claims else {
            return Err(AuthError::InvalidPayload("must be a json object".into()));
        };
        self.validate_claims(&claims, now)?;
        Ok(claims)
    }

    fn validate_claims(&self, c: &JsonMap<String, Json>, now: f64) -> Result<(), AuthError> {
        let now = now.floor();
        if let Some(iat) = c.get("iat") {
            int_claim(iat)
                .ok_or_else(|| AuthError::InvalidClaim("Issued At claim (iat) must be an integer.".into()))?;
        }
        if let Some(nbf) = c.get("nbf") {
            let nbf = int_claim(nbf).ok_or_else(|| {
                AuthError::InvalidClaim("Not Before claim (nbf) must be an integer.".into())
            })?;
            if nbf > now {
                return Err(AuthError::NotYetValid);
            }
        }
        let exp = c
            .get("exp")
            .ok_or_else(|| AuthError::InvalidClaim("Expiration Time claim (exp) is required.".into()))?;
        let exp = int_claim(exp).ok_or_else(|| {
            AuthError::InvalidClaim("Expiration Time claim (exp) must be an integer.".into())
        })?;
        if exp < now {
            return Err(AuthError::Expired);
        }
        let aud_ok = match c.get("aud") {
            Some(Json::String(a)) => *a == self.audience,
            Some(Json::Array(list)) => {
                if !list.iter().all(Json::is_string) {
                    return Err(AuthError::InvalidClaim("Invalid claim format in token".into()));
                }
                list.iter().any(|a| a.as_str() == Some(self.audience.as_str()))
            }
            Some(_) => return Err(AuthError::InvalidClaim("Invalid claim format in token".into())),
            None => false,
        };
        if !aud_ok {
            return Err(AuthError::InvalidAudience);
        }
        if c.get("iss").and_then(Json::as_str) != Some(self.issuer.as_str()) {
            return Err(AuthError::InvalidIssuer);
        }
        if c.get("sub").is_some_and(|s| !s.is_string()) {
            return Err(AuthError::InvalidClaim("Subject must be a string.".into()));
        }
        Ok(())
    }

    /// Verifies a JWT (see [`JwtConfig::verify`]), checks revocation, and builds the user as
    /// upstream's `parse_token` does: `is_anonymous` from the roles, `current_workspace` from
    /// `wid`, `expires_at` from `exp`, and the user's own `ws-user-{id}` forced to `a`.
    pub fn decode(
        &self,
        token: &str,
        now: f64,
        revoked: &dyn Fn(&str) -> bool,
    ) -> Result<UserInfo, AuthError> {
        let c = self.verify(token, now)?;
        if revoked(token) {
            return Err(AuthError::Revoked);
        }
        let bad = |what: &str| AuthError::InvalidUserClaims(what.to_owned());
        let id = c.get("sub").and_then(Json::as_str).ok_or_else(|| bad("missing sub"))?;
        let roles = match c.get(&self.claim("roles")) {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(list)) => list
                .iter()
                .map(|r| r.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("roles must be a list of strings"))?,
            Some(_) => return Err(bad("roles must be a list of strings")),
        };
        let opt_str = |name: &str| -> Result<Option<String>, AuthError> {
            match c.get(&self.claim(name)) {
                None | Some(Json::Null) => Ok(None),
                Some(Json::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(&format!("{name} must be a string"))),
            }
        };
        let email = opt_str("email")?;
        let parent = opt_str("parent")?;
        let mut scope = match c.get("scope") {
            None | Some(Json::Null) => ScopeInfo { extra_scopes: Some(Vec::new()), ..ScopeInfo::default() },
            Some(Json::String(s)) => ScopeInfo::parse(s)?,
            Some(_) => return Err(bad("scope must be a string")),
        };
        scope.workspaces.insert(personal_workspace(id), Permission::Admin);
        let expires_at = c.get("exp").and_then(Json::as_f64);
        Ok(UserInfo {
            id: id.to_owned(),
            is_anonymous: roles.iter().any(|r| r == ANONYMOUS_ROLE),
            roles,
            current_workspace: scope.current_workspace.clone(),
            scope,
            email,
            parent,
            expires_at,
        })
    }
}

/// Python's `int(x)` on a numeric claim: integers, floats (truncated) and digit strings.
fn int_claim(v: &Json) -> Option<f64> {
    match v {
        Json::Number(n) => n.as_f64().filter(|f| f.is_finite()).map(f64::trunc),
        Json::String(s) => s.trim().parse::<i64>().ok().map(|i| i as f64),
        _ => None,
    }
}

/// [`JwtConfig::encode`] with upstream's default issuer, audience and namespace.
pub fn generate_token(user: &UserInfo, expires_in: f64, secret: &str, now: f64) -> Result<String, AuthError> {
    JwtConfig::new(secret).encode(user, expires_in, now)
}

/// [`JwtConfig::decode`] with upstream's default issuer, audience and namespace.
pub fn parse_token(
    token: &str,
    secret: &str,
    now: f64,
    revoked: &dyn Fn(&str) -> bool,
) -> Result<UserInfo, AuthError> {
    JwtConfig::new(secret).decode(token, now, revoked)
}

/// `json.dumps(v, separators=(",", ":"))` with Python's default `ensure_ascii`: compact, and
/// every character outside printable ASCII escaped as `\uXXXX` (surrogate pairs above the BMP).
fn python_json(v: &Json) -> String {
    let compact = v.to_string();
    let mut out = String::with_capacity(compact.len());
    for ch in compact.chars() {
        if (ch as u32) < 0x7f {
            out.push(ch);
        } else {
            let mut buf = [0u16; 2];
            for unit in ch.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const B64STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64url_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(B64URL[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn b64_decode_with(text: &str, alphabet: &[u8; 64]) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = alphabet.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // One leftover character (6 bits) cannot encode a byte: truncated input.
    (bits < 6).then_some(out)
}

fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    b64_decode_with(text, B64URL)
}

// ---------------------------------------------------------------------------------------
// Caller identification (shared by HTTP and websocket)
// ---------------------------------------------------------------------------------------

/// Everything token parsing needs from the server: the JWT settings, the optional root
/// token, the current time and the revocation list (as a predicate over the raw token).
pub struct AuthContext<'a> {
    /// Secret and claim settings.
    pub jwt: &'a JwtConfig,
    /// `--root-token`, compared verbatim before JWT decoding.
    pub root_token: Option<&'a str>,
    /// Unix seconds.
    pub now: f64,
    /// True when the token is revoked (upstream: `revoked_token:{token}` exists in Redis).
    pub revoked: &'a dyn Fn(&str) -> bool,
}

impl fmt::Debug for AuthContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthContext")
            .field("jwt", self.jwt)
            .field("root_token", &self.root_token.map(|_| "<redacted>"))
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// An HTTP caller (§1.3): the user and whether the token named a workspace (`wid:`).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpCaller {
    /// The caller's identity (scope adjusted as §1.3 step 4 says).
    pub user: UserInfo,
    /// True when the token carried `wid:`; otherwise `scope.current_workspace` was set to
    /// the user's personal workspace.
    pub workspace_from_token: bool,
}

impl AuthContext<'_> {
    /// Parses a presented token: the root token (verbatim) first, then a JWT.
    pub fn parse(&self, token: &str) -> Result<UserInfo, AuthError> {
        if is_root_token(token, self.root_token) {
            return Ok(root_token_user());
        }
        self.jwt.decode(token, self.now, self.revoked)
    }

    /// The identity of an HTTP request from its headers (§1.3): no token → the fixed
    /// anonymous HTTP user; a token → it must be valid (no anonymous fallback; map the error
    /// with [`AuthError::http_status`]); admins get `"*": "a"`; without `wid:` the scope is
    /// bound to the user's personal workspace.
    pub fn http_caller<'h>(
        &self,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
    ) -> Result<HttpCaller, AuthError> {
        let Some(token) = extract_http_token(headers) else {
            return Ok(HttpCaller { user: anonymous_http_user(), workspace_from_token: false });
        };
        let mut user = self.parse(&token)?;
        if user.is_admin() {
            user.scope.workspaces.insert(ALL_WORKSPACES.to_owned(), Permission::Admin);
        }
        let workspace_from_token = user.current_workspace.is_some();
        if !workspace_from_token {
            user.scope.current_workspace = Some(user.personal_workspace());
        }
        Ok(HttpCaller { user, workspace_from_token })
    }
}

/// The token of an HTTP request (§1.3 step 1) from its `(name, value)` headers (names
/// case-insensitive): `Authorization: Bearer X` → `X`; `Authorization: Basic
/// base64(user:pass)` → `pass` (git clients); any other `Authorization` value verbatim;
/// else a `Cookie` with `access_token=X` → `X`. Authorization wins over the cookie whatever
/// the header order (upstream takes whichever comes first; the spec recommends this).
pub fn extract_http_token<'h>(headers: impl IntoIterator<Item = (&'h str, &'h str)>) -> Option<String> {
    let mut cookie_token = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("authorization") {
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            return Some(authorization_token(value));
        }
        if cookie_token.is_none() && name.eq_ignore_ascii_case("cookie") {
            cookie_token = value
                .split(';')
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k.trim() == "access_token")
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty());
        }
    }
    cookie_token
}

fn authorization_token(value: &str) -> String {
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return rest.to_owned();
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let password = b64_decode_with(rest, B64STD)
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|cred| cred.split_once(':').map(|(_, p)| p.to_owned()));
        // Undecodable credentials: hand the raw value on, so that parsing fails with a 401
        // instead of silently treating the caller as anonymous.
        return password.unwrap_or_else(|| value.to_owned());
    }
    value.to_owned()
}

// ---------------------------------------------------------------------------------------
// Websocket handshake
// ---------------------------------------------------------------------------------------

/// The query parameters that mark a legacy client (§2.1 step 2).
pub const LEGACY_QUERY_PARAMS: [&str; 4] = ["workspace", "client_id", "token", "reconnection_token"];

/// True when the upgrade URL's query has any legacy parameter: such clients are closed with
/// [`HandshakeError::LegacyClient`] before any handshake.
pub fn is_legacy_query<'q>(query_keys: impl IntoIterator<Item = &'q str>) -> bool {
    query_keys.into_iter().any(|k| LEGACY_QUERY_PARAMS.contains(&k))
}

/// The first text frame of a websocket connection (§2.1 step 3). Missing keys and nulls are
/// `None` (JS omits undefined keys, Python sends nulls); so are empty strings, which upstream
/// treats as absent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthPayload {
    /// The client id the peer wants (`"{ws}/{client_id}"` becomes its address).
    pub client_id: Option<String>,
    /// The workspace the peer wants, if any.
    pub workspace: Option<String>,
    /// A login/generated token.
    pub token: Option<String>,
    /// The reconnection token from an earlier `connection_info` (takes precedence).
    pub reconnection_token: Option<String>,
}

impl AuthPayload {
    /// Parses the auth frame text. Not JSON, or JSON that is not an object, is
    /// [`HandshakeError::BadPayload`] (close 1003). Fields of another type than string are
    /// treated as absent.
    pub fn from_json(text: &str) -> Result<Self, HandshakeError> {
        let v: Json = serde_json::from_str(text).map_err(|_| HandshakeError::BadPayload)?;
        let obj = v.as_object().ok_or(HandshakeError::BadPayload)?;
        let field = |k: &str| obj.get(k).and_then(Json::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        Ok(AuthPayload {
            client_id: field("client_id"),
            workspace: field("workspace"),
            token: field("token"),
            reconnection_token: field("reconnection_token"),
        })
    }
}

/// Why a websocket handshake fails. `Display` is the exact `message` of the error text
/// frame (`{"type":"error","message":...}`) the server sends before closing, which is what
/// the hypha-rpc client raises; [`HandshakeError::close_code`] is the close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Credentials in the URL query (pre-0.20 clients): close 1008, no error frame.
    #[error("Connection rejected, please  upgrade to `hypha-rpc` which pass the authentication information in the first message")]
    LegacyClient,
    /// No auth frame within 5 s.
    #[error("Authentication payload timeout")]
    PayloadTimeout,
    /// The auth frame is not a JSON object (close 1003).
    #[error("Failed to decode authentication information")]
    BadPayload,
    /// A token that does not verify (bad JWT, expired, wrong secret/audience): close 1008.
    #[error("Authentication error: {0}")]
    Credentials(AuthError),
    /// A token that verifies but may not be used this way (revoked, specialized, client or
    /// workspace mismatch).
    #[error("Failed to establish connection: Failed to authenticate user: {0}")]
    Authentication(AuthError),
    /// The workspace `*`.
    #[error("Failed to establish connection: Dynamic workspace is not allowed for this endpoint")]
    DynamicWorkspace,
    /// A client id containing `/`.
    #[error("Failed to establish connection: Invalid client id: {0}")]
    InvalidClientId(String),
    /// No (or an empty) client id.
    #[error("Failed to establish connection: Failed to authenticate user to workspace: {0}")]
    MissingClientId(String),
    /// The server found no such workspace (the quotes are upstream's: it prints a KeyError).
    #[error("Failed to establish connection: 'Workspace {0} does not exist or is not accessible'")]
    WorkspaceNotFound(String),
    /// The final scope has no read permission on the workspace.
    #[error("Failed to establish connection: Permission denied for workspace: {0}")]
    PermissionDenied(String),
    /// Another live connection holds `{ws}/{cid}` (the server's step 7).
    #[error("Failed to establish connection: Client already exists and is active: {workspace}/{client_id}")]
    ClientExists {
        /// The workspace.
        workspace: String,
        /// The client id.
        client_id: String,
    },
    /// A resource limit (blocked user/IP, quotas): close 1008 with this reason.
    #[error("{0}")]
    Rejected(String),
    /// Too many handshakes in progress: close 1013.
    #[error("Server busy, please retry")]
    Busy,
}

impl HandshakeError {
    /// Wraps a token-level error the way upstream does: validator errors are credential
    /// errors (1008), the rest authentication failures (1001).
    pub fn from_auth(e: AuthError) -> Self {
        if e.is_credential_error() {
            HandshakeError::Credentials(e)
        } else {
            HandshakeError::Authentication(e)
        }
    }

    /// The websocket close code: 1008 (policy) for credentials, legacy clients, timeouts and
    /// resource limits; 1003 for an undecodable payload; 1013 when busy; 1001 otherwise.
    pub fn close_code(&self) -> u16 {
        match self {
            HandshakeError::LegacyClient
            | HandshakeError::PayloadTimeout
            | HandshakeError::Credentials(_)
            | HandshakeError::Rejected(_) => 1008,
            HandshakeError::BadPayload => 1003,
            HandshakeError::Busy => 1013,
            _ => 1001,
        }
    }

    /// Whether the server sends the `{"type":"error"}` frame before closing (all but the
    /// legacy-client rejection).
    pub fn sends_error_frame(&self) -> bool {
        !matches!(self, HandshakeError::LegacyClient)
    }

    /// The close reason: the message cut to 123 bytes at a character boundary (a longer
    /// reason makes the close frame invalid; upstream then drops the TCP connection).
    pub fn close_reason(&self) -> String {
        let mut msg = self.to_string();
        if msg.len() > MAX_CLOSE_REASON_BYTES {
            let mut cut = MAX_CLOSE_REASON_BYTES;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
        }
        msg
    }

    /// The error text frame `{"type": "error", "message": ...}`.
    pub fn error_frame(&self) -> Json {
        let mut m = JsonMap::new();
        m.insert("type".into(), Json::String("error".into()));
        m.insert("message".into(), Json::String(self.to_string()));
        Json::Object(m)
    }
}

/// Result of the first handshake step: who the peer is and which workspace it gets.
///
/// The server then checks that `workspace` exists (or creates it: anonymous users' own
/// workspaces, users' personal workspaces) and calls [`Authenticated::admit`] with its owners.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// The identity, scope not yet final.
    pub user: UserInfo,
    /// The resolved workspace.
    pub workspace: String,
    /// The client id from the payload (validated by [`Authenticated::admit`]).
    pub client_id: Option<String>,
    /// True for a reconnection token: the server skips the "client already exists" check
    /// and the new connection supersedes the old one.
    pub reconnecting: bool,
}

/// Result of the second handshake step: a connection the server may register.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    /// The final identity (`connection_info.user`, and what the reconnection token encodes).
    pub user: UserInfo,
    /// The workspace (`connection_info.workspace`).
    pub workspace: String,
    /// The client id (`connection_info.client_id`).
    pub client_id: String,
    /// See [`Authenticated::reconnecting`].
    pub reconnecting: bool,
}

impl AuthContext<'_> {
    /// Step one of the handshake (§2.2): authenticate the payload and resolve the workspace.
    ///
    /// * reconnection token: a JWT with `wid:` and `cid:`, not specialized; the payload's
    ///   workspace (if any) must be the `wid`, its client id the `cid`; workspace = `wid`;
    /// * token: root token or JWT, not specialized; a `cid:` must equal the payload's client
    ///   id; a `wid:` must equal the payload's workspace if one is given; workspace = payload,
    ///   else `wid`, else `ws-user-{id}`; `public` without a `public` wid is redirected to the
    ///   token's workspace;
    /// * neither: a fresh anonymous user; workspace = payload or its own.
    ///
    /// Then `*` and client ids containing `/` are refused.
    pub fn authenticate_handshake(&self, payload: &AuthPayload) -> Result<Authenticated, HandshakeError> {
        let requested = payload.workspace.as_deref();
        let cid = payload.client_id.as_deref();
        let auth_err = HandshakeError::Authentication;
        let (user, workspace, reconnecting) = if let Some(token) = &payload.reconnection_token {
            let user = self.jwt.decode(token, self.now, self.revoked).map_err(HandshakeError::from_auth)?;
            reject_specialized(&user)?;
            let wid = user
                .scope
                .current_workspace
                .clone()
                .ok_or_else(|| auth_err(AuthError::ReconnectScopeIncomplete("wid:")))?;
            let token_cid = user
                .scope
                .client_id
                .clone()
                .ok_or_else(|| auth_err(AuthError::ReconnectScopeIncomplete("cid:")))?;
            if let Some(ws) = requested.filter(|ws| *ws != wid) {
                return Err(auth_err(AuthError::ReconnectWorkspaceMismatch {
                    requested: ws.to_owned(),
                    token: wid,
                }));
            }
            if Some(token_cid.as_str()) != cid {
                return Err(auth_err(AuthError::ReconnectClientMismatch));
            }
            (user, wid, true)
        } else if let Some(token) = &payload.token {
            let mut user = self.parse(token).map_err(HandshakeError::from_auth)?;
            reject_specialized(&user)?;
            if let Some(restricted) = user.scope.client_id.as_deref() {
                if Some(restricted) != cid {
                    return Err(auth_err(AuthError::ClientIdRestricted(restricted.to_owned())));
                }
            }
            user.scope.client_id = cid.map(str::to_owned);
            let wid = user.scope.current_workspace.clone();
            if let (Some(wid), Some(ws)) = (&wid, requested) {
                if wid != ws {
                    return Err(auth_err(AuthError::WorkspaceMismatch {
                        token: wid.clone(),
                        requested: ws.to_owned(),
                    }));
                }
            }
            let fallback = || wid.clone().unwrap_or_else(|| user.personal_workspace());
            let mut workspace = requested.map(str::to_owned).unwrap_or_else(fallback);
            if workspace == PUBLIC_WORKSPACE && wid.as_deref() != Some(PUBLIC_WORKSPACE) {
                workspace = fallback();
            }
            (user, workspace, false)
        } else {
            let mut user = anonymous_user(self.now);
            user.scope.client_id = cid.map(str::to_owned);
            let workspace = requested.map(str::to_owned).unwrap_or_else(|| user.personal_workspace());
            (user, workspace, false)
        };
        if workspace == ALL_WORKSPACES {
            return Err(HandshakeError::DynamicWorkspace);
        }
        if let Some(c) = cid.filter(|c| c.contains('/')) {
            return Err(HandshakeError::InvalidClientId(c.to_owned()));
        }
        Ok(Authenticated { user, workspace, client_id: payload.client_id.clone(), reconnecting })
    }
}

fn reject_specialized(user: &UserInfo) -> Result<(), HandshakeError> {
    let special = user.scope.specialized_scopes();
    if special.is_empty() {
        Ok(())
    } else {
        Err(HandshakeError::Authentication(AuthError::SpecializedToken(special)))
    }
}

impl Authenticated {
    /// Step two of the handshake, after the server found (or created) the workspace: the
    /// final scope (upstream's `update_user_scope`) and the read check.
    ///
    /// A user without an entry for the workspace gets `a` there when it is its personal
    /// workspace or its id or email is in `owners`; admins get `"*": "a"`; the scope is bound
    /// to the client id and the workspace. Then read permission is required, and a client id.
    pub fn admit(self, owners: &[String]) -> Result<Admitted, HandshakeError> {
        let Authenticated { mut user, workspace, client_id, reconnecting } = self;
        let owner = workspace == user.personal_workspace()
            || owners.iter().any(|o| *o == user.id || user.email.as_deref() == Some(o.as_str()));
        if owner && !user.scope.workspaces.contains_key(&workspace) {
            user.scope.workspaces.insert(workspace.clone(), Permission::Admin);
        }
        if user.is_admin() {
            user.scope.workspaces.insert(ALL_WORKSPACES.to_owned(), Permission::Admin);
        }
        user.scope.client_id = client_id.clone();
        user.scope.current_workspace = Some(workspace.clone());
        if !user.check(&workspace, Permission::Read) {
            return Err(HandshakeError::PermissionDenied(workspace));
        }
        let Some(client_id) = client_id.filter(|c| !c.is_empty()) else {
            return Err(HandshakeError::MissingClientId(workspace));
        };
        Ok(Admitted { user, workspace, client_id, reconnecting })
    }
}

// ---------------------------------------------------------------------------------------
// generate_token (§6.4)
// ---------------------------------------------------------------------------------------

/// The validated `generate_token(config)` argument.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenRequest {
    /// Lifetime in seconds (default 3600).
    pub expires_in: Option<f64>,
    /// Target workspace (default: the caller's).
    pub workspace: Option<String>,
    /// Permission on the target (default `read_write`).
    pub permission: Option<Permission>,
    /// Extra scopes, verbatim.
    pub extra_scopes: Option<Vec<String>>,
    /// Restrict the token to this client id (`cid:`).
    pub client_id: Option<String>,
    /// Email of the child (honoured for admin callers only).
    pub email: Option<String>,
}

#[derive(Deserialize)]
struct RawTokenRequest {
    #[serde(default)]
    expires_in: Option<f64>,
    #[serde(default)]
    workspace: Option<String>,
    #[serde(default)]
    permission: Option<String>,
    #[serde(default)]
    extra_scopes: Option<Vec<String>>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

impl TokenRequest {
    /// Validates the config as upstream's `TokenConfig` model does (a map or nil; unknown
    /// keys ignored; `permission` one of `read`/`read_write`/`admin`).
    pub fn from_value(config: &Value) -> Result<Self, AuthError> {
        if matches!(config, Value::Nil) {
            return Ok(TokenRequest::default());
        }
        let raw: RawTokenRequest = crate::serde_value::from_value_ref(config)
            .map_err(|e| AuthError::InvalidTokenConfig(e.to_string()))?;
        let permission = match raw.permission {
            None => None,
            Some(p) => Some(Permission::from_config_name(&p).ok_or_else(|| {
                AuthError::InvalidTokenConfig(format!(
                    "permission\n  Input should be 'read', 'read_write' or 'admin' [type=enum, input_value='{p}', input_type=str]"
                ))
            })?),
        };
        Ok(TokenRequest {
            expires_in: raw.expires_in,
            workspace: raw.workspace,
            permission,
            extra_scopes: raw.extra_scopes,
            client_id: raw.client_id,
            email: raw.email,
        })
    }
}

/// Decides `generate_token` (§6.4) without signing: returns the child identity and its
/// lifetime in seconds.
///
/// `caller_workspace` is the caller's connection workspace (the default target); `is_owner`
/// says whether the caller owns a workspace (see [`is_workspace_owner`]). The caller needs
/// `a` on the target, or ownership; otherwise [`AuthError::NoPermission`] (nothing at all)
/// or [`AuthError::OnlyAdmin`]. The child gets a fresh readable id, `parent` = the caller's
/// parent or the caller, the caller's roles and email, and scope `{target: permission}`
/// bound with `wid:` (and `cid:` when asked).
pub fn plan_child_token(
    caller: &UserInfo,
    caller_workspace: &str,
    request: &TokenRequest,
    is_owner: &dyn Fn(&UserInfo, &str) -> bool,
) -> Result<(UserInfo, f64), AuthError> {
    let target = request.workspace.clone().unwrap_or_else(|| caller_workspace.to_owned());
    if !caller.check(&target, Permission::Admin) && !is_owner(caller, &target) {
        return Err(if caller.check(&target, Permission::Read) {
            AuthError::OnlyAdmin
        } else {
            AuthError::NoPermission(target)
        });
    }
    let mut child = UserInfo::new(readable_id());
    child.roles = caller.roles.clone();
    child.is_anonymous = caller.roles.iter().any(|r| r == ANONYMOUS_ROLE);
    child.email = match &request.email {
        Some(email) if caller.is_admin() => Some(email.clone()),
        _ => caller.email.clone(),
    };
    child.parent = Some(caller.parent.clone().unwrap_or_else(|| caller.id.clone()));
    child.scope.workspaces.insert(target.clone(), request.permission.unwrap_or(Permission::ReadWrite));
    child.scope.current_workspace = Some(target.clone());
    child.scope.client_id = request.client_id.clone();
    child.scope.extra_scopes = request.extra_scopes.clone();
    child.current_workspace = Some(target);
    Ok((child, request.expires_in.unwrap_or(DEFAULT_TOKEN_LIFE_TIME)))
}

/// `generate_token(config)` end to end: validate the config, decide with
/// [`plan_child_token`], sign with `exp = now + expires_in`.
pub fn generate_child_token(
    caller: &UserInfo,
    caller_workspace: &str,
    config: &Value,
    is_owner: &dyn Fn(&UserInfo, &str) -> bool,
    jwt: &JwtConfig,
    now: f64,
) -> Result<String, AuthError> {
    let request = TokenRequest::from_value(config)?;
    let (mut child, expires_in) = plan_child_token(caller, caller_workspace, &request, is_owner)?;
    child.expires_at = Some((now + expires_in).floor());
    jwt.encode(&child, expires_in, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The secret of `core/tests/data/auth_mint_tokens.py`.
    const SECRET: &str = "hypha-rs-interop-secret-0123456789";
    const IAT: i64 = 1_795_240_776;
    const EXP: i64 = 4_102_444_800;
    const NOW: f64 = 1_795_240_776.5;
    const ANON: &str = "anonymouz-harsh-canidae-74400639";
    const ANON_WS: &str = "ws-user-anonymouz-harsh-canidae-74400639";
    const ROOT_TOKEN: &str = "Zq8vN2xW4kR7tY1uP5sL3mJ9hG6fD0cB2aE8iO4nQ7wX1zV5yT3rU6pK9jH2gF0dS4";

    // Minted by `core/tests/data/auth_mint_tokens.py` (Python, HMAC by hand, python-jose's
    // serialization). Do not regenerate casually: the byte-identity test depends on them.
    const PY_RECONNECT_ANON: &str =
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2FtdW4uYWkvIiwic3ViIjoiYW5vbnltb3V6LWhhcnNoLWNhbmlkYWUtNzQ0MDA2MzkiLCJhdWQiOiJodHRwczovL2FtdW4tYWkuZXUuYXV0aDAuY29tL2FwaS92Mi8iLCJpYXQiOjE3OTUyNDA3NzYsImV4cCI6NDEwMjQ0NDgwMCwic2NvcGUiOiJ3czp3cy11c2VyLWFub255bW91ei1oYXJzaC1jYW5pZGFlLTc0NDAwNjM5I2EgY2lkOnByb2JlLW9rIHdpZDp3cy11c2VyLWFub255bW91ei1oYXJzaC1jYW5pZGFlLTc0NDAwNjM5IiwiZ3R5IjoiY2xpZW50LWNyZWRlbnRpYWxzIiwiaHR0cHM6Ly9hbXVuLmFpL3JvbGVzIjpbImFub255bW91cyJdLCJodHRwczovL2FtdW4uYWkvZW1haWwiOm51bGx9.2dBe6WFJiSCItl2NaRdAtZLwFMURnkUSy8JzvtPmVE8";
    const PY_ALICE: &str =
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2FtdW4uYWkvIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJodHRwczovL2FtdW4tYWkuZXUuYXV0aDAuY29tL2FwaS92Mi8iLCJpYXQiOjE3OTUyNDA3NzYsImV4cCI6NDEwMjQ0NDgwMCwic2NvcGUiOiJ3czp3cy11c2VyLWFsaWNlI2EiLCJndHkiOiJjbGllbnQtY3JlZGVudGlhbHMiLCJodHRwczovL2FtdW4uYWkvcm9sZXMiOltdLCJodHRwczovL2FtdW4uYWkvZW1haWwiOiJhbGljZUBleGFtcGxlLmNvbSJ9.wyAh6CTxnz5Ly9XBh2qWvcG_AlXBgCRzTyX0KIBIzSo";
    const PY_CHILD: &str =
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2FtdW4uYWkvIiwic3ViIjoibWVsb2RpYy1vZmZlci01NDQ4MDIxOCIsImF1ZCI6Imh0dHBzOi8vYW11bi1haS5ldS5hdXRoMC5jb20vYXBpL3YyLyIsImlhdCI6MTc5NTI0MDc3NiwiZXhwIjo0MTAyNDQ0ODAwLCJzY29wZSI6IndzOmFsaWNlLXdzLTEjcncgd2lkOmFsaWNlLXdzLTEiLCJndHkiOiJjbGllbnQtY3JlZGVudGlhbHMiLCJodHRwczovL2FtdW4uYWkvcm9sZXMiOltdLCJodHRwczovL2FtdW4uYWkvZW1haWwiOiJhbGljZUBleGFtcGxlLmNvbSIsImh0dHBzOi8vYW11bi5haS9wYXJlbnQiOiJhbGljZSJ9.YPr1WDyL4lYyc--FbkpEBeTYMhI8a584fKiJ0I2QVQA";
    const PY_SPECIAL: &str =
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2FtdW4uYWkvIiwic3ViIjoiem9lIiwiYXVkIjoiaHR0cHM6Ly9hbXVuLWFpLmV1LmF1dGgwLmNvbS9hcGkvdjIvIiwiaWF0IjoxNzk1MjQwNzc2LCJleHAiOjQxMDI0NDQ4MDAsInNjb3BlIjoid3M6VyNydyB3aWQ6VyBteS1kYXRhOnJlYWQiLCJndHkiOiJjbGllbnQtY3JlZGVudGlhbHMiLCJodHRwczovL2FtdW4uYWkvcm9sZXMiOlsiYWRtaW4iXSwiaHR0cHM6Ly9hbXVuLmFpL2VtYWlsIjoiem9cdTAwZWJAZXhhbXBsZS5jb20ifQ.Gdfe5vQ-UflbZExWzPLG8Lq6J2uaKeFvbUqO1txQXWA";

    fn never(_: &str) -> bool {
        false
    }

    fn jwt() -> JwtConfig {
        JwtConfig::new(SECRET)
    }

    fn parse(token: &str) -> Result<UserInfo, AuthError> {
        parse_token(token, SECRET, NOW, &never)
    }

    /// A token with the Python claim set and overrides, signed with `secret`.
    fn forge(secret: &str, overrides: Json) -> String {
        let mut claims = json!({
            "iss": DEFAULT_ISSUER, "sub": "probe-user", "aud": DEFAULT_AUDIENCE,
            "iat": IAT, "exp": EXP, "scope": "ws:ws-user-probe-user#a", "gty": GRANT_TYPE,
            "https://amun.ai/roles": [], "https://amun.ai/email": null,
        });
        for (k, v) in overrides.as_object().unwrap() {
            if v.is_null() && k != "https://amun.ai/email" {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        JwtConfig::new(secret).sign_claims(&claims).unwrap()
    }

    fn token_with_scope(scope: &str) -> String {
        forge(SECRET, json!({ "scope": scope }))
    }

    // ----- Python interop -----

    #[test]
    fn python_tokens_parse_to_upstream_dumps() {
        let anon = parse(PY_RECONNECT_ANON).unwrap();
        assert_eq!(
            anon.to_json(),
            json!({"id": ANON, "roles": ["anonymous"], "is_anonymous": true,
                   "scope": {"current_workspace": ANON_WS, "workspaces": {ANON_WS: "a"},
                             "client_id": "probe-ok", "extra_scopes": []},
                   "email": null, "parent": null, "expires_at": 4102444800.0,
                   "current_workspace": ANON_WS})
        );
        let child = parse(PY_CHILD).unwrap();
        assert_eq!(
            child.to_json(),
            json!({"id": "melodic-offer-54480218", "roles": [], "is_anonymous": false,
                   "scope": {"current_workspace": "alice-ws-1",
                             "workspaces": {"alice-ws-1": "rw", "ws-user-melodic-offer-54480218": "a"},
                             "client_id": null, "extra_scopes": []},
                   "email": "alice@example.com", "parent": "alice", "expires_at": 4102444800.0,
                   "current_workspace": "alice-ws-1"})
        );
        let alice = parse(PY_ALICE).unwrap();
        assert_eq!(alice.scope.workspaces, IndexMap::from([("ws-user-alice".to_owned(), Permission::Admin)]));
        assert_eq!(
            (alice.current_workspace.as_deref(), alice.email.as_deref()),
            (None, Some("alice@example.com"))
        );
        let zoe = parse(PY_SPECIAL).unwrap();
        assert_eq!(zoe.email.as_deref(), Some("zo\u{eb}@example.com"));
        assert!(zoe.is_admin() && !zoe.is_anonymous);
        assert_eq!(zoe.scope.specialized_scopes(), vec!["my-data:read".to_owned()]);
    }

    #[test]
    fn our_tokens_are_byte_identical_to_pythons() {
        let life = (EXP - IAT) as f64;
        let at = IAT as f64 + 0.25;
        // Parsed users re-encode to the same bytes when parsing added nothing.
        for token in [PY_RECONNECT_ANON, PY_ALICE] {
            let user = parse(token).unwrap();
            assert_eq!(generate_token(&user, life, SECRET, at).unwrap(), token);
        }
        let mut child = UserInfo::new("melodic-offer-54480218");
        child.email = Some("alice@example.com".into());
        child.parent = Some("alice".into());
        child.scope.workspaces.insert("alice-ws-1".into(), Permission::ReadWrite);
        child.scope.current_workspace = Some("alice-ws-1".into());
        assert_eq!(generate_token(&child, life, SECRET, at).unwrap(), PY_CHILD);
        // Non-ASCII is escaped as Python's ensure_ascii does.
        let mut zoe = UserInfo::new("zoe");
        zoe.roles = vec!["admin".into()];
        zoe.email = Some("zo\u{eb}@example.com".into());
        zoe.scope = ScopeInfo::parse("ws:W#rw wid:W my-data:read").unwrap();
        assert_eq!(generate_token(&zoe, life, SECRET, at).unwrap(), PY_SPECIAL);
    }

    fn python() -> std::path::PathBuf {
        let path = std::env::var_os("HYPHA_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
        assert!(path.exists(), "no Python at {path:?}: set HYPHA_PYTHON");
        path
    }

    /// Checks the HMAC in Python and returns its view of `{header, claims}`, or `None` when
    /// Python rejects the signature.
    fn python_verify(token: &str, secret: &str) -> Option<Json> {
        const SCRIPT: &str = r#"
import base64, hashlib, hmac, json, sys
tok, secret = sys.argv[1], sys.argv[2]
h, p, s = tok.split(".")
d = lambda x: base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
mac = hmac.new(secret.encode(), (h + "." + p).encode(), hashlib.sha256).digest()
if not hmac.compare_digest(mac, d(s)):
    sys.exit(3)
print(json.dumps({"header": json.loads(d(h)), "claims": json.loads(d(p))}))
"#;
        let out = std::process::Command::new(python()).args(["-c", SCRIPT, token, secret]).output().unwrap();
        match out.status.code() {
            Some(0) => Some(serde_json::from_slice(&out.stdout).unwrap()),
            Some(3) => None,
            other => panic!("python failed ({other:?}): {}", String::from_utf8_lossy(&out.stderr)),
        }
    }

    #[test]
    fn python_verifies_our_tokens() {
        let mut user = anonymous_user_with_id(ANON, NOW);
        user.scope.client_id = Some("probe-ok".into());
        user.email = Some("\u{e9}l\u{e8}ve@example.com".into());
        user.parent = Some("someone".into());
        let token = generate_token(&user, RECONNECTION_TOKEN_LIFE_TIME, SECRET, NOW).unwrap();
        let seen = python_verify(&token, SECRET).expect("Python rejected our signature");
        assert_eq!(seen["header"], json!({"alg": "HS256", "typ": "JWT"}));
        assert_eq!(
            seen["claims"],
            json!({"iss": "https://amun.ai/", "sub": ANON, "aud": "https://amun-ai.eu.auth0.com/api/v2/",
                   "iat": IAT, "exp": IAT + 172800,
                   "scope": format!("ws:{ANON_WS}#a cid:probe-ok wid:{ANON_WS}"),
                   "gty": "client-credentials", "https://amun.ai/roles": ["anonymous"],
                   "https://amun.ai/email": "\u{e9}l\u{e8}ve@example.com",
                   "https://amun.ai/parent": "someone"})
        );
        // The check can fail: another secret is refused by Python.
        assert_eq!(python_verify(&token, "another-secret"), None);
    }

    // ----- verification errors -----

    #[test]
    fn verification_error_texts() {
        let e = |t: &str| parse(t).unwrap_err().to_string();
        assert_eq!(e("not-a-jwt"), "Error decoding token headers.");
        assert_eq!(e("a.b"), "Error decoding token headers.");
        assert_eq!(e("abc.def.g!h"), "Error decoding token headers.");
        assert_eq!(
            e(&forge(SECRET, json!({"exp": IAT - 1}))),
            "The token has expired. Please fetch a new one"
        );
        assert_eq!(e(&forge(SECRET, json!({"aud": "https://other/"}))), "Invalid audience");
        assert_eq!(e(&forge(SECRET, json!({"aud": null}))), "Invalid audience");
        assert_eq!(e(&forge("wrong-secret", json!({}))), "Signature verification failed.");
        assert_eq!(e(&forge(SECRET, json!({"iss": "https://evil/"}))), "Invalid issuer");
        assert_eq!(
            e(&forge(SECRET, json!({"exp": "soon"}))),
            "Expiration Time claim (exp) must be an integer."
        );
        assert_eq!(e(&forge(SECRET, json!({"nbf": IAT + 100}))), "The token is not yet valid (nbf)");
        // Tampering with the payload breaks the signature.
        let good = forge(SECRET, json!({}));
        let parts: Vec<&str> = good.split('.').collect();
        let evil = b64url_encode(br#"{"sub":"root"}"#);
        assert_eq!(e(&format!("{}.{}.{}", parts[0], evil, parts[2])), "Signature verification failed.");
        // Another algorithm in the header is refused before the signature.
        let rs = format!("{}.{}.{}", b64url_encode(br#"{"alg":"RS256","typ":"JWT"}"#), parts[1], parts[2]);
        assert_eq!(e(&rs), "The specified alg value is not allowed");
        let none = format!("{}.{}.", b64url_encode(br#"{"typ":"JWT"}"#), parts[1]);
        assert_eq!(e(&none), "No algorithm was specified in the JWS header.");
        // Revocation is checked on valid tokens.
        let revoked = parse_token(&good, SECRET, NOW, &|t| t == good).unwrap_err();
        assert_eq!(
            (revoked.to_string().as_str(), revoked.is_credential_error()),
            ("Token has been revoked", false)
        );
        assert!(parse(&good).is_ok());
    }

    #[test]
    fn expiry_uses_the_given_clock_without_leeway() {
        let token = forge(SECRET, json!({"exp": IAT + 10}));
        let at = |now: f64| parse_token(&token, SECRET, now, &never);
        assert!(at((IAT + 10) as f64 + 0.9).is_ok(), "exp == floor(now) is still valid");
        assert_eq!(at((IAT + 11) as f64).unwrap_err(), AuthError::Expired);
        assert_eq!(at(IAT as f64).unwrap().expires_at, Some((IAT + 10) as f64));
        let t = UNIX_EPOCH + std::time::Duration::from_secs_f64(NOW);
        assert_eq!(unix_seconds(t), NOW);
    }

    #[test]
    fn configurable_claim_names() {
        let mut cfg = JwtConfig::new(SECRET);
        cfg.issuer = "https://issuer.example/".into();
        cfg.audience = "my-aud".into();
        cfg.namespace = "https://ns.example/".into();
        let mut user = UserInfo::new("u1");
        user.roles = vec!["admin".into()];
        let token = cfg.encode(&user, 60.0, NOW).unwrap();
        let claims = cfg.verify(&token, NOW).unwrap();
        assert_eq!(claims["https://ns.example/roles"], json!(["admin"]));
        assert_eq!(
            (claims["iss"].as_str(), claims["aud"].as_str()),
            (Some("https://issuer.example/"), Some("my-aud"))
        );
        assert!(cfg.decode(&token, NOW, &never).unwrap().is_admin());
        // The default configuration refuses it (audience checked before issuer).
        assert_eq!(parse(&token).unwrap_err(), AuthError::InvalidAudience);
        assert!(!format!("{cfg:?}").contains(SECRET));
    }

    // ----- model -----

    #[test]
    fn permissions_order_and_star_rule() {
        use Permission::*;
        assert!(Read < ReadWrite && ReadWrite < Admin);
        assert!(Admin.satisfies(Read) && ReadWrite.satisfies(ReadWrite) && !Read.satisfies(ReadWrite));
        assert_eq!(Permission::parse("rw"), Some(ReadWrite));
        assert_eq!(Permission::parse("x"), None);
        assert_eq!(Permission::from_config_name("read_write"), Some(ReadWrite));
        let scope = ScopeInfo::parse("ws:*#r ws:w1#a ws:w2#r").unwrap();
        assert_eq!(scope.permission("w1"), Some(Admin));
        assert_eq!(scope.permission("other"), Some(Read), "the * entry applies everywhere");
        let scope = ScopeInfo::parse("ws:*#rw ws:w2#r").unwrap();
        assert_eq!(scope.permission("w2"), Some(ReadWrite), "the stronger of * and ws");
        let mut user = UserInfo::new("u");
        user.scope = ScopeInfo::parse("ws:w1#rw").unwrap();
        assert!(user.check("w1", Read) && user.check("w1", ReadWrite) && !user.check("w1", Admin));
        assert!(!user.check("w2", Read));
    }

    #[test]
    fn scope_strings() {
        let s = ScopeInfo::parse("wid:my-ws  my-data:read ws:ws-user-abc#a cid:my-client ws:my-ws#rw plain")
            .unwrap();
        assert_eq!(s.current_workspace.as_deref(), Some("my-ws"));
        assert_eq!(s.client_id.as_deref(), Some("my-client"));
        assert_eq!(s.extra_scopes, Some(vec!["my-data:read".to_owned(), "plain".to_owned()]));
        assert_eq!(s.specialized_scopes(), vec!["my-data:read".to_owned()]);
        // Emitted order: ws entries (in map order), cid, wid, extras.
        assert_eq!(
            s.to_scope_string(),
            "ws:ws-user-abc#a ws:my-ws#rw cid:my-client wid:my-ws my-data:read plain"
        );
        assert_eq!(ScopeInfo::parse(&s.to_scope_string()).unwrap(), s);
        let empty = ScopeInfo::parse("").unwrap();
        assert_eq!((empty.to_scope_string(), empty.extra_scopes), (String::new(), Some(vec![])));
        for bad in ["ws:x#bogus", "ws:x", "ws:#a", "ws:x#a#b"] {
            assert_eq!(ScopeInfo::parse(bad), Err(AuthError::InvalidScope(bad.into())), "{bad}");
        }
        assert!(ScopeInfo::parse("file-download").unwrap().specialized_scopes().is_empty());
        assert!(matches!(parse(&token_with_scope("ws:a#x")), Err(AuthError::InvalidScope(_))));
    }

    proptest::proptest! {
        #[test]
        fn scope_string_round_trips(
            wss in proptest::collection::vec(("[a-z*][a-z0-9-]{0,8}", 0..3u8), 0..4),
            cid in proptest::option::of("[a-zA-Z0-9_-]{1,8}"),
            wid in proptest::option::of("[a-z][a-z0-9-]{0,8}"),
            extras in proptest::collection::vec("x[a-z-]{0,6}(:[a-z]{1,5})?", 0..3),
        ) {
            let perms = [Permission::Read, Permission::ReadWrite, Permission::Admin];
            let scope = ScopeInfo {
                current_workspace: wid,
                workspaces: wss.into_iter().map(|(w, p)| (w, perms[usize::from(p)])).collect(),
                client_id: cid,
                extra_scopes: Some(extras),
            };
            let text = scope.to_scope_string();
            proptest::prop_assert_eq!(ScopeInfo::parse(&text).unwrap(), scope.clone());
            // A user with that scope survives a token round trip (plus its own workspace).
            let mut user = UserInfo::new("u");
            user.scope = scope;
            let back = parse(&generate_token(&user, 60.0, SECRET, NOW).unwrap()).unwrap();
            user.scope.workspaces.insert("ws-user-u".into(), Permission::Admin);
            proptest::prop_assert_eq!(back.scope, user.scope);
        }
    }

    #[test]
    fn fixed_users_dump_exactly() {
        assert_eq!(
            serde_json::to_string(&anonymous_http_user().to_json()).unwrap(),
            r#"{"id":"anonymouz-http","roles":["anonymous"],"is_anonymous":true,"scope":{"current_workspace":"ws-anonymous","workspaces":{"ws-anonymous":"r"},"client_id":null,"extra_scopes":null},"email":null,"parent":null,"expires_at":null,"current_workspace":null}"#
        );
        assert_eq!(
            serde_json::to_string(&internal_root_user()).unwrap(),
            r#"{"id":"root","roles":["admin"],"is_anonymous":false,"scope":{"current_workspace":"*","workspaces":{"*":"a"},"client_id":null,"extra_scopes":null},"email":null,"parent":null,"expires_at":null,"current_workspace":null}"#
        );
    }

    #[test]
    fn serde_json_and_value_agree() {
        let mut user = parse(PY_CHILD).unwrap();
        user.scope.client_id = Some("alice-c2".into());
        let text = serde_json::to_string(&user).unwrap();
        assert_eq!(serde_json::from_str::<Json>(&text).unwrap(), user.to_json());
        assert!(text.contains(r#""expires_at":4102444800.0"#), "float, as pydantic dumps it: {text}");
        assert_eq!(serde_json::from_str::<UserInfo>(&text).unwrap(), user);
        let v = user.to_value();
        assert_eq!(v, crate::serde_value::to_value(&user).unwrap());
        assert_eq!(crate::serde_value::from_value::<UserInfo>(v.clone()).unwrap(), user);
        let keys: Vec<&String> = v.as_map().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["id", "roles", "is_anonymous", "scope", "email", "parent", "expires_at", "current_workspace"]
        );
        assert!(serde_json::from_str::<UserInfo>(r#"{"id":"x","scope":{"workspaces":{"w":"z"}}}"#).is_err());
    }

    #[test]
    fn anonymous_ids_and_users() {
        for _ in 0..50 {
            let id = readable_id();
            let parts: Vec<&str> = id.split('-').collect();
            assert_eq!(parts.len(), 3, "{id}");
            assert!(ADJECTIVES.contains(&parts[0]) && NOUNS.contains(&parts[1]), "{id}");
            assert!(parts[2].len() == 8 && parts[2].bytes().all(|b| b.is_ascii_digit()), "{id}");
        }
        for w in ADJECTIVES.iter().chain(NOUNS.iter()) {
            assert!(!w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()), "{w}");
        }
        let user = anonymous_user(NOW);
        assert!(user.id.starts_with("anonymouz-") && user.is_anonymous);
        assert_eq!(user.roles, vec!["anonymous".to_owned()]);
        assert_eq!(user.expires_at, Some(NOW + 600.0));
        assert_eq!(user.permission(&format!("ws-user-{}", user.id)), Some(Permission::Admin));
        assert_eq!(user.scope.workspaces.len(), 1);
        assert_ne!(anonymous_user(NOW).id, user.id);
    }

    #[test]
    fn root_tokens() {
        assert!(check_root_token_strength(ROOT_TOKEN).is_ok());
        assert_eq!(check_root_token_strength("short"), Err(AuthError::RootTokenTooShort(5)));
        let weak = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxPassWord"; // 36 chars
        assert_eq!(check_root_token_strength(weak), Err(AuthError::RootTokenWeak("password")));
        assert!(check_root_token_strength(&format!("{weak}{}", "y".repeat(30))).is_ok(), "long enough");
        assert!(is_root_token(ROOT_TOKEN, Some(ROOT_TOKEN)));
        assert!(!is_root_token(&ROOT_TOKEN[1..], Some(ROOT_TOKEN)));
        assert!(!is_root_token(ROOT_TOKEN, None));
    }

    #[test]
    fn base64_helpers() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"\xff\xfe\x00"] {
            assert_eq!(b64url_decode(&b64url_encode(data)).unwrap(), data);
        }
        assert_eq!(b64url_encode(b"\xfb\xff"), "-_8");
        assert_eq!(b64_decode_with("eDpzZWNyZXQ=", B64STD).unwrap(), b"x:secret");
        assert_eq!(b64url_decode("a"), None, "a lone sextet is truncated input");
        assert_eq!(
            python_json(&json!({"e": "\u{e9}\u{1f600}\u{7f}"})),
            r#"{"e":"\u00e9\ud83d\ude00\u007f"}"#
        );
    }

    // ----- HTTP -----

    #[test]
    fn http_token_extraction() {
        let x = |h: &[(&str, &str)]| extract_http_token(h.iter().copied());
        assert_eq!(x(&[("Authorization", "Bearer abc")]).as_deref(), Some("abc"));
        assert_eq!(x(&[("authorization", "bearer abc")]).as_deref(), Some("abc"));
        assert_eq!(x(&[("Authorization", "Basic eDpzZWNyZXQ=")]).as_deref(), Some("secret"));
        assert_eq!(x(&[("Authorization", "Basic !!")]).as_deref(), Some("Basic !!"));
        assert_eq!(x(&[("Authorization", "rawtoken")]).as_deref(), Some("rawtoken"));
        assert_eq!(x(&[("Cookie", "a=1; access_token=tok; b=2")]).as_deref(), Some("tok"));
        assert_eq!(x(&[("Cookie", "a=1"), ("Accept", "*/*")]), None);
        assert_eq!(
            x(&[("Cookie", "access_token=alice"), ("Authorization", "Bearer bob")]).as_deref(),
            Some("bob")
        );
    }

    #[test]
    fn http_callers() {
        let root = Some(ROOT_TOKEN);
        let jwt = jwt();
        let cx = AuthContext { jwt: &jwt, root_token: root, now: NOW, revoked: &never };
        let anon = cx.http_caller([("Accept", "*/*")]).unwrap();
        assert_eq!(anon.user, anonymous_http_user());
        let alice = cx.http_caller([("Authorization", &*format!("Bearer {PY_ALICE}"))]).unwrap();
        assert!(!alice.workspace_from_token);
        assert_eq!(
            alice.user.to_json()["scope"],
            json!({"current_workspace": "ws-user-alice", "workspaces": {"ws-user-alice": "a"},
                   "client_id": null, "extra_scopes": []})
        );
        assert_eq!(alice.user.to_json()["current_workspace"], Json::Null);
        let child = cx.http_caller([("Cookie", &*format!("access_token={PY_CHILD}"))]).unwrap();
        assert!(child.workspace_from_token);
        assert_eq!(child.user.scope.current_workspace.as_deref(), Some("alice-ws-1"));
        let r = cx.http_caller([("Authorization", ROOT_TOKEN)]).unwrap();
        assert_eq!(
            (r.user.id.as_str(), r.user.scope.current_workspace.as_deref()),
            ("root", Some("ws-user-root"))
        );
        assert_eq!(r.user.scope.workspaces, IndexMap::from([("*".to_owned(), Permission::Admin)]));
        let err = cx.http_caller([("Authorization", "Bearer nope")]).unwrap_err();
        assert_eq!((err.to_string().as_str(), err.http_status()), ("Error decoding token headers.", 401));
    }

    // ----- websocket handshake -----

    fn payload(cid: Option<&str>, ws: Option<&str>, token: Option<&str>, rt: Option<&str>) -> AuthPayload {
        let s = |x: Option<&str>| x.map(str::to_owned);
        AuthPayload { client_id: s(cid), workspace: s(ws), token: s(token), reconnection_token: s(rt) }
    }

    fn handshake(p: &AuthPayload, owners: &[String]) -> Result<Admitted, HandshakeError> {
        let jwt = jwt();
        let revoked = |t: &str| t.contains("REVOKED") || t == forge(SECRET, json!({"sub": "revoked-user"}));
        let cx = AuthContext { jwt: &jwt, root_token: Some(ROOT_TOKEN), now: NOW, revoked: &revoked };
        cx.authenticate_handshake(p)?.admit(owners)
    }

    fn fail(p: AuthPayload) -> (String, u16) {
        let e = handshake(&p, &[]).unwrap_err();
        (e.to_string(), e.close_code())
    }

    #[test]
    fn handshake_credential_errors_close_1008() {
        let tok = |t: &str| payload(Some("c"), None, Some(t), None);
        let cases = [
            ("not-a-jwt".to_owned(), "Error decoding token headers."),
            (forge(SECRET, json!({"exp": IAT - 5})), "The token has expired. Please fetch a new one"),
            (forge(SECRET, json!({"aud": "x"})), "Invalid audience"),
            (forge("other", json!({})), "Signature verification failed."),
        ];
        for (t, detail) in cases {
            assert_eq!(fail(tok(&t)), (format!("Authentication error: {detail}"), 1008));
        }
        // Same for an expired reconnection token.
        let rt = forge(SECRET, json!({"exp": IAT - 5, "scope": "ws:w#a cid:c wid:w"}));
        assert_eq!(fail(payload(Some("c"), None, None, Some(&rt))).1, 1008);
    }

    #[test]
    fn handshake_rule_errors_close_1001() {
        let pre = "Failed to establish connection: Failed to authenticate user: ";
        let revoked = forge(SECRET, json!({"sub": "revoked-user"}));
        assert_eq!(
            fail(payload(Some("c"), None, Some(&revoked), None)),
            (format!("{pre}Token has been revoked"), 1001)
        );
        let wid = token_with_scope("ws:ws-a#rw wid:ws-a");
        assert_eq!(
            fail(payload(Some("c"), Some("ws-b"), Some(&wid), None)).0,
            format!("{pre}Current workspace encoded in the token (ws-a) does not match the specified workspace (ws-b)")
        );
        let cid = token_with_scope("ws:w#rw cid:x");
        assert_eq!(
            fail(payload(Some("y"), None, Some(&cid), None)).0,
            format!("{pre}Client id mismatch: this token is restricted to client with client_id='x'")
        );
        let special = token_with_scope("ws:W#rw wid:W my-data:read");
        assert_eq!(
            fail(payload(Some("c"), None, Some(&special), None)).0,
            format!("{pre}Specialized token with scopes [my-data:read] cannot be used for general workspace access. This token can only be used for its intended purpose.")
        );
        assert_eq!(
            fail(payload(Some("other"), None, None, Some(PY_RECONNECT_ANON))),
            (format!("{pre}Client id mismatch, disconnecting"), 1001)
        );
        assert_eq!(
            fail(payload(Some("probe-ok"), Some("public"), None, Some(PY_RECONNECT_ANON))).0,
            format!("{pre}Invalid scope, workspace mismatch: public != {ANON_WS}")
        );
        assert_eq!(
            fail(payload(Some("other"), None, Some(PY_RECONNECT_ANON), None)).0,
            format!("{pre}Client id mismatch: this token is restricted to client with client_id='probe-ok'")
        );
        // A reconnection token must be bound to a workspace and a client.
        assert_eq!(
            fail(payload(Some("c"), None, None, Some(PY_ALICE))).0,
            format!("{pre}Invalid reconnection token: the scope must contain wid:")
        );
        assert_eq!(
            fail(payload(Some("c"), None, None, Some(&special))).0,
            format!("{pre}Specialized token with scopes [my-data:read] cannot be used for general workspace access. This token can only be used for its intended purpose.")
        );
    }

    #[test]
    fn handshake_setup_errors() {
        let pre = "Failed to establish connection: ";
        for ws in ["public", "ws-user-root", "ws-anonymous", "ws-user-anonymouz-other-cat-12345678"] {
            assert_eq!(
                fail(payload(Some("c"), Some(ws), None, None)),
                (format!("{pre}Permission denied for workspace: {ws}"), 1001)
            );
        }
        assert_eq!(
            fail(payload(Some("c"), Some("*"), None, None)).0,
            format!("{pre}Dynamic workspace is not allowed for this endpoint")
        );
        assert_eq!(fail(payload(Some("a/b"), None, None, None)).0, format!("{pre}Invalid client id: a/b"));
        let (msg, code) = fail(payload(None, None, None, None));
        assert!(
            msg.starts_with(&format!("{pre}Failed to authenticate user to workspace: ws-user-anonymouz-")),
            "{msg}"
        );
        assert_eq!(code, 1001);
        // Errors the server raises itself, from its own checks.
        let e = HandshakeError::WorkspaceNotFound("nonexistent-ws".into());
        assert_eq!(
            e.to_string(),
            format!("{pre}'Workspace nonexistent-ws does not exist or is not accessible'")
        );
        let e = HandshakeError::ClientExists { workspace: "w".into(), client_id: "dup-id".into() };
        assert_eq!(
            (e.to_string(), e.close_code()),
            (format!("{pre}Client already exists and is active: w/dup-id"), 1001)
        );
        assert_eq!(HandshakeError::Busy.close_code(), 1013);
    }

    #[test]
    fn handshake_transport_errors() {
        assert!(is_legacy_query(["client_id"]) && is_legacy_query(["x", "token"]) && !is_legacy_query(["x"]));
        let legacy = HandshakeError::LegacyClient;
        assert_eq!(legacy.close_code(), 1008);
        assert!(!legacy.sends_error_frame());
        assert!(legacy.to_string().contains("please  upgrade"), "upstream's double space");
        let bad = AuthPayload::from_json("hello there").unwrap_err();
        assert_eq!(
            (bad.to_string().as_str(), bad.close_code()),
            ("Failed to decode authentication information", 1003)
        );
        assert_eq!(AuthPayload::from_json("[1,2]"), Err(HandshakeError::BadPayload));
        assert_eq!(
            AuthPayload::from_json(r#"{"client_id":"c"}"#).unwrap(),
            payload(Some("c"), None, None, None)
        );
        assert_eq!(
            AuthPayload::from_json(
                r#"{"client_id":"c","workspace":null,"token":"","reconnection_token":null}"#
            )
            .unwrap(),
            payload(Some("c"), None, None, None)
        );
        let t = HandshakeError::PayloadTimeout;
        assert_eq!(t.error_frame(), json!({"type": "error", "message": "Authentication payload timeout"}));
        assert_eq!(t.close_code(), 1008);
        // Long messages are cut to 123 bytes for the close frame, never mid-character.
        let long = HandshakeError::Rejected("\u{e9}".repeat(100));
        assert_eq!(long.close_reason().len(), 122);
        assert_eq!(HandshakeError::Busy.close_reason(), "Server busy, please retry");
    }

    #[test]
    fn handshake_anonymous_and_reconnect() {
        let a = handshake(&payload(Some("probe-ok"), None, None, None), &[]).unwrap();
        let ws = a.user.personal_workspace();
        assert_eq!(
            (a.workspace.as_str(), a.client_id.as_str(), a.reconnecting),
            (ws.as_str(), "probe-ok", false)
        );
        assert_eq!(
            a.user.to_json(),
            json!({"id": a.user.id, "roles": ["anonymous"], "is_anonymous": true,
                   "scope": {"current_workspace": ws, "workspaces": {ws.clone(): "a"},
                             "client_id": "probe-ok", "extra_scopes": null},
                   "email": null, "parent": null, "expires_at": NOW + 600.0, "current_workspace": null})
        );
        // Its reconnection token has the spec's claims ...
        let rt = jwt().encode(&a.user, RECONNECTION_TOKEN_LIFE_TIME, NOW).unwrap();
        let claims = jwt().verify(&rt, NOW).unwrap();
        assert_eq!(claims["scope"], json!(format!("ws:{ws}#a cid:probe-ok wid:{ws}")));
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 172_800);
        // ... and brings the client back to its workspace.
        let b = handshake(&payload(Some("probe-ok"), Some(&ws), None, Some(&rt)), &[]).unwrap();
        assert!(b.reconnecting);
        assert_eq!((b.workspace.as_str(), b.user.id.as_str()), (ws.as_str(), a.user.id.as_str()));
        assert_eq!(b.user.current_workspace.as_deref(), Some(ws.as_str()));
        assert_eq!(b.user.scope.extra_scopes, Some(vec![]));
        assert_eq!(b.user.expires_at, Some((NOW + 172_800.0).floor()));
        // The Python-minted reconnection token works too.
        let c = handshake(&payload(Some("probe-ok"), None, None, Some(PY_RECONNECT_ANON)), &[]).unwrap();
        assert_eq!((c.workspace.as_str(), c.reconnecting), (ANON_WS, true));
    }

    #[test]
    fn handshake_token_users() {
        // Generic token, no workspace asked: the personal workspace.
        let alice = handshake(&payload(Some("alice-c"), None, Some(PY_ALICE), None), &[]).unwrap();
        assert_eq!(alice.workspace, "ws-user-alice");
        assert_eq!(
            alice.user.to_json(),
            json!({"id": "alice", "roles": [], "is_anonymous": false,
                   "scope": {"current_workspace": "ws-user-alice", "workspaces": {"ws-user-alice": "a"},
                             "client_id": "alice-c", "extra_scopes": []},
                   "email": "alice@example.com", "parent": null, "expires_at": 4102444800.0,
                   "current_workspace": null})
        );
        // Asking for `public` without a `public` wid lands in the personal workspace.
        let generic = token_with_scope("ws:ws-user-probe-user#a");
        let p = handshake(&payload(Some("c"), Some("public"), Some(&generic), None), &[]).unwrap();
        assert_eq!(p.workspace, "ws-user-probe-user");
        // An owner (by id or by email) gets `a` on its workspace; others are refused.
        let owners = ["alice".to_owned()];
        let own =
            handshake(&payload(Some("alice-c"), Some("alice-ws-1"), Some(PY_ALICE), None), &owners).unwrap();
        assert_eq!(own.user.permission("alice-ws-1"), Some(Permission::Admin));
        let by_mail = ["alice@example.com".to_owned()];
        assert!(handshake(&payload(Some("c"), Some("alice-ws-1"), Some(PY_ALICE), None), &by_mail).is_ok());
        assert_eq!(
            fail(payload(Some("c"), Some("alice-ws-1"), Some(PY_ALICE), None)).0,
            "Failed to establish connection: Permission denied for workspace: alice-ws-1"
        );
        // A child token keeps its `rw` (the spec's child dump).
        let child = handshake(&payload(Some("alice-c2"), None, Some(PY_CHILD), None), &owners).unwrap();
        assert_eq!(child.workspace, "alice-ws-1");
        assert_eq!(
            child.user.to_json(),
            json!({"id": "melodic-offer-54480218", "roles": [], "is_anonymous": false,
                   "scope": {"current_workspace": "alice-ws-1",
                             "workspaces": {"alice-ws-1": "rw", "ws-user-melodic-offer-54480218": "a"},
                             "client_id": "alice-c2", "extra_scopes": []},
                   "email": "alice@example.com", "parent": "alice", "expires_at": 4102444800.0,
                   "current_workspace": "alice-ws-1"})
        );
        // A `cid:` token works for its own client id.
        let cid = token_with_scope("ws:w#rw cid:only-me wid:w");
        assert_eq!(handshake(&payload(Some("only-me"), None, Some(&cid), None), &[]).unwrap().workspace, "w");
    }

    #[test]
    fn handshake_root_token() {
        let r = handshake(&payload(Some("rc"), None, Some(ROOT_TOKEN), None), &[]).unwrap();
        assert_eq!(r.workspace, "ws-user-root");
        assert_eq!(r.user.to_json()["scope"]["workspaces"], json!({"*": "a", "ws-user-root": "a"}));
        assert_eq!(r.user.expires_at, None);
        assert_eq!(
            fail(payload(Some("rc"), Some("public"), Some(ROOT_TOKEN), None)).0,
            "Failed to establish connection: Failed to authenticate user: Current workspace encoded in the token (ws-user-root) does not match the specified workspace (public)"
        );
        // Its reconnection token lists both entries and parses back to the same scope.
        let rt = jwt().encode(&r.user, RECONNECTION_TOKEN_LIFE_TIME, NOW).unwrap();
        assert_eq!(
            jwt().verify(&rt, NOW).unwrap()["scope"],
            json!("ws:*#a ws:ws-user-root#a cid:rc wid:ws-user-root")
        );
        let back = handshake(&payload(Some("rc"), None, None, Some(&rt)), &[]).unwrap();
        assert_eq!(back.user.scope.workspaces, r.user.scope.workspaces);
    }

    // ----- generate_token -----

    fn owner_of(owners: &'static [&'static str]) -> impl Fn(&UserInfo, &str) -> bool {
        move |u, ws| is_workspace_owner(u, ws, &owners.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn mint(
        caller: &UserInfo,
        ws: &str,
        config: Value,
        owners: &'static [&'static str],
    ) -> Result<JsonMap<String, Json>, AuthError> {
        let token = generate_child_token(caller, ws, &config, &owner_of(owners), &jwt(), NOW)?;
        Ok(jwt().verify(&token, NOW).unwrap())
    }

    #[test]
    fn generate_token_for_anonymous_caller() {
        let a = handshake(&payload(Some("c"), None, None, None), &[]).unwrap();
        let claims = mint(&a.user, &a.workspace, Value::Nil, &[]).unwrap();
        let w = &a.workspace;
        assert_eq!(claims["scope"], json!(format!("ws:{w}#rw wid:{w}")));
        assert_eq!(claims["https://amun.ai/roles"], json!(["anonymous"]));
        assert_eq!(claims["https://amun.ai/email"], Json::Null);
        assert_eq!(claims["https://amun.ai/parent"], json!(a.user.id));
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 3600);
        let sub = claims["sub"].as_str().unwrap();
        assert!(!sub.starts_with("anonymouz-") && sub.split('-').count() == 3, "{sub}");
        // A client connecting with it joins that workspace, as an anonymous user.
        let token = generate_child_token(&a.user, w, &Value::Nil, &owner_of(&[]), &jwt(), NOW).unwrap();
        let joined = handshake(&payload(Some("c2"), None, Some(&token), None), &[]).unwrap();
        assert_eq!(&joined.workspace, w);
        assert!(joined.user.is_anonymous);
        // Anonymous callers cannot mint for `public`.
        let e = mint(&a.user, w, crate::map! {"workspace" => "public"}.into(), &[]).unwrap_err();
        assert_eq!(
            (e.to_string().as_str(), e.exception_name()),
            ("You do not have any permission for workspace: public", "PermissionError")
        );
    }

    #[test]
    fn generate_token_config() {
        let alice = handshake(&payload(Some("alice-c"), None, Some(PY_ALICE), None), &[]).unwrap().user;
        let m = |cfg: Value| mint(&alice, "ws-user-alice", cfg, &[]);
        let scope = |cfg: Value| m(cfg).unwrap()["scope"].as_str().unwrap().to_owned();
        assert_eq!(
            scope(crate::map! {"permission" => "read"}.into()),
            "ws:ws-user-alice#r wid:ws-user-alice"
        );
        assert_eq!(
            scope(crate::map! {"permission" => "admin"}.into()),
            "ws:ws-user-alice#a wid:ws-user-alice"
        );
        assert_eq!(
            scope(crate::map! {"permission" => "read_write"}.into()),
            "ws:ws-user-alice#rw wid:ws-user-alice"
        );
        let cid =
            mint(&alice, "x", crate::map! {"workspace" => "W", "client_id" => "only-me"}.into(), &["alice"]);
        assert_eq!(cid.unwrap()["scope"], json!("ws:W#rw cid:only-me wid:W"));
        let extra: Value =
            crate::map! {"workspace" => "W", "extra_scopes" => vec![Value::from("my-data:read")]}.into();
        // alice does not own W: refused; with owners she may.
        assert_eq!(m(extra.clone()).unwrap_err(), AuthError::NoPermission("W".into()));
        assert_eq!(
            mint(&alice, "x", extra, &["alice"]).unwrap()["scope"],
            json!("ws:W#rw wid:W my-data:read")
        );
        let c = m(crate::map! {"expires_in" => 60, "email" => "x@y"}.into()).unwrap();
        assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 60);
        assert_eq!(c["https://amun.ai/email"], json!("alice@example.com"), "only admins override the email");
        assert_eq!(c["https://amun.ai/parent"], json!("alice"));
        let e = m(crate::map! {"permission" => "bogus"}.into()).unwrap_err();
        assert!(e.to_string().starts_with("1 validation error for TokenConfig\npermission"), "{e}");
        assert!(matches!(
            m(crate::map! {"expires_in" => "soon"}.into()),
            Err(AuthError::InvalidTokenConfig(_))
        ));
        assert!(matches!(m(Value::from(3)), Err(AuthError::InvalidTokenConfig(_))));
    }

    #[test]
    fn generate_token_permission_rules() {
        let owners: &'static [&'static str] = &["alice"];
        // A child of alice with rw on alice-ws-1 is not recognised as owner there.
        let child = handshake(&payload(Some("c"), None, Some(PY_CHILD), None), &[]).unwrap().user;
        let e = mint(&child, "alice-ws-1", Value::Nil, owners).unwrap_err();
        assert_eq!(
            (e.to_string().as_str(), e.exception_name()),
            ("Only admin can generate token.", "PermissionError")
        );
        // ... but a rw child of alice's personal workspace is (parent's personal workspace).
        let mut kid = parse(&forge(
            SECRET,
            json!({"sub": "kid-1", "scope": "ws:ws-user-alice#rw wid:ws-user-alice",
                                                  "https://amun.ai/parent": "alice"}),
        ))
        .unwrap();
        kid.scope.current_workspace = Some("ws-user-alice".into());
        let claims = mint(&kid, "ws-user-alice", Value::Nil, &[]).unwrap();
        assert_eq!(
            claims["https://amun.ai/parent"],
            json!("alice"),
            "the grandchild's parent is the root user"
        );
        // Root mints for a workspace it created: roles inherited, parent root, admin email override.
        let root = handshake(&payload(Some("rc"), None, Some(ROOT_TOKEN), None), &[]).unwrap().user;
        let c = mint(
            &root,
            "ws-user-root",
            crate::map! {"workspace" => "root-made-ws", "email" => "r@x"}.into(),
            &[],
        )
        .unwrap();
        assert_eq!(c["scope"], json!("ws:root-made-ws#rw wid:root-made-ws"));
        assert_eq!(c["https://amun.ai/roles"], json!(["admin"]));
        assert_eq!(c["https://amun.ai/parent"], json!("root"));
        assert_eq!(c["https://amun.ai/email"], json!("r@x"));
    }

    #[test]
    fn workspace_ownership() {
        let mut u = UserInfo::new("bob");
        u.email = Some("bob@x".into());
        assert!(is_workspace_owner(&u, "ws-user-bob", &[]));
        assert!(is_workspace_owner(&u, "w", &["bob@x".into()]));
        assert!(is_workspace_owner(&u, "w", &["bob".into()]));
        assert!(!is_workspace_owner(&u, "w", &["alice".into()]));
        u.parent = Some("alice".into());
        assert!(is_workspace_owner(&u, "ws-user-alice", &[]));
        assert!(!is_workspace_owner(&u, "ws-user-carol", &[]));
    }
}
