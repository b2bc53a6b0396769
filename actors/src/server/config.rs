//! Server settings: every timeout a typed [`Duration`], every limit a named field, the
//! defaults those of the Python server (server spec §2.5, §6.3, §10).
//!
//! Upstream reads these from `HYPHA_*` environment variables; [`ServerConfig::apply_env`]
//! does the same from any lookup function (so it is testable without touching the process
//! environment), and [`ServerConfig::from_env`] from the real one.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use hypha_core::auth::{self, JwtConfig};

/// The upstream version this server is compatible with, reported as `hypha_version` in
/// `connection_info` (stock clients copy it into `server.config`).
pub const HYPHA_VERSION: &str = "0.21.137";

/// The smallest inbound frame limit we accept: the design promises every endpoint takes
/// frames of at least 1 MiB (clients chunk at 256 KiB, but a chunk carries overhead and
/// non-chunked control calls can be larger).
pub const MIN_MAX_FRAME_SIZE: usize = 1024 * 1024;

/// Why a configuration value was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// An environment variable does not parse as the number it must be.
    #[error("invalid value for {name}: {value:?} ({expected})")]
    InvalidEnv {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// The inbound frame limit is below [`MIN_MAX_FRAME_SIZE`].
    #[error("max frame size {0} is below the minimum of {MIN_MAX_FRAME_SIZE} bytes")]
    FrameSizeTooSmall(usize),
    /// The message rate is not a finite positive number.
    #[error("rate limit must be a finite number > 0, got {0}")]
    InvalidRate(f64),
    /// A queue or burst size of zero would refuse every frame.
    #[error("{0} must be at least 1")]
    ZeroLimit(&'static str),
    /// The `--root-token` is too short or weak (`hypha_core::auth::check_root_token_strength`).
    #[error(transparent)]
    RootToken(#[from] auth::AuthError),
    /// A `--static-mounts` entry is malformed, clashes with a route, or names no directory.
    #[error("invalid static mount {mount:?}: {reason}")]
    StaticMount {
        /// The entry as given (`/path:./dir`).
        mount: String,
        /// Why it was refused (upstream's wording where it has one).
        reason: String,
    },
    /// The account database cannot be opened.
    #[error(transparent)]
    Accounts(#[from] super::accounts::AccountError),
    /// An `--allow-origins` entry is empty or not a valid header value.
    #[error("invalid CORS origin {0:?}")]
    InvalidOrigin(String),
}

/// One `--static-mounts` entry: the files under `dir` are served at `{path}/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticMount {
    /// The URL prefix, a single top-level segment with its leading `/` (`/docs`).
    pub path: String,
    /// The directory served (checked to exist when the server is built).
    pub dir: PathBuf,
}

impl StaticMount {
    /// A mount of `dir` at `path`.
    pub fn new(path: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        StaticMount { path: path.into(), dir: dir.into() }
    }

    /// Parses upstream's `--static-mounts` syntax, `/path:./dir` (split at the first `:`).
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        match spec.split_once(':') {
            Some((path, dir)) if !dir.is_empty() => Ok(StaticMount::new(path, dir)),
            _ => Err(ConfigError::StaticMount {
                mount: spec.to_owned(),
                reason: "expected <mountpath>:<localdir>, e.g. /mystatic:./static/".into(),
            }),
        }
    }
}

/// The HTTP request-rate limits (server spec §1.2): token buckets per client IP for
/// callers without a valid token, per token identity for the others. Upstream's
/// defaults, which also apply to loopback clients (upstream does not exempt them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpRateLimits {
    /// Sustained requests per second per IP (`HYPHA_HTTP_RATE_LIMIT`, 100).
    pub anonymous_rate: f64,
    /// Burst per IP (`HYPHA_HTTP_BURST_LIMIT`, 500).
    pub anonymous_burst: u32,
    /// Sustained requests per second per token identity
    /// (`HYPHA_HTTP_AUTHENTICATED_RATE_LIMIT`, 1000).
    pub authenticated_rate: f64,
    /// Burst per token identity (`HYPHA_HTTP_AUTHENTICATED_BURST_LIMIT`, 5000).
    pub authenticated_burst: u32,
}

