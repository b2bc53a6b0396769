//! Bad input to the manager and the router (server spec §2.5, §4.3, §4.5 step 4): floods,
//! quotas, unknown message types, unknown services and methods, wrong argument types.
//! Every test checks that a bystander keeps being served and nothing panics; error texts
//! are upstream's where upstream gives a meaningful one (checked against hypha 0.21.137).

mod support;

use std::time::{Duration, Instant};

use awc::ws::Frame;
use futures_util::StreamExt;
use hypha_rpc::core::map;
use hypha_rpc::core::msgpack::DecodeLimits;
use hypha_rpc::core::package::decode_package;
use hypha_rpc::core::value::{Map, Value};
use hypha_rpc::server::ServerConfig;
use support::*;

fn service(cid: &str, i: usize) -> Value {
    Value::Map(map! {"id" => format!("{cid}:svc{i}"), "config" => map! {"visibility" => "public"}})
}

/// Sends `n` `register_service` calls without waiting (sessions `f0`, `f1`, ...).
async fn flood(c: &mut Raw, n: usize) {
    let manager = c.manager.clone();
    let cid = c.client_id.clone();
    for i in 0..n {
        let main = map! {"type" => "method", "to" => manager.as_str(),
        "method" => "services.default.register_service", "session" => format!("f{i}")};
        let extra = map! {"args" => vec![service(&cid, i)], "promise" => "*", "t" => 30};
        c.send(main, Some(extra)).await;
    }
}

/// Reads the answers to a flood until `n` arrived or the socket closed: (resolved,
/// rejection texts, close).
async fn answers(c: &mut Raw, n: usize) -> (usize, Vec<String>, Option<(u16, String)>) {
    let (mut ok, mut errors) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while ok + errors.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.ws.next()).await {
            Ok(Some(Ok(Frame::Binary(b)))) => {
                let pkg = decode_package(&b, &DecodeLimits::default()).unwrap();
                let method = pkg.main.get("method").and_then(Value::as_str).unwrap_or_default();
                if method.ends_with(".resolve") {
                    ok += 1;
                } else if method.ends_with(".reject") {
                    let arg =
                        pkg.extra.as_ref().and_then(|e| e.get("args")).and_then(Value::as_list).unwrap()[0]
                            .clone();
                    errors.push(text(&arg, "_rvalue").to_owned());
                }
            }
            Ok(Some(Ok(Frame::Close(r)))) => {
                let close = r.map(|r| (u16::from(r.code), r.description.unwrap_or_default()));
                return (ok, errors, close);
            }
            Ok(Some(Ok(_))) => {}
            Ok(_) => return (ok, errors, Some((1006, String::new()))),
            Err(_) => panic!("only {ok} + {} answers of {n}", errors.len()),
        }
    }
    (ok, errors, None)
}

#[actix_rt::test]
async fn a_registration_flood_is_cut_off_and_registrations_racing_its_close_leave_no_records() {
    let srv = start(builder());
    let state = srv.server().state().clone();
    let mut bystander = Raw::registered(&srv, "bystander", None, None).await;
    let mut flooder = Raw::registered(&srv, "flooder", None, None).await;
    let ws = flooder.workspace.clone();
    flood(&mut flooder, 5000).await;
    let (ok, errors, close) = answers(&mut flooder, 5000).await;
    // Past the burst (2000 frames) the connection is closed with upstream's reason.
    assert_eq!(close, Some((1008, "Rate limit exceeded: too many messages per second".into())));
    assert!(ok + errors.len() < 5000);
    // Whatever was stored went with the connection; the quota bounded it meanwhile.
    // The close reaches us before the server's cleanup of the connection has run.
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.registry.client_service_count(&ws, "flooder") > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state.registry.client_service_count(&ws, "flooder"), 0);
    assert!(state.registry.len() < 20, "{} records left", state.registry.len());
    assert_eq!(bystander.call("echo", vec![Value::from("still here")]).await, Ok(Value::from("still here")));
}

