//! Data across languages, against both servers (ours in-process, the stock Python
//! server 0.21.137): every numpy dtype as an `NdArrayOf<T>` both ways, `float16` as a
//! raw `NdArray`, bytes, nested maps and lists, 64 MB arrays and 32 MB byte strings
//! (chunked and reassembled) in both directions, custom codecs interoperating with a
//! Python `register_codec` of the same name, and the blocking client from a plain
//! `#[test]`. The other peer is the stock Python client (`tests/python/data_peer.py`).
//!
//! The server fixtures are copied from `tests/client.rs` (they move to
//! `tests/support/servers.rs` later).

use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hypha_rpc::client::{
    connect_to_server, custom, custom_ref, Client, ClientConfig, DType, Error, NdArray, NdArrayOf, Service,
    Visibility,
};
use hypha_rpc::core::{Map, Value};
use ndarray::{Array1, Array2, Ix1, Ix2};
use num_complex::Complex;
use serde::Deserialize;

mod support;

use support::servers::{our_server, python_client, root, serve_python_peer, PythonServer};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

async fn connect(url: &str) -> Client {
    connect_to_server(ClientConfig::new(url).method_timeout(Duration::from_secs(120))).await.expect("connect")
}

/// The stock Python data peer serving `py-data`; stops when dropped (stdin closes).
struct PyPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    service_id: String,
}

impl PyPeer {
    async fn serve(url: &str) -> PyPeer {
        let (mut child, service_id) =
            serve_python_peer("data_peer.py", &[url.to_owned()], Stdio::inherit()).await;
        let stdin = child.stdin.take();
        PyPeer { child, stdin, service_id }
    }
}

impl Drop for PyPeer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The 2x3 sample `data_peer.py` builds for each dtype, in Rust.
fn sample<T: Copy>(f: impl Fn(i64) -> T) -> Array2<T> {
    Array2::from_shape_fn((2, 3), |(i, j)| f((i * 3 + j) as i64))
}

/// A Rust point with a codec named `point`, as Python's `Point` has.
#[derive(Clone, Debug, PartialEq)]
struct Point {
    x: i64,
    y: i64,
}

