#!/usr/bin/env bash
# A/B of the relay round trip through a TCP backend: two ringway binaries, the same backend.
#
# Per run: examples/chat_backend --echo-other (the backend) and `ringway --workers 1
# --upstream tcp://...` both pinned to CPU 0, ringway-bench echo on CPU 1 (100 connections x
# 1 in flight); sizes 16 B and 1 KiB; binaries alternated A B A B ... --reps times.
# Reports the median msgs/s and gateway+backend CPU (utime+stime from /proc over the whole
# load run, warm-up included) per message.
#
# Usage: benches/relay-ab.sh OLD_RINGWAY NEW_RINGWAY BACKEND BENCH [--reps 3] [--duration 5s] [--local]
# --local: the same A/B with `--upstream local-echo` (no relay, no backend; BACKEND unused).
# Every process started is killed by PID on exit; every load run is bounded by `timeout`.
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
OLD=$1 NEW=$2 BACKEND=$3 BENCH=$4; shift 4
REPS=3 DURATION=5s LOCAL=0
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --local) LOCAL=1 ;;
        *) echo "relay-ab.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# utime+stime of every PID given (the gateway, and the backend when there is one).
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$t"; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
HZ=$(getconf CLK_TCK)
OUT=$(mktemp -d)
for rep in $(seq "$REPS"); do
  for which in old new; do
    bin=$OLD; [ "$which" = new ] && bin=$NEW
    for size in 16 1024; do
      bport=$(free_port); gport=$(free_port)
      if [ "$LOCAL" = 1 ]; then
        bpid=""
        upstream=local-echo
      else
        taskset -c 0 "$BACKEND" --listen "127.0.0.1:$bport" --echo-other >/dev/null 2>&1 & bpid=$!; PIDS+=("$bpid")
        wait_port "$bport"
        upstream="tcp://127.0.0.1:$bport"
      fi
      taskset -c 0 "$bin" --workers 1 --listen "127.0.0.1:$gport" --upstream "$upstream" --admin 127.0.0.1:0 >/dev/null 2>&1 & gpid=$!; PIDS+=("$gpid")
      wait_port "$gport"; sleep 1   # the link to the backend comes up
      c0=$(cpu_ticks $gpid $bpid)
      timeout 60 taskset -c 1 "$BENCH" echo --json --url "ws://127.0.0.1:$gport/" --connections 100 \
          --in-flight 1 --size "$size" --duration "$DURATION" --warmup 1s --drain 2s > "$OUT/r.json"
      c1=$(cpu_ticks $gpid $bpid)
      kill $gpid $bpid; wait $gpid $bpid 2>/dev/null || true
      python3 - "$OUT/r.json" "$which" "$size" "$((c1 - c0))" "$HZ" >> "$OUT/rows" <<'PY'
import json, sys
r = json.JSONDecoder().raw_decode(open(sys.argv[1]).read().lstrip())[0]; ticks = int(sys.argv[4]); hz = int(sys.argv[5])
msgs = r["messages"]
rate = r["msgs_per_sec"]
print(sys.argv[2], sys.argv[3], msgs, rate, ticks / hz, sep="\t")
PY
      echo "rep $rep $which ${size}B: $(tail -1 "$OUT/rows")" >&2
    done
  done
done
python3 - "$OUT/rows" "$DURATION" <<'PY'
import statistics, sys, re
d = float(re.sub("s$", "", sys.argv[2]))
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
print("| binary | size | msgs/s (median) | gateway+backend CPU µs/msg (median) |")
print("|---|---|---|---|")
for which in ("old", "new"):
    for size in ("16", "1024"):
        sel = [r for r in rows if r[0] == which and r[1] == size]
        rates = [float(r[3]) for r in sel]
        # messages in the whole run ~= rate x (warm-up + measured time)
        cpu = [float(r[4]) * 1e6 / (float(r[3]) * (d + 1.0)) for r in sel]
        print(f"| {which} | {size} B | {statistics.median(rates):,.0f} | {statistics.median(cpu):.2f} |")
PY
