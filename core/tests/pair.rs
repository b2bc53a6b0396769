//! A deterministic two-peer harness in the manner of quinn-proto's `Pair`.
//!
//! Two (or three) [`Endpoint`]s talk through a simulated router that does to every frame
//! what the hypha server does (spec §1.5), under a simulated clock. Nothing here touches a
//! socket, a thread or the OS clock, so every scenario replays identically.
//!
//! The endpoint does the protocol (sessions, promises, chunking, the built-in service,
//! heartbeats, timeouts); the harness only plays the part the actor layer plays: it runs
//! the local functions an [`Event::Invoke`] names, keeps the outcomes of its calls, and
//! moves frames and time. In reading order:
//!
//! 1. local functions ([`HostFn`], [`HostGen`]): what a `Handler` holds;
//! 2. [`Peer`]: an endpoint plus the driver loop that answers its events;
//! 3. [`Net`]: the router and the clock;
//! 4. the scenarios.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hypha_core::chunk::CHUNK_THRESHOLD;
use hypha_core::endpoint::{
    generator_close_method as generator_close, generator_next_method as generator_next, Endpoint,
    EndpointConfig, EndpointStats, Event, ReplyTo,
};
use hypha_core::message::MainSegment;
use hypha_core::msgpack::DecodeLimits;
use hypha_core::package;
use hypha_core::session::{CallOutcome, SessionTable};
use hypha_core::{
    map, ErrorValue, Function, Generator, Handler, LocalFunction, LocalGenerator, Map, PromiseMode,
    RemoteGenerator, RemoteMethod, Value,
};

// =======================================================================================
// 1. Local functions
// =======================================================================================

/// What a local function asks the driver to do with the call it ran for.
enum Reply {
    /// Resolve with this value.
    Return(Value),
    /// Reject with this message (the service raised).
    Raise(String),
    /// Keep the call open (the endpoint heartbeats it) until [`Peer::finish`] is called
    /// with this name (a long-running method).
    Defer(String),
    /// Never answer and never heartbeat (a stuck or crashed callee).
    Hang,
}

/// One invocation of a local function.
struct Invocation {
    /// The simulated time of the call, for calls the function makes itself.
    now: Instant,
    /// Decoded positional arguments.
    args: Vec<Value>,
    /// Decoded keyword arguments (empty without `with_kwargs`).
    kwargs: Map,
}

type HostFnBody = dyn Fn(&mut Peer, Invocation) -> Reply + Send + Sync;

/// The driver value behind a local function's [`Handler`]. It gets the peer so that it
/// can call other peers (callbacks, stored proxies) while it runs, as an actor would send
/// messages from inside a handler.
struct HostFn(Box<HostFnBody>);

/// The driver value behind a local generator: the items it still has to give.
struct HostGen(Mutex<Box<dyn Iterator<Item = Value> + Send>>);

/// A local function value (to register in a service or pass as an argument).
fn function(name: &str, body: impl Fn(&mut Peer, Invocation) -> Reply + Send + Sync + 'static) -> Value {
    let mut f = LocalFunction::new(Handler::new(HostFn(Box::new(body))));
    f.name = Some(name.to_owned());
    Value::from(Function::Local(f))
}

/// A local generator value over `items`.
fn generator(items: impl Iterator<Item = Value> + Send + 'static) -> Value {
    let handler = Handler::new(HostGen(Mutex::new(Box::new(items))));
    Value::from(Generator::Local(LocalGenerator { handler }))
}

/// A compact-promise proxy for `method` on peer `target`, as a decoded service
/// descriptor would be.
fn remote(target: &str, method: &str) -> RemoteMethod {
    RemoteMethod {
        target: target.to_owned(),
        method: method.to_owned(),
        promise: PromiseMode::Compact,
        ..Default::default()
    }
}

/// The proxy a decoded value holds (test assertion helper).
fn as_remote(v: &Value) -> RemoteMethod {
    match v {
        Value::Function(f) => match &**f {
            Function::Remote(rm) => rm.clone(),
            Function::Local(_) => panic!("expected a remote function, got a local one"),
        },
        other => panic!("expected a remote function, got {other:?}"),
    }
}

/// The remote generator a decoded value holds (test assertion helper).
fn as_generator(v: &Value) -> RemoteGenerator {
    match v {
        Value::Generator(g) => match &**g {
            Generator::Remote(rg) => rg.clone(),
            Generator::Local(_) => panic!("expected a remote generator, got a local one"),
        },
        other => panic!("expected a remote generator, got {other:?}"),
    }
}

// =======================================================================================
// 2. One peer: an endpoint and the driver loop around it
// =======================================================================================

