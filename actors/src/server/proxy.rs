//! The HTTP service proxy (server spec §1.4): services called, listed and described over
//! plain HTTP.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /{ws}/services` | 307 to `/{ws}/services/` |
//! | `GET /{ws}/services/` | `list_services` of `{ws}` as the caller sees it (ids shortened to `{cid}:{svc}`) |
//! | `GET /{ws}/services/{id}` | `get_service_info(id)` (`~` is the manager) |
//! | `GET, POST /{ws}/services/{id}/{function}` | calls the function with keyword arguments |
//!
//! **How a call travels.** Each request gets a short-lived RPC peer of its own,
//! [`HttpPeer`]: a sans-IO [`Endpoint`] registered in the router as the local peer
//! `{context ws}/client-{random}` and stamped with the HTTP caller's identity, exactly as
//! upstream's per-request clients are. It asks the manager for the service
//! (`get_service`, so the visibility rules of §5 apply to the HTTP caller) and then calls
//! the provider directly; the provider sees `from = {context ws}/client-...` and the
//! caller's `user`. The peer lives in the request's future: it is registered silently (no
//! registry record, no events) and removed when the request ends, also when the HTTP
//! client goes away mid-call.
//!
//! **Arguments and answers.** GET query parameters are normalised as upstream does
//! (digits -> int, else float, `{...}` -> JSON, else string); a POST body is JSON
//! (`application/json`, or no content type) or msgpack (`application/msgpack`), gzip
//! allowed; other content types get 415. The answer is msgpack when the request was, JSON
//! otherwise; a generator is drained and sent as server-sent events (`data: <json>` per
//! item, then `data: [DONE]`). Errors are `{"success": false, "detail": ...}` with the
//! status picked from the error text (§1.4 step 7).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use hypha_core::auth::{self, AuthContext, HttpCaller, Permission, UserInfo};
use hypha_core::codec::{self, CodecError, EncodeContext, ObjectSink, StoredFunction};
use hypha_core::endpoint::{Endpoint, EndpointConfig, Event};
use hypha_core::ids::{random_id, WILDCARD};
use hypha_core::msgpack::{self, DecodeLimits};
use hypha_core::session::{CallOutcome, SessionConfig};
use hypha_core::value::{
    ErrorValue, Function, Generator, LocalFunction, LocalGenerator, Map, PromiseMode, RemoteMethod, Value,
};
use serde_json::{json, Value as Json};
use tokio::sync::mpsc;

use super::router::{LocalInbox, RouteOutcome, RouteSender};
use super::ServerState;

/// Largest request body accepted (after gunzip).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Most items a generator may yield into one HTTP answer.
pub const MAX_STREAM_ITEMS: usize = 100_000;
/// How long a proxied call may take without a heartbeat from the provider (upstream's
/// client `method_timeout`).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames a per-request peer may have waiting.
const PEER_INBOX_FRAMES: usize = 1024;
/// Query and body keys that never reach the function (upstream strips them).
const RESERVED_KEYS: [&str; 4] = ["workspace", "service_id", "function_key", "_mode"];

/// Mounts the proxy routes (after the fixed routes, which take precedence), each wrapped
/// in the HTTP layer (rate limit, CORS).
pub fn configure(state: Arc<ServerState>, layer: &super::layer::HttpLayer, cfg: &mut web::ServiceConfig) {
    let s1 = state.clone();
    let s2 = state.clone();
    let s3 = state;
    cfg.service(web::resource("/{ws}/services").wrap(layer.clone()).route(web::get().to(
        |path: web::Path<String>| async move {
            let ws = path.into_inner();
            HttpResponse::TemporaryRedirect()
                .insert_header((header::LOCATION, format!("/{ws}/services/")))
                .finish()
        },
    )));
    cfg.service(web::resource("/{ws}/services/").wrap(layer.clone()).route(web::get().to(
        move |req: HttpRequest, path: web::Path<String>| {
            let state = s1.clone();
            async move { list_services(&state, &req, &path.into_inner()).await }
        },
    )));
    cfg.service(web::resource("/{ws}/services/{service_id}").wrap(layer.clone()).route(web::get().to(
        move |req: HttpRequest, path: web::Path<(String, String)>| {
            let state = s2.clone();
            async move {
                let (ws, id) = path.into_inner();
                service_info(&state, &req, &ws, &id).await
            }
        },
    )));
    let call = move |req: HttpRequest, path: web::Path<(String, String, String)>, body: web::Bytes| {
        let state = s3.clone();
        async move {
            let (ws, id, key) = path.into_inner();
            call_function(&state, &req, &ws, &id, &key, body).await
        }
    };
    cfg.service(
        web::resource("/{ws}/services/{service_id}/{function_key:.*}")
            .wrap(layer.clone())
            .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
            .route(web::get().to(call.clone()))
            .route(web::post().to(call)),
    );
}

