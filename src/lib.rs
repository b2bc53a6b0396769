//! # hypha-rpc
//!
//! Hypha RPC for Rust. This crate is what applications depend on: it re-exports the
//! protocol core ([`core`]) and provides the server ([`server`]); the client runtime
//! builds on the same core.
//!
//! ## Layout
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`blocking`] | [`blocking::connect_to_server`]: the client for synchronous code (its own runtime thread) |
//! | [`client`] | [`client::connect_to_server`], [`client::Client`], the [`client::Service`] builder, [`client::RemoteService`] proxies |
//! | [`server`] | [`server::Server`]: builder, mounting into an actix-web `App`, running with graceful shutdown |
//! | [`core`] | `hypha-core`, the wire protocol (sans-IO) |
//!
//! The `hypha-server` binary (`src/bin/hypha-server.rs`) is the command-line face of
//! [`server::Server`].

#![warn(missing_docs)]

pub use hypha_core as core;

pub mod blocking;
pub mod client;
pub mod server;
