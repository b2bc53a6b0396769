//! The sans-IO RPC endpoint: one peer of the hypha-rpc protocol as a state machine.
//!
//! Every hypha peer, whatever drives it, does the same protocol work: open a session per
//! call, encode arguments into it, pick the promise form, chunk large packages through the
//! receiver's `message_cache`, answer the built-in service, heartbeat the calls it is
//! running, expire the calls it is waiting for, and sweep old sessions. [`Endpoint`] does
//! all of it once, so that the server's native peers (the workspace manager, per-request
//! HTTP peers) and the Rust client's session-registry actor only move bytes, run user
//! handlers and keep time.
//!
//! It follows `quinn-proto`: no socket, no clock, no task. Methods come in four groups:
//!
//! * **inputs**: [`Endpoint::handle_frame`] (one binary frame from the transport) and
//!   [`Endpoint::handle_timeout`] (the moment [`Endpoint::poll_timeout`] named has come);
//! * **commands**: [`Endpoint::call`] (and [`Endpoint::generator_next`] /
//!   [`Endpoint::generator_close`]), [`Endpoint::reply`] / [`Endpoint::abandon`] for calls
//!   the driver was handed, [`Endpoint::emit_event`], [`Endpoint::register_service`] and
//!   the lifecycle commands ([`Endpoint::close`], [`Endpoint::handle_connection_lost`]);
//! * **outputs**: [`Endpoint::poll_transmit`] (frames to send, in order, already chunked),
//!   [`Endpoint::poll_event`] (what the driver must act on, see [`Event`]) and
//!   [`Endpoint::poll_timeout`] (the earliest of: a call deadline, a heartbeat to send, a
//!   `message_cache` entry to evict, the next session sweep);
//! * **getters**: [`Endpoint::id`], [`Endpoint::table`], [`Endpoint::stats`].
//!
//! After every input or command the driver drains `poll_transmit` and `poll_event`, then
//! re-reads `poll_timeout`. The queues hold only what the last inputs produced, so they
//! stay bounded as long as the driver drains them; the endpoint itself never holds more
//! than [`chunk::MAX_CONCURRENT_SETS`] chunk calls of one upload in flight.
//!
//! # What the driver still does
//!
//! * Run user code: an [`Event::Invoke`] names a [`Handler`] (the value the driver put
//!   into a [`LocalFunction`](crate::LocalFunction)) and carries the decoded arguments and a [`ReplyTo`]; the
//!   driver runs the function and calls [`Endpoint::reply`] exactly once (or
//!   [`Endpoint::abandon`] if the function was cancelled). Until then the endpoint
//!   heartbeats the caller.
//! * Map [`Event::Settled`] onto its futures (the id is the session [`Endpoint::call`]
//!   returned) and pull items out of its generators ([`Event::GeneratorNext`]).
//! * Tell the server about services ([`Endpoint::register_service`] only stores them) and
//!   run the handshake, reconnection and encryption, which are not modelled here.
//!
//! # Deliberate behaviours
//!
//! * The callee's first heartbeat is due [`FIRST_HEARTBEAT_AFTER`] (1 s, or the interval
//!   if shorter) after the call arrived, then one every interval (spec §4.4). Python
//!   sends the first one at once, even for an instant function; JS after one interval.
//!   Both are wire-compatible (a heartbeat only pushes the caller's deadline back, which
//!   is two intervals away). Sending it at once would cost a frame through the server
//!   for every call in flight whenever the timer runs, and re-arm the driver's timer for
//!   nearly every call; a call that runs longer than a second still signals life within
//!   one.
//! * Callbacks decoded from the arguments of a call that arrived with `parent = P` nest
//!   the sessions of calls made through them under `P` (spec §4.7) while that call runs:
//!   [`RemoteMethod`] has no field for a local parent, so the endpoint remembers it by the
//!   callback's `remote_parent` until the call is replied to.
//! * Late `resolve`/`reject`/`heartbeat` calls for sessions that are gone are dropped
//!   without an [`Event::Error`]: they are normal (heartbeats race results).

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
// Per-call maps keyed by session and call ids: foldhash (randomly seeded), not SipHash.
use foldhash::{HashMap, HashMapExt};

use crate::chunk::{self, CacheCall, ChunkError, ChunkLimits, ChunkPlan, Reassembler, CHUNK_SIZE};
use crate::codec::{self, CodecError, CodecRegistry, DecodeContext, EncodeContext};
use crate::message::{self, CallExtra, MainSegment, MessageError, Promise};
use crate::msgpack::{self, DecodeLimits, Rope};
use crate::package::{self, Package, PackageError};
use crate::session::{
    BuiltinHandlers, CallError, CallOutcome, DispatchError, IncomingCall, LazySession, OpenCall,
    RemovedService, ServiceError, SessionConfig, SessionError, SessionHeartbeat, SessionTable, SettledCall,
    Target, BUILTIN_SERVICE_ID,
};
use crate::value::{ErrorValue, Handler, Map, PromiseMode, RemoteGenerator, RemoteMethod, Value};

/// `services.built-in.get_service`: the first step of a chunked send (spec §3 step 1).
const GET_BUILTIN_METHOD: &str = "services.built-in.get_service";

/// How long after a call arrives its first heartbeat is due (or after one interval, if
/// that is shorter). See the module documentation.
pub const FIRST_HEARTBEAT_AFTER: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------
// Configuration and errors
// ---------------------------------------------------------------------------------------

/// Everything about an endpoint that is not its identity. Every timeout is a `Duration`.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Call timeouts and session lifetime (spec §4.4, §4.7).
    pub session: SessionConfig,
    /// Bytes per `message_cache` chunk for our large sends (`long_message_chunk_size`).
    pub chunk_size: usize,
    /// What a peer may make our `message_cache` hold.
    pub chunk_limits: ChunkLimits,
    /// Limits for decoding received frames and reassembled packages.
    pub decode_limits: DecodeLimits,
    /// `ctx.connection_type` of received calls (one of `message::CONNECTION_TYPE_*`).
    pub connection_type: String,
    /// `_rserver` of our descriptors: our server's `public_base_url`, if known.
    pub server_url: Option<String>,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            chunk_size: CHUNK_SIZE,
            chunk_limits: ChunkLimits::default(),
            decode_limits: DecodeLimits::default(),
            connection_type: message::CONNECTION_TYPE_WEBSOCKET.to_owned(),
            server_url: None,
        }
    }
}

/// Errors of the endpoint. The ones about an incoming call are sent to its `reject` (their
/// `Display` text, which for the wrapped module errors is the exact upstream string);
/// those with nowhere to go come out as [`Event::Error`].
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Opening a call failed (the endpoint was closed, a bad session id).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A service could not be registered, removed or fetched.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// An incoming method path did not resolve or was not allowed.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// A value could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A frame or reassembled package is not a valid package, or one could not be written.
    #[error(transparent)]
    Package(#[from] PackageError),
    /// An envelope field is missing or malformed.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// A `message_cache` operation failed.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// A `message_cache` call with `heartbeat = true` names a session we no longer have
    /// (upstream's text, [`chunk::session_gone_message`]).
    #[error("session does not exist anymore: {0}")]
    SessionGone(String),
    /// The call carries an encryption envelope (spec §8), which this endpoint cannot open.
    #[error("Decryption failed: no encryption key is configured to open a call to {0}")]
    EncryptionUnsupported(String),
    /// A built-in function got an argument of the wrong kind.
    #[error("{method}: argument {index} {reason}")]
    BadArgument {
        /// The built-in function.
        method: &'static str,
        /// Position of the argument.
        index: usize,
        /// What was wrong.
        reason: &'static str,
    },
    /// A call without a promise failed: upstream only logs such errors.
    #[error("{method} called by {caller} failed and has no promise to reject: {message}")]
    Unanswered {
        /// `from` of the call.
        caller: String,
        /// The called path.
        method: String,
        /// The error.
        message: String,
    },
    /// A reply or heartbeat we sent could not be delivered (e.g. a chunked result failed).
    #[error("sending {method} to {target} failed: {message}")]
    ReplyFailed {
        /// The peer.
        target: String,
        /// The callback path.
        method: String,
        /// Why.
        message: String,
    },
    /// A `client_disconnected` event without `data.id`.
    #[error("client_disconnected event without data.id")]
    BadDisconnectEvent,
}

impl EndpointError {
    /// The error value a `reject` carries: upstream's text, and an empty trace (as the
    /// server's synthetic reject has; there is no Rust traceback worth sending).
    pub fn to_error_value(&self) -> ErrorValue {
        ErrorValue { message: self.to_string(), trace: Some(String::new()) }
    }
}

// ---------------------------------------------------------------------------------------
// Events and reply handles
// ---------------------------------------------------------------------------------------

/// Where the result of an incoming call goes: its decoded promise (spec §4.3).
#[derive(Clone, Debug, PartialEq)]
pub struct PromiseCallbacks {
    /// Called with the result (`<session>.resolve` on the caller).
    pub resolve: RemoteMethod,
    /// Called with an error value.
    pub reject: RemoteMethod,
    /// Called every `interval` while the call runs, if present.
    pub heartbeat: Option<RemoteMethod>,
    /// The heartbeat period.
    pub interval: Option<Duration>,
}

impl PromiseCallbacks {
    /// Decodes the promise of an incoming call into callable proxies (spec §4.5 step 3):
    /// a compact promise stands for the descriptors of [`message::expand_compact`], built
    /// from `call.from`/`call.session`; explicit descriptors are decoded with `cx`, whose
    /// `remote_parent` must be the call's `session`, so that the replies carry
    /// `parent = caller's session`.
    pub fn decode(
        promise: Promise,
        call: &MainSegment,
        cx: &DecodeContext<'_>,
        caller_key: Option<&Bytes>,
    ) -> Result<Self, EndpointError> {
        if let Promise::Compact { interval } = promise {
            return Self::compact(call, interval, cx, caller_key);
        }
        let Promise::Explicit { resolve, reject, heartbeat, interval } = promise else {
            return Err(MessageError::BadPromise("str").into());
        };
        let heartbeat = heartbeat.filter(|h| !matches!(h, Value::Nil));
        Ok(Self {
            resolve: codec::decode_remote_method(resolve, cx)?,
            reject: codec::decode_remote_method(reject, cx)?,
            heartbeat: heartbeat.map(|h| codec::decode_remote_method(h, cx)).transpose()?,
            interval,
        })
    }

    /// The compact promise `"*"` (spec §4.3), which nearly every call carries: the
    /// descriptors [`message::expand_compact`] describes, built as typed methods directly.
    /// Building them as maps and decoding those again cost a twelfth of a client's CPU
    /// time per call; `compact_promise_equals_its_expanded_descriptors` checks that both
    /// ways agree.
    fn compact(
        call: &MainSegment,
        interval: Duration,
        cx: &DecodeContext<'_>,
        caller_key: Option<&Bytes>,
    ) -> Result<Self, EndpointError> {
        let promise = CompactPromise::new(call, interval, cx.remote_workspace, caller_key)?;
        Ok(promise.expand(call.method.as_deref().unwrap_or_default(), cx.remote_parent))
    }
}

/// The compact promise `"*"` of an incoming call, kept as its parts: nearly every call
/// carries one, and nearly every call needs only its `resolve` (once, when the reply is
/// sent) and never its `heartbeat` (due only after [`FIRST_HEARTBEAT_AFTER`]). Building
/// the three [`RemoteMethod`]s up front cost a dozen allocations per call; these parts are
/// shared (one `Arc`) by the reply handle and the running-call record instead, and each
/// callback is derived when it is sent.
#[derive(Clone, Debug)]
struct CompactPromise {
    /// The caller, absolute: `_rtarget` of the callbacks.
    target: String,
    /// The caller's session: the callbacks are `<session>.resolve` (`.reject`,
    /// `.heartbeat`) and calls through them carry `parent = <session>` (spec §4.7).
    session: String,
    /// The heartbeat period (`t`).
    interval: Duration,
    /// The caller's public key, when replies to it must be encrypted.
    key: Option<Bytes>,
}

impl CompactPromise {
    /// The parts of the compact promise of `call`; the same checks (and errors) as the
    /// descriptors of [`message::expand_compact`] would need.
    fn new(
        call: &MainSegment,
        interval: Duration,
        remote_workspace: Option<&str>,
        key: Option<&Bytes>,
    ) -> Result<Self, EndpointError> {
        let from = call.from.as_deref().ok_or(MessageError::Missing("from"))?;
        let session = call.session.as_deref().ok_or(MessageError::Missing("session"))?;
        let (_, client) = from.split_once('/').ok_or_else(|| MessageError::BadFrom(from.into()))?;
        // `codec::resolve_target` without copying `client` first.
        let target = match remote_workspace {
            Some(w) if !client.contains('/') && client != w => [w, "/", client].concat(),
            _ => client.to_owned(),
        };
        Ok(Self { target, session: session.to_owned(), interval, key: key.cloned() })
    }

