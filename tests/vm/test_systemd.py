"""hostd's package under a real systemd, as an admin meets it: `systemctl start` returns once
hostd is ready, its records are in the journal with their fields, tenants live in
hostd-tenants.service's cgroup and outlive restarts of hostd (systemctl, reinstall, upgrade,
watchdog), lxcfs runs as a unit of its own, and a host shutdown halts tenants cleanly, the
next boot starting them again. The tests run in file order on one tenant, the reboot last.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostd.config import ID_OWNER
from tests.hostd_harness import wait_for
from tests.vm import install
from tests.vm.machine import Machine

USER = "bob"  # an account of the throwaway VM
MEMORY_MIB = 512
SLOW = 600  # seconds: bounds only, for anything under emulation
RUNC = "runc --root /var/lib/hostd/runc"  # runtime.containers: <state_dir>/runc
WATCHDOG = "/run/systemd/system/hostd.service.d/hostd-vm-watchdog.conf"


def hostctl(vm: Machine, line: str, input: bytes | None = None) -> str:
    return vm.sh(f"hostctl {line}", input=input, timeout=SLOW)


def inside(vm: Machine, script: str, input: bytes | None = None) -> str:
    """A shell script in the tenant's container, as the user."""
    line = f"exec --user {USER} {USER} -- sh -c {shlex.quote(script)}"
    return hostctl(vm, line, input=input)


def show(vm: Machine, unit: str, *props: str) -> dict[str, str]:
    out = vm.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines())


def init_pid(vm: Machine) -> int:
    """The tenant's init as runc knows it (0 when not running)."""
    res = vm.run(f"{RUNC} state {USER}", check=False)
    if res.returncode != 0:
        return 0
    state = json.loads(res.stdout)
    return int(state["pid"]) if state["status"] == "running" else 0


@dataclass(frozen=True)
class Kept:
    """What a restart of hostd must leave as it was."""

    init: int
    container: str  # the inner Docker's running container
    host_key: str  # the gateway's, as a client sees it
    ranges: list[str]  # the lines of /etc/subuid and /etc/subgid


def kept(vm: Machine) -> Kept:
    key = vm.sh("ssh-keyscan -T 60 -t ed25519 -p 2222 127.0.0.1 2>/dev/null").split()[1:]
    ranges = vm.sh("cat /etc/subuid /etc/subgid").splitlines()
    return Kept(init_pid(vm), inside(vm, "docker ps -q --no-trunc").strip(), " ".join(key), ranges)


Report = Callable[[str], None]  # the `measured` fixture


def restarted(vm: Machine, before: Kept, what: str, began: float, measured: Report) -> None:
    """hostd answers again after `what`, and the tenant is as it was."""
    hostctl(vm, "status")
    measured(f"{what}: hostd answering again after {time.monotonic() - began:.0f} s")
    assert kept(vm) == before


@pytest.fixture(scope="module")
def tenant(vm: Machine, busybox_tar: Path) -> Iterator[Kept]:
    """The tenant, started, its Docker running a container, its journal kept on disk (so a
    reboot's shutdown can be read after it); what must outlive restarts of hostd."""
    vm.sh(f"id {USER} >/dev/null 2>&1 || useradd -m -s /bin/bash {USER}")
    hostctl(vm, f"user add {USER} --memory {MEMORY_MIB}M --cpus 1 --disk 4G")
    hostctl(vm, f"start {USER}")
    hostctl(vm, f"exec {USER} -- sh -c 'mkdir -p /var/log/journal && journalctl --flush'")
    inside(vm, "docker import - busybox:local >/dev/null", busybox_tar.read_bytes())
    inside(vm, "docker run -d --restart unless-stopped busybox:local sleep 1d >/dev/null")
    yield kept(vm)
    vm.run(f"hostctl user show {USER} && hostctl user remove {USER}", check=False, timeout=SLOW)


