//! The `_rtype` codec (spec §5): decoded [`Value`]s <-> wire-form values.
//!
//! [`encode`] turns a decoded value (which may hold local functions, generators, arrays,
//! errors, custom Rust types) into a tree of msgpack-native variants, storing whatever
//! must stay callable through an [`ObjectSink`]. [`decode`] does the reverse for values a
//! peer sent: `_rtype` maps become typed variants, relative `_rtarget`s become absolute.
//!
//! # Reserved keys (spec §5.2)
//!
//! Upstream (hypha-rpc 0.21.47, `RPC._encode`/`RPC._decode`) neither rejects nor strips
//! reserved keys found in application maps; it gives a few of them meaning and passes
//! everything else through. This codec does the same, key by key:
//!
//! * `_rtype`: a map carrying it is an encoded object. On encode, application maps that
//!   carry it follow the "maps that already contain `_rtype`" rule (members encoded,
//!   `_rtype` moved to the end); on decode, unknown values pass through the same way.
//! * `_rintf`: `true` plus a callable under a non-`_` key turns the map into a local
//!   service (spec §5.5); any other value is ordinary data.
//! * `_rintf_service_id`, `_dispose`: overwritten in a `_rintf` map, as upstream does
//!   (the generated values replace the application's, in place).
//! * descriptor fields (`_rvalue`, `_rtarget`, `_rmethod`, ...): only interpreted inside
//!   a map whose `_rtype` names a known type; elsewhere they are data.
//! * `_rkwargs`: a client-side marker (JS). It is stripped from the last positional
//!   argument and from explicit kwargs by [`encode_args`] only; inside nested data it is
//!   data, as upstream leaves it.
//! * `_enc`: belongs to the message envelope (spec §8), not to values; not touched here.
//! * `__rpc_object__`, `__schema__`, `__no_chunk__`: upstream attaches them to local
//!   Python/JS objects (proxies, functions), never as map keys it emits. In Rust they are
//!   struct fields ([`RemoteMethod`] itself, [`LocalFunction::schema`]), so we never emit
//!   them either; a peer's map that happens to contain them is data, as in upstream.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::array::{ArrayError, DType, NdArray};
use crate::value::{
    CustomValue, ErrorValue, Function, Generator, Handler, LocalFunction, LocalGenerator, Map, PromiseMode,
    RemoteGenerator, RemoteMethod, TypedArray, Value,
};

/// Where the encoder puts local objects that must stay callable by the peer.
///
/// The session table implements it: functions passed as call arguments go into the call
/// session (and die with it), functions in results into the result session, `_rintf`
/// maps become local services. Keeping this a trait keeps the codec free of session state
/// and testable on its own.
pub trait ObjectSink {
    /// Stores a local function and returns how to describe it.
    ///
    /// `session` is the session the value is being encoded into (`None` outside a call:
    /// then only functions that belong to a registered service can be encoded, as
    /// upstream asserts).
    fn store_function(
        &mut self,
        session: Option<&str>,
        function: &LocalFunction,
    ) -> Result<StoredFunction, CodecError>;

    /// Stores a local generator (`S[oid]` and `S[oid + ":close"]`, spec §6) and returns the
    /// `(next, close)` method paths.
    fn store_generator(
        &mut self,
        session: Option<&str>,
        generator: &LocalGenerator,
    ) -> Result<(String, String), CodecError>;

    /// Registers a `_rintf` interface (spec §5.5) made of `members` (the map's callables
    /// under keys that do not start with `_`) as a local service, allowed only for the
    /// target of the current top-level session, and returns the new service id
    /// (`_rintf_<random>`). The sink adds the `_dispose` member itself.
    fn register_interface(
        &mut self,
        session: Option<&str>,
        members: Vec<(String, LocalFunction)>,
    ) -> Result<String, CodecError>;

    /// Wraps a remote method that cannot be forwarded as is (its `_rserver` differs from
    /// ours, spec §5.3) as a local session function that relays calls, and returns the
    /// method path under which it was stored.
    fn store_forwarder(&mut self, session: Option<&str>, method: &RemoteMethod)
        -> Result<String, CodecError>;
}

/// How a stored local function is described on the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredFunction {
    /// `_rmethod`: `<session>.<objid>[#name]` or `services.<id>.<path>`.
    pub method: String,
    /// True when the function is a member of a registered service (annotated): then the
    /// descriptor also carries `_rasync: false` and the schema, as Python emits.
    pub is_service_function: bool,
}

/// Default nesting limit for [`EncodeContext`] and [`DecodeContext`].
///
/// Both walks recurse; a limit turns a hostile or accidental deep value into a typed error
/// instead of a stack overflow. 128 levels is far beyond any real payload (schemas nest
/// about 10 deep) and safe on a 2 MiB thread stack in debug builds.
pub const DEFAULT_MAX_DEPTH: usize = 128;

/// `_rdoc` of generator descriptors, fixed by upstream (spec §6).
const GENERATOR_DOC: &str = "Remote generator";

