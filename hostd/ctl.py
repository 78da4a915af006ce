"""hostctl's commands: requests to hostd's admin socket, and their output for people or as
JSON. (`hostd.hostctl` parses the command line without loading any of this.)"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from hostd import protocol as p
from hostd.client import call
from hostd.errors import HostdError
from hostd.startqueue import ordinal
from hostd.units import format_size, human_size
from runtime.output import print_json, print_recipes, print_table


class Client:
    """The admin socket as hostctl uses it: typed replies, progress on stderr."""

    def __init__(self, socket: Path, json: bool) -> None:
        self.socket = socket
        self.json = json

    @classmethod
    def of(cls, args: argparse.Namespace) -> Client:
        """The admin socket of the configuration named on the command line."""
        from hostd import configfiles  # not for --help, completion or usage errors

        return cls(configfiles.admin_socket(Path(args.config or configfiles.MAIN)), bool(args.json))

    def progress(self, text: str) -> None:
        if not self.json:
            print(f"... {text}", file=sys.stderr, flush=True)

    def raw(self, op: str, request: object = None, fds: Sequence[int] = ()) -> Any:
        return call(self.socket, op, request, fds, self.progress)

    def __call__(self, op: str, request: object = None, fds: Sequence[int] = ()) -> Any:
        """The reply as the protocol's dataclass; printed whole as JSON with --json."""
        data = self.raw(op, request, fds)
        if self.json:
            print_json(data)
        return p.decode_reply(op, data)

    def say(self, text: str) -> None:
        if not self.json:
            print(text)


def run(args: argparse.Namespace) -> int:
    """Carry out the parsed command line; its exit status."""
    if args.cmd == "doctor":
        return _doctor(args)
    c = Client.of(args)
    if args.cmd in ("exec", "logs"):
        return _exec(c, args)
    if args.cmd == "backup":
        return _backup(c, args)
    commands: dict[str, Callable[[Client, argparse.Namespace], None]] = {
        "image": _image,
        "user": _user,
        "quota": _quota_set,
        "ports": _ports,
        "ranges": _ranges,
        "start": _lifecycle,
        "stop": _lifecycle,
        "restart": _lifecycle,
        "status": _status,
        "transfer": _transfer,
    }
    commands[args.cmd](c, args)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from hostd import config, configfiles, doctor  # the runtime's checks: only for this command

    checks = doctor.run(config.load(Path(args.config or configfiles.MAIN)))
    print_table(
        args.json,
        [c._asdict() for c in checks],
        ("CHECK", "STATUS", "DETAIL"),
        [(c.name, "WARN" if c.warning else "ok" if c.ok else "FIX", c.detail) for c in checks],
    )
    return 0 if all(c.ok for c in checks) else 1


def _image(c: Client, args: argparse.Namespace) -> None:
    if args.sub == "build" and args.name is None:
        print_recipes(args.json, c.raw("image.recipes"))
    elif args.sub == "build":
        m = c("image.build", p.ImageBuildArgs(args.name, args.recipe))
        c.say(f"built {m.name}@{m.version} ({human_size(m.size)})")
    elif args.sub == "import":
        with _open(Path(args.tarball)) as f:
            request = p.ImageImportArgs(args.name, str(Path(args.tarball).resolve()))
            m = c("image.import", request, [f.fileno()])
        c.say(f"imported {m.name}@{m.version} ({human_size(m.size)})")
    elif args.sub == "list":
        images: list[p.ImageInfo] = p.decode_reply("image.list", data := c.raw("image.list"))
        rows = [
            (m.name, m.version, human_size(m.size), str(len(m.packages)), m.created) for m in images
        ]
        print_table(args.json, data, ("NAME", "VERSION", "SIZE", "PACKAGES", "CREATED"), rows)
    else:
        c("image.remove", p.ImageArgs(args.name))
        c.say(f"removed image {args.name}")


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise HostdError(f"cannot read {path}: {exc.strerror}", "give a readable file") from None


