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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_ws::{CloseCode, CloseReason, Session};
use bytes::Bytes;
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
    });
    (Outbound { tx, shared: shared.clone() }, OutboundRx { rx, shared })
}

impl Outbound {
    /// Queues a frame without waiting. On a full queue the client is disconnected
    /// (1008 + error frame) and [`SendError::Overflow`] returned.
    pub fn send(&self, frame: OutFrame) -> Result<(), SendError> {
        if self.is_closing() {
            return Err(SendError::Closed);
        }
        let len = frame.len();
        let before = self.shared.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before.saturating_add(len) > self.shared.max_bytes {
            self.shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.close(CloseCmd::error(1008, OVERFLOW_MESSAGE));
            return Err(SendError::Overflow);
        }
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
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

async fn finish(mut session: Session, cmd: CloseCmd, timeout: Duration) {
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

/// The writer task: writes queued frames to `session` until a close is requested (which
/// it carries out) or the socket fails, then calls `on_done` (the connection actor stops
/// itself from there).
pub async fn run_writer(
    mut rx: OutboundRx,
    mut session: Session,
    close_timeout: Duration,
    on_done: impl FnOnce(),
) {
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
                    Ok(()) => {}
                    Err(Some(cmd)) => {
                        finish(session, cmd, close_timeout).await;
                        break;
                    }
                    Err(None) => break,
                }
            }
            Some(WriterEvent::Close(cmd)) => {
                finish(session, cmd, close_timeout).await;
                break;
            }
            None => {
                finish(session, CloseCmd::close(1000, ""), close_timeout).await;
                break;
            }
        }
    }
    on_done();
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn error_frame_shape() {
        let v: serde_json::Value = serde_json::from_str(&error_frame("x \"y\"")).unwrap();
        assert_eq!(v, serde_json::json!({"type": "error", "message": "x \"y\""}));
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["type", "message"]);
    }
}
