//! Identifiers (spec §0, §5.1 of the server spec, §7.7-7.8, §9.2-9.3): random ids, absolute
//! client ids, and service ids in their full and short forms.
//!
//! Three shapes of service id travel between peers:
//!
//! * the **full id** `"<ws>/<client>:<service>"`, optionally `"@<app>"`: what a client puts in
//!   `service_info.id` and what the manager returns ([`ServiceId`]);
//! * the **query** the manager's `get_service`/`get_service_info` accept: `"svc"`,
//!   `"client:svc"`, `"ws/svc"`, `"ws/client:svc"`, each optionally with `"@app"`
//!   ([`ServiceQuery`]), made absolute against the caller's workspace with
//!   [`ServiceQuery::resolve`];
//! * the **short id** a client keeps its local services under (`"svc"`), obtained with
//!   [`short_service_id`].
//!
//! All of them are cheap owned strings: ids are parsed once per call at most, and keeping
//! `String` fields keeps the types simple to store in maps and send across actors.

use std::fmt;
use std::str::FromStr;

use rand::Rng;

/// The alphabet of Python's `shortuuid`: digits and letters without the look-alikes
/// `0 1 I O l`. Ids we mint look like the Python client's, which keeps logs and traces
/// from mixed deployments readable.
const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Length of a Python `shortuuid.uuid()` (22 chars, about 128 bits).
pub const RANDOM_ID_LEN: usize = 22;

/// The wildcard that means "any" in the workspace, client and app positions of a service id.
pub const WILDCARD: &str = "*";

/// The service name that addresses the workspace manager itself (`"~"` or `"<ws>/~"`).
pub const MANAGER_ALIAS: &str = "~";

/// A fresh random id for sessions, object ids and client ids (22 chars, ~128 bits).
///
/// Session ids double as capabilities (only the peer that knows one can call back into
/// it), so they come from the OS-seeded thread RNG, never from a counter.
///
/// Ten digits come from each 64-bit draw (57^10 < 2^64) instead of one draw per digit:
/// ids are made for every call, and drawing per digit was a measurable part of a call.
/// Draws at or above the largest multiple of 57^10 are redrawn, so every digit stays
/// uniform.
pub fn random_id() -> String {
    const BASE: u64 = ALPHABET.len() as u64;
    const DIGITS_PER_DRAW: u32 = 10;
    const SPAN: u64 = BASE.pow(DIGITS_PER_DRAW);
    const LIMIT: u64 = u64::MAX / SPAN * SPAN;
    let mut rng = rand::rng();
    let mut id = String::with_capacity(RANDOM_ID_LEN);
    while id.len() < RANDOM_ID_LEN {
        let mut draw: u64 = rng.random();
        if draw >= LIMIT {
            continue;
        }
        for _ in 0..(RANDOM_ID_LEN - id.len()).min(DIGITS_PER_DRAW as usize) {
            id.push(char::from(ALPHABET[(draw % BASE) as usize]));
            draw /= BASE;
        }
    }
    id
}

