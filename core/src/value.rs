//! The dynamic value model: everything a hypha-rpc package can carry.
//!
//! A [`Value`] exists in two shapes, and the same type serves both:
//!
//! * **wire form**: only the msgpack-native variants (`Nil`, `Bool`, `Int`, `UInt`,
//!   `F32`, `F64`, `Str`, `Bytes`, `List`, `Map`). This is what [`crate::msgpack`]
//!   reads and writes; encoded objects are maps with an `_rtype` key.
//! * **decoded form**: additionally the typed variants (`NdArray`, `Function`,
//!   `Generator`, `Error`, ...), produced by [`crate::codec::decode`] from `_rtype`
//!   maps and turned back into them by [`crate::codec::encode`].
//!
//! Keeping one type for both avoids a second tree walk and a second allocation for every
//! nested container: decoding moves the children out of the wire map.
//!
//! Byte payloads are [`bytes::Bytes`], so a `bin` inside a received frame is a slice of
//! the frame buffer (no copy), and an ndarray built from a `Vec<T>` is sent without
//! copying its elements into an intermediate buffer.

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use indexmap::IndexMap;

pub use crate::array::{DType, NdArray};

/// A string-keyed map that keeps insertion order.
///
/// Order matters on the wire: peers compare schemas and descriptors key by key in tests,
/// and Python moves `_rtype` to the end of a map; we keep what we are given.
pub type Map = IndexMap<String, Value>;

/// One hypha-rpc value. See the module documentation for the wire/decoded split.
#[derive(Clone, Debug, Default)]
pub enum Value {
    /// msgpack nil; Python `None`, JS `null`/`undefined`.
    #[default]
    Nil,
    /// msgpack bool.
    Bool(bool),
    /// A signed integer. Every integer that fits in `i64` is kept here, whatever msgpack
    /// family it arrived in, so that `1` is always `Int(1)`.
    Int(i64),
    /// An unsigned integer above `i64::MAX` (Python sends `2**63` like this).
    UInt(u64),
    /// A 32-bit float (msgpack float 32; Python never sends it, Rust code may).
    F32(f32),
    /// A 64-bit float, including NaN and the infinities.
    F64(f64),
    /// UTF-8 text (msgpack str).
    Str(String),
    /// Raw bytes (msgpack bin; Python `bytes`, JS `Uint8Array`).
    Bytes(Bytes),
    /// An array (Python list or tuple).
    List(Vec<Value>),
    /// A string-keyed map in insertion order.
    Map(Map),

    // ----- decoded-only variants (`_rtype` objects) -----
    /// `_rtype: "ndarray"`: an n-dimensional array in C order.
    NdArray(Box<NdArray>),
    /// `_rtype: "typedarray"`: a JS TypedArray (1-D, no shape on the wire).
    TypedArray(Box<TypedArray>),
    /// `_rtype: "memoryview"`: Python `memoryview`, JS `ArrayBuffer`/`DataView`.
    MemoryView(Bytes),
    /// `_rtype: "set"`.
    Set(Vec<Value>),
    /// `_rtype: "orderedmap"`: a JS `Map`, whose keys may be any value.
    OrderedMap(Vec<(Value, Value)>),
    /// `_rtype: "error"`.
    Error(Box<ErrorValue>),
    /// `_rtype: "method"` (remote) or a local callable to be exported.
    Function(Box<Function>),
    /// `_rtype: "generator"` (remote) or a local stream to be exported.
    Generator(Box<Generator>),
    /// An instance of a type with a user-registered codec (see [`crate::codec::CodecRegistry`]).
    Custom(CustomValue),
}

/// A JS TypedArray: element type and raw little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct TypedArray {
    /// Element type; JS sends one of int8/16/32, uint8/16/32, float32/64.
    pub dtype: DType,
    /// The elements, little-endian, back to back.
    pub data: Bytes,
}

/// An error carried as a value (`_rtype: "error"`), as peers put it in `reject` calls.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ErrorValue {
    /// `_rvalue`: the message. Peers search it for the substrings of spec §4.8.
    pub message: String,
    /// `_rtrace`: the remote stack trace, if the peer sent one.
    pub trace: Option<String>,
}

impl ErrorValue {
    /// An error with a message and no trace.
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), trace: None }
    }
}

impl fmt::Display for ErrorValue {
    /// Formats as the Python client does (`RemoteError:<value>\n<trace>`), so that a
    /// Rust user sees the same text as a Python user for the same failure.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteError:{}\n{}", self.message, self.trace.as_deref().unwrap_or(""))
    }
}