/// Errors of the `_rtype` codec.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Raised by an [`ObjectSink`] implementation for failures the codec cannot name.
    #[error("{0}")]
    Other(String),
    /// A function or generator was encoded outside a call session and is not a member of
    /// a registered service (upstream asserts `isinstance(session_id, str)`).
    #[error("a session id is required to encode a {what}")]
    SessionRequired {
        /// `"function"` or `"generator"`.
        what: &'static str,
    },
    /// The value nests deeper than the context's limit.
    #[error("value nesting exceeds the depth limit of {limit}")]
    TooDeep {
        /// The limit that was hit.
        limit: usize,
    },
    /// A `_rtype` object lacks a required field.
    #[error("malformed `{rtype}` object: missing field `{field}`")]
    MissingField {
        /// The `_rtype` value.
        rtype: String,
        /// The missing key.
        field: &'static str,
    },
    /// A field of a `_rtype` object has the wrong type or value.
    #[error("malformed `{rtype}` object: field `{field}` must be {expected}, got {got}")]
    InvalidField {
        /// The `_rtype` value.
        rtype: String,
        /// The offending key.
        field: &'static str,
        /// What was expected.
        expected: &'static str,
        /// What was found (a [`Value::kind`] or a short description).
        got: String,
    },
    /// An ndarray's bytes do not match its shape and dtype (on encode or decode).
    #[error("malformed `ndarray` object: {0}")]
    ArrayLayout(#[from] ArrayError),
    /// A typed array's byte length is not a multiple of its element size.
    #[error("malformed `typedarray` object: {len} bytes is not a whole number of {dtype} elements")]
    TypedArrayLength {
        /// The dtype name.
        dtype: String,
        /// The byte length.
        len: usize,
    },
    /// No registered codec can encode a [`Value::Custom`] (upstream's wording).
    #[error(
        "hypha-rpc: Unsupported data type: {codec}, you can register a custom codec to encode/decode the object."
    )]
    NoCodec {
        /// The value's codec name.
        codec: String,
    },
    /// The codec found by name holds a different Rust type than the value.
    #[error("codec `{codec}` cannot encode this value: its Rust type differs from the registered one")]
    CodecTypeMismatch {
        /// The codec name.
        codec: String,
    },
    /// A user codec's encoder or decoder failed.
    #[error("codec `{codec}` failed: {message}")]
    Custom {
        /// The codec name.
        codec: String,
        /// The codec's error, formatted.
        message: String,
    },
    /// `with_kwargs` was set but there is no last argument.
    #[error("with_kwargs is set but the call has no arguments")]
    KwargsMissing,
    /// `with_kwargs` was set but the last argument is not a map.
    #[error("with_kwargs is set but the last argument is a {got}, not a map")]
    KwargsNotAMap {
        /// The kind of the last argument.
        got: &'static str,
    },
}

// ---------------------------------------------------------------------------------------
// Custom codecs (spec §5.7)
// ---------------------------------------------------------------------------------------

type EncodeFn = Arc<dyn Fn(&CustomValue) -> Result<Value, CodecError> + Send + Sync>;
type DecodeFn = Arc<dyn Fn(Map) -> Result<CustomValue, CodecError> + Send + Sync>;

struct CodecEntry {
    name: String,
    type_id: TypeId,
    encoder: EncodeFn,
    decoder: Option<DecodeFn>,
}

/// User-registered codecs for Rust types (spec §5.7), consulted by [`encode`] for
/// [`Value::Custom`] and by [`decode`] for `_rtype` values that name a codec.
///
/// Kept in registration order: upstream tries codecs in dict order and takes the first
/// match. Registering a codec with the same name or the same Rust type replaces the old
/// one, as upstream's `register_codec` does.
#[derive(Default, Clone)]
pub struct CodecRegistry {
    codecs: Vec<Arc<CodecEntry>>,
}

impl fmt::Debug for CodecRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.codecs.iter().map(|c| &c.name)).finish()
    }
}

