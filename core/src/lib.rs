//! # hypha-core
//!
//! The hypha-rpc wire protocol (hypha-rpc 0.21.x), sans-IO: no sockets, no clock, no
//! async runtime. Drivers feed bytes and the current time in and get values, packages
//! and deadlines out.
//!
//! ## Layout
//! SCAFFOLD: filled in as the modules land.

#![warn(missing_docs)]

pub mod array;
pub mod chunk;
pub mod codec;
pub mod ids;
pub mod message;
pub mod msgpack;
pub mod package;
pub mod schema;
pub mod serde_value;
pub mod session;
pub mod value;

pub use value::{
    CustomValue, DType, ErrorValue, Function, Generator, Handler, LocalFunction, LocalGenerator, Map,
    NdArray, PromiseMode, RemoteGenerator, RemoteMethod, TypedArray, Value,
};
