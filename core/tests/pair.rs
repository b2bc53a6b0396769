//! A deterministic two-peer harness in the manner of quinn-proto's `Pair`.
//!
//! Two (or three) endpoints made only of hypha-core pieces, each a [`SessionTable`] +
//! [`CodecRegistry`] + [`Reassembler`], talk through a simulated router that does to every
//! frame what the hypha server does (spec §1.5), under a simulated clock. Nothing here
//! touches a socket, a thread or the OS clock, so every scenario replays identically.
//!
//! The driver code ([`Endpoint`]) plays the part the actor layer will play later: it
//! opens call sessions, encodes arguments into them, builds packages, chunks large ones,
//! and on receive decodes, looks up, runs the local function and answers. It is the first
//! proof that the core pieces compose, so it is kept small and in the order a reader
//! expects:
//!
//! 1. local functions ([`HostFn`], [`HostGen`], [`Builtin`]): what a `Handler` holds;
//! 2. [`Endpoint`]: one peer. Send path (`call` -> `send_call` -> `send_package`), chunked
//!    uploads (`Upload`), receive path (`handle_frame` -> `handle_method` -> `execute` ->
//!    `answer`), timers (`next_timer`, `handle_timers`);
//! 3. [`Net`]: the router and the clock;
//! 4. the scenarios.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hypha_core::chunk::{self, CacheCall, ChunkPlan, Reassembler, UploadMode, CHUNK_SIZE, CHUNK_THRESHOLD};
use hypha_core::codec::{self, CodecRegistry, DecodeContext, EncodeContext};
use hypha_core::message::{self, CallAddresses, MainSegment, Promise};
use hypha_core::msgpack::DecodeLimits;
use hypha_core::package;
use hypha_core::session::{
    BuiltinHandlers, CallError, CallOutcome, IncomingCall, OpenCall, OpenedCall, SessionConfig, SessionTable,
    SettledCall, Target,
};
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
    /// Keep the call open, heartbeating every interval, until [`Endpoint::finish`] is
    /// called with this name (a long-running method).
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
    /// The receive context (spec §2.5) with `to` made absolute: what a
    /// `require_context` function gets as `context`.
    ctx: Map,
}

type HostFnBody = dyn Fn(&mut Endpoint, Invocation) -> Reply + Send + Sync;

/// The driver value behind a local function's [`Handler`]. It gets the endpoint so that
/// it can call other peers (callbacks, stored proxies) while it runs, as an actor would
/// send messages from inside a handler.
struct HostFn(Box<HostFnBody>);

/// The driver value behind a local generator: the items it still has to give.
struct HostGen(Mutex<Box<dyn Iterator<Item = Value> + Send>>);

/// The built-in service's functions (spec §7.4): run by the driver itself, because they
/// need the endpoint's table and message cache.
#[derive(Clone, Copy, Debug)]
enum Builtin {
    Ping,
    GetService,
    CacheCreate,
    CacheAppend,
    CacheSet,
    CacheProcess,
    CacheRemove,
}

/// A local function value (to register in a service or pass as an argument).
fn function(name: &str, body: impl Fn(&mut Endpoint, Invocation) -> Reply + Send + Sync + 'static) -> Value {
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

/// The call that pulls the next item of a remote generator (spec §6: a full call with
/// its own session and promise).
fn generator_next(g: &RemoteGenerator) -> RemoteMethod {
    RemoteMethod { remote_parent: g.remote_parent.clone(), ..remote(&g.target, &g.method) }
}

/// The call that stops a remote generator early.
fn generator_close(g: &RemoteGenerator) -> RemoteMethod {
    RemoteMethod { remote_parent: g.remote_parent.clone(), ..remote(&g.target, &g.close_method) }
}

// =======================================================================================
// 2. One peer
// =======================================================================================

/// How the driver continues when one of its pending calls settles.
enum Then {
    /// Keep the outcome for the test ([`Endpoint::outcomes`]).
    Report,
    /// Drop it: replies (resolve/reject/heartbeat) and `message_cache.remove`.
    Discard,
    /// The next step of a chunked upload.
    Upload { id: u64, step: UploadStep },
}

/// The `message_cache` round trips of one chunked package (spec §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UploadStep {
    /// `services.built-in.get_service("built-in")` on the target, for its `api_version`.
    GetBuiltin,
    Create,
    /// One `set` (or `append`).
    Chunk,
    Process,
}

/// A large package on its way through the target's `message_cache`.
struct Upload {
    /// The session of the large call: its timer starts only after `process` (§4.2 step 5.3).
    session: String,
    /// The peer the package goes to.
    target: String,
    /// The whole packed package.
    package: Bytes,
    /// The call's remote parent: the cache key when present (spec §3 step 2).
    remote_parent: Option<String>,
    /// Made once the target's `api_version` is known.
    plan: Option<ChunkPlan>,
    /// Chunk indices in sending order (shuffled in indexed mode, to prove order does not
    /// matter to the receiver).
    order: Vec<usize>,
    /// How many chunk calls were sent, and how many succeeded.
    sent: usize,
    done: usize,
}

