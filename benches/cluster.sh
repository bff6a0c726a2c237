#!/usr/bin/env bash
# Cross-node fan-out (issue 15): a topic (an embedded chat room) with C subscribers spread
# over two gateway nodes joined on NATS, beside the same topic with every subscriber on one
# node. tests/peers/cluster-fanout.js drives it: a closed loop (publishes/s and deliveries/s
# at saturation) and a fixed rate below it (deliveries/s, p50/p99 from say to receipt).
# Interleaves the two layouts RUNS times; prints one JSON line per run.
# Usage: benches/cluster.sh [RUNS=3] [CONNECTIONS=10000] [RATE=10]
# Needs nats-server and node (scripts/setup-test-deps.sh); builds with --profile ci.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS="${1:-3}"
CONNECTIONS="${2:-10000}"
RATE="${3:-10}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # 10,000 sockets per process
cargo build --profile ci -q
BIN="$ROOT/target/ci/ringway"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

NP="$(free_port)"
nats-server -a 127.0.0.1 -p "$NP" >/dev/null 2>&1 &
PIDS+=($!)
start_gw() { # NAME ID PORT ADMIN
  "$BIN" --listen "127.0.0.1:$3" --admin "127.0.0.1:$4" --workers 1 \
    --cluster "nats://127.0.0.1:$NP" --node-name "$1" >/dev/null 2>&1 &
  PIDS+=($!)
}
PA="$(free_port)"; AA="$(free_port)"; PB="$(free_port)"; AB="$(free_port)"
start_gw a 1 "$PA" "$AA"
start_gw b 2 "$PB" "$AB"
for a in "$AA" "$AB"; do
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$a/metrics" 2>/dev/null | grep -q '^ringway_cluster_nodes 2' && break
    sleep 0.1
  done
done
cd tests/peers
for r in $(seq "$RUNS"); do
  for layout in two one; do
    if [ "$layout" = two ]; then SUBS="127.0.0.1:$PA,127.0.0.1:$PB"; else SUBS="127.0.0.1:$PA"; fi
    printf '{"run":%d,"layout":"%s",' "$r" "$layout"
    node cluster-fanout.js --subs "$SUBS" --pub "127.0.0.1:$PA" --connections "$CONNECTIONS" \
      --rate "$RATE" --duration 5 | sed 's/^{//'
  done
done
