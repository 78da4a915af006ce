"""The operations behind hostd's two sockets, and who may call which.

Admin socket: every operation. User socket: the caller (identified by SO_PEERCRED) may only
start, inspect and enter their own container.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import select
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from hostd.api import Channel, ClientGone, Peer, check_fds, close_fds, parse_request
from hostd.errors import HostdError
from hostd.sessions import Program, Sessions
from hostd.tenants import Tenants, TenantStatus
from hostd.units import parse_count, parse_cpus, parse_ports, parse_size
from runtime.containers import Runtime
from runtime.errors import RuntimeFailure

log = logging.getLogger(__name__)

USER_OPS = ("status", "start", "exec")


def _quota_changes(args: dict[str, Any]) -> dict[str, Any]:
    """Parse the limit arguments present in `args` ("none" lifts a limit)."""
    parsers: dict[str, Callable[[str], Any]] = {
        "cpus": lambda v: parse_cpus(v, os.cpu_count() or 1),
        "memory": lambda v: parse_size(v, "memory"),
        "pids": lambda v: parse_count(v, "pids"),
        "disk": lambda v: parse_size(v, "disk"),
    }
    return {
        key: None if str(args[key]).lower() in ("none", "unlimited") else parse(str(args[key]))
        for key, parse in parsers.items()
        if args.get(key) is not None
    }


def status_dict(s: TenantStatus) -> dict[str, Any]:
    data = asdict(s)
    data["quota"] = asdict(s.quota)
    return data


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
        # Runs after each admin request, before its reply: the daemon reloads who is a tenant.
        self.after_admin_request = after_admin_request

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
            op, args = parse_request(line)
            check_fds(op, fds)
            if admin_socket and not self.is_admin(peer):
                raise HostdError(
                    f"uid {peer.uid} is not an admin", f"use sudo or join group {self.admin_group}"
                )
            if not admin_socket:
                args = self._as_user(peer, op, args)

            def progress(msg: str) -> None:
                chan.send({"progress": msg})

            try:
                result = self._dispatch(op, args, fds, chan, progress)
            finally:
                if admin_socket:
                    self.after_admin_request()
            chan.send({"ok": True, "result": result})
        except RuntimeFailure as exc:  # HostdError included
            self._reply_error(chan, str(exc))
        except (ValueError, KeyError, TypeError) as exc:
            self._reply_error(chan, f"bad request: {exc}: see `hostctl --help`")
        except ClientGone as exc:  # it left, or stopped reading for [api] request_timeout
            log.info("dropped a client of uid %d: %s", peer.uid, exc.strerror)
        except Exception as exc:  # never let a bug kill the daemon; the client gets one line
            log.exception("request failed")
            self._reply_error(chan, f"internal error: {exc}: see hostd's log")
        finally:
            close_fds(fds)

    @staticmethod
    def _reply_error(chan: Channel, message: str) -> None:
        with contextlib.suppress(OSError):  # the client may be gone
            chan.send({"ok": False, "error": message})

    def _as_user(self, peer: Peer, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Restrict a user-socket request to the caller's own container."""
        if op not in USER_OPS:
            raise HostdError(f"{op} is for admins", "ask an admin (hostctl) to do it")
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
        args["user"] = name
        if op == "exec":  # as their own account inside (same name, home, groups), never root
            args["as_user"] = name
            args["login"] = True  # the account check applies
        return args

    # -- operations ------------------------------------------------------------------------

    def _dispatch(
        self,
        op: str,
        args: dict[str, Any],
        fds: list[int],
        chan: Channel,
        progress: Callable[[str], None],
    ) -> Any:
        t, rt = self.tenants, self.runtime
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "image.recipes":
            return rt.images.recipe_summaries()
        if op == "image.build":
            return asdict(rt.images.build(args["name"], args.get("recipe"), progress))
        if op == "image.import":
            if len(fds) != 1:
                raise HostdError(
                    "image.import needs the tarball as a file descriptor",
                    "use `hostctl image import NAME FILE`",
                )
            tarball = Path(f"/proc/{os.getpid()}/fd/{fds[0]}")  # readable by tar, our child
            return asdict(
                rt.images.import_tarball(args["name"], tarball, progress, args.get("filename"))
            )
        if op == "image.list":
            return [asdict(m) for m in rt.images.manifests()]
        if op == "image.remove":
            rt.images.remove(args["name"], [Path(c.image_dir) for c in rt.containers()])
            return {"removed": args["name"]}
        if op == "user.add":
            changes = _quota_changes(args)
            quota = replace(t.config.limits, **changes)
            tenant = t.add(args["user"], args.get("image"), quota, progress)
            return asdict(tenant)
        if op == "user.list":
            return [status_dict(t.status(x.user)) for x in t.state.tenants()]
        if op == "user.show":
            tenant = t.get(args["user"])
            return {
                **asdict(tenant),
                **status_dict(t.status(tenant.user)),
                "events": t.state.events(tenant.user, 20),
            }
        if op == "user.remove":
            t.remove(args["user"], bool(args.get("keep_data")), progress)
            return {"removed": args["user"]}
        if op == "user.rebase":
            return asdict(
                t.rebase(args["user"], args.get("image"), bool(args.get("restart")), progress)
            )
        if op == "quota.set":
            changes = _quota_changes(args)
            if not changes:
                raise HostdError("no limit given", "pass --cpus, --memory, --pids or --disk")
            applied = t.set_quota(args["user"], changes)
            return {"quota": asdict(t.state.quota(args["user"])), "applied": applied}
        if op in ("start", "restart"):
            (t.start if op == "start" else t.restart)(args["user"], progress)
            return {op: args["user"]}
        if op == "stop":
            t.stop(args["user"])
            return {"stop": args["user"]}
        if op == "status":
            users = [args["user"]] if args.get("user") else [x.user for x in t.state.tenants()]
            return [status_dict(t.status(u)) for u in users]
        if op in ("ports.grant", "ports.revoke"):
            first, last = parse_ports(str(args["ports"]))
            grant = op == "ports.grant"
            (t.grant_ports if grant else t.revoke_ports)(args["user"], first, last)
            return {"user": args["user"], "first": first, "last": last, "granted": grant}
        if op == "ports.list":
            return [
                {"first": a, "last": b, "user": u, "address": str(t.address(u))}
                for a, b, u in t.state.port_grants()
            ]
        if op == "ranges.list":
            return [asdict(r) for r in t.state.ranges()]
        if op == "ranges.release":
            return asdict(t.release_range(int(args["start"])))
        if op == "exec":
            return self._exec(args, fds, chan, progress)
        raise HostdError(f"unknown operation {op!r}", "see `hostctl --help`")

    def _exec(
        self, args: dict[str, Any], fds: list[int], chan: Channel, progress: Callable[[str], None]
    ) -> dict[str, int]:
        """Run a command inside: on the caller's own stdio (3 fds) or on a pty sent back."""
        user, argv = args["user"], [str(a) for a in args["argv"]]
        if not argv:
            raise HostdError("no command given", "add one after `--`")
        tty = bool(args.get("tty"))
        if not tty and len(fds) != 3:
            raise HostdError("exec needs stdin, stdout and stderr", "use hostctl exec")
        given = args.get("env") or {}
        if not isinstance(given, dict):
            raise HostdError("env must be an object", "use hostctl exec or hostd-login")
        with self.sessions.slot(user):
            session = self.sessions.prepare(
                user, str(args.get("as_user") or "root"), bool(args.get("login")), progress
            )
            env = session.env(given, (args.get("term") or "") if tty else None)
            program: Program
            if tty:
                rows, cols = int(args.get("rows", 24)), int(args.get("cols", 80))
                program = self.sessions.spawn_tty(session, argv, env, rows, cols)
                with contextlib.suppress(OSError):  # if the client is gone, it is hung up below
                    chan.send({"tty": True}, [program.master])
                program.close_master()
            else:
                program = self.sessions.spawn_pipes(session, argv, env, fds)
            return {"exit": _wait_or_hangup(chan, program)}


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
