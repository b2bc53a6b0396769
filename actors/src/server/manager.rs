//! The workspace manager: the RPC peer inside the server at `*/manager-{sid}` (server spec
//! §0 item 3, §4).
//!
//! Clients reach the manager API as a service: `services.built-in.get_service("default")`
//! on `*/manager-{sid}` returns the `default` service, whose functions (`register_service`,
//! `get_service`, `list_services`, `generate_token`, ...) they then call like any other
//! service. So the manager is a full hypha-rpc peer, callee *and* caller: `get_service`
//! asks the provider's own `built-in.get_service`, `ping` calls a client's `built-in.ping`.
//!
//! **Shape.** One actix actor, [`Manager`], drives a sans-IO [`Endpoint`]:
//!
//! ```text
//!  router ──frame──> LocalInbox (bounded) ──> Manager::handle ──> Endpoint::handle_frame
//!                                                                      │
//!   Event::Invoke ──> run the method (sync: reply at once; async: an actor future
//!                     that awaits the provider's answer, then replies)
//!   poll_transmit ──> Router::route as sender `*/manager-{sid}` (stamps the target's ws)
//!   poll_timeout  ──> one actor timer: heartbeats of long calls, call deadlines, sweeps
//! ```
//!
//! The router delivers frames addressed to `*/manager-{sid}` into the manager's
//! [`LocalInbox`] (overflow policy there: a full inbox drops the frame and rejects the call
//! at once, the manager is never disconnected). Everything the manager changes lives in
//! shared tables ([`Registry`](super::registry::Registry), [`Workspaces`](super::Workspaces),
//! the revocation list) so the connection layer can clean up synchronously when a client
//! leaves; events go out through [`Router::broadcast_event`](super::Router::broadcast_event).
//!
//! **Errors** travel as `"<PythonExceptionType>: <message>"` ([`ManagerError`]), because
//! clients and upstream tests match substrings of upstream's texts.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use bytes::Bytes;
use hypha_core::auth::{self, AuthError, Permission, UserInfo};
use hypha_core::endpoint::{Endpoint, EndpointConfig, Event, ReplyTo};
use hypha_core::ids::{IdError, ServiceId, ServiceQuery, MANAGER_ALIAS, WILDCARD};
use hypha_core::message::CLIENT_DISCONNECTED;
use hypha_core::package;
use hypha_core::schema::{self, FunctionSchema, Param, ParamType};
use hypha_core::session::{CallOutcome, SessionConfig, BUILTIN_SERVICE_ID, RINTF_PREFIX};
use hypha_core::value::{
    ErrorValue, Function, Handler as FnHandler, LocalFunction, Map, PromiseMode, RemoteMethod, Value,
};
use serde_json::{json, Value as Json};
use tokio::sync::oneshot;

use super::events::{check_subscription, parse_iso, EventLog, EventQuery};
use super::peer::NativePeer;
use super::registry::{Access, Pattern, ServiceRecord, MAX_CLIENT_REGISTRY_BYTES};
use super::router::{LocalInbox, RouteSender};
use super::workspace::{WorkspaceRecord, WorkspaceStatus};
use super::ServerState;

/// The id of the manager's API service.
pub const MANAGER_SERVICE_ID: &str = "default";
/// How long `get_service` waits for the provider's `built-in.get_service` (upstream: 10 s,
/// overridable with `config.timeout`).
pub const GET_SERVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `ping` and the handshake's "is the old client alive" check wait (upstream: 5 s).
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long each candidate of a `select:{criteria}:{function}` lookup has to answer its
/// `function()` (upstream's `select_timeout` default, 2 s).
pub const SELECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the manager waits for a `default` service's `setup()` (spec §4.5 step 11).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// The close reason of a client `cleanup` removed.
pub const CLIENT_DELETED_REASON: &str = "Client deleted by admin";
/// Longest wait a caller may ask of `get_service`, `ping` or `cleanup`.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Most workspaces one user may own (upstream `HYPHA_MAX_WORKSPACES_PER_USER`; root exempt).
pub const MAX_WORKSPACES_PER_USER: usize = 100;
/// Most environment variables per workspace, and most bookmarks per user.
pub const MAX_ENV_ENTRIES: usize = 1000;
/// Largest value a client may store in a workspace record in one call (an environment
/// variable, a service type, a workspace config), as msgpack bytes: workspace records live
/// in memory, so what a client puts there is bounded.
pub const MAX_STORED_VALUE_BYTES: usize = 64 * 1024;
/// Most service types per workspace.
pub const MAX_SERVICE_TYPES: usize = 256;

/// Refuses a value larger than `max` msgpack bytes.
fn check_size(v: &Value, max: usize, what: &str) -> Result<(), ManagerError> {
    let len = hypha_core::msgpack::encoded_len(v);
    if len > max {
        return Err(ManagerError::Value(format!("{what} is too large: {len} bytes (at most {max})")));
    }
    Ok(())
}
/// The system workspaces that are never deleted.
const PROTECTED_WORKSPACES: [&str; 3] = [auth::PUBLIC_WORKSPACE, auth::ANONYMOUS_WORKSPACE, "ws-user-root"];

/// A manager method failed. `Display` is what the caller's `reject` carries:
/// `"<PythonExceptionType>: <message>"` (a `KeyError` quotes its message, as Python prints
/// it), or a provider's error passed on unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManagerError {
    /// Not allowed.
    #[error("PermissionError: {0}")]
    Permission(String),
    /// Something named does not exist.
    #[error("KeyError: '{0}'")]
    Key(String),
    /// A bad argument value.
    #[error("ValueError: {0}")]
    Value(String),
    /// A violated precondition (upstream asserts).
    #[error("AssertionError: {0}")]
    Assertion(String),
    /// A state that does not allow the operation.
    #[error("RuntimeError: {0}")]
    Runtime(String),
    /// Wrong arguments for the method's signature.
    #[error("TypeError: {0}")]
    Type(String),
    /// A plain `Exception` upstream.
    #[error("Exception: {0}")]
    Other(String),
    /// An error of another class, already formatted (`"{class}: {message}"`), or an error
    /// a peer sent, passed on as it came.
    #[error("{0}")]
    Raw(String),
}

impl ManagerError {
    fn from_id(e: IdError) -> Self {
        match e {
            IdError::ForeignWorkspace { .. } => ManagerError::Permission(e.to_string()),
            IdError::InvalidQueryChars(_) => ManagerError::Value(e.to_string()),
            _ => ManagerError::Assertion(e.to_string()),
        }
    }

    fn from_auth(e: AuthError) -> Self {
        ManagerError::Raw(format!("{}: {e}", e.exception_name()))
    }

    fn denied(ws: &str) -> Self {
        ManagerError::Permission(format!("Permission denied for workspace {ws}"))
    }

    /// The error value a `reject` carries (no traceback).
    pub(crate) fn to_error_value(&self) -> ErrorValue {
        ErrorValue { message: self.to_string(), trace: Some(String::new()) }
    }
}

// ---------------------------------------------------------------------------------------
// The API: methods, their signatures and schemas
// ---------------------------------------------------------------------------------------

/// One function of the `default` service; the endpoint hands it back in
/// [`Event::Invoke`] as the function's [`Handler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Echo,
    Log,
    LogEvent,
    GetEventStats,
    GetEvents,
    RegisterService,
    UnregisterService,
    ListWorkspaces,
    ListServices,
    SearchServices,
    ListClients,
    RegisterServiceType,
    GetServiceType,
    ListServiceTypes,
    GetServiceInfo,
    GetService,
    GenerateToken,
    RevokeToken,
    ParseToken,
    CreateWorkspace,
    DeleteWorkspace,
    Bookmark,
    Unbookmark,
    GetWorkspaceInfo,
    GetSummary,
    Ping,
    Cleanup,
    CheckStatus,
    SetEnv,
    GetEnv,
    Subscribe,
    Unsubscribe,
}

/// Every method, in upstream's key order (spec §4.2).
const METHODS: [Method; 32] = [
    Method::Echo,
    Method::Log,
    Method::LogEvent,
    Method::GetEventStats,
    Method::GetEvents,
    Method::RegisterService,
    Method::UnregisterService,
    Method::ListWorkspaces,
    Method::ListServices,
    Method::SearchServices,
    Method::ListClients,
    Method::RegisterServiceType,
    Method::GetServiceType,
    Method::ListServiceTypes,
    Method::GetServiceInfo,
    Method::GetService,
    Method::GenerateToken,
    Method::RevokeToken,
    Method::ParseToken,
    Method::CreateWorkspace,
    Method::DeleteWorkspace,
    Method::Bookmark,
    Method::Unbookmark,
    Method::GetWorkspaceInfo,
    Method::GetSummary,
    Method::Ping,
    Method::Cleanup,
    Method::CheckStatus,
    Method::SetEnv,
    Method::GetEnv,
    Method::Subscribe,
    Method::Unsubscribe,
];

pub(crate) fn opt(t: ParamType) -> ParamType {
    ParamType::Optional(Box::new(t))
}

/// Adds each native function to a service map as a local function whose handler is the
/// function's tag (the driver dispatches on it) and whose `_rschema` is built from its
/// signature, named after its key, as every stock client expects.
pub(crate) fn describe_functions<F: Copy + Send + Sync + 'static>(
    api: &mut Map,
    functions: &[F],
    signature: fn(F) -> (&'static str, &'static str, Vec<Param>),
) {
    for &f in functions {
        let (name, doc, params) = signature(f);
        let schema =
            params.into_iter().fold(FunctionSchema::builder(name).description(doc), |b, p| b.param(p));
        let function = LocalFunction {
            handler: FnHandler::new(f),
            name: Some(name.to_owned()),
            doc: Some(doc.to_owned()),
            schema: Some(std::sync::Arc::new(schema.build().to_value())),
        };
        api.insert(name.into(), Value::from(hypha_core::value::Function::Local(function)));
    }
}

pub(crate) fn p(name: &str, ty: ParamType, description: &str) -> Param {
    Param::new(name, ty).description(description)
}

pub(crate) fn p_default(name: &str, ty: ParamType, default: Json, description: &str) -> Param {
    Param::new(name, ty).default(default).description(description)
}