struct Peer {
    ep: Endpoint,
    /// Settled calls, by session: what the test asserts on.
    outcomes: HashMap<String, CallOutcome>,
    /// Incoming calls still running ([`Reply::Defer`]), by the name the function gave.
    running: BTreeMap<String, ReplyTo>,
    /// [`Event::Error`]s: nothing may go unanswered in these scenarios.
    errors: Vec<String>,
}

impl Peer {
    fn new(id: &str, now: Instant) -> Self {
        let (ws, cid) = id.split_once('/').expect("endpoint ids are ws/cid");
        let ep = Endpoint::new(EndpointConfig::default(), Some(ws), cid, now);
        Self { ep, outcomes: HashMap::new(), running: BTreeMap::new(), errors: Vec::new() }
    }

    fn table(&self) -> &SessionTable {
        self.ep.table()
    }

    /// Registers a local service (what `register_service` does before telling the server).
    fn register(&mut self, api: Map) {
        self.ep.register_service(api, false).expect("valid service");
    }

    /// Calls `method`; the outcome lands in [`Peer::outcomes`]. Returns the call's session.
    fn call(&mut self, now: Instant, method: &RemoteMethod, args: Vec<Value>, kwargs: Option<Map>) -> String {
        self.ep.call(now, method, args, kwargs).expect("open the call")
    }

    /// Completes a [`Reply::Defer`]red call.
    fn finish(&mut self, now: Instant, name: &str, result: Result<Value, String>) {
        let reply = self.running.remove(name).expect("a running call of that name");
        self.ep.reply(now, reply, result.map_err(ErrorValue::new));
    }

    /// The driver loop: acts on every event the endpoint has.
    fn pump(&mut self, now: Instant) {
        while let Some(event) = self.ep.poll_event() {
            match event {
                Event::Invoke { handler, args, kwargs, context: _, reply } => {
                    let Some(f) = handler.downcast_ref::<HostFn>() else {
                        self.ep.reply(
                            now,
                            reply,
                            Err(ErrorValue::new(format!("unknown handler {handler:?}"))),
                        );
                        continue;
                    };
                    let inv = Invocation { now, args, kwargs: kwargs.unwrap_or_default() };
                    match (f.0)(self, inv) {
                        Reply::Return(v) => self.ep.reply(now, reply, Ok(v)),
                        Reply::Raise(e) => self.ep.reply(now, reply, Err(ErrorValue::new(e))),
                        Reply::Defer(name) => {
                            self.running.insert(name, reply);
                        }
                        Reply::Hang => self.ep.abandon(reply),
                    }
                }
                Event::GeneratorNext { handler, reply } => {
                    let item =
                        handler.downcast_ref::<HostGen>().and_then(|g| g.0.lock().expect("lock").next());
                    self.ep.reply(now, reply, Ok(item.unwrap_or_else(Value::stop_iteration)));
                }
                Event::GeneratorClose { handler } => {
                    if let Some(g) = handler.downcast_ref::<HostGen>() {
                        *g.0.lock().expect("lock") = Box::new(std::iter::empty());
                    }
                }
                Event::Settled(s) => {
                    self.outcomes.insert(s.session, s.outcome);
                }
                Event::Error(e) => self.errors.push(e.to_string()),
                Event::Message(_)
                | Event::RemoteClientDisconnected { .. }
                | Event::InterfaceDisposed { .. } => {}
            }
        }
    }

    fn resolved(&self, session: &str) -> Value {
        match self.outcomes.get(session) {
            Some(CallOutcome::Resolved(v)) => v.clone(),
            other => panic!("{}: call {session} did not resolve: {other:?}", self.ep.id()),
        }
    }

    fn error(&self, session: &str) -> String {
        match self.outcomes.get(session) {
            Some(o @ (CallOutcome::Rejected(_) | CallOutcome::Failed(_))) => {
                o.error_message().unwrap_or_default()
            }
            other => panic!("{}: call {session} did not fail: {other:?}", self.ep.id()),
        }
    }

    /// Nothing left behind: no session, pending call, timer, continuation, upload, running
    /// call or half-built message, and no error that went unanswered.
    fn assert_idle(&self) {
        let id = self.ep.id();
        assert_eq!(self.ep.stats(), EndpointStats::default(), "{id}: state left");
        assert_eq!(self.ep.poll_timeout(), None, "{id}: timers left");
        assert!(self.running.is_empty(), "{id}: deferred calls left");
        assert!(self.errors.is_empty(), "{id}: errors: {:?}", self.errors);
    }
}

// =======================================================================================
// 3. The router and the clock
// =======================================================================================

/// A delivered frame as the receiver got it (after stamping), for wire assertions.
struct Traced {
    sender: String,
    main: Map,
    extra: Map,
}