/// How a call through a method descriptor expects its result (`_rpromise`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PromiseMode {
    /// `_rpromise` absent or `false`: fire-and-forget (resolve, reject, heartbeat).
    #[default]
    None,
    /// `_rpromise: true`: an explicit promise object travels with the call.
    Explicit,
    /// `_rpromise: "*"`: the compact promise marker plus `t`.
    Compact,
}

/// A function: either owned by a peer (a decoded descriptor) or local (to be exported).
#[derive(Clone, Debug, PartialEq)]
pub enum Function {
    /// A descriptor received from a peer; calling it sends a `method` package.
    Remote(RemoteMethod),
    /// A local callable; encoding it stores it in a session or service and emits a
    /// descriptor that points back at us.
    Local(LocalFunction),
}

/// A remote method descriptor (`_rtype: "method"`, spec §4.1), decoded.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RemoteMethod {
    /// `_rserver`: the `public_base_url` of the encoder's server, if sent. Used for the
    /// forwarding rule of spec §5.3.
    pub server: Option<String>,
    /// `_rtarget`, made absolute against the sender's workspace on decode.
    pub target: String,
    /// `_rmethod`: the path in the owner's object store.
    pub method: String,
    /// `_rpromise`.
    pub promise: PromiseMode,
    /// `_rname`, if sent.
    pub name: Option<String>,
    /// `_rdoc`, if sent as a string (`null` and absent both read as `None`).
    pub doc: Option<String>,
    /// `_rschema`, if sent (may be `Some(Value::Nil)`: JS sends an explicit null).
    pub schema: Option<Arc<Value>>,
    /// `_rasync` (Python only), if sent.
    pub is_async: Option<bool>,
    /// `_renc_pub`: the owner's X25519 public key, when calls to it must be encrypted.
    pub encryption_key: Option<Bytes>,
    /// Not on the wire: the caller-side session during which this descriptor was
    /// received (`data.session` of the carrying call, spec §4.7). Calls through it carry
    /// `parent = remote_parent`.
    pub remote_parent: Option<String>,
    /// Descriptor keys we do not know, and known keys whose value the typed fields do not
    /// hold (`_rdoc: null`, `_rpromise: false`), kept so that forwarding re-emits the
    /// descriptor as it came (upstream forwards the original map, spec §5.3).
    pub extra: Map,
}

impl RemoteMethod {
    /// The display name, as the Python client derives `__name__` (spec §4.1): `_rname`,
    /// else the last path segment, else the part after `#`.
    pub fn display_name(&self) -> &str {
        if let Some(n) = &self.name {
            return n;
        }
        let last = self.method.rsplit('.').next().unwrap_or(&self.method);
        last.rsplit_once('#').map(|(_, n)| n).unwrap_or(last)
    }
}

/// A local function that is about to be exported to a peer.
///
/// The core never runs code: `handler` is an opaque token that the driver (the actor
/// layer) gave us and gets back when a peer calls the function. The metadata is what
/// the descriptor advertises.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalFunction {
    /// The driver's handle for the callable.
    pub handler: Handler,
    /// Name used for the `#<name>` object-id suffix and `_rname`.
    pub name: Option<String>,
    /// `_rdoc`.
    pub doc: Option<String>,
    /// `_rschema`: the function's JSON schema (spec §7.3), if it has one.
    pub schema: Option<Arc<Value>>,
}

impl LocalFunction {
    /// A local function with a handler and no metadata.
    pub fn new(handler: Handler) -> Self {
        Self { handler, name: None, doc: None, schema: None }
    }
}

/// A generator: remote (decoded) or local (to be exported).
#[derive(Clone, Debug, PartialEq)]
pub enum Generator {
    /// A remote generator descriptor; iterate it by calling `method` until a
    /// `stop_iteration` map arrives, and call `close_method` when stopping early.
    Remote(RemoteGenerator),
    /// A local stream; encoding it stores its next/close entries in a session.
    Local(LocalGenerator),
}

/// A remote generator descriptor (`_rtype: "generator"`, spec §6), decoded.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RemoteGenerator {
    /// `_rserver`, if sent.
    pub server: Option<String>,
    /// `_rtarget`, made absolute on decode.
    pub target: String,
    /// `_rmethod`: the `next` function's path.
    pub method: String,
    /// `_rclose_method`: the `close` function's path.
    pub close_method: String,
    /// Not on the wire: see [`RemoteMethod::remote_parent`].
    pub remote_parent: Option<String>,
    /// Keys we do not interpret (`_rpromise`, `_rdoc`, unknown ones), kept for forwarding.
    pub extra: Map,
}

