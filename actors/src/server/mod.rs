//! The Hypha server's websocket side (server spec §0, §1.1 health routes, §2, §3.2, §3.4, §8).
//!
//! ## Layout
//!
//! | file | what it holds |
//! | --- | --- |
//! | [`config`] | [`ServerConfig`]: typed timeouts and limits, upstream's defaults, `HYPHA_*` overrides |
//! | [`connection`] | the `/ws` endpoint and [`WsConnection`], one actix actor per websocket: handshake state machine, rate limiter, idle timer |
//! | [`outbound`] | the bounded queue to one client and the websocket response body that drains it |
//! | [`router`] | the routing table (`{ws}/{cid}` -> connection, generation, subscriptions) and routing rules 1-8 |
//! | [`workspace`] | the workspaces table (WorkspaceInfo records) |
//! | [`manager`] | the workspace manager: the RPC peer `*/manager-{sid}` serving the `default` service |
//! | [`registry`] | the service registry and the visibility rules |
//! | [`external`] | supervised external processes (`--launch-external`, Python startup functions): restart policy, log forwarding, group kill |
//! | [`events`] | the manager's event log and the event-subscription rule |
//! | [`login`] | the login service `public/hypha-login` (a second native peer) and its page |
//! | [`accounts`] | local user accounts (SQLite under `--data-dir`, argon2id hashes) behind the login page |
//! | [`proxy`] | the HTTP service proxy (`/{ws}/services/...`), one short-lived RPC peer per request |
//! | [`limits`] | the token bucket and the inbound frame-size guard |
//! | [`http`] | `/health/liveness`, `/health/readiness`, `/assets/config.json`, `/{ws}/info` |
//! | [`layer`] | the HTTP middleware on every HTTP route: request-rate limit, then CORS |
//! | [`static_files`] | `--static-mounts` directories and `/static/...` |
//!
//! A frame's path: the client's socket -> [`limits::FrameSizeGuard`] -> actix-ws decoder ->
//! the sender's [`WsConnection`] (rate limit, [`router::Router::route`]: stamp and look
//! up) -> the target's [`outbound::Outbound`] queue -> the target's response body (polled
//! by its HTTP dispatcher) -> its socket. No actor hop and no wait between the two sockets (see [`router`]).
//!
//! Everything shared lives in one [`ServerState`] behind an `Arc`; [`ServerState::configure`]
//! mounts the routes into any actix-web `App`.

pub mod accounts;
pub mod config;
pub mod connection;
pub mod events;
pub mod external;
pub mod http;
pub mod inbound;
pub mod layer;
pub mod limits;
pub mod login;
pub mod manager;
pub mod outbound;
mod peer;
pub mod proxy;
pub mod registry;
pub mod router;
pub mod static_files;
pub mod workspace;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::SystemTime;

use actix_web::web;
use dashmap::DashMap;

pub use config::{ConfigError, ServerConfig};
pub use connection::WsConnection;
pub use manager::Manager;
pub use registry::Registry;
pub use router::Router;
pub use workspace::Workspaces;

use outbound::{CloseCmd, Outbound};

/// The local base URL reported before a listener is bound (upstream's default port).
pub const DEFAULT_LOCAL_BASE_URL: &str = "http://127.0.0.1:9527";

/// The close reason sent to every client on a graceful shutdown (code 1001, no error frame:
/// clients reconnect as after any unexpected close).
pub const SHUTDOWN_REASON: &str = "Server is shutting down";

/// The readiness probe's detail while startup functions run.
pub const STARTING_REASON: &str = "Server is starting: startup functions are running";

/// Everything the connections of one server share.
#[derive(Debug)]
pub struct ServerState {
    /// The settings (immutable once the server runs).
    pub config: ServerConfig,
    /// The routing table.
    pub router: Router,
    /// The workspaces table.
    pub workspaces: Workspaces,
    /// The service registry.
    pub registry: Registry,
    /// Tokens revoked with the manager's `revoke_token`, consulted by every handshake.
    pub revoked: RevokedTokens,
    /// Handshake admission control (spec §2.1 step 4).
    pub admission: limits::Admission,
    /// The local user accounts the login page signs users up and in with.
    pub accounts: accounts::Accounts,
    /// The workspace manager, started with the first websocket (or by `Server::start`).
    manager: OnceLock<ManagerHandle>,
    /// `(public, local)` base URLs, filled in when the listener is bound.
    base_urls: RwLock<(String, String)>,
    /// Every open websocket, authenticated or not, so a shutdown can close them all.
    connections: DashMap<u64, Outbound>,
    next_connection: AtomicU64,
    shutting_down: AtomicBool,
    /// Startup functions are still running: readiness answers 503 until they are done.
    starting: AtomicBool,
    /// When the server started (reported by the liveness probe).
    started_at: SystemTime,
    /// The HTTP request-rate buckets (`None` when the limits are off).
    http_limiter: Option<layer::HttpRateLimiter>,
}

