//! A raw websocket RPC client for the manager tests: it speaks the wire protocol by hand
//! (auth frame, `method` packages with compact promises, `{session}.resolve/reject`
//! answers), so a test can make it misbehave on purpose (stop answering pings, flood).

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix_codec::Framed;
use awc::ws::{Codec, Frame, Message};
use awc::BoxedSocket;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hypha_rpc::core::auth::{self, JwtConfig, Permission, UserInfo};
use hypha_rpc::core::map;
use hypha_rpc::core::msgpack::DecodeLimits;
use hypha_rpc::core::package::{decode_package, encode_package};
use hypha_rpc::core::value::{Map, Value};
use hypha_rpc::server::{RunningServer, Server, ServerBuilder};
use serde_json::{json, Value as Json};

pub mod servers;

pub type Ws = Framed<BoxedSocket, Codec>;

pub const SECRET: &str = "test-secret-for-the-manager-tests";
pub const WAIT: Duration = Duration::from_secs(5);

pub fn builder() -> ServerBuilder {
    Server::builder().jwt_secret(SECRET).server_id("test-server").workers(1)
}

pub fn start(b: ServerBuilder) -> RunningServer {
    b.build().expect("valid config").start("127.0.0.1", 0).expect("bind")
}

/// A token for `user_id` with `perms`, bound to workspace `wid` if given.
pub fn token(user_id: &str, perms: &[(&str, Permission)], wid: Option<&str>) -> String {
    let mut user = UserInfo::new(user_id);
    for (ws, p) in perms {
        user.scope.workspaces.insert((*ws).to_owned(), *p);
    }
    user.scope.current_workspace = wid.map(str::to_owned);
    JwtConfig::new(SECRET).encode(&user, 3600.0, auth::unix_seconds(std::time::SystemTime::now())).unwrap()
}

pub async fn connect(srv: &RunningServer) -> Ws {
    let (_, ws) = awc::Client::new()
        .ws(srv.ws_url())
        .max_frame_size(32 << 20)
        .connect()
        .await
        .expect("websocket upgrade");
    ws
}

/// The next frame; `None` when the socket ended. Panics after `d` of silence.
pub async fn next_within(ws: &mut Ws, d: Duration) -> Option<Frame> {
    match tokio::time::timeout(d, ws.next()).await {
        Ok(Some(Ok(f))) => Some(f),
        Ok(Some(Err(_))) | Ok(None) => None,
        Err(_) => panic!("no frame within {d:?}"),
    }
}

pub async fn next_json(ws: &mut Ws) -> Json {
    loop {
        match next_within(ws, WAIT).await {
            Some(Frame::Text(t)) => return serde_json::from_slice(&t).expect("JSON text frame"),
            Some(Frame::Ping(_)) | Some(Frame::Pong(_)) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the close frame, skipping everything else: (code, reason).
pub async fn until_close(ws: &mut Ws, d: Duration) -> Option<(u16, String)> {
    let deadline = Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Frame::Close(r)))) => {
                return Some(r.map_or((1005, String::new()), |r| {
                    (u16::from(r.code), r.description.unwrap_or_default())
                }))
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return None,
            Err(_) => panic!("no close within {d:?}"),
        }
    }
}

/// What a raw client answers when it is called.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Resolve with this value.
    Value(Value),
    /// Reject with this message.
    Error(String),
    /// Never answer.
    Silence,
}

/// A raw RPC client (see the module docs).
pub struct Raw {
    pub ws: Ws,
    pub workspace: String,
    pub client_id: String,
    /// `*/manager-{sid}`.
    pub manager: String,
    pub info: Json,
    /// Whether `built-in.ping` is answered.
    pub answer_pings: bool,
    /// Answers by method path (`services.{svc}.{fn}`).
    pub answers: HashMap<String, Answer>,
    /// Method paths this client was called with, in order.
    pub calls: Vec<String>,
    /// Events (non-method packages) received, as their main map.
    pub events: Vec<Map>,
    /// Whether the socket ended.
    pub closed: Option<(u16, String)>,
    next_session: u64,
}

