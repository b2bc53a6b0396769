//! The Hypha server: [`Server::builder`] -> [`Server`], which either mounts into any
//! actix-web `App` ([`Server::configure`]) or runs on its own ([`Server::start`],
//! [`Server::run`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use hypha_rpc::server::Server;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::builder()
//!     .server_id("my-server")
//!     .jwt_secret("a secret shared by every replica")
//!     .idle_timeout(Duration::from_secs(600))
//!     .build()?;
//!
//! // Inside an application of your own:
//! let s = server.clone();
//! let _app = actix_web::App::new().configure(move |cfg| s.configure(cfg));
//!
//! // Or on its own, until SIGTERM/SIGINT:
//! server.run("127.0.0.1", 9527).await?;
//! # Ok(())
//! # }
//! ```
//!
//! What the server does today: the `/ws` endpoint with the full handshake, routing between
//! clients, the health probes, and the workspace manager (`*/manager-{id}`) with the
//! service registry, so stock Python and JavaScript clients connect, register, look up and
//! call services, the HTTP service proxy (`/{ws}/services/...`), the login service
//! (`public/hypha-login`), `/assets/config.json`, `/{ws}/info`, static mounts, CORS and
//! the HTTP request-rate limit.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};
use hypha_actors::server::ServerState;

pub use hypha_actors::server::accounts::{Account, AccountError, AccountStore, NewAccount};
pub use hypha_actors::server::config::{parse_origins, HttpRateLimits, StaticMount, HYPHA_VERSION};
pub use hypha_actors::server::external::{ProcessState, RestartPolicy, SupervisorHandle, SupervisorStatus};
pub use hypha_actors::server::{ConfigError, ServerConfig};

mod startup;

pub use startup::{ExternalService, StartupResult, PINNED_HYPHA_RPC, PYTHON_LAUNCHER, STARTUP_WORKSPACE};
use startup::{StartupConfig, StartupResources};

/// Why a server could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding or running the listener failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A startup function or an external service failed: the server does not become ready.
    #[error("startup failed: {0}")]
    Startup(String),
}

/// Collects settings; [`ServerBuilder::build`] validates them.
#[derive(Debug, Clone, Default)]
pub struct ServerBuilder {
    config: ServerConfig,
    workers: Option<usize>,
    startup: StartupConfig,
}

impl ServerBuilder {
    /// Replaces every setting at once (e.g. with [`ServerConfig::from_env`]).
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Applies the `HYPHA_*` environment overrides (see `hypha_actors::server::config::ENV_VARS`).
    pub fn from_env(mut self) -> Result<Self, ConfigError> {
        self.config.apply_env(|name| std::env::var(name).ok())?;
        Ok(self)
    }

    /// This replica's id (the manager is `manager-{id}`); random by default.
    pub fn server_id(mut self, id: impl Into<String>) -> Self {
        self.config.server_id = id.into();
        self
    }

    /// The URL clients are told to use; defaults to the local URL.
    pub fn public_base_url(mut self, url: impl Into<String>) -> Self {
        self.config.public_base_url = Some(url.into());
        self
    }

    /// The loopback URL; by default derived from the bound port.
    pub fn local_base_url(mut self, url: impl Into<String>) -> Self {
        self.config.local_base_url = Some(url.into());
        self
    }

    /// The HS256 token secret. Without one a random secret is used and tokens die with
    /// the process (as upstream without `JWT_SECRET`).
    pub fn jwt_secret(mut self, secret: impl Into<String>) -> Self {
        let mut jwt = hypha_core::auth::JwtConfig::new(secret);
        jwt.issuer = self.config.jwt.issuer.clone();
        jwt.audience = self.config.jwt.audience.clone();
        jwt.namespace = self.config.jwt.namespace.clone();
        self.config.jwt = jwt;
        self
    }

    /// A verbatim admin credential (`--root-token`), at least 32 characters and not weak.
    pub fn root_token(mut self, token: impl Into<String>) -> Self {
        self.config.root_token = Some(token.into());
        self
    }

    /// How long a new socket may wait before its auth frame (5 s).
    pub fn auth_timeout(mut self, timeout: Duration) -> Self {
        self.config.auth_timeout = timeout;
        self
    }

    /// How long an authenticated socket may stay silent (600 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// Sustained binary frames per second per connection (200).
    pub fn message_rate_limit(mut self, per_second: f64) -> Self {
        self.config.msg_rate_limit = per_second;
        self
    }

