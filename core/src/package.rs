//! The package: one binary frame = `msgpack(main)` optionally followed by `msgpack(extra)`.
//!
//! Spec §2.1: `main` holds the routing fields (`type`, `from`, `to`, `method`, `session`,
//! `parent`, `ws`, `user`), `extra` the payload (`args`, `with_kwargs`, `promise`, `t`, or
//! the encryption envelope). The two objects are written back to back with no length prefix;
//! the receiver reads the first, then a second one if bytes remain, and merges `extra` into
//! `main` with extra keys winning.
//!
//! The server routes on `main` alone (spec §1.5): it reads only the first object,
//! overwrites `from`/`to`/`ws`/`user` and appends the original extra bytes. [`RawMain`]
//! does that without decoding `main` (it scans it in place and copies the entries it
//! keeps) and without ever looking inside `extra`, so a 64 MB payload costs one memcpy on
//! its way through the server. [`split_main`] and [`restamp`] are the decoded-`Map` forms.
//!
//! Fuzzing: [`decode_package`] accepts any bytes (`Bytes::copy_from_slice(data)`) and
//! returns an error rather than panicking, allocating beyond the input, or recursing.

use std::fmt;

use bytes::Bytes;

use crate::message::CallExtra;
use crate::msgpack::{self, DecodeError, DecodeLimits, EncodeError, RawEntry, RepeatCache};
use crate::value::{Map, Value};

/// A decoded package, segments kept apart.
///
/// They are kept apart because the receive pipeline needs `main` alone before the merge:
/// the call context `ctx` is a shallow copy of `main` (spec §2.5), so `main.clone()` before
/// [`Package::merged`] is all it takes.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Package {
    /// The first object: routing fields.
    pub main: Map,
    /// The second object, if the frame had one: the payload.
    pub extra: Option<Map>,
}

impl Package {
    /// The single map the receiver dispatches on: `extra` merged into `main`, extra keys
    /// overwriting main keys (spec §2.1). See [`merge`].
    pub fn merged(self) -> Map {
        merge(self.main, self.extra)
    }
}

/// Merges `extra` into `main`, extra keys overwriting main keys (Python `main.update(extra)`).
///
/// An overwritten key keeps its position in `main` (as a Python dict does); new keys are
/// appended in `extra`'s order.
pub fn merge(mut main: Map, extra: Option<Map>) -> Map {
    if let Some(extra) = extra {
        main.reserve(extra.len());
        for (k, v) in extra {
            main.insert(k, v);
        }
    }
    main
}

/// Which segment a decode error came from, for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// The first object (routing fields).
    Main,
    /// The second object (payload).
    Extra,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Segment::Main => "main",
            Segment::Extra => "extra",
        })
    }
}

