//! The session table: the object store of one RPC endpoint (spec §4, §5.5, §5.6, §6, §7).
//!
//! One [`SessionTable`] holds everything a peer can address with a method path:
//!
//! * **persistent services** (`services.<id>.<path>`), with the annotation table that
//!   says, for every exported handler, under which path it lives and who may call it;
//! * **sessions** (`<session>[.<child>...].<entry>`): one per outgoing call (its promise
//!   state and the callbacks passed as arguments) and one per result that carried
//!   functions or generators.
//!
//! It is a sans-IO state machine in the manner of `quinn-proto`: the driver passes the
//! current time in (`now: Instant`), timeouts are deadlines ([`SessionTable::poll_timeout`]),
//! and every way a pending call can end comes out as a [`SettledCall`] value that the
//! driver maps onto its futures. Nothing here runs user code: functions are opaque
//! [`Handler`]s that [`SessionTable::lookup`] hands back inside a [`Target`].
//!
//! Method groups: getters; commands (`add_service`, `remove_service`, `open_call`,
//! `call_sent`, `close`, ...); inputs (`handle_*`, `lookup`); outputs (`poll_timeout`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

// Maps keyed by our own random ids, probed on every call: foldhash (randomly seeded)
// instead of SipHash, which was a measurable part of each call.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use indexmap::IndexMap;

use crate::codec::{CodecError, ObjectSink, StoredFunction};
use crate::ids::{random_id, short_service_id, WILDCARD};
use crate::schema::{SchemaError, ServiceConfig, Visibility, DEFAULT_SERVICE_TYPE};
use crate::value::{
    ErrorValue, Function, Handler, LocalFunction, LocalGenerator, Map, PromiseMode, RemoteMethod, Value,
};

/// Id of the service every client registers first (spec §7.4); one constant with the
/// chunk sender's, which addresses the same service on the peer.
pub use crate::chunk::BUILTIN_SERVICE_ID;
/// Prefix of the local-only services minted for `_rintf` maps (spec §5.5).
pub const RINTF_PREFIX: &str = "_rintf_";
/// Top-level store key of the persistent services.
pub const SERVICES_KEY: &str = "services";
/// Top-level store key of the chunk reassembly cache (spec §3); it is not a session.
pub const MESSAGE_CACHE_KEY: &str = "message_cache";

/// Timeouts of the session table. Every one is a `Duration` (never a bare number).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Deadline of an outgoing promise call after it was sent, pushed back by each
    /// heartbeat (upstream `method_timeout`, 30 s). Zero disables the timer.
    pub method_timeout: Duration,
    /// The same for methods whose path contains `_rintf_` (upstream 10 s).
    pub rintf_timeout: Duration,
    /// Idle age after which the sweeper deletes a top-level session that has no pending
    /// call (upstream 600 s, swept every `session_ttl / 2`).
    pub session_ttl: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            method_timeout: Duration::from_secs(30),
            rintf_timeout: Duration::from_secs(10),
            session_ttl: Duration::from_secs(600),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Why an incoming method call cannot be dispatched (spec §4.5 steps 4-6).
///
/// The `Display` texts are the exact upstream strings: the driver sends them to the
/// caller's `reject` (when the call has one), and peers and tests search them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// Single-segment path that names nothing.
    #[error("Method not found: {method_name} at {client_id}")]
    MethodNotFound {
        /// `<from>:<method>`.
        method_name: String,
        /// Our client id.
        client_id: String,
    },
    /// The top segment exists (a session, `services`, `message_cache`) but the rest does not.
    #[error("Method expired or not found: {0}")]
    MethodExpired(String),
    /// The top segment is not in the store (the session was deleted or never existed).
    #[error("Session not found: {0}")]
    SessionNotFound(String),
    /// The path names something that is not callable (a map, a plain value).
    #[error("Invalid method: {0}")]
    InvalidMethod(String),
    /// A protected service function called from another workspace.
    #[error("Permission denied for invoking protected method {method_name}, workspace mismatch: {local} != {remote}")]
    ProtectedMethod {
        /// `<from>:<method>`.
        method_name: String,
        /// Our workspace (`None` when unknown, as Python prints it).
        local: String,
        /// The caller's workspace.
        remote: String,
    },
    /// A `_rintf` callback called by someone other than the peer it was sent to.
    #[error("Permission denied for _rintf callback {method_name}, caller {caller} is not the allowed caller {allowed}")]
    RintfCallerDenied {
        /// `<from>:<method>`.
        method_name: String,
        /// `from` of the call.
        caller: String,
        /// The allowed caller recorded at encode time.
        allowed: String,
    },
    /// A session function called by a peer other than the session's target.
    #[error("Access denied for method call ({method_name}) from {from} to target {target}")]
    AccessDenied {
        /// `<from>:<method>`.
        method_name: String,
        /// `from` of the call.
        from: String,
        /// The session's target id (`None` when the session has none).
        target: String,
    },
    /// The service has `trusted_keys` and the call was not encrypted.
    #[error("Encryption required for method {0} (trusted_keys is set)")]
    EncryptionRequired(String),
    /// The service has `trusted_keys` and the caller's key is not among them.
    #[error("Caller's public key is not in the trusted keys list for {0}")]
    UntrustedKey(String),
    /// The call carries a `parent` session of ours that no longer exists.
    #[error("Parent session was closed: {0}")]
    ParentClosed(String),
}

/// Errors of the local service model (spec §7.1, §7.4, §7.8).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The service map has no string `id`.
    #[error("Service id not found")]
    MissingId,
    /// `config` is present but not a map.
    #[error("Service config must be a map")]
    ConfigNotMap,
    /// The config failed [`ServiceConfig::from_map`] (upstream's `ValueError` texts), or
    /// the id exists and `overwrite` is false ([`SchemaError::ServiceExists`]). One error
    /// type for both, so a service config is judged the same way wherever it is read.
    #[error(transparent)]
    Config(#[from] SchemaError),
    /// Unknown service id (unregister, get_local_service).
    #[error("Service not found: {0}")]
    NotFound(String),
    /// A service member is a proxy of a function we cannot find locally.
    #[error("Local method not found: {0}")]
    LocalMethodNotFound(String),
    /// `get_service` addressed to another client id.
    #[error("Services can only be accessed locally")]
    NotLocal,
    /// `get_service` of a protected service from another workspace.
    #[error(
        "Permission denied for getting protected service: {id}, workspace mismatch: {ws} != {caller_ws}"
    )]
    ProtectedService {
        /// The short service id.
        id: String,
        /// Our workspace (from `context.to`).
        ws: String,
        /// The caller's workspace (`context.ws`).
        caller_ws: String,
    },
}

/// Errors of session commands (opening calls, storing objects).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The table was closed by [`SessionTable::close`] (user disconnect).
    #[error("Connection is closed")]
    Closed,
    /// A function or generator encoded outside a call (upstream asserts a session id).
    #[error("Session ID is required to encode {0}")]
    NoSession(&'static str),
    /// A session path that is empty, has an empty segment, or runs through a non-session entry.
    #[error("Invalid session id: {0}")]
    InvalidSessionId(String),
    /// A `_rintf` map encoded outside a call session: there is no peer to allow.
    #[error("_rintf objects can only be encoded inside a call session")]
    RintfWithoutSession,
    /// Registering the `_rintf` service failed.
    #[error("{0}")]
    Service(#[from] ServiceError),
}

impl From<SessionError> for CodecError {
    fn from(e: SessionError) -> Self {
        CodecError::Other(e.to_string())
    }
}

/// Why a pending call ended without a reply from the peer (spec §1.6, §1.7, §4.4, §4.10).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No heartbeat or reply within the timeout after the send.
    #[error("Method call timed out: {target}:{method}, context: method: {method}, docs: {doc}")]
    TimedOut {
        /// The call's `to`.
        target: String,
        /// The called method path.
        method: String,
        /// The descriptor's `_rdoc`, `None` when absent (as Python prints it).
        doc: String,
    },
    /// The target peer left (server `client_disconnected` event, or a manager change).
    #[error("Client disconnected: {0}")]
    ClientDisconnected(String),
    /// The connection dropped and will not be re-established.
    #[error("Connection lost: {0}")]
    ConnectionLost(String),
    /// The server refused a reconnection attempt.
    #[error("Server refused reconnection: {0}")]
    ReconnectionRefused(String),
    /// The user closed the RPC.
    #[error("RPC connection closed")]
    Closed,
    /// The package could not be sent.
    #[error("Failed to send the request when calling method ({target}:{method}), error: {error}")]
    SendFailed {
        /// The call's `to`.
        target: String,
        /// The called method path.
        method: String,
        /// The transport's error text.
        error: String,
    },
    /// The call's session was nested in a session that got deleted.
    #[error("Parent session was closed: {0}")]
    ParentClosed(String),
}

// ---------------------------------------------------------------------------------------
// Public data types
// ---------------------------------------------------------------------------------------

/// Per-function metadata of a registered service function (spec §5.6).
///
/// Keyed by [`Handler`] identity, as upstream keys by function object: encoding a handler
/// found here emits a persistent `services.*` descriptor instead of a session callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotation {
    /// `services.<id>.<path>`: where the function lives (the last registration wins).
    pub method_id: String,
    /// The service id (`<id>` of `method_id`), to find which service to dispose.
    pub service_id: String,
    /// Whether the driver must pass the call context to the function.
    pub require_context: bool,
    /// Python's `run_in_executor` hint, kept for drivers that run blocking handlers.
    pub run_in_executor: bool,
    /// The service's visibility.
    pub visibility: Visibility,
    /// Extra workspaces allowed to call a protected function.
    pub authorized_workspaces: Option<Vec<String>>,
    /// Hex X25519 keys allowed to call; `None` means no restriction.
    pub trusted_keys: Option<HashSet<String>>,
    /// For `_rintf` services: the only peer (`ws/cid`) allowed besides the own workspace.
    pub rintf_allowed_caller: Option<String>,
}

/// The handler of the generated `_dispose` member of a `_rintf` service.
///
/// [`SessionTable::lookup`] recognises it and returns [`Target::Dispose`]; the driver then
/// calls [`SessionTable::remove_service`] (no server notification).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DisposeHandler {
    /// The `_rintf_<id>` service the member belongs to.
    pub service_id: String,
}

/// The driver's handlers for the built-in service (spec §7.4).
#[derive(Clone, Debug)]
pub struct BuiltinHandlers {
    /// `ping(msg, context) -> "pong"`.
    pub ping: Handler,
    /// `get_service(service_id, context)`: see [`SessionTable::get_local_service`].
    pub get_service: Handler,
    /// `message_cache.create`.
    pub cache_create: Handler,
    /// `message_cache.append`.
    pub cache_append: Handler,
    /// `message_cache.set`.
    pub cache_set: Handler,
    /// `message_cache.process`.
    pub cache_process: Handler,
    /// `message_cache.remove`.
    pub cache_remove: Handler,
}

/// An outgoing call to open (spec §4.2).
#[derive(Clone, Debug)]
pub struct OpenCall<'a> {
    /// Absolute target client id (`D._rtarget`, the package's `to`).
    pub target: &'a str,
    /// `D._rmethod`.
    pub method: &'a str,
    /// `D._rpromise`.
    pub promise: PromiseMode,
    /// The descriptor's local parent: the session is nested under it.
    pub local_parent: Option<&'a str>,
    /// `D._rdoc`, for the timeout message.
    pub doc: Option<&'a str>,
}

/// What the driver needs to build the call package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedCall {
    /// The session id (`main.session` for promise calls; args are encoded into it).
    pub session: String,
    /// The timeout of the call (`rintf_timeout` for `_rintf_` methods), `None` for
    /// fire-and-forget calls or when timeouts are disabled.
    pub timeout: Option<Duration>,
    /// What to advertise as heartbeat interval: `t = timeout/2` for the compact promise,
    /// `interval = method_timeout/2` for the explicit one; `None` for fire-and-forget.
    pub heartbeat_interval: Option<Duration>,
}

/// How a pending outgoing call ended.
#[derive(Clone, Debug, PartialEq)]
pub enum CallOutcome {
    /// `<session>.resolve` arrived (or a fire-and-forget call was sent: `Nil`).
    Resolved(Value),
    /// `<session>.reject` arrived with this error.
    Rejected(ErrorValue),
    /// The call ended locally (timeout, disconnect, close, ...).
    Failed(CallError),
}

impl CallOutcome {
    /// The error text a user would see, if the call failed.
    pub fn error_message(&self) -> Option<String> {
        match self {
            CallOutcome::Resolved(_) => None,
            CallOutcome::Rejected(e) => Some(e.message.clone()),
            CallOutcome::Failed(e) => Some(e.to_string()),
        }
    }
}

/// What [`SessionTable::heartbeat_session`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionHeartbeat {
    /// A pending call of ours: its timer (if started) was pushed back.
    Reset,
    /// The session exists but holds no pending call (e.g. a result session): nothing to do.
    NoPendingCall,
    /// No such session (it was settled, swept, or never existed).
    Missing,
}

/// A settled call: which session (as returned by [`SessionTable::open_call`]) and how.
#[derive(Clone, Debug, PartialEq)]
pub struct SettledCall {
    /// The call's session id.
    pub session: String,
    /// The result.
    pub outcome: CallOutcome,
}

