#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: installs what the tests
# need, builds the guest components, checks formatting, lints and
# dependencies, runs every test of the workspace against the built
# components, checks what ships the host, and fuzzes the parsers.
#
# Each step is a phase; the table of their seconds is printed at the end,
# pass or fail, so every change sees what it costs. The budget is 20
# minutes from a fresh clone on a 2-core machine, apt and cold cargo
# included (ARCHITECTURE.md, "The test command").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Every process the tests start inherits this marker; scripts/leftovers.sh
# finds any still running at the end, kills it and fails the run.
export LICHEN_TEST_RUN="$$-$EPOCHSECONDS"

phase_names=()
phase_seconds=()
current=""
started=""
run_started="$EPOCHREALTIME"
background_pid=""
elapsed() {
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}
record() {
    phase_names+=("$1")
    phase_seconds+=("$2")
}
finish() {
    local status=$?
    if [ -n "$current" ]; then
        record "$current (failed)" "$(elapsed "$started")"
    fi
    if [ -n "$background_pid" ]; then
        kill -- "-$background_pid" 2>/dev/null || kill "$background_pid" 2>/dev/null || true
        wait "$background_pid" 2>/dev/null || true
    fi
    local checked="$EPOCHREALTIME"
    if ! scripts/leftovers.sh; then
        record "leftover processes (failed)" "$(elapsed "$checked")"
        [ "$status" -ne 0 ] || status=1
    fi
    printf '\n%-36s %8s\n' phase seconds >&2
    for i in "${!phase_names[@]}"; do
        printf '%-36s %8s\n' "${phase_names[$i]}" "${phase_seconds[$i]}" >&2
    done
    printf '%-36s %8s\n' "total (wall clock)" "$(elapsed "$run_started")" >&2
    exit "$status"
}
trap finish EXIT
# phase NAME COMMAND...: runs COMMAND as the phase NAME.
phase() {
    current="$1"
    started="$EPOCHREALTIME"
    shift
    "$@"
    record "$current" "$(elapsed "$started")"
    current=""
}

# Debian's packages, in one apt run: the guest toolchain (without rustup's
# wasm32-wasip2 target; see functions/build.sh), promtool (checks the
# /metrics output), docker-registry (the OCI tests' registry), Chromium
# (the status page's browser test), iproute2, nftables and faketime (the
# fault campaign's namespaces, partitions and skewed clock), redis-server
# (the outbound TCP test's server), and Node.js where the machine has none.
packages=(prometheus docker-registry chromium iproute2 nftables faketime redis-server)
packages+=($(functions/build.sh --debian-packages))
command -v npm >/dev/null || packages+=(nodejs npm)
phase "apt installs" scripts/apt-install.sh "${packages[@]}"

# The tools, in the background while the guests build: pip and npm mostly
# wait on the network, and the two cargo builds (once per machine, see
# scripts/tools-dir.sh) run at a lower priority, so they take the cores
# only when the work in front leaves them idle.
tools_log="$root/target/tools-install.log"
scripts/tools-dir.sh >/dev/null
install_tools() {
    local begun="$EPOCHREALTIME"
    # schemathesis fuzzes a live host against its OpenAPI document
    # (tests/it/fuzz_api.rs); `wasmtime serve` answers p3 requests to compare
    # with ours; nats-server for the shared key-value backend's tests;
    # playwright-core drives Chromium; hadolint, yamllint and
    # kubernetes-validate check what ships the host.
    scripts/install-schemathesis.sh
    scripts/install-wasmtime.sh
    scripts/install-nats-server.sh
    scripts/install-browser.sh
    scripts/check-deploy.sh --install-only
    nice -n 10 scripts/install-cargo-deny.sh
    nice -n 10 scripts/install-cargo-fuzz.sh
    echo "installed in $(elapsed "$begun") s" >&2
}
set -m
install_tools >"$tools_log" 2>&1 &
background_pid=$!
set +m
wait_for_tools() {
    if ! wait "$background_pid"; then
        background_pid=""
        cat "$tools_log" >&2
        echo "installing the test tools failed (log: $tools_log)" >&2
        return 1
    fi
    background_pid=""
    cat "$tools_log" >&2
}

phase "guest build" functions/build.sh
phase "fmt" cargo fmt --all -- --check
# The test runner: the machine's cargo-nextest, or one built once per machine.
export PATH="$PATH:$root/target/tools/cargo-nextest/bin"
phase "nextest install" scripts/install-cargo-nextest.sh

# One build for clippy and the tests: clippy-driver compiles the
# workspace's own crates (their tests, benches and binaries too, as `cargo
# clippy --all-targets` checks them), linting as it goes and denying
# warnings (CLIPPY_ARGS is how `cargo clippy -- -D warnings` tells it),
# while every dependency is compiled once, for the tests. The runs below
# see the same settings, so nothing is compiled twice.
# A fresh clone compiles our crates once: incremental compilation's
# bookkeeping is only a cost there (kept for warm machines).
[ "${CI:-}" = true ] && export CARGO_INCREMENTAL=0
clippy_driver="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)"
linted=(env "RUSTC_WORKSPACE_WRAPPER=$clippy_driver"
    "CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__" LICHEN_FUNCTIONS_BUILT=1)
phase "clippy + test build" "${linted[@]}" cargo nextest run --workspace --all-targets --no-run --cargo-quiet
phase "waiting for tool installs" wait_for_tools
# cargo-deny: advisories (a local database), licenses, banned crates (one
# TLS stack: rustls with ring) and sources, as deny.toml says.
phase "cargo-deny" scripts/check-deps.sh
# The example functions' own unit tests, natively (the SDK's key-value
# stores are maps in memory there).
phase "function unit tests" cargo test --quiet --manifest-path functions/Cargo.toml -p counter -p notes -p linreg -p motd
phase "tests" "${linted[@]}" cargo nextest run --workspace --all-targets --cargo-quiet
phase "doc tests" "${linted[@]}" cargo test --workspace --doc --quiet
# What ships the host: Dockerfile, Kubernetes manifests, systemd unit.
phase "deploy checks" scripts/check-deploy.sh
# Fuzzing of what strangers reach (lichen-core's parsers), from what longer
# runs found, each target for a budget read off its coverage curve
# (scripts/fuzz.sh, fuzz/README.md).
phase "fuzzing" scripts/fuzz.sh
