//! The routing table and the routing rules (server spec §3.2, §3.4, §8).
//!
//! The table maps `{ws}/{cid}` to the live connection's [`Outbound`] queue, its
//! generation and its event subscriptions; beside it sits the "recently disconnected" set
//! that makes calls to a peer that just left fail fast.
//!
//! **Routing happens on the sender's connection actor, without an actor hop.** A frame is
//! routed by the actor that received it: it parses `main`, stamps it, looks the target up
//! in this table and pushes the bytes onto the target's bounded queue. Nothing in that path
//! waits: the table is a sharded [`DashMap`] (short read locks, no lock held across an
//! `await`), and [`Outbound::send`] never blocks (a full queue disconnects the slow
//! target). A central router actor would add a mailbox per frame, serialize every
//! connection's traffic through one thread, and need an overflow policy of its own; the
//! direct path keeps traffic of independent clients on independent threads and the
//! per-frame cost at one scan of `main` (never decoded, see [`RawMain`]), one copy into
//! the stamped frame and one queue push.
//!
//! **Generations.** Every registration gets a fresh generation number. A reconnect with a
//! reconnection token supersedes the live connection of the same `{ws}/{cid}`; when the
//! superseded connection later cleans up, [`Router::remove_client`] sees that the entry is
//! no longer its generation and leaves the new connection's state alone (and sends no
//! `client_disconnected`: the client did not leave).

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use foldhash::fast::RandomState as FoldState;
use foldhash::HashMap;
use hypha_core::ids::WILDCARD;
use hypha_core::message::{self, CLIENT_DISCONNECTED};
use hypha_core::msgpack::{DecodeLimits, EncodeError};
use hypha_core::package::{self, Entry, PackageError, RawMain, Stamp};
use hypha_core::value::{Map, Value};

use super::outbound::{OutFrame, Outbound, SendError};

/// A connection's registration number; see the module docs.
pub type Generation = u64;

/// Most values the router decodes from one `main` segment. `main` can carry event payloads
/// (`data`), so it is not tiny, but each decoded value costs far more memory than its
/// encoded byte; this caps that amplification at a few tens of MiB per frame.
pub const MAX_MAIN_ITEMS: usize = 1 << 20;

/// Most event types one connection may subscribe to.
pub const MAX_SUBSCRIPTIONS: usize = 1024;

/// After this many "recently disconnected" insertions the expired ones are swept.
const PRUNE_EVERY: usize = 256;

/// Extra bytes at least this long are relayed to a socket as a slice of the frame they
/// came in, after the re-stamped `main`, instead of being copied into the stamped frame:
/// every `message_cache` chunk call (256 KiB) is. Below it one copy costs less than the
/// second piece the socket writer handles.
const RELAY_SPLIT_MIN: usize = 16 * 1024;

/// Who sends a frame: what the router stamps into it.
///
/// Built once per connection (or local peer), so that the per-frame stamp is copies of
/// ready bytes: the `from`, `ws` and `user` entries are encoded here, not for every frame
/// (see [`Router::route`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSender {
    workspace: String,
    client_id: String,
    /// `{workspace}/{client_id}`, stamped as `from`.
    address: String,
    /// The encoded stamp. An encoding error (never, for a real `UserInfo`) makes every
    /// frame undecodable, as it did when the stamp was encoded per frame.
    stamp: Result<SenderStamp, EncodeError>,
    read_only: bool,
}

/// The entries [`RouteSender`] stamps into every frame.
#[derive(Debug, Clone, PartialEq)]
struct SenderStamp {
    from: Entry,
    /// `None` for the server's own peers (workspace `*`): their `ws` is the target's.
    ws: Option<Entry>,
    user: Entry,
}

impl RouteSender {
    /// The sender `{workspace}/{client_id}` with its `UserInfo` dump `user`; `read_only`
    /// when it holds exactly `r` on its workspace (it may not broadcast).
    pub fn new(
        workspace: impl Into<String>,
        client_id: impl Into<String>,
        user: &Value,
        read_only: bool,
    ) -> Self {
        let (workspace, client_id) = (workspace.into(), client_id.into());
        let address = format!("{workspace}/{client_id}");
        let stamp = (|| {
            Ok(SenderStamp {
                from: Entry::str("from", &address)?,
                ws: (workspace != WILDCARD).then(|| Entry::str("ws", &workspace)).transpose()?,
                user: Entry::new("user", user)?,
            })
        })();
        RouteSender { workspace, client_id, address, stamp, read_only }
    }

    /// The sender's workspace (`*` for the server's own manager peer).
    pub fn workspace(&self) -> &str {
        &self.workspace
    }

    /// The sender's client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// `{workspace}/{client_id}`.
    pub fn address(&self) -> &str {
        &self.address
    }
}

/// A frame the router refused; the text is the `_rvalue` of the reject sent back when the
/// frame carried a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No `to` (upstream's text here is a Python TypeError; ours says what is wrong).
    #[error("Invalid target: the message has no `to` field")]
    MissingTarget,
    /// `to` is not a string.
    #[error("Invalid target: `to` must be a string, got {0}")]
    InvalidTarget(&'static str),
    /// A read-only connection tried to broadcast (rule 2).
    #[error(
        "Read-only client {0} cannot broadcast messages. Only point-to-point messages are allowed for read-only clients."
    )]
    ReadOnlyBroadcast(String),
    /// The target left this server less than `dead_peer_ttl` ago (rule 6).
    #[error("Target peer {0} is not connected")]
    PeerNotConnected(String),
    /// The target is a local peer whose inbox is full (see [`LocalInbox`]).
    #[error("Server busy: the inbox of {0} is full")]
    LocalInboxFull(String),
}

/// Why a frame went nowhere, silently (logged at debug level by the caller).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DropReason {
    /// Not msgpack, or `main` is not a map.
    #[error("undecodable frame: {0}")]
    Undecodable(PackageError),
    /// A routing error on a frame without a session: nobody to tell.
    #[error("{0} (no session to reject)")]
    Refused(RouteError),
    /// The target never connected here (rule 8); the caller times out.
    #[error("unknown target {0}")]
    UnknownTarget(String),
    /// The target's queue was full (it is being disconnected) or closed.
    #[error("target {0} is not accepting frames: {1}")]
    TargetUnavailable(String, SendError),
    /// A local peer's inbox was full (see [`LocalInbox`]); the frame had no session.
    #[error("the inbox of {0} is full")]
    LocalOverflow(String),
}

