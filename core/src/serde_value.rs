//! Conversions between [`Value`] and any serde type, without a detour through JSON.
//!
//! Typed service handlers take and return ordinary Rust types; the wire carries
//! [`Value`]s. [`to_value`] runs a type's `Serialize` straight into a `Value` tree and
//! [`from_value`] / [`from_value_ref`] run its `Deserialize` straight off one. `Value`
//! itself implements `Serialize` and `Deserialize`, so it can sit inside user structs
//! (a "free-form" field) and be printed with `serde_json`.
//!
//! # Mapping (Rust -> `Value`)
//!
//! | serde data model | `Value` |
//! |---|---|
//! | `bool` | `Bool` |
//! | integers | `Int` if the value fits in `i64`, else `UInt` (the canonical form of [`Value::Int`]); an `i128`/`u128` that fits neither is [`SerdeError::IntegerOutOfRange`] |
//! | `f32` / `f64` | `F32` / `F64` (an `f32` stays 32-bit on the wire) |
//! | `char`, `str` | `Str` |
//! | bytes (`serialize_bytes`: `serde_bytes`, `ByteBuf`) | `Bytes` (a plain `Vec<u8>` is a sequence of ints, as in serde) |
//! | `()`, `None`, unit struct | `Nil` |
//! | `Some(x)`, newtype struct | `x` |
//! | sequence, tuple, tuple struct | `List` |
//! | map | `Map`; keys must serialize to strings (`String`, `&str`, `char`, unit enum variants) |
//! | struct | `Map`, keys in field order |
//! | enum | externally tagged, as `serde_json`: unit variant -> `Str(name)`; newtype, tuple and struct variants -> a one-key `Map {name: inner}` |
//!
//! **Map keys.** Python and JS peers only accept string keys in a msgpack map (Python's
//! unpacker is configured that way), so a map whose key is an integer, a bool, bytes, ...
//! is [`SerdeError::NonStringKey`]. We error rather than stringify (as `serde_json`
//! does) because a silently stringified key would not come back as the same type. Use
//! `HashMap<String, _>` or convert the keys explicitly.
//!
//! The serializer reports `is_human_readable() == true`, like JSON: types with two
//! representations (UUIDs, IP addresses, timestamps) pick their textual one, which is
//! what Python and JS peers expect.
//!
//! # Mapping (`Value` -> Rust)
//!
//! The reverse of the above, with the usual serde leniency: any integer variant into any
//! integer type with a range check (`300` into `i8` is an error), integers and floats
//! into `f32`/`f64`; `Bytes` into `serde_bytes::ByteBuf` and also into `Vec<u8>` (as a
//! sequence of `u8`); `Nil` into `None`/`()`; an enum from a `Str` (unit variant) or a
//! one-key `Map`. `deserialize_any` dispatches on the variant, so self-describing
//! targets (`serde_json::Value`, untagged enums, `Value` itself) work.
//!
//! # Decoded variants
//!
//! The decoded-only variants have no place in the serde data model. Those that are plain
//! data present themselves in their wire form, both when serialized and when
//! deserialized from:
//!
//! * `NdArray` -> `{"_rtype": "ndarray", "_rvalue": <bytes>, "_rshape": [..], "_rdtype": "float64"}`
//! * `TypedArray` -> `{"_rtype": "typedarray", "_rvalue": <bytes>, "_rdtype": ..}`
//! * `MemoryView` -> `{"_rtype": "memoryview", "_rvalue": <bytes>}` (and it also
//!   deserializes directly into a byte buffer)
//! * `Error` -> `{"_rtype": "error", "_rvalue": message, "_rtrace": trace or nil}`
//! * `OrderedMap` -> `{"_rtype": "orderedmap", "_rvalue": [[key, value], ..]}`
//! * `Set` -> a plain sequence (serde has no set type; JSON has none either). This one is
//!   lossy: a set comes back as a `List`.
//!
//! `Function`, `Generator` and `Custom` values are live objects (handles into a session,
//! or arbitrary Rust values), not data: converting them is [`SerdeError::NotData`].
//! A struct that must carry a callable keeps it in a `Value` field and never serializes
//! that field with serde; the codec (`crate::codec`) encodes it instead. Ignoring such a
//! field while deserializing (`#[serde(skip)]`, unknown fields) is fine.
//!
//! Note that `to_value(&value)` and `from_value::<Value>(value)` therefore return the
//! wire form of typed variants (the `_rtype` maps), not the typed variants themselves.

use std::fmt;

use bytes::Bytes;
use serde::de::{
    self, value::BorrowedStrDeserializer, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor,
};
use serde::ser::{self, Serialize, SerializeMap as _};
use serde::{Deserialize, Deserializer, Serializer};

use crate::value::{Map, Value};

/// Errors converting between `Value` and serde types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerdeError {
    /// A message from a `Serialize`/`Deserialize` impl (serde's `custom`), including
    /// serde's own "invalid type", "invalid length", "missing field", "unknown variant"
    /// and integer range messages.
    #[error("{0}")]
    Message(String),
    /// A map key that is not a string (see the module docs for why we do not stringify).
    #[error("map keys must be strings (hypha-rpc peers reject other keys on the wire), got a {0} key")]
    NonStringKey(&'static str),
    /// An `i128`/`u128` outside both the `i64` and the `u64` range.
    #[error("integer {0} does not fit in 64 bits (msgpack integers are at most 64-bit)")]
    IntegerOutOfRange(String),
    /// A `Function`, `Generator` or `Custom` value met serde.
    #[error(
        "a {0} value is a live object, not data: it cannot be converted with serde \
         (let the hypha codec encode it, or skip the field)"
    )]
    NotData(&'static str),
}

impl ser::Error for SerdeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        SerdeError::Message(msg.to_string())
    }
}

impl de::Error for SerdeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        SerdeError::Message(msg.to_string())
    }
}

/// Converts any serializable value into a [`Value`] tree (see the module docs for the
/// mapping). Byte buffers are copied once into `Bytes`.
pub fn to_value<T: Serialize + ?Sized>(v: &T) -> Result<Value, SerdeError> {
    v.serialize(ValueSerializer)
}

