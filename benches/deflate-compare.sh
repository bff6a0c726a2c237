#!/usr/bin/env bash
# permessage-deflate (`shared`) side by side with plain WebSocket, one run, medians of --reps:
#  (a) echo: server CPU per echoed 4 KiB JSON-like text message, compressed both ways (client
#      offers deflate and compresses every message; server `--compression shared`) against
#      plain (`--compression off`, no offer). `ringway --workers 1 --upstream local-echo`
#      pinned to CPU 0; the client (tests/peers/echo-load.js, Node `ws`: ringway-bench offers
#      no extensions) on CPU 1 at a fixed rate, so both cases run at the same load; server
#      CPU is the sum of its threads' /proc/PID/task/*/schedstat over the measured window.
#  (b) throughput: one core's compressor and inflater (benches/deflate_throughput.rs, in the
#      thread's CPU time, pinned to CPU 0) over JSON-like text: MB/s in and out, and the ratio.
#  (c) fan-out: --subscribers connections of the embedded chat join one room, offering
#      deflate or not (server `--workers 2 --compression shared|off`, unpinned); a publisher
#      says a ~4 KiB JSON-like text --publishes times (tests/peers/fanout.js). Reports the
#      compress calls per publish from ringway_deflate_messages_total{result="compressed"}
#      (must be one per core), the bytes on the wire per publish, and the server CPU.
# Modes alternate within each repetition (plain first in odd ones), a fresh gateway per run.
#
# Usage: benches/deflate-compare.sh [--bin target/release/ringway] [--reps 3] [--rate 2000]
#        [--duration 8] [--subscribers 10000] [--publishes 20] [--skip a|b|c]... [--quick]
# --quick: 1 rep, 3 s, 2,000 subscribers, 5 publishes (a smoke run of well under a minute).
# Needs taskset, node and tests/peers/node_modules (scripts/setup-test-deps.sh). Every
# process started is killed by PID on exit; every load run is bounded by `timeout`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN=target/release/ringway REPS=3 RATE=2000 DURATION=8 SUBS=10000 PUBS=20 SKIP=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift ;;
        --reps) REPS=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --subscribers) SUBS=$2; shift ;;
        --publishes) PUBS=$2; shift ;;
        --skip) SKIP="$SKIP $2"; shift ;;
        --quick) REPS=1 DURATION=3 SUBS=2000 PUBS=5 ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "deflate-compare.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
skip() { case " $SKIP " in *" $1 "*) return 0 ;; esac; return 1; }
command -v taskset >/dev/null && command -v node >/dev/null || { echo "needs taskset and node" >&2; exit 1; }
[ -d tests/peers/node_modules/ws ] || { echo "tests/peers/node_modules missing: run scripts/setup-test-deps.sh" >&2; exit 1; }
if [ ! -x "$BIN" ]; then
    [ "$BIN" = target/release/ringway ] || { echo "no binary at $BIN" >&2; exit 1; }
    cargo build --release --bin ringway
fi
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
OUT=$(mktemp -d)
echo "deflate-compare: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg), binary $BIN, results in $OUT" >&2
# Order of the two modes in repetition $1: plain first in odd ones.
order() { if [ $(($1 % 2)) = 1 ]; then echo "0 1"; else echo "1 0"; fi; }
mode_of() { if [ "$1" = 1 ]; then echo shared; else echo off; fi; }

# (a) CPU per echoed message.
if ! skip a; then
  for rep in $(seq "$REPS"); do
    for d in $(order "$rep"); do
      port=$(free_port) admin=$(free_port)
      taskset -c 0 "$BIN" --workers 1 --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" \
          --upstream local-echo --compression "$(mode_of "$d")" >/dev/null 2>&1 & gpid=$!; PIDS+=("$gpid")
      wait_port "$port"
      timeout $((DURATION + 60)) taskset -c 1 node tests/peers/echo-load.js "ws://127.0.0.1:$port/" "$gpid" \
          --deflate "$d" --rate "$RATE" --connections 50 --size 4096 --warmup 2 --duration "$DURATION" \
          | tee -a "$OUT/echo.jsonl" | sed "s/^/rep $rep echo: /" >&2
      kill "$gpid"; wait "$gpid" 2>/dev/null || true
    done
  done
fi

# (b) one core's compression throughput (criterion, pinned).
if ! skip b; then
  cargo bench --bench deflate_throughput --no-run >/dev/null 2>&1
  exe=$(ls -t target/release/deps/deflate_throughput-* | grep -v '\.d$' | head -1)
  for rep in $(seq "$REPS"); do
    taskset -c 0 "$exe" --bench --warm-up-time 1 --measurement-time 3 --noplot >"$OUT/tp.$rep.txt" 2>&1
    for f in target/criterion/deflate_throughput/*/*/new/estimates.json; do
      op=$(basename "$(dirname "$(dirname "$(dirname "$f")")")")
      size=$(basename "$(dirname "$(dirname "$f")")")
      python3 -c 'import json,sys; print(sys.argv[2], sys.argv[3], json.load(open(sys.argv[1]))["median"]["point_estimate"])' \
          "$f" "$op" "$size" >> "$OUT/tp.rows"
    done
    echo "rep $rep throughput: $(grep -c . "$OUT/tp.rows") rows" >&2
  done
  grep '^deflate_throughput ' "$OUT/tp.1.txt" > "$OUT/tp.sizes"
