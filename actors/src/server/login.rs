//! The login service `public/hypha-login` (server spec §6.5) and its page.
//!
//! Upstream runs an RPC client inside the server at `public/{server_id}` that registers
//! the public service `hypha-login`; `hypha_rpc.login()` and `get_remote_service(
//! ".../public/services/hypha-login")` use it like any other service. This module does the
//! same with [`LoginService`], a second native peer built like the workspace manager (one
//! actor driving a sans-IO [`Endpoint`], frames through a bounded [`LocalInbox`]):
//!
//! * `start(workspace=None, expires_in=None)` opens a login session (a random key, kept
//!   [`MAXIMUM_LOGIN_TIME`]) and returns the URLs of the page and of `report`/`check`;
//! * the page (`/public/apps/hypha-login/?key=K`) lets the user hand over a token, which it
//!   sends to `report(key, token, ...)`; `report` only accepts tokens this server can
//!   verify (and re-signs one for `workspace` when asked);
//! * `check(key, timeout=180, profile=False)` waits for the report and returns the token
//!   (or the whole record). The endpoint heartbeats the caller while it waits, so a long
//!   `check` outlives the caller's own method timeout.
//!
//! The page is a plain form (no identity provider is wired in): paste a token issued by
//! this server, e.g. one from `generate_token`. Login sessions live in memory, bounded in
//! number ([`MAX_LOGIN_SESSIONS`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use hypha_core::auth::{self, Permission};
use hypha_core::endpoint::{Endpoint, EndpointConfig, Event, ReplyTo};
use hypha_core::ids::{random_id, ServiceId};
use hypha_core::schema::{self, Param, ParamType};
use hypha_core::session::{SessionConfig, BUILTIN_SERVICE_ID};
use hypha_core::value::{Handler as FnHandler, Map, Value};
use serde_json::{json, Value as Json};

use super::manager::{bind, opt, p, p_default, unix_now, Args, ManagerError};
use super::peer::NativePeer;
use super::registry::ServiceRecord;
use super::router::{LocalInbox, RouteSender, LOCAL_INBOX_FRAMES};
use super::ServerState;

/// The service id.
pub const LOGIN_SERVICE_ID: &str = "hypha-login";
/// How long a login session waits for its report (upstream `MAXIMUM_LOGIN_TIME`).
pub const MAXIMUM_LOGIN_TIME: Duration = Duration::from_secs(180);
/// Most login sessions open at once.
pub const MAX_LOGIN_SESSIONS: usize = 10_000;
/// Longest `check` wait a caller may ask for.
pub const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a waiting `check` looks for the report.
const CHECK_POLL: Duration = Duration::from_millis(100);
/// The fields `report` stores, in the order `check(profile=True)` returns them.
const RECORD_FIELDS: [&str; 9] =
    ["token", "workspace", "expires_in", "email", "email_verified", "name", "nickname", "user_id", "picture"];

/// One login session.
#[derive(Debug)]
struct LoginSession {
    /// When it is forgotten (reset by `report`).
    expires: Instant,
    /// What `report` stored.
    record: Option<Map>,
}

/// The open login sessions, shared with the futures of waiting `check`s.
#[derive(Debug, Default)]
struct Sessions {
    inner: Mutex<HashMap<String, LoginSession>>,
}

impl Sessions {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, LoginSession>) -> R) -> R {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        f(&mut map)
    }
}

/// What `check` found.
enum Checked {
    /// The session exists, nothing reported yet.
    Waiting,
    /// Reported: the record (the session is consumed).
    Reported(Map),
    /// No such session.
    Missing,
}

impl Sessions {
    fn check(&self, key: &str) -> Checked {
        self.with(|m| match m.get(key).map(|s| s.record.is_some()) {
            None => Checked::Missing,
            Some(false) => Checked::Waiting,
            Some(true) => m.remove(key).and_then(|s| s.record).map_or(Checked::Missing, Checked::Reported),
        })
    }
}

/// The functions of `hypha-login`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoginFn {
    Start,
    Check,
    Report,
    Index,
    Profile,
    Logout,
}

const FUNCTIONS: [LoginFn; 6] =
    [LoginFn::Start, LoginFn::Check, LoginFn::Report, LoginFn::Index, LoginFn::Profile, LoginFn::Logout];

