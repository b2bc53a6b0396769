//! Events: messages that are not RPC calls (spec §2.4), delivered to local subscribers.
//!
//! The server broadcasts workspace events (`service_added`, `client_connected`, ...) to
//! the connections that subscribed to them with the manager's `subscribe`, and delivers
//! custom events (`emit({"type": X, "to": ...})`) from other clients. The endpoint hands
//! each one to the registry as an event message (`extra` merged into `main`), and the
//! registry gives it to the [`EventHub`], which fans it out by `type` to the subscribers
//! of that type, as the Python client's `on(type, handler)` does.
//!
//! # Buffering and overflow policy
//!
//! Every subscriber has its own bounded queue (its capacity is chosen at subscription).
//! The registry never waits for a subscriber: when a queue is full the new event is
//! **dropped for that subscriber only**, its drop counter ([`Counters::dropped`])
//! grows, and a warning is logged on the first drop of a run of drops. Slow handlers thus
//! lose events instead of stalling RPC traffic or growing memory without bound; other
//! subscribers and calls are unaffected. Order is preserved for the events a subscriber
//! does receive. A subscriber whose receiver is gone is removed on the next event.
//! When the client disconnects, every queue is closed: streams end after their buffered
//! events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use actix::prelude::*;
use hypha_core::{Map, Value};
use tokio::sync::mpsc;

use super::session_registry::SessionRegistry;
use super::Error;

/// Default queue capacity of a subscriber.
pub const DEFAULT_EVENT_BUFFER: usize = 256;

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Map>,
    counters: Arc<Counters>,
}

/// A subscriber's counters, shared with its [`Subscription`].
#[derive(Debug, Default)]
pub struct Counters {
    dropped: AtomicU64,
    /// The last event was dropped (to warn once per run of drops).
    overflowing: AtomicBool,
}

#[derive(Default)]
struct HubState {
    by_type: HashMap<String, Vec<Subscriber>>,
    next_id: u64,
    closed: bool,
}

/// The subscribers of one client, by event type. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct EventHub {
    state: Arc<Mutex<HubState>>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        let counts: HashMap<&str, usize> = state.by_type.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
        f.debug_struct("EventHub").field("subscribers", &counts).field("closed", &state.closed).finish()
    }
}

/// One subscription: its receiving end and counters. Dropping the receiver ends it.
#[derive(Debug)]
pub struct Subscription {
    /// The event type.
    pub event: String,
    /// The subscription's id (for [`EventHub::unsubscribe`]).
    pub id: u64,
    /// The queue.
    pub rx: mpsc::Receiver<Map>,
    /// Drop counters.
    pub counters: Arc<Counters>,
}

impl Counters {
    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl EventHub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscribes to events of type `event` with a queue of `capacity` (at least 1).
    pub fn subscribe(&self, event: &str, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        if !state.closed {
            let sub = Subscriber { id, tx, counters: counters.clone() };
            state.by_type.entry(event.to_owned()).or_default().push(sub);
        }
        Subscription { event: event.to_owned(), id, rx, counters }
    }

    /// Removes one subscription; its stream ends after what it buffered.
    pub fn unsubscribe(&self, event: &str, id: u64) -> bool {
        let mut state = self.lock();
        let Some(subs) = state.by_type.get_mut(event) else { return false };
        let before = subs.len();
        subs.retain(|s| s.id != id);
        let removed = subs.len() != before;
        if subs.is_empty() {
            state.by_type.remove(event);
        }
        removed
    }

    /// Removes every subscription of `event`, or all of them (Python's `off()`).
    pub fn clear(&self, event: Option<&str>) {
        let mut state = self.lock();
        match event {
            Some(e) => {
                state.by_type.remove(e);
            }
            None => state.by_type.clear(),
        }
    }

    /// Subscribers of `event` right now.
    pub fn subscriber_count(&self, event: &str) -> usize {
        self.lock().by_type.get(event).map_or(0, Vec::len)
    }

