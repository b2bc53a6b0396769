//! The `/ws` endpoint and [`WsConnection`], one actix actor per websocket (server spec §2).
//!
//! The actor owns the connection's state machine:
//!
//! ```text
//!  upgrade ──> AwaitingAuth ──auth frame ok──> Open ──close / error / limit──> (stopped)
//!                  │  5 s silence, non-JSON,       │ text: ping, refresh_token, ignored
//!                  │  bad token, no workspace ...  │ binary: rate limit, then route
//!                  └──> error frame + close        │ idle timer, frame-size limit
//! ```
//!
//! and the per-connection limits (token bucket, idle timer, inbound frame size). Outgoing
//! frames go through the connection's [`Outbound`], a bounded queue that the websocket
//! response body drains (see `outbound`); inbound frames arrive as an actor stream, one
//! at a time, so a client that sends faster than we route is slowed down by TCP, not
//! buffered.
//!
//! **Duplicate client ids.** A plain connect whose `{ws}/{cid}` is held by a live connection
//! of this server is refused with `Client already exists and is active: {ws}/{cid}`. When
//! the holder is a registered client (it has a `built-in` record), the manager first pings
//! it (`built-in.ping`, 5 s, spec §2.1 step 7): if it does not answer, its records are
//! removed and the new connection takes the id over; if it answers, the new one is
//! refused and the live client keeps its records (upstream deletes them, a bug). A holder
//! that never registered (a raw socket) cannot answer a ping, so it is simply kept. A
//! connect with a reconnection token takes the address over: the old socket is dropped
//! without a close frame, as upstream does, and the old connection's cleanup leaves the
//! new one alone (generations).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, SpawnHandle, StreamHandler,
};
use actix_web::body::BoxBody;
use actix_web::dev::Payload as RawPayload;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Item, ProtocolError};
use bytes::{Bytes, BytesMut};
use hypha_core::auth::{self, Admitted, AuthContext, AuthPayload, HandshakeError, Permission, UserInfo};
use serde_json::{json, Map as JsonMap, Value as Json};
use tracing::field;

use super::inbound::InboundFrames;
use super::limits::{AdmissionSlot, FrameSizeGuard, TokenBucket, SERVER_BUSY_REASON};
use super::outbound::{self, CloseCmd, OutFrame, Outbound};
use super::router::{Generation, Registration, RouteOutcome, RouteSender, Routed};
use super::workspace::WorkspaceRecord;
use super::{ServerState, SHUTDOWN_REASON};

/// Text control frames longer than this (in characters) are ignored (upstream: 1000).
pub const MAX_CONTROL_TEXT_CHARS: usize = 1000;

/// The error message and close reason when a client exceeds the message rate.
pub const RATE_LIMIT_MESSAGE: &str = "Rate limit exceeded: too many messages per second";

/// The `/ws` handler: upgrades unconditionally (spec §2.1 step 1), then either closes at
/// once (legacy query parameters, shutdown) or starts a [`WsConnection`].
pub async fn ws_endpoint(
    req: HttpRequest,
    body: web::Payload,
    state: Arc<ServerState>,
) -> Result<HttpResponse, actix_web::Error> {
    let tripped = Arc::new(AtomicBool::new(false));
    let max = state.config.max_frame_size;
    let guard = FrameSizeGuard::new(body.into_inner(), max, tripped.clone());
    let frames = InboundFrames::new(guard, max);
    // actix-ws answers the handshake; the payload is read by `frames` (see `inbound`), so
    // actix-ws's own reader gets none.
    let empty = web::Payload::from_request(&req, &mut RawPayload::None).await?;
    let (response, session, stream) = actix_ws::handle(&req, empty)?;

    let query_keys = req.query_string().split('&').filter_map(|kv| kv.split('=').next());
    let refusal = if auth::is_legacy_query(query_keys) {
        let e = HandshakeError::LegacyClient;
        tracing::debug!(query = req.query_string(), "legacy client refused");
        Some(CloseReason { code: CloseCode::Policy, description: Some(e.close_reason()) })
    } else if state.is_shutting_down() {
        Some(CloseReason { code: CloseCode::Away, description: Some(SHUTDOWN_REASON.to_owned()) })
    } else {
        None
    };
    if let Some(reason) = refusal {
        actix_rt::spawn(async move {
            let _ = tokio::time::timeout(state.config.close_timeout, session.close(Some(reason))).await;
            drop((stream, frames));
        });
        return Ok(response);
    }

    // The response body is the connection's outbound queue; actix-ws's own body is kept
    // inside it (see `OutboundRx::into_body`), and its `Session` is not used.
    drop((session, stream));
    let (outbound, rx) =
        outbound::channel(state.config.outbound_queue_frames, state.config.outbound_queue_bytes);
    let response = response.map_body(|_, keep| BoxBody::new(rx.into_body(keep)));
    let peer = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    WsConnection::create(move |ctx| {
        ctx.add_stream(frames);
        WsConnection::new(state, outbound, tripped, &peer)
    });
    Ok(response)
}

