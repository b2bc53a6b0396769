//! msgpack reader and writer for the wire variants of [`Value`].
//!
//! hypha-rpc packages are msgpack written by Python's `msgpack` 1.0.x (`use_bin_type=True`,
//! `strict_map_key=True`) and by JS `@msgpack/msgpack`. This module reads and writes exactly
//! the subset those peers exchange (spec §2.1, §5.1), with our own code so that we control
//! three things a general-purpose crate does not give us together:
//!
//! * **Zero-copy `bin`.** A received frame is a [`Bytes`]; every `bin` payload becomes a
//!   `buf.slice(..)` of it, so a 64 MB float32 array passes through without a copy.
//! * **Bounded resources on hostile input.** The reader walks the slice itself with an
//!   explicit stack (no recursion, so no stack overflow whatever the nesting), refuses to
//!   nest deeper than [`DecodeLimits::max_depth`], and never reserves memory for more
//!   elements than the unread input could possibly hold (see [`decode`]).
//! * **Byte-identical output.** The writer picks the smallest header of each family as
//!   Python's packer does, so a frame we re-encode is the frame Python would have sent
//!   (golden tests below).
//!
//! The reader reports where the value ended, because a package is two msgpack objects
//! back to back with no length prefix (spec §11 item 1); see [`crate::package`].

use std::ops::Range;

use bytes::Bytes;
use rmp::Marker;

use crate::value::{Map, Value};

/// The deepest container nesting we read by default and the deepest we ever write.
///
/// 512 accepts everything a Python peer can send: Python's packer (msgpack 1.0.8) refuses
/// to write more than 511 nested containers ("recursion limit exceeded"), and realistic
/// hypha data is far shallower (the Python test-suite's deepest is a map nested 50 deep).
/// Python's *unpacker* would accept up to 1024; raise [`DecodeLimits::max_depth`] to match
/// it if ever needed (the reader is iterative, so any value is safe for the reader itself).
///
/// The bound exists for the code that walks a decoded tree recursively afterwards: `Drop`,
/// `PartialEq`, the `_rtype` codec. Measured in a debug build on a 1024-deep value:
/// dropping needs < 256 KiB of stack, `Value::eq` ~1-2 MiB (about 1-2 KiB per level).
/// At 512 levels a recursive walker with frames up to ~3 KiB still fits a 2 MiB thread
/// stack. Our own [`decode`] and [`encode`] are iterative and use no stack per level.
pub const MAX_DEPTH: usize = 512;

/// Resource limits for [`decode`]. The input length already bounds everything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Maximum number of nested containers (arrays and maps, empty ones included). The
    /// default is [`MAX_DEPTH`] (512), above what any Python peer can send.
    pub max_depth: usize,
    /// Maximum number of values (scalars, containers and map keys) in one decoded object.
    ///
    /// Every value needs at least one input byte, so the count is always bounded by the
    /// input length; but one byte of input (`nil`) becomes a whole [`Value`] (up to 72
    /// bytes) in memory. Set this to cap that amplification for untrusted peers; the
    /// default (`usize::MAX`) relies on the transport's frame size limit alone, as
    /// Python's unpacker does.
    pub max_items: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_depth: MAX_DEPTH, max_items: usize::MAX }
    }
}

/// Why bytes could not be read as a wire [`Value`]. Every variant carries the byte offset
/// (into the whole buffer given to [`decode`]) of the offending item, for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends before the item at `offset` is complete: it needs at least `needed`
    /// bytes from `offset` (counting elements its containers still owe), `available` remain.
    #[error(
        "truncated msgpack: the item at byte {offset} needs at least {needed} bytes, {available} remain"
    )]
    Truncated {
        /// Offset of the item (or container header) that runs past the end.
        offset: usize,
        /// Minimum bytes required from `offset`.
        needed: usize,
        /// Bytes actually left from `offset`.
        available: usize,
    },
    /// Marker `0xc1` is reserved ("never used") in the msgpack spec.
    #[error("reserved msgpack marker 0xc1 at byte {offset}")]
    ReservedMarker {
        /// Offset of the marker.
        offset: usize,
    },
    /// A msgpack str that is not valid UTF-8 (Python raises `UnicodeDecodeError`).
    #[error("invalid UTF-8 in msgpack str at byte {offset}")]
    InvalidUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// A map key that is not a str. Python unpacks with `strict_map_key=True` and fails
    /// the same way (`"int is not allowed for map key"`); it also accepts `bin` keys, but
    /// our [`Map`] is string-keyed and no hypha peer sends bin keys, so we reject them too.
    #[error("{kind} is not allowed for map key (at byte {offset})")]
    NonStrKey {
        /// The msgpack family of the key: `nil`, `bool`, `int`, `float`, `bin`, `array`,
        /// `map` or `ext`.
        kind: &'static str,
        /// Offset of the key.
        offset: usize,
    },
    /// An ext value (including the timestamp, type -1): no hypha peer sends them.
    #[error("msgpack ext type {ext_type} at byte {offset} is not supported")]
    Ext {
        /// The ext type byte.
        ext_type: i8,
        /// Offset of the ext marker.
        offset: usize,
    },
    /// More than [`DecodeLimits::max_depth`] nested containers.
    #[error("msgpack nesting deeper than {max_depth} at byte {offset}")]
    TooDeep {
        /// The limit that was exceeded.
        max_depth: usize,
        /// Offset of the container that would exceed it.
        offset: usize,
    },
    /// More than [`DecodeLimits::max_items`] values.
    #[error("msgpack object has more than {max_items} values (at byte {offset})")]
    TooManyItems {
        /// The limit that was exceeded.
        max_items: usize,
        /// Offset of the first value over the limit.
        offset: usize,
    },
}

/// Why a [`Value`] could not be written as msgpack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A decoded-only variant (`ndarray`, `function`, ...): run the `_rtype` codec first.
    #[error("cannot write a {0} value as msgpack: encode it with the _rtype codec first")]
    NotWire(&'static str),
    /// A str, bin, array or map longer than msgpack's 32-bit length field.
    #[error("{kind} of length {len} exceeds the msgpack limit of 4294967295")]
    TooLong {
        /// `str`, `bin`, `array` or `map`.
        kind: &'static str,
        /// The actual length.
        len: usize,
    },
    /// More than [`MAX_DEPTH`] nested containers: a peer with default limits would refuse
    /// the frame (and Python's packer refuses to build one).
    #[error("value nested deeper than {0} containers")]
    TooDeep(usize),
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// What one marker (plus its length/payload bytes) announced.
enum Head {
    /// A complete scalar.
    Scalar(Value),
    /// An array (`map: false`) or map header with its element/entry count.
    Container { len: usize, map: bool },
}

/// A container being filled, on the explicit stack.
enum Frame<'a> {
    List {
        items: Vec<Value>,
        remaining: usize,
    },
    Map {
        map: Map,
        remaining: usize,
        key: Option<String>,
    },
    /// The top-level map of [`decode_entries`]: its entries go to the visitor, keys
    /// borrowed from the buffer.
    Top {
        remaining: usize,
        key: Option<&'a str>,
    },
}

/// [`decode`]'s stack of open containers: the first two inline, deeper ones in a `Vec`.
/// Two because a call's payload is a map holding a list (`args`): decoding it allocates
/// for neither.
#[derive(Default)]
struct Frames<'a> {
    inline: [Option<Frame<'a>>; 2],
    deeper: Vec<Frame<'a>>,
    len: usize,
}

impl<'a> Frames<'a> {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, frame: Frame<'a>) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = Some(frame),
            None => self.deeper.push(frame),
        }
        self.len += 1;
    }

    fn pop(&mut self) -> Option<Frame<'a>> {
        self.len = self.len.checked_sub(1)?;
        match self.inline.get_mut(self.len) {
            Some(slot) => slot.take(),
            None => self.deeper.pop(),
        }
    }

    fn last_mut(&mut self) -> Option<&mut Frame<'a>> {
        let top = self.len.checked_sub(1)?;
        match self.inline.get_mut(top) {
            Some(slot) => slot.as_mut(),
            None => self.deeper.last_mut(),
        }
    }
}

