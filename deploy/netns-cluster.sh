#!/usr/bin/env bash
# A multi-host dfs cluster on one machine: one network namespace per host, joined by a bridge.
# Traffic stays inside namespaces this script creates. Run as root; `down` removes everything.
#   deploy/netns-cluster.sh up [NODES]     coordinator in dfs-c (10.77.0.1), nodes in dfs-n1..N
#   deploy/netns-cluster.sh down
set -euo pipefail
cmd=${1:-up}
nodes=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
state=${DFS_NETNS_DIR:-/tmp/dfs-netns}
dfs="$root/.venv/bin/dfs"

ns_add() {  # name ip
    ip netns add "$1"
    ip link add "v-$1" type veth peer name eth0 netns "$1"
    ip link set "v-$1" master dfsbr0 up
    ip -n "$1" addr add "$2/24" dev eth0
    ip -n "$1" link set eth0 up
    ip -n "$1" link set lo up
}

case $cmd in
up)
    mkdir -p "$state"
    [ -f "$state/secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$state/secret"
    ip link add dfsbr0 type bridge && ip link set dfsbr0 up
    ns_add dfs-c 10.77.0.1
    ip netns exec dfs-c "$dfs" --secret-file "$state/secret" coordinator \
        --data "$state/coordinator" --listen 10.77.0.1:7700 > "$state/coordinator.log" 2>&1 &
    echo $! > "$state/coordinator.pid"
    for i in $(seq 1 "$nodes"); do
        ns_add "dfs-n$i" "10.77.0.$((10 + i))"
        ip netns exec "dfs-n$i" "$dfs" --secret-file "$state/secret" \
            --coordinator 10.77.0.1:7700 node --data "$state/node-$i" \
            --listen "10.77.0.$((10 + i)):7801" > "$state/node-$i.log" 2>&1 &
        echo $! > "$state/node-$i.pid"
    done
    echo "cluster up; run clients with: ip netns exec dfs-c $dfs --coordinator 10.77.0.1:7700 --secret-file $state/secret status"
    ;;
down)
    for pid in "$state"/*.pid; do [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true; rm -f "$pid"; done
    for ns in $(ip netns list | awk '/^dfs-/{print $1}'); do ip netns del "$ns"; done
    ip link del dfsbr0 2>/dev/null || true
    ;;
*) echo "usage: $0 up [NODES] | down" >&2; exit 2 ;;
esac
