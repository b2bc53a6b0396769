//! Many concurrent Rust clients on one server (issue 4's "10,000 concurrent clients"
//! target; `benches/many_clients.sh` runs it and measures the server).
//!
//! ```text
//! cargo run --release --example bench_clients -- --server-url http://127.0.0.1:9527 \
//!     --clients 10000 [--arbiters K] [--check 300] [--json out.json] [--server-pid PID] [--no-hold]
//! ```
//!
//! `--clients` clients connect at once, spread over `--arbiters` actix arbiters (threads;
//! default: the available cores), and each registers a public service `svc-<i>` with an
//! `echo` function. A connect the server refuses as busy (its handshake admission control
//! answers 1013 "Server busy, please retry" after 30 s in the queue; a full workspace
//! manager inbox rejects the bootstrap calls with "Server busy: ..."), a refused TCP
//! connect and a handshake timeout are retried with jittered exponential backoff until
//! `--deadline`. Once every client is registered, one more client fetches `--check`
//! random services through `get_service` and calls `echo` on each.
//!
//! It then writes the figures (connect+register time per client, client RSS, the check),
//! prints `ready` on stdout and holds every connection until stdin closes or SIGINT /
//! SIGTERM arrives, so that a script can read the server's memory with all clients
//! connected; then it disconnects them all and writes the file again with the
//! disconnection time. `--no-hold` skips the wait.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use hypha_rpc::client::{connect_to_server, Client, ClientConfig, Error, Service, Visibility};
use hypha_rpc::core::Value;
use serde_json::{json, Map as JsonMap, Value as Json};
use tokio::sync::mpsc;

#[path = "support/bench_util.rs"]
mod bench_util;
use bench_util::{cpu_s, loadavg, mb, ms, pct, round, rss_kb};

#[derive(clap::Parser)]
struct Args {
    /// The server, e.g. http://127.0.0.1:9527.
    #[arg(long, default_value = "http://127.0.0.1:9527")]
    server_url: String,
    /// How many clients connect at once.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Arbiters (threads) the clients are spread over; default: the available cores.
    #[arg(long)]
    arbiters: Option<usize>,
    /// How many random services the checking client calls once all are registered.
    #[arg(long, default_value_t = 300)]
    check: usize,
    /// Seconds a client keeps retrying a refused or timed-out connection.
    #[arg(long, default_value_t = 600.0)]
    deadline: f64,
    /// Where to write the figures (JSON).
    #[arg(long)]
    json: Option<String>,
    /// The server's pid, for its CPU time while the clients connect.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Disconnect right after the check instead of holding the connections.
    #[arg(long)]
    no_hold: bool,
}

/// One client that connected and registered its service.
struct Connected {
    index: usize,
    client: Client,
    service_id: String,
    /// From the first connect attempt to the registered service, retries included.
    seconds: f64,
    retries: u32,
}

/// Whether a failed connect is worth another attempt: the server's admission control
/// was full (1013 with an `error` frame), the workspace manager's inbox was full when
/// the client's bootstrap calls arrived (a reject "Server busy: ..."), the TCP connect or
/// the upgrade failed (an accept queue that overflowed), or the handshake timed out.
fn retryable(e: &Error) -> bool {
    match e {
        Error::ConnectionAborted(message) => message.contains("busy"),
        Error::Remote { message, .. } => message.contains("Server busy"),
        Error::Connect { .. } | Error::HandshakeTimeout(_) => true,
        _ => false,
    }
}

/// A tiny xorshift generator: jitter and sampling need no more.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seed() -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos | 1
}

