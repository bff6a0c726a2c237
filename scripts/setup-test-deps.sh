#!/usr/bin/env bash
# Installs everything the test suite needs beyond the Rust toolchain. Idempotent: a repeat run checks stamps and exits.
#   .autobahn/venv      CPython 2.7 virtualenv with Autobahn|Testsuite (wstest), pins in tests/autobahn/requirements-py27.txt
#   .autobahn/bootstrap Python 3 venv holding virtualenv<20.22 (the last line that can create 2.7 environments)
#   .venv-py3           Python 3 venv with `websockets` (independent client) and `nats-py` (examples/chat_backend_nats.py),
#                       pins in tests/autobahn/requirements-py3.txt; a symlinked .venv-py3 is rebuilt where it points
#   tests/peers/node_modules  Node `ws` + playwright-core (pins in tests/peers/package-lock.json); nodejs, npm, chromium from Debian
#   cargo-deb           only with `--cargo-deb` (then nothing else): the package check's tool (scripts/package-check.sh),
#                       pinned below; a 40-80 s build that scripts/test.sh starts in the background, off the critical path
# Env overrides: PY27=/path/to/python2.7, PY3=/path/to/python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REQ27="tests/autobahn/requirements-py27.txt"
REQ3="tests/autobahn/requirements-py3.txt"
REQBOOT="tests/autobahn/requirements-bootstrap.txt"
AB_DIR=".autobahn"
VENV27="$AB_DIR/venv"
BOOT="$AB_DIR/bootstrap"
# A worktree may link .venv-py3 to a shared venv: rebuild that one, never just drop the link.
VENV3=".venv-py3"
[ -L "$VENV3" ] && VENV3="$(readlink -f "$VENV3")"
STAMP=".ringway-setup-stamp"

log() { printf 'setup-test-deps: %s\n' "$*"; }
die() { printf 'setup-test-deps: ERROR: %s\n' "$*" >&2; exit 1; }

# cargo-deb for scripts/package-check.sh: `cargo deb --no-build` packages the binary cargo built.
# Idempotent: installs only when `cargo deb --version` is not the pinned version. Its own
# throwaway target folder (never a CARGO_TARGET_DIR set for the gateway's builds).
CARGO_DEB_VERSION=3.8.0
if [ "${1:-}" = --cargo-deb ]; then
  if [ "$(cargo deb --version 2>/dev/null)" = "cargo-deb $CARGO_DEB_VERSION" ]; then
    log "cargo-deb $CARGO_DEB_VERSION up to date"
  else
    t0=$SECONDS
    log "cargo install cargo-deb@$CARGO_DEB_VERSION (40-80 s on 2 cores)"
    env -u CARGO_TARGET_DIR cargo install --locked --quiet --force "cargo-deb@$CARGO_DEB_VERSION" \
      || die "cargo install cargo-deb@$CARGO_DEB_VERSION failed"
    [ "$(cargo deb --version 2>/dev/null)" = "cargo-deb $CARGO_DEB_VERSION" ] \
      || die "cargo deb --version is not $CARGO_DEB_VERSION after the install: $(cargo deb --version 2>&1)"
    log "cargo-deb $CARGO_DEB_VERSION installed in $((SECONDS - t0)) s"
  fi
  exit 0
