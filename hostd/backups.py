"""Scheduled backups: each tenant exported into [backup] dir, chains of a full archive and the
incremental ones after it, retention by chains, and restore of a chain up to a time.

Layout: `<dir>/<user>/<UTC time>-full.hostd` or `-incr.hostd` (hostd.archive's format), each
with its `<same stem>.manifest.json`: the manifest the next incremental compares with, read
without decompressing the archive. A chain is a full archive and the incrementals after it,
in time order; an incremental's parent is the archive before it. Everything below `<dir>` is
hostd's own (0700, 0600, root's): it is reached by file descriptors, never by a path a tenant
or a request could steer, and no symlink there is followed.

An archive is written under a hidden temporary name and renamed once complete (its manifest
first): a crash leaves no archive a restore could pick, and the next run removes leftovers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from hostd import priority
from hostd.archive import MAX_MANIFEST, Manifest
from hostd.config import BackupSettings
from hostd.errors import HostdError
from runtime.errors import Busy, NotFound, RuntimeFailure
from runtime.names import check_name

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
SUFFIX = ".hostd"
MANIFEST = ".manifest.json"
_NAME = re.compile(r"(\d{8}T\d{6}\.\d{3}Z)-(full|incr)")
_STAMP = "%Y%m%dT%H%M%S"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
KINDS = {"full": "full", "incr": "incremental"}  # file name word -> the archive's kind


class Exporter(Protocol):
    """What backups need of hostd.transfer: an export to files hostd opened itself, its
    manifest copied to a second one."""

    def export(
        self,
        user: str,
        out: int,
        since: tuple[int, str] | None,
        with_home: bool,
        progress: Progress,
        manifest_to: int | None = None,
        background: bool = False,
    ) -> object:
        """Write `user`'s archive to `out`, incremental against `since` (a parent's manifest
        copy: fd and name); the manifest also to `manifest_to`; `background`: behind every
        tenant."""
        ...

    def frozen_for_export(self, user: str) -> bool:
        """Whether an export of `user` now would freeze a running container."""
        ...


@dataclass(frozen=True, order=True)
class Archive:
    """One archive in a tenant's backup directory; `chain` is the stem of its chain's full."""

    stem: str  # <UTC time>-<full|incr>
    time: datetime
    kind: str  # full | incr
    size: int = 0
    chain: str = ""

    @property
    def name(self) -> str:
        return self.stem + SUFFIX


@dataclass(frozen=True)
class Result:
    """One tenant's part of a run: the archive written, or why not; what retention removed."""

    user: str
    archive: Archive | None
    error: str | None
    removed: tuple[str, ...] = ()


def stamp(when: datetime) -> str:
    """A file name's time: UTC to the millisecond, sorting as it reads."""
    when = when.astimezone(UTC)
    return f"{when.strftime(_STAMP)}.{when.microsecond // 1000:03d}Z"


def parse_archive(name: str) -> Archive | None:
    """The archive a file name stands for; None for anything else (temporary files, manifests,
    an admin's own files), which a listing leaves out."""
    match = _NAME.fullmatch(name.removesuffix(SUFFIX)) if name.endswith(SUFFIX) else None
    if match is None:
        return None
    time = datetime.strptime(match[1], _STAMP + ".%fZ").replace(tzinfo=UTC)
    return Archive(match[0], time, match[2])


def parse_time(text: str) -> datetime:
    """`--at`: an ISO 8601 date or time ("2026-12-01", "2026-12-01T03:00", ...), UTC unless it
    says otherwise, or a backup's own time as `backup list` shows it."""
    archive = parse_archive(f"{text}-full{SUFFIX}")
    if archive is not None:
        return archive.time
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise HostdError(
            f"{text[:64]!r} is not a time", 'use a UTC time like "2026-12-01T03:00" or a date'
        ) from None
    if len(text) <= 10:  # a date alone: the whole day
        when += timedelta(days=1) - timedelta(microseconds=1)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def chains(archives: Sequence[Archive]) -> list[list[Archive]]:
    """Archives in time order, grouped into chains: a full and the incrementals after it.
    Incrementals with no full before them (deleted by hand) belong to none."""
    found: list[list[Archive]] = []
    for a in sorted(archives):
        if a.kind == "full":
            found.append([a])
        elif found:
            found[-1].append(a)
    return found


