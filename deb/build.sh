#!/bin/bash
# `make deb`: builds out/agent-proxy_VERSION_amd64.deb, the one artifact the image, the
# Ansible role and operators install, and out/agent-proxy_VERSION_amd64.buildinfo, the
# record of what went into it. The package holds a self-contained virtualenv at
# /opt/agent-proxy made from app/requirements.lock (pip --require-hashes, wheels only) and
# agent-proxy's own wheel, /usr/bin/agent-proxy, the systemd units, the system user
# (sysusers.d), /var/lib/agent-proxy (tmpfiles.d), the kernel settings and PAM limits as
# conffiles, and the maintainer scripts in deb/. lintian checks it (no error, no warning
# that deb/lintian-overrides does not explain).
# Version: PRODUCT+lockN (app/agent_proxy/__init__.py, the lock's revision); DEB_VERSION
# overrides it for test builds, with a generated changelog entry. DEB_CHANGE=FILE adds
# FILE's text to the packaged sysctl settings (a changed default, for the upgrade test).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${DEB_OUT:-$REPO/out}   # DEB_OUT: another output folder (the tests build into their own)
LOCK=app/requirements.lock
PYTHON=/usr/bin/python3
started=$SECONDS
fail() { echo "deb: $*" >&2; exit 1; }

product=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' app/agent_proxy/__init__.py)
[[ -n $product ]] || fail "no __version__ in app/agent_proxy/__init__.py"
revision=$(sed -n '1s/^# lock-revision: \([0-9][0-9]*\)$/\1/p' "$LOCK")
[[ -n $revision ]] || fail "$LOCK's first line is not '# lock-revision: N' (make lock writes it)"
version=${DEB_VERSION:-$product+lock$revision}
changelog_top=$(sed -n '1s/^agent-proxy (\([^)]*\)).*/\1/p' deb/changelog)
if [[ -z ${DEB_VERSION:-} && $changelog_top != "$version" ]]; then
  fail "deb/changelog's newest entry is $changelog_top, the package is $version: add an entry for it"
fi
deb=$OUT/agent-proxy_${version}_amd64.deb
BUILD=$OUT/deb-build
ROOT=$BUILD/root
VENV=/opt/agent-proxy
rm -rf "$BUILD"
mkdir -p "$ROOT/DEBIAN" "$BUILD/wheel"

# agent-proxy's own wheel; its dependencies come from the lock alone.
.venv/bin/pip wheel --quiet --no-deps --wheel-dir "$BUILD/wheel" ./app > "$BUILD/wheel.log" 2>&1 \
  || { cat "$BUILD/wheel.log" >&2; fail "pip wheel ./app failed"; }
wheel=$(echo "$BUILD"/wheel/agent_proxy-*.whl)
[[ -f $wheel ]] || fail "pip wheel ./app made no agent_proxy wheel"

# The virtualenv, built in the staging root and moved to its real path below. No pip in
# it: the package is upgraded as a whole, never by pip on the node.
"$PYTHON" -m venv --without-pip "$ROOT$VENV"
pip_into() {
  .venv/bin/pip --python "$ROOT$VENV/bin/python" install --quiet --no-compile --no-input "$@" >> "$BUILD/pip.log" 2>&1 \
    || { cat "$BUILD/pip.log" >&2; fail "pip install $* failed"; }
}
pip_into --require-hashes --only-binary :all: --no-deps -r "$LOCK"
pip_into --no-deps "$wheel"
.venv/bin/pip --python "$ROOT$VENV/bin/python" check > "$BUILD/pip-check.log" \
  || { cat "$BUILD/pip-check.log" >&2; fail "the locked set does not satisfy agent-proxy's requirements (make lock)"; }
# Wheels ship their extension modules with symbols; nothing on the node needs them.
find "$ROOT$VENV" -name '*.so' -exec strip --strip-unneeded {} +
# Where the wheel came from on the build host is no business of the node.
find "$ROOT$VENV" -name direct_url.json -delete
# Shebangs, activate scripts and pyvenv.cfg name the staging path: make them name
# /opt/agent-proxy, and check that no file names the build host's paths any more.
grep -rlI --null -F "$ROOT$VENV" "$ROOT$VENV" | xargs -0 --no-run-if-empty sed -i "s|$ROOT$VENV|$VENV|g"
if grep -rlI -e "$ROOT" -e "$REPO" "$ROOT"; then fail "the files above still name the build host's paths"; fi
# Byte code compiled here, for the paths on the node, checked against the source's hash
# (not its mtime): nothing is written under /opt/agent-proxy at run time, and purge
# leaves nothing behind.
"$PYTHON" -m compileall -q -j 0 --invalidation-mode checked-hash -s "$ROOT" -p / "$ROOT$VENV/lib" > "$BUILD/compile.log" \
  || { cat "$BUILD/compile.log" >&2; fail "compileall failed"; }

install -d "$ROOT/usr/bin" "$ROOT/lib/systemd/system" "$ROOT/usr/libexec/agent-proxy" \
  "$ROOT/usr/lib/sysusers.d" "$ROOT/usr/lib/tmpfiles.d" "$ROOT/usr/share/doc/agent-proxy" \
  "$ROOT/usr/share/lintian/overrides" "$ROOT/etc/agent-proxy/tls" "$ROOT/etc/sysctl.d" "$ROOT/etc/security/limits.d"