def _user(c: Client, args: argparse.Namespace) -> None:
    if args.sub == "add":
        t = c("user.add", p.UserAddArgs(user=args.user, image=args.image, **_limits(args)))
        c.say(f"added {t.user}: IDs {t.range_start}-{t.range_end}, image {t.image}")
    elif args.sub == "list":
        _status_table(args, c.raw("user.list"))
    elif args.sub == "show":
        details = c("user.show", p.UserArgs(args.user))
        if not args.json:
            _show(details)
    elif args.sub == "set":
        done = c("user.set", p.UserSetArgs(args.user, args.auto_stop))
        c.say(f"{done.user}: auto-stop {done.auto_stop}")
    elif args.sub == "rebase":
        r = c("user.rebase", p.UserRebaseArgs(args.user, args.image, args.restart))
        _rebased(c, r)
    elif args.sub == "export":
        _export(c, args)
    elif args.sub == "import":
        _import(c, args)
    elif args.sub == "move":
        from hostd import move

        move.run(c, args)
    else:
        c("user.remove", p.UserRemoveArgs(args.user, args.keep_data))
        c.say(f"removed {args.user}" + (" (data kept)" if args.keep_data else ""))


def _export(c: Client, args: argparse.Namespace) -> None:
    """The archive goes to a file opened here, as the caller (hostd never opens an admin's
    path as root): new, 0600, unless --force; or to stdout, never a terminal."""
    to_stdout = args.output == "-"
    if to_stdout and os.isatty(1):
        raise HostdError("will not write an archive to a terminal", "give -o FILE or redirect")
    if to_stdout and c.json:
        raise HostdError("--json and an archive on stdout would mix", "give -o FILE")
    with contextlib.ExitStack() as stack:
        parent = [stack.enter_context(_open(Path(args.since))).fileno()] if args.since else []
        out = 1 if to_stdout else _create(Path(args.output), args.force)
        try:
            r = c(
                "user.export",
                p.UserExportArgs(args.user, args.with_home, args.since),
                [out, *parent],
            )
        except BaseException:
            if not to_stdout:  # half an archive is no archive
                os.unlink(args.output)
            raise
        finally:
            if not to_stdout:
                os.close(out)
    how = f"frozen for {r.frozen:.1f} s" if r.frozen is not None else "stopped: as it was"
    size = "" if r.size is None else f"{human_size(r.size)}, "
    text = (
        f"exported {r.user} ({r.kind} {r.id}): {size}{r.chunks} of {r.volume_chunks} chunks"
        f"{f', home in {r.home_pieces} pieces' if r.home_pieces else ''}; {how};"
        f" {r.seconds:.1f} s"
    )
    if to_stdout:
        print(text, file=sys.stderr)
    else:
        c.say(text)


