//! Events (spec §2.4): workspace events the server broadcasts to subscribers and custom
//! events clients send each other, as the Python client's `on`/`off`/`emit` and the
//! manager's `subscribe`/`unsubscribe` offer them.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use hypha_rpc::client::{Client, Error};
//! use hypha_rpc::core::{map, Value};
//!
//! # async fn run(client: Client) -> Result<(), Error> {
//! // Workspace events need a subscription on the server first.
//! client.subscribe(&["service_added"]).await?;
//! client.on("service_added", |event| async move {
//!     println!("new service: {:?}", event.get("data"));
//! })?;
//!
//! // Custom events: to one client, or to every subscriber in the workspace ("*").
//! let mut greetings = client.event_stream("greeting", 16);
//! client.emit(map! {"type" => "greeting", "to" => client.client_id(), "text" => "hi"}).await?;
//! let event = greetings.next().await;
//! # Ok(()) }
//! ```
//!
//! The client also fires two local events after a reconnection, as upstream does:
//! `services_registered` (`total`, `registered`, and the ids that `failed`) once its
//! services were registered again, and `connected` (the new `connection_info`, with
//! `type: "connected"`) when all of them are back.
//!
//! Delivery is per subscriber, in order, through a bounded queue: when a subscriber falls
//! behind by more than its queue holds, newer events are dropped for it (and counted,
//! [`EventSubscription::dropped`]) rather than slowing the connection down or buffering
//! without limit. Every subscriber's stream ends when the client disconnects.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use futures_util::Stream;
use hypha_actors::client::events::{Counters, Emit, Subscription};
use hypha_actors::client::{Error, DEFAULT_EVENT_BUFFER};
use hypha_core::{Map, Value};

use super::Client;

/// A handler registered with [`Client::on`]. Pass it to [`Client::off`] to remove it.
#[derive(Clone, Debug)]
pub struct EventSubscription {
    event: String,
    id: u64,
    counters: Arc<Counters>,
}

impl EventSubscription {
    /// The event type.
    pub fn event(&self) -> &str {
        &self.event
    }

    /// Events dropped for this handler because its queue was full.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped()
    }
}

/// The events of one type, as a `Stream` of their messages (the whole map: `type`, `to`,
/// `data`, and `from` for client events). Unsubscribes on drop.
pub struct EventStream {
    sub: Subscription,
    hub: hypha_actors::client::EventHub,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").field("event", &self.sub.event).finish_non_exhaustive()
    }
}

impl EventStream {
    /// Events dropped for this stream because its queue was full.
    pub fn dropped(&self) -> u64 {
        self.sub.counters.dropped()
    }
}

impl Stream for EventStream {
    type Item = Map;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Map>> {
        self.sub.rx.poll_recv(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.sub.event, self.sub.id);
    }
}

impl Client {
    /// Runs `handler` for every event of type `event` (Python `on(event, handler)`), one
    /// at a time and in order, on the current arbiter, with a queue of
    /// [`DEFAULT_EVENT_BUFFER`] events (see the overflow policy in the module
    /// documentation). Workspace events also need [`Client::subscribe`].
    ///
    /// Fails outside an actix arbiter (the handler runs as a task on it).
    pub fn on<F, Fut>(&self, event: &str, handler: F) -> Result<EventSubscription, Error>
    where
        F: FnMut(Map) -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.on_with_buffer(event, DEFAULT_EVENT_BUFFER, handler)
    }

    /// [`Client::on`] with a queue of `capacity` events.
    pub fn on_with_buffer<F, Fut>(
        &self,
        event: &str,
        capacity: usize,
        mut handler: F,
    ) -> Result<EventSubscription, Error>
    where
        F: FnMut(Map) -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        if actix_rt::Arbiter::try_current().is_none() {
            return Err(Error::Config(
                "Client::on must be called on a thread that runs an actix arbiter".into(),
            ));
        }
        let Subscription { event, id, mut rx, counters } = self.inner.events.subscribe(event, capacity);
        let name = event.clone();
        actix_rt::spawn(async move {
            while let Some(message) = rx.recv().await {
                handler(message).await;
            }
            tracing::debug!(event = %name, "event handler ended");
        });
        Ok(EventSubscription { event, id, counters })
    }

    /// Removes a handler registered with [`Client::on`]; events it already queued are
    /// still handled. Returns whether it was registered.
    pub fn off(&self, subscription: &EventSubscription) -> bool {
        self.inner.events.unsubscribe(&subscription.event, subscription.id)
    }

    /// Removes every handler and stream of `event`, or of every event (Python `off()`).
    pub fn off_all(&self, event: Option<&str>) {
        self.inner.events.clear(event);
    }

    /// The events of type `event` as a stream with a queue of `capacity` events. Works
    /// from any thread.
    pub fn event_stream(&self, event: &str, capacity: usize) -> EventStream {
        EventStream { sub: self.inner.events.subscribe(event, capacity), hub: self.inner.events.clone() }
    }

    /// Sends an event (Python `emit`): `message` needs a string `type`; with `to` (`"*"`
    /// for every subscriber of the workspace, or a client id) it goes through the server,
    /// without `to` it is only delivered locally.
    pub async fn emit(&self, message: Map) -> Result<(), Error> {
        self.inner.registry.send(Emit { main: message, extra: None }).await?
    }

    /// Asks the server to deliver workspace or custom events of these types to us (the
    /// manager's `subscribe`): `service_added`, `service_removed`, `client_connected`, ...
    pub async fn subscribe(&self, events: &[&str]) -> Result<(), Error> {
        let list = events.iter().map(|e| Value::from(*e)).collect();
        self.call("subscribe", vec![Value::List(list)]).await.map(drop)
    }

    /// Stops the server's delivery of these event types (the manager's `unsubscribe`).
    pub async fn unsubscribe(&self, events: &[&str]) -> Result<(), Error> {
        let list = events.iter().map(|e| Value::from(*e)).collect();
        self.call("unsubscribe", vec![Value::List(list)]).await.map(drop)
    }
}
