//! `login()`: get a token from the server's login service, as `hypha_rpc.login()` does.
//!
//! The flow is the server's (spec server.md §6.5): connect anonymously, `start()` a login
//! session on `public/hypha-login`, hand its `login_url` to the user (a callback, or a line
//! on stderr), then wait in `check(key, timeout)` until the login page has reported a token.
//! The wait is one long RPC call: the login service heartbeats it, so it may outlast the
//! client's method timeout, which is set to the login timeout as upstream does.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use hypha_core::value::{Map, Value};

use super::{connect_to_server, ClientConfig, Error};

/// What the login service returned from `start()`: where the user logs in, and the key
/// the waiting `check` is bound to.
#[derive(Clone, Debug, PartialEq)]
pub struct LoginContext {
    /// The page the user must open (`.../public/apps/hypha-login/?key=...`).
    pub login_url: String,
    /// The login session's key.
    pub key: String,
    /// Where the page reports the token (`.../hypha-login/report`).
    pub report_url: Option<String>,
    /// The whole `start()` answer, for keys this type does not name.
    pub raw: Map,
}

/// A future the login callback returns.
pub type LoginCallbackFuture = Pin<Box<dyn Future<Output = Result<(), Error>> + 'static>>;

/// Shows the login URL to the user (opens a browser, sends a message...). It runs before
/// the wait starts, so it must return promptly; the user has `login_timeout` to log in.
/// The callback is `Send` (its future need not be) so that a [`LoginConfig`] can move to
/// the thread that runs the login, as the blocking wrapper does.
pub type LoginCallback = Box<dyn FnOnce(LoginContext) -> LoginCallbackFuture + Send>;

/// Options of [`login`], named after the Python client's config keys.
pub struct LoginConfig {
    /// The server, e.g. `http://127.0.0.1:9527`.
    pub server_url: String,
    /// The login service (`public/hypha-login`).
    pub login_service_id: String,
    /// Ask for a token scoped to this workspace.
    pub workspace: Option<String>,
    /// Lifetime of the token (with `workspace` only, as upstream's `start`).
    pub expires_in: Option<Duration>,
    /// How long the user has to log in (60 s).
    pub login_timeout: Duration,
    /// Return the whole profile (token, email, user id...) rather than the token alone.
    pub profile: bool,
    /// Shows the login URL; without one it is printed on stderr.
    pub login_callback: Option<LoginCallback>,
    /// Extra HTTP headers of the login connection's upgrade request (upstream's
    /// `additional_headers`).
    pub additional_headers: Vec<(String, String)>,
}

impl LoginConfig {
    /// The defaults of `hypha_rpc.login()` for `server_url`.
    pub fn new(server_url: impl Into<String>) -> Self {
        LoginConfig {
            server_url: server_url.into(),
            login_service_id: "public/hypha-login".to_owned(),
            workspace: None,
            expires_in: None,
            login_timeout: Duration::from_secs(60),
            profile: false,
            login_callback: None,
            additional_headers: Vec::new(),
        }
    }

    /// Sets [`LoginConfig::workspace`].
    pub fn workspace(mut self, ws: impl Into<String>) -> Self {
        self.workspace = Some(ws.into());
        self
    }

    /// Sets [`LoginConfig::expires_in`].
    pub fn expires_in(mut self, d: Duration) -> Self {
        self.expires_in = Some(d);
        self
    }

    /// Sets [`LoginConfig::login_timeout`].
    pub fn login_timeout(mut self, d: Duration) -> Self {
        self.login_timeout = d;
        self
    }

    /// Sets [`LoginConfig::profile`].
    pub fn profile(mut self, yes: bool) -> Self {
        self.profile = yes;
        self
    }

    /// Adds a header to the login connection's upgrade request.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.additional_headers.push((name.into(), value.into()));
        self
    }

    /// Sets [`LoginConfig::login_callback`].
    pub fn login_callback<F, Fut>(mut self, f: F) -> Self
    where
        F: FnOnce(LoginContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), Error>> + 'static,
    {
        self.login_callback = Some(Box::new(move |ctx| Box::pin(f(ctx))));
        self
    }
}

/// What [`login`] got: the token, or with [`LoginConfig::profile`] the whole record.
#[derive(Clone, Debug, PartialEq)]
pub enum LoginOutcome {
    /// The token.
    Token(String),
    /// `{token, workspace, expires_in, email, email_verified, name, nickname, user_id,
    /// picture}` as the login page reported them.
    Profile(Map),
}

impl LoginOutcome {
    /// The token, whichever form came back.
    pub fn token(&self) -> Option<&str> {
        match self {
            LoginOutcome::Token(t) => Some(t),
            LoginOutcome::Profile(m) => m.get("token").and_then(Value::as_str),
        }
    }
}

/// Logs in through the server's login service and returns the token (or the profile).
///
/// Errors are the service's: `Login timeout, waited for N seconds` when nobody logged in
/// in time, and the connection's errors otherwise. The anonymous connection is closed
/// whatever happens.
pub async fn login(config: LoginConfig) -> Result<LoginOutcome, Error> {
    let LoginConfig {
        server_url,
        login_service_id,
        workspace,
        expires_in,
        login_timeout,
        profile,
        login_callback,
        additional_headers,
    } = config;
    let mut client_config =
        ClientConfig::new(server_url).name("initial login client").method_timeout(login_timeout);
    client_config.additional_headers = additional_headers;
    let client = connect_to_server(client_config).await?;
    let outcome = async {
        let svc = client.get_service(&login_service_id).await?;
        let started = match workspace {
            Some(ws) => {
                let mut kwargs = Map::new();
                kwargs.insert("workspace".into(), Value::from(ws));
                if let Some(d) = expires_in {
                    kwargs.insert("expires_in".into(), Value::from(d.as_secs()));
                }
                svc.call_with_kwargs("start", Vec::new(), kwargs).await?
            }
            None => svc.call("start", Vec::new()).await?,
        };
        let context = login_context(started)?;
        let key = context.key.clone();
        match login_callback {
            Some(cb) => cb(context).await?,
            None => eprintln!("Please open your browser and login at {}", context.login_url),
        }
        let mut kwargs = Map::new();
        // Whole seconds go as an int: the service quotes the number in its timeout error.
        let timeout = if login_timeout.subsec_nanos() == 0 {
            Value::from(login_timeout.as_secs())
        } else {
            Value::from(login_timeout.as_secs_f64())
        };
        kwargs.insert("timeout".into(), timeout);
        kwargs.insert("profile".into(), Value::from(profile));
        let answer = svc.call_with_kwargs("check", vec![Value::from(key)], kwargs).await?;
        match answer {
            Value::Str(t) => Ok(LoginOutcome::Token(t.to_string())),
            Value::Map(m) if profile => Ok(LoginOutcome::Profile(m)),
            other => Err(Error::Protocol(format!("the login service answered check with {}", other.kind()))),
        }
    }
    .await;
    if let Err(e) = client.disconnect().await {
        tracing::debug!(error = %e, "closing the login connection");
    }
    outcome
}

/// Reads `start()`'s answer.
fn login_context(v: Value) -> Result<LoginContext, Error> {
    let Value::Map(m) = v else {
        return Err(Error::Protocol(format!("the login service answered start with {}", v.kind())));
    };
    let text = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    let (Some(login_url), Some(key)) = (text("login_url"), text("key")) else {
        return Err(Error::Protocol("the login service's start() gave no login_url and key".into()));
    };
    Ok(LoginContext { login_url, key, report_url: text("report_url"), raw: m })
}