/// Runs `attempt` until it succeeds, retrying what [`retryable`] allows until `deadline`
/// with jittered exponential backoff; `retries` counts the retries.
async fn with_retries<T, F, Fut>(
    what: &str,
    deadline: Instant,
    rng: &mut XorShift,
    retries: &mut u32,
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if retryable(&e) && Instant::now() < deadline => {
                *retries += 1;
                // 0.25 s doubling to 8 s, then a random 50-100 % of it.
                let base = 0.25 * 2f64.powi((*retries).min(6) as i32 - 1);
                let wait = base * (0.5 + rng.below(1000) as f64 / 2000.0);
                tracing::debug!(what, retries = *retries, error = %e, "retried");
                actix_rt::time::sleep(Duration::from_secs_f64(wait)).await;
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

/// Connects client `index` and registers its service, each retried as
/// [`with_retries`] does.
async fn connect_one(url: String, index: usize, deadline: Instant) -> Result<Connected, String> {
    let t0 = Instant::now();
    let mut rng = XorShift(seed() ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut retries = 0u32;
    let client = with_retries("connect", deadline, &mut rng, &mut retries, || {
        // The handshake may sit in the server's admission queue (up to 30 s there): the
        // client waits longer than that, so the server's answer decides.
        let config = ClientConfig::new(url.clone())
            .name(format!("many-{index}"))
            .method_timeout(Duration::from_secs(120));
        connect_to_server(config)
    })
    .await?;
    let info = with_retries("register_service", deadline, &mut rng, &mut retries, || {
        let service = Service::builder(format!("svc-{index}"))
            .visibility(Visibility::Public)
            .function("echo", |x: Value| async move { Ok::<_, Error>(x) })
            .build();
        client.register_service(service)
    })
    .await?;
    Ok(Connected { index, client, service_id: info.id, seconds: t0.elapsed().as_secs_f64(), retries })
}

/// Fetches `n` random services of `clients` through `get_service` and calls their `echo`.
async fn check_sample(url: &str, clients: &[Connected], n: usize) -> Json {
    let checker = match connect_to_server(ClientConfig::new(url).name("many-checker")).await {
        Ok(c) => c,
        Err(e) => return json!({ "error": format!("the checking client could not connect: {e}") }),
    };
    let mut order: Vec<usize> = (0..clients.len()).collect();
    let mut rng = XorShift(seed());
    let n = n.min(order.len());
    for i in 0..n {
        let j = i + rng.below(order.len() - i);
        order.swap(i, j);
    }
    let (mut ok, mut lat, mut failures) = (0usize, Vec::new(), Vec::new());
    for &k in &order[..n] {
        let c = &clients[k];
        let t = Instant::now();
        let answer = async {
            let svc = checker.get_service(&c.service_id).await?;
            svc.call("echo", vec![Value::from(c.index as i64)]).await
        }
        .await;
        lat.push(t.elapsed().as_secs_f64());
        match answer {
            Ok(v) if v == Value::from(c.index as i64) => ok += 1,
            Ok(v) => failures.push(format!("{}: echo returned {v:?}", c.service_id)),
            Err(e) => failures.push(format!("{}: {e}", c.service_id)),
        }
    }
    let _ = checker.disconnect().await;
    json!({
        "sampled": n,
        "ok": ok,
        "get_service_and_echo_p50_ms": ms(pct(&lat, 50.0)),
        "get_service_and_echo_p99_ms": ms(pct(&lat, 99.0)),
        "first_failures": failures.iter().take(5).collect::<Vec<_>>(),
    })
}

/// Resolves when stdin reaches EOF or SIGINT / SIGTERM arrives.
async fn released() {
    let stdin = actix_rt::task::spawn_blocking(|| {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async move {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = stdin => {}
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn write(path: Option<&str>, results: &JsonMap<String, Json>) {
    let text = serde_json::to_string_pretty(results).unwrap_or_default();
    if let Some(path) = path {
        if let Err(e) = std::fs::write(path, &text) {
            eprintln!("cannot write {path}: {e}");
        }
    }
    eprintln!("{text}");
}

#[actix_rt::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = <Args as clap::Parser>::parse();
    let n = args.clients;
    let k =
        args.arbiters.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let me = Some(std::process::id());
    let spid = args.server_pid;
    let mut results = JsonMap::new();
    results.insert("server_url".into(), json!(args.server_url));
    results.insert("clients".into(), json!(n));
    results.insert("arbiters".into(), json!(k));
    results.insert("loadavg_start".into(), loadavg());

    let arbiters: Vec<actix_rt::Arbiter> = (0..k).map(|_| actix_rt::Arbiter::new()).collect();
    let rss0 = rss_kb(me, "VmRSS");
    let cpu0 = cpu_s(spid);
    let deadline = Instant::now() + Duration::from_secs_f64(args.deadline);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    for i in 0..n {
        let (tx, url) = (tx.clone(), args.server_url.clone());
        // The client's futures are not `Send` (awc): build them on the arbiter's thread.
        arbiters[i % k].spawn_fn(move || {
            actix_rt::spawn(async move {
                let _ = tx.send(connect_one(url, i, deadline).await);
            });
        });
    }
    drop(tx);
    let (mut clients, mut errors) = (Vec::with_capacity(n), Vec::new());
    while let Some(r) = rx.recv().await {
        match r {
            Ok(c) => clients.push(c),
            Err(e) => errors.push(e),
        }
        let done = clients.len() + errors.len();
        if done % 1000 == 0 || done == n {
            eprintln!("{done}/{n} done ({} failed) after {:.1} s", errors.len(), t0.elapsed().as_secs_f64());
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let server_cpu = cpu_s(spid).zip(cpu0).map(|(b, a)| round(b - a, 2));
    // Let the last registrations' buffers settle before reading our own memory.
    actix_rt::time::sleep(Duration::from_secs(1)).await;
    let rss1 = rss_kb(me, "VmRSS");
    let lat: Vec<f64> = clients.iter().map(|c| c.seconds).collect();
    let retries: u64 = clients.iter().map(|c| u64::from(c.retries)).sum();
    results.insert("registered".into(), json!(clients.len()));
    results.insert("errors".into(), json!(errors.len()));
    results.insert("first_errors".into(), json!(errors.iter().take(5).collect::<Vec<_>>()));
    results.insert("connect_retries".into(), json!(retries));
    results.insert("clients_that_retried".into(), json!(clients.iter().filter(|c| c.retries > 0).count()));
    results.insert("all_registered_wall_s".into(), json!(round(wall, 3)));
    results.insert("clients_per_s".into(), json!(round(clients.len() as f64 / wall, 1)));
    for (key, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)] {
        results.insert(format!("connect_register_{key}_s"), json!(pct(&lat, p).map(|x| round(x, 3))));
    }
    results.insert("server_cpu_s_while_connecting".into(), json!(server_cpu));
    results.insert("client_rss_before_MB".into(), mb(rss0));
    results.insert("client_rss_connected_MB".into(), mb(rss1));
    results.insert(
        "client_rss_per_client_KB".into(),
        json!(rss0.zip(rss1).map(|(a, b)| round((b as f64 - a as f64) / n.max(1) as f64, 1))),
    );

    let check = check_sample(&args.server_url, &clients, args.check).await;
    let check_ok = check.get("ok") == check.get("sampled") && check.get("ok").is_some();
    results.insert("check".into(), check);
    results.insert("loadavg_connected".into(), loadavg());
    write(args.json.as_deref(), &results);
    println!("ready");
    if !args.no_hold {
        released().await;
    }

    let t1 = Instant::now();
    join_all(clients.iter().map(|c| c.client.disconnect())).await;
    results.insert("disconnect_all_wall_s".into(), json!(round(t1.elapsed().as_secs_f64(), 3)));
    drop(clients);
    for a in arbiters {
        a.stop();
        let _ = a.join();
    }
    write(args.json.as_deref(), &results);
    if !errors.is_empty() || !check_ok {
        std::process::exit(1);
    }
}