/// Why an id could not be parsed or resolved.
///
/// Where the upstream server answers a malformed id with a specific message, the variant
/// displays exactly that text (peers and tests match on it); the other variants describe
/// cases upstream does not check or crashes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A part (workspace, client, service or app) is empty, e.g. `"/cid"` or `"ws/:svc"`.
    #[error("Invalid id {id:?}: the {part} part is empty")]
    EmptyPart {
        /// Which part: `"workspace"`, `"client"`, `"service"` or `"app"`.
        part: &'static str,
        /// The id as given.
        id: String,
    },
    /// More than one `/` (upstream server assertion text).
    #[error("Service id must contain at most one '/'")]
    TooManySlashes,
    /// More than one `:` (upstream server assertion text). The Python client fails on these
    /// too, with an unpacking error.
    #[error("Service id must contain at most one ':'")]
    TooManyColons,
    /// More than one `@` (upstream server assertion text).
    #[error("Service id must contain at most one '@'")]
    TooManyAts,
    /// A separator in the wrong place, e.g. `"a:b/c"` (the workspace would contain `:`) or
    /// `"svc@app/x"` (the app id would contain `/`).
    #[error("Invalid id {id:?}: the {part} part must not contain {ch:?}")]
    Misplaced {
        /// Which part holds the stray character.
        part: &'static str,
        /// The stray character.
        ch: char,
        /// The id as given.
        id: String,
    },
    /// An absolute client id (`"ws/cid"`) was expected and the text has no `/`.
    #[error("Invalid absolute client id {0:?}: expected \"<workspace>/<client_id>\"")]
    NotAbsolute(String),
    /// A full service id was expected but the text has no `:` (upstream server assertion
    /// text in `register_service`).
    #[error("Service id info must contain ':'")]
    MissingColon,
    /// `get_service`/`get_service_info` with a `*` workspace (upstream assertion text).
    #[error(
        "You must specify a workspace for the service query, otherwise please call list_services to find the service."
    )]
    WorkspaceRequired,
    /// `get_service("*")` (upstream assertion text, braces included: upstream forgot the
    /// `f` of its f-string).
    #[error("Invalid service id: {{service_id}}, it cannot be a wildcard.")]
    WildcardService,
    /// `register_service` of an id whose workspace is not the caller's (upstream
    /// `PermissionError` text).
    #[error(
        "Service ID workspace prefix '{given}' does not match the current workspace '{current}'. Cannot register services in other workspaces."
    )]
    ForeignWorkspace {
        /// The workspace written in the id.
        given: String,
        /// The caller's workspace.
        current: String,
    },
    /// A `list_services` query part with characters outside `[a-zA-Z0-9-_/|*]` (upstream
    /// `ValueError` text).
    #[error("Invalid characters in query part: {0}")]
    InvalidQueryChars(String),
}

fn non_empty<'a>(part: &'a str, name: &'static str, id: &str) -> Result<&'a str, IdError> {
    if part.is_empty() {
        Err(IdError::EmptyPart { part: name, id: id.to_owned() })
    } else {
        Ok(part)
    }
}

fn reject_char(part: &str, name: &'static str, ch: char, id: &str) -> Result<(), IdError> {
    if part.contains(ch) {
        Err(IdError::Misplaced { part: name, ch, id: id.to_owned() })
    } else {
        Ok(())
    }
}

/// Checks the separator counts the way the upstream server does, in its order.
fn check_counts(id: &str) -> Result<(), IdError> {
    let count = |c: char| id.chars().filter(|&x| x == c).count();
    if count('/') > 1 {
        return Err(IdError::TooManySlashes);
    }
    if count(':') > 1 {
        return Err(IdError::TooManyColons);
    }
    if count('@') > 1 {
        return Err(IdError::TooManyAts);
    }
    Ok(())
}

/// An absolute client id `"<workspace>/<client_id>"`, as the server writes in `from`/`to`.
///
/// The manager's id has workspace `*` (`"*/manager-xyz"`): that is how a peer recognises
/// calls from the manager (spec §4.5 permission rules) and how it addresses it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AbsoluteClientId {
    workspace: String,
    client_id: String,
}

impl AbsoluteClientId {
    /// Builds an id from its parts, validating them as [`AbsoluteClientId::parse`] does.
    pub fn new(workspace: impl Into<String>, client_id: impl Into<String>) -> Result<Self, IdError> {
        let (workspace, client_id) = (workspace.into(), client_id.into());
        let text = format!("{workspace}/{client_id}");
        Self::check(&workspace, &client_id, &text)?;
        Ok(Self { workspace, client_id })
    }

    /// The absolute id of a workspace manager: `"*/<manager_id>"`.
    pub fn manager(manager_id: impl Into<String>) -> Result<Self, IdError> {
        Self::new(WILDCARD, manager_id)
    }

