//! Feeds arbitrary bytes to the package decoder, as a peer's binary frame would arrive,
//! then through the `_rtype` codec and, when it decodes, back out: every input must give
//! a value or a typed error, never a panic, a hang or an allocation the input does not
//! pay for. What decodes must re-encode, and the re-encoded main segment must decode
//! to the same map (the server's restamp path relies on that). The server's raw restamp
//! (`RawMain`) must accept exactly the frames `split_main` accepts and write the map the
//! decoded-`Map` restamp writes.
#![no_main]

use bytes::Bytes;
use hypha_core::codec::{self, CodecRegistry, DecodeContext};
use hypha_core::msgpack::DecodeLimits;
use hypha_core::package::{decode_package, encode_package, restamp, split_main, Entry, RawMain, Stamp};
use hypha_core::Value;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    let limits = DecodeLimits::default();
    raw_restamp_agrees(&frame, &limits);
    let Ok(package) = decode_package(&frame, &limits) else { return };

    // Wire values always re-encode, and the main segment survives a round trip.
    let bytes = encode_package(&package.main, package.extra.as_ref()).expect("decoded wire values re-encode");
    let again = decode_package(&Bytes::from(bytes), &limits).expect("re-encoded package decodes");
    assert_eq!(again.main.len(), package.main.len());

    // The server's restamp keeps the extra bytes untouched.
    let stamped = restamp(&frame, &limits, |m| {
        m.insert("ws".into(), Value::from("fuzz-ws"));
    })
    .expect("restamp of a decodable frame");
    assert!(stamped.ends_with(&frame[frame.len() - (frame.len() - encoded_main_len(&frame, &limits))..]));

    // The `_rtype` codec on whatever the extra holds: typed errors only.
    let registry = CodecRegistry::new();
    let cx = DecodeContext { remote_workspace: Some("ws"), remote_parent: Some("s"), ..DecodeContext::new(&registry) };
    if let Some(extra) = package.extra {
        for (_, v) in extra {
            let _ = codec::decode(v, &cx);
        }
    }
});

fn encoded_main_len(frame: &Bytes, limits: &DecodeLimits) -> usize {
    hypha_core::package::split_main(frame, limits).map(|(_, off)| off).expect("main decodes")
}

/// Any bytes: the raw scan's verdict is `split_main`'s, and a raw restamp decodes to the
/// Map-based restamp's main.
fn raw_restamp_agrees(frame: &Bytes, limits: &DecodeLimits) {
    let raw = RawMain::scan(frame, limits);
    assert_eq!(raw.as_ref().map(RawMain::extra_at).map_err(Clone::clone), split_main(frame, limits).map(|(_, at)| at));
    let Ok(raw) = raw else { return };
    let user = Value::from("fuzz-user");
    let (ws, from, user_entry) =
        (Entry::str("ws", "W").unwrap(), Entry::str("from", "W/f").unwrap(), Entry::new("user", &user).unwrap());
    let ours = raw.restamp(&Stamp { to: "W/t", ws: &ws, from: &from, user: &user_entry }).expect("raw restamp");
    let theirs = restamp(frame, limits, |m| {
        m.insert("to".into(), Value::from("W/t"));
        m.insert("ws".into(), Value::from("W"));
        m.insert("from".into(), Value::from("W/f"));
        m.insert("user".into(), user);
    })
    .expect("map restamp");
    let (a, _) = split_main(&ours, limits).expect("raw restamp decodes");
    let (b, _) = split_main(&theirs, limits).expect("map restamp decodes");
    // NaN != NaN: compare the encodings.
    assert_eq!(encode_package(&a, None).unwrap(), encode_package(&b, None).unwrap());
}
