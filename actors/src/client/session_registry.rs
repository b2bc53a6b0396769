//! The session registry: the actor that owns the client's sans-IO
//! [`Endpoint`].
//!
//! It is the only place protocol state lives on the client: pending calls (session id ->
//! the caller's oneshot), the incoming calls being run (call id -> the endpoint's reply
//! handle), the service actors (service id -> address), and one timer armed at the
//! endpoint's next deadline (call timeouts, heartbeats of long calls, chunk-cache
//! eviction, session sweeps). After every input it drains the endpoint: frames go to the
//! current generation's outbound channel, events are dispatched.
//!
//! Overflow policy: the mailbox is bounded ([`RegistryOptions::mailbox`]), so callers
//! wait in `Addr::send` when the registry is busy. Outbound frames that do not fit the
//! connection's channel stay in the endpoint's queue, in order, until the writer frees a
//! slot. A service actor whose mailbox is full gets no more calls: they are rejected with
//! "service ID is overloaded".
//!
//! Reconnection (spec §1.6): while the connection actor reconnects, pending calls keep
//! their timers (a result or heartbeat may still come after the reconnect) and new frames
//! wait in a bounded backlog ([`RegistryOptions::backlog`] frames; when it is full the
//! oldest frame is dropped, and frames older than the method timeout are dropped when the
//! socket is back: their calls have timed out). When the next generation attaches, the
//! registry fails the calls to a replaced manager (`Client disconnected: */<old id>`),
//! re-registers every local service in registration order (`built-in` first, `_rintf`
//! interfaces skipped: they are local-only), subscribes again to the events it was
//! subscribed to, and answers [`Restored`] to the connection actor; only then does the
//! backlog go out, so that a call made while disconnected finds the services back (as
//! upstream's sends wait for the reconnection to complete). When reconnection gives up,
//! pending and later calls fail with `Connection lost: <reason>`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
// Probed on every call and reply, keyed by our own ids: foldhash, not SipHash.
use foldhash::{HashMap, HashMapExt};
use hypha_core::endpoint::{Endpoint, EndpointConfig, EndpointStats, Event};
use hypha_core::msgpack::Rope;
use hypha_core::schema::ServiceInfo;
use hypha_core::session::{CallError, CallOutcome, RemovedService, SessionConfig};
use hypha_core::{ErrorValue, Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::connection::{
    Attach, Close, ConnectionActor, ConnectionInfo, Detached, Generation, Outgoing, ReconnectFailed, Restored,
};
use super::events::EventHub;
use super::generator;
use super::service::{run_guarded, Invocation, LocalHandler, Run, ServiceActor, Stop};
use super::{
    Abandon, AddService, Call, CallManager, CallResult, ConnectionState, Disconnect, Error, GetState,
    GetStats, LocalServiceInfo, RemoveService, Reply,
};

/// Sizes and timeouts of the registry. Every timeout is a `Duration`.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Deadline of a call after it was sent, pushed back by heartbeats (Python
    /// `method_timeout`, 30 s).
    pub method_timeout: Duration,
    /// Messages waiting in the registry's mailbox before senders wait.
    pub mailbox: usize,
    /// Mailbox of each service actor.
    pub service_mailbox: usize,
    /// Calls one service runs at once before it rejects more.
    pub service_max_running: usize,
    /// Where event messages (spec §2.4) go: the client's subscribers.
    pub events: EventHub,
    /// Frames kept while reconnecting; beyond it the oldest is dropped (its call times
    /// out, as it would have with the socket down).
    pub backlog: usize,
    /// Idle age after which a session without a pending call is collected (upstream
    /// 600 s); activity (a generator's `next`, a callback call) keeps a session alive.
    pub session_ttl: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            method_timeout: Duration::from_secs(30),
            mailbox: 1024,
            service_mailbox: 1024,
            service_max_running: 10_000,
            events: EventHub::default(),
            backlog: 4096,
            session_ttl: Duration::from_secs(600),
        }
    }
}

/// What the registry holds (tests: "nothing left behind", memory checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, MessageResponse)]
pub struct RegistryStats {
    /// The endpoint's counters.
    pub endpoint: EndpointStats,
    /// Callers waiting for a result.
    pub pending: usize,
    /// Incoming calls being run by handlers.
    pub running: usize,
    /// Live service actors.
    pub service_actors: usize,
    /// Local services in the endpoint, the built-in one included.
    pub local_services: usize,
    /// Frames waiting for the socket to come back.
    pub backlog: usize,
}