fi
[ $# = 0 ] || die "unknown argument: $1 (the only one is --cargo-deb)"

APT_UPDATED=0
# Installs Debian packages only when the given command is missing; `apt-get update` only when an install is needed.
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get is unavailable; install by hand: $*"
  [ "$(id -u)" = 0 ] || die "not root; install by hand: $*"
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update (needed to install: $*)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install -y $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
need_cmd_or_apt() {
  local cmd="$1"; shift
  command -v "$cmd" >/dev/null 2>&1 || apt_install "$@"
}

# Stamp = hash of the requirements file(s) + interpreter version: a change in either forces a reinstall.
stamp_of() { { cat "$@"; "$PYBIN" -c 'import sys; print(sys.version)' 2>&1; } | sha256sum | cut -d' ' -f1; }
# Whether the venv at $1 was built for stamp $2.
stamp_matches() { [ -f "$1/$STAMP" ] && [ "$(cat "$1/$STAMP")" = "$2" ]; }

find_py27() {
  local c
  for c in "${PY27:-}" "$(command -v pyenv >/dev/null 2>&1 && echo "$(pyenv root)/versions/2.7.18/bin/python")" \
           /root/.pyenv/versions/2.7.18/bin/python "${PYENV_ROOT:-/root/.pyenv}"/versions/2.7*/bin/python \
           "$(command -v python2.7 || true)"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' 2>/dev/null && { echo "$c"; return 0; }
  done
  return 1
}

find_py3() {
  local c
  for c in "${PY3:-}" "$(command -v python3 || true)" /usr/bin/python3; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null && { echo "$c"; return 0; }
  done
  return 1
}

# Makes a Python 3 venv at $1 with interpreter $2; installs python3-venv via apt if the stdlib venv module is broken.
make_py3_venv() {
  local dir="$1" py="$2"
  mkdir -p "$(dirname "$dir")"
  if ! "$py" -m venv "$dir" >/dev/null 2>&1; then
    rm -rf "$dir"
    [ "$py" = /usr/bin/python3 ] || die "'$py -m venv' failed"
    apt_install "$("$py" -c 'import sys; print("python3.%d-venv" % sys.version_info[1])')"
    "$py" -m venv "$dir"
  fi
}

t0=$(date +%s)

# --- Python 3 interpreter (for the bootstrap and the websockets venv) ---
PY3BIN="$(find_py3 || true)"
if [ -z "$PY3BIN" ]; then
  need_cmd_or_apt python3 python3 python3-venv
  PY3BIN="$(find_py3)" || die "no Python >= 3.9 found"
fi

# --- Autobahn|Testsuite in a Python 2.7 virtualenv ---
PY27BIN="$(find_py27)" || die "CPython 2.7 not found (looked at \$PY27, pyenv 2.7.x, python2.7 on PATH). Debian 12 ships no python2; this image provides it under pyenv."
PYBIN="$PY27BIN"
want27="$(stamp_of "$REQ27")"
if [ -x "$VENV27/bin/wstest" ] && stamp_matches "$VENV27" "$want27" \
   && "$VENV27/bin/python" -c 'import autobahntestsuite, OpenSSL, service_identity' 2>/dev/null; then
  log "wstest up to date ($VENV27, $("$VENV27/bin/wstest" -a 2>/dev/null | tr '\n' ' '))"
else
  log "building $VENV27 from $REQ27 with $PY27BIN"
  need_cmd_or_apt gcc gcc   # wsaccel is compiled from source
  PYBIN="$PY3BIN"
  wantboot="$(stamp_of "$REQBOOT")"
  if ! { [ -x "$BOOT/bin/virtualenv" ] && stamp_matches "$BOOT" "$wantboot"; }; then
    log "creating bootstrap venv $BOOT (virtualenv for 2.7) with $PY3BIN"
    rm -rf "$BOOT"
    make_py3_venv "$BOOT" "$PY3BIN"
    "$BOOT/bin/python" -m pip install -q --disable-pip-version-check -r "$REQBOOT"
    echo "$wantboot" > "$BOOT/$STAMP"
  fi
  rm -rf "$VENV27"
  "$BOOT/bin/virtualenv" -q -p "$PY27BIN" "$VENV27"
  log "pip install -r $REQ27 (Python 2.7; takes ~30 s)"
  PYTHONWARNINGS=ignore "$VENV27/bin/python" -m pip install -q --disable-pip-version-check --no-python-version-warning \
    -r "$REQ27" 2>&1 | grep -v -E 'DEPRECATION|^$' || true
  "$VENV27/bin/python" -c 'import autobahntestsuite' || die "autobahntestsuite failed to install into $VENV27"
  # The wss:// run (scripts/autobahn.sh --tls) needs Twisted's TLS: pyOpenSSL and service_identity.
  PYTHONWARNINGS=ignore "$VENV27/bin/python" -c 'import OpenSSL, service_identity' \
    || die "pyOpenSSL/service_identity failed to install into $VENV27 (wss:// Autobahn run)"
  [ -x "$VENV27/bin/wstest" ] || die "wstest missing after install"
  PYBIN="$PY27BIN"
  echo "$want27" > "$VENV27/$STAMP"
  log "installed: $("$VENV27/bin/wstest" -a 2>/dev/null | tr '\n' ' ')"
fi
# OpenSSL's SHA-1 for wstest where this 2.7 lacks _hashlib (tests/autobahn/ringway_fast_sha1.py):
# about a quarter less CPU for the 12.*/13.* run. Copied every time (cheap, and idempotent).
SITE27="$("$VENV27/bin/python" -c 'import distutils.sysconfig as s; print(s.get_python_lib())')"
cp tests/autobahn/ringway_fast_sha1.py "$SITE27/ringway_fast_sha1.py"
echo 'import ringway_fast_sha1' > "$SITE27/ringway_fast_sha1.pth"
"$VENV27/bin/python" -c 'import hashlib; assert hashlib.sha1(b"abc").hexdigest() == "a9993e364706816aba3e25717850c26c9cd0d89d"; c = hashlib.sha1(b"a"); c.update(b"bc"); assert c.copy().hexdigest() == "a9993e364706816aba3e25717850c26c9cd0d89d"' \
  || die "the SHA-1 shim in $VENV27 gives wrong digests"

# --- Python 3 websockets venv ---
PYBIN="$PY3BIN"
want3="$(stamp_of "$REQ3")"
if [ -x "$VENV3/bin/python" ] && stamp_matches "$VENV3" "$want3" \
   && "$VENV3/bin/python" -c 'import websockets, prometheus_client, nats' 2>/dev/null; then
  log "$VENV3 up to date (websockets $("$VENV3/bin/python" -c 'import websockets; print(websockets.__version__)'))"
else
  log "building $VENV3 from $REQ3 with $PY3BIN"
  rm -rf "$VENV3"
  make_py3_venv "$VENV3" "$PY3BIN"
  echo '*' > "$VENV3/.gitignore"   # keep the venv out of git without touching the repo's .gitignore
  "$VENV3/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ3"
  echo "$want3" > "$VENV3/$STAMP"
  log "installed websockets $("$VENV3/bin/python" -c 'import websockets; print(websockets.__version__)'), nats-py $("$VENV3/bin/python" -c 'import importlib.metadata as m; print(m.version("nats-py"))')"
fi

# --- JS peers for tests/deflate_peers.rs (tests/peers): Node ws, and headless Chromium via playwright-core ---
# Debian packages only when missing (nodejs and npm are separate packages on Debian; a NodeSource
# nodejs brings npm itself). `npm ci` only when package-lock.json changed (stamp = its hash +
# node's version); playwright-core downloads no browser: the tests use /usr/bin/chromium.
need_cmd_or_apt node nodejs
need_cmd_or_apt npm npm
need_cmd_or_apt chromium chromium
PEERS="tests/peers"
want_js="$({ cat "$PEERS/package-lock.json"; node --version; } | sha256sum | cut -d' ' -f1)"
if [ -d "$PEERS/node_modules/ws" ] && [ -d "$PEERS/node_modules/playwright-core" ] \
   && stamp_matches "$PEERS/node_modules" "$want_js"; then
  log "$PEERS/node_modules up to date"
else
  log "npm ci in $PEERS"
  (cd "$PEERS" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error) \
    || die "npm ci in $PEERS failed"
  echo "$want_js" > "$PEERS/node_modules/$STAMP"
fi

command -v timeout >/dev/null 2>&1 || need_cmd_or_apt timeout coreutils
need_cmd_or_apt systemd-analyze systemd   # tests/deploy.rs verifies the unit
# benches/deflate.rs measures stock zlib through libz-sys, which links the system libz
# (clippy --all-targets builds the benches too).
[ -f /usr/include/zlib.h ] || apt_install zlib1g-dev
# tests/cluster.rs starts its own nats-server per test on an ephemeral 127.0.0.1 port.
need_cmd_or_apt nats-server nats-server

# cargo-fuzz, so the test command's short fuzzing runs happen (it skips them without it);
# libFuzzer is C++. One build, about 2 minutes; RINGWAY_NO_FUZZ=1 skips it.
if [ "${RINGWAY_NO_FUZZ:-0}" != 1 ] && ! cargo fuzz --version >/dev/null 2>&1; then
  need_cmd_or_apt g++ g++
  log "cargo install cargo-fuzz (about 2 minutes)"
  cargo install --locked --quiet cargo-fuzz@0.13.2 || die "cargo install cargo-fuzz failed"
fi

log "done in $(( $(date +%s) - t0 )) s"
