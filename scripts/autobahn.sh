#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzingclient (RFC 6455 conformance) against a ringway echo server.
#
# usage: scripts/autobahn.sh [--binary PATH] [--quick] [--timeout SECS] [--spec FILE] [--name NAME] [--tls] [-- EXTRA_SERVER_ARGS...]
#   --binary PATH   server binary (default target/release/ringway), started as
#                   PATH --listen 127.0.0.1:PORT --upstream echo EXTRA_SERVER_ARGS...
#   --quick         small subset (framing, pings, reserved bits, opcodes, fragmentation, basic close) for iteration
#   --timeout SECS  wall-clock cap for wstest (default 1200 full, 180 quick)
#   --spec FILE     spec template (default tests/autobahn/fuzzingclient.json: 12.* / 13.* excluded;
#                   tests/autobahn/fuzzingclient-deflate.json runs them, with --compression shared)
#   --name NAME     report and run directory name (default autobahn), so two runs can go in parallel
#   --strict        also fail on NON-STRICT, UNIMPLEMENTED and WRONG CODE (the deflate run uses it)
#   --tls           wss://: a self-signed certificate for 127.0.0.1/localhost is made (openssl CLI),
#                   the server also gets --listen-tls/--tls-cert/--tls-key, and wstest connects
#                   to the TLS listener (via pyOpenSSL in its venv; it does not verify the certificate)
# Artifact: reports/NAME/index.html (+ index.json, per-case JSON/HTML, server.log, wstest.log).
# Exit status: 0 only if no case FAILED (behavior or close behavior), wstest finished in time, every case ran,
# and the server stayed alive.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BINARY="target/release/ringway"
QUICK=0
TIMEOUT=""
TEMPLATE="$ROOT/tests/autobahn/fuzzingclient.json"
NAME="autobahn"
STRICT=0
TLS=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY="$2"; shift 2 ;;
    --binary=*) BINARY="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --timeout=*) TIMEOUT="${1#*=}"; shift ;;
    --spec) TEMPLATE="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --strict) STRICT=1; shift ;;
    --tls) TLS=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "autobahn: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$TIMEOUT" ] || { [ "$QUICK" = 1 ] && TIMEOUT=180 || TIMEOUT=1200; }

log() { printf 'autobahn: %s\n' "$*"; }
fail() { printf 'autobahn: ERROR: %s\n' "$*" >&2; echo "autobahn: 0 passed, 1 failed"; exit 1; }

WSTEST="$ROOT/.autobahn/venv/bin/wstest"
if [ ! -x "$WSTEST" ]; then
  log "wstest not installed; running scripts/setup-test-deps.sh"
  "$ROOT/scripts/setup-test-deps.sh"
fi
[ -x "$BINARY" ] || fail "server binary '$BINARY' not found or not executable (build it: cargo build --release)"
BINARY="$(cd "$(dirname "$BINARY")" && pwd)/$(basename "$BINARY")"

OUTDIR="$ROOT/reports/$NAME"
RUNDIR="$ROOT/.autobahn/run-$NAME"
rm -rf "$OUTDIR"   # a stale index.json must never be mistaken for this run's result
mkdir -p "$OUTDIR" "$RUNDIR"
SERVER_LOG="$OUTDIR/server.log"
WSTEST_LOG="$OUTDIR/wstest.log"
SPEC="$RUNDIR/fuzzingclient.json"

SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
TLS_ARGS=()
if [ "$TLS" = 1 ]; then
  # A throwaway ECDSA P-256 certificate, valid two days, for the names wstest connects to.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$RUNDIR/key.pem" -out "$RUNDIR/cert.pem" 2>"$RUNDIR/openssl.log" \
    || fail "openssl could not make a test certificate (log: $RUNDIR/openssl.log)"
  "$ROOT/.autobahn/venv/bin/python" -c 'import OpenSSL, service_identity' 2>/dev/null \
    || fail "wstest's venv lacks pyOpenSSL/service_identity (run scripts/setup-test-deps.sh)"
  TLS_PORT="$(free_port)"
  TLS_ARGS=(--listen-tls "127.0.0.1:$TLS_PORT" --tls-cert "$RUNDIR/cert.pem" --tls-key "$RUNDIR/key.pem")
fi
log "starting $BINARY --listen 127.0.0.1:$PORT --admin 127.0.0.1:0 --upstream echo ${TLS_ARGS[*]:-} ${EXTRA[*]:-}"
"$BINARY" --listen "127.0.0.1:$PORT" --admin 127.0.0.1:0 --upstream echo "${TLS_ARGS[@]}" "${EXTRA[@]}" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

# Wait (max 10 s) until the port accepts a TCP connection.
ready=0
for _ in $(seq 100); do
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 20 "$SERVER_LOG" >&2; fail "server exited during startup (log: $SERVER_LOG)"; }
  if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()' "$PORT" 2>/dev/null; then
    ready=1; break
  fi
  sleep 0.1
done
[ "$ready" = 1 ] || fail "server did not accept connections on 127.0.0.1:$PORT within 10 s (log: $SERVER_LOG)"
log "server pid $SERVER_PID listening on 127.0.0.1:$PORT"
if [ "$TLS" = 1 ]; then
  # Every core listens on both before the start-up line; check the TLS port all the same.
  python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2).close()' "$TLS_PORT" \
    || fail "server does not accept connections on its TLS port 127.0.0.1:$TLS_PORT (log: $SERVER_LOG)"
  log "wstest connects to wss://127.0.0.1:$TLS_PORT"
