#!/bin/bash
# The VM part of `make test`: the template checks, the image (built again only when an
# input changed, packer/inputs-hash.sh), then its two tests side by side on booted copies
# of it under TCG:
#   image      packer/test-image.sh: one appliance from a boot seed, audited, its package's
#              life cycle, and a seed that cannot work;
#   multinode  packer/test-multinode.sh: two nodes made one proxy by site.yml behind a
#              balancer, the rolling upgrade and a node powered off under load.
# Side by side, because on two cores each leaves CPU idle that the other uses (the times,
# both ways: packer/README.md, "Checks"). Each prints its steps with their times.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

packer/check.sh
packer/build-image.sh
tools/side-by-side image packer/test-image.sh multinode packer/test-multinode.sh
