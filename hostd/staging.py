"""Archives arriving on this host for `hostctl user move`: staged under `<state>/incoming/` as
`<id>.hostd` (root's, 0600), received in pieces so a broken transfer resumes where it
stopped. What an archive says is hostd.archive's to read: `verify` runs its reader over a
staged file (every checksum, nothing written), and import takes the files `open` gives.

Bounded: ids are archive ids (32 hex digits, so never a path), at most `max_staged` archives
at once, none larger than the free space (less a reserve), a sender that goes quiet is cut
off, and archives left for more than a day are removed (at every receive and by reconcile).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import select
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hostd import archive
from hostd.errors import HostdError
from hostd.units import human_size
from runtime.errors import Busy, Conflict, NotFound

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # an archive id: uuid4 hex
SUFFIX = ".hostd"
MAX_STAGED = 4  # archives staged at once (a move needs two: its full and its incremental)
STALE_AFTER = 86400.0  # seconds since its last change after which a staged archive goes
RESERVE = 1 << 30  # bytes of the file system an incoming archive must leave free
IDLE_TIMEOUT = 300.0  # seconds a sender may send nothing before the receive ends
LOCK_WAIT = 30.0  # seconds a look at an archive waits for a receive of it to end
PIECE = 1 << 20  # bytes read and written at once


def check_id(archive_id: str) -> str:
    """`archive_id` if it is one (32 lowercase hex digits), else a one-line refusal."""
    if not ID_PATTERN.fullmatch(archive_id):
        raise HostdError(
            f"{archive_id[:64]!r} is not an archive id",
            "give the 32 hex digits of an archive id",
        )
    return archive_id


class Staging:
    def __init__(
        self,
        directory: Path,
        *,
        max_staged: int = MAX_STAGED,
        reserve: int = RESERVE,
        stale_after: float = STALE_AFTER,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.directory = directory
        self.max_staged = max_staged
        self.reserve = reserve
        self.stale_after = stale_after
        self.idle_timeout = idle_timeout

    def path(self, archive_id: str) -> Path:
        return self.directory / f"{check_id(archive_id)}{SUFFIX}"

    def staged(self) -> list[str]:
        """The ids of the archives staged now (complete or not)."""
        if not self.directory.is_dir():
            return []
        return sorted(
            p.name[: -len(SUFFIX)]
            for p in self.directory.iterdir()
            if p.name.endswith(SUFFIX) and ID_PATTERN.fullmatch(p.name[: -len(SUFFIX)])
        )

    def offset(self, archive_id: str) -> int:
        """Bytes of the archive staged so far (0: none); waits for a receive of it to end."""
        path = self.path(archive_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            with _locked(fd, archive_id, fcntl.LOCK_SH):
                return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def receive(self, archive_id: str, offset: int, size: int, source: int) -> int:
        """Append what `source` (a pipe, usually ssh's) sends to the archive staged at
        `offset` bytes, up to `size` bytes in all, until it ends; the bytes staged then. What
        arrived before a break is kept: the sender resumes from there."""
        path = self.path(archive_id)
        if not 0 <= offset <= size:
            raise HostdError(
                f"offset {offset} is outside the archive's {size} bytes",
                "send an offset from `hostctl transfer offset ID`",
            )
        self.remove_stale()
        self._make_dir()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with _locked(fd, archive_id, fcntl.LOCK_EX):
                try:
                    have = os.fstat(fd).st_size
                    if have != offset:
                        raise Conflict(
                            f"{have} bytes of archive {archive_id} are staged here, not {offset}",
                            "run `hostctl user move USER TARGET` again: it resumes",
                        )
                    self._check_room(archive_id, size - have)
                    os.lseek(fd, have, os.SEEK_SET)
                    return have + self._copy(source, fd, size - have)
                except BaseException:
                    if os.fstat(fd).st_size == 0:  # refused before any byte: leave nothing
                        path.unlink(missing_ok=True)
                    raise
        finally:
            os.close(fd)

    def _make_dir(self) -> None:
        with contextlib.suppress(FileExistsError):
            self.directory.mkdir(mode=0o700)
        st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise HostdError(
                f"{self.directory} is not a directory only hostd can enter",
                "remove it; hostd makes it again (0700)",
            )

    def _check_room(self, archive_id: str, needed: int) -> None:
        others = [i for i in self.staged() if i != archive_id]
        if len(others) >= self.max_staged:
            raise Busy(
                f"{len(others)} archives are staged on this host already",
                "finish or cancel the other moves (or wait a day for reconcile to remove them)",
            )
        st = os.statvfs(self.directory)
        free = st.f_bavail * st.f_frsize - self.reserve
        if needed > free:
            raise HostdError(
                f"the archive needs {human_size(needed)} more and {self.directory} has "
                f"{human_size(max(free, 0))} free (after a {human_size(self.reserve)} reserve)",
                "free space on the target host",
            )

    def _copy(self, source: int, fd: int, limit: int) -> int:
        """Copy from `source` to `fd` until its end or `limit` bytes; the bytes copied, made
        durable. A sender quiet for `idle_timeout` seconds ends it."""
        done = 0
        try:
            while done < limit:
                if not select.select([source], [], [], self.idle_timeout)[0]:
                    log.warning("staging: a sender went quiet after %d bytes", done)
                    break
                data = os.read(source, min(PIECE, limit - done))
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                done += len(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise HostdError("the target host's disk is full", "free space on it") from None
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EIO):
                raise
        finally:
            os.fsync(fd)
        return done

    def open(self, archive_id: str) -> int:
        """A read-only fd of a staged archive (NotFound if there is none)."""
        try:
            return os.open(self.path(archive_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(
                f"no archive {archive_id} is staged on this host",
                "send it first: run `hostctl user move USER TARGET` again",
            ) from None

    def verify(self, archive_id: str, schema: int, progress: archive.Progress) -> archive.Header:
        """Read a staged archive through as an import would, writing nothing: every member,
        bound and checksum; its header. Refused if it is not the archive `archive_id`."""
        name = f"the archive {archive_id} staged on this host"
        fd = self.open(archive_id)
        try:
            reader = archive.Reader(fd, name, schema)
            try:
                head = reader.header()
                if head.id != archive_id:
                    raise HostdError(
                        f"{name} is archive {head.id}", "discard it and run the move again"
                    )
                reader.tenant()
                reader.restore(None, None, None, archive.Meter(progress, "verified"))
            finally:
                reader.close()
        finally:
            os.close(fd)
        return head

    def discard(self, archive_id: str) -> bool:
        """Remove a staged archive; whether there was one."""
        path = self.path(archive_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            with _locked(fd, archive_id, fcntl.LOCK_EX):
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        return True

    def remove_stale(self, now: Callable[[], float] = time.time) -> list[str]:
        """Remove archives untouched for `stale_after` seconds (a move given up); their ids."""
        removed = []
        for archive_id in self.staged():
            with contextlib.suppress(FileNotFoundError):
                if now() - os.lstat(self.path(archive_id)).st_mtime > self.stale_after:
                    self.path(archive_id).unlink()
                    removed.append(archive_id)
        return removed


@contextlib.contextmanager
def _locked(fd: int, archive_id: str, kind: int) -> Iterator[None]:
    """`fd` locked (flock): one receive of an archive at a time, and no look at it meanwhile.
    Waits up to LOCK_WAIT seconds for a receive cut off by a broken ssh to notice."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise Busy(
                    f"archive {archive_id} is being received right now",
                    "wait for that transfer to end, then run the move again",
                ) from None
            time.sleep(0.1)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
