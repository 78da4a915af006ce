"""The service's table of handlers against fake tenants and sessions (no root, no hostd): every
operation, who may call which, bad requests, fds refused, and bugs that become `internal`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest

from hostd import protocol as p
from hostd.api import Channel, Peer
from hostd.config import BackupSettings
from hostd.service import Service
from hostd.sessions import Sessions
from hostd.state import IdRangeRecord, Tenant
from hostd.tenants import Rebase, Tenants, TenantStatus
from runtime.containers import Runtime
from runtime.errors import NotFound
from runtime.images import Manifest
from runtime.limits import Limits

TENANT_OPS = ("status", "start", "exec")
ROOT = Peer(pid=os.getpid(), uid=0, gid=0)
NOBODY = Peer(pid=os.getpid(), uid=65534, gid=65534)  # an account, and not a tenant here
QUOTA = Limits(cpus=1.5, memory=2 << 30, pids=100, disk=None)
MANIFEST = Manifest("default", "default@1", "2026-11-30T10:00:00Z", "recipe", 1 << 20, ("a 1",))


def _tenant(user: str, phase: str = "ready") -> Tenant:
    return Tenant(user, 1000, 1000, f"/home/{user}", 300000, "default", phase, "running", "then")


@dataclass
class FakeTenants:
    """What the service asks of Tenants, recording the calls that change something."""

    tenants: dict[str, Tenant] = field(default_factory=lambda: {"root": _tenant("root")})
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        container = SimpleNamespace(image_dir="/var/lib/hostd/images/default@1")
        images = SimpleNamespace(
            recipe_summaries=lambda: [
                {
                    "recipe": "default",
                    "alias_of": None,
                    "description": "d",
                    "suite": "bookworm",
                    "built": None,
                }
            ],
            build=lambda name, recipe, progress: (progress(f"building {name}"), MANIFEST)[1],
            import_tarball=lambda name, tarball, progress, label: MANIFEST,
            manifests=lambda: [MANIFEST],
            remove=lambda name, in_use: self.calls.append(("image.remove", name)),
        )
        self.runtime = SimpleNamespace(
            images=images,
            containers=lambda: [],
            state=lambda user: SimpleNamespace(container=container, status="running", pid=1),
        )
        self.config = SimpleNamespace(
            limits=Limits(None, 1, 2, 3), backup=BackupSettings(None, 2, 7, False)
        )
        self.state = SimpleNamespace(
            tenants=lambda: list(self.tenants.values()),
            events=lambda user, limit: [("t1", user, "added"), ("t2", user, "started")],
            quota=lambda user: QUOTA,
            port_grants=lambda: [(8080, 8080, "root"), (20000, 20009, "other")],
            ranges=lambda: [IdRangeRecord(300000, "root", "active", "then")],
        )

    def get(self, user: str) -> Tenant:
        if user not in self.tenants:
            raise NotFound(f"{user} is not a tenant", f"add them with `hostctl user add {user}`")
        return self.tenants[user]

    def status(self, user: str) -> TenantStatus:
        t = self.get(user)
        uptime, cpu = 148.97000000000003, 0.30000000000000004
        return TenantStatus(user, "running", uptime, 5, cpu, 7, 9, QUOTA, t.range_start, t.image)

    def statuses(self, user: str | None = None) -> list[TenantStatus]:
        return [self.status(u) for u in ([user] if user else sorted(self.tenants))]

    def address(self, user: str) -> str:
        return "10.231.64.2"

    def add(self, user: str, image: str | None, quota: Limits, progress: Any) -> Tenant:
        self.calls.append(("add", user, image, quota))
        return _tenant(user)

    def remove(self, user: str, keep_data: bool, progress: Any) -> None:
        self.calls.append(("remove", user, keep_data))

    def rebase(self, user: str, image: str | None, restart: bool, progress: Any) -> Rebase:
        return Rebase(user, "default", "default@1", "default@2", restart, "moved", ("x@0",))

    def set_quota(self, user: str, changes: dict[str, Any]) -> dict[str, str]:
        self.calls.append(("set_quota", user, changes))
        return dict.fromkeys(changes, "now")

    def start(self, user: str, progress: Any) -> None:
        self.get(user)
        self.calls.append(("start", user))

    def auto_stop_setting(self, user: str) -> str:
        return "off (default)"

    def set_auto_stop(self, user: str, after: int | None) -> str:
        self.get(user)
        self.calls.append(("set_auto_stop", user, after))
        return "off (default)" if after is None else f"{after}s"

    def stop(self, user: str) -> None:
        self.calls.append(("stop", user))

    def restart(self, user: str, progress: Any) -> None:
        self.calls.append(("restart", user))

    def grant_ports(self, user: str, first: int, last: int) -> None:
        self.calls.append(("grant", user, first, last))

    def revoke_ports(self, user: str, first: int, last: int) -> None:
        self.calls.append(("revoke", user, first, last))

    def release_range(self, start: int) -> IdRangeRecord:
        return IdRangeRecord(start, "gone", "free", "now")


class FakeProgram:
    """A program that has already ended with status 7 (its exit fd is readable); `master`
    stands for a pty master."""

    def __init__(self) -> None:
        self.exit_fd, self._w = os.pipe()
        os.write(self._w, b"x")
        self.master = os.open(os.devnull, os.O_RDWR)

    def wait(self) -> int:
        return 7

    def hangup(self) -> None:
        pass

    def close_master(self) -> None:
        os.close(self.master)

    def close(self) -> None:
        for fd in (self.exit_fd, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class FakeSessions:
    prepared: list[tuple[str, str, bool]] = field(default_factory=list)
    spawned: list[tuple[str, list[str], Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def slot(self, user: str) -> Iterator[None]:
        yield

    def prepare(self, user: str, account: str, login: bool, progress: Any) -> Any:
        self.prepared.append((user, account, login))
        return SimpleNamespace(env=lambda given, term: [f"TERM={term}"] if term else [])

    def spawn_pipes(self, session: Any, argv: list[str], env: Any, fds: Any) -> FakeProgram:
        self.spawned.append(("pipes", argv, list(fds)))
        return FakeProgram()

    def spawn_tty(self, session: Any, argv: list[str], env: Any, rows: int, cols: int) -> Any:
        self.spawned.append(("tty", argv, (rows, cols)))
        return FakeProgram()


@dataclass
class World:
    service: Service
    tenants: FakeTenants
    sessions: FakeSessions
    refreshed: list[int]


@pytest.fixture
def world() -> World:
    tenants, sessions, refreshed = FakeTenants(), FakeSessions(), []
    service = Service(
        cast(Tenants, tenants),
        cast(Runtime, tenants.runtime),
        "hostd-test-no-such-group",
        cast(Sessions, sessions),
        lambda: refreshed.append(1),
    )
    return World(service, tenants, sessions, refreshed)


def serve(
    w: World,
    op: str,
    args: object = None,
    peer: Peer = ROOT,
    admin: bool = True,
    fds: list[int] | None = None,
    line: bytes | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """Every message the service sends for one request, and the fds that came with them."""
    server, client = socket.socketpair()
    with server, client:
        if line is None:
            line = json.dumps({"op": op, "args": args or {}}).encode()
        w.service.handle(Channel(server), peer, admin, line, fds or [])
        server.shutdown(socket.SHUT_WR)
        chan = Channel(client)
        messages: list[dict[str, Any]] = []
        got: list[int] = []
        while True:
            msg, fds_in = chan.receive()
            if msg is None:
                return messages, got
            messages.append(msg)
            got += fds_in


def last_call(w: World) -> Any:
    return w.tenants.calls[-1]


def result(w: World, op: str, args: object = None, **kw: Any) -> Any:
    messages, _ = serve(w, op, args, **kw)
    assert messages[-1].get("ok") is True, messages[-1]
    return messages[-1]["result"]


def error(w: World, op: str, args: object = None, **kw: Any) -> dict[str, str]:
    messages, _ = serve(w, op, args, **kw)
    assert messages[-1]["ok"] is False
    return cast(dict[str, str], messages[-1]["error"])


def test_every_op_has_exactly_one_handler(world: World) -> None:
    assert set(world.service.handlers) == set(p.OPS)


def _stdio() -> list[int]:
    return [os.open(os.devnull, os.O_RDWR) for _ in range(3)]


ADMIN_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("ping", {}),
    ("image.recipes", {}),
    ("image.build", {"name": "default"}),
    ("image.list", {}),
    ("image.remove", {"name": "old"}),
    ("user.add", {"user": "alice", "memory": "1G", "cpus": "none"}),
    ("user.list", {}),
    ("user.show", {"user": "root"}),
    ("user.set", {"user": "root", "auto_stop": "3d"}),
    ("user.remove", {"user": "root", "keep_data": True}),
    ("user.rebase", {"user": "root"}),
    ("quota.set", {"user": "root", "pids": "50"}),
    ("start", {"user": "root"}),
    ("stop", {"user": "root"}),
    ("restart", {"user": "root"}),
    ("status", {}),
    ("ports.grant", {"user": "root", "ports": "8080"}),
    ("ports.revoke", {"user": "root", "ports": "20000-20009"}),
    ("ports.list", {}),
    ("ranges.list", {}),
    ("ranges.release", {"start": 300000}),
]


@pytest.mark.parametrize(("op", "args"), ADMIN_CALLS)
def test_every_admin_op_answers_its_reply_type(world: World, op: str, args: object) -> None:
    reply = p.decode_reply(op, result(world, op, args))
    assert reply is not None
    assert world.refreshed == [1]  # the daemon reloads who is a tenant after an admin request


def test_image_import_takes_the_tarball_fd(world: World) -> None:
    r, w = os.pipe()
    assert result(world, "image.import", {"name": "bb"}, fds=[r])["version"] == "default@1"
    with pytest.raises(OSError):
        os.fstat(r)  # closed by the service
    os.close(w)
    assert "needs the tarball" in error(world, "image.import", {"name": "bb"})["cause"]


def test_replies_round_floats_and_carry_what_show_needs(world: World) -> None:
    (status,) = result(world, "status", {"user": "root"})
    assert (status["uptime"], status["cpu_seconds"]) == (149.0, 0.3)
    assert (status["range_start"], status["range_end"]) == (300000, 365535)
    show = p.decode_reply("user.show", result(world, "user.show", {"user": "root"}))
    assert show.address == "10.231.64.2" and show.ports == [p.PortRange(8080, 8080)]
    assert show.image_version == "default@1" and show.tenant.range_end == 365535
    assert [e.what for e in show.events] == ["added", "started"]
    assert show.auto_stop == "off (default)"


def test_user_set_parses_the_auto_stop_time(world: World) -> None:
    assert result(world, "user.set", {"user": "root", "auto_stop": "3d"})["auto_stop"] == "259200s"
    result(world, "user.set", {"user": "root", "auto_stop": "OFF"})
    result(world, "user.set", {"user": "root", "auto_stop": " default "})
    assert world.tenants.calls[-3:] == [
        ("set_auto_stop", "root", 259200),
        ("set_auto_stop", "root", 0),
        ("set_auto_stop", "root", None),
    ]
    bad = error(world, "user.set", {"user": "root", "auto_stop": "3 weeks"})
    assert (bad["code"], bad["cause"]) == ("invalid", "auto-stop '3 weeks' is not a duration")
    assert "off" in bad["fix"]
    assert error(world, "user.set", {"user": "root"})["cause"] == "no setting given"
    assert error(world, "user.set", {"user": "ghost", "auto_stop": "1d"})["code"] == "not_found"


def test_limits_are_parsed_and_none_lifts_one(world: World) -> None:
    result(world, "user.add", {"user": "alice", "memory": "1G", "cpus": "none"})
    assert last_call(world) == ("add", "alice", None, Limits(None, 1 << 30, 2, 3))
    applied = result(world, "quota.set", {"user": "root", "pids": "50", "disk": "unlimited"})
    assert applied["applied"] == {"pids": "now", "disk": "now"}
    assert last_call(world) == ("set_quota", "root", {"pids": 50, "disk": None})
    assert error(world, "quota.set", {"user": "root"})["cause"] == "no limit given"
    assert error(world, "quota.set", {"user": "root", "memory": "10XB"})["code"] == "invalid"


def test_exec_on_the_callers_stdio(world: World) -> None:
    stdio = _stdio()
    reply = result(world, "exec", {"user": "root", "argv": ["true"]}, fds=stdio)
    assert reply == {"exit": 7}
    assert world.sessions.prepared == [("root", "root", False)]
    assert world.sessions.spawned == [("pipes", ["true"], stdio)]
    assert error(world, "exec", {"user": "root", "argv": ["true"]})["cause"] == (
        "exec needs stdin, stdout and stderr"
    )
    assert error(world, "exec", {"user": "root", "argv": []}, fds=_stdio())["cause"] == (
        "no command given"
    )


def test_exec_on_a_pty_sends_the_master(world: World) -> None:
    args = {"user": "root", "argv": ["sh"], "tty": True, "rows": 5, "cols": 9, "term": "vt100"}
    messages, fds = serve(world, "exec", args)
    assert messages == [{"tty": True}, {"ok": True, "result": {"exit": 7}}]
    assert len(fds) == 1
    os.close(fds[0])
    assert world.sessions.spawned == [("tty", ["sh"], (5, 9))]


@pytest.mark.parametrize(("rows", "cols"), [(0, 80), (24, -1), (65536, 80)])
def test_exec_refuses_a_terminal_size_out_of_range(world: World, rows: int, cols: int) -> None:
    args = {"user": "root", "argv": ["sh"], "tty": True, "rows": rows, "cols": cols}
    err = error(world, "exec", args)
    assert (err["code"], err["cause"]) == (
        "invalid",
        f"terminal size {rows}x{cols} is out of range",
    )
    assert world.sessions.spawned == []


def test_the_user_socket_confines_a_tenant_to_their_own_container(world: World) -> None:
    assert [s["user"] for s in result(world, "status", {"user": "x"}, admin=False)] == ["root"]
    result(world, "start", {"user": "someone-else"}, admin=False)
    assert last_call(world) == ("start", "root")
    args = {"user": "x", "argv": ["id"], "as_user": "root", "login": False}
    result(world, "exec", args, admin=False, fds=_stdio())
    assert world.sessions.prepared[-1] == ("root", "root", True)  # their own account, a login
    assert world.refreshed == []  # tenants' requests change nobody's tenancy


@pytest.mark.parametrize(("op", "args"), [c for c in ADMIN_CALLS if c[0] not in TENANT_OPS])
def test_admin_ops_are_refused_on_the_user_socket(world: World, op: str, args: object) -> None:
    err = error(world, op, args, admin=False)
    assert (err["code"], err["cause"]) == ("invalid", f"{op} is for admins")
    assert world.tenants.calls == [] and world.refreshed == []


def test_a_caller_who_is_not_a_tenant_is_not_found(world: World) -> None:
    err = error(world, "status", {}, peer=NOBODY, admin=False)
    assert (err["code"], err["cause"]) == ("not_found", "nobody is not a tenant")


def test_a_tenant_being_set_up_is_refused(world: World) -> None:
    world.tenants.tenants["root"] = _tenant("root", "adding")
    err = error(world, "status", {}, admin=False)
    assert "being set up or removed (adding)" in err["cause"]


def test_the_admin_socket_wants_an_admin(world: World) -> None:
    err = error(world, "status", {}, peer=NOBODY)
    assert err["cause"] == "uid 65534 is not an admin"
    assert world.refreshed == [] and world.tenants.calls == []


def test_bad_requests_are_invalid_and_name_the_field(world: World) -> None:
    err = error(world, "quota.set", {"user": "root", "pids": 5})
    assert err == {
        "code": "invalid",
        "cause": "bad request: field 'pids' must be a string",
        "fix": "see `hostctl --help`",
    }
    assert error(world, "", line=b"not json")["cause"].startswith("bad request: not JSON")
    assert error(world, "", line=b'{"op": "nope"}')["cause"] == "unknown operation 'nope'"


def test_fds_are_refused_and_closed(world: World) -> None:
    r, w = os.pipe()
    err = error(world, "status", {}, fds=[r])
    assert err["cause"] == "status takes at most 0 file descriptors, got 1"
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)


def test_a_bug_is_internal_and_logged_without_details(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(user: str) -> TenantStatus:
        raise ZeroDivisionError("secret detail")

    world.tenants.status = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        err = error(world, "status", {})
    assert err == {
        "code": "internal",
        "cause": "internal error (ZeroDivisionError)",
        "fix": "see hostd's log",
    }
    assert "secret detail" in caplog.text


def test_errors_keep_their_code(world: World) -> None:
    err = error(world, "user.show", {"user": "ghost"})
    assert err == {
        "code": "not_found",
        "cause": "ghost is not a tenant",
        "fix": "add them with `hostctl user add ghost`",
    }


def test_progress_lines_come_before_the_reply(world: World) -> None:
    messages, _ = serve(world, "image.build", {"name": "default"})
    assert messages[0] == {"progress": "building default"} and messages[-1]["ok"] is True


def test_a_client_gone_is_only_logged(world: World, caplog: pytest.LogCaptureFixture) -> None:
    server, client = socket.socketpair()
    client.close()
    with server, caplog.at_level(logging.INFO):
        world.service.handle(Channel(server), ROOT, True, b'{"op": "ping"}', [])
    assert "dropped a client of uid 0" in caplog.text
