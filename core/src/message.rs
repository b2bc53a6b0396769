//! Typed views of the package envelope (spec §1.5, §2.2-2.5, §4.2-4.5).
//!
//! A package is `main` (routing) plus an optional `extra` (payload). This module gives:
//!
//! * [`MainSegment`]: the routing fields, parsed from and written back to a [`Map`] in the
//!   key order upstream emits (`type, from, to, method, session, parent, ws, user`, then
//!   anything else);
//! * [`Promise`]: the `promise` of the extra segment in its two forms, compact (`"*"` +
//!   `t`) and explicit, and the callee's expansion of the compact form;
//! * [`CallExtra`]: the keys of a call's extra segment a callee reads, and their rules;
//! * the target rules shared by server and client ([`normalize_target`],
//!   [`CallAddresses::resolve`]) and the receive context ([`build_ctx`]).
//!
//! Everything here works on wire-form values; decoding descriptors into functions is the
//! codec's job.

use std::time::Duration;

use bytes::Bytes;

use crate::ids::WILDCARD;
use crate::msgpack::{self, DecodeLimits, RepeatCache, Rope};
use crate::package::{PackageError, RawMain};
use crate::value::{Map, PromiseMode, Value};

/// `type` of an RPC call: the only RPC message type.
pub const METHOD: &str = "method";
/// Broadcast by the server when a client leaves (spec §4.10).
pub const CLIENT_DISCONNECTED: &str = "client_disconnected";
/// Server-to-client rejection of a session (handled, never sent by current servers).
pub const PEER_NOT_FOUND: &str = "peer_not_found";
/// Server-to-client order to disconnect, honoured only from the manager.
pub const FORCE_EXIT: &str = "force-exit";
/// Local-only event fired when an event handler fails.
pub const ERROR_EVENT: &str = "error";
/// `connection_type` of the websocket transport, added to every `ctx`.
pub const CONNECTION_TYPE_WEBSOCKET: &str = "websocket";
/// `connection_type` of the HTTP streaming transport.
pub const CONNECTION_TYPE_HTTP: &str = "http_streaming";
/// `connection_type` of WebRTC data channels.
pub const CONNECTION_TYPE_WEBRTC: &str = "webrtc";

/// The workspace events a client may subscribe to (spec §2.4), besides custom events of
/// its own workspace.
pub const WORKSPACE_EVENTS: [&str; 12] = [
    "service_added",
    "service_removed",
    "service_updated",
    "client_connected",
    "client_disconnected",
    "client_updated",
    "workspace_loaded",
    "workspace_deleted",
    "workspace_changed",
    "workspace_ready",
    "workspace_unloaded",
    "workspace_status_changed",
];

/// Errors reading an envelope. The data comes from the network, so every shape problem is
/// an error value, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The main segment has no `type`.
    #[error("message has no type")]
    MissingType,
    /// A routing field has the wrong type.
    #[error("message field {key:?} must be a {expected}, got {got}")]
    WrongType {
        /// The key.
        key: &'static str,
        /// The expected kind.
        expected: &'static str,
        /// The kind received ([`Value::kind`]).
        got: &'static str,
    },
    /// A field required for this step is missing (Python raises `KeyError` there).
    #[error("message has no {0:?}")]
    Missing(&'static str),
    /// `from` is not an absolute id `"ws/cid"`.
    #[error("invalid sender id {0:?}: expected \"<workspace>/<client_id>\"")]
    BadFrom(String),
    /// The call's target is in another workspace than the configured local one (the
    /// Python client's assertion text).
    #[error("Workspace mismatch: {target} != {local}")]
    WorkspaceMismatch {
        /// Workspace of the (absolute) `to`.
        target: String,
        /// The local workspace.
        local: String,
    },
    /// `promise` is neither `"*"` nor a map.
    #[error("promise must be \"*\" or a map, got {0}")]
    BadPromise(&'static str),
    /// An explicit promise lacks `resolve` or `reject` (Python: `KeyError`).
    #[error("promise has no {0:?}")]
    MissingPromiseKey(&'static str),
    /// A heartbeat interval that is not a finite, non-negative number of seconds.
    #[error("invalid heartbeat interval {0}")]
    BadInterval(String),
}

fn opt_str(map: &mut Map, key: &'static str) -> Result<Option<String>, MessageError> {
    match map.shift_remove(key) {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Str(s)) => Ok(Some(s)),
        Some(other) => Err(MessageError::WrongType { key, expected: "str", got: other.kind() }),
    }
}

/// The main segment (spec §2.2). `ws`, `user` and even `from` are optional: the server's
/// synthetic reject has no `ws`/`user`, and its events have no `from`. A `nil` in any of
/// these fields reads as absent (JS may send `undefined` as nil).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MainSegment {
    /// `type`: [`METHOD`] for calls, else an event name.
    pub kind: String,
    /// Absolute caller id (stamped by the server).
    pub from: Option<String>,
    /// Target id (normalized by the server).
    pub to: Option<String>,
    /// Method path in the target's object store.
    pub method: Option<String>,
    /// The caller's session, present only when a result is expected.
    pub session: Option<String>,
    /// The callee-side session the called descriptor was received in (§4.7).
    pub parent: Option<String>,
    /// Caller's workspace (server only).
    pub ws: Option<String>,
    /// Caller's user info (server only).
    pub user: Option<UserStamp>,
    /// Every other key, in received order (event payloads such as `data`, `peer_id`...).
    pub rest: Map,
}

impl MainSegment {
    /// A `method` call from `from` to `to`.
    pub fn call(from: impl Into<String>, to: impl Into<String>, method: impl Into<String>) -> Self {
        Self {
            kind: METHOD.into(),
            from: Some(from.into()),
            to: Some(to.into()),
            method: Some(method.into()),
            ..Default::default()
        }
    }

    /// Reads a decoded main segment. Fails if `type` is missing or a routing field has the
    /// wrong type; unknown keys go to [`MainSegment::rest`].
    pub fn from_map(mut map: Map) -> Result<Self, MessageError> {
        let kind = opt_str(&mut map, "type")?.ok_or(MessageError::MissingType)?;
        let from = opt_str(&mut map, "from")?;
        let to = opt_str(&mut map, "to")?;
        let method = opt_str(&mut map, "method")?;
        let session = opt_str(&mut map, "session")?;
        let parent = opt_str(&mut map, "parent")?;
        let ws = opt_str(&mut map, "ws")?;
        let user = map.shift_remove("user").filter(|u| !matches!(u, Value::Nil)).map(UserStamp::Value);
        Ok(Self { kind, from, to, method, session, parent, ws, user, rest: map })
    }

    /// Reads the main segment straight from a frame and returns it with the offset where
    /// the extra segment starts. The same result as decoding the map and calling
    /// [`MainSegment::from_map`], without building the map: the frame is scanned in place
    /// ([`RawMain`], checked exactly as a decode would check it), the routing strings are
    /// copied out of it, and the server's `user` stamp stays encoded
    /// ([`UserStamp::Encoded`]).
    pub fn decode(frame: &Bytes, limits: &DecodeLimits) -> Result<(Self, usize), MainDecodeError> {
        Self::from_raw(&RawMain::scan(frame, limits)?)
    }