/// The simulated server and clock. Frames are delivered one at a time in FIFO order with
/// zero latency; time moves only in [`Net::advance`].
struct Net {
    now: Instant,
    peers: BTreeMap<String, Peer>,
    /// Frames sent and not yet delivered, with their sender.
    wire: VecDeque<(String, Bytes)>,
    limits: DecodeLimits,
    /// Delivered frames, when tracing is on.
    trace: Option<Vec<Traced>>,
    /// The largest frame the router saw.
    largest_frame: usize,
    /// Deliver each batch of frames a peer sent in one step out of order (a fixed
    /// shuffle), as concurrent sends could arrive: proves the receiver does not care.
    reorder: bool,
}

impl Net {
    fn new(ids: &[&str]) -> Self {
        let now = Instant::now();
        let peers = ids.iter().map(|id| ((*id).to_owned(), Peer::new(id, now))).collect();
        Self {
            now,
            peers,
            wire: VecDeque::new(),
            limits: DecodeLimits::default(),
            trace: None,
            largest_frame: 0,
            reorder: false,
        }
    }

    fn ep(&mut self, id: &str) -> &mut Peer {
        self.peers.get_mut(id).unwrap_or_else(|| panic!("no peer {id}"))
    }

    fn call(&mut self, from: &str, method: &RemoteMethod, args: Vec<Value>, kwargs: Option<Map>) -> String {
        let now = self.now;
        self.ep(from).call(now, method, args, kwargs)
    }

    fn start_trace(&mut self) {
        self.trace = Some(Vec::new());
    }

    fn traced(&self) -> &[Traced] {
        self.trace.as_deref().unwrap_or_default()
    }

    /// Runs every peer's driver loop and collects what they sent.
    fn collect(&mut self) {
        for (id, peer) in &mut self.peers {
            peer.pump(self.now);
            let mut batch: Vec<Bytes> = std::iter::from_fn(|| peer.ep.poll_transmit()).collect();
            if self.reorder {
                let n = batch.len();
                let order = (0..n).rev().filter(|i| i % 2 == 1).chain((0..n).filter(|i| i % 2 == 0));
                let mut slots: Vec<Option<Bytes>> = batch.into_iter().map(Some).collect();
                batch = order.filter_map(|i| slots[i].take()).collect();
            }
            self.wire.extend(batch.into_iter().map(|f| (id.clone(), f)));
        }
    }

    /// Delivers frames until none is in flight.
    fn run(&mut self) {
        for _ in 0..10_000_000 {
            self.collect();
            let Some((sender, frame)) = self.wire.pop_front() else { return };
            self.route(&sender, frame);
        }
        panic!("the peers never went quiet");
    }

    /// Moves the clock by `by`, firing every timer that falls due on the way, in order.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        self.run();
        while let Some(t) =
            self.peers.values().filter_map(|p| p.ep.poll_timeout()).min().filter(|t| *t <= until)
        {
            self.now = self.now.max(t);
            let now = self.now;
            for peer in self.peers.values_mut() {
                if peer.ep.poll_timeout().is_some_and(|t| t <= now) {
                    peer.ep.handle_timeout(now);
                }
            }
            self.run();
        }
        self.now = until;
    }

    /// What the server does with a client's binary frame (spec §1.5): decode only `main`,
    /// normalize `to`, stamp `from`/`ws`/`user`, re-pack, append the extra bytes untouched,
    /// forward by `to`.
    fn route(&mut self, sender: &str, frame: Bytes) {
        self.largest_frame = self.largest_frame.max(frame.len());
        let (ws, cid) = sender.split_once('/').expect("endpoint ids are ws/cid");
        let user = Value::from(
            map! { "id" => format!("user-{cid}"), "is_anonymous" => true, "email" => Value::Nil },
        );
        let mut routing = None;
        let stamped = package::restamp(&frame, &self.limits, |main| {
            let Ok(mut seg) = MainSegment::from_map(std::mem::take(main)) else { return };
            if seg.stamp(ws, cid, ws, user) {
                routing = Some((seg.to.clone().unwrap_or_default(), seg.session.clone()));
            }
            *main = seg.into_map();
        });
        let (Ok(stamped), Some((to, session))) = (stamped, routing) else { return };
        // The extra segment travels byte for byte.
        let (_, extra_at) = package::split_main(&frame, &self.limits).expect("the sender's frame decodes");
        let extra_len = frame.len() - extra_at;
        assert_eq!(
            &stamped[stamped.len() - extra_len..],
            &frame[extra_at..],
            "the router touched the extra bytes"
        );
        if let Some(trace) = &mut self.trace {
            let p = package::decode_package(&stamped, &self.limits).expect("stamped frames decode");
            trace.push(Traced {
                sender: sender.to_owned(),
                main: p.main,
                extra: p.extra.unwrap_or_default(),
            });
        }
        let now = self.now;
        match self.peers.get_mut(&to) {
            Some(peer) => peer.ep.handle_frame(now, stamped),
            None => {
                // Spec §1.5 step 5: a call to a dead peer gets the server's synthetic
                // reject (no `ws`, no `user`, `from` = the original `to`); anything else
                // is dropped.
                let Some(session) = session else { return };
                let main = map! { "type" => "method", "from" => to.as_str(), "to" => sender,
                "method" => format!("{session}.reject") };
                let error = map! { "_rtype" => "error", "_rvalue" => format!("Target peer {to} is not connected"),
                "_rtrace" => "" };
                let extra = map! { "args" => vec![Value::from(error)] };
                let reject = package::encode_package(&main, Some(&extra)).expect("encode the reject");
                self.ep(sender).ep.handle_frame(now, Bytes::from(reject));
            }
        }
    }

    /// A client leaves: the server drops its connection and tells the rest of its
    /// workspace (spec §2.4, `client_disconnected`).
    fn disconnect(&mut self, id: &str) {
        self.run();
        self.peers.remove(id);
        let (ws, cid) = id.split_once('/').expect("endpoint ids are ws/cid");
        let event = map! { "type" => "client_disconnected", "to" => "*",
        "data" => map! { "id" => cid, "workspace" => ws } };
        let frame = Bytes::from(package::encode_package(&event, None).expect("encode the event"));
        let now = self.now;
        for (other, peer) in &mut self.peers {
            if other.starts_with(&format!("{ws}/")) {
                peer.ep.handle_frame(now, frame.clone());
            }
        }
        self.run();
    }
}