def orphans(archives: Sequence[Archive]) -> list[Archive]:
    """Incrementals no restore can use: no full before them."""
    chained = {a for chain in chains(archives) for a in chain}
    return [a for a in archives if a not in chained]


def next_kind(archives: Sequence[Archive], full_every: int, full: bool) -> str:
    """A full archive when asked, when there is no chain, or when the last chain has had
    `full_every` archives; otherwise an incremental on the last chain."""
    found = chains(archives)
    if full or not found or len(found[-1]) >= full_every:
        return "full"
    return "incr"


def expired(archives: Sequence[Archive], keep: int) -> list[Archive]:
    """What retention deletes: whole chains older than the `keep` newest (so no kept
    incremental loses its full), and orphans."""
    return [a for chain in chains(archives)[:-keep] for a in chain] + orphans(archives)


def chain_at(archives: Sequence[Archive], at: datetime | None) -> list[Archive]:
    """The chain to restore: up to the last archive at or before `at` (default: the latest)."""
    for chain in reversed(chains(archives)):
        upto = [a for a in chain if at is None or a.time <= at]
        if upto:
            return upto
    return []


def _with_chains(archives: Sequence[Archive]) -> list[Archive]:
    named = {a: chain[0].stem for chain in chains(archives) for a in chain}
    return [Archive(a.stem, a.time, a.kind, a.size, named.get(a, "")) for a in sorted(archives)]