fn failure(status: u16, detail: &str) -> HttpResponse {
    let code = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(code).json(json!({"success": false, "detail": detail}))
}

/// The status for an error text (§1.4 step 7).
pub fn status_for(text: &str) -> u16 {
    let lower = text.to_lowercase();
    if text.contains("KeyError:") || lower.contains("not found") {
        404
    } else if text.contains("PermissionError:") || text.contains("Permission denied") {
        403
    } else if ["TypeError:", "ValueError:", "AssertionError:", "ValidationError:"]
        .iter()
        .any(|t| text.contains(t))
    {
        400
    } else if text.starts_with("Method call timed out:") || text.contains("Method call timed out:") {
        504
    } else {
        500
    }
}

/// `"RemoteException: <last line of the error>"`: the exception line without a traceback.
fn remote_detail(text: &str) -> String {
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(text).trim();
    format!("RemoteException: {last}")
}

fn remote_failure(text: &str) -> HttpResponse {
    failure(status_for(text), &remote_detail(text))
}

/// The HTTP caller (§1.3), or the 401/403 answer.
// The error is the finished HTTP answer, returned once per request: its size does not
// matter, and boxing it would only add an allocation.
#[allow(clippy::result_large_err)]
pub(crate) fn identify(state: &ServerState, req: &HttpRequest) -> Result<HttpCaller, HttpResponse> {
    let revoked = |t: &str| state.revoked.is_revoked(t);
    let cx = AuthContext {
        jwt: &state.config.jwt,
        root_token: state.config.root_token.as_deref(),
        now: auth::unix_seconds(SystemTime::now()),
        revoked: &revoked,
    };
    let headers = req.headers().iter().filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)));
    cx.http_caller(headers).map_err(|e| {
        let code = actix_web::http::StatusCode::from_u16(e.http_status())
            .unwrap_or(actix_web::http::StatusCode::UNAUTHORIZED);
        HttpResponse::build(code).json(json!({"detail": e.to_string()}))
    })
}

/// Whether `ws` names a workspace a proxy request may address.
fn known_workspace(state: &ServerState, ws: &str) -> bool {
    ws != WILDCARD && state.workspaces.contains(ws)
}

fn missing_workspace(ws: &str) -> HttpResponse {
    failure(404, &format!("Workspace {ws} does not exist or is not accessible"))
}

// ---------------------------------------------------------------------------------------
// The per-request peer
// ---------------------------------------------------------------------------------------

/// A short-lived RPC peer for one HTTP request (see the module docs).
pub struct HttpPeer {
    state: Arc<ServerState>,
    endpoint: Endpoint,
    sender: RouteSender,
    inbox: mpsc::Receiver<Bytes>,
}

impl HttpPeer {
    /// Registers `{ws}/client-{random}` in the router, acting as `user`.
    pub fn new(state: Arc<ServerState>, ws: &str, user: &UserInfo) -> HttpPeer {
        let cid = format!("client-{}", random_id());
        let (tx, inbox) = LocalInbox::channel(PEER_INBOX_FRAMES);
        state.router.register_local(ws, &cid, tx);
        let config = EndpointConfig {
            session: SessionConfig { method_timeout: CALL_TIMEOUT, ..SessionConfig::default() },
            server_url: Some(state.public_base_url()),
            ..EndpointConfig::default()
        };
        let mut endpoint = Endpoint::new(config, Some(ws), &cid, Instant::now());
        endpoint.set_manager_id(Some(state.config.manager_id()));
        let sender = RouteSender::new(ws, cid, &user.to_value(), false);
        HttpPeer { state, endpoint, sender, inbox }
    }

    fn flush(&mut self) {
        let now = Instant::now();
        while let Some(frame) = self.endpoint.poll_transmit() {
            if let RouteOutcome::Rejected { reject, .. } = self.state.router.route(&self.sender, &frame, now)
            {
                self.endpoint.handle_frame(now, reject);
            }
        }
    }