/// A cursor over the buffer; `data` is `buf`'s contents, kept to avoid re-derefs.
struct Reader<'a> {
    buf: &'a Bytes,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn truncated(&self, offset: usize, needed: usize) -> DecodeError {
        DecodeError::Truncated { offset, needed, available: self.data.len().saturating_sub(offset) }
    }

    /// Takes `n` bytes at the cursor; `item` is the offset of the item they belong to.
    fn take(&mut self, n: usize, item: usize) -> Result<&'a [u8], DecodeError> {
        let data: &'a [u8] = self.data;
        let end = self.pos.checked_add(n).filter(|&e| e <= data.len());
        match end {
            Some(end) => {
                let s = &data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.truncated(item, (self.pos - item).saturating_add(n))),
        }
    }

    fn array<const N: usize>(&mut self, item: usize) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, item)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, item: usize) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(item)?[0])
    }

    fn u16(&mut self, item: usize) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(item)?))
    }

    fn u32(&mut self, item: usize) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(item)?))
    }

    fn str(&mut self, len: usize, item: usize) -> Result<String, DecodeError> {
        self.str_ref(len, item).map(str::to_owned)
    }

    /// [`Reader::str`] without the copy: the UTF-8-checked str in place.
    fn str_ref(&mut self, len: usize, item: usize) -> Result<&'a str, DecodeError> {
        let start = self.pos;
        let s = self.take(len, item)?;
        utf8(s).map_err(|e| DecodeError::InvalidUtf8 { offset: start + e.valid_up_to() })
    }

    fn bin(&mut self, len: usize, item: usize) -> Result<Value, DecodeError> {
        let start = self.pos;
        self.take(len, item)?;
        Ok(Value::Bytes(self.buf.slice(start..self.pos)))
    }

    /// Reads an ext type byte (it follows the length) only to report it.
    fn ext(&mut self, item: usize) -> DecodeError {
        match self.u8(item) {
            Ok(t) => DecodeError::Ext { ext_type: t as i8, offset: item },
            Err(e) => e,
        }
    }

    /// Reads one marker and whatever follows it up to (not including) container elements.
    fn head(&mut self) -> Result<Head, DecodeError> {
        let at = self.pos;
        let m = Marker::from_u8(self.u8(at)?);
        let scalar = |v| Ok(Head::Scalar(v));
        match m {
            Marker::FixPos(n) => scalar(Value::Int(i64::from(n))),
            Marker::FixNeg(n) => scalar(Value::Int(i64::from(n))),
            Marker::Null => scalar(Value::Nil),
            Marker::True => scalar(Value::Bool(true)),
            Marker::False => scalar(Value::Bool(false)),
            Marker::U8 => scalar(Value::Int(i64::from(self.u8(at)?))),
            Marker::U16 => scalar(Value::Int(i64::from(self.u16(at)?))),
            Marker::U32 => scalar(Value::Int(i64::from(self.u32(at)?))),
            Marker::U64 => scalar(Value::from(u64::from_be_bytes(self.array(at)?))),
            Marker::I8 => scalar(Value::Int(i64::from(i8::from_be_bytes(self.array(at)?)))),
            Marker::I16 => scalar(Value::Int(i64::from(i16::from_be_bytes(self.array(at)?)))),
            Marker::I32 => scalar(Value::Int(i64::from(i32::from_be_bytes(self.array(at)?)))),
            Marker::I64 => scalar(Value::Int(i64::from_be_bytes(self.array(at)?))),
            Marker::F32 => scalar(Value::F32(f32::from_be_bytes(self.array(at)?))),
            Marker::F64 => scalar(Value::F64(f64::from_be_bytes(self.array(at)?))),
            Marker::FixStr(n) => scalar(Value::Str(self.str(usize::from(n), at)?)),
            Marker::Str8 => {
                let n = self.u8(at)?;
                scalar(Value::Str(self.str(usize::from(n), at)?))
            }
            Marker::Str16 => {
                let n = self.u16(at)?;
                scalar(Value::Str(self.str(usize::from(n), at)?))
            }
            Marker::Str32 => {
                let n = self.u32(at)?;
                scalar(Value::Str(self.str(n as usize, at)?))
            }
            Marker::Bin8 => {
                let n = self.u8(at)?;
                scalar(self.bin(usize::from(n), at)?)
            }
            Marker::Bin16 => {
                let n = self.u16(at)?;
                scalar(self.bin(usize::from(n), at)?)
            }
            Marker::Bin32 => {
                let n = self.u32(at)?;
                scalar(self.bin(n as usize, at)?)
            }
            Marker::FixArray(n) => Ok(Head::Container { len: usize::from(n), map: false }),
            Marker::Array16 => Ok(Head::Container { len: usize::from(self.u16(at)?), map: false }),
            Marker::Array32 => Ok(Head::Container { len: self.u32(at)? as usize, map: false }),
            Marker::FixMap(n) => Ok(Head::Container { len: usize::from(n), map: true }),
            Marker::Map16 => Ok(Head::Container { len: usize::from(self.u16(at)?), map: true }),
            Marker::Map32 => Ok(Head::Container { len: self.u32(at)? as usize, map: true }),
            Marker::FixExt1 => Err(self.ext(at)),
            Marker::FixExt2 => Err(self.ext(at)),
            Marker::FixExt4 => Err(self.ext(at)),
            Marker::FixExt8 => Err(self.ext(at)),
            Marker::FixExt16 => Err(self.ext(at)),
            Marker::Ext8 => {
                self.take(1, at)?;
                Err(self.ext(at))
            }
            Marker::Ext16 => {
                self.take(2, at)?;
                Err(self.ext(at))
            }
            Marker::Ext32 => {
                self.take(4, at)?;
                Err(self.ext(at))
            }
            Marker::Reserved => Err(DecodeError::ReservedMarker { offset: at }),
        }
    }

    /// Reads a map key, which must be a str; other families are named in the error
    /// without being decoded.
    fn key(&mut self) -> Result<String, DecodeError> {
        self.key_ref().map(str::to_owned)
    }

    /// [`Reader::key`] without the copy. The keys of every hypha package (see
    /// [`known_key`]) are recognized by their bytes and need no UTF-8 check, which is most
    /// of the cost of reading a short key.
    fn key_ref(&mut self) -> Result<&'a str, DecodeError> {
        let (start, bytes) = self.key_bytes()?;
        match known_key(bytes) {
            Some(key) => Ok(key),
            None => utf8(bytes).map_err(|e| DecodeError::InvalidUtf8 { offset: start + e.valid_up_to() }),
        }
    }

    /// [`Reader::key_ref`] for a key nobody reads (inside a skipped value): the same
    /// checks, without matching it against the [`known_key`]s.
    fn skip_key(&mut self) -> Result<(), DecodeError> {
        let (start, bytes) = self.key_bytes()?;
        match utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) => Err(DecodeError::InvalidUtf8 { offset: start + e.valid_up_to() }),
        }
    }

    /// A key's marker and bytes (not yet checked as UTF-8), and where the bytes start.
    fn key_bytes(&mut self) -> Result<(usize, &'a [u8]), DecodeError> {
        let at = self.pos;
        let m = Marker::from_u8(self.u8(at)?);
        let len = match m {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 => usize::from(self.u8(at)?),
            Marker::Str16 => usize::from(self.u16(at)?),
            Marker::Str32 => self.u32(at)? as usize,
            Marker::Reserved => return Err(DecodeError::ReservedMarker { offset: at }),
            other => return Err(DecodeError::NonStrKey { kind: marker_family(other), offset: at }),
        };
        let start = self.pos;
        Ok((start, self.take(len, at)?))
    }

    /// The fast path of [`walk`] for the items a package's `main` is made of: a `fixstr`
    /// or `str 8` that is complete and valid is consumed and returned; anything else
    /// (another family, too short, not UTF-8) is left unread for the general path, which
    /// then reads it or reports its error exactly as [`decode`] does.
    #[inline]
    fn short_str(&mut self) -> Option<&'a str> {
        let (bytes, end) = self.short_str_bytes()?;
        let s = match known_key(bytes) {
            Some(key) => key,
            None => utf8(bytes).ok()?,
        };
        self.pos = end;
        Some(s)
    }

    /// [`Reader::short_str`] for a value: values are ids and paths, not the
    /// [`known_key`]s, so matching them against those would only cost time.
    #[inline]
    fn short_value_str(&mut self) -> Option<&'a str> {
        let (bytes, end) = self.short_str_bytes()?;
        let s = utf8(bytes).ok()?;
        self.pos = end;
        Some(s)
    }

    /// The bytes of a complete `fixstr` or `str 8` at the cursor, and where it ends.
    #[inline]
    fn short_str_bytes(&self) -> Option<(&'a [u8], usize)> {
        let data = self.data;
        let (start, len) = match *data.get(self.pos)? {
            m @ 0xa0..=0xbf => (self.pos + 1, usize::from(m & 0x1f)),
            0xd9 => (self.pos + 2, usize::from(*data.get(self.pos + 1)?)),
            _ => return None,
        };
        let end = start + len;
        Some((data.get(start..end)?, end))
    }

    /// [`Reader::head`] without building the scalar: the same reads and the same checks
    /// (UTF-8 of a str, the bytes of every payload), in the same order, so that it fails
    /// exactly where and how `head` fails.
    fn skip_head(&mut self) -> Result<Skipped<'a>, DecodeError> {
        let at = self.pos;
        let m = Marker::from_u8(self.u8(at)?);
        let str = |r: &mut Self, len| r.str_ref(len, at).map(|s| Skipped::Scalar(Some(s)));
        let fixed = match m {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => 0,
            Marker::U8 | Marker::I8 => 1,
            Marker::U16 | Marker::I16 => 2,
            Marker::U32 | Marker::I32 | Marker::F32 => 4,
            Marker::U64 | Marker::I64 | Marker::F64 => 8,
            Marker::FixStr(n) => return str(self, usize::from(n)),
            Marker::Str8 => {
                let n = self.u8(at)?;
                return str(self, usize::from(n));
            }
            Marker::Str16 => {
                let n = self.u16(at)?;
                return str(self, usize::from(n));
            }
            Marker::Str32 => {
                let n = self.u32(at)?;
                return str(self, n as usize);
            }
            Marker::Bin8 => usize::from(self.u8(at)?),
            Marker::Bin16 => usize::from(self.u16(at)?),
            Marker::Bin32 => self.u32(at)? as usize,
            Marker::FixArray(n) => return Ok(Skipped::Container { len: usize::from(n), map: false }),
            Marker::Array16 => return Ok(Skipped::Container { len: usize::from(self.u16(at)?), map: false }),
            Marker::Array32 => return Ok(Skipped::Container { len: self.u32(at)? as usize, map: false }),
            Marker::FixMap(n) => return Ok(Skipped::Container { len: usize::from(n), map: true }),
            Marker::Map16 => return Ok(Skipped::Container { len: usize::from(self.u16(at)?), map: true }),
            Marker::Map32 => return Ok(Skipped::Container { len: self.u32(at)? as usize, map: true }),
            // ext and 0xc1: `head` builds nothing for them, it only reports them.
            _ => {
                self.pos = at;
                return match self.head() {
                    Ok(Head::Scalar(_)) => Ok(Skipped::Scalar(None)),
                    Ok(Head::Container { len, map }) => Ok(Skipped::Container { len, map }),
                    Err(e) => Err(e),
                };
            }
        };
        self.take(fixed, at).map(|_| Skipped::Scalar(None))
    }
}

/// `str::from_utf8`, with the test for ASCII first: nearly every str of a package is
/// ASCII (ids, method names, keys), and for short strs the inlined word-at-a-time ASCII
/// test costs a fraction of the general validator's call and setup (which callgrind
/// showed at about 80 instructions a str, a few thousand per frame).
#[inline]
fn utf8(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    if bytes.is_ascii() {
        // SAFETY: every ASCII byte sequence is valid UTF-8.
        Ok(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes)
    }
}

/// What [`Reader::skip_head`] read.
enum Skipped<'a> {
    /// A complete scalar; the str, if it was one.
    Scalar(Option<&'a str>),
    /// An array (`map: false`) or map header with its element/entry count.
    Container { len: usize, map: bool },
}

/// The keys of a hypha package's segments (spec §2.1: the routing fields of `main`, the
/// payload fields of `extra`), as static strs, or `None`.
fn known_key(bytes: &[u8]) -> Option<&'static str> {
    Some(match bytes {
        b"to" => "to",
        b"ws" => "ws",
        b"from" => "from",
        b"type" => "type",
        b"user" => "user",
        b"method" => "method",
        b"session" => "session",
        b"parent" => "parent",
        b"args" => "args",
        b"with_kwargs" => "with_kwargs",
        b"promise" => "promise",
        _ => return None,
    })
}

/// The msgpack family of a non-str marker, for [`DecodeError::NonStrKey`].
fn marker_family(m: Marker) -> &'static str {
    match m {
        Marker::Null => "nil",
        Marker::True | Marker::False => "bool",
        Marker::FixPos(_)
        | Marker::FixNeg(_)
        | Marker::U8
        | Marker::U16
        | Marker::U32
        | Marker::U64
        | Marker::I8
        | Marker::I16
        | Marker::I32
        | Marker::I64 => "int",
        Marker::F32 | Marker::F64 => "float",
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => "str",
        Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => "bin",
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => "array",
        Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => "map",
        Marker::Reserved => "reserved",
        _ => "ext",
    }
}

/// Decodes one msgpack object starting at `offset` in `buf` and returns it with the
/// offset just past it (so a second object can be read from there, spec §2.1).
///
/// Semantics, chosen to match what a Python peer sees:
/// * Integers are canonical: anything that fits in `i64` is [`Value::Int`] whatever
///   family it came in; only `uint 64` values above `i64::MAX` are [`Value::UInt`].
/// * `float 32` is [`Value::F32`], `float 64` is [`Value::F64`].
/// * `bin` is [`Value::Bytes`], a zero-copy slice of `buf`.
/// * `str` must be valid UTF-8 ([`DecodeError::InvalidUtf8`]).
/// * Map keys must be str ([`DecodeError::NonStrKey`]). **Duplicate keys**: the last value
///   wins and the key keeps the position of its first occurrence, exactly as a Python
///   `dict` built by the unpacker does.
/// * ext (including timestamps) is [`DecodeError::Ext`]; `0xc1` is
///   [`DecodeError::ReservedMarker`]; running out of input anywhere is
///   [`DecodeError::Truncated`].
///
/// Resources: no recursion (an explicit stack of open containers); at most
/// `limits.max_depth` open containers. Before reserving room for a container, the reader
/// checks that the unread input can hold at least one byte for every element still owed
/// by *all* open containers (two per map entry), and fails with `Truncated` otherwise.
/// So declared lengths never cause an allocation larger than the input warrants, and an
/// `array 32` claiming 4e9 elements in 3 bytes fails at once.
pub fn decode(buf: &Bytes, offset: usize, limits: &DecodeLimits) -> Result<(Value, usize), DecodeError> {
    decode_with(buf, offset, limits, None::<fn(&str, Value)>)
}

