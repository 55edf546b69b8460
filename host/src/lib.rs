//! Lichen: a WebAssembly function host for the edge.
//!
//! The binary in `main.rs` only parses the command line; everything else is
//! here, one module per concern, testable without a process.

pub mod api;
pub mod audit;
pub mod certs;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod engine;
pub mod error;
pub mod functions;
pub mod kv;
pub mod metrics;
pub mod oci;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod recent;
pub mod sandbox;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod serving;
pub mod shared_registry;
pub mod store;
pub mod tcp;
pub mod tls;
pub mod tokens;
pub mod trace;
pub mod train;
pub mod triggers;
pub mod wasi_config;

/// Function names: `lichen_core`'s, re-exported where the host's modules
/// have always found them.
pub use lichen_core::names;
