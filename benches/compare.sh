#!/usr/bin/env bash
# Compare ringway with two other WebSocket echo servers under identical loads from ringway-bench.
#
# Servers (each on CPU 0, one core, fresh process per run; the load tool on CPU 1):
#   ringway-local  ringway --workers 1 --upstream local-echo   (echo inside the worker)
#   ringway-relay  ringway --workers 1 --upstream echo         (through the relay thread, which
#                                                               shares CPU 0 with the worker)
#   tungstenite    benches/peers/tungstenite-echo              (tokio-tungstenite 0.24, current_thread)
#   fastws         benches/peers/fastwebsockets-echo           (fastwebsockets 0.10 + hyper 1, current_thread)
#
# Cases, each run --reps times, interleaved (A B C D, A B C D, ...):
#   100 connections x 1 in flight at 16 B, 1 KiB and 64 KiB; 1,000 x 1 at 1 KiB (closed loop);
#   `rate` (open loop, 100 connections, 1 KiB) at about half the best peer's measured msgs/s;
#   `idle` with 10,000 connections and with the most the fd hard limit allows, up to 100,000
#   (`idle-max`; RSS per connection).
# Prints one markdown table of medians with ratios to the best peer. Raw JSON stays in --out.
# Message limits: ringway keeps its default (64 KiB), the peers accept up to 1 MiB.
#
# Usage: benches/compare.sh [--quick] [--duration 5s] [--warmup 1s] [--reps 3] [--rate N]
#                           [--no-build] [--out DIR] [--cases LIST] [--chart FILE]
#   --quick      1 repetition, 2 s runs, 0.5 s warm-up: a smoke run (about 1 minute)
#   --duration   measured time per load run (default 5s); --warmup (default 1s)
#   --reps       repetitions of every case (default 3)
#   --rate       total msgs/s for the `rate` case (default: half the best peer's 100 x 1 KiB msgs/s)
#   --no-build   use the binaries already built
#   --out        where to keep the JSON reports (default target/compare/<date-time>)
#   --cases      comma-separated subset of c100-16B,c100-1KiB,c100-64KiB,c1000-1KiB,rate,
#                idle-10k,idle-max (default: all); `rate` needs --rate or c100-1KiB
#   --chart      where to write the SVG chart of CPU per message and RSS per idle connection
#                (default: docs/compare.svg after a full run, else DIR/compare.svg)
# The full default run takes about 7 minutes on a 2-core machine. Every server started is
# killed by PID when the script exits; every load run is bounded by `timeout`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DURATION=5s
WARMUP=1s
REPS=3
HOLD=2s
RATE=""
BUILD=1
OUT=""
CASES=""
CHART=""
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; REPS=1; DURATION=2s; WARMUP=0.5s; HOLD=1s ;;
        --duration) DURATION="$2"; shift ;;
        --warmup) WARMUP="$2"; shift ;;
        --reps) REPS="$2"; shift ;;
        --rate) RATE="$2"; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT="$2"; shift ;;
        --cases) CASES="$2"; shift ;;
        --chart) CHART="$2"; shift ;;
        -h|--help) sed -n '2,31p' "$0" | grep -v '^set ' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$REPS" =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --reps must be a positive integer" >&2; exit 2; }

# Seconds in a duration such as 5s, 500ms, 0.5s (for the time bounds below).
secs() {
    python3 -c 'import re,sys
m = re.fullmatch(r"([0-9.]+)(ms|s|us)?", sys.argv[1]) or sys.exit("bad duration " + sys.argv[1])
v = float(m.group(1)); u = m.group(2) or "s"
print(v / {"s": 1, "ms": 1e3, "us": 1e6}[u])' "$1"
}
RUN_LIMIT=$(python3 -c "print(int($(secs "$DURATION") + $(secs "$WARMUP") + $(secs "$HOLD") + 40))")

PEERS_TARGET="$ROOT/benches/peers/target"
if [ "$BUILD" = 1 ]; then
    echo "== building ringway (release) and the peers" >&2
    cargo build --release --quiet --workspace --bins
    for p in tungstenite-echo fastwebsockets-echo; do
        (cd "benches/peers/$p" && CARGO_TARGET_DIR="$PEERS_TARGET" cargo build --release --quiet)
    done
fi
RINGWAY="$ROOT/target/release/ringway"
TOOL="$ROOT/target/release/ringway-bench"
for b in "$RINGWAY" "$TOOL" "$PEERS_TARGET/release/tungstenite-echo" "$PEERS_TARGET/release/fastwebsockets-echo"; do
    [ -x "$b" ] || { echo "compare.sh: $b is missing (run without --no-build)" >&2; exit 2; }
