#!/usr/bin/env bash
# Installs cargo-deny (built from crates.io, once per machine) into the tools
# folder (scripts/tools-dir.sh): target/tools/cargo-deny/bin/cargo-deny. The test command runs it
# over deny.toml (licenses, banned crates, sources).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$("$root/scripts/tools-dir.sh")/cargo-deny"
version="0.20.2"
bin="$dest/bin/cargo-deny"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qx "cargo-deny $version"; then
    exit 0
fi
echo "cargo-deny: building $version into $dest" >&2
# Its release profile (fat LTO, one codegen unit) takes minutes on two
# cores for a tool that runs for seconds here: a quicker profile instead.
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    cargo install "cargo-deny@$version" --locked --quiet --no-default-features --root "$dest"
