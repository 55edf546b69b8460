#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: builds the guest components
# (installing the wasm toolchain if missing), checks formatting and lints,
# then runs every test of the workspace against the built components.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

functions/build.sh

# promtool checks the /metrics output (Debian's prometheus package); the OCI
# tests push to and deploy from real registries (docker-registry, the CNCF
# distribution registry).
scripts/apt-install.sh prometheus docker-registry
# schemathesis fuzzes a live host against its OpenAPI document (tests/fuzz_api.rs).
scripts/install-schemathesis.sh
# The official wasmtime CLI: p3 answers are compared with `wasmtime serve`'s.
scripts/install-wasmtime.sh
# nats-server: the shared key-value backend's tests start real ones.
scripts/install-nats-server.sh
# Debian's Chromium and playwright-core: the status page's browser test.
scripts/install-browser.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# cargo-deny: advisories (a local database), licenses, banned crates (one
# TLS stack: rustls with ring) and sources, as deny.toml says.
scripts/check-deps.sh
# The example functions' own unit tests, natively (the SDK's key-value
# stores are maps in memory there).
cargo test --quiet --manifest-path functions/Cargo.toml -p counter -p notes -p linreg
LICHEN_FUNCTIONS_BUILT=1 cargo test --workspace
# What ships the host: Dockerfile, Kubernetes manifests, systemd unit.
scripts/check-deploy.sh
# Fuzzing of what strangers reach (lichen-core's parsers), 20 s a target.
scripts/fuzz.sh
