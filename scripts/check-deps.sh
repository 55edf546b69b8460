#!/usr/bin/env bash
# cargo-deny over the workspace: advisories (from the local database in
# deny/advisory-db: these machines cannot reach RustSec's on GitHub),
# licenses, banned crates and sources, as deny.toml says.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/install-cargo-deny.sh
work="$root/target/advisory-db"
repo="$work/source"
# cargo-deny fetches advisory databases with git: serve it the local copy
# as a repository of its own, made afresh so it is always this checkout's.
rm -rf "$work"
mkdir -p "$repo"
cp -R deny/advisory-db/. "$repo/"
git -C "$repo" init --quiet --initial-branch=main
git -C "$repo" add --all
git -C "$repo" -c user.name=lichen -c user.email=lichen@localhost \
    commit --quiet --message "Lichen's local advisory database"
# deny.toml names the database https://lichen.invalid/advisory-db (cargo-deny
# wants a URL with a host); git, which cargo-deny fetches with, is told that
# this URL is the local repository.
export GIT_CONFIG_COUNT=1
export GIT_CONFIG_KEY_0="url.file://$repo.insteadOf"
export GIT_CONFIG_VALUE_0="https://lichen.invalid/advisory-db"
target/tools/cargo-deny/bin/cargo-deny --log-level error \
    check advisories licenses bans sources