async fn register_point(c: &Client) {
    c.register_codec(
        "point",
        |p: &Point| -> Result<Value, Error> {
            let mut m = Map::new();
            m.insert("x".into(), Value::from(p.x));
            m.insert("y".into(), Value::from(p.y));
            Ok(Value::Map(m))
        },
        |m: Map| -> Result<Point, Error> {
            let int =
                |k: &str| m.get(k).and_then(Value::as_i64).ok_or_else(|| Error::Convert(format!("no {k}")));
            Ok(Point { x: int("x")?, y: int("y")? })
        },
    )
    .await
    .expect("register_codec");
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// Every dtype: Python builds the sample and Rust reads it as `NdArrayOf<T, Ix2>`; Rust
/// builds it and Python checks it with `np.array_equal`.
async fn dtypes_both_ways(url: &str) {
    let peer = PyPeer::serve(url).await;
    let c = connect(url).await;
    let svc = c.get_service(&peer.service_id).await.expect("get py-data");

    async fn both<T>(svc: &hypha_rpc::client::RemoteService, dtype: &str, expected: Array2<T>)
    where
        T: hypha_rpc::client::Element + PartialEq + std::fmt::Debug,
    {
        let got: NdArrayOf<T, Ix2> = svc
            .call_typed("make", (dtype.to_owned(),))
            .await
            .unwrap_or_else(|e| panic!("make({dtype}): {e}"));
        assert_eq!(got.0, expected, "Python -> Rust {dtype}");
        let verdict: Value = svc
            .call_typed("check", (NdArrayOf(expected), dtype.to_owned()))
            .await
            .unwrap_or_else(|e| panic!("check({dtype}): {e}"));
        let m = verdict.as_map().expect("map");
        assert_eq!(m["ok"], Value::Bool(true), "Rust -> Python {dtype}: {:?}", m["got"]);
    }

    both(&svc, "bool", sample(|i| i % 2 == 1)).await;
    both(&svc, "int8", sample(|i| (i - 2) as i8)).await;
    both(&svc, "int16", sample(|i| (i - 2) as i16)).await;
    both(&svc, "int32", sample(|i| (i - 2) as i32)).await;
    both(&svc, "int64", sample(|i| i - 2)).await;
    both(&svc, "uint8", sample(|i| i as u8)).await;
    both(&svc, "uint16", sample(|i| i as u16)).await;
    both(&svc, "uint32", sample(|i| i as u32)).await;
    both(&svc, "uint64", sample(|i| i as u64)).await;
    both(&svc, "float32", sample(|i| i as f32)).await;
    both(&svc, "float64", sample(|i| i as f64)).await;
    both(&svc, "complex64", sample(|i| Complex::new(i as f32, (i - 2) as f32))).await;
    both(&svc, "complex128", sample(|i| Complex::new(i as f64, (i - 2) as f64))).await;

    // float16 has no Rust element type: it travels as a raw NdArray, bytes intact.
    let half: NdArray = svc.call_typed("make", ("float16",)).await.expect("make(float16)");
    assert_eq!((half.dtype.clone(), half.shape.clone(), half.data.len()), (DType::Float16, vec![2, 3], 12));
    assert_eq!(&half.data[2..4], &[0x00, 0x3c], "1.0 in IEEE half, little-endian");
    let e = NdArrayOf::<f32>::from_ndarray(&half).expect_err("no f16 element type");
    assert!(e.to_string().contains("unsupported ndarray dtype"), "{e}");
    let verdict: Value = svc.call_typed("check", (half, "float16")).await.expect("check(float16)");
    assert_eq!(verdict.as_map().expect("map")["ok"], Value::Bool(true));

    // Nested maps and lists with arrays and bytes, into a typed struct.
    #[derive(Deserialize)]
    struct Deep {
        arr: NdArrayOf<f64, Ix2>,
    }
    #[derive(Deserialize)]
    struct Inner {
        deep: Deep,
    }
    #[derive(Deserialize)]
    struct Nested {
        list: (i64, f64, String, Option<i64>, bool),
        map: Inner,
        blob: serde_bytes::ByteBuf,
        arrays: (NdArrayOf<i32>, NdArrayOf<u8, Ix2>),
    }
    let n: Nested = svc.call_typed("nested", ()).await.expect("nested");
    assert_eq!(n.list, (1, 2.5, "three".to_owned(), None, true));
    assert_eq!(n.map.deep.arr.0, sample(|i| i as f64));
    assert_eq!(n.blob.as_slice(), &[0, 1, 255]);
    assert_eq!(n.arrays.0.shape(), &[2, 3]);
    assert_eq!(n.arrays.1 .0, sample(|i| i as u8));
    // And a nested structure sent from Rust comes back equal through Python.
    let mut m = Map::new();
    m.insert(
        "a".into(),
        Value::List(vec![Value::from(1), Value::NdArray(Box::new(NdArray::from_slice(&[1u16, 2])))]),
    );
    m.insert("b".into(), Value::Bytes(Bytes::from_static(b"\x00raw\xff")));
    let back = svc.call("echo", vec![Value::Map(m.clone())]).await.expect("echo nested");
    assert_eq!(back, Value::Map(m));
    c.disconnect().await.expect("disconnect");
}

/// 64 MB float32 arrays and 32 MB byte strings, Rust -> Python -> Rust (an echo) and
/// Python -> Rust: each is 128-256 chunks through the server, reassembled on arrival.
async fn large_payloads(url: &str) {
    let peer = PyPeer::serve(url).await;
    let c = connect(url).await;
    let svc = c.get_service(&peer.service_id).await.expect("get py-data");
    let n = 16 * 1024 * 1024;
    let big = Array1::from_iter((0..n).map(|i| i as f32));
    let back: NdArrayOf<f32, Ix1> =
        svc.call_typed("echo", (NdArrayOf(big.clone()),)).await.expect("echo 64 MB");
    assert!(back.0 == big, "64 MB float32 array came back equal");
    let made: NdArrayOf<f32, Ix1> = svc.call_typed("big_array", (n,)).await.expect("big_array");
    assert!(made.0 == big, "Python's 64 MB np.arange arrived intact");

    let len = 32 * 1024 * 1024;
    let pattern: Vec<u8> = (0..len).map(|i| ((i % 256) % 251) as u8).collect();
    let blob = Bytes::from(pattern.clone());
    let back: Bytes = svc.call_typed("echo", (blob.clone(),)).await.expect("echo 32 MB");
    assert!(back == blob, "32 MB bytes came back equal");
    let made: Bytes = svc.call_typed("big_bytes", (len,)).await.expect("big_bytes");
    assert!(made == blob, "Python's 32 MB bytes arrived intact");
    let s = c.stats().await.expect("stats");
    assert_eq!((s.endpoint.cache_entries, s.endpoint.uploads), (0, 0), "no chunk left behind: {s:?}");
    c.disconnect().await.expect("disconnect");
}

/// The Rust service the Python data peer calls (`data_peer.py call`).
fn rust_data_service() -> Service {
    Service::builder("rs-data")
        .visibility(Visibility::Public)
        // Any dtype, any shape: a `Value` passes through untouched.
        .function("echo_array", |a: Value| async move { Ok::<_, Error>(a) })
        .function("sum_f64", |a: NdArrayOf<f64, Ix1>| async move { Ok::<_, Error>(a.sum()) })
        .function("make_f32", |n: usize| async move {
            Ok::<_, Error>(NdArrayOf(Array1::from_iter((0..n).map(|i| i as f32 / 2.0))))
        })
        .function("bytes_len", |b: Bytes| async move {
            let ok = b.iter().enumerate().all(|(i, &x)| x as usize == (i % 256) % 251);
            if ok {
                Ok(b.len())
            } else {
                Err(Error::Handler("byte pattern mismatch".into()))
            }
        })
        .function("point_move", |p: Value, dx: i64| async move {
            let p = custom_ref::<Point>(&p).ok_or_else(|| Error::Convert(format!("not a Point: {p:?}")))?;
            Ok::<_, Error>(custom("point", Point { x: p.x + dx, y: p.y }))
        })
        .build()
}

/// The stock Python client calls a Rust service with numpy arrays (every dtype but
/// float16), a 64 MB array, 32 MB of bytes and a codec value.
async fn python_calls_rust(url: &str) {
    let provider = connect(url).await;
    register_point(&provider).await;
    let info = provider.register_service(rust_data_service()).await.expect("register");
    let child = Command::new(python_client())
        .arg(root().join("tests/python/data_peer.py"))
        .args(["call", url, &info.id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the stock Python client");
    let out = actix_rt::task::spawn_blocking(move || child.wait_with_output()).await.expect("join");
    let out = out.expect("python output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_else(|| {
        panic!(
            "no result from the Python client ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let r: serde_json::Value = serde_json::from_str(line).expect("JSON");
    for dtype in [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ] {
        assert_eq!(r[format!("echo_{dtype}")], true, "{dtype} through Rust: {r}");
    }
    assert_eq!(r["sum_f64"], 45.0);
    assert_eq!(r["make_f32"], serde_json::json!(["float32", [4], [0.0, 0.5, 1.0, 1.5]]));
    assert_eq!(r["big_f32"], true, "64 MB array through Rust");
    assert_eq!(r["big_bytes_len"], 32 * 1024 * 1024);
    assert_eq!(r["point"], serde_json::json!(["Point", 11, 2]), "codec values both ways");
    provider.disconnect().await.expect("disconnect");
}

/// A Rust `Point` with codec `point` arrives in Python as Python's `Point` and back.
async fn codecs_interoperate(url: &str) {
    let peer = PyPeer::serve(url).await;
    let c = connect(url).await;
    register_point(&c).await;
    let svc = c.get_service(&peer.service_id).await.expect("get py-data");
    let moved = svc.call("point_move", vec![custom("point", Point { x: 1, y: 2 }), Value::from(5)]).await;
    let moved = moved.expect("point_move");
    assert_eq!(custom_ref::<Point>(&moved), Some(&Point { x: 6, y: 2 }), "{moved:?}");
    let made = svc.call("make_point", vec![Value::from(3), Value::from(4)]).await.expect("make_point");
    assert_eq!(custom_ref::<Point>(&made), Some(&Point { x: 3, y: 4 }));
    // Without the codec the map arrives as it is on the wire.
    c.unregister_codec("point").await.expect("unregister_codec");
    let raw = svc.call("make_point", vec![Value::from(3), Value::from(4)]).await.expect("make_point");
    let m = raw.as_map().expect("a plain map");
    assert_eq!((m["_rtype"].as_str(), m["x"].as_i64()), (Some("point"), Some(3)));
    let err = svc.call("point_move", vec![custom("point", Point { x: 1, y: 2 }), Value::from(5)]).await;
    assert!(err.is_err(), "no codec: encoding fails locally");
    c.disconnect().await.expect("disconnect");
}

// ---------------------------------------------------------------------------------------
// Our server
// ---------------------------------------------------------------------------------------

#[actix_rt::test]
async fn ours_dtypes_both_ways() {
    let srv = our_server();
    dtypes_both_ways(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_large_payloads() {
    let srv = our_server();
    large_payloads(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_python_calls_rust() {
    let srv = our_server();
    python_calls_rust(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_codecs_interoperate() {
    let srv = our_server();
    codecs_interoperate(&srv.url()).await;
}

// ---------------------------------------------------------------------------------------
// The stock Python server
// ---------------------------------------------------------------------------------------

#[actix_rt::test]
async fn python_server_data_scenarios() {
    let srv = PythonServer::start();
    let url = srv.url.clone();
    dtypes_both_ways(&url).await;
    large_payloads(&url).await;
    python_calls_rust(&url).await;
    codecs_interoperate(&url).await;
}

// ---------------------------------------------------------------------------------------
// The blocking client, from plain threads
// ---------------------------------------------------------------------------------------

/// Our server on a thread of its own (a plain `#[test]` has no runtime); stops on drop.
struct ServerThread {
    url: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    fn start() -> ServerThread {
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let srv = our_server();
                url_tx.send(srv.url()).expect("url");
                let _ = actix_rt::task::spawn_blocking(move || stop_rx.recv()).await;
                let _ = srv.stop().await;
            });
        });
        let url = url_rx.recv().expect("server started");
        ServerThread { url, stop: Some(stop_tx), thread: Some(thread) }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn blocking_scenario(url: &str) {
    use hypha_rpc::blocking;
    let provider = blocking::connect_to_server(ClientConfig::new(url)).expect("blocking connect");
    let info = provider
        .register_service(
            Service::builder("blocking-demo")
                .visibility(Visibility::Public)
                .function("hello", |name: String| async move { Ok::<_, Error>(format!("Hello {name}")) })
                .function("double", |a: NdArrayOf<f64>| async move { Ok::<_, Error>(NdArrayOf(a.0 * 2.0)) })
                .function("count", |n: i64| async move {
                    hypha_rpc::client::generator(futures_util::stream::iter((0..n).map(Ok::<_, Error>)))
                })
                .build(),
        )
        .expect("register");
    let consumer = blocking::connect_to_server(ClientConfig::new(url)).expect("blocking connect");
    let svc = consumer.get_service(&info.id).expect("get_service");
    let greeting: String = svc.call_typed("hello", ("John",)).expect("hello");
    assert_eq!(greeting, "Hello John");
    let doubled: NdArrayOf<f64, Ix1> =
        svc.call_typed("double", (NdArrayOf(Array1::from(vec![1.0, 2.5])),)).expect("double");
    assert_eq!(doubled.0, Array1::from(vec![2.0, 5.0]));
    // Several threads share one client and one service proxy.
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let svc = svc.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let name = format!("t{t}-{i}");
                    let out: String = svc.call_typed("hello", (name.clone(),)).expect("hello from a thread");
                    assert_eq!(out, format!("Hello {name}"));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    // A stream consumed from blocking code (the shape remote generators plug into).
    let items: Vec<i64> = consumer
        .iter(|c| async move {
            let echo = c.echo(Value::from(7)).await?;
            let n = echo.as_i64().unwrap_or_default();
            Ok(futures_util::stream::iter((0..n).map(Ok)))
        })
        .expect("iter")
        .collect::<Result<_, Error>>()
        .expect("items");
    assert_eq!(items, (0..7).collect::<Vec<_>>());
    // A remote generator iterated from blocking code; dropping it early closes it.
    let items: Vec<Value> = svc
        .call_generator("count", vec![Value::from(5)])
        .expect("count")
        .collect::<Result<_, Error>>()
        .expect("items");
    assert_eq!(items, (0..5).map(Value::from).collect::<Vec<_>>());
    let mut first = svc.call_generator("count", vec![Value::from(1000)]).expect("count");
    assert_eq!(first.next().expect("an item").expect("no error"), Value::from(0));
    drop(first);
    let err = svc.call("missing", vec![]).expect_err("no such function");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    consumer.disconnect().expect("disconnect");
    let err = svc.call("hello", vec![Value::from("x")]).expect_err("disconnected");
    assert!(matches!(err, Error::Closed), "{err:?}");
    drop(provider);
}

/// The blocking wrapper from a plain `#[test]` fn: no runtime in sight.
#[test]
fn blocking_client_from_plain_threads() {
    let srv = ServerThread::start();
    blocking_scenario(&srv.url);
}

#[test]
fn blocking_client_against_the_python_server() {
    let srv = PythonServer::start();
    blocking_scenario(&srv.url);
}
