//! The way out to one client: a bounded queue of frames and the writer task that owns the
//! actix-ws [`Session`].
//!
//! Anyone may push a frame for a client: its own connection actor (`connection_info`,
//! pongs, rejects) and the connection actors of other clients routing to it. None of them
//! may block on a slow client, and memory must not grow without bound, so the queue is
//! bounded in frames *and* bytes, and pushing never waits.
//!
//! **Overflow policy.** A push that finds the queue full does not wait and does not drop
//! silently: the client is too slow to keep up with its traffic, so it is disconnected with
//! an error frame and close code 1008 ([`OVERFLOW_MESSAGE`]). The frame that did not fit is
//! dropped; the caller learns it from [`SendError::Overflow`].
//!
//! **Closing.** A close request ([`Outbound::close`]) overtakes queued frames: the writer
//! stops writing data, sends the optional error frame and the close frame (or nothing, to
//! drop the socket), waiting at most `close_timeout` for a client that does not read, and
//! ends. The first close request wins; later ones are ignored.
//!
//! **The direct path.** Most of the time the queue is empty and the writer idle, and a hop
//! through it (queue push, writer wake-up, then the same push into actix-ws's own channel)
//! is pure overhead on every frame. So [`Outbound::send`] first tries to put the frame
//! straight into actix-ws's channel through a clone of the writer's `Session`, polled once
//! and never waited on. It takes that path only while nothing is *backlogged* (no frame in
//! the queue or in the writer's hands) and the channel has room; otherwise the frame is
//! queued as before. A frame queued with a backlog is counted before `send` returns and
//! uncounted only after the writer has handed it to actix-ws, so a frame sent after it
//! can never overtake it. When a direct attempt finds the channel full, the clone is
//! dropped (it would hold a place in the channel's wait list) and the writer puts a fresh
//! one back once it has written its backlog. Nothing else changes: the direct path only
//! fills the channel the writer would have filled (actix-ws's 32 frames), so memory per
//! client stays the queue's bound plus that channel; a client that stops reading fills the
//! channel, then the queue, then overflows; a close still overtakes every queued frame;
//! and the writer takes the clone away before it closes or drops the socket.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use actix_ws::{CloseCode, CloseReason, Message, Session};
use bytes::Bytes;
use futures_util::Sink;
use tokio::sync::{mpsc, Notify};

/// The error message sent to a client whose outbound queue overflowed.
pub const OVERFLOW_MESSAGE: &str = "Send queue overflow: the client does not read its messages fast enough";

/// One frame to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFrame {
    /// A JSON control frame (`connection_info`, `pong`, `reconnection_token`, `error`).
    Text(String),
    /// An RPC frame.
    Binary(Bytes),
    /// The answer to a protocol-level ping.
    Pong(Bytes),
}

impl OutFrame {
    fn len(&self) -> usize {
        match self {
            OutFrame::Text(s) => s.len(),
            OutFrame::Binary(b) | OutFrame::Pong(b) => b.len(),
        }
    }

    /// What the writer's `session.text/binary/pong` would send (actix-ws's body truncates
    /// control payloads to 125 bytes itself).
    fn into_message(self) -> Message {
        match self {
            OutFrame::Text(t) => Message::Text(t.into()),
            OutFrame::Binary(b) => Message::Binary(b),
            OutFrame::Pong(b) => Message::Pong(b),
        }
    }
}

/// How to end a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseCmd {
    /// Sent first as `{"type":"error","message":...}` (the hypha-rpc client raises this
    /// text; it does not read close reasons).
    pub error_message: Option<String>,
    /// The close frame's code and reason; `None` drops the socket without a close frame
    /// (what upstream does to a superseded connection).
    pub close: Option<(u16, String)>,
}

impl CloseCmd {
    /// A close frame only.
    pub fn close(code: u16, reason: impl Into<String>) -> Self {
        CloseCmd { error_message: None, close: Some((code, reason.into())) }
    }

    /// An error frame with `message`, then a close frame with the same text as reason.
    pub fn error(code: u16, message: impl Into<String>) -> Self {
        let message = message.into();
        CloseCmd { close: Some((code, message.clone())), error_message: Some(message) }
    }

