#!/usr/bin/env bash
# Installs what the status page's browser test drives: Debian's Chromium and
# playwright-core (host/tests/browser/, exactly as its package-lock.json
# says). Node.js and npm are the machine's; Debian's are installed if absent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/apt-install.sh chromium
command -v npm >/dev/null || scripts/apt-install.sh nodejs npm
folder=host/tests/browser
if [ ! -d "$folder/node_modules/playwright-core" ]; then
    echo "installing playwright-core into $folder/node_modules" >&2
    npm ci --prefix "$folder" --no-audit --no-fund --loglevel=error
fi
