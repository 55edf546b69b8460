#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a bounded time each (FUZZ_SECONDS,
# default 20), from the seeds in fuzz/seeds/ (and, for policies, the
# repository's policy files and the policy tests' invalid ones) plus the
# corpus earlier runs grew in target/fuzz/corpus/. A crash fails the run and
# leaves its input in target/fuzz/artifacts/<target>/; fuzz/README.md says
# how to turn it into a regression test.
#
# One target: scripts/fuzz.sh policy. Longer: FUZZ_SECONDS=600 scripts/fuzz.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/install-cargo-fuzz.sh
export PATH="$root/target/tools/cargo-fuzz/bin:$PATH"
# cargo-fuzz passes nightly-only flags; these machines have a stable
# toolchain only.
export RUSTC_BOOTSTRAP=1

seconds="${FUZZ_SECONDS:-20}"
out="$root/target/fuzz"
# No sanitizer: the targets are safe Rust, where AddressSanitizer finds
# nothing and doubles the build. Coverage guidance stays.
flags=(--fuzz-dir fuzz --sanitizer none --target-dir "$out")

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(policy routes gossip map_request)
fi

cargo fuzz build "${flags[@]}"
for target in "${targets[@]}"; do
    corpus="$out/corpus/$target"
    artifacts="$out/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    seeds=("fuzz/seeds/$target")
    if [ "$target" = policy ]; then
        seeds+=(policies host/tests/ui/invalid)
    fi
    log="$out/$target.log"
    if ! cargo fuzz run "${flags[@]}" "$target" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz: $target failed; its input is in $artifacts (log: $log)" >&2
        exit 1
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    echo "fuzz: $target: ${runs:-?} inputs in ${seconds}s, no failure" >&2
done