// =======================================================================================
// 4. Scenarios
// =======================================================================================

const CONS: &str = "ws/cons";
const PROV: &str = "ws/prov";
const OTHER: &str = "ws2/other";

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("expected an int, got {v:?}"))
}

/// `add(a, b)`, `b` positional or keyword.
fn add_function() -> Value {
    function("add", |_, inv| {
        let a = inv.args.first().map_or(0, int);
        let b = inv.kwargs.get("b").or(inv.args.get(1)).map_or(0, int);
        Reply::Return(Value::from(a + b))
    })
}

/// A local function that records its first argument and returns it.
fn recorder(name: &str, seen: &Arc<Mutex<Vec<Value>>>) -> Value {
    let seen = Arc::clone(seen);
    function(name, move |_, inv| {
        let v = inv.args.first().cloned().unwrap_or_default();
        seen.lock().expect("lock").push(v.clone());
        Reply::Return(v)
    })
}

#[test]
fn kwargs_call_with_compact_promise_resolves_and_leaves_nothing() {
    let mut net = Net::new(&[CONS, PROV]);
    net.ep(PROV).register(map! { "id" => "demo", "add" => add_function() });
    net.start_trace();
    let call = net.call(CONS, &remote(PROV, "services.demo.add"), vec![1.into()], Some(map! { "b" => 5 }));
    net.run();
    assert_eq!(net.ep(CONS).resolved(&call), Value::from(6));

    // The wire, as spec §2.6 shows it.
    let t = net.traced();
    assert_eq!(t.len(), 2, "one call, one resolve (no heartbeat for an instant method)");
    assert_eq!(t[0].sender, CONS);
    let keys: Vec<&str> = t[0].main.keys().map(String::as_str).collect();
    assert_eq!(keys, ["type", "from", "to", "method", "session", "ws", "user"]);
    assert_eq!(t[0].main["session"], Value::from(call.as_str()));
    assert_eq!(t[0].main["ws"], Value::from("ws"));
    assert_eq!(t[0].extra["args"], Value::from(vec![1.into(), map! { "b" => 5 }.into()]));
    assert_eq!(t[0].extra["with_kwargs"], Value::Bool(true));
    assert_eq!(t[0].extra["promise"], Value::from("*"));
    assert_eq!(t[0].extra["t"], Value::F64(15.0));
    assert_eq!(t[1].main["method"], Value::from(format!("{call}.resolve")));
    assert_eq!(t[1].main["parent"], Value::from(call.as_str()));
    assert!(!t[1].main.contains_key("session"), "resolve is fire-and-forget");
    assert_eq!(t[1].extra["args"], Value::from(vec![6.into()]));

    // upstream test_memory_leak_prevention: nothing left on either side.
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();
}

