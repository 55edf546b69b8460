#!/usr/bin/env bash
# Installs schemathesis (PyPI), the API fuzzer of host/tests/it/fuzz_api.rs, into
# a virtualenv in the tools folder (scripts/tools-dir.sh), once:
# target/tools/schemathesis.
# Python 3 with venv and pip is all it needs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/tools-dir.sh")/schemathesis"
version="4.32.5"

# `st --version` runs the entry point itself: a virtualenv moved from where
# it was made has scripts that no longer start.
if "$venv/bin/st" --version >/dev/null 2>&1 && "$venv/bin/python" -c "import schemathesis, sys; sys.exit(schemathesis.__version__ != '$version')" 2>/dev/null; then
    exit 0
fi
echo "schemathesis: installing $version into $venv" >&2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