    /// [`MainSegment::decode`] for the frames of one connection: `cache` holds the last
    /// `user` stamp checked (see [`RepeatCache`]), which every routed frame repeats.
    pub fn decode_cached(
        frame: &Bytes,
        limits: &DecodeLimits,
        cache: &mut RepeatCache,
    ) -> Result<(Self, usize), MainDecodeError> {
        Self::from_raw(&RawMain::scan_cached(frame, limits, cache)?)
    }

    /// A cache for [`MainSegment::decode_cached`].
    pub fn user_cache() -> RepeatCache {
        RepeatCache::new("user")
    }

    fn from_raw(raw: &RawMain<'_>) -> Result<(Self, usize), MainDecodeError> {
        // One pass sorts the entries into the typed fields ([`WIRE_KEYS`] order); a
        // search per field cost a string comparison per field and entry.
        let mut slots = [None; WIRE_KEYS.len()];
        let mut has_rest = false;
        for e in raw.entries() {
            match wire_key_index(e.key) {
                Some(i) => slots[i] = Some(e),
                None => has_rest = true,
            }
        }
        // In `from_map`'s order, so that a segment with several faults reports the same one.
        let text = |i: usize| match slots[i] {
            None => Ok(None),
            Some(e) => match e.str {
                Some(s) => Ok(Some(s.to_owned())),
                None => match raw.entry_kind(e) {
                    "nil" => Ok(None),
                    got => Err(MessageError::WrongType { key: WIRE_KEYS[i], expected: "str", got }),
                },
            },
        };
        let seg = Self {
            kind: text(0)?.ok_or(MessageError::MissingType)?,
            from: text(1)?,
            to: text(2)?,
            method: text(3)?,
            session: text(4)?,
            parent: text(5)?,
            ws: text(6)?,
            // nil reads as absent, as in `from_map`.
            user: slots[7].map(|e| raw.entry_encoded(e)).filter(|u| u[..] != [0xc0]).map(UserStamp::Encoded),
            rest: match has_rest {
                false => Map::new(),
                true => raw
                    .keys()
                    .filter(|k| !WIRE_KEYS.contains(k))
                    .filter_map(|k| Some((k.to_owned(), raw.value(k)?)))
                    .collect(),
            },
        };
        Ok((seg, raw.extra_at()))
    }

    /// Writes the segment, as encoding [`MainSegment::into_map`] would, without building
    /// the map. Keys of [`MainSegment::rest`] that name a typed field are left out: the
    /// typed field holds the segment's value for them.
    pub fn encode_to(&self, rope: &mut Rope) -> Result<(), msgpack::EncodeError> {
        let fields = [
            ("from", &self.from),
            ("to", &self.to),
            ("method", &self.method),
            ("session", &self.session),
            ("parent", &self.parent),
            ("ws", &self.ws),
        ];
        let rest = || self.rest.iter().filter(|(k, _)| !WIRE_KEYS.contains(&k.as_str()));
        let typed = 1 + fields.iter().filter(|(_, v)| v.is_some()).count() + usize::from(self.user.is_some());
        rope.put_map_header(typed + rest().count())?;
        rope.put_str("type")?;
        rope.put_str(&self.kind)?;
        for (k, v) in fields {
            if let Some(v) = v {
                rope.put_str(k)?;
                rope.put_str(v)?;
            }
        }
        if let Some(user) = &self.user {
            rope.put_str("user")?;
            match user {
                UserStamp::Value(v) => rope.put_value(v)?,
                UserStamp::Encoded(raw) => rope.put_encoded(raw),
            }
        }
        for (k, v) in rest() {
            rope.put_str(k)?;
            rope.put_value(v)?;
        }
        Ok(())
    }

    /// Writes the segment back, in upstream's key order.
    pub fn into_map(self) -> Map {
        let mut m = Map::with_capacity(8 + self.rest.len());
        m.insert("type".into(), Value::Str(self.kind));
        let fields = [
            ("from", self.from),
            ("to", self.to),
            ("method", self.method),
            ("session", self.session),
            ("parent", self.parent),
            ("ws", self.ws),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                m.insert(k.into(), Value::Str(v));
            }
        }
        if let Some(user) = self.user {
            m.insert("user".into(), user.into_value());
        }
        m.extend(self.rest);
        m
    }

    /// The server's stamping of a client's package (spec §1.5 step 2-3): `to` normalized
    /// against the sender's workspace, `from`, `ws` and `user` overwritten. Returns `false`
    /// (and changes nothing) when the package has no `to`: there is nowhere to route it.
    pub fn stamp(&mut self, sender_ws: &str, sender_client: &str, ws: &str, user: Value) -> bool {
        let Some(to) = &self.to else { return false };
        self.to = Some(normalize_target(to, sender_ws));
        self.from = Some(format!("{sender_ws}/{sender_client}"));
        self.ws = Some(ws.to_owned());
        self.user = Some(UserStamp::Value(user));
        true
    }
}

/// The keys of the typed fields of [`MainSegment`], in upstream's order.
const WIRE_KEYS: [&str; 8] = ["type", "from", "to", "method", "session", "parent", "ws", "user"];

/// The index of `key` in [`WIRE_KEYS`] (a `match` tells them apart by length first).
fn wire_key_index(key: &str) -> Option<usize> {
    Some(match key {
        "type" => 0,
        "from" => 1,
        "to" => 2,
        "method" => 3,
        "session" => 4,
        "parent" => 5,
        "ws" => 6,
        "user" => 7,
        _ => return None,
    })
}

/// The server's `user` stamp of a main segment.
#[derive(Debug, Clone, PartialEq)]
pub enum UserStamp {
    /// A value: stamped by our server, or read by [`MainSegment::from_map`].
    Value(Value),
    /// As received: one msgpack object that [`MainSegment::decode`] scanned. Most
    /// calls never read it, and decoding it (a dozen strings, three maps) cost more than
    /// the rest of the segment.
    Encoded(Bytes),
}

impl UserStamp {
    /// The stamp as a value.
    pub fn to_value(&self) -> Value {
        match self {
            Self::Value(v) => v.clone(),
            Self::Encoded(raw) => decode_checked(raw),
        }
    }

    /// The stamp as a value, without a copy when it already is one.
    pub fn into_value(self) -> Value {
        match self {
            Self::Value(v) => v,
            Self::Encoded(raw) => decode_checked(&raw),
        }
    }
}

/// Decodes a stamp that [`RawMain::scan`] already checked exactly as a decode would
/// (structure, UTF-8, limits), so decoding it cannot fail; `nil` would stand in if it did.
fn decode_checked(raw: &Bytes) -> Value {
    msgpack::decode(raw, 0, &DecodeLimits::default()).map(|(v, _)| v).unwrap_or_default()
}