/// The socket is done (close written, or the socket failed): the actor stops.
#[derive(Message)]
#[rtype(result = "()")]
struct SocketDone;

/// A handshake that passed its checks and has not changed anything yet.
#[derive(Debug)]
struct Prepared {
    /// The final user, workspace and client id.
    admitted: Admitted,
    /// The reconnection token for `connection_info`.
    token: String,
    /// The personal workspace to create, when it does not exist yet.
    create: Option<WorkspaceRecord>,
}

/// An authenticated connection's state.
#[derive(Debug)]
struct Open {
    /// The workspace and client id (the connection's address).
    workspace: String,
    client_id: String,
    /// This registration's generation; its cleanup only touches its own entry.
    generation: Generation,
    /// The final user (for refresh tokens).
    user: UserInfo,
    /// What the router stamps into this connection's frames.
    sender: RouteSender,
    /// Binary frames per second.
    bucket: TokenBucket,
    /// Last text or binary data frame (protocol pings do not count).
    last_activity: Instant,
    /// Whether this client's frames count towards its load (`min_load`, spec §5.3).
    load_balanced: bool,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the auth frame.
    AwaitingAuth,
    /// The auth frame arrived; waiting for an admission slot (spec §2.1 step 4).
    Queued,
    /// Authenticated; waiting for the manager to say whether the live holder of this
    /// client id still answers a ping (spec §2.1 step 7).
    Admitting,
    /// Handshake done, routing.
    Open(Box<Open>),
    /// The actor is stopping; its registration is gone.
    Closed,
}

/// A message being reassembled from continuation frames.
#[derive(Debug)]
struct Fragments {
    text: bool,
    data: BytesMut,
}

/// One websocket client (see the module docs).
pub struct WsConnection {
    state: Arc<ServerState>,
    /// Index in the server's connection list (for shutdown).
    id: u64,
    /// The bounded queue to this client's socket.
    outbound: Outbound,
    phase: Phase,
    /// Set by the frame-size guard when a frame header declared an oversized payload.
    oversize: Arc<AtomicBool>,
    /// A fragmented message in progress.
    fragments: Option<Fragments>,
    /// A close was requested: inbound frames are ignored until the actor stops.
    closing: bool,
    /// The admission slot held from the auth frame to the end of the handshake.
    slot: Option<AdmissionSlot>,
    /// The handshake deadline, cancelled once the connection is open (a live timer in the
    /// actor's context is polled on every frame).
    auth_timer: Option<SpawnHandle>,
    /// `workspace`, `client` and `generation` are recorded when the handshake succeeds.
    span: tracing::Span,
}

impl WsConnection {
    fn new(state: Arc<ServerState>, outbound: Outbound, oversize: Arc<AtomicBool>, peer: &str) -> Self {
        let id = state.add_connection(outbound.clone());
        let span = tracing::info_span!(
            "ws",
            conn = id,
            peer,
            workspace = field::Empty,
            client = field::Empty,
            generation = field::Empty
        );
        WsConnection {
            state,
            id,
            outbound,
            phase: Phase::AwaitingAuth,
            oversize,
            fragments: None,
            closing: false,
            slot: None,
            auth_timer: None,
            span,
        }
    }