impl CodecRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a codec named `name` for `T`.
    ///
    /// `encoder` turns a `T` into a value; a map without `_rtype` gets `_rtype = name`, and
    /// its members are then encoded (so functions inside become descriptors). `decoder`,
    /// if given, turns a received `_rtype: name` map (members already decoded, `_rtype`
    /// last) back into a `T`; without one such maps pass through as maps.
    pub fn register<T, E, Enc, Dec>(&mut self, name: impl Into<String>, encoder: Enc, decoder: Option<Dec>)
    where
        T: Any + Send + Sync,
        E: fmt::Display + 'static,
        Enc: Fn(&T) -> Result<Value, E> + Send + Sync + 'static,
        Dec: Fn(Map) -> Result<T, E> + Send + Sync + 'static,
    {
        let name = name.into();
        let type_id = TypeId::of::<T>();
        self.codecs.retain(|c| c.name != name && c.type_id != type_id);
        let enc_name = name.clone();
        let encoder: EncodeFn = Arc::new(move |cv: &CustomValue| {
            let v = cv
                .downcast_ref::<T>()
                .ok_or_else(|| CodecError::CodecTypeMismatch { codec: enc_name.clone() })?;
            encoder(v).map_err(|e| CodecError::Custom { codec: enc_name.clone(), message: e.to_string() })
        });
        let decoder = decoder.map(|dec| {
            let dec_name = name.clone();
            Arc::new(move |m: Map| {
                dec(m)
                    .map(|t| CustomValue::new(dec_name.clone(), t))
                    .map_err(|e| CodecError::Custom { codec: dec_name.clone(), message: e.to_string() })
            }) as DecodeFn
        });
        self.codecs.push(Arc::new(CodecEntry { name, type_id, encoder, decoder }));
    }

    /// Registers an encode-only codec (received maps of this `_rtype` stay maps).
    pub fn register_encoder<T, E, Enc>(&mut self, name: impl Into<String>, encoder: Enc)
    where
        T: Any + Send + Sync,
        E: fmt::Display + 'static,
        Enc: Fn(&T) -> Result<Value, E> + Send + Sync + 'static,
    {
        self.register::<T, E, Enc, fn(Map) -> Result<T, E>>(name, encoder, None);
    }

    /// Removes the codec named `name`; true if there was one.
    pub fn unregister(&mut self, name: &str) -> bool {
        let before = self.codecs.len();
        self.codecs.retain(|c| c.name != name);
        before != self.codecs.len()
    }

    /// True when a codec named `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.codecs.iter().any(|c| c.name == name)
    }

    /// The codec for a custom value: by the payload's `TypeId`, else by its codec name.
    fn for_value(&self, cv: &CustomValue) -> Option<&CodecEntry> {
        let tid = cv.type_id_of_value();
        self.codecs
            .iter()
            .find(|c| c.type_id == tid)
            .or_else(|| self.codecs.iter().find(|c| c.name == cv.codec))
            .map(|c| &**c)
    }

    /// The decoder registered for `_rtype` value `name`, if any.
    fn decoder(&self, name: &str) -> Option<&DecodeFn> {
        self.codecs.iter().find(|c| c.name == name).and_then(|c| c.decoder.as_ref())
    }
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// What [`encode`] needs to know about the local side.
pub struct EncodeContext<'a> {
    /// `_rtarget` written into our descriptors: **PY** writes `"<ws>/<client_id>"` when
    /// the workspace of the call context is known, else the bare client id.
    pub target: &'a str,
    /// `_rserver`: our server's `public_base_url`. Omitted when `None` (spec §5.3: a wrong
    /// value makes peers wrap our functions in expiring sessions).
    pub server: Option<&'a str>,
    /// The session the value is encoded into (call or result session); functions and
    /// generators are stored there.
    pub session: Option<&'a str>,
    /// Our X25519 public key; when set, session functions carry it as `_renc_pub` so that
    /// calls back to them are encrypted (spec §8). Service functions never carry it.
    pub encryption_key: Option<Bytes>,
    /// User codecs for [`Value::Custom`].
    pub codecs: &'a CodecRegistry,
    /// Where local functions, generators and `_rintf` services go.
    pub sink: &'a mut dyn ObjectSink,
    /// Nesting limit (see [`DEFAULT_MAX_DEPTH`]).
    pub max_depth: usize,
    /// Output: ids of the `_rintf` services created during this encode, in order. The
    /// Python client writes `_rintf_service_id` back into the caller's map; Rust callers
    /// read the ids here to unregister them later.
    pub created_interfaces: Vec<String>,
}

impl<'a> EncodeContext<'a> {
    /// A context with no server, session or key, and the default depth limit.
    pub fn new(target: &'a str, codecs: &'a CodecRegistry, sink: &'a mut dyn ObjectSink) -> Self {
        Self {
            target,
            server: None,
            session: None,
            encryption_key: None,
            codecs,
            sink,
            max_depth: DEFAULT_MAX_DEPTH,
            created_interfaces: Vec::new(),
        }
    }
}

/// Encodes a decoded value into wire form (only msgpack-native variants in the result).
pub fn encode(value: &Value, cx: &mut EncodeContext<'_>) -> Result<Value, CodecError> {
    enc(value, cx, 0)
}

fn enter(depth: usize, limit: usize) -> Result<usize, CodecError> {
    if depth >= limit {
        return Err(CodecError::TooDeep { limit });
    }
    Ok(depth + 1)
}