/// A method's name, doc and parameters (in call order).
fn signature(m: Method) -> (&'static str, &'static str, Vec<Param>) {
    use ParamType::{Any, Boolean, Integer, Number, Object, String as Str};
    let date = || opt(ParamType::Raw(json!({"format": "date-time", "type": "string"})));
    let event_filters = || {
        vec![
            p_default("event_type", opt(Str), Json::Null, "Event type"),
            p_default("start_time", date(), Json::Null, "Start time for filtering events"),
            p_default("end_time", date(), Json::Null, "End time for filtering events"),
        ]
    };
    let event_types = || {
        ParamType::Raw(json!({"anyOf": [{"type": "string"}, {"items": {"type": "string"}, "type": "array"}]}))
    };
    let lookup_config = "Options: mode ('random', 'first', 'last', 'exact', 'min_load', 'native:random' or 'select:criteria:function'), timeout (seconds), case_conversion ('camel' or 'snake')";
    match m {
        Method::Echo => ("echo", "Log a app message.", vec![Param::new("data", Any).description("echo an object")]),
        Method::Log => ("log", "Log a app message.", vec![p("msg", Str, "log a message")]),
        Method::LogEvent => (
            "log_event",
            "Log a new event, checking permissions.",
            vec![
                p("event_type", Str, "Event type"),
                p_default("data", opt(Object(None)), Json::Null, "Additional event data"),
            ],
        ),
        Method::GetEventStats => (
            "get_event_stats",
            "Get statistics for specific event types, filtered by workspace, user, and time range.",
            event_filters(),
        ),
        Method::GetEvents => (
            "get_events",
            "Search for events with various filters, enforcing workspace and permission checks.",
            event_filters(),
        ),
        Method::RegisterService => (
            "register_service",
            "Register a new service.",
            vec![
                p("service", Object(None), "Service info"),
                p_default("config", opt(Object(None)), Json::Null, "Options for registering service"),
            ],
        ),
        Method::UnregisterService => {
            ("unregister_service", "Unregister a new service.", vec![p("service_id", Str, "Service id")])
        }
        Method::ListWorkspaces => (
            "list_workspaces",
            "Get all workspaces with pagination.",
            vec![
                p_default("match", Object(None), Json::Null, "Match pattern for filtering workspaces"),
                p_default("offset", Integer, json!(0), "Offset for pagination"),
                p_default("limit", Integer, json!(256), "Maximum number of workspaces to return"),
            ],
        ),
        Method::ListServices => (
            "list_services",
            "Return a list of services based on the query.",
            vec![
                p_default(
                    "query",
                    opt(ParamType::Raw(json!({"anyOf": [{"additionalProperties": true, "type": "object"}, {"type": "string"}]}))),
                    Json::Null,
                    "Query for filtering services: a workspace, 'ws/client:service', or a dict with the keys visibility, workspace, client_id, service_id, type, app_id",
                ),
                p_default("include_unlisted", Boolean, json!(false), "Include unlisted services (own workspace only)"),
                p_default("include_app_services", Boolean, json!(false), "Include services of installed apps"),
                p_default(
                    "prioritize_running_services",
                    Boolean,
                    json!(false),
                    "List running services before app services",
                ),
            ],
        ),
        Method::SearchServices => (
            "search_services",
            "Search services with vector similarity (not enabled on this server).",
            vec![
                p_default("query", Any, Json::Null, "Text or embedding query"),
                p_default("filters", opt(Object(None)), Json::Null, "Filters"),
                p_default("limit", Integer, json!(5), "Maximum number of results"),
                p_default("offset", Integer, json!(0), "Offset for pagination"),
                p_default("return_fields", Any, Json::Null, "Fields to return"),
                p_default("order_by", Any, Json::Null, "Ordering"),
                p_default("pagination", Boolean, json!(false), "Return a pagination envelope"),
                p_default("include_unlisted", Boolean, json!(false), "Include unlisted services"),
            ],
        ),
        Method::ListClients => (
            "list_clients",
            "List the clients connected to a workspace.",
            vec![p_default("workspace", opt(Str), Json::Null, "Workspace id (default: the current one)")],
        ),
        Method::RegisterServiceType => (
            "register_service_type",
            "Register a new service type.",
            vec![p("type_info", Object(None), "Service type info: id, name, definition, description, config, docs")],
        ),
        Method::GetServiceType => {
            ("get_service_type", "Get a service type by id.", vec![p("type_id", Str, "Service type id")])
        }
        Method::ListServiceTypes => (
            "list_service_types",
            "List the service types of a workspace.",
            vec![p_default("workspace", opt(Str), Json::Null, "Workspace id (default: the current one)")],
        ),
        Method::GetServiceInfo => (
            "get_service_info",
            "Get the service info of a service.",
            vec![
                p("service_id", Str, "Service id"),
                p_default("config", opt(Object(None)), Json::Null, lookup_config),
            ],
        ),
        Method::GetService => (
            "get_service",
            "Get a service by id.",
            vec![
                p("service_id", Str, "Service id"),
                p_default("config", opt(Object(None)), Json::Null, lookup_config),
            ],
        ),
        Method::GenerateToken => (
            "generate_token",
            "Generate a token for a workspace.",
            vec![p_default(
                "config",
                opt(Object(None)),
                Json::Null,
                "Token config: expires_in, workspace, permission ('read', 'read_write', 'admin'), extra_scopes, client_id",
            )],
        ),
        Method::RevokeToken => ("revoke_token", "Revoke a token.", vec![p("token", Str, "The token to revoke")]),
        Method::ParseToken => ("parse_token", "Parse a token.", vec![p("token", Str, "The token to parse")]),
        Method::CreateWorkspace => (
            "create_workspace",
            "Create a new workspace.",
            vec![
                p("config", Object(None), "Workspace info: name (or id), description, owners, persistent, ..."),
                p_default("overwrite", Boolean, json!(false), "Replace an existing workspace"),
            ],
        ),
        Method::DeleteWorkspace => {
            ("delete_workspace", "Delete a workspace.", vec![p("workspace", Str, "Workspace id")])
        }
        Method::Bookmark => (
            "bookmark",
            "Bookmark a workspace or a service.",
            vec![p("item", Object(None), "{bookmark_type: 'workspace' | 'service', id}")],
        ),
        Method::Unbookmark => (
            "unbookmark",
            "Remove a bookmark.",
            vec![p("item", Object(None), "{bookmark_type: 'workspace' | 'service', id}")],
        ),
        Method::GetWorkspaceInfo => (
            "get_workspace_info",
            "Get the info of a workspace.",
            vec![p_default("workspace", opt(Str), Json::Null, "Workspace id (default: the current one)")],
        ),
        Method::GetSummary => ("get_summary", "Get a summary of the current workspace.", Vec::new()),
        Method::Ping => (
            "ping",
            "Ping a client.",
            vec![
                p("client_id", Str, "Client id (bare, or ws/client_id)"),
                p_default("timeout", Number, json!(5), "Timeout in seconds"),
            ],
        ),
        Method::Cleanup => (
            "cleanup",
            "Remove the clients of a workspace that do not answer a ping.",
            vec![
                p_default("workspace", opt(Str), Json::Null, "Workspace id (default: the current one)"),
                p_default("timeout", Number, json!(5), "Ping timeout in seconds"),
            ],
        ),
        Method::CheckStatus => ("check_status", "Check the status of the current workspace.", Vec::new()),
        Method::SetEnv => (
            "set_env",
            "Set an environment variable of the workspace.",
            vec![p("key", Str, "Variable name"), Param::new("value", Any).description("Value (None deletes)")],
        ),
        Method::GetEnv => (
            "get_env",
            "Get an environment variable of the workspace, or all of them.",
            vec![p_default("key", opt(Str), Json::Null, "Variable name")],
        ),
        Method::Subscribe => (
            "subscribe",
            "Subscribe to event types.",
            vec![p("event_type", event_types(), "An event type or a list of them")],
        ),
        Method::Unsubscribe => (
            "unsubscribe",
            "Unsubscribe from event types.",
            vec![p("event_type", event_types(), "An event type or a list of them")],
        ),
    }
}

fn json_value(j: &Json) -> Value {
    match j {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => n.as_i64().map_or_else(|| Value::F64(n.as_f64().unwrap_or(0.0)), Value::Int),
        Json::String(s) => Value::from(s.as_str()),
        other => Value::from(other.to_string()),
    }
}

/// Maps positional and keyword arguments onto the parameters, with Python's `TypeError`
/// texts. A `context` keyword is ignored (the server passes the real one).
pub(crate) fn bind(
    name: &str,
    params: &[Param],
    args: Vec<Value>,
    kwargs: Option<Map>,
) -> Result<Vec<Value>, ManagerError> {
    if args.len() > params.len() {
        return Err(ManagerError::Type(format!(
            "{name}() takes {} positional arguments but {} were given",
            params.len(),
            args.len()
        )));
    }
    let mut slots: Vec<Option<Value>> = args.into_iter().map(Some).collect();
    slots.resize(params.len(), None);
    for (k, v) in kwargs.unwrap_or_default() {
        if k == "context" {
            continue;
        }
        let Some(i) = params.iter().position(|p| p.name == k) else {
            return Err(ManagerError::Type(format!("{name}() got an unexpected keyword argument '{k}'")));
        };
        if slots[i].is_some() {
            return Err(ManagerError::Type(format!("{name}() got multiple values for argument '{k}'")));
        }
        slots[i] = Some(v);
    }
    slots
        .into_iter()
        .zip(params)
        .map(|(slot, param)| match (slot, &param.default) {
            (Some(v), _) => Ok(v),
            (None, Some(d)) => Ok(json_value(d)),
            (None, None) => Err(ManagerError::Type(format!(
                "{name}() missing 1 required positional argument: '{}'",
                param.name
            ))),
        })
        .collect()
}

/// Who called: read from the server-stamped context, never from arguments.
#[derive(Debug, Clone)]
struct Caller {
    /// `context.ws`: the caller's workspace.
    ws: String,
    /// `context.from`: `{ws}/{cid}`.
    from: String,
    /// The client id part of `from`.
    client_id: String,
    /// `context.user`.
    user: UserInfo,
}

impl Caller {
    fn from_context(context: Option<&Map>) -> Result<Caller, ManagerError> {
        let missing = || ManagerError::Permission("the call carries no server-stamped context".into());
        let cx = context.ok_or_else(missing)?;
        let text = |k: &str| cx.get(k).and_then(Value::as_str).map(str::to_owned).ok_or_else(missing);
        let ws = text("ws")?;
        let from = text("from")?;
        let client_id = from.split_once('/').map_or(from.as_str(), |(_, c)| c).to_owned();
        let user = cx
            .get("user")
            .and_then(|u| hypha_core::serde_value::from_value_ref::<UserInfo>(u).ok())
            .ok_or_else(missing)?;
        Ok(Caller { ws, from, client_id, user })
    }
}

/// Positional access to bound arguments, with typed errors.
pub(crate) struct Args {
    pub(crate) name: &'static str,
    pub(crate) values: Vec<Value>,
}

impl Args {
    pub(crate) fn take(&mut self, i: usize) -> Value {
        self.values.get_mut(i).map(std::mem::take).unwrap_or(Value::Nil)
    }

    pub(crate) fn string(&mut self, i: usize, what: &str) -> Result<String, ManagerError> {
        match self.take(i) {
            Value::Str(s) => Ok(s),
            other => Err(ManagerError::Type(format!(
                "{}(): {what} must be a string, got {}",
                self.name,
                other.kind()
            ))),
        }
    }

    pub(crate) fn opt_string(&mut self, i: usize, what: &str) -> Result<Option<String>, ManagerError> {
        match self.take(i) {
            Value::Nil => Ok(None),
            Value::Str(s) => Ok(Some(s)),
            other => Err(ManagerError::Type(format!(
                "{}(): {what} must be a string or None, got {}",
                self.name,
                other.kind()
            ))),
        }
    }

    pub(crate) fn map(&mut self, i: usize, what: &str) -> Result<Map, ManagerError> {
        match self.take(i) {
            Value::Map(m) => Ok(m),
            Value::Nil => Ok(Map::new()),
            other => Err(ManagerError::Type(format!(
                "{}(): {what} must be a dict, got {}",
                self.name,
                other.kind()
            ))),
        }
    }

    pub(crate) fn bool(&mut self, i: usize) -> bool {
        match self.take(i) {
            Value::Bool(b) => b,
            Value::Nil => false,
            v => v.as_i64().is_some_and(|n| n != 0),
        }
    }

    pub(crate) fn seconds(&mut self, i: usize, default: Duration) -> Duration {
        let secs = self.take(i).as_f64().unwrap_or(default.as_secs_f64());
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(default).min(MAX_CALL_TIMEOUT)
    }
}

pub(crate) fn unix_now() -> f64 {
    auth::unix_seconds(SystemTime::now())
}

fn map_get<'a>(m: &'a Map, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !matches!(v, Value::Nil))
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_list()?.iter().map(|x| x.as_str().map(str::to_owned)).collect()
}

/// `HelloWorld` / `hello-world` -> `hello_world`.
fn to_snake(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut prev_lower = false;
    for ch in key.chars() {
        if ch.is_uppercase() {
            if prev_lower {
                out.push('_');
            }
            out.extend(ch.to_lowercase());
            prev_lower = false;
        } else if ch == '-' {
            out.push('_');
            prev_lower = false;
        } else {
            out.push(ch);
            prev_lower = ch.is_lowercase() || ch.is_ascii_digit();
        }
    }
    out
}

/// `hello_world` / `HelloWorld` -> `helloWorld`.
fn to_camel(key: &str) -> String {
    let snake = to_snake(key);
    let mut out = String::with_capacity(snake.len());
    for (i, part) in snake.split('_').filter(|s| !s.is_empty()).enumerate() {
        if i == 0 {
            out.push_str(part);
        } else {
            let mut cs = part.chars();
            if let Some(first) = cs.next() {
                out.extend(first.to_uppercase());
                out.push_str(cs.as_str());
            }
        }
    }
    out
}

/// Applies `case_conversion` to the member keys of a service (not to `config`).
fn convert_case(v: Value, conv: fn(&str) -> String) -> Value {
    match v {
        Value::Map(m) => Value::Map(
            m.into_iter()
                .map(|(k, v)| if k == "config" { (k, v) } else { (conv(&k), convert_case(v, conv)) })
                .collect(),
        ),
        other => other,
    }
}

fn random_index(len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    (RandomState::new().hash_one(seed) % len as u64) as usize
}

/// How `select:{criteria}:{function}` compares the candidates' answers (spec §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Criteria {
    /// The smallest number.
    Min,
    /// The largest number.
    Max,
    /// The first candidate (in registry order) whose call succeeded.
    FirstSuccess,
}

/// What `mode` made of the matching records.
#[derive(Debug)]
enum Choice {
    /// One record, chosen without asking anyone.
    Pick(Box<ServiceRecord>),
    /// Call `function()` on every candidate and pick by `criteria`.
    ByFunction { candidates: Vec<ServiceRecord>, criteria: Criteria, function: String },
}

/// Picks one of the matching records (`found`, non-empty, in registry order) by `mode`
/// (spec §5.3); `load` gives a record's provider load for `min_load`.
fn select(
    mode: &str,
    mut found: Vec<ServiceRecord>,
    pattern: &str,
    load: impl Fn(&ServiceRecord) -> f64,
) -> Result<Choice, ManagerError> {
    if found.is_empty() {
        return Err(ManagerError::Key(format!("Service not found: {pattern}")));
    }
    let pick = match mode {
        "exact" => {
            if found.len() > 1 {
                let ids: Vec<String> = found.iter().take(5).map(|r| format!("'{}'", r.full_id())).collect();
                return Err(ManagerError::Assertion(format!(
                    "Multiple services found for {pattern}, e.g. [{}]. You can either specify the mode as 'random', 'first', 'last', 'native:random', or use 'select:criteria:function' format.",
                    ids.join(", ")
                )));
            }
            0
        }
        "first" => 0,
        "last" => found.len() - 1,
        // Every provider of this server is connected to it ("native"), so native:random
        // is random among all, as upstream does on a single replica.
        "random" | "native:random" => random_index(found.len()),
        // The first of the least loaded (only `__rlb` clients have a load; the rest is 0).
        "min_load" => {
            let loads: Vec<f64> = found.iter().map(&load).collect();
            let mut best = 0;
            for (i, l) in loads.iter().enumerate() {
                if *l < loads[best] {
                    best = i;
                }
            }
            best
        }
        other if other.starts_with("select:") => {
            let parts: Vec<&str> = other.split(':').collect();
            let [_, criteria, function] = parts[..] else {
                return Err(ManagerError::Value(format!(
                    "Invalid select mode format: {other}. Expected 'select:criteria:function'"
                )));
            };
            if found.len() == 1 {
                0
            } else {
                let criteria = match criteria {
                    "min" => Criteria::Min,
                    "max" => Criteria::Max,
                    "first_success" => Criteria::FirstSuccess,
                    bad => return Err(ManagerError::Value(format!("Unknown selection criteria: {bad}"))),
                };
                return Ok(Choice::ByFunction { candidates: found, criteria, function: function.to_owned() });
            }
        }
        other => {
            return Err(ManagerError::Value(format!(
                "Invalid mode: {other}. Mode must be 'random', 'first', 'last', 'exact', 'min_load', 'native:random', or 'select:criteria:function' format (e.g., 'select:min:get_load')"
            )))
        }
    };
    Ok(Choice::Pick(Box::new(found.swap_remove(pick))))
}

