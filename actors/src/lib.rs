//! # hypha-actors
//!
//! The actix actors that drive `hypha-core`: on the client side the connection, the
//! session registry, the codec and one actor per service, `_rintf` interface and
//! generator; on the server side one actor per websocket, the router and the workspace
//! manager. The actors own the IO and the clock; all protocol decisions live in
//! `hypha-core`.
//!
//! ## Layout
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`client`] | the client runtime: connection actor (awc websocket, handshake, generations), session registry (owns the sans-IO endpoint), service actors, serde conversion |
//! | [`server`] | the server: connection actor, outbound queues, routing table, workspace manager, service registry, workspaces, health probes |
//! | [`busy_poll`] | a thread polls its sockets for a few µs after a frame instead of sleeping at once (adaptive, yields its CPU), on both sides |
//! | `wsframe` | the websocket frame header, written and read the same way by both sides |

#![warn(missing_docs)]

pub mod busy_poll;
pub mod client;
pub mod server;
mod wsframe;
