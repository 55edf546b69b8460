#!/usr/bin/env bash
# Sets everything up and runs a host with the example functions deployed:
# builds the guest components (installing the wasm toolchain if missing),
# builds the host, starts it on 127.0.0.1:8080 (LICHEN_LISTEN to change),
# sets the secret motd's policy names (a random API key, kept in
# DATA_DIR/motd-api-key), deploys
# functions/{hello,echo,square,fib,hash,hello-p3,counter,notes,linreg,motd} and
# keeps serving until Ctrl-C.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

listen="${LICHEN_LISTEN:-127.0.0.1:8080}"
data_dir="${LICHEN_DATA_DIR:-$root/lichen-data}"

functions/build.sh
echo "host: building (release; the first build takes several minutes)" >&2
cargo build --release --quiet -p lichen-host
lichen="$root/target/release/lichen"

log="$(mktemp)"
"$lichen" serve --listen "$listen" --data-dir "$data_dir" --policies "$root/policies" 2> >(tee "$log" >&2) &
host_pid=$!
trap 'kill -TERM $host_pid 2>/dev/null; wait $host_pid; rm -f "$log"' EXIT INT TERM

url=""
for _ in $(seq 1 300); do
    url="$(grep -o 'listening on http://[0-9.:]*' "$log" | head -n1 | sed 's/listening on //')" || true
    [ -n "$url" ] && break
    kill -0 $host_pid 2>/dev/null || { echo "host exited before listening" >&2; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "host did not start listening" >&2; exit 1; }

# motd's policy names the secret motd-api-key: until it is set, the policy
# is not in force (the host logs why).
key_file="$data_dir/motd-api-key"
if [ ! -s "$key_file" ]; then
    (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$key_file")
fi
"$lichen" secret set motd-api-key --from-file "$key_file" --url "$url" --data-dir "$data_dir"

for fn in hello echo square fib hash hello-p3 counter notes linreg motd; do
    "$lichen" deploy "$fn" "functions/target/wasm32-wasip2/release/${fn//-/_}.wasm" --url "$url" --data-dir "$data_dir"
done
"$lichen" ls --url "$url" --data-dir "$data_dir"
cat >&2 <<MSG

Lichen is serving on $url. Try:
  curl $url/fn/hello
  curl $url/fn/hello-p3        (the same function built for WASI 0.3)
  curl -d '[1,2,3]' $url/fn/square
  curl '$url/fn/echo/any/path?x=1'
  curl $url/fn/counter/hello  (state: visits per path, kept in a key-value store)
  curl -X PUT -d '{"text":"hi"}' $url/fn/notes/todo; curl $url/fn/notes/todo
  curl -H "x-api-key: \$(cat $key_file)" $url/fn/motd   (a setting behind a secret key)
  $lichen train --url $url --data-dir $data_dir   (gradient descent over linreg's shards)
Status page: $url/ui (it asks for the admin token).
Admin token: $data_dir/admin-token. Ctrl-C stops the host.
MSG
wait $host_pid
