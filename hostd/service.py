"""The operations behind hostd's two sockets: one handler per operation of hostd.protocol,
and who may call which, as the protocol's table says.

Admin socket: every operation. User socket: the caller (identified by SO_PEERCRED) may only
start, inspect and enter their own container.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import grp
import logging
import os
import pwd
import select
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostd import backups
from hostd import protocol as p
from hostd import state as state_mod
from hostd.api import Channel, ClientGone, Peer, close_fds
from hostd.config import parse_duration
from hostd.errors import HostdError
from hostd.sessions import Program, Sessions
from hostd.staging import Staging
from hostd.state import IdRangeRecord, Tenant
from hostd.tenants import Tenants, TenantStatus
from hostd.transfer import Transfers
from hostd.units import parse_count, parse_cpus, parse_ports, parse_size
from runtime.containers import Runtime
from runtime.errors import Internal, RuntimeFailure
from runtime.ids import RANGE_SIZE
from runtime.images import Manifest
from runtime.limits import Limits

log = logging.getLogger(__name__)
EVENTS_SHOWN = 20  # recent events in `user show`
MAX_TTY_SIZE = 65535  # rows or columns of a pty (struct winsize holds 16 bits)
# Reads that take no tenant's lock and run no program: the daemon serves admins' ones in a
# pool of their own, so they answer during a start storm.
QUICK_OPS = frozenset({"status", "user.list"})
# Exports, imports, backups and restores run for minutes: the daemon serves them in a small
# pool of their own, so they never hold the admins' workers (starts, status) and only this
# many copy at once.
TRANSFER_OPS = frozenset(
    {
        "user.export",
        "user.import",
        "transfer.receive",
        "transfer.verify",
        "transfer.import",
        "backup.run",
        "backup.restore",
    }
)
PARALLEL_TRANSFERS = 2


@dataclass(frozen=True)
class Call:
    """One request being served: who asked, the fds that came with it, where replies go."""

    peer: Peer
    fds: list[int]
    chan: Channel

    def progress(self, text: str) -> None:
        self.chan.send(p.progress_line(text))


Handler = Callable[[Any, Call], object]


class Service:
    def __init__(
        self,
        tenants: Tenants,
        runtime: Runtime,
        admin_group: str,
        sessions: Sessions,
        after_admin_request: Callable[[], None] = lambda: None,
    ) -> None:
        self.tenants = tenants
        self.runtime = runtime
        self.admin_group = admin_group
        self.sessions = sessions
        self.transfers = Transfers(tenants)
        self.backups = backups.Backups(tenants.config.backup, self.transfers)
        # Runs after each admin request, before its reply: the daemon reloads who is a tenant.
        self.after_admin_request = after_admin_request
        self.handlers: dict[str, Handler] = {
            "ping": self.ping,
            "image.recipes": self.image_recipes,
            "image.build": self.image_build,
            "image.import": self.image_import,
            "image.list": self.image_list,
            "image.remove": self.image_remove,
            "user.add": self.user_add,
            "user.list": self.user_list,
            "user.show": self.user_show,
            "user.set": self.user_set,
            "user.remove": self.user_remove,
            "user.rebase": self.user_rebase,
            "user.export": self.user_export,
            "user.import": self.user_import,
            "quota.set": self.quota_set,
            "start": self.start,
            "stop": self.stop,
            "restart": self.restart,
            "status": self.status,
            "ports.grant": self.ports_grant,
            "ports.revoke": self.ports_revoke,
            "ports.list": self.ports_list,
            "ranges.list": self.ranges_list,
            "ranges.release": self.ranges_release,
            "transfer.offset": self.transfer_offset,
            "transfer.receive": self.transfer_receive,
            "transfer.verify": self.transfer_verify,
            "transfer.import": self.transfer_import,
            "transfer.discard": self.transfer_discard,
            "backup.run": self.backup_run,
            "backup.list": self.backup_list,
            "backup.restore": self.backup_restore,
            "exec": self.exec,
        }

    @functools.cached_property
    def staging(self) -> Staging:
        """Archives arriving for `hostctl user move`, in the state dir."""
        return Staging(self.tenants.config.paths.state_dir / "incoming")

    def is_admin(self, peer: Peer) -> bool:
        if peer.uid == 0:
            return True
        try:
            gid = grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            return False
        try:
            with open(f"/proc/{peer.pid}/status") as f:
                groups = next(line for line in f if line.startswith("Groups:")).split()[1:]
        except (OSError, StopIteration):
            return False
        return peer.gid == gid or str(gid) in groups

    # -- one connection --------------------------------------------------------------------

    def handle(
        self, chan: Channel, peer: Peer, admin_socket: bool, line: bytes, fds: list[int]
    ) -> None:
        """Serve the request `line` (read by the daemon, with `fds`, which are closed here)
        in a worker thread; replies go to `chan`."""
        try:
            op, request = p.decode_request(line)
            p.check_fds(op, len(fds))
            if admin_socket and not self.is_admin(peer):
                raise HostdError(
                    f"uid {peer.uid} is not an admin", f"use sudo or join group {self.admin_group}"
                )
            if not admin_socket:
                request = self._confine(peer, op, request)
            try:
                result = self.handlers[op.name](request, Call(peer, fds, chan))
            finally:
                if admin_socket:
                    self.after_admin_request()
            chan.send(p.ok_line(result))
        except ClientGone as exc:  # it left, or stopped reading for [api] request_timeout
            log.info("dropped a client of uid %d: %s", peer.uid, exc.strerror)
        except RuntimeFailure as exc:  # HostdError included
            self._reply_error(chan, exc)
        except Exception as exc:  # never let a bug kill the daemon; the details go to the log
            log.exception("request failed")
            self._reply_error(
                chan, Internal(f"internal error ({type(exc).__name__})", "see hostd's log")
            )
        finally:
            close_fds(fds)

    @staticmethod
    def _reply_error(chan: Channel, exc: RuntimeFailure) -> None:
        with contextlib.suppress(OSError):  # the client may be gone
            chan.send(p.error_line(exc))

    def _confine(self, peer: Peer, op: p.Op, request: Any) -> Any:
        """Restrict a user-socket request to the caller's own container."""
        if p.TENANT not in op.callers:
            raise HostdError(f"{op.name} is for admins", "ask an admin (hostctl) to do it")
        try:
            name = pwd.getpwuid(peer.uid).pw_name
        except KeyError:
            raise HostdError(f"uid {peer.uid} has no account", "ask an admin") from None
        tenant = self.tenants.get(name)
        if tenant.phase != "ready":  # reconcile may be finishing or undoing it right now
            raise HostdError(
                f"{name}'s container is being set up or removed ({tenant.phase})",
                "try again in a minute, or ask an admin",
            )
        if isinstance(request, p.ExecArgs):  # as their own account inside, never root
            return request._replace(user=name, as_user=name, login=True)
        return request._replace(user=name)

    # -- images ----------------------------------------------------------------------------

    def ping(self, _: p.NoArgs, call: Call) -> p.Pong:
        return p.Pong(os.getpid())

    def image_recipes(self, _: p.NoArgs, call: Call) -> list[p.RecipeInfo]:
        return [p.RecipeInfo(**r) for r in self.runtime.images.recipe_summaries()]

    def image_build(self, req: p.ImageBuildArgs, call: Call) -> p.ImageInfo:
        return _image(self.runtime.images.build(req.name, req.recipe, call.progress))

    def image_import(self, req: p.ImageImportArgs, call: Call) -> p.ImageInfo:
        if len(call.fds) != 1:
            raise HostdError(
                "image.import needs the tarball as a file descriptor",
                "use `hostctl image import NAME FILE`",
            )
        tarball = Path(f"/proc/{os.getpid()}/fd/{call.fds[0]}")  # readable by tar, our child
        images = self.runtime.images
        return _image(images.import_tarball(req.name, tarball, call.progress, req.filename))

    def image_list(self, _: p.NoArgs, call: Call) -> list[p.ImageInfo]:
        return [_image(m) for m in self.runtime.images.manifests()]

    def image_remove(self, req: p.ImageArgs, call: Call) -> p.Done:
        self.runtime.images.remove(req.name, [Path(c.image_dir) for c in self.runtime.containers()])
        return p.Done(req.name, "removed")

    # -- tenants ---------------------------------------------------------------------------

    def user_add(self, req: p.UserAddArgs, call: Call) -> p.TenantInfo:
        quota = dataclasses.replace(self.tenants.config.limits, **_limit_changes(req))
        return _tenant(self.tenants.add(req.user, req.image, quota, call.progress))

    def user_list(self, _: p.NoArgs, call: Call) -> list[p.Status]:
        return [_status(s) for s in self.tenants.statuses()]

    def user_show(self, req: p.UserArgs, call: Call) -> p.UserDetails:
        t = self.tenants
        tenant = t.get(req.user)
        state = self.runtime.state(tenant.user)
        return p.UserDetails(
            tenant=_tenant(tenant),
            status=_status(t.status(tenant.user)),
            address=str(t.address(tenant.user)),
            ports=[p.PortRange(a, b) for a, b, u in t.state.port_grants() if u == tenant.user],
            image_version=Path(state.container.image_dir).name,
            events=[p.Event(at, what) for at, _, what in t.state.events(tenant.user, EVENTS_SHOWN)],
            auto_stop=t.auto_stop_setting(tenant.user),
        )

    def user_set(self, req: p.UserSetArgs, call: Call) -> p.UserSettings:
        if req.auto_stop is None:
            raise HostdError("no setting given", "pass --auto-stop DURATION, off or default")
        text = req.auto_stop.strip().lower()
        try:
            after = None if text == "default" else parse_duration(text)
        except ValueError as exc:
            raise HostdError(
                f"auto-stop {req.auto_stop[:64]!r} is not a duration", str(exc)
            ) from None
        return p.UserSettings(req.user, self.tenants.set_auto_stop(req.user, after))

    def user_remove(self, req: p.UserRemoveArgs, call: Call) -> p.Done:
        self.tenants.remove(req.user, req.keep_data, call.progress)
        return p.Done(req.user, "removed")

    def user_rebase(self, req: p.UserRebaseArgs, call: Call) -> p.Rebased:
        r = self.tenants.rebase(req.user, req.image, req.restart, call.progress)
        return p.Rebased(r.user, r.image, r.old, r.new, r.restarted, r.warning, list(r.pruned))

    def user_export(self, req: p.UserExportArgs, call: Call) -> p.Exported:
        """To the fd hostctl opened as the admin (hostd opens no admin's path as root)."""
        if len(call.fds) != (1 if req.since is None else 2):
            raise HostdError(
                "user.export needs the output (and with since, the parent) as file descriptors",
                "use `hostctl user export USER -o FILE`",
            )
        since = None if req.since is None else (call.fds[1], req.since)
        return self.transfers.export(req.user, call.fds[0], since, req.with_home, call.progress)

    def user_import(self, req: p.UserImportArgs, call: Call) -> p.Imported:
        return self.transfers.import_(
            call.fds, req.files, req.as_user, req.range, req.with_home, req.start, call.progress
        )

    def quota_set(self, req: p.QuotaSetArgs, call: Call) -> p.QuotaSet:
        changes = _limit_changes(req)
        if not changes:
            raise HostdError("no limit given", "pass --cpus, --memory, --pids or --disk")
        applied = self.tenants.set_quota(req.user, changes)
        return p.QuotaSet(_quota(self.tenants.state.quota(req.user)), applied)

    def start(self, req: p.UserArgs, call: Call) -> p.Done:
        self.tenants.start(req.user, call.progress)
        return p.Done(req.user, "start")

    def stop(self, req: p.UserArgs, call: Call) -> p.Done:
        self.tenants.stop(req.user)
        return p.Done(req.user, "stop")

    def restart(self, req: p.UserArgs, call: Call) -> p.Done:
        self.tenants.restart(req.user, call.progress)
        return p.Done(req.user, "restart")

    def status(self, req: p.StatusArgs, call: Call) -> list[p.Status]:
        return [_status(s) for s in self.tenants.statuses(req.user or None)]

    # -- ports and ranges ------------------------------------------------------------------

    def ports_grant(self, req: p.PortsArgs, call: Call) -> p.PortsChanged:
        first, last = parse_ports(req.ports)
        self.tenants.grant_ports(req.user, first, last)
        return p.PortsChanged(req.user, first, last, True)

    def ports_revoke(self, req: p.PortsArgs, call: Call) -> p.PortsChanged:
        first, last = parse_ports(req.ports)
        self.tenants.revoke_ports(req.user, first, last)
        return p.PortsChanged(req.user, first, last, False)

    def ports_list(self, _: p.NoArgs, call: Call) -> list[p.PortGrant]:
        t = self.tenants
        return [p.PortGrant(a, b, u, str(t.address(u))) for a, b, u in t.state.port_grants()]

    def ranges_list(self, _: p.NoArgs, call: Call) -> list[p.RangeInfo]:
        return [_range(r) for r in self.tenants.state.ranges()]

    def ranges_release(self, req: p.RangeArgs, call: Call) -> p.RangeInfo:
        return _range(self.tenants.release_range(req.start))

    # -- archives arriving for `hostctl user move` ------------------------------------------

    def transfer_offset(self, req: p.TransferArgs, call: Call) -> p.Staged:
        return p.Staged(req.id, self.staging.offset(req.id))

    def transfer_receive(self, req: p.ReceiveArgs, call: Call) -> p.Staged:
        if len(call.fds) != 1:
            raise HostdError(
                "transfer.receive needs the archive's bytes as a file descriptor",
                "pipe the bytes to `hostctl transfer receive ID --offset N --size N`",
            )
        return p.Staged(req.id, self.staging.receive(req.id, req.offset, req.size, call.fds[0]))

    def transfer_verify(self, req: p.TransferArgs, call: Call) -> p.Verified:
        h = self.staging.verify(req.id, len(state_mod.MIGRATIONS), call.progress)
        return p.Verified(h.id, h.user, h.kind, h.parent)

    def transfer_import(self, req: p.TransferImportArgs, call: Call) -> p.Imported:
        """A chain staged here, opened by hostd (root's files in its state dir), imported as
        `user.import` does; the staged files go once it is in."""
        if not 0 < len(req.ids) <= p.IMPORT_FDS:
            raise HostdError(
                f"{len(req.ids)} archives given", f"give 1 to {p.IMPORT_FDS}: the full one first"
            )
        fds: list[int] = []
        try:
            for archive_id in req.ids:
                fds.append(self.staging.open(archive_id))
            names = [f"the archive {i} staged on this host" for i in req.ids]
            done: p.Imported = self.transfers.import_(
                fds, names, req.as_user, req.range, req.with_home, False, call.progress
            )
        finally:
            close_fds(fds)
        for archive_id in req.ids:
            self.staging.discard(archive_id)
        if req.start:  # the archives say stopped: the move stopped it for the last copy
            try:
                self.tenants.start(done.user, call.progress)
                done = done._replace(started=True)
            except RuntimeFailure as exc:
                done = done._replace(warning=f"{done.user} is imported but did not start: {exc}")
        return done

    def transfer_discard(self, req: p.TransferArgs, call: Call) -> p.Done:
        self.staging.discard(req.id)
        return p.Done(req.id, "discarded")

    # -- backups ---------------------------------------------------------------------------

    def backup_run(self, req: p.BackupRunArgs, call: Call) -> list[p.BackupResult]:
        t = self.tenants
        if req.users:
            users = [t.get(u).user for u in req.users]
        else:
            users = [x.user for x in t.state.tenants() if x.phase == "ready"]
        return [
            p.BackupResult(
                r.user,
                None if r.archive is None else _backup(r.user, r.archive),
                r.error,
                [*r.removed],
            )
            for r in self.backups.run(users, req.full, call.progress)
        ]

    def backup_list(self, req: p.BackupListArgs, call: Call) -> list[p.BackupInfo]:
        found = self.backups.listing(req.user)
        return [_backup(user, a) for user, archives in found.items() for a in archives]

    def backup_restore(self, req: p.BackupRestoreArgs, call: Call) -> p.Imported:
        """From hostd's own files, picked from its own listing: no path comes with the request."""
        at = None if req.at is None else backups.parse_time(req.at)
        with self.backups.chain_files(req.user, at) as chain:
            fds, names = [fd for fd, _ in chain], [name for _, name in chain]
            return self.transfers.import_(
                fds, names, req.as_user, req.range, req.with_home, req.start, call.progress
            )

    # -- sessions --------------------------------------------------------------------------

    def exec(self, req: p.ExecArgs, call: Call) -> p.Exited:
        """Run a command inside: on the caller's own stdio (3 fds) or on a pty sent back."""
        if not req.argv:
            raise HostdError("no command given", "add one after `--`")
        if not req.tty and len(call.fds) != 3:
            raise HostdError(
                "exec needs stdin, stdout and stderr", "use `hostctl exec USER -- COMMAND`"
            )
        if req.tty and not (0 < req.rows <= MAX_TTY_SIZE and 0 < req.cols <= MAX_TTY_SIZE):
            raise HostdError(
                f"terminal size {req.rows}x{req.cols} is out of range",
                f"send rows and cols from 1 to {MAX_TTY_SIZE}",
            )
        with self.sessions.slot(req.user):
            session = self.sessions.prepare(req.user, req.as_user, req.login, call.progress)
            env = session.env(req.env or {}, req.term if req.tty else None)
            program: Program
            if req.tty:
                program = self.sessions.spawn_tty(session, req.argv, env, req.rows, req.cols)
                with contextlib.suppress(OSError):  # if the client is gone, it is hung up below
                    call.chan.send(p.TTY_LINE, [program.master])
                program.close_master()
            else:
                program = self.sessions.spawn_pipes(session, req.argv, env, call.fds)
            return p.Exited(_wait_or_hangup(call.chan, program))


