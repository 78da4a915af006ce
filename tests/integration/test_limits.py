"""Limits hold: an OOM and a fork bomb stay inside, the CPU cap throttles."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.containers import Runtime
from runtime.execs import ExecSpec
from runtime.limits import Limits
from tests.conftest import CGROUP_PARENT, INNER_DRIVER, next_range, sh
from tests.hostd_harness import wait_for


@pytest.fixture(scope="module")
def limited(rt: Runtime) -> Iterator[str]:
    name = f"lim{os.getpid()}"
    rt.create(name, "default", next_range(), limits=Limits(cpus=0.5, memory=256 * 2**20, pids=300))
    try:
        rt.start(name)
        rt.wait_ready(name)
        yield name
    finally:
        rt.delete(name, force=True)


def test_memory_and_swap_limit(rt: Runtime, limited: str) -> None:
    cg = "/sys/fs/cgroup/memory"
    assert int(sh(rt, limited, f"cat {cg}/memory.limit_in_bytes")) == 256 * 2**20
    assert int(sh(rt, limited, f"cat {cg}/memory.memsw.limit_in_bytes")) == 256 * 2**20


def test_oom_kills_inside_only(rt: Runtime, limited: str) -> None:
    init = rt.state(limited).pid
    res = rt.exec(limited, ExecSpec(["perl", "-e", '$x = "a" x (400 * 1024 * 1024)']))  # > 256M
    assert res.returncode == 137  # SIGKILL from the OOM killer
    control = sh(rt, limited, "cat /sys/fs/cgroup/memory/memory.oom_control")
    oom = dict(line.split() for line in control.splitlines())
    assert int(oom["oom_kill"]) > 0  # counted in the container's own cgroup
    assert rt.state(limited).pid == init  # systemd survived
    assert sh(rt, limited, "systemctl is-system-running").strip() == "running"
    assert sh(rt, limited, "docker info --format '{{.Driver}}'").strip() == INNER_DRIVER


def test_fork_bomb_stays_inside(rt: Runtime, limited: str) -> None:
    bomb = "for i in $(seq 1000); do sleep 300 </dev/null >/dev/null 2>&1 & done"
    res = rt.exec(limited, ExecSpec(["sh", "-c", bomb]), timeout=120)
    assert "fork" in res.stderr or "Resource temporarily unavailable" in res.stderr
    used = rt.usage(limited)
    assert used is not None and used.pids <= 300
    # the host still forks freely; the container is full until the bomb's processes are
    # killed (here from the host, by their PIDs in the container's cgroup)
    assert subprocess.run(["true"], check=False).returncode == 0
    procs = Path(f"/sys/fs/cgroup/pids/{CGROUP_PARENT}/{limited}").rglob("cgroup.procs")
    killed = []
    for pid in {int(p) for f in procs for p in f.read_text().split()}:
        if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    # a PID is given back to the container's count when init inside reaps the process
    wait_for(
        lambda: not any(os.path.exists(f"/proc/{pid}") for pid in killed),
        60,
        lambda: f"init inside to reap the killed processes ({rt.usage(limited)})",
    )
    assert sh(rt, limited, "echo alive").strip() == "alive"


def test_cpu_cap_throttles(rt: Runtime, limited: str) -> None:
    cg = "/sys/fs/cgroup/cpu"
    assert sh(rt, limited, f"cat {cg}/cpu.cfs_quota_us").strip() == "50000"
    assert sh(rt, limited, f"cat {cg}/cpu.shares").strip() == "512"
    sh(rt, limited, "timeout 1 sh -c 'while :; do :; done' || true")
    stat = dict(line.split() for line in sh(rt, limited, f"cat {cg}/cpu.stat").splitlines())
    assert int(stat["nr_throttled"]) > 0