/// The facts about an incoming `method` package that lookup and permission need.
#[derive(Clone, Debug, Default)]
pub struct IncomingCall<'a> {
    /// `data.from`, absolute `ws/cid`.
    pub from: &'a str,
    /// `data.method`.
    pub method: &'a str,
    /// `data.parent`: one of our sessions that must still exist.
    pub local_parent: Option<&'a str>,
    /// Whether the extra segment was encrypted.
    pub encrypted: bool,
    /// The caller's public key as lowercase hex, when encrypted.
    pub caller_key_hex: Option<&'a str>,
}

impl IncomingCall<'_> {
    /// `<from>:<method>`, the name upstream's dispatch errors quote. Built only when an
    /// error needs it: formatting it for every call was a measurable part of each call.
    fn method_name(&self) -> String {
        format!("{}:{}", self.from, self.method)
    }
}

/// A registered service function, ready to run.
#[derive(Clone, Debug)]
pub struct ServiceCall {
    /// The function (handler and metadata).
    pub function: LocalFunction,
    /// Its annotation (`require_context`, `method_id`, ...).
    pub annotation: Arc<Annotation>,
}

/// What an incoming method path resolved to.
#[derive(Clone, Debug)]
pub enum Target {
    /// A late message for one of our pending-call sessions that names nothing: drop it
    /// silently, without a reject.
    Ignore,
    /// A registered service function.
    Service(ServiceCall),
    /// The generated `_dispose` of a `_rintf` service: remove the service.
    Dispose {
        /// The `_rintf_<id>` service.
        service_id: String,
    },
    /// A callback stored in a session.
    SessionFunction {
        /// The session (full dotted id) holding it.
        session: String,
        /// The function.
        function: LocalFunction,
    },
    /// A relay for a remote method from another server (spec §5.3).
    Forwarder {
        /// The session holding it.
        session: String,
        /// The remote method to call with the same arguments.
        method: RemoteMethod,
    },
    /// `next` of a local generator; on exhaustion call [`SessionTable::remove_generator`].
    GeneratorNext {
        /// The session holding it.
        session: String,
        /// The generator's object id.
        object_id: String,
        /// The generator.
        generator: LocalGenerator,
    },
    /// `close` of a local generator; afterwards call [`SessionTable::remove_generator`].
    GeneratorClose {
        /// The session holding it.
        session: String,
        /// The generator's object id.
        object_id: String,
        /// The generator.
        generator: LocalGenerator,
    },
    /// `<session>.resolve` of our pending call: feed the decoded first argument to
    /// [`SessionTable::handle_resolve`].
    Resolve {
        /// The pending call's session.
        session: String,
    },
    /// `<session>.reject`: feed the decoded error to [`SessionTable::handle_reject`].
    Reject {
        /// The pending call's session.
        session: String,
    },
    /// `<session>.heartbeat`: call [`SessionTable::handle_heartbeat`].
    Heartbeat {
        /// The pending call's session.
        session: String,
    },
}

/// Result of [`SessionTable::handle_client_disconnected`] (the data of the
/// `remote_client_disconnected` event, spec §4.10).
#[derive(Clone, Debug, PartialEq)]
pub struct DisconnectSummary {
    /// The absolute id of the peer that left.
    pub client_id: String,
    /// The pending calls rejected with `"Client disconnected: <id>"`.
    pub settled: Vec<SettledCall>,
    /// How many sessions were deleted.
    pub sessions_cleaned: usize,
    /// The `_rintf` services disposed because the peer was their allowed caller.
    pub rintf_cleaned: Vec<String>,
}

/// Result of [`SessionTable::remove_service`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedService {
    /// The short id that was removed.
    pub id: String,
    /// Whether the driver should tell the manager (`false` for `_rintf_` services).
    pub notify_server: bool,
}

/// A stored local service.
#[derive(Clone, Debug)]
pub struct Service {
    /// The normalised service map (`id`, `name`, `type`, `config`, members), as
    /// `get_service` returns it.
    pub api: Map,
    /// The config, validated and typed by [`ServiceConfig::from_map`] when the service was
    /// added (the raw map stays in `api["config"]`).
    pub config: ServiceConfig,
}

// ---------------------------------------------------------------------------------------
// Internal store
// ---------------------------------------------------------------------------------------

/// State of one of our outgoing promise calls (upstream `_promise_manager` + timer).
#[derive(Clone, Debug)]
struct PendingCall {
    target: String,
    method: String,
    doc: Option<String>,
    /// `None` when timeouts are disabled.
    timeout: Option<Duration>,
    /// Set by `call_sent`; the timer does not run before the package is out.
    deadline: Option<Instant>,
}

/// One entry of a session.
#[derive(Clone, Debug)]
enum Node {
    Session(Box<Session>),
    Function(LocalFunction),
    Forwarder(RemoteMethod),
    GeneratorNext(LocalGenerator),
    GeneratorClose(LocalGenerator),
}

#[derive(Clone, Debug)]
struct Session {
    /// Who may call into the session (top-level sessions are checked).
    target_id: Option<String>,
    created_at: Instant,
    last_activity_at: Instant,
    /// Present only for sessions of our own pending promise calls.
    call: Option<PendingCall>,
    /// The method of a fire-and-forget call opened in this session and not yet sent, so
    /// that a failed send settles it like a promise call ([`SessionTable::handle_send_failed`]).
    unsent_method: Option<String>,
    entries: HashMap<String, Node>,
}

impl Session {
    fn new(target_id: Option<String>, now: Instant) -> Self {
        Self {
            target_id,
            created_at: now,
            last_activity_at: now,
            call: None,
            unsent_method: None,
            entries: HashMap::new(),
        }
    }

    fn is_bare(&self) -> bool {
        self.target_id.is_none() && self.call.is_none() && self.entries.is_empty()
    }

    fn has_call_in_subtree(&self) -> bool {
        self.call.is_some()
            || self.entries.values().any(|n| matches!(n, Node::Session(s) if s.has_call_in_subtree()))
    }
}

/// The object store of one RPC endpoint. See the module documentation.
#[derive(Debug)]
pub struct SessionTable {
    config: SessionConfig,
    client_id: String,
    local_workspace: Option<String>,
    manager_id: Option<String>,
    /// Latest `now` seen; used for sessions the codec creates (the sink has no clock).
    clock: Instant,
    closed: bool,
    services: IndexMap<String, Service>,
    annotations: HashMap<Handler, Arc<Annotation>>,
    sessions: HashMap<String, Session>,
    /// Full ids of sessions holding a pending call.
    pending: HashSet<String>,
    /// Started timers, ordered by deadline.
    deadlines: BTreeSet<(Instant, String)>,
}

fn split_client(id: &str) -> (&str, &str) {
    id.split_once('/').unwrap_or(("", id))
}

fn fmt_opt(v: Option<&str>) -> String {
    v.unwrap_or("None").to_owned()
}

