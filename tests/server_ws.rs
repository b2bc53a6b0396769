//! The server's websocket endpoint end to end (server spec §2, §3.2, §3.4, §8): a real
//! server on an ephemeral port, raw websocket clients (awc), and bytes on the wire.
//!
//! Every test that feeds the server bad input also checks that a bystander connection
//! keeps being served afterwards. The last test runs the real `hypha-server` binary.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix_codec::Framed;
use actix_ws::Item;
use awc::ws::{CloseCode, Codec, Frame, Message};
use awc::BoxedSocket;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hypha_rpc::core::auth::{JwtConfig, Permission, UserInfo};
use hypha_rpc::core::msgpack::{self, DecodeLimits};
use hypha_rpc::core::package::{decode_package, encode_package};
use hypha_rpc::core::value::{Map, Value};
use hypha_rpc::core::{auth, map};
use hypha_rpc::server::{RunningServer, Server, ServerBuilder};
use serde_json::{json, Value as Json};

type Ws = Framed<BoxedSocket, Codec>;

const SECRET: &str = "test-secret-for-the-websocket-tests";
const WAIT: Duration = Duration::from_secs(3);

fn builder() -> ServerBuilder {
    Server::builder().jwt_secret(SECRET).server_id("test-server").workers(1)
}

fn start(b: ServerBuilder) -> RunningServer {
    b.build().expect("valid config").start("127.0.0.1", 0).expect("bind")
}

async fn connect_url(url: &str) -> Ws {
    let (_, ws) =
        awc::Client::new().ws(url).max_frame_size(32 << 20).connect().await.expect("websocket upgrade");
    ws
}

async fn connect(srv: &RunningServer) -> Ws {
    connect_url(&srv.ws_url()).await
}

async fn next(ws: &mut Ws) -> Option<Frame> {
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(Some(Ok(f))) => Some(f),
        Ok(Some(Err(_))) | Ok(None) => None,
        Err(_) => panic!("no frame within {WAIT:?}"),
    }
}

async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.into())).await.expect("send text");
}

async fn send_bin(ws: &mut Ws, bytes: impl Into<Bytes>) {
    ws.send(Message::Binary(bytes.into())).await.expect("send binary");
}

