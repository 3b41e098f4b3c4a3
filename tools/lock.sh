#!/bin/bash
# `make lock`: refreshes app/requirements.lock, the dependency set the Debian package
# installs (pip install --require-hashes), from app/pyproject.toml's ranges: the newest
# allowed release of every runtime dependency, with the sha256 of each of its files.
# The first line counts revisions ("# lock-revision: N"): it goes up by one whenever the
# pins or hashes change, and the package version carries it (deb/build.sh), so a package
# rebuilt with a patched dependency is an upgrade of the one before.
# Environment: LOCK_UPGRADE=name (repeatable with spaces) upgrades only those packages;
# empty (default): everything.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
LOCK=app/requirements.lock
COMPILE=.venv/bin/pip-compile
[[ -x $COMPILE ]] || { echo "lock: $COMPILE missing (make lock installs it: pip install -e 'app[lock]')" >&2; exit 2; }

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
upgrade=(--upgrade)
if [[ -n ${LOCK_UPGRADE:-} ]]; then
  upgrade=()
  for name in $LOCK_UPGRADE; do upgrade+=(--upgrade-package "$name"); done
fi
[[ -f $LOCK ]] && cp "$LOCK" "$scratch/requirements.lock"
# Without the index and find-links options of this machine's pip config in the file:
# the lock names releases and hashes, not where they were found.
CUSTOM_COMPILE_COMMAND="make lock" "$COMPILE" --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
  --no-emit-find-links --no-emit-trusted-host --resolver=backtracking "${upgrade[@]}" \
  --output-file "$scratch/requirements.lock" app/pyproject.toml

body() { grep -v '^#' "$1"; }
revision=0
if [[ -f $LOCK ]]; then
  revision=$(sed -n '1s/^# lock-revision: \([0-9][0-9]*\)$/\1/p' "$LOCK")
  [[ -n $revision ]] || { echo "lock: $LOCK's first line is not '# lock-revision: N'" >&2; exit 2; }
  if cmp -s <(body "$LOCK") <(body "$scratch/requirements.lock"); then
    echo "lock: $LOCK unchanged (revision $revision)"
    exit 0
  fi
fi
revision=$((revision + 1))
{ echo "# lock-revision: $revision"; grep -v '^# lock-revision:' "$scratch/requirements.lock"; } > "$LOCK"
echo "lock: $LOCK now at revision $revision"
