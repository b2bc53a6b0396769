//! # hypha-core
//!
//! The hypha-rpc wire protocol (hypha-rpc 0.21.x), sans-IO: no sockets, no clock, no
//! async runtime. Drivers feed bytes and the current time in and get values, packages
//! and deadlines out.
//!
//! It is the foundation of both the client runtime and the server: the actors in
//! `hypha-actors` own the sockets and timers and call into this crate for every decision
//! about bytes, values, sessions and deadlines. Keeping those decisions here, free of
//! IO, is what lets the whole protocol be tested deterministically, fuzzed, and checked
//! against packages recorded from the real Python client (`tests/golden/`).
//!
//! ## Layout
//!
//! | module | what it holds | spec |
//! | --- | --- | --- |
//! | [`value`] | [`Value`], the dynamic value model (wire and decoded variants) | §5 |
//! | [`array`](mod@array) | [`NdArray`]/[`DType`] and zero-copy conversions to `ndarray` | §5.2 |
//! | [`msgpack`] | our msgpack reader/writer over [`bytes::Bytes`] (zero-copy `bin`) | §2.1, §11 |
//! | [`package`] | the package: `main` + optional `extra`, `restamp` for the router | §2 |
//! | [`codec`] | the `_rtype` codec, custom codecs, kwargs | §5, §6 |
//! | [`chunk`] | splitting large packages; the bounded `message_cache` reassembler | §3 |
//! | [`session`] | the object store: services, sessions, promises, deadlines, dispatch | §4, §7 |
//! | [`endpoint`] | one RPC peer as a state machine: frames in, frames and events out | §3, §4, §6 |
//! | [`auth`] | users, scopes, permissions, JWT tokens, the handshake's authentication | server §2, §6 |
//! | [`message`] | typed envelope views: main segment, promise forms, target rules | §1.5, §2, §4.3 |
//! | [`ids`] | client/service ids and their short forms; random ids | §0, §7.7 |
//! | [`schema`] | service config/info and function JSON schemas | §7 |
//! | [`serde_value`] | `Value` <-> any serde type | |
//!
//! "spec" refers to the hypha-rpc wire-protocol specification the project works from.
//!
//! ## Receiving a package
//!
//! ```
//! use bytes::Bytes;
//! use hypha_core::{codec, msgpack::DecodeLimits, package, Value};
//!
//! // A frame as the Python client sends `add(1, b=5)` (spec §2.6), built here.
//! let main = hypha_core::map! {
//!     "type" => "method", "from" => "ws/cons", "to" => "ws/prov",
//!     "method" => "services.demo.add", "session" => "S1",
//! };
//! let extra = hypha_core::map! {
//!     "args" => vec![Value::from(1), Value::from(hypha_core::map! { "b" => 5 })],
//!     "with_kwargs" => true, "promise" => "*", "t" => 15.0,
//! };
//! let frame = Bytes::from(package::encode_package(&main, Some(&extra)).unwrap());
//!
//! // The receiver: decode the package, then the `_rtype` values of the payload.
//! let pkg = package::decode_package(&frame, &DecodeLimits::default()).unwrap();
//! let registry = codec::CodecRegistry::new();
//! let cx = codec::DecodeContext { remote_workspace: Some("ws"), remote_parent: Some("S1"),
//!                                 ..codec::DecodeContext::new(&registry) };
//! let args = codec::decode(pkg.extra.unwrap()["args"].clone(), &cx).unwrap();
//! let (positional, kwargs) = codec::split_kwargs(args.as_list().unwrap().to_vec(), true).unwrap();
//! assert_eq!(positional, vec![Value::from(1)]);
//! assert_eq!(kwargs.unwrap()["b"], Value::from(5));
//! ```

#![warn(missing_docs)]

pub mod array;
pub mod auth;
pub mod chunk;
pub mod codec;
pub mod endpoint;
mod growbuf;
pub mod ids;
pub mod message;
pub mod msgpack;
pub mod package;
pub mod schema;
pub mod serde_value;
pub mod session;
pub mod value;

pub use codec::{CodecError, CodecRegistry};
pub use value::{
    CustomValue, DType, ErrorValue, Function, Generator, Handler, LocalFunction, LocalGenerator, Map,
    NdArray, PromiseMode, RemoteGenerator, RemoteMethod, TypedArray, Value,
};
