"""Subordinate ID ranges in /etc/subuid and /etc/subgid: one exclusive range per tenant.

hostd registers tenants' ranges under one dedicated, locked account (`[subids] owner`), never
the tenant's own name, so newuidmap/newgidmap refuse every real user, and useradd and usermod
still see the ranges as taken. Choosing a range is pure (entries in, a start out). `SubIdFiles`
does the file I/O under shadow-utils' own lock files, so useradd, usermod, newuidmap and podman
see every range hostd hands out, and hostd sees theirs.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from hostd.errors import HostdError
from runtime import proc
from runtime.ids import RANGE_SIZE

NOLOGIN = "/usr/sbin/nologin"
SHADOW = Path("/etc/shadow")
_POLL = 0.05  # seconds between looks at a lock file someone else holds

# shadow's strtoul(..., 0): leading C whitespace, optional '+', then hex, octal or decimal
_C_ULONG = re.compile(r"[ \t\n\v\f\r]*\+?(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))")

# Lock files name only a pid, so threads of one process cannot tell each other's locks apart
# (and would share the `<file>.<pid>` temp file): they take turns here first.
_THREADS = threading.Lock()


@dataclass(frozen=True)
class SubIdEntry:
    """One `owner:start:count` line; `owner` is a user name or a numeric uid."""

    owner: str
    start: int
    count: int

    @property
    def end(self) -> int:
        """Last ID of the range (inclusive)."""
        return self.start + self.count - 1

    def overlaps(self, other: SubIdEntry) -> bool:
        return _overlap(self.start, self.end, other.start, other.end)


def parse(text: str) -> list[SubIdEntry]:
    """The entries of a subuid/subgid file; comments, blank and malformed lines are skipped."""
    return [e for e in map(_entry, text.split("\n")) if e is not None]


def allocate(
    entries_uid: list[SubIdEntry],
    entries_gid: list[SubIdEntry],
    reserved: Iterable[int],
    lo: int,
    hi: int,
    count: int = RANGE_SIZE,
) -> int:
    """The lowest start of `count` IDs within [lo, hi], the same for subuid and subgid, that
    overlaps no entry of either file and no `reserved` range (starts the state records,
    `count` IDs each, perhaps not written yet).

    Entries of every owner count as taken, the new tenant's own included: a range registered
    under the user's name (useradd gives one) is theirs to map with newuidmap, so it must never
    become their container's.
    """
    taken = [(s, s + count - 1) for s in reserved]
    taken += [(e.start, e.end) for e in (*entries_uid, *entries_gid) if e.count > 0]
    start = lo
    for s, t in sorted(taken):
        if start + count - 1 < s:
            break
        start = max(start, t + 1)
    if start + count - 1 > hi:
        raise HostdError(
            f"no free subordinate ID range of {count} between {lo} and {hi}",
            "raise SUB_UID_MAX in /etc/login.defs or [subids] max in hostd.toml, "
            "or release quarantined ranges (`hostctl ranges`)",
        )
    return start


def ensure_owner(name: str, min_uid: int) -> bool:
    """Make sure the owner of hostd's ranges exists as a locked system account (no home, no
    login shell, no usable password), creating it if missing. True when it was created.
    Refused if someone could log in or `su` as it: they could newuidmap into every tenant's
    IDs."""
    created = False
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        proc.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                NOLOGIN,
                "--comment",
                "hostd tenant ID ranges",
                name,
            ],
            fix=f"create it by hand: useradd --system --shell {NOLOGIN} {name}",
        )
        pw, created = pwd.getpwnam(name), True
    problem = owner_problem(pw, min_uid)
    if problem is not None:
        raise HostdError(
            f"[subids] owner {name} {problem}: anyone who can act as it can map every tenant's IDs",
            f"lock it (`usermod -L -s {NOLOGIN} {name}`) or set [subids] owner to another name",
        )
    return created


def owner_problem(pw: pwd.struct_passwd, min_uid: int) -> str | None:
    """Why this account is unfit to own hostd's ranges (a human could act as it), or None."""
    if not 0 < pw.pw_uid < min_uid:
        return f"has uid {pw.pw_uid}: not a system account (0 < uid < {min_uid})"
    if os.path.basename(pw.pw_shell) not in ("nologin", "false"):
        return f"has the login shell {pw.pw_shell}"
    if _password(pw.pw_name, pw.pw_passwd)[:1] not in ("!", "*"):
        return "has a usable or empty password"
    return None