/// Picks among `candidates` by the answers of their `function()` (`None`: the call failed
/// or gave no number, for `min`/`max`). No usable answer: a random candidate (upstream's
/// fallback). Ties go to the earlier candidate.
fn pick_by_answers(criteria: Criteria, answers: &[Option<Value>]) -> usize {
    let numbers: Vec<Option<f64>> = answers.iter().map(|a| a.as_ref().and_then(number)).collect();
    let best = match criteria {
        Criteria::FirstSuccess => answers.iter().position(Option::is_some),
        Criteria::Min | Criteria::Max => {
            let mut best: Option<(usize, f64)> = None;
            for (i, n) in numbers.iter().enumerate() {
                let Some(n) = *n else { continue };
                let better = match best {
                    None => true,
                    Some((_, b)) if criteria == Criteria::Min => n < b,
                    Some((_, b)) => n > b,
                };
                if better {
                    best = Some((i, n));
                }
            }
            best.map(|(i, _)| i)
        }
    };
    best.unwrap_or_else(|| random_index(answers.len()))
}

/// A number as Python's `float()` reads it (numbers, booleans, numeric strings).
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::Str(s) => s.trim().parse().ok(),
        other => other.as_f64(),
    }
}

/// What a service id resolved to, before the visibility check.
enum Resolution {
    /// The manager itself (`~`).
    Manager,
    /// One record.
    Record(Box<ServiceRecord>),
    /// A `select:` mode: the candidates must be asked first.
    Select { candidates: Vec<ServiceRecord>, criteria: Criteria, function: String },
}

/// What a service id named.
enum Lookup {
    /// The manager itself (`~`).
    Manager,
    /// A registered service, and how the caller may use it.
    Record(Box<ServiceRecord>, Access),
}

/// The options of `get_service` / `get_service_info`.
struct LookupConfig {
    mode: Option<String>,
    timeout: Duration,
    case: Option<fn(&str) -> String>,
    /// How long each candidate of a `select:` mode has to answer (upstream: 2 s).
    select_timeout: Duration,
}

impl Default for LookupConfig {
    fn default() -> Self {
        LookupConfig { mode: None, timeout: GET_SERVICE_TIMEOUT, case: None, select_timeout: SELECT_TIMEOUT }
    }
}

impl LookupConfig {
    fn parse(config: &Value) -> Result<Self, ManagerError> {
        let empty = Map::new();
        let m = match config {
            Value::Map(m) => m,
            Value::Nil => &empty,
            other => return Err(ManagerError::Type(format!("config must be a dict, got {}", other.kind()))),
        };
        let mode = match map_get(m, "mode") {
            None => None,
            Some(Value::Str(s)) => Some(s.clone()),
            Some(other) => return Err(ManagerError::Value(format!("Invalid mode: {}", other.kind()))),
        };
        let timeout = map_get(m, "timeout")
            .and_then(Value::as_f64)
            .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok())
            .unwrap_or(GET_SERVICE_TIMEOUT)
            .min(MAX_CALL_TIMEOUT);
        let select_timeout = map_get(m, "select_timeout")
            .and_then(Value::as_f64)
            .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok())
            .unwrap_or(SELECT_TIMEOUT)
            .min(MAX_CALL_TIMEOUT);
        let case: Option<fn(&str) -> String> = match map_get(m, "case_conversion").and_then(Value::as_str) {
            None => None,
            Some("camel") => Some(to_camel),
            Some("snake") => Some(to_snake),
            Some(other) => {
                return Err(ManagerError::Value(format!(
                    "Invalid case conversion: {other}, it must be 'camel' or 'snake'"
                )))
            }
        };
        Ok(LookupConfig { mode, timeout, case, select_timeout })
    }
}

// ---------------------------------------------------------------------------------------
// The actor
// ---------------------------------------------------------------------------------------

/// Asks the manager whether client `{workspace}/{client_id}` answers `built-in.ping`
/// within [`PING_TIMEOUT`] (the handshake's duplicate-client-id rule, spec §2.1 step 7).
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct PingClient {
    /// The client's workspace.
    pub workspace: String,
    /// The client id.
    pub client_id: String,
}

/// The workspace manager actor (see the module docs).
pub struct Manager {
    state: Arc<ServerState>,
    endpoint: Endpoint,
    /// What the router stamps into our frames.
    sender: RouteSender,
    /// Our calls in flight, by session: who waits for the outcome.
    waiting: HashMap<String, oneshot::Sender<CallOutcome>>,
    /// The armed timer and its deadline.
    timer: Option<(Instant, SpawnHandle)>,
    /// Taken by `started`.
    inbox: Option<tokio::sync::mpsc::Receiver<Bytes>>,
    /// `log`/`log_event` records.
    events: EventLog,
    /// The manager's own info record (`get_service_info("~")`).
    info: Map,
}

impl Manager {
    /// Registers the manager at `*/manager-{sid}` in the router and starts it in the
    /// current actix arbiter.
    pub fn start(state: Arc<ServerState>) -> Addr<Manager> {
        let manager = Manager::new(state);
        Actor::start(manager)
    }

    /// [`Manager::start`] in a given arbiter.
    pub fn start_in(state: Arc<ServerState>, arbiter: &ArbiterHandle) -> Addr<Manager> {
        let manager = Manager::new(state);
        Actor::start_in_arbiter(arbiter, move |_| manager)
    }

    fn new(state: Arc<ServerState>) -> Manager {
        let manager_id = state.config.manager_id();
        let (inbox, rx) = LocalInbox::channel(state.config.manager_inbox_frames);
        state.router.register_local(WILDCARD, &manager_id, inbox);
        let config = EndpointConfig {
            session: SessionConfig { method_timeout: Duration::from_secs(30), ..SessionConfig::default() },
            server_url: Some(state.public_base_url()),
            ..EndpointConfig::default()
        };
        let mut endpoint = Endpoint::new(config, Some(WILDCARD), &manager_id, Instant::now());
        let api = Self::api(&state);
        let info = Self::info_record(&api);
        if let Err(e) = endpoint.register_service(api, true) {
            // Our own service map; a failure is a bug, logged rather than a panic.
            tracing::error!(error = %e, "cannot register the manager service");
        }
        let sender = RouteSender::new(WILDCARD, manager_id, &auth::internal_root_user().to_value(), false);
        Manager {
            state,
            endpoint,
            sender,
            waiting: HashMap::new(),
            timer: None,
            inbox: Some(rx),
            events: EventLog::new(),
            info,
        }
    }

    /// The `default` service map (spec §4.2): `id`, `name`, `description`, `config`, the
    /// methods in upstream's order; `type` is appended by the endpoint.
    fn api(state: &ServerState) -> Map {
        let public = state.public_base_url();
        let jwt = &state.config.jwt;
        let mut config = Map::new();
        config.insert("require_context".into(), Value::Bool(true));
        config.insert("visibility".into(), Value::from("public"));
        config.insert("server_id".into(), Value::from(state.config.server_id.as_str()));
        config.insert("hypha_version".into(), Value::from(state.config.hypha_version.as_str()));
        config.insert("public_base_url".into(), Value::from(public.as_str()));
        config.insert("local_base_url".into(), Value::from(state.local_base_url()));
        config.insert("auth0_client_id".into(), Value::Nil);
        config.insert("auth0_domain".into(), Value::Nil);
        config.insert("auth0_audience".into(), Value::from(jwt.audience.as_str()));
        config.insert("auth0_issuer".into(), Value::from(jwt.issuer.as_str()));
        config
            .insert("login_service_url".into(), Value::from(format!("{public}/public/services/hypha-login")));
        let mut api = Map::new();
        api.insert("id".into(), Value::from(MANAGER_SERVICE_ID));
        api.insert("name".into(), Value::from("Default workspace management service"));
        api.insert("description".into(), Value::from("Services for managing workspace."));
        api.insert("config".into(), Value::Map(config));
        describe_functions(&mut api, &METHODS, signature);
        api
    }

    /// The manager's service info (`get_service_info("~")`, spec §4.2).
    fn info_record(api: &Map) -> Map {
        let mut config = Map::new();
        config.insert("visibility".into(), Value::from("public"));
        config.insert("require_context".into(), Value::Bool(true));
        config.insert("workspace".into(), Value::from(WILDCARD));
        config.insert("flags".into(), Value::List(Vec::new()));
        config.insert("singleton".into(), Value::Bool(false));
        config.insert("created_by".into(), Value::Nil);
        config.insert("service_embedding".into(), Value::Nil);
        config.insert("authorized_workspaces".into(), Value::Nil);
        if let Some(Value::Map(c)) = api.get("config") {
            for (k, v) in c {
                if !config.contains_key(k) {
                    config.insert(k.clone(), v.clone());
                }
            }
        }
        let mut info = Map::new();
        info.insert("config".into(), Value::Map(config));
        info.insert("id".into(), Value::from(MANAGER_ALIAS));
        info.insert("name".into(), api.get("name").cloned().unwrap_or(Value::Nil));
        info.insert("type".into(), Value::from("generic"));
        info.insert("description".into(), api.get("description").cloned().unwrap_or(Value::Nil));
        info.insert("docs".into(), Value::Nil);
        info.insert("app_id".into(), Value::from(WILDCARD));
        info.insert("service_schema".into(), schema::service_schema_value(&Value::Map(api.clone()), true));
        info
    }

    // --- driving the endpoint (the loop is `NativePeer::drive`) ---------------------------

    /// What the manager does with one endpoint event.
    fn handle_event(&mut self, ctx: &mut Context<Self>, event: Event) {
        match event {
            Event::Invoke { handler, args, kwargs, context, reply } => {
                self.invoke(ctx, &handler, args, kwargs, context.as_ref(), reply);
            }
            Event::Settled(settled) => {
                if let Some(tx) = self.waiting.remove(&settled.session) {
                    let _ = tx.send(settled.outcome);
                }
            }
            Event::GeneratorNext { reply, .. } => {
                let e = ErrorValue::new("Exception: the manager has no generators");
                self.endpoint.reply(Instant::now(), reply, Err(e));
            }
            Event::Error(e) => tracing::debug!(error = %e, "manager endpoint"),
            other => tracing::trace!(?other, "manager event ignored"),
        }
    }

    fn reply(&mut self, reply: ReplyTo, result: Result<Value, ManagerError>) {
        if let Err(e) = &result {
            tracing::debug!(method = reply.method(), caller = reply.caller(), error = %e, "manager call failed");
        }
        self.endpoint.reply(Instant::now(), reply, result.map_err(|e| e.to_error_value()));
    }

    /// Calls `method` on peer `target` with a promise; the receiver gets the outcome
    /// (the caller must [`Manager::drive`] afterwards to send the call).
    fn call_peer(
        &mut self,
        target: &str,
        method: &str,
        args: Vec<Value>,
        promise: PromiseMode,
    ) -> Result<oneshot::Receiver<CallOutcome>, ManagerError> {
        let rm = RemoteMethod {
            target: target.to_owned(),
            method: method.to_owned(),
            promise,
            ..Default::default()
        };
        self.call_remote(&rm, args)
    }

