//! Generators, `_rintf` interfaces, callbacks' lifetimes and events of the Rust client,
//! against both servers (ours in-process, the stock Python server), with the stock Python
//! client (`tests/python/streams_peer.py`) as the other peer where a scenario needs one.
//!
//! Covers the client-side items of spec rpc-protocol.md §12 about generators and `_rintf`:
//! #26 (generators iterate remotely), #52 (error mid-stream), #53/#54/#57 (early close
//! reaches the producer and frees it), #55/#56 (any stream kind: Rust streams, Python sync
//! and async generators), #63 (a callback is dead after its call), #64 (`_rintf` callable
//! after the call, until unregistered), #65 (`_rintf` removed when its allowed caller
//! disconnects).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt, TryStreamExt};
use hypha_rpc::client::{
    callback, connect_to_server, generator, Client, ClientConfig, Error, Interface, RemoteFunction,
    RemoteGenerator, RemoteInterface, RemoteService, Service, Visibility,
};
use hypha_rpc::core::{map, Map, Value};

mod support;

use support::servers::{our_server, python_client, root, PythonServer};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

async fn connect(url: &str) -> Client {
    connect_to_server(ClientConfig::new(url).method_timeout(Duration::from_secs(20))).await.expect("connect")
}

/// Polls `check` until it holds or 10 s pass.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The items of a stream up to its first error, and that error (the stream must end
/// with one).
/// Every item of the remote generator `name(n)`, as integers, to its end.
async fn all_items(svc: &RemoteService, name: &str, n: i64) -> Vec<i64> {
    let g = svc.call_generator(name, vec![Value::from(n)]).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    g.typed::<i64>().try_collect().await.unwrap_or_else(|e| panic!("{name} items: {e}"))
}

async fn items_until_error<T, S>(stream: &mut S) -> (Vec<T>, Error)
where
    S: futures_util::Stream<Item = Result<T, Error>> + Unpin,
{
    let mut items = Vec::new();
    loop {
        match stream.next().await.expect("an item or the error") {
            Ok(item) => items.push(item),
            Err(e) => return (items, e),
        }
    }
}

/// Counts drops: put one into a stream, and the count says whether the stream is gone.
struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A Rust service whose functions return streams. `dropped` counts `endless` streams
/// that were dropped (closed early, or their consumer went away).
fn streams_service(dropped: Arc<AtomicUsize>) -> Service {
    Service::builder("rs-streams")
        .visibility(Visibility::Public)
        .function("count", |n: i64| async move { generator(stream::iter((0..n).map(Ok::<_, Error>))) })
        .function("fail_after", |n: i64| async move {
            let items = (0..n).map(Ok).chain(std::iter::once(Err("rust stream failed")));
            generator(stream::iter(items))
        })
        .function("endless", move || {
            let guard = DropFlag(dropped.clone());
            async move {
                generator(stream::iter(0_i64..).map(move |i| {
                    let _held = &guard;
                    Ok::<_, Error>(i)
                }))
            }
        })
        .function("explode", || async move {
            generator(stream::iter(0_i64..3).map(|i| {
                if i == 1 {
                    panic!("stream kaboom");
                }
                Ok::<_, Error>(i)
            }))
        })
        .function("words", |text: String| async move {
            let words: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
            generator(stream::iter(words.into_iter().map(Ok::<_, Error>)))
        })
        .function("sum_gen", |g: RemoteGenerator| async move {
            let items: Vec<i64> = g.typed::<i64>().try_collect().await?;
            Ok::<_, Error>(items.iter().sum::<i64>())
        })
        .function("sum_from", |f: RemoteFunction| async move {
            let items: Vec<i64> = f.call_generator(vec![]).await?.typed::<i64>().try_collect().await?;
            Ok::<_, Error>(items.iter().sum::<i64>())
        })
        .build()
}