#[actix_rt::test]
async fn a_flood_under_the_rate_limit_meets_the_service_quota() {
    let config = ServerConfig {
        msg_burst_limit: 100_000,
        msg_rate_limit: 100_000.0,
        max_services_per_client: 50,
        ..ServerConfig::default()
    };
    let srv = start(builder().config(config).jwt_secret(SECRET));
    let state = srv.server().state().clone();
    let mut bystander = Raw::registered(&srv, "bystander", None, None).await;
    let mut flooder = Raw::registered(&srv, "flooder", None, None).await;
    let ws = flooder.workspace.clone();
    flood(&mut flooder, 400).await;
    let (ok, errors, close) = answers(&mut flooder, 400).await;
    assert_eq!(close, None);
    assert_eq!((ok, errors.len()), (50, 350));
    assert_eq!(
        errors[0],
        format!("RuntimeError: Service quota exceeded: client {ws}/flooder already has 50 services (max 50). Remove unused services before registering new ones.")
    );
    assert_eq!(state.registry.client_service_count(&ws, "flooder"), 50);
    assert_eq!(bystander.call("echo", vec![Value::from(1)]).await, Ok(Value::from(1)));
}

#[actix_rt::test]
async fn the_per_client_service_cap_allows_up_to_the_limit() {
    let config = ServerConfig { max_services_per_client: 3, ..ServerConfig::default() };
    let srv = start(builder().config(config).jwt_secret(SECRET));
    let mut c = Raw::registered(&srv, "capped", None, None).await;
    for i in 0..3 {
        assert_eq!(c.register(&format!("s{i}"), Map::new(), &[]).await, Ok(Value::Nil), "service {i}");
    }
    let err = c.register("s3", Map::new(), &[]).await.unwrap_err();
    assert_eq!(
        err,
        format!(
            "RuntimeError: Service quota exceeded: client {}/capped already has 3 services (max 3). Remove unused services before registering new ones.",
            c.workspace
        )
    );
    // Replacing a service it has is not a new one (upstream refuses this too; we do not).
    assert_eq!(c.register("s0", Map::new(), &[]).await, Ok(Value::Nil));
    // Freeing a slot makes room; the quota is per client.
    assert_eq!(c.call("unregister_service", vec![Value::from("s1")]).await, Ok(Value::Nil));
    assert_eq!(c.register("s3", Map::new(), &[]).await, Ok(Value::Nil));
    let mut other = Raw::registered(&srv, "other", None, None).await;
    assert_eq!(other.register("s0", Map::new(), &[]).await, Ok(Value::Nil));
}

#[actix_rt::test]
async fn unknown_message_types_are_ignored() {
    let srv = start(builder());
    let mut c = Raw::registered(&srv, "c", None, None).await;
    let manager = c.manager.clone();
    c.send(map! {"type" => "whatever", "to" => manager.as_str(), "data" => 1}, None).await;
    c.send(map! {"type" => "whatever", "to" => "*/nonexistent", "data" => 1}, None).await;
    c.send(map! {"type" => "whatever", "to" => "*"}, None).await;
    c.send(map! {"type" => 5, "to" => manager.as_str()}, None).await;
    c.send(map! {"to" => manager.as_str(), "method" => "services.default.echo", "session" => "x"}, None)
        .await;
    assert_eq!(c.call("echo", vec![Value::from(7)]).await, Ok(Value::from(7)));
}

