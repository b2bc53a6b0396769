//! Service actors: one per registered service, running its handlers.
//!
//! The endpoint only knows a function by its opaque [`Handler`](hypha_core::Handler);
//! ours is a [`LocalHandler`]: the type-erased user function and the service it belongs
//! to. When a peer calls it, the registry sends [`Run`] to the service's actor, which
//! runs the handler future in its own context (handlers of one service run concurrently)
//! and sends the result back as a [`Reply`]. Callbacks (functions passed as arguments)
//! have no service: the registry runs them itself, with the same guard.
//!
//! A handler that returns an error, or panics, becomes a `reject` with its text: a user
//! bug never takes the client down. Stopping the actor (unregistering the service) drops
//! the running futures and tells the registry to abandon their calls.

// Keyed by the registry's call ids, touched twice per call: foldhash, not SipHash.
use foldhash::{HashMap, HashMapExt};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use hypha_core::{ErrorValue, Function, Handler as CoreHandler, LocalFunction, Map, Value};

use super::session_registry::SessionRegistry;
use super::{Abandon, Error, Reply};

/// A user function with its arguments bound and results converted: what every typed
/// handler is erased to. The future may be `!Send`: it runs on the actor's thread.
pub type DynFunction = Arc<dyn Fn(Invocation) -> LocalBoxFuture<'static, Result<Value, Error>> + Send + Sync>;

/// One call of a local function, as the endpoint decoded it.
pub struct Invocation {
    /// Positional arguments (remote functions in them are callable descriptors).
    pub args: Vec<Value>,
    /// Keyword arguments, when the caller sent `with_kwargs`.
    pub kwargs: Option<Map>,
    /// The caller's context (spec §2.5), when the service requires it.
    pub context: Option<Map>,
    /// The registry, to call functions received in the arguments.
    pub registry: Addr<SessionRegistry>,
}

/// Our value inside a core [`Handler`](hypha_core::Handler).
pub struct LocalHandler {
    /// The service the function belongs to; `None` for a callback.
    pub service: Option<String>,
    /// The function.
    pub func: DynFunction,
}

impl LocalHandler {
    /// The function as a value to put into a service map or an argument list:
    /// encoding it makes it a service member or a session callback.
    pub fn into_value(self, name: Option<String>, doc: Option<String>, schema: Option<Value>) -> Value {
        let lf = LocalFunction {
            handler: CoreHandler::new(self),
            name,
            doc,
            schema: schema.map(std::sync::Arc::new),
        };
        Value::Function(Box::new(Function::Local(lf)))
    }
}

/// Runs a handler, turning its error or panic into the error value the caller gets.
pub async fn run_guarded(func: DynFunction, invocation: Invocation) -> Result<Value, ErrorValue> {
    let future = match std::panic::catch_unwind(AssertUnwindSafe(|| func(invocation))) {
        Ok(f) => f,
        Err(panic) => return Err(panic_error(panic)),
    };
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_error_value()),
        Err(panic) => Err(panic_error(panic)),
    }
}

fn panic_error(panic: Box<dyn std::any::Any + Send>) -> ErrorValue {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    tracing::error!(panic = %text, "a service handler panicked");
    ErrorValue::new(format!("handler panicked: {text}"))
}

/// Run one function call of this service.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Run {
    /// The registry's id of the call.
    pub call_id: u64,
    /// The function.
    pub func: DynFunction,
    /// Its arguments.
    pub invocation: Invocation,
}

/// Stop: the service was unregistered or the client disconnected.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// Runs the handlers of one service. See the module documentation.
pub struct ServiceActor {
    /// The short service id, for logs and errors.
    id: String,
    /// Where results go.
    registry: Addr<SessionRegistry>,
    /// Running calls, to abandon them when the actor stops.
    running: HashMap<u64, SpawnHandle>,
    /// Overflow policy: beyond this many running calls, new calls are rejected.
    max_running: usize,
    /// Mailbox size (the registry uses `try_send`; a full mailbox rejects the call).
    mailbox: usize,
}

impl ServiceActor {
    /// An actor for service `id`.
    pub fn new(
        id: impl Into<String>,
        registry: Addr<SessionRegistry>,
        max_running: usize,
        mailbox: usize,
    ) -> Self {
        Self { id: id.into(), registry, running: HashMap::new(), max_running, mailbox }
    }
}

impl Actor for ServiceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox);
        tracing::debug!(service = %self.id, "service actor started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if !self.running.is_empty() {
            let call_ids: Vec<u64> = self.running.drain().map(|(id, _)| id).collect();
            tracing::debug!(service = %self.id, calls = call_ids.len(), "abandoning running calls");
            self.registry.do_send(Abandon { call_ids });
        }
        tracing::debug!(service = %self.id, "service actor stopped");
    }
}

impl Handler<Run> for ServiceActor {
    type Result = ();

    fn handle(&mut self, msg: Run, ctx: &mut Context<Self>) {
        let Run { call_id, func, invocation } = msg;
        if self.running.len() >= self.max_running {
            let error = Error::Overloaded(format!("service {}", self.id));
            self.registry.do_send(Reply { call_id, result: Err(error.to_error_value()) });
            return;
        }
        let handle = ctx.spawn(run_guarded(func, invocation).into_actor(self).map(move |result, act, _| {
            act.running.remove(&call_id);
            act.registry.do_send(Reply { call_id, result });
        }));
        self.running.insert(call_id, handle);
    }
}

impl Handler<Stop> for ServiceActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