fn enc(value: &Value, cx: &mut EncodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    Ok(match value {
        Value::Nil
        | Value::Bool(_)
        | Value::Int(_)
        | Value::UInt(_)
        | Value::F32(_)
        | Value::F64(_)
        | Value::Str(_)
        | Value::Bytes(_) => value.clone(),
        Value::List(items) => {
            let d = enter(depth, cx.max_depth)?;
            Value::List(items.iter().map(|v| enc(v, cx, d)).collect::<Result<_, _>>()?)
        }
        Value::Map(m) => Value::Map(enc_map(m, cx, depth)?),
        Value::NdArray(a) => {
            a.check_layout()?;
            let mut m = Map::with_capacity(4);
            m.insert("_rtype".into(), "ndarray".into());
            m.insert("_rvalue".into(), Value::Bytes(a.data.clone()));
            m.insert("_rshape".into(), Value::List(a.shape.iter().map(|&d| Value::from(d)).collect()));
            m.insert("_rdtype".into(), a.dtype.as_str().into());
            Value::Map(m)
        }
        Value::TypedArray(t) => {
            check_typed(&t.dtype, t.data.len())?;
            let mut m = Map::with_capacity(3);
            m.insert("_rtype".into(), "typedarray".into());
            m.insert("_rvalue".into(), Value::Bytes(t.data.clone()));
            m.insert("_rdtype".into(), t.dtype.as_str().into());
            Value::Map(m)
        }
        Value::MemoryView(b) => {
            let mut m = Map::with_capacity(2);
            m.insert("_rtype".into(), "memoryview".into());
            m.insert("_rvalue".into(), Value::Bytes(b.clone()));
            Value::Map(m)
        }
        Value::Set(items) => {
            let d = enter(depth, cx.max_depth)?;
            let items = items.iter().map(|v| enc(v, cx, d)).collect::<Result<_, _>>()?;
            let mut m = Map::with_capacity(2);
            m.insert("_rtype".into(), "set".into());
            m.insert("_rvalue".into(), Value::List(items));
            Value::Map(m)
        }
        Value::OrderedMap(pairs) => {
            let d = enter(depth, cx.max_depth)?;
            let mut out = Vec::with_capacity(pairs.len());
            for (k, v) in pairs {
                out.push(Value::List(vec![enc(k, cx, d)?, enc(v, cx, d)?]));
            }
            let mut m = Map::with_capacity(2);
            m.insert("_rtype".into(), "orderedmap".into());
            m.insert("_rvalue".into(), Value::List(out));
            Value::Map(m)
        }
        Value::Error(e) => {
            let mut m = Map::with_capacity(3);
            m.insert("_rtype".into(), "error".into());
            m.insert("_rvalue".into(), e.message.as_str().into());
            m.insert("_rtrace".into(), e.trace.as_deref().into());
            Value::Map(m)
        }
        Value::Function(f) => match &**f {
            Function::Local(lf) => {
                let stored = cx.sink.store_function(cx.session, lf)?;
                let schema = lf.schema.as_deref();
                let name = lf.name.as_deref();
                let doc = lf.doc.as_deref();
                if stored.is_service_function {
                    service_descriptor(cx, stored.method, name, false, doc, schema, depth)?
                } else {
                    session_descriptor(cx, stored.method, name, doc, schema, depth)?
                }
            }
            Function::Remote(rm) => {
                if forwardable(rm.server.as_deref(), cx.server) {
                    remote_method_to_wire(rm, cx, depth)?
                } else {
                    let path = cx.sink.store_forwarder(cx.session, rm)?;
                    let schema = rm.schema.as_deref();
                    session_descriptor(cx, path, Some(rm.display_name()), rm.doc.as_deref(), schema, depth)?
                }
            }
        },
        Value::Generator(g) => match &**g {
            Generator::Local(lg) => {
                let (next, close) = cx.sink.store_generator(cx.session, lg)?;
                generator_descriptor(cx, next, close)
            }
            Generator::Remote(rg) => {
                if forwardable(rg.server.as_deref(), cx.server) {
                    remote_generator_to_wire(rg, cx, depth)?
                } else {
                    // Relay both entries through forwarders in our session: the peer then
                    // iterates us and we iterate the owner.
                    let relay = |method: &str| RemoteMethod {
                        server: rg.server.clone(),
                        target: rg.target.clone(),
                        method: method.to_owned(),
                        promise: PromiseMode::Compact,
                        remote_parent: rg.remote_parent.clone(),
                        ..Default::default()
                    };
                    let next = cx.sink.store_forwarder(cx.session, &relay(&rg.method))?;
                    let close = cx.sink.store_forwarder(cx.session, &relay(&rg.close_method))?;
                    generator_descriptor(cx, next, close)
                }
            }
        },
        Value::Custom(cv) => enc_custom(cv, cx, depth)?,
    })
}

/// The forwarding rule of spec §5.3: a received descriptor is re-sent as is when its
/// `_rserver` is absent or equals ours.
fn forwardable(theirs: Option<&str>, ours: Option<&str>) -> bool {
    theirs.is_none() || theirs == ours
}

fn check_typed(dtype: &DType, len: usize) -> Result<(), CodecError> {
    match dtype.item_size() {
        Some(size) if len % size != 0 => {
            Err(CodecError::TypedArrayLength { dtype: dtype.as_str().to_owned(), len })
        }
        _ => Ok(()),
    }
}

fn enc_custom(cv: &CustomValue, cx: &mut EncodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    let codec =
        cx.codecs.for_value(cv).ok_or_else(|| CodecError::NoCodec { codec: cv.codec.clone() })?;
    let name = codec.name.clone();
    let out = (codec.encoder)(cv)?;
    let d = enter(depth, cx.max_depth)?;
    match out {
        Value::Map(mut m) => {
            if !m.contains_key("_rtype") {
                m.insert("_rtype".into(), Value::Str(name));
            }
            Ok(Value::Map(enc_map(&m, cx, depth)?))
        }
        // Upstream returns non-map encoder output unencoded; we encode it so that the
        // result is always wire form (identity for plain data).
        other => enc(&other, cx, d),
    }
}

/// Encodes a map: the `_rtype` rule, the `_rintf` rule, or member by member.
fn enc_map(m: &Map, cx: &mut EncodeContext<'_>, depth: usize) -> Result<Map, CodecError> {
    let d = enter(depth, cx.max_depth)?;
    let is_rintf = m.get("_rintf") == Some(&Value::Bool(true))
        && m.iter().any(|(k, v)| !k.starts_with('_') && matches!(v, Value::Function(_)));
    let mut out = if is_rintf { enc_rintf(m, cx, depth)? } else { enc_members(m, cx, d)? };
    // Spec §5.2: encode the other members, then put `_rtype` back, at the end (as PY).
    if let Some(rtype) = m.get("_rtype") {
        out.shift_remove("_rtype");
        out.insert("_rtype".into(), enc(rtype, cx, d)?);
    }
    Ok(out)
}

fn enc_members(m: &Map, cx: &mut EncodeContext<'_>, d: usize) -> Result<Map, CodecError> {
    let mut out = Map::with_capacity(m.len());
    for (k, v) in m {
        if k != "_rtype" {
            out.insert(k.clone(), enc(v, cx, d)?);
        }
    }
    Ok(out)
}

