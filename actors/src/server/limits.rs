//! Limits that do not depend on actix: the message-rate token bucket and the inbound
//! frame-size guard (server spec §2.5), handshake admission control (§2.1 step 4) and the
//! message-rate load meter of load-balanced clients (§5.3 `min_load`).
//!
//! The bucket, the guard and the meter are plain state machines driven by their caller
//! (time comes in as `now`), so they are unit-tested here without sockets.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::error::PayloadError;
use bytes::Bytes;
use futures_util::Stream;

use crate::wsframe::{header_len, payload_len, MAX_HEADER};

/// A token bucket: `burst` tokens, refilled at `rate` per second; each binary frame takes
/// one. Upstream limits binary frames at 200/s with a burst of 2000 per connection.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst);
        TokenBucket { rate, burst, tokens: burst, last: now }
    }

    /// Takes one token if there is one; `false` means the limit is exceeded.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.take_or_wait(now).is_ok()
    }

    /// Takes one token if there is one; otherwise how long until one is back (what
    /// upstream's HTTP limiter sends, rounded up, as `Retry-After`).
    pub fn take_or_wait(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate)
                .unwrap_or(Duration::from_secs(1)))
        }
    }

    /// Whether the bucket has refilled completely by `now`: it is then indistinguishable
    /// from a new one, so a table of buckets can drop it.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
    }
}

/// The close reason (code 1013) of a handshake that waited too long for an admission slot;
/// upstream's text.
pub const SERVER_BUSY_REASON: &str = "Server busy, please retry";

/// Admission control for handshakes (spec §2.1 step 4): at most `slots` connections are
/// in their auth/setup phase at once. The others wait for a slot, at most for the
/// configured time, so that a reconnect storm cannot pile up setup work (upstream's
/// `HYPHA_MAX_CONCURRENT_CONNECTIONS`, 10, with a 30 s wait). The long-lived connection
/// holds no slot: a slot is held from the auth frame until `connection_info` or the refusal.
#[derive(Debug, Clone)]
pub struct Admission {
    slots: Arc<tokio::sync::Semaphore>,
    wait: Duration,
}

/// A held admission slot; dropping it frees the slot.
pub type AdmissionSlot = tokio::sync::OwnedSemaphorePermit;

impl Admission {
    /// `slots` concurrent handshakes (at least one), waiting at most `wait` for a slot.
    pub fn new(slots: usize, wait: Duration) -> Self {
        let slots = slots.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Admission { slots: Arc::new(tokio::sync::Semaphore::new(slots)), wait }
    }

    /// A slot at once, if one is free.
    pub fn try_enter(&self) -> Option<AdmissionSlot> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Waits for a slot; `None` when none freed up within the configured wait.
    pub fn enter(&self) -> impl std::future::Future<Output = Option<AdmissionSlot>> + 'static {
        let (slots, wait) = (self.slots.clone(), self.wait);
        async move { tokio::time::timeout(wait, slots.acquire_owned()).await.ok().and_then(Result::ok) }
    }

    /// Free slots right now.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

/// The load of a load-balanced client (one whose id ends with `__rlb`), as upstream
/// measures it: the frames it sent per minute over the current window, the window
/// restarting once it is a minute old (spec §5.3 `min_load`).
#[derive(Debug, Clone, Copy)]
pub struct LoadMeter {
    window_start: Instant,
    frames: u64,
}

/// The length of a load-measuring window.
pub const LOAD_WINDOW: Duration = Duration::from_secs(60);

impl LoadMeter {
    /// A meter whose window starts at `now`.
    pub fn new(now: Instant) -> Self {
        LoadMeter { window_start: now, frames: 0 }
    }

    /// Counts one frame sent at `now`.
    pub fn record(&mut self, now: Instant) {
        self.frames = self.frames.saturating_add(1);
        if now.saturating_duration_since(self.window_start) >= LOAD_WINDOW {
            self.window_start = now;
            self.frames = 0;
        }
    }