    /// Parses `"ws/cid"`. The workspace must not contain `:`; the client id must not contain
    /// `/` (so there is exactly one `/`). A client id containing `:` or `.` is accepted:
    /// the spec only discourages it, and the JS client never checks.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        let (ws, cid) = text.split_once('/').ok_or_else(|| IdError::NotAbsolute(text.to_owned()))?;
        Self::check(ws, cid, text)?;
        Ok(Self { workspace: ws.to_owned(), client_id: cid.to_owned() })
    }

    fn check(ws: &str, cid: &str, text: &str) -> Result<(), IdError> {
        non_empty(ws, "workspace", text)?;
        non_empty(cid, "client", text)?;
        reject_char(ws, "workspace", '/', text)?;
        reject_char(ws, "workspace", ':', text)?;
        reject_char(cid, "client", '/', text)
    }

    /// The workspace (`*` for the manager).
    pub fn workspace(&self) -> &str {
        &self.workspace
    }

    /// The client id inside the workspace.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// True for the manager form `"*/<id>"`.
    pub fn is_manager_form(&self) -> bool {
        self.workspace == WILDCARD
    }
}

impl fmt::Display for AbsoluteClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.workspace, self.client_id)
    }
}

impl FromStr for AbsoluteClientId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Makes a peer-relative target absolute, as descriptors' `_rtarget` are resolved on decode
/// (spec §4.1): a target without `/` gets `"<ws>/"` in front, unless it *is* the workspace
/// name (upstream keeps it then); anything with a `/` (including `"*/manager-x"`) is kept.
pub fn absolute_target(target: &str, workspace: &str) -> String {
    if target.contains('/') || target == workspace {
        target.to_owned()
    } else {
        format!("{workspace}/{target}")
    }
}

/// A full service id `"<ws>/<client>:<service>[@<app>]"` (spec §0).
///
/// `client_id` may be `*` (any client) and `app_id` may be `*` or absent (any app) when the
/// id is a lookup key produced by [`ServiceQuery::resolve`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    workspace: String,
    client_id: String,
    service: String,
    app_id: Option<String>,
}

impl ServiceId {
    /// Builds an id from its parts, validating them like [`ServiceId::parse`].
    pub fn new(
        workspace: impl Into<String>,
        client_id: impl Into<String>,
        service: impl Into<String>,
        app_id: Option<String>,
    ) -> Result<Self, IdError> {
        let id = Self {
            workspace: workspace.into(),
            client_id: client_id.into(),
            service: service.into(),
            app_id,
        };
        // Re-parse the display form: one validation path for both constructors.
        Self::parse(&id.to_string())
    }

    /// Parses the full form only: workspace, client and service are all required.
    ///
    /// Use [`ServiceQuery::parse`] for the short forms users type.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        let q = ServiceQuery::parse(text)?;
        let workspace = q.workspace.ok_or_else(|| IdError::NotAbsolute(text.to_owned()))?;
        let client_id = q.client_id.ok_or(IdError::MissingColon)?;
        Ok(Self { workspace, client_id, service: q.service, app_id: q.app_id })
    }

    /// The server's `register_service` id rule (server spec §4.5 step 2): prefix the
    /// caller's workspace when the id has no `/`, require a `:`, and refuse ids naming
    /// another workspace, with upstream's error texts.
    pub fn for_registration(text: &str, caller_ws: &str) -> Result<Self, IdError> {
        let full = if text.contains('/') { text.to_owned() } else { format!("{caller_ws}/{text}") };
        if !full.contains(':') {
            return Err(IdError::MissingColon);
        }
        let id = Self::parse(&full)?;
        if id.workspace != caller_ws {
            return Err(IdError::ForeignWorkspace { given: id.workspace, current: caller_ws.to_owned() });
        }
        Ok(id)
    }

    /// The workspace.
    pub fn workspace(&self) -> &str {
        &self.workspace
    }

    /// The client id (`*` = any client, in lookups).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The short service id (the key in the provider's `services` store).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The app id, if one was written.
    pub fn app_id(&self) -> Option<&str> {
        self.app_id.as_deref()
    }

    /// The app id with upstream's default `*` (any app).
    pub fn app_id_or_any(&self) -> &str {
        self.app_id.as_deref().unwrap_or(WILDCARD)
    }

    /// The provider's absolute client id `"ws/cid"`: where `built-in.get_service` is sent.
    pub fn provider(&self) -> String {
        format!("{}/{}", self.workspace, self.client_id)
    }

    /// `"ws/cid:svc"` without any app suffix: the form of `service_info.id` and of the id
    /// the manager sets on `get_service` results.
    pub fn without_app(&self) -> String {
        format!("{}/{}:{}", self.workspace, self.client_id, self.service)
    }

    /// `"ws/cid:svc@app"` with the app always written (`@*` by default): the form upstream
    /// uses in registry keys and in "Service not found: ..." errors.
    pub fn with_app(&self) -> String {
        format!("{}@{}", self.without_app(), self.app_id_or_any())
    }

    /// True when the client part is the `*` wildcard.
    pub fn any_client(&self) -> bool {
        self.client_id == WILDCARD
    }

    /// True when the app is absent or `*`.
    pub fn any_app(&self) -> bool {
        self.app_id_or_any() == WILDCARD
    }
}

