//! Hostile and malformed frames through the public package API, as a peer would send them.
//!
//! Each malformed-input class maps to one specific error variant; none may panic, recurse
//! per nesting level, or allocate more than the input warrants. The helper [`fuzz_one`]
//! is the body a cargo-fuzz target would run.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hypha_core::msgpack::{self, DecodeError, DecodeLimits, EncodeError, MAX_DEPTH};
use hypha_core::package::{
    self, decode_package, encode_package, restamp, split_main, Package, PackageError, Segment,
};
use hypha_core::{map, Map, Value};

/// What a fuzz target does with arbitrary bytes: decode, and if that works, check that
/// re-encoding and re-decoding gives the same package.
fn fuzz_one(data: &[u8]) {
    let frame = Bytes::copy_from_slice(data);
    if let Ok(p) = decode_package(&frame, &DecodeLimits::default()) {
        let again = encode_package(&p.main, p.extra.as_ref()).expect("decoded values are wire values");
        let back = decode_package(&Bytes::from(again), &DecodeLimits::default()).expect("re-decode");
        // NaN != NaN, so compare the encodings rather than the values.
        let a = encode_package(&p.main, p.extra.as_ref()).unwrap();
        let b = encode_package(&back.main, back.extra.as_ref()).unwrap();
        assert_eq!(a, b);
    }
    let split = split_main(&frame, &DecodeLimits::default()).map(|(_, at)| at);
    // The server's raw scan refuses exactly what the decoder refuses, with the same error.
    assert_eq!(package::RawMain::scan(&frame, &DecodeLimits::default()).map(|r| r.extra_at()), split);
    let _ = restamp(&frame, &DecodeLimits::default(), |m| {
        m.insert("from".into(), "ws/x".into());
    });
}

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

fn main_err(frame: Vec<u8>) -> DecodeError {
    match decode_package(&Bytes::from(frame), &limits()) {
        Err(PackageError::Msgpack { segment: Segment::Main, source }) => source,
        other => panic!("expected a msgpack error in main, got {other:?}"),
    }
}

fn sample_package() -> Vec<u8> {
    let main = map! {"type" => "method", "to" => "ws/prov", "method" => "svc.f", "session" => "s1"};
    let extra = map! {
        "args" => vec![
            Value::Int(-7), Value::UInt(u64::MAX), Value::F64(0.5), Value::F32(2.0),
            Value::Bytes(Bytes::from_static(b"\x00\x01\x02")), Value::Map(map! {"nested" => vec![Value::Nil]}),
        ],
        "with_kwargs" => false,
    };
    encode_package(&main, Some(&extra)).unwrap()
}

#[test]
fn every_prefix_is_a_typed_error() {
    let frame = Bytes::from(sample_package());
    let (_, extra_at) = split_main(&frame, &limits()).unwrap();
    for cut in 0..frame.len() {
        fuzz_one(&frame[..cut]);
        match decode_package(&frame.slice(..cut), &limits()) {
            Ok(p) => assert!(cut == extra_at && p.extra.is_none(), "cut {cut} decoded"),
            Err(PackageError::Msgpack { source: DecodeError::Truncated { .. }, .. }) => {}
            Err(e) => panic!("cut {cut}: {e:?}"),
        }
    }
}

#[test]
fn wrong_segment_types() {
    let list = msgpack::encode_to_vec(&Value::List(vec![Value::Int(1)])).unwrap();
    assert_eq!(decode_package(&Bytes::from(list), &limits()), Err(PackageError::MainNotMap("list")));
    let mut f = encode_package(&map! {"type" => "x"}, None).unwrap();
    f.extend(msgpack::encode_to_vec(&Value::from("payload")).unwrap());
    assert_eq!(decode_package(&Bytes::from(f), &limits()), Err(PackageError::ExtraNotMap("str")));
}

#[test]
fn malformed_classes() {
    assert_eq!(main_err(vec![0xc1]), DecodeError::ReservedMarker { offset: 0 });
    assert_eq!(main_err(vec![0x81, 0xa1, 0xff, 0xc0]), DecodeError::InvalidUtf8 { offset: 2 });
    assert_eq!(main_err(vec![0x81, 0x05, 0xc0]), DecodeError::NonStrKey { kind: "int", offset: 1 });
    assert_eq!(
        main_err(vec![0x81, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xc0]),
        DecodeError::NonStrKey { kind: "float", offset: 1 }
    );
    // A timestamp (ext -1) as a value.
    assert_eq!(
        main_err(vec![0x81, 0xa1, b't', 0xd6, 0xff, 0, 0, 0, 1]),
        DecodeError::Ext { ext_type: -1, offset: 3 }
    );
}

#[test]
fn absurd_declared_lengths_fail_fast() {
    let t = Instant::now();
    for frame in [
        vec![0xdd, 0xf0, 0, 0, 0, 1, 2, 3], // array 32 of ~4e9 elements, 3 bytes left
        vec![0xdf, 0xff, 0xff, 0xff, 0xff, 0xa0], // map 32 of ~4e9 entries
        vec![0x81, 0xa1, b'a', 0xc6, 0xff, 0xff, 0xff, 0xff, 0], // bin 32 of 4 GiB
        vec![0x81, 0xdb, 0xff, 0xff, 0xff, 0xff, 0], // str 32 key of 4 GiB
    ] {
        assert!(matches!(main_err(frame), DecodeError::Truncated { .. }));
    }
    // 1000 nested array-32 headers each claiming 4e9: the claims add up and fail at once.
    let mut nested = Vec::new();
    for _ in 0..1000 {
        nested.extend([0xdd, 0xff, 0xff, 0xff, 0xff]);
    }
    assert!(matches!(main_err(nested), DecodeError::Truncated { offset: 0, .. }));
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[test]
fn deep_nesting_is_refused_without_stack_overflow() {
    let mut frame = vec![0x81, 0xa1, b'k'];
    frame.extend(std::iter::repeat_n(0x91, 100_000));
    frame.push(0xc0);
    assert_eq!(main_err(frame), DecodeError::TooDeep { max_depth: MAX_DEPTH, offset: 3 + MAX_DEPTH - 1 });
}

#[test]
fn trailing_bytes_after_extra() {
    let mut f = sample_package();
    let n = f.len();
    f.push(0xc0);
    assert_eq!(
        decode_package(&Bytes::from(f), &limits()),
        Err(PackageError::TrailingBytes { offset: n, count: 1 })
    );
}

#[test]
fn encode_refuses_non_wire_and_fuzz_smoke() {
    let m: Map = map! {"f" => Value::MemoryView(Bytes::new())};
    assert_eq!(encode_package(&m, None), Err(PackageError::Encode(EncodeError::NotWire("memoryview"))));
    // A cheap deterministic fuzz pass: xorshift bytes, biased towards container markers.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..2000usize {
        let mut buf = Vec::with_capacity(len % 64);
        for _ in 0..len % 64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push(if x.is_multiple_of(5) { 0x80 | (x >> 8) as u8 & 0x1f } else { (x >> 16) as u8 });
        }
        fuzz_one(&buf);
    }
    let _ = package::merge(Map::new(), None);
    let _ = Package::default().merged();
}