/// Builds a `T` from a [`Value`], consuming it: strings and lists are moved, not copied.
pub fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, SerdeError> {
    T::deserialize(v)
}

/// Builds a `T` from a borrowed [`Value`]. `T` may borrow `&str` and `&[u8]` fields
/// (with `#[serde(borrow)]`) straight out of the value, e.g. out of a received frame.
pub fn from_value_ref<'de, T: Deserialize<'de>>(v: &'de Value) -> Result<T, SerdeError> {
    T::deserialize(v)
}

// ---------------------------------------------------------------------------------------
// Wire form of the decoded-only variants
// ---------------------------------------------------------------------------------------

/// A `{"_rtype": rtype, ...}` map with the given extra entries.
fn rtype_map(rtype: &str, entries: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
    let mut m = Map::new();
    m.insert("_rtype".into(), Value::Str(rtype.into()));
    m.extend(entries.into_iter().map(|(k, v)| (k.to_owned(), v)));
    Value::Map(m)
}

/// The plain-data form of one value (shallow: children are left as they are). Wire
/// variants are returned unchanged; see the module docs for the typed ones.
fn into_wire(v: Value) -> Result<Value, SerdeError> {
    Ok(match v {
        Value::NdArray(a) => {
            let a = *a;
            rtype_map(
                "ndarray",
                [
                    ("_rvalue", Value::Bytes(a.data)),
                    ("_rshape", Value::List(a.shape.into_iter().map(Value::from).collect())),
                    ("_rdtype", Value::Str(a.dtype.as_str().to_owned())),
                ],
            )
        }
        Value::TypedArray(t) => rtype_map(
            "typedarray",
            [("_rvalue", Value::Bytes(t.data)), ("_rdtype", Value::Str(t.dtype.as_str().to_owned()))],
        ),
        Value::MemoryView(b) => rtype_map("memoryview", [("_rvalue", Value::Bytes(b))]),
        Value::Set(items) => Value::List(items),
        Value::OrderedMap(pairs) => rtype_map(
            "orderedmap",
            [("_rvalue", Value::List(pairs.into_iter().map(|(k, v)| Value::List(vec![k, v])).collect()))],
        ),
        Value::Error(e) => {
            let e = *e;
            rtype_map(
                "error",
                [("_rvalue", Value::Str(e.message)), ("_rtrace", e.trace.map_or(Value::Nil, Value::Str))],
            )
        }
        Value::Function(_) | Value::Generator(_) | Value::Custom(_) => {
            return Err(SerdeError::NotData(v.kind()))
        }
        wire => wire,
    })
}

// ---------------------------------------------------------------------------------------
// impl Serialize for Value
// ---------------------------------------------------------------------------------------

/// The pairs of an ordered map as a sequence of `[key, value]` sequences.
struct Pairs<'a>(&'a [(Value, Value)]);

impl Serialize for Pairs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// Serializes the wire variants as themselves and the decoded ones in their wire form
/// (module docs); `Function`, `Generator` and `Custom` are an error.
impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Nil => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::F32(f) => s.serialize_f32(*f),
            Value::F64(f) => s.serialize_f64(*f),
            Value::Str(v) => s.serialize_str(v),
            Value::Bytes(b) => s.serialize_bytes(b),
            Value::List(l) | Value::Set(l) => s.collect_seq(l),
            Value::Map(m) => s.collect_map(m),
            Value::OrderedMap(pairs) => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("_rtype", "orderedmap")?;
                m.serialize_entry("_rvalue", &Pairs(pairs))?;
                m.end()
            }
            // Cheap to clone (the payload is a refcounted `Bytes` or two short strings).
            Value::NdArray(_) | Value::TypedArray(_) | Value::MemoryView(_) | Value::Error(_) => {
                into_wire(self.clone()).map_err(ser::Error::custom)?.serialize(s)
            }
            Value::Function(_) | Value::Generator(_) | Value::Custom(_) => {
                Err(ser::Error::custom(SerdeError::NotData(self.kind())))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// impl Deserialize for Value
// ---------------------------------------------------------------------------------------

/// Builds a wire-form `Value` from any self-describing format.
struct ValueVisitor;

/// Caps preallocation by a format's size hint, which may come from a peer.
fn cautious(hint: Option<usize>) -> usize {
    hint.unwrap_or(0).min(4096)
}

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any hypha-rpc value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        int128(v).map_err(E::custom)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        match u64::try_from(v) {
            Ok(u) => Ok(Value::from(u)),
            Err(_) => Err(E::custom(SerdeError::IntegerOutOfRange(v.to_string()))),
        }
    }

    fn visit_f32<E>(self, v: f32) -> Result<Value, E> {
        Ok(Value::F32(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::F64(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(Bytes::copy_from_slice(v)))
    }

    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(Bytes::from(v)))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(cautious(seq.size_hint()));
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::List(out))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::with_capacity(cautious(map.size_hint()));
        while let Some(key) = map.next_key::<Value>()? {
            let Value::Str(key) = key else {
                return Err(de::Error::custom(SerdeError::NonStringKey(key.kind())));
            };
            let value = map.next_value()?;
            out.insert(key, value);
        }
        Ok(Value::Map(out))
    }
}

/// Deserializes the wire form of a value (decoded variants are not rebuilt from
/// `_rtype` maps here: that is the codec's job). Map keys must be strings.
impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// `Int` if it fits in `i64`, else `UInt`, else out of range.
fn int128(v: i128) -> Result<Value, SerdeError> {
    if let Ok(i) = i64::try_from(v) {
        Ok(Value::Int(i))
    } else if let Ok(u) = u64::try_from(v) {
        Ok(Value::UInt(u))
    } else {
        Err(SerdeError::IntegerOutOfRange(v.to_string()))
    }
}

// ---------------------------------------------------------------------------------------
// The serializer: Rust -> Value
// ---------------------------------------------------------------------------------------