fn signature(f: LoginFn) -> (&'static str, &'static str, Vec<Param>) {
    use ParamType::{Any, Boolean, Number, Object, String as Str};
    let text = |name: &str, what: &str| p_default(name, opt(Str), Json::Null, what);
    match f {
        LoginFn::Start => (
            "start",
            "Start a login session; returns the login page URL and the session key.",
            vec![
                text("workspace", "Workspace the token should be for"),
                p_default("expires_in", opt(Number), Json::Null, "Token lifetime in seconds"),
            ],
        ),
        LoginFn::Check => (
            "check",
            "Wait for the login of a session and return its token.",
            vec![
                p("key", Str, "The session key"),
                p_default("timeout", Number, json!(180), "Seconds to wait (<= 0: do not wait)"),
                p_default("profile", Boolean, json!(false), "Return the whole record instead of the token"),
            ],
        ),
        LoginFn::Report => (
            "report",
            "Report the token of a login session.",
            vec![
                p("key", Str, "The session key"),
                p("token", Str, "A token issued by this server"),
                text("workspace", "Workspace the token should be for"),
                p_default("expires_in", opt(Number), Json::Null, "Token lifetime in seconds"),
                text("email", "Email"),
                p_default("email_verified", Any, Json::Null, "Whether the email is verified"),
                text("name", "Name"),
                text("nickname", "Nickname"),
                text("user_id", "User id"),
                text("picture", "Picture URL"),
            ],
        ),
        LoginFn::Index => (
            "index",
            "The login page.",
            vec![Param::new("event", Object(None)).description("The HTTP request")],
        ),
        LoginFn::Profile => (
            "profile",
            "Redirect to the profile page.",
            vec![Param::new("event", Object(None)).description("The HTTP request")],
        ),
        LoginFn::Logout => (
            "logout",
            "The URL that logs the browser out.",
            vec![p_default("config", opt(Object(None)), Json::Null, "Options")],
        ),
    }
}

/// A string argument where `""` (what the login page sends for an empty field) means none.
fn given(v: Value) -> Value {
    match v {
        Value::Str(s) if s.is_empty() => Value::Nil,
        other => other,
    }
}

/// The login page: a form that sends a token to `report` (placeholders filled in).
pub fn login_page(public_url: &str) -> String {
    let report = format!("{public_url}/public/services/{LOGIN_SERVICE_ID}/report");
    LOGIN_PAGE.replace("__REPORT_URL__", &report)
}

const LOGIN_PAGE: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Hypha Account</title>
<style>
body { font-family: sans-serif; max-width: 36em; margin: 3em auto; padding: 0 1em; }
textarea { width: 100%; height: 8em; }
#status { margin-top: 1em; }
</style>
</head>
<body>
<h1>Hypha Account</h1>
<p>Paste a token issued by this server (for example one made with <code>generate_token()</code>)
to complete the login of the waiting client.</p>
<form id="login">
<textarea id="token" placeholder="token" required></textarea>
<p><label>Email (optional) <input id="email" type="email"></label></p>
<button type="submit">Log in</button>
</form>
<div id="status"></div>
<script>
const params = new URLSearchParams(window.location.search);
const key = params.get("key");
const status = document.getElementById("status");
if (!key) { status.textContent = "This page needs a login key (?key=...)."; }
document.getElementById("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  const q = new URLSearchParams({
    key: key || "",
    token: document.getElementById("token").value.trim(),
    workspace: params.get("workspace") || "",
    expires_in: params.get("expires_in") || "",
    email: document.getElementById("email").value.trim(),
  });
  const r = await fetch("__REPORT_URL__?" + q.toString());
  if (r.ok) {
    status.textContent = "Logged in: you can close this window.";
    if (params.get("redirect")) { window.location = params.get("redirect"); }
  } else {
    const body = await r.json().catch(() => ({}));
    status.textContent = "Login failed: " + (body.detail || r.status);
  }
});
</script>
</body>
</html>
"#;