fi

if [ "$QUICK" = 1 ]; then
  CASES='["1.*", "2.*", "3.*", "4.*", "5.*", "7.1.*"]'
else
  CASES=''
fi
python3 - "$TEMPLATE" "$SPEC" "$PORT" "$OUTDIR" "$CASES" "${TLS_PORT:-}" <<'PY'
import json, sys
template, out, port, outdir, cases, tls_port = sys.argv[1:7]
spec = json.load(open(template))
for s in spec["servers"]:
    if tls_port:
        s["url"] = s["url"].replace("ws://", "wss://").replace("PORT", tls_port)
    else:
        s["url"] = s["url"].replace("PORT", port)
spec["outdir"] = outdir
if cases:
    spec["cases"] = json.loads(cases)
json.dump(spec, open(out, "w"), indent=2)
PY
log "spec $SPEC: cases $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["cases"], "excluding", d["exclude-cases"])' "$SPEC")"

log "running wstest -m fuzzingclient (timeout ${TIMEOUT}s, log: $WSTEST_LOG)"
start=$(date +%s)
set +e
# wstest must run from a writable cwd; it hangs on a failed handshake without an agent name, hence agent + timeout.
(cd "$RUNDIR" && timeout --kill-after=10 "$TIMEOUT" "$WSTEST" -m fuzzingclient -s "$SPEC") >"$WSTEST_LOG" 2>&1
WSTEST_RC=$?
set -e
elapsed=$(( $(date +%s) - start ))
log "wstest finished in ${elapsed}s (exit $WSTEST_RC)"

SERVER_ALIVE=1
kill -0 "$SERVER_PID" 2>/dev/null || SERVER_ALIVE=0

python3 - "$OUTDIR" "$WSTEST_LOG" "$WSTEST_RC" "$SERVER_ALIVE" "$SERVER_LOG" "$STRICT" <<'PY'
import ast, json, os, re, sys
outdir, wstest_log, rc, alive, server_log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
strict = sys.argv[6] == "1"
problems = []
if rc in (124, 137):
    problems.append("wstest timed out (exit %d)" % rc)
elif rc != 0:
    problems.append("wstest exited with status %d" % rc)
if not alive:
    problems.append("server process died during the run (log: %s)" % server_log)

def key(cid):
    return tuple(int(p) for p in cid.split("."))

# wstest prints the resolved case list; used to detect cases that never ran (e.g. after a refused connection).
expected = None
log_text = open(wstest_log, errors="replace").read()
m = re.search(r"^Cases = (\[.*\])$", log_text, re.M)
if m:
    expected = set(ast.literal_eval(m.group(1)))

index_path = os.path.join(outdir, "index.json")
results = {}
if os.path.exists(index_path):
    index = json.load(open(index_path))
    results = index.get("ringway") or (next(iter(index.values())) if index else {})
else:
    problems.append("no %s written" % index_path)

# behavior: OK / NON-STRICT / INFORMATIONAL / UNIMPLEMENTED / FAILED.
# behaviorClose: OK / INFORMATIONAL / WRONG CODE (non-strict) / UNCLEAN, FAILED (failed) / FAILED BY CLIENT (n/a).
order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
counts = dict.fromkeys(order, 0)
close_counts = {}
failed, nonstrict = [], []
for cid in sorted(results, key=key):
    r = results[cid]
    b, bc = r.get("behavior", "FAILED"), r.get("behaviorClose", "FAILED")
    counts[b if b in counts else "FAILED"] += 1
    close_counts[bc] = close_counts.get(bc, 0) + 1
    desc = ""
    try:
        rep = json.load(open(os.path.join(outdir, r["reportfile"])))
        desc = re.sub(r"<[^>]+>", "", rep.get("description", ""))
        desc = " ".join(desc.split())
        if len(desc) > 110:
            desc = desc[:107] + "..."
    except Exception:
        pass
    line = "  %-9s behavior=%s close=%s code=%s  %s" % (cid, b, bc, r.get("remoteCloseCode"), desc)
    lenient = ("OK", "INFORMATIONAL") if strict else ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED")
    if b not in lenient or bc in ("FAILED", "UNCLEAN") or (strict and bc == "WRONG CODE"):
        failed.append(line)
    elif b == "NON-STRICT" or bc == "WRONG CODE":
        nonstrict.append(line)

missing = sorted(expected - set(results), key=key) if expected is not None else []
if expected is None:
    problems.append("could not read the case list from %s" % wstest_log)
if missing:
    problems.append("%d case(s) never ran: %s%s" % (len(missing), " ".join(missing[:20]), " ..." if len(missing) > 20 else ""))

print("autobahn: behavior   " + "  ".join("%s=%d" % (k, counts[k]) for k in order))
print("autobahn: close      " + "  ".join("%s=%d" % kv for kv in sorted(close_counts.items())))
if nonstrict:
    print("autobahn: NON-STRICT (passed, listed):")
    print("\n".join(nonstrict))
if failed:
    print("autobahn: FAILED:")
    print("\n".join(failed))
for p in problems:
    print("autobahn: ERROR: " + p)
print("autobahn: report %s" % os.path.join(os.path.relpath(outdir), "index.html"))
n_failed = len(failed) + len(missing)
n_passed = len(results) - len(failed)
if problems and n_failed == 0:
    n_failed = 1  # a run-level failure (timeout, dead server) must not read as green
print("autobahn: %d passed, %d failed" % (n_passed, n_failed))
sys.exit(1 if (failed or problems) else 0)
PY
