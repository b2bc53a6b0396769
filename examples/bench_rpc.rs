//! The RPC benchmark of `../shared/interop/bench_rpc.py`, with a Rust provider and a Rust
//! client, writing the same JSON keys so that the two stacks can be compared side by side
//! (`benches/client_vs_python.sh` runs both).
//!
//! ```text
//! cargo run --release --example bench_rpc -- --server-url http://127.0.0.1:9527 --json out.json \
//!     [--server-pid PID] [--duration 5] [--concurrency 32] [--clients 200] [--only a,b,c,d,e]
//! ```
//!
//! A provider (its own connection, on its own thread and actix System, as the Python
//! bench runs it in its own process) registers the public service `bench` with `echo`;
//! the consumer connects separately and calls it, so every call goes client -> server ->
//! provider -> server -> client. Scenarios, as in the Python script:
//!
//! * a) sequential `echo(1)` for `--duration` s: p50/p99 latency, calls/s;
//! * b) `--concurrency` in-flight `echo(1)` calls from one client for `--duration` s;
//! * c) echo of 1 MB and 32 MB of bytes and of a 16M-element float32 array (64 MB);
//!   MB/s = payload MB / round-trip s;
//! * d) a generator of 10,000 ints, pulled item by item;
//! * e) `--clients` clients connect at once, each registers a service: wall time,
//!   per-client p50/p99, server RSS before / connected / after disconnect.
//!
//! Server CPU seconds (utime + stime) and RSS come from `/proc/<pid>` when `--server-pid`
//! is given.

/// The allocator we recommend for hosts (README, Performance): the comparison is of what a
/// deployment runs.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::StreamExt;
use hypha_rpc::client::{
    connect_to_server, generator, ClientConfig, Error, NdArray, RemoteService, Service, Visibility,
};
use hypha_rpc::core::Value;
use ndarray::Array1;
use serde_json::{json, Map as JsonMap, Value as Json};

#[path = "support/bench_util.rs"]
mod bench_util;
use bench_util::{cpu_s, loadavg, mb, ms, pct, round, rss_kb};

#[derive(clap::Parser)]
struct Args {
    /// The server, e.g. http://127.0.0.1:9527.
    #[arg(long, default_value = "http://127.0.0.1:9527")]
    server_url: String,
    /// Where to write the results (same keys as bench_rpc.py).
    #[arg(long)]
    json: Option<String>,
    /// The server's pid, for its CPU time and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seconds for scenarios a and b.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Calls in flight in scenario b.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Clients in scenario e.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Scenarios to run, e.g. `a,b`.
    #[arg(long, default_value = "a,b,c,d,e")]
    only: String,
    /// The clients' `busy_poll` in microseconds (default: the library's, 50; 0 turns
    /// polling off, to measure what it brings).
    #[arg(long)]
    busy_poll_us: Option<u64>,
}

/// The clients' settings: the library's defaults unless `--busy-poll-us` is given.
fn client_config(url: impl Into<String>, name: impl Into<String>, busy_poll_us: Option<u64>) -> ClientConfig {
    let config = ClientConfig::new(url).name(name);
    match busy_poll_us {
        Some(us) => config.busy_poll(Duration::from_micros(us)),
        None => config,
    }
}

// ----------------------------------------------------------------- provider

/// Runs the provider on a thread of its own; returns the service id and a stop handle.
fn start_provider(
    url: String,
    busy_poll_us: Option<u64>,
) -> (String, std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (id_tx, id_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let config =
                client_config(url, "bench-provider", busy_poll_us).method_timeout(Duration::from_secs(600));
            let client = connect_to_server(config).await.expect("provider connects");
            let service = Service::builder("bench")
                .visibility(Visibility::Public)
                .function("echo", |x: Value| async move { Ok::<_, Error>(x) })
                .function("gen", |n: i64| async move {
                    generator(futures_util::stream::iter((0..n).map(Ok::<_, Error>)))
                })
                .build();
            let info = client.register_service(service).await.expect("register bench");
            id_tx.send(info.id).expect("report the id");
            let _ = actix_rt::task::spawn_blocking(move || stop_rx.recv()).await;
            let _ = client.disconnect().await;
        });
    });
    let id = id_rx.recv().expect("the provider started");
    (id, stop_tx, thread)
}

// ----------------------------------------------------------------- scenarios

async fn timed<F: std::future::Future<Output = Json>>(
    name: &str,
    pid: Option<u32>,
    results: &mut JsonMap<String, Json>,
    f: F,
) {
    let (c0, t0) = (cpu_s(pid), Instant::now());
    let mut r = f.await;
    let wall = t0.elapsed().as_secs_f64();
    if let Json::Object(m) = &mut r {
        m.insert("wall_s".into(), json!(round(wall, 3)));
        if let (Some(c0), Some(c1)) = (c0, cpu_s(pid)) {
            m.insert("server_cpu_s".into(), json!(round(c1 - c0, 2)));
        }
    }
    println!("[{name}] {r}");
    results.insert(name.into(), r);
}