/// The page's routes: `/public/apps/hypha-login/[index]` (the page), `.../profile`
/// (302 to the page), `/public/apps/hypha-login` and `/login` (307 to the page), each
/// wrapped in the HTTP layer (`layer`; the page itself gets the rate limit only).
pub fn configure(state: Arc<ServerState>, layer: &super::layer::HttpLayer, cfg: &mut web::ServiceConfig) {
    let page_path = format!("/public/apps/{LOGIN_SERVICE_ID}/");
    let redirect_to = page_path.clone();
    cfg.service(web::resource("/login").wrap(layer.clone()).route(web::get().to(move || {
        let to = redirect_to.clone();
        async move { HttpResponse::TemporaryRedirect().insert_header((header::LOCATION, to)).finish() }
    })));
    let redirect_to = page_path.clone();
    cfg.service(web::resource(format!("/public/apps/{LOGIN_SERVICE_ID}")).wrap(layer.clone()).route(
        web::get().to(move || {
            let to = redirect_to.clone();
            async move { HttpResponse::TemporaryRedirect().insert_header((header::LOCATION, to)).finish() }
        }),
    ));
    // The page is a "functions" app: upstream's apps middleware answers it outside the CORS
    // layer, with the five CORS headers below instead.
    let app_layer = super::layer::HttpLayer::rate_limit_only(&state);
    cfg.service(web::resource(format!("/public/apps/{LOGIN_SERVICE_ID}/{{path:.*}}")).wrap(app_layer).route(
        web::get().to(move |req: HttpRequest, path: web::Path<String>| {
            let state = state.clone();
            async move {
                let public = state.public_base_url();
                let origin =
                    req.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()).unwrap_or("*").to_owned();
                let resp = match path.trim_matches('/') {
                    "" | "index" => HttpResponse::Ok().content_type("text/html").body(login_page(&public)),
                    "profile" => HttpResponse::Found()
                        .insert_header((header::LOCATION, format!("{public}/public/apps/{LOGIN_SERVICE_ID}")))
                        .body("Redirecting to profile page..."),
                    other => HttpResponse::NotFound()
                        .content_type("text/plain")
                        .body(format!("Function not found: {other}")),
                };
                let mut resp = resp;
                let h = resp.headers_mut();
                let pairs = [
                    ("access-control-allow-credentials", "true".to_owned()),
                    ("access-control-allow-origin", origin),
                    ("access-control-allow-methods", "GET,POST,PUT,DELETE,OPTIONS".to_owned()),
                    ("access-control-allow-headers", "Authorization,Content-Type".to_owned()),
                    ("access-control-expose-headers", "Content-Disposition".to_owned()),
                ];
                for (k, v) in pairs {
                    if let Ok(v) = header::HeaderValue::from_str(&v) {
                        h.insert(header::HeaderName::from_static(k), v);
                    }
                }
                resp
            }
        }),
    ));
}

/// The login service actor (see the module docs).
pub struct LoginService {
    state: Arc<ServerState>,
    endpoint: Endpoint,
    sender: RouteSender,
    timer: Option<(Instant, SpawnHandle)>,
    inbox: Option<tokio::sync::mpsc::Receiver<Bytes>>,
    sessions: Arc<Sessions>,
}

impl LoginService {
    /// Registers `public/{server_id}` with its `built-in` and `hypha-login` services (router
    /// and registry) and starts the actor in `arbiter`.
    pub fn start_in(state: Arc<ServerState>, arbiter: &ArbiterHandle) -> Addr<LoginService> {
        let service = LoginService::new(state);
        Actor::start_in_arbiter(arbiter, move |_| service)
    }

    /// [`LoginService::start_in`] in the current arbiter.
    pub fn start(state: Arc<ServerState>) -> Addr<LoginService> {
        Actor::start(LoginService::new(state))
    }

    fn new(state: Arc<ServerState>) -> LoginService {
        let ws = auth::PUBLIC_WORKSPACE;
        let cid = state.config.server_id.clone();
        let (inbox, rx) = LocalInbox::channel(LOCAL_INBOX_FRAMES);
        state.router.register_local(ws, &cid, inbox);
        let config = EndpointConfig {
            session: SessionConfig::default(),
            server_url: Some(state.public_base_url()),
            ..EndpointConfig::default()
        };
        let mut endpoint = Endpoint::new(config, Some(ws), &cid, Instant::now());
        endpoint.set_manager_id(Some(state.config.manager_id()));
        let api = Self::api();
        if let Err(e) = endpoint.register_service(api, true) {
            tracing::error!(error = %e, "cannot register the login service");
        }
        let root = auth::internal_root_user();
        for id in [BUILTIN_SERVICE_ID, LOGIN_SERVICE_ID] {
            let Some(svc) = endpoint.table().service(id) else { continue };
            let mut reg = svc.api.clone();
            let skip_context = svc.config.skip_context_in_schema();
            let schema = schema::service_schema_value(&Value::Map(reg.clone()), skip_context);
            reg.insert("service_schema".into(), schema);
            let created_by = if id == BUILTIN_SERVICE_ID {
                root.to_value()
            } else {
                Value::Map([("id".to_owned(), Value::from(auth::ROOT_USER_ID))].into_iter().collect())
            };
            let record = ServiceId::new(ws, &cid, id, None)
                .map_err(|e| ManagerError::Value(e.to_string()))
                .and_then(|sid| ServiceRecord::from_registration(&reg, &sid, created_by));
            match record {
                Ok(r) => {
                    state.registry.upsert(r);
                }
                Err(e) => tracing::error!(error = %e, service = id, "cannot record a native service"),
            }
        }
        let sender =
            RouteSender { workspace: ws.to_owned(), client_id: cid, user: root.to_value(), read_only: false };
        LoginService { state, endpoint, sender, timer: None, inbox: Some(rx), sessions: Arc::default() }
    }

