"""Runtime.rebase: the storage move under a stopped container (upper layer set aside, volume
kept), its undo when a step fails, and the shifted-copy mode. The boot on the new image and
the tenant's view are in tests/e2e/test_rebase.py."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import fsutil, mountinfo, rootfs, storage, volume
from runtime.containers import Runtime
from runtime.limits import Limits
from runtime.settings import RootfsMode, Settings
from tests.conftest import CGROUP_PARENT, next_range

STATUS = (
    "Package: hostd-probe\nStatus: install ok installed\nVersion: 1\n\n"
    "Package: gone\nStatus: deinstall ok config-files\n\n"
    "Package: ../../etc\nStatus: install ok installed\n"
)


def _publish(rt: Runtime, name: str, base: Path, tmp: Path, marker: str) -> Path:
    """A new version of image `name`: the busybox tarball plus /etc/version = `marker`."""
    tar = tmp / f"{marker}.tar"
    shutil.copy(base, tar)
    extra = tmp / marker
    (extra / "etc").mkdir(parents=True)
    (extra / "etc/version").write_text(marker + "\n")
    subprocess.run(["tar", "-C", str(extra), "-rf", str(tar), "./etc/version"], check=True)
    m = rt.images.import_tarball(name, tar)
    return rt.images.versions_dir() / f"{name}@{m.version}"


@pytest.fixture
def image(rt: Runtime, busybox_tar: Path, tmp_path: Path) -> Iterator[str]:
    name = f"rbs{os.getpid()}"
    _publish(rt, name, busybox_tar, tmp_path, "one")
    yield name
    rt.images.remove(name, [])
    rt.images.prune([Path(c.image_dir) for c in rt.containers()])


@contextlib.contextmanager
def _container(rt: Runtime, image: str, disk: int | None = None) -> Iterator[str]:
    name = f"rbs{os.getpid()}{'copy' if rt.settings.rootfs_mode == 'copy' else ''}"
    c = rt.create(name, image, next_range(), limits=Limits(disk=disk))
    try:
        yield name
    finally:
        rt.delete(c.name, force=True)


@contextlib.contextmanager
def _volume(rt: Runtime, name: str) -> Iterator[Path]:
    """The container's data directory, its volume mounted as a start would mount it."""
    cdir = rt.state_dir / "containers" / name
    if rt.get(name).limits.disk is None:
        yield cdir / "data"
        return
    volume.mount(cdir / "data.img", cdir / "data")
    try:
        yield cdir / "data"
    finally:
        volume.unmount(cdir / "data")


def _write_state(rt: Runtime, name: str) -> None:
    """Files the tenant made in its upper layer and in its Docker data, as on its volume."""
    with _volume(rt, name) as data:
        (data / "upper/etc").mkdir()
        (data / "upper/etc/mine.conf").write_text("mine\n")
        (data / "upper/var/lib/dpkg").mkdir(parents=True)
        (data / "upper/var/lib/dpkg/status").write_text(STATUS)
        (data / "docker/kept").write_text("kept\n")


def _mounted(rt: Runtime, name: str) -> list[str]:
    return mountinfo.mounts_under(str(rt.state_dir / "containers" / name))


def test_rebase_sets_the_upper_layer_aside_and_keeps_the_volume(
    rt: Runtime, image: str, busybox_tar: Path, tmp_path: Path
) -> None:
    with _container(rt, image, disk=64 << 20) as name:
        _write_state(rt, name)
        old = rt.get(name).image_dir
        new = _publish(rt, image, busybox_tar, tmp_path, "two")
        done = rt.rebase(name, image)
        assert done is not None and done.old_image_dir == old
        assert done.packages == ("hostd-probe",)  # deinstalled and invalid names are not
        assert done.set_aside.startswith(storage.SET_ASIDE + "/")
        assert rt.get(name).image_dir == str(new)
        assert _mounted(rt, name) == []  # stopped, as it was
        with _volume(rt, name) as data:
            aside = data / "previous" / Path(done.set_aside).name
            assert (aside / "etc/mine.conf").read_text() == "mine\n"
            assert list((data / "upper").iterdir()) == []
            assert os.stat(data / "upper").st_uid == rt.get(name).ids.root
            assert (data / "docker/kept").read_text() == "kept\n"
            bind = [b for b in rt.spec(rt.get(name)).binds if b.destination == storage.SET_ASIDE]
            assert bind and "nosuid" in bind[0].options and "nodev" in bind[0].options
        assert rt.rebase(name, image) is None  # already there
        assert Path(old).name in rt.prune_images() and not Path(old).exists()


def test_a_failed_rebase_leaves_the_old_image(
    rt: Runtime, image: str, busybox_tar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _container(rt, image, disk=64 << 20) as name:
        _write_state(rt, name)
        cdir = rt.state_dir / "containers" / name
        before = (cdir / "meta.json").read_text()
        _publish(rt, image, busybox_tar, tmp_path, "two")
        real = fsutil.atomic_write

        def disk_full(path: Path, data: str, mode: int = 0o644) -> None:
            if path.name == "meta.json":
                raise OSError(errno.ENOSPC, "No space left on device")
            real(path, data, mode)

        monkeypatch.setattr(fsutil, "atomic_write", disk_full)
        with pytest.raises(OSError, match="No space"):
            rt.rebase(name, image)
        monkeypatch.undo()
        assert (cdir / "meta.json").read_text() == before
        assert _mounted(rt, name) == []
        with _volume(rt, name) as data:
            assert (data / "upper/etc/mine.conf").read_text() == "mine\n"
            assert not (data / "previous").exists()


def test_copy_mode_rebase_redoes_the_shifted_copy(
    state_dir: Path,
    rt: Runtime,
    image: str,
    busybox_tar: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copy = Runtime(Settings(state_dir, rootfs_mode=RootfsMode.COPY, cgroup_parent=CGROUP_PARENT))
    with _container(copy, image) as name:
        _write_state(copy, name)
        cdir = copy.state_dir / "containers" / name
        ids = copy.get(name).ids
        assert (cdir / "lower/etc/version").read_text() == "one\n"
        new = _publish(copy, image, busybox_tar, tmp_path, "two")

        def broken(*_: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(rootfs, "shifted_copy", broken)
        with pytest.raises(OSError, match="No space"):
            copy.rebase(name, image)
        monkeypatch.undo()
        assert (cdir / "lower/etc/version").read_text() == "one\n"
        assert not (cdir / "lower.new").exists()
        assert (cdir / "data/upper/etc/mine.conf").exists()

        done = copy.rebase(name, image)
        assert done is not None and copy.get(name).image_dir == str(new)
        assert (cdir / "lower/etc/version").read_text() == "two\n"
        assert os.stat(cdir / "lower/etc/version").st_uid == ids.start  # shifted
        assert not (cdir / "lower.new").exists() and not (cdir / "lower.old").exists()
        assert not (cdir / "data/upper/etc").exists()
