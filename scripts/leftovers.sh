#!/usr/bin/env bash
# Lists, kills and fails on the processes a test run left behind: every
# process that carries this run's LICHEN_TEST_RUN marker in its environment
# (scripts/test.sh exports it, so whatever the tests start inherits it:
# hosts, nats-server, registries, wasmtime, node and its Chromium), other
# than the test command itself and this check. Bash builtins only, so the
# check starts no process that would carry the marker too.
set -euo pipefail
marker="LICHEN_TEST_RUN=${LICHEN_TEST_RUN:?scripts/test.sh sets it}"
# Besides this check's own shell, the shells that ran it: every ancestor up
# to (and including) the test command, whose `phase` and trap may sit in
# subshells of it.
spare=" $$ $BASHPID "
pid=$PPID
while [ "$pid" -gt 1 ]; do
    spare+="$pid "
    parent=1
    while read -r key value; do
        [ "$key" = PPid: ] && parent="$value" && break
    done <"/proc/$pid/status"
    pid="$parent"
done
left=()
for dir in /proc/[0-9]*; do
    pid="${dir#/proc/}"
    [[ "$spare" == *" $pid "* ]] && continue
    found=""
    # Kernel threads and processes gone meanwhile have no environment to read.
    {
        while IFS= read -r -d '' variable; do
            if [ "$variable" = "$marker" ]; then
                found=1
                break
            fi
        done <"$dir/environ"
    } 2>/dev/null || true
    [ -n "$found" ] && left+=("$pid")
done
status=0
if [ ${#left[@]} -gt 0 ]; then
    echo "leftovers: ${#left[@]} process(es) outlived the tests that started them:" >&2
    for pid in "${left[@]}"; do
        args=()
        { mapfile -d '' args <"/proc/$pid/cmdline"; } 2>/dev/null || true
        echo "  $pid ${args[*]}" >&2
    done
    kill -KILL "${left[@]}" 2>/dev/null || true
    status=1
fi
# The fault campaign's network namespaces (lf<pid><n>sw, lf<pid><n>h<i>),
# deleted by its tests when they end: any left is one a test lost.
if command -v ip >/dev/null; then
    namespaces=$(ip netns list 2>/dev/null | while read -r name _; do
        [[ "$name" =~ ^lf[0-9]+(sw|h[0-9]+)$ ]] && echo "$name"
    done)
    if [ -n "$namespaces" ]; then
        echo "leftovers: network namespaces outlived the tests that made them:" $namespaces >&2
        for name in $namespaces; do
            ip netns pids "$name" 2>/dev/null | while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$name" 2>/dev/null || true
        done
        status=1
    fi
fi
exit $status