    /// Drop the socket without a close frame.
    pub fn drop_socket() -> Self {
        CloseCmd { error_message: None, close: None }
    }
}

/// The `{"type":"error","message":...}` text frame.
pub fn error_frame(message: &str) -> String {
    serde_json::json!({"type": "error", "message": message}).to_string()
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue was full: the client is being disconnected (see the module docs).
    #[error("outbound queue overflow")]
    Overflow,
    /// The connection is closing or closed.
    #[error("connection closed")]
    Closed,
}

struct Shared {
    close: Mutex<Option<CloseCmd>>,
    close_requested: AtomicBool,
    notify: Notify,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Frames queued and not yet handed to actix-ws by the writer (in the queue or being
    /// written). The direct path is shut while this is not zero (see the module docs).
    backlog: AtomicUsize,
    /// The writer's session for the direct path: `None` until the writer starts, after a
    /// direct attempt found actix-ws's channel full (until the writer has caught up), and
    /// once the writer is closing.
    direct: Mutex<Option<Session>>,
}

/// What became of a direct attempt.
enum Direct {
    /// In actix-ws's channel.
    Sent,
    /// The session was closed under us; the frame is gone, as it would be after a close.
    Closed,
    /// Not taken: queue it.
    Declined(OutFrame),
}

/// The sending half: cheap to clone, shared by everyone who writes to this client.
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::Sender<OutFrame>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("queued_frames", &(self.tx.max_capacity() - self.tx.capacity()))
            .field("queued_bytes", &self.shared.queued_bytes.load(Ordering::Relaxed))
            .field("closing", &self.is_closing())
            .finish()
    }
}

/// The receiving half, owned by the writer task.
pub struct OutboundRx {
    rx: mpsc::Receiver<OutFrame>,
    shared: Arc<Shared>,
}

/// What the writer does next.
#[derive(Debug, PartialEq, Eq)]
pub enum WriterEvent {
    /// Write this frame.
    Frame(OutFrame),
    /// Close the connection this way and stop.
    Close(CloseCmd),
}

/// A new queue holding at most `max_frames` frames and (unless empty) `max_bytes` bytes.
pub fn channel(max_frames: usize, max_bytes: usize) -> (Outbound, OutboundRx) {
    let (tx, rx) = mpsc::channel(max_frames.max(1));
    let shared = Arc::new(Shared {
        close: Mutex::new(None),
        close_requested: AtomicBool::new(false),
        notify: Notify::new(),
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        backlog: AtomicUsize::new(0),
        direct: Mutex::new(None),
    });
    (Outbound { tx, shared: shared.clone() }, OutboundRx { rx, shared })
}

