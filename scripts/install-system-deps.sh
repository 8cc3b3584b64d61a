#!/usr/bin/env bash
# Install the Debian packages objcache builds, tests and demos with.
# Idempotent: does nothing when everything is present. Needs root (or sudo).
#
#   build:   pkg-config, liburing-dev (log writer), libfuse3-dev + fuse3 (mount)
#   S3:      ceph-mon ceph-osd radosgw ceph-common (a one-node Ceph RGW on
#            loopback for integration tests, benchmarks and the demo)
#   python:  python3-venv is not needed with pyenv builds; gcc for extensions
#   tests:   git, rsync (real programs run on the mount); stress-ng, fio,
#            dbench, fsmark (filesystem test tools run on the mount)
set -euo pipefail

PACKAGES=(
  gcc pkg-config
  liburing-dev
  fuse3 libfuse3-dev
  ceph-mon ceph-osd radosgw ceph-common
  git rsync
  stress-ng fio dbench fsmark
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
