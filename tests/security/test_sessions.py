"""Attacks on the session path, through a real hostd, its SSH gateway and its user socket.

- A tenant opening sessions without end: a cap per tenant, shared by both doors, refuses the
  one too many with a line naming the setting; the tenant's other sessions go on.
- Sessions costing the host memory outside the tenant's quota: every helper hostd keeps on the
  host for a session (`runc exec`, the pty helper) sits in the tenant's cgroup, none in hostd's.
- Signals after a pty session's program ended (its PID may be reaped and reused by another
  user's process): dropped quietly, the session still ends properly.
- Environment values with newlines, NULs or of huge size: filtered the same on both doors.
- A tenant whose session set-up is slow (its container boots slowly, by its own doing) does not
  delay another tenant's login: each tenant's blocking work has its own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import asyncssh
import pytest

from hostd import config as config_mod
from hostd.client import connect, request
from runtime.containers import Runtime
from runtime.execs import ExecSpec
from tests.conftest import CGROUP_PARENT
from tests.hostd_harness import Hostd, UnixUsers, authorize, children, ssh_argv, wait_for

REFUSAL = (
    "sessions open, the most allowed: end one, or ask an admin to raise [sessions] max_per_tenant"
)


@dataclass(frozen=True)
class Tenant:
    user: str
    key: Path
    port: int

    def ssh_args(self, *extra: str) -> list[str]:
        return ssh_argv(self.port, self.key, self.user, *extra)


def _make_tenant(hostd: Hostd, unix_users: UnixUsers, key: Path) -> Tenant:
    user = unix_users.make()
    hostd.hostctl("user", "add", user)
    authorize(user, key.with_suffix(".pub").read_text())
    hostd.hostctl("start", user)
    return Tenant(user, key, hostd.ssh_port)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def tenant(hostd: Hostd, unix_users: UnixUsers, key: Path) -> Iterator[Tenant]:
    t = _make_tenant(hostd, unix_users, key)
    yield t
    hostd.hostctl("user", "remove", t.user, check=False)


class Sessions:
    """Long-running SSH sessions of one tenant, each printing `ready` first; all ended at exit."""

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.clients: list[subprocess.Popen[bytes]] = []

    def open(self, tty: bool = False) -> subprocess.Popen[bytes]:
        extra = ("-tt",) if tty else ()
        client = subprocess.Popen(
            [*self.tenant.ssh_args(*extra), "echo ready; exec sleep 3600"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.clients.append(client)
        assert client.stdout is not None
        line = client.stdout.readline()
        assert line.strip() == b"ready", (line, client.stderr.read() if client.stderr else b"")
        return client

    def close(self) -> None:
        for client in self.clients:
            client.kill()
            client.wait()
        self.clients = []


@contextlib.contextmanager
def open_sessions(tenant: Tenant) -> Iterator[Sessions]:
    sessions = Sessions(tenant)
    try:
        yield sessions
    finally:
        sessions.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _session_helpers(hostd: Hostd, zombies: bool = False) -> list[int]:
    """hostd's children that serve sessions: `runc exec` on pipes, and pty helpers."""
    assert hostd.proc is not None
    return [
        pid
        for pid in children(hostd.proc.pid)
        if re.search(r"runc .* exec |-m runtime\.ttyexec", _cmdline(pid))
        and (zombies or not _ended(pid))
    ]


