#!/usr/bin/env bash
# install-cargo-tool.sh CRATE VERSION [cargo install options...]
#
# Builds a cargo tool from crates.io into the tools folder, once per machine
# (scripts/tools-dir.sh): target/tools/CRATE/bin/CRATE; nothing to do when
# the one there already says it is VERSION. Shared by the install-cargo-*
# scripts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
crate="$1"
version="$2"
shift 2
dest="$("$root/scripts/tools-dir.sh")/$crate"
bin="$dest/bin/$crate"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qE "^$crate $version( |\$)"; then
    exit 0
fi
echo "$crate: building $version into $dest" >&2
# These tools run for seconds here; their own release profiles (fat LTO,
# one codegen unit) take minutes on two cores: a quicker profile instead.
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    cargo install "$crate@$version" --locked --quiet --root "$dest" "$@"