/// The current socket.
struct Link {
    generation: Generation,
    outbound: mpsc::Sender<Outgoing>,
}

/// A binary frame of one generation.
struct InboundFrame(Generation, Bytes);

/// The timer at the endpoint's next deadline: a task of its own that sends [`Tick`] when
/// the deadline comes. Not a future spawned into the registry's context, because actix
/// polls every such future each time the actor wakes, and the registry wakes several
/// times per call.
struct Timer {
    at: Instant,
    epoch: u64,
    task: actix_rt::task::JoinHandle<()>,
}

/// The timer of `epoch` is due.
#[derive(Message)]
#[rtype(result = "()")]
struct Tick(u64);

/// Owns the endpoint. See the module documentation.
pub struct SessionRegistry {
    options: RegistryOptions,
    endpoint: Endpoint,
    /// The armed timer (see [`Timer`]).
    timer: Option<Timer>,
    /// Numbers the timers armed, so that a tick of a replaced one is ignored.
    timer_epoch: u64,
    /// Our calls waiting for their outcome, by session.
    pending: HashMap<String, oneshot::Sender<CallResult>>,
    /// Incoming calls handed to a handler, by call id.
    running: HashMap<u64, hypha_core::endpoint::ReplyTo>,
    next_call_id: u64,
    /// One actor per local service (the built-in one is run by the endpoint itself).
    services: HashMap<String, Addr<ServiceActor>>,
    /// The socket of the current generation; `None` while there is none.
    link: Option<Link>,
    /// A frame the outbound channel had no room for (sent first when room frees).
    held: Option<Rope>,
    /// Frames produced while there was no socket, with when they were queued.
    backlog: VecDeque<(Instant, Rope)>,
    /// A reconnection attached this generation and its services are being registered
    /// again: the backlog waits until they are (as upstream's sends wait for the
    /// reconnection to complete), so a call made while disconnected finds them back.
    restoring: Option<Generation>,
    /// The connection actor (also while reconnecting, so that `disconnect` can stop it).
    connection: Option<Addr<ConnectionActor>>,
    /// The manager's client id of the current connection.
    manager_id: String,
    /// Event types we subscribed to through the manager (re-subscribed on reconnect).
    subscriptions: Vec<String>,
    /// Published connection state.
    state: tokio::sync::watch::Sender<ConnectionState>,
    /// A task waits for room in the outbound channel.
    waiting_for_room: bool,
    /// `*/<manager_id>`.
    manager: String,
    /// Our workspace and client id (for service infos).
    workspace: String,
    client_id: String,
    /// The connection is gone and will not come back: new calls fail with this.
    lost: Option<String>,
    /// `disconnect()` ran.
    closed: bool,
}

impl SessionRegistry {
    /// A registry for a client that completed its handshake with `info`.
    pub fn new(options: RegistryOptions, info: &ConnectionInfo) -> Self {
        let config = EndpointConfig {
            session: SessionConfig {
                method_timeout: options.method_timeout,
                session_ttl: options.session_ttl,
                ..SessionConfig::default()
            },
            server_url: info.public_base_url.clone(),
            ..EndpointConfig::default()
        };
        let mut endpoint = Endpoint::new(config, Some(&info.workspace), &info.client_id, Instant::now());
        endpoint.set_manager_id(Some(info.manager_id.clone()));
        Self {
            options,
            endpoint,
            timer: None,
            timer_epoch: 0,
            pending: HashMap::new(),
            running: HashMap::new(),
            next_call_id: 0,
            services: HashMap::new(),
            link: None,
            held: None,
            backlog: VecDeque::new(),
            restoring: None,
            connection: None,
            manager_id: info.manager_id.clone(),
            subscriptions: Vec::new(),
            state: tokio::sync::watch::Sender::new(ConnectionState::Connecting),
            waiting_for_room: false,
            manager: format!("*/{}", info.manager_id),
            workspace: info.workspace.clone(),
            client_id: info.client_id.clone(),
            lost: None,
            closed: false,
        }
    }