    /// Frames per minute in the current window (0 before any time has passed).
    pub fn per_minute(&self, now: Instant) -> f64 {
        let minutes = now.saturating_duration_since(self.window_start).as_secs_f64() / 60.0;
        if minutes > 0.0 {
            self.frames as f64 / minutes
        } else {
            0.0
        }
    }
}

/// Where the guard is in the client-to-server byte stream.
#[derive(Debug, Clone, Copy)]
enum GuardState {
    /// Reading a frame header; `have` bytes of it are in `header`.
    Header { have: usize },
    /// Skipping `remaining` payload bytes of an accepted frame.
    Payload { remaining: u64 },
    /// An oversized frame was seen: the error is pending or has been returned.
    Tripped { reported: bool },
}

/// Wraps the raw request byte stream of a websocket and fails it as soon as a frame
/// *header* declares a payload larger than `max` bytes.
///
/// actix's websocket decoder only checks the size once the whole frame has arrived, so a
/// peer could make the server buffer any amount it likes; the guard checks the declared
/// length first and stops reading. When it trips it sets the shared flag, so the
/// connection can tell "too big" (close 1009) from other stream errors.
pub struct FrameSizeGuard<S> {
    inner: S,
    max: u64,
    state: GuardState,
    header: [u8; MAX_HEADER],
    tripped: Arc<AtomicBool>,
}

impl<S> FrameSizeGuard<S> {
    /// Guards `inner`; `tripped` is set when an oversized frame header is seen.
    pub fn new(inner: S, max: usize, tripped: Arc<AtomicBool>) -> Self {
        FrameSizeGuard {
            inner,
            max: u64::try_from(max).unwrap_or(u64::MAX),
            state: GuardState::Header { have: 0 },
            header: [0; MAX_HEADER],
            tripped,
        }
    }

    /// Walks `chunk`; returns the number of bytes that belong to acceptable frames (all of
    /// it unless an oversized header starts inside it).
    fn scan(&mut self, chunk: &[u8]) -> usize {
        let mut pos = 0;
        while pos < chunk.len() {
            match self.state {
                GuardState::Tripped { .. } => return pos,
                GuardState::Payload { remaining } => {
                    let avail = (chunk.len() - pos) as u64;
                    let step = remaining.min(avail);
                    pos += step as usize;
                    self.state = if remaining == step {
                        GuardState::Header { have: 0 }
                    } else {
                        GuardState::Payload { remaining: remaining - step }
                    };
                }
                GuardState::Header { mut have } => {
                    let start = pos - have.min(pos);
                    // The two bytes that give the header's length, then the rest of it;
                    // copied a slice at a time (this runs for every inbound frame).
                    let mut need: usize = 2;
                    loop {
                        let take = need.saturating_sub(have).min(chunk.len() - pos);
                        self.header[have..have + take].copy_from_slice(&chunk[pos..pos + take]);
                        have += take;
                        pos += take;
                        if have < need {
                            break;
                        }
                        let full = header_len(self.header[1]);
                        if need == full {
                            break;
                        }
                        need = full;
                    }
                    if have < need {
                        self.state = GuardState::Header { have };
                        continue;
                    }
                    let len = payload_len(&self.header[..have]);
                    if len > self.max {
                        self.state = GuardState::Tripped { reported: false };
                        self.tripped.store(true, Ordering::Release);
                        // Let the bytes before this header through; they are whole frames.
                        return start.min(pos);
                    }
                    self.state = if len == 0 {
                        GuardState::Header { have: 0 }
                    } else {
                        GuardState::Payload { remaining: len }
                    };
                }
            }
        }
        pos
    }
}