    /// Calls `method` with keyword arguments and waits for the outcome (the error text on
    /// failure). Calls back into this peer (callbacks in the result) are refused.
    pub async fn call(
        &mut self,
        method: &RemoteMethod,
        args: Vec<Value>,
        kwargs: Option<Map>,
    ) -> Result<Value, String> {
        let session = self.endpoint.call(Instant::now(), method, args, kwargs).map_err(|e| e.to_string())?;
        loop {
            self.flush();
            while let Some(event) = self.endpoint.poll_event() {
                match event {
                    Event::Settled(s) if s.session == session => {
                        self.flush();
                        return match s.outcome {
                            CallOutcome::Resolved(v) => Ok(v),
                            // A Python provider sends `str(exc)` as the value and the
                            // traceback (ending with `<Type>: <message>`) as the trace.
                            CallOutcome::Rejected(e) => Err(match e.trace.as_deref().map(str::trim) {
                                Some(t) if !t.is_empty() => format!("{}\n{t}", e.message),
                                _ => e.message,
                            }),
                            CallOutcome::Failed(e) => Err(e.to_string()),
                        };
                    }
                    Event::Invoke { reply, .. } | Event::GeneratorNext { reply, .. } => {
                        let e = ErrorValue::new("Exception: callbacks are not supported over the HTTP proxy");
                        self.endpoint.reply(Instant::now(), reply, Err(e));
                    }
                    _ => {}
                }
            }
            self.flush();
            let deadline = self.endpoint.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                frame = self.inbox.recv() => match frame {
                    Some(f) => self.endpoint.handle_frame(Instant::now(), f),
                    None => return Err("Connection is closed".into()),
                },
                _ = sleep => self.endpoint.handle_timeout(Instant::now()),
            }
        }
    }

    /// Calls `services.default.{method}` on the manager.
    pub async fn call_manager(
        &mut self,
        method: &str,
        args: Vec<Value>,
        kwargs: Option<Map>,
    ) -> Result<Value, String> {
        let rm = RemoteMethod {
            target: format!("{WILDCARD}/{}", self.state.config.manager_id()),
            method: format!("services.default.{method}"),
            promise: PromiseMode::Compact,
            ..Default::default()
        };
        self.call(&rm, args, kwargs).await
    }
}

impl Drop for HttpPeer {
    fn drop(&mut self) {
        self.state.router.remove_local(self.sender.workspace(), self.sender.client_id());
    }
}

// ---------------------------------------------------------------------------------------
// Values in and out
// ---------------------------------------------------------------------------------------

/// JSON from an HTTP request as a wire value (canonical ints; core's serde conversion).
fn json_to_value(j: &Json) -> Value {
    hypha_core::serde_value::to_value(j).unwrap_or(Value::Nil)
}

/// A wire value as JSON: bytes become (lossy UTF-8) strings, non-finite floats `null`.
fn to_json(v: &Value) -> Json {
    match v {
        Value::Nil => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::UInt(u) => Json::from(*u),
        Value::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(Json::Null, Json::Number),
        Value::F64(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Str(s) => Json::String(s.clone()),
        Value::Bytes(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        Value::List(l) => Json::Array(l.iter().map(to_json).collect()),
        Value::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        other => Json::String(format!("<{}>", other.kind())),
    }
}

/// An [`ObjectSink`] that refuses to export anything: results sent over HTTP cannot
/// carry callables.
struct NoExport;

impl ObjectSink for NoExport {
    fn store_function(&mut self, _: Option<&str>, _: &LocalFunction) -> Result<StoredFunction, CodecError> {
        Err(CodecError::Other("functions cannot be sent over HTTP".into()))
    }

    fn store_generator(
        &mut self,
        _: Option<&str>,
        _: &LocalGenerator,
    ) -> Result<(String, String), CodecError> {
        Err(CodecError::Other("generators cannot be sent over HTTP".into()))
    }

    fn register_interface(
        &mut self,
        _: Option<&str>,
        _: Vec<(String, LocalFunction)>,
    ) -> Result<String, CodecError> {
        Err(CodecError::Other("interfaces cannot be sent over HTTP".into()))
    }

    fn store_forwarder(&mut self, _: Option<&str>, _: &RemoteMethod) -> Result<String, CodecError> {
        Err(CodecError::Other("functions cannot be sent over HTTP".into()))
    }
}

/// A decoded result in wire form (ndarrays as `_rtype` maps, as upstream's codec sends
/// them); remote functions become their descriptors.
fn to_wire(v: &Value, server: Option<&str>) -> Value {
    let registry = hypha_core::CodecRegistry::new();
    let mut sink = NoExport;
    let mut cx = EncodeContext::new("http", &registry, &mut sink);
    cx.server = server;
    codec::encode(v, &mut cx).unwrap_or_else(|e| Value::from(format!("<{e}>")))
}

/// Normalises one GET query value (§1.4 step 1).
fn query_value(s: &str) -> Value {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Int(i);
        }
    }
    if let Ok(f) = s.trim().parse::<f64>() {
        return Value::F64(f);
    }
    if s.starts_with('{') {
        if let Ok(j) = serde_json::from_str::<Json>(s) {
            return json_to_value(&j);
        }
    }
    Value::from(s)
}

