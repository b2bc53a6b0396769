//! The way out to one client: a bounded queue of frames, and the response body that
//! writes them to the socket.
//!
//! Anyone may push a frame for a client: its own connection actor (`connection_info`,
//! pongs, rejects) and the connection actors of other clients routing to it. None of them
//! may block on a slow client, and memory must not grow without bound, so the queue is
//! bounded in frames *and* bytes, and pushing never waits.
//!
//! **The socket side.** The queue is drained by the websocket response body itself
//! ([`OutboundBody`], which replaces actix-ws's): actix-http's dispatcher polls it whenever
//! it can write, and it hands over everything queued, each frame as a websocket header and
//! the payload as it was pushed (no copy, no re-encoding). A push wakes the dispatcher
//! directly: a routed frame costs one lock, one queue push and one task wake-up between
//! the two sockets, with no writer task and no channel in between. The dispatcher stops
//! polling while its write buffer is full (the client does not read), so frames then
//! stay in the queue, which is what bounds them.
//!
//! **Overflow policy.** A push that finds the queue full does not wait and does not drop
//! silently: the client is too slow to keep up with its traffic, so it is disconnected with
//! an error frame and close code 1008 ([`OVERFLOW_MESSAGE`]). The frame that did not fit is
//! dropped; the caller learns it from [`SendError::Overflow`].
//!
//! **Closing.** A close request ([`Outbound::close`]) goes out after the frames queued
//! before it (a reply sent just before a close arrives, as upstream's ordered sends
//! deliver it) and refuses later ones; the body then writes the optional error frame and
//! the close frame (or nothing, to drop the socket) and ends, which ends the TCP
//! connection. The close of an overflow overtakes the queue instead (the client is not
//! reading it), and so does dropping the socket. The first close request wins; later ones are ignored. A watcher task ([`Outbound::watch`],
//! idle until then) tells the connection when the socket is done, or after
//! `close_timeout` if a client that does not read keeps the close from being written.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::Notify;

use crate::wsframe::{Header, MAX_HEADER, OP_BINARY, OP_CLOSE, OP_PONG, OP_TEXT};

/// The error message sent to a client whose outbound queue overflowed.
pub const OVERFLOW_MESSAGE: &str = "Send queue overflow: the client does not read its messages fast enough";

/// Control frame payloads are at most this long (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Payloads up to this size are copied next to their header, so a batch of small frames
/// is one chunk for the dispatcher (which copies every chunk into its write buffer
/// anyway); larger ones follow their header as a chunk of their own, uncopied.
const COPY_LIMIT: usize = 4096;

/// One frame to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFrame {
    /// A JSON control frame (`connection_info`, `pong`, `reconnection_token`, `error`).
    Text(String),
    /// An RPC frame.
    Binary(Bytes),
    /// An RPC frame whose payload is `head` then `tail`: a re-stamped `main` and the
    /// sender's extra bytes as they arrived, so that a large payload is relayed without
    /// being copied into a fresh frame first (hypha-core `RawMain::restamp_parts`).
    Split {
        /// The first bytes of the payload.
        head: Bytes,
        /// The rest.
        tail: Bytes,
    },
    /// The answer to a protocol-level ping.
    Pong(Bytes),
}

impl OutFrame {
    /// An RPC frame of `head` then `tail` (one piece when `tail` is empty).
    pub fn binary(head: Bytes, tail: Bytes) -> Self {
        if tail.is_empty() {
            OutFrame::Binary(head)
        } else {
            OutFrame::Split { head, tail }
        }
    }

    fn len(&self) -> usize {
        match self {
            OutFrame::Text(s) => s.len(),
            OutFrame::Binary(b) | OutFrame::Pong(b) => b.len(),
            OutFrame::Split { head, tail } => head.len() + tail.len(),
        }
    }

    /// The websocket opcode and the payload's pieces (a pong's cut to a control frame's
    /// limit; the second piece is empty but for [`OutFrame::Split`]).
    fn into_parts(self) -> (u8, [Bytes; 2]) {
        match self {
            OutFrame::Text(t) => (OP_TEXT, [Bytes::from(t), Bytes::new()]),
            OutFrame::Binary(b) => (OP_BINARY, [b, Bytes::new()]),
            OutFrame::Split { head, tail } => (OP_BINARY, [head, tail]),
            OutFrame::Pong(b) => (OP_PONG, [b.slice(..b.len().min(MAX_CONTROL_PAYLOAD)), Bytes::new()]),
        }
    }

