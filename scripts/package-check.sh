#!/usr/bin/env bash
# Builds the Debian package (`cargo deb`, configured in Cargo.toml's [package.metadata.deb])
# from an already built binary and checks what is in it, without installing anything on
# this machine:
#   - deploy/debian/ringway.service is deploy/ringway.service through deploy/debian/unit.sed;
#   - the .deb's metadata (name, version, architecture, Depends), its exact file list with
#     modes and owners, every file byte for byte against its source (the binary: it runs);
#   - /etc/ringway/ringway.toml is the one conffile; the maintainer scripts parse (sh -n),
#     create the `ringway` user before they start the unit, enable it, start it on install
#     and restart it on upgrade (not stopped first), stop it on removal;
#   - the unpacked unit passes `systemd-analyze verify` with no warning (its ExecStart pointed
#     at the unpacked /usr/bin/ringway: verify wants the binary to exist),
#     and systemd-sysusers would create the system user `ringway` from the unpacked file;
#   - the unpacked binary accepts the unpacked configuration (`ringway check-config`).
# Usage: scripts/package-check.sh [--profile PROFILE]   (default: ci, the test suite's build;
#   the binary is $CARGO_TARGET_DIR/PROFILE/ringway, built beforehand: cargo build --profile ci)
# Needs cargo-deb (bash scripts/setup-test-deps.sh --cargo-deb), dpkg-deb and systemd-analyze.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$SECONDS

PROFILE=ci
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) PROFILE="$2"; shift 2 ;;
        *) echo "usage: $0 [--profile PROFILE]" >&2; exit 2 ;;
    esac
done

FAILS=0
fail() { printf 'package-check: FAIL: %s\n' "$*" >&2; FAILS=$((FAILS + 1)); }
die() { printf 'package-check: FAILED: %s\n' "$*" >&2; exit 1; }
ok() { printf 'package-check: ok: %s\n' "$*"; }

for cmd in dpkg-deb systemd-analyze systemd-sysusers; do
    command -v "$cmd" >/dev/null || die "$cmd is missing (apt-get install dpkg systemd)"
done
cargo deb --version >/dev/null 2>&1 \
    || die "cargo-deb is missing: bash scripts/setup-test-deps.sh --cargo-deb"

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET/$PROFILE/ringway"
[ -x "$BIN" ] || die "$BIN is missing: cargo build --profile $PROFILE first"

# --- the packaged unit is the deploy/ unit with the documented changes ----------------------
if derived="$(sed -f deploy/debian/unit.sed deploy/ringway.service)" \
    && diff -u deploy/debian/ringway.service <(printf '%s\n' "$derived") >/dev/null; then
    ok "deploy/debian/ringway.service = deploy/ringway.service through deploy/debian/unit.sed"
else
    diff -u deploy/debian/ringway.service <(printf '%s\n' "$derived") >&2 || true
    fail "deploy/debian/ringway.service drifted from deploy/ringway.service: regenerate it with
    sed -f deploy/debian/unit.sed deploy/ringway.service > deploy/debian/ringway.service"
fi

# --- build ----------------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ringway-package-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
bin_sum="$(sha256sum "$BIN" | cut -d' ' -f1)"
t=$SECONDS
cargo deb --no-build --profile "$PROFILE" --output "$WORK/" >"$WORK/cargo-deb.log" 2>&1 \
    || { cat "$WORK/cargo-deb.log" >&2; die "cargo deb --no-build --profile $PROFILE failed"; }
grep -i 'warning' "$WORK/cargo-deb.log" >&2 && fail "cargo deb warned (above)"
[ "$(sha256sum "$BIN" | cut -d' ' -f1)" = "$bin_sum" ] || fail "cargo deb changed $BIN (it must strip a copy)"
mapfile -t debs < <(find "$WORK" -maxdepth 1 -name '*.deb')
[ "${#debs[@]}" = 1 ] || die "expected one .deb in $WORK, found ${#debs[@]}: $(cat "$WORK/cargo-deb.log")"
DEB="${debs[0]}"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)"
ARCH="$(dpkg --print-architecture)"
[ "$(basename "$DEB")" = "ringway_${VERSION}-1_${ARCH}.deb" ] || fail "file name $(basename "$DEB")"
ok "built $(basename "$DEB") ($(du -k "$DEB" | cut -f1) KiB) in $((SECONDS - t)) s"

# --- control fields -------------------------------------------------------------------------
field() { dpkg-deb --field "$DEB" "$1"; }
[ "$(field Package)" = ringway ] || fail "Package: $(field Package)"
[ "$(field Version)" = "${VERSION}-1" ] || fail "Version: $(field Version), Cargo.toml has $VERSION"
[ "$(field Architecture)" = "$ARCH" ] || fail "Architecture: $(field Architecture)"
depends="$(field Depends)"
for dep in libc6 systemd; do
    [[ ", $depends," == *", $dep"[\ ,]* ]] || fail "Depends lacks $dep: $depends"
