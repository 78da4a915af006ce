"""The SSH gateway with real OpenSSH clients (ssh, scp, sftp) and the docker CLI, on loopback."""

from __future__ import annotations

import hashlib
import itertools
import os
import pty
import pwd
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from tests.hostd_harness import (
    SSH_OPTIONS,
    Hostd,
    Login,
    UnixUsers,
    authorize,
    free_port,
    keypair,
    login_as,
    read_until,
    set_winsize,
    wait_for,
)


@pytest.fixture(scope="module")
def login(
    hostd: Hostd, unix_users: UnixUsers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Login]:
    user = unix_users.make()
    hostd.hostctl("user", "add", user)
    yield login_as(user, hostd.ssh_port, tmp_path_factory.mktemp("login"))
    hostd.hostctl("user", "remove", user)


def test_exec_status_streams_and_account(login: Login) -> None:
    res = login.ssh("echo out; echo err >&2; exit 7")
    assert (res.returncode, res.stdout, res.stderr) == (7, b"out\n", b"err\n")
    res = login.ssh("id -un; id -nG; pwd")
    name, groups, cwd = res.stdout.decode().splitlines()
    assert name == login.user and {"sudo", "docker"} <= set(groups.split())
    assert cwd == pwd.getpwnam(login.user).pw_dir
    assert login.ssh("cat | wc -c", input=b"x" * 100000).stdout.strip() == b"100000"


def test_the_users_programs_have_no_capabilities_until_sudo(login: Login) -> None:
    """As after any login: a file only root may read stays closed to the user's shell."""
    caps = login.ssh("grep -E '^Cap(Inh|Prm|Eff|Amb):' /proc/self/status").stdout.decode()
    assert {line.split()[1] for line in caps.splitlines()} == {"0000000000000000"}, caps
    assert login.ssh("cat /etc/shadow").returncode != 0
    assert login.ssh("sudo -n cat /etc/shadow").stdout.startswith(b"root:")