#[test]
fn explicit_promise_get_service_resolves_with_callable_descriptors() {
    let mut net = Net::new(&[CONS, PROV]);
    net.ep(PROV).register(map! { "id" => "demo", "add" => add_function(), "const" => 42 });
    net.start_trace();
    let get =
        RemoteMethod { promise: PromiseMode::Explicit, ..remote(PROV, "services.built-in.get_service") };
    let call = net.call(CONS, &get, vec!["demo".into()], None);
    net.run();

    let promise = net.traced()[0].extra["promise"].as_map().expect("an explicit promise map").clone();
    let keys: Vec<&str> = promise.keys().map(String::as_str).collect();
    assert_eq!(keys, ["heartbeat", "interval", "resolve", "reject"]);
    assert_eq!(promise["interval"], Value::F64(15.0));
    assert_eq!(promise["resolve"].as_map().expect("descriptor")["_rpromise"], Value::Bool(false));

    let svc = net.ep(CONS).resolved(&call);
    let svc = svc.as_map().expect("the service map");
    assert_eq!(svc["id"], Value::from("demo"));
    assert_eq!(svc["const"], Value::from(42));
    let add = as_remote(&svc["add"]);
    assert_eq!((add.target.as_str(), add.method.as_str()), (PROV, "services.demo.add"));
    assert_eq!(add.promise, PromiseMode::Compact);

    // The descriptor works as a proxy.
    let sum = net.call(CONS, &add, vec![2.into(), 3.into()], None);
    net.run();
    assert_eq!(net.ep(CONS).resolved(&sum), Value::from(5));
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();
}

#[test]
fn callback_works_during_the_call_and_expires_with_it() {
    let mut net = Net::new(&[CONS, PROV]);
    let stored = Arc::new(Mutex::new(None::<RemoteMethod>));
    let keep = Arc::clone(&stored);
    let with_progress = function("with_progress", move |ep, inv| {
        let progress = as_remote(&inv.args[0]);
        for i in 1..=3 {
            ep.call(inv.now, &progress, vec![Value::from(i)], None);
        }
        *keep.lock().expect("lock") = Some(progress);
        // Await the three callbacks before answering.
        Reply::Defer("with_progress".into())
    });
    net.ep(PROV).register(map! { "id" => "demo", "with_progress" => with_progress });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let call =
        net.call(CONS, &remote(PROV, "services.demo.with_progress"), vec![recorder("progress", &seen)], None);
    net.run();

    // The callbacks ran while the call was pending, and their results came back.
    assert!(!net.ep(CONS).outcomes.contains_key(&call));
    assert_eq!(*seen.lock().expect("lock"), vec![Value::from(1), Value::from(2), Value::from(3)]);
    let prov = net.ep(PROV);
    let mut returned: Vec<i64> = prov.outcomes.keys().map(|s| int(&prov.resolved(s))).collect();
    returned.sort_unstable();
    assert_eq!(returned, vec![1, 2, 3]);
    let progress = stored.lock().expect("lock").clone().expect("the callback proxy");
    assert_eq!(progress.remote_parent.as_deref(), Some(call.as_str()), "decoded with the call's session");
    assert!(progress.method.starts_with(&format!("{call}.")) && progress.method.ends_with("#progress"));
    assert_eq!(net.ep(CONS).table().session_count(), 1, "only the call session");
    assert_eq!(net.ep(CONS).table().total_session_count(), 1, "callback replies left no nested sessions");

    let now = net.now;
    net.ep(PROV).finish(now, "with_progress", Ok("done".into()));
    net.run();
    assert_eq!(net.ep(CONS).resolved(&call), Value::from("done"));
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();

    // Strict callback lifecycle (spec §4.7): the call session is gone, so is the callback.
    let late = net.call(PROV, &progress, vec![4.into()], None);
    net.run();
    assert_eq!(net.ep(PROV).error(&late), format!("Session not found: {PROV}:{}", progress.method));
    assert_eq!(seen.lock().expect("lock").len(), 3);
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();
}