/// Why a frame is not a valid package, or a package could not be written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PackageError {
    /// A segment is not valid msgpack (offsets in `source` are from the frame start).
    #[error("invalid msgpack in the {segment} segment: {source}")]
    Msgpack {
        /// The segment being read.
        segment: Segment,
        /// The reader's error.
        #[source]
        source: DecodeError,
    },
    /// The first object is not a map (a routing header is always a map).
    #[error("package main segment must be a map, got {0}")]
    MainNotMap(&'static str),
    /// The second object is not a map.
    #[error("package extra segment must be a map, got {0}")]
    ExtraNotMap(&'static str),
    /// Bytes remain after the second object. Peers never send a third object, so this is
    /// a corrupt or hostile frame; we refuse it rather than silently drop data.
    #[error("{count} trailing bytes after the package at byte {offset}")]
    TrailingBytes {
        /// Where the trailing bytes start.
        offset: usize,
        /// How many there are.
        count: usize,
    },
    /// A segment could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

fn decode_map(
    frame: &Bytes,
    offset: usize,
    limits: &DecodeLimits,
    segment: Segment,
) -> Result<(Map, usize), PackageError> {
    match msgpack::decode(frame, offset, limits) {
        Ok((Value::Map(m), end)) => Ok((m, end)),
        Ok((other, _)) => Err(match segment {
            Segment::Main => PackageError::MainNotMap(other.kind()),
            Segment::Extra => PackageError::ExtraNotMap(other.kind()),
        }),
        Err(source) => Err(PackageError::Msgpack { segment, source }),
    }
}

/// Decodes a whole frame: `main` (must be a map), then `extra` if any bytes remain (must
/// be a map), then nothing: trailing bytes after the second object are
/// [`PackageError::TrailingBytes`]. `bin` payloads are slices of `frame` (no copy).
pub fn decode_package(frame: &Bytes, limits: &DecodeLimits) -> Result<Package, PackageError> {
    let (main, end) = decode_map(frame, 0, limits, Segment::Main)?;
    if end == frame.len() {
        return Ok(Package { main, extra: None });
    }
    let (extra, end) = decode_map(frame, end, limits, Segment::Extra)?;
    if end != frame.len() {
        return Err(PackageError::TrailingBytes { offset: end, count: frame.len() - end });
    }
    Ok(Package { main, extra: Some(extra) })
}

/// Decodes the extra segment that starts at `offset` (where the main segment ended):
/// `None` when the frame ends there, else a map and nothing after it, as
/// [`decode_package`] reads it. For readers that take the main segment apart themselves
/// ([`crate::message::MainSegment::decode`]).
pub fn decode_extra(
    frame: &Bytes,
    offset: usize,
    limits: &DecodeLimits,
) -> Result<Option<Map>, PackageError> {
    if offset == frame.len() {
        return Ok(None);
    }
    let (extra, end) = decode_map(frame, offset, limits, Segment::Extra)?;
    if end != frame.len() {
        return Err(PackageError::TrailingBytes { offset: end, count: frame.len() - end });
    }
    Ok(Some(extra))
}

/// [`decode_extra`] for a call (`type: "method"`): the keys the callee reads, straight
/// from the frame ([`msgpack::decode_entries`]), no [`Map`] built. Same checks and
/// errors as `decode_extra`; no extra segment reads as the empty one.
pub fn decode_call_extra(
    frame: &Bytes,
    offset: usize,
    limits: &DecodeLimits,
) -> Result<CallExtra, PackageError> {
    let mut extra = CallExtra::default();
    if offset == frame.len() {
        return Ok(extra);
    }
    let decoded = msgpack::decode_entries(frame, offset, limits, |k, v| extra.put(k, v));
    let end = match decoded {
        Ok((None | Some(Value::Map(_)), end)) => end,
        Ok((Some(other), _)) => return Err(PackageError::ExtraNotMap(other.kind())),
        Err(source) => return Err(PackageError::Msgpack { segment: Segment::Extra, source }),
    };
    if end != frame.len() {
        return Err(PackageError::TrailingBytes { offset: end, count: frame.len() - end });
    }
    Ok(extra)
}

/// Decodes only `main` and returns it with the offset where the extra bytes start
/// (`frame.len()` if there are none). The extra bytes are not looked at: this is the
/// server's routing path (spec §1.5 step 1).
pub fn split_main(frame: &Bytes, limits: &DecodeLimits) -> Result<(Map, usize), PackageError> {
    decode_map(frame, 0, limits, Segment::Main)
}

/// Writes a package. `extra` is omitted when `None` or empty, as upstream omits an empty
/// payload (a heartbeat is a single segment). The buffer is allocated once at its exact
/// size, so every `bin` payload is copied exactly once.
pub fn encode_package(main: &Map, extra: Option<&Map>) -> Result<Vec<u8>, PackageError> {
    let extra = extra.filter(|e| !e.is_empty());
    let len = msgpack::encoded_map_len(main) + extra.map_or(0, msgpack::encoded_map_len);
    let mut out = Vec::with_capacity(len);
    msgpack::encode_map(main, &mut out)?;
    if let Some(extra) = extra {
        msgpack::encode_map(extra, &mut out)?;
    }
    Ok(out)
}

/// Re-stamps a frame through a decoded `main` (spec §1.5 steps 3-4): decode `main`, let
/// `edit` change it, re-encode it and append the original extra bytes untouched.
///
/// This is the general form, for callers that edit `main` arbitrarily (the in-process test
/// harnesses). The server routes with [`RawMain::restamp`] instead, which writes the same
/// map without decoding `main` (see there). The result is one contiguous buffer (a
/// websocket frame is one payload), allocated once at its exact size. Nothing about
/// `extra` is validated, as upstream does not validate it either: a malformed payload
/// travels on and the receiver rejects it.
pub fn restamp(
    frame: &Bytes,
    limits: &DecodeLimits,
    edit: impl FnOnce(&mut Map),
) -> Result<Bytes, PackageError> {
    let (mut main, extra_at) = split_main(frame, limits)?;
    edit(&mut main);
    let extra = frame.get(extra_at..).unwrap_or_default();
    let mut out = Vec::with_capacity(msgpack::encoded_map_len(&main) + extra.len());
    msgpack::encode_map(&main, &mut out)?;
    out.extend_from_slice(extra);
    Ok(Bytes::from(out))
}

/// One map entry (a str key and its value), already encoded. The parts of a stamp that
/// are the same for every frame of a connection (its `from`, `ws` and `user`) are encoded
/// once, when it opens, and copied into each frame (see [`RawMain::restamp`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    bytes: Bytes,
    /// Where the value starts in `bytes`.
    value_at: usize,
}

impl Entry {
    /// The entry `key: value`; fails as [`msgpack::encode`] fails (a non-wire value).
    pub fn new(key: &str, value: &Value) -> Result<Self, EncodeError> {
        let mut out = Self::key(key, msgpack::encoded_len(value))?;
        let value_at = out.len();
        msgpack::encode(value, &mut out)?;
        Ok(Entry { bytes: Bytes::from(out), value_at })
    }

    /// The entry `key: value` for a str value, without building a [`Value`].
    pub fn str(key: &str, value: &str) -> Result<Self, EncodeError> {
        let header = msgpack::str_header(value.len())?;
        let mut out = Self::key(key, header.as_bytes().len() + value.len())?;
        let value_at = out.len();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(value.as_bytes());
        Ok(Entry { bytes: Bytes::from(out), value_at })
    }

    /// A buffer holding the encoded `key`, with room for `value_len` more bytes.
    fn key(key: &str, value_len: usize) -> Result<Vec<u8>, EncodeError> {
        let header = msgpack::str_header(key.len())?;
        let mut out = Vec::with_capacity(header.as_bytes().len() + key.len() + value_len);
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(key.as_bytes());
        Ok(out)
    }

    /// The encoded entry: key, then value.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The encoded value.
    pub fn value(&self) -> &[u8] {
        self.bytes.get(self.value_at..).unwrap_or_default()
    }
}

/// What the server writes into a routed frame's `main` (spec §1.5 steps 3-4).
#[derive(Clone, Copy, Debug)]
pub struct Stamp<'s> {
    /// The normalized target (`{ws}/{cid}` or `{ws}/*`): the one field that changes from
    /// frame to frame.
    pub to: &'s str,
    /// The `ws` entry: the workspace the frame is sent from.
    pub ws: &'s Entry,
    /// The `from` entry: the sender's address.
    pub from: &'s Entry,
    /// The `user` entry: the sender's `UserInfo` dump.
    pub user: &'s Entry,
}

/// A package's `main` segment scanned in place: its top-level keys and where their values
/// are, nothing decoded. This is the server's per-frame routing view (spec §1.5): it reads
/// the few routing fields it needs as `&str` and writes the stamped frame by copying the
/// other entries byte for byte: a frame costs one pass over `main` and two allocations
/// (the entry list and the stamped frame), whatever `main` holds.
///
/// It accepts and refuses exactly the frames [`split_main`] accepts and refuses, with the
/// same errors ([`msgpack::scan_map`] checks what [`msgpack::decode`] checks), and sees
/// the same map: a key sent twice has the last value at the first position, as a Python
/// `dict` built by the unpacker has (and as [`Map`] decoding has).
#[derive(Debug)]
pub struct RawMain<'a> {
    frame: &'a Bytes,
    limits: DecodeLimits,
    /// One per distinct key, in first-occurrence order; `value` is the last occurrence's.
    entries: Vec<RawEntry<'a>>,
    /// Where the extra bytes start (`frame.len()` if there are none).
    extra_at: usize,
}

/// Above this many distinct keys, duplicate detection uses a hash index instead of a
/// linear search (real `main`s have under ten keys; a hostile one may have a million).
const LINEAR_KEYS: usize = 16;

impl<'a> RawMain<'a> {
    /// Scans the `main` segment at the start of `frame`; the errors are [`split_main`]'s.
    pub fn scan(frame: &'a Bytes, limits: &DecodeLimits) -> Result<Self, PackageError> {
        Self::scan_with(frame, limits, None)
    }

