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
//! * the page (`/public/apps/hypha-login/?key=K`) signs the user up or in with a local
//!   account ([`super::accounts`], through this service's `signup` and `login`, the two
//!   functions upstream's `--enable-local-auth` adds), then sends the user's token to
//!   `report(key, token, ...)` as upstream's page does, keeps it in the `access_token`
//!   cookie, follows `redirect` and generates tokens; `report` only accepts tokens this
//!   server can verify (and re-signs one for `workspace` when asked);
//! * `check(key, timeout=180, profile=False)` waits for the report and returns the token
//!   (or the whole record). The endpoint heartbeats the caller while it waits, so a long
//!   `check` outlives the caller's own method timeout.
//!
//! The page is plain HTML with a small inline script that only calls this server's HTTP
//! routes (no CDN). Login sessions live in memory, bounded in number
//! ([`MAX_LOGIN_SESSIONS`]); accounts live in the account store.

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

use super::accounts::{Account, AccountError, NewAccount};
use super::manager::{bind, opt, p, p_default, unix_now, Args, ManagerError};
use super::peer::NativePeer;
use super::registry::ServiceRecord;
use super::router::{LocalInbox, RouteSender, LOCAL_INBOX_FRAMES};
use super::ServerState;

/// The service id.
pub const LOGIN_SERVICE_ID: &str = "hypha-login";
/// How long a login session waits for its report (upstream `MAXIMUM_LOGIN_TIME`; the
/// default of `ServerConfig::max_login_time`), and `check`'s default timeout.
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
    Signup,
    Login,
}

