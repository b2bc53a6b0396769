//! The connection actor: one websocket to the server (awc, inside the actix System), the
//! handshake, frames in and out, the application ping, and close handling.
//!
//! A *generation* is one websocket's life: the socket, its reader and writer tasks and
//! the two bounded channels that connect it to the session registry. Every message about
//! a socket carries its [`Generation`], so that when reconnection replaces a socket, what
//! the old one still reports (a late close, a late frame) is recognised as superseded and
//! reaped instead of tearing down the new one.
//!
//! Reconnection (spec rpc-protocol.md §1.6): when a generation ends and the user did not
//! close it, whatever the close code (the stock clients reconnect on 1000 and 1001 too:
//! a server restart or a rolling upgrade closes that way), the actor asks its [`Backoff`]
//! how long to wait, runs [`open`] again with the latest reconnection token (same client
//! id, workspace and token), and attaches the next generation. The registry then
//! re-registers the services and subscriptions and answers [`Restored`]; a failed
//! re-registration counts as a failed attempt. The actor gives up for good when the
//! server answers a reconnect handshake with an `error` frame (upstream's "Server refused
//! reconnection"), or when the backoff's attempt limit is reached ("Max reconnection
//! attempts exceeded"); it then sends [`ReconnectFailed`] and stops.
//!
//! Queues and their overflow policy:
//! * inbound (socket -> registry): a bounded channel of [`ConnectOptions::inbound_capacity`]
//!   frames. When the registry falls behind, the reader stops reading the socket, so TCP
//!   flow control pushes back on the server instead of memory growing here.
//! * outbound (registry -> socket): a bounded channel of
//!   [`ConnectOptions::outbound_capacity`] frames. When it is full, the registry keeps the
//!   frames in the endpoint's queue and resumes when the writer frees a slot; the
//!   connection's own control frames (ping) are skipped when it is full, since the next
//!   one follows.
//!
//! TCP_NODELAY is set on the socket before the upgrade: without it a small frame after a
//! small frame waits for the peer's delayed ACK (40 ms per item on Linux), which the
//! server already ran into.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_rt::net::TcpStream;
use actix_rt::task::JoinHandle;
use actix_service::Service;
use actix_tls::connect::{
    ConnectError as TcpConnectError, ConnectInfo, Connection as TcpConnection, ConnectorService,
};
use actix_ws::Item;
use awc::http::Uri;
use awc::ws::{CloseCode, CloseReason, Frame, Message};
use awc::BoxedSocket;
use bytes::{Bytes, BytesMut};
use futures_util::future::LocalBoxFuture;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hypha_core::msgpack::Rope;
use serde_json::{json, Map as JsonMap, Value as Json};
use tokio::sync::mpsc;

use super::backoff::{Backoff, BackoffConfig, Next};
use super::session_registry::SessionRegistry;
use super::wscodec::ClientCodec;
use super::Error;

/// The websocket of one generation.
pub type Socket = actix_codec::Framed<BoxedSocket, ClientCodec>;

/// The number of a websocket's life within one client (starts at 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gen{}", self.0)
    }
}

/// How to reach and authenticate with the server. Every timeout is a `Duration`.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `http(s)://host:port` or `ws(s)://host:port/ws` (see [`ws_url`]).
    pub server_url: String,
    /// Our client id (always set: the caller generates one if the user did not).
    pub client_id: String,
    /// The workspace to join; `None` lets the server pick (token or personal workspace).
    pub workspace: Option<String>,
    /// A login or `generate_token` token; `None` connects anonymously.
    pub token: Option<String>,
    /// How long to wait for the socket and for `connection_info` (Python uses
    /// `method_timeout`).
    pub handshake_timeout: Duration,
    /// Application ping period (`{"type":"ping"}`); `None` disables it. Python: 20 s.
    pub ping_interval: Option<Duration>,
    /// Period of `{"type":"refresh_token"}` (Python: 7200 s, clamped to
    /// `reconnection_token_life_time / 1.5`).
    pub token_refresh_interval: Duration,
    /// Largest frame we accept. Peers chunk at 256 KiB, but the manager's own replies and
    /// other servers may send more.
    pub max_frame_size: usize,
    /// Frames buffered from the socket towards the registry.
    pub inbound_capacity: usize,
    /// Frames buffered from the registry towards the socket.
    pub outbound_capacity: usize,
    /// When and how often to reconnect after an unexpected close
    /// ([`BackoffConfig::disabled`]: a lost connection is final).
    pub reconnect: BackoffConfig,
    /// Extra HTTP headers of the websocket upgrade request (upstream's
    /// `additional_headers`, e.g. for a proxy in front of the server); sent on every
    /// reconnection too.
    pub additional_headers: Vec<(String, String)>,
    /// How long this thread may keep polling its sockets after a frame from the server
    /// before it sleeps (zero: never); see [`busy_poll`](crate::busy_poll).
    pub busy_poll: Duration,
}

