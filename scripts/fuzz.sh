#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a bounded time each, side by side (as
# many at once as there are cores), from the seeds in fuzz/seeds/ (and, for
# policies, the repository's policy files and the policy tests' invalid
# ones) plus the corpus earlier runs grew in target/fuzz/corpus/. A crash
# fails the run and leaves its input in target/fuzz/artifacts/<target>/;
# fuzz/README.md says how to turn it into a regression test.
#
# Each run starts from what longer runs found, kept in fuzz/found/ (one
# input per line, base64): there its coverage is already where two minutes
# from the seeds alone take it, so a short budget explores past it
# (fuzz/README.md: the curves, and how to add what a run found).
# FUZZ_SECONDS sets one time for every target.
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

declare -A budget=(
    [policy]=30
    [routes]=10
    [gossip]=20
    [map_request]=20
)
out="$root/target/fuzz"
# No sanitizer: the targets are safe Rust, where AddressSanitizer finds
# nothing and doubles the build. Coverage guidance stays.
flags=(--fuzz-dir fuzz --sanitizer none --target-dir "$out")

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    # Longest first, so the short ones fill in beside them.
    targets=(policy gossip map_request routes)
fi
for target in "${targets[@]}"; do
    [ -n "${budget[$target]:-}" ] || { echo "fuzz: no target named $target" >&2; exit 1; }
done

cargo fuzz build "${flags[@]}"

# fuzz_one TARGET: runs it for its time; its log, each line prefixed with
# the seconds since it started, is target/fuzz/TARGET.log.
fuzz_one() {
    local target="$1"
    local seconds="${FUZZ_SECONDS:-${budget[$target]}}"
    local corpus="$out/corpus/$target" artifacts="$out/artifacts/$target"
    local log="$out/$target.log" begun="${EPOCHREALTIME/./}"
    mkdir -p "$corpus" "$artifacts"
    python3 - "fuzz/found/$target.b64" "$corpus" <<'UNPACK'
import base64, hashlib, os, sys
with open(sys.argv[1]) as found:
    for line in found:
        data = base64.b64decode(line.strip())
        name = os.path.join(sys.argv[2], hashlib.sha1(data).hexdigest())
        if not os.path.exists(name):
            with open(name, "wb") as out:
                out.write(data)
UNPACK
    local seeds=("fuzz/seeds/$target")
    if [ "$target" = policy ]; then
        seeds+=(policies host/tests/ui/invalid)
    fi
    local status=0
    cargo fuzz run "${flags[@]}" "$target" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 2>&1 |
        while IFS= read -r line; do
            local tenths=$(((${EPOCHREALTIME/./} - begun) / 100000))
            printf '%d.%d %s\n' $((tenths / 10)) $((tenths % 10)) "$line"
        done >"$log" || status=$?
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    if [ "$status" -ne 0 ]; then
        touch "$out/$target.failed"
        tail -n 60 "$log" >&2
        echo "fuzz: $target failed; its input is in $artifacts (log: $log)" >&2
        return 1
    fi
    local runs cov
    runs="$(sed -n 's/^[0-9.]* stat::number_of_executed_units: *//p' "$log")"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n1)"
    echo "fuzz: $target: ${runs:-?} inputs in ${seconds}s, ${cov:-cov: ?}, no failure" >&2
}

# Side by side, at most one per core; a target that fails leaves
# target/fuzz/TARGET.failed.
cores="$(nproc)"
for target in "${targets[@]}"; do
    rm -f "$out/$target.failed"
    while [ "$(jobs -rp | wc -l)" -ge "$cores" ]; do
        wait -n || true
    done
    fuzz_one "$target" &
done
wait
for target in "${targets[@]}"; do
    [ ! -e "$out/$target.failed" ] || exit 1
done
