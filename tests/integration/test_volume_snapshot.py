"""Runtime.volume_snapshot on real containers: a running one is frozen (cgroup and ext4) while
its volume is read, and runs again after; a stopped one is held unmounted; nothing that would
hang on a frozen container is let through; a runtime killed inside leaves a marker that
thaw_leftovers() clears."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime import cgroups, mountinfo, snapshot, volume
from runtime.containers import Runtime
from runtime.errors import Busy
from runtime.limits import Limits
from tests.conftest import CGROUP_PARENT, ContainerFactory, sh
from tests.hostd_harness import wait_for

MiB = 2**20
DISK = Limits(disk=256 * MiB)
CHUNK = 4 * MiB
# Counts in a loop and writes every count to the volume: the counter stands still only
# while none of the container's processes runs.
WRITER = (
    "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i >/root/tick.new; mv /root/tick.new "
    "/root/tick; head -c 4096 /dev/urandom >>/root/log; done' >/dev/null 2>&1 &"
)


def freezer(name: str) -> cgroups.Freezer:
    return cgroups.freezer(cgroups.detect(mountinfo.current()), CGROUP_PARENT, name)


def tick(rt: Runtime, name: str) -> str:
    return (rt.records.dir(name) / "data/upper/root/tick").read_text()


def fs_frozen(data: Path) -> bool:
    """Whether the ext4 mounted at `data` is frozen: FIFREEZE of a frozen one is EBUSY (of a
    thawed one it succeeds, and is undone at once)."""
    fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, snapshot.FIFREEZE, 0)
        fcntl.ioctl(fd, snapshot.FITHAW, 0)
        return False
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        raise
    finally:
        os.close(fd)


def rebuild(src: Path, size: int, dest: Path) -> None:
    """An image from the chunks an export would take of `src`."""
    with open(dest, "wb") as out:
        out.truncate(size)
        for index, data in volume.data_chunks(src, CHUNK):
            os.pwrite(out.fileno(), data, index * CHUNK)


def running_writer(rt: Runtime, make_container: ContainerFactory) -> str:
    name = make_container("snap", limits=DISK)
    sh(rt, name, WRITER)
    wait_for(lambda: tick(rt, name).strip(), 30, "the writer's first tick", ignore=(OSError,))
    return name


def test_a_running_container_is_frozen_for_the_copy_and_runs_after(
    rt: Runtime, make_container: ContainerFactory, tmp_path: Path
) -> None:
    name = running_writer(rt, make_container)
    cdir = rt.records.dir(name)
    with rt.volume_snapshot(name) as snap:
        assert snap.consistency == "frozen"
        assert cgroups.is_frozen(freezer(name)) and fs_frozen(cdir / "data")
        assert (cdir / snapshot.MARKER).exists()
        before = tick(rt, name)
        rebuild(snap.path, snap.size, tmp_path / "copy.img")
        assert tick(rt, name) == before  # none of its processes ran during the whole copy
        for busy in (
            lambda: rt.stop(name, timeout=0),
            lambda: rt.delete(name, force=True),
            lambda: rt.start(name),
            lambda: rt.volume_snapshot(name).__enter__(),
        ):
            with pytest.raises(Busy):
                busy()
    fsck = subprocess.run(["e2fsck", "-fn", str(tmp_path / "copy.img")], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode()
    assert not (cdir / snapshot.MARKER).exists() and not fs_frozen(cdir / "data")
    wait_for(lambda: tick(rt, name) != before, 30, "the writer to run again")
    assert list((rt.state_dir / "staging").iterdir()) == []  # no clone left


def test_an_exception_inside_thaws_the_container(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    name = running_writer(rt, make_container)
    with pytest.raises(RuntimeError), rt.volume_snapshot(name):
        raise RuntimeError("the export failed")
    assert not cgroups.is_frozen(freezer(name))
    assert not fs_frozen(rt.records.dir(name) / "data")
    before = tick(rt, name)
    wait_for(lambda: tick(rt, name) != before, 30, "the writer to run again")


def test_a_stopped_container_is_held_unmounted(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    name = make_container("snap", start=False, limits=DISK)
    cdir = rt.records.dir(name)
    with rt.volume_snapshot(name) as snap:
        assert snap.consistency == "stopped" and snap.path == cdir / "data.img"
        assert snap.size == DISK.disk and not volume.mounted(cdir / "data")
        with pytest.raises(Busy):
            rt.start(name)
        assert rt.state(name).status == "stopped" and not volume.mounted(cdir / "data")
    rt.start(name)  # free again
    assert rt.state(name).status == "running"


KILLED_INSIDE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from runtime.containers import Runtime
    from runtime.settings import Settings
    rt = Runtime(Settings(Path(sys.argv[1]), cgroup_parent=sys.argv[2]))
    with rt.volume_snapshot(sys.argv[3]):
        print("frozen", flush=True)
        time.sleep(600)
    """
)


def test_a_runtime_killed_while_frozen_is_thawed_at_the_next_start(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    name = running_writer(rt, make_container)
    cdir = rt.records.dir(name)
    (rt.state_dir / "staging").mkdir(mode=0o700, exist_ok=True)
    stale = rt.state_dir / "staging" / "99999999-0123"  # above pid_max: its process is gone
    stale.write_bytes(b"x")
    argv = [sys.executable, "-c", KILLED_INSIDE, str(rt.state_dir), CGROUP_PARENT, name]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    try:
        assert child.stdout is not None and child.stdout.readline() == b"frozen\n"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert (cdir / snapshot.MARKER).exists() and cgroups.is_frozen(freezer(name))
        assert fs_frozen(cdir / "data")
        mine = rt.staging_file()  # a live process's staging file stays
        assert rt.thaw_leftovers() == [name]
        assert not (cdir / snapshot.MARKER).exists() and not cgroups.is_frozen(freezer(name))
        assert not fs_frozen(cdir / "data") and not stale.exists() and mine.exists()
        mine.unlink()
        before = tick(rt, name)
        wait_for(lambda: tick(rt, name) != before, 30, "the writer to run again")
        assert rt.thaw_leftovers() == []
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        rt.thaw_leftovers()  # never leave a container frozen, whatever failed
