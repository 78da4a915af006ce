"""The disk cap (a per-container ext4 volume) and a truthful /proc (lxcfs)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import lxcfs, mountinfo, volume
from runtime.containers import Runtime
from runtime.errors import RuntimeFailure
from runtime.execs import ExecSpec
from runtime.limits import Limits
from runtime.settings import Settings
from tests.conftest import CGROUP_PARENT, next_range, sh

MiB = 2**20


@pytest.fixture(scope="module")
def lxcfs_rt(state_dir: Path, rt: Runtime) -> Iterator[Runtime]:
    """The session's runtime, plus lxcfs on a mount point of the test's own."""
    mountpoint = state_dir / "lxcfs-disk-proc"  # not the session hostd's state_dir/lxcfs
    yield Runtime(Settings(state_dir, cgroup_parent=CGROUP_PARENT, lxcfs=mountpoint))
    lxcfs.stop(mountpoint)
    assert not lxcfs.is_mounted(mountpoint)


def test_disk_cap_gives_enospc_inside_and_can_be_raised(rt: Runtime) -> None:
    name = f"disk{os.getpid()}"
    rt.create(name, "default", next_range(), limits=Limits(disk=300 * MiB))
    cdir = rt.state_dir / "containers" / name
    try:
        rt.start(name)
        rt.wait_ready(name)
        res = rt.exec(name, ExecSpec(["dd", "if=/dev/zero", "of=/root/fill", "bs=1M", "count=400"]))
        assert res.returncode != 0 and "No space left on device" in res.stderr
        assert os.stat(cdir / "data.img").st_blocks * 512 <= 300 * MiB  # the host is untouched
        used = rt.disk_used(name)
        assert 250 * MiB < used <= 300 * MiB
        sh(rt, name, "rm /root/fill")
        with pytest.raises(RuntimeFailure, match="needs it stopped"):
            rt.set_limits(name, Limits(disk=200 * MiB))
        live = rt.set_limits(name, Limits(disk=600 * MiB))["disk"] == "now"
        assert live is volume.can_grow_live()  # without CAP_SYS_RESOURCE: at next start
        if not live:
            rt.stop(name)
            rt.start(name)
            rt.wait_ready(name)
        sh(rt, name, "dd if=/dev/zero of=/root/fill bs=1M count=400 status=none")
        rt.stop(name)
        assert volume.loop_device(cdir / "data") is None and not mountinfo.mounts_under(str(cdir))
    finally:
        rt.delete(name, force=True)
    assert not cdir.exists()


def test_proc_shows_the_containers_limits_and_uptime(lxcfs_rt: Runtime) -> None:
    name = f"proc{os.getpid()}"
    lxcfs_rt.create(name, "default", next_range(), limits=Limits(memory=768 * MiB, cpus=1))
    try:
        lxcfs_rt.start(name)
        lxcfs_rt.wait_ready(name)
        meminfo = dict(
            line.split(":", 1) for line in sh(lxcfs_rt, name, "cat /proc/meminfo").splitlines()
        )
        assert meminfo["MemTotal"].split()[0] == str(768 * 1024)
        assert sh(lxcfs_rt, name, "free -m | awk '/^Mem:/ {print $2}'").strip() == "768"
        host_uptime = float(Path("/proc/uptime").read_text().split()[0])
        inside = float(sh(lxcfs_rt, name, "cut -d' ' -f1 /proc/uptime"))
        assert inside < min(host_uptime, 600)  # its own uptime, not the host's
        assert sh(lxcfs_rt, name, "nproc").strip() == "1"  # pinned to ceil(cpus) CPUs
    finally:
        lxcfs_rt.delete(name, force=True)