    /// Burst of binary frames per connection (2000): the token bucket's capacity.
    pub fn message_burst_limit(mut self, burst: u32) -> Self {
        self.config.msg_burst_limit = burst;
        self
    }

    /// Largest inbound frame in bytes (16 MiB; at least 1 MiB).
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.config.max_frame_size = bytes;
        self
    }

    /// Most handshakes in their auth/setup phase at once (10); the others wait for a slot.
    pub fn max_concurrent_handshakes(mut self, handshakes: usize) -> Self {
        self.config.max_concurrent_handshakes = handshakes;
        self
    }

    /// How long a handshake waits for a slot before it is closed with 1013 `Server busy,
    /// please retry` (30 s).
    pub fn handshake_admission_timeout(mut self, wait: Duration) -> Self {
        self.config.handshake_admission_timeout = wait;
        self
    }

    /// Most services one client may register besides its `built-in` (1000).
    pub fn max_services_per_client(mut self, services: usize) -> Self {
        self.config.max_services_per_client = services;
        self
    }

    /// Sets the workspace manager's inbox: at most `frames` frames wait in it, and a
    /// client's frame waits at most `wait` for room in a full one before its call is
    /// rejected as "Server busy" (defaults: 4096 frames, 10 s).
    pub fn manager_inbox(mut self, frames: usize, wait: Duration) -> Self {
        self.config.manager_inbox_frames = frames;
        self.config.manager_inbox_wait = wait;
        self
    }

    /// Bounds of each client's outbound queue (1024 frames, 64 MiB).
    pub fn outbound_queue(mut self, frames: usize, bytes: usize) -> Self {
        self.config.outbound_queue_frames = frames;
        self.config.outbound_queue_bytes = bytes;
        self
    }

    /// How long calls to a peer that just left fail fast (120 s).
    pub fn dead_peer_ttl(mut self, ttl: Duration) -> Self {
        self.config.dead_peer_ttl = ttl;
        self
    }

    /// Lifetime of reconnection tokens (172 800 s).
    pub fn reconnection_token_life_time(mut self, life: Duration) -> Self {
        self.config.reconnection_token_life_time = life;
        self
    }

    /// How long a final error/close frame may take to reach a client that does not read,
    /// before its socket is dropped (5 s).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.config.close_timeout = timeout;
        self
    }

    /// How long a graceful shutdown waits for connections (10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// How long a worker may poll its sockets after a websocket frame before it sleeps
    /// (50 µs; zero: never). Polling spends CPU while replies come back within a round
    /// trip, to spare the worker a scheduler wake-up per frame; the window adapts and
    /// closes when frames are far apart.
    pub fn busy_poll(mut self, max: Duration) -> Self {
        self.config.busy_poll = max;
        self
    }

    /// CORS origins allowed to read responses (`--allow-origins`; default `*`, any origin,
    /// echoed because credentials are allowed).
    pub fn allow_origins<I, S>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.allow_origins = origins.into_iter().map(Into::into).collect();
        self
    }

    /// The HTTP request-rate limits (upstream's 100/s, burst 500 per IP; 1000/s, burst
    /// 5000 per token identity); `None` turns them off.
    pub fn http_rate_limits(mut self, limits: Option<HttpRateLimits>) -> Self {
        self.config.http_rate_limits = limits;
        self
    }

    /// Serves the files of `dir` at `{path}/...` (`--static-mounts {path}:{dir}`); `path`
    /// is one top-level segment such as `/docs`. Checked by [`ServerBuilder::build`].
    pub fn static_mount(mut self, path: impl Into<String>, dir: impl Into<std::path::PathBuf>) -> Self {
        self.config.static_mounts.push(StaticMount::new(path, dir));
        self
    }

    /// Keeps the server's files (the account database `accounts.sqlite3`) in `dir`,
    /// created on first use (`--data-dir`). Without it accounts live in memory and die
    /// with the process.
    pub fn data_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.config.data_dir = Some(dir.into());
        self
    }

    /// Keeps accounts in memory only (the default; undoes [`ServerBuilder::data_dir`]).
    pub fn in_memory_accounts(mut self) -> Self {
        self.config.data_dir = None;
        self
    }

    /// Whether the login page lets anyone create an account (default: yes; the binary's
    /// `--no-signup` turns it off).
    pub fn allow_signup(mut self, allow: bool) -> Self {
        self.config.allow_signup = allow;
        self
    }

    /// How long a login session of `hypha-login` waits for the browser (180 s, upstream's
    /// `MAXIMUM_LOGIN_TIME`).
    pub fn max_login_time(mut self, ttl: Duration) -> Self {
        self.config.max_login_time = ttl;
        self
    }

    /// Lifetime of the tokens a password login on the login page issues (24 h).
    pub fn login_token_life_time(mut self, life: Duration) -> Self {
        self.config.login_token_life_time = life;
        self
    }

    /// HTTP worker threads for [`Server::start`] (default: one per physical core).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers.max(1));
        self
    }

    /// Adds a startup function: it runs once the server listens and before
    /// `/health/readiness` turns OK, with a [`Client`](crate::client::Client) connected to the
    /// `public` workspace with a root-issued token (client id `{server_id}-startup`), so the
    /// services it registers there are up when the server is ready and stay up while it
    /// runs. An `Err` aborts the startup ([`Server::launch`] and [`Server::run`] return
    /// [`ServerError::Startup`]). Several run in the order they were added, sharing the
    /// client.
    ///
    /// ```no_run
    /// # use hypha_rpc::client::{Error, Service, Visibility};
    /// # use hypha_rpc::server::Server;
    /// let builder = Server::builder().on_startup(|public| async move {
    ///     let svc = Service::builder("test-service")
    ///         .visibility(Visibility::Public)
    ///         .function("test", |x: i64| async move { Ok::<_, Error>(x + 99) })
    ///         .build();
    ///     public.register_service(svc).await?;
    ///     Ok::<_, Error>(())
    /// });
    /// ```
    pub fn on_startup<F, Fut, E>(mut self, f: F) -> Self
    where
        F: Fn(crate::client::Client) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.config_startup().hooks.push(startup::hook(f));
        self
    }

    /// Adds a Python startup function, `path/to/file.py:function` or `module:function`
    /// (`--startup-functions`): run under the stock Python client (see
    /// [`ServerBuilder::python`]) in a supervised child process, after the Rust ones.
    pub fn python_startup_function(mut self, spec: impl Into<String>) -> Self {
        self.config_startup().python_functions.push(spec.into());
        self
    }

    /// The Python interpreter for startup functions (`--python`, `HYPHA_PYTHON`); default
    /// the base interpreter ([`ServerBuilder::base_python`]) or an environment the server
    /// creates with the stock client. An interpreter given here must `import hypha_rpc`.
    pub fn python(mut self, interpreter: impl Into<std::path::PathBuf>) -> Self {
        self.config_startup().python = Some(interpreter.into());
        self
    }

    /// The interpreter the server looks at first, and creates its own environment from when
    /// it lacks `hypha_rpc` (`--base-python`, `HYPHA_BASE_PYTHON`; default `python3` on
    /// `PATH`). Unused when [`ServerBuilder::python`] is set. The environment lives in
    /// `{data_dir}/python-env` (or the user's cache directory) and gets the pinned stock
    /// client [`PINNED_HYPHA_RPC`], so a fresh machine needs only Python 3.
    pub fn base_python(mut self, interpreter: impl Into<std::path::PathBuf>) -> Self {
        self.config_startup().base_python = Some(interpreter.into());
        self
    }

    /// How long one Python startup function may take, start to return (120 s).
    pub fn python_startup_timeout(mut self, timeout: Duration) -> Self {
        self.config_startup().python_timeout = timeout;
        self
    }

    /// What happens when a Python startup process exits after its function returned
    /// (default: restarted, which runs the function again, within [`RestartPolicy::default`]).
    pub fn python_restart_policy(mut self, policy: Option<RestartPolicy>) -> Self {
        self.config_startup().python_restart = policy;
        self
    }

    /// Adds an external service (`--launch-external`), started after the startup functions
    /// and waited for before readiness.
    pub fn external_service(mut self, service: ExternalService) -> Self {
        self.config_startup().external.push(service);
        self
    }

    /// How long a supervised child gets between SIGTERM and SIGKILL when the server stops (5 s).
    pub fn child_stop_grace(mut self, grace: Duration) -> Self {
        self.config_startup().stop_grace = grace;
        self
    }

    fn config_startup(&mut self) -> &mut StartupConfig {
        &mut self.startup
    }

    /// Validates the settings and creates the server state.
    pub fn build(self) -> Result<Server, ServerError> {
        Ok(Server {
            state: ServerState::new(self.config)?,
            workers: self.workers,
            startup: Arc::new(self.startup),
        })
    }
}