#[test]
fn generators_iterate_to_stop_iteration_or_close_early() {
    let mut net = Net::new(&[CONS, PROV]);
    let count = function("count", |_, inv| Reply::Return(generator((0..int(&inv.args[0])).map(Value::from))));
    net.ep(PROV).register(map! { "id" => "demo", "count" => count });
    let producer_session = |g: &RemoteGenerator| g.method.rsplit_once('.').expect("S.oid").0.to_owned();

    // Iterate to the end.
    let call = net.call(CONS, &remote(PROV, "services.demo.count"), vec![3.into()], None);
    net.run();
    let gen = as_generator(&net.ep(CONS).resolved(&call));
    assert_eq!(gen.close_method, format!("{}:close", gen.method));
    assert_eq!(gen.remote_parent, None, "values from a resolve carry no parent");
    let first = producer_session(&gen);
    assert_eq!(net.ep(PROV).table().session_entry_count(&first), Some(2), "next and close entries");
    let mut items = Vec::new();
    loop {
        let next = net.call(CONS, &generator_next(&gen), Vec::new(), None);
        net.run();
        let item = net.ep(CONS).resolved(&next);
        if item.is_stop_iteration() {
            break;
        }
        items.push(item);
        assert!(items.len() <= 3, "the generator did not stop");
    }
    assert_eq!(items, vec![Value::from(0), Value::from(1), Value::from(2)]);
    assert_eq!(net.ep(PROV).table().session_entry_count(&first), Some(0), "exhaustion removes both entries");

    // Close a second one early.
    let call = net.call(CONS, &remote(PROV, "services.demo.count"), vec![100.into()], None);
    net.run();
    let gen = as_generator(&net.ep(CONS).resolved(&call));
    let second = producer_session(&gen);
    let next = net.call(CONS, &generator_next(&gen), Vec::new(), None);
    net.run();
    assert_eq!(net.ep(CONS).resolved(&next), Value::from(0));
    let close = net.call(CONS, &generator_close(&gen), Vec::new(), None);
    net.run();
    assert_eq!(net.ep(CONS).resolved(&close), Value::Bool(true));
    assert_eq!(net.ep(PROV).table().session_entry_count(&second), Some(0), "close removes both entries");
    let after = net.call(CONS, &generator_next(&gen), Vec::new(), None);
    net.run();
    assert_eq!(net.ep(CONS).error(&after), format!("Method expired or not found: {CONS}:{}", gen.method));
    net.ep(CONS).assert_idle();

    // The emptied producer sessions wait for the endpoint's session GC (spec §4.7): swept
    // every 300 s once idle for longer than 600 s.
    assert_eq!(net.ep(PROV).table().session_count(), 2);
    net.advance(Duration::from_secs(600));
    assert_eq!(net.ep(PROV).table().session_count(), 2, "not idle for longer than session_ttl yet");
    net.advance(Duration::from_secs(300));
    net.ep(PROV).assert_idle();
}

#[test]
fn rintf_interface_outlives_the_call_until_disposed() {
    let mut net = Net::new(&[CONS, PROV]);
    let stored = Arc::new(Mutex::new(None::<Map>));
    let keep = Arc::clone(&stored);
    let subscribe = function("subscribe", move |_, inv| {
        *keep.lock().expect("lock") = inv.args.first().and_then(Value::as_map).cloned();
        Reply::Return(Value::Nil)
    });
    net.ep(PROV).register(map! { "id" => "demo", "subscribe" => subscribe });
    let events = Arc::new(Mutex::new(Vec::new()));
    let listener = map! { "_rintf" => true, "on_event" => recorder("on_event", &events) };
    let call = net.call(CONS, &remote(PROV, "services.demo.subscribe"), vec![listener.into()], None);
    net.run();
    assert_eq!(net.ep(CONS).resolved(&call), Value::Nil);
    net.ep(CONS).assert_idle();

    let (service_id, allowed) = {
        let (id, svc) = net
            .ep(CONS)
            .table()
            .services()
            .find(|(id, _)| id.starts_with("_rintf_"))
            .expect("a _rintf service");
        (id.to_owned(), svc.config.rintf_allowed_caller.clone())
    };
    assert_eq!(allowed.as_deref(), Some(PROV));
    let iface = stored.lock().expect("lock").clone().expect("the stored interface");
    assert_eq!(iface["_rintf_service_id"], Value::from(service_id.as_str()));
    let on_event = as_remote(&iface["on_event"]);
    assert_eq!(on_event.method, format!("services.{service_id}.on_event"));

    // After the call returned, the interface still works (services skip the parent check).
    net.start_trace();
    let ok = net.call(PROV, &on_event, vec!["hello".into()], None);
    net.run();
    assert_eq!(net.ep(PROV).resolved(&ok), Value::from("hello"));
    assert_eq!(*events.lock().expect("lock"), vec![Value::from("hello")]);
    assert_eq!(net.traced()[0].main["parent"], Value::from(call.as_str()));
    assert_eq!(net.traced()[0].extra["t"], Value::F64(5.0), "rintf_timeout / 2");

    // `_dispose` removes the service; later calls fail.
    let dispose = net.call(PROV, &as_remote(&iface["_dispose"]), Vec::new(), None);
    net.run();
    assert_eq!(net.ep(PROV).resolved(&dispose), Value::Nil);
    assert!(net.ep(CONS).table().service(&service_id).is_none());
    let late = net.call(PROV, &on_event, vec!["again".into()], None);
    net.run();
    assert_eq!(net.ep(PROV).error(&late), format!("Method expired or not found: {PROV}:{}", on_event.method));
    assert_eq!(events.lock().expect("lock").len(), 1);
    assert_eq!(net.ep(CONS).table().service_count(), 1, "only built-in is left");
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();
}