    /// Calls a method descriptor a peer gave us (same contract as [`Manager::call_peer`]).
    fn call_remote(
        &mut self,
        rm: &RemoteMethod,
        args: Vec<Value>,
    ) -> Result<oneshot::Receiver<CallOutcome>, ManagerError> {
        let session = self
            .endpoint
            .call(Instant::now(), rm, args, None)
            .map_err(|e| ManagerError::Runtime(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(session, tx);
        Ok(rx)
    }

    /// `built-in.ping("ping")` on `{ws}/{cid}`: resolves to `Ok("pong")` or the reason.
    fn ping_client(
        &mut self,
        ws: &str,
        cid: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), String>> {
        let rx = if self.state.router.is_connected(ws, cid) {
            self.call_peer(
                &format!("{ws}/{cid}"),
                "services.built-in.ping",
                vec![Value::from("ping")],
                PromiseMode::Compact,
            )
            .map_err(|e| e.to_string())
        } else {
            Err(String::new())
        };
        async move {
            let rx = rx?;
            match outcome(rx, timeout).await? {
                Value::Str(s) if s == "pong" => Ok(()),
                other => Err(format!("unexpected answer {}", other.kind())),
            }
        }
    }

    // --- dispatch ------------------------------------------------------------------------

    fn invoke(
        &mut self,
        ctx: &mut Context<Self>,
        handler: &FnHandler,
        args: Vec<Value>,
        kwargs: Option<Map>,
        context: Option<&Map>,
        reply: ReplyTo,
    ) {
        let Some(&method) = handler.downcast_ref::<Method>() else {
            let e = ManagerError::Other(format!("Method not found: {}", reply.method()));
            return self.reply(reply, Err(e));
        };
        let (name, _, params) = signature(method);
        let prepared =
            Caller::from_context(context).and_then(|caller| Ok((caller, bind(name, &params, args, kwargs)?)));
        let (caller, values) = match prepared {
            Ok(p) => p,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let mut a = Args { name, values };
        match method {
            Method::GetService => self.get_service(ctx, &caller, &mut a, reply),
            Method::GetServiceInfo => self.get_service_info(ctx, &caller, &mut a, reply),
            Method::RegisterService => {
                let result = self.register_service(&caller, &mut a);
                let setup = match &result {
                    Ok(Some(r)) if r.service == MANAGER_SERVICE_ID => Some(r.clone()),
                    _ => None,
                };
                self.reply(reply, result.map(|_| Value::Nil));
                if let Some(record) = setup {
                    self.run_setup(ctx, record);
                }
            }
            Method::Ping => self.ping(ctx, &caller, &mut a, reply),
            Method::Cleanup => self.cleanup(ctx, &caller, &mut a, reply),
            _ => {
                let result = self.call_sync(method, &caller, &mut a);
                self.reply(reply, result);
            }
        }
    }

    fn call_sync(&mut self, m: Method, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        match m {
            Method::Echo => {
                self.require(c, &c.ws, Permission::ReadWrite)?;
                Ok(a.take(0))
            }
            Method::Log => {
                self.require(c, &c.ws, Permission::ReadWrite)?;
                let msg = a.take(0);
                self.log_event(c, "log", msg)
            }
            Method::LogEvent => {
                self.require(c, &c.ws, Permission::ReadWrite)?;
                let t = a.string(0, "event_type")?;
                let data = a.take(1);
                self.log_event(c, &t, data)
            }
            Method::GetEvents | Method::GetEventStats => {
                self.require(c, &c.ws, Permission::Read)?;
                let t = a.opt_string(0, "event_type")?;
                let time = |v: Option<String>| -> Result<Option<f64>, ManagerError> {
                    v.map(|s| {
                        parse_iso(&s)
                            .ok_or_else(|| ManagerError::Value(format!("Invalid isoformat string: '{s}'")))
                    })
                    .transpose()
                };
                let start = time(a.opt_string(1, "start_time")?)?;
                let end = time(a.opt_string(2, "end_time")?)?;
                let q = EventQuery {
                    workspace: &c.ws,
                    user_id: &c.user.id,
                    event_type: t.as_deref(),
                    start,
                    end,
                };
                Ok(Value::List(if m == Method::GetEvents {
                    self.events.events(&q)
                } else {
                    self.events.stats(&q)
                }))
            }
            Method::UnregisterService => self.unregister_service(c, a),
            Method::ListWorkspaces => self.list_workspaces(c, a),
            Method::ListServices => self.list_services(c, a),
            Method::SearchServices => Err(ManagerError::Runtime("Service search is not enabled.".into())),
            Method::ListClients => self.list_clients(c, a),
            Method::RegisterServiceType => self.register_service_type(c, a),
            Method::GetServiceType => self.get_service_type(c, a),
            Method::ListServiceTypes => self.list_service_types(c, a),
            Method::GenerateToken => {
                let config = a.take(0);
                // Owners mint tokens for their workspaces, also through a child token of
                // their own personal workspace (spec §6.4) - but only a read_write one: a
                // read-only child minting read_write tokens would be an escalation
                // (upstream allows it, see README "Compatibility notes").
                let is_owner = |u: &UserInfo, ws: &str| {
                    let owners = self.state.workspaces.get(ws).map(|r| r.owners).unwrap_or_default();
                    let listed = owners.iter().any(|o| *o == u.id || u.email.as_deref() == Some(o.as_str()));
                    let parents = u.parent.as_deref().is_some_and(|p| ws == auth::personal_workspace(p));
                    listed || ws == u.personal_workspace() || (parents && u.check(ws, Permission::ReadWrite))
                };
                auth::generate_child_token(
                    &c.user,
                    &c.ws,
                    &config,
                    &is_owner,
                    &self.state.config.jwt,
                    unix_now(),
                )
                .map(Value::from)
                .map_err(ManagerError::from_auth)
            }
            Method::RevokeToken => self.revoke_token(c, a),
            Method::ParseToken => self.parse_token(c, a),
            Method::CreateWorkspace => self.create_workspace(c, a),
            Method::DeleteWorkspace => self.delete_workspace(c, a),
            Method::Bookmark => self.bookmark(c, a, true),
            Method::Unbookmark => self.bookmark(c, a, false),
            Method::GetWorkspaceInfo => {
                self.require(c, &c.ws, Permission::Read)?;
                let ws = a.opt_string(0, "workspace")?.unwrap_or_else(|| c.ws.clone());
                Ok(self.workspace(&ws)?.to_value())
            }
            Method::GetSummary => self.get_summary(c),
            Method::CheckStatus => {
                self.require(c, &c.ws, Permission::Read)?;
                let perm = self.permission(&c.user, &c.ws);
                let mut m = Map::new();
                if self.state.workspaces.contains(&c.ws) {
                    m.insert("status".into(), Value::from("ready"));
                    m.insert("errors".into(), Value::Nil);
                } else {
                    m.insert("status".into(), Value::from("not_found"));
                    m.insert("error".into(), Value::from(format!("Workspace {} not found", c.ws)));
                }
                m.insert("user_permission".into(), Value::from(perm.map(Permission::as_str)));
                Ok(Value::Map(m))
            }
            Method::SetEnv => self.set_env(c, a),
            Method::GetEnv => self.get_env(c, a),
            Method::Subscribe | Method::Unsubscribe => self.subscribe(c, a, m == Method::Subscribe),
            Method::GetService
            | Method::GetServiceInfo
            | Method::RegisterService
            | Method::Ping
            | Method::Cleanup => {
                Err(ManagerError::Runtime("asynchronous method dispatched synchronously".into()))
            }
        }
    }

    // --- permissions -----------------------------------------------------------------------

    /// The user's permission on `ws`: its token scope, or `a` on its own personal
    /// workspace and on workspaces whose `owners` name it (id or email, spec §6.1).
    ///
    /// The "child of the owner" rule of `generate_token` (§6.4) is deliberately not
    /// applied here: a `read` child of an owner stays read-only.
    fn permission(&self, user: &UserInfo, ws: &str) -> Option<Permission> {
        let listed = |r: &WorkspaceRecord| {
            r.owners.iter().any(|o| *o == user.id || user.email.as_deref() == Some(o.as_str()))
        };
        let owner =
            ws == user.personal_workspace() || self.state.workspaces.get(ws).is_some_and(|r| listed(&r));
        if owner {
            Some(Permission::Admin)
        } else {
            user.permission(ws)
        }
    }

    fn require(&self, c: &Caller, ws: &str, need: Permission) -> Result<(), ManagerError> {
        if self.permission(&c.user, ws).is_some_and(|p| p.satisfies(need)) {
            Ok(())
        } else {
            Err(ManagerError::denied(ws))
        }
    }

    fn workspace(&self, ws: &str) -> Result<WorkspaceRecord, ManagerError> {
        self.state.workspaces.get(ws).ok_or_else(|| {
            ManagerError::Key(format!(
                "Workspace ({ws}) not found and workspace loader not configured (requires s3)."
            ))
        })
    }

    fn emit(&self, ws: &str, kind: &str, data: Value) {
        let data = match data {
            Value::Map(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("value".into(), other);
                m
            }
        };
        self.state.router.broadcast_event(ws, kind, data);
    }

    fn client_event(&self, kind: &str, ws: &str, id: &str) {
        let mut data = Map::new();
        data.insert("id".into(), Value::from(id));
        data.insert("workspace".into(), Value::from(ws));
        self.state.router.broadcast_event(ws, kind, data);
    }

    // --- events ----------------------------------------------------------------------------

    fn log_event(&self, c: &Caller, event_type: &str, data: Value) -> Result<Value, ManagerError> {
        self.events.log(event_type, &c.ws, &c.user.id, data, unix_now()).map_err(|e| match e {
            super::events::EventError::SpaceInType => ManagerError::Assertion(e.to_string()),
            _ => ManagerError::Value(e.to_string()),
        })?;
        Ok(Value::Nil)
    }

    fn subscribe(&self, c: &Caller, a: &mut Args, on: bool) -> Result<Value, ManagerError> {
        let types = match a.take(0) {
            Value::Str(s) => vec![s],
            v @ Value::List(_) => string_list(&v).ok_or_else(|| {
                ManagerError::Type("event_type must be a string or a list of strings".into())
            })?,
            other => {
                return Err(ManagerError::Type(format!(
                    "event_type must be a string or a list of strings, got {}",
                    other.kind()
                )))
            }
        };
        for t in &types {
            check_subscription(t, &c.ws).map_err(|e| ManagerError::Value(e.to_string()))?;
        }
        let router = &self.state.router;
        let result = if on {
            router.subscribe(&c.ws, &c.client_id, types)
        } else {
            router.unsubscribe(&c.ws, &c.client_id, types)
        };
        result.map_err(|e| match e {
            super::router::SubscribeError::NotConnected(_) => {
                ManagerError::Runtime(format!("Connection not found for client {}", c.from))
            }
            other => ManagerError::Value(other.to_string()),
        })?;
        Ok(Value::Bool(true))
    }

    // --- services --------------------------------------------------------------------------

    /// `register_service` (spec §4.5); returns the record it stored, if it stored one.
    fn register_service(&self, c: &Caller, a: &mut Args) -> Result<Option<ServiceRecord>, ManagerError> {
        self.require(c, &c.ws, Permission::ReadWrite)?;
        let service = a.map(0, "service")?;
        let options = a.map(1, "config")?;
        let _ = options; // upstream's only option (skip_app_id_validation) concerns apps
        let id = service
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| ManagerError::Assertion("Service id info must contain ':'".into()))?;
        let id = ServiceId::for_registration(id, &c.ws).map_err(ManagerError::from_id)?;
        let raw_config = service.get("config").and_then(Value::as_map);
        let local_only =
            raw_config.and_then(|m| m.get("_local_only")).is_some_and(|v| v.as_bool() == Some(true));
        if id.service().starts_with(RINTF_PREFIX) || local_only {
            return Ok(None);
        }
        if id.client_id() != c.client_id {
            return Err(ManagerError::Permission(format!(
                "Cannot register service {} for another client: services are registered by their own client ({})",
                id.without_app(),
                c.from
            )));
        }
        let ws = id.workspace().to_owned();
        let builtin = id.service() == BUILTIN_SERVICE_ID;
        if !builtin {
            let exempt = ws == auth::PUBLIC_WORKSPACE || ws == auth::personal_workspace(auth::ROOT_USER_ID);
            if !exempt && self.state.registry.builtin(&ws, &c.client_id).is_none() {
                // The client is gone (or never registered itself): nothing to store.
                return Ok(None);
            }
            let max = self.state.config.max_services_per_client;
            if self.state.registry.get(&ws, &c.client_id, id.service()).is_none() {
                let count = self.state.registry.client_service_count(&ws, &c.client_id);
                if count >= max {
                    return Err(ManagerError::Runtime(format!(
                        "Service quota exceeded: client {} already has {count} services (max {max}). Remove unused services before registering new ones.",
                        c.from
                    )));
                }
            }
        }
        if !self.state.router.is_connected(&ws, &c.client_id) {
            return Ok(None);
        }
        let created_by = if builtin {
            let mut user = c.user.clone();
            user.current_workspace = Some(ws.clone());
            user.to_value()
        } else {
            let mut m = Map::new();
            m.insert("id".into(), Value::from(c.user.id.as_str()));
            Value::Map(m)
        };
        let record = ServiceRecord::from_registration(&service, &id, created_by)?;
        let registry = &self.state.registry;
        let replaced = registry.get(&ws, &c.client_id, id.service()).map_or(0, |r| r.size);
        if registry.client_bytes(&ws, &c.client_id) - replaced + record.size > MAX_CLIENT_REGISTRY_BYTES {
            return Err(ManagerError::Runtime(format!(
                "The services of client {} are too large (at most {MAX_CLIENT_REGISTRY_BYTES} bytes in all)",
                c.from
            )));
        }
        self.check_singleton(&record)?;
        let added = record.to_value();
        let stored = record.clone();
        let previous = self.state.registry.upsert(record);
        // The connection may have closed between the check above and the insert: its
        // cleanup (router first, then registry) has then already run and would never see
        // this record. Checking again after the insert closes that window.
        if !self.state.router.is_connected(&ws, &c.client_id) {
            self.state.registry.remove(&ws, &c.client_id, id.service());
            return Ok(None);
        }
        match previous {
            Some(_) if builtin => self.client_event("client_updated", &ws, &c.from),
            None if builtin => self.client_event("client_connected", &ws, &c.from),
            Some(old) => {
                self.emit(&ws, "service_removed", old.to_value());
                self.emit(&ws, "service_added", added);
            }
            None => self.emit(&ws, "service_added", added),
        }
        Ok(Some(stored))
    }

    fn check_singleton(&self, record: &ServiceRecord) -> Result<(), ManagerError> {
        let same_name: Vec<ServiceRecord> = self
            .state
            .registry
            .in_workspace(&record.workspace)
            .into_iter()
            .filter(|r| r.name == record.name && r.full_id() != record.full_id())
            .collect();
        if same_name.is_empty() {
            return Ok(());
        }
        if record.singleton {
            return Err(ManagerError::Value(format!(
                "A singleton service with the same name ({}) already exists in the workspace ({}), please use a different name.",
                record.name, record.workspace
            )));
        }
        if same_name.iter().any(|r| r.singleton) {
            return Err(ManagerError::Value(format!(
                "A singleton service with the same name ({}) has already exists in the workspace ({}).",
                record.name, record.workspace
            )));
        }
        Ok(())
    }

    fn unregister_service(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        self.require(c, &c.ws, Permission::ReadWrite)?;
        let text = a.string(0, "service_id")?;
        let query = ServiceQuery::parse(&text).map_err(ManagerError::from_id)?;
        let own_ws = query.workspace.as_deref().is_none_or(|w| w == c.ws);
        // A bare id means the caller's own service first (two clients may provide the same
        // name; upstream's exact-mode lookup would refuse that).
        let own = if own_ws && query.client_id.is_none() {
            self.state.registry.get(&c.ws, &c.client_id, &query.service)
        } else {
            None
        };
        let record = match own {
            Some(r) => r,
            None => {
                let config = LookupConfig { mode: Some("exact".into()), ..LookupConfig::default() };
                match self.lookup(c, &Value::from(text.as_str()), &config)? {
                    Lookup::Record(r, _) => *r,
                    Lookup::Manager => {
                        return Err(ManagerError::Permission(
                            "The manager service cannot be unregistered".into(),
                        ))
                    }
                }
            }
        };
        if record.client_id != c.client_id || record.workspace != c.ws {
            self.require(c, &record.workspace, Permission::Admin).map_err(|_| {
                ManagerError::Permission(format!(
                    "Permission denied: service {} belongs to another client",
                    record.full_id()
                ))
            })?;
        }
        if let Some(old) = self.state.registry.remove(&record.workspace, &record.client_id, &record.service) {
            if old.is_builtin() {
                self.client_event(CLIENT_DISCONNECTED, &old.workspace, &c.from);
            } else {
                self.emit(&old.workspace, "service_removed", old.to_value());
            }
        }
        Ok(Value::Nil)
    }

    /// Resolves a service id for `get_service` / `get_service_info` / `unregister_service`
    /// (spec §5.1-5.3): the manager, one record, or candidates still to be asked.
    fn resolve(&self, c: &Caller, id: &Value, config: &LookupConfig) -> Result<Resolution, ManagerError> {
        let text =
            id.as_str().ok_or_else(|| ManagerError::Assertion("Service ID must be a string.".into()))?;
        let query = ServiceQuery::parse(text).map_err(ManagerError::from_id)?;
        if query.is_manager_alias() {
            return Ok(Resolution::Manager);
        }
        let sid = query.resolve_for_lookup(&c.ws).map_err(ManagerError::from_id)?;
        // `built-in` alone names the caller's own built-in service.
        let client = if sid.any_client() && sid.service() == BUILTIN_SERVICE_ID && sid.workspace() == c.ws {
            c.client_id.as_str()
        } else {
            sid.client_id()
        };
        let pattern =
            Pattern { workspace: sid.workspace(), client, service: sid.service(), app: sid.app_id() };
        let found = self.state.registry.find(&pattern);
        let shown = format!("{}/{}:{}@{}", sid.workspace(), client, sid.service(), sid.app_id_or_any());
        if found.is_empty() {
            return Err(ManagerError::Key(format!("Service not found: {shown}")));
        }
        let default_mode = if sid.workspace() == auth::PUBLIC_WORKSPACE { "random" } else { "exact" };
        let mode = config.mode.as_deref().unwrap_or(default_mode);
        let pattern_text = format!("{}/{}:{}", sid.workspace(), client, sid.service());
        let now = Instant::now();
        let load = |r: &ServiceRecord| self.state.registry.load(&r.workspace, &r.client_id, now);
        Ok(match select(mode, found, &pattern_text, load)? {
            Choice::Pick(record) => Resolution::Record(record),
            Choice::ByFunction { candidates, criteria, function } => {
                Resolution::Select { candidates, criteria, function }
            }
        })
    }

    /// The visibility check of a chosen record (spec §5.4).
    fn grant(c: &Caller, record: ServiceRecord) -> Result<Lookup, ManagerError> {
        match record.access(&c.user, &c.ws) {
            Access::Denied => Err(ManagerError::Permission(format!(
                "Permission denied for non-public service in workspace {}",
                record.workspace
            ))),
            access => Ok(Lookup::Record(Box::new(record), access)),
        }
    }

    /// [`Manager::resolve`] for callers that cannot wait: a `select:` mode takes the first
    /// candidate (only `get_service` and `get_service_info` accept a caller's mode).
    fn lookup(&self, c: &Caller, id: &Value, config: &LookupConfig) -> Result<Lookup, ManagerError> {
        match self.resolve(c, id, config)? {
            Resolution::Manager => Ok(Lookup::Manager),
            Resolution::Record(r) => Self::grant(c, *r),
            Resolution::Select { mut candidates, .. } => Self::grant(c, candidates.swap_remove(0)),
        }
    }

    /// Resolves `id` and then runs `then` with the outcome: at once, or once the
    /// candidates of a `select:` mode have answered their `function()`.
    fn resolve_then(
        &mut self,
        ctx: &mut Context<Self>,
        c: &Caller,
        id: &Value,
        config: &LookupConfig,
        then: impl FnOnce(&mut Self, &mut Context<Self>, Result<Lookup, ManagerError>) + 'static,
    ) {
        let (candidates, criteria, function) = match self.resolve(c, id, config) {
            Ok(Resolution::Manager) => return then(self, ctx, Ok(Lookup::Manager)),
            Ok(Resolution::Record(r)) => return then(self, ctx, Self::grant(c, *r)),
            Err(e) => return then(self, ctx, Err(e)),
            Ok(Resolution::Select { candidates, criteria, function }) => (candidates, criteria, function),
        };
        let timeout = config.select_timeout;
        let calls: Vec<_> = candidates
            .iter()
            .map(|r| {
                let method = format!("services.{}.{function}", r.service);
                let rx = self.call_peer(&r.provider(), &method, Vec::new(), PromiseMode::Compact);
                async move {
                    match rx {
                        Ok(rx) => outcome(rx, timeout).await.ok(),
                        Err(_) => None,
                    }
                }
            })
            .collect();
        self.drive(ctx);
        let caller = c.clone();
        let fut = futures_util::future::join_all(calls).into_actor(self).map(move |answers, act, ctx| {
            let mut candidates = candidates;
            let i = pick_by_answers(criteria, &answers);
            tracing::debug!(chosen = %candidates[i].full_id(), %function, "service selected by its answer");
            then(act, ctx, Self::grant(&caller, candidates.swap_remove(i)));
            act.drive(ctx);
        });
        ctx.spawn(fut);
    }

    fn get_service_info(&mut self, ctx: &mut Context<Self>, c: &Caller, a: &mut Args, reply: ReplyTo) {
        let id = a.take(0);
        let config = match LookupConfig::parse(&a.take(1)) {
            Ok(config) => config,
            Err(e) => return self.reply(reply, Err(e)),
        };
        self.resolve_then(ctx, c, &id, &config, move |act, _ctx, found| {
            let result = found.map(|l| match l {
                Lookup::Manager => Value::Map(act.info.clone()),
                Lookup::Record(r, access) => r.view(access),
            });
            act.reply(reply, result);
        });
    }

    fn get_service(&mut self, ctx: &mut Context<Self>, c: &Caller, a: &mut Args, reply: ReplyTo) {
        let id = a.take(0);
        let config = LookupConfig::parse(&a.take(1)).and_then(|config| {
            if id.as_str() == Some(WILDCARD) {
                return Err(ManagerError::from_id(IdError::WildcardService));
            }
            Ok(config)
        });
        let config = match config {
            Ok(config) => config,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let (timeout, case) = (config.timeout, config.case);
        self.resolve_then(ctx, c, &id, &config, move |act, ctx, found| match found {
            Ok(Lookup::Manager) => {
                let api = act.endpoint.table().service(MANAGER_SERVICE_ID).map(|s| s.api.clone());
                let result =
                    api.map(Value::Map).ok_or_else(|| ManagerError::Runtime("no manager service".into()));
                act.reply(reply, result);
            }
            Ok(Lookup::Record(r, _)) => act.fetch_service(ctx, *r, timeout, case, reply),
            Err(e) => act.reply(reply, Err(e)),
        });
    }

    /// Asks the provider of `record` for its service (`built-in.get_service`) and answers
    /// `get_service` with it (spec §4.3).
    fn fetch_service(
        &mut self,
        ctx: &mut Context<Self>,
        record: ServiceRecord,
        timeout: Duration,
        case: Option<fn(&str) -> String>,
        reply: ReplyTo,
    ) {
        let rx = match self.call_peer(
            &record.provider(),
            "services.built-in.get_service",
            vec![Value::from(record.service.as_str())],
            PromiseMode::Explicit,
        ) {
            Ok(rx) => rx,
            Err(e) => return self.reply(reply, Err(e)),
        };
        self.drive(ctx);
        let url = format!(
            "{}/{}/services/{}:{}",
            self.state.public_base_url(),
            record.workspace,
            record.client_id,
            record.service
        );
        let fut = outcome(rx, timeout).into_actor(self).map(move |res, act, ctx| {
            let result = res.map_err(ManagerError::Raw).and_then(|svc| {
                let Value::Map(mut svc) = svc else {
                    return Err(ManagerError::Runtime(format!(
                        "Invalid service returned by {}",
                        record.provider()
                    )));
                };
                svc.insert("id".into(), Value::from(record.full_id()));
                if let Value::Map(cfg) =
                    svc.entry("config".to_owned()).or_insert_with(|| Value::Map(Map::new()))
                {
                    cfg.insert("workspace".into(), Value::from(record.workspace.as_str()));
                    cfg.insert("url".into(), Value::from(url));
                }
                Ok(match case {
                    Some(conv) => convert_case(Value::Map(svc), conv),
                    None => Value::Map(svc),
                })
            });
            act.reply(reply, result);
            act.drive(ctx);
        });
        ctx.spawn(fut);
    }

    /// A `default` service was registered (spec §4.5 step 11): fetch it from its provider
    /// and call its `setup()` if it has one. Failures are only logged, as upstream does.
    fn run_setup(&mut self, ctx: &mut Context<Self>, record: ServiceRecord) {
        let rx = match self.call_peer(
            &record.provider(),
            "services.built-in.get_service",
            vec![Value::from(record.service.as_str())],
            PromiseMode::Explicit,
        ) {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!(service = %record.full_id(), error = %e, "cannot fetch the default service for setup");
                return;
            }
        };
        self.drive(ctx);
        let id = record.full_id();
        let fut = outcome(rx, GET_SERVICE_TIMEOUT).into_actor(self).map(move |res, act, ctx| {
            let setup = match res {
                Ok(Value::Map(svc)) => match svc.get("setup") {
                    Some(Value::Function(f)) => match &**f {
                        Function::Remote(rm) => Some(rm.clone()),
                        Function::Local(_) => None,
                    },
                    _ => None,
                },
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(service = %id, error = %e, "cannot fetch the default service for setup");
                    None
                }
            };
            let Some(setup) = setup else {
                tracing::debug!(service = %id, "default service without setup()");
                return;
            };
            let rx = match act.call_remote(&setup, Vec::new()) {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!(service = %id, error = %e, "cannot call setup() of the default service");
                    return;
                }
            };
            act.drive(ctx);
            let done = outcome(rx, SETUP_TIMEOUT).into_actor(act).map(move |res, act, ctx| {
                match res {
                    Ok(_) => tracing::debug!(service = %id, "setup() of the default service done"),
                    Err(e) => {
                        tracing::warn!(service = %id, error = %e, "setup() of the default service failed")
                    }
                }
                act.drive(ctx);
            });
            ctx.spawn(done);
        });
        ctx.spawn(fut);
    }