    /// Why a new call cannot start, if it cannot.
    pub(super) fn refuse(&self) -> Option<Error> {
        if self.closed {
            return Some(Error::Closed);
        }
        self.lost.as_ref().map(|r| Error::Call(CallError::ConnectionLost(r.clone())))
    }

    /// The endpoint (the generator, interface and event modules' handlers).
    pub(super) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The endpoint, to command it; call [`Self::drive`] afterwards.
    pub(super) fn endpoint_mut(&mut self) -> &mut Endpoint {
        &mut self.endpoint
    }

    /// Keeps an incoming call's reply handle until [`Self::finish`]; returns its id.
    pub(super) fn track_running(&mut self, reply: hypha_core::endpoint::ReplyTo) -> u64 {
        self.next_call_id += 1;
        self.running.insert(self.next_call_id, reply);
        self.next_call_id
    }

    /// Sends, dispatches and re-arms until the endpoint has nothing left to do now.
    pub(super) fn drive(&mut self, ctx: &mut Context<Self>) {
        loop {
            let mut busy = self.flush(ctx);
            while let Some(event) = self.endpoint.poll_event() {
                busy = true;
                self.on_event(ctx, event);
            }
            if !busy {
                break;
            }
        }
        self.arm(ctx);
    }

    /// Moves frames from the endpoint to the outbound channel while it has room.
    /// Returns whether anything moved.
    fn flush(&mut self, ctx: &mut Context<Self>) -> bool {
        let mut moved = false;
        loop {
            if self.waiting_for_room {
                return moved;
            }
            if self.link.is_none() && self.lost.is_none() && !self.closed {
                // Not attached yet, or reconnecting: the frames wait in the bounded
                // backlog, in order, while the calls' timers run.
                while let Some(frame) = self.endpoint.poll_transmit_rope() {
                    moved = true;
                    if self.backlog.len() >= self.options.backlog.max(1) {
                        self.backlog.pop_front();
                        tracing::warn!("reconnect backlog full: oldest frame dropped");
                    }
                    self.backlog.push_back((Instant::now(), frame));
                }
                return moved;
            }
            let Some(frame) = self.next_frame() else {
                return moved;
            };
            moved = true;
            let Some(link) = &self.link else {
                // No socket: the calls in these frames settle through connection loss.
                tracing::debug!(len = frame.len(), "no connection: frame dropped");
                continue;
            };
            match link.outbound.try_send(Outgoing::Binary(frame)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(Outgoing::Binary(frame))) => {
                    self.held = Some(frame);
                    self.waiting_for_room = true;
                    let tx = link.outbound.clone();
                    ctx.spawn(
                        async move {
                            // A slot frees: take it and give it straight back.
                            let _ = tx.reserve().await;
                        }
                        .into_actor(self)
                        .map(|_, act, ctx| {
                            act.waiting_for_room = false;
                            act.drive(ctx);
                        }),
                    );
                    return moved;
                }
                Err(_) => tracing::debug!("connection writer gone: frame dropped"),
            }
        }
    }

    /// The next frame to send: the one that did not fit, then the backlog once the
    /// services are back (skipping frames whose calls have timed out meanwhile), then the
    /// endpoint's queue.
    fn next_frame(&mut self) -> Option<Rope> {
        if let Some(frame) = self.held.take() {
            return Some(frame);
        }
        // While the services are registered again, the backlog waits (see `restoring`).
        while self.restoring.is_none() {
            let Some((queued, frame)) = self.backlog.pop_front() else { break };
            if queued.elapsed() < self.options.method_timeout {
                return Some(frame);
            }
            tracing::debug!(len = frame.len(), "stale frame from before the reconnect dropped");
        }
        self.endpoint.poll_transmit_rope()
    }

    /// The connection is gone for good: pending calls fail with `Connection lost:
    /// <reason>`, later ones too.
    fn lose(&mut self, ctx: &mut Context<Self>, reason: String) {
        self.link = None;
        self.held = None;
        self.backlog.clear();
        self.connection = None;
        self.lost = Some(reason.clone());
        self.endpoint.handle_connection_lost(Instant::now(), &reason, false);
        self.state.send_replace(ConnectionState::Lost(reason));
        self.drive(ctx);
    }

    /// After a reconnection attached `generation`: re-registers the services (in order,
    /// `built-in` first, local-only ones skipped), subscribes again, and tells the
    /// connection actor how it went. As upstream, it then fires the local events
    /// `services_registered` (`total`, `registered`, `failed`: the ids) and, when every
    /// service is back, `connected` (the new `connection_info`, with `type: "connected"`).
    fn restore(&mut self, ctx: &mut Context<Self>, generation: Generation, info: &ConnectionInfo) {
        let mut infos = Vec::new();
        for (id, service) in self.endpoint.table().services() {
            if service.config.is_local_only() {
                continue;
            }
            match ServiceInfo::from_service(&service.api, &self.workspace, &self.client_id, "*") {
                Ok(info) => infos.push((id.to_owned(), info.to_value())),
                Err(e) => tracing::warn!(service = %id, error = %e, "service cannot be re-registered"),
            }
        }
        let subscriptions: Vec<Value> = self.subscriptions.iter().map(|t| Value::from(t.as_str())).collect();
        let me = ctx.address();
        let work = async move {
            let call = |method: &str, args: Vec<Value>| {
                let (reply, rx) = oneshot::channel();
                let msg = CallManager { method: method.to_owned(), args, kwargs: None, reply };
                let me = me.clone();
                async move {
                    me.send(msg).await?;
                    rx.await.map_err(|_| Error::Closed)?
                }
            };
            let total = infos.len();
            // (id, error) of each service that did not come back.
            let mut failed = Vec::new();
            for (id, info) in infos {
                if let Err(e) = call("register_service", vec![info]).await {
                    tracing::warn!(service = %id, error = %e, "re-registering a service failed");
                    failed.push((id, e));
                }
            }
            let registered = total - failed.len();
            tracing::info!(total, registered, "services re-registered");
            if !subscriptions.is_empty() {
                // As upstream: a failed re-subscription is a warning, not a failed attempt.
                if let Err(e) = call("subscribe", vec![Value::List(subscriptions)]).await {
                    tracing::warn!(error = %e, "re-subscribing to events failed");
                }
            }
            let result = if failed.is_empty() {
                Ok(())
            } else {
                let each: Vec<String> = failed.iter().map(|(id, e)| format!("{id}: {e}")).collect();
                Err(format!("Service re-registration failed after reconnection: {}", each.join("; ")))
            };
            let mut report = Map::new();
            report.insert("type".into(), Value::from("services_registered"));
            report.insert("total".into(), Value::from(total as u64));
            report.insert("registered".into(), Value::from(registered as u64));
            let failed_ids = failed.into_iter().map(|(id, _)| Value::from(id)).collect();
            report.insert("failed".into(), Value::List(failed_ids));
            (report, result)
        };
        let mut connected = match hypha_core::serde_value::to_value(&info.raw) {
            Ok(Value::Map(m)) => m,
            _ => Map::new(),
        };
        connected.insert("type".into(), Value::from("connected"));
        self.restoring = Some(generation);
        ctx.spawn(work.into_actor(self).map(move |(report, result), act, ctx| {
            if act.link.as_ref().is_some_and(|l| l.generation == generation) {
                act.options.events.dispatch(&report);
                if result.is_ok() {
                    // Services are back: what waited in the backlog goes out now. (On
                    // failure this generation is retired and the backlog waits for the next.)
                    act.restoring = None;
                    act.state.send_replace(ConnectionState::Connected(generation));
                    act.options.events.dispatch(&connected);
                    act.drive(ctx);
                }
            }
            if let Some(connection) = &act.connection {
                connection.do_send(Restored { generation, result });
            }
        }));
    }

    /// Remembers the event types of a manager `subscribe`/`unsubscribe` call.
    fn track_subscription(&mut self, method: &str, args: &[Value]) {
        let types: Vec<&str> = match args.first() {
            Some(Value::Str(t)) => vec![t.as_str()],
            Some(Value::List(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => return,
        };
        for t in types {
            let known = self.subscriptions.iter().position(|s| s == t);
            match (method, known) {
                ("subscribe", None) => self.subscriptions.push(t.to_owned()),
                ("unsubscribe", Some(i)) => {
                    self.subscriptions.remove(i);
                }
                _ => {}
            }
        }
    }

    /// Keeps one timer at the endpoint's earliest deadline.
    fn arm(&mut self, ctx: &mut Context<Self>) {
        let Some(deadline) = self.endpoint.poll_timeout() else { return };
        if let Some(timer) = &self.timer {
            if timer.at <= deadline {
                return;
            }
            timer.task.abort();
        }
        self.timer_epoch += 1;
        let epoch = self.timer_epoch;
        let me = ctx.address().downgrade();
        let task = actix_rt::spawn(async move {
            actix_rt::time::sleep_until(deadline.into()).await;
            if let Some(me) = me.upgrade() {
                me.do_send(Tick(epoch));
            }
        });
        self.timer = Some(Timer { at: deadline, epoch, task });
    }

    fn on_event(&mut self, ctx: &mut Context<Self>, event: Event) {
        match event {
            Event::Invoke { handler, args, kwargs, context, reply } => {
                let Some(local) = handler.downcast_ref::<LocalHandler>() else {
                    let error = ErrorValue::new("the function has no Rust handler");
                    self.endpoint.reply(Instant::now(), reply, Err(error));
                    return;
                };
                self.next_call_id += 1;
                let call_id = self.next_call_id;
                self.running.insert(call_id, reply);
                let invocation = Invocation { args, kwargs, context, registry: ctx.address() };
                let func = local.func.clone();
                match local.service.as_ref().and_then(|s| self.services.get(s)) {
                    Some(actor) => {
                        if let Err(e) = actor.try_send(Run { call_id, func, invocation }) {
                            let error = match e {
                                SendError::Full(_) => Error::Overloaded(format!(
                                    "service {}",
                                    local.service.as_deref().unwrap_or_default()
                                )),
                                SendError::Closed(_) => Error::Closed,
                            };
                            self.finish(call_id, Err(error.to_error_value()));
                        }
                    }
                    None => {
                        ctx.spawn(run_guarded(func, invocation).into_actor(self).map(
                            move |result, act, ctx| {
                                act.finish(call_id, result);
                                act.drive(ctx);
                            },
                        ));
                    }
                }
            }
            Event::GeneratorNext { handler, reply } => generator::on_next(self, ctx, handler, reply),
            Event::GeneratorClose { handler } => generator::on_close(&handler),
            Event::Settled(s) => {
                let Some(tx) = self.pending.remove(&s.session) else { return };
                let result = match s.outcome {
                    CallOutcome::Resolved(v) => Ok(v),
                    CallOutcome::Rejected(e) => Err(Error::from(e)),
                    CallOutcome::Failed(e) => Err(Error::Call(e)),
                };
                // The caller may have given up waiting: nothing to do then.
                let _ = tx.send(result);
            }
            Event::Message(m) => {
                let kind = m.get("type").and_then(Value::as_str).unwrap_or_default();
                tracing::debug!(%kind, "event message");
                self.options.events.dispatch(&m);
            }
            Event::RemoteClientDisconnected { client_id, sessions_cleaned, .. } => {
                tracing::debug!(%client_id, sessions_cleaned, "remote client disconnected");
            }
            Event::InterfaceDisposed { service_id } => tracing::debug!(%service_id, "interface disposed"),
            Event::Error(e) => tracing::warn!(error = %e, "protocol error"),
        }
    }

    /// Answers a running call (no-op if it was abandoned meanwhile).
    pub(super) fn finish(&mut self, call_id: u64, result: Result<Value, ErrorValue>) {
        if let Some(reply) = self.running.remove(&call_id) {
            self.endpoint.reply(Instant::now(), reply, result);
        }
    }

    fn start_call(
        &mut self,
        ctx: &mut Context<Self>,
        reply: oneshot::Sender<CallResult>,
        start: impl FnOnce(&mut Endpoint, Instant) -> Result<String, hypha_core::endpoint::EndpointError>,
    ) {
        if let Some(e) = self.refuse() {
            let _ = reply.send(Err(e));
            return;
        }
        match start(&mut self.endpoint, Instant::now()) {
            Ok(session) => {
                self.pending.insert(session, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(Error::Protocol(e.to_string())));
            }
        }
        self.drive(ctx);
    }

    fn stop_service(&mut self, id: &str) {
        if let Some(actor) = self.services.remove(id) {
            actor.do_send(Stop);
        }
    }
}

impl Actor for SessionRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.options.mailbox);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.options.events.close();
        if let Some(timer) = self.timer.take() {
            timer.task.abort();
        }
        for (_, actor) in self.services.drain() {
            actor.do_send(Stop);
        }
        self.link = None;
        if let Some(connection) = self.connection.take() {
            connection.do_send(Close);
        }
        self.state.send_replace(ConnectionState::Closed);
        tracing::debug!(client_id = %self.client_id, "session registry stopped");
    }
}