/// The decoded promise of an incoming call: where its result goes.
#[derive(Clone)]
struct ReplyTo {
    resolve: RemoteMethod,
    reject: RemoteMethod,
    heartbeat: Option<RemoteMethod>,
    interval: Option<Duration>,
    /// `parent` of the incoming call: our reply sessions nest under it (spec §4.7).
    local_parent: Option<String>,
}

/// An incoming call whose function returned [`Reply::Defer`].
struct Running {
    reply: ReplyTo,
    /// When to send the next heartbeat; `None` when the caller asked for none.
    next_heartbeat: Option<Instant>,
}

/// One RPC peer, sans-IO: frames come in through [`Endpoint::handle_frame`], frames go out
/// through `outbox`, time comes in as `now`.
struct Endpoint {
    /// Absolute id `ws/cid`: `from` of our packages and `_rtarget` of our descriptors.
    id: String,
    /// The object store: services, sessions, pending calls, deadlines.
    table: SessionTable,
    /// User codecs (none in these scenarios, but the codec needs a registry).
    codecs: CodecRegistry,
    /// Our `message_cache`: the receiving side of chunking.
    cache: Reassembler,
    /// Limits for decoding received frames.
    limits: DecodeLimits,
    /// Frames waiting for the router.
    outbox: VecDeque<Bytes>,
    /// How each of our pending calls continues when it settles, by session.
    then: HashMap<String, Then>,
    /// Settled calls made with [`Then::Report`], by session: what the test asserts on.
    outcomes: HashMap<String, CallOutcome>,
    /// Chunked uploads in progress, by id.
    uploads: HashMap<u64, Upload>,
    next_upload: u64,
    /// Incoming calls still running ([`Reply::Defer`]), by the name the function gave.
    running: BTreeMap<String, Running>,
    /// Packages reassembled by `message_cache.process`, each with the trusted context of
    /// its `process` call; dispatched once the `process` reply is out.
    reassembled: VecDeque<(Bytes, Map)>,
    /// Errors that had nowhere to go (no promise to reject), for assertions.
    dropped: Vec<String>,
}

impl Endpoint {
    fn new(id: &str, now: Instant) -> Self {
        let (ws, cid) = id.split_once('/').expect("endpoint ids are ws/cid");
        let mut table = SessionTable::new(SessionConfig::default(), cid, now);
        table.set_local_workspace(Some(ws.to_owned()));
        let h = |b: Builtin| Handler::new(b);
        let builtin = BuiltinHandlers {
            ping: h(Builtin::Ping),
            get_service: h(Builtin::GetService),
            cache_create: h(Builtin::CacheCreate),
            cache_append: h(Builtin::CacheAppend),
            cache_set: h(Builtin::CacheSet),
            cache_process: h(Builtin::CacheProcess),
            cache_remove: h(Builtin::CacheRemove),
        };
        table.add_builtin_service(id, builtin).expect("built-in service");
        Self {
            id: id.to_owned(),
            table,
            codecs: CodecRegistry::new(),
            cache: Reassembler::default(),
            limits: DecodeLimits::default(),
            outbox: VecDeque::new(),
            then: HashMap::new(),
            outcomes: HashMap::new(),
            uploads: HashMap::new(),
            next_upload: 0,
            running: BTreeMap::new(),
            reassembled: VecDeque::new(),
            dropped: Vec::new(),
        }
    }

    /// Registers a local service (what `register_service` does before telling the server).
    fn register(&mut self, api: Map) {
        self.table.add_service(api, false).expect("valid service");
    }

    // ----- send path -----

    /// Calls `method` and keeps the outcome for the test. Returns the call's session.
    fn call(&mut self, now: Instant, method: &RemoteMethod, args: Vec<Value>, kwargs: Option<Map>) -> String {
        self.send_call(now, method, args, kwargs, None, Then::Report).expect("open the call")
    }

    /// The caller side of spec §4.2: open the session, encode the arguments into it,
    /// build the package, send it (chunked when large).
    fn send_call(
        &mut self,
        now: Instant,
        method: &RemoteMethod,
        args: Vec<Value>,
        kwargs: Option<Map>,
        local_parent: Option<&str>,
        then: Then,
    ) -> Result<String, String> {
        let open = OpenCall {
            target: &method.target,
            method: &method.method,
            promise: method.promise,
            local_parent,
            doc: method.doc.as_deref(),
        };
        let opened = self.table.open_call(now, &open).map_err(|e| e.to_string())?;
        let session = opened.session.clone();
        self.then.insert(session.clone(), then);
        match self.build_call_package(method, &opened, args, kwargs) {
            Ok(package) => self.send_package(now, &session, method, package),
            Err(error) => self.fail_send(now, &session, method, error),
        }
        Ok(session)
    }

