#!/usr/bin/env bash
# CPU time and context switches per request of hello-p3 with instance reuse
# (128 requests per instance, 16 at once, `wasmtime serve`'s p3 defaults),
# Lichen against `wasmtime serve`, under the same wrk load, alternating
# rounds: what each server spends per request, not only how many it serves.
#
#   bench/perf-stat.sh [ROUNDS]        after bench/run.sh has built everything
#
# LICHEN_BIN, LICHEN_BASELINE_BIN (optional: another build to run beside it),
# WASMTIME_BIN and FUNCTIONS_DIR as for bench/run.sh. Needs `perf` (Debian's
# linux-perf) and permission to count another process's events
# (kernel.perf_event_paranoid <= 2, or root).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds="${1:-3}"
lichen="${LICHEN_BIN:-$root/target/release/lichen}"
baseline="${LICHEN_BASELINE_BIN:-}"
wasmtime="${WASMTIME_BIN:-$root/target/tools/wasmtime/lib/wasmtime}"
component="${FUNCTIONS_DIR:-$root/functions/target/wasm32-wasip2/release}/hello_p3.wasm"
seconds=10
connections=64
scratch="$(mktemp -d)"
pid=""
trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi; rm -rf "$scratch"' EXIT

# shellcheck source=bench/common.sh
source "$root/bench/common.sh"

start_lichen() { # BIN
    local port
    port="$(free_port)"
    rm -rf "$scratch/data" "$scratch/policies"
    mkdir -p "$scratch/data" "$scratch/policies"
    printf '[limits]\nconcurrency = 128\nqueue = 1024\n[instances]\nreuse = 128\nconcurrency = 16\nidle = "1s"\n' \
        >"$scratch/policies/hello.toml"
    RUST_LOG=warn "$1" serve --listen "127.0.0.1:$port" --admin-token bench \
        --data-dir "$scratch/data" --policies "$scratch/policies" 2>/dev/null &
    pid=$!
    wait_for "http://127.0.0.1:$port/healthz"
    curl -sf -o /dev/null -X PUT -H 'authorization: Bearer bench' \
        --data-binary "@$component" "http://127.0.0.1:$port/v1/functions/hello"
    url="http://127.0.0.1:$port/fn/hello"
}

start_wasmtime() {
    local port
    port="$(free_port)"
    "$wasmtime" serve -S cli --addr "127.0.0.1:$port" "$component" >/dev/null 2>&1 &
    pid=$!
    wait_for "http://127.0.0.1:$port/"
    url="http://127.0.0.1:$port/"
}

# Runs wrk against $url while perf counts the server's events; prints one row.
measure() { # NAME
    wrk -t1 -c"$connections" -d1s "$url" >/dev/null
    perf stat -x, -e task-clock,context-switches,cpu-migrations -p "$pid" \
        -o "$scratch/perf" -- sleep "$seconds" &
    local perf=$!
    wrk -t1 -c"$connections" -d"${seconds}s" "$url" >"$scratch/wrk"
    wait "$perf"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=""
    local requests
    requests="$(awk '/requests in/ {print $1}' "$scratch/wrk")"
    awk -F, -v name="$1" -v requests="$requests" -v seconds="$seconds" '
        $3 == "task-clock" { cpu_ms = $1 }
        $3 == "context-switches" { switches = $1 }
        $3 == "cpu-migrations" { migrations = $1 }
        END {
            printf "| %s | %.0f | %.1f | %.3f | %.4f |\n", name, requests / seconds,
                cpu_ms * 1000 / requests, switches / requests, migrations / requests
        }' "$scratch/perf"
}

echo "| server | req/s | CPU µs / request | context switches / request | migrations / request |"
echo "| --- | ---: | ---: | ---: | ---: |"
for _ in $(seq 1 "$rounds"); do
    start_lichen "$lichen"
    measure "lichen"
    if [ -n "$baseline" ]; then
        start_lichen "$baseline"
        measure "lichen (baseline)"
    fi
    start_wasmtime
    measure "wasmtime serve"
done
