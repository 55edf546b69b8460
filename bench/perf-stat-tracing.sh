#!/usr/bin/env bash
# CPU time per request of hello (a fresh instance per request) with tracing
# off and with every invocation traced and exported, alternating rounds:
# what tracing costs the host, not only how many requests it serves. The
# OTLP receiver is `lichen-bench native-hello` (answers each export, reads
# nothing); its CPU is counted apart.
#
#   bench/perf-stat-tracing.sh [ROUNDS] [MODES...]   after bench/run.sh has built everything
#
# MODES (default `off traced`): off; traced (sampling 1.0, exported to the
# receiver); dead (sampling 1.0, nothing listening at the endpoint); zero
# (sampling 0: contexts propagated, nothing recorded). LICHEN_BIN and
# FUNCTIONS_DIR as for bench/run.sh. Needs `perf` (Debian's linux-perf), wrk
# and permission to count another process's events.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds="${1:-3}"
if [ "$#" -gt 0 ]; then shift; fi
modes=(off traced)
if [ "$#" -gt 0 ]; then modes=("$@"); fi
bin="$(dirname "${LICHEN_BIN:-$root/target/release/lichen}")"
component="${FUNCTIONS_DIR:-$root/functions/target/wasm32-wasip2/release}/hello.wasm"
seconds=10
scratch="$(mktemp -d)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$scratch"' EXIT

# shellcheck source=bench/common.sh
source "$root/bench/common.sh"

# One round of MODE: prints req/s and CPU per request of the host and the receiver.
measure() { # MODE
    local mode=$1 port receiver_port receiver="" flags=()
    port="$(free_port)"
    receiver_port="$(free_port)"
    case "$mode" in
        off) ;;
        traced | zero)
            "$bin/lichen-bench" native-hello "127.0.0.1:$receiver_port" 2>/dev/null &
            receiver=$!
            pids+=("$receiver")
            wait_for "http://127.0.0.1:$receiver_port/"
            flags=(--otlp-endpoint "http://127.0.0.1:$receiver_port")
            if [ "$mode" = zero ]; then flags+=(--trace-sampling 0); fi
            ;;
        dead) flags=(--otlp-endpoint "http://127.0.0.1:$receiver_port") ;;
        *) echo "unknown mode $mode" >&2; return 1 ;;
    esac
    rm -rf "$scratch/data" "$scratch/policies"
    mkdir -p "$scratch/data" "$scratch/policies"
    printf '[limits]\nconcurrency = 128\nqueue = 1024\n' >"$scratch/policies/hello.toml"
    RUST_LOG=warn "$bin/lichen" serve --listen "127.0.0.1:$port" --admin-token bench \
        --data-dir "$scratch/data" --policies "$scratch/policies" "${flags[@]}" 2>/dev/null &
    local host=$!
    pids+=("$host")
    wait_for "http://127.0.0.1:$port/healthz"
    curl -sf -o /dev/null -X PUT -H 'authorization: Bearer bench' \
        --data-binary "@$component" "http://127.0.0.1:$port/v1/functions/hello"
    local url="http://127.0.0.1:$port/fn/hello"
    wrk -t1 -c64 -d1s "$url" >/dev/null
    perf stat -x, -e task-clock -p "$host" -o "$scratch/host" -- sleep "$seconds" &
    local counting=($!)
    if [ -n "$receiver" ]; then
        perf stat -x, -e task-clock -p "$receiver" -o "$scratch/receiver" -- sleep "$seconds" &
        counting+=($!)
    fi
    wrk -t1 -c64 -d"${seconds}s" "$url" >"$scratch/wrk"
    wait "${counting[@]}"
    kill "$host" $receiver 2>/dev/null || true
    wait "$host" $receiver 2>/dev/null || true
    local requests host_ms receiver_ms=0
    requests="$(awk '/requests in/ {print $1}' "$scratch/wrk")"
    host_ms="$(awk -F, '$3 == "task-clock" {print $1}' "$scratch/host")"
    if [ -n "$receiver" ]; then
        receiver_ms="$(awk -F, '$3 == "task-clock" {print $1}' "$scratch/receiver")"
    fi
    awk -v mode="$mode" -v r="$requests" -v h="$host_ms" -v c="$receiver_ms" -v s="$seconds" \
        'BEGIN { printf "%-7s %8.0f req/s   host %6.1f µs/request   receiver %4.1f µs/request\n", mode, r / s, h * 1000 / r, c * 1000 / r }'
}

for _ in $(seq 1 "$rounds"); do
    for mode in "${modes[@]}"; do
        measure "$mode"
    done
done