/// The keyword arguments of a request: the query (GET) or the body (POST).
// The error is the finished HTTP answer, returned once per request: its size does not
// matter, and boxing it would only add an allocation.
#[allow(clippy::result_large_err)]
fn kwargs_of(req: &HttpRequest, body: &[u8]) -> Result<(Map, bool), HttpResponse> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
    let is_msgpack = content_type.as_deref() == Some("application/msgpack");
    let mut kwargs = Map::new();
    if req.method() == actix_web::http::Method::GET {
        let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .map_err(|e| failure(400, &format!("Invalid query string: {e}")))?;
        for (k, v) in pairs.into_inner() {
            if !RESERVED_KEYS.contains(&k.as_str()) {
                kwargs.insert(k, query_value(&v));
            }
        }
        return Ok((kwargs, is_msgpack));
    }
    if body.is_empty() {
        return Ok((kwargs, is_msgpack));
    }
    let value = match content_type.as_deref() {
        None | Some("application/json") => match serde_json::from_slice::<Json>(body) {
            Ok(j) => json_to_value(&j),
            Err(e) => return Err(failure(400, &format!("Invalid request body: {e}"))),
        },
        Some("application/msgpack") => {
            let bytes = Bytes::copy_from_slice(body);
            match msgpack::decode(&bytes, 0, &DecodeLimits::default()) {
                Ok((v, _)) => v,
                Err(e) => return Err(failure(400, &format!("Invalid request body: {e}"))),
            }
        }
        Some(other) => return Err(failure(415, &format!("Unsupported Content-Type: {other}"))),
    };
    match value {
        Value::Map(m) => {
            for (k, v) in m {
                if !RESERVED_KEYS.contains(&k.as_str()) {
                    kwargs.insert(k, v);
                }
            }
        }
        Value::List(items) => {
            for (i, v) in items.into_iter().enumerate() {
                kwargs.insert(i.to_string(), v);
            }
        }
        v => {
            kwargs.insert("0".into(), v);
        }
    }
    Ok((kwargs, is_msgpack))
}