/// Runs a scenario as a task of the System's local set, the way an application's work
/// runs, instead of as the `main` future itself: the runtime wakes its `main` future
/// through the driver (an eventfd write and one more poll of the event queue per wake-up).
async fn as_task<F: std::future::Future<Output = Json> + 'static>(scenario: F) -> Json {
    actix_rt::spawn(scenario).await.unwrap_or_else(|e| json!({ "error": e.to_string() }))
}

async fn echo1(svc: &RemoteService) {
    let out = svc.call("echo", vec![Value::from(1)]).await.expect("echo");
    assert_eq!(out, Value::from(1));
}

async fn sequential(svc: &RemoteService, duration: Duration) -> Json {
    let mut lat = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let t = Instant::now();
        echo1(svc).await;
        lat.push(t.elapsed().as_secs_f64());
    }
    let total: f64 = lat.iter().sum();
    json!({
        "calls": lat.len(),
        "calls_per_s": round(lat.len() as f64 / total, 1),
        "p50_ms": ms(pct(&lat, 50.0)),
        "p99_ms": ms(pct(&lat, 99.0)),
        "mean_ms": ms(Some(total / lat.len() as f64)),
    })
}

async fn concurrent(svc: &RemoteService, duration: Duration, concurrency: usize) -> Json {
    let end = Instant::now() + duration;
    let t0 = Instant::now();
    let workers = (0..concurrency).map(|_| async move {
        let mut lat = Vec::new();
        while Instant::now() < end {
            let t = Instant::now();
            echo1(svc).await;
            lat.push(t.elapsed().as_secs_f64());
        }
        lat
    });
    let lat: Vec<f64> = join_all(workers).await.into_iter().flatten().collect();
    let wall = t0.elapsed().as_secs_f64();
    json!({
        "concurrency": concurrency,
        "calls": lat.len(),
        "calls_per_s": round(lat.len() as f64 / wall, 1),
        "p50_ms": ms(pct(&lat, 50.0)),
        "p99_ms": ms(pct(&lat, 99.0)),
    })
}

/// d) pulls `n` items of a remote generator, one call per item as the protocol does.
async fn generator_items(svc: &RemoteService, n: i64) -> Json {
    let t = Instant::now();
    let mut gen = match svc.call_generator("gen", vec![Value::from(n)]).await {
        Ok(g) => g,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let (mut count, mut last) = (0i64, Json::Null);
    while let Some(item) = gen.next().await {
        match item {
            Ok(v) => {
                count += 1;
                last = json!(v.as_i64());
            }
            Err(e) => return json!({ "items": count, "error": e.to_string() }),
        }
    }
    let wall = t.elapsed().as_secs_f64();
    json!({
        "items": count,
        "last": last,
        "items_per_s": round(count as f64 / wall, 1),
        "ok": count == n && last == json!(n - 1),
    })
}

async fn payloads(svc: &RemoteService) -> Json {
    let mut out = JsonMap::new();
    let pattern = |n: usize| {
        Bytes::from((0..n).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<_>>())
    };
    let cases: Vec<(&str, Value, usize, usize)> = vec![
        ("bytes_1MB", Value::Bytes(pattern(1 << 20)), 1 << 20, 10),
        ("bytes_32MB", Value::Bytes(pattern(32 << 20)), 32 << 20, 3),
        (
            "f32_16M_64MB",
            Value::NdArray(Box::new(NdArray::from_array(Array1::from_iter(
                (0..16 << 20).map(|i| i as f32 * 0.5),
            )))),
            64 << 20,
            3,
        ),
    ];
    for (name, payload, size, reps) in cases {
        let mut times = Vec::new();
        let mut ok = true;
        for _ in 0..reps {
            let t = Instant::now();
            // `Value` clones share the payload's buffer: nothing is copied here.
            let back = svc.call("echo", vec![payload.clone()]).await.expect("payload echo");
            times.push(t.elapsed().as_secs_f64());
            ok &= back == payload;
        }
        let med = pct(&times, 50.0).unwrap_or_default();
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let r = json!({
            "size_MB": round(size as f64 / 1e6, 2),
            "reps": reps,
            "rtt_median_s": round(med, 3),
            "rtt_min_s": round(min, 3),
            "MB_per_s": round(size as f64 / 1e6 / med, 1),
            "roundtrip_ok": ok,
        });
        println!("    {name}: {r}");
        out.insert(name.into(), r);
    }
    Json::Object(out)
}

async fn many_clients(url: &str, n: usize, pid: Option<u32>, busy_poll_us: Option<u64>) -> Json {
    let rss0 = rss_kb(pid, "VmRSS");
    let t0 = Instant::now();
    let one = |i: usize| {
        let url = url.to_owned();
        async move {
            let t = Instant::now();
            let config = client_config(url, format!("bench-client-{i}"), busy_poll_us)
                .method_timeout(Duration::from_secs(120));
            let c = connect_to_server(config).await?;
            let svc = Service::builder(format!("svc-{i}"))
                .function("echo", |x: Value| async move { Ok::<_, Error>(x) })
                .function("gen", |n: i64| async move {
                    generator(futures_util::stream::iter((0..n).map(Ok::<_, Error>)))
                })
                .build();
            c.register_service(svc).await?;
            Ok::<_, Error>((c, t.elapsed().as_secs_f64()))
        }
    };
    let results = join_all((0..n).map(one)).await;
    let connect_wall = t0.elapsed().as_secs_f64();
    let mut clients = Vec::new();
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok((c, l)) => {
                clients.push(c);
                lat.push(l);
            }
            Err(e) => errors.push(e.to_string().chars().take(200).collect::<String>()),
        }
    }
    actix_rt::time::sleep(Duration::from_secs(1)).await;
    let rss1 = rss_kb(pid, "VmRSS");
    let t1 = Instant::now();
    join_all(clients.iter().map(|c| c.disconnect())).await;
    let disc_wall = t1.elapsed().as_secs_f64();
    let connected = clients.len();
    drop(clients);
    actix_rt::time::sleep(Duration::from_secs(3)).await;
    let rss2 = rss_kb(pid, "VmRSS");
    json!({
        "clients": n,
        "connected": connected,
        "errors": errors.len(),
        "first_errors": errors.iter().take(3).collect::<Vec<_>>(),
        "all_connected_wall_s": round(connect_wall, 3),
        "per_client_p50_s": pct(&lat, 50.0).map(|x| round(x, 3)),
        "per_client_p99_s": pct(&lat, 99.0).map(|x| round(x, 3)),
        "disconnect_all_wall_s": round(disc_wall, 3),
        "server_rss_before_MB": mb(rss0),
        "server_rss_connected_MB": mb(rss1),
        "server_rss_after_disconnect_MB": mb(rss2),
        "server_rss_per_client_KB": match (rss0, rss1) {
            (Some(a), Some(b)) => json!(round((b as f64 - a as f64) / n as f64, 1)),
            _ => Json::Null,
        },
    })
}