def _limit_changes(req: p.UserAddArgs | p.QuotaSetArgs) -> dict[str, Any]:
    """The limits given in `req`, parsed ("none" or "unlimited" lifts a limit)."""
    parsers: dict[str, Callable[[str], Any]] = {
        "cpus": lambda v: parse_cpus(v, os.cpu_count() or 1),
        "memory": lambda v: parse_size(v, "memory"),
        "pids": lambda v: parse_count(v, "pids"),
        "disk": lambda v: parse_size(v, "disk"),
    }
    given = {key: getattr(req, key) for key in p.LIMITS if getattr(req, key) is not None}
    return {
        key: None if text.lower() in ("none", "unlimited") else parsers[key](text)
        for key, text in given.items()
    }


def _image(m: Manifest) -> p.ImageInfo:
    return p.ImageInfo(m.name, m.version, m.created, m.source, m.size, list(m.packages))


def _quota(q: Limits) -> p.Quota:
    cpus = None if q.cpus is None else round(q.cpus, 2)
    return p.Quota(cpus, q.memory, q.pids, q.disk)


def _tenant(t: Tenant) -> p.TenantInfo:
    end = t.range_start + RANGE_SIZE - 1
    return p.TenantInfo(
        t.user, t.uid, t.gid, t.home, t.range_start, end, t.image, t.phase, t.desired, t.created
    )