/// The stock Python client running `streams_peer.py`, killed on drop. Its stdout lines
/// come through a channel so a test can wait for one with a timeout.
struct PyPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl PyPeer {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(python_client())
            .arg(root().join("tests/python/streams_peer.py"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the stock Python client");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        PyPeer { child, stdin, lines }
    }

    /// The rest of the first line starting with `prefix` (other lines are skipped).
    async fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.lines.try_recv() {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.to_owned();
                    }
                }
                Err(mpsc::TryRecvError::Empty) => {
                    assert!(Instant::now() < deadline, "the Python peer printed no {prefix:?}");
                    actix_rt::time::sleep(Duration::from_millis(20)).await;
                }
                Err(mpsc::TryRecvError::Disconnected) => panic!("the Python peer exited before {prefix:?}"),
            }
        }
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to the Python peer");
        stdin.flush().expect("flush");
    }

    /// Closes stdin (the peer disconnects and exits) and waits for it.
    async fn finish(mut self) {
        drop(self.stdin.take());
        let mut child = std::mem::replace(&mut self.child, Command::new("true").spawn().expect("true"));
        let _ = actix_rt::task::spawn_blocking(move || child.wait()).await;
    }
}

impl Drop for PyPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the Python `py-streams` service and returns the peer and the service id. With
/// `join`, the peer connects into that client's workspace (workspace events, such as
/// `client_disconnected`, stay inside a workspace).
async fn python_streams_service(url: &str, join: Option<&Client>) -> (PyPeer, String) {
    let mut peer = match join {
        Some(c) => {
            let token = c.generate_token(Map::new()).await.expect("token");
            PyPeer::start(&["serve", url, c.workspace(), &token])
        }
        None => PyPeer::start(&["serve", url]),
    };
    let id = peer.expect("service_id=").await;
    (peer, id)
}

// ---------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------

async fn rust_generator_consumed_by_rust(url: &str) {
    let dropped = Arc::new(AtomicUsize::new(0));
    let provider = connect(url).await;
    let info = provider.register_service(streams_service(dropped.clone())).await.expect("register");
    let consumer = connect(url).await;
    let svc = consumer.get_service(&info.id).await.expect("get_service");

    // Exhausted.
    assert_eq!(all_items(&svc, "count", 5).await, vec![0, 1, 2, 3, 4]);

    // An Err item mid-stream: the items before it, then the error, then the end.
    let mut g =
        svc.call_generator("fail_after", vec![Value::from(3)]).await.expect("fail_after").typed::<i64>();
    let (got, err) = items_until_error(&mut g).await;
    assert_eq!(got, vec![0, 1, 2]);
    assert!(err.remote_message().is_some_and(|m| m.contains("rust stream failed")), "{err:?}");
    assert!(g.next().await.is_none(), "the stream ends after its error");

    // A stream that panics: its item becomes an error, the provider keeps serving.
    let mut g = svc.call_generator("explode", vec![]).await.expect("explode");
    assert_eq!(g.next().await.expect("first").expect("ok"), Value::from(0));
    let err = g.next().await.expect("the panic").expect_err("an error");
    assert!(err.to_string().contains("stream kaboom"), "{err}");
    assert!(g.next().await.is_none());

    // Closed early with close(), and by drop: the producer's stream is dropped both times.
    let mut g = svc.call_generator("endless", vec![]).await.expect("endless");
    let first: Vec<Value> = (&mut g).take(3).try_collect().await.expect("three items");
    assert_eq!(first, vec![Value::from(0), Value::from(1), Value::from(2)]);
    g.close().await;
    assert!(g.next().await.is_none(), "closed");
    eventually("close() drops the producer's stream", || async { dropped.load(Ordering::SeqCst) == 1 }).await;
    let mut g = svc.call_generator("endless", vec![]).await.expect("endless");
    assert_eq!(g.next().await.expect("item").expect("ok"), Value::from(0));
    drop(g);
    eventually("drop closes the producer's stream", || async { dropped.load(Ordering::SeqCst) == 2 }).await;

    // A Rust stream as an argument, and a callback returning one.
    let arg = generator(stream::iter((1..=4).map(Ok::<_, Error>))).expect("generator");
    assert_eq!(svc.call("sum_gen", vec![arg]).await.expect("sum_gen"), Value::from(10));
    let cb = callback(|| async { generator(stream::iter((1..=3).map(Ok::<i64, Error>))) });
    assert_eq!(svc.call("sum_from", vec![cb]).await.expect("sum_from"), Value::from(6));

    let p = provider.stats().await.expect("stats");
    assert_eq!((p.pending, p.running, p.endpoint.running_calls), (0, 0, 0), "{p:?}");
    let c = consumer.stats().await.expect("stats");
    assert_eq!((c.pending, c.running, c.endpoint.pending_calls), (0, 0, 0), "{c:?}");

    // A pull after the consumer disconnected fails at once, then the stream ends.
    let mut g = svc.call_generator("endless", vec![]).await.expect("endless");
    assert_eq!(g.next().await.expect("item").expect("ok"), Value::from(0));
    consumer.disconnect().await.expect("disconnect");
    let pulled = tokio::time::timeout(Duration::from_secs(5), g.next()).await.expect("no hang");
    assert!(matches!(pulled, Some(Err(Error::Closed))), "{pulled:?}");
    assert!(g.next().await.is_none(), "the stream ends after its error");
    provider.disconnect().await.expect("disconnect");
}

