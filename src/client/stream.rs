//! Generators (spec §6) in both directions.
//!
//! * **Rust produces.** A service function or a callback returns [`generator`]`(stream)`:
//!   the caller sees a remote (async) generator, pulls items one call at a time, and may
//!   stop early. The stream lives in an actor of its own until it is exhausted, closed by
//!   the caller, or the caller is gone (see `hypha_actors::client::generator`). An `Err`
//!   item becomes the exception the caller's iteration raises.
//! * **Rust consumes.** A remote generator (from a Python `def gen(): yield ...`, a JS
//!   async generator, or another Rust client) is a [`RemoteGenerator`], a
//!   `futures::Stream` of `Result<Value, Error>`; [`RemoteGenerator::typed`] converts the
//!   items. Stopping early ([`RemoteGenerator::close`], or just dropping it) tells the
//!   producer to close its generator, as Python's `aclose()` does.
//!
//! ```no_run
//! use futures_util::{stream, StreamExt};
//! use hypha_rpc::client::{generator, Error, Service};
//!
//! // A service function returning a stream of 0..n.
//! let service = Service::builder("counter")
//!     .function("count", |n: u32| async move {
//!         generator(stream::iter((0..n).map(Ok::<_, Error>)))
//!     })
//!     .build();
//!
//! # async fn consume(svc: hypha_rpc::client::RemoteService) -> Result<(), Error> {
//! // Consuming it (or a Python generator) from Rust.
//! let mut items = svc.call_generator("count", vec![5.into()]).await?.typed::<u32>();
//! while let Some(item) = items.next().await {
//!     println!("{}", item?);
//! }
//! # Ok(()) }
//! ```

use std::fmt::Display;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use actix::Addr;
use futures_util::{FutureExt, Stream, StreamExt};
use hypha_actors::client::{codec, generator as actor, Call, Error, SessionRegistry};
use hypha_core::endpoint::{generator_close_method, generator_next_method};
use hypha_core::{Generator, RemoteMethod, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use super::remote::{call_remote, post_call, Posted};
use super::service::{ArgCursor, FromArg};

/// Turns a Rust stream into a value a peer receives as a remote generator: return it from
/// a service function or a callback (or pass it as an argument).
///
/// Items are converted with serde (a [`Value`] item is sent as is); an `Err` item is sent
/// as the error the consumer's iteration raises, and ends the generator. The stream is
/// polled only when the consumer asks for the next item, and dropped when the generator
/// ends, is closed by the consumer, or the consumer goes away, so clean-up code in its
/// `Drop` runs like a Python generator's `finally`.
///
/// Fails when the current thread runs no actix arbiter; handlers always run on one.
pub fn generator<S, T, E>(stream: S) -> Result<Value, Error>
where
    S: Stream<Item = Result<T, E>> + 'static,
    T: Serialize + 'static,
    E: Display + 'static,
{
    let items = stream.map(|item| match item {
        Ok(v) => codec::to_value(v),
        Err(e) => Err(Error::Handler(e.to_string())),
    });
    actor::local_generator(items.boxed_local())
}

enum State {
    /// No pull in flight.
    Idle,
    /// Waiting for the producer's answer to one pull.
    Pulling(Posted),
    /// Exhausted, failed or closed: the producer was told (or needs no telling).
    Done,
}

/// A generator owned by a peer, consumed as a `Stream` of its items. `Send`; see the
/// module documentation.
///
/// Each `next()` is one call to the producer (the next item is requested only when the
/// previous one was taken). The stream ends at the producer's `stop_iteration`; a failed
/// pull (the producer raised, the connection dropped, the call timed out) yields one
/// `Err` and ends it. Ending it in any way but exhaustion sends the producer a `close`,
/// once: on error, on [`RemoteGenerator::close`], and on drop.
pub struct RemoteGenerator {
    descriptor: hypha_core::RemoteGenerator,
    /// The pull call, built once: every item is a call to the same method.
    next: Arc<RemoteMethod>,
    registry: Addr<SessionRegistry>,
    state: State,
}

impl std::fmt::Debug for RemoteGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteGenerator")
            .field("target", &self.descriptor.target)
            .field("method", &self.descriptor.method)
            .field("done", &matches!(self.state, State::Done))
            .finish()
    }
}

