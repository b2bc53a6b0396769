//! The Rust client's lifecycle under faults, against both servers where it makes sense:
//! ours (in-process, restarted on the same port) and the stock Python server `hypha`
//! 0.21.137 (a process, restarted on the same port), with the stock Python client
//! (`tests/python/lifecycle_peer.py`) as a slow or dying peer.
//!
//! * the server restarted mid-session: the client reconnects with its workspace and id,
//!   its services come back (callable by a second client), its event subscription too;
//! * a transient drop (a TCP proxy cut): a call in flight survives it, as upstream's do;
//! * the peer killed mid-call (a Python provider process killed; a Rust provider
//!   disconnected): the call fails fast with a clear error;
//! * a slow peer: heartbeats keep the call alive past the method timeout; a silent
//!   (stopped) peer times out with upstream's text;
//! * reconnection gives up after the attempt limit, when flapping, and when the server
//!   refuses: pending and later calls are rejected with upstream's text;
//! * `disconnect()` ends every actor, also in the middle of a reconnection; dropping the
//!   last handle closes the connection;
//! * 100,000 calls with callbacks leave the registry at its baseline and RSS bounded.
//!
//! A missing Python interpreter or server package is a failure, not a skip.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypha_rpc::client::{
    callback, connect_to_server, Client, ClientConfig, ConnectionState, Error, ReconnectConfig,
    RemoteFunction, Service, Visibility,
};
use hypha_rpc::core::{Map, Value};

mod support;

use support::servers::{
    fast_reconnect, free_port, our_server_again, our_server_on, serve_python_peer, PythonServer,
    CLIENT_SECRET as SECRET,
};

// ---------------------------------------------------------------------------------------
// A TCP proxy that can cut its connections (transient drops without a server restart)
// ---------------------------------------------------------------------------------------