    /// Ends the connection: the writer sends what `cmd` says, the actor stops.
    fn close(&mut self, ctx: &mut Context<Self>, cmd: CloseCmd) {
        // The phase is kept (an open connection's registration is removed in `stopped`);
        // `closing` makes the stream handler ignore whatever frames are still queued.
        self.outbound.close(cmd);
        self.closing = true;
        ctx.stop();
    }

    fn send(&self, frame: OutFrame) {
        if let Err(e) = self.outbound.send(frame) {
            tracing::debug!(error = %e, "frame to this client not queued");
        }
    }

    fn fail_handshake(&mut self, ctx: &mut Context<Self>, e: &HandshakeError) {
        self.slot = None;
        tracing::info!(error = %e, code = e.close_code(), "handshake refused");
        let cmd = CloseCmd {
            error_message: e.sends_error_frame().then(|| e.to_string()),
            close: Some((e.close_code(), e.close_reason())),
        };
        self.close(ctx, cmd);
    }

    // --- handshake -------------------------------------------------------------------------

    /// The auth frame: take an admission slot (waiting for one if all are taken), then
    /// run the handshake.
    fn on_auth_frame(&mut self, ctx: &mut Context<Self>, text: &str) {
        if let Some(slot) = self.state.admission.try_enter() {
            self.slot = Some(slot);
            return self.admitted(ctx, text);
        }
        tracing::debug!("all handshake slots taken: waiting for one");
        self.phase = Phase::Queued;
        let text = text.to_owned();
        let wait = self.state.admission.enter();
        ctx.spawn(actix::fut::wrap_future(wait).map(move |slot, act: &mut Self, ctx| {
            if act.closing {
                return;
            }
            let _enter = act.span.clone().entered();
            match slot {
                Some(slot) => {
                    act.slot = Some(slot);
                    act.admitted(ctx, &text);
                }
                None => {
                    tracing::warn!("no handshake slot freed up in time: server busy");
                    act.close(ctx, CloseCmd::error(1013, SERVER_BUSY_REASON));
                }
            }
        }));
    }

    /// The handshake proper, holding an admission slot.
    fn admitted(&mut self, ctx: &mut Context<Self>, text: &str) {
        let prepared = match self.prepare(text) {
            Ok(p) => p,
            Err(e) => return self.fail_handshake(ctx, &e),
        };
        let mode = if prepared.admitted.reconnecting { Registration::Supersede } else { Registration::Fresh };
        match self.finish(prepared, mode) {
            Ok(open) => self.opened(ctx, open),
            Err((prepared, HandshakeError::ClientExists { workspace, client_id }))
                if self.state.registry.builtin(&workspace, &client_id).is_some() =>
            {
                // A registered client holds the id: it may be a dead connection that has
                // not noticed yet. Ask it (spec §2.1 step 7); only a live one keeps the id.
                self.phase = Phase::Admitting;
                let ping = super::manager::PingClient { workspace, client_id };
                let asked = self.state.manager().send(ping);
                ctx.spawn(actix::fut::wrap_future(asked).map(move |alive, act: &mut Self, ctx| {
                    if act.closing {
                        return;
                    }
                    let _enter = act.span.clone().entered();
                    let (ws, cid) =
                        (prepared.admitted.workspace.clone(), prepared.admitted.client_id.clone());
                    if alive.unwrap_or(true) {
                        act.fail_handshake(
                            ctx,
                            &HandshakeError::ClientExists { workspace: ws, client_id: cid },
                        );
                        return;
                    }
                    tracing::info!("the previous connection of this client id does not answer: replacing it");
                    act.state.forget_client(&ws, &cid);
                    match act.finish(prepared, Registration::Supersede) {
                        Ok(open) => act.opened(ctx, open),
                        Err((_, e)) => act.fail_handshake(ctx, &e),
                    }
                }));
            }
            Err((_, e)) => self.fail_handshake(ctx, &e),
        }
    }

