//! The Hypha server's websocket side (server spec §0, §1.1 health routes, §2, §3.2, §3.4, §8).
//!
//! ## Layout
//!
//! | file | what it holds |
//! | --- | --- |
//! | [`config`] | [`ServerConfig`]: typed timeouts and limits, upstream's defaults, `HYPHA_*` overrides |
//! | [`connection`] | the `/ws` endpoint and [`WsConnection`], one actix actor per websocket: handshake state machine, rate limiter, idle timer |
//! | [`outbound`] | the bounded queue to one client and the writer task that owns the actix-ws session |
//! | [`router`] | the routing table (`{ws}/{cid}` -> connection, generation, subscriptions) and routing rules 1-8 |
//! | [`workspace`] | the workspaces table the handshake checks |
//! | [`limits`] | the token bucket and the inbound frame-size guard |
//! | [`http`] | `/health/liveness` and `/health/readiness` |
//!
//! A frame's path: the client's socket -> [`limits::FrameSizeGuard`] -> actix-ws decoder ->
//! the sender's [`WsConnection`] (rate limit, [`router::Router::route`]: stamp and look
//! up) -> the target's [`outbound::Outbound`] queue -> the target's writer task -> its
//! socket. No actor hop and no wait between the two sockets (see [`router`]).
//!
//! Everything shared lives in one [`ServerState`] behind an `Arc`; [`ServerState::configure`]
//! mounts the routes into any actix-web `App`.

pub mod config;
pub mod connection;
pub mod http;
pub mod limits;
pub mod outbound;
pub mod router;
pub mod workspace;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use actix_web::web;
use dashmap::DashMap;

pub use config::{ConfigError, ServerConfig};
pub use connection::WsConnection;
pub use router::Router;
pub use workspace::Workspaces;

use outbound::{CloseCmd, Outbound};

/// The local base URL reported before a listener is bound (upstream's default port).
pub const DEFAULT_LOCAL_BASE_URL: &str = "http://127.0.0.1:9527";

/// The close reason sent to every client on a graceful shutdown (code 1001, no error frame:
/// clients reconnect as after any unexpected close).
pub const SHUTDOWN_REASON: &str = "Server is shutting down";

/// Everything the connections of one server share.
#[derive(Debug)]
pub struct ServerState {
    /// The settings (immutable once the server runs).
    pub config: ServerConfig,
    /// The routing table.
    pub router: Router,
    /// The workspaces table.
    pub workspaces: Workspaces,
    /// `(public, local)` base URLs, filled in when the listener is bound.
    base_urls: RwLock<(String, String)>,
    /// Every open websocket, authenticated or not, so a shutdown can close them all.
    connections: DashMap<u64, Outbound>,
    next_connection: AtomicU64,
    shutting_down: AtomicBool,
    /// When the server started (reported by the liveness probe).
    started_at: SystemTime,
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
        Ok(Arc::new(ServerState {
            router: Router::new(config.dead_peer_ttl),
            workspaces: Workspaces::new(),
            base_urls: RwLock::new((public, local)),
            connections: DashMap::new(),
            next_connection: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            started_at: SystemTime::now(),
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

    /// Mounts `/ws`, `/health/liveness` and `/health/readiness`.
    pub fn configure(self: &Arc<Self>, cfg: &mut web::ServiceConfig) {
        let state = self.clone();
        cfg.route("/ws", web::get().to(move |req, body| connection::ws_endpoint(req, body, state.clone())));
        http::configure(self.clone(), cfg);
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
        closed
    }

    /// True once [`ServerState::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
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