/// What became of one routed frame.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteOutcome {
    /// Delivered to this many connections (a broadcast may reach none).
    Delivered(usize),
    /// Refused; `reject` is the synthetic `{session}.reject` call to send back on the
    /// sender's own socket.
    Rejected {
        /// The error.
        error: RouteError,
        /// The reject frame.
        reject: Bytes,
    },
    /// Dropped without an answer.
    Dropped(DropReason),
}

/// How a new connection takes its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// A plain connect: refused while a live connection holds the address.
    Fresh,
    /// A reconnect with a reconnection token: takes the address over.
    Supersede,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// A live connection holds `{ws}/{cid}` and this is not a reconnect.
    #[error("Client already exists and is active: {workspace}/{client_id}")]
    ClientExists {
        /// The workspace.
        workspace: String,
        /// The client id.
        client_id: String,
    },
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// No such connection.
    #[error("client {0} is not connected")]
    NotConnected(String),
    /// More than [`MAX_SUBSCRIPTIONS`] event types.
    #[error("too many subscriptions (at most {MAX_SUBSCRIPTIONS})")]
    TooMany,
}

/// A successful registration.
#[derive(Debug)]
pub struct Registered {
    /// This connection's generation.
    pub generation: Generation,
    /// The connection it superseded, if any; the caller drops its socket.
    pub superseded: Option<Outbound>,
}

/// Most frames waiting in a local peer's inbox (see [`LocalInbox`]); the manager's is
/// `ServerConfig::manager_inbox_frames`, this by default.
pub const LOCAL_INBOX_FRAMES: usize = 4096;

/// How long a client's connection waits for room in a full local inbox before the frame
/// is refused (see [`LocalInbox`]); the default of `ServerConfig::manager_inbox_wait`.
pub const LOCAL_INBOX_WAIT: Duration = Duration::from_secs(10);

/// The text of the reject a caller gets when a local peer's inbox is full.
pub const LOCAL_INBOX_FULL: &str = "Server busy: the workspace manager's inbox is full, retry later";

/// The inbox of a peer that lives inside the server (the workspace manager): a bounded
/// queue of routed frames, drained by that peer's actor.
///
/// **Overflow policy.** [`Router::route`] never waits: when the queue holds
/// [`LOCAL_INBOX_FRAMES`] frames the new frame is dropped; if it was a call that expects
/// an answer (it has a `session`), the caller gets a reject with [`LOCAL_INBOX_FULL`] so
/// it fails at once instead of timing out. That is what the server's own peers get.
/// A client's connection uses [`Router::route_or_hold`] instead and waits, up to
/// [`LOCAL_INBOX_WAIT`] (configurable), for room: it stops reading its socket meanwhile, so TCP slows that
/// client down and memory stays bounded by the inbox plus one frame per waiting client.
/// A burst of connects (thousands of clients starting, or reconnecting after a restart,
/// each sending its bootstrap calls to the manager at once) is then served in order
/// instead of failing clients that, like the stock ones, do not retry their bootstrap.
/// The local peer itself is never disconnected: unlike a slow client, it is the server.
#[derive(Debug, Clone)]
pub struct LocalInbox {
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

impl LocalInbox {
    /// A new inbox holding at most `frames` frames, and its receiving end.
    pub fn channel(frames: usize) -> (LocalInbox, tokio::sync::mpsc::Receiver<Bytes>) {
        let (tx, rx) = tokio::sync::mpsc::channel(frames.max(1));
        (LocalInbox { tx }, rx)
    }

    /// Queues a frame without waiting.
    pub fn send(&self, frame: Bytes) -> Result<(), SendError> {
        self.try_send(frame).map_err(|(e, _)| e)
    }

    /// [`LocalInbox::send`], giving a refused frame back with the reason: the router holds
    /// a frame a full inbox refused and retries it (see [`HeldFrame`]).
    fn try_send(&self, frame: Bytes) -> Result<(), (SendError, Bytes)> {
        self.tx.try_send(frame).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(f) => (SendError::Overflow, f),
            tokio::sync::mpsc::error::TrySendError::Closed(f) => (SendError::Closed, f),
        })
    }
}

/// Where a peer's frames go.
#[derive(Debug)]
enum Sink {
    /// A websocket client's outbound queue.
    Socket(Outbound),
    /// A peer inside the server.
    Local(LocalInbox),
}

impl Sink {
    fn send(&self, frame: Bytes) -> Result<(), SendError> {
        match self {
            Sink::Socket(o) => o.send(OutFrame::Binary(frame)),
            Sink::Local(l) => l.send(frame),
        }
    }

    fn is_closing(&self) -> bool {
        match self {
            Sink::Socket(o) => o.is_closing(),
            Sink::Local(l) => l.tx.is_closed(),
        }
    }
}

#[derive(Debug)]
struct Peer {
    generation: Generation,
    sink: Sink,
    subscriptions: HashSet<String>,
}

/// The routing table. One per server, shared by every connection actor.
#[derive(Debug)]
pub struct Router {
    /// workspace -> client id -> live connection. Two levels so a broadcast visits only
    /// its workspace.
    ///
    /// Both levels are probed for every routed frame, so they hash with foldhash (seeded
    /// per table) instead of SipHash, which cost about a tenth of the router's own work.
    /// The keys are chosen by clients, but only by authenticated ones and only as many as
    /// the connection limits admit; foldhash's per-table seed defeats precomputed
    /// collision sets, and the only indirect view of the hashes is the order in which a
    /// workspace's clients are listed.
    peers: DashMap<String, HashMap<String, Peer>, FoldState>,
    /// `{ws}/{cid}` -> when it disconnected, for the dead-peer fast fail.
    recently_disconnected: DashMap<String, Instant>,
    dead_peer_ttl: Duration,
    next_generation: AtomicU64,
    inserts_since_prune: AtomicUsize,
    limits: DecodeLimits,
}

impl Router {
    /// An empty table; disconnected peers count as "recently disconnected" for `dead_peer_ttl`.
    pub fn new(dead_peer_ttl: Duration) -> Self {
        Router {
            peers: DashMap::default(),
            recently_disconnected: DashMap::new(),
            dead_peer_ttl,
            next_generation: AtomicU64::new(1),
            inserts_since_prune: AtomicUsize::new(0),
            limits: DecodeLimits { max_items: MAX_MAIN_ITEMS, ..DecodeLimits::default() },
        }
    }

    // --- registration -----------------------------------------------------------------

