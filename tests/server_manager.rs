//! The workspace manager end to end (server spec §2.1 step 4, §4.3, §4.5, §5.3, §8): a real
//! server, raw websocket clients that speak the RPC wire protocol by hand (tests/support),
//! so providers can answer, fail, or go silent on purpose.

mod support;

use std::time::{Duration, Instant};

use hypha_rpc::core::auth::Permission;
use hypha_rpc::core::map;
use hypha_rpc::core::value::{Map, Value};
use hypha_rpc::server::ServerConfig;
use support::*;

fn mode(m: &str) -> Value {
    Value::Map(map! {"mode" => m})
}

async fn info_id(c: &mut Raw, id: &str, config: Value) -> Result<String, String> {
    c.call("get_service_info", vec![Value::from(id), config]).await.map(|v| text(&v, "id").to_owned())
}

// --- admission control (spec §2.1 step 4) ------------------------------------------------

/// A registered client whose socket is open but that does not answer pings: a second
/// connect with its id spends 5 s in the handshake (the manager pings it), holding an
/// admission slot all that time.
async fn slot_holder(srv: &hypha_rpc::server::RunningServer, alice: &str) -> (Raw, support::Ws) {
    let mut mute = Raw::registered(srv, "mute", Some(alice), None).await;
    mute.answer_pings = false;
    let mut second = connect(srv).await;
    use futures_util::SinkExt;
    let auth = serde_json::json!({"client_id": "mute", "token": alice});
    second.send(awc::ws::Message::Text(auth.to_string().into())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (mute, second)
}

#[actix_rt::test]
async fn handshakes_beyond_the_admission_limit_wait_then_get_server_busy() {
    let config = ServerConfig {
        max_concurrent_handshakes: 1,
        handshake_admission_timeout: Duration::from_millis(700),
        ..ServerConfig::default()
    };
    let srv = start(builder().config(config).jwt_secret(SECRET));
    let state = srv.server().state().clone();
    let alice = token("alice", &[], None);
    let _holder = slot_holder(&srv, &alice).await;
    assert_eq!(state.admission.available(), 0, "the ping-waiting handshake holds the only slot");

    let t0 = Instant::now();
    let mut waiting = connect(&srv).await;
    use futures_util::SinkExt;
    waiting
        .send(awc::ws::Message::Text(r#"{"client_id":"late","workspace":null,"token":null}"#.into()))
        .await
        .unwrap();
    let err = next_json(&mut waiting).await;
    assert_eq!(err, serde_json::json!({"type": "error", "message": "Server busy, please retry"}));
    assert_eq!(until_close(&mut waiting, WAIT).await, Some((1013, "Server busy, please retry".into())));
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(600) && waited < Duration::from_secs(3), "{waited:?}");
}

#[actix_rt::test]
async fn a_queued_handshake_proceeds_when_a_slot_frees_up() {
    let config = ServerConfig {
        max_concurrent_handshakes: 1,
        handshake_admission_timeout: Duration::from_secs(15),
        ..ServerConfig::default()
    };
    let srv = start(builder().config(config).jwt_secret(SECRET));
    let alice = token("alice", &[], None);
    let _holder = slot_holder(&srv, &alice).await;
    let t0 = Instant::now();
    // Queued behind the holder, whose ping times out after 5 s.
    let late = Raw::connect(&srv, "late", None, None).await;
    assert!(t0.elapsed() >= Duration::from_secs(3), "it did not wait: {:?}", t0.elapsed());
    assert_eq!(late.info["client_id"], "late");
    assert_eq!(srv.server().state().admission.available(), 1, "every slot is free again");
}

// --- lookup modes (spec §5.3) --------------------------------------------------------------

/// Two providers of `m` in ws-user-alice: `mode-a` (`load()` -> 5) then `mode-b` (-> 2),
/// and a consumer in the same workspace.
async fn two_providers(srv: &hypha_rpc::server::RunningServer) -> (Raw, Raw, Raw) {
    let alice = token("alice", &[], None);
    let mut a = Raw::registered(srv, "mode-a", Some(&alice), None).await;
    a.register("m", Map::new(), &[("load", Answer::Value(Value::from(5)))]).await.unwrap();
    let mut b = Raw::registered(srv, "mode-b", Some(&alice), None).await;
    b.register("m", Map::new(), &[("load", Answer::Value(Value::from(2)))]).await.unwrap();
    let consumer = Raw::connect(srv, "consumer", Some(&alice), None).await;
    (a, b, consumer)
}

/// Runs `c`'s call while `a` and `b` serve (they are asked `load()` by `select:` modes).
async fn with_providers<F, T>(a: &mut Raw, b: &mut Raw, call: F) -> T
where
    F: std::future::Future<Output = T>,
{
    let serve = async {
        tokio::join!(a.serve_for(Duration::from_secs(3)), b.serve_for(Duration::from_secs(3)));
    };
    tokio::pin!(call);
    tokio::pin!(serve);
    tokio::select! {
        out = &mut call => out,
        _ = &mut serve => call.await,
    }
}

#[actix_rt::test]
async fn lookup_modes_pick_as_upstream_does() {
    let srv = start(builder());
    let (mut a, mut b, mut c) = two_providers(&srv).await;
    let (ida, idb) = ("ws-user-alice/mode-a:m", "ws-user-alice/mode-b:m");

    let err = info_id(&mut c, "m", Value::Nil).await.unwrap_err();
    assert!(
        err.starts_with("AssertionError: Multiple services found for ws-user-alice/*:m, e.g. ["),
        "{err}"
    );
    assert_eq!(info_id(&mut c, "m", mode("exact")).await.unwrap_err(), err);
    assert_eq!(info_id(&mut c, "m", mode("first")).await.unwrap(), ida);
    assert_eq!(info_id(&mut c, "m", mode("last")).await.unwrap(), idb);
    assert_eq!(info_id(&mut c, "m", mode("min_load")).await.unwrap(), ida, "no __rlb client: all load 0");
    for m in ["random", "native:random"] {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..40 {
            seen.insert(info_id(&mut c, "m", mode(m)).await.unwrap());
        }
        assert_eq!(seen.len(), 2, "{m} always picked {seen:?}");
    }
    // select: the manager asks every candidate's load() and picks by the answer.
    assert_eq!(
        with_providers(&mut a, &mut b, info_id(&mut c, "m", mode("select:min:load"))).await.unwrap(),
        idb
    );
    assert_eq!(
        with_providers(&mut a, &mut b, info_id(&mut c, "m", mode("select:max:load"))).await.unwrap(),
        ida
    );
    assert_eq!(
        with_providers(&mut a, &mut b, info_id(&mut c, "m", mode("select:first_success:load")))
            .await
            .unwrap(),
        ida
    );
    assert!(
        a.calls.contains(&"services.m.load".to_owned()) && b.calls.contains(&"services.m.load".to_owned())
    );
    // A function nobody has: no error, one of them.
    let got =
        with_providers(&mut a, &mut b, info_id(&mut c, "m", mode("select:min:nonexistent"))).await.unwrap();
    assert!(got == ida || got == idb, "{got}");
    // Upstream's exact errors.
    assert_eq!(
        info_id(&mut c, "m", mode("select:bogus:load")).await.unwrap_err(),
        "ValueError: Unknown selection criteria: bogus"
    );
    assert_eq!(
        info_id(&mut c, "m", mode("bogus")).await.unwrap_err(),
        "ValueError: Invalid mode: bogus. Mode must be 'random', 'first', 'last', 'exact', 'min_load', 'native:random', or 'select:criteria:function' format (e.g., 'select:min:get_load')"
    );
    // One candidate: any mode that parses returns it without asking.
    assert_eq!(info_id(&mut c, "mode-a:m", mode("select:bogus:load")).await.unwrap(), ida);
    assert_eq!(
        info_id(&mut c, "nope", mode("bogus")).await.unwrap_err(),
        "KeyError: 'Service not found: ws-user-alice/*:nope@*'"
    );
}

#[actix_rt::test]
async fn select_skips_candidates_that_fail_or_do_not_answer_in_time() {
    let srv = start(builder());
    let (mut a, mut b, mut c) = two_providers(&srv).await;
    a.answers.insert("services.m.load".into(), Answer::Error("broken".into()));
    b.answers.insert("services.m.load".into(), Answer::Silence);
    let sel = |m: &str| Value::Map(map! {"mode" => m, "select_timeout" => 0.5});
    let t0 = Instant::now();
    let got = with_providers(&mut a, &mut b, info_id(&mut c, "m", sel("select:min:load"))).await.unwrap();
    assert!(got.ends_with(":m"), "nobody answered: a random one, {got}");
    assert!(t0.elapsed() < Duration::from_secs(2), "select_timeout not applied: {:?}", t0.elapsed());
    // Only mode-b answers: first_success and min both pick it.
    b.answers.insert("services.m.load".into(), Answer::Value(Value::F64(9.5)));
    for m in ["select:first_success:load", "select:min:load"] {
        let got = with_providers(&mut a, &mut b, info_id(&mut c, "m", sel(m))).await.unwrap();
        assert_eq!(got, "ws-user-alice/mode-b:m", "{m}");
    }
}

#[actix_rt::test]
async fn min_load_prefers_the_load_balanced_client_that_sent_least() {
    let srv = start(builder());
    let alice = token("alice", &[], None);
    let mut w1 = Raw::registered(&srv, "w1__rlb", Some(&alice), None).await;
    w1.register("job", Map::new(), &[]).await.unwrap();
    let mut w2 = Raw::registered(&srv, "w2__rlb", Some(&alice), None).await;
    w2.register("job", Map::new(), &[]).await.unwrap();
    let mut c = Raw::connect(&srv, "consumer", Some(&alice), None).await;
    // w1 is busy: it sends many more frames than w2.
    for i in 0..30 {
        w1.call("echo", vec![Value::from(i)]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(info_id(&mut c, "job", mode("min_load")).await.unwrap(), "ws-user-alice/w2__rlb:job");
    for i in 0..80 {
        w2.call("echo", vec![Value::from(i)]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(info_id(&mut c, "job", mode("min_load")).await.unwrap(), "ws-user-alice/w1__rlb:job");
}

// --- cleanup (spec §4.3, §8) -------------------------------------------------------------

#[actix_rt::test]
async fn cleanup_removes_clients_that_do_not_answer_a_ping() {
    let srv = start(builder());
    let state = srv.server().state().clone();
    let alice = token("alice", &[], None);
    let mut admin = Raw::registered(&srv, "admin", Some(&alice), None).await;
    let mut watcher = Raw::connect(&srv, "watcher", Some(&alice), None).await;
    let subscribed = watcher.call("subscribe", vec![Value::List(vec!["client_disconnected".into()])]).await;
    assert_eq!(subscribed, Ok(Value::Bool(true)));
    let mut mute = Raw::registered(&srv, "mute", Some(&alice), None).await;
    mute.register("svc", Map::new(), &[]).await.unwrap();
    mute.answer_pings = false;

    // Healthy workspace but for `mute`: the admin answers its own ping while it waits.
    let t0 = Instant::now();
    let got = admin.call_with("cleanup", vec![], Some(map! {"timeout" => 1})).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(got, Value::Map(map! {"removed_clients" => vec![Value::from("ws-user-alice/mute")]}));
    assert!(state.registry.get("ws-user-alice", "mute", "svc").is_none());
    assert!(state.registry.builtin("ws-user-alice", "mute").is_none());
    assert!(state.registry.builtin("ws-user-alice", "admin").is_some());
    assert!(!state.router.is_connected("ws-user-alice", "mute"));
    // Its socket is closed (no error frame), and the workspace hears it left.
    assert_eq!(until_close(&mut mute.ws, WAIT).await, Some((1001, "Client deleted by admin".into())));
    watcher.serve_for(Duration::from_millis(300)).await;
    let left: Vec<&Map> = watcher
        .events
        .iter()
        .filter(|e| e.get("type").and_then(Value::as_str) == Some("client_disconnected"))
        .collect();
    assert_eq!(left.len(), 1, "{:?}", watcher.events);
    assert_eq!(left[0]["data"], Value::Map(map! {"id" => "mute", "workspace" => "ws-user-alice"}));
    // Nothing left to remove.
    assert_eq!(admin.call("cleanup", vec![]).await, Ok(Value::Map(Map::new())));
}

#[actix_rt::test]
async fn cleanup_deletes_empty_workspaces_and_unloads_emptied_ones() {
    let srv = start(builder());
    let state = srv.server().state().clone();
    let alice = token("alice", &[], None);
    let mut admin = Raw::registered(&srv, "admin", Some(&alice), None).await;
    for name in ["alice-empty", "alice-team"] {
        let created = admin.call("create_workspace", vec![Value::Map(map! {"name" => name})]).await;
        assert!(created.is_ok(), "{created:?}");
    }
    // Empty and not persistent: deleted.
    let got = admin.call("cleanup", vec![Value::from("alice-empty")]).await.unwrap();
    assert_eq!(
        got,
        Value::Map(map! {"removed_workspace" => "alice-empty", "removed_clients" => Vec::<Value>::new()})
    );
    assert!(!state.workspaces.contains("alice-empty"));

    // A workspace whose only registered client is dead: the client goes, then the
    // workspace is unloaded and a subscriber still connected there hears it.
    let team = token("alice", &[("alice-team", Permission::Admin)], Some("alice-team"));
    let mut mute = Raw::registered(&srv, "mute", Some(&team), Some("alice-team")).await;
    mute.answer_pings = false;
    let mut listener = Raw::connect(&srv, "listener", Some(&team), Some("alice-team")).await;
    let ok = listener.call("subscribe", vec![Value::from("workspace_unloaded")]).await;
    assert_eq!(ok, Ok(Value::Bool(true)));
    let got = admin.call("cleanup", vec![Value::from("alice-team"), Value::F64(0.5)]).await.unwrap();
    assert_eq!(got, Value::Map(map! {"removed_clients" => vec![Value::from("alice-team/mute")]}));
    assert!(!state.workspaces.contains("alice-team"));
    listener.serve_for(Duration::from_millis(300)).await;
    let unloaded = listener
        .events
        .iter()
        .find(|e| e.get("type").and_then(Value::as_str) == Some("workspace_unloaded"))
        .unwrap_or_else(|| panic!("no workspace_unloaded: {:?}", listener.events));
    let data = unloaded["data"].as_map().unwrap();
    assert_eq!((data["id"].as_str(), &data["status"]), (Some("alice-team"), &Value::Nil));
    assert_eq!(
        admin.call("cleanup", vec![Value::from("alice-team")]).await.unwrap_err(),
        "KeyError: 'Workspace (alice-team) not found and workspace loader not configured (requires s3).'"
    );
}

#[actix_rt::test]
async fn cleanup_needs_admin_and_keeps_persistent_workspaces() {
    let srv = start(builder().root_token("r".repeat(64)));
    let mut anon = Raw::registered(&srv, "anon", None, None).await;
    let err = anon.call("cleanup", vec![Value::from("ws-user-alice")]).await.unwrap_err();
    assert!(err.starts_with("KeyError: ") || err.starts_with("PermissionError: "), "{err}");
    let alice = token("alice", &[], None);
    let _a = Raw::registered(&srv, "a", Some(&alice), None).await;
    let err = anon.call("cleanup", vec![Value::from("ws-user-alice")]).await.unwrap_err();
    assert_eq!(
        err,
        format!(
            "PermissionError: Permission denied for workspace ws-user-alice, user: {}",
            anon.info["user"]["id"].as_str().unwrap()
        )
    );
    // Root cleans the system workspaces without deleting them.
    let mut root = Raw::registered(&srv, "root-c", Some(&"r".repeat(64)), None).await;
    for ws in ["public", "ws-anonymous"] {
        assert_eq!(root.call("cleanup", vec![Value::from(ws)]).await, Ok(Value::Map(Map::new())), "{ws}");
        assert!(srv.server().state().workspaces.contains(ws));
    }
    // A wrong argument type is a clear error.
    let err = root.call("cleanup", vec![Value::from(5)]).await.unwrap_err();
    assert!(err.starts_with("TypeError: cleanup(): workspace must be a string"), "{err}");
}

// --- register_service of a `default` service (spec §4.5 step 11) ---------------------------

#[actix_rt::test]
async fn registering_a_default_service_runs_its_setup() {
    let srv = start(builder());
    let alice = token("alice", &[], None);
    let mut app = Raw::registered(&srv, "app", Some(&alice), None).await;
    let setup = map! {"_rtype" => "method", "_rtarget" => "app", "_rmethod" => "services.default.setup",
    "_rpromise" => "*"};
    let service = map! {"id" => "ws-user-alice/app:default", "name" => "default", "setup" => setup};
    app.answers.insert("services.built-in.get_service".into(), Answer::Value(Value::Map(service)));
    app.answers.insert("services.default.setup".into(), Answer::Value(Value::Nil));
    app.register("default", Map::new(), &[("setup", Answer::Value(Value::Nil))]).await.unwrap();
    app.serve_for(Duration::from_millis(500)).await;
    assert_eq!(app.calls, ["services.built-in.get_service", "services.default.setup"]);

    // A default service without setup() is only fetched.
    let mut plain = Raw::registered(&srv, "plain", Some(&alice), None).await;
    plain.answers.insert(
        "services.built-in.get_service".into(),
        Answer::Value(Value::Map(map! {"id" => "ws-user-alice/plain:default"})),
    );
    plain.register("default", Map::new(), &[]).await.unwrap();
    plain.serve_for(Duration::from_millis(300)).await;
    assert_eq!(plain.calls, ["services.built-in.get_service"]);
    // Other services are not fetched.
    plain.register("other", Map::new(), &[]).await.unwrap();
    plain.serve_for(Duration::from_millis(200)).await;
    assert_eq!(plain.calls.len(), 1);
}

// --- server-side parts of the hypha-rpc conformance list (rpc-protocol §12) ---------------

/// #16, #30, #35: whatever close code a client uses, the server cleans it up (records
/// gone, `client_disconnected` to subscribers), and the client's reconnection token brings
/// it back under the same address, where it re-registers its services.
#[actix_rt::test]
async fn clients_closing_with_any_code_can_reconnect_and_reregister() {
    use futures_util::SinkExt;
    let srv = start(builder());
    let state = srv.server().state().clone();
    let alice = token("alice", &[], None);
    let mut watcher = Raw::connect(&srv, "watcher", Some(&alice), None).await;
    let ok = watcher.call("subscribe", vec![Value::from("client_disconnected")]).await;
    assert_eq!(ok, Ok(Value::Bool(true)));
    let mut consumer = Raw::connect(&srv, "consumer", Some(&alice), None).await;
    let mut provider = Raw::registered(&srv, "prov", Some(&alice), None).await;
    provider.register("svc", Map::new(), &[]).await.unwrap();
    for code in [1000u16, 1001, 1002, 1003, 1011] {
        let reconnect = provider.info["reconnection_token"].as_str().unwrap().to_owned();
        let reason = awc::ws::CloseReason { code: awc::ws::CloseCode::from(code), description: None };
        provider.ws.send(awc::ws::Message::Close(Some(reason))).await.unwrap();
        let _ = until_close(&mut provider.ws, WAIT).await;
        watcher.serve_for(Duration::from_millis(200)).await;
        let last = watcher.events.pop().unwrap_or_else(|| panic!("no event after close {code}"));
        assert_eq!(last["data"], Value::Map(map! {"id" => "prov", "workspace" => "ws-user-alice"}), "{code}");
        assert!(state.registry.get("ws-user-alice", "prov", "svc").is_none(), "{code}");
        let err = info_id(&mut consumer, "svc", Value::Nil).await.unwrap_err();
        assert_eq!(err, "KeyError: 'Service not found: ws-user-alice/*:svc@*'");

        let mut sock = connect(&srv).await;
        let auth = serde_json::json!({"client_id": "prov", "reconnection_token": reconnect});
        sock.send(awc::ws::Message::Text(auth.to_string().into())).await.unwrap();
        let info = next_json(&mut sock).await;
        assert_eq!(
            (info["workspace"].as_str(), info["client_id"].as_str()),
            (Some("ws-user-alice"), Some("prov"))
        );
        provider.ws = sock;
        provider.info = info;
        provider.register_builtin().await;
        provider.register("svc", Map::new(), &[]).await.unwrap();
        assert_eq!(
            info_id(&mut consumer, "svc", Value::Nil).await.unwrap(),
            "ws-user-alice/prov:svc",
            "{code}"
        );
    }
}

/// #34, #37, #40: a reconnection token is self-contained, so after a server restart (same
/// secret, new server id and so a new `manager_id`) the client comes back to its address.
#[actix_rt::test]
async fn a_reconnection_token_survives_a_server_restart() {
    use futures_util::SinkExt;
    let first = start(builder().server_id("first-server"));
    let alice = token("alice", &[], None);
    let old = Raw::registered(&first, "prov", Some(&alice), None).await;
    let reconnect = old.info["reconnection_token"].as_str().unwrap().to_owned();
    first.stop().await.unwrap();

    let second = start(builder().server_id("second-server"));
    let mut sock = connect(&second).await;
    let auth = serde_json::json!({"client_id": "prov", "reconnection_token": reconnect});
    sock.send(awc::ws::Message::Text(auth.to_string().into())).await.unwrap();
    let info = next_json(&mut sock).await;
    assert_eq!(info["type"], "connection_info", "{info}");
    assert_eq!(
        (info["workspace"].as_str(), info["client_id"].as_str()),
        (Some("ws-user-alice"), Some("prov"))
    );
    assert_eq!(info["manager_id"], "manager-second-server");
    assert_ne!(info["manager_id"], old.info["manager_id"]);
}

/// #25, #62: nested calls across clients (A calls B, B calls A back while A waits) are
/// routed both ways.
#[actix_rt::test]
async fn nested_cross_client_calls_are_routed_both_ways() {
    let srv = start(builder());
    let alice = token("alice", &[], None);
    let mut a = Raw::registered(&srv, "a", Some(&alice), None).await;
    let mut b = Raw::registered(&srv, "b", Some(&alice), None).await;
    a.answers.insert("services.svc.inner".into(), Answer::Value(Value::from(71)));
    // A calls b's outer(); B, while handling it, calls a's inner() and answers with that.
    a.send(
        map! {"type" => "method", "to" => "b", "method" => "services.svc.outer", "session" => "outer1"},
        Some(map! {"args" => Vec::<Value>::new(), "promise" => "*", "t" => 15}),
    )
    .await;
    let frame = loop {
        match next_within(&mut b.ws, WAIT).await {
            Some(awc::ws::Frame::Binary(f)) => break f,
            Some(_) => continue,
            None => panic!("b's socket ended"),
        }
    };
    let pkg = hypha_rpc::core::package::decode_package(&frame, &Default::default()).unwrap();
    assert_eq!(pkg.main["method"], Value::from("services.svc.outer"));
    assert_eq!(pkg.main["from"], Value::from("ws-user-alice/a"));
    b.send(
        map! {"type" => "method", "to" => "a", "method" => "services.svc.inner", "session" => "inner1"},
        Some(map! {"args" => Vec::<Value>::new(), "promise" => "*", "t" => 15}),
    )
    .await;
    // a answers inner() while waiting for outer().
    let (inner, ()) = tokio::join!(b.wait_for("inner1", WAIT), a.serve_for(Duration::from_millis(300)));
    assert_eq!(inner, Ok(Value::from(71)));
    b.send(
        map! {"type" => "method", "to" => "a", "method" => "outer1.resolve"},
        Some(map! {"args" => vec![Value::from(71)]}),
    )
    .await;
    assert_eq!(a.wait_for("outer1", WAIT).await, Ok(Value::from(71)));
    assert_eq!(a.calls, ["services.svc.inner"]);
}

/// #29, #66: the manager stores `service_schema` as sent and hands the provider's function
/// descriptors to consumers untouched (an encryption key `_renc_pub` included), adding only
/// `id` and `config.workspace` / `config.url`.
#[actix_rt::test]
async fn get_service_passes_schemas_and_descriptors_through() {
    let srv = start(builder());
    let alice = token("alice", &[], None);
    let mut p = Raw::registered(&srv, "p", Some(&alice), None).await;
    let schema = map! {"add" => map! {"type" => "function", "function" => map! {"name" => "add",
    "description" => "Add.", "parameters" => map! {"type" => "object",
    "properties" => map! {"a" => map! {"type" => "integer"}, "b" => map! {"type" => "number", "default" => 2.5}},
    "required" => vec![Value::from("a")]}}}};
    let service = map! {"id" => "p:calc", "name" => "calc", "service_schema" => schema.clone()};
    assert_eq!(p.call("register_service", vec![Value::Map(service)]).await, Ok(Value::Nil));
    let mut c = Raw::connect(&srv, "c", Some(&alice), None).await;
    let info = c.call("get_service_info", vec![Value::from("calc")]).await.unwrap();
    assert_eq!(info.as_map().unwrap()["service_schema"], Value::Map(schema));

    let key = Value::Bytes(bytes::Bytes::from(vec![7u8; 32]));
    let add = map! {"_rtype" => "method", "_rtarget" => "p", "_rmethod" => "services.calc.add",
    "_rpromise" => "*", "_renc_pub" => key.clone(), "_rschema" => map! {"name" => "add"}};
    let api =
        map! {"id" => "calc", "name" => "calc", "config" => map! {"visibility" => "protected"}, "add" => add};
    p.answers.insert("services.built-in.get_service".into(), Answer::Value(Value::Map(api)));
    let (got, _) =
        tokio::join!(c.call("get_service", vec![Value::from("calc")]), p.serve_for(Duration::from_secs(1)));
    let got = got.unwrap();
    let got = got.as_map().unwrap();
    assert_eq!(got["id"], Value::from("ws-user-alice/p:calc"));
    let add = got["add"].as_map().unwrap();
    assert_eq!(add["_renc_pub"], key);
    assert_eq!(add["_rmethod"], Value::from("services.calc.add"));
    let config = got["config"].as_map().unwrap();
    assert_eq!(config["workspace"], Value::from("ws-user-alice"));
    assert!(config["url"].as_str().unwrap().ends_with("/ws-user-alice/services/p:calc"));
}
