"""OpenSSH into a tenant's container: a real sshd (Debian openssh-server) on a loopback port with
its own config, hostd-login installed by packaging/install-login-hook.sh as its ForceCommand
(the shipped sshd_config.d snippet, for a test group), and the real ssh, scp and sftp clients.

The machine's own sshd and its configuration are never touched: this sshd has its own config,
host key and pid file in a temp dir, and is killed by its PID at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostd.login import SFTP_SERVER, command_argv
from tests.conftest import INNER_DRIVER
from tests.hostd_harness import (
    POLL_INTERVAL,
    SSH_OPTIONS,
    SSHD,
    Hostd,
    UnixUsers,
    authorize,
    free_port,
    start_sshd,
    stop_sshd,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
# What hostd-login may load from this repository: stdlib-only modules (see hostd/login.py).
LOGIN_MODULES = {
    "hostd",
    "hostd.api",
    "hostd.client",
    "hostd.errors",
    "hostd.login",
    "hostd.protocol",
    "runtime",
    "runtime.errors",
    "runtime.proc",
    "runtime.ttyexec",
}


@dataclass
class Sshd:
    root: Path  # the test's directory under /run (readable by the test users)
    port: int
    key: Path
    wrong_key: Path
    tenant: str
    outsider: str  # in the group, so forced to hostd-login, but not a tenant
    log: Path
    proc: subprocess.Popen[bytes]

    def client_options(self, key: Path | None = None) -> list[str]:
        return [
            "-F",
            "/dev/null",
            "-i",
            str(key or self.key),
            *SSH_OPTIONS,
            *("-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=30"),
        ]

    def ssh_argv(self, user: str, *args: str, key: Path | None = None) -> list[str]:
        return ["ssh", *self.client_options(key), "-p", str(self.port), f"{user}@127.0.0.1", *args]

    def ssh(
        self,
        user: str,
        command: str,
        input: bytes = b"",
        key: Path | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.ssh_argv(user, command, key=key), input=input, capture_output=True, timeout=timeout
        )

    def home(self, user: str) -> Path:
        return Path(pwd.getpwnam(user).pw_dir)


def _run(*argv: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}{res.stdout}"


def _authorize(user: str, public_key: str) -> None:
    authorize(user, public_key)
    # without PAM, sshd refuses an account whose password is locked ("!" from useradd)
    _run("usermod", "-p", "*", user)


def _config(root: Path, port: int, group: str, hostd: Hostd) -> str:
    """sshd's config: the shipped snippet (for the test group and the installed launcher),
    included first as Debian's sshd_config does, then this server's own settings."""
    snippet = (REPO / "etc/sshd_config.d/hostd.conf").read_text()
    assert "Match Group hostd-users\n" in snippet and "/usr/local/bin/hostd-login" in snippet
    snippet = snippet.replace("Match Group hostd-users\n", f"Match Group {group}\n")
    snippet = snippet.replace("/usr/local/bin/hostd-login", str(root / "login/bin/hostd-login"))
    (root / "sshd/hostd.conf").write_text(snippet)
    return (
        f"Include {root}/sshd/hostd.conf\n"
        f"Port {port}\nListenAddress 127.0.0.1\n"
        f"HostKey {root}/sshd/host_key\nPidFile {root}/sshd/sshd.pid\n"
        "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nAuthorizedKeysFile .ssh/authorized_keys\n"
        "PermitRootLogin no\nStrictModes yes\nLogLevel VERBOSE\nMaxStartups 100\n"
        "Subsystem sftp /usr/lib/openssh/sftp-server\n"  # Debian's; ForceCommand catches it
        f"SetEnv HOSTD_USER_SOCKET={hostd.user_socket}\n"
    )


@pytest.fixture(scope="module")
def sshd(hostd: Hostd, unix_users: UnixUsers) -> Iterator[Sshd]:
    for program, package in (
        (SSHD, "openssh-server"),
        ("ssh", "openssh-client"),
        ("scp", "openssh-client"),
        ("sftp", "openssh-client"),
        (SYSTEM_PYTHON, "python3"),
    ):
        if shutil.which(program) is None:
            pytest.skip(f"{program} missing: apt-get install {package}")
    root = Path(tempfile.mkdtemp(prefix=f"hostd-login-test-{os.getpid()}-", dir="/run"))
    os.chmod(root, 0o755)  # the users' sshd processes run the launcher from here
    group = f"hdssh{os.getpid() % 100000}"
    made_run_sshd = not os.path.isdir("/run/sshd")  # sshd's privilege separation directory
    tenant = ""
    proc: subprocess.Popen[bytes] | None = None
    try:
        _run("bash", str(REPO / "packaging/install-login-hook.sh"), "--prefix", f"{root}/login")
        (root / "sshd").mkdir(mode=0o700)
        for name in ("host_key", "client_key", "wrong_key"):
            _run(
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                name,
                "-f",
                str(root / "sshd" / name),
            )
        _run("groupadd", group)
        tenant, outsider = unix_users.make(), unix_users.make()
        for user in (tenant, outsider):
            _run("usermod", "-aG", group, user)
            _authorize(user, (root / "sshd/client_key.pub").read_text())
        hostd.hostctl("user", "add", tenant)  # not started: the first login starts it

        port = free_port()
        config = root / "sshd/sshd_config"
        config.write_text(_config(root, port, group, hostd))
        if made_run_sshd:
            os.makedirs("/run/sshd", mode=0o755)
        _run(SSHD, "-t", "-f", str(config))
        log = root / "sshd/sshd.log"
        proc = start_sshd(config, port, log)
        yield Sshd(
            root,
            port,
            root / "sshd/client_key",
            root / "sshd/wrong_key",
            tenant,
            outsider,
            log,
            proc,
        )
    finally:
        if proc is not None:
            stop_sshd(proc)
        if tenant:
            hostd.hostctl("user", "remove", tenant, check=False)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        if made_run_sshd:
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")


def test_what_runs_inside_for_each_request() -> None:
    """What sshd puts in SSH_ORIGINAL_COMMAND (checked with sshd 9.2): the Subsystem's
    command for sftp and for scp's default protocol, `scp -t|-f ...` for `scp -O`."""
    assert command_argv(None) == ["/bin/sh", "-c", 'exec "${SHELL:-/bin/sh}" -l', "hostd-login"]
    for sftp in ("/usr/lib/openssh/sftp-server", "internal-sftp", "sftp-server"):
        assert command_argv(sftp) == [SFTP_SERVER]
    assert command_argv("internal-sftp -l INFO -u 022") == [SFTP_SERVER, "-l", "INFO", "-u", "022"]
    for command in ("scp -t x", "docker ps", "sftp-server; id", "internal-sftp 'x", ""):
        assert command_argv(command) == [
            "/bin/sh",
            "-c",
            'exec "${SHELL:-/bin/sh}" -c "$1"',
            "hostd-login",
            command,
        ]