    fn list_services(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        let query = a.take(0);
        let include_unlisted = a.bool(1);
        let mut q = ListQuery::parse(&query, &c.ws)?;
        if q.workspace == WILDCARD {
            if matches!(q.visibility.as_deref(), Some("protected" | "unlisted")) {
                return Err(ManagerError::Assertion(
                    "Cannot list protected or unlisted services in all workspaces.".into(),
                ));
            }
            if include_unlisted {
                return Err(ManagerError::Permission(
                    "Cannot include unlisted services when searching all workspaces.".into(),
                ));
            }
        } else if include_unlisted && q.workspace != c.ws {
            return Err(ManagerError::Permission(format!(
                "Cannot include unlisted services from workspace {}. Only services from your current workspace ({}) can include unlisted services.",
                q.workspace, c.ws
            )));
        }
        let records = if q.workspace == WILDCARD {
            let mut all: Vec<ServiceRecord> = self
                .state
                .registry
                .all()
                .into_iter()
                .filter(|r| r.workspace != c.ws && r.visibility == schema::Visibility::Public)
                .collect();
            all.extend(self.state.registry.in_workspace(&c.ws));
            q.workspace = c.ws.clone();
            all
        } else {
            self.state.registry.in_workspace(&q.workspace)
        };
        let out = records
            .into_iter()
            .filter(|r| q.matches(r))
            .filter_map(|r| {
                if r.visibility == schema::Visibility::Unlisted && !include_unlisted {
                    return None;
                }
                match r.access(&c.user, &c.ws) {
                    Access::Denied => None,
                    access => Some(r.view(access)),
                }
            })
            .collect();
        Ok(Value::List(out))
    }

