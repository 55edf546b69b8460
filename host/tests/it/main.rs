//! The host's integration tests, in one test binary: real hosts on
//! loopback, real processes, real components built from `functions/`. One
//! binary rather than one per file, so the test build compiles and links
//! the shared code once (`memory.rs` keeps a binary of its own: it reads
//! its process's resident memory). `cargo nextest` runs each test in a
//! process of its own all the same.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod advisories;
mod api;
mod authz_matrix;
mod cli;
mod cluster;
mod common;
mod config;
mod faults;
mod fuzz_api;
mod kv;
mod kv_nats;
mod layout;
mod lifecycle;
mod metrics;
mod nats_auth;
mod oci;
mod openapi;
mod outbound;
mod p3;
mod policy;
mod reuse;
mod routes;
mod scoped_policy;
mod secrets;
mod status;
mod status_page;
mod tcp;
mod tls;
mod tokens;
mod train;
mod upload_fuzz;
mod wasi_config;