/// [`decode`] of a map whose entries are wanted one by one rather than as a [`Map`]:
/// each entry of the top-level map goes to `visit` (in wire order, a duplicate key each
/// time it occurs; keys borrowed from `buf`) and `Ok((None, end))` comes back. Anything
/// else than a non-empty map is returned as `decode` returns it (an empty map as
/// `Some(Value::Map)`). The checks, limits and errors are `decode`'s: it is `decode`'s
/// loop, with the top-level map's insertions handed out instead of hashed. The receive
/// path reads the few keys of a call's payload this way (no map, no key copies).
pub fn decode_entries<'a>(
    buf: &'a Bytes,
    offset: usize,
    limits: &DecodeLimits,
    visit: impl FnMut(&'a str, Value),
) -> Result<(Option<Value>, usize), DecodeError> {
    match decode_with(buf, offset, limits, Some(visit)) {
        Ok((Value::Nil, end)) if is_visited_map(buf, offset) => Ok((None, end)),
        Ok((v, end)) => Ok((Some(v), end)),
        Err(e) => Err(e),
    }
}

/// Whether `decode_with` handed the object at `offset` to its visitor: a non-empty map.
fn is_visited_map(data: &[u8], offset: usize) -> bool {
    match data.get(offset) {
        Some(0x81..=0x8f) => true,
        Some(0xde) => data.get(offset + 1..offset + 3).is_some_and(|l| l != [0, 0]),
        Some(0xdf) => data.get(offset + 1..offset + 5).is_some_and(|l| l != [0, 0, 0, 0]),
        _ => false,
    }
}

/// The loop of [`decode`]; with `top`, the top-level map's entries go there (and the
/// map comes back as `Nil`).
fn decode_with<'a>(
    buf: &'a Bytes,
    offset: usize,
    limits: &DecodeLimits,
    mut top: Option<impl FnMut(&'a str, Value)>,
) -> Result<(Value, usize), DecodeError> {
    let data: &'a [u8] = buf;
    let mut r = Reader { buf, data, pos: offset };
    if offset > data.len() {
        return Err(DecodeError::Truncated { offset, needed: 1, available: 0 });
    }
    let mut stack = Frames::default();
    // Slots (values or keys) announced but not yet started; each needs >= 1 unread byte.
    let mut pending: usize = 1;
    let mut items: usize = 0;
    loop {
        let at = r.pos;
        if items >= limits.max_items {
            return Err(DecodeError::TooManyItems { max_items: limits.max_items, offset: at });
        }
        items += 1;
        pending = pending.saturating_sub(1);
        // A map waiting for a key reads it first; the value follows in this iteration.
        match stack.last_mut() {
            Some(Frame::Map { key: slot @ None, .. }) => {
                *slot = Some(r.key()?);
                continue;
            }
            Some(Frame::Top { key: slot @ None, .. }) => {
                *slot = Some(r.key_ref()?);
                continue;
            }
            _ => {}
        }
        let mut value = match r.head()? {
            Head::Scalar(v) => v,
            Head::Container { .. } if stack.len() >= limits.max_depth => {
                return Err(DecodeError::TooDeep { max_depth: limits.max_depth, offset: at });
            }
            Head::Container { len: 0, map: false } => Value::List(Vec::new()),
            Head::Container { len: 0, map: true } => Value::Map(Map::new()),
            Head::Container { len, map } => {
                pending = pending.saturating_add(if map { len.saturating_mul(2) } else { len });
                let available = data.len() - r.pos;
                if pending > available {
                    let header = r.pos - at;
                    return Err(DecodeError::Truncated {
                        offset: at,
                        needed: header.saturating_add(pending),
                        available: available + header,
                    });
                }
                // `len <= available` now: the reservation is bounded by the input.
                stack.push(if map && top.is_some() && stack.is_empty() {
                    Frame::Top { remaining: len, key: None }
                } else if map {
                    Frame::Map { map: Map::with_capacity(len), remaining: len, key: None }
                } else {
                    Frame::List { items: Vec::with_capacity(len), remaining: len }
                });
                continue;
            }
        };
        // Attach the finished value to its parent, closing every container it completes.
        loop {
            let done = match stack.last_mut() {
                None => return Ok((value, r.pos)),
                Some(Frame::List { items, remaining }) => {
                    items.push(value);
                    *remaining -= 1;
                    *remaining == 0
                }
                Some(Frame::Map { map, remaining, key }) => {
                    // The key was read in the previous iteration, so it is always there.
                    map.insert(key.take().unwrap_or_default(), value);
                    *remaining -= 1;
                    *remaining == 0
                }
                Some(Frame::Top { remaining, key }) => {
                    if let Some(visit) = top.as_mut() {
                        visit(key.take().unwrap_or_default(), value);
                    }
                    *remaining -= 1;
                    *remaining == 0
                }
            };
            if !done {
                break;
            }
            value = match stack.pop() {
                Some(Frame::List { items, .. }) => Value::List(items),
                Some(Frame::Map { map, .. }) => Value::Map(map),
                Some(Frame::Top { .. }) | None => Value::Nil, // `None`: unreachable
            };
        }
    }
}

/// One entry of the top-level map met by [`scan_map`], as byte ranges into the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEntry<'a> {
    /// The key (msgpack keys are str; anything else fails the scan, as it fails [`decode`]).
    pub key: &'a str,
    /// The encoded key, header included.
    pub key_bytes: Range<usize>,
    /// The encoded value.
    pub value: Range<usize>,
    /// The value, when it is a str (so that reading it needs no second UTF-8 check).
    pub str: Option<&'a str>,
}

/// An open container on [`skip_nested`]'s stack: what is left of it and what comes next.
struct Pending {
    remaining: usize,
    map: bool,
    key_next: bool,
}

/// [`decode`]'s resource accounting, for [`walk`]: values read so far, and slots (values
/// or keys) announced but not yet started, each of which needs at least one unread byte.
struct Budget {
    items: usize,
    pending: usize,
    max_items: usize,
    /// The highest `pending + position` any container opening reached (the quantity its
    /// `Truncated` check compares with the input length), for [`RepeatCache`].
    high: usize,
}

impl Budget {
    /// Counts the item starting at `at`.
    #[inline]
    fn item(&mut self, at: usize) -> Result<(), DecodeError> {
        if self.items >= self.max_items {
            return Err(DecodeError::TooManyItems { max_items: self.max_items, offset: at });
        }
        self.items += 1;
        self.pending = self.pending.saturating_sub(1);
        Ok(())
    }

    /// Counts the slots of a non-empty container whose header started at `at` and ends
    /// at the reader's position, and checks that the input can hold them.
    #[inline]
    fn open(&mut self, len: usize, map: bool, at: usize, r: &Reader<'_>) -> Result<(), DecodeError> {
        self.pending = self.pending.saturating_add(if map { len.saturating_mul(2) } else { len });
        self.high = self.high.max(self.pending.saturating_add(r.pos));
        let available = r.data.len() - r.pos;
        if self.pending > available {
            let header = r.pos - at;
            return Err(DecodeError::Truncated {
                offset: at,
                needed: header.saturating_add(self.pending),
                available: available + header,
            });
        }
        Ok(())
    }
}

/// Checks one msgpack object at `offset` exactly as [`decode`] would, without building
/// it, reporting every entry of the top-level map to `visit` (in wire order, duplicate keys
/// each time they occur), and returns where the object ends. Nothing is reported when the
/// object is not a map; nested containers are checked, not reported. A failed scan may
/// have reported some entries before the error.
///
/// "Exactly" is the contract: same limits, same checks (UTF-8, str keys, no ext), in the
/// same order, so the same input gives the same [`DecodeError`] (variant, offset and
/// counts) or the same end offset (property-tested against [`decode`]). The server routes
/// with it (see [`crate::package::RawMain`]): it forwards exactly the frames a
/// [`decode`]-based router forwarded, without building them. Keys are borrowed from
/// `buf`, values are byte ranges; a map of scalars is scanned without allocating.
pub fn scan_map<'a>(
    buf: &'a Bytes,
    offset: usize,
    limits: &DecodeLimits,
    visit: impl FnMut(RawEntry<'a>),
) -> Result<usize, DecodeError> {
    walk(buf, offset, limits, None, visit)
}

/// [`scan_map`] with a [`RepeatCache`]: the value of the cache's key, when it starts with
/// the bytes the cache last checked, is not walked again. The result (entries, end,
/// error) is exactly [`scan_map`]'s; the cache only saves the work.
pub fn scan_map_cached<'a>(
    buf: &'a Bytes,
    offset: usize,
    limits: &DecodeLimits,
    cache: &mut RepeatCache,
    visit: impl FnMut(RawEntry<'a>),
) -> Result<usize, DecodeError> {
    walk(buf, offset, limits, Some(cache), visit)
}

/// The last value of one key of a top-level map that [`scan_map_cached`] checked, so that
/// the same bytes in the next map are not checked again.
///
/// Why: the server stamps every frame it routes to a connection with the sender's `user`
/// (a nested map of a few hundred bytes, byte for byte the same for every frame from one
/// caller), and walking it was a tenth of an endpoint's work per received call. One cache
/// per connection (the endpoint's) turns that walk into a comparison.
///
/// Why it is exact: msgpack values delimit themselves, so bytes that start with a
/// complete, valid value *are* that value; its UTF-8, marker and depth checks (depth is
/// only checked against the same `max_depth`) come out as they did. What depends on the
/// rest of the frame is the budget: the item count, and the `Truncated` check, which
/// compares the slots the whole map still owes with the bytes left. The cache keeps the
/// value's own item count and the highest demand of its container openings relative to
/// its start; when either could exceed the limits in the new frame, the value is walked
/// as usual, so that the same error comes out at the same offset.
#[derive(Clone, Debug)]
pub struct RepeatCache {
    key: &'static str,
    /// The encoded value; empty when nothing is cached.
    bytes: Vec<u8>,
    /// The `max_depth` it was checked under (its depth checks hold for that one only).
    max_depth: usize,
    /// Values inside it (the value itself not counted).
    items: usize,
    /// The highest `pending + offset` of its container openings, both relative to the
    /// value (slots opened inside it, bytes from its start).
    need: usize,
    /// Values taken from the cache, for the tests that a hit happens.
    #[cfg(test)]
    hits: usize,
}

impl RepeatCache {
    /// A cache for the values of `key` (nested maps and arrays; a scalar is cheap to check).
    pub fn new(key: &'static str) -> Self {
        Self {
            key,
            bytes: Vec::new(),
            max_depth: 0,
            items: 0,
            need: 0,
            #[cfg(test)]
            hits: 0,
        }
    }

    /// The end of the value at `at` when it is the cached one and walking it could not
    /// fail in this buffer; `budget` is charged as the walk would have charged it.
    #[inline]
    fn hit(&mut self, data: &[u8], at: usize, limits: &DecodeLimits, budget: &mut Budget) -> Option<usize> {
        if self.bytes.is_empty() || limits.max_depth != self.max_depth {
            return None;
        }
        let rest = data.get(at..)?;
        if !rest.starts_with(&self.bytes) {
            return None;
        }
        // The walk's `TooManyItems` check: items before it, plus its own, within the limit.
        let items = budget.items.checked_add(self.items).filter(|&n| n <= budget.max_items)?;
        // The walk's `Truncated` check at each opening: pending + position <= length.
        let high = budget.pending.checked_add(at)?.checked_add(self.need)?;
        if high > data.len() {
            return None;
        }
        budget.items = items;
        budget.high = budget.high.max(high);
        #[cfg(test)]
        {
            self.hits += 1;
        }
        Some(at + self.bytes.len())
    }

    /// Remembers the value `data[at..end]`, just walked without error.
    fn store(
        &mut self,
        data: &[u8],
        at: usize,
        end: usize,
        limits: &DecodeLimits,
        items: usize,
        need: usize,
    ) {
        self.bytes.clear();
        self.bytes.extend_from_slice(&data[at..end]);
        self.max_depth = limits.max_depth;
        self.items = items;
        self.need = need;
    }
}