/// A consumer that disconnects in the middle of an endless generator: the producer's
/// stream is dropped when the server reports the consumer gone.
async fn generator_freed_when_consumer_leaves(url: &str) {
    let dropped = Arc::new(AtomicUsize::new(0));
    let provider = connect(url).await;
    let info = provider.register_service(streams_service(dropped.clone())).await.expect("register");
    let token = provider.generate_token(Map::new()).await.expect("token");
    let config = ClientConfig::new(url).token(token).workspace(provider.workspace());
    let consumer = connect_to_server(config).await.expect("connect into the provider's workspace");
    let svc = consumer.get_service(&info.id).await.expect("get_service");
    let mut g = svc.call_generator("endless", vec![]).await.expect("endless");
    assert!(g.next().await.is_some());
    std::mem::forget(g); // no close: only the disconnect can free the producer
    consumer.disconnect().await.expect("disconnect");
    eventually("the producer drops the stream of a departed consumer", || async {
        dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    provider.disconnect().await.expect("disconnect");
}

async fn rust_generator_consumed_by_python(url: &str) {
    let dropped = Arc::new(AtomicUsize::new(0));
    let provider = connect(url).await;
    let info = provider.register_service(streams_service(dropped.clone())).await.expect("register");
    let mut peer = PyPeer::start(&["consume", url, &info.id]);
    let line = peer.expect("RESULT ").await;
    let r: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(r["count"], serde_json::json!([0, 1, 2, 3, 4]));
    assert_eq!(r["fail_items"], serde_json::json!([0, 1, 2]));
    assert!(r["fail"].as_str().is_some_and(|m| m.contains("rust stream failed")), "{}", r["fail"]);
    assert_eq!(r["endless_first"], serde_json::json!([0, 1, 2]));
    assert_eq!(r["words"], serde_json::json!(["a", "b", "c"]));
    eventually("Python's aclose() drops the Rust stream", || async { dropped.load(Ordering::SeqCst) == 1 })
        .await;
    peer.finish().await;
    provider.disconnect().await.expect("disconnect");
}

async fn python_generator_consumed_by_rust(url: &str) {
    let (peer, id) = python_streams_service(url, None).await;
    let c = connect(url).await;
    let svc = c.get_service(&id).await.expect("get the Python service");

    assert_eq!(all_items(&svc, "count", 5).await, vec![0, 1, 2, 3, 4]);
    assert_eq!(all_items(&svc, "count_sync", 3).await, vec![0, 10, 20]);

    // The Python generator raises after three items.
    let mut g =
        svc.call_generator("fail_after", vec![Value::from(3)]).await.expect("fail_after").typed::<i64>();
    let (got, err) = items_until_error(&mut g).await;
    assert_eq!(got, vec![0, 1, 2]);
    let Error::Remote { message, trace } = &err else { panic!("a remote error, got {err:?}") };
    assert!(message.contains("py generator failed"), "{message}");
    assert!(trace.as_deref().is_some_and(|t| t.contains("ValueError")), "{trace:?}");
    assert!(g.next().await.is_none());

    // Early close runs the Python generator's `finally`, by close() and by drop.
    let mut g = svc.call_generator("endless", vec![]).await.expect("endless");
    let first: Vec<Value> = (&mut g).take(3).try_collect().await.expect("three items");
    assert_eq!(first.len(), 3);
    g.close().await;
    eventually("the Python generator's finally ran", || async {
        svc.call("closed_count", vec![]).await.ok() == Some(Value::from(1))
    })
    .await;
    let mut g = svc.call_generator("endless", vec![]).await.expect("endless");
    assert!(g.next().await.is_some());
    drop(g);
    eventually("drop closes the Python generator", || async {
        svc.call("closed_count", vec![]).await.ok() == Some(Value::from(2))
    })
    .await;

    // A Rust stream passed to Python, consumed there.
    let arg = generator(stream::iter(["x", "y"].into_iter().map(Ok::<_, Error>))).expect("generator");
    let out = svc.call("consume", vec![arg]).await.expect("Python consumes a Rust stream");
    assert_eq!(out, Value::List(vec![Value::from("x"), Value::from("y")]));

    peer.finish().await;
    c.disconnect().await.expect("disconnect");
}

// ---------------------------------------------------------------------------------------
// Callbacks and `_rintf` interfaces
// ---------------------------------------------------------------------------------------

/// A service that keeps what it is given: a plain callback (which must die with the
/// call, #63) and a `_rintf` object (which must not, #64).
fn keeper_service(
    kept_fn: Arc<Mutex<Option<RemoteFunction>>>,
    kept: Arc<Mutex<Option<RemoteInterface>>>,
) -> Service {
    Service::builder("keeper")
        .visibility(Visibility::Public)
        .function("keep_callback", move |f: RemoteFunction| {
            let kept_fn = kept_fn.clone();
            async move {
                let during: i64 = f.call_typed((1,)).await?;
                *kept_fn.lock().expect("lock") = Some(f);
                Ok::<_, Error>(during)
            }
        })
        .function("keep", move |obj: RemoteInterface| {
            let kept = kept.clone();
            async move {
                let keys: Vec<String> = obj.api().keys().cloned().collect();
                *kept.lock().expect("lock") = Some(obj);
                Ok::<_, Error>(keys)
            }
        })
        .build()
}

fn counter_interface(calls: Arc<AtomicUsize>) -> Interface {
    Interface::builder()
        .label("counter")
        .function("getItem", move |key: String| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(format!("rs:{key}"))
            }
        })
        .value("label", "rust-object")
        .build()
        .expect("interface")
}