impl ConnectOptions {
    /// Options with Python's defaults for everything but the address and id.
    pub fn new(server_url: impl Into<String>, client_id: impl Into<String>) -> Self {
        Self {
            server_url: server_url.into(),
            client_id: client_id.into(),
            workspace: None,
            token: None,
            handshake_timeout: Duration::from_secs(30),
            ping_interval: Some(Duration::from_secs(20)),
            token_refresh_interval: Duration::from_secs(7200),
            max_frame_size: 64 << 20,
            inbound_capacity: 1024,
            outbound_capacity: 1024,
            reconnect: BackoffConfig::default(),
            additional_headers: Vec::new(),
            busy_poll: crate::busy_poll::DEFAULT_MAX,
        }
    }
}

/// The server's `connection_info` (spec §1.3), the fields the client uses plus the raw
/// map (the workspace-manager proxy exposes all of it as its config).
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionInfo {
    /// The workspace we are in.
    pub workspace: String,
    /// Our client id, as the server confirmed it.
    pub client_id: String,
    /// The manager's client id (`*/<manager_id>` is its address).
    pub manager_id: String,
    /// `_rserver` of our descriptors.
    pub public_base_url: Option<String>,
    /// The server's version string.
    pub hypha_version: Option<String>,
    /// The token that restores this identity on reconnect.
    pub reconnection_token: Option<String>,
    /// Its lifetime, when the server said.
    pub reconnection_token_life_time: Option<Duration>,
    /// `user`: who the server thinks we are.
    pub user: Json,
    /// Everything the server sent.
    pub raw: JsonMap<String, Json>,
}

impl ConnectionInfo {
    /// Reads a `connection_info` object.
    pub fn from_json(raw: JsonMap<String, Json>) -> Result<Self, Error> {
        let text = |k: &str| raw.get(k).and_then(Json::as_str).map(str::to_owned);
        let need =
            |k: &str| text(k).ok_or_else(|| Error::UnexpectedMessage(format!("connection_info without {k}")));
        Ok(Self {
            workspace: need("workspace")?,
            client_id: need("client_id")?,
            manager_id: need("manager_id")?,
            public_base_url: text("public_base_url"),
            hypha_version: text("hypha_version"),
            reconnection_token: text("reconnection_token"),
            reconnection_token_life_time: raw
                .get("reconnection_token_life_time")
                .and_then(Json::as_f64)
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64),
            user: raw.get("user").cloned().unwrap_or(Json::Null),
            raw,
        })
    }
}

/// The websocket URL for a server URL (spec §1.1): `http(s)://` becomes `ws(s)://` with
/// `/ws` appended (after stripping a trailing `/`); `ws(s)://` URLs are used unchanged.
pub fn ws_url(server_url: &str) -> Result<String, Error> {
    let url = server_url.trim();
    let bad = || Error::Config(format!("server_url must start with http(s):// or ws(s)://: {url:?}"));
    if url.starts_with("ws://") || url.starts_with("wss://") {
        return Ok(url.to_owned());
    }
    let rest = url
        .strip_prefix("http://")
        .map(|r| ("ws://", r))
        .or_else(|| url.strip_prefix("https://").map(|r| ("wss://", r)));
    match rest {
        Some((scheme, r)) if !r.is_empty() => Ok(format!("{scheme}{}/ws", r.trim_end_matches('/'))),
        _ => Err(bad()),
    }
}

/// A TCP connector that sets TCP_NODELAY on every socket it opens.
#[derive(Clone, Default)]
struct NoDelayConnector {
    inner: ConnectorService,
}

impl Service<ConnectInfo<Uri>> for NoDelayConnector {
    type Response = TcpConnection<Uri, TcpStream>;
    type Error = TcpConnectError;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_service::always_ready!();

    fn call(&self, req: ConnectInfo<Uri>) -> Self::Future {
        let connect = self.inner.call(req);
        Box::pin(async move {
            let conn = connect.await?;
            if let Err(e) = conn.io_ref().set_nodelay(true) {
                tracing::warn!(error = %e, "could not set TCP_NODELAY on the client socket");
            }
            Ok(conn)
        })
    }
}