def test_login_hook_loads_only_stdlib_modules(sshd: Sshd) -> None:
    """hostd-login runs under the system Python as the user: nothing outside the standard
    library and the stdlib-only modules of this repository (no cffi, asyncssh, pyroute2)."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import hostd.login; "
        "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('hostd', 'runtime', 'cffi', 'asyncssh', 'pyroute2', 'systemd', 'pam'))))"
    )
    res = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", script, str(sshd.root / "login/lib/hostd")],
        capture_output=True,
        text=True,
        user=sshd.tenant,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert set(res.stdout.split()) == LOGIN_MODULES


def test_exec_exit_status_and_separate_streams(sshd: Sshd) -> None:
    res = sshd.ssh(sshd.tenant, "echo out; echo err >&2; exit 7")
    assert (res.returncode, res.stdout, res.stderr) == (7, b"out\n", b"err\n")
    # the user's own account inside, in their home, with sudo and docker; never root
    res = sshd.ssh(sshd.tenant, 'id -un; groups; pwd; echo "$SHELL"; sudo -n true && echo sudo ok')
    assert res.returncode == 0, res.stderr
    name, groups, cwd, shell, sudo = res.stdout.decode().splitlines()
    assert name == sshd.tenant
    assert {"sudo", "docker"} <= set(groups.split()) and "root" not in groups.split()
    assert (cwd, shell, sudo) == (str(sshd.home(sshd.tenant)), "/bin/bash", "sudo ok")
    # binary-safe both ways: stdin to the command, its stdout back, stderr apart
    data = os.urandom(1 << 20)
    res = sshd.ssh(sshd.tenant, "cat; head -c 1000 /dev/zero >&2", input=data)
    assert (res.returncode, res.stdout, res.stderr) == (0, data, b"\0" * 1000)
    # the client's command is a shell command line, as with sshd
    res = sshd.ssh(sshd.tenant, "for w in a 'b c'; do echo \"[$w]\"; done | tr -d '\\n'")
    assert res.stdout == b"[a][b c]"
    # no command and no terminal: the login shell reads its commands from stdin, as with sshd
    res = subprocess.run(
        sshd.ssh_argv(sshd.tenant, "-T"),
        input=b"echo $0 $PWD; exit 4\n",
        capture_output=True,
        timeout=300,
    )
    assert (res.returncode, res.stdout) == (4, f"/bin/bash {sshd.home(sshd.tenant)}\n".encode())


def test_docker_inside_without_a_root_equivalent_group(sshd: Sshd) -> None:
    host_groups = subprocess.run(["id", "-nG", sshd.tenant], capture_output=True, text=True)
    assert not {"docker", "sudo", "root", "hostd-admin"} & set(host_groups.stdout.split())
    res = sshd.ssh(sshd.tenant, "docker info --format '{{.Driver}}'")
    assert (res.returncode, res.stdout.strip()) == (0, INNER_DRIVER.encode()), res.stderr


class PtyClient:
    """A program (here `ssh -tt`) on a pty of the test, driven like a terminal."""

    def __init__(self, argv: list[str], rows: int, cols: int) -> None:
        self.master, slave = os.openpty()
        self._set_size(rows, cols)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm"}
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.out = b""
        self._pos = 0

    def _set_size(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _read(self, timeout: float) -> bool:
        """Read what is there; False at end of output (the pty's other side closed)."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: ssh has exited
            return False
        self.out += data
        return bool(data)

    def expect(self, pattern: bytes, timeout: float = 120) -> re.Match[bytes]:
        regex = re.compile(pattern)

        def arrived() -> re.Match[bytes] | None:
            found = regex.search(self.out, self._pos)
            if found is None:
                assert self._read(POLL_INTERVAL), f"ended before {pattern!r}: {self.out[-3000:]!r}"
                found = regex.search(self.out, self._pos)
            return found

        what = lambda: f"{pattern!r} in {self.out[-3000:]!r}"  # noqa: E731
        found = wait_for(arrived, timeout, what, interval=0)
        self._pos = found.end()
        return found

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def resize(self, rows: int, cols: int) -> None:
        self._set_size(rows, cols)  # as a terminal emulator does: new size, then SIGWINCH
        os.kill(self.proc.pid, signal.SIGWINCH)

    def wait(self, timeout: float = 60) -> int:
        """Drain the output until ssh is gone; its exit status."""
        wait_for(
            lambda: not self._read(POLL_INTERVAL),
            timeout,
            lambda: f"ssh to exit: {self.out[-3000:]!r}",
            interval=0,
        )
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_shell_on_a_pty(sshd: Sshd, hostd: Hostd) -> None:
    hostd.hostctl("stop", sshd.tenant)  # the login starts it again, and says so
    term = PtyClient(sshd.ssh_argv(sshd.tenant, "-tt"), rows=30, cols=100)
    try:
        term.expect(rb"hostd: starting the container")
        term.expect(rb"\$ ")  # the login shell's prompt
        term.send('echo "T:$(tty):$TERM:$(id -un):$PWD:$((6*7))"')
        found = term.expect(rb"T:([^:]*):([^:]*):([^:]*):([^:]*):42")
        tty, term_name, user, cwd = (g.decode() for g in found.groups())
        assert re.fullmatch(r"/dev/pts/\d+", tty), tty
        assert (term_name, user, cwd) == ("xterm", sshd.tenant, str(sshd.home(sshd.tenant)))
        term.send('shopt -q login_shell && echo "L:login:$((6*7))"')
        term.expect(rb"L:login:42")
        term.send('echo "S:$(stty size):$((6*7))"')
        assert term.expect(rb"S:(\d+ \d+):42").group(1) == b"30 100"
        term.send('sudo -n true && echo "U:sudo:$((6*7))"')
        term.expect(rb"U:sudo:42")
        term.resize(40, 132)

        def size() -> bytes:
            term.send('echo "S:$(stty size):$((6*7))"')
            return term.expect(rb"S:(\d+ \d+):42").group(1)

        # the window-change request travels asynchronously
        wait_for(lambda: size() == b"40 132", 30, lambda: f"40 132 in {term.out[-300:]!r}")
        term.send("exit 3")
        assert term.wait() == 3
    finally:
        term.close()


def _scp(sshd: Sshd, legacy: bool, *paths: str) -> None:
    argv = ["scp", *sshd.client_options(), "-P", str(sshd.port), *(["-O"] if legacy else [])]
    res = subprocess.run([*argv, *paths], capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-protocol", "legacy-scp"])
def test_scp_round_trip(sshd: Sshd, legacy: bool, tmp_path: Path) -> None:
    data = os.urandom(5 << 20)
    (tmp_path / "up.bin").write_bytes(data)
    name = f"scp-{'legacy' if legacy else 'sftp'}.bin"
    remote = f"{sshd.tenant}@127.0.0.1:{name}"
    _scp(sshd, legacy, str(tmp_path / "up.bin"), remote)
    _scp(sshd, legacy, remote, str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == data
    # it landed in the user's home inside, which is their host home, owned by them there
    landed = sshd.home(sshd.tenant) / name
    assert landed.read_bytes() == data
    pw = pwd.getpwnam(sshd.tenant)
    assert (landed.stat().st_uid, landed.stat().st_gid) == (pw.pw_uid, pw.pw_gid)


def test_sftp_batch_round_trip(sshd: Sshd, tmp_path: Path) -> None:
    data = os.urandom(5 << 20)
    (tmp_path / "up.bin").write_bytes(data)
    batch = tmp_path / "batch"
    batch.write_text(
        f"put {tmp_path}/up.bin sftp.bin\nget sftp.bin {tmp_path}/down.bin\n"
        "mkdir sftp-dir\nrename sftp.bin sftp-dir/moved.bin\n"
    )
    argv = [
        "sftp",
        *sshd.client_options(),
        "-P",
        str(sshd.port),
        "-b",
        str(batch),
        f"{sshd.tenant}@127.0.0.1",
    ]
    res = subprocess.run(argv, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "down.bin").read_bytes() == data
    moved = sshd.home(sshd.tenant) / "sftp-dir/moved.bin"
    assert moved.read_bytes() == data
    assert moved.stat().st_uid == pwd.getpwnam(sshd.tenant).pw_uid


@pytest.mark.parametrize("terminal", [False, True], ids=["pipes", "pty"])
def test_closing_the_client_ends_the_command_inside(
    sshd: Sshd, hostd: Hostd, terminal: bool
) -> None:
    marker = f"sleep 30{int(terminal)}{os.getpid() % 10}"  # unique enough to find with pgrep

    def running() -> bool:
        res = hostd.hostctl("exec", sshd.tenant, "--", "pgrep", "-fx", marker, check=False)
        return res.returncode == 0

    command = f"echo ready$((6*7)); exec {marker}"
    if terminal:
        term = PtyClient(sshd.ssh_argv(sshd.tenant, "-tt", command), rows=24, cols=80)
        client = term.proc
    else:
        client = subprocess.Popen(
            sshd.ssh_argv(sshd.tenant, command), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
    try:
        if terminal:
            term.expect(rb"ready42")
        else:
            assert client.stdout is not None and client.stdout.readline() == b"ready42\n"
        assert running()
    finally:
        client.kill()  # the connection drops without a goodbye
        client.wait()
        if terminal:
            term.close()
    wait_for(lambda: not running(), 30, f"{marker!r} to end after the client left", interval=0.2)


def test_fifty_concurrent_sessions(sshd: Sshd) -> None:
    with ThreadPoolExecutor(50) as pool:
        results = list(
            pool.map(lambda i: sshd.ssh(sshd.tenant, f"echo {i}; exit {i % 5}"), range(50))
        )
    assert [(r.returncode, r.stdout) for r in results] == [
        (i % 5, f"{i}\n".encode()) for i in range(50)
    ], [r.stderr for r in results if r.stderr]


def test_refusals(sshd: Sshd) -> None:
    res = sshd.ssh(sshd.tenant, "true", key=sshd.wrong_key)
    assert res.returncode == 255
    assert b"Permission denied (publickey)" in res.stderr
    # a member of the group who is not a tenant: hostd-login says why, in one line, like ssh
    res = sshd.ssh(sshd.outsider, "true")
    assert res.returncode == 255
    assert res.stdout == b""
    assert res.stderr.decode() == (
        f"hostd: {sshd.outsider} is not a tenant: "
        f"ask an admin to make you one (`hostctl user add {sshd.outsider}`)\n"
    )
    # the same on a pty; sftp is refused too (sshd drops a subsystem's stderr: no message)
    res = subprocess.run(sshd.ssh_argv(sshd.outsider, "-tt"), capture_output=True, timeout=60)
    assert res.returncode == 255 and b"is not a tenant" in res.stdout + res.stderr
    argv = ["sftp", *sshd.client_options(), "-P", str(sshd.port), f"{sshd.outsider}@127.0.0.1"]
    res = subprocess.run(argv, input=b"ls\n", capture_output=True, timeout=60)
    assert res.returncode == 255 and b"Connection closed" in res.stderr
