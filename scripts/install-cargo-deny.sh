#!/usr/bin/env bash
# Installs cargo-deny (built from crates.io, once per machine) into the tools
# folder: target/tools/cargo-deny/bin/cargo-deny. The test command runs it
# over deny.toml (advisories, licenses, banned crates, sources).
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/install-cargo-tool.sh" cargo-deny 0.20.2 --no-default-features
