#!/usr/bin/env bash
# Installs cargo-fuzz (built from crates.io, once per machine) into the tools
# folder (scripts/tools-dir.sh): target/tools/cargo-fuzz/bin/cargo-fuzz. scripts/fuzz.sh runs the fuzz
# targets of fuzz/ with it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$("$root/scripts/tools-dir.sh")/cargo-fuzz"
version="0.13.2"
bin="$dest/bin/cargo-fuzz"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qx "cargo-fuzz $version"; then
    exit 0
fi
echo "cargo-fuzz: building $version into $dest" >&2
# A wrapper that runs for moments: a quick profile, not the crate's own.
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    cargo install "cargo-fuzz@$version" --locked --quiet --root "$dest"
