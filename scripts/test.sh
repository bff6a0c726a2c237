#!/usr/bin/env bash
# The whole test suite, as the README's quick start and CI run it:
#   structure (scripts/check-imports.py), formatting and lints, every unit and integration
#   test of the workspace (the gateway and bench/, release build), a short bounded fuzzing
#   run of the five targets that face untrusted bytes (when cargo-fuzz is installed; built in
#   the background while the tests run), beside which
#   the Autobahn|Testsuite RFC 6455 conformance runs in echo mode, over ws:// and over
#   wss:// (the TLS listener), go in the background. A third Autobahn run, of
#   the permessage-deflate cases 12.* and 13.* against `--compression shared`, starts in the
#   background as soon as the binary is built (8-14 min of one core's Python) and is
#   waited for at the end, with its own wall time. The Debian package is built from the ci
#   binary and checked (scripts/package-check.sh) while that run finishes; cargo-deb, its
#   tool, is installed (when missing) in the background beside the fuzzing.
# Installs what the tests need first (idempotent; see scripts/setup-test-deps.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Each part's wall time is printed when it ends, and all of them (with the total) at exit,
# whether the suite passed or not.
SUITE_T0=$SECONDS STEP_NAME="" STEP_T0=0 TIMES=()
end_step() {
    if [ -n "$STEP_NAME" ]; then
        local dt=$((SECONDS - STEP_T0))
        TIMES+=("$(printf '%5d s  %s' "$dt" "$STEP_NAME")")
        printf '== %s: %d s\n' "$STEP_NAME" "$dt"
    fi
    STEP_NAME=""
}
step() { end_step; STEP_NAME="$*" STEP_T0=$SECONDS; printf '\n== %s\n' "$*"; }
summary() {
    local rc=$?
    # A failed step leaves no background run behind (autobahn.sh stops its own server).
    if [ -n "${DEFLATE_PID:-}" ] && kill -0 "$DEFLATE_PID" 2>/dev/null; then
        kill "$DEFLATE_PID" 2>/dev/null || true
    fi
    for p in "${AB_PID:-}" "${AB_TLS_PID:-}"; do
        if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then kill "$p" 2>/dev/null || true; fi
    done
    if [ -n "${CARGO_DEB_PID:-}" ] && kill -0 "$CARGO_DEB_PID" 2>/dev/null; then
        kill -- "-$CARGO_DEB_PID" 2>/dev/null || kill "$CARGO_DEB_PID" 2>/dev/null || true
    fi
    if [ -n "${FUZZ_BUILD_PID:-}" ] && kill -0 "$FUZZ_BUILD_PID" 2>/dev/null; then
        kill -- "-$FUZZ_BUILD_PID" 2>/dev/null || kill "$FUZZ_BUILD_PID" 2>/dev/null || true
    fi
    end_step
    printf '\n== wall time per part (%s)\n' "$([ "$rc" = 0 ] && echo passed || echo "FAILED, exit $rc")"
    printf '%s\n' "${TIMES[@]}"
    printf '%5d s  total\n' "$((SECONDS - SUITE_T0))"
}
trap summary EXIT

step "test dependencies"
bash scripts/setup-test-deps.sh

step "structure: no import circle in src/, no file over 1,200 lines, unsafe only where allowed"
python3 scripts/check-imports.py --self-test
python3 scripts/check-imports.py

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo build --profile ci (the binary both Autobahn runs serve)"
cargo build --profile ci

# Autobahn 12.* / 13.* (permessage-deflate) in the background: report and log of their own.
mkdir -p reports
DEFLATE_LOG="$ROOT/reports/autobahn-deflate.log"
DEFLATE_T0=$SECONDS
bash scripts/autobahn.sh --binary target/ci/ringway --timeout 2400 --strict \
    --spec tests/autobahn/fuzzingclient-deflate.json --name autobahn-deflate \
    -- --max-message 16777216 --max-fragments 0 --compression shared >"$DEFLATE_LOG" 2>&1 &
DEFLATE_PID=$!
printf 'Autobahn 12.*/13.* (--compression shared) running in the background (pid %d, log %s)\n' \
    "$DEFLATE_PID" "$DEFLATE_LOG"

# The fuzz targets (their own workspace and target folder, the gateway and rustls built
# again with coverage instrumentation: ~4 min of CPU) build in the background while the
# tests run, much of which is waiting on sockets and timers; the fuzz step waits for it.
FUZZ_BUILD_LOG="$ROOT/reports/fuzz-build.log"
bash scripts/fuzz.sh --build-only >"$FUZZ_BUILD_LOG" 2>&1 &
FUZZ_BUILD_PID=$!

