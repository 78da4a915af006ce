"""A container's capped volume on a real loop device: the cap holds, grows live, shrinks
offline, and unmounting leaves no loop device behind."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import fsutil, volume
from runtime.errors import RuntimeFailure

MiB = 2**20


def dd(target: Path, name: str, mib: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dd", "if=/dev/zero", f"of={target / name}", "bs=1M", f"count={mib}", "conv=fsync"],
        capture_output=True,
        text=True,
    )


def attached(image: Path) -> str:
    return subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices (/dev/loop-control missing): modprobe loop")
    image, target = tmp_path / "data.img", tmp_path / "data"
    volume.create(image, 200 * MiB)
    yield image, target
    volume.unmount(target)
    assert attached(image) == ""
    image.unlink()


def test_writes_stop_at_the_cap_and_a_live_grow_lifts_it(vol: tuple[Path, Path]) -> None:
    image, target = vol
    assert fsutil.disk_usage(image) < 10 * MiB  # sparse: a fresh volume costs next to nothing
    volume.mount(image, target)
    volume.mount(image, target)  # idempotent
    device = volume.loop_device(target)
    assert device is not None and device.startswith("/dev/loop")
    assert volume.mounted(target)  # as mountinfo says, from device numbers alone

    full = dd(target, "fill", 300)
    assert full.returncode != 0
    assert "No space left on device" in full.stderr
    used, size = volume.usage(target)
    assert 170 * MiB < size <= 200 * MiB  # df does not count the journal and inode tables
    assert used > 0.95 * size  # full: ext4 keeps ~2% back for its own metadata
    assert fsutil.disk_usage(image) <= 200 * MiB + 2 * MiB  # the host gave no more than the cap

    (target / "fill").unlink()
    if volume.can_grow_live():
        assert volume.resize(image, target, 400 * MiB) is True
        assert volume.loop_device(target) == device  # grown in place, still mounted
    else:  # a bounding set without CAP_SYS_RESOURCE (the CI machine): told why, nothing changed
        with pytest.raises(RuntimeFailure, match="CAP_SYS_RESOURCE"):
            volume.resize(image, target, 400 * MiB)
        assert image.stat().st_size == 200 * MiB
        assert volume.usage(target)[1] <= 200 * MiB
        volume.unmount(target)
        assert volume.resize(image, target, 400 * MiB) is False
        volume.mount(image, target)
    assert 360 * MiB < volume.usage(target)[1] <= 400 * MiB
    done = dd(target, "fill", 300)
    assert done.returncode == 0, done.stderr
    assert (target / "fill").stat().st_size == 300 * MiB


def test_mounted_without_nosuid_nodev(vol: tuple[Path, Path]) -> None:
    """Host mount flags are locked in the container's user namespace, and BuildKit's `rbind
    ro` remounts of /var/lib/docker fail on locked flags: the volume has none. (That root
    inside cannot use device nodes on it is tests/security/test_host_paths.py's.)"""
    image, target = vol
    volume.mount(image, target)
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    options = next(ln.split()[5] for ln in mountinfo if ln.split()[4] == str(target))
    assert not {"nodev", "nosuid"} & set(options.split(","))


def test_unmount_releases_the_loop_device_and_shrink_works_offline(
    vol: tuple[Path, Path],
) -> None:
    image, target = vol
    volume.mount(image, target)
    assert dd(target, "keep", 100).returncode == 0
    with pytest.raises(RuntimeFailure, match="while it is mounted"):
        volume.resize(image, target, 150 * MiB)

    volume.unmount(target)
    assert volume.loop_device(target) is None
    assert not volume.mounted(target)
    assert attached(image) == ""
    volume.unmount(target)  # idempotent

    assert volume.resize(image, target, 400 * MiB) is False
    assert volume.resize(image, target, 350 * MiB) is False
    assert image.stat().st_size == 350 * MiB

    with pytest.raises(RuntimeFailure) as exc:
        volume.resize(image, target, 80 * MiB)
    assert "to 80 MiB" in exc.value.cause
    used = re.search(r"(\d+) MiB are used", exc.value.cause)
    assert used is not None and int(used[1]) >= 100, exc.value.cause  # the 100 MiB file
    assert image.stat().st_size == 350 * MiB  # a refused shrink changes nothing

    volume.mount(image, target)
    assert (target / "keep").stat().st_size == 100 * MiB
    assert 310 * MiB < volume.usage(target)[1] <= 350 * MiB


def test_create_never_overwrites_an_existing_image(tmp_path: Path) -> None:
    image = tmp_path / "data.img"
    image.write_bytes(b"tenant data")
    with pytest.raises(RuntimeFailure, match="already exists"):
        volume.create(image, 100 * MiB)
    assert image.read_bytes() == b"tenant data"


def test_a_failed_mkfs_leaves_no_file(tmp_path: Path) -> None:
    image = tmp_path / "data.img"
    with pytest.raises(RuntimeFailure):
        volume.create(image, 2**60)  # no host file system takes an exabyte file
    assert not image.exists()


def test_a_target_holding_another_volume_is_refused(vol: tuple[Path, Path]) -> None:
    image, target = vol
    other = image.with_name("other.img")
    volume.create(other, 64 * MiB)
    try:
        volume.mount(image, target)
        with pytest.raises(RuntimeFailure, match="not from"):
            volume.mount(other, target)
        with pytest.raises(RuntimeFailure, match="not from"):
            volume.resize(other, target, 128 * MiB)
        assert other.stat().st_size == 64 * MiB
    finally:
        other.unlink()