def _password(name: str, passwd_field: str) -> str:
    """The account's password hash: from /etc/shadow, else the passwd field."""
    for line in _read(SHADOW).splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) > 1:
            return fields[1]
    return passwd_field


class SubIdFiles:
    """The subuid and subgid files, changed in place the way shadow-utils changes them.

    add() and remove() must run inside locked(); callers should also read() there for
    allocate(), or a concurrent useradd may hand out the same IDs.
    """

    def __init__(self, subuid: Path, subgid: Path, lock_timeout: float = 15.0) -> None:
        self.subuid = subuid
        self.subgid = subgid
        self.lock_timeout = lock_timeout
        self._holder: int | None = None  # thread inside locked()

    def read(self) -> tuple[list[SubIdEntry], list[SubIdEntry]]:
        """Entries of (subuid, subgid); a missing file has none."""
        return parse(_read(self.subuid)), parse(_read(self.subgid))

    def add(self, user: str, start: int, count: int) -> bool:
        """Give `user` the range in both files; entries already in both are left as they are.
        When one file lacks it (a change cut short between the two files), the entry goes to
        the end of both, moved from where it was, so the files stay alike line for line.
        True when an entry had to be written."""
        self._check_locked()
        self._check_owner(user)
        entry = SubIdEntry(user, start, count)
        texts = {path: _read(path) for path in (self.subuid, self.subgid)}
        if all(entry in parse(text) for text in texts.values()):
            return False
        for path, text in texts.items():
            kept = "".join(ln for ln in _lines(text) if _entry(ln.removesuffix("\n")) != entry)
            sep = "\n" if kept and not kept.endswith("\n") else ""
            _replace(path, f"{kept}{sep}{user}:{start}:{count}\n")
        return True

    def reown(self, start: int, count: int, old: Iterable[str], new: str) -> list[Path]:
        """Give the range's entries of any `old` owner to `new` in both files, each on its own
        line (a duplicate of an entry `new` has already goes). Returns the files changed."""
        self._check_locked()
        self._check_owner(new)
        olds = set(old) - {new}
        changed = []
        for path in (self.subuid, self.subgid):
            lines = _lines(_read(path))
            have = SubIdEntry(new, start, count) in parse("".join(lines))
            out = []
            for line in lines:
                e = _entry(line.removesuffix("\n"))
                if e is not None and e.owner in olds and (e.start, e.count) == (start, count):
                    if have:
                        continue
                    end = "\n" if line.endswith("\n") else ""
                    line, have = f"{new}:{start}:{count}{end}", True
                out.append(line)
            if out != lines:
                _replace(path, "".join(out))
                changed.append(path)
        return changed

    def remove(self, user: str, start: int, count: int) -> None:
        """Take exactly this range of `user` out of both files; every other byte stays."""
        self._check_locked()
        entry = SubIdEntry(user, start, count)
        for path in (self.subuid, self.subgid):
            lines = _lines(_read(path))
            kept = [line for line in lines if _entry(line.removesuffix("\n")) != entry]
            if len(kept) != len(lines):
                _replace(path, "".join(kept))

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold `<file>.lock` of both files as shadow's commonio does, waiting up to
        lock_timeout seconds for useradd, usermod or another hostd to finish."""
        deadline = time.monotonic() + self.lock_timeout
        if not _THREADS.acquire(timeout=max(self.lock_timeout, 0)):  # -1 would mean forever
            raise HostdError(
                f"{self.subuid} is being changed by another thread of pid {os.getpid()}",
                "retry when it has finished",
            )
        taken: list[tuple[Path, int]] = []
        try:
            for path in (self.subuid, self.subgid):
                taken.append(_lock(path, deadline))
            self._holder = threading.get_ident()
            yield
        finally:
            self._holder = None
            for lock, inode in reversed(taken):
                with suppress(FileNotFoundError):
                    if os.stat(lock).st_ino == inode:  # still ours, not taken over meanwhile
                        os.unlink(lock)
            _THREADS.release()

    def _check_owner(self, owner: str) -> None:
        if not owner or owner.startswith("#") or any(c in owner for c in ":\n"):
            raise HostdError(
                f"user name {owner!r} cannot be written to {self.subuid}",
                "use a name without ':' or newlines that does not start with '#'",
            )

    def _check_locked(self) -> None:
        assert self._holder == threading.get_ident(), "SubIdFiles changed outside locked()"


def _entry(line: str) -> SubIdEntry | None:
    """The entry on one line (no newline), parsed as shadow does; None for anything else."""
    fields = line.split(":")
    if line.startswith("#") or len(fields) != 3 or not fields[0]:
        return None
    start, count = _c_ulong(fields[1]), _c_ulong(fields[2])
    if start is None or count is None:
        return None
    return SubIdEntry(fields[0], start, count)


def _c_ulong(text: str) -> int | None:
    """A number as shadow reads it (strtoul base 0), so `0x186a0` is a range here too."""
    m = _C_ULONG.fullmatch(text)
    if m is None:
        return None
    hex_digits, octal, decimal = m.groups()
    if hex_digits is not None:
        return int(hex_digits, 16)
    return int(octal, 8) if octal is not None else int(decimal)


def _overlap(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start <= b_end and b_start <= a_end


def _lines(text: str) -> list[str]:
    """Lines with their newline kept (only `\\n` ends a line, as in shadow), so joining them
    gives back `text` byte for byte."""
    *full, last = text.split("\n")
    return [line + "\n" for line in full] + ([last] if last else [])


def _read(path: Path) -> str:
    """File content; bytes that are not UTF-8 survive a rewrite unchanged."""
    try:
        return path.read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return ""


def _replace(path: Path, text: str) -> None:
    """Atomically replace `path`, keeping its mode and owner (fsutil.atomic_write resets both)
    and syncing the directory, as these are the system's files, not ours."""
    try:
        st = os.stat(path)
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o644, None  # new file: owned by us, root in hostd
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8", "surrogateescape"))
            f.flush()
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _lock(path: Path, deadline: float) -> tuple[Path, int]:
    """Take `<path>.lock` like shadow's commonio: hard-link a file holding our pid to it, taking
    over a lock whose holder is dead. Returns the lock and its inode."""
    lock = path.with_name(f"{path.name}.lock")
    mine = path.with_name(f"{path.name}.{os.getpid()}")
    with open(mine, "w") as f:
        f.write(str(os.getpid()))  # no newline: shadow rejects "123\n" as an invalid pid
        inode = os.fstat(f.fileno()).st_ino
    try:
        while True:
            try:
                os.link(mine, lock)
                return lock, inode
            except FileExistsError:
                pass
            holder = _live_holder(lock)
            if holder is None:
                continue  # released or stale and removed: try again at once
            if time.monotonic() >= deadline:
                cause = (
                    f"{lock} is held by pid {holder}"
                    if holder.isdigit()
                    else f"{lock} holds no valid pid ({holder!r})"
                )
                raise HostdError(cause, "wait for useradd/usermod to finish or remove a stale lock")
            time.sleep(_POLL)
    finally:
        os.unlink(mine)


def _live_holder(lock: Path) -> str | None:
    """The pid text in `lock` if its holder may still be alive; None if the lock is gone or
    was stale and has been removed. A lock without a valid pid is never taken over (as in
    shadow): only an admin can tell whether it is still in use."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        text = os.read(fd, 32).decode(errors="replace")
        pid = int(text) if text.isascii() and text.isdigit() else 0
        # Our own pid in a lock we do not hold is a leftover from before a reboot.
        if not 0 < pid < 2**31 or (pid != os.getpid() and _alive(pid)):
            return text
        with suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # not a fresh lock of someone else
                os.unlink(lock)
        return None
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