    fn opened(&mut self, ctx: &mut Context<Self>, open: Box<Open>) {
        if let Some(timer) = self.auth_timer.take() {
            ctx.cancel_future(timer);
        }
        self.slot = None;
        self.span.record("workspace", open.workspace.as_str());
        self.span.record("client", open.client_id.as_str());
        self.span.record("generation", open.generation);
        tracing::info!(user = %open.user.id, "client connected");
        self.phase = Phase::Open(open);
        self.start_idle_timer(ctx);
    }

    /// The handshake's checks (spec §2.1 steps 3-6, §2.2): authenticate, find the
    /// workspace (or decide to create it), compute the final user, sign its reconnection
    /// token. Nothing is changed yet.
    fn prepare(&mut self, text: &str) -> Result<Prepared, HandshakeError> {
        let payload = AuthPayload::from_json(text)?;
        let config = &self.state.config;
        let now = auth::unix_seconds(SystemTime::now());
        let revoked = |token: &str| self.state.revoked.is_revoked(token);
        let cx = AuthContext {
            jwt: &config.jwt,
            root_token: config.root_token.as_deref(),
            now,
            revoked: &revoked,
        };
        let authenticated = cx.authenticate_handshake(&payload)?;

        let ws = authenticated.workspace.clone();
        let (owners, create) = match self.state.workspaces.get(&ws) {
            Some(record) => (record.owners, None),
            None if ws == authenticated.user.personal_workspace() => {
                let record = WorkspaceRecord::personal(&authenticated.user);
                (record.owners.clone(), Some(record))
            }
            None => return Err(HandshakeError::WorkspaceNotFound(ws)),
        };
        let admitted = authenticated.admit(&owners)?;
        let token = config
            .jwt
            .encode(&admitted.user, config.reconnection_token_life_time.as_secs_f64(), now)
            .map_err(HandshakeError::Authentication)?;
        Ok(Prepared { admitted, token, create })
    }

    /// The handshake's effects (spec §2.1 step 8): create the workspace, register the
    /// connection, send `connection_info`. A refused registration gives `prepared` back.
    #[allow(clippy::result_large_err)]
    fn finish(
        &mut self,
        prepared: Prepared,
        mode: Registration,
    ) -> Result<Box<Open>, (Prepared, HandshakeError)> {
        let registered = match self.state.router.register(
            &prepared.admitted.workspace,
            &prepared.admitted.client_id,
            self.outbound.clone(),
            mode,
        ) {
            Ok(r) => r,
            Err(super::router::RegisterError::ClientExists { workspace, client_id }) => {
                return Err((prepared, HandshakeError::ClientExists { workspace, client_id }));
            }
        };
        let Prepared { admitted, token, create } = prepared;
        if let Some(record) = create {
            self.state.workspaces.get_or_create(record);
        }
        if let Some(old) = registered.superseded {
            tracing::info!("reconnect supersedes the previous connection of this client");
            old.close(CloseCmd::drop_socket());
        }
        // The manager must be up before the client learns its id.
        self.state.manager();

        let info = self.connection_info(&admitted.workspace, &admitted.client_id, &admitted.user, token);
        self.send(OutFrame::Text(info));

        let config = &self.state.config;
        let read_only = admitted.user.permission(&admitted.workspace) == Some(Permission::Read);
        let sender = RouteSender::new(
            admitted.workspace.clone(),
            admitted.client_id.clone(),
            &admitted.user.to_value(),
            read_only,
        );
        let now = Instant::now();
        let load_balanced = admitted.client_id.ends_with(super::registry::LOAD_BALANCED_SUFFIX);
        Ok(Box::new(Open {
            load_balanced,
            workspace: admitted.workspace,
            client_id: admitted.client_id,
            generation: registered.generation,
            user: admitted.user,
            sender,
            bucket: TokenBucket::new(config.msg_rate_limit, config.msg_burst_limit, now),
            last_activity: now,
        }))
    }

