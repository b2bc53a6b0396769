//! The client runtime's actors and the typed messages between them.
//!
//! One client connection is a handful of kinds of actor, each with one owner and one end of life:
//!
//! | file | actor | owns | ends when |
//! | --- | --- | --- | --- |
//! | [`connection`] | [`ConnectionActor`] | the awc websocket of the current *generation*, its reader and writer tasks, the app-level ping, the reconnection loop | `disconnect`, reconnection is disabled or gives up |
//! | [`session_registry`] | [`SessionRegistry`] | the sans-IO [`Endpoint`](hypha_core::endpoint::Endpoint): pending calls, timers, callbacks; the service actors | `disconnect`, or the connection is lost for good |
//! | [`service`] | [`ServiceActor`] | the running handler futures of one registered service | the service is unregistered or the registry stops |
//! | [`generator`] | [`GeneratorActor`] | one local `Stream` exported to a peer as a remote generator | exhausted, closed by the peer, or its session entries are gone (caller left, session collected, disconnect) |
//! | [`interface`] | [`InterfaceActor`] | the running member calls of one `_rintf` object | its `_rintf_` services are gone (`_dispose`, the peer left, unregistered, disconnect) and the user dropped it |
//! | [`events`] | (a shared hub) | per-subscriber bounded queues of event messages | `disconnect` |
//! | [`codec`] | (functions) | serde <-> [`Value`] conversion and argument binding | |
//! | [`backoff`] | (state machine) | reconnection delays, jitter, flap control, the attempt limit | |
//! | [`wscodec`] | (codec) | websocket framing: packages written from their parts, masked in place | |
//!
//! Data path of a call: the user's task converts its arguments with [`codec`], sends
//! [`Call`] to the registry (bounded mailbox: the send waits when it is full), the
//! registry has the endpoint encode and chunk the package and pushes the frames into the
//! connection's bounded outbound channel; the reply frames come back through the
//! connection's bounded inbound channel, the endpoint settles the call, and the registry
//! completes the caller's oneshot.
//!
//! Why the codec is not an actor: the endpoint's encoding registers callbacks in its
//! session table and its decoding needs the call's session context, so the `_rtype` and
//! msgpack work must stay with the endpoint. What can move, the serde conversion of user
//! types, already runs outside the registry: in the caller's task and in the service actor
//! running the handler. The large-payload work a codec actor would have taken off this
//! thread is gone instead: calls are encoded as a rope whose big `bin` payloads are
//! referenced, so a large call's chunks are slices of the caller's array
//! (`hypha_core::msgpack::Rope`). See `codec.rs`.

use std::sync::Arc;
use std::time::Duration;

use hypha_core::session::CallError;
use hypha_core::{ErrorValue, Map, RemoteMethod, Value};
use tokio::sync::oneshot;

pub mod backoff;
pub mod codec;
pub mod connection;
pub mod data;
pub mod events;
pub mod generator;
pub mod interface;
pub mod service;
pub mod session_registry;
pub mod wscodec;