impl Raw {
    /// Connects and handshakes (anonymous unless `token`).
    pub async fn connect(srv: &RunningServer, cid: &str, token: Option<&str>, ws: Option<&str>) -> Raw {
        let mut sock = connect(srv).await;
        let auth = json!({"client_id": cid, "workspace": ws, "token": token});
        sock.send(Message::Text(auth.to_string().into())).await.expect("send auth");
        let info = next_json(&mut sock).await;
        assert_eq!(info["type"], "connection_info", "{info}");
        Raw {
            ws: sock,
            workspace: info["workspace"].as_str().unwrap().to_owned(),
            client_id: cid.to_owned(),
            manager: format!("*/{}", info["manager_id"].as_str().unwrap()),
            info,
            answer_pings: true,
            answers: HashMap::new(),
            calls: Vec::new(),
            events: Vec::new(),
            closed: None,
            next_session: 0,
        }
    }

    /// Connects and registers its `built-in` service, as every stock client does.
    pub async fn registered(srv: &RunningServer, cid: &str, token: Option<&str>, ws: Option<&str>) -> Raw {
        let mut raw = Raw::connect(srv, cid, token, ws).await;
        raw.register_builtin().await;
        raw
    }

    pub async fn send(&mut self, main: Map, extra: Option<Map>) {
        let bytes = Bytes::from(encode_package(&main, extra.as_ref()).unwrap());
        self.ws.send(Message::Binary(bytes)).await.expect("send binary");
    }

    /// Calls `services.default.{method}` on the manager with positional `args`.
    pub async fn call(&mut self, method: &str, args: Vec<Value>) -> Result<Value, String> {
        self.call_with(method, args, None).await
    }

    /// [`Raw::call`] with keyword arguments.
    pub async fn call_with(
        &mut self,
        method: &str,
        mut args: Vec<Value>,
        kwargs: Option<Map>,
    ) -> Result<Value, String> {
        self.next_session += 1;
        let session = format!("s{}", self.next_session);
        let with_kwargs = kwargs.is_some();
        if let Some(kw) = kwargs {
            args.push(Value::Map(kw));
        }
        let target = self.manager.clone();
        let main = map! {"type" => "method", "to" => target.as_str(),
        "method" => format!("services.default.{method}"), "session" => session.as_str()};
        let mut extra = map! {"args" => args, "promise" => "*", "t" => 30};
        if with_kwargs {
            extra.insert("with_kwargs".into(), Value::Bool(true));
        }
        self.send(main, Some(extra)).await;
        self.wait_for(&session, Duration::from_secs(20)).await
    }