    fn api() -> Map {
        let mut config = Map::new();
        config.insert("visibility".into(), Value::from("public"));
        config.insert("require_context".into(), Value::Bool(false));
        let mut api = Map::new();
        api.insert("id".into(), Value::from(LOGIN_SERVICE_ID));
        api.insert("name".into(), Value::from("Hypha Login"));
        api.insert(
            "description".into(),
            Value::from("Login service for Hypha: exchanges a token between a browser and a waiting client."),
        );
        api.insert("type".into(), Value::from("functions"));
        api.insert("config".into(), Value::Map(config));
        super::manager::describe_functions(&mut api, &FUNCTIONS, signature);
        api
    }

    fn reply(&mut self, reply: ReplyTo, result: Result<Value, ManagerError>) {
        self.endpoint.reply(Instant::now(), reply, result.map_err(|e| e.to_error_value()));
    }

    fn invoke(
        &mut self,
        ctx: &mut Context<Self>,
        handler: &FnHandler,
        args: Vec<Value>,
        kwargs: Option<Map>,
        reply: ReplyTo,
    ) {
        let Some(&f) = handler.downcast_ref::<LoginFn>() else {
            let e = ManagerError::Other(format!("Method not found: {}", reply.method()));
            return self.reply(reply, Err(e));
        };
        let (name, _, params) = signature(f);
        let values = match bind(name, &params, args, kwargs) {
            Ok(v) => v,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let mut a = Args { name, values };
        let public = self.state.public_base_url();
        let result = match f {
            LoginFn::Start => self.start_session(&mut a, &public),
            LoginFn::Report => self.report(&mut a),
            LoginFn::Index => Ok(http_result(200, "text/html", Value::from(login_page(&public)))),
            LoginFn::Profile => {
                let mut r = http_result(302, "text/plain", Value::from("Redirecting to profile page..."));
                if let Some(Value::Map(h)) = r.as_map_mut().and_then(|m| m.get_mut("headers")) {
                    h.insert(
                        "Location".into(),
                        Value::from(format!("{public}/public/apps/{LOGIN_SERVICE_ID}")),
                    );
                }
                Ok(r)
            }
            LoginFn::Logout => {
                let url = format!("{public}/public/apps/{LOGIN_SERVICE_ID}/?logout=true&close=true");
                Ok(Value::Map([("logout_url".to_owned(), Value::from(url))].into_iter().collect()))
            }
            LoginFn::Check => return self.check(ctx, &mut a, reply),
        };
        self.reply(reply, result);
    }

    fn start_session(&mut self, a: &mut Args, public: &str) -> Result<Value, ManagerError> {
        let workspace = a.opt_string(0, "workspace")?.filter(|w| !w.is_empty());
        let expires_in = given(a.take(1)).as_f64();
        let key = random_id();
        let stored = self.sessions.with(|m| {
            if m.len() >= MAX_LOGIN_SESSIONS {
                return false;
            }
            m.insert(
                key.clone(),
                LoginSession { expires: Instant::now() + MAXIMUM_LOGIN_TIME, record: None },
            );
            true
        });
        if !stored {
            return Err(ManagerError::Runtime(format!(
                "Too many login sessions in progress (at most {MAX_LOGIN_SESSIONS})"
            )));
        }
        let base = format!("{public}/public/services/{LOGIN_SERVICE_ID}");
        let mut login_url = format!("{public}/public/apps/{LOGIN_SERVICE_ID}/?key={key}");
        if let Some(ws) = &workspace {
            login_url.push_str(&format!("&workspace={ws}"));
        }
        if let Some(e) = expires_in {
            login_url.push_str(&format!("&expires_in={e}"));
        }
        let mut m = Map::new();
        m.insert("login_url".into(), Value::from(login_url));
        m.insert("key".into(), Value::from(key));
        m.insert("report_url".into(), Value::from(format!("{base}/report")));
        m.insert("check_url".into(), Value::from(format!("{base}/check")));
        m.insert("generate_url".into(), Value::from(format!("{base}/generate")));
        Ok(Value::Map(m))
    }

    fn report(&mut self, a: &mut Args) -> Result<Value, ManagerError> {
        let key = a.string(0, "key")?;
        let token = a.string(1, "token")?;
        if !self.sessions.with(|m| m.contains_key(&key)) {
            return Err(ManagerError::Assertion("Invalid key, key does not exist or expired".into()));
        }
        let revoked = |t: &str| self.state.revoked.is_revoked(t);
        let jwt = &self.state.config.jwt;
        let user = auth::AuthContext {
            jwt,
            root_token: self.state.config.root_token.as_deref(),
            now: unix_now(),
            revoked: &revoked,
        }
        .parse(&token)
        .map_err(|e| {
            ManagerError::Value(format!(
                "Invalid token provided to report_login: 401: {e}. The token must be a valid JWT token signed by this server or an external authentication provider (e.g., Auth0). Arbitrary strings are not accepted for security reasons."
            ))
        })?;
        let workspace = match given(a.take(2)) {
            Value::Str(s) => Some(s),
            _ => None,
        };
        let expires_in = given(a.take(3));
        let mut record = Map::new();
        let token = match &workspace {
            None => token,
            Some(ws) => {
                let owner = *ws == user.personal_workspace()
                    || self.state.workspaces.get(ws).is_some_and(|r| {
                        r.owners.iter().any(|o| *o == user.id || user.email.as_deref() == Some(o.as_str()))
                    });
                if !owner && !user.check(ws, Permission::Read) {
                    return Err(ManagerError::Other(format!("Invalid permission for the workspace {ws}")));
                }
                let mut user = user.clone();
                if owner && !user.scope.workspaces.contains_key(ws) {
                    user.scope.workspaces.insert(ws.clone(), Permission::Admin);
                }
                user.scope.current_workspace = Some(ws.clone());
                user.current_workspace = Some(ws.clone());
                let life = expires_in.as_f64().unwrap_or(auth::DEFAULT_TOKEN_LIFE_TIME);
                jwt.encode(&user, life, unix_now()).map_err(|e| ManagerError::Runtime(e.to_string()))?
            }
        };
        record.insert("token".into(), Value::from(token));
        record.insert("workspace".into(), Value::from(workspace));
        record.insert("expires_in".into(), expires_in);
        for (i, field) in RECORD_FIELDS.iter().enumerate().skip(3) {
            record.insert((*field).into(), given(a.take(i + 1)));
        }
        let stored = self.sessions.with(|m| match m.get_mut(&key) {
            Some(s) => {
                s.record = Some(record);
                s.expires = Instant::now() + MAXIMUM_LOGIN_TIME;
                true
            }
            None => false,
        });
        if !stored {
            return Err(ManagerError::Assertion("Invalid key, key does not exist or expired".into()));
        }
        Ok(Value::Nil)
    }

    fn check(&mut self, ctx: &mut Context<Self>, a: &mut Args, reply: ReplyTo) {
        let key = match a.string(0, "key") {
            Ok(k) => k,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let timeout = a.take(1).as_f64().unwrap_or(MAXIMUM_LOGIN_TIME.as_secs_f64());
        let profile = a.bool(2);
        let result = move |record: Map| -> Value {
            if profile {
                Value::Map(record)
            } else {
                record.get("token").cloned().unwrap_or(Value::Nil)
            }
        };
        let missing = || ManagerError::Assertion("Invalid key, key does not exist".into());
        match self.sessions.check(&key) {
            Checked::Missing => return self.reply(reply, Err(missing())),
            Checked::Reported(record) => return self.reply(reply, Ok(result(record))),
            Checked::Waiting if timeout <= 0.0 => return self.reply(reply, Ok(Value::Nil)),
            Checked::Waiting => {}
        }
        let wait = Duration::try_from_secs_f64(timeout).unwrap_or(MAX_CHECK_TIMEOUT).min(MAX_CHECK_TIMEOUT);
        let sessions = self.sessions.clone();
        let shown = if timeout.fract() == 0.0 { format!("{}", timeout as i64) } else { timeout.to_string() };
        let fut = async move {
            let end = Instant::now() + wait;
            loop {
                tokio::time::sleep(CHECK_POLL.min(end.saturating_duration_since(Instant::now()))).await;
                match sessions.check(&key) {
                    Checked::Reported(record) => return Ok(record),
                    Checked::Missing => {
                        return Err(ManagerError::Assertion("Invalid key, key does not exist".into()))
                    }
                    Checked::Waiting if Instant::now() >= end => {
                        return Err(ManagerError::Other(format!(
                            "Login timeout, waited for {shown} seconds"
                        )));
                    }
                    Checked::Waiting => {}
                }
            }
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.reply(reply, res.map(result));
            act.drive(ctx);
        }));
    }
}