    /// The `connection_info` frame, keys in upstream's order (spec §2.3).
    fn connection_info(&self, workspace: &str, client_id: &str, user: &UserInfo, token: String) -> String {
        let config = &self.state.config;
        let mut m = JsonMap::new();
        m.insert("type".into(), json!("connection_info"));
        m.insert("hypha_version".into(), json!(config.hypha_version));
        m.insert("public_base_url".into(), json!(self.state.public_base_url()));
        m.insert("local_base_url".into(), json!(self.state.local_base_url()));
        m.insert("manager_id".into(), json!(config.manager_id()));
        m.insert("workspace".into(), json!(workspace));
        m.insert("client_id".into(), json!(client_id));
        m.insert("user".into(), user.to_json());
        m.insert("reconnection_token".into(), json!(token));
        m.insert(
            "reconnection_token_life_time".into(),
            json!(config.reconnection_token_life_time.as_secs_f64()),
        );
        Json::Object(m).to_string()
    }

    // --- after the handshake -------------------------------------------------------------

    /// Text control frames (spec §2.4).
    fn on_control_text(&mut self, text: &str) {
        let Phase::Open(open) = &mut self.phase else { return };
        open.last_activity = Instant::now();
        if text.len() > MAX_CONTROL_TEXT_CHARS && text.chars().count() > MAX_CONTROL_TEXT_CHARS {
            tracing::debug!(len = text.len(), "oversized text frame ignored");
            return;
        }
        let kind = match serde_json::from_str::<Json>(text) {
            Ok(Json::Object(m)) => m.get("type").and_then(Json::as_str).map(str::to_owned),
            _ => None,
        };
        match kind.as_deref() {
            Some("ping") => self.send(OutFrame::Text(json!({"type": "pong"}).to_string())),
            Some("refresh_token") => {
                let config = &self.state.config;
                let now = auth::unix_seconds(SystemTime::now());
                match config.jwt.encode(&open.user, config.reconnection_token_life_time.as_secs_f64(), now) {
                    Ok(token) => self.send(OutFrame::Text(
                        json!({"type": "reconnection_token", "reconnection_token": token}).to_string(),
                    )),
                    Err(e) => tracing::error!(error = %e, "cannot sign a reconnection token"),
                }
            }
            other => tracing::debug!(kind = ?other, "text frame ignored"),
        }
    }

    /// A binary frame: rate limit, then route (spec §2.5, §3.2).
    fn on_binary(&mut self, ctx: &mut Context<Self>, frame: Bytes) {
        let Phase::Open(open) = &mut self.phase else { return };
        let now = Instant::now();
        open.last_activity = now;
        crate::busy_poll::note_frame(now, self.state.config.busy_poll);
        if !open.bucket.try_take(now) {
            tracing::info!("rate limit exceeded");
            self.close(ctx, CloseCmd::error(1008, RATE_LIMIT_MESSAGE));
            return;
        }
        if open.load_balanced {
            self.state.registry.record_frame(&open.workspace, &open.client_id, now);
        }
        match self.state.router.route_or_hold(&open.sender, &frame, now) {
            Routed::Done(outcome) => self.routed(outcome),
            Routed::InboxFull(held) => {
                // The manager is behind (a burst of clients): hold this client's frames
                // until its inbox has room; the socket is not read meanwhile, so TCP slows
                // the client down (overflow policy: `LocalInbox`).
                tracing::debug!("the manager's inbox is full: this connection waits for room");
                let delivered = held.deliver_within(self.state.config.manager_inbox_wait);
                ctx.wait(actix::fut::wrap_future(delivered).map(|outcome, act: &mut Self, _| {
                    let _enter = act.span.clone().entered();
                    act.routed(outcome);
                }));
            }
        }
    }

    fn routed(&self, outcome: RouteOutcome) {
        match outcome {
            RouteOutcome::Delivered(n) => tracing::trace!(delivered = n, "routed"),
            RouteOutcome::Rejected { error, reject } => {
                tracing::debug!(%error, "routing error: rejecting the call");
                self.send(OutFrame::Binary(reject));
            }
            RouteOutcome::Dropped(reason) => tracing::debug!(%reason, "frame dropped"),
        }
    }