/// A configured server. Cheap to clone: clones share one state (routing table,
/// workspaces, connections).
#[derive(Debug, Clone)]
pub struct Server {
    state: Arc<ServerState>,
    workers: Option<usize>,
    startup: Arc<StartupConfig>,
}

impl Server {
    /// A builder with upstream's defaults.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Mounts the server's routes (`/ws`, the health probes, `/assets/config.json`, static
    /// mounts, `/{ws}/info`, the login page, the service proxy) into an actix-web app:
    /// `App::new().configure(|cfg| server.configure(cfg))`. Call
    /// [`Server::set_local_base_url`] once the app's port is known, and
    /// [`Server::shutdown`] before stopping the app.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        self.state.configure(cfg);
    }

    /// The settings.
    pub fn config(&self) -> &ServerConfig {
        &self.state.config
    }

    /// The shared state (routing table, workspaces), for the parts of the server built on it.
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Tells the server where it listens (`local_base_url`, and `public_base_url` unless
    /// configured).
    pub fn set_local_base_url(&self, url: &str) {
        self.state.set_local_base_url(url);
    }

    /// Closes every websocket with 1001 ("going away"; clients reconnect) and refuses new
    /// ones. Returns how many were closed.
    pub fn shutdown(&self) -> usize {
        self.state.shutdown()
    }

    /// Binds `host:port` (port 0 picks a free one) and starts serving in the background of
    /// the current actix system. The local base URL becomes `http://127.0.0.1:{port}`.
    ///
    /// Startup functions and external services, if any, start in the background;
    /// `/health/readiness` answers 503 until they are done. [`RunningServer::startup_complete`]
    /// waits for them; [`Server::launch`] does both.
    pub fn start(self, host: &str, port: u16) -> Result<RunningServer, ServerError> {
        let app_server = self.clone();
        let timeout = self.state.config.shutdown_timeout.as_secs_f64().ceil() as u64;
        let mut http = HttpServer::new(move || {
            let s = app_server.clone();
            App::new()
                .configure(move |cfg| s.configure(cfg))
                .default_service(web::to(|| async { hypha_actors::server::static_files::not_found() }))
        })
        // RPC traffic is many small frames (a call, a heartbeat, a resolve) whose answers
        // the peer waits for: with Nagle's algorithm on, a small write after another one
        // waits for the peer's delayed ACK (~40 ms on Linux), which turned a 10k-item
        // generator into 40 ms per item. Frames are written whole, so no coalescing is lost.
        .on_connect(|conn, _ext| {
            disable_nagle(conn);
        })
        .disable_signals()
        .shutdown_timeout(timeout.max(1));
        if let Some(n) = self.workers {
            http = http.workers(n);
        }
        let http = http.bind((host, port))?;
        let addr = http.addrs().first().copied().ok_or_else(|| io::Error::other("no address was bound"))?;
        self.state.set_local_base_url(&format!("http://127.0.0.1:{}", addr.port()));
        let startup_pending = !self.startup.is_empty();
        self.state.set_starting(startup_pending);
        let running = http.run();
        let handle = running.handle();
        let task = actix_rt::spawn(running);
        tracing::info!(%addr, server_id = %self.state.config.server_id, "hypha server listening");
        let resources = Arc::new(StartupResources::default());
        let startup = startup_pending.then(|| {
            let (state, config, res) = (self.state.clone(), self.startup.clone(), resources.clone());
            actix_rt::spawn(async move {
                let result = startup::run(state.clone(), config, res).await;
                if result.is_ok() {
                    state.set_starting(false);
                    tracing::info!("startup functions done: ready");
                }
                result
            })
        });
        Ok(RunningServer { server: self, addr, handle, task, startup, resources })
    }

    /// [`Server::start`], then waits for the startup functions and external services; if
    /// one fails, stops the server (and every child) and returns
    /// [`ServerError::Startup`] with the reason.
    pub async fn launch(self, host: &str, port: u16) -> Result<RunningServer, ServerError> {
        let mut running = self.start(host, port)?;
        if let Err(e) = running.startup_complete().await {
            tracing::error!("{e}");
            let _ = running.stop().await;
            return Err(e);
        }
        Ok(running)
    }

    /// [`Server::start`], then serve until SIGTERM or SIGINT, then shut down gracefully
    /// (websockets get 1001, in-flight HTTP requests finish).
    /// A startup failure stops the server and is returned (the binary exits non-zero).
    pub async fn run(self, host: &str, port: u16) -> Result<(), ServerError> {
        let mut running = self.start(host, port)?;
        tokio::select! {
            r = running.startup_complete() => {
                if let Err(e) = r {
                    let _ = running.stop().await;
                    return Err(e);
                }
            }
            s = shutdown_signal() => {
                s?;
                tracing::info!("signal received during startup: shutting down");
                return running.stop().await;
            }
        }
        tokio::select! {
            r = &mut running.task => {
                return r.map_err(|e| io::Error::other(e.to_string()))?.map_err(ServerError::Io);
            }
            s = shutdown_signal() => s?,
        }
        tracing::info!("signal received: shutting down");
        running.stop().await
    }
}