ln -s "$VENV/bin/agent-proxy" "$ROOT/usr/bin/agent-proxy"
install -m 0644 appliance/systemd/agent-proxy@.service appliance/systemd/agent-proxy.target \
  appliance/systemd/agent-proxy-front.service appliance/firstboot/agent-proxy-firstboot.service \
  appliance/firstboot/agent-proxy-register.service "$ROOT/lib/systemd/system/"
install -m 0755 appliance/firstboot/agent-proxy-firstboot appliance/firstboot/agent-proxy-register deb/restart-workers "$ROOT/usr/libexec/agent-proxy/"
install -m 0644 deb/sysusers.conf "$ROOT/usr/lib/sysusers.d/agent-proxy.conf"
install -m 0644 deb/tmpfiles.conf "$ROOT/usr/lib/tmpfiles.d/agent-proxy.conf"
install -m 0644 appliance/sysctl.d/60-agent-proxy.conf "$ROOT/etc/sysctl.d/"
[[ -z ${DEB_CHANGE:-} ]] || cat "$DEB_CHANGE" >> "$ROOT/etc/sysctl.d/60-agent-proxy.conf"
install -m 0644 appliance/security/60-agent-proxy-limits.conf "$ROOT/etc/security/limits.d/"
install -m 0644 deb/copyright appliance/seed.env.example "$ROOT/usr/share/doc/agent-proxy/"
install -m 0644 deb/lintian-overrides "$ROOT/usr/share/lintian/overrides/agent-proxy"
{
  if [[ -n ${DEB_VERSION:-} ]]; then
    printf 'agent-proxy (%s) unstable; urgency=medium\n\n  * Test build of agent-proxy %s with lock revision %s.\n\n -- %s  %s\n\n' \
      "$version" "$product" "$revision" "$(sed -n 's/^Maintainer: //p' deb/control)" "$(date -R)"
  fi
  cat deb/changelog
} | gzip -9n > "$ROOT/usr/share/doc/agent-proxy/changelog.gz"

# Modes as dpkg will install them: directories and executables 0755, the rest 0644.
find "$ROOT" -path "$ROOT/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
find "$ROOT" -path "$ROOT/DEBIAN" -prune -o -type f -perm /111 -exec chmod 0755 {} + -o -type f -exec chmod 0644 {} +

# The newest C library any bundled wheel was built for (its manylinux tag).
glibc=$(cat "$ROOT$VENV"/lib/python3*/site-packages/*.dist-info/WHEEL |
  sed -n 's/^Tag: .*-manylinux_\([0-9]*\)_\([0-9]*\)_x86_64$/\1.\2/p; s/^Tag: .*-manylinux2014_x86_64$/2.17/p' | sort -V | tail -1)
python_minor=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
next_minor=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
sed -e "s/@VERSION@/$version/" -e "s/@PYTHON@/$python_minor/" -e "s/@NEXT_PYTHON@/$next_minor/" \
    -e "s/@GLIBC@/${glibc:-2.17}/" -e "s/@INSTALLED_SIZE@/$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)/" \
    deb/control > "$ROOT/DEBIAN/control"
(cd "$ROOT" && find etc -type f | sed 's|^|/|' | LC_ALL=C sort) > "$ROOT/DEBIAN/conffiles"
install -m 0755 deb/postinst deb/prerm deb/postrm "$ROOT/DEBIAN/"
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) > "$ROOT/DEBIAN/md5sums"
chmod 0644 "$ROOT/DEBIAN/md5sums" "$ROOT/DEBIAN/conffiles" "$ROOT/DEBIAN/control"

# One package in OUT, the one just built: the role installs "the" package found there.
mkdir -p "$OUT"
rm -f "$OUT"/agent-proxy_*_amd64.deb "$OUT"/agent-proxy_*_amd64.buildinfo
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s) \
  dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$deb" > /dev/null
seconds=$((SECONDS - started))

# The record of inputs (deb822, after dpkg's .buildinfo): what was built from what.
{
  echo "Format: agent-proxy-1"
  echo "Binary: agent-proxy"
  echo "Version: $version"
  echo "Architecture: amd64"
  echo "Build-Date: $(date -u -R)"
  echo "Build-Seconds: $seconds"
  echo "Build-Origin: $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "Source-Commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "Lock-Revision: $revision"
  echo "Lock-Sha256: $(sha256sum "$LOCK" | cut -d' ' -f1)"
  echo "Wheel-Sha256: $(sha256sum "$wheel" | cut -d' ' -f1)  $(basename "$wheel")"
  echo "Python: $("$PYTHON" --version | cut -d' ' -f2)"
  echo "Installed-Build-Depends:"
  dpkg-query -W -f=' ${Package} (= ${Version}),\n' dpkg python3.11 python3-venv | sed '$ s/,$//'
  echo "Python-Packages:"
  .venv/bin/pip --python "$ROOT$VENV/bin/python" list --format=freeze | sed 's/^/ /'
  echo "Checksums-Sha256:"
  echo " $(sha256sum "$deb" | cut -d' ' -f1) $(stat -c %s "$deb") $(basename "$deb")"
} > "${deb%.deb}.buildinfo"

lintian --fail-on error,warning --suppress-tags-from-file /dev/null "$deb" > "$BUILD/lintian.log" 2>&1 \
  || { cat "$BUILD/lintian.log" >&2; fail "lintian found problems in $deb (above)"; }
echo "deb: $deb ($(du -k "$deb" | cut -f1) KiB, $version) in $seconds s; lintian: no error or warning; inputs: ${deb%.deb}.buildinfo"
