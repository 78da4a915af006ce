"""A rebase reads, as root on the host, the dpkg status file of the upper layer it sets aside
(to name the packages to reinstall). Root inside wrote that file: it plants a symlink to a
host file, a FIFO, a huge file. hostd must read none of the host's files, never hang, and
stay within its size cap; the rebase itself goes through."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import volume
from runtime.containers import Runtime
from runtime.limits import Limits
from runtime.storage import DPKG_STATUS_MAX
from tests.conftest import next_range

HOST_SECRET = "Package: hostd-host-secret\nStatus: install ok installed\n"


@pytest.fixture
def image(rt: Runtime, busybox_tar: Path, tmp_path: Path) -> Iterator[str]:
    name = f"rbp{os.getpid()}"
    rt.images.import_tarball(name, busybox_tar)
    yield name
    rt.images.remove(name, [])
    rt.images.prune([Path(c.image_dir) for c in rt.containers()])


def _new_version(rt: Runtime, name: str, base: Path, tmp: Path) -> None:
    tar = tmp / "v2.tar"
    shutil.copy(base, tar)
    (tmp / "etc").mkdir(exist_ok=True)
    (tmp / "etc/v2").write_text("2\n")
    subprocess.run(["tar", "-C", str(tmp), "-rf", str(tar), "./etc/v2"], check=True)
    rt.images.import_tarball(name, tar)


@pytest.mark.parametrize("plant", ["symlink", "dotdot", "fifo", "huge"])
def test_a_planted_dpkg_status_is_not_followed_nor_waited_for(
    rt: Runtime, image: str, busybox_tar: Path, tmp_path: Path, plant: str
) -> None:
    secret = tmp_path / "host-status"  # a host file in dpkg's format: it must not be read
    secret.write_text(HOST_SECRET)
    name = f"rbp{os.getpid()}"
    c = rt.create(name, image, next_range(), limits=Limits(disk=64 << 20))
    try:
        cdir = rt.state_dir / "containers" / name
        volume.mount(cdir / "data.img", cdir / "data")
        try:
            dpkg = cdir / "data/upper/var/lib/dpkg"
            dpkg.mkdir(parents=True)
            if plant == "symlink":
                (dpkg / "status").symlink_to(secret)
            elif plant == "dotdot":
                (dpkg / "status").symlink_to("../" * 32 + str(secret).lstrip("/"))
            elif plant == "fifo":
                os.mkfifo(dpkg / "status")
            else:
                with open(dpkg / "status", "w") as f:  # sparse: past the cap, not the volume
                    f.write(HOST_SECRET.replace("host-secret", "probe") + "\n")
                    f.truncate(DPKG_STATUS_MAX + 4096)
        finally:
            volume.unmount(cdir / "data")
        _new_version(rt, image, busybox_tar, tmp_path)
        done = rt.rebase(name, image)  # a FIFO opened without O_NONBLOCK would hang here
        assert done is not None and done.packages == ()
        assert rt.get(name).image_dir == done.new_image_dir
    finally:
        rt.delete(c.name, force=True)