class Backups:
    """The backup directory and runs over it; one run (or restore's pick) at a time."""

    def __init__(
        self,
        settings: BackupSettings,
        exporter: Exporter,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.exporter = exporter
        self.clock = clock
        self._running = threading.Lock()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._running.acquire(blocking=False):
            raise Busy("a backup run is under way", "wait for it to end (`hostctl backup list`)")
        try:
            yield
        finally:
            self._running.release()

    # -- the directory ---------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        if self.settings.dir is None:
            raise HostdError(
                "backups are off ([backup] dir is empty)",
                "set [backup] dir in /etc/hostd/hostd.toml and restart hostd",
            )
        return self.settings.dir

    @contextlib.contextmanager
    def _root(self, create: bool) -> Iterator[int]:
        """The backup dir, opened; made (0700) if missing and `create`, else FileNotFoundError.
        Refused if it is a symlink, or it or a directory above it is writable by anyone but
        hostd's user (who could then swap in a directory or link of their own)."""
        path = self.dir
        _check_above(path)  # before making anything there
        if create:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700)
            _check_above(path)
        fd = _open_dir(path, None, "[backup] dir")
        try:
            _check_owner(path, os.fstat(fd), "[backup] dir")
            os.fchmod(fd, 0o700)
            yield fd
        finally:
            os.close(fd)

    def _user_dir(self, root: int, user: str, create: bool) -> int:
        check_name(user, "user")
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(user, 0o700, dir_fd=root)
        fd = _open_dir(self.dir / user, root, "a backup directory")
        try:
            _check_owner(self.dir / user, os.fstat(fd), "a backup directory")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _archives(self, udir: int) -> list[Archive]:
        found = []
        for name in os.listdir(udir):
            archive = parse_archive(name)
            if archive is None:
                continue
            st = os.stat(name, dir_fd=udir, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                found.append(Archive(archive.stem, archive.time, archive.kind, st.st_size))
        return _with_chains(found)

    # -- run -------------------------------------------------------------------------------

    def run(self, users: Sequence[str], full: bool, progress: Progress) -> list[Result]:
        """Back up each of `users` (one failing does not stop the others), then apply the
        retention to each that succeeded."""
        with self._exclusive(), self._root(create=True) as root:
            _remove_leftovers(root)
            results = []
            for user in users:
                results.append(self._one(root, user, full, progress))
            return results

    def _one(self, root: int, user: str, full: bool, progress: Progress) -> Result:
        try:
            udir = self._user_dir(root, user, create=True)
        except RuntimeFailure as exc:
            return Result(user, None, str(exc))
        try:
            archive = self._write(udir, user, full, progress)
        except RuntimeFailure as exc:
            log.warning("backup of %s failed: %s", user, exc)
            return Result(user, None, str(exc))
        except Exception as exc:  # a bug or the disk: the others are still backed up
            log.exception("backup of %s failed", user)
            return Result(user, None, f"internal error ({type(exc).__name__}): see hostd's log")
        else:
            removed = self._retain(udir)
            return Result(user, archive, None, removed)
        finally:
            os.close(udir)

    def _write(self, udir: int, user: str, full: bool, progress: Progress) -> Archive:
        existing = self._archives(udir)
        kind = next_kind(existing, self.settings.full_every, full)
        parent = _open_manifest(udir, existing[-1]) if kind == "incr" else None
        if kind == "incr" and parent is None:
            kind = "full"  # the copy is gone or damaged: start a new chain
        when = self.clock()
        if existing and when <= existing[-1].time:  # the clock went back: keep the order
            when = existing[-1].time + timedelta(milliseconds=1)
        stem = f"{stamp(when)}-{kind}"
        path = self.dir / user
        progress(f"{user}: {KINDS[kind]} backup into {path / (stem + SUFFIX)}")
        tmp, tmp_manifest = f".{stem}{SUFFIX}.tmp", f".{stem}{MANIFEST}.tmp"
        since = None if parent is None else (parent, str(path / (existing[-1].stem + MANIFEST)))
        try:
            with _new_file(udir, tmp) as out, _new_file(udir, tmp_manifest) as copy:
                # A running tenant waits frozen for its copy: that one goes at full speed.
                idle = not self.exporter.frozen_for_export(user)
                with priority.idle() if idle else contextlib.nullcontext():
                    home = self.settings.with_home
                    self.exporter.export(
                        user, out, since, home, progress, manifest_to=copy, background=idle
                    )
                os.fsync(out)
                os.fsync(copy)
            os.rename(tmp_manifest, stem + MANIFEST, src_dir_fd=udir, dst_dir_fd=udir)
            os.rename(tmp, stem + SUFFIX, src_dir_fd=udir, dst_dir_fd=udir)
            os.fsync(udir)
        finally:
            if parent is not None:
                os.close(parent)
            for name in (tmp, tmp_manifest):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=udir)
        size = os.stat(stem + SUFFIX, dir_fd=udir, follow_symlinks=False).st_size
        return Archive(stem, when, kind, size)

    def _retain(self, udir: int) -> tuple[str, ...]:
        removed = []
        for archive in expired(self._archives(udir), self.settings.keep):
            for name in (archive.name, archive.stem + MANIFEST):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=udir)
            removed.append(archive.name)
        os.fsync(udir)
        return tuple(removed)

    # -- list and restore ------------------------------------------------------------------

    def listing(self, user: str | None) -> dict[str, list[Archive]]:
        """Each tenant's archives (or one's), in time order, with their chains."""
        if user is None and not self.dir.exists():
            return {}
        with self._root(create=False) as root:
            users = [user] if user else sorted(_subdirs(root))
            found = {}
            for name in users:
                try:
                    udir = self._user_dir(root, name, create=False)
                except FileNotFoundError:
                    raise NotFound(f"no backups of {name}", "see `hostctl backup list`") from None
                try:
                    found[name] = self._archives(udir)
                finally:
                    os.close(udir)
            return found

    @contextlib.contextmanager
    def chain_files(self, user: str, at: datetime | None) -> Iterator[list[tuple[int, str]]]:
        """The chain to restore `user` from, opened (read-only, no symlink followed) in order,
        with their paths; closed on exit. Picked and opened under the run lock, so retention
        cannot delete them meanwhile; an open file outlives its deletion."""
        with self._exclusive(), self._root(create=False) as root:
            try:
                udir = self._user_dir(root, user, create=False)
            except FileNotFoundError:
                raise NotFound(f"no backups of {user}", "see `hostctl backup list`") from None
            try:
                chain = chain_at(self._archives(udir), at)
                if not chain:
                    raise NotFound(
                        f"no backup of {user} at or before {stamp(at) if at else 'now'}",
                        "see `hostctl backup list " + user + "`",
                    )
                files = []
                try:
                    for a in chain:
                        fd = os.open(
                            a.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=udir
                        )
                        files.append((fd, str(self.dir / user / a.name)))
                except BaseException:
                    _close(files)
                    raise
            finally:
                os.close(udir)
        try:
            yield files
        finally:
            _close(files)


