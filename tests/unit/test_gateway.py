"""The SSH gateway's logic against a real asyncssh client on 127.0.0.1, with a fake host and
tenants: accounts, keys and PAM answers are data, and a tenant's "container" runs its programs
as plain child processes here (no root, no runc), on pipes or a pty as the real one would."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import pwd
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import asyncssh
import pytest

from hostd import accounts
from hostd.config import GatewaySettings, SessionSettings
from hostd.errors import HostdError
from hostd.gateway import SFTP_SERVER, WRONG, Gateway
from hostd.sessions import Sessions
from hostd.tenants import Account, Tenants
from runtime import netconnect
from runtime.containers import Runtime
from runtime.execs import ExecSpec
from runtime.ttyexec import TtyProcess
from tests.hostd_harness import wait_for

SETTINGS = GatewaySettings(
    enabled=True,
    listen=("127.0.0.1", 0),  # an ephemeral port
    password_auth=False,
    max_failures=50,
    max_auth_tries=6,
    login_grace=20.0,
    max_unauthenticated=64,
    max_unauthenticated_per_source=8,
)
SHELL = "/bin/sh"
NOLOGIN = "This account is currently not available."


@dataclass
class Spawned:
    """One program the fake container ran, as the gateway asked for it."""

    argv: list[str]
    env: list[str]
    ids: str
    cwd: str | None
    tty: tuple[int, int] | None  # rows, cols
    popen: subprocess.Popen[bytes]


@dataclass
class Host:
    """The host's accounts, their keys and passwords, and the tenants: all plain data."""

    home: Path
    users: dict[str, pwd.struct_passwd] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # authorized_keys text
    passwords: dict[str, str] = field(default_factory=dict)
    locked: set[str] = field(default_factory=set)
    tenants: set[str] = field(default_factory=set)
    key_reads: list[str] = field(default_factory=list)  # whose keys were read (by pw_name)
    pam_calls: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, name: str, uid: int, shell: str = "/bin/bash", tenant: bool = True) -> None:
        self.users[name] = pwd.struct_passwd((name, "x", uid, uid, "", str(self.home), shell))
        if tenant:
            self.tenants.add(name)


class FakeRuntime:
    """A container per tenant that is "running" with its programs as our children."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.status = "running"
        self.spawned: list[Spawned] = []

    def state(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(
            status=self.status, pid=os.getpid() if self.status == "running" else 0
        )

    def spawn(self, name: str, spec: ExecSpec, ends: Sequence[int]) -> subprocess.Popen[bytes]:
        argv, env, user, cwd = spec.argv, spec.env, spec.user, spec.cwd
        popen = subprocess.Popen(
            list(argv),
            stdin=ends[0],
            stdout=ends[1],
            stderr=ends[2],
            env=dict(e.split("=", 1) for e in env),
            cwd=self.home,
        )
        self.spawned.append(Spawned(list(argv), list(env), user, cwd, None, popen))
        return popen

    def exec_tty(
        self, name: str, spec: ExecSpec, *, rows: int, cols: int, charged: bool
    ) -> TtyProcess:
        """The program on a new pty, and a thread in the role of runtime.ttyexec's helper:
        signals written on the control socket go to the program, its closing hangs it up."""
        argv, env, user, cwd = spec.argv, spec.env, spec.user, spec.cwd
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        popen = subprocess.Popen(
            list(argv),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=dict(e.split("=", 1) for e in env),
            cwd=self.home,
            start_new_session=True,
        )
        os.close(slave)
        ours, helper = socket.socketpair()
        threading.Thread(target=_relay_signals, args=(helper, popen), daemon=True).start()
        self.spawned.append(Spawned(list(argv), list(env), user, cwd, (rows, cols), popen))
        return TtyProcess(popen, ours, master, popen.pid)


def _relay_signals(control: socket.socket, popen: subprocess.Popen[bytes]) -> None:
    with control:
        while data := control.recv(1):
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(data[0])
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGHUP)


class FakeTenants:
    """What the gateway and sessions ask of hostd.tenants.Tenants."""

    def __init__(self, host: Host, runtime: FakeRuntime) -> None:
        self.host = host
        self.runtime = runtime
        self.down = False
        self.stopping: set[str] = set()
        self.started: list[str] = []
        self.account_error: HostdError | None = None

    def get(self, user: str) -> object:
        if user not in self.host.tenants:
            raise HostdError(f"{user} is not a tenant", f"add them with `hostctl user add {user}`")
        return object()

    def start(self, user: str, progress: Callable[[str], None]) -> None:
        progress("starting the container")
        self.started.append(user)
        self.runtime.status = "running"

    def is_down(self, user: str) -> bool:
        return self.down

    def account(self, container: str, account: str) -> Account:
        if self.account_error is not None:
            raise self.account_error
        pw = self.host.users[account]
        env = [f"HOME={self.host.home}", f"USER={account}", f"SHELL={SHELL}", "PATH=/usr/bin:/bin"]
        return Account(f"{pw.pw_uid}:{pw.pw_gid}", [], env, str(self.host.home))


@pytest.fixture(scope="module")
def keys() -> dict[str, asyncssh.SSHKey]:
    return {name: asyncssh.generate_private_key("ssh-ed25519") for name in ("alice", "other")}


@dataclass
class World:
    """A gateway's surroundings; `serve` runs a scenario against a fresh gateway."""

    host: Host
    runtime: FakeRuntime
    tenants: FakeTenants
    key_dir: Path
    settings: GatewaySettings = SETTINGS
    max_sessions: int = 8
    sessions: Sessions | None = None

    def serve(self, scenario: Callable[[int], Awaitable[None]]) -> None:
        async def run() -> None:
            tenants = cast(Tenants, self.tenants)
            runtime = cast(Runtime, self.runtime)
            self.sessions = Sessions(tenants, runtime, SessionSettings(self.max_sessions))
            gw = Gateway(tenants, self.settings, self.key_dir, self.sessions)
            await gw.start()
            assert gw._acceptor is not None
            try:
                await asyncio.wait_for(scenario(gw._acceptor.get_port()), 60)
            finally:
                await gw.close()

        asyncio.run(run())