impl Outbound {
    /// Sends a frame without waiting: straight into the socket's channel when nothing is
    /// backlogged (see the module docs), through the queue otherwise. On a full queue the
    /// client is disconnected (1008 + error frame) and [`SendError::Overflow`] returned.
    pub fn send(&self, frame: OutFrame) -> Result<(), SendError> {
        if self.is_closing() {
            return Err(SendError::Closed);
        }
        let frame = match self.shared.try_direct(frame) {
            Direct::Sent => return Ok(()),
            Direct::Closed => return Err(SendError::Closed),
            Direct::Declined(frame) => frame,
        };
        // Counted before it is queued, so no frame sent after this one goes direct until
        // the writer has written it.
        self.shared.backlog.fetch_add(1, Ordering::AcqRel);
        let len = frame.len();
        let before = self.shared.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before.saturating_add(len) > self.shared.max_bytes {
            self.shared.unqueue(len);
            self.close(CloseCmd::error(1008, OVERFLOW_MESSAGE));
            return Err(SendError::Overflow);
        }
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.unqueue(len);
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        self.close(CloseCmd::error(1008, OVERFLOW_MESSAGE));
                        Err(SendError::Overflow)
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(SendError::Closed),
                }
            }
        }
    }

    /// Queues a text frame (see [`Outbound::send`]).
    pub fn send_text(&self, text: impl Into<String>) -> Result<(), SendError> {
        self.send(OutFrame::Text(text.into()))
    }

    /// Asks the writer to end the connection. The first request wins.
    pub fn close(&self, cmd: CloseCmd) {
        if self.shared.close_requested.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(mut slot) = self.shared.close.lock() {
            *slot = Some(cmd);
        }
        self.shared.notify.notify_one();
    }

    /// True once a close was requested.
    pub fn is_closing(&self) -> bool {
        self.shared.close_requested.load(Ordering::Acquire)
    }

    /// True when both are handles of the same queue.
    pub fn same_queue(&self, other: &Outbound) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Shared {
    /// Puts `frame` straight into actix-ws's channel if nothing is backlogged and the
    /// channel has room; never waits (a contended lock declines too).
    fn try_direct(&self, frame: OutFrame) -> Direct {
        if self.backlog.load(Ordering::Acquire) != 0 {
            return Direct::Declined(frame);
        }
        let Ok(mut slot) = self.direct.try_lock() else { return Direct::Declined(frame) };
        let Some(session) = slot.as_mut() else { return Direct::Declined(frame) };
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut *session).poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => {}
            // Full, or the socket is gone: the queue and the writer take it from here.
            // The clone goes (a pending reservation would hold a place in the channel's
            // wait list); the writer puts one back when it has caught up.
            Poll::Ready(Err(_)) | Poll::Pending => {
                *slot = None;
                return Direct::Declined(frame);
            }
        }
        if Pin::new(&mut *session).start_send(frame.into_message()).is_err() {
            // Only if the writer closed the session between the two calls.
            *slot = None;
            return Direct::Closed;
        }
        // A no-op for actix-ws's channel sender; called because the `Sink` contract asks.
        let _ = Pin::new(&mut *session).poll_flush(&mut cx);
        Direct::Sent
    }

    /// Gives a queued frame's count and bytes back.
    fn unqueue(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        self.backlog.fetch_sub(1, Ordering::AcqRel);
    }

    /// The writer handed a queued frame to actix-ws: once the backlog is gone, the direct
    /// path opens again (with a fresh clone if a full channel took the last one away).
    fn written(&self, session: &Session) {
        if self.backlog.fetch_sub(1, Ordering::AcqRel) == 1 && !self.close_requested.load(Ordering::Acquire) {
            if let Ok(mut slot) = self.direct.lock() {
                if slot.is_none() {
                    *slot = Some(session.clone());
                }
            }
        }
    }

    /// Shuts the direct path for good (the writer is closing or gone). The clone must go
    /// before the writer drops its session: it keeps actix-ws's channel, and so the
    /// socket, open.
    fn shut_direct(&self) {
        let taken = self.direct.lock().ok().and_then(|mut slot| slot.take());
        drop(taken);
    }

    fn take_close(&self) -> Option<CloseCmd> {
        if !self.close_requested.load(Ordering::Acquire) {
            return None;
        }
        self.close.lock().ok().and_then(|mut slot| slot.take())
    }

    /// Waits until a close is requested and returns it.
    async fn closed(&self) -> CloseCmd {
        loop {
            if let Some(cmd) = self.take_close() {
                return cmd;
            }
            self.notify.notified().await;
        }
    }
}

impl OutboundRx {
    /// Waits until a close is requested and returns it.
    async fn closed(&self) -> CloseCmd {
        self.shared.closed().await
    }

    /// The next thing to do: a close request before any queued frame; `None` when every
    /// sender is gone without asking for a close.
    pub async fn next(&mut self) -> Option<WriterEvent> {
        let shared = &*self.shared;
        if let Some(cmd) = shared.take_close() {
            return Some(WriterEvent::Close(cmd));
        }
        tokio::select! {
            biased;
            cmd = shared.closed() => Some(WriterEvent::Close(cmd)),
            frame = self.rx.recv() => frame.map(|f| {
                shared.queued_bytes.fetch_sub(f.len(), Ordering::AcqRel);
                WriterEvent::Frame(f)
            }),
        }
    }
}