impl Default for HttpRateLimits {
    fn default() -> Self {
        HttpRateLimits {
            anonymous_rate: 100.0,
            anonymous_burst: 500,
            authenticated_rate: 1000.0,
            authenticated_burst: 5000,
        }
    }
}

/// Everything the websocket server needs to know that is not per connection.
///
/// Built with [`ServerConfig::default`] (upstream's defaults, a random server id and a
/// random JWT secret) and adjusted field by field; the `hypha-rpc` crate's
/// `Server::builder()` wraps it.
#[derive(Clone)]
pub struct ServerConfig {
    /// This replica's id; the manager's client id is `manager-{server_id}` and clients
    /// address it as `*/manager-{server_id}` (spec §0).
    pub server_id: String,
    /// Reported as `hypha_version` (clients show it; some check it is present).
    pub hypha_version: String,
    /// The advertised URL (`--public-base-url`), without a trailing `/`. `None` means "the
    /// local URL", which is only known once the listener is bound.
    pub public_base_url: Option<String>,
    /// The URL of this process on the loopback (`http://127.0.0.1:{port}`); `None` until
    /// the listener is bound (the launcher fills it in).
    pub local_base_url: Option<String>,
    /// The HS256 secret and the claim settings. Upstream generates a random secret when
    /// `JWT_SECRET` is unset, so tokens then die with the process; so do we.
    pub jwt: JwtConfig,
    /// `--root-token`: a verbatim credential for user `root` (checked for strength).
    pub root_token: Option<String>,
    /// How long a new socket may stay silent before its auth frame (upstream: 5 s).
    pub auth_timeout: Duration,
    /// How long an authenticated socket may go without a text or binary data frame
    /// (`HYPHA_WS_IDLE_TIMEOUT`, 600 s). Protocol pings do not count.
    pub idle_timeout: Duration,
    /// Sustained binary frames per second per connection (`HYPHA_WS_MSG_RATE_LIMIT`, 200).
    pub msg_rate_limit: f64,
    /// Token-bucket capacity (`HYPHA_WS_MSG_BURST_LIMIT`, 2000).
    pub msg_burst_limit: u32,
    /// Largest inbound websocket frame (and reassembled fragmented message), in bytes
    /// (`HYPHA_WS_MAX_FRAME_SIZE`; upstream's uvicorn default, 16 MiB). Larger ones close
    /// the connection with 1009 before the payload is buffered.
    pub max_frame_size: usize,
    /// Frames waiting to be written to one client; when full, the client is too slow and
    /// is disconnected (1008) rather than letting the queue grow or blocking the sender.
    pub outbound_queue_frames: usize,
    /// Bytes waiting to be written to one client (same policy). A single frame larger
    /// than this is still accepted into an empty queue, so no legal frame is undeliverable.
    pub outbound_queue_bytes: usize,
    /// How long a disconnected peer stays "recently disconnected" so calls to it fail fast
    /// (spec §3.2 rule 6: 120 s).
    pub dead_peer_ttl: Duration,
    /// Lifetime of the reconnection token in `connection_info` (`RECONNECTION_TOKEN_LIFE_TIME`,
    /// 172 800 s).
    pub reconnection_token_life_time: Duration,
    /// How long the writer waits to flush a final error frame and close frame to a client
    /// that does not read, before dropping the socket.
    pub close_timeout: Duration,
    /// How long a graceful shutdown waits for connections to finish after closing them.
    pub shutdown_timeout: Duration,
    /// CORS origins (`--allow-origins` / `ALLOW_ORIGINS`); `["*"]` allows any origin, which
    /// is then echoed because credentials are allowed (upstream's patched CORS layer).
    pub allow_origins: Vec<String>,
    /// HTTP request-rate limits; `None` turns them off (e.g. behind a proxy that limits).
    pub http_rate_limits: Option<HttpRateLimits>,
    /// `--static-mounts`: directories served as static files.
    pub static_mounts: Vec<StaticMount>,
    /// Most handshakes in their auth/setup phase at once (`HYPHA_MAX_CONCURRENT_CONNECTIONS`,
    /// 10); the others wait for a slot (spec §2.1 step 4).
    pub max_concurrent_handshakes: usize,
    /// How long a handshake waits for a slot before it is closed with 1013 `Server busy,
    /// please retry` (upstream: 30 s).
    pub handshake_admission_timeout: Duration,
    /// Most services one client may register besides its `built-in`
    /// (`HYPHA_MAX_SERVICES_PER_CLIENT`, 1000): registry records live in memory.
    pub max_services_per_client: usize,
    /// Frames waiting in the workspace manager's inbox (4096). When it is full, a client's
    /// connection waits for room, up to `manager_inbox_wait`, without reading its socket;
    /// then the call is rejected with "Server busy" (see `router::LocalInbox`).
    pub manager_inbox_frames: usize,
    /// How long a client's frame waits for room in a full manager inbox (10 s).
    pub manager_inbox_wait: Duration,
    /// Where the server keeps its files (`--data-dir`): the account database
    /// `accounts.sqlite3` lives here. `None` keeps accounts in memory (they die with the
    /// process): the library default, so tests and embedders leave no files behind; the
    /// `hypha-server` binary defaults to `./hypha-data`.
    pub data_dir: Option<PathBuf>,
    /// Whether anyone may create an account on the login page (`--no-signup` turns it
    /// off; administrators then add users with `hypha-server user add`). Open by default,
    /// as upstream's hosted login is.
    pub allow_signup: bool,
    /// Lifetime of the tokens the login page issues on a password login (24 h, as
    /// upstream's local auth).
    pub login_token_life_time: Duration,
    /// How long a login session (`start`'s key) waits for its report, and how long a
    /// reported one waits for `check` (upstream's `MAXIMUM_LOGIN_TIME`, 180 s).
    pub max_login_time: Duration,
    /// How long a worker may keep polling its sockets after a websocket frame before it
    /// sleeps (`HYPHA_BUSY_POLL_US`, 50 µs; zero turns polling off). The actual window
    /// adapts to the traffic and is zero when frames are far apart (see
    /// [`busy_poll`](crate::busy_poll)): it spends CPU to save the wake-up of a reply that
    /// comes back within a round trip.
    pub busy_poll: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            server_id: auth::readable_id(),
            hypha_version: HYPHA_VERSION.to_owned(),
            public_base_url: None,
            local_base_url: None,
            jwt: JwtConfig::new(hypha_core::ids::random_id()),
            root_token: None,
            auth_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            msg_rate_limit: 200.0,
            msg_burst_limit: 2000,
            max_frame_size: 16 * 1024 * 1024,
            outbound_queue_frames: 1024,
            outbound_queue_bytes: 64 * 1024 * 1024,
            dead_peer_ttl: Duration::from_secs(120),
            reconnection_token_life_time: Duration::from_secs_f64(auth::RECONNECTION_TOKEN_LIFE_TIME),
            close_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            allow_origins: vec!["*".to_owned()],
            http_rate_limits: Some(HttpRateLimits::default()),
            static_mounts: Vec::new(),
            max_concurrent_handshakes: 10,
            handshake_admission_timeout: Duration::from_secs(30),
            max_services_per_client: 1000,
            manager_inbox_frames: super::router::LOCAL_INBOX_FRAMES,
            manager_inbox_wait: super::router::LOCAL_INBOX_WAIT,
            data_dir: None,
            allow_signup: true,
            login_token_life_time: Duration::from_secs(24 * 3600),
            max_login_time: Duration::from_secs(180),
            busy_poll: crate::busy_poll::DEFAULT_MAX,
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The root token is a full admin credential: never print it (JwtConfig redacts its secret).
        f.debug_struct("ServerConfig")
            .field("server_id", &self.server_id)
            .field("hypha_version", &self.hypha_version)
            .field("public_base_url", &self.public_base_url)
            .field("local_base_url", &self.local_base_url)
            .field("jwt", &self.jwt)
            .field("root_token", &self.root_token.as_ref().map(|_| "<redacted>"))
            .field("auth_timeout", &self.auth_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("msg_rate_limit", &self.msg_rate_limit)
            .field("msg_burst_limit", &self.msg_burst_limit)
            .field("max_frame_size", &self.max_frame_size)
            .field("outbound_queue_frames", &self.outbound_queue_frames)
            .field("outbound_queue_bytes", &self.outbound_queue_bytes)
            .field("dead_peer_ttl", &self.dead_peer_ttl)
            .field("reconnection_token_life_time", &self.reconnection_token_life_time)
            .field("close_timeout", &self.close_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("allow_origins", &self.allow_origins)
            .field("http_rate_limits", &self.http_rate_limits)
            .field("static_mounts", &self.static_mounts)
            .field("max_concurrent_handshakes", &self.max_concurrent_handshakes)
            .field("handshake_admission_timeout", &self.handshake_admission_timeout)
            .field("max_services_per_client", &self.max_services_per_client)
            .field("manager_inbox_frames", &self.manager_inbox_frames)
            .field("manager_inbox_wait", &self.manager_inbox_wait)
            .field("data_dir", &self.data_dir)
            .field("allow_signup", &self.allow_signup)
            .field("login_token_life_time", &self.login_token_life_time)
            .field("max_login_time", &self.max_login_time)
            .finish()
    }
}

/// Environment variables [`ServerConfig::apply_env`] reads, with the field each sets.
pub const ENV_VARS: [(&str, &str); 16] = [
    ("HYPHA_WS_IDLE_TIMEOUT", "idle_timeout (seconds)"),
    ("HYPHA_WS_MSG_RATE_LIMIT", "msg_rate_limit (frames per second)"),
    ("HYPHA_WS_MSG_BURST_LIMIT", "msg_burst_limit (frames)"),
    ("HYPHA_WS_MAX_FRAME_SIZE", "max_frame_size (bytes)"),
    ("HYPHA_WS_AUTH_TIMEOUT", "auth_timeout (seconds)"),
    ("HYPHA_MAX_CONCURRENT_CONNECTIONS", "max_concurrent_handshakes (handshakes)"),
    ("HYPHA_MAX_SERVICES_PER_CLIENT", "max_services_per_client (services)"),
    ("RECONNECTION_TOKEN_LIFE_TIME", "reconnection_token_life_time (seconds)"),
    ("HYPHA_SERVER_ID", "server_id"),
    ("HYPHA_JWT_SECRET / JWT_SECRET", "jwt secret"),
    ("ALLOW_ORIGINS", "allow_origins (comma separated)"),
    ("HYPHA_HTTP_RATE_LIMIT", "http_rate_limits.anonymous_rate (requests per second)"),
    ("HYPHA_HTTP_BURST_LIMIT", "http_rate_limits.anonymous_burst (requests)"),
    ("HYPHA_HTTP_AUTHENTICATED_RATE_LIMIT", "http_rate_limits.authenticated_rate (requests per second)"),
    ("HYPHA_HTTP_AUTHENTICATED_BURST_LIMIT", "http_rate_limits.authenticated_burst (requests)"),
    ("HYPHA_BUSY_POLL_US", "busy_poll (microseconds, 0: off)"),
];

/// Splits upstream's comma-separated `--allow-origins` value (entries trimmed, empty ones
/// dropped).
pub fn parse_origins(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|o| !o.is_empty()).map(str::to_owned).collect()
}