impl Handler<Attach> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: Attach, ctx: &mut Context<Self>) {
        let Attach { generation, outbound, inbound, connection, info } = msg;
        if self.link.as_ref().is_some_and(|l| l.generation >= generation) {
            tracing::debug!(%generation, "stale attach ignored");
            return;
        }
        if self.closed || self.lost.is_some() {
            connection.do_send(Close);
            return;
        }
        if info.manager_id != self.manager_id {
            // A restarted server: calls to the old manager can never be answered.
            let old = std::mem::replace(&mut self.manager_id, info.manager_id.clone());
            self.endpoint.handle_manager_changed(Instant::now(), &old);
            self.endpoint.set_manager_id(Some(info.manager_id.clone()));
        }
        self.manager = format!("*/{}", info.manager_id);
        self.connection = Some(connection);
        self.link = Some(Link { generation, outbound });
        let frames = futures_util::stream::unfold(inbound, move |mut rx| async move {
            rx.recv().await.map(|frame| (InboundFrame(generation, frame), rx))
        });
        ctx.add_stream(frames);
        if generation.0 > 1 {
            self.restore(ctx, generation, &info);
        } else {
            self.state.send_replace(ConnectionState::Connected(generation));
        }
        self.drive(ctx);
    }
}

impl StreamHandler<InboundFrame> for SessionRegistry {
    fn handle(&mut self, InboundFrame(generation, frame): InboundFrame, ctx: &mut Context<Self>) {
        if self.closed {
            return;
        }
        if self.link.as_ref().is_some_and(|l| l.generation > generation) {
            tracing::debug!(%generation, "frame of a superseded generation dropped");
            return;
        }
        self.endpoint.handle_frame(Instant::now(), frame);
        self.drive(ctx);
    }