def _create(path: Path, force: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        raise HostdError(f"{path} exists", "give another file, or --force") from None
    except OSError as exc:
        raise HostdError(f"cannot write {path}: {exc.strerror}", "give a writable path") from None


def _import(c: Client, args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        fds = [stack.enter_context(_open(Path(f))).fileno() for f in args.files]
        request = p.UserImportArgs(
            [str(f) for f in args.files],
            args.as_user,
            args.range,
            args.with_home,
            not args.no_start,
        )
        _imported(c, c("user.import", request, fds))


def _imported(c: Client, r: p.Imported) -> None:
    """What `user import` and `backup restore` made."""
    moved = " (files shifted from the archive's range)" if r.shifted else ""
    home = (
        ""
        if r.home_skipped is None
        else f"; home restored, {r.home_skipped} existing entries left as they were"
    )
    c.say(
        f"imported {r.user}: IDs {r.range_start}-{r.range_end}{moved}, image {r.image}"
        f" ({r.image_version}), {r.archives} archives, {r.chunks} chunks{home}"
        f"{', started' if r.started else ''}; {r.seconds:.1f} s"
    )
    if not c.json and r.warning:
        print(f"hostctl: warning: {r.warning}", file=sys.stderr)


def _quota_set(c: Client, args: argparse.Namespace) -> None:
    res = c("quota.set", p.QuotaSetArgs(user=args.user, **_limits(args)))
    when = ", ".join(f"{k} {v}" for k, v in res.applied.items())
    c.say(f"quota of {args.user}: {_quota_text(res.quota)} (applied: {when})")


def _ports(c: Client, args: argparse.Namespace) -> None:
    if args.sub == "list":
        grants: list[p.PortGrant] = p.decode_reply("ports.list", data := c.raw("ports.list"))
        rows = [(_port_range(g.first, g.last), g.user, g.address) for g in grants]
        print_table(args.json, data, ("PORTS", "USER", "ADDRESS"), rows)
        return
    res = c(f"ports.{args.sub}", p.PortsArgs(args.user, args.ports))
    verb = "granted to" if res.granted else "revoked from"
    c.say(f"ports {_port_range(res.first, res.last)} {verb} {args.user}")


def _ranges(c: Client, args: argparse.Namespace) -> None:
    if args.sub == "release":
        r = c("ranges.release", p.RangeArgs(args.start))
        c.say(
            f"released IDs {r.start}-{r.end} (formerly {r.user}'s, quarantined since "
            f"{r.since}): new tenants may get them"
        )
        return
    ranges: list[p.RangeInfo] = p.decode_reply("ranges.list", data := c.raw("ranges.list"))
    rows = [(str(r.start), str(r.end), r.user, r.status, r.since) for r in ranges]
    print_table(args.json, data, ("START", "END", "USER", "STATUS", "SINCE"), rows)


def _transfer(c: Client, args: argparse.Namespace) -> None:
    """The target's side of `user move` (which runs these over ssh, with --json)."""
    if args.sub == "receive":
        if os.isatty(sys.stdin.fileno()):
            raise HostdError("stdin is a terminal", "send the archive's bytes on stdin")
        request = p.ReceiveArgs(args.id, args.offset, args.size)
        staged = c("transfer.receive", request, [sys.stdin.fileno()])
        c.say(f"{staged.size} of {args.size} bytes of {staged.id} staged")
    elif args.sub == "offset":
        c.say(str(c("transfer.offset", p.TransferArgs(args.id)).size))
    elif args.sub == "verify":
        v = c("transfer.verify", p.TransferArgs(args.id))
        c.say(f"{v.id}: a {v.kind} archive of {v.user}, every checksum right")
    elif args.sub == "import":
        chain = p.TransferImportArgs(args.ids, args.as_user, args.range, args.start, args.with_home)
        d = c("transfer.import", chain)
        c.say(f"imported {d.user}: IDs {d.range_start}-{d.range_end}")
        if not c.json and d.warning:
            print(f"hostctl: warning: {d.warning}", file=sys.stderr)
    else:
        c("transfer.discard", p.TransferArgs(args.id))
        c.say(f"discarded {args.id}")


def _backup(c: Client, args: argparse.Namespace) -> int:
    """`backup run` fails (status 1) if any tenant's backup failed, after all were tried."""
    if args.sub == "list":
        data = c.raw("backup.list", p.BackupListArgs(args.user))
        found: list[p.BackupInfo] = p.decode_reply("backup.list", data)
        rows = [(b.user, b.name, b.kind, human_size(b.size), b.created, b.chain) for b in found]
        print_table(args.json, data, ("USER", "ARCHIVE", "KIND", "SIZE", "CREATED", "CHAIN"), rows)
        return 0
    if args.sub == "restore":
        request = p.BackupRestoreArgs(
            args.user, args.at, args.as_user, args.range, args.with_home, not args.no_start
        )
        _imported(c, c("backup.restore", request))
        return 0
    results: list[p.BackupResult] = c("backup.run", p.BackupRunArgs(args.user or None, args.full))
    for r in results:
        if r.archive is None:
            c.say(f"{r.user}: FAILED: {r.error}")
        else:
            removed = f", removed {len(r.removed)} old" if r.removed else ""
            a = r.archive
            c.say(f"{r.user}: {a.kind} {a.name} ({human_size(a.size)}){removed}")
    failed = [r.user for r in results if r.archive is None]
    if failed and not c.json:
        print(f"hostctl: backup failed for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _lifecycle(c: Client, args: argparse.Namespace) -> None:
    c(args.cmd, p.UserArgs(args.user))
    c.say(f"{args.cmd}: {args.user} done")


def _status(c: Client, args: argparse.Namespace) -> None:
    _status_table(args, c.raw("status", p.StatusArgs(args.user)))


def _exec(c: Client, args: argparse.Namespace) -> int:
    if args.cmd == "logs":
        follow = ["-f"] if args.follow else []
        command = ["journalctl", "--no-pager", "-n", str(args.lines), *follow]
        request = p.ExecArgs(command, user=args.user)
    elif not args.command:
        raise HostdError("no command given", "add one after `--`")
    elif args.tty:
        size = shutil.get_terminal_size()
        term = os.environ.get("TERM", "xterm")
        request = p.ExecArgs(
            args.command,
            user=args.user,
            as_user=args.as_user,
            tty=True,
            term=term,
            rows=size.lines,
            cols=size.columns,
        )
        return int(call(c.socket, "exec", request, progress=c.progress, on_tty=_tty)["exit"])
    else:
        request = p.ExecArgs(args.command, user=args.user, as_user=args.as_user)
    fds = [sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno()]
    return int(call(c.socket, "exec", request, fds, c.progress)["exit"])


def _tty(master: int) -> None:
    from runtime.ttyexec import relay

    try:
        relay(master)
    finally:
        os.close(master)


def _rebased(c: Client, r: p.Rebased) -> None:
    if r.old == r.new:
        c.say(f"{r.user} is already on {r.new}: nothing to do")
        return
    how = " (restarted)" if r.restarted else ""
    pruned = f"; pruned {', '.join(r.pruned)}" if r.pruned else ""
    c.say(f"rebased {r.user} from {r.old} to {r.new}{how}{pruned}")
    if not c.json and r.warning:
        print(f"hostctl: warning: {r.warning}", file=sys.stderr)


def _limits(args: argparse.Namespace) -> dict[str, str]:
    return {k: getattr(args, k) for k in p.LIMITS if getattr(args, k) is not None}


def _port_range(first: int, last: int) -> str:
    return f"{first}-{last}" if first != last else str(first)


def _quota_text(q: p.Quota) -> str:
    def text(value: Any, fmt: Callable[[Any], str] = str) -> str:
        return "unlimited" if value is None else fmt(value)

    return (
        f"cpus={text(q.cpus)} memory={text(q.memory, format_size)}"
        f" disk={text(q.disk, format_size)} pids={text(q.pids)}"
    )


def _used(value: Any, limit: Any, fmt: Callable[[Any], str] = str) -> str:
    used = "-" if value is None else fmt(value)
    return used if limit is None else f"{used}/{fmt(limit)}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    return time.strftime("%H:%M:%S", time.gmtime(s))


def _state(s: p.Status, short: bool = False) -> str:
    """`queued` with the place in the start queue: an admin sees a storm move."""
    if s.place is None:
        return s.state
    return f"{s.state} #{s.place}" if short else f"{s.state} ({ordinal(s.place)} in line)"


def _status_table(args: argparse.Namespace, data: Any) -> None:
    rows: list[p.Status] = p.decode_reply("status", data)
    print_table(
        args.json,
        data,
        ("USER", "STATE", "UPTIME", "MEMORY", "CPU", "PIDS", "DISK"),
        [
            (
                r.user,
                _state(r, short=True),
                _duration(r.uptime),
                _used(r.memory, r.quota.memory, human_size),
                _used(
                    None if r.cpu_seconds is None else f"{r.cpu_seconds:.1f}s",
                    None if r.quota.cpus is None else f"{r.quota.cpus:g} cpus",
                ),
                _used(r.pids, r.quota.pids),
                _used(r.disk, r.quota.disk, human_size),
            )
            for r in rows
        ],
    )


def _show(d: p.UserDetails) -> None:
    t, s = d.tenant, d.status
    ports = ", ".join(_port_range(r.first, r.last) for r in d.ports) or "-"
    fields = [
        ("user", f"{t.user} (uid {t.uid})"),
        ("home", t.home),
        ("address", d.address),
        ("ports", ports),
        ("image", f"{t.image} ({d.image_version})"),
        ("ids", f"{t.range_start}-{t.range_end}"),
        ("state", _state(s)),
        *([("reason", s.reason)] if s.reason else []),
        ("uptime", _duration(s.uptime)),
        ("quota", _quota_text(s.quota)),
        ("autostop", d.auto_stop),
        ("created", t.created),
    ]
    fields += [("event", f"{e.at} {e.what}") for e in d.events]
    for key, value in fields:
        print(f"{key + ':':9} {value}")