/// A `serde::Serializer` whose output is a [`Value`]. Private: [`to_value`] is the
/// entry point.
struct ValueSerializer;

impl Serializer for ValueSerializer {
    type Ok = Value;
    type Error = SerdeError;
    type SerializeSeq = SeqBuilder;
    type SerializeTuple = SeqBuilder;
    type SerializeTupleStruct = SeqBuilder;
    type SerializeTupleVariant = VariantSeqBuilder;
    type SerializeMap = MapBuilder;
    type SerializeStruct = MapBuilder;
    type SerializeStructVariant = VariantMapBuilder;

    fn serialize_bool(self, v: bool) -> Result<Value, SerdeError> {
        Ok(Value::Bool(v))
    }

    fn serialize_i8(self, v: i8) -> Result<Value, SerdeError> {
        Ok(Value::from(v))
    }

    fn serialize_i16(self, v: i16) -> Result<Value, SerdeError> {
        Ok(Value::from(v))
    }

    fn serialize_i32(self, v: i32) -> Result<Value, SerdeError> {
        Ok(Value::from(v))
    }

    fn serialize_i64(self, v: i64) -> Result<Value, SerdeError> {
        Ok(Value::Int(v))
    }

    fn serialize_i128(self, v: i128) -> Result<Value, SerdeError> {
        int128(v)
    }

    fn serialize_u8(self, v: u8) -> Result<Value, SerdeError> {
        Ok(Value::from(v))
    }

    fn serialize_u16(self, v: u16) -> Result<Value, SerdeError> {
        Ok(Value::from(v))
    }

    fn serialize_u32(self, v: u32) -> Result<Value, SerdeError> {
        Ok(Value::from(v))
    }

    fn serialize_u64(self, v: u64) -> Result<Value, SerdeError> {
        Ok(Value::from(v))
    }

    fn serialize_u128(self, v: u128) -> Result<Value, SerdeError> {
        match u64::try_from(v) {
            Ok(u) => Ok(Value::from(u)),
            Err(_) => Err(SerdeError::IntegerOutOfRange(v.to_string())),
        }
    }

    fn serialize_f32(self, v: f32) -> Result<Value, SerdeError> {
        Ok(Value::F32(v))
    }

    fn serialize_f64(self, v: f64) -> Result<Value, SerdeError> {
        Ok(Value::F64(v))
    }

    fn serialize_char(self, v: char) -> Result<Value, SerdeError> {
        Ok(Value::Str(v.to_string()))
    }

