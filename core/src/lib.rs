//! The parts of a Lichen host that read what strangers send, without the
//! engine: function names and the route table, policy files and their
//! triggers, gossip values and their seal, the registry they carry, and map
//! request bodies.
//!
//! They live apart from `lichen-host` so they build in seconds and can be
//! fuzzed (`fuzz/`) without compiling wasmtime a second time.

pub mod fence;
pub mod gossip;
pub mod grants;
pub mod map;
pub mod names;
pub mod policy;
pub mod registry;
pub mod routes;
pub mod scopes;
pub mod seal;
pub mod triggers;