    /// What the frame takes in a body's arena: its header, and the pieces it copies.
    fn arena_need(&self) -> usize {
        let copied = |n: usize| if n <= COPY_LIMIT { n } else { 0 };
        MAX_HEADER
            + match self {
                OutFrame::Text(s) => copied(s.len()),
                OutFrame::Binary(b) | OutFrame::Pong(b) => copied(b.len()),
                OutFrame::Split { head, tail } => copied(head.len()) + copied(tail.len()),
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

/// What the senders and the socket share, under one lock.
#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<OutFrame>,
    /// Payload bytes in `frames`.
    bytes: usize,
    /// The socket's body, waiting for frames.
    waker: Option<Waker>,
    /// A close requested and not carried out yet.
    close: Option<CloseCmd>,
    /// The close drops the queued frames instead of following them (overflow).
    close_overtakes: bool,
    /// The socket is gone (its body ended or was dropped): frames are refused.
    ended: bool,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Set by the first close request (read without the lock on every push).
    close_requested: AtomicBool,
    /// Wakes the watcher: a close was requested, or the socket is gone.
    notify: Notify,
    max_frames: usize,
    max_bytes: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics under this lock; a poisoned one still holds a consistent queue.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The socket is gone: refuse frames from now on and tell the watcher.
    fn end(&self) {
        let mut q = self.lock();
        q.ended = true;
        q.frames.clear();
        q.bytes = 0;
        drop(q);
        self.notify.notify_one();
    }
}

/// The sending half: cheap to clone, shared by everyone who writes to this client.
#[derive(Clone)]
pub struct Outbound {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = self.shared.lock();
        f.debug_struct("Outbound")
            .field("queued_frames", &q.frames.len())
            .field("queued_bytes", &q.bytes)
            .field("closing", &self.is_closing())
            .finish()
    }
}

/// The receiving half, before it becomes the socket's body ([`OutboundRx::into_body`]).
#[derive(Debug)]
pub struct OutboundRx {
    shared: Arc<Shared>,
}

/// What the socket does next.
#[derive(Debug, PartialEq, Eq)]
pub enum WriterEvent {
    /// Write this frame.
    Frame(OutFrame),
    /// Close the connection this way and stop.
    Close(CloseCmd),
}

/// A new queue holding at most `max_frames` frames and (unless empty) `max_bytes` bytes.
pub fn channel(max_frames: usize, max_bytes: usize) -> (Outbound, OutboundRx) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        close_requested: AtomicBool::new(false),
        notify: Notify::new(),
        max_frames: max_frames.max(1),
        max_bytes,
    });
    (Outbound { shared: shared.clone() }, OutboundRx { shared })
}