    /// Serves incoming calls until `{session}.resolve` or `.reject` arrives.
    pub async fn wait_for(&mut self, session: &str, d: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = match tokio::time::timeout(left, self.ws.next()).await {
                Ok(Some(Ok(f))) => f,
                Ok(_) => {
                    self.closed = Some((1006, String::new()));
                    return Err("socket ended".into());
                }
                Err(_) => panic!("no answer to {session} within {d:?}"),
            };
            match frame {
                Frame::Binary(b) => {
                    if let Some(outcome) = self.on_binary(&b, Some(session)).await {
                        return outcome;
                    }
                }
                Frame::Close(r) => {
                    self.closed = Some(r.map_or((1005, String::new()), |r| {
                        (u16::from(r.code), r.description.unwrap_or_default())
                    }));
                    return Err("socket closed".into());
                }
                _ => {}
            }
        }
    }

    /// Serves incoming calls for `d`.
    pub async fn serve_for(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Ok(Some(Ok(Frame::Binary(b)))) => {
                    let _ = self.on_binary(&b, None).await;
                }
                Ok(Some(Ok(Frame::Close(r)))) => {
                    self.closed = Some(r.map_or((1005, String::new()), |r| {
                        (u16::from(r.code), r.description.unwrap_or_default())
                    }));
                    return;
                }
                Ok(Some(Ok(_))) => {}
                Ok(_) => {
                    self.closed = Some((1006, String::new()));
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// Handles one binary frame: the outcome of `session` if it is its answer; otherwise
    /// answers a call to us, or records an event.
    async fn on_binary(&mut self, b: &Bytes, session: Option<&str>) -> Option<Result<Value, String>> {
        let pkg = decode_package(b, &DecodeLimits::default()).expect("a package");
        let main = pkg.main;
        let method = main.get("method").and_then(Value::as_str).unwrap_or_default().to_owned();
        if main.get("type").and_then(Value::as_str) != Some("method") {
            self.events.push(main);
            return None;
        }
        let first = || {
            pkg.extra
                .as_ref()
                .and_then(|e| e.get("args"))
                .and_then(|a| a.as_list())
                .and_then(|l| l.first().cloned())
                .unwrap_or(Value::Nil)
        };
        if let Some(s) = session {
            if method == format!("{s}.resolve") {
                return Some(Ok(first()));
            }
            if method == format!("{s}.reject") {
                let e = first();
                let text = e
                    .as_map()
                    .and_then(|m| m.get("_rvalue"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{e:?}"));
                return Some(Err(text));
            }
        }
        if method.ends_with(".heartbeat") || method.ends_with(".resolve") || method.ends_with(".reject") {
            return None;
        }
        self.calls.push(method.clone());
        let answer = if method == "services.built-in.ping" {
            if self.answer_pings {
                Answer::Value(Value::from("pong"))
            } else {
                Answer::Silence
            }
        } else {
            self.answers.get(&method).cloned().unwrap_or(Answer::Error(format!("Method not found: {method}")))
        };
        let (Some(call_session), Some(from)) =
            (main.get("session").and_then(Value::as_str), main.get("from").and_then(Value::as_str))
        else {
            return None;
        };
        let (suffix, value) = match answer {
            Answer::Silence => return None,
            Answer::Value(v) => ("resolve", v),
            Answer::Error(e) => {
                ("reject", Value::Map(map! {"_rtype" => "error", "_rvalue" => e, "_rtrace" => ""}))
            }
        };
        // An explicit promise names its callbacks; a compact one means `{session}.{suffix}`.
        let explicit = pkg
            .extra
            .as_ref()
            .and_then(|e| e.get("promise"))
            .and_then(Value::as_map)
            .and_then(|p| p.get(suffix))
            .and_then(Value::as_map)
            .and_then(|m| m.get("_rmethod"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let path = explicit.unwrap_or_else(|| format!("{call_session}.{suffix}"));
        let reply = map! {"type" => "method", "to" => from, "method" => path};
        self.send(reply, Some(map! {"args" => vec![value]})).await;
        None
    }

    /// Registers `{cid}:built-in`.
    pub async fn register_builtin(&mut self) {
        let builtin = map! {"id" => format!("{}:built-in", self.client_id), "type" => "built-in",
        "config" => map! {"visibility" => "public", "require_context" => true}};
        self.call("register_service", vec![Value::Map(builtin)]).await.expect("built-in registered");
    }

    /// Registers `{cid}:{svc}` with `config`, whose functions answer as `functions` says
    /// (when the manager or another client calls `services.{svc}.{name}`).
    pub async fn register(
        &mut self,
        svc: &str,
        config: Map,
        functions: &[(&str, Answer)],
    ) -> Result<Value, String> {
        let mut schema = Map::new();
        for (name, answer) in functions {
            self.answers.insert(format!("services.{svc}.{name}"), answer.clone());
            schema.insert((*name).to_owned(), Value::Map(map! {"type" => "function"}));
        }
        let service = map! {"id" => format!("{}:{svc}", self.client_id), "name" => svc,
        "config" => config, "service_schema" => schema};
        self.call("register_service", vec![Value::Map(service)]).await
    }
}

/// A map field as text.
pub fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.as_map().and_then(|m| m.get(key)).and_then(Value::as_str).unwrap_or_default()
}