/// Spec §5.5: register the map's local callables as a `_rintf_` service and describe them
/// as `services.<id>.<key>` members.
fn enc_rintf(m: &Map, cx: &mut EncodeContext<'_>, depth: usize) -> Result<Map, CodecError> {
    let d = enter(depth, cx.max_depth)?;
    let mut members = Vec::new();
    // Upstream annotates by function identity, so a function under two keys is described
    // by the last key (spec §5.3).
    let mut last_key: HashMap<&Handler, &str> = HashMap::new();
    for (k, v) in m {
        if let Value::Function(f) = v {
            if let (false, Function::Local(lf)) = (k.starts_with('_'), &**f) {
                members.push((k.clone(), lf.clone()));
                last_key.insert(&lf.handler, k);
            }
        }
    }
    let sid = cx.sink.register_interface(cx.session, members)?;
    cx.created_interfaces.push(sid.clone());
    let mut out = Map::with_capacity(m.len() + 2);
    for (k, v) in m {
        if k == "_rtype" {
            continue;
        }
        let local = match v {
            Value::Function(f) if !k.starts_with('_') => match &**f {
                Function::Local(lf) => Some(lf),
                Function::Remote(_) => None,
            },
            _ => None,
        };
        let encoded = match local {
            Some(lf) => {
                let key = last_key.get(&lf.handler).copied().unwrap_or(k.as_str());
                let path = format!("services.{sid}.{key}");
                let (name, doc, schema) = (lf.name.as_deref(), lf.doc.as_deref(), lf.schema.as_deref());
                service_descriptor(cx, path, name, false, doc, schema, d)?
            }
            None => enc(v, cx, d)?,
        };
        out.insert(k.clone(), encoded);
    }
    // Upstream's generated `_dispose` is an `async def` without a docstring.
    let dispose = service_descriptor(cx, format!("services.{sid}._dispose"), Some("_dispose"), true, None, None, d)?;
    out.insert("_dispose".into(), dispose);
    out.insert("_rintf_service_id".into(), Value::Str(sid));
    Ok(out)
}

fn put_server(m: &mut Map, server: Option<&str>) {
    if let Some(s) = server {
        m.insert("_rserver".into(), s.into());
    }
}

/// The descriptor of a session function (PY key order, spec §5.3).
fn session_descriptor(
    cx: &mut EncodeContext<'_>,
    method: String,
    name: Option<&str>,
    doc: Option<&str>,
    schema: Option<&Value>,
    depth: usize,
) -> Result<Value, CodecError> {
    let mut m = Map::with_capacity(9);
    m.insert("_rtype".into(), "method".into());
    put_server(&mut m, cx.server);
    m.insert("_rtarget".into(), cx.target.into());
    m.insert("_rmethod".into(), Value::Str(method));
    if let Some(n) = name {
        m.insert("_rname".into(), n.into());
    }
    m.insert("_rpromise".into(), "*".into());
    if let Some(key) = &cx.encryption_key {
        m.insert("_renc_pub".into(), Value::Bytes(key.clone()));
    }
    m.insert("_rdoc".into(), doc.into());
    if let Some(s) = schema {
        let d = enter(depth, cx.max_depth)?;
        m.insert("_rschema".into(), enc(s, cx, d)?);
    }
    Ok(Value::Map(m))
}

/// The descriptor of an annotated service function (PY key order, spec §5.3). Rust
/// functions report `_rasync: false`; only the generated `_dispose` reports `true`.
fn service_descriptor(
    cx: &mut EncodeContext<'_>,
    method: String,
    name: Option<&str>,
    is_async: bool,
    doc: Option<&str>,
    schema: Option<&Value>,
    depth: usize,
) -> Result<Value, CodecError> {
    let mut m = Map::with_capacity(9);
    m.insert("_rtype".into(), "method".into());
    put_server(&mut m, cx.server);
    m.insert("_rtarget".into(), cx.target.into());
    m.insert("_rmethod".into(), Value::Str(method));
    m.insert("_rpromise".into(), "*".into());
    if let Some(n) = name {
        m.insert("_rname".into(), n.into());
    }
    m.insert("_rasync".into(), Value::Bool(is_async));
    m.insert("_rdoc".into(), doc.into());
    if let Some(s) = schema {
        let d = enter(depth, cx.max_depth)?;
        m.insert("_rschema".into(), enc(s, cx, d)?);
    }
    Ok(Value::Map(m))
}

fn generator_descriptor(cx: &EncodeContext<'_>, next: String, close: String) -> Value {
    let mut m = Map::with_capacity(7);
    m.insert("_rtype".into(), "generator".into());
    put_server(&mut m, cx.server);
    m.insert("_rtarget".into(), cx.target.into());
    m.insert("_rmethod".into(), Value::Str(next));
    m.insert("_rclose_method".into(), Value::Str(close));
    m.insert("_rpromise".into(), "*".into());
    m.insert("_rdoc".into(), GENERATOR_DOC.into());
    Value::Map(m)
}

/// Re-emits a received method descriptor (forwarding). `_rtarget` is the absolute target
/// made on decode, as upstream forwards its already-resolved `__rpc_object__`.
fn remote_method_to_wire(
    rm: &RemoteMethod,
    cx: &mut EncodeContext<'_>,
    depth: usize,
) -> Result<Value, CodecError> {
    let d = enter(depth, cx.max_depth)?;
    let mut m = Map::with_capacity(10 + rm.extra.len());
    m.insert("_rtype".into(), "method".into());
    put_server(&mut m, rm.server.as_deref());
    m.insert("_rtarget".into(), rm.target.as_str().into());
    m.insert("_rmethod".into(), rm.method.as_str().into());
    match rm.promise {
        PromiseMode::None => {}
        PromiseMode::Explicit => {
            m.insert("_rpromise".into(), Value::Bool(true));
        }
        PromiseMode::Compact => {
            m.insert("_rpromise".into(), "*".into());
        }
    }
    if let Some(n) = &rm.name {
        m.insert("_rname".into(), n.as_str().into());
    }
    if let Some(a) = rm.is_async {
        m.insert("_rasync".into(), Value::Bool(a));
    }
    if let Some(doc) = &rm.doc {
        m.insert("_rdoc".into(), doc.as_str().into());
    }
    if let Some(s) = &rm.schema {
        m.insert("_rschema".into(), enc(s, cx, d)?);
    }
    if let Some(k) = &rm.encryption_key {
        m.insert("_renc_pub".into(), Value::Bytes(k.clone()));
    }
    for (k, v) in &rm.extra {
        if !m.contains_key(k) {
            m.insert(k.clone(), enc(v, cx, d)?);
        }
    }
    Ok(Value::Map(m))
}