/// Formats as `"ws/cid:svc"` plus `"@app"` only when an app was written (round-trips the
/// parsed text).
impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.workspace, self.client_id, self.service)?;
        if let Some(app) = &self.app_id {
            write!(f, "@{app}")?;
        }
        Ok(())
    }
}

impl FromStr for ServiceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A service id as users write it, with the optional parts absent (spec §7.7, server §5.1).
///
/// | text | workspace | client | service | app |
/// | --- | --- | --- | --- | --- |
/// | `svc` | - | - | `svc` | - |
/// | `client:svc` | - | `client` | `svc` | - |
/// | `ws/svc` | `ws` | - | `svc` | - |
/// | `ws/client:svc` | `ws` | `client` | `svc` | - |
/// | any of these + `@app` | | | | `app` |
///
/// `*` is kept literally in any position: as client and app it means "any"; as workspace
/// it is refused by lookups ([`ServiceQuery::resolve_for_lookup`]) and means "all
/// workspaces" only to `list_services`. `~` as the service (with no client) is the
/// manager alias.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceQuery {
    /// The workspace, if written.
    pub workspace: Option<String>,
    /// The client id, if written (`*` = any client).
    pub client_id: Option<String>,
    /// The service id.
    pub service: String,
    /// The app id, if written (`*` = any app).
    pub app_id: Option<String>,
}

impl ServiceQuery {
    /// Parses any of the forms in the type's table.
    ///
    /// Errors: more than one `/`, `:` or `@` (upstream's texts, checked in upstream's
    /// order), an empty part, or a separator in the wrong place (`:` before `/`, `/` or `:`
    /// inside the app id).
    pub fn parse(text: &str) -> Result<Self, IdError> {
        check_counts(text)?;
        let (body, app_id) = match text.split_once('@') {
            Some((body, app)) => {
                non_empty(app, "app", text)?;
                reject_char(app, "app", '/', text)?;
                reject_char(app, "app", ':', text)?;
                (body, Some(app.to_owned()))
            }
            None => (text, None),
        };
        let (workspace, rest) = match body.split_once('/') {
            Some((ws, rest)) => {
                non_empty(ws, "workspace", text)?;
                reject_char(ws, "workspace", ':', text)?;
                (Some(ws.to_owned()), rest)
            }
            None => (None, body),
        };
        let (client_id, service) = match rest.split_once(':') {
            Some((cid, svc)) => (Some(non_empty(cid, "client", text)?.to_owned()), svc),
            None => (None, rest),
        };
        non_empty(service, "service", text)?;
        Ok(Self { workspace, client_id, service: service.to_owned(), app_id })
    }

    /// True for `"~"` and `"<ws>/~"`: the workspace manager itself.
    pub fn is_manager_alias(&self) -> bool {
        self.client_id.is_none() && self.service == MANAGER_ALIAS
    }

    /// Makes the query absolute relative to the caller's workspace, as the server does:
    /// a missing workspace becomes `caller_ws`, a missing client becomes `*`. The app stays
    /// as written (see [`ServiceId::app_id_or_any`]).
    pub fn resolve(&self, caller_ws: &str) -> ServiceId {
        ServiceId {
            workspace: self.workspace.clone().unwrap_or_else(|| caller_ws.to_owned()),
            client_id: self.client_id.clone().unwrap_or_else(|| WILDCARD.to_owned()),
            service: self.service.clone(),
            app_id: self.app_id.clone(),
        }
    }