# Lints after the binary is built: the deflate Autobahn run (the suite's longest part)
# starts ~80 s sooner, and clippy's check build shares nothing with `cargo build` anyway.
step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --profile ci --workspace --all-targets -- -D warnings

step "cargo test --profile ci --workspace (the gateway, and the load tool in bench/; release code without LTO)"
cargo test --profile ci --workspace
# tests/demo_page.rs screenshots the demo page as two browsers chat through it.
if [ -f target/tmp/demo-page.png ]; then
    printf 'demo page screenshot (CI artifact): %s\n' "$ROOT/target/tmp/demo-page.png"
fi

# The two conformance runs without compression (ws:// and wss://, ~25 s of one core's Python
# each) go in the background beside the fuzzing, which is bounded in time, not work: nothing
# timing-bound runs beside them any more.
AB_LOG="$ROOT/reports/autobahn.log" AB_TLS_LOG="$ROOT/reports/autobahn-tls.log" AB_T0=$SECONDS
bash scripts/autobahn.sh --binary target/ci/ringway -- --max-message 16777216 --max-fragments 0 \
    >"$AB_LOG" 2>&1 &
AB_PID=$!
# The same cases over wss:// against the TLS listener (self-signed certificate made by the script).
bash scripts/autobahn.sh --binary target/ci/ringway --tls --name autobahn-tls \
    -- --max-message 16777216 --max-fragments 0 >"$AB_TLS_LOG" 2>&1 &
AB_TLS_PID=$!

# cargo-deb for the package check (a 40-80 s build of its own when missing; nothing when it is
# there), niced, beside the fuzzing, which is bounded in time: it takes what CPU is left.
CARGO_DEB_LOG="$ROOT/reports/cargo-deb-install.log" CARGO_DEB_T0=$SECONDS
nice -n 10 bash scripts/setup-test-deps.sh --cargo-deb >"$CARGO_DEB_LOG" 2>&1 &
CARGO_DEB_PID=$!

step "fuzzing: handshake, frames, relay, connection, tls_session (15 s each)"
set +e
wait "$FUZZ_BUILD_PID"
FUZZ_BUILD_RC=$?
set -e
if [ "$FUZZ_BUILD_RC" != 0 ]; then
    tail -40 "$FUZZ_BUILD_LOG"
    echo "fuzz: building the targets failed (log: $FUZZ_BUILD_LOG)"
    exit 1
fi
bash scripts/fuzz.sh "${RINGWAY_FUZZ_SECONDS:-15}"

# Waits for background Autobahn run $1 (pid $2, log $3) and shows its log; fails with it.
wait_autobahn() {
    local rc
    set +e
    wait "$2"
    rc=$?
    set -e
    cat "$3"
    printf '%s wall time: %d s (beside the fuzzing)\n' "$1" "$((SECONDS - AB_T0))"
    return "$rc"
}
step "Autobahn|Testsuite fuzzingclient (all cases but 12.* and 13.*: compression is not offered; started after the tests)"
wait_autobahn "Autobahn ws://" "$AB_PID" "$AB_LOG"

step "Autobahn|Testsuite fuzzingclient over wss:// (TLS listener; all cases but 12.* and 13.*; started after the tests)"
wait_autobahn "Autobahn wss://" "$AB_TLS_PID" "$AB_TLS_LOG"

# While the deflate run (one core) finishes: package the ci binary (no release/LTO rebuild)
# and check the .deb without installing it.
step "Debian package: cargo deb --no-build --profile ci, checked with dpkg-deb and systemd-analyze (scripts/package-check.sh)"
set +e
wait "$CARGO_DEB_PID"
CARGO_DEB_RC=$?
set -e
cat "$CARGO_DEB_LOG"
printf 'cargo-deb (installed in the background from the fuzzing on) ready after %d s\n' "$((SECONDS - CARGO_DEB_T0))"
if [ "$CARGO_DEB_RC" != 0 ]; then
    echo "package: installing cargo-deb failed (log: $CARGO_DEB_LOG)"
    exit 1
fi
bash scripts/package-check.sh --profile ci

step "Autobahn|Testsuite 12.* and 13.* (permessage-deflate, --compression shared; started after the build)"
set +e
wait "$DEFLATE_PID"
DEFLATE_RC=$?
set -e
cat "$DEFLATE_LOG"
printf 'Autobahn 12.*/13.* wall time: %d s (in parallel with the steps above)\n' \
    "$((SECONDS - DEFLATE_T0))"
[ "$DEFLATE_RC" = 0 ]