done

# Idle runs hold many sockets on both sides: lift the soft fd limit to the hard one.
HARD_FDS=$(ulimit -Hn)
[ "$HARD_FDS" = unlimited ] && HARD_FDS=1048576
ulimit -n "$HARD_FDS" 2>/dev/null || true

SERVERS=(ringway-local ringway-relay tungstenite fastws)
server_cmd() {
    case "$1" in
        ringway-local) echo "$RINGWAY --workers 1 --upstream local-echo" ;;
        ringway-relay) echo "$RINGWAY --workers 1 --upstream echo" ;;
        tungstenite) echo "$PEERS_TARGET/release/tungstenite-echo" ;;
        fastws) echo "$PEERS_TARGET/release/fastwebsockets-echo" ;;
    esac
}

[ -n "$OUT" ] || OUT="$ROOT/target/compare/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
if [ -z "$CHART" ]; then
    if [ -z "$CASES" ] && [ "$QUICK" = 0 ]; then CHART="$ROOT/docs/compare.svg"; else CHART="$OUT/compare.svg"; fi
fi
echo "$(date -u +%Y-%m-%d), $(nproc) CPUs, Linux $(uname -r)" >"$OUT/stamp"

SERVER_PID=""
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM

# Starts server $1 on CPU 0 logging to $2 (a fresh file: the shell truncates a redirect only
# in the child, so a reused log could still show the previous server's address); sets
# SERVER_PID and URL.
start_server() {
    local log=$2
    rm -f "$log"
    # shellcheck disable=SC2046
    taskset -c 0 $(server_cmd "$1") --listen 127.0.0.1:0 2>"$log" >/dev/null &
    SERVER_PID=$!
    URL=""
    for _ in $(seq 100); do
        URL=$(grep -o 'ws://127\.0\.0\.1:[0-9]*/' "$log" 2>/dev/null | head -n1 || true)
        [ -n "$URL" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "compare.sh: $1 did not report its address:" >&2
    cat "$log" >&2
    exit 1
}

# run CASE SERVER REP -- ringway-bench arguments (without --url / --server-pid)
run() {
    local case=$1 server=$2 rep=$3
    shift 4
    start_server "$server" "$OUT/$case.$server.$rep.server.log"
    local out="$OUT/$case.$server.$rep.json" rc=0
    timeout -k 5 "$RUN_LIMIT" taskset -c 1 "$TOOL" --json "$@" --url "$URL" --server-pid "$SERVER_PID" \
        >"$out" 2>"$OUT/$case.$server.$rep.err" || rc=$?
    stop_server
    printf '%-10s %-14s rep %s rc %s\n' "$case" "$server" "$rep" "$rc" >&2
    [ "$rc" = 0 ] || { echo "  (exit $rc: $(tail -n1 "$OUT/$case.$server.$rep.err"))" >&2; }
}

# Whether case $1 was asked for (all are, without --cases).
wanted() {
    [ -z "$CASES" ] || [[ ",$CASES," == *",$1,"* ]]
}

# Every case's reps, interleaved over the servers.
each() {
    local case=$1
    shift
    wanted "$case" || return 0
    for rep in $(seq "$REPS"); do
        for s in "${SERVERS[@]}"; do run "$case" "$s" "$rep" -- "$@"; done
    done
}

LOAD=(--duration "$DURATION" --warmup "$WARMUP")
echo "== $REPS repetition(s), $DURATION per run after $WARMUP warm-up; reports in $OUT" >&2
cut -d' ' -f1-3 /proc/loadavg >"$OUT/loadavg.start"
each c100-16B echo --connections 100 --in-flight 1 --size 16 "${LOAD[@]}"
each c100-1KiB echo --connections 100 --in-flight 1 --size 1024 "${LOAD[@]}"
each c100-64KiB echo --connections 100 --in-flight 1 --size 65536 "${LOAD[@]}"
each c1000-1KiB echo --connections 1000 --in-flight 1 --size 1024 "${LOAD[@]}"

if [ -z "$RATE" ] && wanted rate; then
    RATE=$(python3 - "$OUT" "$REPS" <<'EOF'
import json, statistics, sys
out, reps = sys.argv[1], int(sys.argv[2])
best = 0
for s in ("tungstenite", "fastws"):
    vals = []
    for r in range(1, reps + 1):
        try:
            vals.append(json.load(open(f"{out}/c100-1KiB.{s}.{r}.json"))["msgs_per_sec"])
        except (OSError, ValueError, KeyError):
            pass
    if vals:
        best = max(best, statistics.median(vals))
print(max(1000, round(best / 2 / 1000) * 1000))
EOF
)
fi
echo "${RATE:-0}" >"$OUT/rate"
each rate rate --rate "$RATE" --connections 100 --size 1024 "${LOAD[@]}"

each idle-10k idle --connections 10000 --hold "$HOLD"
# Both the server and the tool hold one fd per connection, plus a few: the most the limit
# allows, in thousands, at most 100,000 (the tool's own sources: it spreads over 127.0.0.x).
MAX_IDLE=$(( (HARD_FDS - 200) / 1000 * 1000 ))
[ "$MAX_IDLE" -le 100000 ] || MAX_IDLE=100000
echo "$MAX_IDLE" >"$OUT/idle-max"
if [ "$MAX_IDLE" -gt 10000 ]; then
    each idle-max idle --connections "$MAX_IDLE" --hold "$HOLD"
elif wanted idle-max; then
    echo "skipped: idle beyond 10,000 connections needs an fd hard limit above 11,200 (here: $HARD_FDS)" \
        | tee "$OUT/idle-max.skipped" >&2
fi

python3 - "$OUT" "$REPS" "${SERVERS[@]}" <<'EOF'
import glob, json, os, statistics, sys

out, reps, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
peers = ("tungstenite", "fastws")
rate = open(f"{out}/rate").read().strip()
max_idle = open(f"{out}/idle-max").read().strip()
medians = {}
cases = [
    ("c100-16B", "100 conn x 1, 16 B"),
    ("c100-1KiB", "100 conn x 1, 1 KiB"),
    ("c100-64KiB", "100 conn x 1, 64 KiB"),
    ("c1000-1KiB", "1,000 conn x 1, 1 KiB"),
    ("rate", f"rate {int(rate):,}/s, 100 conn, 1 KiB"),
    ("idle-10k", "idle 10,000 conn"),
    ("idle-max", f"idle {int(max_idle):,} conn (fd limit)"),
]

def get(d, *path):
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return d

def reports(case, server):
    """The reports of the runs without any error, and how many runs failed."""
    good, failed = [], 0
    for r in range(1, reps + 1):
        try:
            d = json.load(open(f"{out}/{case}.{server}.{r}.json"))
        except (OSError, ValueError):
            d = None  # no report at all: the run failed
        if d is None or get(d, "errors", "total"):
            failed += 1
        else:
            good.append(d)
    return good, failed

def median(good, *path):
    vals = [v for v in (get(d, *path) for d in good) if v is not None]
    return statistics.median(vals) if vals else None

def ratio(v, best):
    return f"{v / best:.2f}x" if v is not None and best else ""

def num(v, fmt="{:,.0f}"):
    return fmt.format(v) if v is not None else "-"

print(f"Load average before the run: {open(f'{out}/loadavg.start').read().strip()}, after: "
      f"{' '.join(open('/proc/loadavg').read().split()[:3])} (on {os.cpu_count()} CPUs)")
print(f"Medians of {reps} run(s) (runs with any error left out). Ratios are to the best of the two peers (tungstenite, fastws) in that column:")
print("msgs/s > 1 is faster; CPU us/msg, p99 and RSS/conn < 1 is cheaper. Tool CPU >= 90% flags a client-bound run.")
print()
print("| case | server | msgs/s | vs best peer | server CPU us/msg | vs best peer | p50 us | p99 us | p99 vs best peer | tool CPU | RSS B/conn | vs best peer | notes |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for case, label in cases:
    if not glob.glob(f"{out}/{case}.*"):
        continue  # not asked for (--cases)
    if os.path.exists(f"{out}/{case}.skipped"):
        print(f"| {label} | - | | | | | | | | | | | {open(f'{out}/{case}.skipped').read().strip()} |")
        continue
    runs = {s: reports(case, s) for s in servers}
    m = medians[case] = {s: {
        "mps": median(runs[s][0], "msgs_per_sec"),
        "cpu": median(runs[s][0], "server", "cpu_us_per_msg"),
        "p50": median(runs[s][0], "latency", "p50_us"),
        "p99": median(runs[s][0], "latency", "p99_us"),
        "tool": median(runs[s][0], "client_cpu", "percent_of_core"),
        "rss": median(runs[s][0], "server", "bytes_per_connection"),
    } for s in servers}
    def best(key, pick):
        vals = [m[p][key] for p in peers if m[p][key] is not None]
        return pick(vals) if vals else None
    b_mps, b_cpu, b_p99, b_rss = best("mps", max), best("cpu", min), best("p99", min), best("rss", min)
    for s in servers:
        v = m[s]
        notes = []
        if v["tool"] is not None and v["tool"] >= 90:
            notes.append("client-bound")
        srv = median(runs[s][0], "server", "cpu", "percent_of_core")
        if case.startswith("c") and srv is not None and v["tool"] is not None and srv < 80 and v["tool"] < 80:
            # A closed loop with both sides well below a core each: other processes had the CPUs.
            notes.append(f"CPU contended (server {srv:.0f}%): msgs/s and latency not comparable")
        if s == "ringway-relay":
            notes.append("relay thread shares CPU 0")
        failed = runs[s][1]
        if failed:
            notes.append(f"{failed} of {reps} runs FAILED (errors; left out of the medians)")
        print(f"| {label} | {s} | {num(v['mps'])} | {ratio(v['mps'], b_mps)} | {num(v['cpu'], '{:.2f}')} "
              f"| {ratio(v['cpu'], b_cpu)} | {num(v['p50'])} | {num(v['p99'])} | {ratio(v['p99'], b_p99)} "
              f"| {num(v['tool'], '{:.0f}%')} | {num(v['rss'])} | {ratio(v['rss'], b_rss)} | {', '.join(notes)} |")
json.dump(medians, open(f"{out}/medians.json", "w"), indent=1)
EOF

# The chart of CPU per message and RSS per idle connection, from those medians.
python3 - "$OUT" "$CHART" "${SERVERS[@]}" <<'EOF'
import html, json, sys
out, chart, servers = sys.argv[1], sys.argv[2], sys.argv[3:]
medians = json.load(open(f"{out}/medians.json"))
max_idle = open(f"{out}/idle-max").read().strip()
colors = {"ringway-local": "#1f6feb", "ringway-relay": "#79b8ff", "tungstenite": "#d29922", "fastws": "#8b949e"}
panels = [
    ("Server CPU per echoed message (us, lower is better)", "cpu",
     [("c100-16B", "100 x 16 B"), ("c100-1KiB", "100 x 1 KiB"), ("c100-64KiB", "100 x 64 KiB"), ("c1000-1KiB", "1,000 x 1 KiB")]),
    ("RSS per idle connection (bytes, lower is better)", "rss",
     [("idle-10k", "10,000 idle"), ("idle-max", f"{int(max_idle):,} idle (fd limit)")]),
]
W, PH, TOP, LEFT = 860, 260, 40, 60
svg = []
y0 = TOP
for title, key, cases in panels:
    cases = [(c, l) for c, l in cases if c in medians]
    if not cases:
        continue
    vals = [medians[c][s][key] for c, _ in cases for s in servers if medians[c][s][key] is not None]
    top = max(vals) * 1.15 if vals else 1
    svg.append(f'<text x="{LEFT}" y="{y0 - 12}" font-size="15" font-weight="bold">{html.escape(title)}</text>')
    base = y0 + PH - 40
    svg.append(f'<line x1="{LEFT}" y1="{base}" x2="{W - 20}" y2="{base}" stroke="#444"/>')
    group = (W - LEFT - 20) / len(cases)
    bar = min(40, (group - 20) / len(servers))
    for i, (case, label) in enumerate(cases):
        gx = LEFT + i * group + (group - bar * len(servers)) / 2
        for j, s in enumerate(servers):
            v = medians[case][s][key]
            if v is None:
                continue
            h = (PH - 70) * v / top
            x = gx + j * bar
            text = f"{v:.1f}" if key == "cpu" else f"{v:,.0f}"
            svg.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{bar - 3:.1f}" height="{h:.1f}" fill="{colors.get(s, "#666")}"><title>{s} {label}: {text}</title></rect>')
            svg.append(f'<text x="{x + (bar - 3) / 2:.1f}" y="{base - h - 4:.1f}" font-size="10" text-anchor="middle">{text}</text>')
        svg.append(f'<text x="{LEFT + i * group + group / 2:.1f}" y="{base + 18}" font-size="12" text-anchor="middle">{html.escape(label)}</text>')
    y0 += PH + 30
legend = "".join(
    f'<rect x="{LEFT + k * 170}" y="{y0 - 10}" width="12" height="12" fill="{colors.get(s, "#666")}"/>'
    f'<text x="{LEFT + k * 170 + 18}" y="{y0}" font-size="12">{html.escape(s)}</text>'
    for k, s in enumerate(servers))
stamp = html.escape(open(f"{out}/stamp").read().strip())
height = y0 + 30
open(chart, "w").write(
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif">'
    f'<rect width="100%" height="100%" fill="white"/>' + "".join(svg) + legend +
    f'<text x="{LEFT}" y="{height - 8}" font-size="11" fill="#555">benches/compare.sh, {stamp}; medians, each server on one core</text></svg>\n')
print(f"chart: {chart}")
EOF