    /// The three descriptors, as [`PromiseCallbacks`] (for [`ReplyTo::callbacks`]);
    /// `called` is the called method (the callbacks' `_rdoc`), `remote_parent` the
    /// decoding context's.
    fn expand(&self, called: &str, remote_parent: Option<&str>) -> PromiseCallbacks {
        let make = |name: &str| RemoteMethod {
            doc: Some([name, " callback for method: ", called].concat()),
            remote_parent: remote_parent.map(str::to_owned),
            ..self.callback(name)
        };
        PromiseCallbacks {
            resolve: make("resolve"),
            reject: make("reject"),
            heartbeat: Some(make("heartbeat")),
            interval: Some(self.interval),
        }
    }

    /// The callback `<session>.<name>` in the form a call through it needs: what
    /// [`Self::expand`] builds, minus `_rdoc` (a fire-and-forget call never reads it: only
    /// a pending promise call keeps its doc, for the timeout message).
    fn callback(&self, name: &str) -> RemoteMethod {
        RemoteMethod {
            target: self.target.clone(),
            method: [self.session.as_str(), ".", name].concat(),
            encryption_key: self.key.clone(),
            remote_parent: Some(self.session.clone()),
            ..Default::default()
        }
    }

    /// `resolve` from a promise nobody else holds any more, moving its strings.
    fn into_resolve(self) -> RemoteMethod {
        RemoteMethod {
            method: [self.session.as_str(), ".resolve"].concat(),
            target: self.target,
            encryption_key: self.key,
            remote_parent: Some(self.session),
            ..Default::default()
        }
    }
}

/// The decoded promise of an incoming call.
#[derive(Debug)]
enum Promised {
    /// `"*"`, kept as parts (see [`CompactPromise`]).
    Compact(Arc<CompactPromise>),
    /// Explicit descriptors, decoded.
    Explicit(Box<PromiseCallbacks>),
}

/// A received frame's extra segment, as its reader needs it. Lives only while the frame
/// is dispatched: boxing the larger variant would cost an allocation per call.
#[allow(clippy::large_enum_variant)]
enum Payload {
    /// A call's: only the keys the callee reads.
    Call(CallExtra),
    /// Any other message's: the map (merged into the main segment for the driver).
    Other(Option<Map>),
}

/// Where a running call's heartbeats go.
#[derive(Debug)]
enum HeartbeatTo {
    /// `<session>.heartbeat` of a compact promise, derived when one is due.
    Compact(Arc<CompactPromise>),
    /// An explicit heartbeat descriptor (boxed: explicit promises are rare).
    Method(Box<RemoteMethod>),
}

/// The handle of an incoming call the driver was asked to run. Give it back to
/// [`Endpoint::reply`] (or [`Endpoint::abandon`]) exactly once: it is not `Clone` so that
/// a call cannot be answered twice.
#[derive(Debug)]
pub struct ReplyTo {
    /// Key of the running-call record (heartbeats, parent link); `None` without a promise.
    id: Option<u64>,
    /// The decoded promise; `None` for fire-and-forget calls.
    promised: Option<Promised>,
    /// A compact promise expanded into descriptors, on the first [`ReplyTo::callbacks`].
    /// Boxed: the descriptors are 800 bytes that most replies never build, and a
    /// `ReplyTo` is moved through every event and handler of a call.
    expanded: OnceLock<Box<PromiseCallbacks>>,
    /// `parent` of the incoming call: our reply sessions nest under it (spec §4.7).
    local_parent: Option<String>,
    /// `from` of the call.
    caller: String,
    /// The called path.
    method: String,
    /// For generator `next`: the `(session, object id)` to remove on exhaustion.
    generator: Option<(String, String)>,
}

impl ReplyTo {
    /// Whether the caller waits for a result (the call had a promise).
    pub fn expects_result(&self) -> bool {
        self.promised.is_some()
    }

    /// The absolute id of the caller.
    pub fn caller(&self) -> &str {
        &self.caller
    }

    /// The method path that was called.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The decoded promise, if any.
    pub fn callbacks(&self) -> Option<&PromiseCallbacks> {
        match self.promised.as_ref()? {
            Promised::Explicit(cb) => Some(cb),
            Promised::Compact(c) => {
                Some(self.expanded.get_or_init(|| Box::new(c.expand(&self.method, Some(c.session.as_str())))))
            }
        }
    }
}

/// What the driver must act on, from [`Endpoint::poll_event`].
#[derive(Debug)]
pub enum Event {
    /// Run a local function (a service function or a callback stored in a session) and
    /// answer with [`Endpoint::reply`].
    Invoke {
        /// The driver's handle of the function.
        handler: Handler,
        /// Decoded positional arguments (functions in them are callable proxies).
        args: Vec<Value>,
        /// Decoded keyword arguments, when the caller sent `with_kwargs`.
        kwargs: Option<Map>,
        /// The receive context (spec §2.5, `to` absolute) when the function requires it.
        context: Option<Map>,
        /// Where the result goes.
        reply: ReplyTo,
    },
    /// Pull the next item of a local generator and answer with it, or with
    /// [`Value::stop_iteration`] at its end (the endpoint then removes the generator).
    GeneratorNext {
        /// The driver's handle of the generator.
        handler: Handler,
        /// Where the item goes.
        reply: ReplyTo,
    },
    /// A peer closed a local generator early: drop it. Already answered and removed.
    GeneratorClose {
        /// The driver's handle of the generator.
        handler: Handler,
    },
    /// One of our calls ended (the session is the id [`Endpoint::call`] returned).
    Settled(SettledCall),
    /// A package that is not a method call (workspace events, custom events, spec §2.4),
    /// `extra` merged into `main`. `client_disconnected` also comes out here, after the
    /// endpoint handled it.
    Message(Map),
    /// A peer left and its calls and interfaces were cleaned up (spec §4.10, upstream's
    /// `remote_client_disconnected`).
    RemoteClientDisconnected {
        /// The peer's absolute id.
        client_id: String,
        /// How many sessions went with it.
        sessions_cleaned: usize,
        /// The `_rintf` services disposed because the peer was their allowed caller.
        rintf_cleaned: Vec<String>,
    },
    /// A peer called `_dispose` of a `_rintf` interface: the service is gone.
    InterfaceDisposed {
        /// The `_rintf_<id>` service.
        service_id: String,
    },
    /// Something failed with nobody to tell (a malformed frame, an error of a call
    /// without a promise): log it.
    Error(EndpointError),
}

/// Counters of what an endpoint holds, for tests ("nothing left behind") and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Sessions, nested ones included.
    pub sessions: usize,
    /// Our promise calls waiting for a reply.
    pub pending_calls: usize,
    /// Calls whose settlement the endpoint still routes somewhere other than the driver
    /// (replies, uploads, forwards; and chunked calls of the driver until they settle).
    pub continuations: usize,
    /// Chunked sends in progress.
    pub uploads: usize,
    /// Incoming calls handed out and not yet replied to.
    pub running_calls: usize,
    /// Half-built messages in our `message_cache`.
    pub cache_entries: usize,
    /// Frames not yet taken by [`Endpoint::poll_transmit`].
    pub queued_transmits: usize,
    /// Events not yet taken by [`Endpoint::poll_event`].
    pub queued_events: usize,
}

/// The call that pulls the next item of a remote generator (spec §6): a full call with its
/// own session and compact promise, no arguments, carrying the generator's parent.
pub fn generator_next_method(g: &RemoteGenerator) -> RemoteMethod {
    generator_call(g, &g.method)
}

/// The call that stops a remote generator early (spec §6).
pub fn generator_close_method(g: &RemoteGenerator) -> RemoteMethod {
    generator_call(g, &g.close_method)
}