fn respond(value: &Value, msgpack_out: bool, server: Option<&str>) -> HttpResponse {
    let wire = to_wire(value, server);
    if msgpack_out {
        match msgpack::encode_to_vec(&wire) {
            Ok(bytes) => HttpResponse::Ok().content_type("application/msgpack").body(bytes),
            Err(e) => failure(500, &format!("Cannot encode the result: {e}")),
        }
    } else {
        HttpResponse::Ok().json(to_json(&wire))
    }
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

/// The workspace a proxied call runs in (§1.4 step 2).
// The error is the finished HTTP answer, returned once per request: its size does not
// matter, and boxing it would only add an allocation.
#[allow(clippy::result_large_err)]
fn context_workspace(state: &ServerState, caller: &HttpCaller, url_ws: &str) -> Result<String, HttpResponse> {
    let user = &caller.user;
    let mut target =
        user.scope.current_workspace.clone().unwrap_or_else(|| auth::ANONYMOUS_WORKSPACE.to_owned());
    if !caller.workspace_from_token && !user.is_anonymous && url_ws != target {
        if !state.workspaces.contains(url_ws) {
            return Err(failure(404, &format!("Workspace '{url_ws}' not found")));
        }
        if url_ws == auth::PUBLIC_WORKSPACE {
            target = url_ws.to_owned();
        } else {
            let owner = url_ws == user.personal_workspace()
                || state.workspaces.get(url_ws).is_some_and(|r| {
                    r.owners.iter().any(|o| *o == user.id || user.email.as_deref() == Some(o.as_str()))
                });
            if owner || user.check(url_ws, Permission::Read) {
                target = url_ws.to_owned();
            }
        }
    }
    Ok(target)
}

async fn call_function(
    state: &Arc<ServerState>,
    req: &HttpRequest,
    url_ws: &str,
    service_id: &str,
    function_key: &str,
    body: web::Bytes,
) -> HttpResponse {
    let caller = match identify(state, req) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let (kwargs, msgpack_out) = match kwargs_of(req, &body) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let ctx_ws = match context_workspace(state, &caller, url_ws) {
        Ok(ws) => ws,
        Err(resp) => return resp,
    };
    if !state.workspaces.contains(&ctx_ws) && ctx_ws != auth::ANONYMOUS_WORKSPACE {
        return missing_workspace(&ctx_ws);
    }
    let mode = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.into_inner().into_iter().find(|(k, _)| k == "_mode").map(|(_, v)| v));
    state.manager();
    let mut peer = HttpPeer::new(state.clone(), &ctx_ws, &caller.user);
    let server = state.public_base_url();

    // The manager itself (`ws` or `~`): its methods are top-level.
    let target = if service_id == "ws" || service_id == hypha_core::ids::MANAGER_ALIAS {
        if function_key.contains('.') {
            return failure(404, &format!("{function_key} not found."));
        }
        Value::Function(Box::new(Function::Remote(RemoteMethod {
            target: format!("{WILDCARD}/{}", state.config.manager_id()),
            method: format!("services.default.{function_key}"),
            promise: PromiseMode::Compact,
            ..Default::default()
        })))
    } else {
        let mut config = Map::new();
        if let Some(m) = mode {
            config.insert("mode".into(), Value::from(m));
        }
        let id = format!("{url_ws}/{service_id}");
        let svc =
            match peer.call_manager("get_service", vec![Value::from(id), Value::Map(config)], None).await {
                Ok(svc) => svc,
                Err(e) => return remote_failure(&e),
            };
        let mut node = &svc;
        for part in function_key.split('.') {
            match node.as_map().and_then(|m| m.get(part)) {
                Some(v) => node = v,
                None => return failure(404, &format!("{function_key} not found.")),
            }
        }
        node.clone()
    };
    let method = match target {
        Value::Function(f) => match *f {
            Function::Remote(rm) => rm,
            Function::Local(_) => return failure(500, "a local function cannot be called over HTTP"),
        },
        other => return respond(&other, msgpack_out, Some(&server)),
    };
    let kwargs = (!kwargs.is_empty()).then_some(kwargs);
    let result = match peer.call(&method, Vec::new(), kwargs).await {
        Ok(v) => v,
        Err(e) => return remote_failure(&e),
    };
    match result {
        Value::Generator(g) => match *g {
            Generator::Remote(rg) => stream_generator(&mut peer, &rg, msgpack_out, &server).await,
            Generator::Local(_) => failure(500, "a local generator cannot be streamed"),
        },
        other => respond(&other, msgpack_out, Some(&server)),
    }
}

/// Drains a remote generator into a server-sent-events (JSON) or concatenated-msgpack body.
async fn stream_generator(
    peer: &mut HttpPeer,
    g: &hypha_core::value::RemoteGenerator,
    msgpack_out: bool,
    server: &str,
) -> HttpResponse {
    let next = hypha_core::endpoint::generator_next_method(g);
    let mut body: Vec<u8> = Vec::new();
    let mut items = 0;
    let push = |body: &mut Vec<u8>, v: &Value| {
        if msgpack_out {
            let _ = msgpack::encode(v, body);
        } else {
            body.extend_from_slice(b"data: ");
            body.extend_from_slice(to_json(v).to_string().as_bytes());
            body.extend_from_slice(b"\n\n");
        }
    };
    loop {
        match peer.call(&next, Vec::new(), None).await {
            Ok(v) if v.is_stop_iteration() => break,
            Ok(v) => {
                push(&mut body, &to_wire(&v, Some(server)));
                items += 1;
                if items >= MAX_STREAM_ITEMS || body.len() > MAX_BODY_BYTES * 4 {
                    let close = hypha_core::endpoint::generator_close_method(g);
                    let _ = peer.call(&close, Vec::new(), None).await;
                    break;
                }
            }
            Err(e) => {
                let err = Value::Map(
                    [
                        ("error".to_owned(), Value::from(remote_detail(&e))),
                        ("traceback".to_owned(), Value::from(e)),
                    ]
                    .into_iter()
                    .collect(),
                );
                push(&mut body, &err);
                break;
            }
        }
    }
    if msgpack_out {
        HttpResponse::Ok().content_type("application/msgpack").body(body)
    } else {
        body.extend_from_slice(b"data: [DONE]\n\n");
        HttpResponse::Ok()
            .content_type("text/event-stream; charset=utf-8")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            // Upstream's streaming answer sets these itself (the CORS layer then echoes a
            // request Origin over the `*`).
            .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
            .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, "Cache-Control"))
            .body(body)
    }
}

