#!/usr/bin/env bash
# wss:// against ws://, side by side in one run: server CPU per echoed message, TLS connection
# setup per second, and RSS per idle connection.
#
# Per run a fresh `ringway --workers 1` pinned to CPU 0 serves both listeners (--listen and
# --listen-tls, an ECDSA P-256 certificate made here with the openssl CLI); ringway-bench runs
# on CPU 1. Cases, each --reps times, ws and wss alternated (ws wss, ws wss, ...):
#   echo: 100 connections x 1 in flight, 1 KiB and 64 KiB, upstream local-echo and echo
#         (through the relay thread); server CPU per message from /proc/PID/stat over the
#         measured window (ringway-bench --server-pid).
#   churn: connections opened at --churn-rate for --churn-time, each TLS handshake + upgrade +
#         one echo + close, with full TLS handshakes (--no-resume) and resumed ones (tickets);
#         server CPU per connection from /proc over the churn, so connections per second on
#         one core = 1 / that (the server's whole cost per connection, not TLS alone).
#   idle: --idle connections held (default 10,000), RSS growth per connection (ws and wss).
# Prints markdown tables of medians, with the wss/ws ratio.
#
# Usage: benches/tls.sh [--ringway PATH] [--bench PATH] [--reps 3] [--duration 5s]
#                       [--idle 10000] [--churn-rate 1000] [--churn-time 5s] [--only echo|churn|idle]
#   default binaries: target/release/ringway and target/release/ringway-bench
# A load run that reports errors is kept (its errors are printed) and the script goes on.
# Every server started is killed by PID on exit; every load run is bounded by `timeout`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RINGWAY=target/release/ringway BENCH=target/release/ringway-bench
REPS=3 DURATION=5s IDLE=10000 CHURN_RATE=1000 CHURN_TIME=5s ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --ringway) RINGWAY=$2; shift ;;
        --bench) BENCH=$2; shift ;;
        --reps) REPS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --idle) IDLE=$2; shift ;;
        --churn-rate) CHURN_RATE=$2; shift ;;
        --churn-time) CHURN_TIME=$2; shift ;;
        --only) ONLY=$2; shift ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "tls.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -x "$RINGWAY" ] && [ -x "$BENCH" ] || { echo "tls.sh: build $RINGWAY and $BENCH first" >&2; exit 2; }
GPID=""
OUT=$(mktemp -d)
cleanup() { [ -n "$GPID" ] && kill "$GPID" 2>/dev/null || true; rm -rf "$OUT"; }
trap cleanup EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null   # CA:FALSE: webpki trusts it as its own anchor
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# A fresh gateway on CPU 0 with both listeners; sets GPID, WS, WSS.
start() {
    local port tport
    port=$(free_port); tport=$(free_port)
    taskset -c 0 "$RINGWAY" --workers 1 --listen "127.0.0.1:$port" --listen-tls "127.0.0.1:$tport" \
        --tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem" --upstream "$1" --admin 127.0.0.1:0 \
        >"$OUT/server.log" 2>&1 &
    GPID=$!
    wait_port "$port"; wait_port "$tport"
    WS="ws://127.0.0.1:$port/" WSS="wss://localhost:$tport/"
}
stop() { kill "$GPID"; wait "$GPID" 2>/dev/null || true; GPID=""; }
url_of() { if [ "$1" = ws ]; then echo "$WS"; else echo "$WSS"; fi; }
tls_of() { if [ "$1" = wss ]; then echo "--ca $OUT/cert.pem"; fi; }
field() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); v=r
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$@"; }