impl Outbound {
    /// Queues a frame without waiting and wakes the socket. On a full queue the client is
    /// disconnected (1008 + error frame) and [`SendError::Overflow`] returned.
    pub fn send(&self, frame: OutFrame) -> Result<(), SendError> {
        if self.is_closing() {
            return Err(SendError::Closed);
        }
        let shared = &*self.shared;
        let mut q = shared.lock();
        if q.ended {
            return Err(SendError::Closed);
        }
        let len = frame.len();
        if q.frames.len() >= shared.max_frames
            || (q.bytes > 0 && q.bytes.saturating_add(len) > shared.max_bytes)
        {
            drop(q);
            self.request_close(CloseCmd::error(1008, OVERFLOW_MESSAGE), true);
            return Err(SendError::Overflow);
        }
        q.bytes += len;
        q.frames.push_back(frame);
        let waker = q.waker.take();
        drop(q);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Queues a text frame (see [`Outbound::send`]).
    pub fn send_text(&self, text: impl Into<String>) -> Result<(), SendError> {
        self.send(OutFrame::Text(text.into()))
    }

    /// Asks the socket to end the connection once the frames queued so far are written.
    /// The first request wins.
    /// Dropping the socket ([`CloseCmd::drop_socket`]) does not wait for them.
    pub fn close(&self, cmd: CloseCmd) {
        let overtake = cmd.close.is_none();
        self.request_close(cmd, overtake);
    }

    fn request_close(&self, cmd: CloseCmd, overtake: bool) {
        if self.shared.close_requested.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut q = self.shared.lock();
        q.close = Some(cmd);
        q.close_overtakes = overtake;
        let waker = q.waker.take();
        drop(q);
        if let Some(waker) = waker {
            waker.wake();
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

    /// The watcher: idle until a close is requested or the socket is gone; then it waits
    /// (at most `close_timeout`) for the socket to finish, shuts the queue and calls
    /// `on_done` (the connection actor stops itself from there).
    pub fn watch(&self, close_timeout: Duration, on_done: impl FnOnce()) -> impl Future<Output = ()> {
        let shared = self.shared.clone();
        async move {
            let ended = || shared.lock().ended;
            while !ended() && !shared.close_requested.load(Ordering::Acquire) {
                shared.notify.notified().await;
            }
            let finished = async {
                while !ended() {
                    shared.notify.notified().await;
                }
            };
            let _ = tokio::time::timeout(close_timeout, finished).await;
            shared.end();
            on_done();
        }
    }
}

impl OutboundRx {
    /// The next thing to write: a queued frame, then a close request (before the queued
    /// frames if it overtakes them); `None` once the socket is gone.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<WriterEvent>> {
        let mut q = self.shared.lock();
        if q.close.is_some() && (q.close_overtakes || q.frames.is_empty()) {
            q.frames.clear();
            q.bytes = 0;
            return Poll::Ready(q.close.take().map(WriterEvent::Close));
        }
        if let Some(frame) = q.frames.pop_front() {
            q.bytes -= frame.len();
            return Poll::Ready(Some(WriterEvent::Frame(frame)));
        }
        if q.ended {
            return Poll::Ready(None);
        }
        q.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Waits for the next thing to write (see `poll_event`); for tests that stand in for
    /// the socket.
    pub async fn next(&mut self) -> Option<WriterEvent> {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The websocket response body that writes this queue to the socket. `keep` is the
    /// body actix-ws made for the same response: it is held, never polled, because
    /// dropping it is what tells actix-ws's message stream (the inbound side) that the
    /// socket is gone.
    pub fn into_body(self, keep: BoxBody) -> OutboundBody {
        OutboundBody {
            shared: self.shared,
            batch: VecDeque::new(),
            chunks: VecDeque::new(),
            arena: BytesMut::new(),
            state: BodyState::Open,
            _keep: keep,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Open,
    /// The close is in `chunks`; the body ends after them.
    Closing,
    Ended,
}

/// A websocket response body fed by an [`Outbound`] queue (see the module docs).
pub struct OutboundBody {
    shared: Arc<Shared>,
    /// Frames taken from the queue in one go (swapped with the queue's, so neither side
    /// allocates once both have grown).
    batch: VecDeque<OutFrame>,
    /// Encoded pieces ready for the dispatcher, in order.
    chunks: VecDeque<Bytes>,
    /// Where the headers and small payloads of a batch are written, reserved at the
    /// batch's size; each chunk is a slice of it. Let go whenever the queue is empty, so
    /// that an idle connection holds no buffer (10,000 idle clients held 16 KiB each
    /// when it was a standing 16 KiB arena).
    arena: BytesMut,
    state: BodyState,
    _keep: BoxBody,
}

impl std::fmt::Debug for OutboundBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundBody")
            .field("chunks", &self.chunks.len())
            .field("state", &self.state)
            .finish()
    }
}

impl OutboundBody {
    /// Writes a frame: a final, unmasked header, then the payload's pieces in order, each
    /// copied or passed on as its own chunk (see [`COPY_LIMIT`]).
    fn push_frame(&mut self, opcode: u8, pieces: [Bytes; 2]) {
        let len = pieces[0].len() + pieces[1].len();
        let header = Header::new(opcode, len, None);
        let header = header.as_bytes();
        let copied = |p: &Bytes| p.len() <= COPY_LIMIT;
        let need = header.len() + pieces.iter().filter(|p| copied(p)).map(Bytes::len).sum::<usize>();
        if self.arena.capacity() - self.arena.len() < need {
            self.arena.reserve(need);
        }
        self.arena.extend_from_slice(header);
        for piece in pieces {
            if copied(&piece) {
                self.arena.extend_from_slice(&piece);
            } else {
                self.flush();
                self.chunks.push_back(piece);
            }
        }
    }

    /// Hands what the arena holds to the dispatcher as one chunk.
    fn flush(&mut self) {
        if !self.arena.is_empty() {
            self.chunks.push_back(self.arena.split().freeze());
        }
    }

    /// The error frame and the close frame of `cmd` (a close reason is cut, at a char
    /// boundary, to what a control frame holds).
    fn push_close(&mut self, cmd: CloseCmd) {
        if let Some(message) = &cmd.error_message {
            self.push_frame(OP_TEXT, [Bytes::from(error_frame(message)), Bytes::new()]);
        }
        if let Some((code, reason)) = cmd.close {
            let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            let mut payload = BytesMut::with_capacity(2 + end);
            payload.put_u16(code);
            payload.extend_from_slice(&reason.as_bytes()[..end]);
            self.push_frame(OP_CLOSE, [payload.freeze(), Bytes::new()]);
        }
        self.flush();
    }

    fn end(&mut self) {
        if self.state != BodyState::Ended {
            self.state = BodyState::Ended;
            self.chunks.clear();
            self.shared.end();
        }
    }
}

impl MessageBody for OutboundBody {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.chunks.pop_front() {
                return Poll::Ready(Some(Ok(chunk)));
            }
            if this.state != BodyState::Open {
                this.end();
                return Poll::Ready(None);
            }
            let mut q = this.shared.lock();
            if q.close.is_some() && (q.close_overtakes || q.frames.is_empty()) {
                let cmd = q.close.take();
                q.frames.clear();
                q.bytes = 0;
                drop(q);
                this.state = BodyState::Closing;
                if let Some(cmd) = cmd {
                    this.push_close(cmd);
                }
                continue;
            }
            if q.frames.is_empty() {
                if q.ended {
                    drop(q);
                    this.end();
                    return Poll::Ready(None);
                }
                q.waker = Some(cx.waker().clone());
                drop(q);
                this.arena = BytesMut::new();
                return Poll::Pending;
            }
            std::mem::swap(&mut q.frames, &mut this.batch);
            q.bytes = 0;
            drop(q);
            let mut batch = std::mem::take(&mut this.batch);
            this.arena.reserve(batch.iter().map(OutFrame::arena_need).sum());
            for frame in batch.drain(..) {
                let (opcode, pieces) = frame.into_parts();
                this.push_frame(opcode, pieces);
            }
            this.flush();
            this.batch = batch;
        }
    }
}

impl Drop for OutboundBody {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use actix_codec::Decoder;
    use awc::ws::{Codec, Frame};

    use super::*;

    #[actix_rt::test]
    async fn frames_flow_in_order_and_a_close_follows_the_frames_queued_before_it() {
        let (tx, mut rx) = channel(8, 1 << 20);
        tx.send_text("a").unwrap();
        tx.send(OutFrame::Binary(Bytes::from_static(b"bb"))).unwrap();
        assert_eq!(rx.next().await, Some(WriterEvent::Frame(OutFrame::Text("a".into()))));
        tx.close(CloseCmd::close(1001, "bye"));
        tx.close(CloseCmd::close(1008, "ignored: the first close wins"));
        assert_eq!(tx.send_text("late"), Err(SendError::Closed));
        assert_eq!(rx.next().await, Some(WriterEvent::Frame(OutFrame::Binary(Bytes::from_static(b"bb")))));
        assert_eq!(rx.next().await, Some(WriterEvent::Close(CloseCmd::close(1001, "bye"))));
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

    /// Reads a body like a client: polls it (as actix-http's dispatcher does when it can
    /// write) and decodes what it yields.
    struct Reader {
        body: Pin<Box<OutboundBody>>,
        buf: BytesMut,
        codec: Codec,
        ended: bool,
    }

    impl Reader {
        fn new(rx: OutboundRx) -> Self {
            Reader {
                body: Box::pin(rx.into_body(BoxBody::new(()))),
                buf: BytesMut::new(),
                codec: Codec::new().client_mode().max_size(1 << 20),
                ended: false,
            }
        }

        /// Takes whatever the body has ready now; true if it ended.
        fn pump(&mut self) -> bool {
            let mut cx = Context::from_waker(Waker::noop());
            while !self.ended {
                match self.body.as_mut().poll_next(&mut cx) {
                    Poll::Ready(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                    Poll::Ready(None) => self.ended = true,
                    Poll::Pending => break,
                }
            }
            self.ended
        }

        /// The frames decoded so far.
        fn frames(&mut self) -> Vec<Frame> {
            self.pump();
            std::iter::from_fn(|| self.codec.decode(&mut self.buf).unwrap()).collect()
        }
    }

    fn numbered(i: u32) -> OutFrame {
        OutFrame::Binary(Bytes::copy_from_slice(&i.to_be_bytes()))
    }

    fn number(frame: &Frame) -> u32 {
        match frame {
            Frame::Binary(b) => u32::from_be_bytes(b[..].try_into().unwrap()),
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }

    #[test]
    fn the_body_writes_every_frame_kind_in_order_with_the_right_header() {
        let (tx, rx) = channel(1000, 1 << 30);
        let mut client = Reader::new(rx);
        assert!(client.frames().is_empty());
        tx.send_text("hello").unwrap();
        // The three payload length forms: 7 bits, 16 bits, 64 bits.
        for len in [0, 125, 126, 65535, 65536, 70000] {
            tx.send(OutFrame::Binary(Bytes::from(vec![7; len]))).unwrap();
        }
        tx.send(OutFrame::Pong(Bytes::from(vec![1; 200]))).unwrap();
        let frames = client.frames();
        assert_eq!(frames.len(), 8);
        assert!(matches!(&frames[0], Frame::Text(t) if &t[..] == b"hello"));
        for (frame, len) in frames[1..7].iter().zip([0, 125, 126, 65535, 65536, 70000]) {
            assert!(matches!(frame, Frame::Binary(b) if b.len() == len && b.iter().all(|x| *x == 7)));
        }
        assert!(matches!(&frames[7], Frame::Pong(p) if p.len() == 125), "pong cut to 125 bytes");
        // Batches keep their order across polls.
        for i in 0..50 {
            tx.send(numbered(i)).unwrap();
            if i % 7 == 0 {
                client.pump();
            }
        }
        let got: Vec<u32> = client.frames().iter().map(number).collect();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn a_split_frame_is_one_frame_of_both_pieces_with_a_large_piece_passed_on_uncopied() {
        let (tx, rx) = channel(100, 1 << 30);
        let mut body = Box::pin(rx.into_body(BoxBody::new(())));
        let big = Bytes::from(vec![9; 300_000]);
        let cases = [
            (b"main".to_vec(), big.clone()),
            (vec![1; 20], Bytes::from(vec![2; 30])),
            (vec![3; 70_000], big),
        ];
        for (head, tail) in &cases {
            tx.send(OutFrame::binary(Bytes::from(head.clone()), tail.clone())).unwrap();
        }
        assert!(matches!(OutFrame::binary(Bytes::from_static(b"x"), Bytes::new()), OutFrame::Binary(_)));
        let mut chunks = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        while let Poll::Ready(Some(Ok(chunk))) = body.as_mut().poll_next(&mut cx) {
            chunks.push(chunk);
        }
        let uncopied = chunks.iter().filter(|c| c.as_ptr() == cases[0].1.as_ptr()).count();
        assert_eq!(uncopied, 2, "the large tail went to the dispatcher as it was, both times");
        let mut buf = BytesMut::from_iter(chunks.iter().flat_map(|c| c.iter().copied()));
        let mut codec = Codec::new().client_mode().max_size(1 << 20);
        for (head, tail) in cases {
            let frame = codec.decode(&mut buf).unwrap().unwrap();
            assert_eq!(frame, Frame::Binary(Bytes::from([&head[..], &tail[..]].concat())));
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn a_client_that_stops_reading_overflows_with_1008_and_the_close_overtakes_the_queue() {
        let (tx, rx) = channel(4, 1 << 20);
        let mut client = Reader::new(rx);
        tx.send(numbered(0)).unwrap();
        assert_eq!(client.frames().iter().map(number).collect::<Vec<_>>(), [0]);
        // The socket takes nothing more (its write buffer is full): the queue fills.
        for i in 1..5 {
            tx.send(numbered(i)).unwrap();
        }
        assert_eq!(tx.send(numbered(5)), Err(SendError::Overflow));
        assert_eq!(tx.send(numbered(6)), Err(SendError::Closed));
        let frames = client.frames();
        assert!(client.ended, "the body ends after the close frame");
        assert_eq!(frames.len(), 2, "the queued frames were dropped: {frames:?}");
        assert!(matches!(&frames[0], Frame::Text(t) if &t[..] == error_frame(OVERFLOW_MESSAGE).as_bytes()));
        match &frames[1] {
            Frame::Close(Some(r)) => {
                assert_eq!(u16::from(r.code), 1008);
                assert_eq!(r.description.as_deref(), Some(OVERFLOW_MESSAGE));
            }
            other => panic!("expected the close, got {other:?}"),
        }
    }

    #[test]
    fn an_idle_body_holds_no_buffer() {
        let (tx, rx) = channel(100, 1 << 20);
        let mut client = Reader::new(rx);
        for i in 0..20 {
            tx.send(numbered(i)).unwrap();
        }
        tx.send(OutFrame::Binary(Bytes::from(vec![1; 3000]))).unwrap();
        assert_eq!(client.frames().len(), 21);
        assert_eq!(client.body.arena.capacity(), 0, "the batch's buffer was let go once the queue was empty");
    }

    #[test]
    fn a_close_is_written_after_the_frames_queued_before_it() {
        let (tx, rx) = channel(8, 1 << 20);
        let mut client = Reader::new(rx);
        tx.send(numbered(1)).unwrap();
        tx.send(numbered(2)).unwrap();
        tx.close(CloseCmd::close(1001, "bye"));
        assert_eq!(tx.send(numbered(3)), Err(SendError::Closed));
        let frames = client.frames();
        assert!(client.ended, "the body ends after the close frame");
        assert_eq!(frames[..2].iter().map(number).collect::<Vec<_>>(), [1, 2]);
        assert!(matches!(&frames[2..], [Frame::Close(Some(r))] if u16::from(r.code) == 1001), "{frames:?}");
    }

    #[test]
    fn a_long_close_reason_is_cut_at_a_char_boundary() {
        let (tx, rx) = channel(4, 1 << 20);
        let mut client = Reader::new(rx);
        tx.close(CloseCmd::close(4000, "é".repeat(100)));
        match &client.frames()[..] {
            [Frame::Close(Some(r))] => {
                assert_eq!(u16::from(r.code), 4000);
                assert_eq!(r.description.as_deref(), Some("é".repeat(61).as_str()));
            }
            other => panic!("expected one close frame, got {other:?}"),
        }
    }

    #[test]
    fn dropping_the_socket_ends_the_body_without_a_close_frame() {
        let (tx, rx) = channel(8, 1 << 20);
        let mut client = Reader::new(rx);
        tx.send(numbered(7)).unwrap();
        assert_eq!(client.frames().iter().map(number).collect::<Vec<_>>(), [7]);
        tx.send(numbered(8)).unwrap();
        tx.close(CloseCmd::drop_socket());
        assert!(client.frames().is_empty());
        assert!(client.ended);
        assert_eq!(tx.send(numbered(9)), Err(SendError::Closed));
    }

    #[actix_rt::test]
    async fn the_watcher_reports_a_socket_that_went_away() {
        let (tx, rx) = channel(8, 1 << 20);
        let client = Reader::new(rx);
        let done = Rc::new(Cell::new(false));
        let flag = done.clone();
        let watcher = tokio::task::spawn_local(tx.watch(Duration::from_secs(60), move || flag.set(true)));
        tokio::task::yield_now().await;
        assert!(!done.get(), "nothing happened yet");
        drop(client);
        watcher.await.unwrap();
        assert!(done.get());
        assert_eq!(tx.send(numbered(1)), Err(SendError::Closed));
    }

    #[actix_rt::test]
    async fn the_watcher_gives_up_on_a_close_the_client_does_not_read() {
        let (tx, rx) = channel(8, 1 << 20);
        let _client = Reader::new(rx);
        let done = Rc::new(Cell::new(false));
        let flag = done.clone();
        let watcher = tokio::task::spawn_local(tx.watch(Duration::from_millis(50), move || flag.set(true)));
        tx.close(CloseCmd::close(1001, "bye"));
        // The body is never polled (the client's socket is full): the timeout ends it.
        tokio::time::timeout(Duration::from_secs(5), watcher).await.expect("in time").unwrap();
        assert!(done.get());
    }

    #[actix_rt::test]
    async fn the_watcher_reports_a_close_once_the_body_wrote_it() {
        let (tx, rx) = channel(8, 1 << 20);
        let mut client = Reader::new(rx);
        let done = Rc::new(Cell::new(false));
        let flag = done.clone();
        let watcher = tokio::task::spawn_local(tx.watch(Duration::from_secs(60), move || flag.set(true)));
        tx.close(CloseCmd::close(1000, ""));
        tokio::task::yield_now().await;
        assert!(!done.get(), "the close is not written yet");
        assert!(matches!(&client.frames()[..], [Frame::Close(Some(r))] if u16::from(r.code) == 1000));
        tokio::time::timeout(Duration::from_secs(5), watcher).await.expect("in time").unwrap();
        assert!(done.get());
    }

    #[test]
    fn error_frame_shape() {
        let v: serde_json::Value = serde_json::from_str(&error_frame("x \"y\"")).unwrap();
        assert_eq!(v, serde_json::json!({"type": "error", "message": "x \"y\""}));
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["type", "message"]);
    }
}
