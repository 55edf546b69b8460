//! Peer hosts sharing work (issue 6), in progress. What is here is the pure
//! logic the cluster is built on, tested on its own; membership (chitchat),
//! module transfer, forwarding and the map API are not wired in yet.
//!
//! - `placement`: rendezvous-hash owners of a function and the power of two
//!   choices among them.
//! - `registry`: the last-writer-wins registry of functions with tombstones.

pub mod placement;
pub mod registry;