    fn list_clients(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        let ws = a.opt_string(0, "workspace")?.unwrap_or_else(|| c.ws.clone());
        self.require(c, &ws, Permission::Read)?;
        let out = self
            .state
            .registry
            .clients(&ws)
            .into_iter()
            .map(|r| {
                let mut m = Map::new();
                m.insert("id".into(), Value::from(r.provider()));
                m.insert("user".into(), r.created_by());
                Value::Map(m)
            })
            .collect();
        Ok(Value::List(out))
    }

    fn get_summary(&self, c: &Caller) -> Result<Value, ManagerError> {
        self.require(c, &c.ws, Permission::Read)?;
        let ws = self.workspace(&c.ws)?;
        let records = self.state.registry.in_workspace(&c.ws);
        let clients: Vec<Value> =
            records.iter().filter(|r| r.is_builtin()).map(|r| Value::from(r.provider())).collect();
        let services: Vec<Value> = records
            .iter()
            .map(|r| {
                let mut info = r.info();
                let mut m = Map::new();
                for k in ["id", "name", "type", "description", "config"] {
                    m.insert(k.into(), info.swap_remove(k).unwrap_or(Value::Nil));
                }
                Value::Map(m)
            })
            .collect();
        let mut m = Map::new();
        m.insert("name".into(), Value::from(ws.name.as_str()));
        m.insert("description".into(), Value::from(ws.description.clone()));
        m.insert("client_count".into(), Value::from(clients.len()));
        m.insert("clients".into(), Value::List(clients));
        m.insert("service_count".into(), Value::from(services.len()));
        m.insert("services".into(), Value::List(services));
        Ok(Value::Map(m))
    }

    // --- service types -----------------------------------------------------------------------

    fn register_service_type(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        self.require(c, &c.ws, Permission::ReadWrite)?;
        let info = a.map(0, "type_info")?;
        let id = map_get(&info, "id")
            .and_then(Value::as_str)
            .ok_or_else(|| ManagerError::Value("Service type info must have an id".into()))?;
        let short = match id.split_once('/') {
            Some((ws, _)) if ws != c.ws => {
                return Err(ManagerError::Permission(format!(
                    "Service type id workspace '{ws}' does not match the current workspace '{}'",
                    c.ws
                )))
            }
            Some((_, s)) => s.to_owned(),
            None => id.to_owned(),
        };
        let name = map_get(&info, "name").cloned().unwrap_or_else(|| Value::from(short.as_str()));
        let mut t = Map::new();
        t.insert("id".into(), Value::from(short.as_str()));
        t.insert("name".into(), name);
        t.insert("definition".into(), info.get("definition").cloned().unwrap_or(Value::Map(Map::new())));
        t.insert("description".into(), info.get("description").cloned().unwrap_or(Value::Nil));
        t.insert("config".into(), map_get(&info, "config").cloned().unwrap_or(Value::Map(Map::new())));
        t.insert("docs".into(), info.get("docs").cloned().unwrap_or(Value::Nil));
        let t_value = Value::Map(t);
        check_size(&t_value, MAX_STORED_VALUE_BYTES, "The service type")?;
        let Value::Map(t) = t_value else { return Err(ManagerError::Runtime("unreachable".into())) };
        let stored = self.state.workspaces.update(&c.ws, |w| {
            if w.service_types.contains_key(&short) || w.service_types.len() >= MAX_SERVICE_TYPES {
                return false;
            }
            w.service_types.insert(short.clone(), Value::Map(t.clone()));
            true
        });
        match stored {
            None => Err(self.workspace(&c.ws).err().unwrap_or_else(|| ManagerError::denied(&c.ws))),
            Some(false) => Err(ManagerError::Key(format!(
                "Service type already exists: {short} (or the workspace has {MAX_SERVICE_TYPES} types)"
            ))),
            Some(true) => Ok(Value::Map(t)),
        }
    }

    fn get_service_type(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        let id = a.string(0, "type_id")?;
        let (ws, short) =
            id.split_once('/').map_or((c.ws.clone(), id.clone()), |(w, s)| (w.to_owned(), s.to_owned()));
        let record = self.workspace(&ws)?;
        let Some(Value::Map(t)) = record.service_types.get(&short) else {
            return Err(ManagerError::Key(format!("Service type not found: {ws}/{short}")));
        };
        let public =
            t.get("config").and_then(Value::as_map).and_then(|c| c.get("visibility")).and_then(Value::as_str)
                == Some("public");
        if !public {
            self.require(c, &ws, Permission::Read)?;
        }
        let mut t = t.clone();
        t.insert("id".into(), Value::from(format!("{ws}/{short}")));
        Ok(Value::Map(t))
    }

    fn list_service_types(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        let ws = a.opt_string(0, "workspace")?.unwrap_or_else(|| c.ws.clone());
        self.require(c, &ws, Permission::Read)?;
        Ok(Value::List(self.workspace(&ws)?.service_types.values().cloned().collect()))
    }

    // --- tokens ------------------------------------------------------------------------------

    fn revoke_token(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        self.require(c, &c.ws, Permission::Admin)?;
        let token = a.string(0, "token")?;
        let now = unix_now();
        let claims = self.state.config.jwt.verify(&token, now).map_err(|e| match e {
            AuthError::Expired => ManagerError::Value("Token has already expired".into()),
            other => ManagerError::Value(format!("Invalid token: {other}")),
        })?;
        let exp = claims.get("exp").and_then(Json::as_f64).unwrap_or(now + auth::DEFAULT_TOKEN_LIFE_TIME);
        self.state.revoked.revoke(&token, exp, now).map_err(ManagerError::Runtime)?;
        Ok(Value::Nil)
    }

    fn parse_token(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        self.require(c, &c.ws, Permission::Read)?;
        let token = a.string(0, "token")?;
        let revoked = |t: &str| self.state.revoked.is_revoked(t);
        let user = self
            .state
            .config
            .jwt
            .decode(&token, unix_now(), &revoked)
            .map_err(|e| ManagerError::Value(format!("Invalid token: {e}")))?;
        if let Some(wid) = user.scope.current_workspace.as_deref() {
            if wid != c.ws {
                return Err(ManagerError::Permission(format!(
                    "Token is not authorized for workspace '{}'",
                    c.ws
                )));
            }
        }
        Ok(user.to_value())
    }

    // --- workspaces --------------------------------------------------------------------------

