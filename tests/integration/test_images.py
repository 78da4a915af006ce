"""Images: the default recipe, tarball import, atomic rebuilds, and the copy fallback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from runtime.containers import Runtime
from runtime.errors import RuntimeFailure
from runtime.settings import RootfsMode, Settings
from tests.conftest import CGROUP_PARENT, INNER_DRIVER, ContainerFactory, next_range, sh


def _store_entries(rt: Runtime, name: str) -> list[str]:
    """Everything of image `name` in the store, published or in progress."""
    root = rt.images.root
    found = [p.name for p in root.iterdir() if p.name == name]
    found += [p.name for p in rt.images.versions_dir().iterdir() if p.name.startswith(name + "@")]
    found += [p.name for p in (root / ".build").iterdir()]
    return found


def test_default_image_manifest(rt: Runtime) -> None:
    m = rt.images.manifest(rt.images.resolve("default"))
    names = {p.split()[0] for p in m.packages}
    assert {"systemd", "systemd-sysv", "dbus", "docker.io", "containerd", "sudo"} <= names
    assert m.size > 100 * 2**20 and "debootstrap trixie" in m.source
    assert "default" in [x.name for x in rt.images.manifests()]
    rootfs = rt.images.resolve("default") / "rootfs"
    assert os.readlink(rootfs / "etc/systemd/system/sys-kernel-debug.mount") == "/dev/null"


def test_import_refuses_what_is_not_a_system_image(rt: Runtime, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_text("not a tarball\n")
    with pytest.raises(RuntimeFailure, match="root filesystem tarball"):
        rt.images.import_tarball("junk", junk)
    empty_dir = tmp_path / "empty"
    (empty_dir / "etc").mkdir(parents=True)
    no_init = tmp_path / "noinit.tar"
    subprocess.run(["tar", "-C", str(empty_dir), "-cf", str(no_init), "."], check=True)
    with pytest.raises(RuntimeFailure, match=r"has no init \(/sbin/init\)"):
        rt.images.import_tarball("noinit", no_init)
    with pytest.raises(RuntimeFailure, match="no such tarball"):
        rt.images.import_tarball("missing", tmp_path / "missing.tar")
    for name in ("junk", "noinit", "missing"):
        assert _store_entries(rt, name) == []


def test_rebuild_is_atomic_and_keeps_versions_in_use(
    rt: Runtime, make_container: ContainerFactory, busybox_tar: Path
) -> None:
    first = rt.images.import_tarball("bb", busybox_tar)
    user = make_container("bbuser", image="bb", start=False)
    second = rt.images.import_tarball("bb", busybox_tar)
    assert first.version != second.version
    assert rt.images.resolve("bb").name == f"bb@{second.version}"
    old = Path(rt.get(user).image_dir)
    assert old.name == f"bb@{first.version}"
    in_use = [Path(c.image_dir) for c in rt.containers()]
    rt.images.prune(in_use)
    assert old.is_dir()  # still under the container's root filesystem
    rt.images.remove("bb", in_use)
    assert _store_entries(rt, "bb") == [old.name]
    rt.delete(user)
    rt.images.prune([Path(c.image_dir) for c in rt.containers()])
    assert _store_entries(rt, "bb") == []


def test_imported_system_image_boots_and_survives_a_reimport(
    rt: Runtime, make_container: ContainerFactory, tmp_path: Path
) -> None:
    export = tmp_path / "exported.tar"
    template = rt.images.resolve("default") / "rootfs"
    subprocess.run(
        ["tar", "--numeric-owner", "-C", str(template), "-cf", str(export), "."], check=True
    )
    rt.images.import_tarball("imported", export)
    name = make_container("imp", image="imported")
    rt.images.import_tarball("imported", export)  # a rebuild while the container runs
    assert rt.state(name).status == "running"
    rt.wait_ready(name, timeout=10)
    assert sh(rt, name, "docker info --format '{{.Driver}}'").strip() == INNER_DRIVER


def test_copy_mode_boots_with_docker(rt: Runtime, state_dir: Path) -> None:
    copy = Runtime(Settings(state_dir, rootfs_mode=RootfsMode.COPY, cgroup_parent=CGROUP_PARENT))
    name = f"copy{os.getpid()}"
    c = copy.create(name, "default", next_range())
    try:
        assert c.rootfs_mode is RootfsMode.COPY
        lower = state_dir / "containers" / name / "lower"
        assert os.stat(lower / "usr/sbin/dockerd").st_uid == c.ids.start
        assert os.stat(lower / "usr/bin/sudo").st_mode & 0o4000  # setuid survived the chown
        copy.start(name)
        copy.wait_ready(name)
        assert sh(copy, name, "docker info --format '{{.Driver}}'").strip() == INNER_DRIVER
        assert sh(copy, name, "sudo -n id -u").strip() == "0"
    finally:
        copy.delete(name, force=True)