#[actix_rt::test]
async fn unknown_services_and_methods_get_upstreams_errors() {
    let srv = start(builder());
    let mut c = Raw::registered(&srv, "c", None, None).await;
    let (ws, manager) = (c.workspace.clone(), c.manager.clone());
    let mid = manager.trim_start_matches("*/").to_owned();
    let cases = [
        ("services.nope.x", format!("Method expired or not found: {ws}/c:services.nope.x")),
        ("services.default.bogus", format!("Method expired or not found: {ws}/c:services.default.bogus")),
        ("bogus", format!("Method not found: {ws}/c:bogus at {mid}")),
    ];
    for (i, (method, expected)) in cases.iter().enumerate() {
        let session = format!("u{i}");
        c.send(
            map! {"type" => "method", "to" => manager.as_str(), "method" => *method, "session" => session.as_str()},
            Some(map! {"args" => Vec::<Value>::new(), "promise" => "*", "t" => 15}),
        )
        .await;
        assert_eq!(c.wait_for(&session, Duration::from_secs(5)).await.unwrap_err(), *expected, "{method}");
    }
    // A manager lookup of an unknown service is a KeyError.
    let err = c.call("get_service", vec![Value::from("nope")]).await.unwrap_err();
    assert_eq!(err, format!("KeyError: 'Service not found: {ws}/*:nope@*'"));
    assert_eq!(c.call("echo", vec![Value::from(1)]).await, Ok(Value::from(1)));
}

#[actix_rt::test]
async fn wrong_argument_types_get_clear_errors() {
    let srv = start(builder());
    let mut c = Raw::registered(&srv, "c", None, None).await;
    let cases: Vec<(&str, Vec<Value>, &str)> = vec![
        ("get_service_info", vec![Value::from(5)], "AssertionError: Service ID must be a string."),
        ("get_service", vec![Value::from(5)], "AssertionError: Service ID must be a string."),
        ("get_service_info", vec![Value::from("x"), Value::from(5)], "TypeError: config must be a dict"),
        (
            "get_service_info",
            vec![Value::from("x"), Value::Map(map! {"mode" => 5})],
            "ValueError: Invalid mode",
        ),
        ("list_services", vec![Value::from(5)], "TypeError: query must be a string or a dict"),
        ("subscribe", vec![Value::from(5)], "TypeError: event_type must be a string or a list of strings"),
        (
            "subscribe",
            vec![Value::List(vec![Value::from(1)])],
            "TypeError: event_type must be a string or a list",
        ),
        ("echo", vec![], "TypeError: echo() missing 1 required positional argument: 'data'"),
        (
            "echo",
            vec![1.into(), 2.into(), 3.into()],
            "TypeError: echo() takes 1 positional arguments but 3 were given",
        ),
        ("register_service", vec![Value::from("x")], "TypeError: register_service(): service must be a dict"),
        (
            "register_service",
            vec![Value::Map(map! {"id" => 5})],
            "AssertionError: Service id info must contain ':'",
        ),
        (
            "register_service",
            vec![Value::Map(map! {"id" => "c:x", "config" => 5})],
            "ValueError: config must be a dict",
        ),
        (
            "unregister_service",
            vec![Value::List(vec![])],
            "TypeError: unregister_service(): service_id must be a string",
        ),
        ("cleanup", vec![Value::from(5)], "TypeError: cleanup(): workspace must be a string or None"),
        (
            "get_workspace_info",
            vec![Value::from(5)],
            "TypeError: get_workspace_info(): workspace must be a string or None",
        ),
        ("ping", vec![Value::Nil], "TypeError: ping(): client_id must be a string"),
        ("log_event", vec![Value::from(1)], "TypeError: log_event(): event_type must be a string"),
        ("get_env", vec![Value::from(1)], "TypeError: get_env(): key must be a string"),
        ("create_workspace", vec![Value::from("x")], "Exception: Only registered user can create workspace."),
    ];
    for (method, args, expected) in cases {
        let err = c.call(method, args.clone()).await.expect_err(method);
        assert!(err.starts_with(expected), "{method}({args:?}): {err}");
    }
    // Keyword arguments are checked too.
    let err = c.call_with("echo", vec![1.into()], Some(map! {"bogus" => 1})).await.unwrap_err();
    assert_eq!(err, "TypeError: echo() got an unexpected keyword argument 'bogus'");
    assert_eq!(c.call("echo", vec![Value::from("ok")]).await, Ok(Value::from("ok")));
}