def test_start_returns_ready_and_logs_to_the_journal(vm: Machine, measured: Report) -> None:
    vm.sh("systemctl stop hostd")
    began = time.monotonic()
    vm.sh("systemctl start hostd", timeout=SLOW)  # Type=notify: returns on READY=1
    measured(f"systemctl start hostd returned after {time.monotonic() - began:.0f} s")
    state = show(vm, "hostd", "ActiveState", "SubState", "StatusText", "MainPID")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert state["StatusText"], state  # STATUS= before READY=1: reconciling, then serving
    status = vm.run("systemctl status --no-pager -n 20 hostd", check=False).stdout
    assert f"Main PID: {state['MainPID']}" in status and "Status: " in status, status
    assert f"hostd[{state['MainPID']}]" in status, status  # its records, from the journal
    records = [json.loads(line) for line in vm.sh("journalctl -b -u hostd -o json").splitlines()]
    mine = [r for r in records if r.get("_PID") == state["MainPID"]]
    assert mine, records[-5:]
    assert all(r["SYSLOG_IDENTIFIER"] == "hostd" for r in mine), mine
    assert {"6"} <= {r["PRIORITY"] for r in mine}, mine  # info, as logging's level says
    assert all(r["LOGGER"] and r["CODE_FUNC"] for r in mine), mine  # logging's own fields
    assert "hostd" in {r["LOGGER"] for r in mine}, mine


def test_a_tenant_lives_in_hostd_tenants_service(vm: Machine, tenant: Kept) -> None:
    parent = install.tenants_cgroup(vm)
    assert parent == "/hostd.slice/hostd-tenants.service"
    assert vm.sh(f"cat /proc/{tenant.init}/cgroup").strip() == f"0::{parent}/{USER}/init.scope"
    hostd_cgroup = show(vm, "hostd", "ControlGroup")["ControlGroup"]
    procs = vm.sh(f"cat /sys/fs/cgroup{hostd_cgroup}/cgroup.procs").split()
    assert procs == [show(vm, "hostd", "MainPID")["MainPID"]]  # hostd alone in its unit
    listed = vm.sh("systemctl status --no-pager -l hostd-tenants")
    assert f"{tenant.init} " in listed and USER in listed, listed
    # The inner Docker's container: its cgroup below the tenant's
    found = vm.sh(f"find /sys/fs/cgroup{parent}/{USER} -type d -name '*{tenant.container}*'")
    assert len(found.split()) == 1, found


def test_tenants_survive_systemctl_restart(vm: Machine, tenant: Kept, measured: Report) -> None:
    began = time.monotonic()
    vm.sh("systemctl restart hostd", timeout=SLOW)
    restarted(vm, tenant, "systemctl restart hostd", began, measured)


def test_tenants_survive_reinstall(vm: Machine, tenant: Kept, measured: Report) -> None:
    began = time.monotonic()
    install.apt_install(vm, install.version(), "--reinstall")
    restarted(vm, tenant, "apt-get install --reinstall", began, measured)


def test_an_upgrade_keeps_tenants_and_migrates_old_subid_lines(
    vm: Machine, tenant: Kept, measured: Report
) -> None:
    """The upgrade finds the tenant's range under the user's name, as a hostd from before the
    dedicated owner left it, and the new hostd moves it to that owner at its start."""
    start = json.loads(hostctl(vm, f"user show --json {USER}"))["tenant"]["range_start"]
    line = f"{ID_OWNER}:{start}:65536"
    assert vm.sh(f"grep -c '^{line}$' /etc/subuid /etc/subgid").split() == [
        "/etc/subuid:1",
        "/etc/subgid:1",
    ]
    vm.sh("systemctl stop hostd")
    vm.sh(f"sed -i 's/^{line}$/{USER}:{start}:65536/' /etc/subuid /etc/subgid")
    began = time.monotonic()
    install.apt_install(vm, install.upgrade_version())
    restarted(vm, tenant, "upgrade", began, measured)
    assert vm.sh("dpkg-query -W -f '${Version}' hostd") == install.upgrade_version()
    moved = f"IDs {start}-{start + 65535} of {USER} moved to owner {ID_OWNER}"
    assert moved in vm.sh("journalctl -b -u hostd -o cat")


