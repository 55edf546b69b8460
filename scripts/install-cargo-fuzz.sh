#!/usr/bin/env bash
# Installs cargo-fuzz (built from crates.io, once per machine) into the tools
# folder: target/tools/cargo-fuzz/bin/cargo-fuzz. scripts/fuzz.sh runs the
# fuzz targets of fuzz/ with it.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/install-cargo-tool.sh" cargo-fuzz 0.13.2