async fn list_services(state: &Arc<ServerState>, req: &HttpRequest, ws: &str) -> HttpResponse {
    let caller = match identify(state, req) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if !known_workspace(state, ws) {
        return missing_workspace(ws);
    }
    state.manager();
    let mut peer = HttpPeer::new(state.clone(), ws, &caller.user);
    match peer.call_manager("list_services", vec![Value::Nil], None).await {
        Ok(Value::List(records)) => {
            let out: Vec<Json> = records
                .into_iter()
                .map(|r| {
                    let mut j = to_json(&r);
                    if let Some(id) = j.get("id").and_then(Json::as_str).map(str::to_owned) {
                        let short = id.rsplit_once('/').map_or(id.as_str(), |(_, s)| s).to_owned();
                        j["id"] = Json::String(short);
                    }
                    j
                })
                .collect();
            HttpResponse::Ok().json(out)
        }
        Ok(other) => failure(500, &format!("unexpected listing: {}", other.kind())),
        Err(e) => remote_failure(&e),
    }
}

async fn service_info(
    state: &Arc<ServerState>,
    req: &HttpRequest,
    ws: &str,
    service_id: &str,
) -> HttpResponse {
    let caller = match identify(state, req) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if !known_workspace(state, ws) {
        return missing_workspace(ws);
    }
    let mode = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.into_inner().into_iter().find(|(k, _)| k == "_mode").map(|(_, v)| v));
    let mut config = Map::new();
    if let Some(m) = mode {
        config.insert("mode".into(), Value::from(m));
    }
    let id = if service_id == "ws" {
        hypha_core::ids::MANAGER_ALIAS.to_owned()
    } else {
        format!("{ws}/{service_id}")
    };
    state.manager();
    let mut peer = HttpPeer::new(state.clone(), ws, &caller.user);
    match peer.call_manager("get_service_info", vec![Value::from(id), Value::Map(config)], None).await {
        Ok(info) => HttpResponse::Ok().json(to_json(&info)),
        Err(e) => {
            let status = if status_for(&e) == 403 { 403 } else { 404 };
            failure(status, &remote_detail(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_normalised_like_upstream() {
        assert_eq!(query_value("3345"), Value::Int(3345));
        assert_eq!(query_value("007"), Value::Int(7));
        assert_eq!(query_value("-1"), Value::F64(-1.0));
        assert_eq!(query_value("1.5"), Value::F64(1.5));
        assert_eq!(query_value("1e3"), Value::F64(1000.0));
        assert_eq!(query_value("true"), Value::from("true"));
        assert_eq!(query_value("[1,2]"), Value::from("[1,2]"));
        assert_eq!(
            query_value(r#"{"a":1}"#),
            Value::Map([("a".to_owned(), Value::Int(1))].into_iter().collect())
        );
        assert_eq!(query_value("{bad"), Value::from("{bad"));
    }

    #[test]
    fn error_texts_map_to_statuses() {
        assert_eq!(status_for("KeyError: 'Service not found: W/*:x@*'"), 404);
        assert_eq!(status_for("Exception: thing not found here"), 404);
        assert_eq!(status_for("PermissionError: nope"), 403);
        assert_eq!(status_for("ValueError: bad value"), 400);
        assert_eq!(
            status_for("Traceback ...\nTypeError: add() missing 1 required positional argument: 'a'"),
            400
        );
        assert_eq!(status_for("Method call timed out: W/c:services.x.f"), 504);
        assert_eq!(status_for("RuntimeError: runtime"), 500);
        assert_eq!(
            remote_detail("Traceback (most recent call last):\n  x\nValueError: bad value\n"),
            "RemoteException: ValueError: bad value"
        );
    }

    #[test]
    fn results_convert_to_json_and_wire() {
        let v = Value::List(vec![Value::Nil, Value::F64(f64::NAN), Value::Bytes(Bytes::from_static(b"ab"))]);
        assert_eq!(to_json(&v), json!([null, null, "ab"]));
        let arr = hypha_core::NdArray {
            dtype: hypha_core::DType::Float64,
            shape: vec![1],
            data: Bytes::from(1.5f64.to_le_bytes().to_vec()),
        };
        let wire = to_wire(&Value::from(arr), None);
        assert_eq!(wire.as_map().unwrap()["_rtype"], Value::from("ndarray"));
    }
}