    /// Registers the connection `{ws}/{cid}`. A [`Registration::Fresh`] connect is refused
    /// while a live connection (one not already closing) holds the address; a
    /// [`Registration::Supersede`] takes it over and returns the old queue. Either clears
    /// the address's "recently disconnected" mark.
    pub fn register(
        &self,
        ws: &str,
        cid: &str,
        outbound: Outbound,
        mode: Registration,
    ) -> Result<Registered, RegisterError> {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let peer = Peer { generation, sink: Sink::Socket(outbound), subscriptions: HashSet::new() };
        let superseded = {
            let mut clients = self.peers.entry(ws.to_owned()).or_default();
            match clients.get(cid) {
                Some(live) if mode == Registration::Fresh && !live.sink.is_closing() => {
                    return Err(RegisterError::ClientExists {
                        workspace: ws.to_owned(),
                        client_id: cid.to_owned(),
                    });
                }
                _ => clients.insert(cid.to_owned(), peer).and_then(|old| match old.sink {
                    Sink::Socket(o) => Some(o),
                    Sink::Local(_) => None,
                }),
            }
        };
        self.recently_disconnected.remove(&format!("{ws}/{cid}"));
        Ok(Registered { generation, superseded })
    }

    /// Registers a peer that lives inside the server (the workspace manager,
    /// `*/manager-{sid}`): frames routed to `{ws}/{cid}` go into `inbox` (see
    /// [`LocalInbox`] for the overflow policy). Replaces any previous registration.
    pub fn register_local(&self, ws: &str, cid: &str, inbox: LocalInbox) -> Generation {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let peer = Peer { generation, sink: Sink::Local(inbox), subscriptions: HashSet::new() };
        self.peers.entry(ws.to_owned()).or_default().insert(cid.to_owned(), peer);
        generation
    }

    /// Removes the local peer `{ws}/{cid}` silently (no `client_disconnected`, no
    /// dead-peer mark): per-request peers come and go without anyone noticing.
    pub fn remove_local(&self, ws: &str, cid: &str) -> bool {
        let removed = match self.peers.get_mut(ws) {
            Some(mut clients) if matches!(clients.get(cid).map(|p| &p.sink), Some(Sink::Local(_))) => {
                clients.remove(cid);
                true
            }
            _ => false,
        };
        self.peers.remove_if(ws, |_, clients| clients.is_empty());
        removed
    }

    /// Pushes a server-made frame (not routed, not stamped) into the inbox of the local
    /// peer `target` (`{ws}/{cid}`). Returns whether it was queued.
    pub fn deliver_local(&self, target: &str, frame: Bytes) -> bool {
        let Some((ws, cid)) = target.split_once('/') else { return false };
        let Some(clients) = self.peers.get(ws) else { return false };
        match clients.get(cid).map(|p| &p.sink) {
            Some(Sink::Local(inbox)) => inbox.send(frame).is_ok(),
            _ => false,
        }
    }

    /// The disconnect of `{ws}/{cid}` generation `generation` (spec §8). If it is still the
    /// current registration: removes it (and its subscriptions), marks the address as
    /// recently disconnected, and broadcasts `client_disconnected` (bare client id) to the
    /// workspace's subscribers; returns `true`. A superseded generation changes nothing.
    pub fn remove_client(&self, ws: &str, cid: &str, generation: Generation, now: Instant) -> bool {
        let removed = match self.peers.get_mut(ws) {
            Some(mut clients) if clients.get(cid).is_some_and(|p| p.generation == generation) => {
                clients.remove(cid);
                true
            }
            _ => false,
        };
        if !removed {
            return false;
        }
        self.peers.remove_if(ws, |_, clients| clients.is_empty());
        self.mark_disconnected(format!("{ws}/{cid}"), now);
        let mut data = Map::new();
        data.insert("id".into(), Value::from(cid));
        data.insert("workspace".into(), Value::from(ws));
        self.broadcast_event(ws, CLIENT_DISCONNECTED, data);
        true
    }

    /// Disconnects the websocket client `{ws}/{cid}` from the server side (the manager's
    /// `cleanup` removing a client that does not answer): like [`Router::remove_client`]
    /// for its current registration, then its socket is closed with `close`. The
    /// connection's own cleanup later finds its generation gone and changes nothing.
    /// Returns whether such a client was registered.
    pub fn disconnect(&self, ws: &str, cid: &str, close: super::outbound::CloseCmd, now: Instant) -> bool {
        let outbound = self.peers.get(ws).and_then(|c| {
            c.get(cid).and_then(|p| match &p.sink {
                Sink::Socket(o) => Some((p.generation, o.clone())),
                Sink::Local(_) => None,
            })
        });
        let Some((generation, outbound)) = outbound else { return false };
        let removed = self.remove_client(ws, cid, generation, now);
        outbound.close(close);
        removed
    }

    fn mark_disconnected(&self, key: String, now: Instant) {
        self.recently_disconnected.insert(key, now);
        if self.inserts_since_prune.fetch_add(1, Ordering::Relaxed) + 1 >= PRUNE_EVERY {
            self.inserts_since_prune.store(0, Ordering::Relaxed);
            let ttl = self.dead_peer_ttl;
            self.recently_disconnected.retain(|_, t| now.saturating_duration_since(*t) < ttl);
        }
    }

    fn recently_disconnected(&self, key: &str, now: Instant) -> bool {
        let Some(at) = self.recently_disconnected.get(key).map(|t| *t) else { return false };
        if now.saturating_duration_since(at) < self.dead_peer_ttl {
            return true;
        }
        self.recently_disconnected.remove_if(key, |_, t| *t == at);
        false
    }

    /// Whether `{ws}/{cid}` has a live registration.
    pub fn is_connected(&self, ws: &str, cid: &str) -> bool {
        self.peers.get(ws).is_some_and(|c| c.contains_key(cid))
    }

    /// The current generation of `{ws}/{cid}`.
    pub fn generation(&self, ws: &str, cid: &str) -> Option<Generation> {
        self.peers.get(ws).and_then(|c| c.get(cid).map(|p| p.generation))
    }

    /// Number of live websocket connections in `ws` (local peers, such as the HTTP
    /// proxy's per-request peers, do not count: they do not keep a workspace alive).
    pub fn client_count(&self, ws: &str) -> usize {
        self.peers.get(ws).map_or(0, |c| c.values().filter(|p| matches!(p.sink, Sink::Socket(_))).count())
    }

