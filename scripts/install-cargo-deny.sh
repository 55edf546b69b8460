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
echo "cargo-deny: building $version into $dest (about 3 minutes)" >&2
cargo install "cargo-deny@$version" --locked --quiet --no-default-features --root "$dest"
