"""hostd into the VM as an admin installs it: its Debian package, built here from the checkout
(packaging/build-deb.sh), put on the staging disk and installed offline with apt (the VM has no
network; its image holds the package's Depends). A second package, the same tree under a higher
version, is there for the upgrade test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

from tests.vm.machine import Machine

CHECKOUT = Path(__file__).resolve().parents[2]
LABEL = "hostd-install"  # the staging disk's label
MOUNT = "/mnt/hostd-install"
STATE = "/var/lib/hostd"
STATE_LABEL = "hostd-state"
VENV_PYTHON = "/usr/lib/hostd/venv/bin/python3"  # the package's private venv


def version() -> str:
    """The checkout's version, the package's."""
    with open(CHECKOUT / "pyproject.toml", "rb") as f:
        found: str = tomllib.load(f)["project"]["version"]
    return found


def upgrade_version() -> str:
    """A newer version of the same tree: dpkg orders `V+vmtest1` after `V`."""
    return f"{version()}+vmtest1"


def deb(pkg_version: str) -> str:
    """The path of a package in the VM (the staging disk mounted)."""
    return f"{MOUNT}/hostd_{pkg_version}_amd64.deb"


def stage(dest: Path) -> None:
    """What the VM installs from, laid out in `dest` for the staging disk: both packages, and
    the harness's look at what the host holds (tests/hostd_harness.py: host_view)."""
    for test_version in ("", upgrade_version()):  # "": the checkout's own
        env = dict(os.environ, HOSTD_DEB_VERSION=test_version)
        subprocess.run(
            ["bash", str(CHECKOUT / "packaging/build-deb.sh"), str(dest)],
            env=env, cwd=CHECKOUT, check=True, capture_output=True, timeout=900,
        )  # fmt: skip
    (dest / "tests").mkdir()
    for name in ("__init__.py", "hostd_harness.py"):
        shutil.copy(CHECKOUT / "tests" / name, dest / "tests" / name)


# The disks in fstab (they are there again after a reboot), the state disk mounted before the
# package's postinst starts hostd; a persistent journal (the previous boot's shutdown is read
# after a reboot).
INSTALL = f"""set -eu
mkdir -p {MOUNT} {STATE} /var/log/journal
cat >>/etc/fstab <<EOF
LABEL={LABEL} {MOUNT} ext4 ro 0 0
LABEL={STATE_LABEL} {STATE} ext4 defaults 0 2
EOF
systemctl daemon-reload
mount {MOUNT}
mount {STATE}
systemd-tmpfiles --create --prefix /var/log/journal
journalctl --flush
"""


def apt_install(vm: Machine, pkg_version: str, *options: str) -> None:
    """`apt-get install ./hostd_*.deb` (offline: nothing to download, the Depends are there;
    not --no-download, which apt 2.6 refuses with a local .deb); its postinst (re)starts hostd."""
    vm.sh(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
        f"{' '.join(options)} {deb(pkg_version)}",
        timeout=1200,
    )


def install_hostd(vm: Machine) -> None:
    """Mount the disks, then install the checkout's package (hostd started by it)."""
    vm.sh(INSTALL)
    apt_install(vm, version())


def tenants_cgroup(vm: Machine) -> str:
    """The cgroup below which hostd puts the tenants, as systemd names hostd-tenants.service's
    (/hostd.slice/hostd-tenants.service)."""
    return vm.sh("systemctl show -p ControlGroup --value hostd-tenants").strip()