    /// [`ServiceQuery::resolve`] plus the checks of the manager's `get_service` and
    /// `get_service_info`: the service may not be `*`, the workspace may not be `*`.
    pub fn resolve_for_lookup(&self, caller_ws: &str) -> Result<ServiceId, IdError> {
        if self.service == WILDCARD {
            return Err(IdError::WildcardService);
        }
        let id = self.resolve(caller_ws);
        if id.workspace == WILDCARD {
            return Err(IdError::WorkspaceRequired);
        }
        Ok(id)
    }
}

impl fmt::Display for ServiceQuery {
    /// Formats back to the text it was parsed from.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ws) = &self.workspace {
            write!(f, "{ws}/")?;
        }
        if let Some(cid) = &self.client_id {
            write!(f, "{cid}:")?;
        }
        f.write_str(&self.service)?;
        if let Some(app) = &self.app_id {
            write!(f, "@{app}")?;
        }
        Ok(())
    }
}

impl FromStr for ServiceQuery {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What a client's direct `get_remote_service(uri)` (spec §9.3) sends: the provider to
/// address (`to` of the `built-in.get_service` call) and the short service id to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteServiceUri {
    /// `"ws/cid"`, a bare `"cid"` (the server prefixes the caller's workspace) or
    /// `"*/manager-x"`.
    pub provider: String,
    /// The short service id.
    pub service: String,
    /// The app id after `@`, if any; the caller checks it against its own app id.
    pub app_id: Option<String>,
}

impl RemoteServiceUri {
    /// Parses `"ws/cid:svc"`, `"cid:svc"` or `"svc"` (this client itself: `own_client_id`).
    /// More than one `:` is an error, as in the Python client.
    pub fn parse(uri: &str, own_client_id: &str) -> Result<Self, IdError> {
        let (provider, rest) = match uri.split_once(':') {
            Some((p, rest)) => (p.to_owned(), rest),
            None => (own_client_id.to_owned(), uri),
        };
        if rest.contains(':') {
            return Err(IdError::TooManyColons);
        }
        non_empty(&provider, "client", uri)?;
        if provider.matches('/').count() > 1 {
            return Err(IdError::TooManySlashes);
        }
        if let Some((ws, cid)) = provider.split_once('/') {
            non_empty(ws, "workspace", uri)?;
            non_empty(cid, "client", uri)?;
        }
        let (service, app_id) = match rest.split_once('@') {
            Some((svc, app)) => {
                if app.contains('@') {
                    return Err(IdError::TooManyAts);
                }
                (svc, Some(non_empty(app, "app", uri)?.to_owned()))
            }
            None => (rest, None),
        };
        reject_char(service, "service", '/', uri)?;
        non_empty(service, "service", uri)?;
        Ok(Self { provider, service: service.to_owned(), app_id })
    }
}

/// The short service id a client keeps its services under (spec §7.8): the text after the
/// first `:` (up to a second one, as Python's `split(":")[1]`) with any `@app` removed.
///
/// `"ws/cid:svc@app"` -> `"svc"`, `"svc"` -> `"svc"`. Used by `unregister_service` on both
/// sides and by the provider's `built-in.get_service`.
pub fn short_service_id(id: &str) -> &str {
    let after_colon = match id.split_once(':') {
        Some((_, rest)) => rest.split(':').next().unwrap_or(rest),
        None => id,
    };
    after_colon.split('@').next().unwrap_or(after_colon)
}

/// The server's `list_services` character check for one query part: only
/// `[a-zA-Z0-9-_/|*]` is allowed (dots and `@` inside parts are refused).
pub fn check_query_part(part: &str) -> Result<(), IdError> {
    if part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '|' | '*')) {
        Ok(())
    } else {
        Err(IdError::InvalidQueryChars(part.to_owned()))
    }
}