    fn serialize_str(self, v: &str) -> Result<Value, SerdeError> {
        Ok(Value::Str(v.to_owned()))
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<Value, SerdeError> {
        Ok(Value::Bytes(Bytes::copy_from_slice(v)))
    }

    fn serialize_none(self) -> Result<Value, SerdeError> {
        Ok(Value::Nil)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, SerdeError> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<Value, SerdeError> {
        Ok(Value::Nil)
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, SerdeError> {
        Ok(Value::Nil)
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Value, SerdeError> {
        Ok(Value::Str(variant.to_owned()))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Value, SerdeError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, SerdeError> {
        Ok(tagged(variant, to_value(value)?))
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<SeqBuilder, SerdeError> {
        Ok(SeqBuilder(Vec::with_capacity(len.unwrap_or(0))))
    }

    fn serialize_tuple(self, len: usize) -> Result<SeqBuilder, SerdeError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<SeqBuilder, SerdeError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantSeqBuilder, SerdeError> {
        Ok(VariantSeqBuilder { variant, items: Vec::with_capacity(len) })
    }

    fn serialize_map(self, len: Option<usize>) -> Result<MapBuilder, SerdeError> {
        Ok(MapBuilder { map: Map::with_capacity(len.unwrap_or(0)), key: None })
    }

    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<MapBuilder, SerdeError> {
        self.serialize_map(Some(len))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantMapBuilder, SerdeError> {
        Ok(VariantMapBuilder { variant, map: Map::with_capacity(len) })
    }
}

/// The externally tagged form of an enum variant: `{variant: inner}`.
fn tagged(variant: &str, inner: Value) -> Value {
    let mut m = Map::with_capacity(1);
    m.insert(variant.to_owned(), inner);
    Value::Map(m)
}

/// Collects the elements of a sequence, tuple or tuple struct.
struct SeqBuilder(Vec<Value>);

impl ser::SerializeSeq for SeqBuilder {
    type Ok = Value;
    type Error = SerdeError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        self.0.push(to_value(value)?);
        Ok(())
    }

    fn end(self) -> Result<Value, SerdeError> {
        Ok(Value::List(self.0))
    }
}

impl ser::SerializeTuple for SeqBuilder {
    type Ok = Value;
    type Error = SerdeError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        ser::SerializeSeq::serialize_element(self, value)
    }

    fn end(self) -> Result<Value, SerdeError> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleStruct for SeqBuilder {
    type Ok = Value;
    type Error = SerdeError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        ser::SerializeSeq::serialize_element(self, value)
    }

    fn end(self) -> Result<Value, SerdeError> {
        ser::SerializeSeq::end(self)
    }
}

/// Collects the fields of a tuple variant, then tags them.
struct VariantSeqBuilder {
    variant: &'static str,
    items: Vec<Value>,
}

impl ser::SerializeTupleVariant for VariantSeqBuilder {
    type Ok = Value;
    type Error = SerdeError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        self.items.push(to_value(value)?);
        Ok(())
    }

    fn end(self) -> Result<Value, SerdeError> {
        Ok(tagged(self.variant, Value::List(self.items)))
    }
}

/// Collects the entries of a map or the fields of a struct.
struct MapBuilder {
    map: Map,
    /// The key given to `serialize_key`, waiting for its value.
    key: Option<String>,
}

/// Serializes a map key; only strings are accepted (see the module docs).
fn map_key<T: Serialize + ?Sized>(key: &T) -> Result<String, SerdeError> {
    match to_value(key)? {
        Value::Str(s) => Ok(s),
        other => Err(SerdeError::NonStringKey(other.kind())),
    }
}

impl ser::SerializeMap for MapBuilder {
    type Ok = Value;
    type Error = SerdeError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), SerdeError> {
        self.key = Some(map_key(key)?);
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerdeError> {
        let key = self
            .key
            .take()
            .ok_or_else(|| SerdeError::Message("serialize_value called before serialize_key".into()))?;
        self.map.insert(key, to_value(value)?);
        Ok(())
    }

    fn end(self) -> Result<Value, SerdeError> {
        Ok(Value::Map(self.map))
    }
}

impl ser::SerializeStruct for MapBuilder {
    type Ok = Value;
    type Error = SerdeError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), SerdeError> {
        self.map.insert(key.to_owned(), to_value(value)?);
        Ok(())
    }

    fn end(self) -> Result<Value, SerdeError> {
        Ok(Value::Map(self.map))
    }
}

/// Collects the fields of a struct variant, then tags them.
struct VariantMapBuilder {
    variant: &'static str,
    map: Map,
}

impl ser::SerializeStructVariant for VariantMapBuilder {
    type Ok = Value;
    type Error = SerdeError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), SerdeError> {
        self.map.insert(key.to_owned(), to_value(value)?);
        Ok(())
    }

    fn end(self) -> Result<Value, SerdeError> {
        Ok(tagged(self.variant, Value::Map(self.map)))
    }
}

// ---------------------------------------------------------------------------------------
// The owned deserializer: Value -> Rust
// ---------------------------------------------------------------------------------------

/// Visits a list, checking afterwards that the visitor consumed every element (a tuple
/// `(i32, i32)` must not silently accept `[1, 2, 3]`).
fn visit_list<'de, V: Visitor<'de>>(items: Vec<Value>, visitor: V) -> Result<V::Value, SerdeError> {
    let len = items.len();
    let mut seq = SeqOwned(items.into_iter());
    let out = visitor.visit_seq(&mut seq)?;
    match seq.0.len() {
        0 => Ok(out),
        _ => Err(de::Error::invalid_length(len, &"fewer elements in the list")),
    }
}

/// Visits a map, checking afterwards that every entry was consumed.
fn visit_map<'de, V: Visitor<'de>>(map: Map, visitor: V) -> Result<V::Value, SerdeError> {
    let len = map.len();
    let mut access = MapOwned { iter: map.into_iter(), value: None };
    let out = visitor.visit_map(&mut access)?;
    match access.iter.len() {
        0 => Ok(out),
        _ => Err(de::Error::invalid_length(len, &"fewer entries in the map")),
    }
}

/// Visits bytes as a sequence of `u8`, for `Vec<u8>` and `[u8; N]` targets.
fn visit_byte_seq<'de, V: Visitor<'de>>(b: &[u8], visitor: V) -> Result<V::Value, SerdeError> {
    let mut seq = de::value::SeqDeserializer::<_, SerdeError>::new(b.iter().copied());
    let out = visitor.visit_seq(&mut seq)?;
    seq.end()?;
    Ok(out)
}

/// The error for an enum given something other than a string or a one-key map.
fn bad_enum(v: &Value) -> SerdeError {
    SerdeError::Message(format!(
        "invalid type: {}, expected an enum as a string (unit variant) or a map with a single key",
        v.kind()
    ))
}

/// Deserializes from an owned `Value`, moving strings and containers into the target.
impl<'de> Deserializer<'de> for Value {
    type Error = SerdeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self {
            Value::Nil => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Int(i) => visitor.visit_i64(i),
            Value::UInt(u) => visitor.visit_u64(u),
            Value::F32(f) => visitor.visit_f32(f),
            Value::F64(f) => visitor.visit_f64(f),
            Value::Str(s) => visitor.visit_string(s),
            Value::Bytes(b) => visitor.visit_byte_buf(Vec::from(b)),
            Value::List(l) | Value::Set(l) => visit_list(l, visitor),
            Value::Map(m) => visit_map(m, visitor),
            typed => into_wire(typed)?.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self {
            Value::Nil => visitor.visit_none(),
            v => visitor.visit_some(v),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        match self {
            Value::Str(variant) => visitor.visit_enum(EnumOwned { variant, value: None }),
            Value::Map(m) if m.len() == 1 => match m.into_iter().next() {
                Some((variant, value)) => visitor.visit_enum(EnumOwned { variant, value: Some(value) }),
                None => Err(SerdeError::Message("empty map for an enum".into())),
            },
            other => Err(bad_enum(&other)),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        self.deserialize_byte_buf(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self {
            Value::Bytes(b) | Value::MemoryView(b) => visitor.visit_byte_buf(Vec::from(b)),
            v => v.deserialize_any(visitor),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self {
            Value::Bytes(b) | Value::MemoryView(b) => visit_byte_seq(&b, visitor),
            v => v.deserialize_any(visitor),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, SerdeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        // Never fails, even for live objects: skipping a field must not need its data.
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        unit unit_struct tuple_struct map struct identifier
    }
}

impl IntoDeserializer<'_, SerdeError> for Value {
    type Deserializer = Value;

    fn into_deserializer(self) -> Value {
        self
    }
}

/// Elements of an owned list.
struct SeqOwned(std::vec::IntoIter<Value>);

impl<'de> de::SeqAccess<'de> for SeqOwned {
    type Error = SerdeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, SerdeError> {
        self.0.next().map(|v| seed.deserialize(v)).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

/// Entries of an owned map.
struct MapOwned {
    iter: indexmap::map::IntoIter<String, Value>,
    /// The value of the key just returned, until `next_value_seed` takes it.
    value: Option<Value>,
}

impl<'de> de::MapAccess<'de> for MapOwned {
    type Error = SerdeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, SerdeError> {
        match self.iter.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(Value::Str(k)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, SerdeError> {
        match self.value.take() {
            Some(v) => seed.deserialize(v),
            None => Err(SerdeError::Message("map value requested before its key".into())),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// An enum read from an owned value: the variant name and, for non-unit variants, its
/// content.
struct EnumOwned {
    variant: String,
    value: Option<Value>,
}

impl<'de> de::EnumAccess<'de> for EnumOwned {
    type Error = SerdeError;
    type Variant = VariantOwned;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, VariantOwned), SerdeError> {
        let v = seed.deserialize(Value::Str(self.variant))?;
        Ok((v, VariantOwned(self.value)))
    }
}

/// The content of an enum variant (`None` when the enum was a bare string).
struct VariantOwned(Option<Value>);

/// The error for a variant whose content has the wrong form.
fn variant_mismatch(found: Option<&Value>, expected: &'static str) -> SerdeError {
    let found = match found {
        None => "a unit variant (bare string)",
        Some(v) => v.kind(),
    };
    SerdeError::Message(format!("invalid type: {found}, expected {expected}"))
}

impl<'de> de::VariantAccess<'de> for VariantOwned {
    type Error = SerdeError;

    fn unit_variant(self) -> Result<(), SerdeError> {
        match self.0 {
            None | Some(Value::Nil) => Ok(()),
            Some(v) => Err(variant_mismatch(Some(&v), "a unit variant")),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, SerdeError> {
        match self.0 {
            Some(v) => seed.deserialize(v),
            None => Err(variant_mismatch(None, "a newtype variant")),
        }
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, SerdeError> {
        match self.0 {
            Some(v) => v.deserialize_seq(visitor),
            None => Err(variant_mismatch(None, "a tuple variant")),
        }
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        match self.0 {
            Some(v) => v.deserialize_any(visitor),
            None => Err(variant_mismatch(None, "a struct variant")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The borrowing deserializer: &Value -> Rust
// ---------------------------------------------------------------------------------------

/// Deserializes from a borrowed `Value`; strings and bytes are offered as borrowed, so
/// `&'de str` / `&'de [u8]` targets copy nothing. Decoded variants other than `Set` go
/// through an owned copy of their wire form (cheap for arrays: `Bytes` is refcounted).
impl<'de> Deserializer<'de> for &'de Value {
    type Error = SerdeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self {
            Value::Nil => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::UInt(u) => visitor.visit_u64(*u),
            Value::F32(f) => visitor.visit_f32(*f),
            Value::F64(f) => visitor.visit_f64(*f),
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Bytes(b) => visitor.visit_borrowed_bytes(b),
            Value::List(l) | Value::Set(l) => {
                let mut seq = SeqRef(l.iter());
                let out = visitor.visit_seq(&mut seq)?;
                match seq.0.len() {
                    0 => Ok(out),
                    _ => Err(de::Error::invalid_length(l.len(), &"fewer elements in the list")),
                }
            }
            Value::Map(m) => {
                let mut access = MapRef { iter: m.iter(), value: None };
                let out = visitor.visit_map(&mut access)?;
                match access.iter.len() {
                    0 => Ok(out),
                    _ => Err(de::Error::invalid_length(m.len(), &"fewer entries in the map")),
                }
            }
            Value::Function(_) | Value::Generator(_) | Value::Custom(_) => {
                Err(SerdeError::NotData(self.kind()))
            }
            typed => into_wire(typed.clone())?.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self {
            Value::Nil => visitor.visit_none(),
            v => visitor.visit_some(v),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        match self {
            Value::Str(variant) => visitor.visit_enum(EnumRef { variant, value: None }),
            Value::Map(m) if m.len() == 1 => match m.iter().next() {
                Some((variant, value)) => visitor.visit_enum(EnumRef { variant, value: Some(value) }),
                None => Err(SerdeError::Message("empty map for an enum".into())),
            },
            other => Err(bad_enum(other)),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self {
            Value::Bytes(b) | Value::MemoryView(b) => visitor.visit_borrowed_bytes(b),
            v => v.deserialize_any(visitor),
        }
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        match self {
            Value::Bytes(b) | Value::MemoryView(b) => visit_byte_seq(b, visitor),
            v => v.deserialize_any(visitor),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, SerdeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SerdeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        unit unit_struct tuple_struct map struct identifier
    }
}

/// Elements of a borrowed list.
struct SeqRef<'de>(std::slice::Iter<'de, Value>);

impl<'de> de::SeqAccess<'de> for SeqRef<'de> {
    type Error = SerdeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, SerdeError> {
        self.0.next().map(|v| seed.deserialize(v)).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

/// Entries of a borrowed map.
struct MapRef<'de> {
    iter: indexmap::map::Iter<'de, String, Value>,
    /// The value of the key just returned, until `next_value_seed` takes it.
    value: Option<&'de Value>,
}

impl<'de> de::MapAccess<'de> for MapRef<'de> {
    type Error = SerdeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, SerdeError> {
        match self.iter.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(BorrowedStrDeserializer::new(k)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, SerdeError> {
        match self.value.take() {
            Some(v) => seed.deserialize(v),
            None => Err(SerdeError::Message("map value requested before its key".into())),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// An enum read from a borrowed value.
struct EnumRef<'de> {
    variant: &'de str,
    value: Option<&'de Value>,
}

impl<'de> de::EnumAccess<'de> for EnumRef<'de> {
    type Error = SerdeError;
    type Variant = VariantRef<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, VariantRef<'de>), SerdeError> {
        let v = seed.deserialize(BorrowedStrDeserializer::new(self.variant))?;
        Ok((v, VariantRef(self.value)))
    }
}

/// The content of a borrowed enum variant.
struct VariantRef<'de>(Option<&'de Value>);

impl<'de> de::VariantAccess<'de> for VariantRef<'de> {
    type Error = SerdeError;

    fn unit_variant(self) -> Result<(), SerdeError> {
        match self.0 {
            None | Some(Value::Nil) => Ok(()),
            Some(v) => Err(variant_mismatch(Some(v), "a unit variant")),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, SerdeError> {
        match self.0 {
            Some(v) => seed.deserialize(v),
            None => Err(variant_mismatch(None, "a newtype variant")),
        }
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, SerdeError> {
        match self.0 {
            Some(v) => v.deserialize_seq(visitor),
            None => Err(variant_mismatch(None, "a tuple variant")),
        }
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SerdeError> {
        match self.0 {
            Some(v) => v.deserialize_any(visitor),
            None => Err(variant_mismatch(None, "a struct variant")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::map;
    use crate::value::{DType, ErrorValue, Function, LocalFunction, NdArray, TypedArray};

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Unit;

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Meters(f64);

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    enum Shape {
        Empty,
        Circle(f64),
        Rect(u32, u32),
        Poly { points: Vec<(i32, i32)>, closed: bool },
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Inner {
        label: String,
        shape: Shape,
        children: Vec<Inner>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Rich {
        name: String,
        min: i64,
        max: u64,
        small: i8,
        single: f32,
        double: f64,
        letter: char,
        #[serde(with = "serde_bytes")]
        blob: Vec<u8>,
        plain_vec: Vec<u8>,
        some: Option<u32>,
        none: Option<String>,
        tuple: (u8, String, bool),
        unit: (),
        unit_struct: Unit,
        newtype: Meters,
        shapes: Vec<Shape>,
        inner: Inner,
        table: HashMap<String, Vec<i32>>,
        free: Value,
    }

    fn rich() -> Rich {
        Rich {
            name: "ünïcode ✓".into(),
            min: i64::MIN,
            max: u64::MAX,
            small: -5,
            single: 1.5,
            double: -0.1,
            letter: 'λ',
            blob: vec![0, 1, 255],
            plain_vec: vec![7, 8],
            some: Some(42),
            none: None,
            tuple: (9, "t".into(), true),
            unit: (),
            unit_struct: Unit,
            newtype: Meters(3.25),
            shapes: vec![
                Shape::Empty,
                Shape::Circle(2.0),
                Shape::Rect(3, 4),
                Shape::Poly { points: vec![(0, 0), (1, -1)], closed: true },
            ],
            inner: Inner {
                label: "root".into(),
                shape: Shape::Empty,
                children: vec![Inner { label: "leaf".into(), shape: Shape::Circle(1.0), children: vec![] }],
            },
            table: HashMap::from([("a".into(), vec![1, 2]), ("b".into(), vec![])]),
            free: Value::Map(map! { "k" => 1, "l" => Value::List(vec![Value::Nil, "x".into()]) }),
        }
    }

    #[test]
    fn rich_struct_round_trips() {
        let r = rich();
        let v = to_value(&r).unwrap();
        assert_eq!(from_value::<Rich>(v.clone()).unwrap(), r);
        assert_eq!(from_value_ref::<Rich>(&v).unwrap(), r);
        // And through JSON, which exercises `impl Serialize/Deserialize for Value` (bytes
        // become a list of numbers in JSON, which the byte-buf visitor accepts).
        let json = serde_json::to_string(&v).unwrap();
        let back: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(from_value::<Rich>(back).unwrap(), r);
    }

    #[test]
    fn rich_struct_has_the_documented_shape() {
        let v = to_value(&rich()).unwrap();
        let m = v.as_map().unwrap();
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(&keys[..4], &["name", "min", "max", "small"], "struct fields keep their order");
        assert_eq!(m["min"], Value::Int(i64::MIN));
        assert_eq!(m["max"], Value::UInt(u64::MAX));
        assert_eq!(m["small"], Value::Int(-5));
        assert_eq!(m["single"], Value::F32(1.5));
        assert_eq!(m["double"], Value::F64(-0.1));
        assert_eq!(m["letter"], Value::Str("λ".into()));
        assert_eq!(m["blob"], Value::Bytes(Bytes::from_static(&[0, 1, 255])));
        assert_eq!(m["plain_vec"], Value::List(vec![Value::Int(7), Value::Int(8)]));
        assert_eq!(m["some"], Value::Int(42));
        assert_eq!(m["none"], Value::Nil);
        assert_eq!(m["tuple"], Value::List(vec![9.into(), "t".into(), true.into()]));
        assert_eq!(m["unit"], Value::Nil);
        assert_eq!(m["unit_struct"], Value::Nil);
        assert_eq!(m["newtype"], Value::F64(3.25));
        let shapes = m["shapes"].as_list().unwrap();
        assert_eq!(shapes[0], Value::Str("Empty".into()));
        assert_eq!(shapes[1], Value::Map(map! { "Circle" => 2.0 }));
        assert_eq!(shapes[2], Value::Map(map! { "Rect" => Value::List(vec![3.into(), 4.into()]) }));
        let poly = shapes[3].as_map().unwrap()["Poly"].as_map().unwrap();
        assert_eq!(poly["closed"], Value::Bool(true));
        assert_eq!(m["table"].as_map().unwrap()["a"], Value::List(vec![1.into(), 2.into()]));
    }

    #[test]
    fn enums_match_serde_json() {
        for s in [
            Shape::Empty,
            Shape::Circle(0.5),
            Shape::Rect(1, 2),
            Shape::Poly { points: vec![], closed: false },
        ] {
            let ours = serde_json::to_value(to_value(&s).unwrap()).unwrap();
            assert_eq!(ours, serde_json::to_value(&s).unwrap());
        }
    }

    #[test]
    fn borrowed_fields_point_into_the_value() {
        #[derive(Deserialize)]
        struct View<'a> {
            #[serde(borrow)]
            s: &'a str,
            #[serde(borrow)]
            b: &'a [u8],
        }
        let v = Value::Map(map! { "s" => "hello", "b" => Bytes::from_static(b"raw") });
        let view: View<'_> = from_value_ref(&v).unwrap();
        let m = v.as_map().unwrap();
        assert_eq!(view.s.as_ptr(), m["s"].as_str().unwrap().as_ptr());
        assert_eq!(view.b.as_ptr(), m["b"].as_bytes().unwrap().as_ptr());
    }

    #[test]
    fn numbers_convert_with_range_checks() {
        assert_eq!(from_value::<u8>(Value::Int(255)).unwrap(), 255);
        assert_eq!(from_value::<i16>(Value::Int(-300)).unwrap(), -300);
        assert_eq!(from_value::<u64>(Value::UInt(u64::MAX)).unwrap(), u64::MAX);
        assert_eq!(from_value::<i128>(Value::UInt(u64::MAX)).unwrap(), i128::from(u64::MAX));
        assert_eq!(from_value::<f64>(Value::Int(3)).unwrap(), 3.0);
        assert_eq!(from_value::<f64>(Value::F32(0.5)).unwrap(), 0.5);
        assert_eq!(from_value::<f32>(Value::F64(0.25)).unwrap(), 0.25);
        assert_eq!(from_value::<f32>(Value::UInt(u64::MAX)).unwrap(), u64::MAX as f32);

        let e = from_value::<i8>(Value::Int(300)).unwrap_err();
        assert!(e.to_string().contains("300"), "{e}");
        assert!(from_value::<i8>(Value::UInt(u64::MAX)).is_err());
        assert!(from_value::<i64>(Value::UInt(u64::MAX)).is_err());
        assert!(from_value::<u32>(Value::Int(-1)).is_err());
        assert!(from_value::<i32>(Value::F64(1.0)).is_err());
        assert!(from_value::<i32>(Value::Str("1".into())).is_err());

        assert_eq!(to_value(&(i64::MAX as i128 + 1)).unwrap(), Value::UInt(1 << 63));
        assert_eq!(to_value(&-1i128).unwrap(), Value::Int(-1));
        assert_eq!(to_value(&5u128).unwrap(), Value::Int(5));
        assert_eq!(
            to_value(&(u64::MAX as i128 + 1)).unwrap_err(),
            SerdeError::IntegerOutOfRange("18446744073709551616".into())
        );
        assert!(matches!(to_value(&i128::MIN), Err(SerdeError::IntegerOutOfRange(_))));
        assert!(matches!(to_value(&u128::MAX), Err(SerdeError::IntegerOutOfRange(_))));
    }

    #[test]
    fn bytes_into_byte_containers() {
        let v = Value::Bytes(Bytes::from_static(&[1, 2, 3]));
        assert_eq!(from_value::<Vec<u8>>(v.clone()).unwrap(), vec![1, 2, 3]);
        assert_eq!(from_value_ref::<Vec<u8>>(&v).unwrap(), vec![1, 2, 3]);
        assert_eq!(from_value::<[u8; 3]>(v.clone()).unwrap(), [1, 2, 3]);
        assert!(from_value::<[u8; 2]>(v.clone()).is_err(), "length is checked");
        assert_eq!(from_value::<serde_bytes::ByteBuf>(v.clone()).unwrap().into_vec(), vec![1, 2, 3]);
        let mv = Value::MemoryView(Bytes::from_static(b"mv"));
        assert_eq!(from_value::<serde_bytes::ByteBuf>(mv.clone()).unwrap().into_vec(), b"mv");
        assert_eq!(from_value_ref::<&serde_bytes::Bytes>(&mv).unwrap().as_ref(), b"mv");
        // serde's `String` accepts UTF-8 bytes (Python peers sometimes send str as bytes),
        // but not invalid ones.
        assert_eq!(from_value::<String>(Value::Bytes(Bytes::from_static(b"ok"))).unwrap(), "ok");
        assert!(from_value::<String>(Value::Bytes(Bytes::from_static(&[0xff]))).is_err());
        assert!(from_value::<u8>(v).is_err());
    }

    #[test]
    fn options_and_units() {
        assert_eq!(from_value::<Option<i32>>(Value::Nil).unwrap(), None);
        assert_eq!(from_value::<Option<i32>>(Value::Int(1)).unwrap(), Some(1));
        assert_eq!(from_value::<Option<Option<i32>>>(Value::Int(1)).unwrap(), Some(Some(1)));
        from_value::<()>(Value::Nil).unwrap();
        assert!(from_value::<()>(Value::Int(0)).is_err());
        assert_eq!(from_value::<Unit>(Value::Nil).unwrap(), Unit);
        assert_eq!(to_value(&Some(Some(3u8))).unwrap(), Value::Int(3));
    }

    #[test]
    fn map_keys_must_be_strings() {
        let e = to_value(&HashMap::from([(1u32, "one")])).unwrap_err();
        assert_eq!(e, SerdeError::NonStringKey("int"));
        assert!(e.to_string().contains("map keys must be strings"), "{e}");
        assert_eq!(to_value(&BTreeMap::from([(true, 1)])).unwrap_err(), SerdeError::NonStringKey("bool"));
        // Strings, chars and unit variants are string keys.
        #[derive(Serialize, Deserialize, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
        enum Key {
            Alpha,
        }
        let v = to_value(&BTreeMap::from([(Key::Alpha, 1)])).unwrap();
        assert_eq!(v, Value::Map(map! { "Alpha" => 1 }));
        assert_eq!(from_value::<BTreeMap<Key, i32>>(v).unwrap(), BTreeMap::from([(Key::Alpha, 1)]));
        assert_eq!(to_value(&BTreeMap::from([('c', 1)])).unwrap(), Value::Map(map! { "c" => 1 }));
        // A string key does not silently turn into an integer either.
        assert!(from_value::<HashMap<u32, i32>>(Value::Map(map! { "1" => 1 })).is_err());
        // Nor does a format with integer keys produce a `Value::Map`.
        let e =
            Value::deserialize(de::value::MapDeserializer::<_, SerdeError>::new([(1u8, 2u8)].into_iter()))
                .unwrap_err();
        assert_eq!(e, SerdeError::Message(SerdeError::NonStringKey("int").to_string()));
    }

    #[test]
    fn wrong_shapes_are_errors() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Pair {
            a: i32,
            b: i32,
        }
        let e = from_value::<Pair>(Value::Map(map! { "a" => 1 })).unwrap_err();
        assert!(e.to_string().contains("missing field `b`"), "{e}");
        assert!(from_value::<Pair>(Value::List(vec![])).is_err());
        assert!(from_value::<Pair>(Value::Int(1)).is_err());
        let e = from_value::<(i32, i32)>(Value::List(vec![1.into(), 2.into(), 3.into()])).unwrap_err();
        assert!(e.to_string().contains("invalid length 3"), "{e}");
        assert!(from_value_ref::<(i32, i32)>(&Value::List(vec![1.into()])).is_err());
        assert!(from_value::<Vec<i32>>(Value::Map(Map::new())).is_err());
        // Enums
        let two = Value::Map(map! { "Circle" => 1.0, "Empty" => Value::Nil });
        assert!(from_value::<Shape>(two).unwrap_err().to_string().contains("single key"));
        let e = from_value::<Shape>(Value::Str("Hexagon".into())).unwrap_err();
        assert!(e.to_string().contains("unknown variant `Hexagon`"), "{e}");
        assert!(from_value::<Shape>(Value::Str("Circle".into())).is_err(), "newtype variant needs content");
        assert!(from_value::<Shape>(Value::Map(map! { "Empty" => 1 })).is_err());
        assert!(from_value::<Shape>(Value::Map(map! { "Rect" => 1 })).is_err());
        assert_eq!(from_value::<Shape>(Value::Map(map! { "Empty" => Value::Nil })).unwrap(), Shape::Empty);
        assert_eq!(
            from_value_ref::<Shape>(&Value::Map(map! { "Rect" => Value::List(vec![1.into(), 2.into()]) }))
                .unwrap(),
            Shape::Rect(1, 2)
        );
    }

    #[test]
    fn wire_values_round_trip_through_value() {
        let v = Value::Map(map! {
            "n" => Value::Nil, "b" => true, "i" => -3, "u" => u64::MAX, "f" => 1.5f32, "d" => 2.5,
            "s" => "x", "y" => Bytes::from_static(b"\x00\xff"),
            "l" => Value::List(vec![Value::Map(map! { "z" => 0 })]),
        });
        assert_eq!(to_value(&v).unwrap(), v);
        assert_eq!(from_value::<Value>(v.clone()).unwrap(), v);
        assert_eq!(from_value_ref::<Value>(&v).unwrap(), v);
    }

    #[test]
    fn value_from_json_is_canonical() {
        let v: Value =
            serde_json::from_str(r#"{"a":1,"b":[1.5,null,"x"],"c":18446744073709551615,"d":-2}"#).unwrap();
        assert_eq!(
            v,
            Value::Map(map! {
                "a" => Value::Int(1),
                "b" => Value::List(vec![1.5.into(), Value::Nil, "x".into()]),
                "c" => Value::UInt(u64::MAX),
                "d" => Value::Int(-2),
            })
        );
    }

    #[test]
    fn typed_variants_use_their_wire_form() {
        let nd = Value::from(NdArray {
            dtype: DType::UInt8,
            shape: vec![2, 1],
            data: Bytes::from_static(&[5, 6]),
        });
        let json = serde_json::to_value(&nd).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"_rtype": "ndarray", "_rvalue": [5, 6], "_rshape": [2, 1], "_rdtype": "uint8"})
        );
        let wire = to_value(&nd).unwrap();
        assert_eq!(wire.as_map().unwrap()["_rvalue"], Value::Bytes(Bytes::from_static(&[5, 6])));
        assert_eq!(from_value::<Value>(nd.clone()).unwrap(), wire);
        assert_eq!(from_value_ref::<Value>(&nd).unwrap(), wire);

        let err = Value::from(ErrorValue::new("boom"));
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            serde_json::json!({"_rtype": "error", "_rvalue": "boom", "_rtrace": null})
        );
        #[derive(Deserialize)]
        struct Remote {
            _rvalue: String,
        }
        assert_eq!(from_value::<Remote>(err).unwrap()._rvalue, "boom");

        let set = Value::Set(vec![1.into(), 2.into()]);
        assert_eq!(serde_json::to_string(&set).unwrap(), "[1,2]");
        assert_eq!(from_value::<Vec<i32>>(set.clone()).unwrap(), vec![1, 2]);
        assert_eq!(from_value_ref::<Vec<i32>>(&set).unwrap(), vec![1, 2]);

        let om = Value::OrderedMap(vec![(Value::Int(1), "one".into())]);
        assert_eq!(
            serde_json::to_value(&om).unwrap(),
            serde_json::json!({"_rtype": "orderedmap", "_rvalue": [[1, "one"]]})
        );
        assert_eq!(from_value_ref::<Value>(&om).unwrap(), to_value(&om).unwrap());

        let ta = Value::TypedArray(Box::new(TypedArray {
            dtype: DType::Int16,
            data: Bytes::from_static(&[1, 0]),
        }));
        assert_eq!(
            serde_json::to_value(&ta).unwrap(),
            serde_json::json!({"_rtype": "typedarray", "_rvalue": [1, 0], "_rdtype": "int16"})
        );
        let mv = Value::MemoryView(Bytes::from_static(b"a"));
        assert_eq!(
            serde_json::to_value(&mv).unwrap(),
            serde_json::json!({"_rtype": "memoryview", "_rvalue": [97]})
        );
    }

    #[test]
    fn live_objects_are_not_data() {
        let f = Value::from(Function::Local(LocalFunction::new(crate::value::Handler::new(()))));
        let e = to_value(&f).unwrap_err();
        assert_eq!(e, SerdeError::Message(SerdeError::NotData("function").to_string()));
        let e = serde_json::to_string(&f).unwrap_err();
        assert!(e.to_string().contains("function value is a live object"), "{e}");
        assert_eq!(from_value::<Value>(f.clone()).unwrap_err(), SerdeError::NotData("function"));
        assert_eq!(from_value_ref::<Value>(&f).unwrap_err(), SerdeError::NotData("function"));
        // Skipping a field that holds one is fine.
        #[derive(Deserialize, Debug, PartialEq)]
        struct OnlyA {
            a: i32,
        }
        let v = Value::Map(map! { "a" => 1, "cb" => f });
        assert_eq!(from_value::<OnlyA>(v.clone()).unwrap(), OnlyA { a: 1 });
        assert_eq!(from_value_ref::<OnlyA>(&v).unwrap(), OnlyA { a: 1 });
    }
}