/// Opens a websocket and runs the handshake (spec §1.3): sends the auth frame, skips
/// binary frames, and reads the first text frame, which must be `connection_info`.
pub async fn open(
    opts: &ConnectOptions,
    reconnection_token: Option<&str>,
) -> Result<(Socket, ConnectionInfo), Error> {
    let url = ws_url(&opts.server_url)?;
    let connect_error = |message: String| Error::Connect { url: url.clone(), message };
    let client = awc::Client::builder()
        .connector(awc::Connector::new().connector(NoDelayConnector::default()))
        .timeout(opts.handshake_timeout)
        .finish();
    let mut request = client.ws(url.as_str()).max_frame_size(opts.max_frame_size);
    for (name, value) in &opts.additional_headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let (_, ws) = request.connect().await.map_err(|e| connect_error(e.to_string()))?;
    let mut ws = ws.into_map_codec(ClientCodec::new);
    // Python sends all four keys, null when unset.
    let auth = json!({
        "client_id": opts.client_id,
        "workspace": opts.workspace,
        "token": opts.token,
        "reconnection_token": reconnection_token,
    });
    ws.send(Message::Text(auth.to_string().into())).await.map_err(|e| connect_error(e.to_string()))?;
    let first = tokio::time::timeout(opts.handshake_timeout, first_text(&mut ws))
        .await
        .map_err(|_| Error::HandshakeTimeout(opts.handshake_timeout))?
        .map_err(|e| match e {
            Error::Connect { message, .. } => connect_error(message),
            other => other,
        })?;
    let parsed: Json = serde_json::from_str(&first).map_err(|_| Error::UnexpectedMessage(first.clone()))?;
    let Json::Object(obj) = parsed else { return Err(Error::UnexpectedMessage(first)) };
    match obj.get("type").and_then(Json::as_str) {
        Some("connection_info") => {}
        Some("error") => {
            let message = obj.get("message").and_then(Json::as_str).unwrap_or("unknown error");
            return Err(Error::ConnectionAborted(message.to_owned()));
        }
        _ => return Err(Error::UnexpectedMessage(first)),
    }
    let info = ConnectionInfo::from_json(obj)?;
    if let Some(requested) = opts.workspace.as_deref().filter(|w| *w != info.workspace) {
        return Err(Error::WrongWorkspace { requested: requested.to_owned(), actual: info.workspace });
    }
    if let Some(announcement) = info.raw.get("announcement").and_then(Json::as_str) {
        tracing::info!(%announcement, "server announcement");
    }
    Ok((ws, info))
}

/// The first text frame; binary frames before it are skipped (a reconnect may flush
/// buffered messages first), pings answered. A socket that closes before any text frame is
/// a connection failure (retried on reconnect, as upstream does), not a refusal: the
/// server refuses with an `error` frame.
async fn first_text(ws: &mut Socket) -> Result<String, Error> {
    let closed = |why: String| Error::Connect {
        url: String::new(),
        message: format!("connection closed during the handshake: {why}"),
    };
    loop {
        match ws.next().await {
            Some(Ok(Frame::Text(t))) => {
                return String::from_utf8(t.to_vec())
                    .map_err(|_| Error::UnexpectedMessage("<invalid utf-8>".into()))
            }
            Some(Ok(Frame::Ping(p))) => {
                let _ = ws.send(Message::Pong(p)).await;
            }
            Some(Ok(Frame::Close(reason))) => return Err(closed(format!("{reason:?}"))),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(closed(e.to_string())),
            None => return Err(closed("end of stream".into())),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The actor
// ---------------------------------------------------------------------------------------

/// A frame for the writer task.
#[derive(Debug)]
pub enum Outgoing {
    /// An RPC package, as the parts it was written in (see [`super::wscodec`]).
    Binary(Rope),
    /// A control message (ping, refresh_token).
    Text(String),
    /// The answer to a protocol PING.
    Pong(Bytes),
    /// Close the socket with this reason, then stop writing.
    Close(CloseReason),
}

/// A generation is up: the registry sends through `outbound` and reads `inbound`.
/// Generations after the first are reconnections: the registry re-registers the services
/// and answers [`Restored`].
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attach {
    /// The new generation.
    pub generation: Generation,
    /// Its outbound channel.
    pub outbound: mpsc::Sender<Outgoing>,
    /// Its inbound channel.
    pub inbound: mpsc::Receiver<Bytes>,
    /// The connection actor, to close it.
    pub connection: Addr<ConnectionActor>,
    /// The handshake result of this generation.
    pub info: ConnectionInfo,
}

/// A generation ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Detached {
    /// Which one.
    pub generation: Generation,
    /// The close reason or error.
    pub reason: String,
    /// Whether we closed it ourselves (user disconnect: no reconnection).
    pub by_user: bool,
    /// Whether a reconnection follows: pending calls keep their timers (spec §1.6 step 1).
    /// When `false` and not `by_user`, the loss is final.
    pub reconnecting: bool,
}

/// Reconnection gave up for good (refused by the server, or the attempt limit was
/// reached). The connection actor stops after sending it; `reason` is upstream's text
/// ("Server refused reconnection: ...", "Max reconnection attempts exceeded"), which
/// pending calls get as `Connection lost: <reason>`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReconnectFailed {
    /// Why.
    pub reason: String,
}

/// The registry finished re-registering after the reconnection that attached
/// `generation`. An error makes the attempt count as failed: the generation is retired
/// and the backoff decides about the next one (as upstream retries when a service could
/// not be registered again).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Restored {
    /// The generation that was restored.
    pub generation: Generation,
    /// `Err` with what failed.
    pub result: Result<(), String>,
}

