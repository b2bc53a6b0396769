//! The package: one binary frame = `msgpack(main)` optionally followed by `msgpack(extra)`.
//!
//! Spec §2.1: `main` holds the routing fields (`type`, `from`, `to`, `method`, `session`,
//! `parent`, `ws`, `user`), `extra` the payload (`args`, `with_kwargs`, `promise`, `t`, or
//! the encryption envelope). The two objects are written back to back with no length prefix;
//! the receiver reads the first, then a second one if bytes remain, and merges `extra` into
//! `main` with extra keys winning.
//!
//! The server routes on `main` alone (spec §1.5): it decodes only the first object,
//! overwrites `from`/`to`/`ws`/`user`, re-encodes it and appends the original extra bytes.
//! [`split_main`] and [`restamp`] do exactly that without ever looking inside `extra`, so
//! a 64 MB payload costs one memcpy on its way through the server.
//!
//! Fuzzing: [`decode_package`] accepts any bytes (`Bytes::copy_from_slice(data)`) and
//! returns an error rather than panicking, allocating beyond the input, or recursing.

use std::fmt;

use bytes::Bytes;

use crate::msgpack::{self, DecodeError, DecodeLimits, EncodeError, Rope};
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

/// Writes a package as a [`Rope`]: the same bytes as [`encode_package`], with large `bin`
/// payloads referenced instead of copied. The endpoint sends every call this way: a small
/// package becomes one buffer for free, a large one is cut into `message_cache` chunks
/// without first being copied whole (spec §3).
pub fn encode_package_rope(main: &Map, extra: Option<&Map>) -> Result<Rope, PackageError> {
    let extra = extra.filter(|e| !e.is_empty());
    let len = msgpack::encoded_map_len(main) + extra.map_or(0, msgpack::encoded_map_len);
    // The exact size when everything will be copied; otherwise the size of the small
    // parts is unknown without a second walk, and growing is cheap next to the payloads.
    let mut rope = Rope::with_capacity(if len < 4 * Rope::SHARE_MIN { len } else { 1024 });
    msgpack::encode_map_to_rope(main, &mut rope)?;
    if let Some(extra) = extra {
        msgpack::encode_map_to_rope(extra, &mut rope)?;
    }
    Ok(rope)
}

/// The server's re-stamp (spec §1.5 steps 3-4): decode `main`, let `edit` overwrite fields
/// (`from`, `to`, `ws`, `user`), re-encode it and append the original extra bytes
/// untouched.
///
/// The result is one contiguous buffer (a websocket frame is one payload), allocated once
/// at its exact size; the extra bytes are copied into it once. Nothing about `extra` is
/// validated, as upstream does not validate it either: a malformed payload travels on and
/// the receiver rejects it. Use [`restamp_parts`] to avoid the copy when the sink accepts
/// two buffers.
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

/// Like [`restamp`] but returns the new main segment and the extra bytes as two buffers
/// (the extra is a zero-copy slice of `frame`), for sinks that take vectored writes.
pub fn restamp_parts(
    frame: &Bytes,
    limits: &DecodeLimits,
    edit: impl FnOnce(&mut Map),
) -> Result<(Bytes, Bytes), PackageError> {
    let (mut main, extra_at) = split_main(frame, limits)?;
    edit(&mut main);
    let mut out = Vec::with_capacity(msgpack::encoded_map_len(&main));
    msgpack::encode_map(&main, &mut out)?;
    Ok((Bytes::from(out), frame.slice(extra_at..)))
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

    #[test]
    fn restamp_parts_is_zero_copy_for_extra() {
        let frame = Bytes::from(hex(CALL));
        let (_, extra_at) = split_main(&frame, &limits()).unwrap();
        let (main, extra) = restamp_parts(&frame, &limits(), |m| {
            m.insert("ws".into(), "ws".into());
        })
        .unwrap();
        assert_eq!(extra.as_ptr(), frame[extra_at..].as_ptr());
        assert_eq!(split_main(&main, &limits()).unwrap().0["ws"], Value::from("ws"));
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

        #[test]
        fn arbitrary_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_package(&Bytes::from(data), &limits());
        }
    }
}
