"""Runtime.volume_snapshot on real containers: a running one is frozen (cgroup and ext4) while
its volume is read, and runs again after; a stopped one is held unmounted; nothing that would
hang on a frozen container is let through; a runtime killed inside leaves a marker (and a
backup's background cgroup) that thaw_leftovers() clears."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import cgroups, mountinfo, snapshot, volume
from runtime.containers import Runtime
from runtime.errors import Busy, RuntimeFailure
from runtime.execs import ExecSpec
from runtime.ids import IdRange
from runtime.limits import Limits
from runtime.snapshot import ImportedVolume
from tests.conftest import CGROUP_PARENT, ContainerFactory, next_range, sh
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


def test_a_container_that_keeps_forking_freezes_every_time(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    """Its writer forks two programs a tick. A v1 freezer asked once could stay FREEZING for
    good under that (2 freezes in 40 here, and this file's first test in CI once): every
    snapshot of 40 freezes it now."""
    name = running_writer(rt, make_container)
    for _ in range(40):
        with rt.volume_snapshot(name) as snap:
            assert snap.consistency == "frozen" and cgroups.is_frozen(freezer(name))
    assert not cgroups.is_frozen(freezer(name))


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
    background = cgroups.background_plan(rt.cgroup_layout(), CGROUP_PARENT)
    assert cgroups.apply_background(background)  # as a backup killed with hostd leaves it
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
        assert not any(os.path.exists(d) for d in background.dirs)
        mine.unlink()
        before = tick(rt, name)
        wait_for(lambda: tick(rt, name) != before, 30, "the writer to run again")
        assert rt.thaw_leftovers() == []
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        rt.thaw_leftovers()  # never leave a container frozen, whatever failed


# -- export and import ---------------------------------------------------------------------

# Inner owners 0, 1000 and 4242, a setuid-root `id`, a hardlink, a file only user 1234 may
# read (by its ACL), a `cat` with cap_net_raw in its effective set (both set from the host
# below: the image has neither setfacl nor setcap).
FILES = """
set -e
mkdir -p /srv/t && cd /srv/t
touch root-file && install -o 1000 -g 1000 /dev/null user-file
echo data >4242-file && chown 4242:4242 4242-file && ln 4242-file 4242-link
cp /usr/bin/id suid-id && chmod 4755 suid-id
cp /bin/cat capcat
echo secret >acl-file && chmod 600 acl-file
"""
PROBE = """
cd /srv/t
stat -c '%n %u:%g %a %i %h' root-file user-file 4242-file 4242-link suid-id
"""
CAP_NET_RAW = 13


def set_xattrs(merged: Path, root: int) -> None:
    """What `setfacl -m u:1234:r acl-file` and `setcap cap_net_raw+ep capcat` would have
    written inside: the container's IDs as host IDs, a v3 capability rooted at its root."""
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, root + 1234), (0x04, 0, 0xFFFFFFFF)]
    entries += [(0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
    value = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(merged / "srv/t/acl-file", "system.posix_acl_access", value)
    cap = struct.pack("<IIIIII", 0x03000001, 1 << CAP_NET_RAW, 0, 0, 0, root)
    os.setxattr(merged / "srv/t/capcat", "security.capability", cap)


def as_user(rt: Runtime, name: str, uid: int, argv: list[str]) -> str:
    """Exit status and output of `argv` run by user `uid` inside, with no capability (an
    exec as another user than root keeps the container's in its ambient set)."""
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    res = rt.exec(name, ExecSpec([*setpriv, *argv]))
    return f"{res.returncode} {res.stdout.strip()}"


def cap_eff(rt: Runtime, name: str) -> int:
    """CapEff of capcat run by user 1000."""
    status = as_user(rt, name, 1000, ["/srv/t/capcat", "/proc/self/status"])
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff")), 16)


def export(rt: Runtime, name: str) -> tuple[Path, ImportedVolume]:
    """The container's volume through its chunks, in a staging file, as an import gets it."""
    c = rt.get(name)
    path = rt.staging_file()
    with rt.volume_snapshot(name) as snap, open(path, "wb") as out:
        for index, data in volume.data_chunks(snap.path, CHUNK):
            os.pwrite(out.fileno(), data, index * CHUNK)
        out.truncate(snap.size)
    return path, ImportedVolume(path, c.ids, Path(c.image_dir).name)


@pytest.fixture
def imported(rt: Runtime) -> Iterator[list[str]]:
    """Names of containers a test creates itself: deleted at teardown."""
    names: list[str] = []
    yield names
    for name in names:
        if rt.exists(name):
            rt.delete(name, force=True)


def in_range(root: Path, ids: IdRange) -> list[str]:
    """Paths below `root` owned by an ID outside `ids`."""
    wrong = []
    for top, dirs, files in os.walk(root):
        for n in dirs + files:
            st = os.lstat(os.path.join(top, n))
            if not (ids.start <= st.st_uid <= ids.end and ids.start <= st.st_gid <= ids.end):
                wrong.append(f"{os.path.join(top, n)} {st.st_uid}:{st.st_gid}")
    return wrong


def test_a_volume_imported_under_another_range_keeps_owners_bits_acls_and_caps(
    rt: Runtime, make_container: ContainerFactory, imported: list[str]
) -> None:
    src = make_container("exp", limits=DISK)
    sh(rt, src, FILES)
    set_xattrs(rt.records.dir(src) / "rootfs", rt.get(src).ids.root)
    assert cap_eff(rt, src) == 1 << CAP_NET_RAW  # what setcap inside makes, and it works
    assert as_user(rt, src, 1234, ["cat", "/srv/t/acl-file"]) == "0 secret"
    assert as_user(rt, src, 1235, ["cat", "/srv/t/acl-file"]).split()[0] != "0"
    before = sh(rt, src, PROBE)
    path, vol = export(rt, src)
    dst, ids = f"imp{os.getpid()}", next_range()
    imported.append(dst)
    c = rt.create(dst, "default", ids, limits=DISK, volume=vol)
    assert not path.exists() and c.ids == ids and Path(c.image_dir).name == vol.image_version
    rt.start(dst)
    rt.wait_ready(dst)
    assert sh(rt, dst, PROBE) == before  # owners, setuid bit, the hardlink's inode and count
    assert as_user(rt, dst, 1000, ["/srv/t/suid-id", "-u"]) == "0 0"
    assert cap_eff(rt, dst) == 1 << CAP_NET_RAW
    assert as_user(rt, dst, 1234, ["cat", "/srv/t/acl-file"]) == "0 secret"
    assert as_user(rt, dst, 1235, ["cat", "/srv/t/acl-file"]).split()[0] != "0"
    data = rt.records.dir(dst) / "data"
    for sub in ("upper", "docker", "containerd"):
        assert in_range(data / sub, ids) == []


def test_a_volume_from_another_image_version_has_its_upper_set_aside(
    rt: Runtime, make_container: ContainerFactory, imported: list[str]
) -> None:
    src = make_container("exp", limits=DISK)
    sh(rt, src, "echo mine >/root/kept")
    path, vol = export(rt, src)
    dst = f"imp{os.getpid()}"
    imported.append(dst)
    older = ImportedVolume(path, vol.ids, "default-older")
    rt.create(dst, "default", next_range(), limits=DISK, volume=older)
    data = rt.records.dir(dst) / "data"
    aside = [p for p in (data / "previous").iterdir()]
    assert len(aside) == 1 and (aside[0] / "root/kept").read_text() == "mine\n"
    assert list((data / "upper").iterdir()) == []


def leftovers(rt: Runtime, name: str) -> list[str]:
    """What of an import refused could be left: its directory, staging files, loop devices
    on the state dir, mounts below it."""
    found = [str(p) for p in (rt.state_dir / "staging").iterdir()]
    if rt.exists(name):
        found.append(str(rt.records.dir(name)))
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [ln for ln in loops.splitlines() if f"{rt.state_dir}/staging" in ln or name in ln]
    found += [m for m in mountinfo.mounts_under(str(rt.state_dir)) if "staging" in m or name in m]
    return found


@pytest.mark.parametrize("where", ["superblock", "inode table"])
def test_a_damaged_volume_is_refused_and_nothing_is_left(
    rt: Runtime, make_container: ContainerFactory, where: str
) -> None:
    src = make_container("exp", start=False, limits=DISK)
    path, vol = export(rt, src)
    offset = volume.SUPERBLOCK
    if where == "inode table":  # the first inode blocks (the root directory's among them)
        dump = subprocess.run(["dumpe2fs", str(path)], capture_output=True, text=True).stdout
        offset = int(dump.split("Inode table at ")[1].split("-")[0]) * volume.BLOCK
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xa5" * 4 * volume.BLOCK)
    dst = f"bad{os.getpid()}"
    with pytest.raises(RuntimeFailure) as err:
        rt.create(dst, "default", next_range(), limits=DISK, volume=vol)
    assert "the imported volume is damaged" in str(err.value) and "\n" not in str(err.value)
    assert leftovers(rt, dst) == []


def test_a_volume_larger_than_the_disk_limit_is_refused(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    src = make_container("exp", start=False, limits=DISK)
    path, vol = export(rt, src)
    dst = f"small{os.getpid()}"
    with pytest.raises(RuntimeFailure, match="is 256 MiB, more than the disk limit of 128 MiB"):
        rt.create(dst, "default", next_range(), limits=Limits(disk=128 * MiB), volume=vol)
    assert leftovers(rt, dst) == []