/// Close the socket with 1000 and stop (user disconnect). The answer resolves when the
/// actor has stopped (its socket is closed or the close timed out). A reconnection in
/// progress is cancelled.
#[derive(Message)]
#[rtype(result = "Closing")]
pub struct Close;

/// Resolves when the connection actor has stopped.
#[derive(MessageResponse)]
pub struct Closing(pub tokio::sync::oneshot::Receiver<()>);

/// Fault injection: closes the live socket with this close code, as a network failure or
/// a server-side close would end it. Unlike [`Close`], this is not a user disconnect: the
/// actor reconnects as it does after any unexpected close. Answers whether a live socket
/// was closed. Upstream's tests do the same by closing the client's websocket directly.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct DropSocket(pub u16);

/// What the connection actor is doing (tests: superseded generations are reaped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, MessageResponse)]
pub struct ConnectionStats {
    /// The latest generation (0 before the first attach).
    pub generation: u64,
    /// Whether a generation is attached and live.
    pub connected: bool,
    /// Reader and writer tasks alive, over all generations: 2 when connected, 0 while
    /// reconnecting; more means a superseded generation was not reaped.
    pub io_tasks: usize,
    /// Consecutive flaps (connections that died within the flap window).
    pub flaps: u32,
    /// The reconnection attempt about to be made or running (0-based).
    pub attempt: u32,
}

/// Asks for [`ConnectionStats`].
#[derive(Message)]
#[rtype(result = "ConnectionStats")]
pub struct GetConnectionStats;

/// A text frame after the handshake.
#[derive(Message)]
#[rtype(result = "()")]
struct Control(String);

/// Send this control text (from a ticker).
#[derive(Message)]
#[rtype(result = "()")]
struct SendControl(&'static str);

/// A task that asks the actor to send `text` every `period` (the first after one period).
fn ticker(ctx: &Context<ConnectionActor>, period: Duration, text: &'static str) -> JoinHandle<()> {
    let me = ctx.address().downgrade();
    actix_rt::spawn(async move {
        let mut ticks = actix_rt::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(me) = me.upgrade() else { break };
            me.do_send(SendControl(text));
        }
    })
}

/// The socket's reader ended.
#[derive(Message)]
#[rtype(result = "()")]
struct ReaderEnded {
    generation: Generation,
    reason: String,
}

/// Counts a live reader or writer task; the count drops when the task ends or is dropped.
struct TaskGuard(Arc<AtomicUsize>);

