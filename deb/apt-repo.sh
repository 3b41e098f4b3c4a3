#!/bin/bash
# `make apt-repo`: out/apt-repo/, a flat apt repository holding the package `make deb`
# built (out/agent-proxy_VERSION_amd64.deb), indexed and released with apt-ftparchive and
# signed (InRelease, Release.gpg) with a key made for this repository on its first run
# and kept in out/apt-repo-key/ (a GnuPG home, 0700; its private half never leaves it).
# Serve the folder over HTTP and give nodes its public key, agent-proxy-archive.gpg:
#   /usr/share/keyrings/agent-proxy-archive.gpg  (the file as it is)
#   deb [signed-by=/usr/share/keyrings/agent-proxy-archive.gpg] http://HOST:PORT/ ./
# then `apt install agent-proxy`; `apt upgrade` takes the next package.
# DEB_OUT: another output folder, as for deb/build.sh.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${DEB_OUT:-$REPO/out}
APT=$OUT/apt-repo
KEY_HOME=$OUT/apt-repo-key
fail() { echo "apt-repo: $*" >&2; exit 1; }

debs=("$OUT"/agent-proxy_*_amd64.deb)
[[ ${#debs[@]} == 1 && -f ${debs[0]} ]] || fail "$OUT must hold exactly one agent-proxy_*_amd64.deb (make deb)"
gpg=(gpg --batch --quiet --homedir "$KEY_HOME")
# gpg starts an agent for the key's folder and leaves it running: stopped when done.
trap 'gpgconf --homedir "$KEY_HOME" --kill gpg-agent' EXIT

if [[ ! -d $KEY_HOME ]]; then
  install -d -m 0700 "$KEY_HOME"
  "${gpg[@]}" --pinentry-mode loopback --passphrase '' \
    --quick-generate-key "agent-proxy archive ($(hostname)) <agent-proxy-archive@localhost>" ed25519 sign never
fi
fingerprint=$("${gpg[@]}" --with-colons --list-secret-keys | awk -F: '$1 == "fpr" { print $10; exit }')
[[ -n $fingerprint ]] || fail "no signing key in $KEY_HOME (remove the folder to make a new one)"

rm -rf "$APT.tmp"
mkdir -p "$APT.tmp"
cp "${debs[0]}" "$APT.tmp/"
cd "$APT.tmp"
apt-ftparchive packages . > Packages
gzip -9nk Packages
apt-ftparchive -o APT::FTPArchive::Release::Origin=agent-proxy -o APT::FTPArchive::Release::Label=agent-proxy \
  -o APT::FTPArchive::Release::Suite=stable -o APT::FTPArchive::Release::Architectures=amd64 release . > "$OUT/Release.tmp"
mv "$OUT/Release.tmp" Release
"${gpg[@]}" --yes --local-user "$fingerprint" --clearsign --output InRelease Release
"${gpg[@]}" --yes --local-user "$fingerprint" --detach-sign --output Release.gpg Release
"${gpg[@]}" --export "$fingerprint" > agent-proxy-archive.gpg
cd "$OUT"
rm -rf "$APT"
mv "$APT.tmp" "$APT"
echo "apt-repo: $APT holds $(basename "${debs[0]}"), signed by $fingerprint (public key: $APT/agent-proxy-archive.gpg)"