ROWS="$OUT/rows"
: >"$ROWS"
for rep in $(seq "$REPS"); do
  if [ -z "$ONLY" ] || [ "$ONLY" = echo ]; then
    for upstream in local-echo echo; do
      for size in 1024 65536; do
        for scheme in ws wss; do
          start "$upstream"
          # shellcheck disable=SC2046
          timeout 60 taskset -c 1 "$BENCH" --json echo --url "$(url_of $scheme)" $(tls_of $scheme) \
              --connections 100 --in-flight 1 --size "$size" --duration "$DURATION" --warmup 1s \
              --server-pid "$GPID" >"$OUT/r.json" || echo "tls.sh: that run failed (exit $?)" >&2
          stop
          printf 'echo\t%s %s\t%s\t%s\t%s\n' "$upstream" "$size" "$scheme" \
              "$(field "$OUT/r.json" server.cpu_us_per_msg)" "$(field "$OUT/r.json" msgs_per_sec)" >>"$ROWS"
          echo "rep $rep: $(tail -1 "$ROWS")" >&2
        done
      done
    done
  fi
  if [ -z "$ONLY" ] || [ "$ONLY" = churn ]; then
    for kind in full resumed plain; do
      start local-echo
      if [ "$kind" = plain ]; then url=$WS; extra=""; else url=$WSS; extra="--ca $OUT/cert.pem"; fi
      [ "$kind" = full ] && extra="$extra --no-resume"
      c0=$(cpu_ticks "$GPID")
      # shellcheck disable=SC2086
      timeout 120 taskset -c 1 "$BENCH" --json churn --url "$url" $extra --held 0 --rate "$CHURN_RATE" \
          --duration "$CHURN_TIME" --warmup 0s --settle 0s >"$OUT/r.json" \
          || echo "tls.sh: that run failed (exit $?)" >&2
      c1=$(cpu_ticks "$GPID")
      stop
      n=$(field "$OUT/r.json" churn_connects)
      errs=$(field "$OUT/r.json" errors.total)
      printf 'churn\t%s\t-\t%s\t%s\t%s\n' "$kind" \
          "$(python3 -c "print(($c1-$c0)/$HZ*1e6/max($n,1))")" "$(field "$OUT/r.json" churn_per_sec)" "$errs" >>"$ROWS"
      echo "rep $rep: $(tail -1 "$ROWS")" >&2
    done
  fi
  if [ -z "$ONLY" ] || [ "$ONLY" = idle ]; then
    for scheme in ws wss; do
      start local-echo
      # shellcheck disable=SC2046
      timeout 300 taskset -c 1 "$BENCH" --json idle --url "$(url_of $scheme)" $(tls_of $scheme) \
          --connections "$IDLE" --hold 2s --server-pid "$GPID" >"$OUT/r.json" \
          || echo "tls.sh: that run failed (exit $?)" >&2
      stop
      printf 'idle\t%s\t%s\t%s\t%s\n' "$IDLE" "$scheme" \
          "$(field "$OUT/r.json" server.bytes_per_connection)" "$(field "$OUT/r.json" connected)" >>"$ROWS"
      echo "rep $rep: $(tail -1 "$ROWS")" >&2
    done
  fi
done

python3 - "$ROWS" "$CHURN_RATE" <<'PY'
import statistics as st, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
med = lambda xs: st.median(xs) if xs else float("nan")
def sel(kind, case, scheme, col):
    return [float(r[col]) for r in rows if r[0] == kind and r[1] == case and r[2] == scheme]
echo = [r for r in rows if r[0] == "echo"]
if echo:
    print("| upstream, size | ws CPU/msg | wss CPU/msg | wss/ws | ws msgs/s | wss msgs/s |")
    print("|---|---|---|---|---|---|")
    for case in dict.fromkeys(r[1] for r in echo):
        a, b = med(sel("echo", case, "ws", 3)), med(sel("echo", case, "wss", 3))
        ra, rb = med(sel("echo", case, "ws", 4)), med(sel("echo", case, "wss", 4))
        up, size = case.split()
        print(f"| {up}, {int(size)//1024} KiB | {a:.2f} us | {b:.2f} us | {b/a:.2f}x | {ra:,.0f} | {rb:,.0f} |")
churn = [r for r in rows if r[0] == "churn"]
if churn:
    print()
    print(f"| connection setup ({sys.argv[2]}/s offered) | server CPU per connection | per second on one core | achieved/s | errors |")
    print("|---|---|---|---|---|")
    for kind in ("full", "resumed", "plain"):
        cpu = med(sel("churn", kind, "-", 3))
        rate = med(sel("churn", kind, "-", 4))
        errs = int(sum(sel("churn", kind, "-", 5)))
        label = {"full": "wss, full TLS handshake", "resumed": "wss, resumed (ticket)", "plain": "ws (no TLS)"}[kind]
        print(f"| {label} | {cpu:.1f} us | {1e6/cpu:,.0f} | {rate:,.0f} | {errs} |")
idle = [r for r in rows if r[0] == "idle"]
if idle:
    print()
    print("| idle connections | ws RSS/conn | wss RSS/conn | wss - ws |")
    print("|---|---|---|---|")
    n = idle[0][1]
    a, b = med(sel("idle", n, "ws", 3)), med(sel("idle", n, "wss", 3))
    print(f"| {int(n):,} | {a:,.0f} B | {b:,.0f} B | {b-a:,.0f} B |")
PY