/// The loop of [`decode`] with the building taken out; keep the two in step. The entries
/// of a top-level map are walked by a loop of their own (the common case, a map of
/// scalars, costs little more than the UTF-8 checks); nested containers by
/// [`skip_nested`], which is `decode`'s loop.
fn walk<'a>(
    buf: &'a Bytes,
    offset: usize,
    limits: &DecodeLimits,
    mut cache: Option<&mut RepeatCache>,
    mut visit: impl FnMut(RawEntry<'a>),
) -> Result<usize, DecodeError> {
    let data: &'a [u8] = buf;
    let mut r = Reader { buf, data, pos: offset };
    if offset > data.len() {
        return Err(DecodeError::Truncated { offset, needed: 1, available: 0 });
    }
    let mut budget = Budget { items: 0, pending: 1, max_items: limits.max_items, high: 0 };
    budget.item(offset)?;
    let (len, map) = match r.skip_head()? {
        Skipped::Scalar(_) => return Ok(r.pos),
        Skipped::Container { .. } if limits.max_depth == 0 => {
            return Err(DecodeError::TooDeep { max_depth: limits.max_depth, offset });
        }
        Skipped::Container { len: 0, .. } => return Ok(r.pos),
        Skipped::Container { len, map } => (len, map),
    };
    budget.open(len, map, offset, &r)?;
    if !map {
        skip_nested(&mut r, &mut budget, limits, 0, len, false)?;
        return Ok(r.pos);
    }
    for _ in 0..len {
        let key_at = r.pos;
        budget.item(key_at)?;
        let key = match r.short_str() {
            Some(key) => key,
            None => r.key_ref()?,
        };
        let value_at = r.pos;
        budget.item(value_at)?;
        if let Some(s) = r.short_value_str() {
            visit(RawEntry { key, key_bytes: key_at..value_at, value: value_at..r.pos, str: Some(s) });
            continue;
        }
        let mut cache = cache.as_deref_mut().filter(|c| c.key == key);
        if let Some(end) = cache.as_deref_mut().and_then(|c| c.hit(data, value_at, limits, &mut budget)) {
            r.pos = end;
            visit(RawEntry { key, key_bytes: key_at..value_at, value: value_at..end, str: None });
            continue;
        }
        let str = match r.skip_head()? {
            Skipped::Scalar(s) => s,
            Skipped::Container { .. } if limits.max_depth <= 1 => {
                return Err(DecodeError::TooDeep { max_depth: limits.max_depth, offset: value_at });
            }
            Skipped::Container { len: 0, .. } => None,
            Skipped::Container { len, map } => {
                let (items, pending, high) = (budget.items, budget.pending, std::mem::take(&mut budget.high));
                budget.open(len, map, value_at, &r)?;
                skip_nested(&mut r, &mut budget, limits, 1, len, map)?;
                if let Some(cache) = cache {
                    // Relative to the value: the same `high` in any frame, shifted.
                    let need = budget.high - pending - value_at;
                    cache.store(data, value_at, r.pos, limits, budget.items - items, need);
                }
                budget.high = budget.high.max(high);
                None
            }
        };
        visit(RawEntry { key, key_bytes: key_at..value_at, value: value_at..r.pos, str });
    }
    Ok(r.pos)
}