async fn rintf_between_rust_clients(url: &str) {
    let kept_fn = Arc::new(Mutex::new(None));
    let kept = Arc::new(Mutex::new(None::<RemoteInterface>));
    let provider = connect(url).await;
    let info =
        provider.register_service(keeper_service(kept_fn.clone(), kept.clone())).await.expect("register");
    let token = provider.generate_token(Map::new()).await.expect("token");
    let consumer = connect_to_server(ClientConfig::new(url).token(token).workspace(provider.workspace()))
        .await
        .expect("connect into the provider's workspace");
    let svc = consumer.get_service(&info.id).await.expect("get_service");

    // #63: a plain callback works during the call and is gone after it.
    let cb = callback(|x: i64| async move { Ok::<_, Error>(x + 41) });
    assert_eq!(svc.call("keep_callback", vec![cb]).await.expect("keep_callback"), Value::from(42));
    let f = kept_fn.lock().expect("lock").clone().expect("kept");
    let err = f.call(vec![Value::from(1)]).await.expect_err("a callback is dead after its call");
    assert!(err.to_string().contains("not found") || err.to_string().contains("expired"), "{err}");

    // #64: a `_rintf` object stays callable after the call, until it is disposed of.
    let calls = Arc::new(AtomicUsize::new(0));
    let iface = counter_interface(calls.clone());
    let keys = svc.call("keep", vec![iface.to_value()]).await.expect("keep");
    let Value::List(keys) = keys else { panic!("keys: {keys:?}") };
    for k in ["_rintf", "getItem", "label", "_dispose", "_rintf_service_id"] {
        assert!(keys.contains(&Value::from(k)), "{k} in {keys:?}");
    }
    assert_eq!(consumer.stats().await.expect("stats").local_services, 2, "built-in and the _rintf service");
    let obj = kept.lock().expect("lock").clone().expect("kept");
    assert!(obj.service_id().is_some_and(|s| s.starts_with("_rintf_")));
    assert_eq!(obj.api().get("label"), Some(&Value::from("rust-object")));
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let got: String = obj.call_typed("getItem", ("a",)).await.expect("called after the call returned");
    assert_eq!(got, "rs:a");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    obj.dispose().await.expect("_dispose");
    assert_eq!(consumer.stats().await.expect("stats").local_services, 1, "disposed");
    assert!(obj.call("getItem", vec![Value::from("b")]).await.is_err(), "disposed: calls fail");

    // Unregistered explicitly by the owner.
    svc.call("keep", vec![iface.to_value()]).await.expect("keep again");
    let obj = kept.lock().expect("lock").clone().expect("kept");
    assert_eq!(obj.call_typed::<_, String>("getItem", ("c",)).await.expect("works"), "rs:c");
    let removed = consumer.unregister_interface(&iface).await.expect("unregister_interface");
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(Some(removed[0].as_str()), obj.service_id());
    assert!(obj.call("getItem", vec![Value::from("d")]).await.is_err(), "unregistered: calls fail");

    // #65: the allowed caller disconnects: the `_rintf` service goes.
    svc.call("keep", vec![iface.to_value()]).await.expect("keep a third time");
    assert_eq!(consumer.stats().await.expect("stats").local_services, 2);
    provider.disconnect().await.expect("disconnect");
    eventually("the _rintf service of a departed caller is removed", || async {
        consumer.stats().await.map(|s| s.local_services).ok() == Some(1)
    })
    .await;
    let c = consumer.stats().await.expect("stats");
    assert_eq!((c.pending, c.running, c.endpoint.sessions), (0, 0, 0), "{c:?}");
    consumer.disconnect().await.expect("disconnect");
}

