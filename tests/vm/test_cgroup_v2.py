"""A tenant's whole life on cgroup v2 under a real systemd, through `hostctl` in the VM, as an
admin and a user meet it: add with quotas, start, limits enforced by the kernel, the inner
Docker making its own cgroups, an OOM and a fork bomb contained, stop, remove with nothing
left. The tests run in file order on one tenant (one VM boot for all: emulation is slow).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hostd_harness import wait_for
from tests.vm.install import MOUNT, VENV_PYTHON, tenants_cgroup
from tests.vm.machine import Machine

USER = "alice"  # an account of the throwaway VM
Tenant = dict[str, Any]  # as `hostctl user show --json` prints it
MEMORY = 512 * 2**20
PIDS = 256
CPUS = 0.5
# A fork bomb that keeps trying (a `b|b&` one dies out once forks fail), detached from the
# exec that starts it (or that exec would wait for it).
BOMB = "setsid bash -c 'b() { while :; do b & done; }; b' </dev/null >/dev/null 2>&1 &"
SLOW = 600  # seconds: bounds only, for anything under emulation


def hostctl(vm: Machine, line: str, input: bytes | None = None) -> str:
    return vm.sh(f"hostctl {line}", input=input, timeout=SLOW)


def inside(vm: Machine, script: str, as_user: bool = False, input: bytes | None = None) -> str:
    """A shell script in the tenant's container (as root inside, or as the user)."""
    who = f"--user {USER} " if as_user else ""
    return hostctl(vm, f"exec {who}{USER} -- sh -c {shlex.quote(script)}", input=input)


def read(vm: Machine, path: str) -> str:
    return vm.sh(f"cat {path}").strip()


def keyed(vm: Machine, path: str) -> dict[str, int]:
    """A flat-keyed cgroup file (memory.events, pids.events, cpu.stat)."""
    return {k: int(v) for k, v in (line.split() for line in read(vm, path).splitlines())}


@pytest.fixture(scope="module")
def cgroup(vm: Machine) -> str:
    """The tenant's cgroup: below hostd-tenants.service's ([runtime] cgroup_parent "auto")."""
    return f"/sys/fs/cgroup{tenants_cgroup(vm)}/{USER}"


@pytest.fixture(scope="module")
def subuid_before(vm: Machine) -> str:
    vm.sh(f"id {USER} >/dev/null 2>&1 || useradd -m -s /bin/bash {USER}")
    return vm.sh("cat /etc/subuid /etc/subgid")


@pytest.fixture(scope="module")
def tenant(vm: Machine, subuid_before: str) -> Iterator[Tenant]:
    """The tenant as `hostctl user show --json` describes it after its first start."""
    mib = MEMORY // 2**20
    hostctl(vm, f"user add {USER} --memory {mib}M --pids {PIDS} --cpus {CPUS} --disk 4G")
    hostctl(vm, f"start {USER}")
    yield json.loads(hostctl(vm, f"user show --json {USER}"))
    vm.run(f"hostctl user show {USER} && hostctl user remove {USER}", check=False, timeout=SLOW)


def test_hostd_runs_under_systemd_on_cgroup2(vm: Machine) -> None:
    assert read(vm, "/proc/1/comm") == "systemd"
    assert vm.sh("stat -fc %T /sys/fs/cgroup").strip() == "cgroup2fs"
    assert {"cpu", "memory", "pids"} <= set(read(vm, "/sys/fs/cgroup/cgroup.controllers").split())
    units = ["hostd", "hostd-tenants", "hostd-lxcfs"]
    assert vm.sh(f"systemctl is-active {' '.join(units)}").split() == ["active"] * 3
    # sd_notify: READY=1 (systemctl start returned), then STATUS= once reconciled.
    wait_for(
        lambda: vm.sh("systemctl show -p StatusText --value hostd").startswith("serving"),
        SLOW,
        "hostd's status to say it is serving",
        interval=1,
    )
    hostctl(vm, "status")


def test_limits_are_the_kernels(vm: Machine, tenant: Tenant, cgroup: str) -> None:
    assert read(vm, f"{cgroup}/memory.max") == str(MEMORY)
    assert read(vm, f"{cgroup}/memory.swap.max") == "0"  # memory + swap = memory
    assert read(vm, f"{cgroup}/pids.max") == str(PIDS)
    assert read(vm, f"{cgroup}/cpu.max") == f"{round(CPUS * 100_000)} 100000"
    # What a session runs is charged to the tenant as a whole, beside its systemd: not in the
    # inner init.scope, which that systemd caps at 15 % of the tenant's tasks.
    assert inside(vm, "cat /proc/self/cgroup").strip() == "0::/hostd-sessions"
    throttled = keyed(vm, f"{cgroup}/cpu.stat")["nr_throttled"]
    inside(vm, "timeout 5 sh -c 'while :; do :; done' || true")  # a CPU hog: cpu.max holds it
    assert keyed(vm, f"{cgroup}/cpu.stat")["nr_throttled"] > throttled


# Where hostd compresses a stopped tenant's backup (tests/integration/test_backups.py drives
# a backup on v1): its node, CPU weight, and whether it is left after.
BACKGROUND = b"""
import json, subprocess
from pathlib import Path
from hostd import config
from runtime.containers import Runtime
rt = Runtime(config.load().runtime_settings())
with rt.background() as prefix:
    cat = [*prefix, "cat", "/proc/self/cgroup"]
    line = subprocess.run(cat, capture_output=True, text=True, check=True).stdout.strip()
    node = Path("/sys/fs/cgroup" + line.removeprefix("0::"))
    weight = (node / "cpu.weight").read_text().strip()
print(json.dumps({"cgroup": line, "weight": weight, "left": node.exists()}))
"""


