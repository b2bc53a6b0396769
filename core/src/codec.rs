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
//!
//! `_rtype` values this codec does not interpret (`stop_iteration`, `iostream`,
//! `pydantic_model`, other peers' codecs) decode as maps with their members decoded and
//! the tag kept, so they can be inspected or forwarded unchanged.

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
    /// An `_rtype` this receiver does not know, with [`DecodeContext::strict_rtypes`] on.
    #[error("unknown _rtype {0:?}")]
    UnknownRtype(String),
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

/// [`encode`] of a call's positional arguments, which the caller owns: a list of wire
/// scalars (most calls' arguments) encodes to itself, so it is moved rather than copied.
pub fn encode_args_list(args: Vec<Value>, cx: &mut EncodeContext<'_>) -> Result<Value, CodecError> {
    if args.iter().all(Value::is_scalar) {
        enter(0, cx.max_depth)?;
        return Ok(Value::List(args));
    }
    encode(&Value::List(args), cx)
}

fn enter(depth: usize, limit: usize) -> Result<usize, CodecError> {
    if depth >= limit {
        return Err(CodecError::TooDeep { limit });
    }
    Ok(depth + 1)
}

fn enc(value: &Value, cx: &mut EncodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    // Only the containers are handled inline: every other arm lives in its own
    // non-inlined function so that this recursive frame stays small (debug builds give
    // each temporary of every arm its own stack slot).
    match value {
        Value::Nil
        | Value::Bool(_)
        | Value::Int(_)
        | Value::UInt(_)
        | Value::F32(_)
        | Value::F64(_)
        | Value::Str(_)
        | Value::Bytes(_) => Ok(value.clone()),
        Value::List(items) => enc_list(items, cx, depth),
        Value::Map(m) => Ok(Value::Map(enc_map(m, cx, depth)?)),
        other => enc_typed(other, cx, depth),
    }
}

fn enc_list(items: &[Value], cx: &mut EncodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    let d = enter(depth, cx.max_depth)?;
    let mut out = Vec::with_capacity(items.len());
    for v in items {
        out.push(enc(v, cx, d)?);
    }
    Ok(Value::List(out))
}

fn rtype_map(rtype: &str, value: Value) -> Value {
    let mut m = Map::with_capacity(2);
    m.insert("_rtype".into(), rtype.into());
    m.insert("_rvalue".into(), value);
    Value::Map(m)
}

#[inline(never)]
fn enc_typed(value: &Value, cx: &mut EncodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    Ok(match value {
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
        Value::MemoryView(b) => rtype_map("memoryview", Value::Bytes(b.clone())),
        Value::Set(items) => rtype_map("set", enc_list(items, cx, depth)?),
        Value::OrderedMap(pairs) => {
            let d = enter(depth, cx.max_depth)?;
            let mut out = Vec::with_capacity(pairs.len());
            for (k, v) in pairs {
                out.push(Value::List(vec![enc(k, cx, d)?, enc(v, cx, d)?]));
            }
            rtype_map("orderedmap", Value::List(out))
        }
        Value::Error(e) => {
            let mut m = Map::with_capacity(3);
            m.insert("_rtype".into(), "error".into());
            m.insert("_rvalue".into(), e.message.as_str().into());
            m.insert("_rtrace".into(), e.trace.as_deref().into());
            Value::Map(m)
        }
        Value::Function(f) => enc_function(f, cx, depth)?,
        Value::Generator(g) => enc_generator(g, cx, depth)?,
        Value::Custom(cv) => enc_custom(cv, cx, depth)?,
        // Wire variants are handled by `enc`.
        other => other.clone(),
    })
}

#[inline(never)]
fn enc_function(f: &Function, cx: &mut EncodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    match f {
        Function::Local(lf) => {
            let stored = cx.sink.store_function(cx.session, lf)?;
            let schema = lf.schema.as_deref();
            let name = lf.name.as_deref();
            let doc = lf.doc.as_deref();
            if stored.is_service_function {
                service_descriptor(cx, stored.method, name, false, doc, schema, depth)
            } else {
                session_descriptor(cx, stored.method, name, doc, schema, depth)
            }
        }
        Function::Remote(rm) => {
            if forwardable(rm.server.as_deref(), cx.server) {
                remote_method_to_wire(rm, cx, depth)
            } else {
                let path = cx.sink.store_forwarder(cx.session, rm)?;
                let schema = rm.schema.as_deref();
                session_descriptor(cx, path, Some(rm.display_name()), rm.doc.as_deref(), schema, depth)
            }
        }
    }
}

#[inline(never)]
fn enc_generator(g: &Generator, cx: &mut EncodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    match g {
        Generator::Local(lg) => {
            let (next, close) = cx.sink.store_generator(cx.session, lg)?;
            Ok(generator_descriptor(cx, next, close))
        }
        Generator::Remote(rg) => {
            if forwardable(rg.server.as_deref(), cx.server) {
                remote_generator_to_wire(rg, cx, depth)
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
                Ok(generator_descriptor(cx, next, close))
            }
        }
    }
}

/// The forwarding rule of spec §5.3: a received descriptor is re-sent as is when its
/// `_rserver` is absent or equals ours.
fn forwardable(theirs: Option<&str>, ours: Option<&str>) -> bool {
    theirs.is_none() || theirs == ours
}

fn check_typed(dtype: &DType, len: usize) -> Result<(), CodecError> {
    match dtype.item_size() {
        Some(size) if !len.is_multiple_of(size) => {
            Err(CodecError::TypedArrayLength { dtype: dtype.as_str().to_owned(), len })
        }
        _ => Ok(()),
    }
}

#[inline(never)]
fn enc_custom(cv: &CustomValue, cx: &mut EncodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    let codec = cx.codecs.for_value(cv).ok_or_else(|| CodecError::NoCodec { codec: cv.codec.clone() })?;
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
    // Only *local* callables make a map an interface to export. Upstream tests
    // `callable`, which a received proxy also is, so a `_rintf` map passed on to a third
    // peer would be wrapped in a new service of proxies; we forward it as it is, so the
    // third peer calls the owner directly (the same rule as for single functions, §5.3).
    let is_rintf = m.get("_rintf") == Some(&Value::Bool(true))
        && m.iter().any(|(k, v)| {
            !k.starts_with('_') && matches!(v, Value::Function(f) if matches!(**f, Function::Local(_)))
        });
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
/// as `services.<id>.<key>` members. Remote functions mixed into such a map are encoded
/// by the forwarding rule, since only local functions can be service members here.
#[inline(never)]
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
    let dispose =
        service_descriptor(cx, format!("services.{sid}._dispose"), Some("_dispose"), true, None, None, d)?;
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
    let mut m = forwarded_head("method", rm.server.as_deref(), &rm.target, &rm.method, 10 + rm.extra.len());
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
    forwarded_tail(m, &rm.extra, cx, d)
}

fn remote_generator_to_wire(
    rg: &RemoteGenerator,
    cx: &mut EncodeContext<'_>,
    depth: usize,
) -> Result<Value, CodecError> {
    let d = enter(depth, cx.max_depth)?;
    let mut m = forwarded_head("generator", rg.server.as_deref(), &rg.target, &rg.method, 5 + rg.extra.len());
    m.insert("_rclose_method".into(), rg.close_method.as_str().into());
    forwarded_tail(m, &rg.extra, cx, d)
}

/// The keys every forwarded descriptor starts with, in upstream's order.
fn forwarded_head(rtype: &str, server: Option<&str>, target: &str, method: &str, capacity: usize) -> Map {
    let mut m = Map::with_capacity(capacity);
    m.insert("_rtype".into(), rtype.into());
    put_server(&mut m, server);
    m.insert("_rtarget".into(), target.into());
    m.insert("_rmethod".into(), method.into());
    m
}

