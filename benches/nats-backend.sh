#!/usr/bin/env bash
# CPU per message of a backend over NATS against the same backend on a relay link (issue 15),
# side by side: an echo through `backends = ["nats://bench.echo"]` (examples/echo_backend_nats,
# via a local nats-server) and through `--upstream tcp://` (examples/chat_backend
# --echo-other), the same load, interleaved NATS, link, NATS, link... RUNS times.
#
# Per run: the gateway (`--workers 1`), the backend and (NATS runs) nats-server share CPU 0;
# ringway-bench echo runs on CPU 1 with C connections x 1 in flight of SIZE-byte messages.
# CPU is utime+stime from /proc over the load run (warm-up included), per message echoed:
# the gateway alone, and everything on CPU 0 (gateway + backend + nats-server).
# Prints one row per run and the medians.
# Usage: benches/nats-backend.sh [RUNS=3] [SIZE=1024] [CONNECTIONS=100] [DURATION=4s]
# Needs nats-server (scripts/setup-test-deps.sh); builds with --profile ci. Every process it
# starts is killed by PID on exit and every load run is bounded by `timeout`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS="${1:-3}" SIZE="${2:-1024}" CONNECTIONS="${3:-100}" DURATION="${4:-4s}"
command -v nats-server >/dev/null || { echo "nats-backend.sh: nats-server not found (scripts/setup-test-deps.sh)" >&2; exit 1; }
cargo build --profile ci -q --bin ringway --example echo_backend_nats --example chat_backend
cargo build --profile ci -q -p ringway-bench
BIN="$ROOT/target/ci/ringway"
NATS_BACKEND="$ROOT/target/ci/examples/echo_backend_nats"
LINK_BACKEND="$ROOT/target/ci/examples/chat_backend"
BENCH="$ROOT/target/ci/ringway-bench"
HZ=$(getconf CLK_TCK)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$t"; }
OUT=$(mktemp -d)
for run in $(seq "$RUNS"); do
  for path in nats link; do
    gport=$(free_port)
    if [ "$path" = nats ]; then
      np=$(free_port)
      taskset -c 0 nats-server -a 127.0.0.1 -p "$np" >/dev/null 2>&1 & npid=$!; PIDS+=("$npid")
      wait_port "$np"
      taskset -c 0 "$NATS_BACKEND" "nats://127.0.0.1:$np" bench.echo --for 120 >/dev/null 2>&1 & bpid=$!; PIDS+=("$bpid")
      cat > "$OUT/gw.toml" <<EOF
[cluster]
nats = ["nats://127.0.0.1:$np"]
node = "bench"

[[upstreams]]
name = "echo"
backends = ["nats://bench.echo"]

[[routes]]
path = "/*"
upstream = "echo"
EOF
      taskset -c 0 "$BIN" --workers 1 --listen "127.0.0.1:$gport" --admin 127.0.0.1:0 \
        --config "$OUT/gw.toml" >"$OUT/gw.log" 2>&1 & gpid=$!; PIDS+=("$gpid")
      others="$bpid $npid"
    else
      bport=$(free_port)
      taskset -c 0 "$LINK_BACKEND" --listen "127.0.0.1:$bport" --echo-other >/dev/null 2>&1 & bpid=$!; PIDS+=("$bpid")
      wait_port "$bport"
      taskset -c 0 "$BIN" --workers 1 --listen "127.0.0.1:$gport" --admin 127.0.0.1:0 \
        --upstream "tcp://127.0.0.1:$bport" >"$OUT/gw.log" 2>&1 & gpid=$!; PIDS+=("$gpid")
      others="$bpid"
    fi
    wait_port "$gport"; sleep 1.5   # the backend link / the NATS connection comes up
    g0=$(ticks "$gpid"); a0=$(ticks "$gpid" $others)
    timeout 60 taskset -c 1 "$BENCH" echo --json --url "ws://127.0.0.1:$gport/" --connections "$CONNECTIONS" \
      --in-flight 1 --size "$SIZE" --duration "$DURATION" --warmup 1s --drain 2s > "$OUT/r.json"
    g1=$(ticks "$gpid"); a1=$(ticks "$gpid" $others)
    kill "$gpid" $others 2>/dev/null || true; wait "$gpid" $others 2>/dev/null || true
    python3 - "$OUT/r.json" "$path" "$run" "$((g1 - g0))" "$((a1 - a0))" "$HZ" "$DURATION" >> "$OUT/rows" <<'PY'
import json, re, sys
r = json.JSONDecoder().raw_decode(open(sys.argv[1]).read().lstrip())[0]
g, a, hz = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
d = float(re.sub("s$", "", sys.argv[7]))
rate = r["msgs_per_sec"]
msgs = rate * (d + 1.0)   # the CPU window holds the 1 s warm-up too
errors = r.get("errors", {}).get("total", 0)
print(sys.argv[2], sys.argv[3], f"{rate:.0f}", f"{g / hz * 1e6 / msgs:.2f}", f"{a / hz * 1e6 / msgs:.2f}", errors, sep="\t")
PY
    printf 'run %s %-4s: %s\n' "$run" "$path" "$(tail -1 "$OUT/rows" | cut -f3-)" >&2
  done
done
python3 - "$OUT/rows" "$SIZE" "$CONNECTIONS" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
print(f"echo of {sys.argv[2]} B, {sys.argv[3]} connections x 1 in flight, medians of {len(rows) // 2} interleaved runs")
print("| backend path | msgs/s | gateway CPU µs/msg | gateway+backend(+nats-server) CPU µs/msg | errors |")
print("|---|---|---|---|---|")
med = {}
for path, name in (("nats", "over NATS"), ("link", "relay link (TCP)")):
    sel = [r for r in rows if r[0] == path]
    m = [statistics.median(float(r[i]) for r in sel) for i in (2, 3, 4)]
    med[path] = m
    print(f"| {name} | {m[0]:,.0f} | {m[1]:.2f} | {m[2]:.2f} | {sum(int(r[5]) for r in sel)} |")
print(f"NATS / link: gateway CPU {med['nats'][1] / med['link'][1]:.2f}x, all of CPU 0 {med['nats'][2] / med['link'][2]:.2f}x")
PY
