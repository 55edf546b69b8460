#!/usr/bin/env bash
# Builds every guest crate in functions/ to a wasm32-wasip2 component.
#
# With rustup's wasm32-wasip2 target installed this is a plain cargo build.
# Without it (machines where rustup cannot download targets), it uses Debian's
# rustc-web toolchain and builds std from source; the packages are installed
# with apt when missing. Both routes produce the same kind of component.
#
# Output: functions/target/wasm32-wasip2/release/<crate>.wasm (dashes become
# underscores, as cargo names cdylibs).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

debian_packages=(rustc-web cargo-web rust-web-src rust-web-llvm lld-22 wasi-libc)

# WASIp3 guests: the SDK with its `p3` feature. Built apart from the p2 ones,
# since cargo unifies a dependency's features across one build.
p3_guests=(hello-p3 echo-p3 probe-p3 trap-p3 slow-p3)
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

if command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "functions: building with rustup's wasm32-wasip2 target" >&2
    build cargo build --release --target wasm32-wasip2 --quiet
    exit 0
fi

"$here/../scripts/apt-install.sh" "${debian_packages[@]}"

echo "functions: building with Debian's rustc and -Zbuild-std" >&2
# RUSTC_BOOTSTRAP must be in cargo's own environment for -Zbuild-std.
export RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export RUSTFLAGS="-L native=/usr/lib/wasm32-wasi"
build /usr/bin/cargo build --release --target wasm32-wasip2 -Zbuild-std=std,panic_abort --quiet
