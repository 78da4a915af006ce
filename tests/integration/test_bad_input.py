"""Bad input gets one clear error naming cause and fix, and leaves nothing half-created."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import cgroups, fsutil, mountinfo
from runtime.containers import Runtime
from runtime.errors import RuntimeFailure
from runtime.ids import IdRange
from runtime.settings import RootfsMode, Settings
from tests.conftest import CGROUP_PARENT, ContainerFactory, next_range


def _names(rt: Runtime) -> set[str]:
    return {c.name for c in rt.containers()}


def _left_over(rt: Runtime, name: str) -> list[str]:
    cdir = rt.state_dir / "containers" / name
    found = [str(cdir)] if cdir.exists() else []
    found += mountinfo.mounts_under(str(cdir))
    found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}/{name}")]
    return found


def test_unknown_image(rt: Runtime) -> None:
    with pytest.raises(RuntimeFailure, match=r"image 'nope' not found: build it"):
        rt.create("unknown-image", "nope", next_range())
    assert _left_over(rt, "unknown-image") == []


@pytest.mark.parametrize("start", [0, -5, 1000, 65535])
def test_ranges_touching_host_ids_are_refused(start: int) -> None:
    with pytest.raises(RuntimeFailure, match="pick a start >= 65536"):
        IdRange(start)


def test_overlapping_range(rt: Runtime, make_container: ContainerFactory) -> None:
    first = make_container("first", start=False)
    taken = rt.get(first).ids
    before = _names(rt)
    with pytest.raises(RuntimeFailure, match=f"overlaps {taken} of container '{first}'"):
        rt.create("second", "default", IdRange(taken.start + 1000))
    assert _names(rt) == before and _left_over(rt, "second") == []


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "x" * 70])
def test_bad_names(rt: Runtime, name: str) -> None:
    before = _names(rt)
    with pytest.raises(RuntimeFailure, match="invalid container name"):
        rt.create(name, "default", next_range())
    assert _names(rt) == before
    assert not (rt.state_dir / "escape").exists()


def test_missing_runc(state_dir: Path, rt: Runtime) -> None:
    no_runc = Runtime(Settings(state_dir, runc="/nonexistent/runc", cgroup_parent=CGROUP_PARENT))
    with pytest.raises(RuntimeFailure, match=r"runc not found: install it with `apt-get"):
        no_runc.create("no-runc", "default", next_range())
    assert _left_over(rt, "no-runc") == []


def test_duplicate_name(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("dup", start=False)
    with pytest.raises(RuntimeFailure, match="already exists"):
        rt.create(name, "default", next_range())
    assert rt.get(name).name == name


def test_start_twice_and_delete_running(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("twice")
    with pytest.raises(RuntimeFailure, match="already running: stop it first"):
        rt.start(name)
    with pytest.raises(RuntimeFailure, match="is running: stop it first"):
        rt.delete(name)
    assert rt.state(name).status == "running"


def test_failed_start_releases_everything(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("noinit", start=False)
    (rt.state_dir / "containers" / name / "rootfs/sbin/init").unlink()  # a whiteout in upper
    with pytest.raises(RuntimeFailure, match="runc could not start .*sbin/init"):
        rt.start(name)
    assert rt.state(name).status == "stopped"
    cdir = rt.state_dir / "containers" / name
    assert mountinfo.mounts_under(str(cdir)) == []
    plan = cgroups.plan(cgroups.detect(mountinfo.current()), CGROUP_PARENT, name, 0)
    assert cgroups.exists(plan) == []


@pytest.fixture
def ramfs_runtime() -> Iterator[tuple[Path, Path]]:
    """A state dir whose image store is on ramfs, which refuses ID-mapped mounts."""
    state = Path(tempfile.mkdtemp(prefix="hostd-it-ramfs-", dir="/var/tmp"))  # not under 0700
    images = state / "images"
    images.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "hostd-test-ramfs", str(images)], check=True)
    try:
        yield state, images
    finally:
        rt = Runtime(Settings(state, cgroup_parent=CGROUP_PARENT))
        for c in rt.containers():
            rt.delete(c.name, force=True)
        subprocess.run(["umount", str(images)], check=True)
        fsutil.remove_tree(state)


def test_idmapped_mode_on_a_file_system_without_it(
    ramfs_runtime: tuple[Path, Path], busybox_tar: Path
) -> None:
    state, _ = ramfs_runtime
    strict = Runtime(Settings(state, rootfs_mode=RootfsMode.IDMAPPED, cgroup_parent=CGROUP_PARENT))
    strict.images.import_tarball("bb", busybox_tar)
    with pytest.raises(RuntimeFailure, match='ID-mapped mounts unsupported .*"copy"'):
        strict.create("strict", "bb", next_range())
    assert strict.containers() == []
    assert not (state / "containers" / "strict").exists()


def test_auto_mode_falls_back_to_a_shifted_copy(
    ramfs_runtime: tuple[Path, Path], busybox_tar: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, _ = ramfs_runtime
    auto = Runtime(Settings(state, cgroup_parent=CGROUP_PARENT))
    auto.images.import_tarball("bb", busybox_tar)
    ids = next_range()
    with caplog.at_level(logging.WARNING):
        c = auto.create("fallback", "bb", ids)
    assert c.rootfs_mode is RootfsMode.COPY
    assert "falling back to a shifted copy" in caplog.text
    busybox = state / "containers" / "fallback" / "rootfs/bin/busybox"
    assert os.stat(busybox).st_uid == ids.start