/// `{"status", "headers": {"Content-Type"}, "body"}`: the answer of a `functions` service.
fn http_result(status: u16, content_type: &str, body: Value) -> Value {
    let mut headers = Map::new();
    headers.insert("Content-Type".into(), Value::from(content_type));
    let mut m = Map::new();
    m.insert("status".into(), Value::from(status));
    m.insert("headers".into(), Value::Map(headers));
    m.insert("body".into(), body);
    Value::Map(m)
}

impl NativePeer for LoginService {
    const LABEL: &'static str = "hypha-login";

    fn parts(&mut self) -> (&mut Endpoint, &ServerState, &RouteSender) {
        (&mut self.endpoint, &self.state, &self.sender)
    }

    fn timer(&mut self) -> &mut Option<(Instant, SpawnHandle)> {
        &mut self.timer
    }

    fn on_event(&mut self, ctx: &mut Context<Self>, event: Event) {
        match event {
            Event::Invoke { handler, args, kwargs, reply, .. } => {
                self.invoke(ctx, &handler, args, kwargs, reply)
            }
            Event::GeneratorNext { reply, .. } => {
                let e = ManagerError::Other("no generators here".into());
                self.endpoint.reply(Instant::now(), reply, Err(e.to_error_value()));
            }
            Event::Error(e) => tracing::debug!(error = %e, "login endpoint"),
            _ => {}
        }
    }
}