/// Why [`MainSegment::decode`] refused a frame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MainDecodeError {
    /// Not a msgpack map.
    #[error(transparent)]
    Package(#[from] PackageError),
    /// A map, but not a valid main segment.
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// The server's `to` normalization (spec §1.5 step 2): `"*"` becomes `"<ws>/*"` (workspace
/// broadcast), a bare id becomes `"<ws>/<id>"`, and anything with a `/` (including the
/// manager's `"*/<id>"`) is kept.
pub fn normalize_target(to: &str, sender_ws: &str) -> String {
    if to.contains('/') {
        to.to_owned()
    } else {
        format!("{sender_ws}/{to}")
    }
}

/// True for a workspace broadcast target (`"*"` or `"<ws>/*"`): the client part, after
/// the last `/`, is `*`. Asked for every routed frame, hence the suffix test rather than
/// a split.
pub fn is_broadcast(to: &str) -> bool {
    to == WILDCARD || to.ends_with("/*")
}

/// The callee's absolute addresses of an incoming call (spec §4.5 step 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallAddresses {
    /// Caller's workspace (`*` for the manager).
    pub remote_ws: String,
    /// Caller's client id.
    pub remote_client: String,
    /// The absolute `to` (also what `ctx.to` must be set to).
    pub to: String,
    /// The workspace the call is handled in: the configured local workspace, or `to`'s.
    pub local_ws: String,
}

impl CallAddresses {
    /// Applies the rule: split `from` at its first `/`; prefix a relative `to` with the
    /// caller's workspace; if a local workspace is configured and is not `*`, `to` must be
    /// in it (the Python client's "Workspace mismatch" assertion).
    pub fn resolve(from: &str, to: &str, local_ws: Option<&str>) -> Result<Self, MessageError> {
        let (remote_ws, remote_client) =
            from.split_once('/').ok_or_else(|| MessageError::BadFrom(from.into()))?;
        let to = absolute_call_target(from, to, local_ws)?.into_owned();
        let local_ws = match local_ws {
            None => to.split_once('/').map_or(to.as_str(), |(w, _)| w).to_owned(),
            Some(local) => local.to_owned(),
        };
        Ok(Self { remote_ws: remote_ws.into(), remote_client: remote_client.into(), to, local_ws })
    }
}

/// The checks of [`CallAddresses::resolve`] (which calls it) without its copies: the
/// absolute `to` (borrowed when `to` already is absolute, as the server makes every `to`
/// it routes), or its error. The callee needs nothing else on its hot path; the context
/// that names the other addresses is built on demand.
pub fn absolute_call_target<'a>(
    from: &str,
    to: &'a str,
    local_ws: Option<&str>,
) -> Result<std::borrow::Cow<'a, str>, MessageError> {
    let (remote_ws, _) = from.split_once('/').ok_or_else(|| MessageError::BadFrom(from.into()))?;
    let to = match to.contains('/') {
        true => std::borrow::Cow::Borrowed(to),
        false => std::borrow::Cow::Owned(normalize_target(to, remote_ws)),
    };
    let target_ws = to.split_once('/').map_or(&*to, |(w, _)| w);
    if let Some(local) = local_ws {
        if !local.is_empty() && local != WILDCARD && target_ws != local {
            return Err(MessageError::WorkspaceMismatch {
                target: target_ws.to_owned(),
                local: local.to_owned(),
            });
        }
    }
    Ok(to)
}

/// The receive context (spec §2.5): the routing fields and the other keys of the main
/// segment, as received **before** the extra segment is merged, plus `connection_type`
/// (one of the `CONNECTION_TYPE_*` constants) and `to` set to the absolute target. After a
/// decryption the callee adds `encryption`/`caller_public_key`. Never sent.
///
/// Built on demand from the parsed segment: most incoming calls (resolves, rejects,
/// heartbeats, handlers without `require_context`) never look at it, and copying the main
/// map for every one of them was a tenth of a client's CPU time per call.
pub fn build_ctx(main: &MainSegment, connection_type: &str, to: &str) -> Map {
    let mut ctx = main.clone().into_map();
    ctx.insert("to".into(), Value::from(to));
    ctx.insert("connection_type".into(), Value::from(connection_type));
    ctx
}

/// Merges `extra` into `main`, extra keys winning (spec §2.1).
pub fn merge_extra(main: &mut Map, extra: Map) {
    main.extend(extra);
}

// ----------------------------------------------------------------------------------------
// Extra segment
// ----------------------------------------------------------------------------------------

/// The keys of a call's extra segment the callee reads (spec §4.5), each the value a
/// map of the segment would hold for it (the last of duplicate keys). Read straight from
/// the frame ([`crate::package::decode_call_extra`]): a call's payload needs no [`Map`]
/// (nor copies of its keys) to be read; a reassembled package's decoded segment is read
/// through [`CallExtra::from_map`], so both paths share the readers below.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallExtra {
    /// `args`.
    pub args: Option<Value>,
    /// `promise`.
    pub promise: Option<Value>,
    /// `t`: the compact promise's interval.
    pub t: Option<Value>,
    /// `with_kwargs`.
    pub with_kwargs: Option<Value>,
    /// Whether `_enc` is present: the payload is the encryption envelope (`_enc` +
    /// `data`, spec §8) instead of `args`/`promise`.
    pub encrypted: bool,
}

impl CallExtra {
    /// Takes note of one entry of the segment (the keys nobody reads are dropped).
    pub fn put(&mut self, key: &str, value: Value) {
        match key {
            "args" => self.args = Some(value),
            "promise" => self.promise = Some(value),
            "t" => self.t = Some(value),
            "with_kwargs" => self.with_kwargs = Some(value),
            "_enc" => self.encrypted = true,
            _ => {}
        }
    }

    /// The same keys, taken from a decoded segment (a reassembled package's).
    pub fn from_map(extra: Map) -> Self {
        let mut out = Self::default();
        for (k, v) in extra {
            out.put(&k, v);
        }
        out
    }

    /// The call's promise; `Ok(None)` for a fire-and-forget call.
    ///
    /// Accepts `t` and `interval` as int (JS) or float (Python). A compact promise without
    /// `t` is an error, as the Python callee raises `KeyError` then.
    pub fn promise(&self) -> Result<Option<Promise>, MessageError> {
        Promise::from_parts(self.promise.as_ref(), self.t.as_ref())
    }

    /// The encoded positional arguments, moved out so that decoding can consume them
    /// without a deep copy: empty when absent or nil (Python sends no `args` for an
    /// empty list). A wrong type is an error and stays in place.
    pub fn take_args(&mut self) -> Result<Vec<Value>, MessageError> {
        match self.args.take() {
            None | Some(Value::Nil) => Ok(Vec::new()),
            Some(Value::List(l)) => Ok(l),
            Some(other) => {
                let got = other.kind();
                self.args = Some(other);
                Err(MessageError::WrongType { key: "args", expected: "list", got })
            }
        }
    }

    /// Whether the last argument is the keyword-argument map (Python truthiness of
    /// `with_kwargs`).
    pub fn with_kwargs(&self) -> bool {
        match self.with_kwargs {
            Some(Value::Bool(b)) => b,
            Some(Value::Int(i)) => i != 0,
            _ => false,
        }
    }
}

/// The extra segment of an outgoing call, as the Python client writes it: `args` (left
/// out when empty), `with_kwargs` when `kwargs` is given (appended as the last argument),
/// then the promise keys. An empty result means "send no extra segment".
pub fn call_extra(mut args: Vec<Value>, kwargs: Option<Map>, promise: Option<Promise>) -> Map {
    let has_kwargs = kwargs.is_some();
    if let Some(kw) = kwargs {
        args.push(Value::Map(kw));
    }
    call_extra_encoded(args, has_kwargs, promise)
}

