"""lxcfs on the host: started once, serving each reader the figures of its own cgroup, and
stopped without leaving a mount or a process behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import lxcfs, mountinfo
from runtime.errors import RuntimeFailure
from tests.hostd_harness import wait_for

LIMIT = 256 * 2**20


@pytest.fixture
def mountpoint() -> Iterator[Path]:
    if shutil.which("lxcfs") is None:
        pytest.skip("lxcfs missing: apt-get install lxcfs fuse3")
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse missing: modprobe fuse")
    mp = Path(f"/run/hostd-test-lxcfs-{os.getpid()}")
    yield mp
    lxcfs.stop(mp)
    mp.with_name(mp.name + ".log").unlink(missing_ok=True)


def ours(mp: Path) -> list[int]:
    """lxcfs processes serving `mp`, found independently of the module."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            exe = os.readlink(f"/proc/{entry}/exe")
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if exe.endswith("/lxcfs") and str(mp).encode() in argv:
            found.append(int(entry))
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field."""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        number, *unit = value.split()
        fields[key] = int(number) * (1024 if unit == ["kB"] else 1)
    return fields


def test_lxcfs_serves_proc_files_and_stops_cleanly(mountpoint: Path) -> None:
    mp = mountpoint
    lxcfs.ensure_running(mp)
    assert lxcfs.is_mounted(mp)
    pids = ours(mp)
    assert len(pids) == 1
    assert os.getsid(pids[0]) == pids[0]  # a session of its own: no terminal signal reaches it
    assert _parent(pids[0]) != os.getpid()  # orphaned: never our zombie
    lxcfs.ensure_running(mp)  # already serving: nothing new is started
    assert ours(mp) == pids

    for name in lxcfs.PROC_FILES:  # all readable (diskstats may be empty for a fresh cgroup)
        (mp / "proc" / name).read_text()
    assert meminfo((mp / "proc/meminfo").read_text())["MemTotal"] > 0
    assert {b.destination for b in lxcfs.binds(mp)} == {
        *(f"/proc/{f}" for f in lxcfs.PROC_FILES),
        "/sys/devices/system/cpu/online",
    }

    lxcfs.stop(mp)
    assert not mountinfo.is_mounted(str(mp))
    assert ours(mp) == []
    assert not mp.exists()
    assert not mp.with_name(mp.name + ".pid").exists()
    lxcfs.stop(mp)  # idempotent


def test_a_process_in_a_memory_limited_cgroup_sees_its_limit(mountpoint: Path) -> None:
    v1 = Path("/sys/fs/cgroup/memory")  # this machine: hybrid, v1 controllers
    if v1.is_dir():
        cgroup, limit_file = v1 / mountpoint.name, "memory.limit_in_bytes"
    else:
        cgroup, limit_file = Path("/sys/fs/cgroup") / mountpoint.name, "memory.max"
    lxcfs.ensure_running(mountpoint)
    cgroup.mkdir()
    try:
        (cgroup / limit_file).write_text(str(LIMIT))
        out = subprocess.run(
            [
                "sh",
                "-c",
                'echo $$ > "$0/cgroup.procs" && exec cat "$1/proc/meminfo"',
                str(cgroup),
                str(mountpoint),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        cgroup.rmdir()  # the reader has exited: the cgroup is empty
    assert meminfo(out)["MemTotal"] == LIMIT


def test_a_crashed_lxcfs_is_replaced(mountpoint: Path) -> None:
    lxcfs.ensure_running(mountpoint)
    (pid,) = ours(mountpoint)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not ours(mountpoint), 5, "the killed lxcfs to be gone")
    with pytest.raises(OSError):  # the dead mount stays behind: ENOTCONN
        (mountpoint / "proc/meminfo").read_text()

    lxcfs.ensure_running(mountpoint)
    assert meminfo((mountpoint / "proc/meminfo").read_text())["MemTotal"] > 0
    assert ours(mountpoint) not in ([], [pid])


def test_the_start_waits_on_lxcfs_itself_not_on_its_argv(
    mountpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a process execs, its cmdline reads empty: a start that looked for lxcfs by its
    argv took that moment for a failed start ("did not start: no output", seen in CI). Here
    every scan of /proc falls in that moment."""
    monkeypatch.setattr(lxcfs, "_processes", lambda: iter(()))
    lxcfs.ensure_running(mountpoint)
    monkeypatch.undo()
    assert lxcfs.is_mounted(mountpoint) and len(ours(mountpoint)) == 1


def test_a_failed_start_says_why_and_leaves_nothing(mountpoint: Path) -> None:
    pidfile = mountpoint.with_name(mountpoint.name + ".pid")
    with open(pidfile, "w") as held:  # as if another lxcfs held our pid file
        fcntl.lockf(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeFailure, match="already locked"):
            lxcfs.ensure_running(mountpoint)
    assert not lxcfs.is_mounted(mountpoint)
    assert ours(mountpoint) == []
    assert not mountpoint.exists()