impl TaskGuard {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Owns the websocket of the current generation and the reconnection loop. See the
/// module documentation.
pub struct ConnectionActor {
    /// How we connected (kept for reconnection).
    options: ConnectOptions,
    /// Where frames and generation changes go.
    registry: Addr<SessionRegistry>,
    /// The socket waiting to be attached in `started`, with its handshake.
    fresh: Option<(Socket, ConnectionInfo)>,
    /// The latest generation (0 before the first attach).
    generation: Generation,
    /// The generation whose end matters: `None` while reconnecting or once a generation
    /// was retired (its reader's late end is then ignored).
    live: Option<Generation>,
    /// The writer's channel of the live generation; `None` while there is none.
    outbound: Option<mpsc::Sender<Outgoing>>,
    /// The latest reconnection token (refreshed by the server).
    reconnection_token: Option<String>,
    /// When the live generation's handshake finished (flap detection).
    connected_at: Option<Instant>,
    /// Delays, flap control and the attempt limit.
    backoff: Backoff,
    /// A reconnection is under way: attached generations still await [`Restored`].
    reconnecting: bool,
    /// The pending attempt: its timer or the running handshake (cancelled by `Close`).
    attempt: Option<SpawnHandle>,
    /// Live reader and writer tasks.
    io_tasks: Arc<AtomicUsize>,
    /// The reader and writer tasks of every generation, and the ping and token-refresh
    /// tickers: tasks of their own rather than futures in this actor's context, because
    /// actix polls every context future each time the actor wakes, and a frame in or out
    /// would then poll the other direction and both tickers too. Aborted when the actor
    /// stops (which drops a socket that is still open).
    tasks: Vec<JoinHandle<()>>,
    /// `disconnect()` was asked for: the end of the socket is not a loss.
    closing: bool,
    /// Told when the actor stops.
    on_stopped: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl ConnectionActor {
    /// An actor for a socket that finished its handshake.
    pub fn new(
        options: ConnectOptions,
        registry: Addr<SessionRegistry>,
        socket: Socket,
        info: ConnectionInfo,
    ) -> Self {
        Self {
            reconnection_token: info.reconnection_token.clone(),
            backoff: Backoff::new(options.reconnect.clone()),
            options,
            registry,
            fresh: Some((socket, info)),
            generation: Generation(0),
            live: None,
            outbound: None,
            connected_at: None,
            reconnecting: false,
            attempt: None,
            io_tasks: Arc::new(AtomicUsize::new(0)),
            tasks: Vec::new(),
            closing: false,
            on_stopped: Vec::new(),
        }
    }

    /// Starts the reader and writer of a new generation and hands its channels to the
    /// registry.
    fn attach(&mut self, ctx: &mut Context<Self>, socket: Socket, info: ConnectionInfo) {
        self.generation = Generation(self.generation.0 + 1);
        let generation = self.generation;
        let (sink, stream) = socket.split();
        let (out_tx, out_rx) = mpsc::channel(self.options.outbound_capacity.max(1));
        let (in_tx, in_rx) = mpsc::channel(self.options.inbound_capacity.max(1));
        self.tasks.retain(|t| !t.is_finished());
        let guard = TaskGuard::new(&self.io_tasks);
        self.tasks.push(actix_rt::spawn(async move {
            writer(sink, out_rx).await;
            drop(guard);
        }));
        let me = ctx.address();
        let pong = out_tx.clone();
        let busy_poll = self.options.busy_poll;
        let guard = TaskGuard::new(&self.io_tasks);
        self.tasks.push(actix_rt::spawn(async move {
            let reason = reader(stream, in_tx, pong, me.clone(), busy_poll).await;
            drop(guard);
            me.do_send(ReaderEnded { generation, reason });
        }));
        if let Some(token) = &info.reconnection_token {
            self.reconnection_token = Some(token.clone());
        }
        self.outbound = Some(out_tx.clone());
        self.live = Some(generation);
        self.connected_at = Some(Instant::now());
        tracing::debug!(%generation, workspace = %info.workspace, client_id = %info.client_id, "connected");
        self.registry.do_send(Attach {
            generation,
            outbound: out_tx,
            inbound: in_rx,
            connection: ctx.address(),
            info,
        });
    }

    /// Sends a control frame if there is room (skipped otherwise: the next one follows).
    fn send_control(&self, text: &str) {
        if let Some(tx) = &self.outbound {
            let _ = tx.try_send(Outgoing::Text(text.to_owned()));
        }
    }

    /// Ends the live generation without a reconnection decision: its writer closes the
    /// socket, its reader's end will be ignored, the registry stops using it.
    fn retire(&mut self, reason: &str) {
        let Some(generation) = self.live.take() else { return };
        if let Some(tx) = self.outbound.take() {
            let close = CloseReason { code: CloseCode::Normal, description: None };
            let _ = tx.try_send(Outgoing::Close(close));
        }
        self.registry.do_send(Detached {
            generation,
            reason: reason.to_owned(),
            by_user: false,
            reconnecting: true,
        });
    }

    /// Acts on the backoff's decision.
    fn next(&mut self, ctx: &mut Context<Self>, next: Next, give_up: &str) {
        match next {
            Next::RetryAfter(delay) => {
                self.reconnecting = true;
                tracing::debug!(?delay, attempt = self.backoff.attempt(), "reconnecting");
                let handle = ctx.run_later(delay, |act, ctx| act.try_reconnect(ctx));
                self.attempt = Some(handle);
            }
            Next::GiveUp => self.give_up(ctx, give_up),
        }
    }

    /// One reconnection attempt: the full handshake with the reconnection token.
    fn try_reconnect(&mut self, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        let options = self.options.clone();
        let token = self.reconnection_token.clone();
        tracing::info!(server = %self.options.server_url, attempt = self.backoff.attempt(), "reconnecting");
        let handle = ctx.spawn(
            async move { open(&options, token.as_deref()).await }.into_actor(self).map(
                |result, act, ctx| {
                    act.attempt = None;
                    if act.closing {
                        return; // the socket is dropped: the user closed meanwhile
                    }
                    match result {
                        Ok((socket, info)) => act.attach(ctx, socket, info),
                        // The server answered with an `error` frame or something that is
                        // not `connection_info`: upstream gives up for good.
                        Err(Error::ConnectionAborted(m)) | Err(Error::UnexpectedMessage(m)) => {
                            act.give_up(ctx, &format!("Server refused reconnection: {m}"))
                        }
                        Err(e) => {
                            tracing::info!(error = %e, attempt = act.backoff.attempt(), "reconnection attempt failed");
                            let next = act.backoff.failed(rand::random());
                            act.next(ctx, next, "Max reconnection attempts exceeded");
                        }
                    }
                },
            ),
        );
        self.attempt = Some(handle);
    }

    /// Reconnection is over for good: the registry rejects the pending calls.
    fn give_up(&mut self, ctx: &mut Context<Self>, reason: &str) {
        tracing::warn!(%reason, "giving up reconnecting");
        self.reconnecting = false;
        self.registry.do_send(ReconnectFailed { reason: reason.to_owned() });
        ctx.stop();
    }
}

impl Actor for ConnectionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Control messages, not data: mailbox of the default size is enough.
        if let Some((socket, info)) = self.fresh.take() {
            let mut refresh = self.options.token_refresh_interval;
            if let Some(life) = info.reconnection_token_life_time {
                refresh = refresh.min(life.div_f64(1.5));
            }
            self.attach(ctx, socket, info);
            if let Some(every) = self.options.ping_interval.filter(|d| !d.is_zero()) {
                self.tasks.push(ticker(ctx, every, r#"{"type":"ping"}"#));
            }
            if !refresh.is_zero() {
                self.tasks.push(ticker(ctx, refresh, r#"{"type":"refresh_token"}"#));
            }
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        for tx in self.on_stopped.drain(..) {
            let _ = tx.send(());
        }
        tracing::debug!(generation = %self.generation, "connection actor stopped");
    }
}

impl Handler<Close> for ConnectionActor {
    type Result = Closing;

    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) -> Closing {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.on_stopped.push(tx);
        if self.closing {
            return Closing(rx);
        }
        self.closing = true;
        if let Some(handle) = self.attempt.take() {
            ctx.cancel_future(handle);
        }
        // The server answers our close; if it does not, stop anyway.
        ctx.run_later(self.options.handshake_timeout.min(Duration::from_secs(5)), |_, ctx| ctx.stop());
        match self.outbound.take() {
            None => ctx.stop(),
            Some(tx) => {
                let reason = CloseReason { code: CloseCode::Normal, description: None };
                // The writer may be full: closing must not be lost, so wait for a slot.
                actix::spawn(async move {
                    let _ = tx.send(Outgoing::Close(reason)).await;
                });
            }
        }
        Closing(rx)
    }
}

impl Handler<DropSocket> for ConnectionActor {
    type Result = bool;

    fn handle(&mut self, DropSocket(code): DropSocket, _: &mut Context<Self>) -> bool {
        let Some(tx) = self.outbound.as_ref().filter(|_| !self.closing) else { return false };
        let close = CloseReason { code: CloseCode::from(code), description: None };
        tx.try_send(Outgoing::Close(close)).is_ok()
    }
}

impl Handler<Control> for ConnectionActor {
    type Result = ();

    fn handle(&mut self, Control(text): Control, _: &mut Context<Self>) {
        let Ok(Json::Object(obj)) = serde_json::from_str::<Json>(&text) else {
            tracing::debug!(len = text.len(), "ignoring a text frame that is not a JSON object");
            return;
        };
        match obj.get("type").and_then(Json::as_str) {
            Some("pong") => {}
            Some("reconnection_token") => {
                if let Some(t) = obj.get("reconnection_token").and_then(Json::as_str) {
                    self.reconnection_token = Some(t.to_owned());
                }
            }
            Some("error") => {
                let message = obj.get("message").and_then(Json::as_str).unwrap_or_default();
                tracing::warn!(%message, "error message from the server");
            }
            other => tracing::debug!(kind = ?other, "ignoring an unknown text message"),
        }
    }
}

impl Handler<SendControl> for ConnectionActor {
    type Result = ();

    fn handle(&mut self, SendControl(text): SendControl, _: &mut Context<Self>) {
        self.send_control(text);
    }
}

impl Handler<ReaderEnded> for ConnectionActor {
    type Result = ();

    fn handle(&mut self, msg: ReaderEnded, ctx: &mut Context<Self>) {
        if self.live != Some(msg.generation) {
            // A superseded or retired generation's reader: nothing to do, it is reaped.
            tracing::debug!(generation = %msg.generation, "superseded generation ended");
            return;
        }
        self.live = None;
        self.outbound = None;
        let lived = self.connected_at.map(|t| t.elapsed()).unwrap_or_default();
        if self.closing {
            tracing::debug!(generation = %msg.generation, "connection closed");
            self.registry.do_send(Detached {
                generation: msg.generation,
                reason: msg.reason,
                by_user: true,
                reconnecting: false,
            });
            ctx.stop();
            return;
        }
        tracing::info!(generation = %msg.generation, reason = %msg.reason, ?lived, "connection lost");
        // Died before its services were registered again: a failed attempt, as upstream
        // counts a socket that closes during its settle period. Otherwise a new loss.
        let next = if self.reconnecting {
            self.backoff.failed(rand::random())
        } else {
            self.backoff.lost(lived, rand::random())
        };
        // With reconnection disabled the close itself is the final reason; otherwise the
        // calls wait, and a give-up (attempt limit) comes as `ReconnectFailed`.
        let enabled = self.backoff.config().enabled();
        self.registry.do_send(Detached {
            generation: msg.generation,
            reason: msg.reason,
            by_user: false,
            reconnecting: enabled,
        });
        if enabled {
            self.next(ctx, next, "Max reconnection attempts exceeded");
        } else {
            ctx.stop();
        }
    }
}

impl Handler<Restored> for ConnectionActor {
    type Result = ();

    fn handle(&mut self, msg: Restored, ctx: &mut Context<Self>) {
        if self.live != Some(msg.generation) || self.closing {
            return;
        }
        match msg.result {
            Ok(()) => {
                if self.reconnecting {
                    tracing::info!(generation = %msg.generation, "reconnected (services re-registered)");
                }
                self.reconnecting = false;
            }
            Err(e) => {
                tracing::warn!(generation = %msg.generation, error = %e, "re-registration after reconnecting failed");
                self.retire(&e);
                let next = self.backoff.failed(rand::random());
                self.next(ctx, next, "Max reconnection attempts exceeded");
            }
        }
    }
}

impl Handler<GetConnectionStats> for ConnectionActor {
    type Result = ConnectionStats;

    fn handle(&mut self, _: GetConnectionStats, _: &mut Context<Self>) -> ConnectionStats {
        ConnectionStats {
            generation: self.generation.0,
            connected: self.live.is_some(),
            io_tasks: self.io_tasks.load(Ordering::Relaxed),
            flaps: self.backoff.flaps(),
            attempt: self.backoff.attempt(),
        }
    }
}

/// Writes frames until the channel closes or a `Close` was written. Frames that are
/// already queued are written together and flushed once.
async fn writer(mut sink: SplitSink<Socket, Outgoing>, mut rx: mpsc::Receiver<Outgoing>) {
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(out) = next.take() {
            let last = matches!(out, Outgoing::Close(_));
            if let Err(e) = sink.feed(out).await {
                tracing::debug!(error = %e, "websocket write failed");
                break 'outer;
            }
            if last {
                let _ = sink.flush().await;
                break 'outer;
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = sink.flush().await {
            tracing::debug!(error = %e, "websocket flush failed");
            break;
        }
    }
    let _ = SinkExt::<Outgoing>::close(&mut sink).await;
}

/// Reads frames until the socket ends; returns why it ended. Binary messages (also
/// fragmented ones) go to the registry through the bounded `inbound` channel.
async fn reader(
    mut stream: SplitStream<Socket>,
    inbound: mpsc::Sender<Bytes>,
    pong: mpsc::Sender<Outgoing>,
    me: Addr<ConnectionActor>,
    busy_poll: Duration,
) -> String {
    let mut partial: Option<BytesMut> = None;
    loop {
        let frame = match stream.next().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => return format!("protocol error: {e}"),
            None => return "Connection closed".to_owned(),
        };
        crate::busy_poll::note_frame(Instant::now(), busy_poll);
        let complete = match frame {
            Frame::Binary(b) => Some(b),
            Frame::Text(t) => {
                me.do_send(Control(String::from_utf8_lossy(&t).into_owned()));
                None
            }
            Frame::Ping(p) => {
                let _ = pong.try_send(Outgoing::Pong(p));
                None
            }
            Frame::Pong(_) => None,
            Frame::Close(reason) => {
                return match reason {
                    Some(r) => format!(
                        "closed by the server ({}){}",
                        u16::from(r.code),
                        r.description.map(|d| format!(": {d}")).unwrap_or_default()
                    ),
                    None => "closed by the server".to_owned(),
                }
            }
            Frame::Continuation(item) => match item {
                Item::FirstBinary(b) => {
                    partial = Some(BytesMut::from(&b[..]));
                    None
                }
                Item::FirstText(_) => {
                    partial = None;
                    None
                }
                Item::Continue(b) => {
                    if let Some(p) = partial.as_mut() {
                        p.extend_from_slice(&b);
                    }
                    None
                }
                Item::Last(b) => partial.take().map(|mut p| {
                    p.extend_from_slice(&b);
                    p.freeze()
                }),
            },
        };
        if let Some(frame) = complete {
            if inbound.send(frame).await.is_err() {
                return "the session registry stopped".to_owned();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

    use super::super::session_registry::RegistryOptions;
    use super::*;

    /// The control texts a fake server received, by `type`, and whether the socket closed.
    #[derive(Default)]
    struct Seen {
        types: Vec<String>,
        closed: bool,
    }

    /// A websocket peer that only does the handshake (its `connection_info` asks for a
    /// token refresh every 200 ms: lifetime 0.3 s / 1.5) and records the text frames.
    async fn fake_server(seen: Arc<Mutex<Seen>>) -> (u16, actix_web::dev::ServerHandle) {
        let handler = move |req: HttpRequest, body: web::Payload| {
            let seen = seen.clone();
            async move {
                let (response, mut session, mut frames) = actix_ws::handle(&req, body)?;
                actix_rt::spawn(async move {
                    let info = json!({
                        "type": "connection_info", "workspace": "ws-test", "client_id": "c1",
                        "manager_id": "mgr", "reconnection_token": "rt",
                        "reconnection_token_life_time": 0.3,
                    });
                    let mut handshaken = false;
                    while let Some(Ok(frame)) = frames.next().await {
                        match frame {
                            actix_ws::Message::Text(t) if !handshaken => {
                                assert!(t.contains("client_id"), "auth first: {t}");
                                handshaken = true;
                                let _ = session.text(info.to_string()).await;
                            }
                            actix_ws::Message::Text(t) => {
                                let kind = serde_json::from_str::<Json>(&t)
                                    .ok()
                                    .and_then(|j| j.get("type").and_then(Json::as_str).map(str::to_owned));
                                seen.lock().unwrap().types.push(kind.unwrap_or_default());
                            }
                            actix_ws::Message::Close(_) => break,
                            _ => {}
                        }
                    }
                    seen.lock().unwrap().closed = true;
                });
                Ok::<HttpResponse, actix_web::Error>(response)
            }
        };
        let server = HttpServer::new(move || App::new().route("/ws", web::get().to(handler.clone())))
            .workers(1)
            .disable_signals()
            .bind(("127.0.0.1", 0))
            .expect("bind");
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        actix_rt::spawn(server);
        (port, handle)
    }

    fn count(seen: &Mutex<Seen>, kind: &str) -> usize {
        seen.lock().unwrap().types.iter().filter(|t| *t == kind).count()
    }

    #[actix_rt::test]
    async fn pings_and_token_refreshes_go_out_on_their_periods_and_stop_with_the_actor() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (port, server) = fake_server(seen.clone()).await;
        let mut options = ConnectOptions::new(format!("http://127.0.0.1:{port}"), "c1");
        options.ping_interval = Some(Duration::from_millis(100));
        options.reconnect = BackoffConfig::disabled();
        let (socket, info) = open(&options, None).await.expect("handshake");
        let registry = SessionRegistry::new(RegistryOptions::default(), &info).start();
        let connection = ConnectionActor::new(options, registry, socket, info).start();

        actix_rt::time::sleep(Duration::from_millis(1050)).await;
        let (pings, refreshes) = (count(&seen, "ping"), count(&seen, "refresh_token"));
        // 10 and 5 on time; a loaded machine may delay ticks, never add any.
        assert!((6..=10).contains(&pings), "pings in 1.05 s at 100 ms: {pings}");
        assert!((3..=5).contains(&refreshes), "refreshes in 1.05 s at 200 ms: {refreshes}");

        let Closing(stopped) = connection.send(Close).await.expect("close");
        stopped.await.expect("the actor stops");
        let after = seen.lock().unwrap().types.len();
        actix_rt::time::sleep(Duration::from_millis(400)).await;
        assert!(seen.lock().unwrap().closed, "the socket was closed");
        assert_eq!(seen.lock().unwrap().types.len(), after, "no control frame after the actor stopped");
        server.stop(false).await;
    }
}
