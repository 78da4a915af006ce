"""Changing the limits of a running container: a change it refuses changes nothing (cgroups
and record), and a smaller CPU set that cgroup v1 refuses because of the inner Docker's cgroups
applies its cap now and its set at the next start."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from runtime import cgroups, mountinfo
from runtime.containers import CPUS_NOW_SET_LATER, Runtime
from runtime.errors import Conflict
from runtime.limits import Limits
from tests.conftest import ContainerFactory, load_busybox, sh

MiB = 2**20
CGROUP = "/sys/fs/cgroup"

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a host of 2 CPUs or more")


def _cgroups(rt: Runtime, name: str) -> tuple[str, ...]:
    """memory limit, CPU set, CPU cap, pids limit, as the container's cgroups say."""
    return tuple(
        sh(rt, name, f"cat {CGROUP}/{path}").strip()
        for path in (
            "memory/memory.limit_in_bytes",
            "cpuset/cpuset.cpus",
            "cpu/cpu.cfs_quota_us",
            "pids/pids.max",
        )
    )


@pytest.fixture
def limited(make_container: ContainerFactory) -> str:
    return make_container("quota", limits=Limits(cpus=1, memory=512 * MiB, pids=700))


@pytest.mark.skipif(cgroups.detect(mountinfo.current()).version != 1, reason="cgroup v1 only")
def test_a_refused_memory_limit_changes_nothing(rt: Runtime, limited: str) -> None:
    before, limits = _cgroups(rt, limited), rt.get(limited).limits
    assert before == (str(512 * MiB), before[1], "100000", "700") and before[1].isdigit()
    # runc writes the larger CPU set first, then the memory limit is refused
    with pytest.raises(Conflict, match=r"already uses \d+ MiB of memory.*choose a larger memory"):
        rt.set_limits(limited, replace(limits, cpus=2, memory=100 << 10, pids=800))
    assert _cgroups(rt, limited) == before
    assert rt.get(limited).limits == limits  # the next start uses the old ones too


@pytest.mark.skipif(cgroups.detect(mountinfo.current()).version != 1, reason="cgroup v1 only")
def test_fewer_cpus_with_inner_docker_cgroups(rt: Runtime, limited: str, busybox_tar: Path) -> None:
    limits = replace(rt.get(limited).limits, cpus=2.0)
    assert rt.set_limits(limited, limits) == {"cpus": "now"}
    load_busybox(rt, limited, busybox_tar)
    cid = sh(rt, limited, "docker run -d busybox:local sleep 600").strip()
    inner = f"{CGROUP}/cpuset/docker/{cid}/cpuset.cpus"
    all_cpus = f"0-{(os.cpu_count() or 2) - 1}"
    assert sh(rt, limited, f"cat {inner}").strip() == all_cpus  # holds every CPU

    assert rt.set_limits(limited, replace(limits, cpus=1)) == {"cpus": CPUS_NOW_SET_LATER}
    _, cpu_set, cap, _ = _cgroups(rt, limited)
    assert (cpu_set, cap) == (all_cpus, "100000")  # the cap now, the set untouched
    assert sh(rt, limited, f"cat {inner}").strip() == all_cpus  # the tenant's cgroup too
    assert rt.get(limited).limits.cpus == 1

    rt.stop(limited)
    rt.start(limited)
    rt.wait_ready(limited)
    assert sh(rt, limited, "nproc").strip() == "1"
    _, cpu_set, cap, _ = _cgroups(rt, limited)
    assert cpu_set.isdigit() and cap == "100000"