fn remote_generator_to_wire(
    rg: &RemoteGenerator,
    cx: &mut EncodeContext<'_>,
    depth: usize,
) -> Result<Value, CodecError> {
    let d = enter(depth, cx.max_depth)?;
    let mut m = Map::with_capacity(5 + rg.extra.len());
    m.insert("_rtype".into(), "generator".into());
    put_server(&mut m, rg.server.as_deref());
    m.insert("_rtarget".into(), rg.target.as_str().into());
    m.insert("_rmethod".into(), rg.method.as_str().into());
    m.insert("_rclose_method".into(), rg.close_method.as_str().into());
    for (k, v) in &rg.extra {
        if !m.contains_key(k) {
            m.insert(k.clone(), enc(v, cx, d)?);
        }
    }
    Ok(Value::Map(m))
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// What [`decode`] needs to know about the sender.
#[derive(Clone, Copy, Debug)]
pub struct DecodeContext<'a> {
    /// The sender's workspace, used to make relative `_rtarget`s absolute (spec §4.1).
    pub remote_workspace: Option<&'a str>,
    /// `session` of the carrying call, stored in the decoded descriptors'
    /// `remote_parent` (spec §4.7). `None` for values from a `resolve`.
    pub remote_parent: Option<&'a str>,
    /// User codecs with decoders.
    pub codecs: &'a CodecRegistry,
    /// Nesting limit (see [`DEFAULT_MAX_DEPTH`]).
    pub max_depth: usize,
}

impl<'a> DecodeContext<'a> {
    /// A context with no workspace, no parent and the default depth limit.
    pub fn new(codecs: &'a CodecRegistry) -> Self {
        Self { remote_workspace: None, remote_parent: None, codecs, max_depth: DEFAULT_MAX_DEPTH }
    }
}

/// Makes a descriptor's `_rtarget` absolute against the sender's workspace (spec §4.1):
/// a target without `/` becomes `"W/" + target`, unless it equals `W` itself (upstream
/// keeps it then). Targets with a `/` (including `*/manager`) are kept.
pub fn resolve_target(target: String, remote_workspace: Option<&str>) -> String {
    match remote_workspace {
        Some(w) if !target.contains('/') && target != w => format!("{w}/{target}"),
        _ => target,
    }
}

/// Decodes a wire-form value, moving children out of `wire` (no `Bytes` copies).
pub fn decode(wire: Value, cx: &DecodeContext<'_>) -> Result<Value, CodecError> {
    dec(wire, cx, 0)
}

fn dec(wire: Value, cx: &DecodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    match wire {
        Value::List(items) => {
            let d = enter(depth, cx.max_depth)?;
            Ok(Value::List(items.into_iter().map(|v| dec(v, cx, d)).collect::<Result<_, _>>()?))
        }
        Value::Map(m) => dec_map(m, cx, depth),
        other => Ok(other),
    }
}

fn dec_members(m: Map, cx: &DecodeContext<'_>, d: usize) -> Result<Map, CodecError> {
    let mut out = Map::with_capacity(m.len());
    for (k, v) in m {
        out.insert(k, dec(v, cx, d)?);
    }
    Ok(out)
}

fn dec_map(mut m: Map, cx: &DecodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    let d = enter(depth, cx.max_depth)?;
    let rtype = match m.get("_rtype") {
        None => return Ok(Value::Map(dec_members(m, cx, d)?)),
        Some(Value::Str(s)) => s.clone(),
        // A non-string `_rtype` names nothing we know: pass through like unknown ones.
        Some(_) => String::new(),
    };
    if let Some(decoder) = cx.codecs.decoder(&rtype) {
        let tag = m.shift_remove("_rtype").unwrap_or_default();
        let mut out = dec_members(m, cx, d)?;
        out.insert("_rtype".into(), tag);
        return Ok(Value::Custom(decoder(out)?));
    }
    match rtype.as_str() {
        "method" => dec_method(m, cx, d),
        "generator" => dec_generator(m, cx),
        "error" => dec_error(m),
        "ndarray" => dec_ndarray(m),
        "typedarray" => dec_typedarray(m),
        "memoryview" => {
            let data = take_bytes(&mut m, "memoryview", "_rvalue")?;
            Ok(Value::MemoryView(data))
        }
        "set" => {
            let items = take_list(&mut m, "set")?;
            let d2 = enter(d, cx.max_depth)?;
            Ok(Value::Set(items.into_iter().map(|v| dec(v, cx, d2)).collect::<Result<_, _>>()?))
        }
        "orderedmap" => dec_orderedmap(m, cx, d),
        _ => {
            // Unknown `_rtype` (stop_iteration, iostream, other peers' codecs): decode the
            // members and keep the tag, moved to the end as upstream does.
            let tag = m.shift_remove("_rtype").unwrap_or_default();
            let mut out = dec_members(m, cx, d)?;
            out.insert("_rtype".into(), tag);
            Ok(Value::Map(out))
        }
    }
}