/// Forwards 127.0.0.1:<port> to the server. `cut` shuts every open connection down;
/// `kill_after` closes every new connection after that many milliseconds (0: never), which
/// makes each reconnection a flap. Threads only: independent of the test's runtime.
struct Proxy {
    port: u16,
    open: Arc<Mutex<Vec<TcpStream>>>,
    kill_after_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let kill_after_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, k, s) = (open.clone(), kill_after_ms.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = down.set_nonblocking(false);
                let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let _ = up.set_nodelay(true);
                let _ = down.set_nodelay(true);
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (mut from, mut to) =
                        (from.try_clone().expect("clone"), to.try_clone().expect("clone"));
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
                let after = k.load(Ordering::Relaxed);
                if after > 0 {
                    let d = down.try_clone().expect("clone");
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(after));
                        let _ = d.shutdown(Shutdown::Both);
                    });
                }
                o.lock().expect("lock").extend([down, up]);
            }
        });
        Proxy { port, open, kill_after_ms, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Shuts every open connection down (the client sees its socket end).
    fn cut(&self) {
        for s in self.open.lock().expect("lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn config(url: &str) -> ClientConfig {
    ClientConfig::new(url).method_timeout(Duration::from_secs(20)).reconnect(fast_reconnect())
}

async fn connect(url: &str) -> Client {
    connect_to_server(config(url)).await.expect("connect")
}

/// A public service with a quick, a slow and a never-ending function.
fn lifecycle_service() -> Service {
    Service::builder("lifecycle")
        .visibility(Visibility::Public)
        .function("hello", |name: String| async move { Ok::<_, Error>(format!("Hello {name}")) })
        .function("sleep", |ms: u64| async move {
            actix_rt::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, Error>(format!("slept {ms}"))
        })
        .function("never", std::future::pending::<Result<(), Error>>)
        .function("apply", |f: RemoteFunction, x: i64| async move {
            let y: i64 = f.call_typed((x,)).await?;
            Ok::<_, Error>(y + 1)
        })
        .build()
}

/// Waits until `client`'s state satisfies `pred` (or panics after `within`).
async fn wait_state(client: &Client, within: Duration, pred: impl Fn(&ConnectionState) -> bool) {
    let mut state = client.state().await.expect("state");
    let outcome = actix_rt::time::timeout(within, state.wait_for(|s| pred(s))).await;
    assert!(
        matches!(outcome, Ok(Ok(_))),
        "state not reached within {within:?}; now {:?}",
        *client.state().await.expect("state").borrow()
    );
}

fn is_reconnecting(s: &ConnectionState) -> bool {
    matches!(s, ConnectionState::Reconnecting(_))
}

/// A stock Python client serving `lifecycle` (`sleep`, `echo`); killed on drop.
struct PythonPeer {
    child: Child,
    _stdin: ChildStdin,
    service_id: String,
}

impl PythonPeer {
    /// In `c`'s workspace (with a token `c` generated) when given, so that `c` hears of
    /// its disconnection.
    async fn start(url: &str, c: Option<&Client>) -> Self {
        let mut args = vec![url.to_owned()];
        if let Some(c) = c {
            args.push(c.generate_token(Map::new()).await.expect("token"));
            args.push(c.workspace().to_owned());
        }
        let (mut child, service_id) = serve_python_peer("lifecycle_peer.py", &args, Stdio::null()).await;
        let stdin = child.stdin.take().expect("stdin");
        PythonPeer { child, _stdin: stdin, service_id }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([sig, &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill {sig}");
    }
}

impl Drop for PythonPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

// ---------------------------------------------------------------------------------------
// Scenarios run on both servers
// ---------------------------------------------------------------------------------------

/// A provider keeps its id and services across a server restart; a second client, new to
/// the restarted server, calls them. `restart` stops the server and starts it again on the
/// same port.
async fn services_come_back_after_restart<F, Fut>(url: &str, restart: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let provider = connect(url).await;
    let info = provider.register_service(lifecycle_service()).await.expect("register");
    let (ws, id) = (provider.workspace().to_owned(), provider.client_id().to_owned());
    let before = provider.connection_stats().await.expect("connection actor");
    assert_eq!((before.generation, before.io_tasks), (1, 2), "{before:?}");

    restart().await;
    provider.wait_connected(Duration::from_secs(60)).await.expect("the provider reconnects");
    assert_eq!((provider.workspace(), provider.client_id()), (ws.as_str(), id.as_str()));
    let after = provider.connection_stats().await.expect("connection actor");
    assert!(after.generation >= 2, "{after:?}");
    assert_eq!(after.io_tasks, 2, "the superseded generations' reader and writer ended: {after:?}");

    let consumer = connect(url).await;
    let svc = consumer.get_service(&info.id).await.expect("the service is registered again");
    let hello: String = svc.call_typed("hello", ("again",)).await.expect("callable after the restart");
    assert_eq!(hello, "Hello again");
    // The provider's own manager calls go to the new manager.
    assert_eq!(provider.echo(Value::from(1)).await.expect("echo"), Value::from(1));
    let stats = provider.stats().await.expect("stats");
    assert_eq!(stats.backlog, 0, "{stats:?}");
    consumer.disconnect().await.expect("disconnect");
    provider.disconnect().await.expect("disconnect");
}

/// A Python provider process killed in the middle of a call: the call fails within 2 s
/// (the server's `client_disconnected` event or dead-peer reject), not at its timeout.
async fn python_peer_killed_mid_call(url: &str) {
    let c = connect(url).await;
    let peer = PythonPeer::start(url, Some(&c)).await;
    let svc = c.get_service(&peer.service_id).await.expect("get the Python service");
    assert_eq!(svc.call("echo", vec![Value::from(5)]).await.expect("echo"), Value::from(5));
    let call = actix_rt::spawn(async move { svc.call("sleep", vec![Value::from(60)]).await });
    actix_rt::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    peer.signal("-KILL");
    let err = call.await.expect("join").expect_err("the call fails");
    assert!(killed.elapsed() < Duration::from_secs(2), "failed fast: {:?} ({err})", killed.elapsed());
    let text = err.to_string();
    assert!(text.contains("Client disconnected") || text.contains("not connected"), "clear error: {text}");
    c.disconnect().await.expect("disconnect");
}

/// A Rust provider disconnecting in the middle of a call: the call fails within 2 s.
async fn rust_peer_disconnected_mid_call(url: &str) {
    let c = connect(url).await;
    provider_leaves_mid_call(&c, url).await;
    c.disconnect().await.expect("disconnect");
}

/// `c` calls a new Rust provider in its workspace, which disconnects mid-call: `c` hears
/// of it through its `client_disconnected` subscription (events reach the subscribers of
/// the leaving client's workspace) and the call fails within 2 s.
async fn provider_leaves_mid_call(c: &Client, url: &str) {
    let token = c.generate_token(Map::new()).await.expect("token");
    let provider =
        connect_to_server(config(url).token(token).workspace(c.workspace())).await.expect("connect");
    let info = provider.register_service(lifecycle_service()).await.expect("register");
    let svc = c.get_service(&info.id).await.expect("get_service");
    let call = actix_rt::spawn(async move { svc.call("never", vec![]).await });
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let gone = Instant::now();
    provider.disconnect().await.expect("disconnect");
    let err = call.await.expect("join").expect_err("the call fails");
    assert!(gone.elapsed() < Duration::from_secs(2), "failed fast: {:?} ({err})", gone.elapsed());
    assert!(err.to_string().contains("Client disconnected"), "clear error: {err}");
}

/// Slow peers answer after the method timeout, kept alive by heartbeats (a Rust provider
/// and a Python one); a stopped (silent) Python peer times out with upstream's text.
async fn slow_and_silent_peers(url: &str) {
    let timeout = Duration::from_secs(1);
    let c = connect_to_server(config(url).method_timeout(timeout)).await.expect("connect");

    let provider = connect(url).await;
    let info = provider.register_service(lifecycle_service()).await.expect("register");
    let svc = c.get_service(&info.id).await.expect("get_service");
    let started = Instant::now();
    let out: String = svc.call_typed("sleep", (3000,)).await.expect("a slow Rust service answers");
    assert_eq!(out, "slept 3000");
    assert!(started.elapsed() >= Duration::from_secs(3));

    let peer = PythonPeer::start(url, None).await;
    let py = c.get_service(&peer.service_id).await.expect("get the Python service");
    let out = py.call("sleep", vec![Value::from(3)]).await.expect("a slow Python service answers");
    assert_eq!(out, Value::from("slept 3"));

    // A peer that stops answering entirely: no result, no heartbeat.
    peer.signal("-STOP");
    let started = Instant::now();
    let err = py.call("echo", vec![Value::from(1)]).await.expect_err("a silent peer times out");
    peer.signal("-KILL");
    let text = err.to_string();
    assert!(text.starts_with("Method call timed out: "), "upstream's text: {text}");
    assert!(text.contains("echo"), "{text}");
    assert!(started.elapsed() < timeout * 4, "timed out near the method timeout: {:?}", started.elapsed());
    provider.disconnect().await.expect("disconnect");
    c.disconnect().await.expect("disconnect");
}

// ---------------------------------------------------------------------------------------
// Our server
// ---------------------------------------------------------------------------------------

#[actix_rt::test]
async fn ours_server_restart_services_come_back() {
    let port = free_port();
    let srv = our_server_on(port, SECRET);
    let url = srv.url();
    let slot = Arc::new(Mutex::new(Some(srv)));
    let keep = slot.clone();
    services_come_back_after_restart(&url, || async move {
        let old = keep.lock().expect("lock").take().expect("server");
        old.stop().await.expect("stop");
        actix_rt::time::sleep(Duration::from_millis(300)).await;
        *keep.lock().expect("lock") = Some(our_server_again(port, SECRET));
    })
    .await;
    drop(slot);
}

/// After a restart the reconnected client is subscribed to `client_disconnected` again:
/// its call to a provider that then leaves fails fast.
#[actix_rt::test]
async fn ours_events_resubscribed_after_restart() {
    let port = free_port();
    let srv = our_server_on(port, SECRET);
    let url = srv.url();
    let c = connect(&url).await;
    srv.stop().await.expect("stop");
    let _srv = our_server_again(port, SECRET);
    c.wait_connected(Duration::from_secs(20)).await.expect("reconnects");
    provider_leaves_mid_call(&c, &url).await;
    c.disconnect().await.expect("disconnect");
}

/// A call in flight survives a transient drop (upstream keeps pending calls while it
/// reconnects): the provider answers after the consumer is back, under the same id.
#[actix_rt::test]
async fn ours_call_in_flight_survives_a_transient_drop() {
    let srv = our_server_on(0, SECRET);
    let proxy = Proxy::start(srv.local_addr().port());
    let provider = connect(&srv.url()).await;
    let info = provider.register_service(lifecycle_service()).await.expect("register");
    let consumer = connect(&proxy.url()).await;
    let svc = consumer.get_service(&info.id).await.expect("get_service");
    let call = actix_rt::spawn(async move { svc.call("sleep", vec![Value::from(1500)]).await });
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    wait_state(&consumer, Duration::from_secs(5), is_reconnecting).await;
    consumer.wait_connected(Duration::from_secs(10)).await.expect("reconnects");
    let out = call.await.expect("join").expect("the call in flight completes after the reconnect");
    assert_eq!(out, Value::from("slept 1500"));
    // Calls made while reconnecting wait in the backlog and go out on the new socket. (A
    // frame written just before the client notices the drop is lost with the socket, and
    // its call times out, as with upstream's clients: so wait for the drop first.)
    let before = consumer.connection_stats().await.expect("connection actor").generation;
    proxy.cut();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = consumer.connection_stats().await.expect("connection actor");
        if !s.connected || s.generation > before {
            break;
        }
        assert!(Instant::now() < deadline, "the drop was not noticed");
        actix_rt::time::sleep(Duration::from_millis(2)).await;
    }
    let svc = consumer.get_service(&info.id).await.expect("get_service after a second drop");
    assert_eq!(svc.call("hello", vec![Value::from("x")]).await.expect("hello"), Value::from("Hello x"));
    let stats = consumer.connection_stats().await.expect("connection actor");
    assert!(stats.generation >= 3 && stats.io_tasks == 2, "{stats:?}");
    consumer.disconnect().await.expect("disconnect");
    provider.disconnect().await.expect("disconnect");
}

#[actix_rt::test]
async fn ours_peer_killed_mid_call_fails_fast() {
    let srv = our_server_on(0, SECRET);
    python_peer_killed_mid_call(&srv.url()).await;
    rust_peer_disconnected_mid_call(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_slow_peers_heartbeat_and_silent_peers_time_out() {
    let srv = our_server_on(0, SECRET);
    slow_and_silent_peers(&srv.url()).await;
}

/// The server stays down: after the attempt limit the pending call and later calls fail
/// with upstream's "Connection lost: Max reconnection attempts exceeded".
#[actix_rt::test]
async fn ours_reconnect_gives_up_after_the_limit() {
    let srv = our_server_on(0, SECRET);
    let url = srv.url();
    let provider = connect(&url).await;
    let info = provider.register_service(lifecycle_service()).await.expect("register");
    let limited = ReconnectConfig { max_attempts: 3, ..fast_reconnect() };
    let c = connect_to_server(config(&url).reconnect(limited)).await.expect("connect");
    let svc = c.get_service(&info.id).await.expect("get_service");
    let pending = actix_rt::spawn(async move { svc.call("never", vec![]).await });
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    let stopped = Instant::now();
    srv.stop().await.expect("stop");
    let err = pending.await.expect("join").expect_err("the pending call is rejected");
    assert_eq!(err.to_string(), "Connection lost: Max reconnection attempts exceeded");
    assert!(stopped.elapsed() < Duration::from_secs(5), "gave up after 3 attempts: {:?}", stopped.elapsed());
    let err = c.echo(Value::Nil).await.expect_err("later calls fail too");
    assert_eq!(err.to_string(), "Connection lost: Max reconnection attempts exceeded");
    assert!(c.connection_stats().await.is_none(), "the connection actor stopped");
    assert!(matches!(*c.state().await.expect("state").borrow(), ConnectionState::Lost(_)));
    c.disconnect().await.expect("disconnect");
    provider.disconnect().await.expect("disconnect");
}

/// Every reconnection dies right after its handshake (a flap): flaps count toward the
/// limit, so the client gives up instead of reconnecting forever.
#[actix_rt::test]
async fn ours_flapping_connection_gives_up() {
    let srv = our_server_on(0, SECRET);
    let proxy = Proxy::start(srv.local_addr().port());
    let limited = ReconnectConfig { max_attempts: 4, ..fast_reconnect() };
    let c = connect_to_server(config(&proxy.url()).reconnect(limited)).await.expect("connect");
    proxy.kill_after_ms.store(300, Ordering::Relaxed);
    proxy.cut();
    let mut state = c.state().await.expect("state");
    let lost = actix_rt::time::timeout(
        Duration::from_secs(20),
        state.wait_for(|s| matches!(s, ConnectionState::Lost(_))),
    )
    .await
    .map(|r| r.map(|s| s.clone()));
    assert!(lost.is_ok(), "gave up: {:?}", *c.state().await.expect("state").borrow());
    let err = c.echo(Value::Nil).await.expect_err("no connection");
    assert_eq!(err.to_string(), "Connection lost: Max reconnection attempts exceeded");
    c.disconnect().await.expect("disconnect");
}

/// The restarted server no longer accepts our reconnection token (another secret): it
/// answers the handshake with an `error` frame, and the client gives up at once with
/// upstream's "Server refused reconnection: ...".
#[actix_rt::test]
async fn ours_refused_reconnection_gives_up_at_once() {
    let port = free_port();
    let srv = our_server_on(port, SECRET);
    let c = connect(&srv.url()).await;
    srv.stop().await.expect("stop");
    let _srv = our_server_again(port, "another-secret-entirely");
    let err = c.wait_connected(Duration::from_secs(20)).await.expect_err("refused");
    let text = err.to_string();
    assert!(text.starts_with("Connection lost: Server refused reconnection: "), "{text}");
    let stats = c.connection_stats().await;
    assert!(stats.is_none(), "the connection actor stopped: {stats:?}");
    c.disconnect().await.expect("disconnect");
}

/// `disconnect()` in the middle of a reconnection stops it for good: nothing comes back
/// when the server does, and every actor is gone.
#[actix_rt::test]
async fn ours_disconnect_while_reconnecting_ends_every_actor() {
    let port = free_port();
    let srv = our_server_on(port, SECRET);
    let url = srv.url();
    let c = connect(&url).await;
    c.register_service(lifecycle_service()).await.expect("register");
    let full = format!("{}/{}", c.workspace(), c.client_id());
    srv.stop().await.expect("stop");
    wait_state(&c, Duration::from_secs(5), is_reconnecting).await;
    c.disconnect().await.expect("disconnect");
    assert!(c.connection_stats().await.is_none(), "the connection actor stopped");
    assert!(c.stats().await.is_err(), "the registry stopped");
    let _srv = our_server_again(port, SECRET);
    actix_rt::time::sleep(Duration::from_secs(2)).await;
    let watcher = connect(&url).await;
    let clients = watcher.call("list_clients", vec![]).await.expect("list_clients");
    assert!(!format!("{clients:?}").contains(&full), "no reconnection after disconnect: {clients:?}");
    let err = c.echo(Value::Nil).await.expect_err("closed");
    assert_eq!(err.to_string(), "Connection is closed");
    watcher.disconnect().await.expect("disconnect");
}

/// A connected client's `disconnect()` ends its connection actor and its reader and
/// writer tasks, and no reconnection follows.
#[actix_rt::test]
async fn ours_disconnect_ends_every_actor() {
    let srv = our_server_on(0, SECRET);
    let c = connect(&srv.url()).await;
    c.register_service(lifecycle_service()).await.expect("register");
    let before = c.connection_stats().await.expect("connection actor");
    assert_eq!(before.io_tasks, 2);
    c.disconnect().await.expect("disconnect");
    assert!(c.connection_stats().await.is_none(), "the connection actor stopped");
    assert!(c.stats().await.is_err(), "the registry stopped");
    assert!(matches!(c.echo(Value::Nil).await, Err(Error::Closed)));
}

/// Dropping the last handle of a client (no `disconnect()`) closes its websocket: the
/// server sees the client leave. It used to stay connected, pinging, for good.
#[actix_rt::test]
async fn ours_dropping_the_last_handle_closes_the_connection() {
    let srv = our_server_on(0, SECRET);
    let c = connect(&srv.url()).await;
    c.register_service(lifecycle_service()).await.expect("register");
    let (ws, cid) = (c.workspace().to_owned(), c.client_id().to_owned());
    let state = srv.server().state().clone();
    assert!(state.router.is_connected(&ws, &cid));
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.router.is_connected(&ws, &cid) {
        assert!(Instant::now() < deadline, "the dropped client is still connected after 5 s");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(state.registry.builtin(&ws, &cid).is_none(), "its records are gone");
}

/// 100,000 calls, each with a callback: afterwards the registries on both sides hold what
/// they held before, and RSS grew by less than a bound after a warm-up. It runs in a child
/// process (this test binary, filtered to [`memory_child`]) so that the other tests
/// running in parallel do not count toward its RSS.
#[actix_rt::test]
async fn ours_100k_calls_with_callbacks_do_not_grow_memory() {
    let exe = std::env::current_exe().expect("test binary");
    let out = actix_rt::task::spawn_blocking(move || {
        Command::new(exe)
            .args(["--exact", "memory_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("HYPHA_LIFECYCLE_MEMORY_CHILD", "1")
            .output()
            .expect("run the child")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the memory child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "the child ran the test:\n{stdout}\n{stderr}");
    eprintln!(
        "{}",
        stderr.lines().filter(|l| l.contains("calls with callbacks")).collect::<Vec<_>>().join("\n")
    );
}

/// The body of the memory test; ignored unless run by it.
#[actix_rt::test]
#[ignore = "run by ours_100k_calls_with_callbacks_do_not_grow_memory in a process of its own"]
async fn memory_child() {
    if std::env::var_os("HYPHA_LIFECYCLE_MEMORY_CHILD").is_none() {
        return;
    }
    // Overridable for profiling; the test runs 100,000.
    let total: usize =
        std::env::var("HYPHA_LIFECYCLE_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    const WARMUP: usize = 10_000;
    const IN_FLIGHT: usize = 200;
    let srv = our_server_on(0, SECRET);
    let url = srv.url();
    let provider = connect(&url).await;
    let info = provider.register_service(lifecycle_service()).await.expect("register");
    let consumer = connect(&url).await;
    let svc = consumer.get_service(&info.id).await.expect("get_service");
    let consumer_base = consumer.stats().await.expect("stats");
    let provider_base = provider.stats().await.expect("stats");

    let started = Instant::now();
    let mut warm_rss = 0;
    let mut done = 0;
    while done < total {
        let calls = (0..IN_FLIGHT).map(|i| {
            let svc = svc.clone();
            async move {
                let cb = callback(|x: i64| async move { Ok::<_, Error>(x * 2) });
                svc.call("apply", vec![cb, Value::from(i as i64)]).await
            }
        });
        for (i, r) in futures_util::future::join_all(calls).await.into_iter().enumerate() {
            assert_eq!(r.expect("apply"), Value::from(i as i64 * 2 + 1));
        }
        done += IN_FLIGHT;
        if done == WARMUP {
            warm_rss = rss_bytes();
        }
    }
    let elapsed = started.elapsed();
    let end_rss = rss_bytes();
    let c = consumer.stats().await.expect("stats");
    let p = provider.stats().await.expect("stats");
    assert_eq!(c, consumer_base, "the consumer's registry is back to its baseline");
    assert_eq!(p, provider_base, "the provider's registry is back to its baseline");
    eprintln!(
        "{total} calls with callbacks in {elapsed:?}; RSS after warm-up {} KiB, at the end {} KiB",
        warm_rss / 1024,
        end_rss / 1024
    );
    assert!(warm_rss > 0, "RSS measured");
    let growth = end_rss.saturating_sub(warm_rss);
    assert!(growth < 8 << 20, "RSS grew by {} KiB over {} calls", growth / 1024, total - WARMUP);
    consumer.disconnect().await.expect("disconnect");
    provider.disconnect().await.expect("disconnect");
}

// ---------------------------------------------------------------------------------------
// The stock Python server: one server process, restarted, scenarios in turn
// ---------------------------------------------------------------------------------------

#[actix_rt::test]
async fn python_server_lifecycle() {
    let srv = Arc::new(Mutex::new(PythonServer::start()));
    let url = srv.lock().expect("lock").url.clone();
    python_peer_killed_mid_call(&url).await;
    rust_peer_disconnected_mid_call(&url).await;
    slow_and_silent_peers(&url).await;
    let server = srv.clone();
    services_come_back_after_restart(&url, || async move {
        actix_rt::task::spawn_blocking(move || server.lock().expect("lock").restart())
            .await
            .expect("restart");
    })
    .await;
    // A second restart, with a subscription to check: `client_disconnected` again.
    let c = connect(&url).await;
    let server = srv.clone();
    actix_rt::task::spawn_blocking(move || server.lock().expect("lock").restart()).await.expect("restart");
    c.wait_connected(Duration::from_secs(60)).await.expect("reconnects");
    provider_leaves_mid_call(&c, &url).await;
    c.disconnect().await.expect("disconnect");
}