    /// A generation's frames ended: the connection actor reports the loss itself
    /// ([`Detached`]); the registry lives on.
    fn finished(&mut self, _: &mut Context<Self>) {}
}

impl Handler<Detached> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: Detached, ctx: &mut Context<Self>) {
        if self.link.as_ref().is_none_or(|l| l.generation != msg.generation) {
            return; // a superseded generation: reaped already
        }
        self.link = None;
        if let Some(frame) = self.held.take() {
            // Not sent: it goes first when the socket is back.
            self.backlog.push_front((Instant::now(), frame));
        }
        if self.closed || msg.by_user {
            return;
        }
        if msg.reconnecting {
            tracing::debug!(generation = %msg.generation, reason = %msg.reason, "waiting for reconnection");
            self.endpoint.handle_connection_lost(Instant::now(), &msg.reason, true);
            self.state.send_replace(ConnectionState::Reconnecting(msg.reason));
            self.drive(ctx);
        } else {
            self.lose(ctx, msg.reason);
        }
    }
}

impl Handler<ReconnectFailed> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: ReconnectFailed, ctx: &mut Context<Self>) {
        if self.closed || self.lost.is_some() {
            return;
        }
        self.lose(ctx, msg.reason);
    }
}

impl Handler<GetState> for SessionRegistry {
    type Result = actix::prelude::MessageResult<GetState>;

