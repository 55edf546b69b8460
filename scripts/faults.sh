#!/usr/bin/env bash
# The whole fault campaign (host/tests/it/faults/): three hosts in network
# namespaces of their own under each fault in turn (a partition, a one-way
# partition, 30 % packet loss, SIGSTOP, kill -9, a clock 30 s ahead, a full
# disk) while a workload of deploys, rollbacks, deletes, policy edits and
# invocations runs from every host, once with the registry on gossip and
# once with it on NATS; after each heal a checker holds the hosts and the
# history to docs/CLUSTER.md. Prints the table that
# docs/RELIABILITY.md keeps, and fails on any violation.
#
# Needs root (namespaces, nftables, a tmpfs), iproute2, nftables and
# faketime (scripts/test.sh installs them). LICHEN_FAULTS_SECONDS sets each
# scenario's length (default 180: about 50 minutes for the 14 scenarios);
# LICHEN_FAULTS_ONLY=Partition/Nats,Loss/Gossip runs those alone.
#
# --quick: one 18-second scenario of each fault, on one registry or the
# other, and the cron partition (a few minutes; the test command runs
# these too, with everything else).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/apt-install.sh nftables faketime iproute2
env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS functions/build.sh
# Built as scripts/test.sh builds the tests (linted by clippy-driver as they
# compile), so the one build serves both.
export RUSTC_WORKSPACE_WRAPPER="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)"
export CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
export LICHEN_FUNCTIONS_BUILT=1
if [[ "${1:-}" == "--quick" ]]; then
    exec cargo nextest run -p lichen-host --test it --no-capture \
        -E 'test(faults::) & not test(faults::campaign)'
fi
exec cargo nextest run -p lichen-host --test it --run-ignored only --no-capture \
    -E 'test(faults::campaign)'