def _ended(pid: int) -> bool:
    """Exited, not yet reaped (a zombie), or gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _cgroups(pid: int) -> dict[str, str]:
    """controller -> cgroup path of a process (v1 hierarchies; '' for the v2 one)."""
    found = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            found[c] = path
    return found


@contextlib.contextmanager
def session_cap(hostd: Hostd, cap: int) -> Iterator[None]:
    with hostd.configured("60-sessions", f"[sessions]\nmax_per_tenant = {cap}\n"):
        yield


def test_sessions_over_the_cap_are_refused_and_the_others_go_on(
    hostd: Hostd, tenant: Tenant
) -> None:
    with session_cap(hostd, 3), open_sessions(tenant) as sessions:
        held = [sessions.open(), sessions.open(tty=True), sessions.open()]
        res = subprocess.run(
            [*tenant.ssh_args(), "echo should-not-run"], capture_output=True, timeout=120
        )
        assert res.returncode == 255 and res.stdout == b""
        assert res.stderr.decode().strip() == f"hostd: {tenant.user} has 3 {REFUSAL}"
        # the same cap through the other door (the user socket: hostctl exec, hostd-login)
        res2 = hostd.hostctl("exec", tenant.user, "--", "echo", "should-not-run", check=False)
        assert res2.returncode != 0 and f"{tenant.user} has 3 {REFUSAL}" in res2.stderr
        assert all(client.poll() is None for client in held)  # the others go on
        held[0].kill()
        held[0].wait()
        wait_for(
            lambda: hostd.hostctl("exec", tenant.user, "--", "true", check=False).returncode == 0,
            60,
            "a session after one ended",
            interval=0.1,
        )


def test_session_helpers_are_charged_to_the_tenant(hostd: Hostd, tenant: Tenant) -> None:
    assert hostd.proc is not None
    hostd_memory = _cgroups(hostd.proc.pid)["memory"]
    sessions_cgroup = f"/{CGROUP_PARENT}/{tenant.user}/hostd-sessions"
    with open_sessions(tenant) as sessions:
        for tty in (False, True, False, True):
            sessions.open(tty)
        helpers = _session_helpers(hostd)
        kinds = {"ttyexec" if "ttyexec" in _cmdline(pid) else "runc" for pid in helpers}
        assert len(helpers) >= 4 and kinds == {"ttyexec", "runc"}, helpers
        for pid in helpers:
            groups = _cgroups(pid)
            for controller in ("memory", "pids", "cpu"):
                assert groups[controller] == sessions_cgroup, (pid, _cmdline(pid), groups)
        procs = Path(f"/sys/fs/cgroup/memory{hostd_memory}/cgroup.procs").read_text().split()
        assert not set(procs) & {str(pid) for pid in helpers}  # hostd's cgroup holds none
        usage = Path(f"/sys/fs/cgroup/memory{sessions_cgroup}/memory.usage_in_bytes").read_text()
        assert int(usage) >= len(helpers) << 20  # their memory counts against the tenant's


async def _signals_after_the_end(tenant: Tenant, hostd: Hostd, marker: str) -> int:
    async with asyncssh.connect(
        "127.0.0.1",
        tenant.port,
        username=tenant.user,
        client_keys=[str(tenant.key)],
        known_hosts=None,
    ) as conn:
        # the shell ends on a line of input; a child it left (immune to the terminal's hang-up)
        # holds the terminal open, so the session stays
        proc = await conn.create_process(
            f"trap '' HUP; {marker} & echo armed; read line", term_type="xterm"
        )
        assert "armed" in await proc.stdout.readline()
        helpers = [
            pid
            for pid in _session_helpers(hostd)
            if f"/{tenant.user}/hostd-sessions" in _cgroups(pid)["memory"]
        ]
        assert len(helpers) == 1, helpers
        proc.stdin.write("\n")
        # the pty helper exits with the shell, which it reaped: the shell's PID is free now
        ended = partial(_ended, helpers[0])
        await asyncio.to_thread(wait_for, ended, 60, "the program to end", interval=0.1)
        for name in ("TERM", "KILL", "HUP", "INT", "USR1"):  # late: must reach nobody
            proc.send_signal(name)
        # the child is still there (pkill finds it), and its end ends the session
        await asyncio.to_thread(
            hostd.hostctl,
            "exec",
            tenant.user,
            "--",
            "pkill",
            "-f",
            marker.replace("sleep", "slee[p]"),
        )
        done = await asyncio.wait_for(proc.wait(), 60)
        assert done.exit_status is not None
        return done.exit_status


def test_signals_after_the_program_ended_reach_nobody(hostd: Hostd, tenant: Tenant) -> None:
    """On a pty, the program is the helper's child: once the helper reaped it, its PID may be
    anyone's. (On pipes, the target is `runc exec`, hostd's own child, which stays unreaped,
    a zombie at worst, until the session is over: a unit test covers that.)"""
    marker = "sleep 3601"
    log_before = hostd.log.read_text()
    assert asyncio.run(_signals_after_the_end(tenant, hostd, marker)) == 0
    assert "Traceback" not in hostd.log.read_text()[len(log_before) :]


HOSTILE_ENV = {
    "LC_OK": "fine",
    "LC_NL": "a\nLD_PRELOAD=/tmp/x.so",
    "LC_CR": "a\rb",
    "LC_HUGE": "x" * 10_000,
    "EVIL": "1",
    "LD_PRELOAD": "/tmp/x.so",
}
SHOW_ENV = "env | grep -E '^(LC_|EVIL|LD_PRELOAD)' | sort; echo end"


def _env_over_ssh(tenant: Tenant) -> str:
    async def run() -> str:
        async with asyncssh.connect(
            "127.0.0.1",
            tenant.port,
            username=tenant.user,
            client_keys=[str(tenant.key)],
            known_hosts=None,
        ) as conn:
            done = await conn.run(SHOW_ENV, env=HOSTILE_ENV, timeout=120)
            return str(done.stdout)

    return asyncio.run(run())


def _env_over_user_socket(hostd: Hostd, user: str) -> str:
    """What hostd-login does, as the tenant's own host user: an exec request on the user
    socket, with its stdio passed as fds."""
    pw = pwd.getpwnam(user)
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    os.close(in_w)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the tenant's side
        code = 1
        try:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            chan = connect(hostd.user_socket)
            args = {"argv": ["sh", "-c", SHOW_ENV], "env": HOSTILE_ENV}
            code = int(request(chan, "exec", args, [in_r, out_w, out_w])["exit"])
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(in_r)
    with os.fdopen(out_r, "rb") as out:
        text = out.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text


def test_hostile_environment_is_filtered_the_same_on_both_doors(
    hostd: Hostd, tenant: Tenant
) -> None:
    expected = "LC_OK=fine\nend\n"
    assert _env_over_ssh(tenant) == expected
    assert _env_over_user_socket(hostd, tenant.user) == expected


SLOW = 20  # seconds the tenant's container takes to boot, by its own doing
SLOW_UNIT = f"""[Service]
Type=oneshot
ExecStart=/bin/sleep {SLOW}
[Install]
WantedBy=multi-user.target
"""


def test_a_tenants_slow_sessions_do_not_delay_another_tenants_login(
    hostd: Hostd, tenant: Tenant, unix_users: UnixUsers, key: Path
) -> None:
    """Root inside makes its container boot slowly; its logins start it and wait. Last in
    this file: the tenant's queued logins drain for a while after it."""
    other = _make_tenant(hostd, unix_users, key)
    rt = Runtime(config_mod.load(hostd.config).runtime_settings())
    unit = "/etc/systemd/system/hostd-slow.service"
    res = rt.exec(
        tenant.user,
        ExecSpec(
            [
                "sh",
                "-c",
                'printf "$1" >"$2" && ln -s "$2" /etc/systemd/system/multi-user.target.wants/',
                "-",
                SLOW_UNIT,
                unit,
            ]
        ),
    )
    assert res.returncode == 0, res.stderr
    stuck: list[subprocess.Popen[bytes]] = []
    try:
        hostd.hostctl("stop", tenant.user)
        stuck += [
            subprocess.Popen(
                [*tenant.ssh_args(), "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for _ in range(8)
        ]
        wait_for(lambda: _hanging(tenant.user), 60, "the tenant's slow boot", interval=0.1)
        started = time.monotonic()
        res2 = subprocess.run([*other.ssh_args(), "echo in"], capture_output=True, timeout=120)
        took = time.monotonic() - started
        assert res2.stdout == b"in\n", res2.stderr
        assert _hanging(tenant.user) >= 1  # the tenant's logins were still waiting meanwhile
        assert took < SLOW / 2, f"another tenant's login took {took:.1f} s"
    finally:
        for client in stuck:
            client.kill()
            client.wait()
        wait_for(
            lambda: rt.state(tenant.user).status == "running", 60, "the tenant to run", interval=0.1
        )
        rt.exec(
            tenant.user,
            ExecSpec(
                ["rm", "-f", unit, "/etc/systemd/system/multi-user.target.wants/hostd-slow.service"]
            ),
        )
        hostd.hostctl("user", "remove", other.user, check=False)


def _hanging(user: str) -> int:
    """Processes of the tenant sleeping in its slow boot (seen from the host)."""
    return sum(
        1
        for p in Path("/proc").glob("[0-9]*")
        if _cmdline(int(p.name)).startswith(f"/bin/sleep {SLOW}")
        and f"/{user}" in _memory_cgroup(int(p.name))
    )


def _memory_cgroup(pid: int) -> str:
    try:
        return _cgroups(pid).get("memory", "")
    except OSError:
        return ""


def test_a_sessions_environment_shows_in_no_host_command_line(tenant: Tenant) -> None:
    """Other host users read every process's command line (`ps`): what a session carries
    (its client's address, locale...) must not be on runc's or a helper's argv."""
    value = f"hostd-{os.getpid()}-secret"
    client = subprocess.Popen(
        [*tenant.ssh_args("-o", "SendEnv=LC_SECRET"), 'echo "ready $LC_SECRET"; exec sleep 3600'],
        env={**os.environ, "LC_SECRET": value},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == f"ready {value}".encode()  # it arrived
        shown = [
            pid for pid in os.listdir("/proc") if pid.isdigit() and value in _cmdline(int(pid))
        ]
        assert shown == []
    finally:
        client.kill()
        client.wait()
