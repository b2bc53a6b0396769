//! Decodes a captured hypha-rpc binary frame and prints what it says.
//!
//! Handy when a peer misbehaves: dump the frame bytes (e.g. from a websocket sniffer)
//! to a file and look at the routing fields and the decoded payload.
//!
//! ```sh
//! cargo run --example decode_frame -- tests/golden/fixtures/kwargs_call.bin
//! ```

use std::process::ExitCode;

use bytes::Bytes;
use hypha_rpc::core::codec::{self, CodecRegistry, DecodeContext};
use hypha_rpc::core::msgpack::DecodeLimits;
use hypha_rpc::core::package::decode_package;
use hypha_rpc::core::Value;

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: decode_frame FRAME.bin");
        return ExitCode::from(2);
    };
    let frame = match std::fs::read(&path) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            eprintln!("cannot read {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let package = match decode_package(&frame, &DecodeLimits::default()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("not a hypha-rpc package: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{} bytes, {} segment(s)", frame.len(), 1 + usize::from(package.extra.is_some()));
    println!("main:");
    for (k, v) in &package.main {
        println!("  {k}: {}", short(v));
    }
    // Relative `_rtarget`s resolve against the sender's workspace, as a receiver does.
    let from = package.main.get("from").and_then(Value::as_str).unwrap_or_default();
    let workspace = from.split_once('/').map(|(ws, _)| ws);
    let session = package.main.get("session").and_then(Value::as_str);
    let registry = CodecRegistry::new();
    let cx = DecodeContext {
        remote_workspace: workspace,
        remote_parent: session,
        ..DecodeContext::new(&registry)
    };
    if let Some(extra) = package.extra {
        println!("extra:");
        for (k, v) in extra {
            match codec::decode(v, &cx) {
                Ok(v) => println!("  {k}: {v:?}"),
                Err(e) => println!("  {k}: <cannot decode: {e}>"),
            }
        }
    }
    ExitCode::SUCCESS
}

/// One line per routing field; the `user` map is long and rarely what you look for.
fn short(v: &Value) -> String {
    match v {
        Value::Str(s) => s.clone(),
        Value::Map(m) => format!("{{{} keys}}", m.len()),
        other => format!("{other:?}"),
    }
}
