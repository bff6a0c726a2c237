#!/usr/bin/env bash
# Short, bounded fuzzing of what faces untrusted bytes: the handshake parser, the
# frame/message decoder, the relay protocol decoder, and a whole connection (handshake,
# admission policy with Origin and JWT, 101, frames, routing key), and one over TLS (records
# into a session's rustls transport, then the same frame path). Seeds come from
# fuzz/corpus/<target>/ (kept clean: new inputs go to a scratch folder). Any crash fails
# the run; its input is left in fuzz/artifacts/<target>/ to be kept as a regression test.
#
# usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 20; env RINGWAY_FUZZ_SECONDS too)
#        scripts/fuzz.sh --build-only            (build every target, run none: test.sh starts
#                                                  this in the background beside the tests)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_ONLY=0
if [ "${1:-}" = --build-only ]; then BUILD_ONLY=1; shift; fi
SECS="${1:-${RINGWAY_FUZZ_SECONDS:-20}}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz); skipping"
  exit 0
fi
cd "$ROOT/fuzz"
# Stable Rust: RUSTC_BOOTSTRAP lets the sanitizer flags through.
export RUSTC_BOOTSTRAP=1
if [ "$BUILD_ONLY" = 1 ]; then
  exec cargo fuzz build --sanitizer "${RINGWAY_FUZZ_SANITIZER:-none}"
fi
passed=0; failed=0
for target in handshake frames relay connection tls_session; do
  scratch="$(mktemp -d)"
  echo "fuzz: $target for ${SECS}s"
  if timeout $((SECS + 600)) cargo fuzz run --sanitizer "${RINGWAY_FUZZ_SANITIZER:-none}" "$target" "$scratch" "corpus/$target" -- \
       -max_total_time="$SECS" -max_len=20000 -print_final_stats=1 > "$scratch.log" 2>&1; then
    grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$scratch.log" | tail -1 | sed "s/^/fuzz: $target: /"
    passed=$((passed + 1))
  else
    grep -E "panicked|ERROR|SUMMARY|deadly|Test unit written" "$scratch.log" | head -20; tail -60 "$scratch.log"
    echo "fuzz: $target FAILED; the crashing input is in fuzz/artifacts/$target/"
    failed=$((failed + 1))
  fi
  rm -rf "$scratch" "$scratch.log"
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" = 0 ]
