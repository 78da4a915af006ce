#!/bin/bash
# Install what hostd's tests need on a Debian 12 host: system packages (also those that build
# the Debian package), then a virtualenv at .venv with hostd installed editable (this builds
# the cffi syscall module). Idempotent; run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  runc uidmap debootstrap busybox-static iptables nftables lxcfs fuse3 e2fsprogs iproute2 quota
  zstd tar util-linux  # hostctl user export/import (hostd.archive)
  libsystemd-dev openssh-client openssh-server
  python3 python3-venv python3-dev gcc libc6-dev libffi-dev pkg-config
  # the Debian package (packaging/build-deb.sh, tests/integration/test_deb.py)
  dpkg-dev debhelper fakeroot lintian go-md2man python3-pip python3-setuptools python3-wheel
  python3-cffi python3-pyroute2 python3-systemd
  qemu-system-x86 qemu-utils  # the VM tests (tests/vm): systemd as PID 1, cgroup v2
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "hostd installed in $(pwd)/.venv"