fn parse_secs(name: &'static str, value: &str) -> Result<Duration, ConfigError> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| ConfigError::InvalidEnv { name, value: value.to_owned(), expected: "seconds >= 0" })
}

fn parse_num<T: std::str::FromStr>(
    name: &'static str,
    value: &str,
    expected: &'static str,
) -> Result<T, ConfigError> {
    value.trim().parse::<T>().map_err(|_| ConfigError::InvalidEnv { name, value: value.to_owned(), expected })
}

impl ServerConfig {
    /// The manager's client id, `manager-{server_id}` (sent as `manager_id`).
    pub fn manager_id(&self) -> String {
        format!("manager-{}", self.server_id)
    }

    /// Overrides fields from environment-style variables (see [`ENV_VARS`]); `lookup`
    /// returns a variable's value. `HYPHA_JWT_SECRET` wins over `JWT_SECRET` as upstream.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = lookup("HYPHA_WS_IDLE_TIMEOUT") {
            self.idle_timeout = parse_secs("HYPHA_WS_IDLE_TIMEOUT", &v)?;
        }
        if let Some(v) = lookup("HYPHA_WS_AUTH_TIMEOUT") {
            self.auth_timeout = parse_secs("HYPHA_WS_AUTH_TIMEOUT", &v)?;
        }
        if let Some(v) = lookup("HYPHA_WS_MSG_RATE_LIMIT") {
            self.msg_rate_limit = parse_num("HYPHA_WS_MSG_RATE_LIMIT", &v, "a number")?;
        }
        if let Some(v) = lookup("HYPHA_WS_MSG_BURST_LIMIT") {
            self.msg_burst_limit = parse_num("HYPHA_WS_MSG_BURST_LIMIT", &v, "an integer")?;
        }
        if let Some(v) = lookup("HYPHA_WS_MAX_FRAME_SIZE") {
            self.max_frame_size = parse_num("HYPHA_WS_MAX_FRAME_SIZE", &v, "bytes")?;
        }
        if let Some(v) = lookup("HYPHA_MAX_CONCURRENT_CONNECTIONS") {
            self.max_concurrent_handshakes = parse_num("HYPHA_MAX_CONCURRENT_CONNECTIONS", &v, "an integer")?;
        }
        if let Some(v) = lookup("HYPHA_MAX_SERVICES_PER_CLIENT") {
            self.max_services_per_client = parse_num("HYPHA_MAX_SERVICES_PER_CLIENT", &v, "an integer")?;
        }
        if let Some(v) = lookup("RECONNECTION_TOKEN_LIFE_TIME") {
            self.reconnection_token_life_time = parse_secs("RECONNECTION_TOKEN_LIFE_TIME", &v)?;
        }
        if let Some(v) = lookup("HYPHA_BUSY_POLL_US") {
            self.busy_poll = Duration::from_micros(parse_num("HYPHA_BUSY_POLL_US", &v, "microseconds")?);
        }
        if let Some(v) = lookup("HYPHA_SERVER_ID").filter(|v| !v.is_empty()) {
            self.server_id = v;
        }
        if let Some(v) = lookup("ALLOW_ORIGINS").filter(|v| !v.trim().is_empty()) {
            self.allow_origins = parse_origins(&v);
        }
        if let Some(limits) = &mut self.http_rate_limits {
            if let Some(v) = lookup("HYPHA_HTTP_RATE_LIMIT") {
                limits.anonymous_rate = parse_num("HYPHA_HTTP_RATE_LIMIT", &v, "a number")?;
            }
            if let Some(v) = lookup("HYPHA_HTTP_BURST_LIMIT") {
                limits.anonymous_burst = parse_num("HYPHA_HTTP_BURST_LIMIT", &v, "an integer")?;
            }
            if let Some(v) = lookup("HYPHA_HTTP_AUTHENTICATED_RATE_LIMIT") {
                limits.authenticated_rate = parse_num("HYPHA_HTTP_AUTHENTICATED_RATE_LIMIT", &v, "a number")?;
            }
            if let Some(v) = lookup("HYPHA_HTTP_AUTHENTICATED_BURST_LIMIT") {
                limits.authenticated_burst =
                    parse_num("HYPHA_HTTP_AUTHENTICATED_BURST_LIMIT", &v, "an integer")?;
            }
        }
        if let Some(secret) =
            lookup("HYPHA_JWT_SECRET").or_else(|| lookup("JWT_SECRET")).filter(|s| !s.is_empty())
        {
            let mut jwt = JwtConfig::new(secret);
            jwt.issuer = self.jwt.issuer.clone();
            jwt.audience = self.jwt.audience.clone();
            jwt.namespace = self.jwt.namespace.clone();
            self.jwt = jwt;
        }
        self.validate()
    }

    /// [`ServerConfig::default`] with the process environment applied.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut config = ServerConfig::default();
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Checks the limits make sense and the root token is strong enough.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_frame_size < MIN_MAX_FRAME_SIZE {
            return Err(ConfigError::FrameSizeTooSmall(self.max_frame_size));
        }
        if !(self.msg_rate_limit.is_finite() && self.msg_rate_limit > 0.0) {
            return Err(ConfigError::InvalidRate(self.msg_rate_limit));
        }
        if self.msg_burst_limit == 0 {
            return Err(ConfigError::ZeroLimit("msg_burst_limit"));
        }
        if self.outbound_queue_frames == 0 {
            return Err(ConfigError::ZeroLimit("outbound_queue_frames"));
        }
        if self.outbound_queue_bytes == 0 {
            return Err(ConfigError::ZeroLimit("outbound_queue_bytes"));
        }
        if self.max_concurrent_handshakes == 0 {
            return Err(ConfigError::ZeroLimit("max_concurrent_handshakes"));
        }
        if self.manager_inbox_frames == 0 {
            return Err(ConfigError::ZeroLimit("manager_inbox_frames"));
        }
        if let Some(token) = &self.root_token {
            auth::check_root_token_strength(token)?;
        }
        if let Some(l) = &self.http_rate_limits {
            for rate in [l.anonymous_rate, l.authenticated_rate] {
                if !(rate.is_finite() && rate > 0.0) {
                    return Err(ConfigError::InvalidRate(rate));
                }
            }
            if l.anonymous_burst == 0 {
                return Err(ConfigError::ZeroLimit("http_rate_limits.anonymous_burst"));
            }
            if l.authenticated_burst == 0 {
                return Err(ConfigError::ZeroLimit("http_rate_limits.authenticated_burst"));
            }
        }
        for origin in &self.allow_origins {
            if origin.trim().is_empty() || actix_web::http::header::HeaderValue::from_str(origin).is_err() {
                return Err(ConfigError::InvalidOrigin(origin.clone()));
            }
        }
        super::static_files::check_mounts(&self.static_mounts)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults_are_upstreams() {
        let c = ServerConfig::default();
        assert_eq!(c.auth_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, Duration::from_secs(600));
        assert_eq!((c.msg_rate_limit, c.msg_burst_limit), (200.0, 2000));
        assert_eq!(c.max_frame_size, 16 * 1024 * 1024);
        assert_eq!(c.dead_peer_ttl, Duration::from_secs(120));
        assert_eq!(c.reconnection_token_life_time, Duration::from_secs(172_800));
        assert_eq!(c.max_concurrent_handshakes, 10);
        assert_eq!(c.handshake_admission_timeout, Duration::from_secs(30));
        assert_eq!(c.max_services_per_client, 1000);
        assert_eq!(c.busy_poll, Duration::from_micros(50));
        assert_eq!(c.manager_id(), format!("manager-{}", c.server_id));
        c.validate().unwrap();
        // Two defaults get different ids and secrets (tokens of one never verify on the other).
        assert_ne!(ServerConfig::default().server_id, c.server_id);
    }

    #[test]
    fn env_overrides() {
        let mut c = ServerConfig::default();
        c.apply_env(env(&[
            ("HYPHA_WS_IDLE_TIMEOUT", "4"),
            ("HYPHA_WS_AUTH_TIMEOUT", "0.25"),
            ("HYPHA_WS_MSG_RATE_LIMIT", "10.5"),
            ("HYPHA_WS_MSG_BURST_LIMIT", "20"),
            ("HYPHA_WS_MAX_FRAME_SIZE", "2097152"),
            ("RECONNECTION_TOKEN_LIFE_TIME", "60"),
            ("HYPHA_SERVER_ID", "my-server"),
            ("HYPHA_MAX_CONCURRENT_CONNECTIONS", "3"),
            ("HYPHA_MAX_SERVICES_PER_CLIENT", "7"),
            ("HYPHA_BUSY_POLL_US", "0"),
            ("JWT_SECRET", "low"),
            ("HYPHA_JWT_SECRET", "high"),
        ]))
        .unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(4));
        assert_eq!(c.auth_timeout, Duration::from_millis(250));
        assert_eq!((c.msg_rate_limit, c.msg_burst_limit), (10.5, 20));
        assert_eq!(c.max_frame_size, 2 * 1024 * 1024);
        assert_eq!(c.reconnection_token_life_time, Duration::from_secs(60));
        assert_eq!(c.manager_id(), "manager-my-server");
        assert_eq!((c.max_concurrent_handshakes, c.max_services_per_client), (3, 7));
        assert_eq!(c.busy_poll, Duration::ZERO);
        assert_eq!(c.jwt, JwtConfig::new("high"));
        let mut c = ServerConfig::default();
        c.apply_env(env(&[("JWT_SECRET", "low")])).unwrap();
        assert_eq!(c.jwt, JwtConfig::new("low"));
    }

    #[test]
    fn bad_values_are_refused() {
        let mut c = ServerConfig::default();
        let e = c.apply_env(env(&[("HYPHA_WS_IDLE_TIMEOUT", "-1")])).unwrap_err();
        assert!(matches!(e, ConfigError::InvalidEnv { name: "HYPHA_WS_IDLE_TIMEOUT", .. }), "{e}");
        let e = c.apply_env(env(&[("HYPHA_WS_MSG_BURST_LIMIT", "x")])).unwrap_err();
        assert!(e.to_string().contains("HYPHA_WS_MSG_BURST_LIMIT"), "{e}");
        let e = c.apply_env(env(&[("HYPHA_BUSY_POLL_US", "1.5")])).unwrap_err();
        assert!(e.to_string().contains("HYPHA_BUSY_POLL_US"), "{e}");
        let mut c = ServerConfig::default();
        assert_eq!(
            c.apply_env(env(&[("HYPHA_WS_MAX_FRAME_SIZE", "1000")])),
            Err(ConfigError::FrameSizeTooSmall(1000))
        );
        let mut c = ServerConfig { msg_rate_limit: 0.0, ..ServerConfig::default() };
        assert_eq!(c.validate(), Err(ConfigError::InvalidRate(0.0)));
        c.msg_rate_limit = 1.0;
        c.root_token = Some("short".into());
        assert!(matches!(c.validate(), Err(ConfigError::RootToken(_))));
    }

    #[test]
    fn debug_redacts_credentials() {
        let c = ServerConfig {
            root_token: Some("x".repeat(70)),
            jwt: JwtConfig::new("super-secret-value"),
            ..ServerConfig::default()
        };
        let s = format!("{c:?}");
        assert!(!s.contains("xxxx") && !s.contains("super-secret-value"), "{s}");
        assert!(s.contains("<redacted>"));
    }
}