    /// The client ids of the websocket connections in `ws`.
    pub fn clients(&self, ws: &str) -> Vec<String> {
        self.peers.get(ws).map_or_else(Vec::new, |c| {
            c.iter().filter(|(_, p)| matches!(p.sink, Sink::Socket(_))).map(|(k, _)| k.clone()).collect()
        })
    }

    // --- subscriptions ----------------------------------------------------------------

    /// Subscribes `{ws}/{cid}` to event `types`: broadcasts of those types in its
    /// workspace reach it (spec §3.2 rule 5). The manager's `subscribe` calls this.
    /// Returns the number of types it is now subscribed to.
    pub fn subscribe<I, T>(&self, ws: &str, cid: &str, types: I) -> Result<usize, SubscribeError>
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let not_connected = || SubscribeError::NotConnected(format!("{ws}/{cid}"));
        let mut clients = self.peers.get_mut(ws).ok_or_else(not_connected)?;
        let peer = clients.get_mut(cid).ok_or_else(not_connected)?;
        for t in types {
            let t = t.into();
            if !peer.subscriptions.contains(&t) && peer.subscriptions.len() >= MAX_SUBSCRIPTIONS {
                return Err(SubscribeError::TooMany);
            }
            peer.subscriptions.insert(t);
        }
        Ok(peer.subscriptions.len())
    }

    /// Removes subscriptions of `{ws}/{cid}`; returns how many remain.
    pub fn unsubscribe<I, T>(&self, ws: &str, cid: &str, types: I) -> Result<usize, SubscribeError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let not_connected = || SubscribeError::NotConnected(format!("{ws}/{cid}"));
        let mut clients = self.peers.get_mut(ws).ok_or_else(not_connected)?;
        let peer = clients.get_mut(cid).ok_or_else(not_connected)?;
        for t in types {
            peer.subscriptions.remove(t.as_ref());
        }
        Ok(peer.subscriptions.len())
    }

    // --- delivery -----------------------------------------------------------------------

    /// Delivers `frame` to every connection of `ws` subscribed to `kind`; returns how many.
    fn deliver_broadcast(&self, ws: &str, kind: &str, frame: &Bytes) -> usize {
        let Some(clients) = self.peers.get(ws) else { return 0 };
        clients
            .values()
            .filter(|p| p.subscriptions.contains(kind))
            .filter(|p| p.sink.send(frame.clone()).is_ok())
            .count()
    }

    /// A server-generated event `{"type": kind, "to": "*", "data": data}` (no `from`, `ws`
    /// or `user`, spec §3.4) to the subscribers of `kind` in `ws`. Returns how many got it.
    pub fn broadcast_event(&self, ws: &str, kind: &str, data: Map) -> usize {
        let mut main = Map::new();
        main.insert("type".into(), Value::from(kind));
        main.insert("to".into(), Value::from(WILDCARD));
        main.insert("data".into(), Value::Map(data));
        match package::encode_package(&main, None) {
            Ok(bytes) => self.deliver_broadcast(ws, kind, &Bytes::from(bytes)),
            Err(e) => {
                tracing::error!(event = kind, error = %e, "cannot encode a system event");
                0
            }
        }
    }

    /// Routes one binary frame from `sender` (spec §3.2 rules 1-8): stamps `from`, `to`,
    /// `ws` and `user` into `main` (the rest of `main` and the extra bytes untouched) and
    /// delivers it; or explains why not. The caller sends [`RouteOutcome::Rejected`]'s
    /// frame back on the sender's own socket. A frame for a full local inbox is refused
    /// at once (see [`LocalInbox`]).
    pub fn route(&self, sender: &RouteSender, frame: &Bytes, now: Instant) -> RouteOutcome {
        match self.route_or_hold(sender, frame, now) {
            Routed::Done(outcome) => outcome,
            Routed::InboxFull(held) => held.refuse(),
        }
    }

    /// [`Router::route`], except that a frame for a full local inbox comes back as
    /// [`Routed::InboxFull`], for a caller that can wait for room (see [`LocalInbox`]).
    ///
    /// This is every frame's path through the server, so it does as little as it can:
    /// `main` is scanned in place ([`RawMain`]), not decoded, and its routing fields read
    /// as `&str`; the target is looked up once and the stamped frame, written by copying
    /// the other entries and the sender's pre-encoded stamp (see [`RouteSender`]), is
    /// handed to it under that same lookup.
    pub fn route_or_hold(&self, sender: &RouteSender, frame: &Bytes, now: Instant) -> Routed {
        let main = match RawMain::scan(frame, &self.limits) {
            Ok(main) => main,
            Err(e) => return Routed::Done(RouteOutcome::Dropped(DropReason::Undecodable(e))),
        };
        let Some(to) = main.str("to") else {
            let error = match main.kind("to") {
                None | Some("nil") => RouteError::MissingTarget,
                Some(kind) => RouteError::InvalidTarget(kind),
            };
            return Routed::Done(refuse(&main, error));
        };
        let target = Target::new(to, &sender.workspace);
        let broadcast = target.is_broadcast();
        // Upstream checks only the literal "*"; an explicit "{ws}/*" is the same broadcast,
        // so a read-only client may not send that either.
        if sender.read_only && broadcast {
            let error = RouteError::ReadOnlyBroadcast(sender.address.clone());
            return Routed::Done(refuse(&main, error));
        }
        let (target_ws, target_cid) = (target.ws(), target.cid());
        // `split_min`: see `RawMain::restamp_parts` (a whole frame for `usize::MAX`).
        let stamp = |split_min: usize| -> Result<(Bytes, Bytes), PackageError> {
            let SenderStamp { from, ws, user } =
                sender.stamp.as_ref().map_err(|e| PackageError::Encode(e.clone()))?;
            // The server's own peers live in workspace "*": their frames carry the
            // target's workspace, so providers treat them as same-workspace calls (rule 4).
            let target_ws_entry;
            let ws = match ws {
                Some(ws) => ws,
                None => {
                    target_ws_entry = Entry::str("ws", target_ws)?;
                    &target_ws_entry
                }
            };
            main.restamp_parts(&Stamp { to: target.as_str(), ws, from, user }, split_min)
        };
        let undecodable = |e| Routed::Done(RouteOutcome::Dropped(DropReason::Undecodable(e)));
        if target_cid == WILDCARD {
            // Unsubscribed connections get nothing; a frame without a type reaches nobody.
            let Some(kind) = main.str("type") else { return Routed::Done(RouteOutcome::Delivered(0)) };
            return match stamp(usize::MAX) {
                Ok((stamped, _)) => {
                    Routed::Done(RouteOutcome::Delivered(self.deliver_broadcast(target_ws, kind, &stamped)))
                }
                Err(e) => undecodable(e),
            };
        }
        let clients = self.peers.get(target_ws);
        let Some(peer) = clients.as_ref().and_then(|c| c.get(target_cid)) else {
            drop(clients);
            // A target that just left fails fast (rule 6); one never seen is dropped and
            // the caller times out (rule 8).
            if !broadcast && self.recently_disconnected(target.as_str(), now) {
                return Routed::Done(refuse(&main, RouteError::PeerNotConnected(target.into_owned())));
            }
            return Routed::Done(RouteOutcome::Dropped(DropReason::UnknownTarget(target.into_owned())));
        };
        // A socket writes a large extra from the frame it came in; a local peer decodes
        // the frame, so it gets one buffer.
        let split_min = if matches!(peer.sink, Sink::Socket(_)) { RELAY_SPLIT_MIN } else { usize::MAX };
        let (stamped, tail) = match stamp(split_min) {
            Ok(pieces) => pieces,
            Err(e) => return undecodable(e),
        };
        // The stamped frame is moved, not cloned, into the target's queue: it is the only
        // handle, so it is freed as soon as the socket has encoded it.
        let refused = match &peer.sink {
            Sink::Socket(o) => o.send(OutFrame::binary(stamped, tail)).err(),
            Sink::Local(inbox) => match inbox.try_send(stamped) {
                Err((SendError::Overflow, stamped)) => {
                    let inbox = inbox.clone();
                    drop(clients);
                    return Routed::InboxFull(Box::new(HeldFrame {
                        frame: stamped,
                        inbox,
                        session: main.str("session").map(str::to_owned),
                        from: sender.address.clone(),
                        target: target.as_str().to_owned(),
                    }));
                }
                other => other.err().map(|(e, _)| e),
            },
        };
        Routed::Done(match refused {
            None => RouteOutcome::Delivered(1),
            Some(e) => RouteOutcome::Dropped(DropReason::TargetUnavailable(target.as_str().to_owned(), e)),
        })
    }
}