    /// [`RawMain::scan`] with a [`RepeatCache`] ([`msgpack::scan_map_cached`]): the same
    /// result, without walking a value the cache already checked.
    pub fn scan_cached(
        frame: &'a Bytes,
        limits: &DecodeLimits,
        cache: &mut RepeatCache,
    ) -> Result<Self, PackageError> {
        Self::scan_with(frame, limits, Some(cache))
    }

    fn scan_with(
        frame: &'a Bytes,
        limits: &DecodeLimits,
        cache: Option<&mut RepeatCache>,
    ) -> Result<Self, PackageError> {
        let mut entries: Vec<RawEntry<'a>> = Vec::with_capacity(8);
        let mut index: Option<std::collections::HashMap<&'a str, usize>> = None;
        // The scan hands out every known key (`type`, `from`, ...: nearly all of them) as
        // one static str per key, any other key as a slice of the frame. So two keys are
        // the same key if they are the same str, and a static and a slice never are: only
        // two slices need their bytes compared.
        let span = frame.as_ptr_range();
        let same_key = |a: &str, b: &str| {
            a.len() == b.len()
                && (std::ptr::eq(a.as_ptr(), b.as_ptr())
                    || (span.contains(&a.as_ptr()) && span.contains(&b.as_ptr()) && a == b))
        };
        let visit = |entry: RawEntry<'a>| {
            if entries.len() == LINEAR_KEYS && index.is_none() {
                index = Some(entries.iter().enumerate().map(|(i, e)| (e.key, i)).collect());
            }
            let seen = match &mut index {
                Some(index) => match index.entry(entry.key) {
                    std::collections::hash_map::Entry::Occupied(o) => Some(*o.get()),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(entries.len());
                        None
                    }
                },
                None => entries.iter().position(|e| same_key(e.key, entry.key)),
            };
            match seen.and_then(|i| entries.get_mut(i)) {
                // The first occurrence's position (its key bytes), the last one's value.
                Some(first) => *first = RawEntry { key_bytes: first.key_bytes.clone(), ..entry },
                None => entries.push(entry),
            }
        };
        let scanned = match cache {
            Some(cache) => msgpack::scan_map_cached(frame, 0, limits, cache, visit),
            None => msgpack::scan_map(frame, 0, limits, visit),
        };
        let extra_at = scanned.map_err(|source| PackageError::Msgpack { segment: Segment::Main, source })?;
        match frame.first().copied().map(value_kind) {
            Some("map") => Ok(RawMain { frame, limits: *limits, entries, extra_at }),
            other => Err(PackageError::MainNotMap(other.unwrap_or("nil"))),
        }
    }

    /// Where the extra bytes start (`frame.len()` if there are none).
    pub fn extra_at(&self) -> usize {
        self.extra_at
    }

    fn entry(&self, key: &str) -> Option<&RawEntry<'a>> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The encoded value of `key`.
    fn raw(&self, key: &str) -> Option<&'a [u8]> {
        let frame: &'a [u8] = self.frame;
        self.entry(key).and_then(|e| frame.get(e.value.clone()))
    }

    /// The value of `key` if it is a str (what `main.get(key).and_then(Value::as_str)` gives).
    pub fn str(&self, key: &str) -> Option<&'a str> {
        self.entry(key).and_then(|e| e.str)
    }

    /// The encoded value of `key`, a slice of the frame (no copy).
    pub fn encoded(&self, key: &str) -> Option<Bytes> {
        self.entry(key).map(|e| self.frame.slice(e.value.clone()))
    }

    /// The entries, each key once, in the order they first occur.
    pub(crate) fn entries(&self) -> &[RawEntry<'a>] {
        &self.entries
    }

    /// The [`Value::kind`] of an entry's value, without decoding it.
    pub(crate) fn entry_kind(&self, e: &RawEntry<'a>) -> &'static str {
        self.frame.get(e.value.start).copied().map_or("nil", value_kind)
    }

    /// The encoded value of an entry, a slice of the frame (no copy).
    pub(crate) fn entry_encoded(&self, e: &RawEntry<'a>) -> Bytes {
        self.frame.slice(e.value.clone())
    }

    /// The keys, each once, in the order they first occur.
    pub fn keys(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.entries.iter().map(|e| e.key)
    }

    /// The [`Value::kind`] of `key`'s value, without decoding it.
    pub fn kind(&self, key: &str) -> Option<&'static str> {
        self.raw(key).and_then(|v| v.first().copied()).map(value_kind)
    }

    /// The decoded value of `key`, for the rare paths that need a whole value.
    pub fn value(&self, key: &str) -> Option<Value> {
        let e = self.entry(key)?;
        msgpack::decode(self.frame, e.value.start, &self.limits).ok().map(|(v, _)| v)
    }

    /// Writes the stamped frame: `main` with `to`, `ws`, `from` and `user` set to `stamp`'s
    /// (a key `main` already has keeps its position, missing ones are appended in the
    /// order to, ws, from, user), then the extra bytes untouched.
    ///
    /// The result decodes to the map the Map-based [`restamp`] writes for the same stamp,
    /// and for a `main` encoded as our encoder and Python's write it (smallest headers) it
    /// is the same bytes (property-tested). Entries are copied as sent rather than
    /// re-encoded, so a peer that used a longer header than needed (say `str 8` for a
    /// short str) has it kept; no stock peer does, and every reader accepts both. A
    /// stamped key whose value was sent exactly as stamped (a client's own `from`, an
    /// absolute `to`) is copied as sent too, so a typical frame is the header, one run
    /// of `main`, the `ws` and `user` entries and the extra bytes. One allocation, at the
    /// exact size.
    pub fn restamp(&self, stamp: &Stamp<'_>) -> Result<Bytes, PackageError> {
        self.restamp_parts(stamp, usize::MAX).map(|(frame, _)| frame)
    }

    /// [`RawMain::restamp`] as two pieces when the extra bytes are at least `split_min`
    /// long: the stamped `main`, and the extra bytes as a zero-copy slice of the frame
    /// they came in (empty when not split). A server relaying a 256 KiB chunk call
    /// would otherwise copy the chunk into a fresh frame only to have its socket copy it
    /// again; a websocket writer can send the two pieces as one frame's payload.
    pub fn restamp_parts(&self, stamp: &Stamp<'_>, split_min: usize) -> Result<(Bytes, Bytes), PackageError> {
        let to_header = msgpack::str_header(stamp.to.len())?;
        let to_value_len = to_header.as_bytes().len() + stamp.to.len();
        let entries = [None, Some(stamp.ws), Some(stamp.from), Some(stamp.user)];
        debug_assert!(
            entries.iter().zip(STAMPED_KEYS).all(|(e, k)| e.is_none_or(|e| e.as_bytes().starts_with(k))),
            "stamp entries for the wrong keys"
        );
        let stamped_len = |i: usize| match entries[i] {
            Some(entry) => entry.as_bytes().len(),
            None => STAMPED_KEYS[0].len() + to_value_len,
        };
        let frame: &[u8] = self.frame;
        let mut present = [false; 4];
        let mut as_sent = [false; 4];
        let mut len = 0;
        for e in &self.entries {
            if let Some(i) = stamped_slot(e.key) {
                present[i] = true;
                let sent = &frame[e.value.clone()];
                // Same value, same encoding: the header form is the one its length allows.
                as_sent[i] = match entries[i] {
                    Some(entry) => sent == entry.value(),
                    None => e.str == Some(stamp.to) && sent.len() == to_value_len,
                };
                if !as_sent[i] {
                    len += stamped_len(i);
                    continue;
                }
            }
            len += e.key_bytes.len() + e.value.len();
        }
        let missing = (0..4).filter(|i| !present[*i]);
        len += missing.clone().map(stamped_len).sum::<usize>();
        let header = msgpack::map_header(self.entries.len() + missing.clone().count())?;
        let extra = self.frame.get(self.extra_at..).unwrap_or_default();
        let split = extra.len() >= split_min;
        len += header.as_bytes().len() + if split { 0 } else { extra.len() };

        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(header.as_bytes());
        let put = |out: &mut Vec<u8>, i: usize| match entries[i] {
            Some(entry) => out.extend_from_slice(entry.as_bytes()),
            None => {
                out.extend_from_slice(STAMPED_KEYS[0]);
                out.extend_from_slice(to_header.as_bytes());
                out.extend_from_slice(stamp.to.as_bytes());
            }
        };
        // Bytes kept as sent are copied in runs: consecutive entries are adjacent in `frame`.
        let mut run = 0..0;
        for e in &self.entries {
            match stamped_slot(e.key) {
                Some(i) if !as_sent[i] => {
                    if !run.is_empty() {
                        out.extend_from_slice(&frame[std::mem::take(&mut run)]);
                    }
                    put(&mut out, i);
                }
                _ => {
                    for bytes in [e.key_bytes.clone(), e.value.clone()] {
                        if bytes.start != run.end {
                            let done = std::mem::replace(&mut run, bytes.start..bytes.start);
                            out.extend_from_slice(&frame[done]);
                        }
                        run.end = bytes.end;
                    }
                }
            }
        }
        out.extend_from_slice(&frame[run]);
        missing.for_each(|i| put(&mut out, i));
        if split {
            debug_assert_eq!(out.len(), len, "restamp sizing");
            return Ok((Bytes::from(out), self.frame.slice(self.extra_at..)));
        }
        out.extend_from_slice(extra);
        debug_assert_eq!(out.len(), len, "restamp sizing");
        Ok((Bytes::from(out), Bytes::new()))
    }
}