const FUNCTIONS: [LoginFn; 8] = [
    LoginFn::Start,
    LoginFn::Check,
    LoginFn::Report,
    LoginFn::Index,
    LoginFn::Profile,
    LoginFn::Logout,
    LoginFn::Signup,
    LoginFn::Login,
];

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
        LoginFn::Signup => (
            "signup",
            "Create a local account (unless the server runs with --no-signup).",
            vec![
                text("name", "Display name (default: the email's local part)"),
                p("email", Str, "Login email"),
                p("password", Str, "Password (at least 8 characters)"),
            ],
        ),
        LoginFn::Login => (
            "login",
            "Log in with a local account; returns a token for the user.",
            vec![
                p("email", Str, "Login email"),
                p("password", Str, "Password"),
                p_default("expires_in", opt(Number), Json::Null, "Token lifetime in seconds (default 24 h)"),
            ],
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

/// The login page (placeholders filled in): sign up and log in with a local account,
/// report the token to a waiting `check`, keep it in the `access_token` cookie, follow
/// `redirect`, and generate tokens. Plain HTML and a small inline script that only talks
/// to this server's own HTTP endpoints (no CDN); every value that comes from a user is
/// put into the page with `textContent`, never as HTML.
pub fn login_page(public_url: &str, allow_signup: bool) -> String {
    // As JS string literals: the URL is configuration, but it must not be able to end the
    // string or the script.
    let js = |s: String| Json::String(s).to_string().replace("</", "<\\/");
    LOGIN_PAGE
        .replace("__SERVICE_URL__", &js(format!("{public_url}/public/services/{LOGIN_SERVICE_ID}")))
        .replace("__GENERATE_URL__", &js(format!("{public_url}/public/services/ws/generate_token")))
        .replace("__SIGNUP__", if allow_signup { "true" } else { "false" })
}

const LOGIN_PAGE: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Hypha Account</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 36em; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; }
fieldset { border: 1px solid #ccc; border-radius: 6px; margin: 1em 0; padding: 1em; }
label { display: block; margin: .5em 0; }
input, select { width: 100%; padding: .4em; box-sizing: border-box; }
button { padding: .5em 1.2em; margin-top: .5em; cursor: pointer; }
textarea { width: 100%; height: 7em; box-sizing: border-box; font-family: monospace; font-size: .8em; }
.tabs button { margin-right: .5em; }
.tabs button.active { font-weight: bold; }
#status { margin: 1em 0; padding: .6em; border-radius: 4px; display: none; }
#status.ok { display: block; background: #e6f4ea; }
#status.error { display: block; background: #fde8e8; }
.hidden { display: none; }
dt { font-weight: bold; } dd { margin: 0 0 .5em 0; word-break: break-all; }
</style>
</head>
<body>
<h1>Hypha Account</h1>
<div id="status" role="status"></div>

<div id="auth">
  <div class="tabs">
    <button id="tab-login" class="active" type="button">Log in</button>
    <button id="tab-signup" type="button">Sign up</button>
  </div>
  <form id="login-form">
    <fieldset>
      <legend>Log in</legend>
      <label>Email <input id="login-email" type="email" autocomplete="username" required></label>
      <label>Password <input id="login-password" type="password" autocomplete="current-password" required></label>
      <button id="login-submit" type="submit">Log in</button>
    </fieldset>
  </form>
  <form id="signup-form" class="hidden">
    <fieldset>
      <legend>Create an account</legend>
      <label>Name <input id="signup-name" type="text" autocomplete="name"></label>
      <label>Email <input id="signup-email" type="email" autocomplete="username" required></label>
      <label>Password (at least 8 characters)
        <input id="signup-password" type="password" autocomplete="new-password" minlength="8" required></label>
      <button id="signup-submit" type="submit">Sign up</button>
    </fieldset>
  </form>
  <p id="signup-closed" class="hidden">Sign-up is disabled on this server: ask an administrator for an account.</p>
</div>

<div id="profile" class="hidden">
  <fieldset>
    <legend>Logged in</legend>
    <dl>
      <dt>Name</dt><dd id="profile-name"></dd>
      <dt>Email</dt><dd id="profile-email"></dd>
      <dt>User id</dt><dd id="profile-id"></dd>
      <dt>Workspace</dt><dd id="profile-workspace"></dd>
    </dl>
    <button id="continue" type="button" class="hidden">Continue</button>
    <button id="logout" type="button">Log out</button>
  </fieldset>
  <form id="generate-form">
    <fieldset>
      <legend>Generate a token</legend>
      <label>Workspace <input id="gen-workspace" type="text"></label>
      <label>Expires in (seconds) <input id="gen-expires" type="number" min="1" value="3600"></label>
      <label>Permission
        <select id="gen-permission">
          <option value="read">read</option>
          <option value="read_write" selected>read_write</option>
          <option value="admin">admin</option>
        </select></label>
      <button id="generate-submit" type="submit">Generate token</button>
      <label>Token <textarea id="generated-token" readonly></textarea></label>
    </fieldset>
  </form>
</div>

<script>
(function () {
  "use strict";
  const SERVICE_URL = __SERVICE_URL__;
  const GENERATE_URL = __GENERATE_URL__;
  const SIGNUP_OPEN = __SIGNUP__;
  const params = new URLSearchParams(window.location.search);
  const key = params.get("key");
  const $ = (id) => document.getElementById(id);
  let session = null; // {token, user_id, email, name, workspace}

  function show(text, ok) {
    const s = $("status");
    s.textContent = text;
    s.className = ok ? "ok" : "error";
  }

  // "RemoteException: PermissionError: Invalid email or password" -> the message.
  function reason(body, status) {
    const d = body && body.detail;
    if (typeof d !== "string") return "HTTP " + status;
    return d.replace(/^RemoteException: /, "").replace(/^[A-Za-z]*Error: /, "");
  }

  async function post(fn, args) {
    const r = await fetch(SERVICE_URL + "/" + fn, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(args),
    });
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error(reason(body, r.status));
    return body;
  }

  function claims(token) {
    try {
      const b = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(decodeURIComponent(Array.from(atob(b), (c) =>
        "%" + ("00" + c.charCodeAt(0).toString(16)).slice(-2)).join("")));
    } catch (e) { return null; }
  }

  function readCookie() {
    const m = document.cookie.split(";").map((c) => c.trim()).find((c) => c.startsWith("access_token="));
    return m ? m.substring("access_token=".length) : null;
  }

  function setCookie(token) {
    const c = claims(token);
    const maxAge = c && c.exp ? Math.max(0, c.exp - Math.floor(Date.now() / 1000)) : 3600;
    document.cookie = "access_token=" + token + "; path=/; max-age=" + maxAge + "; samesite=lax";
  }

  function clearCookie() {
    document.cookie = "access_token=; path=/; max-age=0; samesite=lax";
  }

  // Only http(s) URLs and same-site paths: never a javascript: URL.
  function safeRedirect() {
    const r = params.get("redirect");
    if (!r) return null;
    try {
      const u = new URL(r, window.location.href);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) { return null; }
  }

  function showProfile() {
    $("auth").classList.add("hidden");
    $("profile").classList.remove("hidden");
    $("profile-name").textContent = session.name || "";
    $("profile-email").textContent = session.email || "";
    $("profile-id").textContent = session.user_id || "";
    $("profile-workspace").textContent = session.workspace || "";
    $("gen-workspace").value = session.workspace || "";
  }

  async function generate(config) {
    const r = await fetch(GENERATE_URL, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + session.token },
      body: JSON.stringify({ config: config }),
    });
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error(reason(body, r.status));
    return body;
  }

  // Hands the token to the client waiting in check(key), as upstream's page does.
  async function report() {
    let token = session.token;
    const ws = params.get("workspace") || "";
    const expiresIn = params.get("expires_in") || "";
    if (ws) {
      // The HTTP proxy does not pass `workspace` on, so ask for a token bound to it here.
      const config = { workspace: ws };
      if (expiresIn) config.expires_in = Number(expiresIn);
      token = await generate(config);
    }
    const q = new URLSearchParams({
      key: key, token: token, workspace: ws, expires_in: expiresIn,
      email: session.email || "", email_verified: "", name: session.name || "",
      nickname: session.name || "", user_id: session.user_id || "", picture: "",
    });
    const r = await fetch(SERVICE_URL + "/report?" + q.toString());
    if (!r.ok) {
      const body = await r.json().catch(() => null);
      throw new Error("Failed to report the login: " + reason(body, r.status));
    }
  }

  async function finish() {
    showProfile();
    if (key) {
      await report();
      show("Logged in as " + session.email + ": the waiting client has its token. You can close this window.", true);
    } else {
      show("Logged in as " + session.email + ".", true);
    }
    const to = safeRedirect();
    if (to) {
      setTimeout(() => { window.location.href = to; }, 500);
    } else if (key) {
      setTimeout(() => { window.close(); }, 1500);
    }
  }

  async function logIn(email, password) {
    const res = await post("login", { email: email, password: password });
    session = res;
    setCookie(res.token);
    await finish();
  }

  function selectTab(signup) {
    $("login-form").classList.toggle("hidden", signup);
    $("signup-form").classList.toggle("hidden", !signup || !SIGNUP_OPEN);
    $("signup-closed").classList.toggle("hidden", !signup || SIGNUP_OPEN);
    $("tab-login").classList.toggle("active", !signup);
    $("tab-signup").classList.toggle("active", signup);
  }
  $("tab-login").addEventListener("click", () => selectTab(false));
  $("tab-signup").addEventListener("click", () => selectTab(true));
  if (!SIGNUP_OPEN) $("tab-signup").textContent = "Sign up (closed)";

  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    show("Logging in...", true);
    try {
      await logIn($("login-email").value.trim(), $("login-password").value);
    } catch (err) {
      show("Login failed: " + err.message, false);
    }
  });

  $("signup-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const email = $("signup-email").value.trim();
    const password = $("signup-password").value;
    show("Creating the account...", true);
    try {
      await post("signup", { name: $("signup-name").value.trim() || null, email: email, password: password });
      await logIn(email, password);
    } catch (err) {
      show("Sign-up failed: " + err.message, false);
    }
  });

  $("generate-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const config = {
      workspace: $("gen-workspace").value.trim() || undefined,
      expires_in: Number($("gen-expires").value) || 3600,
      permission: $("gen-permission").value,
    };
    try {
      $("generated-token").value = await generate(config);
      show("New token generated.", true);
    } catch (err) {
      show("Failed to generate a token: " + err.message, false);
    }
  });

  $("continue").addEventListener("click", async () => {
    try { await finish(); } catch (err) { show(err.message, false); }
  });

  $("logout").addEventListener("click", () => {
    clearCookie();
    session = null;
    $("profile").classList.add("hidden");
    $("auth").classList.remove("hidden");
    show("Logged out.", true);
  });

  if (params.get("logout") === "true") {
    clearCookie();
    show("Logged out.", true);
    if (params.get("close") === "true") setTimeout(() => { window.close(); }, 500);
  } else {
    // Already logged in (cookie): offer to continue as that user.
    const token = readCookie();
    const c = token && claims(token);
    if (c && c.exp > Date.now() / 1000 && !(c["https://amun.ai/roles"] || []).includes("anonymous")) {
      session = { token: token, user_id: c.sub, email: c["https://amun.ai/email"] || "",
                  name: "", workspace: "ws-user-" + c.sub };
      showProfile();
      if (key) {
        $("continue").textContent = "Continue as " + (session.email || session.user_id);
        $("continue").classList.remove("hidden");
      }
    }
  }
  if (!key) show("No login session: log in to see your account and generate tokens.", true);
})();
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
                    "" | "index" => HttpResponse::Ok()
                        .content_type("text/html")
                        .body(login_page(&public, state.config.allow_signup)),
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
        let sender = RouteSender::new(ws, cid, &root.to_value(), false);
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
            LoginFn::Index => Ok(http_result(
                200,
                "text/html",
                Value::from(login_page(&public, self.state.config.allow_signup)),
            )),
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
            LoginFn::Signup => return self.signup(ctx, &mut a, reply),
            LoginFn::Login => return self.password_login(ctx, &mut a, reply),
        };
        self.reply(reply, result);
    }

    fn start_session(&mut self, a: &mut Args, public: &str) -> Result<Value, ManagerError> {
        let workspace = a.opt_string(0, "workspace")?.filter(|w| !w.is_empty());
        let expires_in = given(a.take(1)).as_f64();
        let key = random_id();
        let ttl = self.state.config.max_login_time;
        let stored = self.sessions.with(|m| {
            if m.len() >= MAX_LOGIN_SESSIONS {
                return false;
            }
            m.insert(key.clone(), LoginSession { expires: Instant::now() + ttl, record: None });
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
                s.expires = Instant::now() + self.state.config.max_login_time;
                true
            }
            None => false,
        });
        if !stored {
            return Err(ManagerError::Assertion("Invalid key, key does not exist or expired".into()));
        }
        Ok(Value::Nil)
    }

    /// `signup(name=None, email, password)`: creates a local account (hashing runs off
    /// this actor; see [`super::accounts`]).
    fn signup(&mut self, ctx: &mut Context<Self>, a: &mut Args, reply: ReplyTo) {
        if !self.state.config.allow_signup {
            return self.reply(reply, Err(ManagerError::Permission(SIGNUP_CLOSED.into())));
        }
        let parsed = (|| {
            let name = a.opt_string(0, "name")?.filter(|n| !n.trim().is_empty());
            Ok::<_, ManagerError>((name, a.string(1, "email")?, a.string(2, "password")?))
        })();
        let (name, email, password) = match parsed {
            Ok(v) => v,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let accounts = self.state.accounts.clone();
        let fut = async move { accounts.create(NewAccount { email, password, name, admin: false }).await };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let result = res.map_err(account_error).map(|acc| {
                tracing::info!(user = %acc.id, "account created on the login page");
                let mut m = account_map(&acc);
                m.shift_remove("token");
                Value::Map(m)
            });
            act.reply(reply, result);
            act.drive(ctx);
        }));
    }

    /// `login(email, password, expires_in=None)`: checks the password and returns
    /// `{success, token, user_id, email, name, workspace, expires_in}`; the token is a
    /// generic one for the user (own workspace `ws-user-{id}` with `a`, no `wid`), like the
    /// tokens of upstream's identity provider.
    fn password_login(&mut self, ctx: &mut Context<Self>, a: &mut Args, reply: ReplyTo) {
        let parsed = (|| Ok::<_, ManagerError>((a.string(0, "email")?, a.string(1, "password")?)))();
        let (email, password) = match parsed {
            Ok(v) => v,
            Err(e) => return self.reply(reply, Err(e)),
        };
        let life = match given(a.take(2)) {
            Value::Nil => self.state.config.login_token_life_time.as_secs_f64(),
            v => match v.as_f64() {
                Some(s) if s.is_finite() && s > 0.0 => s,
                _ => {
                    let e = ManagerError::Value("login(): expires_in must be a number of seconds > 0".into());
                    return self.reply(reply, Err(e));
                }
            },
        };
        let accounts = self.state.accounts.clone();
        let fut = async move { accounts.verify_password(email, password).await };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let result = res.map_err(account_error).and_then(|acc| {
                let token = act
                    .state
                    .config
                    .jwt
                    .encode(&account_user(&acc), life, unix_now())
                    .map_err(|e| ManagerError::Runtime(e.to_string()))?;
                tracing::debug!(user = %acc.id, "password login");
                let mut m = account_map(&acc);
                m.insert("token".into(), Value::from(token));
                m.insert("expires_in".into(), Value::from(life));
                Ok(Value::Map(m))
            });
            act.reply(reply, result);
            act.drive(ctx);
        }));
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