    fn create_workspace(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        if c.user.is_anonymous {
            return Err(ManagerError::Other("Only registered user can create workspace.".into()));
        }
        let config = a.map(0, "config")?;
        check_size(&Value::Map(config.clone()), MAX_STORED_VALUE_BYTES, "The workspace config")?;
        let overwrite = a.bool(1);
        let text = |k: &str| map_get(&config, k).and_then(Value::as_str).map(str::to_owned);
        let id = text("id")
            .or_else(|| text("name"))
            .ok_or_else(|| ManagerError::Value("Workspace config must have a name or an id".into()))?;
        let is_root = c.user.id == auth::ROOT_USER_ID;
        if id.is_empty()
            || !id.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || ch == '|')
        {
            return Err(ManagerError::Value(format!(
                "Invalid workspace name: {id}, only lowercase letters, numbers and hyphens are allowed."
            )));
        }
        if !is_root && !id.contains('-') {
            return Err(ManagerError::Value(
                "Workspace name must contain at least one hyphen (e.g. my-workspace).".into(),
            ));
        }
        if let Some(existing) = self.state.workspaces.get(&id) {
            if !overwrite {
                return Err(ManagerError::Runtime(format!("Workspace already exists: {id}")));
            }
            let allowed = is_root
                || auth::is_workspace_owner(&c.user, &id, &existing.owners)
                || c.user.check(&id, Permission::Admin);
            if !allowed {
                return Err(ManagerError::Permission(format!(
                    "Permission denied: user {} cannot overwrite workspace {id}",
                    c.user.id
                )));
            }
        } else if !is_root {
            let owned = self.state.workspaces.list().iter().filter(|w| w.owners.contains(&c.user.id)).count();
            if owned >= MAX_WORKSPACES_PER_USER {
                return Err(ManagerError::Runtime(format!(
                    "Workspace quota exceeded: user {} already owns {owned} workspaces",
                    c.user.id
                )));
            }
        }
        let mut owners = map_get(&config, "owners").and_then(string_list).unwrap_or_default();
        if !owners.contains(&c.user.id) {
            owners.push(c.user.id.clone());
        }
        let mut record = WorkspaceRecord::new(id.clone(), owners);
        record.name = text("name").unwrap_or_else(|| id.clone());
        record.description = text("description");
        record.persistent = map_get(&config, "persistent").and_then(Value::as_bool).unwrap_or(false);
        record.read_only = map_get(&config, "read_only").and_then(Value::as_bool).unwrap_or(false);
        record.icon = config.get("icon").cloned().unwrap_or(Value::Nil);
        record.covers = config.get("covers").cloned().unwrap_or(Value::Nil);
        record.docs = config.get("docs").cloned().unwrap_or(Value::Nil);
        if let Some(Value::Map(m)) = config.get("config") {
            record.config = m.clone();
        }
        let mut dump = record.clone();
        dump.status = WorkspaceStatus::Loading;
        self.state.workspaces.put(record.clone());
        let own = c.user.personal_workspace();
        self.emit(&own, "workspace_loaded", record.to_value());
        let mut mark = Map::new();
        mark.insert("bookmark_type".into(), Value::from("workspace"));
        mark.insert("id".into(), Value::from(id.as_str()));
        mark.insert("name".into(), Value::from(id.as_str()));
        mark.insert("description".into(), Value::from(record.description.clone()));
        self.edit_bookmarks(&own, |list| {
            list.retain(|b| bookmark_key(b) != Some(("workspace", id.as_str())));
            list.push(Value::Map(mark));
        });
        Ok(dump.to_value())
    }

    fn delete_workspace(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        let ws = a.string(0, "workspace")?;
        let record = self.workspace(&ws)?;
        if PROTECTED_WORKSPACES.contains(&ws.as_str()) {
            return Err(ManagerError::Permission(format!("The system workspace {ws} cannot be deleted")));
        }
        self.require(c, &ws, Permission::Admin)?;
        self.remove_workspace(c, &record);
        Ok(Value::Nil)
    }

    /// Deletes workspace `record` for `c` (`delete_workspace`, and `cleanup` of an empty
    /// one): record and services go, `workspace_deleted` to the caller's own workspace,
    /// the caller's bookmark of it too.
    fn remove_workspace(&self, c: &Caller, record: &WorkspaceRecord) {
        let ws = record.id.as_str();
        self.state.workspaces.remove(ws);
        self.state.registry.remove_workspace(ws);
        let own = c.user.personal_workspace();
        self.emit(&own, "workspace_deleted", record.to_value());
        self.edit_bookmarks(&own, |list| list.retain(|b| bookmark_key(b) != Some(("workspace", ws))));
    }

    /// Edits `config.bookmarks` of `ws` (a user's own workspace) and announces the change.
    fn edit_bookmarks(&self, ws: &str, f: impl FnOnce(&mut Vec<Value>)) -> bool {
        let changed = self.state.workspaces.update(ws, |w| {
            let mut list = match w.config.shift_remove("bookmarks") {
                Some(Value::List(l)) => l,
                _ => Vec::new(),
            };
            f(&mut list);
            list.truncate(MAX_ENV_ENTRIES);
            w.config.insert("bookmarks".into(), Value::List(list));
            w.to_value()
        });
        match changed {
            Some(dump) => {
                self.emit(ws, "workspace_changed", dump);
                true
            }
            None => false,
        }
    }

    fn bookmark(&self, c: &Caller, a: &mut Args, add: bool) -> Result<Value, ManagerError> {
        let item = a.map(0, "item")?;
        let kind = map_get(&item, "bookmark_type").and_then(Value::as_str).unwrap_or_default().to_owned();
        let id = map_get(&item, "id")
            .and_then(Value::as_str)
            .ok_or_else(|| ManagerError::Value("A bookmark needs an id".into()))?
            .to_owned();
        let own = c.user.personal_workspace();
        self.workspace(&own)?;
        let mark = match (add, kind.as_str()) {
            (false, "workspace" | "service") => None,
            (true, "workspace") => {
                let ws = self.workspace(&id)?;
                let mut m = Map::new();
                m.insert("bookmark_type".into(), Value::from("workspace"));
                m.insert("id".into(), Value::from(id.as_str()));
                m.insert("name".into(), Value::from(ws.name.as_str()));
                m.insert("description".into(), Value::from(ws.description.clone()));
                Some(m)
            }
            (true, "service") => {
                let config = LookupConfig::default();
                let Lookup::Record(r, _) = self.lookup(c, &Value::from(id.as_str()), &config)? else {
                    return Err(ManagerError::Value("The manager cannot be bookmarked".into()));
                };
                let mut m = Map::new();
                m.insert("bookmark_type".into(), Value::from("service"));
                m.insert("id".into(), Value::from(r.full_id()));
                m.insert("name".into(), Value::from(r.name.as_str()));
                let mut info = r.info();
                m.insert("description".into(), info.swap_remove("description").unwrap_or(Value::Nil));
                m.insert("config".into(), info.swap_remove("config").unwrap_or(Value::Nil));
                Some(m)
            }
            _ => {
                return Err(ManagerError::Value(format!(
                    "Invalid bookmark type: {kind}, it must be 'workspace' or 'service'"
                )))
            }
        };
        let key_id =
            mark.as_ref().and_then(|m| m.get("id")).and_then(Value::as_str).unwrap_or(&id).to_owned();
        self.edit_bookmarks(&own, |list| {
            list.retain(|b| bookmark_key(b) != Some((kind.as_str(), key_id.as_str())));
            if let Some(m) = mark {
                list.push(Value::Map(m));
            }
        });
        Ok(Value::Nil)
    }

    fn list_workspaces(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        self.require(c, &c.ws, Permission::Read)?;
        let filter = a.map(0, "match")?;
        let offset = a.take(1).as_i64().unwrap_or(0);
        let limit = a.take(2).as_i64().unwrap_or(256);
        if offset < 0 {
            return Err(ManagerError::Value("Offset must be a non-negative integer".into()));
        }
        if !(1..=256).contains(&limit) {
            return Err(ManagerError::Value("Limit must be an integer between 1 and 256".into()));
        }
        let out = self
            .state
            .workspaces
            .list()
            .into_iter()
            .filter(|w| self.permission(&c.user, &w.id).is_some())
            .map(|w| w.to_value())
            .filter(|dump| {
                let m = dump.as_map();
                filter.iter().all(|(k, v)| m.and_then(|m| m.get(k)) == Some(v))
            })
            .skip(offset as usize)
            .take(limit as usize)
            .map(|dump| {
                let mut m = Map::new();
                if let Value::Map(d) = dump {
                    for k in ["id", "name", "description", "read_only", "persistent", "owners"] {
                        m.insert(k.into(), d.get(k).cloned().unwrap_or(Value::Nil));
                    }
                }
                Value::Map(m)
            })
            .collect();
        Ok(Value::List(out))
    }

    fn set_env(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        self.require(c, &c.ws, Permission::ReadWrite)?;
        let key = a.string(0, "key")?;
        let value = a.take(1);
        check_size(&value, MAX_STORED_VALUE_BYTES, "The environment variable")?;
        let dump = self.state.workspaces.update(&c.ws, |w| {
            let mut env = match w.config.shift_remove("environs") {
                Some(Value::Map(m)) => m,
                _ => Map::new(),
            };
            let full = env.len() >= MAX_ENV_ENTRIES && !env.contains_key(&key);
            if matches!(value, Value::Nil) {
                env.shift_remove(&key);
            } else if !full {
                env.insert(key.clone(), value);
            }
            w.config.insert("environs".into(), Value::Map(env));
            (!full).then(|| w.to_value())
        });
        match dump {
            None => Err(self.workspace(&c.ws).err().unwrap_or_else(|| ManagerError::denied(&c.ws))),
            Some(None) => Err(ManagerError::Runtime(format!(
                "Too many environment variables (at most {MAX_ENV_ENTRIES})"
            ))),
            Some(Some(dump)) => {
                self.emit(&c.ws, "workspace_changed", dump);
                Ok(Value::Nil)
            }
        }
    }

    fn get_env(&self, c: &Caller, a: &mut Args) -> Result<Value, ManagerError> {
        self.require(c, &c.ws, Permission::ReadWrite)?;
        let key = a.opt_string(0, "key")?;
        let ws = self.workspace(&c.ws)?;
        let env = match ws.config.get("environs") {
            Some(Value::Map(m)) => m.clone(),
            _ => Map::new(),
        };
        match key {
            None => Ok(Value::Map(env)),
            Some(k) => env.get(&k).cloned().ok_or_else(|| {
                ManagerError::Key(format!("Environment variable '{k}' not found in workspace {}", c.ws))
            }),
        }
    }

    // --- asynchronous methods --------------------------------------------------------------

    fn ping(&mut self, ctx: &mut Context<Self>, c: &Caller, a: &mut Args, reply: ReplyTo) {
        let id = match a.string(0, "client_id") {
            Ok(id) => id,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let timeout = a.seconds(1, PING_TIMEOUT);
        let full = if id.contains('/') { id.clone() } else { format!("{}/{id}", c.ws) };
        let (ws, cid) =
            full.split_once('/').map_or((c.ws.clone(), id.clone()), |(w, c)| (w.to_owned(), c.to_owned()));
        if ws != c.ws {
            if let Err(e) = self.require(c, &ws, Permission::Read) {
                let text = e.to_string();
                let reason = text.strip_prefix("PermissionError: ").unwrap_or(&text);
                return self.reply(reply, Ok(Value::from(format!("Failed to ping client {full}: {reason}"))));
            }
        }
        let fut = self.ping_client(&ws, &cid, timeout);
        self.drive(ctx);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let answer = match res {
                Ok(()) => "pong".to_owned(),
                Err(reason) => format!("Failed to ping client {full}: {reason}"),
            };
            act.reply(reply, Ok(Value::from(answer)));
            act.drive(ctx);
        }));
    }

    /// `cleanup(workspace=None, timeout=5)` (spec §4.3, §8): pings every registered client
    /// of the workspace and removes those that do not answer; an empty non-persistent
    /// workspace is deleted.
    fn cleanup(&mut self, ctx: &mut Context<Self>, c: &Caller, a: &mut Args, reply: ReplyTo) {
        let prepared = (|| {
            self.require(c, &c.ws, Permission::Admin)?;
            let ws = a.opt_string(0, "workspace")?.unwrap_or_else(|| c.ws.clone());
            let timeout = a.seconds(1, PING_TIMEOUT);
            let record = self.workspace(&ws)?;
            if !self.permission(&c.user, &ws).is_some_and(|p| p.satisfies(Permission::Admin)) {
                return Err(ManagerError::Permission(format!(
                    "Permission denied for workspace {ws}, user: {}",
                    c.user.id
                )));
            }
            Ok((ws, timeout, record))
        })();
        let (ws, timeout, record) = match prepared {
            Ok(p) => p,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let clients = self.state.registry.clients(&ws);
        if clients.is_empty() && !record.persistent && !PROTECTED_WORKSPACES.contains(&ws.as_str()) {
            tracing::info!(workspace = %ws, "cleanup: empty workspace deleted");
            self.remove_workspace(c, &record);
            let mut m = Map::new();
            m.insert("removed_workspace".into(), Value::from(ws.as_str()));
            m.insert("removed_clients".into(), Value::List(Vec::new()));
            return self.reply(reply, Ok(Value::Map(m)));
        }
        let pings: Vec<_> = clients
            .iter()
            .map(|r| {
                let cid = r.client_id.clone();
                let fut = self.ping_client(&ws, &cid, timeout);
                async move { (cid, fut.await) }
            })
            .collect();
        self.drive(ctx);
        let fut = futures_util::future::join_all(pings).into_actor(self).map(move |results, act, ctx| {
            let mut removed = Vec::new();
            for (cid, res) in results {
                if let Err(reason) = res {
                    tracing::info!(workspace = %ws, client = %cid, %reason, "cleanup: client does not answer, removed");
                    act.remove_client(&ws, &cid);
                    removed.push(Value::from(format!("{ws}/{cid}")));
                }
            }
            if !removed.is_empty() && !record.persistent {
                act.unload_if_empty(&ws);
            }
            let mut m = Map::new();
            if !removed.is_empty() {
                m.insert("removed_clients".into(), Value::List(removed));
            }
            act.reply(reply, Ok(Value::Map(m)));
            act.drive(ctx);
        });
        ctx.spawn(fut);
    }

    /// Removes client `{ws}/{cid}` from the server side (spec §8, upstream's
    /// `delete_client`): its records, its connection (closed 1001 `Client deleted by
    /// admin`, without an error frame so a live-but-slow client reconnects), and
    /// `client_disconnected` (bare id) to the workspace.
    fn remove_client(&self, ws: &str, cid: &str) {
        self.state.registry.remove_client(ws, cid);
        let close = super::outbound::CloseCmd::close(1001, CLIENT_DELETED_REASON);
        if !self.state.router.disconnect(ws, cid, close, Instant::now()) {
            // No connection (or a local peer): the event still tells the workspace.
            self.client_event(CLIENT_DISCONNECTED, ws, cid);
        }
        self.state.notify_client_left(ws, cid);
    }

    /// Unloads a non-persistent workspace that has no registered client left (spec §4.4
    /// "Unload"): its record and services go, `workspace_unloaded` goes to whoever is still
    /// subscribed there. The system workspaces are never unloaded.
    fn unload_if_empty(&self, ws: &str) {
        if PROTECTED_WORKSPACES.contains(&ws) || !self.state.registry.clients(ws).is_empty() {
            return;
        }
        let Some(mut record) = self.state.workspaces.get(ws).filter(|r| !r.persistent) else { return };
        self.state.workspaces.remove(ws);
        self.state.registry.remove_workspace(ws);
        record.status = WorkspaceStatus::Unloaded;
        tracing::info!(workspace = %ws, "workspace unloaded");
        self.emit(ws, "workspace_unloaded", record.to_value());
    }
}

/// `(bookmark_type, id)` of a stored bookmark.
fn bookmark_key(v: &Value) -> Option<(&str, &str)> {
    let m = v.as_map()?;
    Some((m.get("bookmark_type")?.as_str()?, m.get("id")?.as_str()?))
}

/// Waits for a call's outcome: the result, or the error text (`""` for a timeout, as
/// upstream's `TimeoutError` prints).
async fn outcome(rx: oneshot::Receiver<CallOutcome>, timeout: Duration) -> Result<Value, String> {
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(CallOutcome::Resolved(v))) => Ok(v),
        Ok(Ok(CallOutcome::Rejected(e))) => Err(e.message),
        Ok(Ok(CallOutcome::Failed(e))) => Err(e.to_string()),
        Ok(Err(_)) => Err("the call was dropped".into()),
        Err(_) => Err(String::new()),
    }
}

/// A parsed `list_services` query (spec §5.4).
#[derive(Debug, Default)]
struct ListQuery {
    workspace: String,
    client_id: Option<String>,
    service_id: Option<String>,
    visibility: Option<String>,
    service_type: Option<String>,
    app_id: Option<String>,
}

impl ListQuery {
    fn parse(query: &Value, ctx_ws: &str) -> Result<ListQuery, ManagerError> {
        let check = |part: &str| hypha_core::ids::check_query_part(part).map_err(ManagerError::from_id);
        let mut q = ListQuery { workspace: ctx_ws.to_owned(), ..ListQuery::default() };
        match query {
            Value::Nil => {}
            Value::Str(s) => {
                let (ws, rest) = match s.split_once('/') {
                    Some((ws, rest)) => (Some(ws), Some(rest)),
                    None if s.contains(':') => (None, Some(s.as_str())),
                    None => (Some(s.as_str()), None),
                };
                if let Some(ws) = ws {
                    check(ws)?;
                    q.workspace = ws.to_owned();
                }
                if let Some(rest) = rest {
                    let (cid, svc) = match rest.split_once(':') {
                        Some((c, s)) => (Some(c), s),
                        None => (None, rest),
                    };
                    let (svc, app) = match svc.split_once('@') {
                        Some((s, a)) => (s, Some(a)),
                        None => (svc, None),
                    };
                    for part in [cid, Some(svc), app].into_iter().flatten() {
                        check(part)?;
                    }
                    q.client_id = cid.map(str::to_owned);
                    q.service_id = Some(svc.to_owned()).filter(|s| !s.is_empty());
                    q.app_id = app.map(str::to_owned);
                }
            }
            Value::Map(m) => {
                let allowed = ["visibility", "workspace", "client_id", "service_id", "id", "type", "app_id"];
                let bad: Vec<String> =
                    m.keys().filter(|k| !allowed.contains(&k.as_str())).map(|k| format!("'{k}'")).collect();
                if !bad.is_empty() {
                    return Err(ManagerError::Value(format!("Invalid query keys: {{{}}}", bad.join(", "))));
                }
                if m.contains_key("id") && m.contains_key("service_id") {
                    return Err(ManagerError::Value(
                        "Cannot specify both 'id' and 'service_id' in the query".into(),
                    ));
                }
                let text = |k: &str| -> Result<Option<String>, ManagerError> {
                    match m.get(k) {
                        None | Some(Value::Nil) => Ok(None),
                        Some(Value::Str(s)) => {
                            check(s)?;
                            Ok(Some(s.clone()))
                        }
                        Some(other) => Err(ManagerError::Value(format!(
                            "Query key {k} must be a string, got {}",
                            other.kind()
                        ))),
                    }
                };
                if let Some(ws) = text("workspace")? {
                    q.workspace = ws;
                }
                q.client_id = text("client_id")?;
                let svc = match m.get("service_id").or_else(|| m.get("id")) {
                    Some(Value::Str(s)) => Some(s.clone()),
                    _ => None,
                };
                if let Some(svc) = svc {
                    let (s, app) = match svc.split_once('@') {
                        Some((s, a)) => (s.to_owned(), Some(a.to_owned())),
                        None => (svc, None),
                    };
                    check(&s)?;
                    q.service_id = Some(s);
                    if let Some(a) = app {
                        check(&a)?;
                        q.app_id = Some(a);
                    }
                }
                q.visibility = match m.get("visibility") {
                    Some(Value::Str(s)) => Some(s.clone()),
                    _ => None,
                };
                q.service_type = text("type")?;
                if let Some(a) = text("app_id")? {
                    q.app_id = Some(a);
                }
            }
            other => {
                return Err(ManagerError::Type(format!(
                    "query must be a string or a dict, got {}",
                    other.kind()
                )))
            }
        }
        Ok(q)
    }