    /// Encodes the call into `msgpack(main) ++ msgpack(extra)`. Local functions and
    /// generators among the arguments are stored in the call session by the codec,
    /// through the table acting as its `ObjectSink`.
    fn build_call_package(
        &mut self,
        method: &RemoteMethod,
        opened: &OpenedCall,
        args: Vec<Value>,
        kwargs: Option<Map>,
    ) -> Result<Bytes, String> {
        let mut cx = EncodeContext::new(&self.id, &self.codecs, &mut self.table);
        cx.session = Some(&opened.session);
        let args = args.iter().map(|a| codec::encode(a, &mut cx)).collect::<Result<Vec<_>, _>>();
        let args = args.map_err(|e| e.to_string())?;
        let kwargs = match kwargs.filter(|k| !k.is_empty()) {
            None => None,
            Some(k) => match codec::encode(&Value::Map(k), &mut cx).map_err(|e| e.to_string())? {
                Value::Map(m) => Some(m),
                other => return Err(format!("kwargs encoded to a {}", other.kind())),
            },
        };
        let promise = match method.promise {
            PromiseMode::None => None,
            PromiseMode::Compact => {
                Some(Promise::Compact { interval: opened.heartbeat_interval.unwrap_or_default() })
            }
            PromiseMode::Explicit => {
                let callback = |name| message::callback_descriptor(&self.id, &opened.session, name);
                Some(Promise::Explicit {
                    resolve: callback("resolve"),
                    reject: callback("reject"),
                    heartbeat: Some(callback("heartbeat")),
                    interval: opened.heartbeat_interval,
                })
            }
        };
        let mut main = MainSegment::call(&self.id, &method.target, &method.method);
        if method.promise != PromiseMode::None {
            main.session = Some(opened.session.clone());
        }
        main.parent = method.remote_parent.clone();
        let extra = message::call_extra(args, kwargs, promise);
        let bytes = package::encode_package(&main.into_map(), Some(&extra)).map_err(|e| e.to_string())?;
        Ok(Bytes::from(bytes))
    }

    /// Sends one frame, or starts a chunked upload (spec §3). The call's timer starts once
    /// the package is out.
    fn send_package(&mut self, now: Instant, session: &str, method: &RemoteMethod, package: Bytes) {
        if chunk::needs_chunking(package.len(), &method.method) {
            self.start_upload(now, session, method, package);
            return;
        }
        self.outbox.push_back(package);
        if let Some(settled) = self.table.call_sent(now, session) {
            self.settle(now, vec![settled]);
        }
    }

    /// The package could not be built or uploaded: settle the call with upstream's text.
    fn fail_send(&mut self, now: Instant, session: &str, method: &RemoteMethod, error: String) {
        let mut settled = self.table.handle_send_failed(session, &error);
        if !settled.iter().any(|s| s.session == session) {
            // Fire-and-forget calls have no pending call in the table to fail.
            let error =
                CallError::SendFailed { target: method.target.clone(), method: method.method.clone(), error };
            settled.push(SettledCall { session: session.to_owned(), outcome: CallOutcome::Failed(error) });
        }
        self.settle(now, settled);
    }

    /// Routes settled calls to their continuations.
    fn settle(&mut self, now: Instant, settled: Vec<SettledCall>) {
        for s in settled {
            match self.then.remove(&s.session).unwrap_or(Then::Report) {
                Then::Report => {
                    self.outcomes.insert(s.session, s.outcome);
                }
                Then::Discard => {}
                Then::Upload { id, step } => self.upload_step(now, id, step, s.outcome),
            }
        }
    }

    // ----- chunked upload (sender side of spec §3) -----

    fn start_upload(&mut self, now: Instant, session: &str, method: &RemoteMethod, package: Bytes) {
        let id = self.next_upload;
        self.next_upload += 1;
        let upload = Upload {
            session: session.to_owned(),
            target: method.target.clone(),
            package,
            remote_parent: method.remote_parent.clone(),
            plan: None,
            order: Vec::new(),
            sent: 0,
            done: 0,
        };
        self.uploads.insert(id, upload);
        // Step 1: `get_remote_service("<target>:built-in")`, an explicit-promise call.
        let get_service = RemoteMethod {
            promise: PromiseMode::Explicit,
            ..remote(&method.target, "services.built-in.get_service")
        };
        self.upload_call(now, id, UploadStep::GetBuiltin, &get_service, vec!["built-in".into()]);
    }

    fn upload_call(
        &mut self,
        now: Instant,
        id: u64,
        step: UploadStep,
        method: &RemoteMethod,
        args: Vec<Value>,
    ) {
        if let Err(e) = self.send_call(now, method, args, None, None, Then::Upload { id, step }) {
            self.fail_upload(now, id, e);
        }
    }

