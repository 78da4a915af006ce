"""File system helpers shared by images and containers: atomic writes and safe removal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from runtime import mountinfo, proc, syscalls
from runtime.errors import RuntimeFailure


def atomic_write(path: Path, data: str, mode: int = 0o644) -> None:
    """Write via a temp file and rename, so readers see the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def unmount_all(path: Path) -> None:
    """Unmount everything at or below `path`, deepest first."""
    for target in mountinfo.mounts_under(str(path)):
        try:
            syscalls.umount(target)
        except OSError:
            syscalls.umount(target, detach=True)


def remove_tree(path: Path) -> None:
    """rm -rf that never descends into a mount (a template or host /dev bound below `path`)."""
    if not os.path.lexists(path):
        return
    unmount_all(path)
    left = mountinfo.mounts_under(str(path))
    if left:
        raise RuntimeFailure(
            f"cannot remove {path}: still mounted at {left[0]}", f"unmount it (umount -l {left[0]})"
        )
    shutil.rmtree(path)


def disk_usage(path: Path) -> int:
    """Bytes allocated below `path`, not crossing into other file systems."""
    out = proc.run(["du", "-sxB1", str(path)]).stdout
    return int(out.split()[0])
