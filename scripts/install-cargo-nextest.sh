#!/usr/bin/env bash
# Makes `cargo nextest` available: the machine's own where it has one (these
# machines' image ships it), else built from crates.io once per machine into
# the tools folder (scripts/tools-dir.sh): target/tools/cargo-nextest/bin.
# scripts/test.sh puts that folder on PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$("$root/scripts/tools-dir.sh")/cargo-nextest"
version="0.9.143"

command -v cargo-nextest >/dev/null && exit 0
[ -x "$dest/bin/cargo-nextest" ] && exit 0
echo "cargo-nextest: building $version into $dest" >&2
cargo install "cargo-nextest@$version" --locked --quiet --root "$dest"