done
[ -n "$(field Maintainer)" ] && [ -n "$(field Description)" ] || fail "no Maintainer or Description"
ok "control: ringway ${VERSION}-1 $ARCH, Depends: $depends"

# --- the exact file list, modes and owners --------------------------------------------------
# Regular files only ("-" mode), as "mode owner path"; directories are whatever leads there.
expected="$(sort <<'EOF'
-rw-r--r-- root/root ./etc/ringway/ringway.toml
-rw-r--r-- root/root ./usr/lib/sysctl.d/90-ringway.conf
-rw-r--r-- root/root ./usr/lib/systemd/system/ringway.service
-rw-r--r-- root/root ./usr/lib/sysusers.d/ringway.conf
-rw-r--r-- root/root ./usr/share/doc/ringway/README.md
-rw-r--r-- root/root ./usr/share/doc/ringway/copyright
-rw-r--r-- root/root ./usr/share/doc/ringway/deploy.md
-rw-r--r-- root/root ./usr/share/doc/ringway/grafana-dashboard.json
-rw-r--r-- root/root ./usr/share/doc/ringway/relay-protocol.md
-rwxr-xr-x root/root ./usr/bin/ringway
EOF
)"
actual="$(dpkg-deb --contents "$DEB" | awk '$1 ~ /^-/ {sub(/^0\/0$/, "root/root", $2); print $1, $2, $6}' | sort)"
if [ "$actual" = "$expected" ]; then
    ok "contents: $(wc -l <<<"$actual") files, modes and owners as expected"
else
    diff -u <(echo "$expected") <(echo "$actual") >&2 || true
    fail "contents differ from the expected list (- expected, + in the .deb)"
fi
dpkg-deb --contents "$DEB" | awk '$1 !~ /^[-d]/' | grep . >&2 && fail "links or other non-files in the .deb"
dpkg-deb --contents "$DEB" | grep -q ' \./usr/local' && fail "something under /usr/local"

# --- control archive: conffiles and maintainer scripts --------------------------------------
CTRL="$WORK/control"
dpkg-deb --control "$DEB" "$CTRL"
conffiles="$(cat "$CTRL/conffiles" 2>/dev/null || true)"
[ "$conffiles" = /etc/ringway/ringway.toml ] \
    || fail "conffiles must be exactly /etc/ringway/ringway.toml, is: ${conffiles:-<none>}"
for s in postinst prerm postrm; do
    [ -x "$CTRL/$s" ] || { fail "no executable $s"; continue; }
    sh -n "$CTRL/$s" || fail "$s does not parse"
    grep -q '#DEBHELPER#' "$CTRL/$s" && fail "$s still holds #DEBHELPER#"
done
# The line number of the first command (not a comment) matching $2 in maintainer script $1.
line_of() { grep -n -- "$2" "$CTRL/$1" | grep -v '^[0-9]*:[[:space:]]*#' | head -1 | cut -d: -f1 || true; }
sysusers_at="$(line_of postinst 'systemd-sysusers .*ringway\.conf')"
enable_at="$(line_of postinst 'deb-systemd-helper enable .*ringway\.service')"
start_at="$(line_of postinst 'deb-systemd-invoke \$_dh_action .*ringway\.service')"
sysctl_at="$(line_of postinst 'systemd-sysctl 90-ringway\.conf')"
[ -n "$sysusers_at" ] || fail "postinst does not run systemd-sysusers ringway.conf"
[ -n "$enable_at" ] || fail "postinst does not enable ringway.service"
[ -n "$start_at" ] || fail "postinst does not start ringway.service"
[ -n "$sysctl_at" ] || fail "postinst does not apply 90-ringway.conf"
grep -q '_dh_action=restart' "$CTRL/postinst" || fail "postinst does not restart the unit on upgrade"
if [ -n "$sysusers_at" ] && [ -n "$start_at" ] && [ -n "$sysctl_at" ] \
    && { [ "$sysusers_at" -gt "$start_at" ] || [ "$sysctl_at" -gt "$start_at" ]; }; then
    fail "postinst starts the unit before it creates the user or applies the sysctl file"
fi
grep -q 'deb-systemd-invoke stop .*ringway\.service' "$CTRL/prerm" || fail "prerm does not stop ringway.service"
grep -q 'deb-systemd-helper purge .*ringway\.service' "$CTRL/postrm" || fail "postrm does not purge the unit's state"
ok "conffiles: $conffiles; postinst: user, sysctl, enable, start or restart; prerm stop on remove only; postrm purge"