/// Like [`call_extra`], for arguments that already hold the kwargs map as their last
/// element: what [`crate::codec::encode_args`] returns, after encoding the whole list in
/// one [`crate::codec::encode`] pass. This is the form a driver uses, so that arguments
/// are walked once and never copied again on their way into the package.
pub fn call_extra_encoded(args: Vec<Value>, with_kwargs: bool, promise: Option<Promise>) -> Map {
    let mut extra = Map::new();
    if !args.is_empty() {
        extra.insert("args".into(), Value::List(args));
    }
    if with_kwargs {
        extra.insert("with_kwargs".into(), Value::Bool(true));
    }
    if let Some(p) = promise {
        p.write_into(&mut extra);
    }
    extra
}

/// Writes the package of an outgoing call into `rope`: the bytes of
/// `MainSegment::call(from, to, method)` with `session` and `parent` set, then of the
/// [`call_extra_encoded`] map (nothing when it is empty), written directly.
///
/// Why: building the typed segment and the extra map only to encode them cost a dozen
/// allocations and as many keyed inserts per call on a client's hot path.
/// `direct_call_package_equals_the_built_one` checks that both ways write the same bytes.
/// On error the rope is left partly written: throw it away.
pub fn write_call(
    rope: &mut Rope,
    main: CallMain<'_>,
    args: Vec<Value>,
    with_kwargs: bool,
    promise: Option<Promise>,
) -> Result<(), msgpack::EncodeError> {
    let CallMain { from, to, method, session, parent } = main;
    let fields = [
        ("from", Some(from)),
        ("to", Some(to)),
        ("method", Some(method)),
        ("session", session),
        ("parent", parent),
    ];
    rope.put_map_header(1 + fields.iter().filter(|(_, v)| v.is_some()).count())?;
    rope.put_str("type")?;
    rope.put_str(METHOD)?;
    for (k, v) in fields {
        if let Some(v) = v {
            rope.put_str(k)?;
            rope.put_str(v)?;
        }
    }
    let interval = match promise {
        None => None,
        Some(Promise::Compact { interval }) => Some(interval),
        explicit => {
            let extra = call_extra_encoded(args, with_kwargs, explicit);
            return msgpack::encode_map_to_rope(&extra, rope);
        }
    };
    let entries =
        usize::from(!args.is_empty()) + usize::from(with_kwargs) + 2 * usize::from(interval.is_some());
    if entries == 0 {
        return Ok(());
    }
    rope.put_map_header(entries)?;
    if !args.is_empty() {
        rope.put_str("args")?;
        rope.put_value(&Value::List(args))?;
    }
    if with_kwargs {
        rope.put_str("with_kwargs")?;
        rope.put_value(&Value::Bool(true))?;
    }
    if let Some(interval) = interval {
        rope.put_str("promise")?;
        rope.put_str("*")?;
        rope.put_str("t")?;
        rope.put_value(&Value::F64(interval.as_secs_f64()))?;
    }
    Ok(())
}

/// The routing fields of an outgoing call, for [`write_call`].
#[derive(Clone, Copy, Debug)]
pub struct CallMain<'a> {
    /// Our id.
    pub from: &'a str,
    /// The target.
    pub to: &'a str,
    /// The method path.
    pub method: &'a str,
    /// The call's session, for calls with a promise.
    pub session: Option<&'a str>,
    /// The callee-side session the descriptor came in (§4.7).
    pub parent: Option<&'a str>,
}

fn interval_from(v: &Value) -> Result<Duration, MessageError> {
    let secs = v.as_f64().ok_or(MessageError::WrongType { key: "t", expected: "number", got: v.kind() })?;
    Duration::try_from_secs_f64(secs).map_err(|_| MessageError::BadInterval(secs.to_string()))
}

/// The `promise` of a call's extra segment (spec §4.3).
///
/// One exists per call and lives only while the call is dispatched, so the size gap between
/// the variants is not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Promise {
    /// `"promise": "*"` with `"t"`: the callee builds the callbacks from `from` and
    /// `session` ([`expand_compact`]).
    Compact {
        /// `t`: the heartbeat interval (half the caller's timeout).
        interval: Duration,
    },
    /// An explicit promise map. The descriptors are kept as received (wire-form
    /// `_rtype: "method"` maps, or already-decoded functions): the codec decodes them with
    /// the call's `remote_parent`.
    Explicit {
        /// Called with the result.
        resolve: Value,
        /// Called with an error value.
        reject: Value,
        /// Called periodically while the method runs, if present.
        heartbeat: Option<Value>,
        /// The heartbeat period, if present.
        interval: Option<Duration>,
    },
}

impl Promise {
    /// The promise the values of an extra segment's `promise` and `t` make
    /// ([`CallExtra::promise`]).
    fn from_parts(promise: Option<&Value>, t: Option<&Value>) -> Result<Option<Self>, MessageError> {
        let Some(p) = promise else { return Ok(None) };
        match p {
            Value::Str(s) if s == "*" => {
                let t = t.ok_or(MessageError::Missing("t"))?;
                Ok(Some(Promise::Compact { interval: interval_from(t)? }))
            }
            Value::Map(m) => {
                let resolve = m.get("resolve").cloned().ok_or(MessageError::MissingPromiseKey("resolve"))?;
                let reject = m.get("reject").cloned().ok_or(MessageError::MissingPromiseKey("reject"))?;
                let interval =
                    m.get("interval").filter(|v| !matches!(v, Value::Nil)).map(interval_from).transpose()?;
                Ok(Some(Promise::Explicit {
                    resolve,
                    reject,
                    heartbeat: m.get("heartbeat").cloned(),
                    interval,
                }))
            }
            other => Err(MessageError::BadPromise(other.kind())),
        }
    }

    /// The promise a caller attaches to a call made through a descriptor with
    /// `_rpromise = mode` (spec §4.2 step 5): `None` for fire-and-forget, `"*"` + `t` for
    /// the compact form, and for the explicit form three fire-and-forget descriptors
    /// pointing at `<session>.resolve|reject|heartbeat` on `caller` (our `ws/cid`).
    /// `interval` is [`crate::session::OpenedCall::heartbeat_interval`]; the compact
    /// form needs one (`t` is mandatory for Python callees), so a missing one is sent as 0.
    pub fn outgoing(
        mode: PromiseMode,
        caller: &str,
        session: &str,
        interval: Option<Duration>,
    ) -> Option<Promise> {
        match mode {
            PromiseMode::None => None,
            PromiseMode::Compact => Some(Promise::Compact { interval: interval.unwrap_or_default() }),
            PromiseMode::Explicit => Some(Promise::Explicit {
                resolve: callback_descriptor(caller, session, "resolve"),
                reject: callback_descriptor(caller, session, "reject"),
                heartbeat: Some(callback_descriptor(caller, session, "heartbeat")),
                interval,
            }),
        }
    }

