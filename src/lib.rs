//! # hypha-rpc
//!
//! Hypha RPC for Rust. This crate is what applications depend on; today it re-exports
//! the protocol core ([`core`]); the client runtime and the server build on it.

pub use hypha_core as core;
