//! Polling a thread's sockets for a few microseconds after a websocket frame, before its
//! event loop goes to sleep. Used by both sides: the server's workers
//! ([`ServerConfig::busy_poll`]) and the client's actix threads (`ClientConfig::busy_poll`).
//!
//! An RPC round trip between two clients is a chain: the caller sends, the server routes,
//! the callee answers, the server routes back. Each link ends with a thread that has
//! nothing to do until the next frame, so it sleeps in `epoll_wait`, and the next frame
//! has to wake it: a scheduler wake-up that, on the virtual machines these programs run
//! on, often means an inter-processor interrupt to another virtual CPU and costs more
//! than handling the frame (README, Performance: on the benchmark machine, a third of
//! each round trip). When the next frame comes back within a round trip, the thread is
//! better off polling its sockets until it arrives: its event loop then finds the frame
//! without being woken.
//!
//! Polling spends CPU, so it is bounded, adaptive and polite:
//!
//! * after each frame the thread polls for at most the current *window*, then sleeps;
//! * a frame that arrives while the thread sleeps, but within the configured maximum of
//!   the previous one, would have been caught by a longer window: the window doubles
//!   (from an eighth of the maximum, up to the maximum), the way Linux's `haltpoll` idle
//!   governor grows its polling before halting a virtual CPU;
//! * a frame that arrives later than that shows the traffic is too sparse for polling to
//!   pay: the window halves, and below an eighth of the maximum it is zero until the
//!   next near miss;
//! * each poll that found no new frame offers the CPU to any other thread that is ready
//!   to run on it (`sched_yield`): with more busy threads than cores (a caller, a server
//!   and a callee on a two-core machine), a poller that held its core would delay the
//!   very thread whose answer it waits for (measured: sequential calls fell by a third
//!   without it).
//!
//! So an idle program never polls, one whose frames come back to back polls for about a
//! round trip, and one serving slow calls polls for little. A busy thread never gets to
//! polling at all. One poller per thread (its state is thread-local: an actix thread's
//! connections share it), started by the thread's first frame.
//!
//! [`Window`] is the policy, pure and tested on its own; [`note_frame`] and the poller
//! task drive it.
//!
//! [`ServerConfig::busy_poll`]: crate::server::ServerConfig::busy_poll

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// The default maximum window, on both sides: longer than a loopback round trip through
/// the server (25-35 µs on the machine of the README's benchmarks), short enough that a
/// thread serving slow calls spends little before its window adapts.
pub const DEFAULT_MAX: Duration = Duration::from_micros(50);

/// Below `max / GROW_START_DIVISOR` a window is not worth polling for; a near miss grows a
/// zero window back to this.
const GROW_START_DIVISOR: u32 = 8;

/// How long to poll after the latest frame, adapted to how far apart frames arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    max: Duration,
    current: Duration,
}

impl Window {
    /// A window that polls up to `max` (zero: never), starting at `max`.
    pub fn new(max: Duration) -> Self {
        Window { max, current: max }
    }

    /// How long to poll now.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// A frame arrived `gap` after the previous one while the thread slept (a frame that
    /// arrives while it polls leaves the window as it is).
    pub fn slept_through(&mut self, gap: Duration) {
        let start = self.max / GROW_START_DIVISOR;
        if gap <= self.max {
            self.current = (self.current * 2).max(start).min(self.max);
        } else {
            self.current /= 2;
            if self.current < start {
                self.current = Duration::ZERO;
            }
        }
    }

    /// Sets a new maximum (connections of different settings on one thread: the latest
    /// frame's wins), keeping the window within it.
    fn set_max(&mut self, max: Duration) {
        if max != self.max {
            self.max = max;
            self.current = self.current.min(max);
        }
    }
}

/// One thread's poller: the window, the time of the latest frame, and the poller task's
/// waker while it sleeps.
#[derive(Debug)]
struct Poller {
    window: Cell<Window>,
    last_frame: Cell<Instant>,
    /// `Some` while the task waits for the next frame (the thread sleeps in its event loop).
    asleep: RefCell<Option<Waker>>,
    /// Times the task handed control back to the event loop while polling.
    polls: Cell<u64>,
}

impl Poller {
    fn polling(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_frame.get()) < self.window.get().current()
    }
}

/// Polls by every thread of the process (see [`total_polls`]).
static TOTAL_POLLS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static POLLER: RefCell<Option<Rc<Poller>>> = const { RefCell::new(None) };
}

/// Records that this thread received a websocket frame at `now`: the thread keeps polling
/// its sockets for up to `max` after it (zero: never). Call it from inside the thread's
/// actix system (the first call spawns the poller task there).
pub fn note_frame(now: Instant, max: Duration) {
    if max.is_zero() {
        return;
    }
    let existing = POLLER.with(|cell| cell.borrow().clone());
    let Some(poller) = existing else {
        let poller = Rc::new(Poller {
            window: Cell::new(Window::new(max)),
            last_frame: Cell::new(now),
            asleep: RefCell::new(None),
            polls: Cell::new(0),
        });
        POLLER.with(|cell| *cell.borrow_mut() = Some(poller.clone()));
        actix_rt::spawn(run(PollerTask(poller)));
        return;
    };
    let mut window = poller.window.get();
    window.set_max(max);
    let asleep = poller.asleep.borrow_mut().take();
    if asleep.is_some() {
        window.slept_through(now.saturating_duration_since(poller.last_frame.get()));
    }
    poller.window.set(window);
    poller.last_frame.set(now);
    if let Some(waker) = asleep {
        waker.wake();
    }
}