    fn cache_call(&mut self, now: Instant, id: u64, step: UploadStep, call: CacheCall) {
        let Some(target) = self.uploads.get(&id).map(|u| u.target.clone()) else { return };
        self.upload_call(now, id, step, &remote(&target, &call.method_path()), call.args);
    }

    fn upload_step(&mut self, now: Instant, id: u64, step: UploadStep, outcome: CallOutcome) {
        let value = match outcome {
            CallOutcome::Resolved(v) => v,
            failed => {
                let error = failed.error_message().unwrap_or_default();
                if step == UploadStep::Chunk {
                    let remove =
                        self.uploads.get(&id).and_then(|u| u.plan.as_ref()).map(ChunkPlan::remove_call);
                    let target = self.uploads.get(&id).map(|u| u.target.clone());
                    if let (Some(call), Some(target)) = (remove, target) {
                        let rm = remote(&target, &call.method_path());
                        let _ = self.send_call(now, &rm, call.args, None, None, Then::Discard);
                    }
                }
                self.fail_upload(now, id, error);
                return;
            }
        };
        let Some(upload) = self.uploads.get_mut(&id) else { return };
        match step {
            UploadStep::GetBuiltin => {
                let config = value.as_map().and_then(|m| m.get("config")).and_then(Value::as_map);
                let api_version = config.and_then(|c| c.get("api_version")).and_then(Value::as_i64);
                let plan =
                    ChunkPlan::new(&upload.package, CHUNK_SIZE, upload.remote_parent.as_deref(), api_version);
                upload.order = sending_order(plan.chunks().len(), plan.mode());
                let create = plan.create_call();
                upload.plan = Some(plan);
                self.cache_call(now, id, UploadStep::Create, create);
            }
            UploadStep::Create => self.send_more_chunks(now, id),
            UploadStep::Chunk => {
                upload.done += 1;
                if upload.done < upload.order.len() {
                    self.send_more_chunks(now, id);
                } else if let Some(process) = upload.plan.as_ref().map(ChunkPlan::process_call) {
                    self.cache_call(now, id, UploadStep::Process, process);
                }
            }
            UploadStep::Process => {
                let session = upload.session.clone();
                self.uploads.remove(&id);
                if let Some(settled) = self.table.call_sent(now, &session) {
                    self.settle(now, vec![settled]);
                }
            }
        }
    }

    /// Sends chunk calls until `max_in_flight` are outstanding or all are sent.
    fn send_more_chunks(&mut self, now: Instant, id: u64) {
        let mut calls = Vec::new();
        if let Some(upload) = self.uploads.get_mut(&id) {
            let Some(plan) = &upload.plan else { return };
            while upload.sent < upload.order.len() && upload.sent - upload.done < plan.max_in_flight() {
                calls.extend(plan.chunk_call(upload.order[upload.sent]));
                upload.sent += 1;
            }
        }
        for call in calls {
            self.cache_call(now, id, UploadStep::Chunk, call);
        }
    }

    fn fail_upload(&mut self, now: Instant, id: u64, error: String) {
        if let Some(upload) = self.uploads.remove(&id) {
            let method = remote(&upload.target, "<chunked upload>");
            self.fail_send(now, &upload.session, &method, error);
        }
    }

    // ----- receive path -----

    /// One binary frame from the router.
    fn handle_frame(&mut self, now: Instant, frame: Bytes) {
        self.receive(now, frame, None);
        while let Some((package, trusted)) = self.reassembled.pop_front() {
            self.receive(now, package, Some(trusted));
        }
    }

    /// Spec §2.5: decode, build `ctx` from `main` before the merge, dispatch on `type`.
    /// `trusted` is the context of a `message_cache.process` call, whose routing fields
    /// replace the reassembled package's own (spec §3 receiver step 3).
    fn receive(&mut self, now: Instant, frame: Bytes, trusted: Option<Map>) {
        let package = match package::decode_package(&frame, &self.limits) {
            Ok(p) => p,
            Err(e) => return self.dropped.push(format!("undecodable frame: {e}")),
        };
        let mut main = package.main;
        if let Some(trusted) = trusted {
            for key in ["from", "to", "ws", "user"] {
                match trusted.get(key) {
                    Some(v) => main.insert(key.to_owned(), v.clone()),
                    None => main.shift_remove(key),
                };
            }
        }
        let ctx = message::build_ctx(&main, message::CONNECTION_TYPE_WEBSOCKET);
        let main = match MainSegment::from_map(main) {
            Ok(m) => m,
            Err(e) => return self.dropped.push(format!("bad main segment: {e}")),
        };
        match main.kind.as_str() {
            message::METHOD => self.handle_method(now, main, package.extra.unwrap_or_default(), ctx),
            message::CLIENT_DISCONNECTED => self.handle_client_disconnected(now, &main),
            other => self.dropped.push(format!("unhandled message type {other}")),
        }
    }