#[test]
fn service_error_rejects_with_an_error_value() {
    let mut net = Net::new(&[CONS, PROV]);
    let fail = function("fail", |_, _| Reply::Raise("ValueError: boom".into()));
    net.ep(PROV).register(map! { "id" => "demo", "fail" => fail });
    net.start_trace();
    let call = net.call(CONS, &remote(PROV, "services.demo.fail"), Vec::new(), None);
    net.run();
    let wire = net.traced()[1].extra["args"].as_list().expect("args")[0].clone();
    assert_eq!(wire.as_map().expect("error map")["_rtype"], Value::from("error"));
    match &net.ep(CONS).outcomes[&call] {
        CallOutcome::Rejected(e) => assert_eq!(e.message, "ValueError: boom"),
        other => panic!("{other:?}"),
    }
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();
}

#[test]
fn silent_callee_times_out_but_heartbeats_keep_a_call_alive() {
    let mut net = Net::new(&[CONS, PROV]);
    let stuck = function("stuck", |_, _| Reply::Hang);
    let slow = function("slow", |_, _| Reply::Defer("slow".into()));
    net.ep(PROV).register(map! { "id" => "demo", "stuck" => stuck, "slow" => slow });

    let call = net.call(CONS, &remote(PROV, "services.demo.stuck"), Vec::new(), None);
    net.advance(Duration::from_secs(29));
    assert!(!net.ep(CONS).outcomes.contains_key(&call));
    net.advance(Duration::from_secs(1));
    assert_eq!(
        net.ep(CONS).error(&call),
        "Method call timed out: ws/prov:services.demo.stuck, context: method: services.demo.stuck, docs: None"
    );
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();

    net.start_trace();
    let call = net.call(CONS, &remote(PROV, "services.demo.slow"), Vec::new(), None);
    net.advance(Duration::from_secs(100));
    assert!(!net.ep(CONS).outcomes.contains_key(&call), "heartbeats every 15 s keep the 30 s timer away");
    let heartbeats =
        net.traced().iter().filter(|t| t.main["method"] == Value::from(format!("{call}.heartbeat")));
    assert_eq!(heartbeats.count(), 7, "one at once (as Python sends it), then at 15, 30, ..., 90 s");
    let now = net.now;
    net.ep(PROV).finish(now, "slow", Ok(42.into()));
    net.run();
    assert_eq!(net.ep(CONS).resolved(&call), Value::from(42));
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();
}