    /// Delivers an event message to the subscribers of its `type` (see the overflow
    /// policy in the module documentation). Returns how many queues took it.
    pub fn dispatch(&self, message: &Map) -> usize {
        let Some(kind) = message.get("type").and_then(Value::as_str) else { return 0 };
        let mut state = self.lock();
        let Some(subs) = state.by_type.get_mut(kind) else { return 0 };
        let mut delivered = 0;
        subs.retain(|s| match s.tx.try_send(message.clone()) {
            Ok(()) => {
                s.counters.overflowing.store(false, Ordering::Relaxed);
                delivered += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                s.counters.dropped.fetch_add(1, Ordering::Relaxed);
                if !s.counters.overflowing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(event = %kind, subscription = s.id, "event queue full: dropping events");
                }
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if subs.is_empty() {
            state.by_type.remove(kind);
        }
        delivered
    }

    /// The client is gone: close every queue; later subscriptions end at once.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.by_type.clear();
    }
}

/// Sends an event package (`rpc.emit`, spec §2.4): `main` must have a string `type`;
/// with `to` (`"*"`, a client id) it goes through the server, without `to` it is only
/// delivered to the local subscribers.
#[derive(Message)]
#[rtype(result = "Result<(), Error>")]
pub struct Emit {
    /// The main segment.
    pub main: Map,
    /// An optional extra segment.
    pub extra: Option<Map>,
}

impl Handler<Emit> for SessionRegistry {
    type Result = Result<(), Error>;

    fn handle(&mut self, msg: Emit, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(e) = self.refuse() {
            return Err(e);
        }
        if msg.main.get("type").and_then(Value::as_str).is_none() {
            return Err(Error::Arguments("Invalid message, must be an object with a `type` fields".into()));
        }
        self.endpoint_mut().emit_event(msg.main, msg.extra).map_err(|e| Error::Protocol(e.to_string()))?;
        self.drive(ctx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypha_core::map;

    #[test]
    fn dispatch_by_type_and_drop_when_full() {
        let hub = EventHub::default();
        let mut a = hub.subscribe("x", 2);
        let mut b = hub.subscribe("x", 8);
        let _other = hub.subscribe("y", 8);
        for i in 0..5 {
            hub.dispatch(&map! {"type" => "x", "data" => i});
        }
        // `a` kept the first two and dropped three; `b` got all five.
        assert_eq!(a.counters.dropped(), 3);
        assert_eq!(b.counters.dropped(), 0);
        assert_eq!(a.rx.try_recv().unwrap()["data"], Value::from(0));
        assert_eq!(a.rx.try_recv().unwrap()["data"], Value::from(1));
        assert!(a.rx.try_recv().is_err());
        for i in 0..5 {
            assert_eq!(b.rx.try_recv().unwrap()["data"], Value::from(i));
        }
        // A message without a type goes nowhere.
        assert_eq!(hub.dispatch(&map! {"data" => 1}), 0);
    }

    #[test]
    fn unsubscribe_and_gone_receivers_are_removed() {
        let hub = EventHub::default();
        let a = hub.subscribe("x", 2);
        let b = hub.subscribe("x", 2);
        assert!(hub.unsubscribe("x", a.id));
        assert_eq!(hub.subscriber_count("x"), 1);
        drop(b);
        assert_eq!(hub.dispatch(&map! {"type" => "x"}), 0);
        assert_eq!(hub.subscriber_count("x"), 0);
    }

    #[test]
    fn close_ends_every_queue() {
        let hub = EventHub::default();
        let mut a = hub.subscribe("x", 2);
        hub.close();
        assert!(a.rx.try_recv().is_err());
        assert!(a.rx.is_closed());
        let mut late = hub.subscribe("x", 2);
        assert!(late.rx.is_closed() || late.rx.try_recv().is_err());
        assert_eq!(hub.dispatch(&map! {"type" => "x"}), 0);
    }
}