/// Checks the elements of a container whose header was just read (`len` elements or
/// entries, a map when `map`), inside `outer` open containers; returns when the container
/// is complete. [`decode`]'s loop, without the values.
fn skip_nested(
    r: &mut Reader<'_>,
    budget: &mut Budget,
    limits: &DecodeLimits,
    outer: usize,
    len: usize,
    map: bool,
) -> Result<(), DecodeError> {
    let mut stack = vec![Pending { remaining: len, map, key_next: map }];
    loop {
        let at = r.pos;
        budget.item(at)?;
        if let Some(open @ Pending { key_next: true, .. }) = stack.last_mut() {
            r.skip_key()?;
            open.key_next = false;
            continue;
        }
        match r.skip_head()? {
            Skipped::Scalar(_) => {}
            Skipped::Container { .. } if outer + stack.len() >= limits.max_depth => {
                return Err(DecodeError::TooDeep { max_depth: limits.max_depth, offset: at });
            }
            Skipped::Container { len: 0, .. } => {}
            Skipped::Container { len, map } => {
                budget.open(len, map, at, r)?;
                stack.push(Pending { remaining: len, map, key_next: map });
                continue;
            }
        }
        // A value is complete: count it in its parent, closing every container it ends.
        while let Some(open) = stack.last_mut() {
            open.remaining -= 1;
            open.key_next = open.map;
            if open.remaining != 0 {
                break;
            }
            stack.pop();
        }
        if stack.is_empty() {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// A msgpack length header (at most 5 bytes), for values assembled from parts: a map
/// whose entries are copied from elsewhere, a str whose bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; 5],
    len: u8,
}

impl Header {
    /// The header's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Sink for Header {
    fn put(&mut self, bytes: &[u8]) {
        let start = usize::from(self.len);
        if let Some(dst) = self.bytes.get_mut(start..start + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len() as u8;
        }
    }
}

/// The header [`encode`] writes for a str of `len` bytes (the smallest).
pub fn str_header(len: usize) -> Result<Header, EncodeError> {
    let mut h = Header { bytes: [0; 5], len: 0 };
    write_len(len, "str", STR_MARKERS, 31, &mut h)?;
    Ok(h)
}

/// The header [`encode`] writes for a map of `len` entries (the smallest).
pub fn map_header(len: usize) -> Result<Header, EncodeError> {
    let mut h = Header { bytes: [0; 5], len: 0 };
    write_len(len, "map", MAP_MARKERS, 15, &mut h)?;
    Ok(h)
}

const STR_MARKERS: [Option<u8>; 4] = [Some(0xa0), Some(0xd9), Some(0xda), Some(0xdb)];
const MAP_MARKERS: [Option<u8>; 4] = [Some(0x80), None, Some(0xde), Some(0xdf)];

/// Appends the msgpack encoding of `value` to `out`, with the smallest header of each
/// family as Python's `msgpack.packb(..., use_bin_type=True)` writes it: non-negative ints
/// in the smallest uint family, negative ints in the smallest int family, [`Value::F64`]
/// as `float 64`, [`Value::F32`] as `float 32`, `str`/`bin`/array/map with the smallest
/// length header.
///
/// Only wire variants can be written ([`EncodeError::NotWire`] otherwise), at most
/// [`MAX_DEPTH`] containers deep ([`EncodeError::TooDeep`]). The walk is iterative, so a
/// hostile, locally built value cannot overflow the stack either. On error `out` is
/// restored to its previous length, so a failed encode never leaves half a value. Each
/// `bin` payload is copied exactly once (into `out`); reserve with [`encoded_len`] to
/// avoid reallocations for large payloads.
pub fn encode(value: &Value, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    let r = write_tree(Root::Value(value), out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// Encodes `value` into a new buffer allocated once at its exact size.
pub fn encode_to_vec(value: &Value) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(encoded_len(value));
    encode(value, &mut out)?;
    Ok(out)
}

/// The exact number of bytes [`encode`] writes for `value`, used to size buffers so that
/// large `bin` payloads are copied once. It runs the same walk as [`encode`] into a byte
/// counter, so it cannot disagree with it; for a value that cannot be encoded it returns
/// the size up to the error (encoding fails anyway).
pub fn encoded_len(value: &Value) -> usize {
    let mut n = Counter(0);
    let _ = write_tree(Root::Value(value), &mut n);
    n.0
}

/// Appends a map header plus its entries; used by [`crate::package`] to write a [`Map`]
/// without wrapping it in a [`Value`]. Same rules as [`encode`].
pub fn encode_map(map: &Map, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    let r = write_tree(Root::Map(map), out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// [`encoded_len`] for a bare [`Map`].
pub fn encoded_map_len(map: &Map) -> usize {
    let mut n = Counter(0);
    let _ = write_tree(Root::Map(map), &mut n);
    n.0
}

/// Appends the encoding of a bare [`Map`] to `rope`: like [`encode_map`], but `bin`
/// payloads of at least [`Rope::SHARE_MIN`] bytes are referenced, not copied. On error the
/// rope keeps what was written before the call only.
pub fn encode_map_to_rope(map: &Map, rope: &mut Rope) -> Result<(), EncodeError> {
    let mark = rope.mark();
    let r = write_tree(Root::Map(map), rope);
    if r.is_err() {
        rope.reset(mark);
    }
    r
}

/// An encoded message as a sequence of buffers: small values are written into an owned
/// buffer, large `bin` payloads (an ndarray's data, a big `bytes` argument) are kept as
/// reference-counted slices of the caller's memory.
///
/// Why: a package over the chunk size is never sent whole; it is cut into `message_cache`
/// chunks (spec §3). Writing it contiguously first meant copying a 64 MiB array into a
/// fresh 64 MiB buffer (page faults included) only to slice it again. With a rope, the
/// chunks of a large payload are zero-copy slices of the array itself
/// ([`Rope::split`]), and a small package is still one buffer ([`Rope::into_bytes`]).
#[derive(Clone, Debug, Default)]
pub struct Rope {
    /// Finished buffers, in order.
    segments: Vec<Bytes>,
    /// The buffer being written (becomes a segment when a shared payload follows).
    tail: Vec<u8>,
    /// Total length of `segments`.
    sealed: usize,
}

impl Rope {
    /// `bin` payloads at least this long are shared instead of copied: below it a copy
    /// costs less than the extra segment.
    pub const SHARE_MIN: usize = 16 * 1024;

    /// An empty rope.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty rope whose first buffer holds `capacity` bytes without reallocating.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { tail: Vec::with_capacity(capacity), ..Self::default() }
    }

    /// Total encoded length.
    pub fn len(&self) -> usize {
        self.sealed + self.tail.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole message as one buffer: free when nothing was shared (every small
    /// message), one copy otherwise.
    pub fn into_bytes(mut self) -> Bytes {
        if self.segments.is_empty() {
            return Bytes::from(self.tail);
        }
        if self.tail.is_empty() && self.segments.len() == 1 {
            return self.segments.pop().unwrap_or_default();
        }
        let mut out = Vec::with_capacity(self.len());
        for s in &self.segments {
            out.extend_from_slice(s);
        }
        out.extend_from_slice(&self.tail);
        Bytes::from(out)
    }

    /// The message's bytes in order, as the buffers that hold them (empty ones skipped):
    /// what a writer copies into its socket buffer without flattening the rope first.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        self.segments.iter().map(|s| &s[..]).chain(std::iter::once(&self.tail[..])).filter(|p| !p.is_empty())
    }

    /// Consecutive pieces of `chunk_size` bytes (the last one shorter) covering the
    /// message in order, as [`crate::chunk::split`] cuts a contiguous package. A piece
    /// that lies inside one segment is a zero-copy slice of it; only pieces that straddle
    /// a segment boundary are copied. A `chunk_size` of 0 is treated as 1.
    pub fn split(self, chunk_size: usize) -> Vec<Bytes> {
        let chunk_size = chunk_size.max(1);
        let mut segments = self.segments;
        if !self.tail.is_empty() {
            segments.push(Bytes::from(self.tail));
        }
        let total: usize = segments.iter().map(Bytes::len).sum();
        let mut chunks = Vec::with_capacity(total.div_ceil(chunk_size));
        let mut pending: Vec<u8> = Vec::new();
        for seg in segments {
            let mut at = 0;
            while at < seg.len() {
                if pending.is_empty() && seg.len() - at >= chunk_size {
                    chunks.push(seg.slice(at..at + chunk_size));
                    at += chunk_size;
                    continue;
                }
                if pending.capacity() == 0 {
                    pending.reserve_exact(chunk_size);
                }
                let take = (chunk_size - pending.len()).min(seg.len() - at);
                pending.extend_from_slice(&seg[at..at + take]);
                at += take;
                if pending.len() == chunk_size {
                    chunks.push(Bytes::from(std::mem::take(&mut pending)));
                }
            }
        }
        if !pending.is_empty() {
            chunks.push(Bytes::from(pending));
        }
        chunks
    }

    /// Appends a map header for `entries` entries. With [`Rope::put_str`] and
    /// [`Rope::put_value`] this writes maps that are not a [`Map`], such as the typed main
    /// segment ([`crate::message::MainSegment::encode_to`]), without building one first.
    pub fn put_map_header(&mut self, entries: usize) -> Result<(), EncodeError> {
        self.put(map_header(entries)?.as_bytes());
        Ok(())
    }

    /// Appends a str.
    pub fn put_str(&mut self, s: &str) -> Result<(), EncodeError> {
        write_str(s, self)
    }

    /// Appends an already encoded msgpack object as it is (a `user` stamp kept encoded).
    pub fn put_encoded(&mut self, object: &[u8]) {
        self.tail.extend_from_slice(object);
    }

    /// Appends one value, as [`encode_map_to_rope`] appends a map: on error the rope keeps
    /// only what was written before the call.
    pub fn put_value(&mut self, value: &Value) -> Result<(), EncodeError> {
        let mark = self.mark();
        let r = write_tree(Root::Value(value), self);
        if r.is_err() {
            self.reset(mark);
        }
        r
    }

    fn mark(&self) -> (usize, usize, usize) {
        (self.segments.len(), self.sealed, self.tail.len())
    }

    /// Back to a [`Rope::mark`]. Segments sealed since then are dropped; if the mark was
    /// inside what is now a sealed segment, that segment becomes the tail again.
    fn reset(&mut self, (segments, sealed, tail): (usize, usize, usize)) {
        if self.segments.len() > segments {
            let first = self.segments[segments].clone();
            self.segments.truncate(segments);
            self.sealed = sealed;
            self.tail = first[..tail.min(first.len())].to_vec();
        } else {
            self.tail.truncate(tail);
        }
    }
}

/// A message already written as one buffer, kept as it is.
impl From<Vec<u8>> for Rope {
    fn from(bytes: Vec<u8>) -> Self {
        Rope { tail: bytes, ..Rope::default() }
    }
}

/// A message already written as one shared buffer, kept without a copy.
impl From<Bytes> for Rope {
    fn from(bytes: Bytes) -> Self {
        if bytes.is_empty() {
            return Rope::default();
        }
        Rope { sealed: bytes.len(), segments: vec![bytes], tail: Vec::new() }
    }
}

/// Where encoded bytes go: a buffer, a rope, or a counter for [`encoded_len`].
trait Sink {
    fn put(&mut self, bytes: &[u8]);

    /// A `bin` payload: sinks that can keep a reference instead of a copy do.
    fn put_shared(&mut self, bytes: &Bytes) {
        self.put(bytes);
    }
}

impl Sink for Rope {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
    }

    fn put_shared(&mut self, bytes: &Bytes) {
        if bytes.len() < Self::SHARE_MIN {
            return self.tail.extend_from_slice(bytes);
        }
        if !self.tail.is_empty() {
            let tail = Bytes::from(std::mem::take(&mut self.tail));
            self.sealed += tail.len();
            self.segments.push(tail);
        }
        self.sealed += bytes.len();
        self.segments.push(bytes.clone());
    }
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

struct Counter(usize);

impl Sink for Counter {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.0 = self.0.saturating_add(bytes.len());
    }
}

enum Root<'a> {
    Value(&'a Value),
    Map(&'a Map),
}

/// An open container on the writer's explicit stack.
enum Open<'a> {
    List(std::slice::Iter<'a, Value>),
    Map(indexmap::map::Iter<'a, String, Value>),
}

fn write_tree<S: Sink>(root: Root<'_>, out: &mut S) -> Result<(), EncodeError> {
    // A list of scalars (a call's `args`, a reply's `[result]`), written without the
    // stack: the same bytes and errors, one allocation fewer.
    if let Root::Value(Value::List(items)) = root {
        if !items.iter().any(|v| matches!(v, Value::List(_) | Value::Map(_))) {
            write_len(items.len(), "array", [Some(0x90), None, Some(0xdc), Some(0xdd)], 15, out)?;
            return items.iter().try_for_each(|v| write_scalar(v, out));
        }
    }
    let mut stack: Vec<Open<'_>> = Vec::new();
    let mut next = match root {
        Root::Value(v) => Some(v),
        Root::Map(m) => {
            open_map(m, &mut stack, out)?;
            None
        }
    };
    loop {
        if let Some(v) = next.take() {
            match v {
                Value::List(items) => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(EncodeError::TooDeep(MAX_DEPTH));
                    }
                    write_len(items.len(), "array", [Some(0x90), None, Some(0xdc), Some(0xdd)], 15, out)?;
                    stack.push(Open::List(items.iter()));
                }
                Value::Map(m) => open_map(m, &mut stack, out)?,
                scalar => write_scalar(scalar, out)?,
            }
        }
        // Find the next value to write, closing finished containers.
        loop {
            match stack.last_mut() {
                None => return Ok(()),
                Some(Open::List(it)) => {
                    if let Some(v) = it.next() {
                        next = Some(v);
                        break;
                    }
                }
                Some(Open::Map(it)) => {
                    if let Some((k, v)) = it.next() {
                        write_str(k, out)?;
                        next = Some(v);
                        break;
                    }
                }
            }
            stack.pop();
        }
    }
}

fn open_map<'a, S: Sink>(map: &'a Map, stack: &mut Vec<Open<'a>>, out: &mut S) -> Result<(), EncodeError> {
    if stack.len() >= MAX_DEPTH {
        return Err(EncodeError::TooDeep(MAX_DEPTH));
    }
    write_len(map.len(), "map", MAP_MARKERS, 15, out)?;
    stack.push(Open::Map(map.iter()));
    Ok(())
}

fn write_scalar<S: Sink>(value: &Value, out: &mut S) -> Result<(), EncodeError> {
    match value {
        Value::Nil => out.put(&[0xc0]),
        Value::Bool(false) => out.put(&[0xc2]),
        Value::Bool(true) => out.put(&[0xc3]),
        Value::Int(i) => write_int(*i, out),
        Value::UInt(u) => write_uint(*u, out),
        Value::F32(f) => {
            let b = f.to_be_bytes();
            out.put(&[0xca, b[0], b[1], b[2], b[3]]);
        }
        Value::F64(f) => {
            out.put(&[0xcb]);
            out.put(&f.to_be_bytes());
        }
        Value::Str(s) => write_str(s, out)?,
        Value::Bytes(b) => {
            write_len(b.len(), "bin", [None, Some(0xc4), Some(0xc5), Some(0xc6)], 0, out)?;
            out.put_shared(b);
        }
        other => return Err(EncodeError::NotWire(other.kind())),
    }
    Ok(())
}

fn write_str<S: Sink>(s: &str, out: &mut S) -> Result<(), EncodeError> {
    write_len(s.len(), "str", STR_MARKERS, 31, out)?;
    out.put(s.as_bytes());
    Ok(())
}

/// Writes the smallest length header. `markers` = [fix base, 8-bit, 16-bit, 32-bit]
/// (a family without one of them has `None`); `fix_max` is the largest fix length.
fn write_len<S: Sink>(
    len: usize,
    kind: &'static str,
    markers: [Option<u8>; 4],
    fix_max: usize,
    out: &mut S,
) -> Result<(), EncodeError> {
    match markers {
        [Some(base), ..] if len <= fix_max => out.put(&[base | len as u8]),
        [_, Some(m8), ..] if len <= 0xff => out.put(&[m8, len as u8]),
        [_, _, Some(m16), _] if len <= 0xffff => {
            let b = (len as u16).to_be_bytes();
            out.put(&[m16, b[0], b[1]]);
        }
        [_, _, _, Some(m32)] if len <= 0xffff_ffff => {
            let b = (len as u32).to_be_bytes();
            out.put(&[m32, b[0], b[1], b[2], b[3]]);
        }
        _ => return Err(EncodeError::TooLong { kind, len }),
    }
    Ok(())
}

fn write_uint<S: Sink>(u: u64, out: &mut S) {
    if u < 0x80 {
        out.put(&[u as u8]);
    } else if u <= 0xff {
        out.put(&[0xcc, u as u8]);
    } else if u <= 0xffff {
        let b = (u as u16).to_be_bytes();
        out.put(&[0xcd, b[0], b[1]]);
    } else if u <= 0xffff_ffff {
        let b = (u as u32).to_be_bytes();
        out.put(&[0xce, b[0], b[1], b[2], b[3]]);
    } else {
        out.put(&[0xcf]);
        out.put(&u.to_be_bytes());
    }
}

fn write_int<S: Sink>(i: i64, out: &mut S) {
    if i >= 0 {
        write_uint(i as u64, out);
    } else if i >= -32 {
        out.put(&[i as i8 as u8]);
    } else if i >= i64::from(i8::MIN) {
        out.put(&[0xd0, i as i8 as u8]);
    } else if i >= i64::from(i16::MIN) {
        let b = (i as i16).to_be_bytes();
        out.put(&[0xd1, b[0], b[1]]);
    } else if i >= i64::from(i32::MIN) {
        let b = (i as i32).to_be_bytes();
        out.put(&[0xd2, b[0], b[1], b[2], b[3]]);
    } else {
        out.put(&[0xd3]);
        out.put(&i.to_be_bytes());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn dec(bytes: &[u8]) -> Result<Value, DecodeError> {
        let buf = Bytes::copy_from_slice(bytes);
        decode(&buf, 0, &DecodeLimits::default()).map(|(v, end)| {
            assert_eq!(end, bytes.len(), "decode must consume the whole object");
            v
        })
    }

    /// `scan_map` as a plain check, to compare with `decode`.
    fn skip(buf: &Bytes, offset: usize, limits: &DecodeLimits) -> Result<usize, DecodeError> {
        scan_map(buf, offset, limits, |_| {})
    }

    fn enc(v: &Value) -> Vec<u8> {
        let out = encode_to_vec(v).unwrap();
        assert_eq!(out.len(), encoded_len(v), "encoded_len must be exact");
        out
    }

    /// Python: msgpack.packb([0,127,128,255,256,65535,65536,2**32-1,2**32,2**63-1,2**63,
    /// 2**64-1,-1,-32,-33,-128,-129,-32768,-32769,-2**31,-2**31-1,-2**63], use_bin_type=True)
    #[test]
    fn golden_ints() {
        let ints: Vec<Value> = vec![
            0u64.into(),
            127u64.into(),
            128u64.into(),
            255u64.into(),
            256u64.into(),
            65535u64.into(),
            65536u64.into(),
            (u32::MAX as u64).into(),
            (1u64 << 32).into(),
            (i64::MAX as u64).into(),
            (1u64 << 63).into(),
            u64::MAX.into(),
            (-1i64).into(),
            (-32i64).into(),
            (-33i64).into(),
            (-128i64).into(),
            (-129i64).into(),
            (-32768i64).into(),
            (-32769i64).into(),
            i64::from(i32::MIN).into(),
            (i64::from(i32::MIN) - 1).into(),
            i64::MIN.into(),
        ];
        let expected =
            hex("dc0016007fcc80ccffcd0100cdffffce00010000ceffffffffcf0000000100000000cf7fffffffffffffffcf80\
             00000000000000cfffffffffffffffffffe0d0dfd080d1ff7fd18000d2ffff7fffd280000000d3ffffffff7fff\
             ffffd38000000000000000");
        let v = Value::List(ints);
        assert_eq!(enc(&v), expected);
        assert_eq!(dec(&expected).unwrap(), v);
        // Canonical ints: a u64 that fits i64 comes back as Int.
        assert_eq!(dec(&hex("cf0000000000000005")).unwrap(), Value::Int(5));
        assert_eq!(dec(&hex("d3fffffffffffffffb")).unwrap(), Value::Int(-5));
        assert!(matches!(dec(&hex("cf8000000000000000")).unwrap(), Value::UInt(u) if u == 1 << 63));
    }

    /// Python: packb([1.5, -0.0, inf, -inf, nan, 15.0]).
    #[test]
    fn golden_floats() {
        let v = Value::List(vec![
            Value::F64(1.5),
            Value::F64(-0.0),
            Value::F64(f64::INFINITY),
            Value::F64(f64::NEG_INFINITY),
            Value::F64(f64::NAN),
            Value::F64(15.0),
        ]);
        let expected =
            hex("96cb3ff8000000000000cb8000000000000000cb7ff0000000000000cbfff0000000000000cb7ff80000000000\
             00cb402e000000000000");
        assert_eq!(enc(&v), expected);
        let Value::List(back) = dec(&expected).unwrap() else { panic!("not a list") };
        assert!(matches!(back[4], Value::F64(f) if f.is_nan()));
        assert!(matches!(back[1], Value::F64(f) if f == 0.0 && f.is_sign_negative()));
        // float 32 stays F32 both ways.
        assert_eq!(enc(&Value::F32(1.5)), hex("ca3fc00000"));
        assert!(matches!(dec(&hex("ca3fc00000")).unwrap(), Value::F32(f) if f == 1.5));
    }

    /// Python: packb([None, True, False, '', b'', 'héllo', [], {}]).
    #[test]
    fn golden_misc() {
        let v = Value::List(vec![
            Value::Nil,
            Value::Bool(true),
            Value::Bool(false),
            Value::Str(String::new()),
            Value::Bytes(Bytes::new()),
            "héllo".into(),
            Value::List(vec![]),
            Value::Map(Map::new()),
        ]);
        let expected = hex("98c0c3c2a0c400a668c3a96c6c6f9080");
        assert_eq!(enc(&v), expected);
        assert_eq!(dec(&expected).unwrap(), v);
    }

    /// Header boundaries, from Python's packb of 'a'*n, b'x'*n, [None]*n, dicts.
    #[test]
    fn golden_headers() {
        let cases: Vec<(Value, &str)> = vec![
            (Value::Str("a".repeat(31)), "bf"),
            (Value::Str("a".repeat(32)), "d920"),
            (Value::Str("a".repeat(255)), "d9ff"),
            (Value::Str("a".repeat(256)), "da0100"),
            (Value::Str("a".repeat(65535)), "daffff"),
            (Value::Str("a".repeat(65536)), "db00010000"),
            (Value::Bytes(Bytes::from(vec![b'x'; 255])), "c4ff"),
            (Value::Bytes(Bytes::from(vec![b'x'; 256])), "c50100"),
            (Value::Bytes(Bytes::from(vec![b'x'; 65535])), "c5ffff"),
            (Value::Bytes(Bytes::from(vec![b'x'; 65536])), "c600010000"),
            (Value::List(vec![Value::Nil; 15]), "9f"),
            (Value::List(vec![Value::Nil; 16]), "dc0010"),
            (Value::List(vec![Value::Nil; 65535]), "dcffff"),
            (Value::List(vec![Value::Nil; 65536]), "dd00010000"),
            (Value::Map((0..15).map(|i| (format!("k{i:02}"), Value::Int(i))).collect()), "8fa36b30"),
            (Value::Map((0..16).map(|i| (format!("k{i:02}"), Value::Int(i))).collect()), "de0010a3"),
        ];
        for (v, prefix) in cases {
            let out = enc(&v);
            let p = hex(prefix);
            assert_eq!(&out[..p.len()], &p[..], "{prefix}");
            assert_eq!(dec(&out).unwrap(), v, "{prefix}");
        }
    }

    #[test]
    fn bin_is_zero_copy() {
        let payload = vec![7u8; 1000];
        let mut out = Vec::new();
        encode(&Value::List(vec![Value::Bytes(Bytes::from(payload)), Value::Nil]), &mut out).unwrap();
        let buf = Bytes::from(out);
        let (v, _) = decode(&buf, 0, &DecodeLimits::default()).unwrap();
        let Value::List(items) = v else { panic!("not a list") };
        let Value::Bytes(b) = &items[0] else { panic!("not bytes") };
        // The payload points into the frame buffer: bytes 4..1004 (fixarray, bin16 header).
        assert_eq!(b.as_ptr(), buf[4..].as_ptr());
        assert_eq!(b.len(), 1000);
    }

    #[test]
    fn decode_reports_end_and_offset() {
        let buf = Bytes::from(hex("01a1610203"));
        let l = DecodeLimits::default();
        assert_eq!(decode(&buf, 0, &l).unwrap(), (Value::Int(1), 1));
        assert_eq!(decode(&buf, 1, &l).unwrap(), (Value::from("a"), 3));
        assert_eq!(decode(&buf, 4, &l).unwrap(), (Value::Int(3), 5));
        assert!(matches!(decode(&buf, 5, &l), Err(DecodeError::Truncated { offset: 5, .. })));
        assert!(matches!(decode(&buf, 99, &l), Err(DecodeError::Truncated { offset: 99, .. })));
    }

    #[test]
    fn duplicate_keys_last_wins_first_position() {
        // {"a":1,"b":2,"a":3} -> Python {'a': 3, 'b': 2}
        let v = dec(&hex("83a16101a16202a16103")).unwrap();
        let m = v.as_map().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m.get_index(0), Some((&"a".to_string(), &Value::Int(3))));
        assert_eq!(m.get_index(1), Some((&"b".to_string(), &Value::Int(2))));
    }

    #[test]
    fn malformed_classes() {
        assert_eq!(dec(&hex("c1")), Err(DecodeError::ReservedMarker { offset: 0 }));
        assert_eq!(dec(&hex("92c0c1")), Err(DecodeError::ReservedMarker { offset: 2 }));
        assert_eq!(dec(&hex("81c101")), Err(DecodeError::ReservedMarker { offset: 1 }));
        assert_eq!(dec(&hex("a2c328")), Err(DecodeError::InvalidUtf8 { offset: 1 }));
        assert_eq!(dec(&hex("81a2c32801")), Err(DecodeError::InvalidUtf8 { offset: 2 }));
        assert_eq!(dec(&hex("810101")), Err(DecodeError::NonStrKey { kind: "int", offset: 1 }));
        assert_eq!(dec(&hex("81c4016101")), Err(DecodeError::NonStrKey { kind: "bin", offset: 1 }));
        assert_eq!(dec(&hex("81c001")), Err(DecodeError::NonStrKey { kind: "nil", offset: 1 }));
        assert_eq!(dec(&hex("8190c0")), Err(DecodeError::NonStrKey { kind: "array", offset: 1 }));
        assert_eq!(dec(&hex("d6ff00000000")), Err(DecodeError::Ext { ext_type: -1, offset: 0 }));
        assert_eq!(dec(&hex("91c7010501")), Err(DecodeError::Ext { ext_type: 5, offset: 1 }));
        assert_eq!(dec(&hex("81a161d40100")), Err(DecodeError::Ext { ext_type: 1, offset: 3 }));
        assert_eq!(dec(&hex("81d40100c0")), Err(DecodeError::NonStrKey { kind: "ext", offset: 1 }));
        assert_eq!(dec(&[]), Err(DecodeError::Truncated { offset: 0, needed: 1, available: 0 }));
        assert_eq!(dec(&hex("cd01")), Err(DecodeError::Truncated { offset: 0, needed: 3, available: 2 }));
        assert_eq!(dec(&hex("a3616263")), Ok(Value::from("abc")));
        assert!(matches!(dec(&hex("a46162")), Err(DecodeError::Truncated { offset: 0, .. })));
        assert!(matches!(dec(&hex("c6ffffffff00")), Err(DecodeError::Truncated { offset: 0, .. })));
    }

    #[test]
    fn absurd_lengths_fail_fast_without_allocating() {
        // array 32 / map 32 declaring ~4e9 elements with 3 bytes of input.
        for h in ["ddffffffff010203", "dfffffffffa16101", "dcffff01"] {
            let r = dec(&hex(h));
            assert!(matches!(r, Err(DecodeError::Truncated { offset: 0, .. })), "{h}: {r:?}");
        }
        // Nested claims add up: [[ <2 elements>, <3 more> ] with too few bytes.
        assert!(matches!(dec(&hex("92930102")), Err(DecodeError::Truncated { offset: 1, .. })));
        // A map entry needs two bytes: {k: ?} with one byte left after the header.
        assert!(matches!(dec(&hex("82a16101")), Err(DecodeError::Truncated { offset: 0, .. })));
    }

    fn nested_arrays(depth: usize, leaf: u8) -> Vec<u8> {
        let mut v = vec![0x91u8; depth];
        v.push(leaf);
        v
    }

    #[test]
    fn depth_limit() {
        // Default: MAX_DEPTH containers (empty innermost counted, as Python counts it).
        assert!(dec(&nested_arrays(MAX_DEPTH, 0xc0)).is_ok());
        assert!(dec(&nested_arrays(MAX_DEPTH - 1, 0x90)).is_ok());
        assert_eq!(
            dec(&nested_arrays(MAX_DEPTH, 0x90)),
            Err(DecodeError::TooDeep { max_depth: MAX_DEPTH, offset: MAX_DEPTH })
        );
        // Python's unpacker limit (1024 containers) is reachable by raising the limit.
        let python = DecodeLimits { max_depth: 1024, ..Default::default() };
        assert!(decode(&Bytes::from(nested_arrays(1024, 0xc0)), 0, &python).is_ok());
        assert!(matches!(
            decode(&Bytes::from(nested_arrays(1024, 0x80)), 0, &python),
            Err(DecodeError::TooDeep { max_depth: 1024, offset: 1024 })
        ));
        let small = DecodeLimits { max_depth: 2, ..Default::default() };
        let buf = Bytes::from(hex("81a16191c0"));
        assert!(decode(&buf, 0, &small).is_ok());
        let buf = Bytes::from(hex("81a1619190"));
        assert_eq!(decode(&buf, 0, &small), Err(DecodeError::TooDeep { max_depth: 2, offset: 4 }));
    }

    /// Unnests a deep value in a loop, so that dropping it does not recurse.
    fn drop_flat(mut v: Value) {
        loop {
            v = match v {
                Value::List(mut l) => l.pop().unwrap_or(Value::Nil),
                Value::Map(mut m) => m.pop().map_or(Value::Nil, |(_, v)| v),
                _ => return,
            };
        }
    }

    #[test]
    fn hostile_nesting_does_not_overflow() {
        // 100 000 nested arrays: the reader is iterative, so even with no effective limit
        // there is no stack overflow.
        let buf = Bytes::from(nested_arrays(100_000, 0xc0));
        let r = decode(&buf, 0, &DecodeLimits::default());
        assert_eq!(r, Err(DecodeError::TooDeep { max_depth: MAX_DEPTH, offset: MAX_DEPTH }));
        let (v, end) =
            decode(&buf, 0, &DecodeLimits { max_depth: usize::MAX, ..Default::default() }).unwrap();
        assert_eq!(end, buf.len());
        // The writer is iterative too: a locally built 100 000-deep value is refused.
        let mut out = Vec::new();
        assert_eq!(encode(&v, &mut out), Err(EncodeError::TooDeep(MAX_DEPTH)));
        assert!(out.is_empty());
        assert!(encoded_len(&v) > 0);
        drop_flat(v);
    }

    #[test]
    fn max_items_limit() {
        let l = DecodeLimits { max_items: 3, ..Default::default() };
        assert!(decode(&Bytes::from(hex("920102")), 0, &l).is_ok());
        assert_eq!(
            decode(&Bytes::from(hex("93010203")), 0, &l),
            Err(DecodeError::TooManyItems { max_items: 3, offset: 3 })
        );
    }

    /// A value nested MAX_DEPTH deep encodes, decodes and drops on a 256 KiB thread
    /// stack (debug build): neither the reader nor the writer uses stack per level.
    #[test]
    fn max_depth_fits_small_stack() {
        let h = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let mut v = Value::Nil;
                for i in 0..MAX_DEPTH {
                    v = if i % 2 == 0 { Value::List(vec![v]) } else { Value::Map(crate::map! {"k" => v}) };
                }
                let bytes = encode_to_vec(&v).unwrap();
                assert_eq!(bytes.len(), encoded_len(&v));
                let back = dec(&bytes).unwrap();
                assert_eq!(encode_to_vec(&back).unwrap(), bytes);
                let too_deep = Value::List(vec![back]);
                assert_eq!(encode_to_vec(&too_deep), Err(EncodeError::TooDeep(MAX_DEPTH)));
                let too_deep = Value::Map(crate::map! {"k" => too_deep});
                assert_eq!(encode_to_vec(&too_deep), Err(EncodeError::TooDeep(MAX_DEPTH)));
            })
            .unwrap();
        h.join().unwrap();
    }

    #[test]
    fn encode_errors_leave_out_untouched() {
        let mut out = vec![1, 2, 3];
        let bad = Value::List(vec![Value::Int(1), Value::Set(vec![])]);
        assert_eq!(encode(&bad, &mut out), Err(EncodeError::NotWire("set")));
        assert_eq!(out, vec![1, 2, 3]);
        let mut out = Vec::new();
        assert_eq!(
            write_len(1 << 32, "bin", [None, Some(0xc4), Some(0xc5), Some(0xc6)], 0, &mut out),
            Err(EncodeError::TooLong { kind: "bin", len: 1 << 32 })
        );
    }

    #[test]
    fn rope_shares_large_payloads_and_a_failed_encode_leaves_it_as_it_was() {
        let payload = Bytes::from(vec![7u8; 4 * Rope::SHARE_MIN]);
        let m = crate::map! { "a" => 1, "data" => Value::Bytes(payload.clone()), "z" => "end" };
        let mut rope = Rope::new();
        encode_map_to_rope(&m, &mut rope).unwrap();
        let before = rope.clone().into_bytes();
        // The payload's chunks are slices of the caller's buffer, not copies.
        let chunks = rope.clone().split(Rope::SHARE_MIN);
        assert!(chunks.iter().any(|c| payload.as_ptr_range().contains(&c.as_ptr())));
        // A value that cannot be encoded, after a shared payload: nothing of it stays.
        let bad = crate::map! { "x" => Value::Bytes(payload), "bad" => Value::Set(vec![]) };
        assert_eq!(encode_map_to_rope(&bad, &mut rope), Err(EncodeError::NotWire("set")));
        assert_eq!(rope.into_bytes(), before);
    }

    #[test]
    fn rope_parts_are_its_bytes_in_order_with_the_shared_payload_uncopied() {
        let payload = Bytes::from(vec![7u8; 2 * Rope::SHARE_MIN]);
        let m = crate::map! { "a" => 1, "data" => Value::Bytes(payload.clone()), "z" => "end" };
        let mut rope = Rope::new();
        encode_map_to_rope(&m, &mut rope).unwrap();
        let parts: Vec<&[u8]> = rope.parts().collect();
        assert_eq!(parts.len(), 3, "head, payload, tail");
        assert_eq!(parts[1].as_ptr(), payload.as_ptr(), "the payload is the caller's buffer");
        assert_eq!(parts.concat(), rope.clone().into_bytes());
        // One-buffer ropes: nothing copied in, nothing empty out.
        assert_eq!(Rope::from(payload.clone()).parts().next().map(<[u8]>::as_ptr), Some(payload.as_ptr()));
        assert_eq!(Rope::from(vec![1, 2]).into_bytes(), Bytes::from_static(&[1, 2]));
        assert_eq!(Rope::from(Bytes::new()).parts().count(), 0);
    }

    pub(crate) fn arb_wire() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(Value::UInt),
            any::<u64>().prop_map(Value::from),
            any::<f32>().prop_filter("NaN-free", |f| !f.is_nan()).prop_map(Value::F32),
            any::<f64>().prop_filter("NaN-free", |f| !f.is_nan()).prop_map(Value::F64),
            ".{0,40}".prop_map(Value::Str),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(|v| Value::Bytes(Bytes::from(v))),
        ];
        leaf.prop_recursive(5, 200, 20, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..20).prop_map(Value::List),
                proptest::collection::vec((".{0,12}", inner), 0..20)
                    .prop_map(|kv| Value::Map(kv.into_iter().collect())),
            ]
        })
    }

    /// Runs `check` on an encoded value whole, cut at every length, with one byte changed
    /// (`flip`: where, and the bits), and whole under tight limits.
    fn exercise(bytes: Vec<u8>, flip: (usize, u8), check: impl Fn(&Bytes, &DecodeLimits)) {
        let whole = Bytes::from(bytes.clone());
        check(&whole, &DecodeLimits::default());
        for cut in 0..whole.len() {
            check(&whole.slice(..cut), &DecodeLimits::default());
        }
        let mut mutated = bytes;
        let at = flip.0 % mutated.len();
        mutated[at] ^= flip.1.max(1);
        check(&Bytes::from(mutated), &DecodeLimits::default());
        for max_depth in 0..4 {
            for max_items in [0, 1, 2, 5, 30] {
                check(&whole, &DecodeLimits { max_depth, max_items });
            }
        }
    }

    proptest! {
        #[test]
        fn roundtrip(v in arb_wire()) {
            let bytes = encode_to_vec(&v).unwrap();
            prop_assert_eq!(bytes.len(), encoded_len(&v));
            let buf = Bytes::from(bytes);
            let (back, end) = decode(&buf, 0, &DecodeLimits::default()).unwrap();
            prop_assert_eq!(end, buf.len());
            prop_assert_eq!(back, v);
        }

        #[test]
        fn prefixes_never_panic(v in arb_wire()) {
            let bytes = encode_to_vec(&v).unwrap();
            let buf = Bytes::from(bytes);
            for cut in 0..buf.len() {
                let r = decode(&buf.slice(..cut), 0, &DecodeLimits::default());
                prop_assert!(matches!(r, Err(DecodeError::Truncated { .. })), "cut {}: {:?}", cut, r);
            }
        }

        /// A rope holds the same bytes as a contiguous encode, and its chunks are the
        /// contiguous package's chunks, whatever the sizes of the shared payloads.
        #[test]
        fn rope_equals_contiguous_encoding(
            v in arb_wire(),
            big in proptest::collection::vec(0usize..3 * Rope::SHARE_MIN, 0..4),
            chunk_size in 1usize..3 * Rope::SHARE_MIN,
        ) {
            let mut m = Map::new();
            m.insert("v".into(), v);
            for (i, n) in big.iter().enumerate() {
                m.insert(format!("b{i}"), Value::Bytes(Bytes::from(vec![i as u8; *n])));
                m.insert(format!("s{i}"), Value::from(i as i64));
            }
            let mut flat = Vec::new();
            encode_map(&m, &mut flat).unwrap();
            let mut rope = Rope::new();
            encode_map_to_rope(&m, &mut rope).unwrap();
            prop_assert_eq!(rope.len(), flat.len());
            prop_assert_eq!(&rope.clone().into_bytes()[..], &flat[..]);
            let flat = Bytes::from(flat);
            let expected: Vec<Bytes> = crate::chunk::split(&flat, chunk_size).collect();
            prop_assert_eq!(rope.split(chunk_size), expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let buf = Bytes::from(data);
            let _ = decode(&buf, 0, &DecodeLimits::default());
        }

        /// `scan_map` is `decode` without the values: same end, same error, for any bytes,
        /// any offset and tight limits.
        #[test]
        fn skip_agrees_with_decode_on_arbitrary_bytes(
            data in proptest::collection::vec(any::<u8>(), 0..200),
            offset in 0usize..4,
            max_depth in 0usize..6,
            max_items in 0usize..40,
        ) {
            let buf = Bytes::from(data);
            for limits in [DecodeLimits::default(), DecodeLimits { max_depth, max_items }] {
                prop_assert_eq!(skip(&buf, offset, &limits), decode(&buf, offset, &limits).map(|(_, end)| end));
            }
        }

        /// The same on real values: whole, cut short anywhere, with one byte changed
        /// anywhere (which reaches the UTF-8, key and length checks deep inside), and
        /// under limits the value just meets or just exceeds.
        #[test]
        fn skip_agrees_with_decode_on_values(v in arb_wire(), flip in any::<(usize, u8)>()) {
            exercise(encode_to_vec(&v).unwrap(), flip, |buf, limits| {
                assert_eq!(skip(buf, 0, limits), decode(buf, 0, limits).map(|(_, end)| end), "{limits:?}");
            });
        }

        /// `decode_entries` is `decode` with the top-level map handed out: collecting the
        /// entries (last wins, first position) gives `decode`'s map, anything else comes
        /// back as `decode` returns it, and the errors are the same, for real values (cut,
        /// changed, under tight limits) and arbitrary bytes.
        #[test]
        fn decode_entries_agrees_with_decode(
            v in arb_wire(),
            flip in any::<(usize, u8)>(),
            data in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            fn check(buf: &Bytes, limits: &DecodeLimits) {
                let mut map = Map::new();
                let entries = decode_entries(buf, 0, limits, |k, v| {
                    map.insert(k.to_owned(), v);
                });
                let entries = entries.map(|(v, end)| (v.unwrap_or(Value::Map(map)), end));
                assert_eq!(entries, decode(buf, 0, limits), "{limits:?}");
            }
            exercise(encode_to_vec(&v).unwrap(), flip, check);
            check(&Bytes::from(data), &DecodeLimits::default());
        }

        /// A scan with a warm [`RepeatCache`] is the scan without it, for frames that
        /// repeat the cached value and then differ: cut anywhere (the `Truncated` budget),
        /// one byte changed anywhere (in the value itself, too), under tight limits (the
        /// item budget), with more or fewer keys after it.
        #[test]
        fn cached_scan_agrees_with_scan_map(
            user in arb_wire(),
            before in proptest::collection::vec((".{0,4}", arb_wire()), 0..3),
            after in proptest::collection::vec((".{0,4}", arb_wire()), 0..3),
            flip in any::<(usize, u8)>(),
            max_depth in 0usize..6,
            max_items in 0usize..60,
        ) {
            let bytes = repeat_frame(&user, &before, &after);
            let mut cache = RepeatCache::new("user");
            let whole = Bytes::from(bytes.clone());
            scan_map_cached(&whole, 0, &DecodeLimits::default(), &mut cache, |_| {}).unwrap();
            let nested = matches!(&user, Value::List(l) if !l.is_empty())
                || matches!(&user, Value::Map(m) if !m.is_empty());
            let hits = assert_cached_agrees(&whole, &DecodeLimits::default(), &mut cache);
            prop_assert_eq!(hits, usize::from(nested), "a warm cache is used for a nested stamp");
            let tight = DecodeLimits { max_depth, max_items };
            for l in [DecodeLimits::default(), tight] {
                assert_cached_agrees(&whole, &l, &mut cache);
                for cut in 0..whole.len() {
                    assert_cached_agrees(&whole.slice(..cut), &l, &mut cache);
                }
            }
            let mut mutated = bytes;
            let at = flip.0 % mutated.len();
            mutated[at] ^= flip.1.max(1);
            let mutated = Bytes::from(mutated);
            for l in [DecodeLimits::default(), tight] {
                assert_cached_agrees(&mutated, &l, &mut cache);
                assert_cached_agrees(&whole, &l, &mut cache);
            }
        }

        /// `scan_map` reports the top-level entries of a map in wire order, and their byte
        /// ranges decode to the entries.
        #[test]
        fn scan_map_reports_the_top_level_entries(kv in proptest::collection::vec((".{0,12}", arb_wire()), 0..20)) {
            let mut bytes = map_header(kv.len()).unwrap().as_bytes().to_vec();
            for (k, v) in &kv {
                encode(&Value::from(k.as_str()), &mut bytes).unwrap();
                encode(v, &mut bytes).unwrap();
            }
            let buf = Bytes::from(bytes);
            let mut seen = Vec::new();
            let end = scan_map(&buf, 0, &DecodeLimits::default(), |e| seen.push(e)).unwrap();
            prop_assert_eq!(end, buf.len());
            prop_assert_eq!(seen.len(), kv.len());
            for (e, (k, v)) in seen.iter().zip(&kv) {
                prop_assert_eq!(e.key, k.as_str());
                prop_assert_eq!(e.key_bytes.end, e.value.start);
                let (key, _) = decode(&buf, e.key_bytes.start, &DecodeLimits::default()).unwrap();
                prop_assert_eq!(key, Value::from(k.as_str()));
                let (value, end) = decode(&buf, e.value.start, &DecodeLimits::default()).unwrap();
                prop_assert_eq!(&value, v);
                prop_assert_eq!(end, e.value.end);
                prop_assert_eq!(e.str, v.as_str());
            }
        }

        #[test]
        fn headers_are_the_encoders(len in prop_oneof![0usize..40, 200usize..300, 65530usize..65540, Just(70_000)]) {
            let map = Value::Map((0..len).map(|i| (i.to_string(), Value::Nil)).collect());
            let enc = encode_to_vec(&map).unwrap();
            prop_assert!(enc.starts_with(map_header(len).unwrap().as_bytes()));
            let s = "x".repeat(len);
            let enc = encode_to_vec(&Value::from(s.as_str())).unwrap();
            let h = str_header(len).unwrap();
            prop_assert_eq!([h.as_bytes(), s.as_bytes()].concat(), enc);
        }

        /// The ASCII shortcut of [`utf8`] gives what `str::from_utf8` gives: the same str,
        /// or an error at the same byte.
        #[test]
        fn utf8_with_the_ascii_shortcut_is_from_utf8(
            bytes in prop_oneof![
                proptest::collection::vec(0u8..0x80, 0..40),
                proptest::collection::vec(any::<u8>(), 0..40),
                "\\PC{0,12}".prop_map(String::into_bytes),
            ],
        ) {
            let std = std::str::from_utf8(&bytes);
            match utf8(&bytes) {
                Ok(s) => prop_assert_eq!(Ok(s), std),
                Err(e) => prop_assert_eq!(Some(e.valid_up_to()), std.err().map(|e| e.valid_up_to())),
            }
        }

        /// Known keys are read as any other key: same result, same errors.
        #[test]
        fn known_keys_read_like_any_key(key in prop_oneof![
            Just("to"), Just("ws"), Just("from"), Just("type"), Just("user"), Just("method"),
            Just("session"), Just("parent"), Just("args"), Just("with_kwargs"), Just("promise"), Just("t"), Just("tx"),
        ], cut in 0usize..16) {
            let v = Value::Map(crate::map! {key => 1});
            let bytes = Bytes::from(encode_to_vec(&v).unwrap());
            prop_assert_eq!(dec(&bytes).unwrap(), v);
            let b = bytes.slice(..cut.min(bytes.len()));
            prop_assert_eq!(skip(&b, 0, &DecodeLimits::default()), decode(&b, 0, &DecodeLimits::default()).map(|(_, e)| e));
        }
    }

    #[test]
    fn skip_matches_decode_on_the_malformed_classes() {
        for h in [
            "c1",
            "92c0c1",
            "81c101",
            "a2c328",
            "81a2c32801",
            "810101",
            "81c4016101",
            "81c001",
            "8190c0",
            "d6ff00000000",
            "91c7010501",
            "81a161d40100",
            "81d40100c0",
            "",
            "cd01",
            "a46162",
            "c6ffffffff00",
            "ddffffffff010203",
            "dfffffffffa16101",
            "dcffff01",
            "92930102",
            "82a16101",
            "c7",
            "c8ff",
            "c9ffffff",
            "d4",
            "d9",
            "da00",
            "db000000",
        ] {
            let buf = Bytes::from(hex(h));
            let l = DecodeLimits::default();
            assert_eq!(skip(&buf, 0, &l), decode(&buf, 0, &l).map(|(_, e)| e), "{h}");
            assert!(skip(&buf, 0, &l).is_err(), "{h}");
        }
        let deep = Bytes::from(nested_arrays(100_000, 0xc0));
        assert_eq!(
            skip(&deep, 0, &DecodeLimits::default()),
            Err(DecodeError::TooDeep { max_depth: MAX_DEPTH, offset: MAX_DEPTH })
        );
        let unlimited = DecodeLimits { max_depth: usize::MAX, ..Default::default() };
        assert_eq!(skip(&deep, 0, &unlimited), Ok(deep.len()));
        // Nested maps are checked but not reported; a non-map reports nothing.
        let buf = Bytes::from(hex("82a16181a162c0a16301"));
        let mut keys = Vec::new();
        assert_eq!(scan_map(&buf, 0, &DecodeLimits::default(), |e| keys.push(e.key)), Ok(buf.len()));
        assert_eq!(keys, ["a", "c"]);
        let buf = Bytes::from(hex("9181a16101"));
        assert_eq!(scan_map(&buf, 0, &DecodeLimits::default(), |_| panic!("reported")), Ok(buf.len()));
        // Deeper than the stack's inline levels, maps and arrays mixed: same verdicts,
        // whole or cut anywhere, and the entries of the top-level map still reported.
        let mut v = Value::from("leaf");
        for i in 0..20 {
            v = if i % 2 == 0 {
                Value::List(vec![v, Value::Nil])
            } else {
                Value::Map(crate::map! {"k" => v, "z" => 1})
            };
        }
        let bytes = Bytes::from(encode_to_vec(&Value::Map(crate::map! {"deep" => v, "s" => "x"})).unwrap());
        for cut in 0..=bytes.len() {
            let b = bytes.slice(..cut);
            for l in [DecodeLimits::default(), DecodeLimits { max_depth: 15, max_items: 1000 }] {
                assert_eq!(skip(&b, 0, &l), decode(&b, 0, &l).map(|(_, e)| e), "cut {cut} {l:?}");
            }
        }
        let mut seen = Vec::new();
        scan_map(&bytes, 0, &DecodeLimits::default(), |e| seen.push((e.key, e.str))).unwrap();
        assert_eq!(seen, [("deep", None), ("s", Some("x"))]);
    }

    /// A map with `before` entries, then `user`, then `after` entries.
    fn repeat_frame(user: &Value, before: &[(String, Value)], after: &[(String, Value)]) -> Vec<u8> {
        let mut out = map_header(before.len() + 1 + after.len()).unwrap().as_bytes().to_vec();
        let entries = before.iter().map(|(k, v)| (k.as_str(), v)).chain([("user", user)]);
        for (k, v) in entries.chain(after.iter().map(|(k, v)| (k.as_str(), v))) {
            encode(&Value::from(k), &mut out).unwrap();
            encode(v, &mut out).unwrap();
        }
        out
    }

    /// Scans `buf` with and without `cache`: the same entries and the same end or error.
    fn assert_cached_agrees(buf: &Bytes, limits: &DecodeLimits, cache: &mut RepeatCache) -> usize {
        let hits = cache.hits;
        let (mut plain, mut cached) = (Vec::new(), Vec::new());
        let expected = scan_map(buf, 0, limits, |e| plain.push(e));
        let got = scan_map_cached(buf, 0, limits, cache, |e| cached.push(e));
        assert_eq!(got, expected, "{limits:?} {buf:02x?}");
        assert_eq!(cached, plain, "{limits:?}");
        cache.hits - hits
    }

    fn stamp(name: &str) -> Value {
        Value::Map(crate::map! {
            "id" => name,
            "roles" => Value::List(vec!["admin".into(), "user".into()]),
            "scope" => Value::Map(crate::map! {"workspaces" => Value::Map(crate::map! {"ws" => "rw"})}),
        })
    }

    #[test]
    fn repeat_cache_hits_the_same_value_and_follows_changes() {
        let args = vec![("args".to_owned(), Value::List(vec![1.into()]))];
        let to = vec![("to".to_owned(), Value::from("ws/x"))];
        let a = Bytes::from(repeat_frame(&stamp("alice"), &to, &args));
        let b = Bytes::from(repeat_frame(&stamp("bob"), &to, &[]));
        let l = DecodeLimits::default();
        let mut cache = RepeatCache::new("user");
        assert_eq!(assert_cached_agrees(&a, &l, &mut cache), 0, "cold: walked");
        assert_eq!(assert_cached_agrees(&a, &l, &mut cache), 1, "warm: taken from the cache");
        // The same stamp in a different frame (other keys around it) is a hit too.
        let a2 = Bytes::from(repeat_frame(&stamp("alice"), &[], &[("x".to_owned(), Value::Nil)]));
        assert_eq!(assert_cached_agrees(&a2, &l, &mut cache), 1);
        // Another stamp: walked, and cached in its turn.
        assert_eq!(assert_cached_agrees(&b, &l, &mut cache), 0);
        assert_eq!(assert_cached_agrees(&b, &l, &mut cache), 1);
        assert_eq!(assert_cached_agrees(&a, &l, &mut cache), 0);
        // Other keys are never taken from the cache, even with the same bytes.
        let other = Bytes::from(repeat_frame(&Value::Nil, &[("u".to_owned(), stamp("alice"))], &[]));
        assert_eq!(assert_cached_agrees(&other, &l, &mut cache), 0);
        // Another `max_depth`: walked (the depth checks held for the cached one only).
        let shallow = DecodeLimits { max_depth: 2, ..l };
        assert_eq!(assert_cached_agrees(&a, &shallow, &mut cache), 0);
        assert!(scan_map(&a, 0, &shallow, |_| {}).is_err());
    }

    #[test]
    fn repeat_cache_never_hides_a_malformed_value_or_a_spent_budget() {
        let l = DecodeLimits::default();
        let good = repeat_frame(&stamp("alice"), &[], &[("k".to_owned(), Value::from("v"))]);
        let mut cache = RepeatCache::new("user");
        let whole = Bytes::from(good.clone());
        assert_cached_agrees(&whole, &l, &mut cache);
        // A malformed stamp after a cached one: every single-byte change inside it.
        let start = good.windows(5).position(|w| w == b"\xa4user").unwrap() + 5;
        let end = start + encode_to_vec(&stamp("alice")).unwrap().len();
        for at in start..end {
            let mut bad = good.clone();
            bad[at] = 0xc1;
            assert_eq!(assert_cached_agrees(&Bytes::from(bad), &l, &mut cache), 0, "byte {at}");
            assert_cached_agrees(&whole, &l, &mut cache);
        }
        // The map promises more entries than the frame holds: the walk of the stamp
        // itself reports `Truncated`, so the cache must not skip it.
        let mut short = good.clone();
        short[0] = 0x8f; // 15 entries, 2 present
        let short = Bytes::from(short);
        assert!(matches!(scan_map(&short, 0, &l, |_| {}), Err(DecodeError::Truncated { .. })));
        assert_eq!(assert_cached_agrees(&short, &l, &mut cache), 0);
        // Item budgets around the frame's size: the cached count is charged exactly.
        let total = {
            let mut n = 0;
            while scan_map(&whole, 0, &DecodeLimits { max_items: n, ..l }, |_| {}).is_err() {
                n += 1;
            }
            n
        };
        // `k` and `v` follow the stamp: with two items less the stamp still fits (a hit,
        // and the error comes at `k`), with three less it does not (walked, the error
        // comes inside the stamp).
        for max_items in total.saturating_sub(6)..=total + 1 {
            let tight = DecodeLimits { max_items, ..l };
            let hits = assert_cached_agrees(&whole, &tight, &mut cache);
            assert_eq!(hits == 1, max_items + 2 >= total, "max_items {max_items}");
        }
    }
}