/// The poller task's hold on its poller. When the task goes (its actix system stopped),
/// the thread forgets the poller, so that a system started later on the same thread
/// spawns a new one instead of waking a task that no longer exists.
struct PollerTask(Rc<Poller>);

impl Drop for PollerTask {
    fn drop(&mut self) {
        // `try_with`: the thread may be exiting; `try_borrow_mut`: never panic in a drop.
        let _ = POLLER.try_with(|cell| {
            if let Ok(mut slot) = cell.try_borrow_mut() {
                if slot.as_ref().is_some_and(|p| Rc::ptr_eq(p, &self.0)) {
                    *slot = None;
                }
            }
        });
    }
}

/// How many times this thread's poller has polled (tests: it stops once frames stop).
pub fn polls_on_this_thread() -> u64 {
    POLLER.with(|cell| cell.borrow().as_ref().map_or(0, |p| p.polls.get()))
}

/// How many times the pollers of all threads have polled: what a server's workers and a
/// client's threads spent on polling, for tests and diagnostics.
pub fn total_polls() -> u64 {
    TOTAL_POLLS.load(Ordering::Relaxed)
}

/// The poller task: sleeps until a frame, then yields to the event loop (which checks
/// the sockets without blocking each time) and offers the CPU to other threads, until
/// the window after the latest frame has passed; then sleeps again.
async fn run(task: PollerTask) {
    let poller = &task.0;
    loop {
        poll_fn(|cx| {
            if poller.polling(Instant::now()) {
                Poll::Ready(())
            } else {
                *poller.asleep.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let mut seen = poller.last_frame.get();
        while poller.polling(Instant::now()) {
            poller.polls.set(poller.polls.get() + 1);
            TOTAL_POLLS.fetch_add(1, Ordering::Relaxed);
            let latest = poller.last_frame.get();
            if latest == seen {
                // Nothing came since the last poll: another thread ready to run on this
                // CPU goes first (see the module doc). A thread busy with frames skips
                // this system call.
                std::thread::yield_now();
            }
            seen = latest;
            // Deferred until the runtime has polled its event driver without blocking.
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    #[test]
    fn back_to_back_frames_keep_the_whole_window() {
        let mut w = Window::new(MAX);
        for _ in 0..10 {
            w.slept_through(Duration::from_micros(30));
        }
        assert_eq!(w.current(), MAX);
    }

    #[test]
    fn sparse_frames_shrink_the_window_to_nothing() {
        let mut w = Window::new(MAX);
        w.slept_through(Duration::from_millis(5));
        assert_eq!(w.current(), MAX / 2);
        w.slept_through(Duration::from_millis(5));
        w.slept_through(Duration::from_millis(5));
        assert_eq!(w.current(), MAX / 8);
        w.slept_through(Duration::from_millis(5));
        assert_eq!(w.current(), Duration::ZERO, "below an eighth of the maximum it stops polling");
    }

    #[test]
    fn a_near_miss_grows_a_closed_window_back() {
        let mut w = Window::new(MAX);
        for _ in 0..5 {
            w.slept_through(Duration::from_secs(1));
        }
        assert_eq!(w.current(), Duration::ZERO);
        w.slept_through(Duration::from_micros(20));
        assert_eq!(w.current(), MAX / 8);
        w.slept_through(Duration::from_micros(20));
        w.slept_through(Duration::from_micros(20));
        w.slept_through(Duration::from_micros(20));
        assert_eq!(w.current(), MAX);
    }

    #[test]
    fn slow_calls_alternate_between_half_and_full() {
        // A 1 ms service: the reply comes long after the request, the next request soon
        // after the reply.
        let mut w = Window::new(MAX);
        for _ in 0..10 {
            w.slept_through(Duration::from_millis(1));
            assert_eq!(w.current(), MAX / 2);
            w.slept_through(Duration::from_micros(30));
            assert_eq!(w.current(), MAX);
        }
    }

    #[test]
    fn zero_never_polls() {
        let mut w = Window::new(Duration::ZERO);
        w.slept_through(Duration::ZERO);
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[actix_rt::test]
    async fn the_poller_polls_after_a_frame_and_stops_when_frames_stop() {
        let max = Duration::from_millis(2);
        note_frame(Instant::now(), max);
        actix_rt::time::sleep(Duration::from_millis(10)).await;
        let after_one = polls_on_this_thread();
        assert!(after_one > 0, "it polled after the frame");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(polls_on_this_thread(), after_one, "it sleeps once the window has passed");
        // Sleeping frames far apart close the window: no more polling at all.
        for _ in 0..4 {
            note_frame(Instant::now(), max);
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        let closed = polls_on_this_thread();
        note_frame(Instant::now(), max);
        actix_rt::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(polls_on_this_thread(), closed, "sparse frames: the window is zero");
    }

    #[test]
    fn a_system_started_later_on_the_same_thread_gets_a_poller_of_its_own() {
        let max = Duration::from_millis(2);
        let polls_after_a_frame = move || {
            actix_rt::System::new().block_on(async move {
                let before = polls_on_this_thread();
                note_frame(Instant::now(), max);
                actix_rt::time::sleep(Duration::from_millis(10)).await;
                polls_on_this_thread() - before
            })
        };
        std::thread::spawn(move || {
            assert!(polls_after_a_frame() > 0, "the first system polls");
            assert!(polls_after_a_frame() > 0, "the second system polls too");
        })
        .join()
        .expect("both systems polled");
    }
}