/// What `signup` answers when the server runs with `--no-signup`.
pub const SIGNUP_CLOSED: &str =
    "Sign-up is disabled on this server; ask an administrator to create your account";

/// The identity of an account's tokens: its id, roles and email, and `a` on its own
/// workspace (the `admin` role adds `"*": "a"` when the token is parsed).
pub fn account_user(acc: &Account) -> auth::UserInfo {
    let mut user = auth::UserInfo::new(acc.id.clone());
    user.roles = acc.roles.clone();
    user.email = Some(acc.email.clone());
    user.scope.workspaces.insert(acc.workspace(), Permission::Admin);
    user
}

/// `{success: true, token: null, user_id, email, name, workspace}` (the shape of
/// upstream's local-auth `login`; `token` is filled in by the caller).
fn account_map(acc: &Account) -> Map {
    let mut m = Map::new();
    m.insert("success".into(), Value::Bool(true));
    m.insert("token".into(), Value::Nil);
    m.insert("user_id".into(), Value::from(acc.id.clone()));
    m.insert("email".into(), Value::from(acc.email.clone()));
    m.insert("name".into(), Value::from(acc.name.clone()));
    m.insert("workspace".into(), Value::from(acc.workspace()));
    m
}

/// The remote error for an account failure: bad input is a `ValueError`, bad credentials
/// and closed sign-up a `PermissionError`; store faults are logged here and reported
/// without their details.
fn account_error(e: AccountError) -> ManagerError {
    match e {
        AccountError::InvalidCredentials => ManagerError::Permission(e.to_string()),
        AccountError::EmailTaken
        | AccountError::InvalidEmail
        | AccountError::PasswordTooShort
        | AccountError::PasswordTooLong
        | AccountError::InvalidName => ManagerError::Value(e.to_string()),
        AccountError::Busy => ManagerError::Runtime(e.to_string()),
        AccountError::Open { .. } | AccountError::Database(_) | AccountError::Hash(_) => {
            tracing::error!(error = %e, "account store failure");
            ManagerError::Runtime("Internal error in the account store (see the server log)".into())
        }
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
        let page = login_page("http://h:1", true);
        assert!(page.contains("<title>Hypha Account</title>"));
        assert!(page.contains(r#"SERVICE_URL = "http://h:1/public/services/hypha-login""#));
        assert!(page.contains(r#"GENERATE_URL = "http://h:1/public/services/ws/generate_token""#));
        assert!(page.contains("SIGNUP_OPEN = true;"));
        assert!(login_page("http://h:1", false).contains("SIGNUP_OPEN = false;"));
        assert!(!page.contains("__") && !page.contains("{{"), "no unrendered placeholders");
        let evil = login_page("http://h\"</script><script>alert(1)//", true);
        assert!(!evil.contains("</script><script>alert") && evil.contains(r#"http://h\"<\/script>"#));
        assert!(!page.contains("src=\"http") && !page.contains("href=\"http"), "no external resources");
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
