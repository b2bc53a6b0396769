//! Generator actors: one per live local stream exported to a peer (spec §6).
//!
//! A service function (or a callback) that returns a Rust `Stream` hands it to
//! [`local_generator`], which starts a [`GeneratorActor`] owning the stream and returns a
//! [`Value::Generator`] whose opaque core handle is a [`GeneratorHandle`] (the actor's
//! address). Encoding that value into a reply stores the handle in the reply session
//! (`S[oid]` and `S[oid:close]`); the peer then pulls items one call at a time:
//!
//! ```text
//! peer: S.oid()        -> endpoint: Event::GeneratorNext -> registry -> Pull -> actor
//! actor: stream.next() -> Reply { item | stop_iteration | error } -> registry -> endpoint
//! ```
//!
//! Pulls are answered strictly in order, one at a time: the actor awaits the stream inside
//! [`ActorContext::wait`](actix::AsyncContext::wait), so a second pull queues in the
//! mailbox until the first is answered. The stream is never polled ahead of the peer's
//! request: there is no read-ahead buffer, and the back-pressure is the consumer's.
//!
//! # End of life
//!
//! The stream is dropped (so any clean-up in its `Drop`, the analogue of a Python
//! generator's `finally`, runs) exactly when the actor stops, which happens when:
//!
//! * **exhausted**: the stream ends; the actor answers `stop_iteration`, the endpoint
//!   removes both session entries, and the actor stops;
//! * **closed by the peer**: `S.oid:close` arrives
//!   ([`Event::GeneratorClose`](hypha_core::endpoint::Event::GeneratorClose)); the endpoint has already answered
//!   and removed the entries, the registry sends [`CloseGenerator`];
//! * **caller gone, session collected, connection closed**: the endpoint drops the session
//!   entries (the peer's `client_disconnected`, the session sweep, `disconnect()`), which
//!   drops the last [`GeneratorHandle`]; an actor without addresses stops by itself once
//!   it has no pull in progress;
//! * **never sent**: the value was dropped before it was encoded (the handler failed
//!   later, the call was abandoned): same as above.
//!
//! After a stream yields an error, the error is the answer to that pull and the stream is
//! dropped; a later pull gets `stop_iteration`, as a Python generator that raised is
//! exhausted. A stream that panics is treated like one that yielded an error.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::prelude::*;
use futures_util::stream::LocalBoxStream;
use futures_util::{FutureExt, StreamExt};
use hypha_core::endpoint::ReplyTo;
use hypha_core::{ErrorValue, Generator, Handler as CoreHandler, LocalGenerator, Value};

use super::session_registry::SessionRegistry;
use super::{Error, Reply};

/// Pulls waiting in a generator's mailbox before more are refused. A well-behaved peer
/// has one pull in flight per generator; the slack absorbs a close racing a pull.
const MAILBOX: usize = 16;

/// The items of a local stream, converted to values: what [`local_generator`] takes.
pub type ItemStream = LocalBoxStream<'static, Result<Value, Error>>;

/// Our value inside a core [`Handler`](hypha_core::Handler) for a [`LocalGenerator`]:
/// the address of the actor that owns the stream. The endpoint's session entries hold it;
/// when they go, the actor goes.
pub struct GeneratorHandle {
    /// The actor.
    pub addr: Addr<GeneratorActor>,
}

/// Answer the next pull of the peer: the registry's id of the `next` call.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Pull {
    /// The registry's id of the running `next` call.
    pub call_id: u64,
    /// Where the answer goes.
    pub registry: Addr<SessionRegistry>,
}

/// The peer closed the generator early: drop the stream and stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseGenerator;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Owns one local stream. See the module documentation.
pub struct GeneratorActor {
    /// For logs.
    id: u64,
    /// `None` while a pull is in progress (the future owns it) and after the end.
    stream: Option<ItemStream>,
    /// The stream ended, failed or was closed: pulls get `stop_iteration`.
    ended: bool,
    /// Items handed out, for logs.
    items: u64,
}

impl Actor for GeneratorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        tracing::debug!(generator = self.id, "generator actor started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // Dropping the stream runs the producer's clean-up.
        self.stream = None;
        tracing::debug!(generator = self.id, items = self.items, "generator actor stopped");
    }
}

impl Handler<Pull> for GeneratorActor {
    type Result = ();

