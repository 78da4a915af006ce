"""`hostctl user move USER ssh://[LOGIN@]HOST[:PORT]`: a tenant to another server, run by
hostctl as the admin, with the admin's own ssh keys; on the target it runs `ssh HOST CMD ...`
(CMD: `hostctl`, or e.g. "sudo hostctl").

1. A full export while the tenant runs (frozen for the copy) into a spool file,
   `<spool>/<user>.<id>.hostd` (0600, the admin's; hostctl opens it and passes the fd).
2. Sent with resume: the target stages it (hostd.staging) and says how many bytes it has;
   the rest goes from there. A broken ssh is retried with backoff; if it stays broken the
   command says how to resume: the same command again reuses the complete spool.
3. The target reads the staged archive through (every checksum); only then is the tenant
   stopped here (a clean stop).
4. An incremental export since the full (what changed until the stop) goes the same way; the
   target imports the chain, starting the tenant if it ran here.
5. The tenant is removed here (its IDs quarantined, as `user remove` does) unless
   --keep-source. A failure before the stop leaves it running here; after the stop, it is
   started here again and the target is left without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostd import archive
from hostd import protocol as p
from hostd.ctl import Client
from hostd.errors import HostdError
from hostd.staging import ID_PATTERN
from hostd.state import MIGRATIONS
from hostd.units import human_size
from runtime.errors import RuntimeFailure
from runtime.names import check_name

# ssh notices a dead link within a minute; the admin's own options (--ssh) come first and win
SSH_OPTIONS = ("-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4")
SSH_FAILED = 255  # ssh's exit status when it, not the remote command, failed
BACKOFF = 2.0  # seconds before the first retry of a broken transfer; doubled for each next
PROGRESS_EVERY = 2.0  # seconds between two progress lines of a transfer
Say = Callable[[str], None]


class Broken(HostdError):
    """The connection broke (ssh failed, or a transfer ended early): worth another try."""


@dataclass(frozen=True)
class Target:
    host: str
    login: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        """ssh://[LOGIN@]HOST[:PORT], nothing else."""
        bad = HostdError(
            f"{text[:100]!r} is not ssh://[LOGIN@]HOST[:PORT]",
            "name the target like ssh://host2, ssh://admin@host2 or ssh://host2:2200",
        )
        u = urllib.parse.urlsplit(text)
        try:
            port = u.port
        except ValueError:
            raise bad from None
        if (
            u.scheme != "ssh"
            or not u.hostname
            or u.hostname.startswith("-")
            or u.path not in ("", "/")
            or u.query
            or u.fragment
            or u.password is not None
            or u.username == ""
        ):
            raise bad
        return cls(u.hostname, u.username, port)

    def ssh_args(self) -> list[str]:
        """ssh's arguments naming the target (its host last, after `--`)."""
        login = ["-l", self.login] if self.login else []
        port = ["-p", str(self.port)] if self.port else []
        return [*login, *port, "--", self.host]