    /// The callee side of spec §4.5.
    fn handle_method(&mut self, now: Instant, main: MainSegment, extra: Map, mut ctx: Map) {
        let (Some(from), Some(to), Some(method)) = (&main.from, &main.to, &main.method) else {
            return self.dropped.push("method call without from/to/method".into());
        };
        // 1. Absolute ids.
        let addrs = match CallAddresses::resolve(from, to, self.table.local_workspace()) {
            Ok(a) => a,
            Err(e) => return self.dropped.push(e.to_string()),
        };
        ctx.insert("to".into(), Value::from(addrs.to.as_str()));
        // 3. The promise: where the result goes.
        let reply = match self.decode_promise(&main, &extra, &addrs.remote_ws) {
            Ok(r) => r,
            Err(e) => return self.dropped.push(e),
        };
        // 4-6. Lookup and permission.
        let incoming =
            IncomingCall { from, method, local_parent: main.parent.as_deref(), ..Default::default() };
        let target = match self.table.lookup(now, &incoming) {
            Ok(t) => t,
            Err(e) => return self.answer(now, reply, Err(e.to_string())),
        };
        // 7. Arguments.
        let (args, kwargs) = match self.decode_args(&extra, &addrs.remote_ws, main.session.as_deref()) {
            Ok(a) => a,
            Err(e) => return self.answer(now, reply, Err(e)),
        };
        // 9. Execute and answer.
        let invocation = Invocation { now, args, kwargs, ctx };
        match self.execute(now, target, invocation) {
            None | Some(Reply::Hang) => {}
            Some(Reply::Return(v)) => self.answer(now, reply, Ok(v)),
            Some(Reply::Raise(e)) => self.answer(now, reply, Err(e)),
            Some(Reply::Defer(name)) => {
                if let Some(reply) = reply {
                    let next_heartbeat = reply.heartbeat.as_ref().and(reply.interval).map(|i| now + i);
                    self.running.insert(name, Running { reply, next_heartbeat });
                }
            }
        }
    }

    /// Expands a compact promise (spec §4.3) and decodes the callbacks into proxies that
    /// carry `parent = caller's session`.
    fn decode_promise(
        &self,
        main: &MainSegment,
        extra: &Map,
        remote_ws: &str,
    ) -> Result<Option<ReplyTo>, String> {
        let Some(promise) = Promise::from_extra(extra).map_err(|e| e.to_string())? else { return Ok(None) };
        let promise = match promise {
            Promise::Compact { interval } => {
                let (from, method) =
                    (main.from.as_deref().unwrap_or(""), main.method.as_deref().unwrap_or(""));
                let session = main.session.as_deref().ok_or("compact promise without a session")?;
                message::expand_compact(from, session, method, interval, None).map_err(|e| e.to_string())?
            }
            explicit => explicit,
        };
        let Promise::Explicit { resolve, reject, heartbeat, interval } = promise else {
            return Err("expand_compact returned a compact promise".into());
        };
        let cx = DecodeContext {
            remote_workspace: Some(remote_ws),
            remote_parent: main.session.as_deref(),
            ..DecodeContext::new(&self.codecs)
        };
        let proxy = |v: Value| match codec::decode(v, &cx) {
            Ok(Value::Function(f)) => match *f {
                Function::Remote(rm) => Ok(rm),
                Function::Local(_) => Err("a promise callback decoded to a local function".to_owned()),
            },
            Ok(other) => Err(format!("a promise callback is a {}", other.kind())),
            Err(e) => Err(e.to_string()),
        };
        Ok(Some(ReplyTo {
            resolve: proxy(resolve)?,
            reject: proxy(reject)?,
            heartbeat: heartbeat.map(proxy).transpose()?,
            interval,
            local_parent: main.parent.clone(),
        }))
    }

    fn decode_args(
        &self,
        extra: &Map,
        remote_ws: &str,
        session: Option<&str>,
    ) -> Result<(Vec<Value>, Map), String> {
        let wire = message::args(extra).map_err(|e| e.to_string())?.to_vec();
        let cx = DecodeContext {
            remote_workspace: Some(remote_ws),
            remote_parent: session,
            ..DecodeContext::new(&self.codecs)
        };
        let Value::List(args) = codec::decode(Value::List(wire), &cx).map_err(|e| e.to_string())? else {
            return Err("arguments did not decode to a list".into());
        };
        let (args, kwargs) =
            codec::split_kwargs(args, message::with_kwargs(extra)).map_err(|e| e.to_string())?;
        Ok((args, kwargs.unwrap_or_default()))
    }