macro_rules! serde_as_string {
    ($($t:ty),*) => {$(
        /// Serialized as its text form.
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        /// Deserialized from its text form, with the parse error as the serde error.
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_as_string!(AbsoluteClientId, ServiceId, ServiceQuery);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_shortuuid_shaped() {
        let a = random_id();
        assert_eq!(a.len(), RANDOM_ID_LEN);
        assert!(a.bytes().all(|b| ALPHABET.contains(&b)));
        assert_ne!(a, random_id());
    }

    #[test]
    fn random_id_digits_are_uniform_at_every_position() {
        // Several digits come from one draw: a slip in the digit extraction would skew
        // some positions (the last digits of a draw are the first to suffer).
        const N: usize = 20_000;
        let mut counts = vec![[0usize; 128]; RANDOM_ID_LEN];
        for _ in 0..N {
            for (pos, b) in random_id().bytes().enumerate() {
                counts[pos][usize::from(b)] += 1;
            }
        }
        // About 350 each (standard deviation ~19): the bounds are over five of them.
        for (pos, c) in counts.iter().enumerate() {
            for &b in ALPHABET {
                let n = c[usize::from(b)];
                assert!((250..450).contains(&n), "position {pos}: {} seen {n} times", b as char);
            }
            assert_eq!(c.iter().sum::<usize>(), N);
        }
    }

    #[test]
    fn absolute_client_ids() {
        let id = AbsoluteClientId::parse("ws-user-x/prov").unwrap();
        assert_eq!((id.workspace(), id.client_id()), ("ws-user-x", "prov"));
        assert_eq!(id.to_string(), "ws-user-x/prov");
        assert!(!id.is_manager_form());
        let m = AbsoluteClientId::parse("*/manager-sponge-paradox-94220614").unwrap();
        assert!(m.is_manager_form());
        assert_eq!(AbsoluteClientId::manager("manager-x").unwrap().to_string(), "*/manager-x");
        // A ':' in a client id is discouraged but accepted.
        assert_eq!(AbsoluteClientId::parse("ws/a:b").unwrap().client_id(), "a:b");
    }

    #[test]
    fn absolute_client_id_errors() {
        assert_eq!(AbsoluteClientId::parse("prov"), Err(IdError::NotAbsolute("prov".into())));
        assert!(matches!(
            AbsoluteClientId::parse("a/b/c"),
            Err(IdError::Misplaced { part: "client", ch: '/', .. })
        ));
        assert!(matches!(
            AbsoluteClientId::parse("a:x/b"),
            Err(IdError::Misplaced { part: "workspace", ch: ':', .. })
        ));
        assert!(matches!(AbsoluteClientId::parse("/b"), Err(IdError::EmptyPart { part: "workspace", .. })));
        assert!(matches!(AbsoluteClientId::parse("a/"), Err(IdError::EmptyPart { part: "client", .. })));
        assert!(AbsoluteClientId::new("a/b", "c").is_err());
    }

    #[test]
    fn absolute_targets() {
        assert_eq!(absolute_target("prov", "ws"), "ws/prov");
        assert_eq!(absolute_target("other/prov", "ws"), "other/prov");
        assert_eq!(absolute_target("*/manager-x", "ws"), "*/manager-x");
        assert_eq!(absolute_target("ws", "ws"), "ws");
    }

    #[test]
    fn full_service_ids() {
        let id = ServiceId::parse("ws/prov:hello-world").unwrap();
        assert_eq!(
            (id.workspace(), id.client_id(), id.service(), id.app_id()),
            ("ws", "prov", "hello-world", None)
        );
        assert_eq!(id.to_string(), "ws/prov:hello-world");
        assert_eq!(id.with_app(), "ws/prov:hello-world@*");
        assert_eq!(id.provider(), "ws/prov");
        let id = ServiceId::parse("ws/prov:svc@my-app").unwrap();
        assert_eq!(id.app_id(), Some("my-app"));
        assert_eq!(id.to_string(), "ws/prov:svc@my-app");
        assert_eq!(id.without_app(), "ws/prov:svc");
        assert!(!id.any_app());
        assert_eq!(ServiceId::parse("*/manager-x:default").unwrap().workspace(), "*");
        assert_eq!(ServiceId::new("ws", "c", "s", Some("a".into())).unwrap().to_string(), "ws/c:s@a");
        assert!(ServiceId::new("w:s", "c", "s", None).is_err());
    }

    #[test]
    fn full_service_id_requires_all_parts() {
        assert_eq!(ServiceId::parse("svc"), Err(IdError::NotAbsolute("svc".into())));
        assert_eq!(ServiceId::parse("ws/svc"), Err(IdError::MissingColon));
        assert_eq!(ServiceId::parse("c:svc"), Err(IdError::NotAbsolute("c:svc".into())));
    }

    #[test]
    fn query_forms() {
        let q = |s: &str| ServiceQuery::parse(s).unwrap();
        let parts = |q: &ServiceQuery| {
            (q.workspace.clone(), q.client_id.clone(), q.service.clone(), q.app_id.clone())
        };
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(parts(&q("svc")), (None, None, "svc".into(), None));
        assert_eq!(parts(&q("cid:svc")), (None, s("cid"), "svc".into(), None));
        assert_eq!(parts(&q("ws/svc")), (s("ws"), None, "svc".into(), None));
        assert_eq!(parts(&q("ws/cid:svc")), (s("ws"), s("cid"), "svc".into(), None));
        assert_eq!(parts(&q("ws/cid:svc@app")), (s("ws"), s("cid"), "svc".into(), s("app")));
        assert_eq!(parts(&q("hello@*")), (None, None, "hello".into(), s("*")));
        assert_eq!(parts(&q("*:hello")), (None, s("*"), "hello".into(), None));
        for text in ["svc", "cid:svc", "ws/svc", "ws/cid:svc", "ws/cid:svc@app", "*:x@*"] {
            assert_eq!(q(text).to_string(), text);
        }
    }

    #[test]
    fn query_resolution_matches_server() {
        let r = |s: &str| ServiceQuery::parse(s).unwrap().resolve("W").with_app();
        // The server spec's VERIFIED examples (§5.1, §5.2).
        assert_eq!(r("hello"), "W/*:hello@*");
        assert_eq!(r("mgr-probe:hello"), "W/mgr-probe:hello@*");
        assert_eq!(r("W/hello"), "W/*:hello@*");
        assert_eq!(r("hello@*"), "W/*:hello@*");
        assert_eq!(r("*:hello"), "W/*:hello@*");
        assert_eq!(r("W/mode-b:m@*"), "W/mode-b:m@*");
        assert_eq!(r("hello@someapp"), "W/*:hello@someapp");
        assert_eq!(r("other/p:x"), "other/p:x@*");
        let id = ServiceQuery::parse("hello").unwrap().resolve("W");
        assert!(id.any_client() && id.any_app());
    }

    #[test]
    fn lookup_rules() {
        let q = |s: &str| ServiceQuery::parse(s).unwrap();
        assert_eq!(q("*/hello").resolve_for_lookup("W"), Err(IdError::WorkspaceRequired));
        assert_eq!(q("*").resolve_for_lookup("W"), Err(IdError::WildcardService));
        assert_eq!(
            IdError::WildcardService.to_string(),
            "Invalid service id: {service_id}, it cannot be a wildcard."
        );
        assert_eq!(
            IdError::WorkspaceRequired.to_string(),
            "You must specify a workspace for the service query, otherwise please call list_services to find the service."
        );
        assert!(q("~").is_manager_alias());
        assert!(q("W/~").is_manager_alias());
        assert!(!q("c:~").is_manager_alias());
        assert!(!q("hello").is_manager_alias());
    }

    #[test]
    fn query_errors() {
        let e = |s: &str| ServiceQuery::parse(s).unwrap_err();
        assert_eq!(e("a/b/c"), IdError::TooManySlashes);
        assert_eq!(e("a/b/c").to_string(), "Service id must contain at most one '/'");
        assert_eq!(e("x:y:z"), IdError::TooManyColons);
        assert_eq!(e("x:y:z").to_string(), "Service id must contain at most one ':'");
        assert_eq!(e("a@b@c"), IdError::TooManyAts);
        assert_eq!(e("a/b/c:x:y"), IdError::TooManySlashes, "upstream checks '/' first");
        assert!(matches!(e(""), IdError::EmptyPart { part: "service", .. }));
        assert!(matches!(e("ws/"), IdError::EmptyPart { part: "service", .. }));
        assert!(matches!(e("/svc"), IdError::EmptyPart { part: "workspace", .. }));
        assert!(matches!(e(":svc"), IdError::EmptyPart { part: "client", .. }));
        assert!(matches!(e("ws/c:"), IdError::EmptyPart { part: "service", .. }));
        assert!(matches!(e("svc@"), IdError::EmptyPart { part: "app", .. }));
        assert!(matches!(e("c:ws/svc"), IdError::Misplaced { part: "workspace", ch: ':', .. }));
        assert!(matches!(e("svc@app/x"), IdError::Misplaced { part: "app", ch: '/', .. }));
        assert!(matches!(e("svc@a:b"), IdError::Misplaced { part: "app", ch: ':', .. }));
    }

    #[test]
    fn registration_ids() {
        let id = ServiceId::for_registration("W/cid:svc", "W").unwrap();
        assert_eq!(id.to_string(), "W/cid:svc");
        assert_eq!(ServiceId::for_registration("raw:svc3", "W").unwrap().to_string(), "W/raw:svc3");
        assert_eq!(ServiceId::for_registration("nocolon", "W"), Err(IdError::MissingColon));
        assert_eq!(
            ServiceId::for_registration("nocolon", "W").unwrap_err().to_string(),
            "Service id info must contain ':'"
        );
        let err = ServiceId::for_registration("other-ws/mgr-probe:x", "W").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Service ID workspace prefix 'other-ws' does not match the current workspace 'W'. Cannot register services in other workspaces."
        );
    }

    #[test]
    fn remote_service_uris() {
        let p = |s: &str| RemoteServiceUri::parse(s, "me").unwrap();
        assert_eq!(
            p("ws/prov:svc"),
            RemoteServiceUri { provider: "ws/prov".into(), service: "svc".into(), app_id: None }
        );
        assert_eq!(p("prov:svc").provider, "prov");
        assert_eq!(p("svc").provider, "me");
        assert_eq!(p("*/manager-x:default").provider, "*/manager-x");
        assert_eq!(p("prov:svc@app").app_id.as_deref(), Some("app"));
        assert_eq!(p("prov:svc@app").service, "svc");
        assert_eq!(RemoteServiceUri::parse("a:b:c", "me"), Err(IdError::TooManyColons));
        assert_eq!(RemoteServiceUri::parse("a/b/c:s", "me"), Err(IdError::TooManySlashes));
        assert!(matches!(
            RemoteServiceUri::parse(":s", "me"),
            Err(IdError::EmptyPart { part: "client", .. })
        ));
        assert!(matches!(
            RemoteServiceUri::parse("p:", "me"),
            Err(IdError::EmptyPart { part: "service", .. })
        ));
        assert!(matches!(RemoteServiceUri::parse("p:s@", "me"), Err(IdError::EmptyPart { part: "app", .. })));
    }

    #[test]
    fn short_ids() {
        assert_eq!(short_service_id("ws/cid:svc@app"), "svc");
        assert_eq!(short_service_id("cid:svc"), "svc");
        assert_eq!(short_service_id("svc@app"), "svc");
        assert_eq!(short_service_id("svc"), "svc");
        assert_eq!(short_service_id("a:b:c"), "b", "Python's split(':')[1]");
        assert_eq!(short_service_id("_rintf_abc"), "_rintf_abc");
    }

    #[test]
    fn query_part_chars() {
        assert!(check_query_part("ws-user-x/cid|*").is_ok());
        assert_eq!(
            check_query_part("hello.x").unwrap_err().to_string(),
            "Invalid characters in query part: hello.x"
        );
        assert!(check_query_part("a@b").is_err());
    }

    #[test]
    fn serde_as_strings() {
        let id = ServiceId::parse("ws/c:s@a").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"ws/c:s@a\"");
        assert_eq!(serde_json::from_str::<ServiceId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<ServiceId>("\"x:y:z\"").is_err());
        let c: AbsoluteClientId = serde_json::from_str("\"*/manager-x\"").unwrap();
        assert!(c.is_manager_form());
        let q: ServiceQuery = serde_json::from_str("\"c:s\"").unwrap();
        assert_eq!(q.client_id.as_deref(), Some("c"));
    }
}