    fn idle_message(timeout: Duration) -> String {
        format!("Idle timeout ({}s)", timeout.as_secs_f64())
    }

    /// The idle timer runs as a task of its own that asks the actor ([`IdleCheck`]) when it
    /// fires, not as a timer in the actor's context: actix polls every timer of a context
    /// each time the actor wakes, which is every frame.
    fn start_idle_timer(&mut self, ctx: &mut Context<Self>) {
        let addr = ctx.address().downgrade();
        let mut wait = self.state.config.idle_timeout;
        actix_rt::spawn(async move {
            loop {
                tokio::time::sleep(wait).await;
                let Some(addr) = addr.upgrade() else { return };
                match addr.send(IdleCheck).await {
                    Ok(Some(left)) => wait = left,
                    Ok(None) | Err(_) => return,
                }
            }
        });
    }

    fn frame_too_big(&mut self, ctx: &mut Context<Self>) {
        let max = self.state.config.max_frame_size;
        tracing::info!(max, "inbound frame over the size limit");
        self.close(ctx, CloseCmd::close(1009, format!("frame exceeds limit of {max} bytes")));
    }

    /// A complete data message (a single frame or reassembled fragments).
    fn on_data(&mut self, ctx: &mut Context<Self>, text: bool, data: Bytes) {
        match (&self.phase, text) {
            (Phase::AwaitingAuth, true) => match std::str::from_utf8(&data) {
                Ok(s) => self.on_auth_frame(ctx, s),
                Err(_) => self.fail_handshake(ctx, &HandshakeError::BadPayload),
            },
            (Phase::AwaitingAuth, false) => self.fail_handshake(ctx, &HandshakeError::BadPayload),
            (Phase::Open(_), true) => match std::str::from_utf8(&data) {
                Ok(s) => self.on_control_text(s),
                Err(_) => self.close(ctx, CloseCmd::close(1007, "invalid UTF-8 in a text frame")),
            },
            (Phase::Open(_), false) => self.on_binary(ctx, data),
            (Phase::Admitting | Phase::Queued, _) => tracing::debug!("frame before connection_info ignored"),
            (Phase::Closed, _) => {}
        }
    }

    fn on_continuation(&mut self, ctx: &mut Context<Self>, item: Item) {
        let max = self.state.config.max_frame_size;
        let (first, text, chunk, last) = match item {
            Item::FirstText(b) => (true, true, b, false),
            Item::FirstBinary(b) => (true, false, b, false),
            Item::Continue(b) => (false, false, b, false),
            Item::Last(b) => (false, false, b, true),
        };
        if first {
            if self.fragments.is_some() {
                self.close(ctx, CloseCmd::close(1002, "continuation already started"));
                return;
            }
            self.fragments = Some(Fragments { text, data: BytesMut::new() });
        }
        let Some(frags) = self.fragments.as_mut() else {
            self.close(ctx, CloseCmd::close(1002, "continuation not started"));
            return;
        };
        if frags.data.len().saturating_add(chunk.len()) > max {
            self.fragments = None;
            self.frame_too_big(ctx);
            return;
        }
        frags.data.extend_from_slice(&chunk);
        if last {
            if let Some(Fragments { text, data }) = self.fragments.take() {
                self.on_data(ctx, text, data.freeze());
            }
        }
    }
}