fn invalid(rtype: &str, field: &'static str, expected: &'static str, got: &Value) -> CodecError {
    CodecError::InvalidField {
        rtype: rtype.to_owned(),
        field,
        expected,
        got: got.kind().to_owned(),
    }
}

fn missing(rtype: &str, field: &'static str) -> CodecError {
    CodecError::MissingField { rtype: rtype.to_owned(), field }
}

fn req_str(rtype: &str, field: &'static str, v: Option<Value>) -> Result<String, CodecError> {
    match v {
        Some(Value::Str(s)) => Ok(s),
        Some(other) => Err(invalid(rtype, field, "a string", &other)),
        None => Err(missing(rtype, field)),
    }
}

/// An optional string field: `nil` and absent are `None`, other types are an error.
fn opt_str(rtype: &str, field: &'static str, v: Option<Value>) -> Result<Option<String>, CodecError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Str(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(rtype, field, "a string or nil", &other)),
    }
}

fn take_bytes(m: &mut Map, rtype: &str, field: &'static str) -> Result<Bytes, CodecError> {
    match m.shift_remove(field) {
        Some(Value::Bytes(b)) => Ok(b),
        Some(other) => Err(invalid(rtype, field, "bytes", &other)),
        None => Err(missing(rtype, field)),
    }
}

fn take_list(m: &mut Map, rtype: &str) -> Result<Vec<Value>, CodecError> {
    match m.shift_remove("_rvalue") {
        Some(Value::List(l)) => Ok(l),
        Some(other) => Err(invalid(rtype, "_rvalue", "a list", &other)),
        None => Err(missing(rtype, "_rvalue")),
    }
}

/// `_rtype: "method"` (spec §4.1). `_rtarget`, `_rmethod`, `_rpromise`, `_rserver` and
/// `_renc_pub` decide where and how calls go, so a wrong type there is an error; the
/// descriptive fields (`_rname`, `_rdoc`, `_rasync`) of the wrong type read as absent.
/// `_rschema` is kept raw (upstream does not decode it either).
fn dec_method(m: Map, cx: &DecodeContext<'_>, _d: usize) -> Result<Value, CodecError> {
    const RT: &str = "method";
    let mut rm = RemoteMethod { remote_parent: cx.remote_parent.map(str::to_owned), ..Default::default() };
    let (mut target, mut method) = (None, None);
    for (k, v) in m {
        match k.as_str() {
            "_rtype" => {}
            "_rtarget" => target = Some(v),
            "_rmethod" => method = Some(v),
            "_rserver" => rm.server = opt_str(RT, "_rserver", Some(v))?,
            "_rpromise" => {
                rm.promise = match v {
                    Value::Nil | Value::Bool(false) => PromiseMode::None,
                    Value::Bool(true) => PromiseMode::Explicit,
                    Value::Str(s) if s == "*" => PromiseMode::Compact,
                    other => return Err(invalid(RT, "_rpromise", "\"*\", true or false", &other)),
                }
            }
            "_rname" => rm.name = if let Value::Str(s) = v { Some(s) } else { None },
            "_rdoc" => rm.doc = if let Value::Str(s) = v { Some(s) } else { None },
            "_rasync" => rm.is_async = v.as_bool(),
            "_rschema" => rm.schema = Some(Box::new(v)),
            "_renc_pub" => {
                rm.encryption_key = match v {
                    Value::Nil => None,
                    Value::Bytes(b) => Some(b),
                    other => return Err(invalid(RT, "_renc_pub", "bytes or nil", &other)),
                }
            }
            _ => {
                rm.extra.insert(k, v);
            }
        }
    }
    rm.target = resolve_target(req_str(RT, "_rtarget", target)?, cx.remote_workspace);
    rm.method = req_str(RT, "_rmethod", method)?;
    Ok(Value::Function(Box::new(Function::Remote(rm))))
}

/// `_rtype: "generator"` (spec §6). `_rclose_method` is required: every 0.21 encoder
/// (PY and JS) sends it, and a consumer needs it to stop the producer early.
fn dec_generator(m: Map, cx: &DecodeContext<'_>) -> Result<Value, CodecError> {
    const RT: &str = "generator";
    let mut rg = RemoteGenerator { remote_parent: cx.remote_parent.map(str::to_owned), ..Default::default() };
    let (mut target, mut method, mut close) = (None, None, None);
    for (k, v) in m {
        match k.as_str() {
            "_rtype" => {}
            "_rtarget" => target = Some(v),
            "_rmethod" => method = Some(v),
            "_rclose_method" => close = Some(v),
            "_rserver" => rg.server = opt_str(RT, "_rserver", Some(v))?,
            _ => {
                rg.extra.insert(k, v);
            }
        }
    }
    rg.target = resolve_target(req_str(RT, "_rtarget", target)?, cx.remote_workspace);
    rg.method = req_str(RT, "_rmethod", method)?;
    rg.close_method = req_str(RT, "_rclose_method", close)?;
    Ok(Value::Generator(Box::new(Generator::Remote(rg))))
}