/// The stamped keys `to`, `ws`, `from`, `user`, encoded (copied into every stamped
/// frame), in the order [`RawMain::restamp`] appends the missing ones. It is the order of
/// the Map-based stamp it replaces (`insert` to, ws, from, user); upstream's Python server
/// gives the same map for every frame a stock client sends (which always carries `to` and
/// `from`: upstream appends `ws` then `user`).
const STAMPED_KEYS: [&[u8]; 4] = [b"\xa2to", b"\xa2ws", b"\xa4from", b"\xa4user"];

/// The index of `key` in [`STAMPED_KEYS`].
fn stamped_slot(key: &str) -> Option<usize> {
    match key {
        "to" => Some(0),
        "ws" => Some(1),
        "from" => Some(2),
        "user" => Some(3),
        _ => None,
    }
}

/// The [`Value::kind`] of the value a msgpack marker starts (ext and `0xc1` never decode;
/// they are named for completeness).
fn value_kind(marker: u8) -> &'static str {
    match marker {
        0x00..=0x7f | 0xcc..=0xd3 | 0xe0..=0xff => "int",
        0x80..=0x8f | 0xde | 0xdf => "map",
        0x90..=0x9f | 0xdc | 0xdd => "list",
        0xa0..=0xbf | 0xd9..=0xdb => "str",
        0xc0 => "nil",
        0xc2 | 0xc3 => "bool",
        0xc4..=0xc6 => "bytes",
        0xca | 0xcb => "float",
        0xc1 => "reserved",
        _ => "ext",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map;
    use crate::msgpack::tests::arb_wire;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    const SESSION: &str = "cVUCtvLRh9TqydoHwme6tn";

    /// Python: packb({'type':'method','from':'ws/prov','to':'ws/cons',
    /// 'method':'<S>.heartbeat','parent':'<S>'}) (spec §2.6): a single-segment package.
    const HEARTBEAT: &str =
        "85a474797065a66d6574686f64a466726f6da777732f70726f76a2746fa777732f636f6e73a66d65\
        74686f64d9206356554374764c526839547179646f48776d6536746e2e686561727462656174a6706172656e74b663565543\
        74764c526839547179646f48776d6536746e";

    /// Python: packb(main) + packb({'args':[1,{'b':5}],'with_kwargs':True,'promise':'*',
    /// 't':15.0}) for the add(1, b=5) call of spec §2.6.
    const CALL: &str = "85a474797065a66d6574686f64a466726f6da777732f636f6e73a2746fa777732f70726f76a66d6574\
        686f64b173657276696365732e64656d6f2e616464a773657373696f6eb66356554374764c526839547179646f48776d65\
        36746e84a461726773920181a16205ab776974685f6b7761726773c3a770726f6d697365a12aa174cb402e000000000000";

    fn heartbeat_main() -> Map {
        map! {
            "type" => "method", "from" => "ws/prov", "to" => "ws/cons",
            "method" => format!("{SESSION}.heartbeat"), "parent" => SESSION,
        }
    }

    fn call() -> (Map, Map) {
        let main = map! {
            "type" => "method", "from" => "ws/cons", "to" => "ws/prov",
            "method" => "services.demo.add", "session" => SESSION,
        };
        let extra = map! {
            "args" => vec![Value::Int(1), Value::Map(map! {"b" => 5})],
            "with_kwargs" => true, "promise" => "*", "t" => 15.0,
        };
        (main, extra)
    }

    fn limits() -> DecodeLimits {
        DecodeLimits::default()
    }

    #[test]
    fn golden_heartbeat_single_segment() {
        let bytes = hex(HEARTBEAT);
        assert_eq!(encode_package(&heartbeat_main(), None).unwrap(), bytes);
        // An empty extra is omitted.
        assert_eq!(encode_package(&heartbeat_main(), Some(&Map::new())).unwrap(), bytes);
        let p = decode_package(&Bytes::from(bytes), &limits()).unwrap();
        assert_eq!(p, Package { main: heartbeat_main(), extra: None });
    }

    #[test]
    fn golden_call_two_segments() {
        let (main, extra) = call();
        let bytes = hex(CALL);
        assert_eq!(encode_package(&main, Some(&extra)).unwrap(), bytes);
        let frame = Bytes::from(bytes);
        let p = decode_package(&frame, &limits()).unwrap();
        assert_eq!(p, Package { main: main.clone(), extra: Some(extra.clone()) });
        // t arrives as a float 64, as Python sends it.
        assert!(matches!(p.extra.as_ref().unwrap()["t"], Value::F64(f) if f == 15.0));
        let (m, at) = split_main(&frame, &limits()).unwrap();
        assert_eq!(m, main);
        assert_eq!(frame[at], 0x84, "extra starts with its fixmap header");
    }

    #[test]
    fn merged_extra_wins() {
        let p = Package {
            main: map! {"type" => "method", "args" => "main", "to" => "x"},
            extra: Some(map! {"args" => vec![Value::Int(1)], "promise" => "*"}),
        };
        let ctx = p.main.clone();
        let m = p.merged();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["type", "args", "to", "promise"]);
        assert_eq!(m["args"], Value::List(vec![Value::Int(1)]));
        assert_eq!(ctx["args"], Value::from("main"));
        assert_eq!(merge(map! {"a" => 1}, None), map! {"a" => 1});
    }

    #[test]
    fn wrong_segment_types() {
        // main is a list
        let r = decode_package(&Bytes::from(hex("920102")), &limits());
        assert_eq!(r, Err(PackageError::MainNotMap("list")));
        // extra is a string
        let mut f = hex(HEARTBEAT);
        f.extend(hex("a3616263"));
        let r = decode_package(&Bytes::from(f), &limits());
        assert_eq!(r, Err(PackageError::ExtraNotMap("str")));
        // extra is nil
        let mut f = hex(HEARTBEAT);
        f.push(0xc0);
        assert_eq!(decode_package(&Bytes::from(f), &limits()), Err(PackageError::ExtraNotMap("nil")));
        assert_eq!(split_main(&Bytes::from(hex("c0")), &limits()), Err(PackageError::MainNotMap("nil")));
    }

    #[test]
    fn trailing_bytes() {
        let mut f = hex(CALL);
        let n = f.len();
        f.extend([0x80, 0x01]);
        assert_eq!(
            decode_package(&Bytes::from(f), &limits()),
            Err(PackageError::TrailingBytes { offset: n, count: 2 })
        );
    }

    #[test]
    fn msgpack_errors_name_the_segment() {
        let r = decode_package(&Bytes::new(), &limits());
        assert!(matches!(
            r,
            Err(PackageError::Msgpack {
                segment: Segment::Main,
                source: DecodeError::Truncated { offset: 0, .. }
            })
        ));
        let mut f = hex(HEARTBEAT);
        let n = f.len();
        f.extend(hex("81a161c1"));
        assert_eq!(
            decode_package(&Bytes::from(f), &limits()),
            Err(PackageError::Msgpack {
                segment: Segment::Extra,
                source: DecodeError::ReservedMarker { offset: n + 3 }
            })
        );
    }

    #[test]
    fn every_prefix_of_a_real_package_errors() {
        let frame = Bytes::from(hex(CALL));
        let (main_only, extra_at) = split_main(&frame, &limits()).unwrap();
        for cut in 0..frame.len() {
            let r = decode_package(&frame.slice(..cut), &limits());
            if cut == extra_at {
                // Exactly the main segment: a valid single-segment package.
                assert_eq!(r, Ok(Package { main: main_only.clone(), extra: None }));
                continue;
            }
            let segment = if cut < extra_at { Segment::Main } else { Segment::Extra };
            assert!(
                matches!(&r, Err(PackageError::Msgpack { segment: s, source: DecodeError::Truncated { .. } }) if *s == segment),
                "cut {cut}: {r:?}"
            );
        }
    }

    #[test]
    fn restamp_overwrites_main_and_keeps_extra_bytes() {
        let frame = Bytes::from(hex(CALL));
        let (_, extra_at) = split_main(&frame, &limits()).unwrap();
        let out = restamp(&frame, &limits(), |m| {
            m.insert("from".into(), "ws/cons".into());
            m.insert("ws".into(), "ws".into());
            m.insert("user".into(), Value::Map(map! {"id" => "anon"}));
        })
        .unwrap();
        let p = decode_package(&out, &limits()).unwrap();
        let (mut main, extra) = call();
        main.insert("ws".into(), "ws".into());
        main.insert("user".into(), Value::Map(map! {"id" => "anon"}));
        assert_eq!(p, Package { main, extra: Some(extra) });
        assert!(out.ends_with(&frame[extra_at..]));
        // Extra is not validated (upstream forwards it blindly), and no-extra works too.
        let mut f = hex(HEARTBEAT);
        f.extend([0xc1, 0xc1]);
        let out = restamp(&Bytes::from(f), &limits(), |_| {}).unwrap();
        assert!(out.ends_with(&[0xc1, 0xc1]));
        let out = restamp(&Bytes::from(hex(HEARTBEAT)), &limits(), |_| {}).unwrap();
        assert_eq!(&out[..], &hex(HEARTBEAT)[..]);
    }

    /// A stamp's values, and its entries encoded as the router encodes them.
    struct Parts {
        to: String,
        values: (String, String, Value),
        entries: (Entry, Entry, Entry),
    }

    fn parts(to: &str, ws: &str, from: &str, user: &Value) -> Parts {
        Parts {
            to: to.to_owned(),
            values: (ws.to_owned(), from.to_owned(), user.clone()),
            entries: (
                Entry::str("ws", ws).unwrap(),
                Entry::str("from", from).unwrap(),
                Entry::new("user", user).unwrap(),
            ),
        }
    }

    impl Parts {
        fn stamp(&self) -> Stamp<'_> {
            let (ws, from, user) = &self.entries;
            Stamp { to: &self.to, ws, from, user }
        }
    }

    /// What the router did before [`RawMain`]: the Map-based stamp, inserting to, ws, from,
    /// user in that order. The reference [`RawMain::restamp`] is checked against.
    fn map_restamp(frame: &Bytes, limits: &DecodeLimits, parts: &Parts) -> Result<Bytes, PackageError> {
        let (ws, from, user) = &parts.values;
        restamp(frame, limits, |m| {
            m.insert("to".into(), parts.to.as_str().into());
            m.insert("ws".into(), ws.as_str().into());
            m.insert("from".into(), from.as_str().into());
            m.insert("user".into(), user.clone());
        })
    }

    fn raw_restamp(frame: &Bytes, limits: &DecodeLimits, stamp: &Stamp<'_>) -> Result<Bytes, PackageError> {
        RawMain::scan(frame, limits)?.restamp(stamp)
    }

    /// A main segment written entry by entry, so that it can hold a key twice.
    fn raw_map(entries: &[(String, Value)]) -> Vec<u8> {
        let mut out = msgpack::map_header(entries.len()).unwrap().as_bytes().to_vec();
        for (k, v) in entries {
            msgpack::encode(&Value::from(k.as_str()), &mut out).unwrap();
            msgpack::encode(v, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn stamped_keys_are_their_encodings() {
        for (i, key) in ["to", "ws", "from", "user"].iter().enumerate() {
            assert_eq!(STAMPED_KEYS[i], &msgpack::encode_to_vec(&Value::from(*key)).unwrap()[..]);
            assert_eq!(stamped_slot(key), Some(i));
        }
        assert_eq!(stamped_slot("type"), None);
    }

    fn user() -> Value {
        Value::Map(
            map! {"id" => "anon", "scope" => map! {"workspaces" => map! {"ws" => "rw"}, "client_id" => "c"}},
        )
    }

    #[test]
    fn raw_restamp_is_the_map_restamp() {
        let user = user();
        let parts = parts("ws/prov", "ws", "ws/cons", &user);
        let stamp = parts.stamp();
        // The golden call (to and from present: stamped in place, ws and user appended),
        // the heartbeat (one segment), and a main with none of the stamped keys.
        let plain = encode_package(&map! {"type" => "e", "data" => 1}, Some(&map! {"x" => 2})).unwrap();
        for f in [hex(CALL), hex(HEARTBEAT), plain] {
            let frame = Bytes::from(f);
            let got = raw_restamp(&frame, &limits(), &stamp).unwrap();
            assert_eq!(got, map_restamp(&frame, &limits(), &parts).unwrap());
        }
        let frame = Bytes::from(hex(CALL));
        let main = decode_package(&raw_restamp(&frame, &limits(), &stamp).unwrap(), &limits()).unwrap().main;
        assert_eq!(
            main.keys().collect::<Vec<_>>(),
            ["type", "from", "to", "method", "session", "ws", "user"]
        );
        assert_eq!(main["user"], user);
        let plain = Bytes::from(encode_package(&map! {"type" => "e", "data" => 1}, None).unwrap());
        let main = split_main(&raw_restamp(&plain, &limits(), &stamp).unwrap(), &limits()).unwrap().0;
        assert_eq!(main.keys().collect::<Vec<_>>(), ["type", "data", "to", "ws", "from", "user"]);
    }

    #[test]
    fn values_sent_as_stamped_are_kept_and_others_replaced() {
        let parts = parts("W/x", "W", "W/me", &Value::Map(map! {"id" => "u"}));
        let stamp = parts.stamp();
        // A stock client's frame: its own `from` and an absolute `to` are already right.
        let sent = map! {"type" => "method", "from" => "W/me", "to" => "W/x", "method" => "m"};
        let frame = Bytes::from(encode_package(&sent, None).unwrap());
        let out = raw_restamp(&frame, &limits(), &stamp).unwrap();
        assert_eq!(out, map_restamp(&frame, &limits(), &parts).unwrap());
        assert!(
            out.starts_with(&[&[0x86u8][..], &frame[1..]].concat()),
            "main copied as sent, ws and user appended"
        );
        // `to` sent as a str 8 (a longer header than needed): same value, other bytes, so
        // it is replaced by the canonical encoding, as the Map-based restamp wrote it.
        let mut f = hex("82a2746fd903");
        f.extend(b"W/x");
        f.extend(hex("a474797065a165"));
        let frame = Bytes::from(f);
        assert_eq!(
            raw_restamp(&frame, &limits(), &stamp).unwrap(),
            map_restamp(&frame, &limits(), &parts).unwrap()
        );
        // Another entry sent with a str 8: kept as sent (same map, other bytes).
        let mut f = hex("82a474797065d901");
        f.extend(b"e");
        f.extend(hex("a2746fa3"));
        f.extend(b"W/x");
        let frame = Bytes::from(f);
        let out = raw_restamp(&frame, &limits(), &stamp).unwrap();
        let want = map_restamp(&frame, &limits(), &parts).unwrap();
        assert_ne!(out, want);
        assert_eq!(decode_package(&out, &limits()), decode_package(&want, &limits()));
    }

    #[test]
    fn raw_main_reads_the_routing_fields() {
        let frame = Bytes::from(hex(CALL));
        let raw = RawMain::scan(&frame, &limits()).unwrap();
        assert_eq!(raw.str("to"), Some("ws/prov"));
        assert_eq!(raw.str("session"), Some(SESSION));
        assert_eq!(raw.str("ws"), None);
        assert_eq!(raw.extra_at(), split_main(&frame, &limits()).unwrap().1);
        let frame = Bytes::from(
            encode_package(&map! {"to" => 5, "from" => Value::Nil, "s" => vec![Value::from(1)]}, None)
                .unwrap(),
        );
        let raw = RawMain::scan(&frame, &limits()).unwrap();
        assert_eq!(
            (raw.str("to"), raw.kind("to"), raw.value("to")),
            (None, Some("int"), Some(Value::from(5)))
        );
        assert_eq!((raw.kind("from"), raw.raw("from")), (Some("nil"), Some(&[0xc0u8][..])));
        assert_eq!((raw.kind("s"), raw.kind("none"), raw.value("none")), (Some("list"), None, None));
        assert_eq!(raw.extra_at(), frame.len());
    }

    #[test]
    fn raw_main_duplicate_keys_last_wins_first_position() {
        // {"to": "a", "x": 1, "to": "b", "session": "s1", "x": 2, "session": 7}
        let entries: Vec<(String, Value)> = vec![
            ("to".into(), "a".into()),
            ("x".into(), 1.into()),
            ("to".into(), "b".into()),
            ("session".into(), "s1".into()),
            ("x".into(), 2.into()),
            ("session".into(), 7.into()),
        ];
        let frame = Bytes::from(raw_map(&entries));
        let raw = RawMain::scan(&frame, &limits()).unwrap();
        assert_eq!(
            (raw.str("to"), raw.str("session"), raw.value("x")),
            (Some("b"), None, Some(Value::from(2)))
        );
        let parts = parts("W/b", "W", "W/c", &user());
        let stamp = parts.stamp();
        let got = raw.restamp(&stamp).unwrap();
        assert_eq!(got, map_restamp(&frame, &limits(), &parts).unwrap());
        let main = split_main(&got, &limits()).unwrap().0;
        assert_eq!(main.keys().collect::<Vec<_>>(), ["to", "x", "session", "ws", "from", "user"]);
        assert_eq!((&main["x"], &main["session"]), (&Value::from(2), &Value::from(7)));
        // Past the linear search: many distinct keys, then duplicates of early and late ones.
        let mut entries: Vec<(String, Value)> = (0..100).map(|i| (format!("k{i}"), Value::from(i))).collect();
        entries.push(("k3".into(), "late".into()));
        entries.push(("k99".into(), "later".into()));
        let frame = Bytes::from(raw_map(&entries));
        let raw = RawMain::scan(&frame, &limits()).unwrap();
        assert_eq!(
            (raw.str("k3"), raw.str("k99"), raw.value("k50")),
            (Some("late"), Some("later"), Some(Value::from(50)))
        );
        assert_eq!(raw.restamp(&stamp).unwrap(), map_restamp(&frame, &limits(), &parts).unwrap());
    }

    #[test]
    fn raw_main_refuses_what_split_main_refuses() {
        let router_limits = DecodeLimits { max_depth: 3, max_items: 12 };
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            hex("920102"),             // a list
            hex("c0"),                 // nil
            hex("a3616263"),           // a str
            hex("c4026162"),           // bin
            hex("cb402e000000000000"), // float
            hex("810101"),             // non-str key
            hex("81c401610101"),       // bin key
            hex("81a2c32801"),         // key not UTF-8
            hex("81a161a2c328"),       // value not UTF-8
            hex("81a161d40100"),       // ext value
            hex("81a161c1"),           // reserved marker
            hex("82a16101"),           // truncated
            hex("81a16191919190"),     // too deep for the router limits
            raw_map(&(0..10).map(|i| (format!("k{i}"), Value::from(i))).collect::<Vec<_>>()), // too many items
            hex("81a2746f05"), // to is an int: scans fine
        ];
        for f in cases {
            let frame = Bytes::from(f);
            for l in [limits(), router_limits] {
                let raw = RawMain::scan(&frame, &l).map(|r| r.extra_at());
                assert_eq!(raw, split_main(&frame, &l).map(|(_, at)| at), "{frame:?} {l:?}");
            }
        }
    }

    #[test]
    fn raw_restamp_keeps_extra_bytes_and_prefixes_fail_like_split_main() {
        let parts = parts("ws/prov", "ws", "ws/cons", &user());
        let stamp = parts.stamp();
        // Extra is not validated (upstream forwards it blindly).
        let mut f = hex(HEARTBEAT);
        f.extend([0xc1, 0xc1]);
        let out = raw_restamp(&Bytes::from(f), &limits(), &stamp).unwrap();
        assert!(out.ends_with(&[0xc1, 0xc1]));
        let frame = Bytes::from(hex(CALL));
        for cut in 0..frame.len() {
            let f = frame.slice(..cut);
            assert_eq!(
                RawMain::scan(&f, &limits()).map(|r| r.extra_at()),
                split_main(&f, &limits()).map(|(_, at)| at),
                "cut {cut}"
            );
        }
        assert_eq!(Entry::new("user", &Value::Set(vec![])), Err(EncodeError::NotWire("set")));
        let e = Entry::new("user", &user()).unwrap();
        assert_eq!(e.as_bytes(), &msgpack::encode_to_vec(&Value::Map(map! {"user" => user()})).unwrap()[1..]);
        assert_eq!(e.value(), &msgpack::encode_to_vec(&user()).unwrap()[..]);
        assert_eq!(Entry::str("ws", "W").unwrap(), Entry::new("ws", &Value::from("W")).unwrap());
    }

    #[test]
    fn encode_package_rejects_non_wire() {
        let main = map! {"type" => "method", "x" => Value::Set(vec![])};
        assert_eq!(encode_package(&main, None), Err(PackageError::Encode(EncodeError::NotWire("set"))));
    }

    #[test]
    fn large_bin_passes_through_zero_copy() {
        let payload = Bytes::from(vec![0xabu8; 1 << 20]);
        let main = map! {"type" => "method", "to" => "ws/x"};
        let extra = map! {"args" => vec![Value::Bytes(payload.clone())]};
        let frame = Bytes::from(encode_package(&main, Some(&extra)).unwrap());
        let p = decode_package(&frame, &limits()).unwrap();
        let args = p.extra.unwrap();
        let Value::List(l) = &args["args"] else { panic!("args not a list") };
        let Value::Bytes(b) = &l[0] else { panic!("not bytes") };
        assert_eq!(b, &payload);
        let start = b.as_ptr() as usize - frame.as_ptr() as usize;
        assert!(start < frame.len() && start + b.len() == frame.len(), "payload is a slice of the frame");
    }

    fn arb_map() -> impl Strategy<Value = Map> {
        proptest::collection::vec((".{0,10}", arb_wire()), 0..8).prop_map(|kv| kv.into_iter().collect())
    }

    proptest! {
        #[test]
        fn package_roundtrip(main in arb_map(), extra in proptest::option::of(arb_map())) {
            let bytes = Bytes::from(encode_package(&main, extra.as_ref()).unwrap());
            let p = decode_package(&bytes, &limits()).unwrap();
            let expected_extra = extra.filter(|e| !e.is_empty());
            prop_assert_eq!(p, Package { main, extra: expected_extra });
        }

        #[test]
        fn restamp_keeps_extra_identical(main in arb_map(), extra in arb_map(), from in ".{0,20}") {
            let bytes = Bytes::from(encode_package(&main, Some(&extra)).unwrap());
            let (_, at) = split_main(&bytes, &limits()).unwrap();
            let out = restamp(&bytes, &limits(), |m| {
                m.insert("from".into(), Value::Str(from.clone()));
            }).unwrap();
            let (new_main, new_at) = split_main(&out, &limits()).unwrap();
            prop_assert_eq!(&out[new_at..], &bytes[at..]);
            let mut expected = main.clone();
            expected.insert("from".into(), Value::Str(from));
            prop_assert_eq!(new_main, expected);
        }

        /// A call's payload read key by key is the map reader's view of it, with the same
        /// errors: any entries (the read keys, repeated or not, of any type, and others),
        /// the frame cut anywhere after the main segment, or with a byte changed there.
        #[test]
        fn call_extra_equals_the_map_readers(
            entries in proptest::collection::vec(
                (prop_oneof![
                    Just("args".to_owned()), Just("promise".to_owned()), Just("t".to_owned()),
                    Just("with_kwargs".to_owned()), Just("_enc".to_owned()), ".{0,6}",
                ], arb_wire()),
                0..6,
            ),
            flip in any::<(usize, u8)>(),
            not_map in proptest::option::of(arb_wire()),
        ) {
            let main = Map::from_iter([("type".to_owned(), Value::from("method"))]);
            let mut bytes = Vec::new();
            msgpack::encode_map(&main, &mut bytes).unwrap();
            let at = bytes.len();
            // Written entry by entry, so that repeated keys reach the reader.
            bytes.push(0xdf);
            bytes.extend_from_slice(&u32::try_from(entries.len()).unwrap().to_be_bytes());
            for (k, v) in &entries {
                msgpack::encode(&Value::from(k.as_str()), &mut bytes).unwrap();
                msgpack::encode(v, &mut bytes).unwrap();
            }
            let check = |frame: &Bytes| {
                let via_map = decode_extra(frame, at, &limits())
                    .map(|m| CallExtra::from_map(m.unwrap_or_default()));
                // As text: a changed byte may make a NaN, which equals nothing.
                assert_eq!(format!("{:?}", decode_call_extra(frame, at, &limits())), format!("{via_map:?}"));
            };
            let whole = Bytes::from(bytes.clone());
            check(&whole);
            for cut in at..whole.len() {
                check(&whole.slice(..cut));
            }
            let mut mutated = bytes.clone();
            let i = at + flip.0 % (mutated.len() - at);
            mutated[i] ^= flip.1.max(1);
            check(&Bytes::from(mutated));
            bytes.truncate(at);
            if let Some(v) = not_map {
                msgpack::encode(&v, &mut bytes).unwrap();
            }
            bytes.push(0x90);
            check(&Bytes::from(bytes));
        }

        /// The raw restamp writes byte for byte what the Map-based one wrote, for any
        /// main (stamped keys present or not, sent twice or not, of any type, nested
        /// values of every wire family) and any extra.
        #[test]
        fn raw_restamp_equals_map_restamp(
            entries in proptest::collection::vec(
                (prop_oneof![
                    Just("to".to_owned()), Just("from".to_owned()), Just("ws".to_owned()),
                    Just("user".to_owned()), Just("type".to_owned()), Just("session".to_owned()),
                    ".{0,6}",
                ], prop_oneof![
                    arb_wire(),
                    ".{0,20}".prop_map(Value::Str),
                    // The stamp's own values, so that some are sent exactly as stamped.
                    prop_oneof![Just("W/x"), Just("W"), Just("W/me")].prop_map(Value::from),
                    Just(Value::Map(map! {"id" => "u"})),
                ]),
                0..12,
            ),
            extra in proptest::option::of(arb_map()),
            to in prop_oneof![".{0,70}", Just("W/x".to_owned())],
            user in prop_oneof![arb_wire(), Just(Value::Map(map! {"id" => "u"}))],
        ) {
            let mut f = raw_map(&entries);
            if let Some(extra) = &extra {
                msgpack::encode_map(extra, &mut f).unwrap();
            }
            let frame = Bytes::from(f);
            let parts = parts(&to, "W", "W/me", &user);
            let stamp = parts.stamp();
            let want = map_restamp(&frame, &limits(), &parts).unwrap();
            let raw = RawMain::scan(&frame, &limits()).unwrap();
            prop_assert_eq!(raw.restamp(&stamp).unwrap(), want.clone());
            // Split anywhere, the two pieces are the same bytes; the extra is not copied.
            for split_min in [0, 1, frame.len() - raw.extra_at(), usize::MAX] {
                let (head, tail) = raw.restamp_parts(&stamp, split_min).unwrap();
                prop_assert_eq!([&head[..], &tail[..]].concat(), &want[..]);
                let extra = frame.len() - raw.extra_at();
                prop_assert_eq!(tail.len(), if extra >= split_min { extra } else { 0 });
                if !tail.is_empty() {
                    prop_assert_eq!(tail.as_ptr(), frame[raw.extra_at()..].as_ptr());
                }
            }
            // The accessors see the decoded map.
            let (main, at) = split_main(&frame, &limits()).unwrap();
            prop_assert_eq!(raw.extra_at(), at);
            for key in ["to", "from", "ws", "user", "type", "session", "nope"] {
                prop_assert_eq!(raw.str(key), main.get(key).and_then(Value::as_str));
                prop_assert_eq!(raw.kind(key), main.get(key).map(Value::kind));
                let value = raw.value(key);
                prop_assert_eq!(value.as_ref(), main.get(key));
            }
        }

        /// Any bytes: the same verdict as `split_main`, never a panic.
        #[test]
        fn raw_scan_agrees_with_split_main(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            max_depth in 1usize..5,
            max_items in 1usize..30,
        ) {
            let frame = Bytes::from(data);
            for l in [limits(), DecodeLimits { max_depth, max_items }] {
                let raw = RawMain::scan(&frame, &l).map(|r| r.extra_at());
                prop_assert_eq!(raw, split_main(&frame, &l).map(|(_, at)| at));
            }
        }

        #[test]
        fn arbitrary_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_package(&Bytes::from(data), &limits());
        }
    }
}