impl Actor for LoginService {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(rx) = self.inbox.take() {
            let frames =
                futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
            ctx.add_stream(frames);
        }
    }
}

impl StreamHandler<Bytes> for LoginService {
    fn handle(&mut self, frame: Bytes, ctx: &mut Context<Self>) {
        self.endpoint.handle_frame(Instant::now(), frame);
        self.drive(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypha_core::schema::FunctionSchema;
    use hypha_core::value::Function;

    #[test]
    fn the_page_is_rendered_and_the_schemas_are_named() {
        let page = login_page("http://h:1");
        assert!(page.contains("Hypha Account"));
        assert!(page.contains("http://h:1/public/services/hypha-login/report"));
        assert!(!page.contains("__REPORT_URL__") && !page.contains("{{"));
        let api = LoginService::api();
        for f in FUNCTIONS {
            let (name, _, _) = signature(f);
            let Some(Value::Function(func)) = api.get(name) else { panic!("{name}") };
            let Function::Local(lf) = &**func else { panic!("{name}") };
            assert_eq!(FunctionSchema::from_value(lf.schema.as_deref().unwrap()).unwrap().name, name);
        }
    }

    #[test]
    fn sessions_are_consumed_by_check_and_expire() {
        let s = Sessions::default();
        assert!(matches!(s.check("k"), Checked::Missing));
        s.with(|m| {
            m.insert("k".into(), LoginSession { expires: Instant::now() + MAXIMUM_LOGIN_TIME, record: None })
        });
        assert!(matches!(s.check("k"), Checked::Waiting));
        s.with(|m| m.get_mut("k").map(|x| x.record = Some(Map::new())));
        assert!(matches!(s.check("k"), Checked::Reported(_)));
        assert!(matches!(s.check("k"), Checked::Missing));
        s.with(|m| m.insert("old".into(), LoginSession { expires: Instant::now(), record: None }));
        assert!(matches!(s.check("old"), Checked::Missing));
        assert_eq!(given(Value::from("")), Value::Nil);
    }
}