impl RemoteGenerator {
    /// A generator from a received value (`_rtype: "generator"`).
    pub(crate) fn from_value(value: Value, registry: Addr<SessionRegistry>) -> Result<Self, Error> {
        match value {
            Value::Generator(g) => match *g {
                Generator::Remote(descriptor) => {
                    let next = Arc::new(generator_next_method(&descriptor));
                    Ok(Self { descriptor, next, registry, state: State::Idle })
                }
                Generator::Local(_) => {
                    Err(Error::Convert("the value is a local generator, not a remote one".into()))
                }
            },
            other => Err(Error::Convert(format!("expected a generator, got {}", other.kind()))),
        }
    }

    /// The descriptor (`_rtarget`, `_rmethod`, `_rclose_method`).
    pub fn descriptor(&self) -> &hypha_core::RemoteGenerator {
        &self.descriptor
    }

    /// Whether the stream has ended (exhausted, failed or closed).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Converts every item into `T` (a conversion failure is an `Err` item, and the
    /// stream goes on).
    pub fn typed<T: DeserializeOwned + 'static>(self) -> TypedGenerator<T> {
        TypedGenerator { inner: self, _item: PhantomData }
    }

    /// Stops early: tells the producer to close its generator (Python `aclose()`) and
    /// waits for its acknowledgement, whose outcome does not matter (upstream ignores it).
    /// Later `next()` calls return `None`. A no-op when the stream already ended.
    pub async fn close(&mut self) {
        if matches!(std::mem::replace(&mut self.state, State::Done), State::Done) {
            return;
        }
        let method = Arc::new(generator_close_method(&self.descriptor));
        if let Err(e) = call_remote(&self.registry, method, Vec::new(), None).await {
            tracing::debug!(error = %e, "closing a remote generator failed (ignored)");
        }
    }

    /// Fire-and-forget close (on error and on drop).
    fn send_close(&self) {
        let (reply, _) = oneshot::channel();
        let method = Arc::new(generator_close_method(&self.descriptor));
        self.registry.do_send(Call { method, args: Vec::new(), kwargs: None, reply });
    }
}

impl Stream for RemoteGenerator {
    type Item = Result<Value, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let result = loop {
            match &mut self.state {
                State::Done => return Poll::Ready(None),
                State::Idle => match post_call(&self.registry, self.next.clone(), Vec::new(), None) {
                    Ok(posted) => self.state = State::Pulling(posted),
                    Err(e) => break Err(e),
                },
                State::Pulling(posted) => match posted.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => break r,
                },
            }
        };
        Poll::Ready(match result {
            Ok(v) if v.is_stop_iteration() => {
                self.state = State::Done;
                None
            }
            Ok(v) => {
                self.state = State::Idle;
                Some(Ok(v))
            }
            Err(e) => {
                self.state = State::Done;
                self.send_close();
                Some(Err(e))
            }
        })
    }
}

impl Drop for RemoteGenerator {
    /// Dropped before the end: the producer closes its generator (and runs its clean-up)
    /// instead of keeping it until its session is collected.
    fn drop(&mut self) {
        if !matches!(self.state, State::Done) {
            self.send_close();
        }
    }
}

impl FromArg for RemoteGenerator {
    fn from_arg(cursor: &mut ArgCursor) -> Result<Self, Error> {
        let value = cursor.next_positional();
        let registry = cursor.registry().clone();
        RemoteGenerator::from_value(value, registry).map_err(|e| cursor.error(e))
    }
}

/// A [`RemoteGenerator`] whose items are converted to `T`. See
/// [`RemoteGenerator::typed`].
pub struct TypedGenerator<T> {
    inner: RemoteGenerator,
    _item: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for TypedGenerator<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TypedGenerator").field(&self.inner).finish()
    }
}

impl<T> TypedGenerator<T> {
    /// Stops early (see [`RemoteGenerator::close`]).
    pub async fn close(&mut self) {
        self.inner.close().await;
    }

    /// The untyped generator.
    pub fn into_inner(self) -> RemoteGenerator {
        self.inner
    }
}

impl<T: DeserializeOwned + 'static> Stream for TypedGenerator<T> {
    type Item = Result<T, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx).map(|item| item.map(|r| r.and_then(codec::from_value)))
    }
}