#[cfg(unix)]
async fn shutdown_signal() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

#[cfg(not(unix))]
async fn shutdown_signal() -> io::Result<()> {
    tokio::signal::ctrl_c().await
}

/// A server started with [`Server::start`].
#[derive(Debug)]
pub struct RunningServer {
    server: Server,
    addr: SocketAddr,
    handle: ServerHandle,
    task: actix_rt::task::JoinHandle<io::Result<()>>,
    /// The startup task, until [`RunningServer::startup_complete`] took its result.
    startup: Option<actix_rt::task::JoinHandle<Result<(), String>>>,
    resources: Arc<StartupResources>,
}

impl RunningServer {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://{addr}/ws`, what clients connect to.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The server.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Waits until the startup functions and external services are done (at once when
    /// there are none, or on a second call); readiness is OK after an `Ok`. After an `Err`
    /// the server still listens with readiness 503: call [`RunningServer::stop`].
    pub async fn startup_complete(&mut self) -> Result<(), ServerError> {
        let Some(task) = self.startup.as_mut() else { return Ok(()) };
        let result = match task.await {
            Ok(r) => r.map_err(ServerError::Startup),
            Err(e) => Err(ServerError::Startup(format!("the startup task failed: {e}"))),
        };
        self.startup = None;
        result
    }