    /// The heartbeat interval, when the callee should heartbeat (explicit promises need
    /// both `heartbeat` and `interval`).
    pub fn heartbeat_interval(&self) -> Option<Duration> {
        match self {
            Promise::Compact { interval } => Some(*interval),
            Promise::Explicit { heartbeat: Some(_), interval, .. } => *interval,
            Promise::Explicit { .. } => None,
        }
    }

    /// Writes the promise into an outgoing extra segment. Intervals go out as floats
    /// (`15.0`), as the Python client sends them; explicit keys in its order
    /// (`heartbeat, interval, resolve, reject`).
    pub fn write_into(self, extra: &mut Map) {
        match self {
            Promise::Compact { interval } => {
                extra.insert("promise".into(), Value::from("*"));
                extra.insert("t".into(), Value::F64(interval.as_secs_f64()));
            }
            Promise::Explicit { resolve, reject, heartbeat, interval } => {
                let mut m = Map::new();
                if let Some(h) = heartbeat {
                    m.insert("heartbeat".into(), h);
                }
                if let Some(i) = interval {
                    m.insert("interval".into(), Value::F64(i.as_secs_f64()));
                }
                m.insert("resolve".into(), resolve);
                m.insert("reject".into(), reject);
                extra.insert("promise".into(), Value::Map(m));
            }
        }
    }
}

/// A fire-and-forget callback descriptor (`_rpromise: false`) that the caller puts in an
/// explicit promise: `{_rtype: "method", _rtarget, _rmethod: "<session>.<name>",
/// _rpromise: false}`, `target` being the caller's bare client id or `"ws/cid"`.
pub fn callback_descriptor(target: &str, session: &str, name: &str) -> Value {
    let mut m = Map::new();
    m.insert("_rtype".into(), Value::from("method"));
    m.insert("_rtarget".into(), Value::from(target));
    m.insert("_rmethod".into(), Value::from(format!("{session}.{name}")));
    m.insert("_rpromise".into(), Value::Bool(false));
    Value::Map(m)
}