/// #64 with the stock Python client as the holder: it stores our `_rintf` object, calls
/// it after the call returned, disposes of it; and #65 when it leaves.
async fn rintf_stored_by_python(url: &str) {
    let c = connect(url).await;
    let (peer, id) = python_streams_service(url, Some(&c)).await;
    let svc = c.get_service(&id).await.expect("get the Python service");
    let calls = Arc::new(AtomicUsize::new(0));
    let iface = counter_interface(calls.clone());

    let keys = svc.call("store", vec![iface.to_value()]).await.expect("store");
    assert!(matches!(&keys, Value::List(k) if k.contains(&Value::from("_dispose"))), "{keys:?}");
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let got = svc.call("use_stored", vec![Value::from("k")]).await.expect("Python calls the stored object");
    assert_eq!(got, Value::from("rs:k"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(c.stats().await.expect("stats").local_services, 2);
    assert_eq!(svc.call("dispose_stored", vec![]).await.expect("_dispose"), Value::Bool(true));
    assert_eq!(c.stats().await.expect("stats").local_services, 1, "disposed by the peer");
    let err = svc.call("use_stored", vec![Value::from("k")]).await.expect_err("disposed");
    assert!(err.remote_message().is_some(), "{err:?}");

    // Stored again, then the Python client leaves: the service goes with it.
    svc.call("store", vec![iface.to_value()]).await.expect("store again");
    assert_eq!(c.stats().await.expect("stats").local_services, 2);
    peer.finish().await;
    eventually("the _rintf service of the departed Python client is removed", || async {
        c.stats().await.map(|s| s.local_services).ok() == Some(1)
    })
    .await;
    c.disconnect().await.expect("disconnect");
}

/// A `_rintf` object from the stock Python client, kept by a Rust service and called by
/// Rust after the Python call returned.
async fn rintf_from_python_stored_by_rust(url: &str) {
    let kept = Arc::new(Mutex::new(None::<RemoteInterface>));
    let provider = connect(url).await;
    let info = provider
        .register_service(keeper_service(Arc::new(Mutex::new(None)), kept.clone()))
        .await
        .expect("register");
    let mut peer = PyPeer::start(&["give", url, &info.id]);
    let given: serde_json::Value = serde_json::from_str(&peer.expect("GIVEN ").await).expect("JSON");
    let obj = kept.lock().expect("lock").clone().expect("kept");
    assert_eq!(obj.service_id(), given["service_id"].as_str(), "Python wrote the id back into its map");
    assert_eq!(obj.api().get("label"), Some(&Value::from("py-object")));
    let got: String = obj.call_typed("getItem", ("a",)).await.expect("call the Python object later");
    assert_eq!(got, "py:a");
    let inc = obj.function("inc").expect("inc");
    assert_eq!(inc.call_with_kwargs(vec![], map! {"by" => 5}).await.expect("kwargs"), Value::from(5));
    assert_eq!(inc.call(vec![]).await.expect("default"), Value::from(6));
    peer.send_line("report");
    let calls: serde_json::Value = serde_json::from_str(&peer.expect("CALLS ").await).expect("JSON");
    assert_eq!(calls, serde_json::json!({"calls": ["a"], "n": 6}));
    obj.dispose().await.expect("_dispose");
    let err = obj.call("getItem", vec![Value::from("b")]).await.expect_err("disposed");
    assert!(err.remote_message().is_some_and(|m| m.contains("not found")), "{err:?}");
    peer.finish().await;
    provider.disconnect().await.expect("disconnect");
}

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

async fn events_delivered(url: &str) {
    let a = connect(url).await;
    let token = a.generate_token(Map::new()).await.expect("token");
    let b = connect_to_server(ClientConfig::new(url).token(token.clone()).workspace(a.workspace()))
        .await
        .expect("connect into a's workspace");

    // A workspace event through a handler.
    a.subscribe(&["service_added"]).await.expect("subscribe");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Map>();
    let sub = a
        .on("service_added", move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
            }
        })
        .expect("on");
    assert_eq!(sub.event(), "service_added");
    let info = b.register_service(streams_service(Arc::new(AtomicUsize::new(0)))).await.expect("register");
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = rx.recv().await.expect("handler alive");
            let id = e.get("data").and_then(Value::as_map).and_then(|d| d.get("id")).and_then(Value::as_str);
            if id == Some(info.id.as_str()) {
                break e;
            }
        }
    })
    .await
    .expect("service_added delivered");
    assert_eq!(event.get("type"), Some(&Value::from("service_added")));
    assert!(a.off(&sub));
    assert!(!a.off(&sub), "removed once");

    // A custom event sent to one client, a local-only event, and one from Python.
    let mut greetings = a.event_stream("greeting", 16);
    let to_a = format!("{}/{}", a.workspace(), a.client_id());
    b.emit(map! {"type" => "greeting", "to" => to_a.as_str(), "data" => "hi from b"}).await.expect("emit");
    let got = tokio::time::timeout(Duration::from_secs(10), greetings.next())
        .await
        .expect("delivered")
        .expect("open");
    assert_eq!(got.get("data"), Some(&Value::from("hi from b")));
    assert_eq!(
        got.get("from").and_then(Value::as_str),
        Some(format!("{}/{}", b.workspace(), b.client_id()).as_str())
    );
    a.emit(map! {"type" => "greeting", "data" => "local"}).await.expect("local emit");
    let got = greetings.next().await.expect("local event");
    assert_eq!(got.get("data"), Some(&Value::from("local")));
    let err = a.emit(map! {"data" => 1}).await.expect_err("no type");
    assert!(err.to_string().contains("type"), "{err}");

    let mut peer = PyPeer::start(&["emit", url, a.workspace(), &token, &to_a, "greeting"]);
    peer.expect("EMITTED").await;
    let got = tokio::time::timeout(Duration::from_secs(10), greetings.next())
        .await
        .expect("from Python")
        .expect("open");
    assert_eq!(
        got.get("data").and_then(Value::as_map).and_then(|d| d.get("from")),
        Some(&Value::from("python"))
    );
    peer.finish().await;

    // Overflow policy: a full queue drops the newest events for that subscriber only.
    let mut small = a.event_stream("burst", 2);
    let mut big = a.event_stream("burst", 16);
    for i in 0..5 {
        a.emit(map! {"type" => "burst", "data" => i}).await.expect("emit");
    }
    assert_eq!(small.dropped(), 3);
    assert_eq!(big.dropped(), 0);
    let first_two: Vec<Value> =
        vec![small.next().await.expect("0")["data"].clone(), small.next().await.expect("1")["data"].clone()];
    assert_eq!(first_two, vec![Value::from(0), Value::from(1)]);
    for i in 0..5 {
        assert_eq!(big.next().await.expect("in order")["data"], Value::from(i));
    }

    // Disconnect ends every stream.
    b.disconnect().await.expect("disconnect");
    a.disconnect().await.expect("disconnect");
    assert!(greetings.next().await.is_none(), "streams end on disconnect");
}