/// What [`Router::route_or_hold`] did with a frame.
#[derive(Debug)]
pub enum Routed {
    /// Routed, refused or dropped, as [`Router::route`] says.
    Done(RouteOutcome),
    /// Stamped for a local peer whose inbox is full: wait for room or refuse it.
    InboxFull(Box<HeldFrame>),
}

/// A stamped frame for a local peer whose inbox was full (see [`LocalInbox`]).
#[derive(Debug)]
pub struct HeldFrame {
    target: String,
    frame: Bytes,
    inbox: LocalInbox,
    session: Option<String>,
    from: String,
}

impl HeldFrame {
    /// Refuses the frame as [`Router::route`] does: a reject for a call that expects an
    /// answer, a silent drop otherwise.
    pub fn refuse(self) -> RouteOutcome {
        let HeldFrame { target, session, from, .. } = self;
        let Some(session) = session else {
            return RouteOutcome::Dropped(DropReason::LocalOverflow(target));
        };
        match reject_frame(&session, Value::from(target.as_str()), Value::from(from), LOCAL_INBOX_FULL) {
            Ok(reject) => RouteOutcome::Rejected { error: RouteError::LocalInboxFull(target), reject },
            Err(e) => RouteOutcome::Dropped(DropReason::Undecodable(e)),
        }
    }

    /// Waits at most `wait` for room in the inbox and delivers the frame; refuses it (as
    /// [`HeldFrame::refuse`]) if none came.
    pub async fn deliver_within(self, wait: Duration) -> RouteOutcome {
        match self.inbox.tx.send_timeout(self.frame.clone(), wait).await {
            Ok(()) => RouteOutcome::Delivered(1),
            Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => self.refuse(),
            Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => {
                RouteOutcome::Dropped(DropReason::TargetUnavailable(self.target, SendError::Closed))
            }
        }
    }
}

/// A frame's target, normalized as [`message::normalize_target`] does (spec §1.5 step 2),
/// and split at its first `/` into workspace and client id. An absolute `to` (what stock
/// clients send) is used in place, so routing a frame copies no address.
struct Target<'t> {
    full: Cow<'t, str>,
    /// Where the first `/` is (`full.len()` if there is none).
    slash: usize,
}

impl<'t> Target<'t> {
    fn new(to: &'t str, sender_ws: &str) -> Self {
        // A byte search: `str::find` with a char pattern costs several times more on the
        // short addresses every frame carries ('/' is ASCII, so this is the same index).
        match to.bytes().position(|b| b == b'/') {
            // `normalize_target` keeps a `to` with a `/` as it is.
            Some(slash) => Target { full: Cow::Borrowed(to), slash },
            None => {
                let full = message::normalize_target(to, sender_ws);
                let slash = full.find('/').unwrap_or(full.len());
                Target { full: Cow::Owned(full), slash }
            }
        }
    }

    fn as_str(&self) -> &str {
        &self.full
    }

    fn into_owned(self) -> String {
        self.full.into_owned()
    }

    fn ws(&self) -> &str {
        self.full.get(..self.slash).unwrap_or_default()
    }

    fn cid(&self) -> &str {
        self.full.get(self.slash + 1..).unwrap_or_default()
    }

    /// Whether it addresses a whole workspace ([`message::is_broadcast`]).
    fn is_broadcast(&self) -> bool {
        message::is_broadcast(&self.full)
    }
}

/// A refused frame: the reject for a call that expects an answer (it has a `session`),
/// echoing `to` and `from` as sent; a silent drop otherwise.
fn refuse(main: &RawMain<'_>, error: RouteError) -> RouteOutcome {
    let Some(session) = main.str("session") else {
        return RouteOutcome::Dropped(DropReason::Refused(error));
    };
    let as_sent = |key| main.value(key).unwrap_or_else(|| Value::from(""));
    match reject_frame(session, as_sent("to"), as_sent("from"), &error.to_string()) {
        Ok(reject) => RouteOutcome::Rejected { error, reject },
        Err(e) => RouteOutcome::Dropped(DropReason::Undecodable(e)),
    }
}