def _open_dir(path: Path, dir_fd: int | None, what: str) -> int:
    name = path.name if dir_fd is not None else str(path)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise HostdError(
                f"{what} {path} is not a directory (a symlink or a file)",
                "remove it: hostd makes its own directories there",
            ) from None
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(exc.errno, exc.strerror, str(path)) from None
        raise HostdError(f"cannot open {what} {path}: {exc.strerror}", "check it") from None


def _check_above(path: Path) -> None:
    """The directories above `path` that exist are hostd's user's, or sticky."""
    above = Path(os.path.realpath(path.parent))
    for parent in [*reversed(above.parents), above]:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(parent)
            _check_owner(parent, st, "a directory above [backup] dir", sticky_ok=True)


def _check_owner(path: Path, st: os.stat_result, what: str, sticky_ok: bool = False) -> None:
    """Only hostd's user may change what is in `path` (in a sticky directory above, others
    cannot rename or remove what is hostd's)."""
    sticky = sticky_ok and st.st_mode & stat.S_ISVTX
    if st.st_uid != os.geteuid() or (st.st_mode & 0o022 and not sticky):
        raise HostdError(
            f"{what} {path} can be written by users other than root",
            f"use a directory only root can write to, or `chown root: {path}; chmod go-w {path}`",
        )


@contextlib.contextmanager
def _new_file(udir: int, name: str) -> Iterator[int]:
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=udir,
    )
    try:
        yield fd
    finally:
        os.close(fd)


def _open_manifest(udir: int, archive: Archive) -> int | None:
    """The manifest copy of `archive`, opened and checked; None if it is missing, not a
    regular file or damaged (then a new chain starts)."""
    name = archive.stem + MANIFEST
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=udir)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HostdError(f"{name} is not a file", "")
        Manifest.parse(os.read(fd, MAX_MANIFEST + 1), name)
        os.lseek(fd, 0, os.SEEK_SET)
    except RuntimeFailure as exc:
        log.warning("a new chain: the manifest copy %s is unusable (%s)", name, exc.cause)
        os.close(fd)
        return None
    return fd


def _close(files: list[tuple[int, str]]) -> None:
    for fd, _ in files:
        os.close(fd)


def _subdirs(root: int) -> list[str]:
    return [
        name
        for name in os.listdir(root)
        if stat.S_ISDIR(os.stat(name, dir_fd=root, follow_symlinks=False).st_mode)
    ]


def _remove_leftovers(root: int) -> None:
    """What an interrupted run left: hidden temporary files, and manifests whose archive was
    never renamed in."""
    for user in _subdirs(root):
        try:
            udir = os.open(user, _DIR_FLAGS, dir_fd=root)
        except OSError:
            continue
        try:
            names = set(os.listdir(udir))
            for name in names:
                stem = name.removesuffix(MANIFEST)
                leftover = name.startswith(".") and name.endswith(".tmp")
                orphan = stem != name and _NAME.fullmatch(stem) and stem + SUFFIX not in names
                st = os.stat(name, dir_fd=udir, follow_symlinks=False)
                if (leftover or orphan) and not stat.S_ISDIR(st.st_mode):
                    log.info("removing %s/%s, left by an interrupted backup", user, name)
                    os.unlink(name, dir_fd=udir)
        finally:
            os.close(udir)