fi

# (c) broadcast to many deflate subscribers.
if ! skip c; then
  ulimit -n "$(ulimit -Hn)"
  need=$((SUBS + 1000))   # per process: the client holds SUBS sockets, the server as many
  [ "$(ulimit -n)" -ge "$need" ] || { echo "fd limit $(ulimit -n) is under $need for $SUBS subscribers" >&2; exit 1; }
  for rep in $(seq "$REPS"); do
    for d in $(order "$rep"); do
      port=$(free_port) admin=$(free_port)
      "$BIN" --workers 2 --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" \
          --compression "$(mode_of "$d")" >/dev/null 2>&1 & gpid=$!; PIDS+=("$gpid")
      wait_port "$port"
      timeout 300 node tests/peers/fanout.js "127.0.0.1:$port" "127.0.0.1:$admin" "$gpid" \
          --deflate "$d" --connections "$SUBS" --publishes "$PUBS" \
          | tee -a "$OUT/fanout.jsonl" | sed "s/^/rep $rep fan-out: /" >&2
      kill "$gpid"; wait "$gpid" 2>/dev/null || true
    done
  done
fi

python3 - "$OUT" <<'PY'
import json, os, statistics as st, sys
out = sys.argv[1]
def rows(name):
    p = os.path.join(out, name)
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
med = lambda xs: st.median(xs) if xs else float("nan")
echo = rows("echo.jsonl")
if echo:
    print("(a) echo, 4 KiB JSON-like text, 50 connections, fixed rate; server CPU per message (median):\n")
    print("| mode | msgs/s | server CPU per message | server CPU share |")
    print("|---|---|---|---|")
    res = {}
    for d in (False, True):
        sel = [r for r in echo if r["deflate"] == d]
        if not sel:
            continue
        cpu = med([r["server_cpu_us_per_msg"] for r in sel])
        res[d] = cpu
        name = "permessage-deflate (shared), both ways" if d else "plain"
        print(f"| {name} | {med([r['msgs_per_sec'] for r in sel]):,.0f} | {cpu:.1f} us | {100 * med([r['server_cpu_share'] for r in sel]):.1f}% |")
    # Ratio per repetition (each rep ran the two side by side), then the median of those.
    pairs = [(a, b) for a, b in zip([r for r in echo if not r["deflate"]], [r for r in echo if r["deflate"]])]
    if pairs:
        ratios = [b["server_cpu_us_per_msg"] / a["server_cpu_us_per_msg"] for a, b in pairs]
        extra = [b["server_cpu_us_per_msg"] - a["server_cpu_us_per_msg"] for a, b in pairs]
        print(f"\ndeflate / plain per repetition: {', '.join(f'{x:.2f}x' for x in ratios)} (median {med(ratios):.2f}x); "
              f"deflate costs {med(extra):.1f} us more per echoed message (inflate in + compress out)\n")
tp = os.path.join(out, "tp.rows")
if os.path.exists(tp):
    sizes = {}
    for l in open(os.path.join(out, "tp.sizes")):
        _, size, raw, comp = l.split()
        sizes[size] = (int(raw.split("=")[1]), int(comp.split("=")[1]))
    ns = {}
    for l in open(tp):
        op, size, t = l.split()
        ns.setdefault((op, size), []).append(float(t))
    print("(b) one core, `shared` (compressor reset per message), 64 distinct JSON-like messages per size; MB/s = 10^6 B/s, medians:\n")
    print("| message size | ratio | compress: MB/s in | compress: MB/s out | inflate: MB/s in | inflate: MB/s out |")
    print("|---|---|---|---|---|---|")
    for size in sorted(sizes, key=int):
        raw, comp = sizes[size]
        c = med(ns.get(("compress", size), [])); i = med(ns.get(("inflate", size), []))
        print(f"| {int(size):,} B | {raw / comp:.2f} | {raw / c * 1e3:,.0f} | {comp / c * 1e3:,.0f} | {comp / i * 1e3:,.0f} | {raw / i * 1e3:,.0f} |")
    print()
fan = rows("fanout.jsonl")
if fan:
    r0 = fan[0]
    print(f"(c) broadcast of a ~4 KiB JSON-like message to {r0['subscribers']:,} subscribers, 2 cores, {r0['publishes']} publishes per run, medians:\n")
    print("| subscribers | compress calls per publish (by core) | bytes on the wire per publish | per subscriber | server CPU per publish | wall per publish |")
    print("|---|---|---|---|---|---|")
    for d in (False, True):
        sel = [r for r in fan if r["deflate"] == d]
        if not sel:
            continue
        calls = med([r["compress_calls_per_publish"] for r in sel])
        by = sel[0]["compress_calls_per_publish_by_core"]
        name = "permessage-deflate (shared)" if d else "plain"
        print(f"| {name} | {calls:g} ({', '.join(f'core {k}: {v:g}' for k, v in sorted(by.items()))}) | "
              f"{med([r['wire_bytes_per_publish'] for r in sel]):,.0f} B | {med([r['wire_bytes_per_subscriber'] for r in sel]):,.0f} B | "
              f"{med([r['server_cpu_ms_per_publish'] for r in sel]):.1f} ms | {med([r['wall_ms_per_publish'] for r in sel]):.0f} ms |")
PY