    fn handle(&mut self, _: GetState, _: &mut Context<Self>) -> Self::Result {
        actix::prelude::MessageResult(self.state.subscribe())
    }
}

impl Handler<Tick> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, Tick(epoch): Tick, ctx: &mut Context<Self>) {
        if self.closed || self.timer.as_ref().is_none_or(|t| t.epoch != epoch) {
            return;
        }
        self.timer = None;
        self.endpoint.handle_timeout(Instant::now());
        self.drive(ctx);
    }
}

impl Handler<Call> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: Call, ctx: &mut Context<Self>) {
        let Call { method, args, kwargs, reply } = msg;
        self.start_call(ctx, reply, |ep, now| ep.call(now, &method, args, kwargs));
    }
}

impl Handler<CallManager> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: CallManager, ctx: &mut Context<Self>) {
        let CallManager { method, args, kwargs, reply } = msg;
        if method == "subscribe" || method == "unsubscribe" {
            self.track_subscription(&method, &args);
        }
        let target = self.manager.clone();
        let path = format!("services.default.{method}");
        self.start_call(ctx, reply, |ep, now| ep.call_method(now, &target, &path, args, kwargs));
    }
}

impl Handler<AddService> for SessionRegistry {
    type Result = Result<ServiceInfo, Error>;