fn strip_slash(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

impl ServerState {
    /// Validates `config` and builds the shared state.
    pub fn new(config: ServerConfig) -> Result<Arc<Self>, ConfigError> {
        config.validate()?;
        let local =
            config.local_base_url.as_deref().map_or_else(|| DEFAULT_LOCAL_BASE_URL.to_owned(), strip_slash);
        let public = config.public_base_url.as_deref().map_or_else(|| local.clone(), strip_slash);
        let store = match &config.data_dir {
            Some(dir) => accounts::AccountStore::open(dir)?,
            None => accounts::AccountStore::in_memory()?,
        };
        Ok(Arc::new(ServerState {
            accounts: accounts::Accounts::new(store),
            router: Router::new(config.dead_peer_ttl),
            workspaces: Workspaces::new(),
            registry: Registry::new(),
            revoked: RevokedTokens::default(),
            admission: limits::Admission::new(
                config.max_concurrent_handshakes,
                config.handshake_admission_timeout,
            ),
            manager: OnceLock::new(),
            base_urls: RwLock::new((public, local)),
            connections: DashMap::new(),
            next_connection: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            starting: AtomicBool::new(false),
            started_at: SystemTime::now(),
            http_limiter: config.http_rate_limits.map(layer::HttpRateLimiter::new),
            config,
        }))
    }

    /// Records the URL the listener is reachable at (`http://127.0.0.1:{port}`); it becomes
    /// the public URL too unless one was configured.
    pub fn set_local_base_url(&self, url: &str) {
        if let Ok(mut urls) = self.base_urls.write() {
            let local = self.config.local_base_url.as_deref().map_or_else(|| strip_slash(url), strip_slash);
            urls.1 = local.clone();
            urls.0 = self.config.public_base_url.as_deref().map_or(local, strip_slash);
        }
    }

    /// The advertised URL (`public_base_url` in `connection_info`).
    pub fn public_base_url(&self) -> String {
        self.base_urls.read().map(|u| u.0.clone()).unwrap_or_default()
    }

    /// The loopback URL (`local_base_url` in `connection_info`).
    pub fn local_base_url(&self) -> String {
        self.base_urls.read().map(|u| u.1.clone()).unwrap_or_default()
    }

    /// When the server started.
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// The HTTP request-rate buckets, unless the limits are off.
    pub fn http_limiter(&self) -> Option<&layer::HttpRateLimiter> {
        self.http_limiter.as_ref()
    }

    /// Mounts `/ws`, the health probes, `/assets/config.json`, the static mounts,
    /// `/{ws}/info`, the login page and the HTTP service proxy (`/{ws}/services/...`).
    /// Every HTTP route is wrapped in [`layer::HttpLayer`] (rate limit, CORS); the order
    /// is upstream's precedence (static mounts shadow the workspace routes).
    pub fn configure(self: &Arc<Self>, cfg: &mut web::ServiceConfig) {
        let state = self.clone();
        cfg.route("/ws", web::get().to(move |req, body| connection::ws_endpoint(req, body, state.clone())));
        let layer = layer::HttpLayer::new(self);
        http::configure(self.clone(), &layer, cfg);
        static_files::configure(&self.config.static_mounts, &layer, cfg);
        http::configure_workspace_routes(self.clone(), &layer, cfg);
        login::configure(self.clone(), &layer, cfg);
        proxy::configure(self.clone(), &layer, cfg);
    }

    /// The workspace manager's address, starting it and the login service (in an arbiter
    /// of their own) on first use. Call it from inside an actix system, once the listener's URL is known (the
    /// manager advertises it in `_rserver` and `config.url`).
    pub fn manager(self: &Arc<Self>) -> actix::Addr<Manager> {
        self.manager
            .get_or_init(|| {
                if actix::System::try_current().is_some() {
                    let arbiter = actix::Arbiter::new();
                    let addr = Manager::start_in(self.clone(), &arbiter.handle());
                    let login = login::LoginService::start_in(self.clone(), &arbiter.handle());
                    ManagerHandle { addr, _login: login, arbiter: Some(arbiter) }
                } else {
                    let addr = Manager::start(self.clone());
                    ManagerHandle { addr, _login: login::LoginService::start(self.clone()), arbiter: None }
                }
            })
            .addr
            .clone()
    }

    /// Removes a client that is gone but still holds its address (a dead connection being
    /// replaced): its records, and `client_disconnected` (bare id) to its workspace.
    pub fn forget_client(&self, ws: &str, cid: &str) {
        self.registry.remove_client(ws, cid);
        let mut data = hypha_core::value::Map::new();
        data.insert("id".into(), hypha_core::Value::from(cid));
        data.insert("workspace".into(), hypha_core::Value::from(ws));
        self.router.broadcast_event(ws, hypha_core::message::CLIENT_DISCONNECTED, data);
        self.notify_client_left(ws, cid);
    }

    /// Tells the manager that `{ws}/{cid}` left, so its calls to that client fail at once.
    pub fn notify_client_left(&self, ws: &str, cid: &str) {
        if self.manager.get().is_none() {
            return;
        }
        if let Some(frame) = manager::client_left_frame(ws, cid) {
            let target = format!("{}/{}", hypha_core::ids::WILDCARD, self.config.manager_id());
            self.router.deliver_local(&target, frame);
        }
    }

    /// Starts a graceful shutdown: refuses new websockets and closes every open one with
    /// 1001 [`SHUTDOWN_REASON`]. Returns how many were closed.
    pub fn shutdown(&self) -> usize {
        self.shutting_down.store(true, Ordering::Release);
        let mut closed = 0;
        for conn in self.connections.iter() {
            conn.value().close(CloseCmd::close(1001, SHUTDOWN_REASON));
            closed += 1;
        }
        tracing::info!(connections = closed, "shutting down: closing websockets");
        if let Some(arbiter) = self.manager.get().and_then(|m| m.arbiter.as_ref()) {
            arbiter.stop();
        }
        closed
    }

    /// True once [`ServerState::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Marks startup functions as running (`true`) or done: while they run,
    /// `/health/readiness` answers 503 `DOWN` [`STARTING_REASON`], so nothing routes traffic
    /// to a server whose startup services are not registered yet.
    pub fn set_starting(&self, starting: bool) {
        self.starting.store(starting, Ordering::Release);
    }

    /// True while startup functions run (see [`ServerState::set_starting`]).
    pub fn is_starting(&self) -> bool {
        self.starting.load(Ordering::Acquire)
    }

    /// Open websockets (including those still in their handshake).
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    fn add_connection(&self, outbound: Outbound) -> u64 {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        self.connections.insert(id, outbound);
        id
    }

    fn remove_connection(&self, id: u64) {
        self.connections.remove(&id);
    }
}

/// The running manager and the arbiter it runs in.
#[derive(Debug)]
struct ManagerHandle {
    addr: actix::Addr<Manager>,
    /// The login service, started with the manager.
    _login: actix::Addr<login::LoginService>,
    arbiter: Option<actix::Arbiter>,
}

/// Most tokens remembered as revoked at once (each until it would have expired).
pub const MAX_REVOKED_TOKENS: usize = 100_000;

/// The revocation list: token -> when it expires (unix seconds). A revoked token is kept
/// only until its expiry, after which the signature check refuses it anyway.
#[derive(Debug, Default)]
pub struct RevokedTokens {
    table: DashMap<String, f64>,
    inserts: AtomicUsize,
}

impl RevokedTokens {
    /// Revokes `token` (which expires at `expires_at`). Refused when the list is full of
    /// unexpired tokens.
    pub fn revoke(&self, token: &str, expires_at: f64, now: f64) -> Result<(), String> {
        if self.inserts.fetch_add(1, Ordering::Relaxed) % 256 == 255 || self.table.len() >= MAX_REVOKED_TOKENS
        {
            self.table.retain(|_, exp| *exp >= now);
        }
        if self.table.len() >= MAX_REVOKED_TOKENS && !self.table.contains_key(token) {
            return Err(format!("Too many revoked tokens (at most {MAX_REVOKED_TOKENS})"));
        }
        self.table.insert(token.trim().to_owned(), expires_at);
        Ok(())
    }

    /// Whether `token` was revoked.
    pub fn is_revoked(&self, token: &str) -> bool {
        self.table.contains_key(token.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_follow_the_listener_unless_configured() {
        let s = ServerState::new(ServerConfig::default()).unwrap();
        assert_eq!(s.public_base_url(), DEFAULT_LOCAL_BASE_URL);
        s.set_local_base_url("http://127.0.0.1:4000");
        assert_eq!(
            (s.public_base_url(), s.local_base_url()),
            ("http://127.0.0.1:4000".into(), "http://127.0.0.1:4000".into())
        );
        let s = ServerState::new(ServerConfig {
            public_base_url: Some("https://hypha.example/".into()),
            ..ServerConfig::default()
        })
        .unwrap();
        s.set_local_base_url("http://127.0.0.1:4000/");
        assert_eq!(s.public_base_url(), "https://hypha.example");
        assert_eq!(s.local_base_url(), "http://127.0.0.1:4000");
    }

    #[actix_rt::test]
    async fn shutdown_closes_every_connection() {
        let s = ServerState::new(ServerConfig::default()).unwrap();
        let (a, mut ra) = outbound::channel(4, 1024);
        let (b, _rb) = outbound::channel(4, 1024);
        s.add_connection(a);
        let id = s.add_connection(b);
        s.remove_connection(id);
        assert_eq!(s.shutdown(), 1);
        assert!(s.is_shutting_down());
        assert_eq!(
            ra.next().await,
            Some(outbound::WriterEvent::Close(CloseCmd::close(1001, SHUTDOWN_REASON)))
        );
    }
}
