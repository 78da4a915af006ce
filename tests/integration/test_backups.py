"""Scheduled backups against a real hostd: `hostctl backup run`, list, restore after `user
remove`, retention, a failing tenant, a hostd killed mid-backup, and the units."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime import cgroups, mountinfo
from tests.conftest import CGROUP_PARENT
from tests.hostd_harness import Hostd, UnixUsers, wait_for

UNITS = Path(__file__).parents[2] / "packaging/systemd"
MARK = "/var/tmp/hostd-backup-test"  # a file written inside, on the tenant's volume


@pytest.fixture(scope="module")
def backups(hostd: Hostd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """hostd with [backup] dir set (keep one chain, a full every second run)."""
    where = tmp_path_factory.mktemp("backups") / "dir"
    with hostd.configured("backup", f'[backup]\ndir = "{where}"\nkeep = 1\nfull_every = 2\n'):
        yield where


@contextlib.contextmanager
def tenant(hostd: Hostd, unix_users: UnixUsers, running: bool, mark: str) -> Iterator[str]:
    """A tenant made with `hostctl user add`, with `mark` in MARK; stopped unless `running`;
    removed at the end."""
    user = unix_users.make()
    hostd.hostctl("user", "add", user, "--disk", "2G")
    try:
        hostd.hostctl("start", user)
        write(hostd, user, mark)
        if not running:
            hostd.hostctl("stop", user)
        yield user
    finally:
        hostd.hostctl("user", "remove", user, check=False)


def write(hostd: Hostd, user: str, text: str) -> None:
    hostd.hostctl("exec", user, "--", "sh", "-c", f"echo {text} > {MARK} && sync")


def read(hostd: Hostd, user: str) -> str:
    return hostd.hostctl("exec", user, "--", "cat", MARK).stdout.strip()


def run(hostd: Hostd, *users: str, check: bool = True) -> list[dict[str, Any]]:
    res = hostd.hostctl("backup", "run", *users, "--json", check=False)
    if check:
        assert res.returncode == 0, res.stderr
    results: list[dict[str, Any]] = json.loads(res.stdout)
    return results


def listing(hostd: Hostd, user: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(hostd.hostctl("backup", "list", user, "--json").stdout)
    return found


def files(backups: Path, user: str) -> list[str]:
    return sorted(os.listdir(backups / user))


def test_run_incremental_and_restore_after_remove(
    hostd: Hostd, unix_users: UnixUsers, backups: Path
) -> None:
    with (
        tenant(hostd, unix_users, True, "one") as up,
        tenant(hostd, unix_users, False, "two") as down,
    ):
        noise = "head -c 8M /dev/urandom > /var/tmp/noise && sync"
        hostd.hostctl("exec", up, "--", "sh", "-c", noise)  # what the incremental leaves out
        first = run(hostd, up, down)
        assert [(r["user"], r["archive"]["kind"]) for r in first] == [
            (up, "full"),
            (down, "full"),
        ]
        assert hostd.hostctl("status", up, "--json").stdout.count('"running"') == 1  # thawed
        write(hostd, up, "changed")
        (incr,) = run(hostd, up)
        assert incr["archive"]["kind"] == "incremental"
        assert incr["archive"]["size"] < first[0]["archive"]["size"] / 4
        chain = listing(hostd, up)
        assert [b["kind"] for b in chain] == ["full", "incremental"]
        assert {b["chain"] for b in chain} == {chain[0]["name"]}
        out = hostd.hostctl("backup", "list").stdout
        assert up in out and down in out and "CHAIN" in out

        hostd.hostctl("user", "remove", up)
        hostd.hostctl("user", "remove", down)
        hostd.hostctl("backup", "restore", up)
        assert read(hostd, up) == "changed"  # the latest, through the incremental
        hostd.hostctl("backup", "restore", down, "--no-start")
        assert json.loads(hostd.hostctl("status", down, "--json").stdout)[0]["state"] == "stopped"
        hostd.hostctl("start", down)
        assert read(hostd, down) == "two"
        # the first state of `up`, as another user: the chain up to the full one
        other = unix_users.make()
        hostd.hostctl("backup", "restore", up, "--as", other, "--at", chain[0]["created"])
        try:
            assert read(hostd, other) == "one"
        finally:
            hostd.hostctl("user", "remove", other)


def test_retention_keep_1_full_every_2_over_5_runs(
    hostd: Hostd, unix_users: UnixUsers, backups: Path
) -> None:
    with tenant(hostd, unix_users, False, "kept") as user:
        names = []
        for _ in range(5):
            (r,) = run(hostd, user)
            names.append(r["archive"]["name"])
        assert [n.rsplit("-", 1)[1] for n in names] == [
            "full.hostd",
            "incr.hostd",
            "full.hostd",
            "incr.hostd",
            "full.hostd",
        ]
        stem = names[-1].removesuffix(".hostd")
        assert files(backups, user) == [f"{stem}.hostd", f"{stem}.manifest.json"]
        assert [b["name"] for b in listing(hostd, user)] == [names[-1]]


def test_a_failing_tenant_does_not_stop_the_other(
    hostd: Hostd, unix_users: UnixUsers, backups: Path
) -> None:
    with (
        tenant(hostd, unix_users, False, "a") as bad,
        tenant(hostd, unix_users, False, "b") as good,
    ):
        volume = hostd.state_dir / "containers" / bad / "data.img"
        volume.rename(volume.with_suffix(".away"))  # the volume is gone: its backup fails
        try:
            res = hostd.hostctl("backup", "run", bad, good, check=False)
        finally:
            volume.with_suffix(".away").rename(volume)
        assert res.returncode == 1
        assert f"{bad}: FAILED: " in res.stdout and f"{good}: full " in res.stdout
        assert f"backup failed for {bad}" in res.stderr
        assert listing(hostd, bad) == [] and len(listing(hostd, good)) == 1
        assert [n for n in files(backups, bad) if not n.startswith(".")] == files(backups, bad)


def test_hostd_killed_mid_backup_leaves_no_archive_to_restore(
    hostd: Hostd, unix_users: UnixUsers, backups: Path
) -> None:
    with tenant(hostd, unix_users, True, "before") as user:
        (first,) = run(hostd, user)
        write(hostd, user, "after")
        # 256 MB a backup takes a while to read: time to kill hostd in the middle
        fill = "head -c 256M /dev/urandom > /var/tmp/noise && sync"
        hostd.hostctl("exec", user, "--", "sh", "-c", fill)
        client = subprocess.Popen(
            hostd.hostctl_argv("backup", "run", user),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:

            def half_written() -> bool:
                tmp = [n for n in os.listdir(backups / user) if n.endswith(".tmp")]
                return bool(tmp) and (backups / user / tmp[0]).stat().st_size > 0

            wait_for(half_written, 120, "a half-written archive", interval=0.005)
            assert hostd.proc is not None
            hostd.stop(signal.SIGKILL)
        finally:
            client.wait(60)
        assert client.returncode == 1
        hostd.start()
        # the tenant is not left frozen
        assert read(hostd, user) == "after"
        assert [b["name"] for b in listing(hostd, user)] == [first["archive"]["name"]]
        hostd.hostctl("user", "remove", user)
        hostd.hostctl("backup", "restore", user, "--no-start")
        hostd.hostctl("start", user)
        assert read(hostd, user) == "before"
        (again,) = run(hostd, user)  # and the next run clears what the killed one left
        assert not [n for n in files(backups, user) if n.endswith(".tmp")]
        assert again["archive"]["kind"] == "incremental"


def _child(hostd: Hostd, comm: str) -> tuple[str, int, int] | None:
    """The cpu cgroup, uid and effective capabilities of hostd's child running `comm`, while
    there is one."""
    assert hostd.proc is not None
    children: list[str] = []
    for task in Path(f"/proc/{hostd.proc.pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError):  # a thread that has just ended
            children += task.read_text().split()
    for pid in children:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
                uid = int(next(ln for ln in status if ln.startswith("Uid:")).split()[2])
                caps = int(next(ln for ln in status if ln.startswith("CapEff:")).split()[1], 16)
                fields = [line.split(":", 2) for line in lines]
                cpu = [path for _, names, path in fields if "cpu" in names.split(",")]
                return (cpu or [path for _, names, path in fields if not names])[0], uid, caps
    return None


def test_a_stopped_tenants_backup_waits_for_what_busy_tenants_leave(
    hostd: Hostd, unix_users: UnixUsers, backups: Path
) -> None:
    """SCHED_IDLE alone counts only among hostd's own threads, and hostd's session (or unit)
    weighs as much as all the tenants or more: the compression, and the home's tar run as the
    user, go beside the tenants, with the least CPU weight there is."""
    cpus = os.cpu_count() or 1
    busy = unix_users.make()
    hostd.hostctl("user", "add", busy, "--disk", "1G", "--cpus", str(cpus))
    try:
        with (
            hostd.configured("home", "[backup]\nwith_home = true\n"),
            tenant(hostd, unix_users, True, "data") as down,
        ):
            fill = "head -c 64M /dev/urandom > /var/tmp/noise && sync"
            hostd.hostctl("exec", down, "--", "sh", "-c", fill)
            hostd.hostctl("stop", down)
            pw = pwd.getpwnam(down)
            # 2 GB of zeros for tar to read (a sparse file): seconds of tar to look at
            subprocess.run(["truncate", "-s", "2G", f"{pw.pw_dir}/zeros"], check=True, user=down)
            hostd.hostctl("start", busy)
            spin = f"for i in $(seq {cpus}); do setsid sh -c 'while :; do :; done' & done"
            hostd.hostctl("exec", busy, "--", "sh", "-c", f"{spin} >/dev/null 2>&1")
            client = subprocess.Popen(
                hostd.hostctl_argv("backup", "run", down, "--json"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            behind = f"/{CGROUP_PARENT}/.background"
            try:
                zstd = wait_for(lambda: _child(hostd, "zstd"), 60, "hostd's zstd child")
                assert zstd[:2] == (behind, 0)
                (root,) = [
                    h.root
                    for h in cgroups.detect(mountinfo.current()).hierarchies
                    if "cpu" in h.controllers
                ] or ["/sys/fs/cgroup"]
                node = Path(f"{root}{behind}")
                weight = {
                    f: (node / f).read_text().strip()
                    for f in ("cpu.shares", "cpu.weight")
                    if (node / f).exists()
                }
                assert weight in ({"cpu.shares": "2"}, {"cpu.weight": "1"})  # v1's or v2's least
            finally:
                hostd.hostctl("stop", busy)  # the backup then goes at full speed
            try:  # after the volume, the home: tar as the user, still behind
                tar = wait_for(lambda: _child(hostd, "tar"), 60, "hostd's tar child")
                assert tar == (behind, pw.pw_uid, 0)  # the user, without root's capabilities
            finally:
                out, err = client.communicate(timeout=120)
            assert client.returncode == 0, err
            (result,) = json.loads(out)
            assert result["archive"]["kind"] == "full"
            assert not node.exists()  # removed by its last user
    finally:
        hostd.hostctl("user", "remove", busy, check=False)


def test_the_units_run_a_backup_daily_at_idle_io() -> None:
    """What the units say (test_hostd's unit test runs systemd-analyze verify on all of them)."""
    backup = (UNITS / "hostd-backup.service").read_text()
    assert "Type=oneshot" in backup and "backup run" in backup
    assert "IOSchedulingClass=idle" in backup and "Requires=hostd.service" in backup
    timer = (UNITS / "hostd-backup.timer").read_text()
    assert "OnCalendar=daily" in timer and "Persistent=true" in timer