/// A local generator to be exported: an opaque driver handle, like [`LocalFunction`].
#[derive(Clone, Debug, PartialEq)]
pub struct LocalGenerator {
    /// The driver's handle for the stream.
    pub handler: Handler,
}

/// An opaque, cheaply clonable handle owned by the driver.
///
/// Two handles are equal when they point at the same allocation: that is how the
/// annotation table recognises "this function is a registered service function" (spec
/// §5.3), as upstream does with function identity.
#[derive(Clone)]
pub struct Handler(pub Arc<dyn Any + Send + Sync>);

impl Handler {
    /// Wraps any driver value.
    pub fn new<T: Any + Send + Sync>(value: T) -> Self {
        Self(Arc::new(value))
    }

    /// Borrows the driver value if it is a `T`.
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }

    /// A stable identity for tables keyed by handler (the allocation address).
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as *const () as usize
    }
}

impl PartialEq for Handler {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for Handler {}

impl std::hash::Hash for Handler {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id().hash(state)
    }
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handler({:#x})", self.id())
    }
}

/// A value of a Rust type that has a codec registered by name.
///
/// The codec registry finds the encoder by the value's `TypeId` (upstream matches with
/// `isinstance`), and a decoder turns `_rtype: <name>` maps back into one of these.
#[derive(Clone)]
pub struct CustomValue {
    /// The codec name (`_rtype` on the wire).
    pub codec: String,
    /// The Rust value.
    pub value: Arc<dyn Any + Send + Sync>,
}

impl CustomValue {
    /// Wraps a Rust value for the codec `codec`.
    pub fn new<T: Any + Send + Sync>(codec: impl Into<String>, value: T) -> Self {
        Self { codec: codec.into(), value: Arc::new(value) }
    }

    /// Borrows the value if it is a `T`.
    pub fn downcast_ref<T: Any>(&self) -> Option<&T> {
        self.value.downcast_ref::<T>()
    }

    /// The `TypeId` of the wrapped value, used to pick the encoder.
    pub fn type_id_of_value(&self) -> TypeId {
        (*self.value).type_id()
    }
}

impl PartialEq for CustomValue {
    fn eq(&self, other: &Self) -> bool {
        self.codec == other.codec && Arc::ptr_eq(&self.value, &other.value)
    }
}

impl fmt::Debug for CustomValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomValue").field("codec", &self.codec).finish_non_exhaustive()
    }
}

/// Structural equality, as a peer would judge it: `Int(1) == UInt(1)` cannot occur
/// (canonical ints), floats compare by value (so NaN != NaN, as in Python), and
/// function handles compare by identity.
impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        use Value::*;
        match (self, other) {
            (Nil, Nil) => true,
            (Bool(a), Bool(b)) => a == b,
            (Int(a), Int(b)) => a == b,
            (UInt(a), UInt(b)) => a == b,
            (F32(a), F32(b)) => a == b,
            (F64(a), F64(b)) => a == b,
            (Str(a), Str(b)) => a == b,
            (Bytes(a), Bytes(b)) => a == b,
            (List(a), List(b)) => a == b,
            (Map(a), Map(b)) => a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x == y),
            (NdArray(a), NdArray(b)) => a == b,
            (TypedArray(a), TypedArray(b)) => a == b,
            (MemoryView(a), MemoryView(b)) => a == b,
            (Set(a), Set(b)) => a == b,
            (OrderedMap(a), OrderedMap(b)) => a == b,
            (Error(a), Error(b)) => a == b,
            (Function(a), Function(b)) => a == b,
            (Generator(a), Generator(b)) => a == b,
            (Custom(a), Custom(b)) => a == b,
            _ => false,
        }
    }
}