// ---------------------------------------------------------------------------------------
// Our server
// ---------------------------------------------------------------------------------------

#[actix_rt::test]
async fn ours_rust_generator_consumed_by_rust() {
    let srv = our_server();
    rust_generator_consumed_by_rust(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_generator_freed_when_consumer_leaves() {
    let srv = our_server();
    generator_freed_when_consumer_leaves(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_rust_generator_consumed_by_python() {
    let srv = our_server();
    rust_generator_consumed_by_python(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_python_generator_consumed_by_rust() {
    let srv = our_server();
    python_generator_consumed_by_rust(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_rintf_between_rust_clients() {
    let srv = our_server();
    rintf_between_rust_clients(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_rintf_stored_by_python() {
    let srv = our_server();
    rintf_stored_by_python(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_rintf_from_python_stored_by_rust() {
    let srv = our_server();
    rintf_from_python_stored_by_rust(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_events_delivered() {
    let srv = our_server();
    events_delivered(&srv.url()).await;
}

/// Outside an actix arbiter, making a generator or an interface is an error, not a panic.
#[test]
fn generator_and_interface_need_an_arbiter() {
    let err = generator(stream::iter([Ok::<i64, Error>(1)])).expect_err("no arbiter");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let err =
        Interface::builder().function("f", || async { Ok::<_, Error>(1) }).build().expect_err("no arbiter");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let err = Interface::builder().build().expect_err("no functions");
    assert!(err.to_string().contains("at least one function"), "{err}");
    let err =
        Interface::builder().function("_hidden", || async { Ok::<_, Error>(1) }).build().expect_err("_name");
    assert!(err.to_string().contains("_hidden"), "{err}");
}

// ---------------------------------------------------------------------------------------
// The stock Python server: one server, every scenario in turn
// ---------------------------------------------------------------------------------------

#[actix_rt::test]
async fn python_server_scenarios() {
    let srv = PythonServer::start();
    let url = srv.url.clone();
    rust_generator_consumed_by_rust(&url).await;
    generator_freed_when_consumer_leaves(&url).await;
    rust_generator_consumed_by_python(&url).await;
    python_generator_consumed_by_rust(&url).await;
    rintf_between_rust_clients(&url).await;
    rintf_stored_by_python(&url).await;
    rintf_from_python_stored_by_rust(&url).await;
    events_delivered(&url).await;
}