    /// Runs what the method path named. `None`: nothing to answer (promise callbacks of
    /// our own calls).
    fn execute(&mut self, now: Instant, target: Target, inv: Invocation) -> Option<Reply> {
        let first = || inv.args.first().cloned().unwrap_or_default();
        match target {
            Target::Ignore => None,
            Target::Resolve { session } => {
                let settled = self.table.handle_resolve(now, &session, first());
                self.settle(now, settled);
                None
            }
            Target::Reject { session } => {
                let error = match first() {
                    Value::Error(e) => *e,
                    other => ErrorValue::new(format!("{other:?}")),
                };
                let settled = self.table.handle_reject(now, &session, error);
                self.settle(now, settled);
                None
            }
            Target::Heartbeat { session } => {
                self.table.handle_heartbeat(now, &session);
                None
            }
            Target::Service(call) => Some(self.run_function(&call.function.handler, inv)),
            Target::SessionFunction { function, .. } => Some(self.run_function(&function.handler, inv)),
            Target::Dispose { service_id } => Some(match self.table.remove_service(&service_id) {
                Ok(_) => Reply::Return(Value::Nil),
                Err(e) => Reply::Raise(e.to_string()),
            }),
            Target::GeneratorNext { session, object_id, generator } => {
                let Some(host) = generator.handler.downcast_ref::<HostGen>() else {
                    return Some(Reply::Raise("not a generator".into()));
                };
                let item = host.0.lock().expect("generator lock").next();
                Some(Reply::Return(item.unwrap_or_else(|| {
                    self.table.remove_generator(&session, &object_id);
                    Value::stop_iteration()
                })))
            }
            Target::GeneratorClose { session, object_id, generator } => {
                if let Some(host) = generator.handler.downcast_ref::<HostGen>() {
                    *host.0.lock().expect("generator lock") = Box::new(std::iter::empty());
                }
                self.table.remove_generator(&session, &object_id);
                Some(Reply::Return(Value::Bool(true)))
            }
            Target::Forwarder { .. } => Some(Reply::Raise("the harness does not relay forwarders".into())),
        }
    }

    fn run_function(&mut self, handler: &Handler, inv: Invocation) -> Reply {
        if let Some(f) = handler.downcast_ref::<HostFn>() {
            return (f.0)(self, inv);
        }
        match handler.downcast_ref::<Builtin>() {
            Some(b) => match self.run_builtin(*b, inv) {
                Ok(v) => Reply::Return(v),
                Err(e) => Reply::Raise(e),
            },
            None => Reply::Raise(format!("unknown handler {handler:?}")),
        }
    }

    /// The built-in service (spec §7.4) and the receiving side of chunking (spec §3).
    fn run_builtin(&mut self, builtin: Builtin, inv: Invocation) -> Result<Value, String> {
        let arg = |i: usize| inv.args.get(i).cloned().unwrap_or_default();
        let flag = |i: usize| arg(i).as_bool().unwrap_or(false);
        let text = |i: usize| {
            arg(i).as_str().map(str::to_owned).ok_or_else(|| format!("argument {i} must be a string"))
        };
        let ctx_str = |k: &str| inv.ctx.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let e = |e: chunk::ChunkError| e.to_string();
        match builtin {
            Builtin::Ping if text(0)? == "ping" => Ok("pong".into()),
            Builtin::Ping => Err("ping expects \"ping\"".into()),
            Builtin::GetService => {
                let api = self.table.get_local_service(&text(0)?, &ctx_str("to"), &ctx_str("ws"));
                api.map(|m| Value::Map(m.clone())).map_err(|e| e.to_string())
            }
            Builtin::CacheCreate => {
                let key = text(0)?;
                self.cache_heartbeat(inv.now, &key, flag(1))?;
                self.cache.create(inv.now, &key, flag(2)).map_err(e)?;
                Ok(Value::Nil)
            }
            Builtin::CacheSet => {
                let key = text(0)?;
                let index = chunk::chunk_index_from_value(&arg(1)).map_err(e)?;
                let data = chunk::chunk_data_from_value(&arg(2)).map_err(e)?;
                self.cache_heartbeat(inv.now, &key, flag(3))?;
                self.cache.set(inv.now, &key, index, data).map_err(e)?;
                Ok(Value::Nil)
            }
            Builtin::CacheAppend => {
                let key = text(0)?;
                let data = chunk::chunk_data_from_value(&arg(1)).map_err(e)?;
                self.cache_heartbeat(inv.now, &key, flag(2))?;
                self.cache.append(inv.now, &key, data).map_err(e)?;
                Ok(Value::Nil)
            }
            Builtin::CacheProcess => {
                let key = text(0)?;
                self.cache_heartbeat(inv.now, &key, flag(1))?;
                let package = self.cache.process(&key).map_err(e)?;
                self.reassembled.push_back((package, inv.ctx));
                Ok(Value::Nil)
            }
            Builtin::CacheRemove => {
                self.cache.remove(&text(0)?).map_err(e)?;
                Ok(Value::Nil)
            }
        }
    }