/// `_rtype: "error"`: `_rvalue` must be a string (upstream concatenates it); `_rtrace`
/// may be a string, nil or absent.
fn dec_error(mut m: Map) -> Result<Value, CodecError> {
    const RT: &str = "error";
    let message = req_str(RT, "_rvalue", m.shift_remove("_rvalue"))?;
    let trace = opt_str(RT, "_rtrace", m.shift_remove("_rtrace"))?;
    Ok(Value::Error(Box::new(ErrorValue { message, trace })))
}

fn dec_ndarray(mut m: Map) -> Result<Value, CodecError> {
    const RT: &str = "ndarray";
    let data = match m.shift_remove("_rvalue") {
        Some(Value::Bytes(b)) => b,
        // Legacy chunked form: a list of bin pieces, concatenated. The size is the sum of
        // what is actually present, so a peer cannot make us over-allocate.
        Some(Value::List(pieces)) => {
            let mut total = 0usize;
            for p in &pieces {
                match p {
                    Value::Bytes(b) => total = total.saturating_add(b.len()),
                    other => return Err(invalid(RT, "_rvalue", "bytes or a list of bytes", other)),
                }
            }
            let mut buf = BytesMut::with_capacity(total);
            for p in &pieces {
                if let Value::Bytes(b) = p {
                    buf.extend_from_slice(b);
                }
            }
            buf.freeze()
        }
        Some(other) => return Err(invalid(RT, "_rvalue", "bytes or a list of bytes", &other)),
        None => return Err(missing(RT, "_rvalue")),
    };
    let shape = match m.shift_remove("_rshape") {
        Some(Value::List(dims)) => {
            let mut shape = Vec::with_capacity(dims.len());
            for dim in &dims {
                let n = match dim {
                    Value::Int(i) => usize::try_from(*i).ok(),
                    Value::UInt(u) => usize::try_from(*u).ok(),
                    _ => None,
                };
                shape.push(n.ok_or_else(|| invalid(RT, "_rshape", "a list of non-negative integers", dim))?);
            }
            shape
        }
        Some(other) => return Err(invalid(RT, "_rshape", "a list of non-negative integers", &other)),
        None => return Err(missing(RT, "_rshape")),
    };
    let dtype = DType::parse(&req_str(RT, "_rdtype", m.shift_remove("_rdtype"))?);
    let array = NdArray { dtype, shape, data };
    array.check_layout()?;
    Ok(Value::NdArray(Box::new(array)))
}

fn dec_typedarray(mut m: Map) -> Result<Value, CodecError> {
    const RT: &str = "typedarray";
    let data = take_bytes(&mut m, RT, "_rvalue")?;
    let dtype = DType::parse(&req_str(RT, "_rdtype", m.shift_remove("_rdtype"))?);
    check_typed(&dtype, data.len())?;
    Ok(Value::TypedArray(Box::new(TypedArray { dtype, data })))
}

fn dec_orderedmap(mut m: Map, cx: &DecodeContext<'_>, d: usize) -> Result<Value, CodecError> {
    const RT: &str = "orderedmap";
    let items = take_list(&mut m, RT)?;
    let d2 = enter(d, cx.max_depth)?;
    let mut pairs = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::List(pair) if pair.len() == 2 => {
                let mut it = pair.into_iter();
                let (Some(k), Some(v)) = (it.next(), it.next()) else {
                    return Err(missing(RT, "_rvalue"));
                };
                let d3 = enter(d2, cx.max_depth)?;
                pairs.push((dec(k, cx, d3)?, dec(v, cx, d3)?));
            }
            other => return Err(invalid(RT, "_rvalue", "a list of [key, value] pairs", &other)),
        }
    }
    Ok(Value::OrderedMap(pairs))
}

// ---------------------------------------------------------------------------------------
// Keyword arguments (spec §5.8)
// ---------------------------------------------------------------------------------------

/// Builds the `args` of a call and its `with_kwargs` flag.
///
/// * Explicit `kwargs` (the **PY** style): appended as a last map argument when non-empty
///   (upstream sends no map and `with_kwargs: false` for empty kwargs).
/// * The **JS** style: a last positional map with `_rkwargs: true` is the kwargs map.
///
/// `_rkwargs` is a client-side marker and never sent: it is removed from the last
/// positional map (whatever its value) and from `kwargs`. When both styles are used, the
/// explicit kwargs are merged into the marked map and win on conflicts.
pub fn encode_args(mut args: Vec<Value>, kwargs: Option<Map>) -> (Vec<Value>, bool) {
    let mut marked = false;
    if let Some(Value::Map(last)) = args.last_mut() {
        if let Some(flag) = last.shift_remove("_rkwargs") {
            marked = flag == Value::Bool(true);
        }
    }
    let kwargs = kwargs.map(|mut k| {
        k.shift_remove("_rkwargs");
        k
    });
    match kwargs {
        Some(k) if !k.is_empty() => {
            if marked {
                if let Some(Value::Map(last)) = args.last_mut() {
                    last.extend(k);
                }
            } else {
                args.push(Value::Map(k));
            }
            (args, true)
        }
        _ => (args, marked),
    }
}

/// Splits received arguments into positional arguments and kwargs: with `with_kwargs`,
/// the last argument must be a map and becomes the kwargs (as the PY callee pops it).
pub fn split_kwargs(mut args: Vec<Value>, with_kwargs: bool) -> Result<(Vec<Value>, Option<Map>), CodecError> {
    if !with_kwargs {
        return Ok((args, None));
    }
    match args.pop() {
        Some(Value::Map(m)) => Ok((args, Some(m))),
        Some(other) => Err(CodecError::KwargsNotAMap { got: other.kind() }),
        None => Err(CodecError::KwargsMissing),
    }
}
