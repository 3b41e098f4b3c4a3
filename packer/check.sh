#!/bin/bash
# Fast static checks of the image template and the Vagrant lab (seconds, no VM):
# `packer fmt -check`, `packer validate` (with a throwaway key and placeholder paths) and
# `vagrant validate -p`. Run first by packer/test-vms.sh and, on its own, by `make test`
# even when SKIP_IMAGE=1.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

if ! packer fmt -check packer/ >/dev/null; then
  echo "check: packer fmt would change these files (run: packer fmt packer/):" >&2
  packer fmt -check packer/ >&2 || [[ $? == 3 ]]
  exit 1
fi
ssh-keygen -q -t ed25519 -N '' -f "$scratch/id_ed25519"
packer validate \
  -var "base_disk=file://$scratch/base.qcow2" \
  -var "ssh_private_key_file=$scratch/id_ed25519" \
  -var "ssh_public_key_file=$scratch/id_ed25519.pub" \
  -var "repo_url=http://10.0.2.2:8080/" \
  -var "output_directory=$scratch/packer" \
  packer/ > "$scratch/validate.log" 2>&1 || { cat "$scratch/validate.log" >&2; echo "check: packer validate failed" >&2; exit 1; }
vagrant validate -p > "$scratch/vagrant.log" 2>&1 || { cat "$scratch/vagrant.log" >&2; echo "check: vagrant validate -p failed" >&2; exit 1; }
echo "check: packer fmt, packer validate, vagrant validate -p: ok"