class Remote:
    """hostctl on the target, over ssh: its JSON replies, its errors as one line."""

    def __init__(self, target: Target, ssh: str, hostctl: str) -> None:
        self.target = target
        self.ssh = shlex.split(ssh)
        self.hostctl = hostctl  # shell words as the admin gave them, e.g. "sudo hostctl"
        if not self.ssh or not hostctl.strip():
            raise HostdError("--ssh and --remote-hostctl must name a program", "give one")

    def argv(self, *args: str) -> list[str]:
        command = f"{self.hostctl} {shlex.join([*args, '--json'])}"
        return [*self.ssh, *SSH_OPTIONS, *self.target.ssh_args(), command]

    def call(self, *args: str) -> Any:
        res = subprocess.run(self.argv(*args), stdin=subprocess.DEVNULL, capture_output=True)
        return self._result(res.returncode, res.stdout, res.stderr)

    def send(self, archive_id: str, fd: int, offset: int, size: int, meter: Meter) -> int:
        """Send the bytes of `fd` from `offset` to the target's stage of `archive_id`; the
        bytes it has then. ssh reads the file itself; its position is the progress."""
        os.lseek(fd, offset, os.SEEK_SET)
        args = ("transfer", "receive", archive_id, "--offset", str(offset), "--size", str(size))
        with subprocess.Popen(
            self.argv(*args), stdin=fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as proc:
            while True:
                try:
                    out, err = proc.communicate(timeout=PROGRESS_EVERY)
                    break
                except subprocess.TimeoutExpired:
                    meter.update(os.lseek(fd, 0, os.SEEK_CUR))
        return int(self._result(proc.returncode, out, err)["size"])

    def _result(self, code: int, out: bytes, err: bytes) -> Any:
        said = _last_line(err)
        if code == SSH_FAILED:
            raise Broken(
                f"ssh to {self.target.host} failed ({said or 'no reason given'})",
                "check that ssh reaches it (keys, --ssh), then run the same "
                "`hostctl user move USER TARGET` again",
            )
        if code != 0:
            cause, sep, fix = said.removeprefix("hostctl: ").rpartition(": ")
            if not sep:
                cause, fix = said or f"exit status {code}", "see hostd's log there"
            raise HostdError(f"on {self.target.host}: {cause}", fix)
        try:
            return json.loads(out)
        except ValueError:
            raise HostdError(
                f"{shlex.join(self.argv()[-1:])} on {self.target.host} did not answer in JSON",
                "give --remote-hostctl the command that runs hostctl there",
            ) from None


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


class Meter:
    """A transfer's progress: bytes, rate and time left, every PROGRESS_EVERY seconds."""

    def __init__(self, say: Say, size: int, offset: int) -> None:
        self.say = say
        self.size = size
        self.offset = offset
        self.start = time.monotonic()

    def update(self, done: int) -> None:
        self.say(self.line(done, time.monotonic() - self.start))

    def line(self, done: int, seconds: float) -> str:
        rate = (done - self.offset) / max(seconds, 1e-3)
        left = f", {_duration((self.size - done) / rate)} left" if rate > 0 else ""
        percent = 100 * done // max(self.size, 1)
        return (
            f"sent {human_size(done)} of {human_size(self.size)} ({percent}%) at "
            f"{human_size(int(rate))}/s{left}"
        )


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def transfer(
    remote: Remote,
    archive_id: str,
    fd: int,
    retries: int,
    say: Say,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Get the archive in `fd` whole to the target, resuming from what it has after each
    break; the bytes sent this time. Gives up after `retries` breaks in a row that moved
    nothing forward (a break after progress starts the count again)."""
    size = os.fstat(fd).st_size
    sent = failures = 0
    while True:
        try:
            offset = int(remote.call("transfer", "offset", archive_id)["size"])
            if offset > size:
                raise HostdError(
                    f"{remote.target.host} has {offset} bytes of archive {archive_id}, more "
                    f"than its {size}",
                    f"discard it there (`hostctl transfer discard {archive_id}`), run again",
                )
            if offset == size:
                return sent
            if sent == 0 and offset:
                say(f"resuming at {human_size(offset)} of {human_size(size)}")
            have = remote.send(archive_id, fd, offset, size, Meter(say, size, offset))
            sent += have - offset
            if have == size:
                say(f"sent {human_size(size)}")
                return sent
            failures = 0 if have > offset else failures
            why = f"the transfer stopped at {human_size(have)} of {human_size(size)}"
        except Broken as exc:
            why = exc.cause
        failures += 1
        if failures > retries:
            raise Broken(
                f"the transfer to {remote.target.host} broke: {why}",
                "run the same `hostctl user move USER TARGET` again: it resumes from there",
            )
        delay = BACKOFF * 2 ** (failures - 1)
        say(f"{why}; trying again in {delay:g} s ({failures} of {retries})")
        sleep(delay)


@dataclass(frozen=True)
class Spooled:
    path: Path
    head: archive.Header


class Spool:
    """Archives of one tenant waiting to be sent: `<dir>/<user>.<id>.hostd`, the admin's, 0600
    (one of anybody else, or readable by others, is never sent: /var/tmp is everyone's)."""

    def __init__(self, directory: Path, user: str) -> None:
        self.directory = directory
        self.user = check_name(user, "user")

    def prepare(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise HostdError(
                f"cannot make the spool dir {self.directory}: {exc.strerror}",
                "give --spool a directory you can write",
            ) from None

    def archives(self) -> list[Spooled]:
        """The complete archives of this tenant spooled here, oldest first."""
        pattern = re.compile(rf"{re.escape(self.user)}\.([0-9a-f]{{32}})\.hostd")
        found = []
        for path in sorted(self.directory.glob(f"{self.user}.*.hostd")):
            match = pattern.fullmatch(path.name)
            if match is None:
                continue
            head = self._header(path)
            if head is not None and head.id == match[1] and head.user == self.user:
                found.append(Spooled(path, head))
        return sorted(found, key=lambda s: s.head.created)

    def _header(self, path: Path) -> archive.Header | None:
        """The header of a spooled archive that is the admin's own, or None."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not st.st_size:
                return None
            reader = archive.Reader(fd, str(path), len(MIGRATIONS))
            try:
                return reader.header()
            except RuntimeFailure:
                return None
            finally:
                reader.close()
        finally:
            os.close(fd)

    def create(self) -> Path:
        """A new, empty file for an export (named for its id once complete)."""
        path = self.directory / f"{self.user}.{secrets.token_hex(8)}.part"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        return path

    def complete(self, part: Path, archive_id: str) -> Path:
        if not ID_PATTERN.fullmatch(archive_id):
            raise HostdError(f"hostd exported an archive with id {archive_id!r}", "see its log")
        path = self.directory / f"{self.user}.{archive_id}.hostd"
        part.rename(path)
        return path


def run(c: Client, args: argparse.Namespace) -> None:
    Move(c, args).run()


class Move:
    def __init__(self, c: Client, args: argparse.Namespace) -> None:
        if args.retries < 0:
            raise HostdError("--retries must be 0 or more", "give a count of retries")
        self.c = c
        self.args = args
        self.user: str = args.user
        self.target = Target.parse(args.target)
        self.remote = Remote(self.target, args.ssh, args.remote_hostctl)
        self.spool = Spool(Path(args.spool), args.user)
        self.host = self.target.host
        self.there: str = args.as_user or args.user

    def say(self, text: str) -> None:
        self.c.progress(text)

    def run(self) -> None:
        details = self.c.raw("user.show", p.UserArgs(self.user))
        running = details["tenant"]["desired"] == "running"
        self._check_target()
        self.spool.prepare()
        full = self._full()
        self._send(full)
        self._verify(full)
        if running:
            self.say(f"stopping {self.user} here")
            self.c("stop", p.UserArgs(self.user))
        try:
            self._finish(full, running)
        except RuntimeFailure as exc:
            raise HostdError(exc.cause, exc.fix) from None
        if self.args.keep_source:
            self.c.say(f"moved {self.user} to {self.host} as {self.there}; kept here, stopped")
        else:
            self.c("user.remove", p.UserRemoveArgs(self.user))
            self.c.say(f"moved {self.user} to {self.host} as {self.there}; removed here")
        full.path.unlink(missing_ok=True)

    def _verify(self, full: Spooled) -> None:
        """The target reads the staged archive through. A damaged one is discarded there and
        here: the next run exports and sends it anew."""
        self.say(f"{self.host} checks the archive")
        try:
            self.remote.call("transfer", "verify", full.head.id)
        except Broken:
            raise
        except RuntimeFailure as exc:
            with contextlib.suppress(RuntimeFailure):
                self.remote.call("transfer", "discard", full.head.id)
            full.path.unlink(missing_ok=True)
            raise HostdError(
                f"{exc.cause} ({self.user} is untouched here)",
                "run the same `hostctl user move USER TARGET` again: it exports it anew",
            ) from None

    def _finish(self, full: Spooled, running: bool) -> None:
        """After the stop: the changes since the full, then the import there. A failure
        starts the tenant here again (and says so), unless the target may have it."""
        incremental: Spooled | None = None
        importing = False
        try:
            incremental = self._export(full)
            self._send(incremental)
            importing = True
            self._import([full, incremental], running)
        except (RuntimeFailure, KeyboardInterrupt) as exc:
            if importing and isinstance(exc, Broken) and self._imported_there():
                return  # only the answer was lost
            if incremental is not None:
                with contextlib.suppress(RuntimeFailure):
                    self.remote.call("transfer", "discard", incremental.head.id)
            if running:
                self.say(f"starting {self.user} here again")
                self.c("start", p.UserArgs(self.user))
            if isinstance(exc, RuntimeFailure):
                where = "runs here again" if running else "is still here, stopped"
                raise HostdError(f"{exc.cause} ({self.user} {where})", exc.fix) from None
            raise
        finally:
            if incremental is not None:
                incremental.path.unlink(missing_ok=True)

    def _imported_there(self) -> bool:
        """Whether the target has the tenant after an import whose answer was lost; if that
        cannot be learnt either, the tenant stays stopped here and the admin decides."""
        try:
            return any(t.get("user") == self.there for t in self.remote.call("user", "list"))
        except RuntimeFailure:
            raise HostdError(
                f"lost {self.host} while it imported {self.there}: it may have it now",
                f"see `hostctl user show {self.there}` there; if it has it, "
                f"`hostctl user remove {self.user}` here, else `hostctl start {self.user}`",
            ) from None

    def _check_target(self) -> None:
        """Before anything is copied: ssh works, hostctl there answers, the name is free."""
        tenants = self.remote.call("user", "list")
        if any(t.get("user") == self.there for t in tenants):
            raise HostdError(
                f"{self.there} is a tenant on {self.host} already",
                "remove it there, or move under another name with --as",
            )

    def _full(self) -> Spooled:
        """A complete full archive spooled by an earlier run (its send resumes), or a new one."""
        spooled = self.spool.archives()
        for s in spooled:  # incrementals of a run cut short: made again
            if s.head.kind != "full":
                s.path.unlink(missing_ok=True)
        fulls = [s for s in spooled if s.head.kind == "full"]
        if fulls:
            self.say(f"reusing {fulls[-1].path} (exported {fulls[-1].head.created})")
            return fulls[-1]
        return self._export(None)

    def _export(self, parent: Spooled | None) -> Spooled:
        what = "a full export" if parent is None else "an incremental export"
        self.say(f"{what} of {self.user} into {self.spool.directory}")
        part = self.spool.create()
        try:
            with contextlib.ExitStack() as files:
                fds = [files.enter_context(open(part, "wb")).fileno()]
                since = None
                if parent is not None:
                    fds.append(files.enter_context(open(parent.path, "rb")).fileno())
                    since = str(parent.path)
                # The home goes in the last archive only: read after the stop, as it then is.
                home = parent is not None and self.args.with_home
                request = p.UserExportArgs(self.user, with_home=home, since=since)
                done = self.c("user.export", request, fds)
            path = self.spool.complete(part, done.id)
        finally:
            part.unlink(missing_ok=True)
        spooled = next((s for s in self.spool.archives() if s.path == path), None)
        if spooled is None:
            raise HostdError(f"{path} is not the archive hostd wrote", "run the move again")
        return spooled

    def _send(self, spooled: Spooled) -> None:
        with open(spooled.path, "rb") as f:
            self.say(f"sending {spooled.head.kind} archive {spooled.head.id} to {self.host}")
            transfer(self.remote, spooled.head.id, f.fileno(), self.args.retries, self.say)

    def _import(self, chain: list[Spooled], start: bool) -> None:
        self.say(f"{self.host} imports {self.there}")
        args = ["transfer", "import", *(s.head.id for s in chain), "--range", self.args.range]
        if self.args.as_user:
            args += ["--as", self.args.as_user]
        if start:
            args.append("--start")
        if self.args.with_home:
            args.append("--with-home")
        done = self.remote.call(*args)
        if done.get("warning"):
            self.say(f"warning from {self.host}: {done['warning']}")