    fn handle(&mut self, msg: AddService, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(e) = self.refuse() {
            return Err(e);
        }
        let api = self
            .endpoint
            .register_service(msg.api, msg.overwrite)
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let info = ServiceInfo::from_service(api, &self.workspace, &self.client_id, "*")
            .map_err(|e| Error::Protocol(e.to_string()));
        let id = api.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
        let info = match info {
            Ok(i) => i,
            Err(e) => {
                let _ = self.endpoint.unregister_service(&id);
                return Err(e);
            }
        };
        // An overwritten service's old handlers go with their actor.
        self.stop_service(&id);
        let actor = ServiceActor::new(
            id.clone(),
            ctx.address(),
            self.options.service_max_running,
            self.options.service_mailbox,
        )
        .start();
        self.services.insert(id, actor);
        Ok(info)
    }
}

impl Handler<RemoveService> for SessionRegistry {
    type Result = Result<RemovedService, Error>;

    fn handle(&mut self, msg: RemoveService, _: &mut Context<Self>) -> Self::Result {
        let removed =
            self.endpoint.unregister_service(&msg.id).map_err(|e| Error::Protocol(e.to_string()))?;
        self.stop_service(&removed.id);
        Ok(removed)
    }
}

impl Handler<LocalServiceInfo> for SessionRegistry {
    type Result = Result<ServiceInfo, Error>;

    fn handle(&mut self, msg: LocalServiceInfo, _: &mut Context<Self>) -> Self::Result {
        let service = self
            .endpoint
            .table()
            .service(&msg.id)
            .ok_or_else(|| Error::NotFound(format!("Service not found: {}", msg.id)))?;
        ServiceInfo::from_service(&service.api, &self.workspace, &self.client_id, "*")
            .map_err(|e| Error::Protocol(e.to_string()))
    }
}

impl Handler<super::RegisterCodec> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: super::RegisterCodec, _: &mut Context<Self>) {
        (msg.0)(self.endpoint.codecs_mut());
    }
}

impl Handler<Reply> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: Reply, ctx: &mut Context<Self>) {
        self.finish(msg.call_id, msg.result);
        self.drive(ctx);
    }
}

impl Handler<Abandon> for SessionRegistry {
    type Result = ();

    fn handle(&mut self, msg: Abandon, ctx: &mut Context<Self>) {
        for id in msg.call_ids {
            if let Some(reply) = self.running.remove(&id) {
                self.endpoint.abandon(reply);
            }
        }
        self.drive(ctx);
    }
}

impl Handler<Disconnect> for SessionRegistry {
    type Result = Option<Addr<ConnectionActor>>;

    fn handle(&mut self, _: Disconnect, ctx: &mut Context<Self>) -> Self::Result {
        if self.closed {
            return None;
        }
        self.closed = true;
        self.endpoint.close(Instant::now());
        // Reject the pending calls ("RPC connection closed").
        while let Some(event) = self.endpoint.poll_event() {
            self.on_event(ctx, event);
        }
        self.pending.clear();
        self.running.clear();
        for (_, actor) in self.services.drain() {
            actor.do_send(Stop);
        }
        if let Some(timer) = self.timer.take() {
            timer.task.abort();
        }
        self.link = None;
        self.backlog.clear();
        let connection = self.connection.take();
        self.state.send_replace(ConnectionState::Closed);
        ctx.stop();
        connection
    }
}

impl Handler<GetStats> for SessionRegistry {
    type Result = RegistryStats;

    fn handle(&mut self, _: GetStats, _: &mut Context<Self>) -> RegistryStats {
        RegistryStats {
            endpoint: self.endpoint.stats(),
            pending: self.pending.len(),
            running: self.running.len(),
            service_actors: self.services.len(),
            local_services: self.endpoint.table().service_count(),
            backlog: self.backlog.len(),
        }
    }
}