@pytest.fixture
def world(
    tmp_path: Path, keys: dict[str, asyncssh.SSHKey], monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    home = tmp_path / "home"
    home.mkdir()
    host = Host(home)
    host.add("alice", 1001)
    host.add("bob", 1002, tenant=False)  # a host user without a container
    host.add("root", 0)
    host.add("nologin", 1003, shell="/usr/sbin/nologin")
    for user in ("alice", "bob", "root", "nologin"):
        host.keys[user] = keys["alice"].export_public_key().decode()
    host.passwords = {"alice": "alice-pw", "bob": "bob-pw", "root": "root-pw"}

    def getpwnam(name: str) -> pwd.struct_passwd:
        return host.users[name]

    def authorized_keys(pw: pwd.struct_passwd, timeout: float = 2.0) -> str | None:
        host.key_reads.append(pw.pw_name)
        return host.keys.get(pw.pw_name)

    def login_refusal(user: str, rhost: str = "") -> str | None:
        return f"account {user} is locked" if user in host.locked else None

    def authenticate(user: str, password: str, service: str) -> bool:
        host.pam_calls.append((user, password, service))
        return host.passwords.get(user) == password

    pam = ModuleType("pam")
    pam.authenticate = authenticate  # type: ignore[attr-defined]
    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(accounts, "authorized_keys", authorized_keys)
    monkeypatch.setattr(accounts, "login_refusal", login_refusal)
    monkeypatch.setitem(sys.modules, "pam", pam)
    runtime = FakeRuntime(home)
    w = World(host, runtime, FakeTenants(host, runtime), tmp_path / "keys")
    yield w
    for s in runtime.spawned:  # nothing a test started outlives it
        if s.popen.poll() is None:
            s.popen.kill()
        s.popen.wait()


def connect(port: int, user: str, **options: Any) -> Any:
    """An asyncssh client connection (an async context manager), with only what it is given:
    no agent, no ~/.ssh keys or config, no host key check."""
    options.setdefault("client_keys", None)
    return asyncssh.connect(
        "127.0.0.1",
        port,
        username=user,
        known_hosts=None,
        agent_path=None,
        config=None,
        password=options.pop("password", None),
        **options,
    )


async def refused(port: int, user: str, **options: Any) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(port, user, **options):
            pass


# -- authentication ---------------------------------------------------------------------------


def test_a_tenants_key_runs_the_command_with_its_streams_status_and_account(
    world: World, keys: dict[str, asyncssh.SSHKey]
) -> None:
    async def scenario(port: int) -> None:
        async with connect(port, "alice", client_keys=[keys["alice"]]) as conn:
            done = await conn.run(
                "echo out; echo err >&2; pwd; exit 7",
                env={"LANG": "C.UTF-8", "LD_PRELOAD": "/tmp/evil.so"},
                encoding=None,
            )
        assert (done.exit_status, done.stdout, done.stderr) == (
            7,
            f"out\n{world.host.home}\n".encode(),
            b"err\n",
        )

    world.serve(scenario)
    (run,) = world.runtime.spawned
    assert run.argv == [SHELL, "-c", "echo out; echo err >&2; pwd; exit 7"]
    assert (run.ids, run.cwd, run.tty) == ("1001:1001", str(world.host.home), None)
    assert "LANG=C.UTF-8" in run.env and "USER=alice" in run.env
    assert not any(e.startswith(("LD_PRELOAD=", "TERM=")) for e in run.env)
    assert world.sessions is not None and world.sessions.count("alice") == 0


@pytest.mark.parametrize(
    ("user", "why"),
    [
        ("mallory", "not a user of this host"),
        ("bob", "a host user who is not a tenant"),
        ("root", "root"),
        ("alice", "locked"),
    ],
)
def test_refused_names_fail_as_a_wrong_key_does_after_the_same_work(
    world: World, keys: dict[str, asyncssh.SSHKey], user: str, why: str
) -> None:
    """Each of these offers a key its authorized_keys lists: refused all the same, after a
    key read (as nobody) like any other name's, and nothing runs."""
    if why == "locked":
        world.host.locked.add("alice")

    async def scenario(port: int) -> None:
        await refused(port, user, client_keys=[keys["alice"]])

    world.serve(scenario)
    assert world.host.key_reads == ["nobody"]  # the decoy's: no answer tells who exists
    assert world.runtime.spawned == []


def test_a_key_not_in_authorized_keys_is_refused(
    world: World, keys: dict[str, asyncssh.SSHKey]
) -> None:
    async def scenario(port: int) -> None:
        await refused(port, "alice", client_keys=[keys["other"]])
        world.host.keys["alice"] = "# no keys\n"
        await refused(port, "alice", client_keys=[keys["alice"]])  # removed: refused now

    world.serve(scenario)
    assert world.runtime.spawned == []


def test_passwords_are_refused_unless_enabled(world: World) -> None:
    async def scenario(port: int) -> None:
        await refused(port, "alice", password="alice-pw")

    world.serve(scenario)
    assert world.host.pam_calls == []  # PAM is not even asked


def test_password_auth_through_pam_when_enabled(world: World) -> None:
    world.settings = replace(SETTINGS, password_auth=True)

    async def scenario(port: int) -> None:
        async with connect(port, "alice", password="alice-pw") as conn:
            assert (await conn.run("echo in", encoding=None)).stdout == b"in\n"
        await refused(port, "alice", password="wrong")
        # a non-tenant's and root's right passwords: PAM hears an impossible one instead
        await refused(port, "bob", password="bob-pw")
        await refused(port, "root", password="root-pw")

    world.serve(scenario)
    assert world.host.pam_calls == [
        ("alice", "alice-pw", "hostd"),
        ("alice", "wrong", "hostd"),
        ("bob", WRONG, "hostd"),
        ("root", WRONG, "hostd"),
    ]


# -- limits -----------------------------------------------------------------------------------


def _banner(port: int) -> bytes:
    """What the server says first to a new TCP connection (b"" if it closes it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(64)


def test_connections_logging_in_are_capped_per_source(world: World) -> None:
    world.settings = replace(SETTINGS, max_unauthenticated_per_source=2)

    async def scenario(port: int) -> None:
        loop = asyncio.get_running_loop()
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            for s in held:
                assert (await loop.run_in_executor(None, s.recv, 64)).startswith(b"SSH-2.0-")
            assert await loop.run_in_executor(None, _banner, port) == b""  # the third: closed
        finally:
            for s in held:
                s.close()
        # their places are given back once they are gone
        opened = await loop.run_in_executor(
            None, lambda: wait_for(lambda: _banner(port), 10, "a place for a new connection")
        )
        assert opened.startswith(b"SSH-2.0-")

    world.serve(scenario)


def test_too_many_attempts_close_the_connection(
    world: World, keys: dict[str, asyncssh.SSHKey]
) -> None:
    """max_auth_tries keys offered and refused: the right one after them comes too late."""
    world.settings = replace(SETTINGS, max_auth_tries=2)
    wrong = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(2)]

    async def scenario(port: int) -> None:
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
            async with connect(port, "alice", client_keys=[*wrong, keys["alice"]]):
                pass
        async with connect(port, "alice", client_keys=[keys["alice"]]) as conn:
            assert (await conn.run("true")).exit_status == 0  # a new connection may try again

    world.serve(scenario)


def test_a_source_with_too_many_failures_is_refused_even_with_the_right_password(
    world: World,
) -> None:
    world.settings = replace(SETTINGS, password_auth=True, max_failures=3)

    async def scenario(port: int) -> None:
        for _ in range(3):
            await refused(port, "alice", password="wrong")
        with pytest.raises((asyncssh.Error, OSError)):
            async with connect(port, "alice", password="alice-pw"):
                pass

    world.serve(scenario)
    assert ("alice", "alice-pw", "hostd") not in world.host.pam_calls


def test_sessions_over_the_tenants_cap_are_refused_with_the_setting_named(
    world: World, keys: dict[str, asyncssh.SSHKey]
) -> None:
    world.max_sessions = 1

    async def scenario(port: int) -> None:
        async with connect(port, "alice", client_keys=[keys["alice"]]) as conn:
            first = await conn.create_process("echo held; read line")
            assert await first.stdout.readline() == "held\n"
            over = await conn.run("echo should-not-run")
            assert (over.exit_status, over.stdout) == (255, "")
            assert over.stderr == (
                "hostd: alice has 1 sessions open, the most allowed: "
                "end one, or ask an admin to raise [sessions] max_per_tenant\r\n"
            )
            first.stdin.write("done\n")
            assert (await first.wait()).exit_status == 0
            assert (await conn.run("echo again")).stdout == "again\n"  # its slot came back

    world.serve(scenario)
    assert [s.argv[-1] for s in world.runtime.spawned] == ["echo held; read line", "echo again"]


# -- sessions ---------------------------------------------------------------------------------


def test_a_command_on_a_pty_gets_the_terminal_type_and_size(
    world: World, keys: dict[str, asyncssh.SSHKey]
) -> None:
    async def scenario(port: int) -> None:
        async with connect(port, "alice", client_keys=[keys["alice"]]) as conn:
            done = await conn.run(
                'stty size; echo "T:$TERM"; exit 3', term_type="screen", term_size=(100, 30)
            )
        assert done.exit_status == 3
        assert "30 100\r\nT:screen\r\n" in str(done.stdout)

    world.serve(scenario)
    (run,) = world.runtime.spawned
    assert run.argv == [SHELL, "-c", 'stty size; echo "T:$TERM"; exit 3']
    assert run.tty == (30, 100) and "TERM=screen" in run.env


def test_a_shell_is_a_login_shell_that_follows_window_changes(
    world: World, keys: dict[str, asyncssh.SSHKey]
) -> None:
    async def scenario(port: int) -> None:
        async with connect(port, "alice", client_keys=[keys["alice"]]) as conn:
            shell = await conn.create_process(term_type="xterm", term_size=(80, 24))
            shell.stdin.write("echo ready$((6*7))\n")
            await shell.stdout.readuntil("ready42")
            # the gateway applies a window change before the input that follows it
            shell.change_terminal_size(132, 50)
            shell.stdin.write("echo $(stty size | tr ' ' x)-Z$((6*7))\n")
            said = await shell.stdout.readuntil("-Z42")  # a prompt may come before it
            assert re.findall(r"(\d+x\d+)-Z42", said) == ["50x132"]
            shell.stdin.write("exit 4\n")
            assert (await shell.wait()).exit_status == 4

    world.serve(scenario)
    (run,) = world.runtime.spawned
    assert run.argv == [SHELL, "-l"] and run.tty == (24, 80) and "TERM=xterm" in run.env


@pytest.mark.skipif(not Path(SFTP_SERVER).exists(), reason="apt-get install openssh-sftp-server")
def test_sftp_runs_the_sftp_server_without_a_terminal(
    world: World, keys: dict[str, asyncssh.SSHKey]
) -> None:
    target = world.host.home / "up.bin"
    data = os.urandom(100_000)

    async def scenario(port: int) -> None:
        async with (
            connect(port, "alice", client_keys=[keys["alice"]]) as conn,
            conn.start_sftp_client() as sftp,
        ):
            async with sftp.open(str(target), "wb") as f:
                await f.write(data)
            async with sftp.open(str(target), "rb") as f:
                assert await f.read() == data

    world.serve(scenario)
    assert target.read_bytes() == data
    (run,) = world.runtime.spawned
    assert run.argv == [SFTP_SERVER] and run.tty is None
    assert not any(e.startswith("TERM=") for e in run.env)


def test_signals_reach_the_program(world: World, keys: dict[str, asyncssh.SSHKey]) -> None:
    async def scenario(port: int) -> None:
        async with connect(port, "alice", client_keys=[keys["alice"]]) as conn:
            proc = await conn.create_process(
                "trap 'echo got-TERM; exit 42' TERM; echo armed; while :; do sleep 0.1; done"
            )
            assert await proc.stdout.readline() == "armed\n"
            proc.send_signal("TERM")
            done = await proc.wait()
        assert (done.exit_status, done.stdout) == (42, "got-TERM\n")

    world.serve(scenario)


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "pty"])
def test_a_client_that_vanishes_has_its_program_hung_up_and_its_slot_freed(
    world: World, keys: dict[str, asyncssh.SSHKey], tty: bool
) -> None:
    async def scenario(port: int) -> None:
        conn = await connect(port, "alice", client_keys=[keys["alice"]])
        term = {"term_type": "xterm"} if tty else {}
        proc = await conn.create_process("echo started; exec sleep 600", **term)
        assert (await proc.stdout.readline()).strip() == "started"
        conn.abort()  # gone without a word
        (run,) = world.runtime.spawned
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, lambda: wait_for(lambda: run.popen.poll() is not None, 10, "the hang-up")
        )
        assert run.popen.returncode == -signal.SIGHUP
        sessions = world.sessions
        assert sessions is not None
        await loop.run_in_executor(
            None, lambda: wait_for(lambda: sessions.count("alice") == 0, 10, "the slot freed")
        )

    world.serve(scenario)


def test_a_nologin_account_is_told_so_and_nothing_runs(
    world: World, keys: dict[str, asyncssh.SSHKey], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(accounts, "NOLOGIN_TXT", tmp_path / "absent")

    async def scenario(port: int) -> None:
        async with connect(port, "nologin", client_keys=[keys["alice"]]) as conn:
            done = await conn.run("echo should-not-run")
            assert (done.exit_status, done.stdout) == (1, f"{NOLOGIN}\n")
            with pytest.raises(asyncssh.ChannelOpenError):  # nor a forward
                await conn.open_connection("127.0.0.1", 80)

    world.serve(scenario)
    assert world.runtime.spawned == []


def test_a_stopped_container_is_started_saying_so_on_a_terminal(
    world: World, keys: dict[str, asyncssh.SSHKey]
) -> None:
    world.runtime.status = "stopped"

    async def scenario(port: int) -> None:
        async with connect(port, "alice", client_keys=[keys["alice"]]) as conn:
            done = await conn.run("echo in", term_type="xterm")
        assert (done.exit_status, done.stdout) == (0, "in\r\n")
        assert done.stderr == "hostd: starting the container\r\n"

    world.serve(scenario)
    assert world.tenants.started == ["alice"]


def test_a_session_whose_container_stopped_under_it_says_so(
    world: World, keys: dict[str, asyncssh.SSHKey]
) -> None:
    world.tenants.down = True  # as hostctl stop leaves it when the program ends

    async def scenario(port: int) -> None:
        async with connect(port, "alice", client_keys=[keys["alice"]]) as conn:
            done = await conn.run("exit 0")
        assert done.stderr == "\r\nhostd: your container was stopped\r\n"

    world.serve(scenario)


def test_a_failure_before_the_program_runs_is_one_line_and_status_255(
    world: World, keys: dict[str, asyncssh.SSHKey]
) -> None:
    world.tenants.account_error = HostdError("no account alice inside", "ask an admin")

    async def scenario(port: int) -> None:
        async with connect(port, "alice", client_keys=[keys["alice"]]) as conn:
            done = await conn.run("echo should-not-run")
        assert (done.exit_status, done.stdout) == (255, "")
        assert done.stderr == "hostd: no account alice inside: ask an admin\r\n"

    world.serve(scenario)
    assert world.runtime.spawned == []


def test_a_local_forward_connects_from_inside_the_tenants_network(
    world: World, keys: dict[str, asyncssh.SSHKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    """-L: the connection is made in the network namespace of the container's init (here
    that PID is ours, and so is the namespace)."""
    asked: list[tuple[int, str, int]] = []

    def connect_in(pid: int, host: str, port: int) -> socket.socket:
        asked.append((pid, host, port))
        return socket.create_connection((host, port), timeout=10)

    monkeypatch.setattr(netconnect, "connect_in", connect_in)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"echo:" + await reader.readline())
        await writer.drain()
        writer.close()

    async def scenario(port: int) -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        inner = server.sockets[0].getsockname()[1]
        async with server, connect(port, "alice", client_keys=[keys["alice"]]) as conn:
            reader, writer = await conn.open_connection("127.0.0.1", inner)
            writer.write(b"hello\n")
            assert await reader.read() == b"echo:hello\n"
            writer.close()
        assert asked == [(os.getpid(), "127.0.0.1", inner)]

    world.serve(scenario)
