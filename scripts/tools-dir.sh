#!/usr/bin/env bash
# Prints the folder the test command's tools live in (cargo-deny,
# cargo-fuzz, nats-server, wasmtime, schemathesis, componentize-py, the
# deploy linters), and makes target/tools point at it.
#
# The folder is kept per machine, outside any clone: $LICHEN_TOOLS, by
# default ~/.cache/lichen/tools. A fresh clone then reuses what an earlier
# one built or installed; each install script still checks the version it
# finds and installs its own when that is missing or another, so a fresh
# machine gets everything. A target/tools that is a folder of its own (a
# checkout from before) is used as it is.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LICHEN_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/lichen/tools}"
link="$root/target/tools"
mkdir -p "$cache" "$root/target"
if [ -L "$link" ] && [ "$(readlink "$link")" != "$cache" ]; then
    rm -f "$link"
fi
if [ ! -e "$link" ] && [ ! -L "$link" ]; then
    # Another install script may make the same link at the same moment.
    ln -s "$cache" "$link" 2>/dev/null || [ -L "$link" ]
fi
# The physical path: virtualenvs record the path they are made at.
cd -P "$link" && pwd