#[test]
fn one_megabyte_argument_travels_through_message_cache() {
    let mut net = Net::new(&[CONS, PROV]);
    let size = function("size", |_, inv| {
        Reply::Return(Value::from(inv.args.first().and_then(Value::as_bytes).map_or(0, Bytes::len)))
    });
    net.ep(PROV).register(map! { "id" => "demo", "size" => size });
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    net.start_trace();
    net.reorder = true;
    let call = net.call(CONS, &remote(PROV, "services.demo.size"), vec![Bytes::from(data).into()], None);
    net.run();
    assert_eq!(net.ep(CONS).resolved(&call), Value::from(1u64 << 20));

    // What the provider received: a get_service round trip, then create, the sets in
    // shuffled order, and process; never the big call itself.
    let to_prov: Vec<&Traced> = net.traced().iter().filter(|t| t.sender == CONS).collect();
    let methods: Vec<String> =
        to_prov.iter().map(|t| t.main["method"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(methods[0], "services.built-in.get_service");
    assert_eq!(methods[1], "services.built-in.message_cache.create");
    assert_eq!(methods.last().map(String::as_str), Some("services.built-in.message_cache.process"));
    let sets: Vec<i64> = to_prov
        .iter()
        .filter(|t| t.main["method"] == Value::from("services.built-in.message_cache.set"))
        .map(|t| int(&t.extra["args"].as_list().expect("args")[1]))
        .collect();
    assert_eq!(sets.len(), 5, "1 MiB + envelope in 256 KiB chunks");
    let mut sorted = sets.clone();
    sorted.sort_unstable();
    assert_ne!(sets, sorted, "the chunks were sent out of order");
    assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
    assert!(!methods.iter().any(|m| m == "services.demo.size"));
    assert!(net.largest_frame < CHUNK_THRESHOLD, "largest frame {} bytes", net.largest_frame);
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();
}

#[test]
fn callee_disconnect_rejects_pending_calls() {
    let mut net = Net::new(&[CONS, PROV]);
    net.ep(PROV).register(map! { "id" => "demo", "stuck" => function("stuck", |_, _| Reply::Hang) });
    let stuck = remote(PROV, "services.demo.stuck");
    // The pending call also hands the provider a `_rintf` interface.
    let listener = map! { "_rintf" => true, "on_event" => recorder("on_event", &Arc::default()) };
    let call = net.call(CONS, &stuck, vec![listener.into()], None);
    net.run();
    assert_eq!(net.ep(CONS).table().service_count(), 2, "built-in and the _rintf service");
    net.disconnect(PROV);
    assert_eq!(net.ep(CONS).error(&call), "Client disconnected: ws/prov");
    assert_eq!(net.ep(CONS).table().service_count(), 1, "the _rintf service went with its allowed caller");
    net.ep(CONS).assert_idle();

    // A call to the peer that is gone gets the server's synthetic reject.
    let call = net.call(CONS, &stuck, Vec::new(), None);
    net.run();
    assert_eq!(net.ep(CONS).error(&call), "Target peer ws/prov is not connected");
    net.ep(CONS).assert_idle();
}

#[test]
fn protected_service_refuses_other_workspaces() {
    let mut net = Net::new(&[CONS, PROV, OTHER]);
    net.ep(PROV).register(map! { "id" => "demo", "add" => add_function() });
    let add = remote(PROV, "services.demo.add");
    let refused = net.call(OTHER, &add, vec![1.into(), 2.into()], None);
    let same_ws = net.call(CONS, &add, vec![1.into(), 2.into()], None);
    let ping = net.call(OTHER, &remote(PROV, "services.built-in.ping"), vec!["ping".into()], None);
    net.run();
    assert_eq!(
        net.ep(OTHER).error(&refused),
        "Permission denied for invoking protected method ws2/other:services.demo.add, workspace mismatch: ws != ws2"
    );
    assert_eq!(net.ep(CONS).resolved(&same_ws), Value::from(3));
    assert_eq!(net.ep(OTHER).resolved(&ping), Value::from("pong"), "public services are open to all");
    for id in [CONS, PROV, OTHER] {
        net.ep(id).assert_idle();
    }
}

#[test]
fn ten_thousand_calls_with_callbacks_leave_no_sessions() {
    let mut net = Net::new(&[CONS, PROV]);
    let work = function("work", |ep, inv| {
        let callback = as_remote(&inv.args[1]);
        ep.call(inv.now, &callback, vec![inv.args[0].clone()], None);
        Reply::Return(inv.args[0].clone())
    });
    net.ep(PROV).register(map! { "id" => "demo", "work" => work });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let callback = recorder("cb", &seen);
    let work = remote(PROV, "services.demo.work");
    for batch in 0..100i64 {
        let calls: Vec<(i64, String)> = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                (n, net.call(CONS, &work, vec![n.into(), callback.clone()], None))
            })
            .collect();
        net.run();
        for (n, call) in calls {
            assert_eq!(net.ep(CONS).outcomes.remove(&call), Some(CallOutcome::Resolved(n.into())));
        }
    }
    assert_eq!(seen.lock().expect("lock").len(), 10_000);
    let prov = net.ep(PROV);
    assert_eq!(prov.outcomes.len(), 10_000);
    assert!(prov.outcomes.values().all(|o| matches!(o, CallOutcome::Resolved(_))));
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();
}

#[test]
fn one_megabyte_result_is_chunked_back_under_the_callers_session() {
    let mut net = Net::new(&[CONS, PROV]);
    let blob = function("blob", |_, inv| {
        let n = usize::try_from(int(&inv.args[0])).unwrap_or(0);
        Reply::Return(Bytes::from(vec![7u8; n]).into())
    });
    net.ep(PROV).register(map! { "id" => "demo", "blob" => blob });
    net.start_trace();
    let call = net.call(CONS, &remote(PROV, "services.demo.blob"), vec![(1i64 << 20).into()], None);
    net.run();
    let result = net.ep(CONS).resolved(&call);
    assert_eq!(result.as_bytes().map(Bytes::len), Some(1 << 20));

    // The resolve's remote parent is the caller's session: it is the cache key, and every
    // cache call carries heartbeat = true for it (spec §3 step 2).
    let cache_calls: Vec<&Traced> = net
        .traced()
        .iter()
        .filter(|t| t.sender == PROV)
        .filter(|t| t.main["method"].as_str().is_some_and(|m| m.contains("message_cache")))
        .collect();
    assert_eq!(cache_calls.len(), 7, "create, 5 sets, process");
    for t in &cache_calls {
        let args = t.extra["args"].as_list().expect("args");
        assert_eq!(args[0], Value::from(call.as_str()), "key = the caller's session");
        assert_eq!(args.last(), Some(&Value::Bool(true)), "heartbeat flag");
    }
    assert!(net.largest_frame < CHUNK_THRESHOLD);
    net.ep(CONS).assert_idle();
    net.ep(PROV).assert_idle();
}