impl Actor for WsConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let _enter = self.span.clone().entered();
        tracing::debug!("websocket opened");
        let addr = ctx.address().downgrade();
        let timeout = self.state.config.close_timeout;
        actix_rt::spawn(self.outbound.watch(timeout, move || {
            if let Some(addr) = addr.upgrade() {
                addr.do_send(SocketDone);
            }
        }));
        self.auth_timer = Some(ctx.run_later(self.state.config.auth_timeout, |act, ctx| {
            if matches!(act.phase, Phase::AwaitingAuth) {
                let _enter = act.span.clone().entered();
                act.fail_handshake(ctx, &HandshakeError::PayloadTimeout);
            }
        }));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        let _enter = self.span.clone().entered();
        // Whatever ended the actor, make sure the socket ends too (no-op if a close is pending).
        self.outbound.close(CloseCmd::close(1000, ""));
        self.state.remove_connection(self.id);
        if let Phase::Open(open) = std::mem::replace(&mut self.phase, Phase::Closed) {
            let state = &self.state;
            if state.router.remove_client(&open.workspace, &open.client_id, open.generation, Instant::now()) {
                tracing::info!("client disconnected");
                // Spec §8 step 3: all its records go, without per-service events
                // (`client_disconnected` was broadcast by the router, with the bare id).
                state.registry.remove_client(&open.workspace, &open.client_id);
                state.notify_client_left(&open.workspace, &open.client_id);
                if state.router.client_count(&open.workspace) == 0
                    && state.workspaces.remove_transient(&open.workspace)
                {
                    tracing::debug!(workspace = %open.workspace, "transient workspace removed");
                }
            } else {
                tracing::debug!("superseded connection closed");
            }
        } else {
            tracing::debug!("websocket closed before the handshake completed");
        }
    }
}

/// The idle timer fired: close the connection if it has been idle for `idle_timeout`;
/// otherwise answer how long until it would be (`None`: stop the timer).
#[derive(Message)]
#[rtype(result = "Option<Duration>")]
struct IdleCheck;

impl Handler<IdleCheck> for WsConnection {
    type Result = Option<Duration>;

    fn handle(&mut self, _: IdleCheck, ctx: &mut Context<Self>) -> Option<Duration> {
        let Phase::Open(open) = &self.phase else { return None };
        if self.closing {
            return None;
        }
        let timeout = self.state.config.idle_timeout;
        let idle = open.last_activity.elapsed();
        if idle < timeout {
            return Some(timeout - idle);
        }
        let _enter = self.span.clone().entered();
        tracing::info!(idle_secs = idle.as_secs_f64(), "idle timeout");
        self.close(ctx, CloseCmd::error(1001, Self::idle_message(timeout)));
        None
    }
}

impl Handler<SocketDone> for WsConnection {
    type Result = ();

    fn handle(&mut self, _: SocketDone, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl StreamHandler<Result<actix_ws::Message, ProtocolError>> for WsConnection {
    fn handle(&mut self, item: Result<actix_ws::Message, ProtocolError>, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        let _enter = self.span.clone().entered();
        use actix_ws::Message as M;
        match item {
            Ok(M::Text(text)) => self.on_data(ctx, true, text.into_bytes()),
            Ok(M::Binary(data)) => self.on_data(ctx, false, data),
            Ok(M::Continuation(item)) => self.on_continuation(ctx, item),
            Ok(M::Ping(payload)) => self.send(OutFrame::Pong(payload)),
            Ok(M::Pong(_)) | Ok(M::Nop) => {}
            Ok(M::Close(reason)) => {
                tracing::debug!(?reason, "client closed the websocket");
                let code = reason.map_or(1000, |r| u16::from(r.code));
                self.close(ctx, CloseCmd::close(code, ""));
            }
            Err(ProtocolError::Overflow) => self.frame_too_big(ctx),
            Err(_) if self.oversize.load(Ordering::Acquire) => self.frame_too_big(ctx),
            Err(ProtocolError::Io(e)) => {
                tracing::debug!(error = %e, "websocket read failed");
                ctx.stop();
            }
            Err(e) => {
                tracing::debug!(error = %e, "websocket protocol error");
                self.close(ctx, CloseCmd::close(1002, "protocol error"));
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_message_matches_upstream() {
        assert_eq!(WsConnection::idle_message(Duration::from_secs(600)), "Idle timeout (600s)");
        assert_eq!(WsConnection::idle_message(Duration::from_secs(4)), "Idle timeout (4s)");
        assert_eq!(WsConnection::idle_message(Duration::from_millis(300)), "Idle timeout (0.3s)");
    }
}