fn generator_call(g: &RemoteGenerator, method: &str) -> RemoteMethod {
    RemoteMethod {
        server: g.server.clone(),
        target: g.target.clone(),
        method: method.to_owned(),
        promise: PromiseMode::Compact,
        remote_parent: g.remote_parent.clone(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Internal state
// ---------------------------------------------------------------------------------------

/// The built-in service's functions (spec §7.4), run by the endpoint itself because they
/// need its table and message cache. Private, so no driver handler can pose as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Builtin {
    Ping,
    GetService,
    CacheCreate,
    CacheAppend,
    CacheSet,
    CacheProcess,
    CacheRemove,
}

/// How the endpoint continues when one of its calls settles.
#[derive(Debug)]
enum Then {
    /// A driver's call: emit [`Event::Settled`].
    Report,
    /// A reply or heartbeat to `method` on `target`: report failures as [`Event::Error`].
    Discard { target: String, method: String },
    /// `message_cache.remove` after a failed upload: the outcome does not matter (spec §3).
    Ignore,
    /// A step of a chunked upload.
    Upload { id: u64, step: UploadStep },
    /// A call relayed for a forwarder (spec §5.3): its outcome answers this call. Boxed:
    /// forwards are rare, the map holds one `Then` per call in flight.
    Forward(Box<ReplyTo>),
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
#[derive(Debug)]
struct Upload {
    /// The session of the large call: its timer starts only after `process` (§4.2).
    session: String,
    /// The peer the package goes to.
    target: String,
    /// The called method, for the failure message.
    method: String,
    /// The whole packed package, until the plan cuts it into chunks.
    package: Option<Rope>,
    /// The call's remote parent: the cache key when present (spec §3 step 2).
    remote_parent: Option<String>,
    /// Made once the target's `api_version` is known.
    plan: Option<ChunkPlan>,
    /// Chunk calls sent, and acknowledged.
    sent: usize,
    done: usize,
    /// `process` was sent: the receiver's entry is gone (or about to be), nothing to remove.
    processing: bool,
}

/// An incoming call handed to the driver and not yet answered.
#[derive(Debug)]
struct Running {
    /// The heartbeat proxy and period, when the caller asked for heartbeats.
    heartbeat: Option<(HeartbeatTo, Duration)>,
    /// When the next heartbeat is due (also in `Endpoint::heartbeats`).
    next_heartbeat: Option<Instant>,
    /// Our sessions for heartbeats nest under the call's parent (spec §4.7).
    local_parent: Option<String>,
    /// `from` of the call, to forget it when that peer leaves.
    caller: String,
    /// The caller's session, when a parent link was recorded for it.
    parent_link: Option<String>,
}

/// Calls through callbacks with `remote_parent = <key>` nest under `local_parent`.
#[derive(Debug)]
struct ParentLink {
    /// The peer whose session the key is.
    caller: String,
    /// The `parent` the carrying call arrived with.
    local_parent: String,
    /// The running call that recorded it.
    reply_id: u64,
}

// ---------------------------------------------------------------------------------------
// The endpoint
// ---------------------------------------------------------------------------------------

/// One RPC peer, sans-IO. See the module documentation.
#[derive(Debug)]
pub struct Endpoint {
    config: EndpointConfig,
    /// `ws/cid` (or the bare client id before the workspace is known): `from` of our
    /// packages and `_rtarget` of our descriptors.
    id: String,
    /// Services, sessions, pending calls and their deadlines.
    table: SessionTable,
    /// User codecs.
    codecs: CodecRegistry,
    /// Our `message_cache`: the receiving side of chunking.
    cache: Reassembler,
    /// Frames for the transport.
    transmits: VecDeque<Rope>,
    /// Events for the driver.
    events: VecDeque<Event>,
    /// How each of our calls continues when it settles, by session.
    then: HashMap<String, Then>,
    /// Chunked uploads in progress, by id, and the id by the uploaded call's session.
    uploads: HashMap<u64, Upload>,
    upload_of: HashMap<String, u64>,
    /// Incoming calls being run by the driver, by reply id.
    running: HashMap<u64, Running>,
    /// Heartbeats due, ordered by time.
    heartbeats: BTreeSet<(Instant, u64)>,
    /// Local parents of callbacks decoded from running calls, by the caller's session.
    parents: HashMap<String, ParentLink>,
    /// Packages reassembled by `message_cache.process`, each with the trusted context of
    /// its `process` call; dispatched after the `process` reply is queued.
    reassembled: VecDeque<(Package, Map)>,
    /// When to sweep sessions next; `None` while there are none.
    next_sweep: Option<Instant>,
    /// Source of upload and reply ids.
    next_id: u64,
    /// The `user` stamp of the last frame received: the server repeats it in every frame
    /// it routes here, and it need not be checked again ([`msgpack::RepeatCache`]).
    user_cache: msgpack::RepeatCache,
}

impl Endpoint {
    /// An endpoint for client `client_id` in `workspace` (`None` until the server said
    /// it), with its built-in service registered (spec §7.4, registered first).
    pub fn new(config: EndpointConfig, workspace: Option<&str>, client_id: &str, now: Instant) -> Self {
        let mut table = SessionTable::new(config.session.clone(), client_id, now);
        table.set_local_workspace(workspace.map(str::to_owned));
        let cache = Reassembler::new(config.chunk_limits.clone());
        let mut ep = Self {
            config,
            id: String::new(),
            table,
            codecs: CodecRegistry::new(),
            cache,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            then: HashMap::new(),
            uploads: HashMap::new(),
            upload_of: HashMap::new(),
            running: HashMap::new(),
            heartbeats: BTreeSet::new(),
            parents: HashMap::new(),
            reassembled: VecDeque::new(),
            next_sweep: None,
            next_id: 0,
            user_cache: MainSegment::user_cache(),
        };
        ep.set_workspace(workspace);
        ep
    }

    // ----- getters -----

    /// Our id as peers see it: `ws/cid`, or the bare client id without a workspace.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The object store (services, sessions), for inspection.
    pub fn table(&self) -> &SessionTable {
        &self.table
    }

    /// The user codecs, to register more (spec §5.7).
    pub fn codecs_mut(&mut self) -> &mut CodecRegistry {
        &mut self.codecs
    }

    /// What the endpoint holds right now.
    pub fn stats(&self) -> EndpointStats {
        EndpointStats {
            sessions: self.table.total_session_count(),
            pending_calls: self.table.pending_call_count(),
            continuations: self.then.len(),
            uploads: self.uploads.len(),
            running_calls: self.running.len(),
            cache_entries: self.cache.len(),
            queued_transmits: self.transmits.len(),
            queued_events: self.events.len(),
        }
    }

    // ----- outputs -----

    /// The next frame to send, in order, as one buffer (a copy when it has parts, see
    /// [`Self::poll_transmit_rope`]).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmits.pop_front().map(Rope::into_bytes)
    }

    /// The next frame to send, in order, as the parts it was written in: a `message_cache`
    /// call keeps its 256 KiB chunk as a slice of the caller's payload, so a driver that
    /// writes the parts straight into its socket buffer (the client's websocket codec)
    /// copies a large payload once instead of twice.
    pub fn poll_transmit_rope(&mut self) -> Option<Rope> {
        self.transmits.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Endpoint::handle_timeout`] must run next; `None` when nothing is scheduled
    /// (an idle endpoint has no timer at all).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let heartbeat = self.heartbeats.first().map(|(t, _)| *t);
        [self.table.poll_timeout(), heartbeat, self.cache.next_expiry(), self.next_sweep]
            .into_iter()
            .flatten()
            .min()
    }

    // ----- identity and services -----

    /// Sets our workspace (from the server's `connection_info`): it changes our id and the
    /// permission checks. The built-in service is (re)named after the new id.
    pub fn set_workspace(&mut self, workspace: Option<&str>) {
        let cid = self.table.client_id().to_owned();
        self.id = match workspace {
            Some(ws) => format!("{ws}/{cid}"),
            None => cid,
        };
        self.table.set_local_workspace(workspace.map(str::to_owned));
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
        // The built-in config is ours and valid; a failure here would be a bug in
        // `session`, caught by this module's tests rather than by a panic at run time.
        let registered = self.table.add_builtin_service(&self.id, builtin).is_ok();
        debug_assert!(registered, "the built-in service must register");
    }

    /// Sets the manager's client id: `*/<manager_id>` may call protected functions.
    pub fn set_manager_id(&mut self, manager_id: Option<String>) {
        self.table.set_manager_id(manager_id);
    }

    /// Stores a local service (spec §7.1) and returns its normalised map. Telling the
    /// server (`register_service` on the manager) is the driver's business.
    pub fn register_service(&mut self, api: Map, overwrite: bool) -> Result<&Map, EndpointError> {
        Ok(self.table.add_service(api, overwrite)?)
    }

    /// Removes a local service (spec §7.8).
    pub fn unregister_service(&mut self, service_id: &str) -> Result<RemovedService, EndpointError> {
        Ok(self.table.remove_service(service_id)?)
    }

    // ----- commands: calls -----

    /// Calls a remote method (spec §4.2) and returns the call's session, which
    /// identifies its [`Event::Settled`]. Fire-and-forget calls settle with `Nil` once
    /// sent. Large packages go through the target's `message_cache` (spec §3).
    ///
    /// Errors here mean nothing was sent and nothing is left behind (the session is gone,
    /// `_rintf` services created for the arguments are removed).
    pub fn call(
        &mut self,
        now: Instant,
        method: &RemoteMethod,
        args: Vec<Value>,
        kwargs: Option<Map>,
    ) -> Result<String, EndpointError> {
        let local_parent = method.remote_parent.as_deref().and_then(|rp| {
            self.parents.get(rp).filter(|l| l.caller == method.target).map(|l| l.local_parent.clone())
        });
        let (session, package) = self.start_call(now, method, args, kwargs, local_parent.as_deref())?;
        self.dispatch(now, &session, method, package, Then::Report);
        self.rearm(now);
        Ok(session)
    }

    /// Calls `method` on peer `target` (an absolute id) with a compact promise: a call
    /// without a descriptor, e.g. to the manager's `services.default.*`.
    pub fn call_method(
        &mut self,
        now: Instant,
        target: &str,
        method: &str,
        args: Vec<Value>,
        kwargs: Option<Map>,
    ) -> Result<String, EndpointError> {
        let rm = RemoteMethod {
            target: target.to_owned(),
            method: method.to_owned(),
            promise: PromiseMode::Compact,
            ..Default::default()
        };
        self.call(now, &rm, args, kwargs)
    }

    /// Asks a remote generator for its next item (spec §6). The call resolves with the
    /// item, or with a `stop_iteration` map ([`Value::is_stop_iteration`]) at the end.
    pub fn generator_next(&mut self, now: Instant, g: &RemoteGenerator) -> Result<String, EndpointError> {
        self.call(now, &generator_next_method(g), Vec::new(), None)
    }

    /// Stops a remote generator early (spec §6); its result does not matter.
    pub fn generator_close(&mut self, now: Instant, g: &RemoteGenerator) -> Result<String, EndpointError> {
        self.call(now, &generator_close_method(g), Vec::new(), None)
    }

    /// Answers an incoming call (spec §4.6): the value goes to the caller's `resolve`, the
    /// error to its `reject`; heartbeats stop. For a call without a promise an error is
    /// only logged ([`Event::Error`]). A reply for a caller that has left is dropped.
    pub fn reply(&mut self, now: Instant, reply: ReplyTo, result: Result<Value, ErrorValue>) {
        self.finish_reply(now, reply, result);
        self.rearm(now);
    }

    /// Forgets an incoming call without answering (its function was cancelled or died):
    /// heartbeats stop, so the caller times out (spec §4.4).
    pub fn abandon(&mut self, reply: ReplyTo) {
        if let Some(id) = reply.id {
            self.close_running(id);
        }
    }

    /// Sends an event package (`rpc.emit`, spec §2.4): never chunked. Without `to` it is
    /// only fired locally, as [`Event::Message`].
    pub fn emit_event(&mut self, main: Map, extra: Option<Map>) -> Result<(), EndpointError> {
        if main.get("type").and_then(Value::as_str).is_none() {
            return Err(MessageError::MissingType.into());
        }
        if !main.contains_key("to") {
            self.events.push_back(Event::Message(package::merge(main, extra)));
            return Ok(());
        }
        let frame = package::encode_package(&main, extra.as_ref())?;
        self.transmits.push_back(Rope::from(frame));
        Ok(())
    }

    // ----- commands: lifecycle -----

    /// User disconnect (spec §1.7): every pending call fails with "RPC connection closed",
    /// everything is dropped, later calls fail with "Connection is closed".
    pub fn close(&mut self, now: Instant) {
        let settled = self.table.close();
        self.uploads.clear();
        self.upload_of.clear();
        self.settle(now, settled);
        self.then.clear();
        self.running.clear();
        self.heartbeats.clear();
        self.parents.clear();
        self.reassembled.clear();
        self.cache = Reassembler::new(self.config.chunk_limits.clone());
        self.next_sweep = None;
    }

    /// The connection dropped (spec §1.6): while reconnecting pending calls keep their
    /// timers, otherwise they fail with `"Connection lost: <reason>"`.
    pub fn handle_connection_lost(&mut self, now: Instant, reason: &str, reconnecting: bool) {
        let settled = self.table.handle_connection_lost(reason, reconnecting);
        self.settle(now, settled);
        self.rearm(now);
    }

    /// The manager id changed on reconnect: calls to the old manager fail.
    pub fn handle_manager_changed(&mut self, now: Instant, old_manager_id: &str) {
        let settled = self.table.handle_manager_changed(old_manager_id);
        self.settle(now, settled);
        self.rearm(now);
    }

    // ----- inputs -----

    /// One binary frame from the transport (spec §2.5).
    pub fn handle_frame(&mut self, now: Instant, frame: Bytes) {
        let limits = &self.config.decode_limits;
        // A call's payload is read key by key, anything else as a map.
        let decoded = MainSegment::decode_cached(&frame, limits, &mut self.user_cache)
            .map_err(EndpointError::from)
            .and_then(|(main, at)| {
                Ok(if main.kind == message::METHOD {
                    (main, Payload::Call(package::decode_call_extra(&frame, at, limits)?))
                } else {
                    (main, Payload::Other(package::decode_extra(&frame, at, limits)?))
                })
            });
        match decoded {
            Ok((main, Payload::Call(extra))) => self.handle_method(now, main, extra),
            Ok((main, Payload::Other(extra))) => self.receive(now, main, extra),
            Err(e) => self.events.push_back(Event::Error(e)),
        }
        // Packages reassembled on the way, each after the `process` reply it came with.
        while let Some((p, trusted)) = self.reassembled.pop_front() {
            match with_trusted_routing(p.main, &trusted) {
                Ok(main) => self.receive(now, main, p.extra),
                Err(e) => self.events.push_back(Event::Error(e.into())),
            }
        }
        self.rearm(now);
    }

    /// Time has come (`now >= poll_timeout()`): expire calls, send heartbeats, evict idle
    /// `message_cache` entries, sweep sessions.
    pub fn handle_timeout(&mut self, now: Instant) {
        let timed_out = self.table.handle_timeout(now);
        self.settle(now, timed_out);
        self.cache.evict_expired(now);
        while let Some(&(due, id)) = self.heartbeats.first() {
            if due > now {
                break;
            }
            self.heartbeats.remove(&(due, id));
            self.send_heartbeat(now, id);
        }
        if self.next_sweep.is_some_and(|t| t <= now) {
            self.table.sweep(now);
            self.next_sweep = None;
        }
        self.rearm(now);
    }

    // ----- send path -----

    /// Opens the session, encodes the arguments into it once, and packs the package
    /// (spec §4.2 steps 1-6). On error nothing is left behind.
    fn start_call(
        &mut self,
        now: Instant,
        method: &RemoteMethod,
        args: Vec<Value>,
        kwargs: Option<Map>,
        local_parent: Option<&str>,
    ) -> Result<(String, Rope), EndpointError> {
        let opened = self.table.open_call(now, &open_call(method, local_parent))?;
        let session = opened.session;
        let mut cx = EncodeContext::new(&self.id, &self.codecs, &mut self.table);
        cx.session = Some(&session);
        cx.server = self.config.server_url.as_deref();
        let answer = Some(session.as_str()).filter(|_| method.promise != PromiseMode::None);
        let main = call_main(&self.id, method, answer);
        let promise = Promise::outgoing(method.promise, &self.id, &session, opened.heartbeat_interval);
        let (built, created) = pack_call(cx, main, args, kwargs, promise);
        match built {
            Ok(rope) => Ok((session, rope)),
            Err(e) => Err(self.unsent(Some(&session), created, e)),
        }
    }

    /// A call whose package could not be built: drops its session (when it has one) and
    /// the `_rintf` services its encoding registered, and hands the error back.
    fn unsent(&mut self, session: Option<&str>, created: Vec<String>, error: EndpointError) -> EndpointError {
        if let Some(session) = session {
            self.table.handle_send_failed(session, &error.to_string());
        }
        for id in created {
            let _ = self.table.remove_service(&id);
        }
        error
    }

    /// [`Self::start_call`] for a reply or another fire-and-forget call (a `to` without a
    /// promise): its session is opened only when the arguments leave something in it or
    /// the package goes out in chunks ([`LazySession`]), so that a plain result costs no
    /// session. `None` for the session: nothing to settle after sending.
    fn start_fire_and_forget(
        &mut self,
        now: Instant,
        to: &RemoteMethod,
        args: Vec<Value>,
        local_parent: Option<&str>,
    ) -> Result<(Option<String>, Rope), EndpointError> {
        if to.promise != PromiseMode::None {
            return self.start_call(now, to, args, None, local_parent).map(|(s, p)| (Some(s), p));
        }
        let mut lazy = LazySession::new(&mut self.table, now, open_call(to, local_parent))?;
        let mut cx = EncodeContext::new(&self.id, &self.codecs, &mut lazy);
        cx.server = self.config.server_url.as_deref();
        let (built, created) = pack_call(cx, call_main(&self.id, to, None), args, None, None);
        // A chunked package is tracked by its session (`message_cache` upload).
        let built = built.and_then(|rope| {
            if chunk::needs_chunking(rope.len(), &to.method) {
                lazy.open()?;
            }
            Ok(rope)
        });
        let session = lazy.opened();
        match built {
            Ok(rope) => Ok((session, rope)),
            Err(e) => Err(self.unsent(session.as_deref(), created, e)),
        }
    }

    /// Sends a packed call, as one frame or through `message_cache`; the call's timer
    /// starts once it is out (spec §4.2 step 5.3).
    fn dispatch(&mut self, now: Instant, session: &str, method: &RemoteMethod, package: Rope, then: Then) {
        if chunk::needs_chunking(package.len(), &method.method) {
            self.then.insert(session.to_owned(), then);
            self.start_upload(now, session.to_owned(), method, package);
            return;
        }
        self.transmits.push_back(package);
        match self.table.call_sent(now, session) {
            // Settled at once (fire-and-forget): `then` goes straight to its continuation,
            // not through the map. The session is brand new, so no upload of it exists.
            Some(settled) => self.settle_one(now, settled, then),
            // `Report` is what a settled call without an entry gets: the driver's calls,
            // nearly all of them, need none.
            None if matches!(then, Then::Report) => {}
            None => {
                self.then.insert(session.to_owned(), then);
            }
        }
    }

    /// [`Self::dispatch`] of a reply or heartbeat (`Then::Discard`), whose continuation
    /// is only built when it is needed: a fire-and-forget call settles at once, and
    /// without an error nothing is left to report.
    /// `session` is `None` when the call has none ([`Self::start_fire_and_forget`]).
    fn dispatch_reply(&mut self, now: Instant, session: Option<String>, to: &RemoteMethod, package: Rope) {
        let Some(session) = session else {
            // Nothing was stored and the package is one frame: nothing to settle.
            self.transmits.push_back(package);
            return;
        };
        if chunk::needs_chunking(package.len(), &to.method) {
            return self.dispatch(now, &session, to, package, discard(to));
        }
        self.transmits.push_back(package);
        match self.table.call_sent(now, &session) {
            Some(settled) if settled.outcome.error_message().is_none() => {}
            Some(settled) => self.settle_one(now, settled, discard(to)),
            None => {
                self.then.insert(session, discard(to));
            }
        }
    }

    /// `start_call` + `dispatch` for internal calls; an error is reported to `then`.
    fn send_internal(
        &mut self,
        now: Instant,
        method: &RemoteMethod,
        args: Vec<Value>,
        kwargs: Option<Map>,
        local_parent: Option<&str>,
        then: Then,
    ) {
        match self.start_call(now, method, args, kwargs, local_parent) {
            Ok((session, package)) => self.dispatch(now, &session, method, package, then),
            Err(e) => match then {
                Then::Upload { id, step } => self.fail_upload(now, id, step, e.to_string()),
                Then::Forward(reply) => self.finish_reply(now, *reply, Err(e.to_error_value())),
                Then::Discard { target, method } => {
                    self.events.push_back(Event::Error(EndpointError::ReplyFailed {
                        target,
                        method,
                        message: e.to_string(),
                    }))
                }
                Then::Report | Then::Ignore => {}
            },
        }
    }

    /// Routes settled calls to their continuations.
    fn settle(&mut self, now: Instant, settled: Vec<SettledCall>) {
        for s in settled {
            let then = self.then.remove(&s.session).unwrap_or(Then::Report);
            if !matches!(then, Then::Upload { .. }) {
                self.cancel_upload_of(now, &s.session);
            }
            self.settle_one(now, s, then);
        }
    }

    /// Continues one settled call with its `then` (taken out of the map, or never in it).
    fn settle_one(&mut self, now: Instant, s: SettledCall, then: Then) {
        match then {
            Then::Report => self.events.push_back(Event::Settled(s)),
            Then::Ignore => {}
            Then::Discard { target, method } => {
                if let Some(message) = s.outcome.error_message() {
                    self.events.push_back(Event::Error(EndpointError::ReplyFailed {
                        target,
                        method,
                        message,
                    }));
                }
            }
            Then::Upload { id, step } => self.upload_step(now, id, step, s.outcome),
            Then::Forward(reply) => {
                let result = match s.outcome {
                    CallOutcome::Resolved(v) => Ok(v),
                    CallOutcome::Rejected(e) => Err(e),
                    CallOutcome::Failed(e) => {
                        Err(ErrorValue { message: e.to_string(), trace: Some(String::new()) })
                    }
                };
                self.finish_reply(now, *reply, result);
            }
        }
    }

    /// The package could not be uploaded: settle the call with upstream's text, also when
    /// its session vanished meanwhile (the peer left and took the session with it).
    fn fail_send(&mut self, now: Instant, session: &str, target: &str, method: &str, error: String) {
        let mut settled = self.table.handle_send_failed(session, &error);
        if !settled.iter().any(|s| s.session == session) && self.then.contains_key(session) {
            let error = CallError::SendFailed { target: target.to_owned(), method: method.to_owned(), error };
            settled.push(SettledCall { session: session.to_owned(), outcome: CallOutcome::Failed(error) });
        }
        self.settle(now, settled);
    }

    // ----- chunked upload (sender side of spec §3) -----

    fn start_upload(&mut self, now: Instant, session: String, method: &RemoteMethod, package: Rope) {
        let id = self.fresh_id();
        self.upload_of.insert(session.clone(), id);
        self.uploads.insert(
            id,
            Upload {
                session,
                target: method.target.clone(),
                method: method.method.clone(),
                package: Some(package),
                remote_parent: method.remote_parent.clone(),
                plan: None,
                sent: 0,
                done: 0,
                processing: false,
            },
        );
        // Step 1: `get_remote_service("<target>:built-in")`, an explicit-promise call.
        let get = RemoteMethod {
            target: method.target.clone(),
            method: GET_BUILTIN_METHOD.to_owned(),
            promise: PromiseMode::Explicit,
            ..Default::default()
        };
        let then = Then::Upload { id, step: UploadStep::GetBuiltin };
        self.send_internal(now, &get, vec![Value::from(BUILTIN_SERVICE_ID)], None, None, then);
    }

    fn cache_call(&mut self, now: Instant, id: u64, step: UploadStep, call: CacheCall) {
        let Some(target) = self.uploads.get(&id).map(|u| u.target.clone()) else { return };
        let rm = cache_method(&target, &call);
        self.send_internal(now, &rm, call.args, None, None, Then::Upload { id, step });
    }

    fn upload_step(&mut self, now: Instant, id: u64, step: UploadStep, outcome: CallOutcome) {
        let value = match outcome {
            CallOutcome::Resolved(v) => v,
            failed => {
                let error = failed.error_message().unwrap_or_default();
                return self.fail_upload(now, id, step, error);
            }
        };
        let chunk_size = self.config.chunk_size;
        let Some(upload) = self.uploads.get_mut(&id) else { return };
        match step {
            UploadStep::GetBuiltin => {
                let config = value.as_map().and_then(|m| m.get("config")).and_then(Value::as_map);
                let api_version = config.and_then(|c| c.get("api_version")).and_then(Value::as_i64);
                let package = upload.package.take().unwrap_or_default();
                let parent = upload.remote_parent.as_deref();
                let plan = ChunkPlan::from_rope(package, chunk_size, parent, api_version);
                let create = plan.create_call();
                upload.plan = Some(plan);
                self.cache_call(now, id, UploadStep::Create, create);
            }
            UploadStep::Create => self.send_more_chunks(now, id),
            UploadStep::Chunk => {
                upload.done += 1;
                let total = upload.plan.as_ref().map_or(0, |p| p.chunks().len());
                if upload.done < total {
                    self.send_more_chunks(now, id);
                } else if let Some(process) = upload.plan.as_ref().map(ChunkPlan::process_call) {
                    upload.processing = true;
                    self.cache_call(now, id, UploadStep::Process, process);
                }
            }
            UploadStep::Process => {
                let session = upload.session.clone();
                self.uploads.remove(&id);
                self.upload_of.remove(&session);
                if !self.table.has_session(&session) {
                    // Settled meanwhile (e.g. its resolve arrived before this ack).
                    self.then.remove(&session);
                } else if let Some(settled) = self.table.call_sent(now, &session) {
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
            while upload.sent < plan.chunks().len() && upload.sent - upload.done < plan.max_in_flight() {
                calls.extend(plan.chunk_call(upload.sent));
                upload.sent += 1;
            }
        }
        for call in calls {
            self.cache_call(now, id, UploadStep::Chunk, call);
        }
    }

    /// A step failed: fail the call. After a failed chunk call the receiver's
    /// half-built entry is freed first (spec §3 step 3); after a failed `create` the key
    /// may be another upload's (a collision), and `process` drops the entry itself.
    fn fail_upload(&mut self, now: Instant, id: u64, step: UploadStep, error: String) {
        let Some(upload) = self.uploads.remove(&id) else { return };
        self.upload_of.remove(&upload.session);
        if let Some(plan) = upload.plan.as_ref().filter(|_| step == UploadStep::Chunk) {
            let remove = plan.remove_call();
            let rm = cache_method(&upload.target, &remove);
            self.send_internal(now, &rm, remove.args, None, None, Then::Ignore);
        }
        self.fail_send(now, &upload.session, &upload.target, &upload.method, error);
    }

    /// The uploaded call settled on its own (timeout, disconnect, or its reply raced the
    /// `process` acknowledgement): stop uploading, and free the receiver's half-built
    /// entry unless `process` already consumed it.
    fn cancel_upload_of(&mut self, now: Instant, session: &str) {
        let Some(id) = self.upload_of.remove(session) else { return };
        let Some(upload) = self.uploads.remove(&id) else { return };
        if let Some(plan) = upload.plan.as_ref().filter(|_| !upload.processing) {
            let remove = plan.remove_call();
            let rm = cache_method(&upload.target, &remove);
            self.send_internal(now, &rm, remove.args, None, None, Then::Ignore);
        }
    }

    // ----- receive path -----

    /// Spec §2.5: dispatch on `type` (a handler's `ctx` is built from `seg` when it asks for
    /// one). A reassembled package arrives here with the routing fields of the
    /// `message_cache.process` call that completed it (spec §3 receiver step 3).
    fn receive(&mut self, now: Instant, seg: MainSegment, extra: Option<Map>) {
        if seg.kind == message::METHOD {
            return self.handle_method(now, seg, extra.map(CallExtra::from_map).unwrap_or_default());
        }
        match seg.kind.as_str() {
            message::CLIENT_DISCONNECTED => self.handle_client_disconnected(now, &seg),
            message::PEER_NOT_FOUND => {
                // Not sent by current servers (spec §2.4); reject the named session.
                if let Some(session) = seg.session.as_deref() {
                    let error = seg.rest.get("error").and_then(Value::as_str).unwrap_or("Peer not found");
                    let settled = self.table.handle_reject(now, session, ErrorValue::new(error));
                    self.settle(now, settled);
                }
            }
            _ => {}
        }
        self.events.push_back(Event::Message(package::merge(seg.into_map(), extra)));
    }

    /// The callee side of spec §4.5.
    fn handle_method(&mut self, now: Instant, main: MainSegment, mut extra: CallExtra) {
        let (Some(from), Some(to), Some(method)) =
            (main.from.as_deref(), main.to.as_deref(), main.method.as_deref())
        else {
            let missing = if main.from.is_none() {
                "from"
            } else if main.to.is_none() {
                "to"
            } else {
                "method"
            };
            return self.events.push_back(Event::Error(MessageError::Missing(missing).into()));
        };
        let Some((remote_ws, _)) = from.split_once('/') else {
            return self.events.push_back(Event::Error(MessageError::BadFrom(from.to_owned()).into()));
        };
        // 3. The promise first: every later error goes to its reject.
        let callbacks = {
            let cx = DecodeContext {
                remote_workspace: Some(remote_ws),
                remote_parent: main.session.as_deref(),
                ..DecodeContext::new(&self.codecs)
            };
            match extra.promise() {
                Ok(None) => Ok(None),
                // `cx.remote_parent` is the call's session, as the compact parts assume.
                Ok(Some(Promise::Compact { interval })) => {
                    CompactPromise::new(&main, interval, Some(remote_ws), None)
                        .map(|c| Some(Promised::Compact(Arc::new(c))))
                }
                Ok(Some(p)) => PromiseCallbacks::decode(p, &main, &cx, None)
                    .map(|c| Some(Promised::Explicit(Box::new(c)))),
                Err(e) => Err(e.into()),
            }
        };
        let promised = match callbacks {
            Ok(c) => c,
            Err(e) => return self.events.push_back(Event::Error(e)),
        };
        // Built when needed: a resolve, reject or heartbeat (half of all calls) has no use
        // for it.
        let reply = |promised: Option<Promised>| ReplyTo {
            id: None,
            promised,
            expanded: OnceLock::new(),
            local_parent: main.parent.clone(),
            caller: from.to_owned(),
            method: method.to_owned(),
            generator: None,
        };
        // 1. Absolute ids.
        let to = match message::absolute_call_target(from, to, self.table.local_workspace()) {
            Ok(to) => to,
            Err(e) => {
                return self.finish_reply(now, reply(promised), Err(EndpointError::from(e).to_error_value()))
            }
        };
        // 2. Encryption is not modelled here.
        if extra.encrypted {
            let e = EndpointError::EncryptionUnsupported(method.to_owned());
            return self.finish_reply(now, reply(promised), Err(e.to_error_value()));
        }
        // 4-6. Lookup and permission.
        let incoming =
            IncomingCall { from, method, local_parent: main.parent.as_deref(), ..Default::default() };
        let target = match self.table.lookup(now, &incoming) {
            Ok(t) => t,
            Err(e) => {
                if promised.is_none() && is_late_callback(&e, method) {
                    return; // a late heartbeat/resolve/reject: normal, dropped silently
                }
                return self.finish_reply(now, reply(promised), Err(EndpointError::from(e).to_error_value()));
            }
        };
        // 7. Arguments, moved out of the frame (bin payloads stay slices of it).
        let decoded = {
            let cx = DecodeContext {
                remote_workspace: Some(remote_ws),
                remote_parent: main.session.as_deref(),
                ..DecodeContext::new(&self.codecs)
            };
            decode_args(&mut extra, &cx)
        };
        let (args, kwargs) = match decoded {
            Ok(a) => a,
            Err(e) => return self.finish_reply(now, reply(promised), Err(e.to_error_value())),
        };
        let session = main.session.as_deref();
        // 9. Execute.
        match target {
            Target::Ignore => {}
            Target::Resolve { session } => {
                let value = args.into_iter().next().unwrap_or_default();
                let settled = self.table.handle_resolve(now, &session, value);
                self.settle(now, settled);
            }
            Target::Reject { session } => {
                let error = match args.into_iter().next() {
                    Some(Value::Error(e)) => *e,
                    Some(Value::Str(s)) => ErrorValue::new(s),
                    other => ErrorValue::new(format!("{:?}", other.unwrap_or_default())),
                };
                let settled = self.table.handle_reject(now, &session, error);
                self.settle(now, settled);
            }
            Target::Heartbeat { session } => {
                self.table.handle_heartbeat(now, &session);
            }
            Target::Service(call) => {
                if let Some(builtin) = call.function.handler.downcast_ref::<Builtin>() {
                    let ctx = message::build_ctx(&main, &self.config.connection_type, &to);
                    let result = self.run_builtin(now, *builtin, args, &ctx);
                    return self.finish_reply(now, reply(promised), result.map_err(|e| e.to_error_value()));
                }
                let context = call
                    .annotation
                    .require_context
                    .then(|| message::build_ctx(&main, &self.config.connection_type, &to));
                let reply = self.open_reply(now, reply(promised), session);
                let handler = call.function.handler;
                self.events.push_back(Event::Invoke { handler, args, kwargs, context, reply });
            }
            Target::SessionFunction { function, .. } => {
                let reply = self.open_reply(now, reply(promised), session);
                let handler = function.handler;
                self.events.push_back(Event::Invoke { handler, args, kwargs, context: None, reply });
            }
            Target::Dispose { service_id } => {
                let result = self.table.remove_service(&service_id);
                let result = match result {
                    Ok(_) => {
                        self.events.push_back(Event::InterfaceDisposed { service_id });
                        Ok(Value::Nil)
                    }
                    Err(e) => Err(EndpointError::from(e).to_error_value()),
                };
                self.finish_reply(now, reply(promised), result);
            }
            Target::GeneratorNext { session: gen_session, object_id, generator } => {
                let mut reply = reply(promised);
                reply.generator = Some((gen_session, object_id));
                let reply = self.open_reply(now, reply, session);
                self.events.push_back(Event::GeneratorNext { handler: generator.handler, reply });
            }
            Target::GeneratorClose { session: gen_session, object_id, generator } => {
                self.table.remove_generator(&gen_session, &object_id);
                self.events.push_back(Event::GeneratorClose { handler: generator.handler });
                self.finish_reply(now, reply(promised), Ok(Value::Bool(true)));
            }
            Target::Forwarder { method: relay, .. } => {
                let reply = self.open_reply(now, reply(promised), session);
                self.send_internal(now, &relay, args, kwargs, None, Then::Forward(Box::new(reply)));
            }
        }
    }

    /// Spec §4.10: a peer left.
    fn handle_client_disconnected(&mut self, now: Instant, main: &MainSegment) {
        let data = main.rest.get("data").and_then(Value::as_map);
        let field = |k: &str| data.and_then(|d| d.get(k)).and_then(Value::as_str);
        let Some(id) = field("id") else {
            return self.events.push_back(Event::Error(EndpointError::BadDisconnectEvent));
        };
        let full = field("workspace").map_or_else(|| id.to_owned(), |ws| format!("{ws}/{id}"));
        let summary = self.table.handle_client_disconnected(&full);
        self.settle(now, summary.settled);
        // Stop heartbeating the calls it made; their replies would go nowhere.
        let gone: Vec<u64> =
            self.running.iter().filter(|(_, r)| r.caller == full).map(|(id, _)| *id).collect();
        for id in gone {
            self.close_running(id);
        }
        self.events.push_back(Event::RemoteClientDisconnected {
            client_id: full,
            sessions_cleaned: summary.sessions_cleaned,
            rintf_cleaned: summary.rintf_cleaned,
        });
    }

    // ----- the built-in service (spec §7.4) and the receiving side of chunking (§3) -----

    fn run_builtin(
        &mut self,
        now: Instant,
        builtin: Builtin,
        args: Vec<Value>,
        ctx: &Map,
    ) -> Result<Value, EndpointError> {
        let name = builtin.name();
        let arg = |i: usize| args.get(i).unwrap_or(&Value::Nil);
        let flag = |i: usize| arg(i).as_bool().unwrap_or(false);
        let text = |i: usize| {
            arg(i).as_str().ok_or(EndpointError::BadArgument {
                method: name,
                index: i,
                reason: "must be a string",
            })
        };
        let ctx_str = |k: &str| ctx.get(k).and_then(Value::as_str).unwrap_or_default();
        match builtin {
            Builtin::Ping => match text(0) {
                Ok("ping") => Ok(Value::from("pong")),
                _ => Err(EndpointError::BadArgument { method: name, index: 0, reason: "must be \"ping\"" }),
            },
            Builtin::GetService => {
                let api = self.table.get_local_service(text(0)?, ctx_str("to"), ctx_str("ws"))?;
                Ok(Value::Map(api.clone()))
            }
            Builtin::CacheCreate => {
                let key = text(0)?;
                self.cache_heartbeat(now, key, flag(1))?;
                self.cache.create(now, key, flag(2))?;
                Ok(Value::Nil)
            }
            Builtin::CacheSet => {
                let key = text(0)?;
                let index = chunk::chunk_index_from_value(arg(1))?;
                let data = chunk::chunk_data_from_value(arg(2))?;
                self.cache_heartbeat(now, key, flag(3))?;
                self.cache.set(now, key, index, data)?;
                Ok(Value::Nil)
            }
            Builtin::CacheAppend => {
                let key = text(0)?;
                let data = chunk::chunk_data_from_value(arg(1))?;
                self.cache_heartbeat(now, key, flag(2))?;
                self.cache.append(now, key, data)?;
                Ok(Value::Nil)
            }
            Builtin::CacheProcess => {
                let key = text(0)?;
                self.cache_heartbeat(now, key, flag(1))?;
                let bytes = self.cache.process(key)?;
                // Decoded here so that a corrupt package rejects the `process` call.
                let package = package::decode_package(&bytes, &self.config.decode_limits)?;
                self.reassembled.push_back((package, ctx.clone()));
                Ok(Value::Nil)
            }
            Builtin::CacheRemove => {
                self.cache.remove(text(0)?)?;
                Ok(Value::Nil)
            }
        }
    }

    /// A `message_cache` call with `heartbeat = true` names one of our sessions: reset
    /// its timer if it has one, fail if it is gone (spec §3 receiver, §4.4).
    fn cache_heartbeat(&mut self, now: Instant, key: &str, heartbeat: bool) -> Result<(), EndpointError> {
        if heartbeat && self.table.heartbeat_session(now, key) == SessionHeartbeat::Missing {
            return Err(EndpointError::SessionGone(key.to_owned()));
        }
        Ok(())
    }

    // ----- running calls: replies, heartbeats, parent links -----

    /// Records a call handed to the driver: heartbeat schedule (the first one due after
    /// [`FIRST_HEARTBEAT_AFTER`], spec §4.4) and the parent link of its callbacks (spec
    /// §4.7).
    fn open_reply(&mut self, now: Instant, mut reply: ReplyTo, remote_session: Option<&str>) -> ReplyTo {
        let Some(promised) = &reply.promised else { return reply };
        let id = self.fresh_id();
        reply.id = Some(id);
        let heartbeat = match promised {
            Promised::Compact(c) if !c.interval.is_zero() => {
                Some((HeartbeatTo::Compact(c.clone()), c.interval))
            }
            Promised::Compact(_) => None,
            Promised::Explicit(cb) => match (&cb.heartbeat, cb.interval) {
                (Some(h), Some(i)) if !i.is_zero() => Some((HeartbeatTo::Method(Box::new(h.clone())), i)),
                _ => None,
            },
        };
        let next_heartbeat = heartbeat.as_ref().map(|(_, every)| now + FIRST_HEARTBEAT_AFTER.min(*every));
        if let Some(t) = next_heartbeat {
            self.heartbeats.insert((t, id));
        }
        let parent_link = match (&reply.local_parent, remote_session) {
            (Some(parent), Some(s)) => {
                let link =
                    ParentLink { caller: reply.caller.clone(), local_parent: parent.clone(), reply_id: id };
                self.parents.insert(s.to_owned(), link);
                Some(s.to_owned())
            }
            _ => None,
        };
        let running = Running {
            heartbeat,
            next_heartbeat,
            local_parent: reply.local_parent.clone(),
            caller: reply.caller.clone(),
            parent_link,
        };
        self.running.insert(id, running);
        reply
    }

    /// Forgets a running call; `None` if it was already gone (its caller left).
    fn close_running(&mut self, id: u64) -> Option<Running> {
        let running = self.running.remove(&id)?;
        if let Some(t) = running.next_heartbeat {
            self.heartbeats.remove(&(t, id));
        }
        if let Some(key) = &running.parent_link {
            if self.parents.get(key).is_some_and(|l| l.reply_id == id) {
                self.parents.remove(key);
            }
        }
        Some(running)
    }

    /// Sends the result of an incoming call (spec §4.6). The value is encoded into the
    /// reply's own session, nested under the call's parent.
    fn finish_reply(&mut self, now: Instant, reply: ReplyTo, result: Result<Value, ErrorValue>) {
        if let Some(id) = reply.id {
            if self.close_running(id).is_none() {
                return; // the caller left (spec §4.10): nobody to answer
            }
        }
        if let (Some((session, object_id)), Ok(v)) = (&reply.generator, &result) {
            if v.is_stop_iteration() {
                self.table.remove_generator(session, object_id);
            }
        }
        let Some(promised) = reply.promised else {
            if let Err(e) = result {
                self.events.push_back(Event::Error(EndpointError::Unanswered {
                    caller: reply.caller,
                    method: reply.method,
                    message: e.message,
                }));
            }
            return;
        };
        let parent = reply.local_parent.as_deref();
        // The callback to send to, and for a result the `reject` to fall back on when it
        // cannot be encoded (`None`: derived from a compact `resolve`).
        let (to, value, fallback, is_result) = match (promised, result) {
            (Promised::Compact(c), Ok(v)) => {
                // The running record is gone: its share of the parts usually was the last.
                let resolve =
                    Arc::try_unwrap(c).map_or_else(|c| c.callback("resolve"), CompactPromise::into_resolve);
                (resolve, v, None, true)
            }
            (Promised::Compact(c), Err(e)) => (c.callback("reject"), error_arg(e), None, false),
            (Promised::Explicit(cb), Ok(v)) => {
                let PromiseCallbacks { resolve, reject, .. } = *cb;
                (resolve, v, Some(reject), true)
            }
            (Promised::Explicit(cb), Err(e)) => {
                // A reject equal to the resolve is sent to as if it were the resolve.
                let same = cb.reject == cb.resolve;
                let PromiseCallbacks { reject, .. } = *cb;
                let fallback = same.then(|| reject.clone());
                (reject, error_arg(e), fallback, same)
            }
        };
        match self.start_fire_and_forget(now, &to, vec![value], parent) {
            Ok((session, package)) => self.dispatch_reply(now, session, &to, package),
            Err(e) if is_result => {
                // The result could not be encoded: the caller gets that as the error.
                let reject = fallback.unwrap_or_else(|| RemoteMethod {
                    method: [to.method.strip_suffix("resolve").unwrap_or_default(), "reject"].concat(),
                    ..to.clone()
                });
                let error = vec![Value::from(e.to_error_value())];
                self.send_internal(now, &reject, error, None, parent, discard(&reject));
            }
            Err(e) => self.events.push_back(Event::Error(EndpointError::ReplyFailed {
                target: to.target,
                method: to.method,
                message: e.to_string(),
            })),
        }
    }

    fn send_heartbeat(&mut self, now: Instant, id: u64) {
        let Some(running) = self.running.get_mut(&id) else { return };
        let Some((to, interval)) = &running.heartbeat else { return };
        let heartbeat = match to {
            HeartbeatTo::Compact(c) => c.callback("heartbeat"),
            HeartbeatTo::Method(m) => (**m).clone(),
        };
        let next = now + *interval;
        running.next_heartbeat = Some(next);
        self.heartbeats.insert((next, id));
        let parent = running.local_parent.clone();
        self.send_internal(now, &heartbeat, Vec::new(), None, parent.as_deref(), discard(&heartbeat));
    }

    // ----- helpers -----

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Arms the session sweep while sessions exist (spec §4.7), so an idle endpoint has
    /// no timer.
    fn rearm(&mut self, now: Instant) {
        let interval = self.table.sweep_interval();
        if self.table.session_count() == 0 || interval.is_zero() {
            self.next_sweep = None;
        } else if self.next_sweep.is_none() {
            self.next_sweep = Some(now + interval);
        }
    }
}

impl Builtin {
    fn name(self) -> &'static str {
        match self {
            Builtin::Ping => "ping",
            Builtin::GetService => "get_service",
            Builtin::CacheCreate => "message_cache.create",
            Builtin::CacheAppend => "message_cache.append",
            Builtin::CacheSet => "message_cache.set",
            Builtin::CacheProcess => "message_cache.process",
            Builtin::CacheRemove => "message_cache.remove",
        }
    }
}

/// The main segment of a package reassembled from `message_cache` chunks, with its
/// routing fields (`from`, `to`, `ws`, `user`) taken from the server-stamped `process`
/// call that delivered it (`trusted`), not from what the sender wrote inside the chunks.
fn with_trusted_routing(mut main: Map, trusted: &Map) -> Result<MainSegment, MessageError> {
    for key in ["from", "to", "ws", "user"] {
        match trusted.get(key) {
            Some(v) => main.insert(key.to_owned(), v.clone()),
            None => main.shift_remove(key),
        };
    }
    MainSegment::from_map(main)
}

impl From<message::MainDecodeError> for EndpointError {
    fn from(e: message::MainDecodeError) -> Self {
        match e {
            message::MainDecodeError::Package(e) => e.into(),
            message::MainDecodeError::Message(e) => e.into(),
        }
    }
}

/// The continuation of a reply or heartbeat sent to `to`.
/// A reply's error as the value of its `reject` call (with a `trace`, as upstream sends).
fn error_arg(mut e: ErrorValue) -> Value {
    e.trace.get_or_insert_with(String::new);
    Value::from(e)
}

/// What the session table needs to open the session of a call to `method`.
fn open_call<'a>(method: &'a RemoteMethod, local_parent: Option<&'a str>) -> OpenCall<'a> {
    OpenCall {
        target: &method.target,
        method: &method.method,
        promise: method.promise,
        local_parent,
        doc: method.doc.as_deref(),
    }
}

/// The routing fields of a call from `from` to `method`; `session` is where the answer
/// goes, for calls that expect one.
fn call_main<'a>(from: &'a str, method: &'a RemoteMethod, session: Option<&'a str>) -> message::CallMain<'a> {
    message::CallMain {
        from,
        to: &method.target,
        method: &method.method,
        session,
        parent: method.remote_parent.as_deref(),
    }
}

/// Encodes a call's arguments through `cx` and writes its package: what
/// [`Endpoint::start_call`] and [`Endpoint::start_fire_and_forget`] share, whether the
/// session was opened first or is opened by the encoding. Also returns the `_rintf`
/// services the encoding created, which the caller removes again if the call fails.
fn pack_call(
    mut cx: EncodeContext<'_>,
    main: message::CallMain<'_>,
    args: Vec<Value>,
    kwargs: Option<Map>,
    promise: Option<Promise>,
) -> (Result<Rope, EndpointError>, Vec<String>) {
    let (args, with_kwargs) = codec::encode_args(args, kwargs);
    let encoded = codec::encode_args_list(args, &mut cx);
    let created = std::mem::take(&mut cx.created_interfaces);
    let built = encoded.map_err(EndpointError::from).and_then(|v| {
        let args = match v {
            Value::List(l) => l,
            other => vec![other],
        };
        // The first buffer starts large enough for a small call, so that it rarely
        // grows; large payloads are referenced, not copied ([`Rope`]).
        let mut rope = Rope::with_capacity(512);
        message::write_call(&mut rope, main, args, with_kwargs, promise).map_err(PackageError::from)?;
        Ok(rope)
    });
    (built, created)
}

fn discard(to: &RemoteMethod) -> Then {
    Then::Discard { target: to.target.clone(), method: to.method.clone() }
}

/// A compact-promise proxy for a `message_cache` call on `target`'s built-in service.
fn cache_method(target: &str, call: &CacheCall) -> RemoteMethod {
    RemoteMethod {
        target: target.to_owned(),
        method: call.method_path(),
        promise: PromiseMode::Compact,
        ..Default::default()
    }
}

/// Decodes the arguments of a received call (spec §4.5 step 7) and splits off the kwargs.
/// The list is moved out of `extra`, so nothing is deep-copied.
fn decode_args(
    extra: &mut CallExtra,
    cx: &DecodeContext<'_>,
) -> Result<(Vec<Value>, Option<Map>), EndpointError> {
    let wire = extra.take_args()?;
    let args = match codec::decode(Value::List(wire), cx)? {
        Value::List(l) => l,
        other => vec![other],
    };
    Ok(codec::split_kwargs(args, extra.with_kwargs())?)
}

/// Whether a failed lookup is a fire-and-forget promise callback for a session that is
/// gone: heartbeats race results, so these are expected and not worth an error.
fn is_late_callback(e: &DispatchError, method: &str) -> bool {
    let late = matches!(e, DispatchError::SessionNotFound(_) | DispatchError::MethodExpired(_));
    late && [".heartbeat", ".resolve", ".reject"].iter().any(|s| method.ends_with(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map;
    use crate::value::{CustomValue, Function, LocalFunction};

    const ME: &str = "ws/me";
    const PEER: &str = "ws/peer";

    fn endpoint(now: Instant) -> Endpoint {
        Endpoint::new(EndpointConfig::default(), Some("ws"), "me", now)
    }

    fn secs(now: Instant, s: u64) -> Instant {
        now + Duration::from_secs(s)
    }

    /// A frame from PEER as the server delivers it.
    fn frame(main: Map, extra: Option<Map>) -> Bytes {
        Bytes::from(package::encode_package(&main, extra.as_ref()).unwrap())
    }

    fn call_main(method: &str, session: Option<&str>) -> Map {
        let mut m = map! { "type" => "method", "from" => PEER, "to" => ME, "method" => method };
        if let Some(s) = session {
            m.insert("session".into(), Value::from(s));
        }
        m.insert("ws".into(), Value::from("ws"));
        m
    }

    #[test]
    fn compact_promise_equals_its_expanded_descriptors() {
        let codecs = CodecRegistry::default();
        let key = Bytes::from_static(&[7; 32]);
        for (from, ws, key) in [(PEER, Some("ws"), None), ("*/manager-x", Some("*"), Some(&key))] {
            let mut main = call_main("services.demo.add", Some("S1"));
            main.insert("from".into(), Value::from(from));
            let seg = MainSegment::from_map(main).unwrap();
            let cx = DecodeContext {
                remote_workspace: ws,
                remote_parent: Some("S1"),
                ..DecodeContext::new(&codecs)
            };
            let interval = Duration::from_secs(15);
            let direct = PromiseCallbacks::decode(Promise::Compact { interval }, &seg, &cx, key).unwrap();
            let expanded = message::expand_compact(from, "S1", "services.demo.add", interval, key).unwrap();
            let via_maps = PromiseCallbacks::decode(expanded, &seg, &cx, key).unwrap();
            assert_eq!(direct, via_maps);
            assert_eq!(direct.resolve.target, from);
        }
    }

    /// A compact-promise call from PEER.
    fn compact_call(method: &str, session: &str, args: Vec<Value>, t: f64) -> Bytes {
        frame(call_main(method, Some(session)), Some(map! { "args" => args, "promise" => "*", "t" => t }))
    }

    /// PEER resolving our call `session`.
    fn resolve(session: &str, value: Value) -> Bytes {
        frame(call_main(&format!("{session}.resolve"), None), Some(map! { "args" => vec![value] }))
    }

    fn sent(ep: &mut Endpoint) -> Vec<Package> {
        std::iter::from_fn(|| ep.poll_transmit())
            .map(|f| package::decode_package(&f, &DecodeLimits::default()).unwrap())
            .collect()
    }

    fn events(ep: &mut Endpoint) -> Vec<Event> {
        std::iter::from_fn(|| ep.poll_event()).collect()
    }

    fn method_of(p: &Package) -> &str {
        p.main["method"].as_str().unwrap()
    }

    fn args_of(p: &Package) -> &[Value] {
        p.extra.as_ref().and_then(|e| e.get("args")).and_then(Value::as_list).unwrap_or_default()
    }

    /// The `_rvalue` of a reject package.
    fn rejected(p: &Package) -> String {
        assert!(method_of(p).ends_with(".reject"), "not a reject: {:?}", p.main);
        args_of(p)[0].as_map().unwrap()["_rvalue"].as_str().unwrap().to_owned()
    }

    /// Registers `demo.<name>` and returns its handler.
    fn service(ep: &mut Endpoint, name: &str, config: Map) -> Handler {
        let handler = Handler::new(name.to_owned());
        let mut f = LocalFunction::new(handler.clone());
        f.name = Some(name.into());
        let api = map! { "id" => "demo", "config" => config, name => Function::Local(f) };
        ep.register_service(api, true).unwrap();
        handler
    }

    fn invoked(ep: &mut Endpoint) -> (Handler, Vec<Value>, Option<Map>, Option<Map>, ReplyTo) {
        let mut evs = events(ep);
        assert_eq!(evs.len(), 1, "{evs:?}");
        match evs.remove(0) {
            Event::Invoke { handler, args, kwargs, context, reply } => {
                (handler, args, kwargs, context, reply)
            }
            other => panic!("expected an Invoke, got {other:?}"),
        }
    }

    fn assert_idle(ep: &Endpoint) {
        assert_eq!(ep.stats(), EndpointStats::default());
        assert_eq!(ep.poll_timeout(), None);
    }

    #[test]
    fn explicit_promise_callee_side() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let add = service(&mut ep, "add", Map::new());
        let cb = |name: &str| {
            map! { "_rtype" => "method", "_rtarget" => "peer", "_rmethod" => format!("S.{name}"), "_rpromise" => false }
        };
        let promise = map! { "heartbeat" => cb("heartbeat"), "interval" => 15.0, "resolve" => cb("resolve"),
        "reject" => cb("reject") };
        let extra = map! { "args" => vec![Value::from(1), Value::from(2)], "promise" => promise };
        ep.handle_frame(now, frame(call_main("services.demo.add", Some("S")), Some(extra)));
        let (handler, args, kwargs, context, reply) = invoked(&mut ep);
        assert_eq!(handler, add);
        assert_eq!(args, vec![Value::from(1), Value::from(2)]);
        assert_eq!((kwargs, context), (None, None), "no kwargs sent, no require_context");
        let callbacks = reply.callbacks().unwrap();
        assert_eq!(callbacks.resolve.target, PEER, "decoded against the caller's workspace");
        assert_eq!(callbacks.resolve.remote_parent.as_deref(), Some("S"));
        assert_eq!(callbacks.interval, Some(Duration::from_secs(15)));
        assert_eq!(
            ep.poll_timeout(),
            Some(now + FIRST_HEARTBEAT_AFTER),
            "the first heartbeat is due after 1 s"
        );
        ep.reply(now, reply, Ok(Value::from(3)));
        let out = sent(&mut ep);
        assert_eq!(out.len(), 1, "replied within the first second: no heartbeat");
        assert_eq!(method_of(&out[0]), "S.resolve");
        assert_eq!(out[0].main["to"], Value::from(PEER));
        assert_eq!(out[0].main["parent"], Value::from("S"));
        assert!(!out[0].main.contains_key("session"), "resolve is fire-and-forget");
        assert_eq!(args_of(&out[0]), [Value::from(3)]);
        assert_idle(&ep);
    }

    #[test]
    fn compact_promise_replies_are_derived_from_its_parts() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        service(&mut ep, "add", Map::new());
        let id = ep.id().to_owned();
        let expected = |method: &str, args: Vec<Value>| {
            let main = map! { "type" => "method", "from" => id.clone(), "to" => PEER,
            "method" => method, "parent" => "S" };
            frame(main, Some(map! { "args" => args }))
        };
        let resolve = expected("S.resolve", vec![Value::from(3)]);
        // The public view of a compact promise is its three descriptors.
        ep.handle_frame(now, compact_call("services.demo.add", "S", Vec::new(), 15.0));
        let (_, _, _, _, reply) = invoked(&mut ep);
        let mut seg = MainSegment::from_map(call_main("services.demo.add", Some("S"))).unwrap();
        seg.from = Some(PEER.into());
        let codecs = CodecRegistry::default();
        let cx = DecodeContext {
            remote_workspace: Some("ws"),
            remote_parent: Some("S"),
            ..DecodeContext::new(&codecs)
        };
        let interval = Duration::from_secs(15);
        let decoded = PromiseCallbacks::decode(Promise::Compact { interval }, &seg, &cx, None).unwrap();
        assert_eq!(reply.callbacks(), Some(&decoded));
        ep.reply(now, reply, Ok(Value::from(3)));
        assert_eq!(ep.poll_transmit().unwrap(), resolve, "byte for byte");
        assert_idle(&ep);
        // An error goes to `<session>.reject`.
        ep.handle_frame(now, compact_call("services.demo.add", "S", Vec::new(), 15.0));
        let (_, _, _, _, reply) = invoked(&mut ep);
        ep.reply(now, reply, Err(ErrorValue::new("boom")));
        let out = sent(&mut ep);
        let main = map! { "type" => "method", "from" => id.clone(), "to" => PEER, "method" => "S.reject",
        "parent" => "S" };
        assert_eq!((out.len(), &out[0].main, rejected(&out[0]).as_str()), (1, &main, "boom"));
        assert_idle(&ep);
        // A result that cannot be encoded is rejected with the encoding error.
        ep.handle_frame(now, compact_call("services.demo.add", "S", Vec::new(), 15.0));
        let (_, _, _, _, reply) = invoked(&mut ep);
        ep.reply(now, reply, Ok(Value::Custom(CustomValue::new("unknown", 5u8))));
        let out = sent(&mut ep);
        assert_eq!(out.len(), 1);
        assert_eq!(method_of(&out[0]), "S.reject");
        assert!(rejected(&out[0]).contains("Unsupported data type: unknown"), "{}", rejected(&out[0]));
        assert_idle(&ep);
    }

    #[test]
    fn require_context_and_kwargs_reach_the_driver() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        service(&mut ep, "f", map! { "require_context" => true });
        let mut main = call_main("services.demo.f", Some("S"));
        main.insert("to".into(), Value::from("me"));
        let extra = map! { "args" => vec![Value::from(1), Value::from(map! { "b" => 2 })], "with_kwargs" => true,
        "promise" => "*", "t" => 15 };
        ep.handle_frame(now, frame(main, Some(extra)));
        let (_, args, kwargs, context, reply) = invoked(&mut ep);
        assert_eq!(args, vec![Value::from(1)]);
        assert_eq!(kwargs.unwrap()["b"], Value::from(2));
        let context = context.expect("require_context");
        assert_eq!(context["to"], Value::from(ME), "made absolute");
        assert_eq!(context["connection_type"], Value::from("websocket"));
        assert_eq!(context["session"], Value::from("S"));
        ep.abandon(reply);
        assert_idle(&ep);
    }

    #[test]
    fn callee_heartbeats_after_a_second_then_every_interval_until_the_reply() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        service(&mut ep, "slow", Map::new());
        ep.handle_frame(now, compact_call("services.demo.slow", "S", Vec::new(), 15.0));
        let (_, _, _, _, reply) = invoked(&mut ep);
        let first = now + FIRST_HEARTBEAT_AFTER;
        assert_eq!(ep.poll_timeout(), Some(first));
        ep.handle_timeout(now);
        assert!(sent(&mut ep).is_empty(), "an instant reply would send no heartbeat");
        ep.handle_timeout(first);
        let beats = sent(&mut ep);
        assert_eq!(beats.len(), 1);
        assert_eq!(method_of(&beats[0]), "S.heartbeat");
        assert_eq!(beats[0].main["parent"], Value::from("S"));
        assert_eq!(beats[0].extra, None, "a heartbeat is a single segment");
        assert_eq!(ep.poll_timeout(), Some(secs(first, 15)));
        ep.handle_timeout(secs(first, 14));
        assert!(sent(&mut ep).is_empty());
        ep.handle_timeout(secs(first, 15));
        assert_eq!(sent(&mut ep).len(), 1);
        ep.reply(secs(now, 20), reply, Err(ErrorValue::new("boom")));
        let out = sent(&mut ep);
        assert_eq!(rejected(&out[0]), "boom");
        assert_eq!(args_of(&out[0])[0].as_map().unwrap()["_rtrace"], Value::from(""));
        assert_idle(&ep);
        ep.handle_timeout(secs(now, 30));
        assert!(sent(&mut ep).is_empty(), "no heartbeat after the reply");

        // `t = 0` (the caller has no timer): nothing to keep alive.
        ep.handle_frame(now, compact_call("services.demo.slow", "S2", Vec::new(), 0.0));
        let (_, _, _, _, reply) = invoked(&mut ep);
        assert_eq!(ep.poll_timeout(), None);
        ep.abandon(reply);
        assert_idle(&ep);

        // An interval under a second: the first heartbeat comes after one interval.
        ep.handle_frame(now, compact_call("services.demo.slow", "S3", Vec::new(), 0.4));
        let (_, _, _, _, reply) = invoked(&mut ep);
        assert_eq!(ep.poll_timeout(), Some(now + Duration::from_millis(400)));
        ep.abandon(reply);
        assert_idle(&ep);
    }

    /// Plays the peer's side of an upload: answers every call we sent with `answer`, and
    /// returns the packages in the order we sent them.
    fn answer_all(ep: &mut Endpoint, now: Instant, answer: impl Fn(&Package) -> Value) -> Vec<Package> {
        let out = sent(ep);
        for p in &out {
            if let Some(s) = p.main.get("session").and_then(Value::as_str) {
                ep.handle_frame(now, resolve(s, answer(p)));
            }
        }
        out
    }

    fn builtin_answer(api_version: Option<i64>) -> impl Fn(&Package) -> Value {
        move |p: &Package| {
            if method_of(p) == GET_BUILTIN_METHOD {
                let mut config = Map::new();
                if let Some(v) = api_version {
                    config.insert("api_version".into(), Value::from(v));
                }
                Value::from(map! { "id" => "built-in", "config" => config })
            } else {
                Value::Nil
            }
        }
    }

    #[test]
    fn chunked_result_goes_through_the_callers_message_cache() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        service(&mut ep, "blob", Map::new());
        ep.handle_frame(now, compact_call("services.demo.blob", "S", Vec::new(), 15.0));
        let (_, _, _, _, reply) = invoked(&mut ep);
        ep.reply(now, reply, Ok(Value::Bytes(Bytes::from(vec![7u8; 1 << 20]))));
        let answer = builtin_answer(Some(3));
        let get = answer_all(&mut ep, now, &answer);
        assert_eq!(get.len(), 1);
        assert_eq!(method_of(&get[0]), GET_BUILTIN_METHOD);
        assert_eq!(args_of(&get[0]), [Value::from("built-in")]);
        assert!(get[0].extra.as_ref().unwrap()["promise"].as_map().is_some(), "explicit promise");
        let create = answer_all(&mut ep, now, &answer);
        assert_eq!(method_of(&create[0]), "services.built-in.message_cache.create");
        assert_eq!(args_of(&create[0]), [Value::from("S"), Value::Bool(true)], "key = caller's session");
        let sets = answer_all(&mut ep, now, &answer);
        assert_eq!(sets.len(), 5, "all chunk calls in flight at once (at most 30)");
        let mut whole = Vec::new();
        for (i, p) in sets.iter().enumerate() {
            assert_eq!(method_of(p), "services.built-in.message_cache.set");
            assert_eq!(args_of(p)[1], Value::from(i));
            assert_eq!(args_of(p)[3], Value::Bool(true));
            whole.extend_from_slice(args_of(p)[2].as_bytes().unwrap());
        }
        let inner = package::decode_package(&Bytes::from(whole), &DecodeLimits::default()).unwrap();
        assert_eq!(method_of(&inner), "S.resolve");
        assert_eq!(inner.main["parent"], Value::from("S"));
        let process = answer_all(&mut ep, now, &answer);
        assert_eq!(method_of(&process[0]), "services.built-in.message_cache.process");
        assert!(sent(&mut ep).is_empty());
        assert!(events(&mut ep).is_empty(), "a delivered reply raises nothing");
        assert_idle(&ep);
    }

    #[test]
    fn chunk_frames_as_ropes_hold_the_callers_payload_uncopied() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let payload = Bytes::from(vec![3u8; 3 * CHUNK_SIZE]);
        ep.call_method(now, PEER, "services.x.f", vec![Value::Bytes(payload.clone())], None).unwrap();
        let answer = builtin_answer(Some(3));
        answer_all(&mut ep, now, &answer); // get_service
        answer_all(&mut ep, now, &answer); // create
        let sets: Vec<Rope> = std::iter::from_fn(|| ep.poll_transmit_rope()).collect();
        assert_eq!(sets.len(), 4, "three whole chunks and the rest");
        let inside = |p: &[u8]| payload.as_ptr_range().contains(&p.as_ptr());
        let shared =
            sets.iter().filter(|r| r.parts().any(|p| p.len() >= CHUNK_SIZE / 2 && inside(p))).count();
        assert!(shared >= 2, "the chunks inside the payload are slices of it ({shared} of 4)");
        for rope in sets {
            let flat = rope.clone().into_bytes();
            assert_eq!(rope.parts().collect::<Vec<_>>().concat(), flat, "parts are the frame's bytes");
            let p = package::decode_package(&flat, &DecodeLimits::default()).unwrap();
            assert_eq!(method_of(&p), "services.built-in.message_cache.set");
        }
    }

    #[test]
    fn legacy_receivers_get_one_append_at_a_time() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let big = Value::Bytes(Bytes::from(vec![1u8; 600_000]));
        let call = ep.call_method(now, PEER, "services.x.f", vec![big], None).unwrap();
        let answer = builtin_answer(None);
        answer_all(&mut ep, now, &answer); // get_service
        answer_all(&mut ep, now, &answer); // create
        for _ in 0..3 {
            let step = answer_all(&mut ep, now, &answer);
            assert_eq!(step.len(), 1);
            assert_eq!(method_of(&step[0]), "services.built-in.message_cache.append");
            assert_eq!(args_of(&step[0])[2], Value::Bool(false), "no remote parent: no heartbeat flag");
        }
        let process = answer_all(&mut ep, now, &answer);
        assert_eq!(method_of(&process[0]), "services.built-in.message_cache.process");
        assert_eq!(ep.poll_timeout(), Some(secs(now, 30)), "the call's timer starts after process");
        ep.handle_frame(now, resolve(&call, Value::from(1)));
        match &events(&mut ep)[..] {
            [Event::Settled(s)] => assert_eq!(s.outcome, CallOutcome::Resolved(Value::from(1))),
            other => panic!("{other:?}"),
        }
        assert_idle(&ep);
    }

    #[test]
    fn a_resolve_racing_the_process_ack_is_fine() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let big = Value::Bytes(Bytes::from(vec![1u8; 300_000]));
        let call = ep.call_method(now, PEER, "services.x.f", vec![big], None).unwrap();
        let answer = builtin_answer(Some(3));
        for _ in 0..3 {
            answer_all(&mut ep, now, &answer); // get_service, create, sets
        }
        let process = sent(&mut ep);
        assert_eq!(method_of(&process[0]), "services.built-in.message_cache.process");
        ep.handle_frame(now, resolve(&call, Value::from(9)));
        match &events(&mut ep)[..] {
            [Event::Settled(s)] => assert_eq!(s.outcome, CallOutcome::Resolved(Value::from(9))),
            other => panic!("{other:?}"),
        }
        assert!(sent(&mut ep).is_empty(), "no message_cache.remove: process consumed the entry");
        let session = process[0].main["session"].as_str().unwrap().to_owned();
        ep.handle_frame(now, resolve(&session, Value::Nil));
        assert!(events(&mut ep).is_empty());
        assert_idle(&ep);
    }

    /// Calls `message_cache.<op>` on `ep` from PEER; returns the single reply.
    fn cache_op(ep: &mut Endpoint, now: Instant, op: &str, args: Vec<Value>) -> Package {
        let method = format!("services.built-in.message_cache.{op}");
        ep.handle_frame(now, compact_call(&method, "C", args, 15.0));
        let mut out = sent(ep);
        assert_eq!(out.len(), 1, "{op}: {out:?}");
        out.remove(0)
    }

    #[test]
    fn reassembly_errors_are_answered_with_rejects() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let k = Value::from("k");
        let chunk = Value::Bytes(Bytes::from_static(b"\xc1"));
        let r = cache_op(&mut ep, now, "set", vec![k.clone(), 0.into(), chunk.clone(), false.into()]);
        assert_eq!(rejected(&r), "Message with key k does not exists.");
        let r = cache_op(&mut ep, now, "create", vec![k.clone(), true.into()]);
        assert_eq!(rejected(&r), "session does not exist anymore: k");
        let r = cache_op(&mut ep, now, "create", vec![k.clone(), false.into()]);
        assert_eq!(method_of(&r), "C.resolve");
        let r = cache_op(&mut ep, now, "set", vec![k.clone(), 0.into(), "text".into(), false.into()]);
        assert_eq!(rejected(&r), "Chunk data must be bytes, got str");
        let r = cache_op(&mut ep, now, "process", vec![k.clone()]);
        assert_eq!(rejected(&r), "Chunk 0 of message k is missing (0 chunks expected)");
        // A corrupt package rejects its `process` call.
        cache_op(&mut ep, now, "create", vec![k.clone()]);
        cache_op(&mut ep, now, "set", vec![k.clone(), 0.into(), chunk]);
        let r = cache_op(&mut ep, now, "process", vec![k.clone()]);
        assert!(rejected(&r).starts_with("invalid msgpack in the main segment"), "{}", rejected(&r));
        let r = cache_op(&mut ep, now, "remove", vec![k]);
        assert_eq!(rejected(&r), "Message with key k does not exists.");
        let r = cache_op(&mut ep, now, "create", vec![Value::from(1)]);
        assert_eq!(rejected(&r), "message_cache.create: argument 0 must be a string");
        assert!(events(&mut ep).is_empty());
        assert_idle(&ep);
    }

    #[test]
    fn malformed_frames_become_error_events() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let error_of = |ep: &mut Endpoint| match &events(ep)[..] {
            [Event::Error(e)] => e.to_string(),
            other => panic!("expected one error, got {other:?}"),
        };
        ep.handle_frame(now, Bytes::from_static(b"\xc1"));
        assert!(error_of(&mut ep).starts_with("invalid msgpack"));
        ep.handle_frame(now, Bytes::from_static(b"\x92\x01\x02"));
        assert_eq!(error_of(&mut ep), "package main segment must be a map, got list");
        ep.handle_frame(now, frame(map! { "from" => PEER }, None));
        assert_eq!(error_of(&mut ep), "message has no type");
        ep.handle_frame(now, frame(map! { "type" => "method", "to" => ME, "method" => "x" }, None));
        assert_eq!(error_of(&mut ep), "message has no \"from\"");
        ep.handle_frame(
            now,
            frame(call_main("services.built-in.ping", Some("S")), Some(map! { "promise" => 5 })),
        );
        assert_eq!(error_of(&mut ep), "promise must be \"*\" or a map, got int");
        ep.handle_frame(now, frame(call_main("nope", None), None));
        assert_eq!(
            error_of(&mut ep),
            "nope called by ws/peer failed and has no promise to reject: Method not found: ws/peer:nope at me"
        );
        // Malformed payloads of calls with a promise are answered, not just logged.
        let extra = map! { "args" => "x", "promise" => "*", "t" => 15.0 };
        ep.handle_frame(now, frame(call_main("services.built-in.ping", Some("S")), Some(extra)));
        assert_eq!(rejected(&sent(&mut ep)[0]), "message field \"args\" must be a list, got str");
        // Late callbacks for sessions that are gone are dropped without a word.
        ep.handle_frame(now, frame(call_main("gone.heartbeat", None), None));
        assert!(events(&mut ep).is_empty() && sent(&mut ep).is_empty());
        assert_idle(&ep);
    }

    #[test]
    fn event_messages_and_client_disconnected() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let custom = map! { "type" => "my-event", "to" => "ws/*", "from" => PEER };
        ep.handle_frame(now, frame(custom, Some(map! { "data" => 1 })));
        match &events(&mut ep)[..] {
            [Event::Message(m)] => {
                assert_eq!(m["type"], Value::from("my-event"));
                assert_eq!(m["data"], Value::from(1), "extra merged");
            }
            other => panic!("{other:?}"),
        }
        // A pending call to the peer that leaves.
        let call = ep.call_method(now, PEER, "services.x.f", Vec::new(), None).unwrap();
        sent(&mut ep);
        let gone = map! { "type" => "client_disconnected", "to" => "*",
        "data" => map! { "id" => "peer", "workspace" => "ws" } };
        ep.handle_frame(now, frame(gone, None));
        match &events(&mut ep)[..] {
            [Event::Settled(s), Event::RemoteClientDisconnected { client_id, sessions_cleaned, .. }, Event::Message(m)] =>
            {
                assert_eq!(s.session, call);
                assert_eq!(s.outcome.error_message().as_deref(), Some("Client disconnected: ws/peer"));
                assert_eq!((client_id.as_str(), *sessions_cleaned), (PEER, 1));
                assert_eq!(m["type"], Value::from("client_disconnected"));
            }
            other => panic!("{other:?}"),
        }
        assert_idle(&ep);
        // emit: without `to` only local, with `to` sent as is, without `type` refused.
        ep.emit_event(map! { "type" => "local" }, None).unwrap();
        assert!(matches!(&events(&mut ep)[..], [Event::Message(m)] if m["type"] == Value::from("local")));
        ep.emit_event(map! { "type" => "x", "to" => "*" }, Some(map! { "n" => 1 })).unwrap();
        let out = sent(&mut ep);
        assert_eq!(out[0].main["to"], Value::from("*"));
        assert_eq!(out[0].extra.as_ref().unwrap()["n"], Value::from(1));
        assert!(ep.emit_event(map! { "to" => "*" }, None).is_err());
    }

    #[test]
    fn callbacks_of_a_call_with_a_parent_nest_under_it() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        service(&mut ep, "f", Map::new());
        // Our pending call P: the peer calls back into us during it, with parent = P.
        let p = ep.call_method(now, PEER, "services.x.g", Vec::new(), None).unwrap();
        sent(&mut ep);
        let mut main = call_main("services.demo.f", Some("S2"));
        main.insert("parent".into(), Value::from(p.as_str()));
        let cb =
            map! { "_rtype" => "method", "_rtarget" => "peer", "_rmethod" => "S2.cb", "_rpromise" => "*" };
        let extra = map! { "args" => vec![Value::from(cb)], "promise" => "*", "t" => 15.0 };
        ep.handle_frame(now, frame(main, Some(extra)));
        let (_, args, _, _, reply) = invoked(&mut ep);
        let Value::Function(f) = &args[0] else { panic!("{args:?}") };
        let Function::Remote(cb) = &**f else { panic!("{f:?}") };
        let inner = ep.call(now, cb, Vec::new(), None).unwrap();
        assert!(inner.starts_with(&format!("{p}.")), "{inner} nests under {p}");
        let out = sent(&mut ep);
        assert_eq!(out[0].main["session"], Value::from(inner.as_str()));
        assert_eq!(out[0].main["parent"], Value::from("S2"));
        // The reply's session nests under P too: a returned function keeps it alive.
        let keep = Value::from(Function::Local(LocalFunction::new(Handler::new(1u8))));
        ep.reply(now, reply, Ok(keep));
        assert_eq!(ep.table().session_count(), 1, "only P at the top");
        assert_eq!(ep.stats().sessions, 3, "P, the inner call, the result session");
        // After the reply the link is gone.
        let later = ep.call(now, cb, Vec::new(), None).unwrap();
        assert!(!later.contains('.'));
    }

    #[test]
    fn a_plain_reply_goes_out_without_a_session() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        service(&mut ep, "f", Map::new());
        let mut main = call_main("services.demo.f", Some("S2"));
        main.insert("parent".into(), Value::from("P9"));
        let extra = map! { "args" => Vec::<Value>::new(), "promise" => "*", "t" => 15.0 };
        ep.handle_frame(now, frame(main, Some(extra)));
        let (_, _, _, _, reply) = invoked(&mut ep);
        ep.reply(now, reply, Ok(Value::from(map! { "n" => 1 })));
        let out = sent(&mut ep);
        assert_eq!(out.len(), 1);
        let m = &out[0].main;
        assert_eq!(method_of(&out[0]), "S2.resolve");
        assert_eq!(m["to"], Value::from(PEER));
        assert_eq!(m["parent"], Value::from("S2"), "the caller's session, as the remote parent");
        assert!(!m.contains_key("session"), "a reply asks for no answer");
        assert_eq!(args_of(&out[0]), [Value::from(map! { "n" => 1 })]);
        assert_eq!(ep.stats().sessions, 0);
        assert!(events(&mut ep).is_empty());
        assert_idle(&ep);
    }

    #[test]
    fn failed_encoding_leaves_nothing_behind() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        let listener =
            map! { "_rintf" => true, "on" => Function::Local(LocalFunction::new(Handler::new(0u8))) };
        let bad = Value::Custom(CustomValue::new("unknown", 5u8));
        for promise in [PromiseMode::Compact, PromiseMode::None] {
            let rm = RemoteMethod {
                promise,
                ..RemoteMethod { target: PEER.into(), method: "m".into(), ..Default::default() }
            };
            let err = ep.call(now, &rm, vec![listener.clone().into(), bad.clone()], None).unwrap_err();
            assert!(err.to_string().contains("Unsupported data type: unknown"), "{err}");
        }
        assert_eq!(ep.table().service_count(), 1, "the _rintf services were removed again");
        assert!(sent(&mut ep).is_empty() && events(&mut ep).is_empty());
        assert_idle(&ep);
    }

    #[test]
    fn sessions_are_swept_on_the_endpoints_own_timer() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        service(&mut ep, "f", Map::new());
        assert_eq!(ep.poll_timeout(), None, "an idle endpoint has no timer");
        ep.handle_frame(now, compact_call("services.demo.f", "S", Vec::new(), 15.0));
        let (_, _, _, _, reply) = invoked(&mut ep);
        let keep = Value::from(Function::Local(LocalFunction::new(Handler::new(1u8))));
        ep.reply(now, reply, Ok(keep));
        assert_eq!(sent(&mut ep).len(), 1);
        assert_eq!(ep.table().session_count(), 1, "a result session holding a function");
        for t in [300, 600] {
            assert_eq!(ep.poll_timeout(), Some(secs(now, t)));
            ep.handle_timeout(secs(now, t));
            assert_eq!(ep.table().session_count(), 1, "not older than session_ttl at {t} s");
        }
        ep.handle_timeout(secs(now, 900));
        assert_idle(&ep);
    }

    #[test]
    fn learning_the_workspace_renames_the_builtin_in_place() {
        let now = Instant::now();
        let mut ep = Endpoint::new(EndpointConfig::default(), None, "me", now);
        assert_eq!(ep.id(), "me");
        service(&mut ep, "f", Map::new());
        ep.set_workspace(Some("ws2"));
        assert_eq!(ep.id(), "ws2/me");
        let ids: Vec<&str> = ep.table().services().map(|(k, _)| k).collect();
        assert_eq!(ids, ["built-in", "demo"], "built-in stays first");
        let name = &ep.table().service("built-in").unwrap().api["name"];
        assert_eq!(name, &Value::from("Builtin services for ws2/me"));
    }

    #[test]
    fn builtins_ping_and_get_service() {
        let now = Instant::now();
        let mut ep = endpoint(now);
        ep.handle_frame(now, compact_call("services.built-in.ping", "S", vec!["ping".into()], 15.0));
        assert_eq!(args_of(&sent(&mut ep)[0]), [Value::from("pong")]);
        ep.handle_frame(
            now,
            compact_call("services.built-in.get_service", "S", vec!["built-in".into()], 15.0),
        );
        let out = sent(&mut ep);
        let api = args_of(&out[0])[0].as_map().unwrap().clone();
        assert_eq!(api["config"].as_map().unwrap()["api_version"], Value::from(3));
        assert_eq!(api["name"], Value::from("Builtin services for ws/me"));
        ep.handle_frame(now, compact_call("services.built-in.get_service", "S", vec!["nope".into()], 15.0));
        assert_eq!(rejected(&sent(&mut ep)[0]), "Service not found: nope");
        assert_idle(&ep);
    }
}