    fn matches(&self, r: &ServiceRecord) -> bool {
        let wild = |f: &Option<String>, v: &str| f.as_deref().is_none_or(|x| x == WILDCARD || x == v);
        wild(&self.client_id, &r.client_id)
            && wild(&self.service_id, &r.service)
            && wild(&self.app_id, &r.app_id)
            && wild(&self.service_type, &r.service_type)
            && self.visibility.as_deref().is_none_or(|v| v == r.visibility.as_str())
    }
}

impl NativePeer for Manager {
    const LABEL: &'static str = "manager";

    fn parts(&mut self) -> (&mut Endpoint, &ServerState, &RouteSender) {
        (&mut self.endpoint, &self.state, &self.sender)
    }

    fn timer(&mut self) -> &mut Option<(Instant, SpawnHandle)> {
        &mut self.timer
    }

    fn on_event(&mut self, ctx: &mut Context<Self>, event: Event) {
        self.handle_event(ctx, event);
    }
}

impl Actor for Manager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(rx) = self.inbox.take() {
            let frames =
                futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
            ctx.add_stream(frames);
        }
        tracing::info!(manager = %self.endpoint.id(), "workspace manager started");
    }
}

impl StreamHandler<Bytes> for Manager {
    fn handle(&mut self, frame: Bytes, ctx: &mut Context<Self>) {
        self.endpoint.handle_frame(Instant::now(), frame);
        self.drive(ctx);
    }
}

impl Handler<PingClient> for Manager {
    type Result = ResponseActFuture<Self, bool>;

    fn handle(&mut self, msg: PingClient, ctx: &mut Context<Self>) -> Self::Result {
        let fut = self.ping_client(&msg.workspace, &msg.client_id, PING_TIMEOUT);
        self.drive(ctx);
        Box::pin(fut.into_actor(self).map(|res, act, ctx| {
            act.drive(ctx);
            res.is_ok()
        }))
    }
}

/// The frame that tells the manager's endpoint a client left, so its calls to that client
/// fail at once (the endpoint handles `client_disconnected` events, spec §4.10).
pub fn client_left_frame(ws: &str, cid: &str) -> Option<Bytes> {
    let mut data = Map::new();
    data.insert("id".into(), Value::from(cid));
    data.insert("workspace".into(), Value::from(ws));
    let mut main = Map::new();
    main.insert("type".into(), Value::from(CLIENT_DISCONNECTED));
    main.insert("to".into(), Value::from(WILDCARD));
    main.insert("data".into(), Value::Map(data));
    package::encode_package(&main, None).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypha_core::map;

    fn state() -> Arc<ServerState> {
        ServerState::new(super::super::ServerConfig::default()).unwrap()
    }

    #[test]
    fn every_method_schema_is_named_after_its_key_and_hides_context() {
        let api = Manager::api(&state());
        let keys: Vec<&str> = api.keys().map(String::as_str).collect();
        assert_eq!(&keys[..4], ["id", "name", "description", "config"]);
        assert_eq!(keys[4], "echo");
        assert_eq!(keys.last(), Some(&"unsubscribe"));
        assert_eq!(keys.len(), 4 + METHODS.len());
        for m in METHODS {
            let (name, _, params) = signature(m);
            let Some(Value::Function(f)) = api.get(name) else { panic!("{name} missing") };
            let hypha_core::value::Function::Local(lf) = &**f else { panic!("{name} not local") };
            let schema = FunctionSchema::from_value(lf.schema.as_deref().unwrap()).unwrap();
            assert_eq!(schema.name, name);
            let props = schema.parameters["properties"].as_object().unwrap();
            assert!(!props.contains_key("context"), "{name}");
            assert_eq!(props.len(), params.len(), "{name}");
        }
        let config = api["config"].as_map().unwrap();
        let config_keys: Vec<&str> = config.keys().map(String::as_str).collect();
        assert_eq!(
            config_keys,
            [
                "require_context",
                "visibility",
                "server_id",
                "hypha_version",
                "public_base_url",
                "local_base_url",
                "auth0_client_id",
                "auth0_domain",
                "auth0_audience",
                "auth0_issuer",
                "login_service_url"
            ]
        );
        assert!(config["login_service_url"].as_str().unwrap().ends_with("/public/services/hypha-login"));
        let info = Manager::info_record(&api);
        assert_eq!(info["id"], Value::from("~"));
        assert!(info["service_schema"].as_map().unwrap().contains_key("get_service"));
    }

    #[test]
    fn arguments_bind_like_python() {
        let (name, _, params) = signature(Method::Ping);
        let got = bind(name, &params, vec![Value::from("c")], None).unwrap();
        assert_eq!(got, vec![Value::from("c"), Value::from(5)]);
        let kw = map! {"timeout" => 1, "client_id" => "c", "context" => "ignored"};
        assert_eq!(bind(name, &params, vec![], Some(kw)).unwrap(), vec![Value::from("c"), Value::from(1)]);
        let err = bind(name, &params, vec![], None).unwrap_err();
        assert_eq!(err.to_string(), "TypeError: ping() missing 1 required positional argument: 'client_id'");
        let err = bind(name, &params, vec![], Some(map! {"nope" => 1})).unwrap_err();
        assert_eq!(err.to_string(), "TypeError: ping() got an unexpected keyword argument 'nope'");
        let err = bind(name, &params, vec![Value::from("c")], Some(map! {"client_id" => "d"})).unwrap_err();
        assert!(err.to_string().contains("multiple values for argument 'client_id'"));
        let err = bind(name, &params, vec![Value::Nil, Value::Nil, Value::Nil], None).unwrap_err();
        assert!(err.to_string().contains("takes 2 positional arguments but 3 were given"));
    }

    #[test]
    fn case_conversion_renames_members_not_config() {
        assert_eq!(to_snake("HelloWorld"), "hello_world");
        assert_eq!(to_snake("helloWorld2"), "hello_world2");
        assert_eq!(to_camel("HelloWorld"), "helloWorld");
        assert_eq!(to_camel("hello_world"), "helloWorld");
        let svc = Value::Map(map! {"id" => "x", "HelloWorld" => 1, "config" => map! {"some_key" => 1}});
        let got = convert_case(svc, to_camel);
        let m = got.as_map().unwrap();
        assert!(m.contains_key("helloWorld") && m.contains_key("id"));
        assert!(m["config"].as_map().unwrap().contains_key("some_key"));
    }

    fn record(cid: &str) -> ServiceRecord {
        let id = ServiceId::parse(&format!("W/{cid}:m")).unwrap();
        ServiceRecord::from_registration(&map! {"id" => id.to_string()}, &id, Value::Nil).unwrap()
    }

    fn picked(c: Result<Choice, ManagerError>) -> String {
        match c.unwrap() {
            Choice::Pick(r) => r.client_id,
            other => panic!("expected a pick, got {other:?}"),
        }
    }

    #[test]
    fn selection_modes() {
        let two = || vec![record("a"), record("b")];
        let zero = |_: &ServiceRecord| 0.0;
        let err = select("exact", two(), "W/*:m", zero).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("AssertionError: Multiple services found for W/*:m, e.g. ['W/a:m', 'W/b:m']"));
        assert_eq!(picked(select("first", two(), "p", zero)), "a");
        assert_eq!(picked(select("last", two(), "p", zero)), "b");
        assert!(["a", "b"].contains(&picked(select("random", two(), "p", zero)).as_str()));
        assert!(["a", "b"].contains(&picked(select("native:random", two(), "p", zero)).as_str()));
        assert_eq!(picked(select("exact", vec![record("a")], "p", zero)), "a");
        // min_load: the first of the least loaded.
        assert_eq!(picked(select("min_load", two(), "p", zero)), "a");
        let b_idle = |r: &ServiceRecord| if r.client_id == "a" { 5.0 } else { 1.0 };
        assert_eq!(picked(select("min_load", two(), "p", b_idle)), "b");
        // select: one candidate needs no call, several do.
        assert_eq!(picked(select("select:bogus:load", vec![record("a")], "p", zero)), "a");
        match select("select:max:load", two(), "p", zero).unwrap() {
            Choice::ByFunction { candidates, criteria, function } => {
                assert_eq!((candidates.len(), criteria, function.as_str()), (2, Criteria::Max, "load"));
            }
            other => panic!("{other:?}"),
        }
        let err = select("select:bogus:load", two(), "p", zero).unwrap_err();
        assert_eq!(err.to_string(), "ValueError: Unknown selection criteria: bogus");
        let err = select("select:min", two(), "p", zero).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ValueError: Invalid select mode format: select:min. Expected 'select:criteria:function'"
        );
        assert!(select("bogus", two(), "p", zero)
            .unwrap_err()
            .to_string()
            .starts_with("ValueError: Invalid mode: bogus."));
    }

    #[test]
    fn answers_pick_by_criteria() {
        let answers = [Some(Value::from(5)), None, Some(Value::F64(2.0)), Some(Value::from("x"))];
        assert_eq!(pick_by_answers(Criteria::Min, &answers), 2);
        assert_eq!(pick_by_answers(Criteria::Max, &answers), 0);
        assert_eq!(
            pick_by_answers(Criteria::FirstSuccess, &[None, Some(Value::Nil), Some(Value::from(1))]),
            1
        );
        // Ties go to the earlier candidate; numeric strings count, as float() reads them.
        assert_eq!(pick_by_answers(Criteria::Min, &[Some(Value::from("3")), Some(Value::from(3))]), 0);
        assert!(pick_by_answers(Criteria::Min, &[None, None]) < 2);
    }

    #[test]
    fn list_queries_parse_every_form() {
        let q = ListQuery::parse(&Value::Nil, "W").unwrap();
        assert_eq!(q.workspace, "W");
        let q = ListQuery::parse(&Value::from("V/c:s@app"), "W").unwrap();
        assert_eq!(
            (q.workspace.as_str(), q.client_id.as_deref(), q.service_id.as_deref(), q.app_id.as_deref()),
            ("V", Some("c"), Some("s"), Some("app"))
        );
        let q = ListQuery::parse(&Value::from("c:s"), "W").unwrap();
        assert_eq!((q.workspace.as_str(), q.client_id.as_deref()), ("W", Some("c")));
        let q = ListQuery::parse(&Value::from("public"), "W").unwrap();
        assert_eq!((q.workspace.as_str(), q.service_id), ("public", None));
        let q = ListQuery::parse(&Value::Map(map! {"type" => "functions", "workspace" => "public"}), "W")
            .unwrap();
        assert_eq!(q.service_type.as_deref(), Some("functions"));
        let err = ListQuery::parse(&Value::Map(map! {"bogus" => 1}), "W").unwrap_err();
        assert_eq!(err.to_string(), "ValueError: Invalid query keys: {'bogus'}");
        let err = ListQuery::parse(&Value::Map(map! {"service_id" => "hello.x"}), "W").unwrap_err();
        assert_eq!(err.to_string(), "ValueError: Invalid characters in query part: hello.x");
        let r = record("a");
        assert!(ListQuery::parse(&Value::from("W/a:m"), "W").unwrap().matches(&r));
        assert!(!ListQuery::parse(&Value::from("W/b:m"), "W").unwrap().matches(&r));
        assert!(!ListQuery::parse(&Value::Map(map! {"visibility" => "public"}), "W").unwrap().matches(&r));
    }

    #[test]
    fn errors_print_as_python_exceptions() {
        assert_eq!(
            ManagerError::Key("Service not found: W/*:x@*".into()).to_string(),
            "KeyError: 'Service not found: W/*:x@*'"
        );
        assert_eq!(
            ManagerError::denied("W").to_string(),
            "PermissionError: Permission denied for workspace W"
        );
        assert_eq!(
            ManagerError::from_id(IdError::MissingColon).to_string(),
            "AssertionError: Service id info must contain ':'"
        );
        assert_eq!(
            ManagerError::from_auth(AuthError::OnlyAdmin).to_string(),
            "PermissionError: Only admin can generate token."
        );
        let frame = client_left_frame("W", "c").unwrap();
        let pkg = package::decode_package(&frame, &hypha_core::msgpack::DecodeLimits::default()).unwrap();
        assert_eq!(pkg.main["data"], Value::Map(map! {"id" => "c", "workspace" => "W"}));
    }
}