#[actix_rt::main]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    let duration = Duration::from_secs_f64(args.duration);
    let pid = args.server_pid;
    let mut results = JsonMap::new();
    results.insert("server_url".into(), json!(args.server_url));
    results.insert("server_pid".into(), json!(pid));
    results.insert("client".into(), json!("hypha-rpc (Rust) bench_rpc example"));
    results.insert("host_cpus".into(), json!(std::thread::available_parallelism().map_or(1, |n| n.get())));
    results.insert("loadavg_start".into(), loadavg());
    results.insert("server_rss_start_MB".into(), mb(rss_kb(pid, "VmRSS")));

    eprintln!("starting the provider");
    let (service_id, stop_provider, provider) = start_provider(args.server_url.clone(), args.busy_poll_us);
    eprintln!("provider ready: {service_id}");
    let config = client_config(args.server_url.clone(), "bench-consumer", args.busy_poll_us)
        .method_timeout(Duration::from_secs(600));
    let client = connect_to_server(config).await.expect("consumer connects");
    let svc = client.get_service(&service_id).await.expect("get bench");
    for _ in 0..200 {
        echo1(&svc).await;
    }
    eprintln!("warmed up");
    let only = args.only.clone();
    if only.contains('a') {
        let svc = svc.clone();
        let run = as_task(async move { sequential(&svc, duration).await });
        timed("a_sequential_echo", pid, &mut results, run).await;
    }
    if only.contains('b') {
        let (svc, n) = (svc.clone(), args.concurrency);
        let run = as_task(async move { concurrent(&svc, duration, n).await });
        timed("b_concurrent_echo", pid, &mut results, run).await;
    }
    if only.contains('c') {
        let svc = svc.clone();
        timed("c_payload_echo", pid, &mut results, as_task(async move { payloads(&svc).await })).await;
    }
    if only.contains('d') {
        let svc = svc.clone();
        let run = as_task(async move { generator_items(&svc, 10_000).await });
        timed("d_generator_10k", pid, &mut results, run).await;
    }
    client.disconnect().await.expect("disconnect");
    drop(stop_provider);
    let _ = actix_rt::task::spawn_blocking(move || provider.join()).await;
    if only.contains('e') {
        timed(
            "e_many_clients",
            pid,
            &mut results,
            many_clients(&args.server_url, args.clients, pid, args.busy_poll_us),
        )
        .await;
    }
    results.insert("loadavg_end".into(), loadavg());
    results.insert("server_rss_end_MB".into(), mb(rss_kb(pid, "VmRSS")));
    results.insert("server_rss_peak_MB".into(), mb(rss_kb(pid, "VmHWM")));
    results.insert("server_cpu_total_s".into(), json!(cpu_s(pid)));
    let text = serde_json::to_string_pretty(&Json::Object(results)).unwrap_or_default();
    if let Some(path) = &args.json {
        std::fs::write(path, &text).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
    println!("{text}");
}