impl<S> Stream for FrameSizeGuard<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.state {
            GuardState::Tripped { reported: false } => {
                this.state = GuardState::Tripped { reported: true };
                return Poll::Ready(Some(Err(PayloadError::Overflow)));
            }
            GuardState::Tripped { reported: true } => return Poll::Ready(None),
            _ => {}
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let ok = this.scan(&chunk);
                if ok == chunk.len() {
                    Poll::Ready(Some(Ok(chunk)))
                } else if ok > 0 {
                    // The error follows on the next poll.
                    Poll::Ready(Some(Ok(chunk.slice(..ok))))
                } else {
                    this.state = GuardState::Tripped { reported: true };
                    Poll::Ready(Some(Err(PayloadError::Overflow)))
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_is_frames_per_minute_of_the_current_window() {
        let t0 = Instant::now();
        let mut m = LoadMeter::new(t0);
        assert_eq!(m.per_minute(t0), 0.0);
        for _ in 0..30 {
            m.record(t0 + Duration::from_secs(1));
        }
        assert!((m.per_minute(t0 + Duration::from_secs(30)) - 60.0).abs() < 1e-9);
        // A frame a minute later starts a new window.
        m.record(t0 + Duration::from_secs(61));
        assert_eq!(m.per_minute(t0 + Duration::from_secs(61)), 0.0);
    }

    #[actix_rt::test]
    async fn admission_slots_are_bounded_and_waiting_times_out() {
        let a = Admission::new(1, Duration::from_millis(50));
        let held = a.try_enter().expect("a free slot");
        assert!(a.try_enter().is_none());
        assert!(a.enter().await.is_none(), "no slot frees up: the wait times out");
        let waiter = a.enter();
        drop(held);
        assert!(waiter.await.is_some(), "a freed slot goes to the waiter");
        assert_eq!(a.available(), 1);
    }
    use futures_util::{stream, StreamExt};
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5, t0);
        assert!((0..5).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        // 100 ms at 10/s gives one token back.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.try_take(t1));
        assert!(!b.try_take(t1));
        // Refill is capped at the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.try_take(t2)).count(), 5);
        // A clock that goes backwards does not mint tokens.
        assert!(!b.try_take(t0));
    }

    /// A masked client frame header for a payload of `len` bytes, then `len` bytes.
    fn frame(len: usize) -> Vec<u8> {
        let mut f = vec![0x82];
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len <= 0xffff {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(7u8, len));
        f
    }

    async fn run(bytes: Vec<u8>, chunk: usize, max: usize) -> (Vec<u8>, bool, bool) {
        let chunks: Vec<Result<Bytes, PayloadError>> =
            bytes.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let flag = Arc::new(AtomicBool::new(false));
        let mut guard = FrameSizeGuard::new(stream::iter(chunks), max, flag.clone());
        let mut out = Vec::new();
        let mut errored = false;
        while let Some(item) = guard.next().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(_) => {
                    errored = true;
                    break;
                }
            }
        }
        (out, errored, flag.load(Ordering::Acquire))
    }

    #[actix_rt::test]
    async fn passes_frames_within_the_limit_whatever_the_chunking() {
        let mut all = Vec::new();
        for len in [0, 5, 125, 126, 300, 65_535, 65_536, 70_000] {
            all.extend(frame(len));
        }
        for chunk in [1, 3, 7, 64, 100_000, 1_000_000] {
            let (out, errored, tripped) = run(all.clone(), chunk, 70_000).await;
            assert_eq!((out.len(), errored, tripped), (all.len(), false, false), "chunk {chunk}");
        }
    }

    #[actix_rt::test]
    async fn trips_on_the_header_of_an_oversized_frame() {
        let small = frame(10);
        // Only the header of a 1 GiB frame is ever sent: the guard must not wait for it.
        let mut bytes = small.clone();
        bytes.extend_from_slice(&[0x82, 0x80 | 127]);
        bytes.extend_from_slice(&(1u64 << 30).to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        for chunk in [1, 5, 1000] {
            let (out, errored, tripped) = run(bytes.clone(), chunk, 1 << 20).await;
            assert!(errored && tripped, "chunk {chunk}");
            // The whole small frame before it got through (plus at most a partial header).
            assert!(out.len() >= small.len() && out.starts_with(&small), "chunk {chunk}");
        }
        // Exactly at the limit is fine, one byte over is not.
        assert!(!run(frame(1000), 64, 1000).await.1);
        assert!(run(frame(1001), 64, 1000).await.2);
    }
}