impl Value {
    /// The name of the variant, for error messages ("expected a map, got list").
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::UInt(_) => "int",
            Value::F32(_) | Value::F64(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Map(_) => "map",
            Value::NdArray(_) => "ndarray",
            Value::TypedArray(_) => "typedarray",
            Value::MemoryView(_) => "memoryview",
            Value::Set(_) => "set",
            Value::OrderedMap(_) => "orderedmap",
            Value::Error(_) => "error",
            Value::Function(_) => "function",
            Value::Generator(_) => "generator",
            Value::Custom(_) => "custom",
        }
    }

    /// True for the msgpack-native variants that [`crate::msgpack`] can write directly.
    pub fn is_wire(&self) -> bool {
        self.is_scalar() || matches!(self, Value::List(_) | Value::Map(_))
    }

    /// True for the msgpack-native variants that are not containers: they encode to
    /// themselves.
    pub fn is_scalar(&self) -> bool {
        matches!(
            self,
            Value::Nil
                | Value::Bool(_)
                | Value::Int(_)
                | Value::UInt(_)
                | Value::F32(_)
                | Value::F64(_)
                | Value::Str(_)
                | Value::Bytes(_)
        )
    }

    /// The string, if this is a `Str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The map, if this is a `Map`.
    pub fn as_map(&self) -> Option<&Map> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The mutable map, if this is a `Map`.
    pub fn as_map_mut(&mut self) -> Option<&mut Map> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The list, if this is a `List`.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    /// The bool, if this is a `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The integer as `i64`, if this is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::UInt(u) => i64::try_from(*u).ok(),
            _ => None,
        }
    }

    /// The number as `f64` (ints convert; Python and JS both send whole floats as ints
    /// at times, e.g. the heartbeat interval `t`).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::F32(f) => Some(f64::from(*f)),
            Value::F64(f) => Some(*f),
            _ => None,
        }
    }

    /// The bytes, if this is `Bytes`.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// True for the `{"_rtype": "stop_iteration"}` marker that ends a remote generator.
    pub fn is_stop_iteration(&self) -> bool {
        matches!(self, Value::Map(m) if m.get("_rtype").and_then(Value::as_str) == Some("stop_iteration"))
    }

    /// The `{"_rtype": "stop_iteration"}` marker.
    pub fn stop_iteration() -> Value {
        let mut m = Map::new();
        m.insert("_rtype".into(), Value::Str("stop_iteration".into()));
        Value::Map(m)
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self { Value::Int(i64::from(v)) }
        }
    )*};
}
from_int!(i8, i16, i32, i64, u8, u16, u32);

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        match i64::try_from(v) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::UInt(v),
        }
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::from(v as u64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::F32(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::F64(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}

impl From<Bytes> for Value {
    fn from(v: Bytes) -> Self {
        Value::Bytes(v)
    }
}

impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::List(v)
    }
}

impl From<Map> for Value {
    fn from(v: Map) -> Self {
        Value::Map(v)
    }
}

impl From<NdArray> for Value {
    fn from(v: NdArray) -> Self {
        Value::NdArray(Box::new(v))
    }
}

impl From<ErrorValue> for Value {
    fn from(v: ErrorValue) -> Self {
        Value::Error(Box::new(v))
    }
}

impl From<Function> for Value {
    fn from(v: Function) -> Self {
        Value::Function(Box::new(v))
    }
}

impl From<Generator> for Value {
    fn from(v: Generator) -> Self {
        Value::Generator(Box::new(v))
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Nil, Into::into)
    }
}

/// Builds a [`Map`] from `key => value` pairs: `map! { "a" => 1, "b" => "x" }`.
#[macro_export]
macro_rules! map {
    () => { $crate::Map::new() };
    ($($k:expr => $v:expr),+ $(,)?) => {{
        let mut m = $crate::Map::new();
        $( m.insert(::std::string::String::from($k), $crate::Value::from($v)); )+
        m
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_stays_small() {
        // Lists of values are the bulk of most payloads; keep the enum compact by boxing
        // the rare, large variants. The largest inline variant is the map (an IndexMap).
        assert!(std::mem::size_of::<Value>() <= 72, "{}", std::mem::size_of::<Value>());
    }

    #[test]
    fn canonical_ints() {
        assert_eq!(Value::from(5u64), Value::Int(5));
        assert_eq!(Value::from(u64::MAX), Value::UInt(u64::MAX));
    }

    #[test]
    fn display_name_rules() {
        let mut m = RemoteMethod { method: "S.abc#<lambda>".into(), ..Default::default() };
        assert_eq!(m.display_name(), "<lambda>");
        m.method = "services.demo.add".into();
        assert_eq!(m.display_name(), "add");
        m.name = Some("plus".into());
        assert_eq!(m.display_name(), "plus");
    }

    #[test]
    fn handler_identity() {
        let a = Handler::new(1u8);
        let b = a.clone();
        let c = Handler::new(1u8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.downcast_ref::<u8>(), Some(&1));
    }

    #[test]
    fn stop_iteration_marker() {
        assert!(Value::stop_iteration().is_stop_iteration());
        assert!(!Value::Nil.is_stop_iteration());
    }
}