    /// A `message_cache` call with `heartbeat = true` names one of our sessions, whose
    /// timer it resets (spec §3 receiver, §4.4).
    fn cache_heartbeat(&mut self, now: Instant, key: &str, heartbeat: bool) -> Result<(), String> {
        if heartbeat {
            if !self.table.has_session(key) {
                return Err(chunk::session_gone_message(key));
            }
            self.table.handle_heartbeat(now, key);
        }
        Ok(())
    }

    /// Sends the result of an incoming call to its `resolve` or `reject` (spec §4.6). The
    /// result is encoded into the reply's own session, which outlives the reply only if
    /// the result holds functions or generators.
    fn answer(&mut self, now: Instant, reply: Option<ReplyTo>, result: Result<Value, String>) {
        let Some(reply) = reply else {
            if let Err(e) = result {
                self.dropped.push(e);
            }
            return;
        };
        let (to, value) = match result {
            Ok(v) => (&reply.resolve, v),
            Err(message) => (&reply.reject, Value::from(ErrorValue { message, trace: Some(String::new()) })),
        };
        let parent = reply.local_parent.as_deref();
        if let Err(e) = self.send_call(now, to, vec![value], None, parent, Then::Discard) {
            self.dropped.push(e);
        }
    }

    /// Completes a [`Reply::Defer`]red call.
    fn finish(&mut self, now: Instant, name: &str, result: Result<Value, String>) {
        let running = self.running.remove(name).expect("a running call of that name");
        self.answer(now, Some(running.reply), result);
    }

    /// Spec §4.10: the server says a peer left.
    fn handle_client_disconnected(&mut self, now: Instant, main: &MainSegment) {
        let data = main.rest.get("data").and_then(Value::as_map);
        let field = |k: &str| data.and_then(|d| d.get(k)).and_then(Value::as_str);
        let Some(id) = field("id") else { return self.dropped.push("client_disconnected without id".into()) };
        let full = field("workspace").map_or_else(|| id.to_owned(), |ws| format!("{ws}/{id}"));
        let summary = self.table.handle_client_disconnected(&full);
        self.settle(now, summary.settled);
        // Stop heartbeating calls whose caller is gone.
        self.running.retain(|_, r| r.reply.resolve.target != full);
    }

    // ----- timers -----

    /// The earliest moment something is due: a call deadline, a heartbeat, a cache expiry.
    fn next_timer(&self) -> Option<Instant> {
        let heartbeat = self.running.values().filter_map(|r| r.next_heartbeat).min();
        [self.table.poll_timeout(), heartbeat, self.cache.next_expiry()].into_iter().flatten().min()
    }

    fn handle_timers(&mut self, now: Instant) {
        let timed_out = self.table.handle_timeout(now);
        self.settle(now, timed_out);
        self.cache.evict_expired(now);
        let due: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.next_heartbeat.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for name in due {
            let Some(running) = self.running.get_mut(&name) else { continue };
            let (Some(heartbeat), Some(interval)) = (running.reply.heartbeat.clone(), running.reply.interval)
            else {
                continue;
            };
            running.next_heartbeat = Some(now + interval.max(Duration::from_millis(1)));
            let parent = running.reply.local_parent.clone();
            if let Err(e) =
                self.send_call(now, &heartbeat, Vec::new(), None, parent.as_deref(), Then::Discard)
            {
                self.dropped.push(e);
            }
        }
    }

    // ----- test helpers -----

    fn resolved(&self, session: &str) -> Value {
        match self.outcomes.get(session) {
            Some(CallOutcome::Resolved(v)) => v.clone(),
            other => panic!("{}: call {session} did not resolve: {other:?}", self.id),
        }
    }

    fn error(&self, session: &str) -> String {
        match self.outcomes.get(session) {
            Some(o @ (CallOutcome::Rejected(_) | CallOutcome::Failed(_))) => {
                o.error_message().unwrap_or_default()
            }
            other => panic!("{}: call {session} did not fail: {other:?}", self.id),
        }
    }

    /// Nothing left behind: no session, pending call, timer, upload, running call or
    /// half-built message, and no error that went unanswered.
    fn assert_idle(&self) {
        let id = &self.id;
        assert_eq!(self.table.total_session_count(), 0, "{id}: sessions left");
        assert_eq!(self.table.pending_call_count(), 0, "{id}: pending calls left");
        assert_eq!(self.table.poll_timeout(), None, "{id}: timers left");
        assert!(self.then.is_empty(), "{id}: continuations left");
        assert!(self.uploads.is_empty(), "{id}: uploads left");
        assert!(self.running.is_empty(), "{id}: running calls left");
        assert!(self.cache.is_empty(), "{id}: message_cache entries left");
        assert!(self.dropped.is_empty(), "{id}: dropped errors: {:?}", self.dropped);
    }
}