fn walk_value<'v>(mut cur: &'v Value, segs: &[&str]) -> Option<&'v Value> {
    for s in segs {
        cur = match cur {
            Value::Map(m) => m.get(*s)?,
            Value::List(l) => l.get(s.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn walk_map<'v>(root: &'v Map, segs: &[&str]) -> Option<&'v Value> {
    let (first, rest) = segs.split_first()?;
    walk_value(root.get(*first)?, rest)
}

/// Calls `f(path, function)` for every local function in a service tree.
fn visit_functions(v: &Value, path: &mut Vec<String>, f: &mut dyn FnMut(&str, &LocalFunction)) {
    match v {
        Value::Function(func) => {
            if let Function::Local(lf) = &**func {
                f(&path.join("."), lf);
            }
        }
        Value::Map(m) => {
            for (k, child) in m {
                path.push(k.clone());
                visit_functions(child, path, f);
                path.pop();
            }
        }
        Value::List(l) => {
            for (i, child) in l.iter().enumerate() {
                path.push(i.to_string());
                visit_functions(child, path, f);
                path.pop();
            }
        }
        _ => {}
    }
}

fn local_fn(handler: Handler, name: &str) -> Value {
    let mut lf = LocalFunction::new(handler);
    lf.name = Some(name.to_owned());
    Value::from(Function::Local(lf))
}

impl SessionTable {
    // ----- construction and getters -----

    /// A table for client `client_id` (used in "Method not found ... at <client_id>" and
    /// to recognise our own proxies). `now` seeds the clock for codec-created sessions.
    pub fn new(config: SessionConfig, client_id: impl Into<String>, now: Instant) -> Self {
        Self {
            config,
            client_id: client_id.into(),
            local_workspace: None,
            manager_id: None,
            clock: now,
            closed: false,
            services: IndexMap::new(),
            annotations: HashMap::new(),
            sessions: HashMap::new(),
            pending: HashSet::new(),
            deadlines: BTreeSet::new(),
        }
    }

    /// Sets our workspace (from `connection_info`), used by the permission checks.
    pub fn set_local_workspace(&mut self, ws: Option<String>) {
        self.local_workspace = ws;
    }

    /// Sets the manager's client id (from `connection_info`): `*/<manager_id>` may call
    /// protected functions.
    pub fn set_manager_id(&mut self, id: Option<String>) {
        self.manager_id = id;
    }

    /// The timeouts.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Our client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Our workspace, if known.
    pub fn local_workspace(&self) -> Option<&str> {
        self.local_workspace.as_deref()
    }

    /// Whether [`SessionTable::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Number of top-level sessions (upstream tests check "0 sessions left").
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of sessions including nested ones.
    pub fn total_session_count(&self) -> usize {
        fn count(s: &Session) -> usize {
            1 + s.entries.values().map(|n| if let Node::Session(c) = n { count(c) } else { 0 }).sum::<usize>()
        }
        self.sessions.values().map(count).sum()
    }

    /// Number of pending promise calls.
    pub fn pending_call_count(&self) -> usize {
        self.pending.len()
    }

    /// Number of local services (`built-in` and `_rintf_` ones included).
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Number of annotated handlers.
    pub fn annotation_count(&self) -> usize {
        self.annotations.len()
    }

    /// Whether a session (full dotted id) exists.
    pub fn has_session(&self, id: &str) -> bool {
        self.session(id).is_some()
    }

    /// Number of entries (functions, generators, child sessions) in a session.
    pub fn session_entry_count(&self, id: &str) -> Option<usize> {
        self.session(id).map(|s| s.entries.len())
    }

    /// A service by short id.
    pub fn service(&self, id: &str) -> Option<&Service> {
        self.services.get(id)
    }

    /// All services in registration order (re-registration on reconnect keeps this order,
    /// `built-in` first; skip those with [`ServiceConfig::is_local_only`]).
    pub fn services(&self) -> impl Iterator<Item = (&str, &Service)> {
        self.services.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The annotation of a handler, if it is a registered service function.
    pub fn annotation(&self, handler: &Handler) -> Option<&Arc<Annotation>> {
        self.annotations.get(handler)
    }

    // ----- services -----

    /// Adds a local service (spec §7.1): normalises the map, validates the config,
    /// annotates every function, and stores it. Returns the stored map.
    pub fn add_service(&mut self, api: Map, overwrite: bool) -> Result<&Map, ServiceError> {
        let mut api: Map = api
            .into_iter()
            .filter(|(k, _)| {
                !k.starts_with('_') || matches!(k.as_str(), "__enter__" | "__exit__" | "_dispose")
            })
            .collect();
        let id = api.get("id").and_then(Value::as_str).ok_or(ServiceError::MissingId)?.to_owned();
        if !api.contains_key("name") {
            api.insert("name".into(), Value::Str(id.clone()));
        }
        if !api.contains_key("config") {
            api.insert("config".into(), Value::Map(Map::new()));
        }
        if !api.contains_key("type") {
            api.insert("type".into(), Value::from(DEFAULT_SERVICE_TYPE));
        }
        let config = match api.get("config") {
            Some(Value::Map(c)) => ServiceConfig::from_map(c)?,
            Some(Value::Nil) => ServiceConfig::default(),
            _ => return Err(ServiceError::ConfigNotMap),
        };
        if !overwrite && self.services.contains_key(&id) {
            return Err(SchemaError::ServiceExists(id).into());
        }
        // Proxies of our own functions become the original local functions.
        for v in api.values_mut() {
            self.replace_own_proxies(v)?;
        }
        // A replaced service keeps its place (as a Python dict entry does), so the
        // re-registration order on reconnect stays `built-in` first.
        let position = self.services.get_index_of(&id);
        if let Some(old) = self.services.shift_remove(&id) {
            self.remove_annotations(&id, &old.api);
        }
        let mut found: Vec<(String, Handler)> = Vec::new();
        let mut path = Vec::new();
        for (k, v) in &api {
            path.push(k.clone());
            visit_functions(v, &mut path, &mut |p, lf| found.push((p.to_owned(), lf.handler.clone())));
            path.pop();
        }
        // The dispatch view, derived once per service. Keys are compared lowercase: the
        // caller's key arrives as lowercase hex.
        let trusted_keys: Option<HashSet<String>> =
            config.trusted_keys().map(|keys| keys.iter().map(|k| k.to_ascii_lowercase()).collect());
        for (p, handler) in found {
            let ann = Annotation {
                method_id: format!("{SERVICES_KEY}.{id}.{p}"),
                service_id: id.clone(),
                require_context: config.requires_context(&p),
                run_in_executor: config.runs_in_executor(),
                visibility: config.visibility(),
                authorized_workspaces: config.authorized_workspaces.clone(),
                trusted_keys: trusted_keys.clone(),
                rintf_allowed_caller: config.rintf_allowed_caller.clone(),
            };
            self.annotations.insert(handler, Arc::new(ann));
        }
        self.services.insert(id.clone(), Service { api, config });
        if let Some(p) = position {
            self.services.move_index(self.services.len() - 1, p);
        }
        Ok(&self.services[&id].api)
    }

    /// Adds the built-in service (spec §7.4), named after `label` (`<ws>/<client_id>`).
    pub fn add_builtin_service(&mut self, label: &str, h: BuiltinHandlers) -> Result<&Map, ServiceError> {
        let mut cache = Map::new();
        cache.insert("create".into(), local_fn(h.cache_create, "create"));
        cache.insert("append".into(), local_fn(h.cache_append, "append"));
        cache.insert("set".into(), local_fn(h.cache_set, "set"));
        cache.insert("process".into(), local_fn(h.cache_process, "process"));
        cache.insert("remove".into(), local_fn(h.cache_remove, "remove"));
        let mut config = Map::new();
        config.insert("require_context".into(), Value::Bool(true));
        config.insert("visibility".into(), Value::from("public"));
        config.insert("api_version".into(), Value::Int(3));
        let mut api = Map::new();
        api.insert("id".into(), Value::from(BUILTIN_SERVICE_ID));
        api.insert("type".into(), Value::from("built-in"));
        api.insert("name".into(), Value::Str(format!("Builtin services for {label}")));
        api.insert("config".into(), Value::Map(config));
        api.insert("ping".into(), local_fn(h.ping, "ping"));
        api.insert("get_service".into(), local_fn(h.get_service, "get_service"));
        api.insert(MESSAGE_CACHE_KEY.into(), Value::Map(cache));
        self.add_service(api, true)
    }

    /// Removes a service (spec §7.8): accepts `ws/cid:id@app` forms. Its annotations go
    /// with it, so later calls get "Method expired or not found".
    pub fn remove_service(&mut self, service_id: &str) -> Result<RemovedService, ServiceError> {
        let id = short_service_id(service_id);
        let svc = self.services.shift_remove(id).ok_or_else(|| ServiceError::NotFound(id.to_owned()))?;
        self.remove_annotations(id, &svc.api);
        Ok(RemovedService { id: id.to_owned(), notify_server: !id.starts_with(RINTF_PREFIX) })
    }

    /// The built-in `get_service` (spec §7.4): `context_to` is the call's `to`, `caller_ws`
    /// is `context.ws`.
    pub fn get_local_service(
        &self,
        service_id: &str,
        context_to: &str,
        caller_ws: &str,
    ) -> Result<&Map, ServiceError> {
        let (ws, cid) = split_client(context_to);
        if cid != self.client_id {
            return Err(ServiceError::NotLocal);
        }
        let svc =
            self.services.get(service_id).ok_or_else(|| ServiceError::NotFound(service_id.to_owned()))?;
        let allowed = svc.config.visibility() != Visibility::Protected
            || caller_ws == ws
            || svc.config.authorized_workspaces.as_ref().is_some_and(|a| a.iter().any(|w| w == caller_ws));
        if allowed {
            Ok(&svc.api)
        } else {
            Err(ServiceError::ProtectedService {
                id: service_id.to_owned(),
                ws: ws.to_owned(),
                caller_ws: caller_ws.to_owned(),
            })
        }
    }

    fn remove_annotations(&mut self, id: &str, api: &Map) {
        let mut handlers = Vec::new();
        let mut path = Vec::new();
        for (k, v) in api {
            path.push(k.clone());
            visit_functions(v, &mut path, &mut |_, lf| handlers.push(lf.handler.clone()));
            path.pop();
        }
        for h in handlers {
            // Only drop the annotation if it still points into this service: the same
            // handler registered later elsewhere keeps its (winning) annotation.
            if self.annotations.get(&h).is_some_and(|a| a.service_id == id) {
                self.annotations.remove(&h);
            }
        }
    }

    fn replace_own_proxies(&self, v: &mut Value) -> Result<(), ServiceError> {
        match v {
            Value::Function(f) => {
                if let Function::Remote(rm) = &**f {
                    let (_, cid) = split_client(&rm.target);
                    let local =
                        if cid == self.client_id { self.find_local_function(&rm.method) } else { None };
                    match local {
                        Some(lf) => **f = Function::Local(lf),
                        None => return Err(ServiceError::LocalMethodNotFound(rm.method.clone())),
                    }
                }
            }
            Value::Map(m) => {
                for c in m.values_mut() {
                    self.replace_own_proxies(c)?;
                }
            }
            Value::List(l) => {
                for c in l {
                    self.replace_own_proxies(c)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn find_local_function(&self, method: &str) -> Option<LocalFunction> {
        let segs: Vec<&str> = method.split('.').collect();
        let (top, rest) = segs.split_first()?;
        if *top == SERVICES_KEY {
            let (sid, path) = rest.split_first()?;
            match walk_map(&self.services.get(*sid)?.api, path)? {
                Value::Function(f) => match &**f {
                    Function::Local(lf) => Some(lf.clone()),
                    Function::Remote(_) => None,
                },
                _ => None,
            }
        } else {
            let (last, mid) = rest.split_last()?;
            let mut cur = self.sessions.get(*top)?;
            for s in mid {
                cur = match cur.entries.get(*s)? {
                    Node::Session(c) => c,
                    _ => return None,
                };
            }
            match cur.entries.get(*last)? {
                Node::Function(lf) => Some(lf.clone()),
                _ => None,
            }
        }
    }

    // ----- session tree helpers -----

    fn session(&self, id: &str) -> Option<&Session> {
        let mut it = id.split('.');
        let mut cur = self.sessions.get(it.next()?)?;
        for seg in it {
            cur = match cur.entries.get(seg)? {
                Node::Session(s) => s,
                _ => return None,
            };
        }
        Some(cur)
    }

    fn session_mut(&mut self, id: &str) -> Option<&mut Session> {
        let mut it = id.split('.');
        let mut cur = self.sessions.get_mut(it.next()?)?;
        for seg in it {
            cur = match cur.entries.get_mut(seg)? {
                Node::Session(s) => s,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// Gets or creates a session, creating missing intermediate levels as bare sessions
    /// (as upstream's `_get_session_store(create=True)`).
    fn ensure_session(&mut self, id: &str, now: Instant) -> Result<&mut Session, SessionError> {
        let bad = || SessionError::InvalidSessionId(id.to_owned());
        let mut it = id.split('.');
        let first = it.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
        if first == SERVICES_KEY || first == MESSAGE_CACHE_KEY || id.split('.').any(str::is_empty) {
            return Err(bad());
        }
        let mut cur = self.sessions.entry(first.to_owned()).or_insert_with(|| Session::new(None, now));
        for seg in it {
            let node = cur
                .entries
                .entry(seg.to_owned())
                .or_insert_with(|| Node::Session(Box::new(Session::new(None, now))));
            cur = match node {
                Node::Session(s) => s,
                _ => return Err(bad()),
            };
        }
        Ok(cur)
    }

    /// Removes a session subtree, prunes bare ancestors, and unindexes every pending
    /// call inside. Returns the removed calls (root first when it had one).
    fn remove_session(&mut self, id: &str) -> Option<RemovedCalls> {
        let removed = match id.rsplit_once('.') {
            None => self.sessions.remove(id)?,
            Some((parent, last)) => {
                let p = self.session_mut(parent)?;
                if !matches!(p.entries.get(last), Some(Node::Session(_))) {
                    return None;
                }
                let Some(Node::Session(s)) = p.entries.remove(last) else { return None };
                self.prune_bare(parent);
                *s
            }
        };
        let Session { call, entries, .. } = removed;
        let mut root = call.map(|c| (id.to_owned(), c));
        let mut nested = Vec::new();
        for (k, node) in entries {
            if let Node::Session(child) = node {
                collect_calls(format!("{id}.{k}"), *child, &mut nested);
            }
        }
        if let Some((cid, call)) = &mut root {
            self.pending.remove(cid.as_str());
            if let Some(d) = call.deadline {
                // The id goes into the key and back, rather than being copied for it.
                let key = (d, std::mem::take(cid));
                self.deadlines.remove(&key);
                *cid = key.1;
            }
        }
        for (cid, call) in &nested {
            self.pending.remove(cid);
            if let Some(d) = call.deadline {
                self.deadlines.remove(&(d, cid.clone()));
            }
        }
        Some(RemovedCalls { root, nested })
    }

    fn prune_bare(&mut self, mut id: &str) {
        while self.session(id).is_some_and(Session::is_bare) {
            match id.rsplit_once('.') {
                None => {
                    self.sessions.remove(id);
                    return;
                }
                Some((parent, last)) => {
                    if let Some(p) = self.session_mut(parent) {
                        p.entries.remove(last);
                    }
                    id = parent;
                }
            }
        }
    }

    /// Deletes a session; the call of `id` itself (if any) is returned separately, calls
    /// nested deeper are failed with "Parent session was closed".
    fn delete_settling(&mut self, id: &str) -> (Option<(String, PendingCall)>, Vec<SettledCall>) {
        let Some(RemovedCalls { root, nested }) = self.remove_session(id) else { return (None, Vec::new()) };
        let collateral = nested
            .into_iter()
            .map(|(cid, _)| SettledCall {
                session: cid,
                outcome: CallOutcome::Failed(CallError::ParentClosed(id.to_owned())),
            })
            .collect();
        (root, collateral)
    }

    fn tick(&mut self, now: Instant) {
        if now > self.clock {
            self.clock = now;
        }
    }

    // ----- outgoing calls -----

    /// Opens the session of an outgoing call (spec §4.2 steps 1-2, 5). Encode the
    /// arguments into the returned session, send, then call [`SessionTable::call_sent`].
    pub fn open_call(&mut self, now: Instant, call: &OpenCall<'_>) -> Result<OpenedCall, SessionError> {
        self.tick(now);
        if self.closed {
            return Err(SessionError::Closed);
        }
        let session = match call.local_parent {
            Some(p) => format!("{p}.{}", random_id()),
            None => random_id(),
        };
        let (timeout, interval) = match call.promise {
            PromiseMode::None => (None, None),
            mode => {
                let t = if call.method.contains(RINTF_PREFIX) {
                    self.config.rintf_timeout
                } else {
                    self.config.method_timeout
                };
                let interval =
                    if mode == PromiseMode::Explicit { self.config.method_timeout / 2 } else { t / 2 };
                (Some(t).filter(|t| !t.is_zero()), Some(interval))
            }
        };
        let s = self.ensure_session(&session, now)?;
        s.target_id = Some(call.target.to_owned());
        s.created_at = now;
        s.last_activity_at = now;
        if call.promise != PromiseMode::None {
            s.call = Some(PendingCall {
                target: call.target.to_owned(),
                method: call.method.to_owned(),
                doc: call.doc.map(str::to_owned),
                timeout,
                deadline: None,
            });
            self.pending.insert(session.clone());
        } else {
            s.unsent_method = Some(call.method.to_owned());
        }
        Ok(OpenedCall { session, timeout, heartbeat_interval: interval })
    }

    /// The call package of `session` is out (after chunk processing when chunked).
    ///
    /// Promise calls start their timer now. Fire-and-forget calls settle at once with
    /// `Resolved(Nil)` and their session is deleted unless it holds live entries (the PY
    /// rule, e.g. functions returned in a `resolve`).
    pub fn call_sent(&mut self, now: Instant, session: &str) -> Option<SettledCall> {
        self.tick(now);
        let s = self.session_mut(session)?;
        let Some(call) = &mut s.call else {
            s.unsent_method = None;
            if s.entries.is_empty() {
                // No call in it or under it: `remove_session` without collecting calls.
                match session.rsplit_once('.') {
                    None => {
                        self.sessions.remove(session);
                    }
                    Some((parent, last)) => {
                        if let Some(p) = self.session_mut(parent) {
                            p.entries.remove(last);
                        }
                        self.prune_bare(parent);
                    }
                }
            }
            return Some(SettledCall {
                session: session.to_owned(),
                outcome: CallOutcome::Resolved(Value::Nil),
            });
        };
        if call.deadline.is_none() {
            if let Some(t) = call.timeout {
                let d = now + t;
                call.deadline = Some(d);
                self.deadlines.insert((d, session.to_owned()));
            }
        }
        None
    }

    /// Sending the call package failed: the call settles with "Failed to send the request
    /// ..." and its session is deleted.
    ///
    /// Fire-and-forget calls settle the same way (upstream rejects their future too), as
    /// long as [`SessionTable::call_sent`] has not been called for them, so a driver needs
    /// no separate path for them.
    pub fn handle_send_failed(&mut self, session: &str, error: &str) -> Vec<SettledCall> {
        let unsent = self
            .session(session)
            .filter(|s| s.call.is_none())
            .and_then(|s| Some((s.target_id.clone()?, s.unsent_method.clone()?)));
        let (root, mut out) = self.delete_settling(session);
        if let Some((target, method)) = root.map(|(_, c)| (c.target, c.method)).or(unsent) {
            out.insert(
                0,
                SettledCall {
                    session: session.to_owned(),
                    outcome: CallOutcome::Failed(CallError::SendFailed {
                        target,
                        method,
                        error: error.to_owned(),
                    }),
                },
            );
        }
        out
    }

    /// A heartbeat for our pending call (`<session>.heartbeat`, or a `message_cache` call
    /// with `heartbeat=true` whose key is the session): pushes its deadline to
    /// `now + timeout`. Returns false when there is no such pending call (late heartbeat).
    pub fn handle_heartbeat(&mut self, now: Instant, session: &str) -> bool {
        self.heartbeat_session(now, session) == SessionHeartbeat::Reset
    }

    /// Like [`SessionTable::handle_heartbeat`], but tells a missing session apart from a
    /// session without a pending call. The `message_cache` rule needs the difference
    /// (spec §3): a missing session is an error ("session does not exist anymore"), a
    /// session without a timer is simply nothing to reset.
    pub fn heartbeat_session(&mut self, now: Instant, session: &str) -> SessionHeartbeat {
        self.tick(now);
        let Some(s) = self.session_mut(session) else { return SessionHeartbeat::Missing };
        let Some(call) = &mut s.call else { return SessionHeartbeat::NoPendingCall };
        if let (Some(old), Some(t)) = (call.deadline, call.timeout) {
            let new = now + t;
            call.deadline = Some(new);
            self.deadlines.remove(&(old, session.to_owned()));
            self.deadlines.insert((new, session.to_owned()));
        }
        SessionHeartbeat::Reset
    }

    /// `<session>.resolve` arrived with `value` (the decoded first argument): settles the
    /// call and deletes the whole session (`clear_after_called`). Empty when there is no
    /// such pending call.
    pub fn handle_resolve(&mut self, now: Instant, session: &str, value: Value) -> Vec<SettledCall> {
        self.settle(now, session, CallOutcome::Resolved(value))
    }

    /// `<session>.reject` arrived with `error`: like [`SessionTable::handle_resolve`].
    pub fn handle_reject(&mut self, now: Instant, session: &str, error: ErrorValue) -> Vec<SettledCall> {
        self.settle(now, session, CallOutcome::Rejected(error))
    }

    fn settle(&mut self, now: Instant, session: &str, outcome: CallOutcome) -> Vec<SettledCall> {
        self.tick(now);
        if !self.pending.contains(session) {
            return Vec::new();
        }
        let (root, mut out) = self.delete_settling(session);
        if let Some((session, _)) = root {
            out.insert(0, SettledCall { session, outcome });
        }
        out
    }

    /// The earliest deadline among started call timers.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Fails every call whose deadline is `<= now` with "Method call timed out: ..." and
    /// deletes its session.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<SettledCall> {
        self.tick(now);
        let mut out = Vec::new();
        while let Some((d, id)) = self.deadlines.first().cloned() {
            if d > now {
                break;
            }
            let (root, collateral) = self.delete_settling(&id);
            // `remove_session` already unindexed it; guard against a stale index entry.
            self.deadlines.remove(&(d, id.clone()));
            if let Some((_, c)) = root {
                out.push(SettledCall {
                    session: id,
                    outcome: CallOutcome::Failed(CallError::TimedOut {
                        target: c.target,
                        method: c.method.clone(),
                        doc: fmt_opt(c.doc.as_deref()),
                    }),
                });
            }
            out.extend(collateral);
        }
        out
    }

    // ----- incoming calls -----

    /// Resolves an incoming method path and checks permission (spec §4.5 steps 4-6).
    ///
    /// On success the top-level session's activity time is refreshed. A
    /// [`DispatchError`] goes to the call's `reject` when it has one; calls without a
    /// promise (resolve, reject, heartbeat) only get logged, which is how late messages
    /// for deleted sessions are dropped.
    pub fn lookup(&mut self, now: Instant, call: &IncomingCall<'_>) -> Result<Target, DispatchError> {
        self.tick(now);
        // Paths are short (`services.<id>.<fn>`, `<session>.resolve`): their segments go
        // on the stack, so a lookup allocates nothing for them.
        let mut inline = [""; 8];
        let mut n = 0;
        let mut spilled = Vec::new();
        for seg in call.method.split('.') {
            match inline.get_mut(n) {
                Some(slot) => *slot = seg,
                None if spilled.is_empty() => {
                    spilled.extend_from_slice(&inline);
                    spilled.push(seg);
                }
                None => spilled.push(seg),
            }
            n += 1;
        }
        let segs: &[&str] = if spilled.is_empty() { &inline[..n] } else { &spilled };
        let (top, rest) = segs.split_first().map(|(t, r)| (*t, r)).unwrap_or(("", &[]));
        if top == SERVICES_KEY {
            return self.lookup_service(call, rest);
        }
        if top == MESSAGE_CACHE_KEY {
            return Err(if rest.is_empty() {
                DispatchError::InvalidMethod(call.method_name())
            } else {
                DispatchError::MethodExpired(call.method_name())
            });
        }
        let target = self.lookup_session(now, call, top, rest)?;
        if let Target::Ignore = target {
            return Ok(target);
        }
        // Parent check (step 6): only for non-service paths.
        if let Some(parent) = call.local_parent {
            if self.session(parent).is_none() {
                return Err(DispatchError::ParentClosed(parent.to_owned()));
            }
        }
        Ok(target)
    }

    fn lookup_service(&self, call: &IncomingCall<'_>, rest: &[&str]) -> Result<Target, DispatchError> {
        let method_name = || call.method_name();
        let Some((sid, path)) = rest.split_first() else {
            return Err(DispatchError::InvalidMethod(method_name()));
        };
        let found =
            self.services.get(*sid).and_then(|s| if path.is_empty() { None } else { walk_map(&s.api, path) });
        let lf = match found {
            None if path.is_empty() && self.services.contains_key(*sid) => {
                return Err(DispatchError::InvalidMethod(method_name()))
            }
            None => return Err(DispatchError::MethodExpired(method_name())),
            Some(Value::Function(f)) => match &**f {
                Function::Local(lf) => lf.clone(),
                Function::Remote(_) => return Err(DispatchError::InvalidMethod(method_name())),
            },
            Some(_) => return Err(DispatchError::InvalidMethod(method_name())),
        };
        // A function without an annotation (its annotation was taken over and then
        // removed) is treated as protected, the safe default.
        let ann = self.annotations.get(&lf.handler).cloned().unwrap_or_else(|| {
            Arc::new(Annotation {
                method_id: call.method.to_owned(),
                service_id: (*sid).to_owned(),
                require_context: false,
                run_in_executor: false,
                visibility: Visibility::Protected,
                authorized_workspaces: None,
                trusted_keys: None,
                rintf_allowed_caller: None,
            })
        });
        let (remote_ws, remote_cid) = split_client(call.from);
        if ann.visibility == Visibility::Protected {
            let same_ws = self.local_workspace.as_deref() == Some(remote_ws);
            let authorized =
                ann.authorized_workspaces.as_ref().is_some_and(|a| a.iter().any(|w| w == remote_ws));
            let manager = remote_ws == WILDCARD && self.manager_id.as_deref() == Some(remote_cid);
            if !(same_ws || authorized || manager) {
                match &ann.rintf_allowed_caller {
                    Some(allowed) if allowed == call.from => {}
                    Some(allowed) => {
                        return Err(DispatchError::RintfCallerDenied {
                            method_name: method_name(),
                            caller: call.from.to_owned(),
                            allowed: allowed.clone(),
                        })
                    }
                    None => {
                        return Err(DispatchError::ProtectedMethod {
                            method_name: method_name(),
                            local: fmt_opt(self.local_workspace.as_deref()),
                            remote: remote_ws.to_owned(),
                        })
                    }
                }
            }
        }
        if let Some(keys) = &ann.trusted_keys {
            let key = call.caller_key_hex.filter(|_| call.encrypted);
            match key {
                None => return Err(DispatchError::EncryptionRequired(method_name())),
                Some(k) if !keys.contains(&k.to_ascii_lowercase()) => {
                    return Err(DispatchError::UntrustedKey(method_name()))
                }
                Some(_) => {}
            }
        }
        if let Some(d) = lf.handler.downcast_ref::<DisposeHandler>() {
            return Ok(Target::Dispose { service_id: d.service_id.clone() });
        }
        Ok(Target::Service(ServiceCall { function: lf, annotation: ann }))
    }

    fn lookup_session(
        &mut self,
        now: Instant,
        call: &IncomingCall<'_>,
        top: &str,
        rest: &[&str],
    ) -> Result<Target, DispatchError> {
        let method_name = || call.method_name();
        let Some(top_sess) = self.sessions.get(top) else {
            return Err(if rest.is_empty() {
                DispatchError::MethodNotFound {
                    method_name: method_name(),
                    client_id: self.client_id.clone(),
                }
            } else {
                DispatchError::SessionNotFound(method_name())
            });
        };
        if rest.is_empty() {
            return Err(DispatchError::InvalidMethod(method_name()));
        }
        let mut cur = top_sess;
        // The session path so far is the method's prefix of this length (the segments are
        // the method split at its dots): copied only for the target found.
        let mut full_len = top.len();
        let full = |len: usize| call.method.get(..len).unwrap_or_default().to_owned();
        let mut found: Option<Target> = None;
        let mut invalid = false;
        for (i, seg) in rest.iter().enumerate() {
            let last = i + 1 == rest.len();
            if last && cur.call.is_some() {
                let session = full(full_len);
                let t = match *seg {
                    "resolve" => Some(Target::Resolve { session }),
                    "reject" => Some(Target::Reject { session }),
                    "heartbeat" => Some(Target::Heartbeat { session }),
                    _ => None,
                };
                if t.is_some() {
                    found = t;
                    break;
                }
            }
            match cur.entries.get(*seg) {
                Some(Node::Session(s)) => {
                    if last {
                        invalid = true;
                        break;
                    }
                    full_len += 1 + seg.len();
                    cur = s;
                }
                Some(leaf) if last => {
                    let session = full(full_len);
                    found = Some(match leaf {
                        Node::Function(f) => Target::SessionFunction { session, function: f.clone() },
                        Node::Forwarder(m) => Target::Forwarder { session, method: m.clone() },
                        Node::GeneratorNext(g) => Target::GeneratorNext {
                            session,
                            object_id: (*seg).to_owned(),
                            generator: g.clone(),
                        },
                        Node::GeneratorClose(g) => Target::GeneratorClose {
                            session,
                            object_id: seg.strip_suffix(":close").unwrap_or(seg).to_owned(),
                            generator: g.clone(),
                        },
                        // Sessions are matched by the arm above; keep the match total.
                        Node::Session(_) => Target::Ignore,
                    });
                }
                _ => break,
            }
        }
        if invalid {
            return Err(DispatchError::InvalidMethod(method_name()));
        }
        let Some(target) = found else {
            return if top_sess.call.is_some() {
                Ok(Target::Ignore)
            } else {
                Err(DispatchError::MethodExpired(method_name()))
            };
        };
        // Session target check (step 5): only the peer the session was made for.
        let (remote_ws, _) = split_client(call.from);
        // A bare target id stands for `<remote_ws>/<id>` when the caller is in our workspace.
        let qualify = |t: &str| !t.contains('/') && self.local_workspace.as_deref() == Some(remote_ws);
        let allowed = match top_sess.target_id.as_deref() {
            None => false,
            Some(t) if qualify(t) => {
                call.from.strip_prefix(remote_ws).and_then(|r| r.strip_prefix('/')) == Some(t)
            }
            Some(t) => t == call.from,
        };
        let denied = (!allowed).then(|| {
            top_sess.target_id.as_deref().map(|t| match qualify(t) {
                true => [remote_ws, "/", t].concat(),
                false => t.to_owned(),
            })
        });
        if let Some(s) = self.sessions.get_mut(top) {
            s.last_activity_at = now;
        }
        if let Some(expected) = denied {
            return Err(DispatchError::AccessDenied {
                method_name: method_name(),
                from: call.from.to_owned(),
                target: fmt_opt(expected.as_deref()),
            });
        }
        Ok(target)
    }

    /// Removes a generator's `next` and `close` entries (on exhaustion or close, spec §6).
    pub fn remove_generator(&mut self, session: &str, object_id: &str) -> bool {
        let Some(s) = self.session_mut(session) else { return false };
        let a = s.entries.remove(object_id).is_some();
        let b = s.entries.remove(&format!("{object_id}:close")).is_some();
        a || b
    }

    // ----- lifecycle -----

    /// A peer left (spec §4.10): rejects the pending calls targeting it, deletes the
    /// sessions made for it, and removes the `_rintf` services it was allowed to call.
    pub fn handle_client_disconnected(&mut self, full_id: &str) -> DisconnectSummary {
        let error = CallError::ClientDisconnected(full_id.to_owned());
        let (mut settled, mut sessions_cleaned) = self.fail_where(|c| c.target == full_id, &error);
        let tops: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.target_id.as_deref() == Some(full_id))
            .map(|(k, _)| k.clone())
            .collect();
        for id in tops {
            if let Some(calls) = self.remove_session(&id) {
                sessions_cleaned += 1;
                settled.extend(calls.all().map(|(session, _)| SettledCall {
                    session,
                    outcome: CallOutcome::Failed(error.clone()),
                }));
            }
        }
        let rintf: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.config.rintf_allowed_caller.as_deref() == Some(full_id))
            .map(|(k, _)| k.clone())
            .collect();
        for id in &rintf {
            let _ = self.remove_service(id);
        }
        DisconnectSummary { client_id: full_id.to_owned(), settled, sessions_cleaned, rintf_cleaned: rintf }
    }

    /// The manager id changed on reconnect (spec §1.6 step 4): calls to `*/<old>` fail
    /// with `"Client disconnected: */<old>"`.
    pub fn handle_manager_changed(&mut self, old_manager_id: &str) -> Vec<SettledCall> {
        let full = format!("{WILDCARD}/{old_manager_id}");
        let error = CallError::ClientDisconnected(full.clone());
        self.fail_where(|c| c.target == full, &error).0
    }

    /// The connection dropped (spec §1.6 step 1). While reconnecting, pending calls keep
    /// their timers; otherwise they all fail with `"Connection lost: <reason>"`.
    pub fn handle_connection_lost(&mut self, reason: &str, reconnecting: bool) -> Vec<SettledCall> {
        if reconnecting {
            return Vec::new();
        }
        self.fail_all(CallError::ConnectionLost(reason.to_owned()))
    }

    /// Fails every pending call with `error` and deletes their sessions (e.g.
    /// [`CallError::ReconnectionRefused`]).
    pub fn fail_all(&mut self, error: CallError) -> Vec<SettledCall> {
        self.fail_where(|_| true, &error).0
    }

    /// User disconnect (spec §1.7): every pending call fails with "RPC connection closed"
    /// and all sessions, services and annotations are cleared. Later `open_call`s fail
    /// with "Connection is closed".
    pub fn close(&mut self) -> Vec<SettledCall> {
        let out = self.fail_all(CallError::Closed);
        self.sessions.clear();
        self.pending.clear();
        self.deadlines.clear();
        self.services.clear();
        self.annotations.clear();
        self.closed = true;
        out
    }

    /// Fails the pending calls matching `pred`; returns them and how many sessions went.
    fn fail_where(
        &mut self,
        pred: impl Fn(&PendingCall) -> bool,
        error: &CallError,
    ) -> (Vec<SettledCall>, usize) {
        let mut ids: Vec<String> = self
            .pending
            .iter()
            .filter(|id| self.session(id).and_then(|s| s.call.as_ref()).is_some_and(&pred))
            .cloned()
            .collect();
        // Outer sessions first, so nested calls settle as part of their parent's removal.
        ids.sort_by_key(|id| id.matches('.').count());
        let mut out = Vec::new();
        let mut removed = 0;
        for id in ids {
            if let Some(calls) = self.remove_session(&id) {
                removed += 1;
                out.extend(calls.all().map(|(session, _)| SettledCall {
                    session,
                    outcome: CallOutcome::Failed(error.clone()),
                }));
            }
        }
        (out, removed)
    }

    /// Session GC (spec §4.7): deletes top-level sessions idle for longer than
    /// `session_ttl` that hold no pending call. Returns how many were deleted. Run it
    /// every [`SessionTable::sweep_interval`].
    pub fn sweep(&mut self, now: Instant) -> usize {
        self.tick(now);
        let ttl = self.config.session_ttl;
        let stale: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                let last = s.last_activity_at.max(s.created_at);
                now.saturating_duration_since(last) > ttl && !s.has_call_in_subtree()
            })
            .map(|(k, _)| k.clone())
            .collect();
        for id in &stale {
            self.sessions.remove(id);
        }
        stale.len()
    }

    /// How often to run [`SessionTable::sweep`] (`session_ttl / 2`).
    pub fn sweep_interval(&self) -> Duration {
        self.config.session_ttl / 2
    }
}

/// The pending calls a removed session held, by session id.
struct RemovedCalls {
    /// The removed session's own call.
    root: Option<(String, PendingCall)>,
    /// The calls of the sessions nested in it.
    nested: Vec<(String, PendingCall)>,
}

impl RemovedCalls {
    /// All of them, the root's first.
    fn all(self) -> impl Iterator<Item = (String, PendingCall)> {
        self.root.into_iter().chain(self.nested)
    }
}

fn collect_calls(id: String, mut s: Session, out: &mut Vec<(String, PendingCall)>) {
    if let Some(c) = s.call.take() {
        out.push((id.clone(), c));
    }
    for (k, node) in s.entries {
        if let Node::Session(child) = node {
            collect_calls(format!("{id}.{k}"), *child, out);
        }
    }
}

impl SessionTable {
    /// A function of a registered service is called through its service path and needs
    /// no session: its stored form, if `function` is one.
    fn service_function(&self, function: &LocalFunction) -> Option<StoredFunction> {
        let a = self.annotations.get(&function.handler)?;
        Some(StoredFunction { method: a.method_id.clone(), is_service_function: true })
    }

    /// Stores a function that is not a service's in `session`, under a fresh id.
    fn store_session_function(
        &mut self,
        session: Option<&str>,
        function: &LocalFunction,
    ) -> Result<StoredFunction, CodecError> {
        let session = session.ok_or(SessionError::NoSession("a function"))?;
        // `.` separates path segments: a name containing one could never be looked up.
        let object_id = match &function.name {
            Some(n) => format!("{}#{}", random_id(), n.replace('.', "_")),
            None => random_id(),
        };
        let now = self.clock;
        let s = self.ensure_session(session, now)?;
        s.entries.insert(object_id.clone(), Node::Function(function.clone()));
        Ok(StoredFunction { method: format!("{session}.{object_id}"), is_service_function: false })
    }
}

impl ObjectSink for SessionTable {
    fn store_function(
        &mut self,
        session: Option<&str>,
        function: &LocalFunction,
    ) -> Result<StoredFunction, CodecError> {
        match self.service_function(function) {
            Some(stored) => Ok(stored),
            None => self.store_session_function(session, function),
        }
    }

    fn store_generator(
        &mut self,
        session: Option<&str>,
        generator: &LocalGenerator,
    ) -> Result<(String, String), CodecError> {
        let session = session.ok_or(SessionError::NoSession("a generator"))?;
        let oid = random_id();
        let now = self.clock;
        let s = self.ensure_session(session, now)?;
        s.entries.insert(oid.clone(), Node::GeneratorNext(generator.clone()));
        s.entries.insert(format!("{oid}:close"), Node::GeneratorClose(generator.clone()));
        Ok((format!("{session}.{oid}"), format!("{session}.{oid}:close")))
    }

    fn register_interface(
        &mut self,
        session: Option<&str>,
        members: Vec<(String, LocalFunction)>,
    ) -> Result<String, CodecError> {
        let session = session.ok_or(SessionError::RintfWithoutSession)?;
        let top = session.split('.').next().unwrap_or(session);
        let allowed = self
            .sessions
            .get(top)
            .and_then(|s| s.target_id.clone())
            .ok_or(SessionError::RintfWithoutSession)?;
        let id = format!("{RINTF_PREFIX}{}", random_id());
        let mut config = Map::new();
        config.insert("visibility".into(), Value::from("protected"));
        config.insert("_local_only".into(), Value::Bool(true));
        config.insert("_rintf_allowed_caller".into(), Value::Str(allowed));
        let mut api = Map::new();
        api.insert("id".into(), Value::Str(id.clone()));
        api.insert("config".into(), Value::Map(config));
        for (k, f) in members {
            if !k.starts_with('_') {
                api.insert(k, Value::from(Function::Local(f)));
            }
        }
        let dispose = Handler::new(DisposeHandler { service_id: id.clone() });
        api.insert("_dispose".into(), local_fn(dispose, "_dispose"));
        self.add_service(api, true).map_err(SessionError::from)?;
        Ok(id)
    }

    fn store_forwarder(
        &mut self,
        session: Option<&str>,
        method: &RemoteMethod,
    ) -> Result<String, CodecError> {
        let session = session.ok_or(SessionError::NoSession("a remote function"))?;
        let object_id = format!("{}#{}", random_id(), method.display_name().replace('.', "_"));
        let now = self.clock;
        let s = self.ensure_session(session, now)?;
        s.entries.insert(object_id.clone(), Node::Forwarder(method.clone()));
        Ok(format!("{session}.{object_id}"))
    }
}

/// The session of a fire-and-forget call (a `resolve` or `reject` reply), opened only
/// when encoding its arguments leaves something behind in it.
///
/// A promise call needs its session whatever it carries (the answer comes back to it).
/// A fire-and-forget call needs one only to hold the functions, generators or `_rintf`
/// interfaces among its arguments; without any, [`SessionTable::open_call`] would draw a
/// session id and [`SessionTable::call_sent`] would delete the session again at once, for
/// nothing (most replies are plain data). Encode through this sink (with
/// `EncodeContext::session` unset: the sink knows its session) and then read
/// [`LazySession::opened`]: `None` means no session exists and no `call_sent` is due.
pub struct LazySession<'t, 'a> {
    table: &'t mut SessionTable,
    now: Instant,
    call: OpenCall<'a>,
    opened: Option<String>,
}

impl<'t, 'a> LazySession<'t, 'a> {
    /// A sink for `call`, which must be fire-and-forget ([`PromiseMode::None`]). Fails,
    /// as `open_call` does, once the table is closed.
    pub fn new(table: &'t mut SessionTable, now: Instant, call: OpenCall<'a>) -> Result<Self, SessionError> {
        debug_assert_eq!(call.promise, PromiseMode::None, "a promise call needs its session");
        if table.closed {
            return Err(SessionError::Closed);
        }
        Ok(Self { table, now, call, opened: None })
    }

    /// Opens the session unless it is open already (a chunked package needs one even
    /// when nothing is stored in it).
    pub fn open(&mut self) -> Result<(), SessionError> {
        if self.opened.is_none() {
            self.opened = Some(self.table.open_call(self.now, &self.call)?.session);
        }
        Ok(())
    }

    /// The session, if anything opened it.
    pub fn opened(self) -> Option<String> {
        self.opened
    }
}

impl ObjectSink for LazySession<'_, '_> {
    fn store_function(
        &mut self,
        _: Option<&str>,
        function: &LocalFunction,
    ) -> Result<StoredFunction, CodecError> {
        if let Some(stored) = self.table.service_function(function) {
            return Ok(stored);
        }
        self.open()?;
        self.table.store_session_function(self.opened.as_deref(), function)
    }

    fn store_generator(
        &mut self,
        _: Option<&str>,
        generator: &LocalGenerator,
    ) -> Result<(String, String), CodecError> {
        self.open()?;
        self.table.store_generator(self.opened.as_deref(), generator)
    }

    fn register_interface(
        &mut self,
        _: Option<&str>,
        members: Vec<(String, LocalFunction)>,
    ) -> Result<String, CodecError> {
        self.open()?;
        self.table.register_interface(self.opened.as_deref(), members)
    }

    fn store_forwarder(&mut self, _: Option<&str>, method: &RemoteMethod) -> Result<String, CodecError> {
        self.open()?;
        self.table.store_forwarder(self.opened.as_deref(), method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map;

    const ME: &str = "ws1/me";

    fn t0() -> Instant {
        Instant::now()
    }

    fn secs(base: Instant, s: u64) -> Instant {
        base + Duration::from_secs(s)
    }

    fn table(now: Instant) -> SessionTable {
        let mut t = SessionTable::new(SessionConfig::default(), "me", now);
        t.set_local_workspace(Some("ws1".into()));
        t.set_manager_id(Some("mgr".into()));
        t
    }

    fn func(name: &str) -> LocalFunction {
        let mut f = LocalFunction::new(Handler::new(name.to_owned()));
        f.name = Some(name.into());
        f
    }

    fn fval(f: &LocalFunction) -> Value {
        Value::from(Function::Local(f.clone()))
    }

    fn call<'a>(target: &'a str, method: &'a str, promise: PromiseMode) -> OpenCall<'a> {
        OpenCall { target, method, promise, local_parent: None, doc: None }
    }

    fn inc<'a>(from: &'a str, method: &'a str) -> IncomingCall<'a> {
        IncomingCall { from, method, ..Default::default() }
    }

    fn err(t: &mut SessionTable, now: Instant, from: &str, method: &str) -> String {
        match t.lookup(now, &inc(from, method)) {
            Ok(target) => panic!("expected an error for {method}, got {target:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_fire_and_forget_session_opens_only_for_what_it_must_hold() {
        use crate::codec::{self, CodecRegistry, EncodeContext};
        let now = t0();
        let mut t = table(now);
        let codecs = CodecRegistry::new();
        let resolve = call("ws1/peer", "S.resolve", PromiseMode::None);
        let encode = |t: &mut SessionTable, v: Value| {
            let mut lazy = LazySession::new(t, now, resolve.clone()).unwrap();
            let mut cx = EncodeContext::new(ME, &codecs, &mut lazy);
            let out = codec::encode(&v, &mut cx).unwrap();
            (out, lazy.opened())
        };

        // Plain data, however nested, needs no session.
        let plain = Value::from(map! { "a" => vec![Value::Int(1), Value::from("x")], "b" => Value::Nil });
        let (out, opened) = encode(&mut t, plain.clone());
        assert_eq!((out, opened), (plain, None));
        assert_eq!(t.total_session_count(), 0);

        // A service function is referenced by its service path: still no session.
        let (add, _) = demo_service(&mut t, Map::new());
        let (out, opened) = encode(&mut t, fval(&add));
        assert_eq!(opened, None);
        assert_eq!(out.as_map().unwrap()["_rmethod"], Value::from("services.demo.add"));

        // A new function opens the session once, and lives in it.
        let f = func("cb");
        let g = func("cb2");
        let (out, opened) = encode(&mut t, Value::from(vec![fval(&f), fval(&g)]));
        let session = opened.expect("a session for the functions");
        assert_eq!(t.total_session_count(), 1);
        for d in out.as_list().unwrap() {
            let method = d.as_map().unwrap()["_rmethod"].as_str().unwrap().to_owned();
            assert!(method.starts_with(&format!("{session}.")), "{method} in {session}");
        }
        assert!(t.call_sent(now, &session).is_some(), "settled at once");
        assert_eq!(t.total_session_count(), 1, "kept for the functions it holds");

        // A closed table refuses, as `open_call` does.
        t.close();
        assert!(matches!(LazySession::new(&mut t, now, resolve.clone()), Err(SessionError::Closed)));
    }

    fn demo_service(t: &mut SessionTable, config: Map) -> (LocalFunction, LocalFunction) {
        let add = func("add");
        let echo = func("echo");
        let api = map! {
            "id" => "demo",
            "config" => config,
            "add" => Function::Local(add.clone()),
            "nested" => map! { "echo" => Function::Local(echo.clone()) },
            "list" => vec![Value::Int(1), fval(&echo)],
        };
        t.add_service(api, false).unwrap();
        (add, echo)
    }

    #[test]
    fn compact_promise_lifecycle() {
        let now = t0();
        let mut t = table(now);
        let c = t.open_call(now, &call("ws2/peer", "services.x.f", PromiseMode::Compact)).unwrap();
        assert_eq!(c.timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.heartbeat_interval, Some(Duration::from_secs(15)));
        assert_eq!(t.session_count(), 1);
        assert_eq!(t.pending_call_count(), 1);
        assert_eq!(t.poll_timeout(), None, "timer must not run before the send");
        assert_eq!(t.call_sent(now, &c.session), None);
        assert_eq!(t.poll_timeout(), Some(secs(now, 30)));
        let m = format!("{}.resolve", c.session);
        match t.lookup(secs(now, 1), &inc("ws2/peer", &m)).unwrap() {
            Target::Resolve { session } => assert_eq!(session, c.session),
            other => panic!("{other:?}"),
        }
        let out = t.handle_resolve(secs(now, 1), &c.session, Value::Int(7));
        assert_eq!(
            out,
            vec![SettledCall { session: c.session.clone(), outcome: CallOutcome::Resolved(Value::Int(7)) }]
        );
        assert_eq!(t.session_count(), 0);
        assert_eq!(t.pending_call_count(), 0);
        assert_eq!(t.poll_timeout(), None);
        // A second resolve (duplicate) settles nothing.
        assert!(t.handle_resolve(secs(now, 2), &c.session, Value::Nil).is_empty());
    }

    #[test]
    fn explicit_promise_and_rintf_timeout() {
        let now = t0();
        let mut t = table(now);
        let c = t
            .open_call(now, &call("ws2/peer", "services._rintf_abc.getItem", PromiseMode::Explicit))
            .unwrap();
        assert_eq!(c.timeout, Some(Duration::from_secs(10)));
        // Explicit promises advertise method_timeout / 2 even for _rintf_ targets.
        assert_eq!(c.heartbeat_interval, Some(Duration::from_secs(15)));
        let c2 = t.open_call(now, &call("ws2/peer", "services._rintf_abc.f", PromiseMode::Compact)).unwrap();
        assert_eq!(c2.heartbeat_interval, Some(Duration::from_secs(5)));
        t.call_sent(now, &c.session);
        let out = t.handle_reject(now, &c.session, ErrorValue::new("boom"));
        assert_eq!(out[0].outcome, CallOutcome::Rejected(ErrorValue::new("boom")));
        assert!(!t.has_session(&c.session));
        assert!(t.has_session(&c2.session));
    }

    #[test]
    fn fire_and_forget_deleted_unless_live_entries() {
        let now = t0();
        let mut t = table(now);
        let c = t.open_call(now, &call("ws2/peer", "S.resolve", PromiseMode::None)).unwrap();
        assert_eq!(c.timeout, None);
        assert_eq!(t.pending_call_count(), 0);
        let out = t.call_sent(now, &c.session).unwrap();
        assert_eq!(out.outcome, CallOutcome::Resolved(Value::Nil));
        assert_eq!(t.session_count(), 0);

        let c = t.open_call(now, &call("ws2/peer", "S.resolve", PromiseMode::None)).unwrap();
        let stored = t.store_function(Some(&c.session), &func("cb")).unwrap();
        assert!(!stored.is_service_function);
        assert!(stored.method.starts_with(&format!("{}.", c.session)));
        assert!(stored.method.ends_with("#cb"));
        t.call_sent(now, &c.session).unwrap();
        assert_eq!(t.session_count(), 1, "a result session holding a function persists");
        match t.lookup(now, &inc("ws2/peer", &stored.method)).unwrap() {
            Target::SessionFunction { session, function } => {
                assert_eq!(session, c.session);
                assert_eq!(function.name.as_deref(), Some("cb"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn heartbeat_extends_deadline_and_timeout_message() {
        let now = t0();
        let mut t = table(now);
        let mut oc = call("ws2/peer", "services.demo.slow", PromiseMode::Compact);
        oc.doc = Some("Slow thing.");
        let c = t.open_call(now, &oc).unwrap();
        t.call_sent(now, &c.session);
        assert!(t.handle_heartbeat(secs(now, 20), &c.session));
        assert_eq!(t.poll_timeout(), Some(secs(now, 50)));
        assert!(t.handle_timeout(secs(now, 45)).is_empty());
        assert!(t.has_session(&c.session));
        let out = t.handle_timeout(secs(now, 50));
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].outcome.error_message().unwrap(),
            "Method call timed out: ws2/peer:services.demo.slow, context: method: services.demo.slow, docs: Slow thing."
        );
        assert_eq!(t.session_count(), 0);
        assert_eq!(t.poll_timeout(), None);
        // Late heartbeat after the timeout: ignored.
        assert!(!t.handle_heartbeat(secs(now, 51), &c.session));
    }

    #[test]
    fn timer_starts_only_at_call_sent() {
        let now = t0();
        let mut t = table(now);
        let c = t.open_call(now, &call("ws2/peer", "services.demo.f", PromiseMode::Compact)).unwrap();
        assert!(t.handle_timeout(secs(now, 1000)).is_empty(), "unsent calls never time out");
        t.call_sent(secs(now, 100), &c.session);
        assert_eq!(t.poll_timeout(), Some(secs(now, 130)));
        assert!(t.handle_timeout(secs(now, 129)).is_empty());
        let out = t.handle_timeout(secs(now, 130));
        assert_eq!(
            out[0].outcome,
            CallOutcome::Failed(CallError::TimedOut {
                target: "ws2/peer".into(),
                method: "services.demo.f".into(),
                doc: "None".into()
            })
        );
        assert!(out[0].outcome.error_message().unwrap().ends_with("docs: None"));
    }

    #[test]
    fn zero_timeout_disables_timer() {
        let now = t0();
        let cfg = SessionConfig { method_timeout: Duration::ZERO, ..Default::default() };
        let mut t = SessionTable::new(cfg, "me", now);
        let c = t.open_call(now, &call("ws2/peer", "services.demo.f", PromiseMode::Compact)).unwrap();
        assert_eq!(c.timeout, None);
        t.call_sent(now, &c.session);
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn nested_sessions_and_their_deletion() {
        let now = t0();
        let mut t = table(now);
        let p = t.open_call(now, &call("ws2/peer", "services.demo.f", PromiseMode::Compact)).unwrap();
        t.call_sent(now, &p.session);
        let mut oc = call("ws2/peer", "X.resolve", PromiseMode::Compact);
        oc.local_parent = Some(&p.session);
        let child = t.open_call(now, &oc).unwrap();
        assert!(child.session.starts_with(&format!("{}.", p.session)));
        assert_eq!(t.session_count(), 1);
        assert_eq!(t.total_session_count(), 2);
        t.call_sent(now, &child.session);
        let m = format!("{}.heartbeat", child.session);
        assert!(
            matches!(t.lookup(now, &inc("ws2/peer", &m)).unwrap(), Target::Heartbeat { session } if session == child.session)
        );
        // Resolving the child keeps the parent.
        let out = t.handle_resolve(now, &child.session, Value::Nil);
        assert_eq!(out.len(), 1);
        assert!(t.has_session(&p.session));
        assert!(!t.has_session(&child.session));
        // A nested pending call dies with its parent, as a ParentClosed failure.
        let child2 = t.open_call(now, &oc).unwrap();
        t.call_sent(now, &child2.session);
        let out = t.handle_resolve(now, &p.session, Value::Nil);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].session, p.session);
        assert_eq!(out[1].outcome, CallOutcome::Failed(CallError::ParentClosed(p.session.clone())));
        assert_eq!(t.total_session_count(), 0);
        assert_eq!(t.pending_call_count(), 0);
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn bare_intermediate_sessions_are_pruned() {
        let now = t0();
        let mut t = table(now);
        let mut oc = call("ws2/peer", "X.f", PromiseMode::Compact);
        oc.local_parent = Some("gone");
        let c = t.open_call(now, &oc).unwrap();
        assert!(t.has_session("gone"));
        t.handle_resolve(now, &c.session, Value::Nil);
        assert_eq!(t.session_count(), 0, "the bare parent created for the child goes with it");
    }

    #[test]
    fn callbacks_die_with_the_call() {
        let now = t0();
        let mut t = table(now);
        let c = t.open_call(now, &call("ws2/peer", "services.demo.f", PromiseMode::Compact)).unwrap();
        let cb = t.store_function(Some(&c.session), &func("progress")).unwrap().method;
        t.call_sent(now, &c.session);
        assert!(matches!(t.lookup(now, &inc("ws2/peer", &cb)).unwrap(), Target::SessionFunction { .. }));
        // Unknown entry in a live pending session: silently ignored.
        assert!(matches!(
            t.lookup(now, &inc("ws2/peer", &format!("{}.nope", c.session))).unwrap(),
            Target::Ignore
        ));
        t.handle_resolve(now, &c.session, Value::Nil);
        assert_eq!(err(&mut t, now, "ws2/peer", &cb), format!("Session not found: ws2/peer:{cb}"));
        // A live non-promise session with a missing entry: "Method expired or not found".
        let r = t.open_call(now, &call("ws2/peer", "S.resolve", PromiseMode::None)).unwrap();
        t.store_function(Some(&r.session), &func("g")).unwrap();
        t.call_sent(now, &r.session);
        let m = format!("{}.other", r.session);
        assert_eq!(err(&mut t, now, "ws2/peer", &m), format!("Method expired or not found: ws2/peer:{m}"));
    }

    #[test]
    fn persistent_service_functions_survive_calls() {
        let now = t0();
        let mut t = table(now);
        let (add, echo) = demo_service(&mut t, Map::new());
        for _ in 0..3 {
            let c = t.open_call(now, &call("ws1/peer", "services.x.f", PromiseMode::Compact)).unwrap();
            let s = t.store_function(Some(&c.session), &add).unwrap();
            assert_eq!(s, StoredFunction { method: "services.demo.add".into(), is_service_function: true });
            t.call_sent(now, &c.session);
            t.handle_resolve(now, &c.session, Value::Nil);
        }
        assert_eq!(t.session_count(), 0);
        match t.lookup(now, &inc("ws1/other", "services.demo.add")).unwrap() {
            Target::Service(sc) => {
                assert_eq!(sc.function, add);
                assert_eq!(sc.annotation.method_id, "services.demo.add");
                assert!(!sc.annotation.require_context);
            }
            other => panic!("{other:?}"),
        }
        match t.lookup(now, &inc("ws1/other", "services.demo.list.1")).unwrap() {
            Target::Service(sc) => assert_eq!(sc.function, echo),
            other => panic!("{other:?}"),
        }
        // No session needed to encode an annotated function.
        assert!(t.store_function(None, &echo).unwrap().is_service_function);
    }

    #[test]
    fn last_registration_path_wins() {
        let now = t0();
        let mut t = table(now);
        let echo = func("echo");
        let api = map! {
            "id" => "demo",
            "echo" => Function::Local(echo.clone()),
            "nested" => map! { "echo2" => Function::Local(echo.clone()) },
        };
        t.add_service(api, false).unwrap();
        assert_eq!(t.annotation(&echo.handler).unwrap().method_id, "services.demo.nested.echo2");
        assert_eq!(t.store_function(None, &echo).unwrap().method, "services.demo.nested.echo2");
    }

    #[test]
    fn not_found_rules_and_strings() {
        let now = t0();
        let mut t = table(now);
        demo_service(&mut t, Map::new());
        let from = "ws1/peer";
        assert_eq!(err(&mut t, now, from, "foo"), "Method not found: ws1/peer:foo at me");
        assert_eq!(err(&mut t, now, from, "nosession.x"), "Session not found: ws1/peer:nosession.x");
        assert_eq!(
            err(&mut t, now, from, "services.demo.missing"),
            "Method expired or not found: ws1/peer:services.demo.missing"
        );
        assert_eq!(
            err(&mut t, now, from, "services.nosvc.f"),
            "Method expired or not found: ws1/peer:services.nosvc.f"
        );
        assert_eq!(
            err(&mut t, now, from, "message_cache.k"),
            "Method expired or not found: ws1/peer:message_cache.k"
        );
        assert_eq!(
            err(&mut t, now, from, "services.demo.name"),
            "Invalid method: ws1/peer:services.demo.name"
        );
        assert_eq!(
            err(&mut t, now, from, "services.demo.list.9"),
            "Method expired or not found: ws1/peer:services.demo.list.9"
        );
        assert_eq!(
            err(&mut t, now, from, "services.demo.nested"),
            "Invalid method: ws1/peer:services.demo.nested"
        );
    }

    #[test]
    fn protected_permissions() {
        let now = t0();
        let mut t = table(now);
        demo_service(&mut t, map! { "authorized_workspaces" => vec![Value::from("ws3")] });
        assert!(t.lookup(now, &inc("ws1/peer", "services.demo.add")).is_ok());
        assert!(t.lookup(now, &inc("ws3/peer", "services.demo.add")).is_ok());
        assert!(t.lookup(now, &inc("*/mgr", "services.demo.add")).is_ok());
        assert_eq!(
            err(&mut t, now, "*/other", "services.demo.add"),
            "Permission denied for invoking protected method */other:services.demo.add, workspace mismatch: ws1 != *"
        );
        assert_eq!(
            err(&mut t, now, "ws2/peer", "services.demo.add"),
            "Permission denied for invoking protected method ws2/peer:services.demo.add, workspace mismatch: ws1 != ws2"
        );
    }

    #[test]
    fn public_and_unlisted_are_open() {
        let now = t0();
        for vis in ["public", "unlisted"] {
            let mut t = table(now);
            demo_service(&mut t, map! { "visibility" => vis });
            assert!(t.lookup(now, &inc("ws9/x", "services.demo.nested.echo")).is_ok(), "{vis}");
        }
    }

    #[test]
    fn require_context_rules() {
        let now = t0();
        let mut t = table(now);
        let (add, echo) = demo_service(&mut t, map! { "require_context" => vec![Value::from("list.1")] });
        assert!(!t.annotation(&add.handler).unwrap().require_context);
        assert!(t.annotation(&echo.handler).unwrap().require_context);
        let mut t = table(now);
        let (add, _) = demo_service(&mut t, map! { "require_context" => true });
        assert!(t.annotation(&add.handler).unwrap().require_context);
    }

    #[test]
    fn trusted_keys_checks() {
        let now = t0();
        let mut t = table(now);
        let key = "ab".repeat(32);
        demo_service(
            &mut t,
            map! { "visibility" => "public", "trusted_keys" => vec![Value::from(key.as_str())] },
        );
        assert_eq!(
            err(&mut t, now, "ws2/p", "services.demo.add"),
            "Encryption required for method ws2/p:services.demo.add (trusted_keys is set)"
        );
        let other = "cd".repeat(32);
        let c = IncomingCall {
            from: "ws2/p",
            method: "services.demo.add",
            encrypted: true,
            caller_key_hex: Some(&other),
            local_parent: None,
        };
        assert_eq!(
            t.lookup(now, &c).unwrap_err().to_string(),
            "Caller's public key is not in the trusted keys list for ws2/p:services.demo.add"
        );
        let c = IncomingCall { caller_key_hex: Some(&key), ..c };
        assert!(t.lookup(now, &c).is_ok());
    }

    #[test]
    fn session_target_check() {
        let now = t0();
        let mut t = table(now);
        let c = t.open_call(now, &call("ws2/peer", "services.x.f", PromiseMode::Compact)).unwrap();
        let cb = t.store_function(Some(&c.session), &func("cb")).unwrap().method;
        assert_eq!(
            err(&mut t, now, "ws2/intruder", &cb),
            format!("Access denied for method call (ws2/intruder:{cb}) from ws2/intruder to target ws2/peer")
        );
        let m = format!("{}.resolve", c.session);
        assert!(err(&mut t, now, "ws1/intruder", &m).starts_with("Access denied for method call"));
        // A relative target is made absolute when the caller is in our workspace.
        let r = t.open_call(now, &call("peer", "services.x.f", PromiseMode::Compact)).unwrap();
        let cb = t.store_function(Some(&r.session), &func("cb")).unwrap().method;
        assert!(t.lookup(now, &inc("ws1/peer", &cb)).is_ok());
        assert!(err(&mut t, now, "ws2/peer", &cb).ends_with("to target peer"));
    }

    #[test]
    fn parent_check() {
        let now = t0();
        let mut t = table(now);
        demo_service(&mut t, Map::new());
        let c = t.open_call(now, &call("ws1/peer", "services.x.f", PromiseMode::Compact)).unwrap();
        let cb = t.store_function(Some(&c.session), &func("cb")).unwrap().method;
        let live = c.session.clone();
        let mut ic = inc("ws1/peer", &cb);
        ic.local_parent = Some(&live);
        assert!(t.lookup(now, &ic).is_ok());
        ic.local_parent = Some("closedsession");
        assert_eq!(t.lookup(now, &ic).unwrap_err().to_string(), "Parent session was closed: closedsession");
        // Service methods skip the parent check.
        let mut ic = inc("ws1/peer", "services.demo.add");
        ic.local_parent = Some("closedsession");
        assert!(t.lookup(now, &ic).is_ok());
    }

    #[test]
    fn interface_registration_shape_and_permissions() {
        let now = t0();
        let mut t = table(now);
        let c = t.open_call(now, &call("ws2/consumer", "services.x.register", PromiseMode::Compact)).unwrap();
        let get_item = func("getItem");
        let id = t
            .register_interface(
                Some(&c.session),
                vec![("getItem".into(), get_item.clone()), ("_hidden".into(), func("h"))],
            )
            .unwrap();
        assert!(id.starts_with("_rintf_"));
        assert_eq!(id.len(), RINTF_PREFIX.len() + crate::ids::RANDOM_ID_LEN);
        let svc = t.service(&id).unwrap();
        assert_eq!(svc.config.visibility(), Visibility::Protected);
        assert!(svc.config.is_local_only());
        assert_eq!(svc.config.rintf_allowed_caller.as_deref(), Some("ws2/consumer"));
        let cfg = svc.api.get("config").and_then(Value::as_map).unwrap();
        assert_eq!(cfg.get("_local_only"), Some(&Value::Bool(true)));
        assert_eq!(cfg.get("visibility"), Some(&Value::from("protected")));
        assert!(svc.api.contains_key("_dispose"));
        assert!(!svc.api.contains_key("_hidden"));
        let ann = t.annotation(&get_item.handler).unwrap();
        assert_eq!(ann.method_id, format!("services.{id}.getItem"));
        assert_eq!(ann.rintf_allowed_caller.as_deref(), Some("ws2/consumer"));

        // The call ends; the interface survives.
        t.call_sent(now, &c.session);
        t.handle_resolve(now, &c.session, Value::Nil);
        let m = format!("services.{id}.getItem");
        assert!(matches!(t.lookup(now, &inc("ws2/consumer", &m)).unwrap(), Target::Service(_)));
        assert_eq!(
            err(&mut t, now, "ws2/attacker", &m),
            format!("Permission denied for _rintf callback ws2/attacker:{m}, caller ws2/attacker is not the allowed caller ws2/consumer")
        );
        let d = format!("services.{id}._dispose");
        match t.lookup(now, &inc("ws2/consumer", &d)).unwrap() {
            Target::Dispose { service_id } => assert_eq!(service_id, id),
            other => panic!("{other:?}"),
        }
        let removed = t.remove_service(&id).unwrap();
        assert!(!removed.notify_server);
        assert_eq!(
            err(&mut t, now, "ws2/consumer", &m),
            format!("Method expired or not found: ws2/consumer:{m}")
        );
        assert!(t.annotation(&get_item.handler).is_none());
        // Outside a session there is no peer to allow.
        assert!(t.register_interface(None, vec![("f".into(), func("f"))]).is_err());
    }

    #[test]
    fn client_disconnected_cleanup() {
        let now = t0();
        let mut t = table(now);
        let a1 = t.open_call(now, &call("ws2/a", "services.x.f", PromiseMode::Compact)).unwrap();
        let a2 = t.open_call(now, &call("ws2/a", "services.x.g", PromiseMode::Explicit)).unwrap();
        let b = t.open_call(now, &call("ws2/b", "services.x.f", PromiseMode::Compact)).unwrap();
        let res = t.open_call(now, &call("ws2/a", "S.resolve", PromiseMode::None)).unwrap();
        t.store_function(Some(&res.session), &func("r")).unwrap();
        t.call_sent(now, &res.session);
        let id = t.register_interface(Some(&a1.session), vec![("f".into(), func("f"))]).unwrap();
        let sum = t.handle_client_disconnected("ws2/a");
        assert_eq!(sum.client_id, "ws2/a");
        assert_eq!(sum.settled.len(), 2);
        assert_eq!(sum.sessions_cleaned, 3);
        assert_eq!(sum.rintf_cleaned, vec![id.clone()]);
        let mut sessions: Vec<&str> = sum.settled.iter().map(|s| s.session.as_str()).collect();
        sessions.sort();
        let mut want = vec![a1.session.as_str(), a2.session.as_str()];
        want.sort();
        assert_eq!(sessions, want);
        for s in &sum.settled {
            assert_eq!(s.outcome.error_message().unwrap(), "Client disconnected: ws2/a");
        }
        assert!(t.service(&id).is_none());
        assert_eq!(t.session_count(), 1);
        assert!(t.has_session(&b.session));
    }

    #[test]
    fn manager_change_rejects_manager_calls() {
        let now = t0();
        let mut t = table(now);
        let m = t.open_call(now, &call("*/mgr", "services.default.echo", PromiseMode::Compact)).unwrap();
        let o = t.open_call(now, &call("ws2/b", "services.x.f", PromiseMode::Compact)).unwrap();
        let out = t.handle_manager_changed("mgr");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].session, m.session);
        assert_eq!(out[0].outcome.error_message().unwrap(), "Client disconnected: */mgr");
        assert!(t.has_session(&o.session));
    }

    #[test]
    fn connection_lost_and_close() {
        let now = t0();
        let mut t = table(now);
        demo_service(&mut t, Map::new());
        let a = t.open_call(now, &call("ws2/a", "services.x.f", PromiseMode::Compact)).unwrap();
        t.call_sent(now, &a.session);
        assert!(t.handle_connection_lost("1006", true).is_empty());
        assert_eq!(t.pending_call_count(), 1);
        assert_eq!(t.poll_timeout(), Some(secs(now, 30)), "timers survive a reconnect");
        let out = t.handle_connection_lost("1006", false);
        assert_eq!(out[0].outcome.error_message().unwrap(), "Connection lost: 1006");
        assert_eq!(t.session_count(), 0);

        let b = t.open_call(now, &call("ws2/a", "services.x.f", PromiseMode::Compact)).unwrap();
        let out = t.close();
        assert_eq!(
            out,
            vec![SettledCall { session: b.session, outcome: CallOutcome::Failed(CallError::Closed) }]
        );
        assert_eq!(out[0].outcome.error_message().unwrap(), "RPC connection closed");
        assert_eq!(t.service_count(), 0);
        assert_eq!(t.annotation_count(), 0);
        assert!(t.is_closed());
        let e = t.open_call(now, &call("ws2/a", "services.x.f", PromiseMode::Compact)).unwrap_err();
        assert_eq!(e.to_string(), "Connection is closed");
    }

    #[test]
    fn send_failure_settles() {
        let now = t0();
        let mut t = table(now);
        let a = t.open_call(now, &call("ws2/a", "services.x.f", PromiseMode::Compact)).unwrap();
        let out = t.handle_send_failed(&a.session, "socket gone");
        assert_eq!(
            out[0].outcome.error_message().unwrap(),
            "Failed to send the request when calling method (ws2/a:services.x.f), error: socket gone"
        );
        assert_eq!(t.session_count(), 0);
    }

    #[test]
    fn overwriting_a_service_keeps_its_place() {
        let now = t0();
        let mut t = table(now);
        for id in ["a", "b", "c"] {
            t.add_service(map! { "id" => id }, false).unwrap();
        }
        t.add_service(map! { "id" => "a", "x" => 1 }, true).unwrap();
        let ids: Vec<&str> = t.services().map(|(k, _)| k).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(t.service("a").unwrap().api["x"], Value::from(1));
    }

    #[test]
    fn send_failure_settles_fire_and_forget_calls_too() {
        let now = t0();
        let mut t = table(now);
        let f = t.open_call(now, &call("ws2/a", "S.resolve", PromiseMode::None)).unwrap();
        let out = t.handle_send_failed(&f.session, "too big");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].session, f.session);
        assert_eq!(
            out[0].outcome.error_message().unwrap(),
            "Failed to send the request when calling method (ws2/a:S.resolve), error: too big"
        );
        assert_eq!(t.session_count(), 0);
        // Once sent, a fire-and-forget call is settled: a late failure report is a no-op.
        let g = t.open_call(now, &call("ws2/a", "S.resolve", PromiseMode::None)).unwrap();
        t.store_function(Some(&g.session), &func("r")).unwrap();
        assert!(t.call_sent(now, &g.session).is_some());
        assert!(t.handle_send_failed(&g.session, "late").is_empty());
    }

    #[test]
    fn heartbeat_session_tells_missing_from_idle() {
        let now = t0();
        let mut t = table(now);
        let c = t.open_call(now, &call("ws2/a", "services.x.f", PromiseMode::Compact)).unwrap();
        t.call_sent(now, &c.session);
        assert_eq!(t.heartbeat_session(secs(now, 20), &c.session), SessionHeartbeat::Reset);
        assert_eq!(t.poll_timeout(), Some(secs(now, 50)));
        let r = t.open_call(now, &call("ws2/a", "S.resolve", PromiseMode::None)).unwrap();
        t.store_function(Some(&r.session), &func("r")).unwrap();
        t.call_sent(now, &r.session);
        assert_eq!(t.heartbeat_session(now, &r.session), SessionHeartbeat::NoPendingCall);
        assert_eq!(t.heartbeat_session(now, "nope"), SessionHeartbeat::Missing);
        assert!(!t.handle_heartbeat(now, &r.session));
    }

    #[test]
    fn sweep_collects_idle_sessions_only() {
        let now = t0();
        let mut t = table(now);
        let idle = t.open_call(now, &call("ws2/a", "S.resolve", PromiseMode::None)).unwrap();
        let cb = t.store_function(Some(&idle.session), &func("r")).unwrap().method;
        t.call_sent(now, &idle.session);
        let active = t.open_call(now, &call("ws2/a", "S.resolve", PromiseMode::None)).unwrap();
        let acb = t.store_function(Some(&active.session), &func("r")).unwrap().method;
        t.call_sent(now, &active.session);
        let pending = t.open_call(now, &call("ws2/a", "services.x.f", PromiseMode::Compact)).unwrap();
        assert_eq!(t.sweep_interval(), Duration::from_secs(300));
        assert_eq!(t.sweep(secs(now, 600)), 0, "exactly ttl old is not stale yet");
        // Activity refresh through a lookup (e.g. a generator next).
        t.lookup(secs(now, 500), &inc("ws2/a", &acb)).unwrap();
        assert_eq!(t.sweep(secs(now, 601)), 1);
        assert!(!t.has_session(&idle.session));
        assert!(t.has_session(&active.session));
        assert!(t.has_session(&pending.session), "sessions with a pending call are never swept");
        assert!(err(&mut t, secs(now, 602), "ws2/a", &cb).starts_with("Session not found"));
        assert_eq!(t.sweep(secs(now, 1102)), 1);
        assert_eq!(t.session_count(), 1);
    }

    #[test]
    fn generator_entries_removed_on_exhaustion() {
        let now = t0();
        let mut t = table(now);
        let res = t.open_call(now, &call("ws2/a", "S.resolve", PromiseMode::None)).unwrap();
        let g = LocalGenerator { handler: Handler::new(5u32) };
        let (next, close) = t.store_generator(Some(&res.session), &g).unwrap();
        assert_eq!(close, format!("{next}:close"));
        t.call_sent(now, &res.session);
        assert_eq!(t.session_entry_count(&res.session), Some(2));
        let oid = match t.lookup(now, &inc("ws2/a", &next)).unwrap() {
            Target::GeneratorNext { session, object_id, generator } => {
                assert_eq!(session, res.session);
                assert_eq!(generator, g);
                object_id
            }
            other => panic!("{other:?}"),
        };
        match t.lookup(now, &inc("ws2/a", &close)).unwrap() {
            Target::GeneratorClose { object_id, .. } => assert_eq!(object_id, oid),
            other => panic!("{other:?}"),
        }
        assert!(t.remove_generator(&res.session, &oid));
        assert_eq!(t.session_entry_count(&res.session), Some(0));
        assert!(err(&mut t, now, "ws2/a", &next).starts_with("Method expired or not found"));
        assert!(!t.remove_generator(&res.session, &oid));
        assert!(t.store_generator(None, &g).is_err());
    }

    #[test]
    fn service_validation() {
        let now = t0();
        let mut t = table(now);
        let mk = |config: Map| map! { "id" => "s", "config" => config };
        let e = |t: &mut SessionTable, c: Map| t.add_service(mk(c), false).unwrap_err().to_string();
        assert!(e(&mut t, map! { "visibility" => "secret" }).starts_with("Invalid visibility"));
        assert_eq!(
            e(&mut t, map! { "visibility" => "public", "authorized_workspaces" => Vec::<Value>::new() }),
            "authorized_workspaces can only be set when visibility is 'protected', got visibility='public'"
        );
        assert_eq!(
            e(&mut t, map! { "authorized_workspaces" => "ws2" }),
            "authorized_workspaces must be a list of workspace ids"
        );
        assert_eq!(
            e(&mut t, map! { "authorized_workspaces" => vec![Value::Int(1)] }),
            "Each workspace id in authorized_workspaces must be a string, got <class 'int'>"
        );
        assert_eq!(
            e(&mut t, map! { "trusted_keys" => "k" }),
            "trusted_keys must be a list of hex-encoded public keys"
        );
        assert!(e(&mut t, map! { "trusted_keys" => vec![Value::from("abc")] })
            .starts_with("Each trusted key must be a 64-char hex string"));
        assert!(e(&mut t, map! { "trusted_keys" => vec![Value::from("zz".repeat(32))] })
            .starts_with("Each trusted key must be a 64-char hex string"));
        assert_eq!(t.add_service(map! { "name" => "x" }, false).unwrap_err(), ServiceError::MissingId);
        // Empty authorized_workspaces and trusted_keys are valid.
        let ok = mk(
            map! { "authorized_workspaces" => Vec::<Value>::new(), "trusted_keys" => Vec::<Value>::new() },
        );
        let stored = t.add_service(ok, false).unwrap();
        assert_eq!(stored.get("name"), Some(&Value::from("s")));
        assert_eq!(stored.get("type"), Some(&Value::from("generic")));
        assert_eq!(t.service("s").unwrap().config.trusted_keys(), None);
        assert_eq!(
            t.add_service(mk(Map::new()), false).unwrap_err().to_string(),
            "Service already exists: s, please specify a different id (not s) or overwrite=True"
        );
        assert!(t.add_service(mk(Map::new()), true).is_ok());
        assert_eq!(t.service_count(), 1);
    }

    /// The config is judged by `schema::ServiceConfig`, with upstream's texts; values JSON
    /// cannot carry come back as an error, not a panic; falsy values read as Python does.
    #[test]
    fn service_config_shared_with_schema() {
        let now = t0();
        let mut t = table(now);
        let mk = |config: Map| map! { "id" => "s", "config" => config };
        let mut add = |c: Map| t.add_service(mk(c), false).map(|_| ());
        assert_eq!(
            add(map! { "visibility" => "secret" }).unwrap_err().to_string(),
            "Invalid visibility: secret"
        );
        // Python asserts `visibility in [...]` on the value it got, so an explicit null fails.
        assert_eq!(
            add(map! { "visibility" => Value::Nil }).unwrap_err().to_string(),
            "Invalid visibility: None"
        );
        assert_eq!(
            add(map! { "trusted_keys" => vec![Value::from("abc")] }).unwrap_err().to_string(),
            "Each trusted key must be a 64-char hex string, got: 'abc'"
        );
        assert_eq!(
            add(map! { "trusted_keys" => vec![Value::Int(5)] }).unwrap_err().to_string(),
            "Each trusted key must be a 64-char hex string, got: 5"
        );
        for bad in [Value::Bytes(bytes::Bytes::from_static(b"k")), Value::F64(f64::NAN)] {
            let e = add(map! { "extra" => bad }).unwrap_err();
            assert!(matches!(e, ServiceError::Config(SchemaError::NotJson(_))), "{e:?}");
        }
        // A truthy value of the wrong type is refused rather than guessed at.
        assert!(matches!(
            add(map! { "require_context" => 1 }).unwrap_err(),
            ServiceError::Config(SchemaError::Shape { .. })
        ));
        // Falsy trusted_keys mean "no restriction" (Python tests them by truthiness).
        add(map! { "trusted_keys" => false }).unwrap();
        assert_eq!(t.service("s").unwrap().config.trusted_keys(), None);
        assert_eq!(
            t.add_service(mk(Map::new()), false).unwrap_err(),
            ServiceError::Config(SchemaError::ServiceExists("s".into()))
        );
        // A mixed-case trusted key matches the lowercase key the caller presents.
        let key = "AB".repeat(32);
        let (f, _) = demo_service(&mut t, map! { "trusted_keys" => vec![Value::from(key.as_str())] });
        let keys = t.annotation(&f.handler).unwrap().trusted_keys.clone().unwrap();
        assert_eq!(keys, HashSet::from_iter(["ab".repeat(32)]));
        assert!(!t.annotation(&f.handler).unwrap().run_in_executor);
    }

    #[test]
    fn private_keys_dropped_and_remove_forms() {
        let now = t0();
        let mut t = table(now);
        let f = func("f");
        let api = map! { "id" => "demo", "_secret" => 1, "__enter__" => Function::Local(f.clone()), "g" => Function::Local(func("g")) };
        let stored = t.add_service(api, false).unwrap();
        assert!(!stored.contains_key("_secret"));
        assert!(stored.contains_key("__enter__"));
        assert_eq!(t.annotation_count(), 2);
        let r = t.remove_service("ws1/me:demo@app").unwrap();
        assert_eq!(r, RemovedService { id: "demo".into(), notify_server: true });
        assert_eq!(t.annotation_count(), 0);
        assert_eq!(t.remove_service("demo").unwrap_err().to_string(), "Service not found: demo");
    }

    #[test]
    fn own_proxies_become_local_functions() {
        let now = t0();
        let mut t = table(now);
        let (add, _) = demo_service(&mut t, Map::new());
        let proxy =
            RemoteMethod { target: ME.into(), method: "services.demo.add".into(), ..Default::default() };
        let api = map! { "id" => "alias", "plus" => Function::Remote(proxy) };
        t.add_service(api, false).unwrap();
        assert_eq!(t.annotation(&add.handler).unwrap().method_id, "services.alias.plus");
        let foreign =
            RemoteMethod { target: "ws2/x".into(), method: "services.a.b".into(), ..Default::default() };
        let e = t.add_service(map! { "id" => "bad", "f" => Function::Remote(foreign) }, false).unwrap_err();
        assert_eq!(e.to_string(), "Local method not found: services.a.b");
    }

    #[test]
    fn builtin_and_get_local_service() {
        let now = t0();
        let mut t = table(now);
        let h = || Handler::new(0u8);
        let handlers = BuiltinHandlers {
            ping: h(),
            get_service: h(),
            cache_create: h(),
            cache_append: h(),
            cache_set: h(),
            cache_process: h(),
            cache_remove: h(),
        };
        let ping = handlers.ping.clone();
        t.add_builtin_service("ws1/me", handlers).unwrap();
        demo_service(&mut t, Map::new());
        assert_eq!(t.services().next().map(|(k, _)| k), Some(BUILTIN_SERVICE_ID));
        let ann = t.annotation(&ping).unwrap();
        assert_eq!(ann.method_id, "services.built-in.ping");
        assert!(ann.require_context);
        assert!(t.lookup(now, &inc("ws9/x", "services.built-in.message_cache.append")).is_ok());
        let b = t.get_local_service("built-in", "ws1/me", "ws9").unwrap();
        assert_eq!(b.get("name"), Some(&Value::from("Builtin services for ws1/me")));
        assert!(t.get_local_service("demo", "ws1/me", "ws1").is_ok());
        assert_eq!(
            t.get_local_service("demo", "ws1/me", "ws9").unwrap_err().to_string(),
            "Permission denied for getting protected service: demo, workspace mismatch: ws1 != ws9"
        );
        assert_eq!(
            t.get_local_service("nope", "ws1/me", "ws1").unwrap_err().to_string(),
            "Service not found: nope"
        );
        assert_eq!(t.get_local_service("demo", "ws1/other", "ws1").unwrap_err(), ServiceError::NotLocal);
    }

    #[test]
    fn sink_requires_session_and_forwarders() {
        let now = t0();
        let mut t = table(now);
        assert!(t.store_function(None, &func("f")).is_err());
        let c = t.open_call(now, &call("ws2/a", "services.x.f", PromiseMode::Compact)).unwrap();
        let rm =
            RemoteMethod { target: "ws3/z".into(), method: "services.z.run".into(), ..Default::default() };
        let path = t.store_forwarder(Some(&c.session), &rm).unwrap();
        assert!(path.ends_with("#run"));
        match t.lookup(now, &inc("ws2/a", &path)).unwrap() {
            Target::Forwarder { method, .. } => assert_eq!(method, rm),
            other => panic!("{other:?}"),
        }
        // Dots in names would break lookup: they are replaced.
        let m = t.store_function(Some(&c.session), &func("a.b")).unwrap().method;
        assert!(m.ends_with("#a_b"));
        assert!(t.lookup(now, &inc("ws2/a", &m)).is_ok());
        assert!(t.store_function(Some("services"), &func("x")).is_err());
        assert!(t.store_function(Some("a..b"), &func("x")).is_err());
    }

    #[test]
    fn no_leak_after_many_calls() {
        let now = t0();
        let mut t = table(now);
        let cb = func("progress");
        for i in 0..100_000u64 {
            let at = now + Duration::from_millis(i);
            let c = t.open_call(at, &call("ws2/peer", "services.demo.f", PromiseMode::Compact)).unwrap();
            t.store_function(Some(&c.session), &cb).unwrap();
            t.call_sent(at, &c.session);
            t.handle_heartbeat(at, &c.session);
            let out = t.handle_resolve(at, &c.session, Value::Int(1));
            assert_eq!(out.len(), 1);
        }
        assert_eq!(t.session_count(), 0);
        assert_eq!(t.total_session_count(), 0);
        assert_eq!(t.pending_call_count(), 0);
        assert_eq!(t.poll_timeout(), None);
        assert!(t.deadlines.is_empty());
    }
}