def test_host_key_is_kept_across_restarts(hostd: Hostd) -> None:
    def fingerprint() -> str:
        out = subprocess.run(
            ["ssh-keyscan", "-p", str(hostd.ssh_port), "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return out.split()[-1]

    before = fingerprint()
    hostd.stop()
    hostd.start()
    assert fingerprint() == before


def test_interactive_shell_on_a_pty(login: Login) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - becomes ssh
        os.execvp("ssh", login.ssh_args("-tt"))
    seen = bytearray()
    try:
        set_winsize(fd, 30, 100)
        os.write(fd, b"tty; echo MARK-$((6*7))\n")
        read_until(fd, rb"/dev/pts/\d+\s+MARK-42", seen)
        os.write(fd, b"sudo -n true && echo SUDO-$((1+1))\n")
        read_until(fd, rb"SUDO-2", seen)
        os.write(fd, b"stty size; echo SIZE-DONE\n")
        read_until(fd, rb"30 100\s+SIZE-DONE", seen)
        set_winsize(fd, 50, 132)
        os.kill(pid, signal.SIGWINCH)
        asked = itertools.count()

        def size() -> bytes:
            n = next(asked)
            os.write(fd, b"echo SIZE-$(stty size | tr ' ' x)-%d\n" % n)
            answer = rb"SIZE-(\d+x\d+)-%d\s" % n
            return bytes(re.findall(answer, read_until(fd, answer, seen))[-1])

        wait_for(lambda: size() == b"50x132", 10, lambda: f"50x132 in {bytes(seen)[-300:]!r}")
        os.write(fd, b"exit 3\n")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        os.close(fd)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_scp_and_sftp_round_trips(login: Login, tmp_path: Path) -> None:
    data = os.urandom(5 * 2**20)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    home = Path(pwd.getpwnam(login.user).pw_dir)
    base = ["-P", str(login.port), "-i", str(login.key), *SSH_OPTIONS]
    target = f"{login.user}@127.0.0.1"
    for legacy, name in ((False, "sftp-mode.bin"), (True, "legacy.bin")):
        mode = ["-O"] if legacy else []
        subprocess.run(["scp", *mode, *base, str(src), f"{target}:{name}"], check=True, timeout=120)
        assert (home / name).read_bytes() == data  # the host home, through the container
        assert (home / name).stat().st_uid == pwd.getpwnam(login.user).pw_uid
        back = tmp_path / f"back-{name}"
        subprocess.run(
            ["scp", *mode, *base, f"{target}:{name}", str(back)], check=True, timeout=120
        )
        assert back.read_bytes() == data
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} via-sftp.bin\nget via-sftp.bin {tmp_path}/sftp-back.bin\n")
    sftp = ["sftp", *base, "-b", str(batch), target]
    subprocess.run(sftp, check=True, capture_output=True, timeout=120)
    assert hashlib.sha256((tmp_path / "sftp-back.bin").read_bytes()).digest() == (
        hashlib.sha256(data).digest()
    )


def test_local_forward_reaches_an_inner_container(
    login: Login, hostd: Hostd, busybox_tar: Path
) -> None:
    hostd.hostctl(
        "exec",
        login.user,
        "--",
        "docker",
        "import",
        "-",
        "busybox:local",
        input=busybox_tar.read_bytes(),
    )
    serve = (
        "docker run -d -p 8080:80 busybox:local sh -c "
        "'mkdir /www && echo forwarded > /www/index.html && httpd -f -p 80 -h /www'"
    )
    hostd.hostctl("exec", login.user, "--", "sh", "-c", serve)
    local = free_port()
    tunnel = subprocess.Popen(
        login.ssh_args("-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{local}:127.0.0.1:8080")
    )
    try:

        def body() -> bytes:
            assert tunnel.poll() is None, "the tunnel's ssh exited"
            with socket.socket() as s:
                s.settimeout(5)
                s.connect(("127.0.0.1", local))
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return s.recv(4096)

        wait_for(lambda: b"forwarded" in body(), 60, "the page via the tunnel", ignore=(OSError,))
    finally:
        tunnel.terminate()
        tunnel.wait()


def test_docker_cli_over_ssh(login: Login) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on this host: apt-get install docker.io (client only)")
    # the docker CLI runs plain `ssh`, which reads ~/.ssh from the passwd entry, not $HOME:
    # put an `ssh` first in PATH that uses this login's config
    bin_dir = login.home / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {login.home}/.ssh/config "$@"\n')
    wrapper.chmod(0o755)
    res = subprocess.run(
        [
            docker,
            "--host",
            f"ssh://{login.user}@127.0.0.1:{login.port}",
            "version",
            "--format",
            "{{.Server.Version}}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", res.stdout.strip())


def test_refusals(login: Login, hostd: Hostd, unix_users: UnixUsers, tmp_path: Path) -> None:
    other_key = keypair(tmp_path / "other")
    wrong = Login(login.user, other_key, login.port, login.home)
    res = wrong.ssh("true")
    assert res.returncode == 255 and b"Permission denied" in res.stderr
    outsider = unix_users.make()  # a Unix user who is not a tenant, with a valid key
    authorize(outsider, login.key.with_suffix(".pub").read_text())
    res = Login(outsider, login.key, login.port, login.home).ssh("true")
    assert res.returncode == 255 and b"Permission denied" in res.stderr
    log = hostd.log.read_text()
    assert f"login refused for {outsider} from 127.0.0.1: {outsider} has no container" in log
    for user in ("root", "nosuchuser"):
        res = Login(user, login.key, login.port, login.home).ssh("true")
        assert res.returncode == 255 and b"Permission denied" in res.stderr
    res = login.ssh("true", extra=("-o", "PreferredAuthentications=password"))
    assert res.returncode == 255  # passwords are off by default
    log = hostd.log.read_text()
    assert "login refused for root from 127.0.0.1: root cannot log in through hostd" in log
    assert f"failed login for {login.user} from 127.0.0.1" in log


def test_authorized_keys_options(login: Login) -> None:
    line = login.key.with_suffix(".pub").read_text().strip()
    home = Path(pwd.getpwnam(login.user).pw_dir)
    saved = (home / ".ssh/authorized_keys").read_text()
    try:
        authorize(login.user, f'command="echo forced",no-pty {line}\n')
        res = login.ssh("echo asked")
        assert res.stdout == b"forced\n", (res.returncode, res.stderr)
        authorize(login.user, f"no-pty {line}\n")
        res = login.ssh("tty", extra=("-tt",))
        assert b"PTY allocation request failed" in res.stderr
        assert b"/dev/pts" not in res.stdout
        authorize(login.user, f'from="192.0.2.1" {line}\n')
        assert login.ssh("true").returncode == 255
    finally:
        authorize(login.user, saved)


def test_fifty_concurrent_sessions(login: Login, hostd: Hostd, unix_users: UnixUsers) -> None:
    second = unix_users.make()
    hostd.hostctl("user", "add", second)
    authorize(second, login.key.with_suffix(".pub").read_text())
    logins = [login, Login(second, login.key, login.port, login.home)]
    try:

        def run(i: int) -> bytes:
            res = logins[i % 2].ssh(f"echo session-$(({i}*2))")
            assert res.returncode == 0, res.stderr
            return res.stdout

        with ThreadPoolExecutor(50) as pool:
            outputs = list(pool.map(run, range(50)))
        assert outputs == [f"session-{i * 2}\n".encode() for i in range(50)]
    finally:
        hostd.hostctl("user", "remove", second)


def _inside(hostd: Hostd, user: str, script: str) -> str:
    return hostd.hostctl("exec", user, "--", "sh", "-c", script).stdout


def _pattern(marker: str) -> str:
    """A pgrep pattern for `marker` that does not match the shell running the pgrep."""
    return f"{marker[:-1]}[{marker[-1]}]"


def _runs(hostd: Hostd, user: str, marker: str) -> bool:
    """Whether a process inside runs `marker`."""
    found = hostd.hostctl("exec", user, "--", "pgrep", "-f", _pattern(marker), check=False)
    return found.returncode == 0


def _ended(hostd: Hostd, user: str, marker: str) -> bool:
    return not _runs(hostd, user, marker)


def test_signals_reach_the_command(login: Login) -> None:
    import asyncio

    import asyncssh

    async def run() -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect(
            "127.0.0.1",
            login.port,
            username=login.user,
            client_keys=[str(login.key)],
            known_hosts=None,
        ) as conn:
            proc = await conn.create_process(
                "trap 'echo got-TERM; exit 42' TERM; echo armed; while :; do sleep 0.1; done"
            )
            assert (await proc.stdout.readline()) == "armed\n"
            proc.send_signal("TERM")
            return await proc.wait()

    done = asyncio.run(run())
    assert done.exit_status == 42 and "got-TERM" in str(done.stdout)


def test_closing_the_client_ends_the_session(login: Login, hostd: Hostd) -> None:
    for tty in (False, True):
        marker = f"sleep 4{int(tty)}4{int(tty)}"
        client = subprocess.Popen(
            login.ssh_args(*(["-tt"] if tty else [])) + [marker],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        wait_for(partial(_runs, hostd, login.user, marker), 10, f"{marker!r} running inside")
        client.kill()
        client.wait()
        wait_for(partial(_ended, hostd, login.user, marker), 10, f"{marker!r} to end")


def test_stopping_the_container_ends_sessions_with_a_message(login: Login, hostd: Hostd) -> None:
    client = subprocess.Popen(
        login.ssh_args() + ["echo started; sleep 600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert client.stdout is not None and client.stdout.readline() == b"started\n"
    hostd.hostctl("stop", login.user)
    _, err = client.communicate(timeout=120)
    assert b"hostd: your container was stopped" in err
    assert login.ssh("true").returncode == 0  # the next login starts it again


def test_tmux_and_vim_work_on_a_terminal(login: Login) -> None:
    res = login.ssh(
        "tmux new-session -d -s t 'sleep 30' && tmux ls && tmux kill-server; "
        "vim --version | head -1",
        extra=("-tt",),
    )
    assert b"t: 1 windows" in res.stdout and b"VIM - Vi IMproved" in res.stdout


def test_password_login_through_pam(login: Login, hostd: Hostd) -> None:
    pam_service = Path("/etc/pam.d/hostd")
    installed = not pam_service.exists()
    if installed:
        shutil.copy(Path(__file__).parents[2] / "etc/pam.d/hostd", pam_service)
    dropin = Path(f"{hostd.config}.d/50-password.toml")
    dropin.parent.mkdir(exist_ok=True)
    try:
        subprocess.run(["chpasswd"], input=f"{login.user}:s3cret-pw\n", text=True, check=True)
        dropin.write_text("[gateway]\npassword_auth = true\n")
        hostd.stop()
        hostd.start()
        askpass = login.home / "askpass"
        askpass.write_text("#!/bin/sh\necho s3cret-pw\n")
        askpass.chmod(0o700)
        env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
        cmd = [
            "ssh",
            "-p",
            str(login.port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password",
            f"{login.user}@127.0.0.1",
            "id -un",
        ]
        res = subprocess.run(
            cmd, env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL
        )
        assert res.stdout.strip() == login.user.encode(), res.stderr
        askpass.write_text("#!/bin/sh\necho wrong\n")
        res = subprocess.run(
            cmd, env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL
        )
        assert res.returncode == 255
    finally:
        dropin.unlink(missing_ok=True)
        if installed:
            pam_service.unlink()
        hostd.stop()
        hostd.start()


def test_client_locale_reaches_the_session(login: Login) -> None:
    res = login.ssh(
        "echo $LANG/$LC_TIME/${EVIL:-none}", extra=("-o", "SetEnv=LANG=C.UTF-8 LC_TIME=C EVIL=1")
    )
    assert res.stdout == b"C.UTF-8/C/none\n", res.stderr