def test_hostds_background_work_weighs_least_beside_the_tenants(
    vm: Machine, tenant: Tenant
) -> None:
    """Beside the tenants in hostd-tenants.service (hostd.service weighs as much as all of
    them), with v2's least weight; made for the work, removed after it."""
    seen = json.loads(vm.sh(f"{VENV_PYTHON} -", input=BACKGROUND))
    assert seen == {"cgroup": f"0::{tenants_cgroup(vm)}/.background", "weight": "1", "left": False}


def test_inner_docker_makes_its_own_cgroups(
    vm: Machine, tenant: Tenant, cgroup: str, busybox_tar: Path
) -> None:
    # The tenant's init sits in a leaf: its node may then enable controllers for its children.
    assert inside(vm, "cat /proc/1/cgroup").strip() == "0::/init.scope"
    assert read(vm, f"{cgroup}/cgroup.procs") == ""
    assert {"memory", "pids"} <= set(read(vm, f"{cgroup}/cgroup.subtree_control").split())
    inside(vm, "docker import - busybox:local >/dev/null", True, busybox_tar.read_bytes())
    run = "docker run --rm --memory 64m busybox:local cat /sys/fs/cgroup/memory.max"
    out = inside(vm, run, True)
    assert out.strip() == str(64 * 2**20)
    cid = inside(vm, "docker run -d --memory 96m --pids-limit 50 busybox:local sleep 600", True)
    try:
        found = vm.sh(f"find {cgroup} -type d -name '*{cid.strip()}*'").split()
        assert len(found) == 1, found  # the inner container's cgroup, below the tenant's node
        assert read(vm, f"{found[0]}/memory.max") == str(96 * 2**20)
        assert read(vm, f"{found[0]}/pids.max") == "50"
    finally:
        inside(vm, f"docker rm -f {cid.strip()} >/dev/null", True)


def test_oom_is_contained(vm: Machine, tenant: Tenant, cgroup: str) -> None:
    hostd_pid = vm.sh("systemctl show -p MainPID --value hostd").strip()
    before = keyed(vm, f"{cgroup}/memory.events")["oom_kill"]
    hog = f"hostctl exec {USER} -- dd if=/dev/zero of=/dev/null bs={MEMORY * 3 // 2} count=1"
    res = vm.run(hog, check=False, timeout=SLOW)
    assert res.returncode == 137, res  # SIGKILL: its buffer is larger than the tenant's memory
    assert keyed(vm, f"{cgroup}/memory.events")["oom_kill"] > before
    kills = re.findall(r"oom-kill:.*", vm.sh("dmesg"))
    assert kills and all(f"oom_memcg={tenants_cgroup(vm)}/{USER}" in k for k in kills), kills
    assert vm.sh("systemctl show -p MainPID --value hostd").strip() == hostd_pid
    assert inside(vm, "systemctl is-system-running || true").strip() in ("running", "degraded")


def test_fork_bomb_hits_pids_max_and_the_host_answers(
    vm: Machine, tenant: Tenant, cgroup: str
) -> None:
    inside(vm, BOMB)
    # pids.peak, not pids.events: before Linux 6.2 a refused fork counts in the forking
    # task's own cgroup (a leaf below the tenant's), not where the limit is.
    wait_for(
        lambda: int(read(vm, f"{cgroup}/pids.peak")) == PIDS,
        SLOW,
        "the fork bomb to fill pids.max",
        interval=1,
    )
    assert vm.answers()
    (status,) = json.loads(hostctl(vm, f"status --json {USER}"))
    assert status["state"] == "running" and status["pids"] <= PIDS, status
    hostctl(vm, "status")  # hostd answers admins while the tenant is full


def test_stop_and_remove_leave_nothing(
    vm: Machine, tenant: Tenant, cgroup: str, subuid_before: str
) -> None:
    hostctl(vm, f"stop {USER}")  # the fork bomb is still running: stop ends it all
    assert vm.run(f"test -e {cgroup}", check=False).returncode == 1
    hostctl(vm, f"user remove {USER}")
    parent = tenants_cgroup(vm).lstrip("/")  # where hostd put its cgroups
    left = vm.sh(
        f"cd {MOUNT} && {VENV_PYTHON} -c "
        + shlex.quote(
            "import json; from pathlib import Path; from tests.hostd_harness import host_view;"
            f" v = host_view(Path('/var/lib/hostd'), ['{USER}'], '{parent}', 'hostd');"
            " print(json.dumps({'left': v.left(['" + USER + "']), 'dnat': sorted(v.dnat)}))"
        )
    )
    assert json.loads(left) == {"left": [], "dnat": []}
    # Its range stays registered, quarantined (never handed out again until released), under
    # hostd's own owner; nothing else changed.
    quarantined = f"hostd-ids:{tenant['tenant']['range_start']}:65536"
    after = vm.sh("cat /etc/subuid /etc/subgid").splitlines()
    assert sorted(after) == sorted([*subuid_before.splitlines(), quarantined, quarantined])
    assert vm.run(f"test -e {cgroup}", check=False).returncode == 1
