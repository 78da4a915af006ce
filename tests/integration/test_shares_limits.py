"""Shared host directories keep host ownership; limits apply at start and live."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.containers import Runtime
from runtime.execs import ExecSpec
from runtime.limits import Limits
from runtime.shares import Share
from tests.conftest import next_range, sh

HOST_UID = 4242  # a host user without a passwd entry is enough for ownership checks


def test_share_maps_only_the_host_user(rt: Runtime, tmp_path: Path) -> None:
    home = tmp_path / "home-alice"
    home.mkdir()
    os.chown(home, HOST_UID, HOST_UID)
    (tmp_path / "root-owned").write_text("x")
    os.rename(tmp_path / "root-owned", home / "root-owned")
    share = Share(str(home), "/home/alice", HOST_UID, HOST_UID, 1000, 1000)
    name = f"share{os.getpid()}"
    rt.create(name, "default", next_range(), shares=[share])
    try:
        rt.start(name)
        rt.wait_ready(name)
        assert sh(rt, name, "stat -c %u:%g /home/alice").strip() == "1000:1000"
        assert sh(rt, name, "stat -c %u /home/alice/root-owned").strip() == "65534"
        res = rt.exec(name, ExecSpec(["sh", "-c", "echo mine > /home/alice/new"], user="1000:1000"))
        assert res.returncode == 0, res.stderr
        st = os.stat(home / "new")
        assert (st.st_uid, st.st_gid) == (HOST_UID, HOST_UID)
        assert (
            rt.exec(name, ExecSpec(["sh", "-c", "echo x > /home/alice/root-owned"])).returncode != 0
        )
    finally:
        rt.delete(name, force=True)
    assert (home / "new").read_text() == "mine\n"  # deleting the container keeps the home


def test_limits_at_start_and_live(rt: Runtime) -> None:
    name = f"limits{os.getpid()}"
    rt.create(name, "default", next_range(), limits=Limits(cpus=1.5, memory=512 * 2**20, pids=700))
    try:
        rt.start(name)
        rt.wait_ready(name)
        mem = "/sys/fs/cgroup/memory/memory.limit_in_bytes"
        assert int(sh(rt, name, f"cat {mem}")) == 512 * 2**20
        assert sh(rt, name, "cat /sys/fs/cgroup/pids/pids.max").strip() == "700"
        assert sh(rt, name, "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us").strip() == "150000"
        live = rt.set_limits(name, Limits(memory=1024 * 2**20, pids=800))
        assert live == {"cpus": "now", "memory": "now", "pids": "now"}
        assert int(sh(rt, name, f"cat {mem}")) == 1024 * 2**20
        assert sh(rt, name, "cat /sys/fs/cgroup/pids/pids.max").strip() == "800"
        assert sh(rt, name, "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us").strip() == "-1"
        used = rt.usage(name)
        assert used is not None and used.memory > 0 and used.pids >= 2 and used.cpu_seconds > 0
        assert rt.disk_used(name) > 0
        rt.stop(name)
        assert rt.usage(name) is None
        assert rt.set_limits(name, Limits(pids=900)) == {
            "memory": "at next start",
            "pids": "at next start",
        }
        rt.start(name)
        assert sh(rt, name, "cat /sys/fs/cgroup/pids/pids.max").strip() == "900"
    finally:
        rt.delete(name, force=True)
