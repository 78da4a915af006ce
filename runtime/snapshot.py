"""A consistent view of a container's data volume for export, and a volume coming back.

A stopped container's volume is consistent as it lies (unmounted). A running one is frozen:
its cgroup first (no process of it runs), then its ext4 (FIFREEZE: the journal and dirty pages
go to the image, and nothing writes until FITHAW). Where the host file system clones files
(FICLONE: xfs, btrfs), the image is cloned and thawed at once; else it stays frozen while the
caller reads it. A marker file says "frozen by us" while it is, so a runtime killed meanwhile
can thaw it at its next start (`Runtime.thaw_leftovers`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime import cgroups, volume
from runtime.errors import Busy
from runtime.ids import IdRange

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int), linux/fs.h
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FREEZE_TIMEOUT = 10.0  # seconds for every task of a cgroup to freeze (one in D state delays it)
MARKER = "frozen"  # in the container directory while hostd holds it frozen
LOCK = "snapshot.lock"  # in the container directory: flock'ed while a snapshot is held
# errnos with which a file system says it cannot clone files (or not across these two)
_NO_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS)


@dataclass(frozen=True)
class VolumeSnapshot:
    """The volume image to read while the snapshot is held, its size, and how it was made
    consistent: "stopped" or "frozen"."""

    path: Path
    size: int
    consistency: str


@dataclass(frozen=True)
class ImportedVolume:
    """An exported data volume to create a container on: an ext4 image in a staging file
    (Runtime.staging_file), the ID range its files are owned by, and the name of the image
    version (the image directory's name) it ran on."""

    path: Path
    ids: IdRange
    image_version: str


@contextlib.contextmanager
def held(cdir: Path) -> Iterator[None]:
    """Hold the container's snapshot lock (one snapshot at a time); Busy if it is taken."""
    fd = os.open(cdir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(
                f"a snapshot of container {cdir.name!r} is being taken",
                "try again once its export is done",
            ) from None
        yield
    finally:
        os.close(fd)


def check_not_held(cdir: Path) -> None:
    """Busy while a snapshot of the container is held (by this process or another)."""
    if (cdir / LOCK).exists():
        with held(cdir):
            pass


@contextlib.contextmanager
def frozen(cdir: Path, freezer: cgroups.Freezer, data: Path) -> Iterator[None]:
    """The container's cgroup and its volume mounted at `data` frozen; thawed on the way out,
    an exception too. The marker is written first and removed last."""
    (cdir / MARKER).write_text(f"{os.getpid()}\n")
    try:
        try:
            _freeze(freezer, cdir.name)
            fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
                try:
                    yield
                finally:
                    fcntl.ioctl(fd, FITHAW, 0)
            finally:
                os.close(fd)
        finally:
            cgroups.set_frozen(freezer, False)
    finally:
        (cdir / MARKER).unlink()


def _freeze(freezer: cgroups.Freezer, name: str) -> None:
    """Freeze the cgroup, asking again at every poll: a v1 freezer can stay FREEZING for good
    while the cgroup's processes keep forking (measured here: 2 freezes in 40 of a fork loop
    stuck, none when asked again), so its freeze is asked again, with a short thaw every 50
    tries, as runc's own v1 freezer does. On v2 asking again changes nothing."""
    deadline = time.monotonic() + FREEZE_TIMEOUT
    for attempt in itertools.count(1):
        cgroups.set_frozen(freezer, True)
        if cgroups.is_frozen(freezer):
            return
        if time.monotonic() > deadline:
            raise Busy(
                f"container {name!r} did not freeze within {FREEZE_TIMEOUT:.0f} s "
                "(a process of it is stuck in the kernel)",
                "try again later, or stop the container for the export",
            )
        if attempt % 50 == 0:  # lets the forks under way finish, then freeze them all
            cgroups.set_frozen(freezer, False)
        time.sleep(0.005)  # poll interval; the deadline bounds the wait


def thaw(cdir: Path, freezer: cgroups.Freezer | None, data: Path) -> None:
    """Undo what `frozen` left of a runtime that died inside it: FITHAW (EINVAL: it was not
    frozen), the cgroup thawed if it still exists, the marker removed."""
    if volume.mounted(data):  # else FITHAW would thaw the file system below, not ours
        fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        finally:
            os.close(fd)
    if freezer is not None:
        with contextlib.suppress(FileNotFoundError):  # the container is gone: nothing frozen
            cgroups.set_frozen(freezer, False)
    (cdir / MARKER).unlink(missing_ok=True)


def reflink(src: Path, dest: Path) -> bool:
    """Clone `src` into the empty file `dest` (FICLONE: shares its blocks, copies nothing);
    False where the file system cannot."""
    with open(src, "rb") as s, open(dest, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        except OSError as exc:
            if exc.errno in _NO_CLONE:
                return False
            raise
    return True
