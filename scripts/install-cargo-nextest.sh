#!/usr/bin/env bash
# Makes `cargo nextest` available: the machine's own where it has one (these
# machines' image ships it), else built from crates.io once per machine into
# the tools folder: target/tools/cargo-nextest/bin, which scripts/test.sh
# puts on PATH.
set -euo pipefail
command -v cargo-nextest >/dev/null && exit 0
exec "$(dirname "${BASH_SOURCE[0]}")/install-cargo-tool.sh" cargo-nextest 0.9.143