async fn write_frame(session: &mut Session, frame: OutFrame) -> Result<(), actix_ws::Closed> {
    match frame {
        OutFrame::Text(t) => session.text(t).await,
        OutFrame::Binary(b) => session.binary(b).await,
        OutFrame::Pong(b) => session.pong(&b).await,
    }
}

async fn finish(shared: &Shared, mut session: Session, cmd: CloseCmd, timeout: Duration) {
    shared.shut_direct();
    let work = async move {
        if let Some(msg) = &cmd.error_message {
            if session.text(error_frame(msg)).await.is_err() {
                return;
            }
        }
        if let Some((code, reason)) = cmd.close {
            let reason = CloseReason { code: CloseCode::from(code), description: Some(reason) };
            let _ = session.close(Some(reason)).await;
        }
        // Without a close frame the session is dropped here, which ends the response body
        // and so the TCP connection.
    };
    let _ = tokio::time::timeout(timeout, work).await;
}

/// Shuts the direct path however the writer ends (even when its task is dropped).
struct DirectGuard(Arc<Shared>);

impl Drop for DirectGuard {
    fn drop(&mut self) {
        self.0.shut_direct();
    }
}

/// The writer task: writes queued frames to `session` until a close is requested (which
/// it carries out) or the socket fails, then calls `on_done` (the connection actor stops
/// itself from there). While it runs, senders may bypass it (the direct path, see the
/// module docs).
pub async fn run_writer(
    mut rx: OutboundRx,
    mut session: Session,
    close_timeout: Duration,
    on_done: impl FnOnce(),
) {
    let shared = rx.shared.clone();
    if let Ok(mut slot) = shared.direct.lock() {
        *slot = Some(session.clone());
    }
    let _guard = DirectGuard(shared.clone());
    loop {
        match rx.next().await {
            Some(WriterEvent::Frame(frame)) => {
                // A client that stops reading blocks this write; a close must still get
                // through (and then gives up after `close_timeout`).
                let outcome = tokio::select! {
                    biased;
                    cmd = rx.closed() => Err(Some(cmd)),
                    r = write_frame(&mut session, frame) => r.map_err(|_| None),
                };
                match outcome {
                    Ok(()) => shared.written(&session),
                    Err(Some(cmd)) => {
                        finish(&shared, session, cmd, close_timeout).await;
                        break;
                    }
                    Err(None) => break,
                }
            }
            Some(WriterEvent::Close(cmd)) => {
                finish(&shared, session, cmd, close_timeout).await;
                break;
            }
            None => {
                finish(&shared, session, CloseCmd::close(1000, ""), close_timeout).await;
                break;
            }
        }
    }
    on_done();
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use actix_codec::Decoder;
    use actix_web::body::{BoxBody, MessageBody};
    use awc::ws::{Codec, Frame};
    use bytes::BytesMut;

    use super::*;

    #[actix_rt::test]
    async fn frames_flow_in_order_and_close_overtakes_them() {
        let (tx, mut rx) = channel(8, 1 << 20);
        tx.send_text("a").unwrap();
        tx.send(OutFrame::Binary(Bytes::from_static(b"bb"))).unwrap();
        assert_eq!(rx.next().await, Some(WriterEvent::Frame(OutFrame::Text("a".into()))));
        tx.close(CloseCmd::close(1001, "bye"));
        tx.close(CloseCmd::close(1008, "ignored: the first close wins"));
        assert_eq!(rx.next().await, Some(WriterEvent::Close(CloseCmd::close(1001, "bye"))));
        assert_eq!(tx.send_text("late"), Err(SendError::Closed));
    }

    #[actix_rt::test]
    async fn a_full_queue_closes_with_1008_and_never_blocks() {
        let (tx, mut rx) = channel(2, 1 << 20);
        tx.send_text("1").unwrap();
        tx.send_text("2").unwrap();
        assert_eq!(tx.send_text("3"), Err(SendError::Overflow));
        assert!(tx.is_closing());
        assert_eq!(rx.next().await, Some(WriterEvent::Close(CloseCmd::error(1008, OVERFLOW_MESSAGE))));
    }

    #[actix_rt::test]
    async fn the_byte_budget_is_enforced_but_one_big_frame_always_fits() {
        let (tx, mut rx) = channel(100, 10);
        tx.send(OutFrame::Binary(Bytes::from(vec![0; 50]))).unwrap();
        assert!(matches!(rx.next().await, Some(WriterEvent::Frame(OutFrame::Binary(b))) if b.len() == 50));
        tx.send(OutFrame::Binary(Bytes::from(vec![0; 6]))).unwrap();
        assert_eq!(tx.send(OutFrame::Binary(Bytes::from(vec![0; 6]))), Err(SendError::Overflow));
    }

    #[actix_rt::test]
    async fn dropping_every_sender_ends_the_stream() {
        let (tx, mut rx) = channel(2, 100);
        tx.send_text("x").unwrap();
        drop(tx);
        assert_eq!(rx.next().await, Some(WriterEvent::Frame(OutFrame::Text("x".into()))));
        assert_eq!(rx.next().await, None);
    }

    /// A websocket `Session` as the `/ws` endpoint gets it, and the response body that
    /// carries what it sends (what the client would read).
    async fn ws_session() -> (Session, BoxBody) {
        use actix_web::http::header;
        use actix_web::FromRequest;
        let (req, mut payload) = actix_web::test::TestRequest::default()
            .insert_header((header::UPGRADE, "websocket"))
            .insert_header((header::CONNECTION, "upgrade"))
            .insert_header((header::SEC_WEBSOCKET_VERSION, "13"))
            .insert_header((header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ=="))
            .to_http_parts();
        let body = actix_web::web::Payload::from_request(&req, &mut payload).await.unwrap();
        let (response, session, _stream) = actix_ws::handle(&req, body).unwrap();
        (session, response.into_body())
    }

    /// Reads the body like a client: frames until `until` says stop; `None` at its end.
    struct Reader {
        body: BoxBody,
        buf: BytesMut,
        codec: Codec,
    }

    impl Reader {
        fn new(body: BoxBody) -> Self {
            Reader { body, buf: BytesMut::new(), codec: Codec::new().client_mode().max_size(1 << 20) }
        }

        /// The next frame, `None` when the body ended; panics after 5 s of silence.
        async fn next(&mut self) -> Option<Frame> {
            loop {
                if let Some(frame) = self.codec.decode(&mut self.buf).unwrap() {
                    return Some(frame);
                }
                let chunk = poll_fn(|cx| Pin::new(&mut self.body).poll_next(cx));
                match tokio::time::timeout(Duration::from_secs(5), chunk).await.expect("a frame in time") {
                    Some(chunk) => self.buf.extend_from_slice(&chunk.unwrap()),
                    None => return None,
                }
            }
        }

        async fn binary(&mut self) -> u32 {
            match self.next().await {
                Some(Frame::Binary(b)) => u32::from_be_bytes(b[..].try_into().unwrap()),
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    }

    fn numbered(i: u32) -> OutFrame {
        OutFrame::Binary(Bytes::copy_from_slice(&i.to_be_bytes()))
    }

    fn direct_open(tx: &Outbound) -> bool {
        tx.shared.direct.lock().unwrap().is_some()
    }

    async fn writer(session: Session, rx: OutboundRx) {
        actix_rt::spawn(run_writer(rx, session, Duration::from_secs(5), || {}));
        // Let it start (and open the direct path).
        tokio::task::yield_now().await;
    }

    #[actix_rt::test]
    async fn frames_keep_their_order_when_the_direct_path_and_the_queue_alternate() {
        let (session, body) = ws_session().await;
        let mut client = Reader::new(body);
        let (tx, rx) = channel(1000, 1 << 20);
        writer(session, rx).await;
        assert!(direct_open(&tx));
        // A frame that could not go direct (here: the direct path's lock was busy) is
        // queued, and the next one queues behind it although the channel has room.
        let busy = tx.shared.direct.lock().unwrap();
        tx.send(numbered(0)).unwrap();
        drop(busy);
        tx.send(numbered(1)).unwrap();
        assert_eq!(tx.shared.backlog.load(Ordering::Acquire), 2);
        assert_eq!(client.binary().await, 0);
        assert_eq!(client.binary().await, 1);
        tokio::task::yield_now().await;
        assert_eq!(tx.shared.backlog.load(Ordering::Acquire), 0);
        // Nothing backlogged: straight into actix-ws's channel, no queue.
        tx.send(numbered(2)).unwrap();
        assert_eq!(tx.shared.backlog.load(Ordering::Acquire), 0);
        // More than actix-ws's channel holds (32): the rest goes through the queue.
        for i in 3..100 {
            tx.send(numbered(i)).unwrap();
        }
        assert!(tx.shared.backlog.load(Ordering::Acquire) > 0);
        assert!(!direct_open(&tx), "a full channel takes the direct path away");
        for i in 2..50 {
            assert_eq!(client.binary().await, i);
        }
        // Sent while the writer still has a backlog: queued behind it.
        for i in 100..110 {
            tx.send(numbered(i)).unwrap();
        }
        for i in 50..110 {
            assert_eq!(client.binary().await, i);
        }
        // The writer caught up: the direct path is open again.
        tokio::task::yield_now().await;
        assert_eq!(tx.shared.backlog.load(Ordering::Acquire), 0);
        assert!(direct_open(&tx));
        for i in 110..115 {
            tx.send(numbered(i)).unwrap();
            assert_eq!(tx.shared.backlog.load(Ordering::Acquire), 0, "frame {i} was queued");
        }
        tx.send_text("last").unwrap();
        for i in 110..115 {
            assert_eq!(client.binary().await, i);
        }
        assert!(matches!(client.next().await, Some(Frame::Text(t)) if t == "last"));
    }

    #[actix_rt::test]
    async fn a_client_that_stops_reading_still_overflows_with_1008_past_the_direct_path() {
        let (session, body) = ws_session().await;
        let (tx, rx) = channel(4, 1 << 20);
        writer(session, rx).await;
        let mut sent = 0;
        let overflowed = loop {
            match tx.send(numbered(sent)) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 100, "never overflowed");
            tokio::task::yield_now().await;
        };
        assert_eq!(overflowed, SendError::Overflow);
        // actix-ws's channel (32), the frame in the writer's hands, the queue (4).
        assert_eq!(sent, 32 + 1 + 4);
        assert_eq!(tx.send(numbered(sent)), Err(SendError::Closed));
        // The client reads again: what actix-ws holds, then the close overtakes the queue.
        let mut client = Reader::new(body);
        let mut got = Vec::new();
        let error = loop {
            match client.next().await {
                Some(Frame::Binary(b)) => got.push(u32::from_be_bytes(b[..].try_into().unwrap())),
                Some(Frame::Text(t)) => break t,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(got, (0..got.len() as u32).collect::<Vec<_>>());
        assert!((32..=33).contains(&got.len()), "{} frames", got.len());
        assert_eq!(&error[..], error_frame(OVERFLOW_MESSAGE).as_bytes());
        match client.next().await {
            Some(Frame::Close(Some(r))) => assert_eq!(u16::from(r.code), 1008),
            other => panic!("expected the close, got {other:?}"),
        }
    }

    #[actix_rt::test]
    async fn dropping_the_socket_ends_the_body_although_the_direct_path_held_a_session() {
        let (session, body) = ws_session().await;
        let mut client = Reader::new(body);
        let (tx, rx) = channel(8, 1 << 20);
        writer(session, rx).await;
        tx.send(numbered(7)).unwrap();
        assert_eq!(tx.shared.backlog.load(Ordering::Acquire), 0);
        tx.close(CloseCmd::drop_socket());
        assert_eq!(client.binary().await, 7);
        // No close frame, and the body (so the TCP connection) ends although `tx` lives.
        assert_eq!(client.next().await, None);
        assert!(!direct_open(&tx));
        assert_eq!(tx.send(numbered(8)), Err(SendError::Closed));
    }

    #[test]
    fn error_frame_shape() {
        let v: serde_json::Value = serde_json::from_str(&error_frame("x \"y\"")).unwrap();
        assert_eq!(v, serde_json::json!({"type": "error", "message": "x \"y\""}));
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["type", "message"]);
    }
}