def _status(s: TenantStatus) -> p.Status:
    """Numbers as people read them: uptime to 0.1 s, CPU time to 0.01 s."""
    return p.Status(
        user=s.user,
        state=s.state,
        uptime=None if s.uptime is None else round(s.uptime, 1),
        memory=s.memory,
        cpu_seconds=None if s.cpu_seconds is None else round(s.cpu_seconds, 2),
        pids=s.pids,
        disk=s.disk,
        quota=_quota(s.quota),
        range_start=s.range_start,
        range_end=s.range_start + RANGE_SIZE - 1,
        image=s.image,
        reason=s.reason,
        place=s.place,
    )


def _range(r: IdRangeRecord) -> p.RangeInfo:
    return p.RangeInfo(r.start, r.start + RANGE_SIZE - 1, r.user, r.status, r.since)


def _backup(user: str, a: backups.Archive) -> p.BackupInfo:
    created = a.time.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    chain = a.chain and a.chain + backups.SUFFIX
    return p.BackupInfo(user, a.name, backups.KINDS[a.kind], a.size, created, chain)


def _wait_or_hangup(chan: Channel, program: Program) -> int:
    """Wait for the program to end, hanging it up if the client goes away first; its status."""
    try:
        watched = [chan.sock.fileno(), program.exit_fd]
        while program.exit_fd not in select.select(watched, [], [])[0]:
            try:
                data = chan.sock.recv(4096)
            except OSError:
                data = b""
            if not data:  # end of stream: the client left
                program.hangup()
                watched.remove(chan.sock.fileno())
        return program.wait()
    finally:
        program.close()