    /// The supervised children (Python startup functions, then external services), with
    /// their pids and states.
    pub fn supervised(&self) -> Vec<SupervisorHandle> {
        self.resources.supervisors()
    }

    /// Graceful stop: a running startup is abandoned, the supervised children get SIGTERM
    /// (SIGKILL after their grace period, whole process groups), websockets get 1001, then
    /// the listener stops and open HTTP connections get up to `shutdown_timeout` to finish.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(task) = self.startup.take() {
            task.abort();
        }
        self.resources.stop().await;
        self.server.shutdown();
        self.handle.stop(true).await;
        match self.task.await {
            Ok(r) => r.map_err(ServerError::Io),
            Err(e) => Err(ServerError::Io(io::Error::other(e.to_string()))),
        }
    }
}

/// Turns off Nagle's algorithm on an accepted connection (see [`Server::start`] for why).
/// Returns whether the connection was a TCP socket that now has `TCP_NODELAY`.
///
/// [`Server::start`] does this itself; an application that mounts the server into its own
/// `HttpServer` should pass it to `on_connect`:
/// `HttpServer::new(..).on_connect(|conn, _| { hypha_rpc::server::disable_nagle(conn); })`.
pub fn disable_nagle(conn: &dyn std::any::Any) -> bool {
    let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() else { return false };
    match tcp.set_nodelay(true) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: without TCP_NODELAY a generator cost ~40 ms per item (delayed ACKs).
    #[actix_rt::test]
    async fn accepted_sockets_have_nagle_disabled() {
        let listener = actix_web::rt::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = actix_web::rt::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(!accepted.nodelay().expect("read option"), "loopback sockets start with Nagle on");
        assert!(disable_nagle(&accepted));
        assert!(accepted.nodelay().expect("read option"));
        assert!(!disable_nagle(&client.peer_addr().expect("peer")), "non-TCP values are left alone");
    }
}