pub use backoff::{Backoff, BackoffConfig};
pub use connection::{ConnectOptions, ConnectionActor, ConnectionInfo, ConnectionStats, Generation};
pub use events::{EventHub, DEFAULT_EVENT_BUFFER};
pub use generator::{GeneratorActor, ItemStream};
pub use interface::InterfaceActor;
pub use service::{DynFunction, Invocation, LocalHandler, ServiceActor};
pub use session_registry::{RegistryStats, SessionRegistry};

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Everything that can go wrong in the client runtime.
///
/// The `Display` texts are upstream's where upstream has one: a remote error carries the
/// peer's message verbatim (e.g. the Python server's `KeyError: "Service not found: ..."`),
/// local call failures carry the core's [`CallError`] texts ("Method call timed out: ...",
/// "Connection lost: ...", "RPC connection closed").
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The websocket could not be opened.
    #[error("Failed to connect to {url}: {message}")]
    Connect {
        /// The websocket URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The server answered the handshake with an `error` frame (Python raises
    /// `ConnectionAbortedError` with this message).
    #[error("{0}")]
    ConnectionAborted(String),
    /// The first text frame was neither `connection_info` nor `error`.
    #[error("Unexpected message received from the server: {0}")]
    UnexpectedMessage(String),
    /// The server put us in another workspace than the one requested (upstream's text).
    #[error("Connected to the wrong workspace: {actual}, expected: {requested}")]
    WrongWorkspace {
        /// What we asked for.
        requested: String,
        /// What `connection_info` said.
        actual: String,
    },
    /// No `connection_info` within the handshake timeout.
    #[error("Timed out waiting for connection_info after {0:?}")]
    HandshakeTimeout(Duration),
    /// The peer rejected the call: its message and trace, as sent.
    #[error("{message}")]
    Remote {
        /// `_rvalue` of the error: the peer's text.
        message: String,
        /// `_rtrace`, when the peer sent one.
        trace: Option<String>,
    },
    /// The call ended locally (timeout, connection lost, closed, peer gone).
    #[error(transparent)]
    Call(#[from] CallError),
    /// The endpoint refused to start the call (encoding failed, closed, ...).
    #[error("{0}")]
    Protocol(String),
    /// A value did not convert to or from the requested Rust type.
    #[error("{0}")]
    Convert(String),
    /// A user handler failed (its error's `Display` text).
    #[error("{0}")]
    Handler(String),
    /// An argument did not bind to the function's parameters.
    #[error("{0}")]
    Arguments(String),
    /// A member that the remote service does not have, or a value that is not callable.
    #[error("{0}")]
    NotFound(String),
    /// A bounded queue was full and the overflow policy is to refuse.
    #[error("{0} is overloaded")]
    Overloaded(String),
    /// The client was disconnected (upstream's text for calls after `disconnect()`).
    #[error("Connection is closed")]
    Closed,
    /// The configuration is unusable.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl Error {
    /// The remote message when this is an error the peer sent.
    pub fn remote_message(&self) -> Option<&str> {
        match self {
            Error::Remote { message, .. } => Some(message),
            _ => None,
        }
    }

    /// This error as the value a `reject` carries to the caller.
    pub fn to_error_value(&self) -> ErrorValue {
        match self {
            Error::Remote { message, trace } => ErrorValue { message: message.clone(), trace: trace.clone() },
            other => ErrorValue::new(other.to_string()),
        }
    }
}

impl From<ErrorValue> for Error {
    fn from(e: ErrorValue) -> Self {
        Error::Remote { message: e.message, trace: e.trace }
    }
}

impl From<hypha_core::serde_value::SerdeError> for Error {
    fn from(e: hypha_core::serde_value::SerdeError) -> Self {
        Error::Convert(e.to_string())
    }
}

impl From<actix::MailboxError> for Error {
    fn from(_: actix::MailboxError) -> Self {
        Error::Closed
    }
}

/// The result of one call, as the registry hands it to the caller.
pub type CallResult = Result<Value, Error>;

// ---------------------------------------------------------------------------------------
// Messages to the session registry
// ---------------------------------------------------------------------------------------

/// Calls a remote method (a descriptor from a service or an argument). The result goes to
/// `reply`; the message itself only reports whether the call could be started.
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct Call {
    /// What to call; shared, as a service's descriptors are called again and again.
    pub method: Arc<RemoteMethod>,
    /// Positional arguments, in decoded form (local functions become callbacks).
    pub args: Vec<Value>,
    /// Keyword arguments (`with_kwargs`).
    pub kwargs: Option<Map>,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<CallResult>,
}

/// Calls `services.default.<method>` on the workspace manager (`*/<manager_id>`).
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct CallManager {
    /// The manager function, e.g. `register_service`.
    pub method: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Option<Map>,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<CallResult>,
}

/// Stores a local service in the endpoint and starts its service actor. Returns the
/// service info to send to the manager (`ServiceInfo::from_service`).
#[derive(actix::Message)]
#[rtype(result = "Result<hypha_core::schema::ServiceInfo, Error>")]
pub struct AddService {
    /// The service map: metadata and members, functions as local handlers.
    pub api: Map,
    /// Replace a local service with the same id (upstream's `overwrite`).
    pub overwrite: bool,
}

/// Removes a local service and stops its actor (its running calls are abandoned).
#[derive(actix::Message)]
#[rtype(result = "Result<hypha_core::session::RemovedService, Error>")]
pub struct RemoveService {
    /// Short or full service id.
    pub id: String,
}

/// The service info of a local service (used for the built-in service at bootstrap).
#[derive(actix::Message)]
#[rtype(result = "Result<hypha_core::schema::ServiceInfo, Error>")]
pub struct LocalServiceInfo {
    /// Short service id.
    pub id: String,
}

/// A handler finished: answer the incoming call `call_id`.
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct Reply {
    /// The registry's id of the running call.
    pub call_id: u64,
    /// The handler's result.
    pub result: Result<Value, ErrorValue>,
}

/// Handlers were dropped without finishing (their service actor stopped): forget the
/// calls so they stop heartbeating; their callers time out, as upstream's do.
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct Abandon {
    /// The registry's ids of the running calls.
    pub call_ids: Vec<u64>,
}

/// User disconnect: reject pending calls with "RPC connection closed", stop every service
/// actor, close the socket with 1000, stop.
#[derive(actix::Message)]
#[rtype(result = "Option<actix::Addr<ConnectionActor>>")]
pub struct Disconnect;

/// Where the client's connection stands, as the registry publishes it (a `watch`
/// channel: [`GetState`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Before the first generation attached.
    Connecting,
    /// A generation is attached and, after a reconnection, its services are registered
    /// again.
    Connected(connection::Generation),
    /// The socket dropped (the reason) and the connection actor is reconnecting; calls
    /// wait.
    Reconnecting(String),
    /// The connection is gone for good (disabled, refused or gave up): calls fail with
    /// `Connection lost: <reason>`.
    Lost(String),
    /// `disconnect()` ran (or the registry stopped).
    Closed,
}

/// Subscribes to the connection state.
#[derive(actix::Message)]
#[rtype(result = "tokio::sync::watch::Receiver<ConnectionState>")]
pub struct GetState;

/// What the registry holds right now (tests: "nothing left behind").
#[derive(actix::Message)]
#[rtype(result = "RegistryStats")]
pub struct GetStats;

/// Changes the endpoint's custom codecs (spec §5.7): the closure runs on the registry,
/// where encoding and decoding happen. Later calls see the change; calls already encoded
/// are not affected.
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct RegisterCodec(pub Box<dyn FnOnce(&mut hypha_core::CodecRegistry) + Send>);