async fn next_json(ws: &mut Ws) -> Json {
    match next(ws).await {
        Some(Frame::Text(t)) => serde_json::from_slice(&t).expect("JSON text frame"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

async fn next_bin(ws: &mut Ws) -> Bytes {
    loop {
        match next(ws).await {
            Some(Frame::Binary(b)) => return b,
            Some(Frame::Ping(_)) | Some(Frame::Pong(_)) => continue,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

/// The close code and reason, skipping nothing: the next frame must be the close.
async fn expect_close(ws: &mut Ws) -> (u16, String) {
    match next(ws).await {
        Some(Frame::Close(Some(r))) => (u16::from(r.code), r.description.unwrap_or_default()),
        Some(Frame::Close(None)) => (1005, String::new()),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// An error text frame, then a close frame with the same text: returns (message, code).
async fn expect_error_close(ws: &mut Ws) -> (String, u16) {
    let err = next_json(ws).await;
    assert_eq!(err["type"], "error", "{err}");
    let message = err["message"].as_str().expect("message").to_owned();
    let (code, reason) = expect_close(ws).await;
    assert!(message.starts_with(&reason), "reason {reason:?} vs message {message:?}");
    (message, code)
}

/// Nothing arrives within `d`.
async fn expect_silence(ws: &mut Ws, d: Duration) {
    if let Ok(f) = tokio::time::timeout(d, ws.next()).await {
        panic!("expected silence, got {f:?}");
    }
}

async fn handshake(ws: &mut Ws, payload: Json) -> Json {
    send_text(ws, &payload.to_string()).await;
    let info = next_json(ws).await;
    assert_eq!(info["type"], "connection_info", "{info}");
    info
}

async fn anonymous(srv: &RunningServer, cid: &str) -> (Ws, Json) {
    let mut ws = connect(srv).await;
    let info = handshake(&mut ws, json!({"client_id": cid, "workspace": null, "token": null})).await;
    (ws, info)
}

/// A token for `user_id` with `perms` on workspaces, bound to `wid` if given.
fn token(user_id: &str, perms: &[(&str, Permission)], wid: Option<&str>) -> String {
    let mut user = UserInfo::new(user_id);
    for (ws, p) in perms {
        user.scope.workspaces.insert((*ws).to_owned(), *p);
    }
    user.scope.current_workspace = wid.map(str::to_owned);
    JwtConfig::new(SECRET).encode(&user, 3600.0, auth::unix_seconds(std::time::SystemTime::now())).unwrap()
}

async fn with_token(srv: &RunningServer, cid: &str, token: &str, ws: Option<&str>) -> (Ws, Json) {
    let mut sock = connect(srv).await;
    let info = handshake(&mut sock, json!({"client_id": cid, "workspace": ws, "token": token})).await;
    (sock, info)
}

/// A connection answers an app-level ping: it is still served.
async fn assert_alive(ws: &mut Ws) {
    send_text(ws, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(ws).await, json!({"type": "pong"}));
}

fn frame(main: Map, extra: Option<Map>) -> Bytes {
    Bytes::from(encode_package(&main, extra.as_ref()).unwrap())
}

fn keys(v: &Json) -> Vec<String> {
    v.as_object().expect("object").keys().cloned().collect()
}

// --- handshake ---------------------------------------------------------------------------

#[actix_rt::test]
async fn anonymous_handshake_sends_connection_info() {
    let srv = start(builder().public_base_url("https://hypha.example/"));
    let (mut ws, info) = anonymous(&srv, "probe-ok").await;
    assert_eq!(
        keys(&info),
        [
            "type",
            "hypha_version",
            "public_base_url",
            "local_base_url",
            "manager_id",
            "workspace",
            "client_id",
            "user",
            "reconnection_token",
            "reconnection_token_life_time"
        ]
    );
    assert_eq!(info["hypha_version"], "0.21.137");
    assert_eq!(info["public_base_url"], "https://hypha.example");
    assert_eq!(info["local_base_url"], format!("http://127.0.0.1:{}", srv.local_addr().port()));
    assert_eq!(info["manager_id"], "manager-test-server");
    assert_eq!(info["client_id"], "probe-ok");
    assert_eq!(info["reconnection_token_life_time"], json!(172800.0));
    assert!(info["reconnection_token_life_time"].is_f64());
    let user = &info["user"];
    let uid = user["id"].as_str().unwrap();
    assert!(uid.starts_with("anonymouz-"), "{uid}");
    let ws_id = format!("ws-user-{uid}");
    assert_eq!(info["workspace"], ws_id.as_str());
    assert_eq!(
        keys(user),
        ["id", "roles", "is_anonymous", "scope", "email", "parent", "expires_at", "current_workspace"]
    );
    assert_eq!(user["roles"], json!(["anonymous"]));
    assert_eq!(user["is_anonymous"], true);
    assert_eq!(
        user["scope"],
        json!({"current_workspace": ws_id, "workspaces": {ws_id.as_str(): "a"}, "client_id": "probe-ok", "extra_scopes": null})
    );
    // The reconnection token: signed with our secret, for the final user, 172800 s.
    let now = auth::unix_seconds(std::time::SystemTime::now());
    let claims = JwtConfig::new(SECRET).verify(info["reconnection_token"].as_str().unwrap(), now).unwrap();
    assert_eq!(claims["sub"], uid);
    assert_eq!(claims["scope"], format!("ws:{ws_id}#a cid:probe-ok wid:{ws_id}"));
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 172_800);
    // The personal workspace now exists.
    assert!(srv.server().state().workspaces.contains(&ws_id));
    assert_alive(&mut ws).await;
}

#[actix_rt::test]
async fn legacy_query_parameters_are_refused_without_an_error_frame() {
    let srv = start(builder());
    let (mut bystander, _) = anonymous(&srv, "bystander").await;
    for q in ["client_id=abc", "token=abc", "x=1&workspace=w"] {
        let mut ws = connect_url(&format!("{}?{q}", srv.ws_url())).await;
        let (code, reason) = expect_close(&mut ws).await;
        assert_eq!(code, 1008);
        assert_eq!(
            reason,
            "Connection rejected, please  upgrade to `hypha-rpc` which pass the authentication information in the first message"
        );
    }
    assert_alive(&mut bystander).await;
}

#[actix_rt::test]
async fn silence_before_the_auth_frame_times_out() {
    let srv = start(builder().auth_timeout(Duration::from_millis(200)));
    let mut ws = connect(&srv).await;
    let t0 = Instant::now();
    let (msg, code) = expect_error_close(&mut ws).await;
    assert_eq!((msg.as_str(), code), ("Authentication payload timeout", 1008));
    assert!(t0.elapsed() >= Duration::from_millis(150), "{:?}", t0.elapsed());
    // A client that authenticates in time is not affected by the timer.
    let (mut ok, _) = anonymous(&srv, "in-time").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_alive(&mut ok).await;
}

#[actix_rt::test]
async fn an_undecodable_auth_frame_is_refused_with_1003() {
    let srv = start(builder());
    let (mut bystander, _) = anonymous(&srv, "bystander").await;
    for bad in [
        Message::Text("hello there".into()),
        Message::Text("[1,2]".into()),
        Message::Binary(Bytes::from_static(b"\x81\xa1a\x01")),
    ] {
        let mut ws = connect(&srv).await;
        ws.send(bad).await.unwrap();
        let (msg, code) = expect_error_close(&mut ws).await;
        assert_eq!((msg.as_str(), code), ("Failed to decode authentication information", 1003));
    }
    assert_alive(&mut bystander).await;
}

#[actix_rt::test]
async fn bad_tokens_get_the_authentication_error_and_1008() {
    let srv = start(builder());
    let (mut bystander, _) = anonymous(&srv, "bystander").await;
    let wrong_secret = JwtConfig::new("another-secret").encode(&UserInfo::new("eve"), 60.0, 1e10).unwrap();
    for (tok, text) in [
        ("not-a-jwt", "Authentication error: Error decoding token headers."),
        (wrong_secret.as_str(), "Authentication error: Signature verification failed."),
    ] {
        let mut ws = connect(&srv).await;
        send_text(&mut ws, &json!({"client_id": "c", "token": tok}).to_string()).await;
        let (msg, code) = expect_error_close(&mut ws).await;
        assert_eq!((msg.as_str(), code), (text, 1008));
    }
    assert_alive(&mut bystander).await;
}

#[actix_rt::test]
async fn unknown_and_forbidden_workspaces_are_refused() {
    let srv = start(builder());
    let (mut bystander, _) = anonymous(&srv, "bystander").await;
    let cases = [
        (
            json!({"client_id": "c", "workspace": "nonexistent-ws"}),
            "Failed to establish connection: 'Workspace nonexistent-ws does not exist or is not accessible'",
        ),
        (
            json!({"client_id": "c", "workspace": "public"}),
            "Failed to establish connection: Permission denied for workspace: public",
        ),
        (json!({"client_id": "a/b"}), "Failed to establish connection: Invalid client id: a/b"),
    ];
    for (payload, text) in cases {
        let mut ws = connect(&srv).await;
        send_text(&mut ws, &payload.to_string()).await;
        let (msg, code) = expect_error_close(&mut ws).await;
        assert_eq!((msg.as_str(), code), (text, 1001));
    }
    // A refused handshake creates nothing.
    assert!(!srv.server().state().workspaces.contains("nonexistent-ws"));
    assert_alive(&mut bystander).await;
}

#[actix_rt::test]
async fn a_live_client_id_cannot_be_taken_twice() {
    let srv = start(builder());
    let alice = token("alice", &[], None);
    let (mut first, info) = with_token(&srv, "dup-id", &alice, None).await;
    assert_eq!(info["workspace"], "ws-user-alice");
    let mut second = connect(&srv).await;
    send_text(&mut second, &json!({"client_id": "dup-id", "token": alice}).to_string()).await;
    let (msg, code) = expect_error_close(&mut second).await;
    assert_eq!(
        (msg.as_str(), code),
        ("Failed to establish connection: Client already exists and is active: ws-user-alice/dup-id", 1001)
    );
    // The same id in another workspace is fine; the first connection is untouched.
    let (_other, info) = anonymous(&srv, "dup-id").await;
    assert_eq!(info["client_id"], "dup-id");
    assert_alive(&mut first).await;
}

/// A registered client (it has a `built-in` record) whose socket stays open but does not
/// answer the manager's `built-in.ping` is replaced by a new connection with its id (spec
/// §2.1 step 7); its records go with it.
#[actix_rt::test]
async fn a_registered_client_that_does_not_answer_a_ping_is_replaced() {
    let srv = start(builder());
    let state = srv.server().state().clone();
    let alice = token("alice", &[], None);
    let (mut first, info) = with_token(&srv, "mute", &alice, None).await;
    let manager = format!("*/{}", info["manager_id"].as_str().unwrap());
    let builtin =
        map! {"id" => "mute:built-in", "type" => "built-in", "config" => map! {"visibility" => "public"}};
    let call = frame(
        map! {"type" => "method", "to" => manager.as_str(), "method" => "services.default.register_service", "session" => "s1"},
        Some(map! {"args" => vec![Value::Map(builtin)], "promise" => "*", "t" => 15}),
    );
    send_bin(&mut first, call).await;
    let deadline = Instant::now() + WAIT;
    while state.registry.builtin("ws-user-alice", "mute").is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(state.registry.builtin("ws-user-alice", "mute").is_some(), "the built-in was not registered");

    let t0 = Instant::now();
    let mut second = connect(&srv).await;
    send_text(&mut second, &json!({"client_id": "mute", "token": alice}).to_string()).await;
    let info = match tokio::time::timeout(Duration::from_secs(10), second.next()).await {
        Ok(Some(Ok(Frame::Text(t)))) => serde_json::from_slice::<Json>(&t).unwrap(),
        other => panic!("expected connection_info, got {other:?}"),
    };
    assert_eq!(info["type"], "connection_info", "{info}");
    assert_eq!(info["client_id"], "mute");
    // It waited for the ping to time out (5 s), and the old client's record is gone.
    assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(state.registry.builtin("ws-user-alice", "mute").is_none());
    assert!(state.router.is_connected("ws-user-alice", "mute"));
    assert_alive(&mut second).await;
}

#[actix_rt::test]
async fn a_reconnection_token_takes_the_address_over() {
    let srv = start(builder());
    let (mut old, info) = anonymous(&srv, "rc").await;
    let ws_id = info["workspace"].as_str().unwrap().to_owned();
    let rt = info["reconnection_token"].as_str().unwrap().to_owned();
    let state = srv.server().state().clone();
    let g_old = state.router.generation(&ws_id, "rc").unwrap();

    let mut new = connect(&srv).await;
    let info2 = handshake(&mut new, json!({"client_id": "rc", "reconnection_token": rt})).await;
    assert_eq!(
        (info2["workspace"].as_str(), info2["client_id"].as_str()),
        (Some(ws_id.as_str()), Some("rc"))
    );
    // The old socket is dropped without a close frame.
    match tokio::time::timeout(WAIT, old.next()).await.expect("old socket dropped in time") {
        None | Some(Err(_)) => {}
        Some(Ok(f)) => panic!("superseded socket got {f:?}"),
    }
    // The old connection's cleanup left the new registration alone, and no
    // client_disconnected was due.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let g_new = state.router.generation(&ws_id, "rc").expect("still registered");
    assert!(g_new > g_old);
    assert_alive(&mut new).await;

    // Frames to the address reach the new connection.
    let reconnect_token = info2["reconnection_token"].as_str().unwrap();
    let claims = JwtConfig::new(SECRET)
        .verify(reconnect_token, auth::unix_seconds(std::time::SystemTime::now()))
        .unwrap();
    let uid = claims["sub"].as_str().unwrap().to_owned();
    let mine = token(&uid, &[(ws_id.as_str(), Permission::Admin)], Some(&ws_id));
    let (mut peer, _) = with_token(&srv, "peer", &mine, Some(&ws_id)).await;
    send_bin(&mut peer, frame(map! {"type" => "evt", "to" => "rc", "data" => 1}, None)).await;
    let got = decode_package(&next_bin(&mut new).await, &DecodeLimits::default()).unwrap();
    assert_eq!(got.main["from"], Value::from(format!("{ws_id}/peer")));
}

// --- control frames ------------------------------------------------------------------------

#[actix_rt::test]
async fn ping_refresh_token_and_ignored_text() {
    let srv = start(builder());
    let (mut ws, info) = anonymous(&srv, "ctl").await;
    assert_alive(&mut ws).await;
    // Unknown types, non-JSON and oversized texts are ignored; the socket stays open.
    send_text(&mut ws, r#"{"type":"whatever"}"#).await;
    send_text(&mut ws, "not json").await;
    let padded = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(1000));
    send_text(&mut ws, &padded).await;
    expect_silence(&mut ws, Duration::from_millis(150)).await;
    // ~920 characters is still a ping.
    let padded = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(900));
    send_text(&mut ws, &padded).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "pong"}));

    send_text(&mut ws, r#"{"type":"refresh_token"}"#).await;
    let fresh = next_json(&mut ws).await;
    assert_eq!(keys(&fresh), ["type", "reconnection_token"]);
    assert_eq!(fresh["type"], "reconnection_token");
    let now = auth::unix_seconds(std::time::SystemTime::now());
    let claims = JwtConfig::new(SECRET).verify(fresh["reconnection_token"].as_str().unwrap(), now).unwrap();
    let ws_id = info["workspace"].as_str().unwrap();
    assert_eq!(claims["scope"], format!("ws:{ws_id}#a cid:ctl wid:{ws_id}"));

    // Protocol pings are answered too.
    ws.send(Message::Ping(Bytes::from_static(b"hi"))).await.unwrap();
    assert_eq!(next(&mut ws).await, Some(Frame::Pong(Bytes::from_static(b"hi"))));
}

// --- routing ---------------------------------------------------------------------------------

/// Two raw clients `r1`, `r2` in alice's workspace.
async fn pair(srv: &RunningServer) -> (Ws, Ws) {
    let alice = token("alice", &[], None);
    let (r1, _) = with_token(srv, "r1", &alice, None).await;
    let (r2, _) = with_token(srv, "r2", &alice, None).await;
    (r1, r2)
}

#[actix_rt::test]
async fn frames_are_stamped_and_the_extra_bytes_travel_untouched() {
    let srv = start(builder());
    let (mut r1, mut r2) = pair(&srv).await;
    let main = map! {"type" => "method", "to" => "r2", "from" => "evil/x", "ws" => "evil",
    "user" => map! {"id" => "root"}, "method" => "services.x.y", "custom" => 1};
    // An extra segment with a bin payload and a float, byte for byte.
    let extra = map! {"args" => vec![Value::from(1), Value::Bytes(Bytes::from_static(&[0, 1, 2, 255])), Value::F64(0.5)]};
    let mut extra_bytes = Vec::new();
    msgpack::encode_map(&extra, &mut extra_bytes).unwrap();
    let sent = frame(main, Some(extra));
    assert!(sent.ends_with(&extra_bytes));
    send_bin(&mut r1, sent).await;

    let got = next_bin(&mut r2).await;
    let (stamped, at) = hypha_rpc::core::package::split_main(&got, &DecodeLimits::default()).unwrap();
    assert_eq!(&got[at..], &extra_bytes[..], "extra bytes changed");
    let keys: Vec<&str> = stamped.keys().map(String::as_str).collect();
    assert_eq!(keys, ["type", "to", "from", "ws", "user", "method", "custom"]);
    assert_eq!(stamped["to"], Value::from("ws-user-alice/r2"));
    assert_eq!(stamped["from"], Value::from("ws-user-alice/r1"));
    assert_eq!(stamped["ws"], Value::from("ws-user-alice"));
    assert_eq!(stamped["custom"], Value::from(1));
    let user = stamped["user"].as_map().unwrap();
    assert_eq!(user["id"], Value::from("alice"));
    assert_eq!(user["scope"].as_map().unwrap()["client_id"], Value::from("r1"));

    // Point-to-point events arrive whether or not the target subscribed.
    send_bin(&mut r1, frame(map! {"type" => "my-evt", "to" => "ws-user-alice/r2", "data" => 5}, None)).await;
    let got = decode_package(&next_bin(&mut r2).await, &DecodeLimits::default()).unwrap();
    let keys: Vec<&str> = got.main.keys().map(String::as_str).collect();
    assert_eq!(keys, ["type", "to", "data", "ws", "from", "user"]);
}

#[actix_rt::test]
async fn broadcasts_reach_only_subscribers() {
    let srv = start(builder());
    let (mut r1, mut r2) = pair(&srv).await;
    let router = &srv.server().state().router;
    let evt = frame(map! {"type" => "my-evt", "to" => "*", "data" => 6}, None);
    send_bin(&mut r1, evt.clone()).await;
    expect_silence(&mut r2, Duration::from_millis(150)).await;
    router.subscribe("ws-user-alice", "r2", ["my-evt"]).unwrap();
    send_bin(&mut r1, evt).await;
    let got = decode_package(&next_bin(&mut r2).await, &DecodeLimits::default()).unwrap();
    assert_eq!(got.main["to"], Value::from("ws-user-alice/*"));
    assert_eq!(got.main["data"], Value::from(6));
    // r1 is not subscribed: it does not hear its own broadcast.
    expect_silence(&mut r1, Duration::from_millis(100)).await;
    // Another type is filtered out.
    send_bin(&mut r1, frame(map! {"type" => "other", "to" => "*"}, None)).await;
    expect_silence(&mut r2, Duration::from_millis(100)).await;
}

fn reject_parts(b: &Bytes) -> (Map, Map) {
    let pkg = decode_package(b, &DecodeLimits::default()).unwrap();
    (pkg.main, pkg.extra.expect("extra"))
}

#[actix_rt::test]
async fn calls_to_a_peer_that_just_left_are_rejected_at_once() {
    let srv = start(builder());
    let (mut r1, mut r2) = pair(&srv).await;
    r2.send(Message::Close(Some(CloseCode::Normal.into()))).await.unwrap();
    let _ = expect_close(&mut r2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send_bin(
        &mut r1,
        frame(map! {"type" => "method", "to" => "r2", "method" => "services.x.y", "session" => "s9"}, None),
    )
    .await;
    let (main, extra) = reject_parts(&next_bin(&mut r1).await);
    assert_eq!(main, map! {"type" => "method", "from" => "r2", "to" => "", "method" => "s9.reject"});
    assert_eq!(
        extra,
        map! {"args" => vec![Value::Map(map! {"_rtype" => "error",
        "_rvalue" => "Target peer ws-user-alice/r2 is not connected", "_rtrace" => ""})]}
    );
    // Without a session nothing comes back; never-connected targets get nothing either.
    send_bin(&mut r1, frame(map! {"type" => "method", "to" => "r2", "method" => "x"}, None)).await;
    send_bin(&mut r1, frame(map! {"type" => "method", "to" => "never-connected", "session" => "s"}, None))
        .await;
    expect_silence(&mut r1, Duration::from_millis(150)).await;
    assert_alive(&mut r1).await;
}

#[actix_rt::test]
async fn read_only_clients_cannot_broadcast() {
    let srv = start(builder());
    let (mut r1, mut r2) = pair(&srv).await;
    srv.server().state().router.subscribe("ws-user-alice", "r2", ["my-evt"]).unwrap();
    let bob = token("bob", &[("ws-user-alice", Permission::Read)], Some("ws-user-alice"));
    let (mut ro, info) = with_token(&srv, "misc-ro", &bob, Some("ws-user-alice")).await;
    assert_eq!(info["user"]["scope"]["workspaces"]["ws-user-alice"], "r");
    send_bin(&mut ro, frame(map! {"type" => "my-evt", "to" => "*", "session" => "sro"}, None)).await;
    let (main, extra) = reject_parts(&next_bin(&mut ro).await);
    assert_eq!(main, map! {"type" => "method", "from" => "*", "to" => "", "method" => "sro.reject"});
    let err = extra["args"].as_list().unwrap()[0].as_map().unwrap();
    assert_eq!(
        err["_rvalue"],
        Value::from("Read-only client ws-user-alice/misc-ro cannot broadcast messages. Only point-to-point messages are allowed for read-only clients.")
    );
    // Without a session: silently dropped; nobody got the broadcast.
    send_bin(&mut ro, frame(map! {"type" => "my-evt", "to" => "*"}, None)).await;
    expect_silence(&mut r2, Duration::from_millis(150)).await;
    // Point-to-point from a read-only client is delivered.
    send_bin(&mut ro, frame(map! {"type" => "my-evt", "to" => "r1", "data" => 1}, None)).await;
    let got = decode_package(&next_bin(&mut r1).await, &DecodeLimits::default()).unwrap();
    assert_eq!(got.main["from"], Value::from("ws-user-alice/misc-ro"));
    assert_alive(&mut ro).await;
}

#[actix_rt::test]
async fn garbage_binary_frames_are_dropped_and_the_connection_kept() {
    let srv = start(builder());
    let (mut r1, mut r2) = pair(&srv).await;
    for garbage in [&b"\xc1\xc1\xc1"[..], b"\x92\x01\x02", b"", b"\x81\xa2to"] {
        send_bin(&mut r1, Bytes::copy_from_slice(garbage)).await;
    }
    expect_silence(&mut r1, Duration::from_millis(100)).await;
    assert_alive(&mut r1).await;
    send_bin(&mut r1, frame(map! {"type" => "e", "to" => "r2"}, None)).await;
    next_bin(&mut r2).await;
}

// --- limits ---------------------------------------------------------------------------------

#[actix_rt::test]
async fn the_message_rate_is_limited() {
    let srv = start(builder().message_rate_limit(5.0).message_burst_limit(10));
    let (mut bystander, _) = anonymous(&srv, "bystander").await;
    let (mut flood, _) = anonymous(&srv, "flood").await;
    let f = frame(map! {"type" => "e", "to" => "nobody"}, None);
    for _ in 0..30 {
        if flood.send(Message::Binary(f.clone())).await.is_err() {
            break;
        }
    }
    let (msg, code) = expect_error_close(&mut flood).await;
    assert_eq!((msg.as_str(), code), ("Rate limit exceeded: too many messages per second", 1008));
    assert_alive(&mut bystander).await;
}

#[actix_rt::test]
async fn idle_connections_are_closed() {
    let srv = start(builder().idle_timeout(Duration::from_millis(300)));
    let (mut idle, _) = anonymous(&srv, "idle").await;
    let (mut busy, _) = anonymous(&srv, "busy").await;
    let t0 = Instant::now();
    // The busy client keeps talking; protocol pings would not count.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_alive(&mut busy).await;
    }
    let (msg, code) = expect_error_close(&mut idle).await;
    assert_eq!((msg.as_str(), code), ("Idle timeout (0.3s)", 1001));
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert_alive(&mut busy).await;
}

#[actix_rt::test]
async fn oversized_frames_close_with_1009() {
    let max = 1 << 20;
    let srv = start(builder().max_frame_size(max));
    let (mut r1, mut r2) = pair(&srv).await;
    // Exactly at the limit passes.
    let main = map! {"type" => "e", "to" => "r2"};
    let mut head = Vec::new();
    msgpack::encode_map(&main, &mut head).unwrap();
    let mut big = head.clone();
    let pad = max - head.len() - 5;
    big.push(0xc6);
    big.extend_from_slice(&(pad as u32).to_be_bytes());
    big.resize(max, 7);
    send_bin(&mut r1, big.clone()).await;
    // Stamping makes `main` longer; the frame still arrives whole.
    assert!(next_bin(&mut r2).await.len() > max);
    big.push(0);
    send_bin(&mut r1, big).await;
    let (code, reason) = expect_close(&mut r1).await;
    assert_eq!((code, reason.as_str()), (1009, "frame exceeds limit of 1048576 bytes"));
    assert_alive(&mut r2).await;
}

#[actix_rt::test]
async fn fragmented_messages_are_reassembled_up_to_the_limit() {
    let max = 1 << 20;
    let srv = start(builder().max_frame_size(max));
    let (mut r1, mut r2) = pair(&srv).await;
    let whole =
        frame(map! {"type" => "e", "to" => "r2", "data" => Value::Bytes(Bytes::from(vec![3u8; 1000]))}, None);
    let (a, rest) = whole.split_at(10);
    let (b, c) = rest.split_at(500);
    for item in [
        Item::FirstBinary(Bytes::copy_from_slice(a)),
        Item::Continue(Bytes::copy_from_slice(b)),
        Item::Last(Bytes::copy_from_slice(c)),
    ] {
        r1.send(Message::Continuation(item)).await.unwrap();
    }
    let got = decode_package(&next_bin(&mut r2).await, &DecodeLimits::default()).unwrap();
    assert_eq!(got.main["data"], Value::Bytes(Bytes::from(vec![3u8; 1000])));
    // Fragments that add up to more than the limit close the connection like one big frame.
    let half = Bytes::from(vec![0u8; max / 2 + 1]);
    r1.send(Message::Continuation(Item::FirstBinary(half.clone()))).await.unwrap();
    r1.send(Message::Continuation(Item::Last(half))).await.unwrap();
    assert_eq!(expect_close(&mut r1).await, (1009, "frame exceeds limit of 1048576 bytes".to_owned()));
    assert_alive(&mut r2).await;
}

#[actix_rt::test]
async fn a_client_that_does_not_read_is_disconnected_without_stalling_the_sender() {
    let srv = start(builder().outbound_queue(4, 4 << 20).close_timeout(Duration::from_millis(200)));
    let (mut r1, r2) = pair(&srv).await;
    let chunk = frame(
        map! {"type" => "e", "to" => "r2", "data" => Value::Bytes(Bytes::from(vec![1u8; 512 << 10]))},
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let state = srv.server().state().clone();
    // r2 never reads: once the socket buffers and its queue are full it is dropped.
    while state.router.is_connected("ws-user-alice", "r2") {
        assert!(Instant::now() < deadline, "the slow client was never disconnected");
        send_bin(&mut r1, chunk.clone()).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_alive(&mut r1).await;
    drop(r2);
}

#[actix_rt::test]
async fn frames_keep_their_order_when_a_slow_reader_makes_them_queue() {
    // Two workers, so the sender's routing and the reader's writer run on different threads
    // when the connections land on different workers.
    let srv = start(builder().workers(2).outbound_queue(10_000, 256 << 20));
    let (mut r1, mut r2) = pair(&srv).await;
    let big = Value::Bytes(Bytes::from(vec![5u8; 64 << 10]));
    let n = 400;
    // r2 does not read while r1 sends ~25 MiB: the socket buffers and actix-ws's channel
    // fill up, and later frames wait in r2's queue. Small frames go in between.
    for i in 0..n {
        let data = if i % 3 == 0 { Value::from("small") } else { big.clone() };
        send_bin(&mut r1, frame(map! {"type" => "e", "to" => "r2", "n" => i, "data" => data}, None)).await;
    }
    for i in 0..n {
        let got = decode_package(&next_bin(&mut r2).await, &DecodeLimits::default()).unwrap();
        assert_eq!(got.main["n"].as_i64(), Some(i), "frame {i} out of order");
    }
    // Caught up: the next frame (direct path) still comes after all of them.
    send_bin(&mut r1, frame(map! {"type" => "e", "to" => "r2", "n" => n}, None)).await;
    let got = decode_package(&next_bin(&mut r2).await, &DecodeLimits::default()).unwrap();
    assert_eq!(got.main["n"].as_i64(), Some(n));
    assert_alive(&mut r2).await;
}

// --- disconnect ----------------------------------------------------------------------------

#[actix_rt::test]
async fn subscribers_hear_client_disconnected_with_the_bare_id() {
    let srv = start(builder());
    let (mut r1, r2) = pair(&srv).await;
    let alice = token("alice", &[], None);
    let (mut quiet, _) = with_token(&srv, "quiet", &alice, None).await;
    srv.server().state().router.subscribe("ws-user-alice", "r1", ["client_disconnected"]).unwrap();
    drop(r2); // no close frame: the TCP connection just goes away
    let got = decode_package(&next_bin(&mut r1).await, &DecodeLimits::default()).unwrap();
    assert_eq!(
        got.main,
        map! {"type" => "client_disconnected", "to" => "*", "data" => map! {"id" => "r2", "workspace" => "ws-user-alice"}}
    );
    assert!(got.extra.is_none());
    expect_silence(&mut quiet, Duration::from_millis(100)).await;
    assert!(!srv.server().state().router.is_connected("ws-user-alice", "r2"));
}

#[actix_rt::test]
async fn anonymous_workspaces_go_away_with_their_last_client() {
    let srv = start(builder());
    let (mut ws, info) = anonymous(&srv, "a").await;
    let ws_id = info["workspace"].as_str().unwrap().to_owned();
    let state = srv.server().state().clone();
    assert!(state.workspaces.contains(&ws_id));
    ws.send(Message::Close(None)).await.unwrap();
    let _ = next(&mut ws).await;
    let deadline = Instant::now() + WAIT;
    while state.workspaces.contains(&ws_id) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!state.workspaces.contains(&ws_id));
    assert_eq!(state.connection_count(), 0);
}

#[actix_rt::test]
async fn a_graceful_stop_closes_websockets_with_1001() {
    let srv = start(builder());
    let (mut a, _) = anonymous(&srv, "a").await;
    let mut pending = connect(&srv).await; // still in its handshake
    let stop = actix_rt::spawn(srv.stop());
    assert_eq!(expect_close(&mut a).await, (1001, "Server is shutting down".to_owned()));
    assert_eq!(expect_close(&mut pending).await.0, 1001);
    stop.await.unwrap().unwrap();
}

// --- the binary ------------------------------------------------------------------------------

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[actix_rt::test]
async fn the_hypha_server_binary_serves_and_shuts_down_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // The binary keeps its accounts in `--data-dir`: a scratch one, removed at the end.
    let data_dir = std::env::temp_dir().join(format!("hypha-ws-bin-test-{}-{port}", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_hypha-server"))
        .args(["--port", &port.to_string(), "--server-id", "bin-test", "--workers", "1"])
        .env("HYPHA_DATA_DIR", &data_dir)
        .env("JWT_SECRET", SECRET)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn hypha-server");
    let mut child = KillOnDrop(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = awc::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        if let Ok(mut resp) = client.get(format!("{base}/health/liveness")).send().await {
            assert_eq!(resp.status(), 200);
            break resp.json::<Json>().await.unwrap();
        }
        assert!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["status"], "OK");
    let mut ws = connect_url(&format!("ws://127.0.0.1:{port}/ws")).await;
    let info = handshake(&mut ws, json!({"client_id": "bin-client"})).await;
    assert_eq!(info["manager_id"], "manager-bin-test");
    assert_eq!(info["public_base_url"], base.as_str());
    // Our secret signed the reconnection token.
    let now = auth::unix_seconds(std::time::SystemTime::now());
    JwtConfig::new(SECRET).verify(info["reconnection_token"].as_str().unwrap(), now).unwrap();

    let status = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let (code, _) = expect_close(&mut ws).await;
    assert_eq!(code, 1001);
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = std::fs::remove_dir_all(&data_dir);
    assert!(exit.success(), "{exit:?}");
}