def test_the_watchdog_restarts_a_hung_hostd(vm: Machine, tenant: Kept, measured: Report) -> None:
    vm.sh(f"mkdir -p {Path(WATCHDOG).parent} && printf '[Service]\\nWatchdogSec=5s\\n' >{WATCHDOG}")
    try:
        vm.sh("systemctl daemon-reload && systemctl restart hostd", timeout=SLOW)
        before = show(vm, "hostd", "MainPID", "NRestarts")
        began = time.monotonic()
        vm.sh(f"kill -STOP {before['MainPID']}")

        def replaced() -> bool:
            now = show(vm, "hostd", "MainPID", "NRestarts", "ActiveState")
            return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])

        wait_for(replaced, SLOW, "systemd to replace the hung hostd", interval=1)
        after = show(vm, "hostd", "NRestarts")
        assert int(after["NRestarts"]) > int(before["NRestarts"])
        assert "watchdog" in vm.sh("journalctl -b -u hostd -o cat | grep -i watchdog")
        restarted(vm, tenant, "watchdog", began, measured)
    finally:
        vm.sh(
            f"rm -f {WATCHDOG} && systemctl daemon-reload && systemctl restart hostd", timeout=SLOW
        )


def test_lxcfs_runs_as_its_own_unit(vm: Machine, tenant: Kept) -> None:
    main = show(vm, "hostd-lxcfs", "MainPID")["MainPID"]
    assert vm.sh("cat /var/lib/hostd/lxcfs.pid").strip() == main
    assert vm.sh("findmnt -no FSTYPE /var/lib/hostd/lxcfs").strip() == "fuse.lxcfs"
    # every lxcfs on the host is a unit's: Debian's lxcfs.service or hostd-lxcfs.service
    units = vm.sh("for p in $(pgrep -x lxcfs); do cat /proc/$p/cgroup; done").split()
    assert sorted(set(units)) == ["0::/system.slice/hostd-lxcfs.service"] + (
        ["0::/system.slice/lxcfs.service"] if len(set(units)) == 2 else []
    ), units
    assert vm.sh("nproc").strip() == "2"
    assert inside(vm, "nproc").strip() == "1"  # --cpus 1
    total = int(inside(vm, "free -b | awk '/^Mem:/ {print $2}'"))
    assert total == MEMORY_MIB * 2**20


def test_systemctl_stop_leaves_tenants_running(vm: Machine, tenant: Kept) -> None:
    vm.sh("systemctl stop hostd")
    try:
        assert vm.sh("systemctl is-active hostd-tenants").strip() == "active"
        assert init_pid(vm) == tenant.init
    finally:
        vm.sh("systemctl start hostd", timeout=SLOW)
    assert kept(vm) == tenant


def test_a_host_shutdown_halts_tenants_and_boot_starts_them(
    vm: Machine, tenant: Kept, measured: Report
) -> None:
    down, up = vm.reboot()
    measured(f"reboot: shut down in {down:.0f} s, booted in {up:.0f} s")
    vm.sh("systemctl is-active hostd hostd-tenants hostd-lxcfs")
    wait_for(lambda: init_pid(vm) != 0, SLOW, "hostd to start the tenant again", interval=2)
    # The halt of the previous boot: the unit stopped without a timeout, the tenant halted
    halt = [
        json.loads(line) for line in vm.sh("journalctl -b -1 -u hostd-tenants -o json").splitlines()
    ]
    texts = [r["MESSAGE"] for r in halt]
    assert any(t.endswith(f" {USER}: halted") for t in texts), texts
    assert not any("timed out" in t or "Failed" in t for t in texts), texts
    stamps = {r["MESSAGE"].split()[0]: int(r["__REALTIME_TIMESTAMP"]) for r in halt}
    took = (stamps["Stopped"] - stamps["Stopping"]) / 1e6
    measured(f"shutdown: tenants halted in {took:.0f} s")
    assert took < 300  # TimeoutStopSec of hostd-tenants.service
    # Its systemd stopped its Docker before it went down.
    # (all its journal files: a container's boot may get a new machine ID, so -b -1 of the
    # current one may not exist; nothing else stopped its Docker in this module)
    inner = hostctl(vm, f"exec {USER} -- journalctl -m -u docker -o cat")  # root inside
    files = hostctl(vm, f"exec {USER} -- ls -R /var/log/journal")
    assert "Stopped docker.service" in inner or "Stopped Docker" in inner, (inner, files)
    wait_for(  # a docker call that cannot connect yet (before docker.socket) is "not yet"
        lambda: inside(vm, "docker ps -q --no-trunc").strip() == tenant.container,
        SLOW,
        "the inner container to run again (--restart unless-stopped)",
        interval=2,
        ignore=(AssertionError,),
    )