    fn handle(&mut self, msg: Pull, ctx: &mut Context<Self>) {
        let Pull { call_id, registry } = msg;
        let Some(mut stream) = self.stream.take().filter(|_| !self.ended) else {
            registry.do_send(Reply { call_id, result: Ok(Value::stop_iteration()) });
            ctx.stop();
            return;
        };
        let next = async move {
            let item = AssertUnwindSafe(stream.next()).catch_unwind().await;
            (stream, item)
        };
        ctx.wait(next.into_actor(self).map(move |(stream, item), act, ctx| {
            let result = match item {
                Ok(Some(Ok(value))) => {
                    act.items += 1;
                    act.stream = Some(stream);
                    Ok(value)
                }
                Ok(Some(Err(e))) => {
                    tracing::debug!(generator = act.id, error = %e, "local generator failed");
                    act.ended = true;
                    Err(e.to_error_value())
                }
                Ok(None) => {
                    act.ended = true;
                    ctx.stop();
                    Ok(Value::stop_iteration())
                }
                Err(panic) => {
                    let text = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".to_owned());
                    tracing::error!(generator = act.id, panic = %text, "a local generator panicked");
                    act.ended = true;
                    Err(ErrorValue::new(format!("generator panicked: {text}")))
                }
            };
            registry.do_send(Reply { call_id, result });
        }));
    }
}

impl Handler<CloseGenerator> for GeneratorActor {
    type Result = ();

    fn handle(&mut self, _: CloseGenerator, ctx: &mut Context<Self>) {
        self.ended = true;
        self.stream = None;
        ctx.stop();
    }
}

/// Starts an actor for `stream` on the current arbiter and returns the value to send: a
/// local generator the endpoint exports as `_rtype: "generator"`.
///
/// Fails when the current thread runs no actix arbiter (the actor needs one); service
/// handlers and callbacks always run on one.
pub fn local_generator(stream: ItemStream) -> Result<Value, Error> {
    if actix_rt::Arbiter::try_current().is_none() {
        return Err(Error::Config(
            "a generator must be created on a thread that runs an actix arbiter (inside a handler or \
             the client's System)"
                .into(),
        ));
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let addr = GeneratorActor { id, stream: Some(stream), ended: false, items: 0 }.start();
    let handler = CoreHandler::new(GeneratorHandle { addr });
    Ok(Value::Generator(Box::new(Generator::Local(LocalGenerator { handler }))))
}

/// The registry's side of [`Event::GeneratorNext`](hypha_core::endpoint::Event):
/// track the call and hand the pull to the generator's actor.
pub(super) fn on_next(
    registry: &mut SessionRegistry,
    ctx: &mut Context<SessionRegistry>,
    handler: CoreHandler,
    reply: ReplyTo,
) {
    let call_id = registry.track_running(reply);
    let Some(handle) = handler.downcast_ref::<GeneratorHandle>() else {
        let error = ErrorValue::new("the generator has no Rust stream");
        registry.finish(call_id, Err(error));
        return;
    };
    if let Err(e) = handle.addr.try_send(Pull { call_id, registry: ctx.address() }) {
        let error = match e {
            SendError::Full(_) => Error::Overloaded("generator".into()),
            SendError::Closed(_) => Error::Protocol("the generator is closed".into()),
        };
        registry.finish(call_id, Err(error.to_error_value()));
    }
}

/// The registry's side of [`Event::GeneratorClose`](hypha_core::endpoint::Event): the
/// endpoint already answered the peer and removed the entries; stop the actor.
pub(super) fn on_close(handler: &CoreHandler) {
    if let Some(handle) = handler.downcast_ref::<GeneratorHandle>() {
        handle.addr.do_send(CloseGenerator);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    struct DropFlag(Arc<AtomicUsize>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The endpoint dropping a generator's entries (caller gone, session collected,
    /// disconnect) drops the last handle: the actor stops and the stream is dropped.
    #[actix_rt::test]
    async fn dropping_the_last_handle_drops_the_stream() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let guard = DropFlag(dropped.clone());
        let stream = futures_util::stream::iter(0..).map(move |i: i64| {
            let _held = &guard;
            Ok::<_, Error>(Value::from(i))
        });
        let value = local_generator(stream.boxed_local()).expect("generator");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 0, "alive while the value exists");
        drop(value);
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) == 1 {
                return;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the stream was not dropped");
    }

    #[test]
    fn no_arbiter_is_an_error() {
        let err = local_generator(futures_util::stream::empty().boxed_local()).expect_err("no arbiter");
        assert!(matches!(err, Error::Config(_)), "{err:?}");
    }
}