/// The synthetic reject upstream sends back for a routing error (rule 7): main
/// `{"type":"method","from":<to as sent>,"to":<from as sent>,"method":"{session}.reject"}`,
/// extra `{"args":[{"_rtype":"error","_rvalue":<text>,"_rtrace":""}]}`. No `ws`, `user` or
/// `parent`: the sender's hypha-rpc resolves it as a call on its own session.
pub fn reject_frame(session: &str, to: Value, from: Value, text: &str) -> Result<Bytes, PackageError> {
    let mut main = Map::new();
    main.insert("type".into(), Value::from(message::METHOD));
    main.insert("from".into(), to);
    main.insert("to".into(), from);
    main.insert("method".into(), Value::from(format!("{session}.reject")));
    let mut error = Map::new();
    error.insert("_rtype".into(), Value::from("error"));
    error.insert("_rvalue".into(), Value::from(text));
    error.insert("_rtrace".into(), Value::from(""));
    let mut extra = Map::new();
    extra.insert("args".into(), Value::List(vec![Value::Map(error)]));
    Ok(Bytes::from(package::encode_package(&main, Some(&extra))?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::outbound::{channel, OutboundRx, WriterEvent};
    use hypha_core::map;
    use hypha_core::package::decode_package;

    fn sender(ws: &str, cid: &str) -> RouteSender {
        RouteSender::new(ws, cid, &Value::Map(map! {"id" => cid}), false)
    }

    fn join(r: &Router, ws: &str, cid: &str) -> (Generation, OutboundRx) {
        let (tx, rx) = channel(16, 1 << 20);
        (r.register(ws, cid, tx, Registration::Fresh).unwrap().generation, rx)
    }

    fn frame(main: Map, extra: Option<Map>) -> Bytes {
        Bytes::from(package::encode_package(&main, extra.as_ref()).unwrap())
    }

    async fn recv(rx: &mut OutboundRx) -> Bytes {
        match rx.next().await {
            Some(WriterEvent::Frame(OutFrame::Binary(b))) => b,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }

    fn pending(rx: &mut OutboundRx) -> bool {
        futures_util::FutureExt::now_or_never(rx.next()).is_some()
    }

    fn keys(m: &Map) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    #[actix_rt::test]
    async fn stamps_in_place_and_keeps_the_extra_bytes() {
        let r = Router::new(Duration::from_secs(120));
        let now = Instant::now();
        let (_, _r1) = join(&r, "W", "r1");
        let (_, mut r2) = join(&r, "W", "r2");
        let main = map! {"type" => "method", "to" => "r2", "from" => "evil/x", "ws" => "evil",
        "user" => map! {"id" => "root"}, "method" => "services.x.y", "custom" => 1};
        let extra = map! {"args" => vec![Value::from(1)]};
        let f = frame(main, Some(extra.clone()));
        assert_eq!(r.route(&sender("W", "r1"), &f, now), RouteOutcome::Delivered(1));
        let got = recv(&mut r2).await;
        let pkg = decode_package(&got, &DecodeLimits::default()).unwrap();
        assert_eq!(keys(&pkg.main), ["type", "to", "from", "ws", "user", "method", "custom"]);
        assert_eq!(pkg.main["to"], Value::from("W/r2"));
        assert_eq!(pkg.main["from"], Value::from("W/r1"));
        assert_eq!(pkg.main["ws"], Value::from("W"));
        assert_eq!(pkg.main["user"], Value::Map(map! {"id" => "r1"}));
        // The extra bytes are the very bytes sent.
        let mut extra_bytes = Vec::new();
        hypha_core::msgpack::encode_map(&extra, &mut extra_bytes).unwrap();
        assert!(got.ends_with(&extra_bytes));

        // New keys are appended in upstream's order: ws, from, user.
        let f = frame(map! {"type" => "my-evt", "to" => "W/r2", "data" => 5}, None);
        r.route(&sender("W", "r1"), &f, now);
        let pkg = decode_package(&recv(&mut r2).await, &DecodeLimits::default()).unwrap();
        assert_eq!(keys(&pkg.main), ["type", "to", "data", "ws", "from", "user"]);
    }

    #[actix_rt::test]
    async fn a_large_extra_is_relayed_to_a_socket_from_the_frame_it_came_in() {
        let r = Router::new(Duration::from_secs(120));
        let now = Instant::now();
        let (_, _r1) = join(&r, "W", "r1");
        let (_, mut r2) = join(&r, "W", "r2");
        let main = map! {"type" => "method", "to" => "r2", "method" => "services.x.y"};
        let chunk = Bytes::from(vec![5u8; RELAY_SPLIT_MIN]);
        let f = frame(main, Some(map! {"args" => vec![Value::Bytes(chunk.clone())]}));
        assert_eq!(r.route(&sender("W", "r1"), &f, now), RouteOutcome::Delivered(1));
        let (head, tail) = match r2.next().await {
            Some(WriterEvent::Frame(OutFrame::Split { head, tail })) => (head, tail),
            other => panic!("expected a split frame, got {other:?}"),
        };
        let extra_at = f.len() - tail.len();
        assert_eq!(tail.as_ptr(), f[extra_at..].as_ptr(), "the extra bytes were not copied");
        let pkg =
            decode_package(&Bytes::from([&head[..], &tail[..]].concat()), &DecodeLimits::default()).unwrap();
        assert_eq!(pkg.main["from"], Value::from("W/r1"));
        assert_eq!(pkg.main["to"], Value::from("W/r2"));
        assert_eq!(pkg.extra.unwrap()["args"], Value::List(vec![Value::Bytes(chunk)]));
    }

    /// The router's in-place target is `message::normalize_target` + `is_broadcast` + a
    /// split at the first `/`, without the copy.
    #[test]
    fn targets_normalize_as_the_message_module_does() {
        for to in ["c", "*", "W/c", "W/*", "*/manager-x", "V/a/b", "a/b/*", "/", "", "x/", "/y", "W/*/x"] {
            for ws in ["W", "*"] {
                let t = Target::new(to, ws);
                let full = message::normalize_target(to, ws);
                assert_eq!(t.as_str(), full, "{to} {ws}");
                assert_eq!(t.is_broadcast(), message::is_broadcast(&full), "{to} {ws}");
                assert_eq!(
                    (t.ws(), t.cid()),
                    full.split_once('/').unwrap_or((full.as_str(), "")),
                    "{to} {ws}"
                );
                assert_eq!(matches!(t.full, Cow::Borrowed(_)), to.contains('/'), "{to}: copied");
            }
        }
    }

    #[actix_rt::test]
    async fn broadcasts_reach_only_subscribers_of_the_workspace() {
        let r = Router::new(Duration::from_secs(120));
        let now = Instant::now();
        let (_, mut r1) = join(&r, "W", "r1");
        let (_, mut r2) = join(&r, "W", "r2");
        let (_, mut other) = join(&r, "V", "r3");
        let f = frame(map! {"type" => "my-evt", "to" => "*", "data" => 6}, None);
        assert_eq!(r.route(&sender("W", "r1"), &f, now), RouteOutcome::Delivered(0));
        r.subscribe("W", "r2", ["my-evt"]).unwrap();
        r.subscribe("V", "r3", ["my-evt"]).unwrap();
        assert_eq!(r.route(&sender("W", "r1"), &f, now), RouteOutcome::Delivered(1));
        let pkg = decode_package(&recv(&mut r2).await, &DecodeLimits::default()).unwrap();
        assert_eq!(pkg.main["to"], Value::from("W/*"));
        assert!(!pending(&mut r1) && !pending(&mut other));
        // The sender gets its own broadcast when subscribed.
        r.subscribe("W", "r1", ["my-evt"]).unwrap();
        assert_eq!(r.route(&sender("W", "r1"), &f, now), RouteOutcome::Delivered(2));
        assert_eq!(r.unsubscribe("W", "r1", ["my-evt"]), Ok(0));
        assert_eq!(r.subscribe("W", "nobody", ["x"]), Err(SubscribeError::NotConnected("W/nobody".into())));
        let many: Vec<String> = (0..=MAX_SUBSCRIPTIONS).map(|i| i.to_string()).collect();
        assert_eq!(r.subscribe("W", "r1", many), Err(SubscribeError::TooMany));
    }

    fn reject_of(b: &Bytes) -> (Map, Map) {
        let pkg = decode_package(b, &DecodeLimits::default()).unwrap();
        (pkg.main, pkg.extra.unwrap())
    }

    #[actix_rt::test]
    async fn routing_errors_reject_calls_with_a_session_and_drop_the_rest() {
        let r = Router::new(Duration::from_secs(120));
        let now = Instant::now();
        let s = sender("W", "c");
        // No `to`.
        let out = r.route(&s, &frame(map! {"type" => "method", "session" => "s7"}, None), now);
        let RouteOutcome::Rejected { error, reject } = out else { panic!("{out:?}") };
        assert_eq!(error, RouteError::MissingTarget);
        let (main, extra) = reject_of(&reject);
        assert_eq!(main, map! {"type" => "method", "from" => "", "to" => "", "method" => "s7.reject"});
        let err = &extra["args"].as_list().unwrap()[0];
        assert_eq!(err.as_map().unwrap()["_rvalue"], Value::from(error.to_string()));
        // `to` not a string: the value comes back as sent.
        let out = r.route(
            &s,
            &frame(map! {"type" => "method", "to" => 5, "from" => "me", "session" => "s"}, None),
            now,
        );
        let RouteOutcome::Rejected { reject, .. } = out else { panic!("{out:?}") };
        let (main, _) = reject_of(&reject);
        assert_eq!((&main["from"], &main["to"]), (&Value::from(5), &Value::from("me")));
        // Without a session: dropped.
        let out = r.route(&s, &frame(map! {"type" => "method"}, None), now);
        assert_eq!(out, RouteOutcome::Dropped(DropReason::Refused(RouteError::MissingTarget)));
        // Never-connected target: dropped even with a session (rule 8).
        let out =
            r.route(&s, &frame(map! {"type" => "method", "to" => "ghost", "session" => "s"}, None), now);
        assert_eq!(out, RouteOutcome::Dropped(DropReason::UnknownTarget("W/ghost".into())));
        // Not a map / not msgpack.
        assert!(matches!(
            r.route(&s, &Bytes::from_static(&[0x92, 1, 2]), now),
            RouteOutcome::Dropped(DropReason::Undecodable(_))
        ));
        assert!(matches!(
            r.route(&s, &Bytes::from_static(b"\xc1garbage"), now),
            RouteOutcome::Dropped(DropReason::Undecodable(_))
        ));
    }

    #[actix_rt::test]
    async fn read_only_clients_may_not_broadcast() {
        let r = Router::new(Duration::from_secs(120));
        let now = Instant::now();
        let (_, mut peer) = join(&r, "W", "p");
        let ro = RouteSender::new("W", "ro", &Value::Map(map! {"id" => "ro"}), true);
        for to in ["*", "W/*"] {
            let out =
                r.route(&ro, &frame(map! {"type" => "method", "to" => to, "session" => "sro"}, None), now);
            let RouteOutcome::Rejected { error, reject } = out else { panic!("{out:?}") };
            assert_eq!(
                error.to_string(),
                "Read-only client W/ro cannot broadcast messages. Only point-to-point messages are allowed for read-only clients."
            );
            assert_eq!(reject_of(&reject).0["from"], Value::from(to));
        }
        // Point-to-point is fine.
        assert_eq!(
            r.route(&ro, &frame(map! {"type" => "e", "to" => "p"}, None), now),
            RouteOutcome::Delivered(1)
        );
        recv(&mut peer).await;
    }

    #[actix_rt::test]
    async fn dead_peers_fail_fast_for_ttl_then_are_forgotten() {
        let ttl = Duration::from_secs(120);
        let r = Router::new(ttl);
        let t0 = Instant::now();
        let (_, mut watcher) = join(&r, "W", "watcher");
        r.subscribe("W", "watcher", [CLIENT_DISCONNECTED]).unwrap();
        let (g2, _r2) = join(&r, "W", "r2");
        assert!(r.remove_client("W", "r2", g2, t0));
        // client_disconnected with the bare id.
        let pkg = decode_package(&recv(&mut watcher).await, &DecodeLimits::default()).unwrap();
        assert_eq!(
            pkg.main,
            map! {"type" => CLIENT_DISCONNECTED, "to" => "*", "data" => map! {"id" => "r2", "workspace" => "W"}}
        );
        let call = frame(map! {"type" => "method", "to" => "r2", "session" => "s9"}, None);
        let out = r.route(&sender("W", "c"), &call, t0 + Duration::from_millis(500));
        let RouteOutcome::Rejected { error, reject } = out else { panic!("{out:?}") };
        assert_eq!(error.to_string(), "Target peer W/r2 is not connected");
        let (main, extra) = reject_of(&reject);
        assert_eq!(main, map! {"type" => "method", "from" => "r2", "to" => "", "method" => "s9.reject"});
        assert_eq!(
            extra["args"],
            Value::List(vec![Value::Map(
                map! {"_rtype" => "error", "_rvalue" => "Target peer W/r2 is not connected", "_rtrace" => ""}
            )])
        );
        // Without a session: silence.
        let ev = frame(map! {"type" => "method", "to" => "r2"}, None);
        assert!(matches!(r.route(&sender("W", "c"), &ev, t0), RouteOutcome::Dropped(DropReason::Refused(_))));
        // After the TTL: unknown target.
        let out = r.route(&sender("W", "c"), &call, t0 + ttl);
        assert_eq!(out, RouteOutcome::Dropped(DropReason::UnknownTarget("W/r2".into())));
        // A reconnect clears the mark at once.
        r.remove_client("W", "watcher", 0, t0); // wrong generation: nothing happens
        assert!(r.is_connected("W", "watcher"));
        let (g3, _r3) = join(&r, "W", "r3");
        r.remove_client("W", "r3", g3, t0);
        join(&r, "W", "r3");
        assert!(!r.recently_disconnected("W/r3", t0));
    }

    #[actix_rt::test]
    async fn duplicate_ids_are_refused_and_reconnects_supersede() {
        let r = Router::new(Duration::from_secs(120));
        let now = Instant::now();
        let (tx1, _rx1) = channel(4, 1024);
        let g1 = r.register("W", "c", tx1.clone(), Registration::Fresh).unwrap().generation;
        let (tx2, _rx2) = channel(4, 1024);
        assert_eq!(
            r.register("W", "c", tx2.clone(), Registration::Fresh).unwrap_err().to_string(),
            "Client already exists and is active: W/c"
        );
        // The same id elsewhere is fine.
        r.register("V", "c", tx2.clone(), Registration::Fresh).unwrap();
        let reg = r.register("W", "c", tx2, Registration::Supersede).unwrap();
        assert!(reg.generation > g1);
        assert!(reg.superseded.is_some_and(|old| old.same_queue(&tx1)));
        // The superseded connection's cleanup leaves the new one alone.
        assert!(!r.remove_client("W", "c", g1, now));
        assert_eq!(r.generation("W", "c"), Some(reg.generation));
        assert!(r.remove_client("W", "c", reg.generation, now));
        assert_eq!(r.client_count("W"), 0);
        // A connection already closing does not block its own id.
        let (tx3, _rx3) = channel(4, 1024);
        r.register("W", "d", tx3.clone(), Registration::Fresh).unwrap();
        tx3.close(crate::server::outbound::CloseCmd::drop_socket());
        let (tx4, _rx4) = channel(4, 1024);
        assert!(r.register("W", "d", tx4, Registration::Fresh).unwrap().superseded.is_some());
    }

    #[actix_rt::test]
    async fn the_manager_workspace_stamps_the_target_workspace() {
        let r = Router::new(Duration::from_secs(120));
        let (_, mut c) = join(&r, "W", "c");
        let mgr = sender("*", "manager-x");
        let f = frame(map! {"type" => "method", "to" => "W/c", "method" => "s.resolve"}, None);
        assert_eq!(r.route(&mgr, &f, Instant::now()), RouteOutcome::Delivered(1));
        let pkg = decode_package(&recv(&mut c).await, &DecodeLimits::default()).unwrap();
        assert_eq!((&pkg.main["ws"], &pkg.main["from"]), (&Value::from("W"), &Value::from("*/manager-x")));
    }

    #[actix_rt::test]
    async fn a_full_local_inbox_rejects_calls_and_drops_the_rest_or_holds_them() {
        let r = Router::new(Duration::from_secs(120));
        let now = Instant::now();
        let (inbox, mut rx) = LocalInbox::channel(1);
        r.register_local("*", "manager-x", inbox);
        let s = sender("W", "c");
        let call = frame(map! {"type" => "method", "to" => "*/manager-x", "session" => "s1"}, None);
        assert_eq!(r.route(&s, &call, now), RouteOutcome::Delivered(1));
        let RouteOutcome::Rejected { error, reject } = r.route(&s, &call, now) else {
            panic!("not rejected")
        };
        assert_eq!(error, RouteError::LocalInboxFull("*/manager-x".into()));
        let (main, extra) = reject_of(&reject);
        assert_eq!(
            main,
            map! {"type" => "method", "from" => "*/manager-x", "to" => "W/c", "method" => "s1.reject"}
        );
        let err = &extra["args"].as_list().unwrap()[0];
        assert_eq!(err.as_map().unwrap()["_rvalue"], Value::from(LOCAL_INBOX_FULL));
        let event = frame(map! {"type" => "e", "to" => "*/manager-x"}, None);
        assert_eq!(
            r.route(&s, &event, now),
            RouteOutcome::Dropped(DropReason::LocalOverflow("*/manager-x".into()))
        );
        // A caller that can wait gets the stamped frame back, and delivers it once there
        // is room, or refuses it as `route` does when none comes in time.
        let Routed::InboxFull(held) = r.route_or_hold(&s, &call, now) else { panic!("not held") };
        let refused = held.deliver_within(Duration::from_millis(20)).await;
        assert!(matches!(refused, RouteOutcome::Rejected { error: RouteError::LocalInboxFull(_), .. }));
        let Routed::InboxFull(held) = r.route_or_hold(&s, &event, now) else { panic!("not held") };
        let waiting = actix_rt::spawn(held.deliver_within(Duration::from_secs(10)));
        // The queued frame was stamped; once it is taken there is room again.
        let got = decode_package(&rx.recv().await.unwrap(), &DecodeLimits::default()).unwrap();
        assert_eq!(got.main["from"], Value::from("W/c"));
        assert_eq!(waiting.await.unwrap(), RouteOutcome::Delivered(1), "the held frame went in");
        let held = decode_package(&rx.recv().await.unwrap(), &DecodeLimits::default()).unwrap();
        assert_eq!((&held.main["type"], &held.main["from"]), (&Value::from("e"), &Value::from("W/c")));
        assert!(r.deliver_local("*/manager-x", Bytes::from_static(b"x")));
        assert!(!r.deliver_local("W/c", Bytes::from_static(b"x")));
        // Local peers do not count as clients, and leave silently.
        assert_eq!(r.client_count("*"), 0);
        assert!(r.remove_local("*", "manager-x"));
        assert!(!r.is_connected("*", "manager-x"));
        assert!(!r.recently_disconnected("*/manager-x", now));
    }
}