# --- unpacked files against their sources ---------------------------------------------------
PKG="$WORK/root"
dpkg-deb --extract "$DEB" "$PKG"
while read -r packaged source; do
    cmp -s "$PKG/$packaged" "$source" || fail "/$packaged is not $source"
done <<'EOF'
etc/ringway/ringway.toml deploy/ringway.toml
usr/lib/sysctl.d/90-ringway.conf deploy/sysctl.d/90-ringway.conf
usr/lib/systemd/system/ringway.service deploy/debian/ringway.service
usr/lib/sysusers.d/ringway.conf deploy/debian/ringway.sysusers
usr/share/doc/ringway/README.md README.md
usr/share/doc/ringway/deploy.md deploy/README.md
usr/share/doc/ringway/relay-protocol.md docs/relay-protocol.md
usr/share/doc/ringway/grafana-dashboard.json deploy/grafana-dashboard.json
EOF
grep -q 'Apache-2.0' "$PKG/usr/share/doc/ringway/copyright" || fail "copyright does not name Apache-2.0"
ok "unpacked files match their sources"

UNIT="$PKG/usr/lib/systemd/system/ringway.service"
unit_get() { sed -n "s/^$1=//p" "$UNIT" | tail -1; }
[ "$(unit_get ExecStart)" = "/usr/bin/ringway --config /etc/ringway/ringway.toml" ] \
    || fail "ExecStart=$(unit_get ExecStart)"
[ "$(unit_get User)" = ringway ] && [ "$(unit_get Group)" = ringway ] || fail "User/Group not ringway"
grep -q '^DynamicUser=' "$UNIT" && fail "the packaged unit still sets DynamicUser"
grep -q '/usr/local' "$UNIT" && fail "the packaged unit names /usr/local"

# systemd-analyze verify insists that ExecStart's binary exists: check a copy of the packaged
# unit, under its own file name, that starts the unpacked /usr/bin/ringway (as tests/deploy.rs
# does for deploy/ringway.service). (--root=<unpacked> would look for sysinit.target and
# /bin/kill in the unpacked tree too.)
mkdir -p "$WORK/verify"
sed "s|^ExecStart=/usr/bin/ringway |ExecStart=$PKG/usr/bin/ringway |" "$UNIT" >"$WORK/verify/ringway.service"
grep -q "^ExecStart=$PKG/usr/bin/ringway " "$WORK/verify/ringway.service" || fail "no ExecStart to point at the unpacked binary"
if verify_err="$(systemd-analyze verify "$WORK/verify/ringway.service" 2>&1)"; then
    if [ -n "$verify_err" ]; then
        printf '%s\n' "$verify_err" >&2
        fail "systemd-analyze verify warned about the packaged unit (above)"
    else
        ok "systemd-analyze verify of the packaged unit (ExecStart: the unpacked binary): no warning"
    fi
else
    printf '%s\n' "$verify_err" >&2
    fail "systemd-analyze verify failed on the packaged unit (above)"
fi

# systemd-sysusers on an empty root: what postinst would create on a host without the user.
SYSROOT="$WORK/sysroot"
mkdir -p "$SYSROOT/etc"
sysusers_out="$(systemd-sysusers --dry-run --root="$SYSROOT" "$PKG/usr/lib/sysusers.d/ringway.conf" 2>&1)" \
    || fail "systemd-sysusers rejects ringway.conf: $sysusers_out"
if grep -q "Creating group 'ringway'" <<<"$sysusers_out" \
    && grep -Eq "Creating user 'ringway' .*with UID [0-9]+" <<<"$sysusers_out"; then
    uid="$(grep -Eo "with UID [0-9]+" <<<"$sysusers_out" | grep -Eo '[0-9]+')"
    [ "$uid" -lt 1000 ] || fail "user ringway would get UID $uid, not a system UID"
    ok "systemd-sysusers would create the system user and group ringway (UID $uid here)"
else
    printf '%s\n' "$sysusers_out" >&2
    fail "systemd-sysusers would not create user and group ringway (above)"
fi

# The packaged binary (stripped by cargo-deb) runs and accepts the packaged configuration.
if out="$(timeout 20 "$PKG/usr/bin/ringway" check-config "$PKG/etc/ringway/ringway.toml" 2>&1)"; then
    ok "the packaged ringway accepts the packaged ringway.toml (check-config)"
else
    printf '%s\n' "$out" >&2
    fail "the packaged ringway check-config on the packaged ringway.toml failed (above)"
fi

if [ "$FAILS" != 0 ]; then
    die "$FAILS check(s) failed ($(basename "$DEB"), $((SECONDS - T0)) s)"
fi
printf 'package-check: passed: %s, %d s\n' "$(basename "$DEB")" "$((SECONDS - T0))"
