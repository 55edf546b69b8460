# Helpers of the perf-stat scripts (sourced, not run).

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until something answers on $1.
wait_for() {
    for _ in $(seq 1 600); do
        curl -s -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "nothing answers on $1" >&2
    return 1
}
