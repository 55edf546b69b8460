#!/usr/bin/env bash
# Builds every guest crate in functions/ to a wasm32-wasip2 component.
#
# With rustup's wasm32-wasip2 target installed this is a plain cargo build.
# Without it (machines where rustup cannot download targets), it uses Debian's
# rustc-web toolchain and builds std from source; the packages are installed
# with apt when missing. Both routes produce the same kind of component.
#
# Output: functions/target/wasm32-wasip2/release/<crate>.wasm (dashes become
# underscores, as cargo names cdylibs), and functions/target/python/<app>_py.wasm
# for the Python apps in functions/python/ (componentize-py, installed into
# the tools folder of scripts/tools-dir.sh when missing).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

debian_packages=(rustc-web cargo-web rust-web-src rust-web-llvm lld-22 wasi-libc)
has_rustup_target() {
    command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2
}
# `--debian-packages`: prints the Debian packages this machine needs for
# the build (none with rustup's target), for scripts/test.sh's one apt run.
if [ "${1:-}" = --debian-packages ]; then
    has_rustup_target || echo "${debian_packages[*]}"
    exit 0
fi

# WASIp3 guests: the SDK with its `p3` feature. Built apart from the p2 ones,
# since cargo unifies a dependency's features across one build.
p3_guests=(hello-p3 hello-p3-raw echo-p3 probe-p3 trap-p3 slow-p3 cancel-p3 kv-draft-p3)
p2_excludes=()
p3_packages=()
for guest in "${p3_guests[@]}"; do
    p2_excludes+=(--exclude "$guest")
    p3_packages+=(-p "$guest")
done

build() {
    "$@" --workspace "${p2_excludes[@]}"
    "$@" "${p3_packages[@]}"
}

if has_rustup_target; then
    echo "functions: building with rustup's wasm32-wasip2 target" >&2
    build cargo build --release --target wasm32-wasip2 --quiet
else
    "$here/../scripts/apt-install.sh" "${debian_packages[@]}"
    echo "functions: building with Debian's rustc and -Zbuild-std" >&2
    # RUSTC_BOOTSTRAP must be in cargo's own environment for -Zbuild-std;
    # a subshell keeps these away from the cargo metadata call below.
    (
        export RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
        export RUSTFLAGS="-L native=/usr/lib/wasm32-wasi"
        build /usr/bin/cargo build --release --target wasm32-wasip2 -Zbuild-std=std,panic_abort --quiet
    )
fi

# A WASIp3 component from another toolchain: Python, with componentize-py
# (PyPI), against the WIT of the wasmtime-wasi-http crate the host links.
# Output: functions/target/python/<name>_py.wasm.
componentize_py_version="0.25.0"
venv="$("$here/../scripts/tools-dir.sh")/componentize-py"
if ! [ -x "$venv/bin/componentize-py" ] || ! "$venv/bin/componentize-py" --version 2>/dev/null | grep -qx "componentize-py $componentize_py_version"; then
    echo "functions: installing componentize-py $componentize_py_version" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$componentize_py_version"
fi
wit="$(cd "$here/.." && cargo metadata --format-version 1 --locked 2>/dev/null | python3 -c '
import json, os, sys
for package in json.load(sys.stdin)["packages"]:
    if package["name"] == "wasmtime-wasi-http":
        print(os.path.join(os.path.dirname(package["manifest_path"]), "src", "p3", "wit"))
        break
')"
[ -d "$wit" ] || { echo "functions: wasmtime-wasi-http's WIT not found (cargo metadata)" >&2; exit 1; }
mkdir -p "$here/target/python"
for app in "$here"/python/*/; do
    name="$(basename "$app")"
    out="$here/target/python/${name}_py.wasm"
    if [ -f "$out" ] && [ -z "$(find "$app" -newer "$out" -type f -not -path '*/__pycache__/*')" ]; then
        continue
    fi
    # An app may bring its own world (`wit/world.wit`, say one that also
    # imports wasi:keyvalue) with the WIT directories it uses listed in
    # `wit/deps.txt`, from the repository root; otherwise it is a plain
    # wasi:http/service@0.3.0.
    args=(-d "$wit")
    world="wasi:http/service@0.3.0"
    if [ -f "$app/wit/world.wit" ]; then
        while read -r dir; do
            case "$dir" in ""|"#"*) continue ;; esac
            args+=(-d "$here/../$dir")
        done < "$app/wit/deps.txt"
        args+=(-d "$app/wit")
        package="$(sed -n 's/^package \([^;@]*\).*;/\1/p' "$app/wit/world.wit")"
        world="$package/$(sed -n 's/^world \([a-z0-9-]*\).*/\1/p' "$app/wit/world.wit")"
    fi
    echo "functions: componentize-py $name" >&2
    (cd "$app" && "$venv/bin/componentize-py" "${args[@]}" -w "$world" componentize app -o "$out" >/dev/null)
done
