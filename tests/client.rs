//! The Rust client end to end, against both servers: ours (in-process, ephemeral port)
//! and the stock Python server `hypha` 0.21.137 (`$HYPHA_SERVER_PYTHON -m hypha.server`),
//! with the stock Python client (`$HYPHA_PYTHON`, `tests/python/client_peer.py`) as the
//! other peer where a scenario needs one.
//!
//! Every scenario is an `async fn(url)` run once per server. A missing Python
//! interpreter or server package is a failure, not a skip.

use std::io::{BufReader, Read};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hypha_rpc::client::{
    callback, connect_to_server, Client, ClientConfig, Context, Error, FunctionDef, Param, ParamType,
    RemoteFunction, Service, Visibility,
};
use hypha_rpc::core::{map, Map, Value};
use hypha_rpc::server::Server;

mod support;

use support::servers::{
    our_server, python_client, root, serve_python_peer, PythonServer, CLIENT_SECRET as SECRET,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

async fn connect(url: &str) -> Client {
    connect_to_server(ClientConfig::new(url).method_timeout(Duration::from_secs(20))).await.expect("connect")
}

/// A public service exercising the parameter kinds.
fn demo_service() -> Service {
    Service::builder("demo")
        .name("Demo")
        .description("client test service")
        .visibility(Visibility::Public)
        .function("hello", |name: String| async move { Ok::<_, Error>(format!("Hello {name}")) })
        .function_def(
            FunctionDef::new("add", |a: i64, b: i64| async move { Ok::<_, Error>(a + b) })
                .description("Adds two integers.")
                .param(Param::new("a", ParamType::Integer))
                .param(Param::new("b", ParamType::Integer).default(0)),
        )
        .function("whoami", |ctx: Context| async move {
            Ok::<_, Error>(ctx.from().unwrap_or_default().to_owned())
        })
        .function("fail", || async move { Err::<(), _>("boom from rust") })
        .function("explode", || async move {
            if true {
                panic!("kaboom");
            }
            Ok::<(), Error>(())
        })
        .function("apply", |f: RemoteFunction, x: i64| async move {
            let y: i64 = f.call_typed((x,)).await?;
            Ok::<_, Error>(y + 1)
        })
        .value("version", 3)
        .build()
}

/// Polls `check` until it holds or 5 s pass.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client_ids(c: &Client) -> Vec<String> {
    match c.call("list_clients", vec![]).await.expect("list_clients") {
        Value::List(items) => items
            .iter()
            .filter_map(|i| i.as_map().and_then(|m| m.get("id")).and_then(Value::as_str).map(str::to_owned))
            .collect(),
        other => panic!("list_clients returned {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

async fn connect_anonymous_and_with_token(url: &str) {
    let a = connect(url).await;
    assert!(a.workspace().starts_with("ws-user-"), "anonymous workspace: {}", a.workspace());
    assert_eq!(a.client_id().len(), 22, "random client id like Python's shortuuid");
    assert_eq!(a.echo(Value::from("ping")).await.expect("echo"), Value::from("ping"));

    let token = a.generate_token(Map::new()).await.expect("generate_token");
    let config = ClientConfig::new(url).token(token).workspace(a.workspace()).client_id("with-token");
    let b = connect_to_server(config).await.expect("connect with a token");
    assert_eq!(b.workspace(), a.workspace());
    assert_eq!(b.client_id(), "with-token");
    b.disconnect().await.expect("disconnect");
    a.disconnect().await.expect("disconnect");
}

async fn rust_service_called_from_rust(url: &str) {
    let provider = connect(url).await;
    let info = provider.register_service(demo_service()).await.expect("register");
    assert_eq!(info.id, format!("{}/{}:demo", provider.workspace(), provider.client_id()));
    let schema = &info.service_schema["add"]["function"];
    assert_eq!(schema["name"], "add");
    assert_eq!(schema["parameters"]["required"], serde_json::json!(["a"]));

    let listed = provider.list_services(None).await.expect("list_services");
    assert!(
        listed.iter().any(|s| s.get("id").and_then(Value::as_str) == Some(info.id.as_str())),
        "registered service listed: {listed:?}"
    );

    let consumer = connect(url).await;
    let svc = consumer.get_service(&info.id).await.expect("get_service");
    assert_eq!(svc.id(), info.id);
    assert_eq!(svc.api().get("version"), Some(&Value::from(3)));
    let hello: String = svc.call_typed("hello", ("Rust",)).await.expect("hello");
    assert_eq!(hello, "Hello Rust");
    assert_eq!(svc.call("add", vec![Value::from(2), Value::from(3)]).await.expect("add"), Value::from(5));
    let kw = svc.call_with_kwargs("add", vec![Value::from(2)], map! {"b" => 40}).await.expect("kwargs");
    assert_eq!(kw, Value::from(42));
    let default_b: i64 = svc.call_typed("add", (7,)).await.expect("default argument");
    assert_eq!(default_b, 7);
    let who: String = svc.call_typed("whoami", ()).await.expect("context");
    assert_eq!(who, format!("{}/{}", consumer.workspace(), consumer.client_id()));

    // Handler errors and panics become remote errors; the provider keeps serving.
    let err = svc.call("fail", vec![]).await.expect_err("fail rejects");
    assert!(err.remote_message().is_some_and(|m| m.contains("boom from rust")), "{err}");
    let err = svc.call("explode", vec![]).await.expect_err("panic rejects");
    assert!(err.to_string().contains("kaboom"), "{err}");
    let err = svc.call_with_kwargs("add", vec![], map! {"c" => 1}).await.expect_err("unknown kwarg");
    assert!(err.to_string().contains("unexpected keyword argument 'c'"), "{err}");
    assert!(matches!(svc.call("nope", vec![]).await, Err(Error::NotFound(_))));
    assert_eq!(
        svc.call("hello", vec![Value::from("again")]).await.expect("still serving"),
        Value::from("Hello again")
    );

    // Re-registering the same id without overwrite fails locally; with overwrite it works.
    let again = provider.register_service(demo_service()).await.expect_err("duplicate id");
    assert!(again.to_string().contains("already exists"), "{again}");
    let replaced = Service::builder("demo")
        .visibility(Visibility::Public)
        .overwrite(true)
        .function("hello", |name: String| async move { Ok::<_, Error>(format!("Hi {name}")) })
        .build();
    provider.register_service(replaced).await.expect("overwrite");
    let svc = consumer.get_service(&info.id).await.expect("get_service after overwrite");
    assert_eq!(svc.call("hello", vec![Value::from("x")]).await.expect("new handler"), Value::from("Hi x"));

    provider.unregister_service("demo").await.expect("unregister");
    let gone = svc.call("hello", vec![Value::from("x")]).await.expect_err("unregistered");
    assert!(gone.to_string().contains("not found"), "{gone}");
    let stats = provider.stats().await.expect("stats");
    assert_eq!(stats.service_actors, 0);
    assert_eq!(stats.local_services, 1, "only built-in is left");
    consumer.disconnect().await.expect("disconnect");
    provider.disconnect().await.expect("disconnect");
}

async fn callback_argument(url: &str) {
    let provider = connect(url).await;
    let info = provider.register_service(demo_service()).await.expect("register");
    let consumer = connect(url).await;
    let svc = consumer.get_service(&info.id).await.expect("get_service");
    let double = callback(|x: i64| async move { Ok::<_, Error>(x * 2) });
    let out = svc.call("apply", vec![double, Value::from(5)]).await.expect("apply");
    assert_eq!(out, Value::from(11));
    // The callback lived in the call's session, which ended with the call.
    let stats = consumer.stats().await.expect("stats");
    assert_eq!((stats.pending, stats.running, stats.endpoint.pending_calls), (0, 0, 0), "{stats:?}");
    assert_eq!(stats.endpoint.sessions, 0, "{stats:?}");
    consumer.disconnect().await.expect("disconnect");
    provider.disconnect().await.expect("disconnect");
}

async fn errors_carry_upstream_text(url: &str) {
    let c = connect(url).await;
    let missing = format!("{}/nobody:nothing", c.workspace());
    let err = c.get_service(&missing).await.expect_err("unknown service");
    let text = err.remote_message().unwrap_or_else(|| panic!("a remote error, got {err:?}"));
    assert!(text.contains("KeyError") && text.contains("not found"), "upstream KeyError text: {text}");
    let err = c.call("no_such_function", vec![]).await.expect_err("unknown manager function");
    assert!(err.remote_message().is_some(), "{err:?}");
    c.disconnect().await.expect("disconnect");
}

async fn disconnect_leaves_nothing_behind(url: &str) {
    let watcher = connect(url).await;
    let c = connect(url).await;
    let token = watcher.generate_token(Map::new()).await.expect("token");
    let c2 = connect_to_server(ClientConfig::new(url).token(token).workspace(watcher.workspace()))
        .await
        .expect("connect into the watcher's workspace");
    c2.register_service(demo_service()).await.expect("register");
    let full = format!("{}/{}", c2.workspace(), c2.client_id());
    assert!(client_ids(&watcher).await.contains(&full));
    c2.disconnect().await.expect("disconnect");
    eventually("the server forgets the client", || async { !client_ids(&watcher).await.contains(&full) })
        .await;
    let err = c2.echo(Value::Nil).await.expect_err("calls after disconnect fail");
    assert!(matches!(err, Error::Closed), "{err:?}");
    assert_eq!(err.to_string(), "Connection is closed");
    assert!(c2.stats().await.is_err(), "the registry actor is gone");
    c2.disconnect().await.expect("disconnect twice is harmless");
    c.disconnect().await.expect("disconnect");
    watcher.disconnect().await.expect("disconnect");
}

/// The stock Python client calls a Rust service: positional and keyword arguments, a
/// Python lambda as a callback, a Rust error.
async fn python_client_calls_rust(url: &str) {
    let provider = connect(url).await;
    let info = provider.register_service(demo_service()).await.expect("register");
    let mut child = Command::new(python_client())
        .arg(root().join("tests/python/client_peer.py"))
        .args(["call", url, &info.id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the stock Python client");
    let stdout = child.stdout.take().expect("stdout");
    let out = actix_rt::task::spawn_blocking(move || {
        let mut s = String::new();
        let _ = BufReader::new(stdout).read_to_string(&mut s);
        let status = child.wait();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (s, status, err)
    })
    .await
    .expect("join");
    let (stdout, status, stderr) = out;
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no result from the Python client ({status:?}):\n{stdout}\n{stderr}"));
    let r: serde_json::Value = serde_json::from_str(line).expect("JSON");
    assert_eq!(r["hello_kw"], "Hello py");
    assert_eq!(r["add_kw"], 3);
    assert_eq!(r["add_all_kw"], 11);
    assert_eq!(r["apply"], 13);
    assert_eq!(r["schema"]["name"], "add");
    assert_eq!(r["schema"]["parameters"]["properties"]["a"]["type"], "integer");
    assert!(r["fail"].as_str().is_some_and(|m| m.contains("boom from rust")), "{}", r["fail"]);
    provider.disconnect().await.expect("disconnect");
}

/// A Rust client calls a service of the stock Python client.
async fn rust_calls_python_service(url: &str) {
    let (mut child, id) = serve_python_peer("client_peer.py", &[url.to_owned()], Stdio::null()).await;
    let c = connect(url).await;
    let svc = c.get_service(&id).await.expect("get the Python service");
    assert_eq!(svc.call("add", vec![Value::from(1), Value::from(2)]).await.expect("add"), Value::from(3));
    let kw = svc.call_with_kwargs("greet", vec![Value::from("Rust")], map! {"greeting" => "Hi"}).await;
    assert_eq!(kw.expect("kwargs"), Value::from("Hi, Rust!"));
    let err = svc.call("fail", vec![]).await.expect_err("Python raises");
    let Error::Remote { message, trace } = &err else { panic!("a remote error, got {err:?}") };
    assert_eq!(message, "py boom");
    assert!(trace.as_deref().is_some_and(|t| t.contains("ValueError: py boom")), "{err:?}");
    let triple = callback(|x: i64| async move { Ok::<_, Error>(x * 3) });
    let out = svc.call("call_back", vec![triple, Value::from(7)]).await.expect("callback from Python");
    assert_eq!(out, Value::from(21));
    drop(child.stdin.take());
    let _ = actix_rt::task::spawn_blocking(move || child.wait()).await;
    c.disconnect().await.expect("disconnect");
}

// ---------------------------------------------------------------------------------------
// Our server
// ---------------------------------------------------------------------------------------

#[actix_rt::test]
async fn ours_connect_anonymous_and_with_token() {
    let srv = our_server();
    connect_anonymous_and_with_token(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_rust_service_called_from_rust() {
    let srv = our_server();
    rust_service_called_from_rust(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_callback_argument() {
    let srv = our_server();
    callback_argument(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_errors_carry_upstream_text() {
    let srv = our_server();
    errors_carry_upstream_text(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_disconnect_leaves_nothing_behind() {
    let srv = our_server();
    disconnect_leaves_nothing_behind(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_python_client_calls_rust() {
    let srv = our_server();
    python_client_calls_rust(&srv.url()).await;
}

#[actix_rt::test]
async fn ours_rust_calls_python_service() {
    let srv = our_server();
    rust_calls_python_service(&srv.url()).await;
}

/// Many calls, each with a callback, 50 at a time: every session and running call is
/// gone afterwards on both sides (the callbacks die with their calls).
#[actix_rt::test]
async fn ours_many_calls_with_callbacks_leave_nothing_behind() {
    // 1000 calls with callbacks are ~3000 frames per client: above the default rate
    // limit (200/s, burst 2000), which would close the socket with 1008.
    let srv = Server::builder()
        .jwt_secret(SECRET)
        .workers(1)
        .message_rate_limit(100_000.0)
        .message_burst_limit(100_000)
        .build()
        .expect("valid config")
        .start("127.0.0.1", 0)
        .expect("bind");
    let url = srv.url();
    let provider = connect(&url).await;
    let info = provider.register_service(demo_service()).await.expect("register");
    let consumer = connect(&url).await;
    let svc = consumer.get_service(&info.id).await.expect("get_service");
    for round in 0..20_i64 {
        let calls = (0..50_i64).map(|i| {
            let svc = svc.clone();
            async move {
                let cb = callback(|x: i64| async move { Ok::<_, Error>(x * 2) });
                svc.call("apply", vec![cb, Value::from(i)]).await
            }
        });
        let results = futures_util::future::join_all(calls).await;
        for (i, r) in results.into_iter().enumerate() {
            assert_eq!(r.expect("apply"), Value::from(i as i64 * 2 + 1), "round {round}");
        }
    }
    let c = consumer.stats().await.expect("stats");
    assert_eq!((c.pending, c.running, c.endpoint.sessions, c.endpoint.pending_calls), (0, 0, 0, 0), "{c:?}");
    let p = provider.stats().await.expect("stats");
    assert_eq!((p.pending, p.running, p.endpoint.running_calls), (0, 0, 0), "{p:?}");
    consumer.disconnect().await.expect("disconnect");
    provider.disconnect().await.expect("disconnect");
}

/// With reconnection disabled, when the server goes away a pending call fails fast with
/// upstream's "Connection lost: ..." instead of waiting for its timeout, and later calls
/// fail the same way (reconnection itself: tests/client_lifecycle.rs).
#[actix_rt::test]
async fn ours_connection_loss_rejects_pending_calls() {
    let srv = our_server();
    let url = srv.url();
    let provider = connect(&url).await;
    let never = Service::builder("slow")
        .visibility(Visibility::Public)
        .function("never", std::future::pending::<Result<(), Error>>)
        .build();
    let info = provider.register_service(never).await.expect("register");
    let config = ClientConfig::new(&url).reconnect(hypha_rpc::client::ReconnectConfig::disabled());
    let consumer = connect_to_server(config).await.expect("connect");
    let svc = consumer.get_service(&info.id).await.expect("get_service");
    let started = Instant::now();
    let pending = actix_rt::spawn(async move { svc.call("never", vec![]).await });
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    srv.stop().await.expect("stop the server");
    let err = pending.await.expect("join").expect_err("the call fails");
    assert!(matches!(&err, Error::Call(_)) && err.to_string().starts_with("Connection lost: "), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "failed fast, not by timeout");
    let err = consumer.echo(Value::Nil).await.expect_err("no connection");
    assert!(err.to_string().starts_with("Connection lost: "), "{err:?}");
    consumer.disconnect().await.expect("disconnect");
    provider.disconnect().await.expect("disconnect");
}

#[actix_rt::test]
async fn handshake_errors_are_typed() {
    let srv = our_server();
    let config = ClientConfig::new(srv.url()).workspace("no-such-workspace");
    let err = connect_to_server(config).await.expect_err("unknown workspace");
    assert!(matches!(err, Error::ConnectionAborted(_)), "{err:?}");
    let err = connect_to_server(ClientConfig::new("ftp://x")).await.expect_err("bad url");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let dead = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    let err =
        connect_to_server(ClientConfig::new(format!("http://{dead}"))).await.expect_err("nobody listens");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------
// The stock Python server: one server, every scenario in turn (it takes seconds to start)
// ---------------------------------------------------------------------------------------

#[actix_rt::test]
async fn python_server_scenarios() {
    let srv = PythonServer::start();
    let url = srv.url.clone();
    connect_anonymous_and_with_token(&url).await;
    rust_service_called_from_rust(&url).await;
    callback_argument(&url).await;
    errors_carry_upstream_text(&url).await;
    disconnect_leaves_nothing_behind(&url).await;
    python_client_calls_rust(&url).await;
    rust_calls_python_service(&url).await;
}
