"""Attacks through an imported data volume (an archive is input, never trusted): links the
ID shift or the runtime could follow to host files, device nodes, a setuid file owned by an ID
outside the range it was exported under (left to that ID, which is nobody inside, and its
setuid bit cleared), links at the top of the volume where the runtime binds or mounts."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import volume
from runtime.containers import Runtime
from runtime.errors import RuntimeFailure
from runtime.execs import ExecSpec
from runtime.limits import Limits
from runtime.snapshot import ImportedVolume
from tests.conftest import ContainerFactory, next_range, sh
from tests.integration.test_volume_snapshot import export, leftovers

DISK = Limits(disk=256 * 2**20)
# Root inside plants links to host paths in its own files, hoping the import's chown follows
PLANT = "ln -s /etc/shadow /root/shadow-link && ln -s /etc /root/etc-link && ln -s / /root/top"


@contextlib.contextmanager
def crafted(path: Path, where: Path) -> Iterator[Path]:
    """The exported volume mounted, to change what no container could make."""
    where.mkdir()
    volume.mount(path, where, "loop,nosuid,nodev,noexec")
    try:
        yield where
    finally:
        volume.unmount(where)


def owner(path: str | Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, st.st_mode


@pytest.fixture
def imported(rt: Runtime) -> Iterator[str]:
    name = f"evil{os.getpid()}"
    yield name
    if rt.exists(name):
        rt.delete(name, force=True)


def test_links_and_a_strangers_setuid_file_do_not_reach_the_host(
    rt: Runtime, make_container: ContainerFactory, imported: str, tmp_path: Path
) -> None:
    src = make_container("evil", limits=DISK)
    sh(rt, src, PLANT)
    path, vol = export(rt, src)
    canary = tmp_path / "canary"
    canary.write_text("canary\n")
    with crafted(path, tmp_path / "mnt") as mnt:
        os.mknod(mnt / "upper/root/gone", stat.S_IFCHR, 0)  # a whiteout, as overlayfs makes
        shutil.copy("/usr/bin/id", mnt / "upper/root/rootid")  # host root's, setuid
        os.chown(mnt / "upper/root/rootid", 0, 0)
        os.chmod(mnt / "upper/root/rootid", 0o4755)
        os.unlink(mnt / "console.log")
        os.symlink(canary, mnt / "console.log")  # truncated by a start that follows it
    before = {p: owner(p) for p in ("/etc/shadow", "/etc", "/", canary)}

    rt.create(imported, "default", next_range(), limits=DISK, volume=vol)
    rt.start(imported)
    rt.wait_ready(imported)

    assert {p: owner(p) for p in before} == before  # no link was followed by the shift
    assert canary.read_text() == "canary\n"  # nor by the start's console log
    upper = rt.records.dir(imported) / "data/upper/root"
    assert owner(upper / "rootid")[:2] == (0, 0)  # not turned into the new range's root
    assert not owner(upper / "rootid")[2] & (stat.S_ISUID | stat.S_ISGID)
    assert sh(rt, imported, "stat -c %u:%g /root/rootid") == "65534:65534\n"  # nobody inside
    res = rt.exec(
        imported,
        ExecSpec(
            ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "/root/rootid", "-u"]
        ),
    )
    assert res.stdout.strip() == "1000"
    assert sh(rt, imported, "stat -c %u /root/shadow-link /root/top") == "0\n0\n"


@pytest.mark.parametrize(
    ("node", "kind"),
    [("loop-control", stat.S_IFCHR), ("disk", stat.S_IFBLK)],
)
def test_a_device_node_in_the_volume_is_refused(
    rt: Runtime,
    make_container: ContainerFactory,
    imported: str,
    tmp_path: Path,
    node: str,
    kind: int,
) -> None:
    """No container can make a device node, and its devices cgroup lets any be opened (the
    inner Docker's `--device`): /dev/loop-control planted in an archive would let root inside
    make loop devices on the host, a block node read the host's disk."""
    src = make_container("evil", start=False, limits=DISK)
    path, vol = export(rt, src)
    device = os.makedev(10, 237) if kind == stat.S_IFCHR else os.stat("/").st_dev
    with crafted(path, tmp_path / "mnt") as mnt:
        os.mknod(mnt / "docker" / node, kind | 0o666, device)
        os.chown(mnt / "docker" / node, vol.ids.root, vol.ids.root)
    with pytest.raises(RuntimeFailure, match=f"it holds a device node, docker/{node}"):
        rt.create(imported, "default", next_range(), limits=DISK, volume=vol)
    assert leftovers(rt, imported) == []


@pytest.mark.parametrize("top", ["upper", "docker", "previous"])
def test_a_link_at_the_top_of_the_volume_is_refused(
    rt: Runtime, make_container: ContainerFactory, imported: str, tmp_path: Path, top: str
) -> None:
    """data/upper is the overlay's upper dir, data/docker bound at /var/lib/docker,
    data/previous at the rebase set-aside: a link there would give the container a host dir."""
    src = make_container("evil", start=False, limits=DISK)
    path, vol = export(rt, src)
    target = tmp_path / "host-dir"
    target.mkdir()
    with crafted(path, tmp_path / "mnt") as mnt:
        if os.path.isdir(mnt / top):
            shutil.rmtree(mnt / top)
        os.symlink(target, mnt / top)
    with pytest.raises(RuntimeFailure, match=f"data/{top} is not a directory"):
        rt.create(imported, "default", next_range(), limits=DISK, volume=vol)
    assert leftovers(rt, imported) == [] and list(target.iterdir()) == []
    assert owner(target)[:2] == (0, 0)


def test_an_import_never_changes_a_file_outside_its_volume(
    rt: Runtime, make_container: ContainerFactory, imported: str
) -> None:
    """The same range as exported: nothing shifted, the volume taken as it is."""
    src = make_container("evil", start=False, limits=DISK)
    path, vol = export(rt, src)
    same = ImportedVolume(path, vol.ids, vol.image_version)
    rt.delete(src)  # its range is free again
    c = rt.create(imported, "default", vol.ids, limits=DISK, volume=same)
    assert c.ids == vol.ids and not path.exists()
    assert owner(rt.records.dir(imported) / "data/upper")[:2] == (vol.ids.root, vol.ids.root)