/// Indices of `n` chunks in sending order: a fixed shuffle for the indexed protocol,
/// in order for the legacy `append` protocol (which depends on it).
fn sending_order(n: usize, mode: UploadMode) -> Vec<usize> {
    match mode {
        UploadMode::Append => (0..n).collect(),
        UploadMode::Indexed => {
            (0..n).rev().filter(|i| i % 2 == 1).chain((0..n).filter(|i| i % 2 == 0)).collect()
        }
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
    endpoints: BTreeMap<String, Endpoint>,
    /// Frames sent and not yet delivered, with their sender.
    wire: VecDeque<(String, Bytes)>,
    limits: DecodeLimits,
    /// Delivered frames, when tracing is on.
    trace: Option<Vec<Traced>>,
    /// The largest frame the router saw.
    largest_frame: usize,
}

impl Net {
    fn new(ids: &[&str]) -> Self {
        let now = Instant::now();
        let endpoints = ids.iter().map(|id| ((*id).to_owned(), Endpoint::new(id, now))).collect();
        Self {
            now,
            endpoints,
            wire: VecDeque::new(),
            limits: DecodeLimits::default(),
            trace: None,
            largest_frame: 0,
        }
    }

    fn ep(&mut self, id: &str) -> &mut Endpoint {
        self.endpoints.get_mut(id).unwrap_or_else(|| panic!("no endpoint {id}"))
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

    /// Delivers frames until none is in flight.
    fn run(&mut self) {
        for _ in 0..10_000_000 {
            for (id, ep) in &mut self.endpoints {
                self.wire.extend(ep.outbox.drain(..).map(|f| (id.clone(), f)));
            }
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
            self.endpoints.values().filter_map(Endpoint::next_timer).min().filter(|t| *t <= until)
        {
            self.now = self.now.max(t);
            let now = self.now;
            for ep in self.endpoints.values_mut() {
                ep.handle_timers(now);
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
        match self.endpoints.get_mut(&to) {
            Some(ep) => ep.handle_frame(self.now, stamped),
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
                let now = self.now;
                self.ep(sender).handle_frame(now, Bytes::from(reject));
            }
        }
    }

    /// A client leaves: the server drops its connection and tells the rest of its
    /// workspace (spec §2.4, `client_disconnected`).
    fn disconnect(&mut self, id: &str) {
        self.run();
        self.endpoints.remove(id);
        let (ws, cid) = id.split_once('/').expect("endpoint ids are ws/cid");
        let event = map! { "type" => "client_disconnected", "to" => "*",
        "data" => map! { "id" => cid, "workspace" => ws } };
        let frame = Bytes::from(package::encode_package(&event, None).expect("encode the event"));
        let now = self.now;
        for (other, ep) in &mut self.endpoints {
            if other.starts_with(&format!("{ws}/")) {
                ep.handle_frame(now, frame.clone());
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
    assert_eq!(net.ep(CONS).table.session_count(), 1, "only the call session");
    assert_eq!(net.ep(CONS).table.total_session_count(), 1, "callback replies left no nested sessions");

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
    assert_eq!(net.ep(PROV).table.session_entry_count(&first), Some(2), "next and close entries");
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
    assert_eq!(net.ep(PROV).table.session_entry_count(&first), Some(0), "exhaustion removes both entries");

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
    assert_eq!(net.ep(PROV).table.session_entry_count(&second), Some(0), "close removes both entries");
    let after = net.call(CONS, &generator_next(&gen), Vec::new(), None);
    net.run();
    assert_eq!(net.ep(CONS).error(&after), format!("Method expired or not found: {CONS}:{}", gen.method));
    net.ep(CONS).assert_idle();

    // The emptied producer sessions wait for the session GC (spec §4.7).
    assert_eq!(net.ep(PROV).table.session_count(), 2);
    net.advance(Duration::from_secs(601));
    let now = net.now;
    assert_eq!(net.ep(PROV).table.sweep(now), 2);
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
            .table
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
    assert!(net.ep(CONS).table.service(&service_id).is_none());
    let late = net.call(PROV, &on_event, vec!["again".into()], None);
    net.run();
    assert_eq!(net.ep(PROV).error(&late), format!("Method expired or not found: {PROV}:{}", on_event.method));
    assert_eq!(events.lock().expect("lock").len(), 1);
    assert_eq!(net.ep(CONS).table.service_count(), 1, "only built-in is left");
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
    assert_eq!(heartbeats.count(), 6, "at 15, 30, ..., 90 s");
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
    assert_eq!(net.ep(CONS).table.service_count(), 2, "built-in and the _rintf service");
    net.disconnect(PROV);
    assert_eq!(net.ep(CONS).error(&call), "Client disconnected: ws/prov");
    assert_eq!(net.ep(CONS).table.service_count(), 1, "the _rintf service went with its allowed caller");
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
