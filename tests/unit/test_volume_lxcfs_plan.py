"""The data side of volumes and lxcfs: size validation and the binds a container gets."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import lxcfs, volume
from runtime.errors import RuntimeFailure
from runtime.spec import Bind

MiB = 2**20


def fake_lxcfs(root: Path, proc_files: tuple[str, ...], cpu_online: bool = True) -> Path:
    for name in proc_files:
        (root / "proc").mkdir(parents=True, exist_ok=True)
        (root / "proc" / name).write_text("")
    if cpu_online:
        (root / "sys/devices/system/cpu").mkdir(parents=True)
        (root / "sys/devices/system/cpu/online").write_text("0-1\n")
    return root


def test_binds_cover_every_lxcfs_file_without_ro(tmp_path: Path) -> None:
    mp = fake_lxcfs(tmp_path, (*lxcfs.PROC_FILES, "slabinfo"))
    binds = lxcfs.binds(mp)
    assert binds == (
        *(
            Bind(f"{mp}/proc/{f}", f"/proc/{f}", ("rbind", "nosuid", "nodev", "noexec"))
            for f in ("cpuinfo", "diskstats", "loadavg", "meminfo", "stat", "swaps", "uptime")
        ),
        Bind(
            f"{mp}/sys/devices/system/cpu/online",
            "/sys/devices/system/cpu/online",
            ("rbind", "nosuid", "nodev", "noexec"),
        ),
    )
    # ro on a bind of the FUSE mount is EPERM in the user namespace: it must never be asked.
    assert all("ro" not in b.options for b in binds)


def test_binds_skip_files_lxcfs_does_not_provide(tmp_path: Path) -> None:
    mp = fake_lxcfs(tmp_path, ("meminfo", "uptime"), cpu_online=False)
    assert [b.destination for b in lxcfs.binds(mp)] == ["/proc/meminfo", "/proc/uptime"]


def test_no_binds_when_lxcfs_is_not_there(tmp_path: Path) -> None:
    assert lxcfs.binds(tmp_path / "missing") == ()


@pytest.mark.parametrize("size", [0, -1, 64 * MiB - 1, 10 * MiB])
def test_volume_below_64_mib_is_refused_with_the_fix(size: int) -> None:
    with pytest.raises(RuntimeFailure) as exc:
        volume.check_size(size)
    assert "64 MiB" in exc.value.cause
    assert "at least 64 MiB" in exc.value.fix


def test_create_refuses_a_small_size_without_leaving_a_file(tmp_path: Path) -> None:
    image = tmp_path / "data.img"
    with pytest.raises(RuntimeFailure):
        volume.create(image, 32 * MiB)
    assert not image.exists()


@given(st.integers(min_value=64 * MiB, max_value=2**44))
def test_volume_size_is_whole_blocks_never_above_the_request(size: int) -> None:
    checked = volume.check_size(size)
    assert checked % 4096 == 0
    assert size - 4096 < checked <= size


def test_recorded_usage_reads_an_unmounted_volume(tmp_path: Path) -> None:
    """What `hostctl status` shows of a stopped tenant's disk: the superblock's counts."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(8 * MiB))
    image = tmp_path / "data.img"
    image.write_bytes(b"")
    os.truncate(image, 128 * MiB)
    subprocess.run(["mkfs.ext4", *volume.MKFS_OPTIONS, "-d", str(tree), str(image)], check=True)
    used = volume.recorded_usage(image)
    assert used is not None and 8 * MiB <= used <= 9 * MiB  # metadata overhead not counted
    with open(image, "r+b") as f:  # a superblock that does not record its overhead
        f.seek(volume.SUPERBLOCK + 0x248)
        f.write(bytes(4))
    assert volume.recorded_usage(image) is None
    (tmp_path / "junk.img").write_bytes(os.urandom(4096))
    assert volume.recorded_usage(tmp_path / "junk.img") is None
    assert volume.recorded_usage(tmp_path / "missing.img") is None
