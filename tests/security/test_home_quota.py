"""A tenant's home is outside its disk volume: `[limits] home` caps it with the user's block
quota where the file system enforces user quotas, and says so where it cannot."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import fsutil
from tests.hostd_harness import Hostd, UnixUsers

HOME_QUOTA = 4 * 2**20
SMALL = ("--memory", "768M", "--disk", "1G")


@contextlib.contextmanager
def home_limit(hostd: Hostd, size: str) -> Iterator[Hostd]:
    """hostd restarted with `[limits] home = size` in a drop-in; removed afterwards."""
    with hostd.configured("50-home-quota", f'[limits]\nhome = "{size}"\n'):
        yield hostd


@contextlib.contextmanager
def quota_fs() -> Iterator[Path]:
    """A 64M ext4 with the quota feature on a loop device, mounted with usrquota."""
    root = Path(tempfile.mkdtemp(prefix="hostd-homeq-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    image, mnt = root / "home.img", root / "home"
    mnt.mkdir(mode=0o755)
    try:
        with open(image, "wb") as f:
            f.truncate(64 * 2**20)
        subprocess.run(
            ["mkfs.ext4", "-q", "-O", "quota", "-E", "quotatype=usrquota", str(image)], check=True
        )
        res = subprocess.run(
            ["mount", "-o", "loop,usrquota", str(image), str(mnt)], capture_output=True, text=True
        )
        if res.returncode != 0:
            pytest.skip("this kernel cannot enforce ext4 user quotas (CONFIG_QFMT_V2 unset)")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)  # detaches the loop device too
    finally:
        fsutil.remove_tree(root)


def move_home(user: str, home: Path) -> None:
    subprocess.run(["usermod", "-d", str(home), "-m", user], check=True)


def test_home_quota_stops_a_tenant_filling_its_home(hostd: Hostd, unix_users: UnixUsers) -> None:
    if shutil.which("setquota") is None:
        pytest.skip("setquota missing: apt-get install quota")
    with quota_fs() as homes, home_limit(hostd, "4M") as h:
        user = unix_users.make()
        move_home(user, homes / user)
        try:
            out = h.hostctl("user", "add", user, *SMALL).stderr  # progress lines
            assert f"home quota 4M on {homes}" in out
            h.hostctl("start", user)
            fill = 'dd if=/dev/zero of="$HOME/big" bs=1M count=16'
            res = h.hostctl("exec", user, "--user", user, "--", "sh", "-c", fill, check=False)
            assert res.returncode != 0 and "Disk quota exceeded" in res.stderr
            assert (homes / user / "big").stat().st_size <= HOME_QUOTA
        finally:
            h.hostctl("user", "remove", user, check=False)


def test_without_quota_support_the_admin_is_told(hostd: Hostd, unix_users: UnixUsers) -> None:
    """On a home file system without usrquota, `user add` says the cap is not set (and why)
    instead of pretending; doctor says the same."""
    user = unix_users.make()
    home = os.path.expanduser(f"~{user}")
    opts = subprocess.run(
        ["findmnt", "-no", "OPTIONS", "--target", home], capture_output=True, text=True, check=True
    ).stdout
    if "usrquota" in opts or "uquota" in opts:
        pytest.skip(f"{home} enforces user quotas: the test above covers it")
    with home_limit(hostd, "4M") as h:
        try:
            out = h.hostctl("user", "add", user, *SMALL).stderr  # progress lines
            assert "home quota 4M not set: not available: " in out
            assert "homes are outside the tenants' disk caps" in out
        finally:
            h.hostctl("user", "remove", user, check=False)
        doctor = h.hostctl("doctor", check=False).stdout
        assert "home quotas" in doctor and "not available" in doctor