/// Appends the descriptor keys kept from decoding (unknown ones, explicit nulls) that the
/// typed fields did not already write, so a forwarded descriptor is the one that came.
fn forwarded_tail(
    mut m: Map,
    extra: &Map,
    cx: &mut EncodeContext<'_>,
    d: usize,
) -> Result<Value, CodecError> {
    for (k, v) in extra {
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
    /// Refuse `_rtype` values that are neither built in, nor a registered codec, nor one
    /// of the pass-through names upstream peers send ([`PASS_THROUGH_RTYPES`]).
    ///
    /// Off by default, because upstream passes unknown `_rtype` maps through as data
    /// (spec §5.2): that is how a peer's codec reaches a receiver that did not register
    /// it. Turn it on where a value must be fully understood, e.g. for a service that
    /// accepts only known types.
    pub strict_rtypes: bool,
}

/// `_rtype` values that are data for every receiver: the generator end marker and the
/// Python-only objects that Rust decodes as maps (spec §5.2).
pub const PASS_THROUGH_RTYPES: &[&str] = &["stop_iteration", "iostream", "pydantic_model"];

impl<'a> DecodeContext<'a> {
    /// A context with no workspace, no parent, the default depth limit and lenient
    /// `_rtype` handling.
    pub fn new(codecs: &'a CodecRegistry) -> Self {
        Self {
            remote_workspace: None,
            remote_parent: None,
            codecs,
            max_depth: DEFAULT_MAX_DEPTH,
            strict_rtypes: false,
        }
    }
}

/// Makes a descriptor's `_rtarget` absolute against the sender's workspace (spec §4.1):
/// a target without `/` becomes `"W/" + target`, unless it equals `W` itself (upstream
/// keeps it then). Targets with a `/` (including `*/manager`) are kept.
pub fn resolve_target(target: String, remote_workspace: Option<&str>) -> String {
    match remote_workspace {
        Some(w) if !target.contains('/') && target != w => [w, "/", &target].concat(),
        _ => target,
    }
}

/// Decodes a wire-form value, moving children out of `wire` (no `Bytes` copies).
pub fn decode(wire: Value, cx: &DecodeContext<'_>) -> Result<Value, CodecError> {
    dec(wire, cx, 0)
}

/// Decodes a wire value that must be a remote method descriptor (a promise callback, a
/// descriptor held in a known field) straight into a [`RemoteMethod`], so callers need no
/// match on the decoded variants. Anything else is [`CodecError::InvalidField`].
pub fn decode_remote_method(wire: Value, cx: &DecodeContext<'_>) -> Result<RemoteMethod, CodecError> {
    let got = match decode(wire, cx)? {
        Value::Function(f) => match *f {
            Function::Remote(rm) => return Ok(rm),
            Function::Local(_) => "a local function".to_owned(),
        },
        other => other.kind().to_owned(),
    };
    Err(CodecError::InvalidField {
        rtype: "method".into(),
        field: "_rtype",
        expected: "a method descriptor",
        got,
    })
}

fn dec(wire: Value, cx: &DecodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    match wire {
        Value::List(items) => dec_list(items, cx, depth),
        Value::Map(m) => dec_map(m, cx, depth),
        other => Ok(other),
    }
}

fn dec_list(mut items: Vec<Value>, cx: &DecodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    let d = enter(depth, cx.max_depth)?;
    // In place: the wire list is ours, so it becomes the decoded one (no second Vec).
    for v in &mut items {
        *v = dec(std::mem::take(v), cx, d)?;
    }
    Ok(Value::List(items))
}

fn dec_members(m: Map, cx: &DecodeContext<'_>, d: usize) -> Result<Map, CodecError> {
    let mut out = Map::with_capacity(m.len());
    for (k, v) in m {
        out.insert(k, dec(v, cx, d)?);
    }
    Ok(out)
}

fn dec_map(m: Map, cx: &DecodeContext<'_>, depth: usize) -> Result<Value, CodecError> {
    let d = enter(depth, cx.max_depth)?;
    if m.contains_key("_rtype") {
        dec_typed(m, cx, d)
    } else {
        Ok(Value::Map(dec_members(m, cx, d)?))
    }
}

/// A map with an `_rtype` key; kept out of `dec_map` to keep the recursive frame small.
#[inline(never)]
fn dec_typed(mut m: Map, cx: &DecodeContext<'_>, d: usize) -> Result<Value, CodecError> {
    let rtype = match m.get("_rtype") {
        Some(Value::Str(s)) => s.clone(),
        // A non-string `_rtype` names nothing we know: pass through like unknown ones.
        _ => String::new(),
    };
    if let Some(decoder) = cx.codecs.decoder(&rtype) {
        let tag = m.shift_remove("_rtype").unwrap_or_default();
        let mut out = dec_members(m, cx, d)?;
        out.insert("_rtype".into(), tag);
        return Ok(Value::Custom(decoder(out)?));
    }
    match rtype.as_str() {
        "method" => dec_method(m, cx),
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
            let Value::List(items) = dec(Value::List(items), cx, d)? else {
                return Err(missing("set", "_rvalue"));
            };
            Ok(Value::Set(items))
        }
        "orderedmap" => dec_orderedmap(m, cx, d),
        other if cx.strict_rtypes && !PASS_THROUGH_RTYPES.contains(&other) => {
            Err(CodecError::UnknownRtype(match m.shift_remove("_rtype") {
                Some(Value::Str(s)) => s,
                Some(v) => format!("<{}>", v.kind()),
                None => String::new(),
            }))
        }
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
    CodecError::InvalidField { rtype: rtype.to_owned(), field, expected, got: got.kind().to_owned() }
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
fn dec_method(m: Map, cx: &DecodeContext<'_>) -> Result<Value, CodecError> {
    const RT: &str = "method";
    let mut rm = RemoteMethod { remote_parent: cx.remote_parent.map(str::to_owned), ..Default::default() };
    let (mut target, mut method) = (None, None);
    for (k, v) in m {
        match k.as_str() {
            "_rtype" => {}
            "_rtarget" => target = Some(v),
            "_rmethod" => method = Some(v),
            "_rserver" => rm.server = opt_str(RT, "_rserver", Some(v))?,
            "_rpromise" => match v {
                Value::Bool(true) => rm.promise = PromiseMode::Explicit,
                Value::Str(s) if s == "*" => rm.promise = PromiseMode::Compact,
                // An explicit `false`/`null` means the same as absent; keep the raw value so
                // that forwarding re-emits the descriptor as it came.
                v @ (Value::Nil | Value::Bool(false)) => {
                    rm.extra.insert(k, v);
                }
                other => return Err(invalid(RT, "_rpromise", "\"*\", true or false", &other)),
            },
            "_rname" | "_rdoc" | "_rasync" => match (k.as_str(), v) {
                ("_rname", Value::Str(s)) => rm.name = Some(s),
                ("_rdoc", Value::Str(s)) => rm.doc = Some(s),
                ("_rasync", Value::Bool(b)) => rm.is_async = Some(b),
                // `null` (PY sends `_rdoc: null`) or a stray type: not a typed field, but
                // kept for forwarding.
                (_, v) => {
                    rm.extra.insert(k, v);
                }
            },
            "_rschema" => rm.schema = Some(Arc::new(v)),
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
pub fn split_kwargs(
    mut args: Vec<Value>,
    with_kwargs: bool,
) -> Result<(Vec<Value>, Option<Map>), CodecError> {
    if !with_kwargs {
        return Ok((args, None));
    }
    match args.pop() {
        Some(Value::Map(m)) => Ok((args, Some(m))),
        Some(other) => Err(CodecError::KwargsNotAMap { got: other.kind() }),
        None => Err(CodecError::KwargsMissing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map;
    use proptest::prelude::*;

    const SERVER: &str = "http://127.0.0.1:9537";
    const WS: &str = "ws-user-anonymouz-acoustic-conifer-30981683";
    const PROV: &str = "ws-user-anonymouz-acoustic-conifer-30981683/UEqymfyHD22aE3CvZ3HsSy";

    /// Records what the codec stores; ids are deterministic.
    #[derive(Default)]
    struct TestSink {
        services: HashMap<Handler, String>,
        object_id: Option<String>,
        functions: Vec<(Option<String>, LocalFunction)>,
        generators: Vec<Option<String>>,
        interfaces: Vec<Vec<(String, LocalFunction)>>,
        forwarders: Vec<RemoteMethod>,
        n: usize,
    }

    impl ObjectSink for TestSink {
        fn store_function(
            &mut self,
            session: Option<&str>,
            function: &LocalFunction,
        ) -> Result<StoredFunction, CodecError> {
            if let Some(p) = self.services.get(&function.handler) {
                return Ok(StoredFunction { method: p.clone(), is_service_function: true });
            }
            let s = session.ok_or(CodecError::SessionRequired { what: "function" })?;
            self.n += 1;
            self.functions.push((session.map(str::to_owned), function.clone()));
            let oid = self.object_id.clone().unwrap_or_else(|| format!("obj{}", self.n));
            let method = match &function.name {
                Some(n) => format!("{s}.{oid}#{n}"),
                None => format!("{s}.{oid}"),
            };
            Ok(StoredFunction { method, is_service_function: false })
        }

        fn store_generator(
            &mut self,
            session: Option<&str>,
            _generator: &LocalGenerator,
        ) -> Result<(String, String), CodecError> {
            let s = session.ok_or(CodecError::SessionRequired { what: "generator" })?;
            self.n += 1;
            self.generators.push(session.map(str::to_owned));
            let oid = self.object_id.clone().unwrap_or_else(|| format!("gen{}", self.n));
            Ok((format!("{s}.{oid}"), format!("{s}.{oid}:close")))
        }

        fn register_interface(
            &mut self,
            _session: Option<&str>,
            members: Vec<(String, LocalFunction)>,
        ) -> Result<String, CodecError> {
            self.n += 1;
            self.interfaces.push(members);
            Ok(format!("_rintf_test{}", self.n))
        }

        fn store_forwarder(
            &mut self,
            session: Option<&str>,
            method: &RemoteMethod,
        ) -> Result<String, CodecError> {
            let s = session.ok_or(CodecError::SessionRequired { what: "function" })?;
            self.n += 1;
            self.forwarders.push(method.clone());
            Ok(format!("{s}.fwd{}", self.n))
        }
    }

    fn local(name: Option<&str>) -> LocalFunction {
        LocalFunction { name: name.map(str::to_owned), ..LocalFunction::new(Handler::new(0u8)) }
    }

    fn fval(f: LocalFunction) -> Value {
        Value::from(Function::Local(f))
    }

    fn enc_with(value: &Value, sink: &mut TestSink, session: Option<&str>) -> Result<Value, CodecError> {
        let reg = CodecRegistry::new();
        let mut cx = EncodeContext::new(PROV, &reg, sink);
        cx.server = Some(SERVER);
        cx.session = session;
        encode(value, &mut cx)
    }

    /// Moving a list of scalars is encoding it: same value, same errors (depth 0).
    #[test]
    fn encode_args_list_is_encode() {
        let lists = [
            vec![],
            vec![Value::from("hello"), Value::Int(1), Value::Nil, Value::Bytes(Bytes::from_static(b"x"))],
            vec![Value::F64(0.5), Value::List(vec![Value::Int(1)])],
            vec![Value::from(map! { "a" => 1 }), Value::Bool(true)],
            vec![fval(local(Some("f")))],
        ];
        for max_depth in [0, 1, 8] {
            for args in &lists {
                let reg = CodecRegistry::new();
                let (mut a, mut b) = (TestSink::default(), TestSink::default());
                let mut cx = EncodeContext::new(PROV, &reg, &mut a);
                cx.session = Some("S");
                cx.max_depth = max_depth;
                let moved = encode_args_list(args.clone(), &mut cx);
                let mut cx = EncodeContext::new(PROV, &reg, &mut b);
                cx.session = Some("S");
                cx.max_depth = max_depth;
                let copied = encode(&Value::List(args.clone()), &mut cx);
                assert_eq!(format!("{moved:?}"), format!("{copied:?}"), "{args:?} at depth {max_depth}");
            }
        }
    }

    fn enc1(value: &Value) -> Value {
        enc_with(value, &mut TestSink::default(), Some("S")).unwrap()
    }

    fn dec_ws(wire: Value) -> Result<Value, CodecError> {
        let reg = CodecRegistry::new();
        let mut cx = DecodeContext::new(&reg);
        cx.remote_workspace = Some(WS);
        cx.remote_parent = Some("P");
        decode(wire, &cx)
    }

    fn hex(s: &str) -> Bytes {
        Bytes::from(
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn decode_remote_method_accepts_only_method_descriptors() {
        let reg = CodecRegistry::new();
        let cx = DecodeContext {
            remote_workspace: Some("ws"),
            remote_parent: Some("P"),
            ..DecodeContext::new(&reg)
        };
        let d = map! { "_rtype" => "method", "_rtarget" => "cons", "_rmethod" => "S.resolve" };
        let rm = decode_remote_method(Value::from(d), &cx).unwrap();
        assert_eq!((rm.target.as_str(), rm.method.as_str()), ("ws/cons", "S.resolve"));
        assert_eq!(rm.remote_parent.as_deref(), Some("P"));
        let err = decode_remote_method(Value::from("S.resolve"), &cx).unwrap_err();
        assert!(err.to_string().contains("must be a method descriptor, got str"), "{err}");
    }

    /// Session callback from extras.txt (consumer passes `cb` to `call_back`).
    #[test]
    fn session_function_descriptor_matches_trace() {
        let mut sink = TestSink { object_id: Some("A4ivKbs3H8kd8qPdkihCGL".into()), ..Default::default() };
        let reg = CodecRegistry::new();
        let mut cx = EncodeContext::new("2XJUAdBPQxgtT5Eb5yharZ", &reg, &mut sink);
        cx.server = Some(SERVER);
        cx.session = Some("VWYMmHC96a2cxQTMJbNicb");
        let got = encode(&fval(local(Some("cb"))), &mut cx).unwrap();
        let want = Value::from(map! {
            "_rtype" => "method",
            "_rserver" => SERVER,
            "_rtarget" => "2XJUAdBPQxgtT5Eb5yharZ",
            "_rmethod" => "VWYMmHC96a2cxQTMJbNicb.A4ivKbs3H8kd8qPdkihCGL#cb",
            "_rname" => "cb",
            "_rpromise" => "*",
            "_rdoc" => Value::Nil,
        });
        assert_eq!(got, want);
        assert_eq!(sink.functions.len(), 1);
        assert_eq!(sink.functions[0].0.as_deref(), Some("VWYMmHC96a2cxQTMJbNicb"));
    }

    /// Annotated service function from extras.txt (`services.extras.echo`).
    #[test]
    fn service_function_descriptor_matches_trace() {
        let f = local(Some("echo"));
        let mut sink = TestSink::default();
        sink.services.insert(f.handler.clone(), "services.extras.echo".into());
        let got = enc_with(&fval(f), &mut sink, None).unwrap();
        let want = Value::from(map! {
            "_rtype" => "method",
            "_rserver" => SERVER,
            "_rtarget" => PROV,
            "_rmethod" => "services.extras.echo",
            "_rpromise" => "*",
            "_rname" => "echo",
            "_rasync" => false,
            "_rdoc" => Value::Nil,
        });
        assert_eq!(got, want);
        assert!(sink.functions.is_empty());
    }

    #[test]
    fn descriptor_extras_key_order() {
        let schema = Value::from(map! { "name" => "f" });
        let f = LocalFunction {
            doc: Some("Doc.".into()),
            schema: Some(Arc::new(schema.clone())),
            ..local(Some("f"))
        };
        let mut sink = TestSink::default();
        let reg = CodecRegistry::new();
        let mut cx = EncodeContext::new("cid", &reg, &mut sink);
        cx.session = Some("S");
        cx.encryption_key = Some(Bytes::from_static(&[7; 32]));
        let got = encode(&fval(f.clone()), &mut cx).unwrap();
        let keys: Vec<&str> = got.as_map().unwrap().keys().map(String::as_str).collect();
        // No `_rserver` when unknown; key after `_rpromise` is the encryption key.
        assert_eq!(
            keys,
            ["_rtype", "_rtarget", "_rmethod", "_rname", "_rpromise", "_renc_pub", "_rdoc", "_rschema"]
        );
        assert_eq!(got.as_map().unwrap()["_rschema"], schema);
        assert_eq!(got.as_map().unwrap()["_rdoc"], Value::from("Doc."));
        // Service functions never carry the key.
        sink.services.insert(f.handler.clone(), "services.s.f".into());
        let mut cx = EncodeContext::new("cid", &reg, &mut sink);
        cx.encryption_key = Some(Bytes::from_static(&[7; 32]));
        let got = encode(&fval(f), &mut cx).unwrap();
        let keys: Vec<&str> = got.as_map().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["_rtype", "_rtarget", "_rmethod", "_rpromise", "_rname", "_rasync", "_rdoc", "_rschema"]
        );
    }

    #[test]
    fn functions_and_generators_need_a_session() {
        let mut sink = TestSink::default();
        let e = enc_with(&fval(local(None)), &mut sink, None).unwrap_err();
        assert!(matches!(e, CodecError::SessionRequired { what: "function" }), "{e}");
        let g = Value::from(Generator::Local(LocalGenerator { handler: Handler::new(1u8) }));
        let e = enc_with(&g, &mut sink, None).unwrap_err();
        assert!(matches!(e, CodecError::SessionRequired { what: "generator" }), "{e}");
    }

    /// Generator descriptor from extras.txt.
    #[test]
    fn generator_descriptor_matches_trace_and_round_trips() {
        let mut sink = TestSink { object_id: Some("XcK5PJyYXUyQ7ujzu4eD47".into()), ..Default::default() };
        let g = Value::from(Generator::Local(LocalGenerator { handler: Handler::new(1u8) }));
        let got = enc_with(&g, &mut sink, Some("BEgBmSxPJ3ed264F3d9GRG")).unwrap();
        let want = Value::from(map! {
            "_rtype" => "generator",
            "_rserver" => SERVER,
            "_rtarget" => PROV,
            "_rmethod" => "BEgBmSxPJ3ed264F3d9GRG.XcK5PJyYXUyQ7ujzu4eD47",
            "_rclose_method" => "BEgBmSxPJ3ed264F3d9GRG.XcK5PJyYXUyQ7ujzu4eD47:close",
            "_rpromise" => "*",
            "_rdoc" => "Remote generator",
        });
        assert_eq!(got, want);
        let Value::Generator(dg) = dec_ws(got.clone()).unwrap() else { panic!("not a generator") };
        let Generator::Remote(rg) = *dg else { panic!("not remote") };
        assert_eq!(rg.target, PROV);
        assert_eq!(rg.close_method, "BEgBmSxPJ3ed264F3d9GRG.XcK5PJyYXUyQ7ujzu4eD47:close");
        assert_eq!(rg.remote_parent.as_deref(), Some("P"));
        assert_eq!(rg.server.as_deref(), Some(SERVER));
        // Forwarded as is (same server).
        let back = enc1(&Value::from(Generator::Remote(rg)));
        assert_eq!(back, want);
    }

    #[test]
    fn remote_generator_from_other_server_is_relayed() {
        let rg = RemoteGenerator {
            server: Some("http://other".into()),
            target: "w/p".into(),
            method: "R.g".into(),
            close_method: "R.g:close".into(),
            ..Default::default()
        };
        let mut sink = TestSink::default();
        let got = enc_with(&Value::from(Generator::Remote(rg)), &mut sink, Some("S")).unwrap();
        let m = got.as_map().unwrap();
        assert_eq!(m["_rtype"], Value::from("generator"));
        assert_eq!(m["_rmethod"], Value::from("S.fwd1"));
        assert_eq!(m["_rclose_method"], Value::from("S.fwd2"));
        assert_eq!(m["_rtarget"], Value::from(PROV));
        let relayed: Vec<&str> = sink.forwarders.iter().map(|f| f.method.as_str()).collect();
        assert_eq!(relayed, ["R.g", "R.g:close"]);
    }

    /// The manager's service descriptor from extras.txt: decode, then forward.
    #[test]
    fn decode_and_forward_service_descriptor() {
        let schema = Value::from(map! { "name" => "echo", "description" => "Log a app message." });
        let wire = Value::from(map! {
            "_rtype" => "method",
            "_rserver" => SERVER,
            "_rtarget" => "*/manager-ambitious-parallel-49071335",
            "_rmethod" => "services.default.echo",
            "_rpromise" => "*",
            "_rname" => "echo",
            "_rasync" => true,
            "_rdoc" => "Log a app message.",
            "_rschema" => schema.clone(),
        });
        let decoded = dec_ws(wire.clone()).unwrap();
        let Value::Function(f) = &decoded else { panic!("not a function") };
        let Function::Remote(rm) = &**f else { panic!("not remote") };
        assert_eq!(rm.target, "*/manager-ambitious-parallel-49071335");
        assert_eq!(rm.promise, PromiseMode::Compact);
        assert_eq!(rm.is_async, Some(true));
        assert_eq!(rm.schema.as_deref(), Some(&schema));
        assert_eq!(rm.remote_parent.as_deref(), Some("P"));
        assert!(rm.extra.is_empty());
        let mut sink = TestSink::default();
        assert_eq!(enc_with(&decoded, &mut sink, Some("S")).unwrap(), wire);
        assert!(sink.forwarders.is_empty());
    }

    #[test]
    fn forwarding_rule_both_ways() {
        let base = RemoteMethod {
            target: "w/peer".into(),
            method: "X.cb#cb".into(),
            promise: PromiseMode::Compact,
            doc: Some("d".into()),
            extra: map! { "_rfuture" => 1 },
            ..Default::default()
        };
        // No `_rserver`: forwarded, unknown keys kept.
        let mut sink = TestSink::default();
        let got = enc_with(&Value::from(Function::Remote(base.clone())), &mut sink, Some("S")).unwrap();
        let want = Value::from(map! {
            "_rtype" => "method", "_rtarget" => "w/peer", "_rmethod" => "X.cb#cb",
            "_rpromise" => "*", "_rdoc" => "d", "_rfuture" => 1,
        });
        assert_eq!(got, want);
        // Same server: forwarded.
        let same = RemoteMethod { server: Some(SERVER.into()), ..base.clone() };
        let got = enc_with(&Value::from(Function::Remote(same)), &mut sink, Some("S")).unwrap();
        assert_eq!(got.as_map().unwrap()["_rmethod"], Value::from("X.cb#cb"));
        assert!(sink.forwarders.is_empty());
        // Other server: wrapped as a session function of ours.
        let other = RemoteMethod { server: Some("http://elsewhere".into()), ..base };
        let got = enc_with(&Value::from(Function::Remote(other.clone())), &mut sink, Some("S")).unwrap();
        let want = Value::from(map! {
            "_rtype" => "method", "_rserver" => SERVER, "_rtarget" => PROV, "_rmethod" => "S.fwd1",
            "_rname" => "cb", "_rpromise" => "*", "_rdoc" => "d",
        });
        assert_eq!(got, want);
        assert_eq!(sink.forwarders, vec![other]);
    }

    #[test]
    fn rtarget_resolution() {
        let reg = CodecRegistry::new();
        let cases = [
            (Some("W"), "cid", "W/cid"),
            (Some("W"), "W", "W"),
            (Some("W"), "*/manager-x", "*/manager-x"),
            (Some("W"), "other/cid", "other/cid"),
            (None, "cid", "cid"),
        ];
        for (ws, target, want) in cases {
            assert_eq!(resolve_target(target.into(), ws), want);
            let wire = Value::from(map! { "_rtype" => "method", "_rtarget" => target, "_rmethod" => "a.b" });
            let cx = DecodeContext { remote_workspace: ws, ..DecodeContext::new(&reg) };
            let Value::Function(f) = decode(wire, &cx).unwrap() else { panic!() };
            let Function::Remote(rm) = *f else { panic!() };
            assert_eq!(rm.target, want);
            assert_eq!(rm.promise, PromiseMode::None);
            assert_eq!(rm.remote_parent, None);
        }
    }

    /// The compact-promise expansion the callee builds (spec §4.3) decodes with its key.
    #[test]
    fn expanded_promise_descriptor_decodes() {
        let wire = Value::from(map! {
            "_rtype" => "method", "_rtarget" => "cons", "_rmethod" => "S.resolve",
            "_rdoc" => "resolve callback for method: m", "_renc_pub" => Bytes::from_static(&[1; 32]),
        });
        let Value::Function(f) = dec_ws(wire).unwrap() else { panic!() };
        let Function::Remote(rm) = *f else { panic!() };
        assert_eq!(rm.target, format!("{WS}/cons"));
        assert_eq!(rm.promise, PromiseMode::None);
        assert_eq!(rm.encryption_key.as_deref(), Some(&[1u8; 32][..]));
        assert_eq!(rm.display_name(), "resolve");
        let explicit = Value::from(
            map! { "_rtype" => "method", "_rtarget" => "c", "_rmethod" => "a", "_rpromise" => true },
        );
        let Value::Function(f) = dec_ws(explicit).unwrap() else { panic!() };
        assert!(matches!(*f, Function::Remote(RemoteMethod { promise: PromiseMode::Explicit, .. })));
    }

    #[test]
    fn rintf_encode_shape() {
        let get_item = local(Some("getItem"));
        let private = local(Some("hidden"));
        let value = Value::from(map! {
            "_rintf" => true,
            "getItem" => fval(get_item.clone()),
            "label" => "x",
            "_private" => fval(private),
        });
        let mut sink = TestSink::default();
        let reg = CodecRegistry::new();
        let mut cx = EncodeContext::new("cons2", &reg, &mut sink);
        cx.session = Some("S");
        let got = encode(&value, &mut cx).unwrap();
        assert_eq!(cx.created_interfaces, vec!["_rintf_test1".to_owned()]);
        let m = got.as_map().unwrap();
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(keys, ["_rintf", "getItem", "label", "_private", "_dispose", "_rintf_service_id"]);
        assert_eq!(m["_rintf"], Value::Bool(true));
        assert_eq!(
            m["getItem"],
            Value::from(map! {
                "_rtype" => "method", "_rtarget" => "cons2",
                "_rmethod" => "services._rintf_test1.getItem", "_rpromise" => "*",
                "_rname" => "getItem", "_rasync" => false, "_rdoc" => Value::Nil,
            })
        );
        assert_eq!(
            m["_dispose"].as_map().unwrap()["_rmethod"],
            Value::from("services._rintf_test1._dispose")
        );
        assert_eq!(m["_dispose"].as_map().unwrap()["_rasync"], Value::Bool(true));
        assert_eq!(m["_rintf_service_id"], Value::from("_rintf_test1"));
        // `_`-keys are not members: encoded as session callbacks.
        assert_eq!(m["_private"].as_map().unwrap()["_rmethod"], Value::from("S.obj2#hidden"));
        assert_eq!(sink.interfaces.len(), 1);
        assert_eq!(sink.interfaces[0], vec![("getItem".to_owned(), get_item)]);
        // Without a callable member, `_rintf` is plain data.
        let plain = Value::from(map! { "_rintf" => true, "_f" => fval(local(None)) });
        let mut sink = TestSink::default();
        let got = enc_with(&plain, &mut sink, Some("S")).unwrap();
        assert!(sink.interfaces.is_empty());
        assert!(!got.as_map().unwrap().contains_key("_rintf_service_id"));
    }

    #[test]
    fn unknown_rtype_passes_through_unless_strict() {
        let reg = CodecRegistry::new();
        let wire = Value::from(map! { "_rtype" => "mystery", "x" => 1 });
        let lenient = DecodeContext::new(&reg);
        assert_eq!(
            decode(wire.clone(), &lenient).unwrap().as_map().unwrap()["_rtype"],
            Value::from("mystery")
        );
        let strict = DecodeContext { strict_rtypes: true, ..lenient };
        assert!(matches!(decode(wire, &strict), Err(CodecError::UnknownRtype(t)) if t == "mystery"));
        // Nested, and with a non-string tag.
        let nested = Value::from(vec![Value::from(map! { "_rtype" => 5 })]);
        assert!(matches!(decode(nested, &strict), Err(CodecError::UnknownRtype(t)) if t == "<int>"));
        // The generator end marker is data even in strict mode.
        assert!(decode(Value::stop_iteration(), &strict).unwrap().is_stop_iteration());
    }

    #[test]
    fn received_rintf_map_is_forwarded_not_re_registered() {
        // A `_rintf` map we received holds remote proxies only; passing it on must not
        // wrap them in a new local service (the third peer calls the owner directly).
        let remote = |m: &str| {
            Value::from(Function::Remote(RemoteMethod {
                target: PROV.into(),
                method: m.into(),
                promise: PromiseMode::Compact,
                ..Default::default()
            }))
        };
        let value = Value::from(map! {
            "_rintf" => true,
            "getItem" => remote("services._rintf_X.getItem"),
            "_dispose" => remote("services._rintf_X._dispose"),
            "_rintf_service_id" => "_rintf_X",
        });
        let mut sink = TestSink::default();
        let got = enc_with(&value, &mut sink, Some("S")).unwrap();
        assert!(sink.interfaces.is_empty() && sink.forwarders.is_empty());
        let m = got.as_map().unwrap();
        assert_eq!(m["_rintf_service_id"], Value::from("_rintf_X"));
        assert_eq!(m["getItem"].as_map().unwrap()["_rmethod"], Value::from("services._rintf_X.getItem"));
        assert_eq!(m["getItem"].as_map().unwrap()["_rtarget"], Value::from(PROV));
    }

    #[test]
    fn rintf_same_function_under_two_keys_uses_last_key() {
        let f = local(Some("f"));
        let value = Value::from(map! { "_rintf" => true, "a" => fval(f.clone()), "b" => fval(f) });
        let got = enc1(&value);
        let m = got.as_map().unwrap();
        assert_eq!(m["a"].as_map().unwrap()["_rmethod"], Value::from("services._rintf_test1.b"));
        assert_eq!(m["b"].as_map().unwrap()["_rmethod"], Value::from("services._rintf_test1.b"));
    }

    #[test]
    fn app_maps_with_rtype_keep_it_last() {
        let value = Value::from(map! { "_rtype" => "thing", "a" => 1, "f" => fval(local(None)) });
        let got = enc1(&value);
        let keys: Vec<&str> = got.as_map().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "f", "_rtype"]);
        assert_eq!(got.as_map().unwrap()["f"].as_map().unwrap()["_rmethod"], Value::from("S.obj1"));
        // Decoding an unknown `_rtype` decodes members and keeps the tag last.
        let back = dec_ws(got).unwrap();
        let m = back.as_map().unwrap();
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "f", "_rtype"]);
        assert!(matches!(&m["f"], Value::Function(f) if matches!(**f, Function::Remote(_))));
    }

    #[test]
    fn stop_iteration_passes_through() {
        let got = dec_ws(Value::stop_iteration()).unwrap();
        assert!(got.is_stop_iteration());
        assert_eq!(got, Value::stop_iteration());
        assert_eq!(enc1(&got), Value::stop_iteration());
        let odd = Value::from(map! { "_rtype" => 5, "x" => 1 });
        assert_eq!(dec_ws(odd).unwrap(), Value::from(map! { "x" => 1, "_rtype" => 5 }));
    }

    fn round_trip(v: Value) -> Value {
        let wire = enc1(&v);
        assert!(is_wire_tree(&wire), "{wire:?}");
        let back = dec_ws(wire).unwrap();
        assert_eq!(back, v);
        back
    }

    fn is_wire_tree(v: &Value) -> bool {
        match v {
            Value::List(l) => l.iter().all(is_wire_tree),
            Value::Map(m) => m.values().all(is_wire_tree),
            other => other.is_wire(),
        }
    }

    #[test]
    fn round_trip_every_builtin_rtype() {
        round_trip(Value::from(NdArray {
            dtype: DType::Float32,
            shape: vec![2, 3],
            data: hex("000000000000803f0000004000004040000080400000a040"),
        }));
        round_trip(Value::from(NdArray {
            dtype: DType::Int64,
            shape: vec![],
            data: Bytes::from(vec![0; 8]),
        }));
        round_trip(Value::TypedArray(Box::new(TypedArray {
            dtype: DType::Int16,
            data: Bytes::from(vec![1, 0, 2, 0]),
        })));
        round_trip(Value::MemoryView(Bytes::from_static(b"abc")));
        round_trip(Value::Set(vec![Value::from(1), Value::from("a")]));
        round_trip(Value::OrderedMap(vec![
            (Value::from(1), Value::from("one")),
            (Value::from("k"), Value::Nil),
        ]));
        round_trip(Value::from(ErrorValue { message: "boom".into(), trace: Some("Traceback".into()) }));
        round_trip(Value::from(ErrorValue::new("no trace")));
        round_trip(Value::from(Function::Remote(RemoteMethod {
            server: Some(SERVER.into()),
            target: PROV.into(),
            method: "services.extras.add".into(),
            promise: PromiseMode::Compact,
            name: Some("add".into()),
            is_async: Some(false),
            remote_parent: Some("P".into()),
            ..Default::default()
        })));
        // Nested typed values inside containers.
        round_trip(Value::from(map! {
            "l" => vec![Value::Set(vec![]), Value::MemoryView(Bytes::new())],
            "e" => ErrorValue::new("x"),
        }));
    }

    #[test]
    fn wire_shapes_of_data_rtypes() {
        let a = NdArray {
            dtype: DType::Float32,
            shape: vec![2, 3],
            data: hex("000000000000803f0000004000004040000080400000a040"),
        };
        assert_eq!(
            enc1(&Value::from(a)),
            Value::from(map! {
                "_rtype" => "ndarray",
                "_rvalue" => hex("000000000000803f0000004000004040000080400000a040"),
                "_rshape" => vec![Value::from(2), Value::from(3)],
                "_rdtype" => "float32",
            })
        );
        assert_eq!(
            enc1(&Value::from(ErrorValue::new("boom"))),
            Value::from(map! { "_rtype" => "error", "_rvalue" => "boom", "_rtrace" => Value::Nil })
        );
        assert_eq!(
            enc1(&Value::OrderedMap(vec![(Value::from("a"), Value::from(1))])),
            Value::from(
                map! { "_rtype" => "orderedmap", "_rvalue" => vec![Value::from(vec![Value::from("a"), Value::from(1)])] }
            )
        );
        assert_eq!(
            enc1(&Value::TypedArray(Box::new(TypedArray {
                dtype: DType::Float32,
                data: Bytes::from(vec![0; 4])
            }))),
            Value::from(
                map! { "_rtype" => "typedarray", "_rvalue" => Bytes::from(vec![0; 4]), "_rdtype" => "float32" }
            )
        );
        // Functions inside a set are stored too.
        let got = enc1(&Value::Set(vec![fval(local(None))]));
        assert_eq!(
            got.as_map().unwrap()["_rvalue"].as_list().unwrap()[0].as_map().unwrap()["_rmethod"],
            Value::from("S.obj1")
        );
    }

    #[test]
    fn ndarray_legacy_pieces_and_unknown_dtype() {
        let wire = Value::from(map! {
            "_rtype" => "ndarray",
            "_rvalue" => vec![Value::from(hex("0000803f")), Value::from(hex("00000040"))],
            "_rshape" => vec![Value::from(2)],
            "_rdtype" => "float32",
        });
        let Value::NdArray(a) = dec_ws(wire).unwrap() else { panic!() };
        assert_eq!(a.data, hex("0000803f00000040"));
        let wire = Value::from(map! {
            "_rtype" => "ndarray", "_rvalue" => Bytes::from_static(b"hello"), "_rshape" => vec![Value::from(1)], "_rdtype" => "<U5",
        });
        let Value::NdArray(a) = dec_ws(wire.clone()).unwrap() else { panic!() };
        assert_eq!(a.dtype, DType::Other("<U5".into()));
        assert_eq!(enc1(&Value::NdArray(a)), wire);
    }

    #[test]
    fn bytes_are_not_copied_on_decode() {
        let data = Bytes::from(vec![9u8; 16]);
        let wire = Value::from(map! {
            "_rtype" => "ndarray", "_rvalue" => data.clone(), "_rshape" => vec![Value::from(4)], "_rdtype" => "int32",
        });
        let Value::NdArray(a) = dec_ws(wire).unwrap() else { panic!() };
        assert_eq!(a.data.as_ptr(), data.as_ptr());
    }

    fn err_of(wire: Value) -> CodecError {
        dec_ws(wire).unwrap_err()
    }

    fn assert_invalid(e: CodecError, rt: &str, f: &str) {
        match &e {
            CodecError::InvalidField { rtype, field, .. } => {
                assert_eq!((rtype.as_str(), *field), (rt, f), "{e}")
            }
            other => panic!("expected InvalidField({rt}.{f}), got {other:?}"),
        }
        assert!(e.to_string().contains(rt));
    }

    fn assert_missing(e: CodecError, rt: &str, f: &str) {
        match &e {
            CodecError::MissingField { rtype, field } => assert_eq!((rtype.as_str(), *field), (rt, f), "{e}"),
            other => panic!("expected MissingField({rt}.{f}), got {other:?}"),
        }
        assert!(e.to_string().contains(rt));
    }

    #[test]
    fn malformed_objects_are_typed_errors() {
        let m = |pairs: Map| Value::from(pairs);
        assert_missing(err_of(m(map! { "_rtype" => "method", "_rmethod" => "a" })), "method", "_rtarget");
        assert_missing(err_of(m(map! { "_rtype" => "method", "_rtarget" => "a" })), "method", "_rmethod");
        assert_invalid(
            err_of(m(map! { "_rtype" => "method", "_rtarget" => 1, "_rmethod" => "a" })),
            "method",
            "_rtarget",
        );
        assert_invalid(
            err_of(m(
                map! { "_rtype" => "method", "_rtarget" => "t", "_rmethod" => "a", "_rpromise" => "x" },
            )),
            "method",
            "_rpromise",
        );
        assert_invalid(
            err_of(m(
                map! { "_rtype" => "method", "_rtarget" => "t", "_rmethod" => "a", "_renc_pub" => "k" },
            )),
            "method",
            "_renc_pub",
        );
        assert_invalid(
            err_of(m(map! { "_rtype" => "method", "_rtarget" => "t", "_rmethod" => "a", "_rserver" => 3 })),
            "method",
            "_rserver",
        );
        assert_missing(
            err_of(m(map! { "_rtype" => "generator", "_rtarget" => "t", "_rmethod" => "a" })),
            "generator",
            "_rclose_method",
        );
        assert_missing(err_of(m(map! { "_rtype" => "error" })), "error", "_rvalue");
        assert_invalid(err_of(m(map! { "_rtype" => "error", "_rvalue" => 1 })), "error", "_rvalue");
        assert_invalid(
            err_of(m(map! { "_rtype" => "error", "_rvalue" => "x", "_rtrace" => 1 })),
            "error",
            "_rtrace",
        );
        let nd = |v: Value, shape: Value, dtype: Value| {
            Value::from(
                map! { "_rtype" => "ndarray", "_rvalue" => v, "_rshape" => shape, "_rdtype" => dtype },
            )
        };
        let b4 = Value::from(Bytes::from(vec![0; 4]));
        let shape1 = Value::from(vec![Value::from(1)]);
        assert_invalid(err_of(nd("x".into(), shape1.clone(), "int32".into())), "ndarray", "_rvalue");
        assert_invalid(
            err_of(nd(vec![Value::from(1)].into(), shape1.clone(), "int32".into())),
            "ndarray",
            "_rvalue",
        );
        assert_invalid(
            err_of(nd(b4.clone(), vec![Value::from(-1)].into(), "int32".into())),
            "ndarray",
            "_rshape",
        );
        assert_invalid(
            err_of(nd(b4.clone(), vec![Value::from(1.5)].into(), "int32".into())),
            "ndarray",
            "_rshape",
        );
        assert_invalid(err_of(nd(b4.clone(), 4.into(), "int32".into())), "ndarray", "_rshape");
        assert_invalid(err_of(nd(b4.clone(), shape1.clone(), 1.into())), "ndarray", "_rdtype");
        let e = err_of(nd(b4.clone(), vec![Value::from(2)].into(), "int32".into()));
        assert!(
            matches!(e, CodecError::ArrayLayout(ArrayError::SizeMismatch { expected: 8, actual: 4, .. })),
            "{e}"
        );
        assert!(e.to_string().contains("ndarray"));
        let huge = vec![Value::UInt(u64::MAX), Value::UInt(u64::MAX)];
        assert!(matches!(
            err_of(nd(b4.clone(), huge.into(), "int32".into())),
            CodecError::ArrayLayout(ArrayError::ShapeOverflow)
        ));
        assert_missing(
            err_of(m(map! { "_rtype" => "ndarray", "_rvalue" => b4.clone(), "_rdtype" => "int8" })),
            "ndarray",
            "_rshape",
        );
        let e = err_of(m(
            map! { "_rtype" => "typedarray", "_rvalue" => Bytes::from(vec![0; 3]), "_rdtype" => "int16" },
        ));
        assert!(matches!(e, CodecError::TypedArrayLength { len: 3, .. }), "{e}");
        assert_invalid(
            err_of(m(map! { "_rtype" => "typedarray", "_rvalue" => "x", "_rdtype" => "int8" })),
            "typedarray",
            "_rvalue",
        );
        assert_invalid(
            err_of(m(map! { "_rtype" => "memoryview", "_rvalue" => vec![Value::Nil] })),
            "memoryview",
            "_rvalue",
        );
        assert_missing(err_of(m(map! { "_rtype" => "memoryview" })), "memoryview", "_rvalue");
        assert_invalid(err_of(m(map! { "_rtype" => "set", "_rvalue" => "x" })), "set", "_rvalue");
        assert_invalid(
            err_of(m(map! { "_rtype" => "orderedmap", "_rvalue" => vec![Value::from(1)] })),
            "orderedmap",
            "_rvalue",
        );
        let short_pair = vec![Value::from(vec![Value::from(1)])];
        assert_invalid(
            err_of(m(map! { "_rtype" => "orderedmap", "_rvalue" => short_pair })),
            "orderedmap",
            "_rvalue",
        );
        // Nested malformed objects fail the whole decode.
        let nested = Value::from(vec![m(map! { "k" => m(map! { "_rtype" => "method" }) })]);
        assert_missing(err_of(nested), "method", "_rtarget");
    }

    #[test]
    fn bad_local_arrays_are_rejected_on_encode() {
        let a = NdArray { dtype: DType::Float64, shape: vec![3], data: Bytes::from(vec![0; 16]) };
        let e = enc_with(&Value::from(a), &mut TestSink::default(), Some("S")).unwrap_err();
        assert!(matches!(e, CodecError::ArrayLayout(ArrayError::SizeMismatch { .. })), "{e}");
        let t = TypedArray { dtype: DType::Float32, data: Bytes::from(vec![0; 5]) };
        let e = enc_with(&Value::TypedArray(Box::new(t)), &mut TestSink::default(), Some("S")).unwrap_err();
        assert!(matches!(e, CodecError::TypedArrayLength { .. }), "{e}");
    }

    fn nested_list(depth: usize) -> Value {
        let mut v = Value::Nil;
        for _ in 0..depth {
            v = Value::List(vec![v]);
        }
        v
    }

    #[test]
    fn depth_limit() {
        let reg = CodecRegistry::new();
        let cx = DecodeContext { max_depth: 10, ..DecodeContext::new(&reg) };
        assert!(decode(nested_list(10), &cx).is_ok());
        assert!(matches!(decode(nested_list(11), &cx), Err(CodecError::TooDeep { limit: 10 })));
        let deep = nested_list(500);
        assert!(matches!(dec_ws(deep.clone()), Err(CodecError::TooDeep { .. })));
        let e = enc_with(&deep, &mut TestSink::default(), Some("S")).unwrap_err();
        assert!(matches!(e, CodecError::TooDeep { limit: DEFAULT_MAX_DEPTH }));
        let mut m = Value::Nil;
        for _ in 0..500 {
            m = Value::from(map! { "k" => m });
        }
        assert!(matches!(dec_ws(m.clone()), Err(CodecError::TooDeep { .. })));
        assert!(matches!(enc_with(&m, &mut TestSink::default(), None), Err(CodecError::TooDeep { .. })));
    }

    #[derive(Debug, PartialEq)]
    struct Point {
        x: i64,
        y: i64,
    }

    fn point_registry(tag: &'static str) -> CodecRegistry {
        let mut reg = CodecRegistry::new();
        reg.register(
            "point",
            move |p: &Point| Ok::<_, &str>(Value::from(map! { "x" => p.x, "y" => p.y, "tag" => tag })),
            Some(|m: Map| {
                let x = m.get("x").and_then(Value::as_i64).ok_or("no x")?;
                let y = m.get("y").and_then(Value::as_i64).ok_or("no y")?;
                Ok::<_, &str>(Point { x, y })
            }),
        );
        reg
    }

    #[test]
    fn custom_codec_round_trip_and_replacement() {
        let mut reg = point_registry("first");
        let v = Value::Custom(CustomValue::new("point", Point { x: 1, y: 2 }));
        let mut sink = TestSink::default();
        let wire = encode(&v, &mut EncodeContext::new("c", &reg, &mut sink)).unwrap();
        assert_eq!(wire, Value::from(map! { "x" => 1, "y" => 2, "tag" => "first", "_rtype" => "point" }));
        let Value::Custom(cv) = decode(wire, &DecodeContext::new(&reg)).unwrap() else { panic!() };
        assert_eq!(cv.codec, "point");
        assert_eq!(cv.downcast_ref::<Point>(), Some(&Point { x: 1, y: 2 }));
        // Decoder errors are typed.
        let bad = Value::from(map! { "_rtype" => "point", "x" => 1 });
        let e = decode(bad, &DecodeContext::new(&reg)).unwrap_err();
        assert!(
            matches!(&e, CodecError::Custom { codec, message } if codec == "point" && message == "no y"),
            "{e}"
        );
        // Same type under a new name replaces the old codec.
        reg.register_encoder("pt2", |p: &Point| Ok::<_, String>(Value::from(map! { "x" => p.x })));
        assert!(!reg.contains("point"));
        let wire = encode(&v, &mut EncodeContext::new("c", &reg, &mut sink)).unwrap();
        assert_eq!(wire, Value::from(map! { "x" => 1, "_rtype" => "pt2" }));
        // Encode-only codec: the map stays a map on decode.
        assert_eq!(decode(wire.clone(), &DecodeContext::new(&reg)).unwrap(), wire);
        // Same name, other type replaces too.
        reg.register_encoder("pt2", |s: &String| Ok::<_, String>(Value::from(s.as_str())));
        let e = encode(&v, &mut EncodeContext::new("c", &reg, &mut sink)).unwrap_err();
        assert!(matches!(e, CodecError::NoCodec { .. }), "{e}");
        assert!(e.to_string().contains("Unsupported data type"));
    }

    #[test]
    fn custom_codec_output_is_encoded_recursively() {
        let mut reg = CodecRegistry::new();
        let f = local(Some("cb"));
        let ff = f.clone();
        reg.register_encoder("holder", move |_: &Point| {
            Ok::<_, String>(Value::from(map! { "_rtype" => "my_type", "cb" => fval(ff.clone()) }))
        });
        reg.register_encoder("wrapped", |s: &u32| Ok::<_, String>(Value::Set(vec![Value::from(*s)])));
        let mut sink = TestSink::default();
        let mut cx = EncodeContext::new("c", &reg, &mut sink);
        cx.session = Some("S");
        let v = Value::Custom(CustomValue::new("holder", Point { x: 0, y: 0 }));
        let wire = encode(&v, &mut cx).unwrap();
        let m = wire.as_map().unwrap();
        assert_eq!(m.keys().map(String::as_str).collect::<Vec<_>>(), ["cb", "_rtype"]);
        assert_eq!(m["_rtype"], Value::from("my_type"));
        assert_eq!(m["cb"].as_map().unwrap()["_rmethod"], Value::from("S.obj1#cb"));
        let wire = encode(&Value::Custom(CustomValue::new("wrapped", 7u32)), &mut cx).unwrap();
        assert_eq!(wire, Value::from(map! { "_rtype" => "set", "_rvalue" => vec![Value::from(7)] }));
        // Found by name but holding another Rust type.
        let e = encode(&Value::Custom(CustomValue::new("wrapped", 7u8)), &mut cx).unwrap_err();
        assert!(matches!(e, CodecError::CodecTypeMismatch { .. }), "{e}");
    }

    #[test]
    fn kwargs_python_style() {
        let (args, kw) = encode_args(vec![Value::from(1)], Some(map! { "b" => 5 }));
        assert_eq!(args, vec![Value::from(1), Value::from(map! { "b" => 5 })]);
        assert!(kw);
        let (args, kw) = encode_args(vec![Value::from(1)], Some(Map::new()));
        assert_eq!(args, vec![Value::from(1)]);
        assert!(!kw);
        let (args, kw) = encode_args(vec![], Some(map! { "config" => Map::new(), "_rkwargs" => true }));
        assert_eq!(args, vec![Value::from(map! { "config" => Map::new() })]);
        assert!(kw);
        let (pos, kwargs) =
            split_kwargs(vec![Value::from("prov:demo"), Value::from(map! { "config" => Map::new() })], true)
                .unwrap();
        assert_eq!(pos, vec![Value::from("prov:demo")]);
        assert_eq!(kwargs, Some(map! { "config" => Map::new() }));
        let (pos, kwargs) = split_kwargs(vec![Value::from(map! { "a" => 1 })], false).unwrap();
        assert_eq!((pos.len(), kwargs), (1, None));
        assert!(matches!(split_kwargs(vec![], true), Err(CodecError::KwargsMissing)));
        assert!(matches!(
            split_kwargs(vec![Value::from(1)], true),
            Err(CodecError::KwargsNotAMap { got: "int" })
        ));
    }

    #[test]
    fn kwargs_js_style() {
        let (args, kw) =
            encode_args(vec![Value::from(map! { "a" => 3, "b" => 4, "_rkwargs" => true })], None);
        assert_eq!(args, vec![Value::from(map! { "a" => 3, "b" => 4 })]);
        assert!(kw);
        // A false marker is stripped and means nothing.
        let (args, kw) = encode_args(vec![Value::from(map! { "a" => 3, "_rkwargs" => false })], None);
        assert_eq!(args, vec![Value::from(map! { "a" => 3 })]);
        assert!(!kw);
        // Only the last argument is looked at.
        let marked = Value::from(map! { "_rkwargs" => true });
        let (args, kw) = encode_args(vec![marked.clone(), Value::from(1)], None);
        assert_eq!(args, vec![marked, Value::from(1)]);
        assert!(!kw);
        // Both styles: merged, explicit kwargs win.
        let (args, kw) = encode_args(
            vec![Value::from(map! { "a" => 1, "_rkwargs" => true })],
            Some(map! { "a" => 2, "c" => 3 }),
        );
        assert_eq!(args, vec![Value::from(map! { "a" => 2, "c" => 3 })]);
        assert!(kw);
        let (pos, kwargs) = split_kwargs(args, kw).unwrap();
        assert!(pos.is_empty());
        assert_eq!(kwargs, Some(map! { "a" => 2, "c" => 3 }));
    }

    fn wire_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(Value::UInt),
            any::<f64>().prop_filter("NaN != NaN", |f| !f.is_nan()).prop_map(Value::F64),
            ".{0,8}".prop_map(Value::Str),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(|b| Value::Bytes(Bytes::from(b))),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
                proptest::collection::vec(
                    ("[_a-z]{0,7}".prop_filter("no _rtype", |k| k != "_rtype"), inner),
                    0..6
                )
                .prop_map(|kv| Value::Map(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn plain_wire_values_are_fixed_points(v in wire_value()) {
            let decoded = dec_ws(v.clone()).unwrap();
            prop_assert_eq!(&decoded, &v);
            let mut sink = TestSink::default();
            let encoded = enc_with(&decoded, &mut sink, None).unwrap();
            prop_assert_eq!(&encoded, &v);
            prop_assert!(sink.functions.is_empty() && sink.interfaces.is_empty());
        }
    }
}