/// The callee's expansion of a compact promise (spec §4.3): three wire-form descriptors
/// without `_rpromise` (so fire-and-forget), `_rtarget` = the part of `from` after `/`,
/// `_rmethod = "<session>.heartbeat|resolve|reject"`, the Python client's `_rdoc`, and
/// `_renc_pub` when the request was encrypted. The codec then decodes them against the
/// caller's workspace, which makes the target absolute again.
pub fn expand_compact(
    from: &str,
    session: &str,
    method: &str,
    interval: Duration,
    caller_public_key: Option<&Bytes>,
) -> Result<Promise, MessageError> {
    let (_, target) = from.split_once('/').ok_or_else(|| MessageError::BadFrom(from.into()))?;
    let make = |name: &str| {
        let mut m = Map::new();
        m.insert("_rtype".into(), Value::from("method"));
        m.insert("_rtarget".into(), Value::from(target));
        m.insert("_rmethod".into(), Value::from(format!("{session}.{name}")));
        m.insert("_rdoc".into(), Value::from(format!("{name} callback for method: {method}")));
        if let Some(k) = caller_public_key {
            m.insert("_renc_pub".into(), Value::Bytes(k.clone()));
        }
        Value::Map(m)
    };
    Ok(Promise::Explicit {
        resolve: make("resolve"),
        reject: make("reject"),
        heartbeat: Some(make("heartbeat")),
        interval: Some(interval),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::json_to_value;
    use proptest::prelude::*;

    fn map(json: &str) -> Map {
        match json_to_value(&serde_json::from_str(json).unwrap()) {
            Value::Map(m) => m,
            other => panic!("not a map: {other:?}"),
        }
    }

    fn keys(m: &Map) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    // Main segments from /work/shared/interop/traces/hello.txt and the spec (§1.5, §2.4).
    const CLIENT_CALL: &str = r#"{"type": "method", "from": "ws-user-anonymouz-nebula-glitter-85750293/9gpn8x3RZqbkKtsfjP6GEy",
        "to": "*/manager-sponge-paradox-94220614", "method": "services.built-in.get_service", "session": "5arn3u3Uzc3HCcB3XNWiqv"}"#;
    const SERVER_STAMPED: &str = r#"{"type": "method", "from": "*/manager-sponge-paradox-94220614",
        "to": "ws-user-anonymouz-nebula-glitter-85750293/9gpn8x3RZqbkKtsfjP6GEy", "method": "5arn3u3Uzc3HCcB3XNWiqv.resolve",
        "parent": "5arn3u3Uzc3HCcB3XNWiqv", "ws": "ws-user-anonymouz-nebula-glitter-85750293",
        "user": {"id": "root", "roles": ["admin"], "is_anonymous": false, "email": null}}"#;
    const SYNTHETIC_REJECT: &str =
        r#"{"type":"method","from":"ws/third","to":"ws/cons2","method":"S.reject"}"#;
    const DISCONNECTED: &str =
        r#"{"type":"client_disconnected","to":"*","data":{"id":"third","workspace":"ws-x"}}"#;

    #[test]
    fn main_segments_round_trip_in_order() {
        for text in [CLIENT_CALL, SERVER_STAMPED, SYNTHETIC_REJECT, DISCONNECTED] {
            let m = map(text);
            let seg = MainSegment::from_map(m.clone()).unwrap();
            let back = seg.into_map();
            assert_eq!(keys(&back), keys(&m), "{text}");
            assert_eq!(back, m);
        }
        let s = MainSegment::from_map(map(SERVER_STAMPED)).unwrap();
        assert_eq!(s.kind, METHOD);
        assert_eq!(s.parent.as_deref(), Some("5arn3u3Uzc3HCcB3XNWiqv"));
        assert_eq!(s.session, None);
        assert!(s.user.as_ref().map(UserStamp::to_value).is_some_and(|u| u.as_map().is_some()));
        let r = MainSegment::from_map(map(SYNTHETIC_REJECT)).unwrap();
        assert_eq!((r.ws, r.user), (None, None));
        let d = MainSegment::from_map(map(DISCONNECTED)).unwrap();
        assert_eq!(d.kind, CLIENT_DISCONNECTED);
        assert_eq!(d.from, None);
        assert_eq!(keys(&d.rest), ["data"]);
    }

    /// A main map written entry by entry, so that it may repeat keys.
    fn encode_entries(entries: &[(String, Value)]) -> Bytes {
        let mut rope = Rope::new();
        rope.put_map_header(entries.len()).unwrap();
        for (k, v) in entries {
            rope.put_str(k).unwrap();
            rope.put_value(v).unwrap();
        }
        rope.into_bytes()
    }

    /// `MainSegment::decode` against decoding the map and `from_map`: the same segment
    /// (the `user` compared as a value) and the same end, or both refuse.
    fn decode_agrees_with_from_map(frame: &Bytes) {
        let limits = DecodeLimits::default();
        let direct = MainSegment::decode(frame, &limits);
        let via_map = msgpack::decode(frame, 0, &limits).map_err(|_| ()).and_then(|(v, end)| match v {
            Value::Map(m) => MainSegment::from_map(m).map(|s| (s, end)).map_err(|_| ()),
            _ => Err(()),
        });
        match (direct, via_map) {
            (Ok((mut a, end_a)), Ok((mut b, end_b))) => {
                assert_eq!(end_a, end_b);
                a.user = a.user.map(|u| UserStamp::Value(u.into_value()));
                b.user = b.user.map(|u| UserStamp::Value(u.into_value()));
                assert_eq!(a, b);
            }
            (Err(_), Err(())) => {}
            (a, b) => panic!("direct {a:?} but via the map {b:?}"),
        }
    }

    #[test]
    fn direct_decode_reads_a_server_stamped_segment() {
        let frame = Bytes::from(msgpack::encode_to_vec(&Value::Map(map(SERVER_STAMPED))).unwrap());
        let (seg, end) = MainSegment::decode(&frame, &DecodeLimits::default()).unwrap();
        assert_eq!(end, frame.len());
        let Some(UserStamp::Encoded(raw)) = &seg.user else { panic!("user kept encoded: {:?}", seg.user) };
        assert!(frame.as_ptr_range().contains(&raw.as_ptr()), "a slice of the frame");
        assert_eq!(seg.user.as_ref().map(UserStamp::to_value), map(SERVER_STAMPED).get("user").cloned());
        decode_agrees_with_from_map(&frame);
        // With a connection's `user` cache, cold and warm: the same segment.
        let mut cache = MainSegment::user_cache();
        for _ in 0..2 {
            assert_eq!(
                MainSegment::decode_cached(&frame, &DecodeLimits::default(), &mut cache).unwrap().0,
                seg
            );
        }
        // Written back, the encoded stamp is copied as it is: the same bytes.
        let mut rope = Rope::new();
        seg.encode_to(&mut rope).unwrap();
        assert_eq!(rope.into_bytes(), frame);
        // Errors as from_map's.
        let refused = |json: &str| {
            let f = Bytes::from(msgpack::encode_to_vec(&Value::Map(map(json))).unwrap());
            MainSegment::decode(&f, &DecodeLimits::default()).unwrap_err()
        };
        assert_eq!(refused(r#"{"to": "x"}"#), MainDecodeError::Message(MessageError::MissingType));
        assert_eq!(
            refused(r#"{"type": "method", "session": ["x"]}"#),
            MainDecodeError::Message(MessageError::WrongType {
                key: "session",
                expected: "str",
                got: "list"
            })
        );
        let list = Bytes::from_static(&[0x91, 0x01]);
        assert_eq!(
            MainSegment::decode(&list, &DecodeLimits::default()),
            Err(MainDecodeError::Package(PackageError::MainNotMap("list")))
        );
        // The item limit covers the whole segment, the skipped stamp included.
        // The map, its 7 keys, 6 str values and the stamp's 10 items (a map, 4 keys, 4
        // values and the roles list's item).
        let items = 1 + 7 + 6 + 10;
        let at = |max_items| MainSegment::decode(&frame, &DecodeLimits { max_items, ..Default::default() });
        assert!(at(items).is_ok());
        assert!(at(items - 1).is_err());
    }

    proptest! {
        #[test]
        fn direct_decode_equals_decoding_the_map(
            entries in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "type", "from", "to", "method", "session", "parent", "ws", "user", "data", "x",
                    ]),
                    proptest::prop_oneof![
                        3 => "[a-z/*.]{0,12}".prop_map(Value::Str),
                        1 => proptest::strategy::Just(Value::Nil),
                        1 => crate::msgpack::tests::arb_wire(),
                    ],
                ),
                0..12,
            ),
            force_type in proptest::bool::ANY,
        ) {
            let mut entries: Vec<(String, Value)> = entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            if force_type {
                entries.insert(0, ("type".into(), Value::from(METHOD)));
            }
            decode_agrees_with_from_map(&encode_entries(&entries));
        }

        #[test]
        fn encode_to_writes_what_into_map_encodes(
            entries in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["from", "to", "method", "session", "parent", "ws", "user", "data"]),
                    "[a-z/*.]{0,12}".prop_map(Value::Str),
                ),
                0..10,
            ),
        ) {
            let mut m: Map = entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            m.insert("type".into(), Value::from(METHOD));
            let seg = MainSegment::from_map(m).unwrap();
            let mut rope = Rope::new();
            seg.encode_to(&mut rope).unwrap();
            let mut expected = Vec::new();
            msgpack::encode_map(&seg.into_map(), &mut expected).unwrap();
            proptest::prop_assert_eq!(rope.into_bytes(), Bytes::from(expected));
        }
    }

    #[test]
    fn main_segment_order_is_canonical() {
        // Keys out of order on input come out in upstream's order, extras last.
        let m = map(
            r#"{"x": 1, "session": "s", "method": "m", "type": "method", "to": "t", "parent": "p", "from": "f"}"#,
        );
        let out = MainSegment::from_map(m).unwrap().into_map();
        assert_eq!(keys(&out), ["type", "from", "to", "method", "session", "parent", "x"]);
        let call = MainSegment::call("ws/a", "ws/b", "services.x.f").into_map();
        assert_eq!(keys(&call), ["type", "from", "to", "method"]);
    }

    #[test]
    fn wire_key_index_is_the_position_in_wire_keys() {
        for (i, k) in WIRE_KEYS.iter().enumerate() {
            assert_eq!(wire_key_index(k), Some(i));
        }
        assert_eq!(wire_key_index("args"), None);
        assert_eq!(wire_key_index("Type"), None);
    }

    #[test]
    fn main_segment_errors() {
        assert_eq!(MainSegment::from_map(map(r#"{"to": "x"}"#)), Err(MessageError::MissingType));
        assert_eq!(
            MainSegment::from_map(map(r#"{"type": 1}"#)),
            Err(MessageError::WrongType { key: "type", expected: "str", got: "int" })
        );
        assert_eq!(
            MainSegment::from_map(map(r#"{"type": "method", "session": ["x"]}"#)),
            Err(MessageError::WrongType { key: "session", expected: "str", got: "list" })
        );
        // nil reads as absent
        let s = MainSegment::from_map(map(r#"{"type": "method", "parent": null, "user": null}"#)).unwrap();
        assert_eq!((s.parent, s.user), (None, None));
    }

    #[test]
    fn server_stamping() {
        let mut s =
            MainSegment::from_map(map(r#"{"type": "method", "to": "prov", "method": "services.demo.add"}"#))
                .unwrap();
        assert!(s.stamp("ws", "cons", "ws", Value::Map(Map::new())));
        let out = s.into_map();
        assert_eq!(keys(&out), ["type", "from", "to", "method", "ws", "user"]);
        assert_eq!(out["from"], Value::from("ws/cons"));
        assert_eq!(out["to"], Value::from("ws/prov"));
        let mut no_to = MainSegment { kind: "method".into(), ..Default::default() };
        assert!(!no_to.stamp("ws", "c", "ws", Value::Nil));
        assert_eq!(no_to.from, None);
    }

    #[test]
    fn target_normalization() {
        assert_eq!(normalize_target("*", "ws"), "ws/*");
        assert_eq!(normalize_target("prov", "ws"), "ws/prov");
        assert_eq!(normalize_target("*/manager-x", "ws"), "*/manager-x");
        assert_eq!(normalize_target("other/prov", "ws"), "other/prov");
        assert!(is_broadcast("*") && is_broadcast("ws/*"));
        assert!(!is_broadcast("*/manager-x") && !is_broadcast("ws/prov"));
        assert!(is_broadcast("a/b/*") && is_broadcast("/*"));
        assert!(!is_broadcast("ws/x*") && !is_broadcast("ws*") && !is_broadcast("ws/*/x"));
    }

    #[test]
    fn callee_absolute_ids() {
        let a = CallAddresses::resolve("ws/cons", "prov", None).unwrap();
        assert_eq!(
            a,
            CallAddresses {
                remote_ws: "ws".into(),
                remote_client: "cons".into(),
                to: "ws/prov".into(),
                local_ws: "ws".into()
            }
        );
        let m = CallAddresses::resolve("*/manager-x", "ws/prov", Some("ws")).unwrap();
        assert_eq!((m.remote_ws.as_str(), m.remote_client.as_str()), ("*", "manager-x"));
        assert_eq!(CallAddresses::resolve("ws/c", "other/p", Some("*")).unwrap().local_ws, "*");
        let err = CallAddresses::resolve("ws/c", "other/p", Some("ws")).unwrap_err();
        assert_eq!(err.to_string(), "Workspace mismatch: other != ws");
        assert_eq!(CallAddresses::resolve("nows", "p", None), Err(MessageError::BadFrom("nows".into())));
        // The borrowing check agrees with `resolve`, and borrows an absolute `to`.
        let froms = ["ws/c", "*/manager-x", "nows", "", "/x", "ws/"];
        let tos = ["p", "ws/p", "other/p", "*", "ws/*", "", "/"];
        for from in froms {
            for to in tos {
                for local in [None, Some("ws"), Some("*"), Some(""), Some("other")] {
                    let full = CallAddresses::resolve(from, to, local).map(|a| a.to);
                    let direct = absolute_call_target(from, to, local);
                    assert_eq!(direct.clone().map(|t| t.into_owned()), full, "{from} {to} {local:?}");
                    if to.contains('/') {
                        assert!(direct.is_err() || matches!(direct, Ok(std::borrow::Cow::Borrowed(_))));
                    }
                }
            }
        }
    }

    #[test]
    fn ctx_is_main_plus_connection_type() {
        let main = map(SERVER_STAMPED);
        let seg = MainSegment::from_map(main.clone()).unwrap();
        let ctx = build_ctx(&seg, CONNECTION_TYPE_WEBSOCKET, "ws/absolute");
        assert_eq!(keys(&ctx), ["type", "from", "to", "method", "parent", "ws", "user", "connection_type"]);
        assert_eq!(ctx["connection_type"], Value::from("websocket"));
        assert_eq!(ctx["to"], Value::from("ws/absolute"));
        assert_eq!(ctx["user"], main["user"]);
        let mut merged = main.clone();
        merge_extra(&mut merged, map(r#"{"args": [1], "to": "override"}"#));
        assert_eq!(merged["to"], Value::from("override"));
        assert_eq!(merged["args"], Value::List(vec![Value::Int(1)]));
    }

    #[test]
    fn direct_call_package_equals_the_built_one() {
        let big = Value::Bytes(Bytes::from(vec![7u8; 100_000]));
        let i = Some(Duration::from_millis(15_500));
        for mode in [PromiseMode::None, PromiseMode::Compact, PromiseMode::Explicit] {
            for args in
                [vec![], vec![Value::from("x"), Value::Int(1)], vec![big.clone(), Value::Map(Map::new())]]
            {
                for with_kwargs in [false, true] {
                    for (session, parent) in [(None, None), (Some("S1"), None), (Some("S1"), Some("P.q"))] {
                        let promise = Promise::outgoing(mode, "ws/me", "S1", i);
                        let mut built = MainSegment::call("ws/me", "ws/peer", "services.x.f");
                        built.session = session.map(str::to_owned);
                        built.parent = parent.map(str::to_owned);
                        let mut expected = Rope::new();
                        built.encode_to(&mut expected).unwrap();
                        let extra = call_extra_encoded(args.clone(), with_kwargs, promise.clone());
                        if !extra.is_empty() {
                            msgpack::encode_map_to_rope(&extra, &mut expected).unwrap();
                        }
                        let main = CallMain {
                            from: "ws/me",
                            to: "ws/peer",
                            method: "services.x.f",
                            session,
                            parent,
                        };
                        let mut direct = Rope::new();
                        write_call(&mut direct, main, args.clone(), with_kwargs, promise).unwrap();
                        assert_eq!(direct.len(), expected.len());
                        assert_eq!(direct.into_bytes(), expected.into_bytes(), "{mode:?} {with_kwargs}");
                    }
                }
            }
        }
    }

    /// The extra segment `json` as a callee reads it.
    fn extra(json: &str) -> CallExtra {
        CallExtra::from_map(map(json))
    }

    #[test]
    fn take_args_moves_the_list_out() {
        let mut e = extra(r#"{"args": [1, "x"], "promise": "*"}"#);
        assert_eq!(e.take_args().unwrap(), vec![Value::Int(1), Value::from("x")]);
        assert_eq!(e.args, None);
        assert_eq!(e.promise, Some(Value::from("*")));
        assert_eq!(e.take_args().unwrap(), Vec::<Value>::new());
        let mut bad = extra(r#"{"args": "nope"}"#);
        assert!(matches!(bad.take_args(), Err(MessageError::WrongType { key: "args", .. })));
        assert_eq!(bad.args, Some(Value::from("nope")));
    }

    #[test]
    fn outgoing_promise_forms() {
        let i = Some(Duration::from_secs(15));
        assert_eq!(Promise::outgoing(PromiseMode::None, "ws/me", "S", i), None);
        assert_eq!(
            Promise::outgoing(PromiseMode::Compact, "ws/me", "S", i),
            Some(Promise::Compact { interval: Duration::from_secs(15) })
        );
        let mut extra = Map::new();
        Promise::outgoing(PromiseMode::Explicit, "ws/me", "S", i).unwrap().write_into(&mut extra);
        let p = extra["promise"].as_map().unwrap();
        assert_eq!(keys(p), ["heartbeat", "interval", "resolve", "reject"]);
        assert_eq!(p["interval"], Value::F64(15.0));
        assert_eq!(p["reject"], callback_descriptor("ws/me", "S", "reject"));
        // Encoded args with kwargs already last: same extra as call_extra builds.
        let enc = call_extra_encoded(vec![Value::Int(1), Value::Map(Map::new())], true, None);
        assert_eq!(enc, call_extra(vec![Value::Int(1)], Some(Map::new()), None));
    }

    #[test]
    fn extra_readers() {
        let mut e = extra(r#"{"args": [1, {"b": 5}], "with_kwargs": true, "promise": "*", "t": 15.0}"#);
        assert_eq!(e.take_args().unwrap().len(), 2);
        assert!(e.with_kwargs());
        assert!(!e.encrypted);
        assert!(CallExtra::default().take_args().unwrap().is_empty());
        assert!(!CallExtra::default().with_kwargs());
        assert!(
            extra(r#"{"with_kwargs": 1}"#).with_kwargs() && !extra(r#"{"with_kwargs": 0}"#).with_kwargs()
        );
        assert!(extra(r#"{"args": null}"#).take_args().unwrap().is_empty());
        assert!(extra(r#"{"args": "x"}"#).take_args().is_err());
        assert!(extra(r#"{"_enc": {"v": 2}, "data": "x"}"#).encrypted);
    }

    #[test]
    fn call_extra_matches_python() {
        let mut kw = Map::new();
        kw.insert("b".into(), Value::Int(5));
        let p = Promise::Compact { interval: Duration::from_secs(15) };
        let e = call_extra(vec![Value::Int(1)], Some(kw), Some(p));
        // spec §2.6, VERIFIED: {"args":[1,{"b":5}],"with_kwargs":true,"promise":"*","t":15.0}
        assert_eq!(e, map(r#"{"args": [1, {"b": 5}], "with_kwargs": true, "promise": "*", "t": 15.0}"#));
        assert_eq!(keys(&e), ["args", "with_kwargs", "promise", "t"]);
        assert_eq!(e["t"], Value::F64(15.0), "PY sends t as a float");
        assert!(call_extra(vec![], None, None).is_empty(), "PY omits empty args");
    }

    fn promise_of(json: &str) -> Result<Option<Promise>, MessageError> {
        extra(json).promise()
    }

    #[test]
    fn compact_promise_py_and_js() {
        let py = promise_of(r#"{"promise": "*", "t": 15.0}"#).unwrap();
        let js = promise_of(r#"{"args": ["raw-hello"], "promise": "*", "t": 15}"#).unwrap();
        assert_eq!(py, Some(Promise::Compact { interval: Duration::from_secs(15) }));
        assert_eq!(js, py);
        assert_eq!(py.unwrap().heartbeat_interval(), Some(Duration::from_secs(15)));
        let half = promise_of(r#"{"promise": "*", "t": 2.5}"#).unwrap().unwrap();
        assert_eq!(half.heartbeat_interval(), Some(Duration::from_millis(2500)));
        assert_eq!(promise_of(r#"{"args": []}"#), Ok(None));
    }

    #[test]
    fn promise_errors() {
        assert_eq!(promise_of(r#"{"promise": "*"}"#), Err(MessageError::Missing("t")));
        assert_eq!(promise_of(r#"{"promise": true}"#), Err(MessageError::BadPromise("bool")));
        assert_eq!(promise_of(r#"{"promise": "x"}"#), Err(MessageError::BadPromise("str")));
        assert!(matches!(
            promise_of(r#"{"promise": "*", "t": "15"}"#),
            Err(MessageError::WrongType { key: "t", .. })
        ));
        assert!(matches!(promise_of(r#"{"promise": "*", "t": -1}"#), Err(MessageError::BadInterval(_))));
        assert_eq!(
            promise_of(r#"{"promise": {"reject": 1}}"#),
            Err(MessageError::MissingPromiseKey("resolve"))
        );
        assert_eq!(
            promise_of(r#"{"promise": {"resolve": 1}}"#),
            Err(MessageError::MissingPromiseKey("reject"))
        );
    }

    /// The explicit promise of hello.txt (449.7 ms), as the Python client sends it.
    const EXPLICIT: &str = r#"{"args": ["default"], "promise": {
        "heartbeat": {"_rtype": "method", "_rtarget": "9gpn8x3RZqbkKtsfjP6GEy", "_rmethod": "5arn3u3Uzc3HCcB3XNWiqv.heartbeat", "_rpromise": false},
        "interval": 15.0,
        "resolve": {"_rtype": "method", "_rtarget": "9gpn8x3RZqbkKtsfjP6GEy", "_rmethod": "5arn3u3Uzc3HCcB3XNWiqv.resolve", "_rpromise": false},
        "reject": {"_rtype": "method", "_rtarget": "9gpn8x3RZqbkKtsfjP6GEy", "_rmethod": "5arn3u3Uzc3HCcB3XNWiqv.reject", "_rpromise": false}}}"#;

    #[test]
    fn explicit_promise_round_trip() {
        let sent = map(EXPLICIT);
        let p = promise_of(EXPLICIT).unwrap().unwrap();
        assert_eq!(p.heartbeat_interval(), Some(Duration::from_secs(15)));
        let Promise::Explicit { resolve, .. } = &p else { panic!("explicit expected") };
        assert_eq!(
            resolve,
            &callback_descriptor("9gpn8x3RZqbkKtsfjP6GEy", "5arn3u3Uzc3HCcB3XNWiqv", "resolve")
        );
        let mut out = Map::new();
        out.insert("args".into(), Value::List(vec![Value::from("default")]));
        p.write_into(&mut out);
        assert_eq!(out, sent);
        assert_eq!(keys(out["promise"].as_map().unwrap()), ["heartbeat", "interval", "resolve", "reject"]);
        // Without heartbeat, no heartbeat loop even with an interval.
        let p = promise_of(r#"{"promise": {"resolve": 1, "reject": 2, "interval": 3}}"#).unwrap();
        assert_eq!(p.unwrap().heartbeat_interval(), None);
    }

    #[test]
    fn compact_expansion_shape() {
        let key = Bytes::from_static(&[7; 32]);
        let p = expand_compact("ws/cons", "S1", "services.demo.add", Duration::from_secs(15), Some(&key))
            .unwrap();
        let Promise::Explicit { resolve, reject, heartbeat, interval } = p else {
            panic!("explicit expected")
        };
        assert_eq!(interval, Some(Duration::from_secs(15)));
        let hb = heartbeat.unwrap();
        let hb = hb.as_map().unwrap();
        assert_eq!(keys(hb), ["_rtype", "_rtarget", "_rmethod", "_rdoc", "_renc_pub"]);
        assert_eq!(hb["_rtarget"], Value::from("cons"));
        assert_eq!(hb["_rmethod"], Value::from("S1.heartbeat"));
        assert_eq!(hb["_rdoc"], Value::from("heartbeat callback for method: services.demo.add"));
        assert_eq!(hb["_renc_pub"], Value::Bytes(key));
        assert!(!hb.contains_key("_rpromise"), "fire-and-forget");
        assert_eq!(resolve.as_map().unwrap()["_rmethod"], Value::from("S1.resolve"));
        assert_eq!(reject.as_map().unwrap()["_rmethod"], Value::from("S1.reject"));
        // Without encryption there is no key; a manager caller keeps its bare id.
        let p = expand_compact("*/manager-x", "S", "m", Duration::from_secs(1), None).unwrap();
        let Promise::Explicit { resolve, .. } = p else { panic!("explicit expected") };
        assert_eq!(keys(resolve.as_map().unwrap()), ["_rtype", "_rtarget", "_rmethod", "_rdoc"]);
        assert_eq!(resolve.as_map().unwrap()["_rtarget"], Value::from("manager-x"));
        assert_eq!(
            expand_compact("nows", "S", "m", Duration::ZERO, None),
            Err(MessageError::BadFrom("nows".into()))
        );
    }

    #[test]
    fn event_names() {
        assert!(WORKSPACE_EVENTS.contains(&CLIENT_DISCONNECTED));
        assert_eq!(FORCE_EXIT, "force-exit");
        assert_eq!(PEER_NOT_FOUND, "peer_not_found");
    }
}
