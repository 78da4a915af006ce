"""Attacks on the SSH gateway's authentication, against a real hostd with real ssh clients.

A tenant's own home is attacker-controlled (FIFO, sparse or symlinked authorized_keys), admins'
locks (expired, locked, nologin) must hold for key logins, unauthenticated clients must not be
able to exhaust the gateway or guess passwords fast, and the answers before authentication must
not tell who exists. The module's hostd runs with password logins on and the shipped pre-auth
caps; failing logins come from their own loopback source addresses (127.0.0.N) so the
per-source failure limit never blocks the tenants' real logins from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh
import pytest

from hostd.api import Channel
from hostd.client import request
from runtime.errors import RuntimeFailure
from tests.hostd_harness import (
    Hostd,
    Login,
    UnixUsers,
    authorize,
    connect_as,
    keypair,
    login_as,
    wait_for,
)

PER_SOURCE = 8  # the shipped max_unauthenticated_per_source
MAX_FAILURES = 4
LOGIN_GRACE = 10
PAM_SERVICE = Path("/etc/pam.d/hostd")


@pytest.fixture(scope="module")
def gateway(hostd: Hostd) -> Iterator[Hostd]:
    """The session's hostd, restarted with password logins, the shipped pre-auth caps, a short
    login grace and a low failure limit; restored afterwards."""
    installed = not PAM_SERVICE.exists()
    if installed:
        shutil.copy(Path(__file__).parents[2] / "etc/pam.d/hostd", PAM_SERVICE)
    settings = (
        f"[gateway]\npassword_auth = true\nmax_failures = {MAX_FAILURES}\n"
        f"max_unauthenticated_per_source = {PER_SOURCE}\nlogin_grace = {LOGIN_GRACE}\n"
    )
    try:
        with hostd.configured("60-ssh-auth", settings):
            yield hostd
    finally:
        if installed:
            PAM_SERVICE.unlink(missing_ok=True)


def _tenant(hostd: Hostd, users: UnixUsers, directory: Path) -> Login:
    user = users.make()
    hostd.hostctl("user", "add", user)
    return login_as(user, hostd.ssh_port, directory)


@pytest.fixture(scope="module")
def alice(
    gateway: Hostd, unix_users: UnixUsers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Login]:
    login = _tenant(gateway, unix_users, tmp_path_factory.mktemp("alice"))
    yield login
    gateway.hostctl("user", "remove", login.user)


@pytest.fixture(scope="module")
def mallory(
    gateway: Hostd, unix_users: UnixUsers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Login]:
    """A tenant who attacks through their own home."""
    login = _tenant(gateway, unix_users, tmp_path_factory.mktemp("mallory"))
    yield login
    gateway.hostctl("user", "remove", login.user)


def _home(user: str) -> Path:
    return Path(pwd.getpwnam(user).pw_dir)


@contextlib.contextmanager
def _replaced_ssh_dir(user: str) -> Iterator[Path]:
    """Set the user's ~/.ssh aside for the test; put it back afterwards, whatever is left."""
    ssh_dir = _home(user) / ".ssh"
    saved = ssh_dir.with_name(".ssh-saved")
    ssh_dir.rename(saved)
    try:
        yield ssh_dir
    finally:
        if ssh_dir.is_symlink() or ssh_dir.is_file():
            ssh_dir.unlink()
        elif ssh_dir.exists():
            shutil.rmtree(ssh_dir)
        saved.rename(ssh_dir)


def _fails(login: Login, source: str) -> subprocess.CompletedProcess[bytes]:
    res = login.ssh("true", extra=("-b", source))
    assert res.returncode == 255 and b"Permission denied" in res.stderr, res.stderr
    return res


def _ping(hostd: Hostd) -> float:
    """Seconds the admin socket takes to answer a ping (a frozen hostd fails the test)."""
    start = time.monotonic()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(hostd.admin_socket))
        s.sendall(json.dumps({"op": "ping", "args": {}}).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk, "hostd closed the admin connection"
            reply += chunk
    assert json.loads(reply)["ok"]
    return time.monotonic() - start


def _banner(hostd: Hostd) -> float:
    """Seconds until the gateway sends its SSH version line to a new connection."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", hostd.ssh_port), timeout=10) as s:
        assert s.recv(64).startswith(b"SSH-2.0-")
    return time.monotonic() - start


def _rss_peak_kib(hostd: Hostd) -> int:
    assert hostd.proc is not None
    status = Path(f"/proc/{hostd.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1])  # type: ignore[index]


def test_fifo_authorized_keys_does_not_freeze_hostd(
    gateway: Hostd, alice: Login, mallory: Login
) -> None:
    uid = pwd.getpwnam(mallory.user).pw_uid
    with _replaced_ssh_dir(mallory.user) as ssh_dir:
        ssh_dir.mkdir(mode=0o700)
        fifo = ssh_dir / "authorized_keys"
        os.mkfifo(fifo, 0o600)
        for path in (ssh_dir, fifo):
            os.chown(path, uid, uid)
        attackers = [
            subprocess.Popen(
                mallory.ssh_args("-b", "127.0.0.5") + ["true"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(4)
        ]
        try:
            for _ in range(3):  # while the FIFO logins are under way, and after
                assert _ping(gateway) < 1
                assert _banner(gateway) < 1
            res = alice.ssh("echo in")
            assert res.stdout == b"in\n", res.stderr
            for proc in attackers:
                _, err = proc.communicate(timeout=60)
                assert proc.returncode == 255 and b"Permission denied" in err, err
        finally:
            with contextlib.suppress(OSError):  # free a reader that opened it (a failed run)
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            for proc in attackers:
                proc.kill()
                proc.wait()
    assert f"ignoring {mallory.user}'s authorized_keys: " in gateway.log.read_text()


def test_huge_sparse_authorized_keys_is_refused_unread(gateway: Hostd, mallory: Login) -> None:
    line = mallory.key.with_suffix(".pub").read_bytes()
    uid = pwd.getpwnam(mallory.user).pw_uid
    before = _rss_peak_kib(gateway)
    with _replaced_ssh_dir(mallory.user) as ssh_dir:
        ssh_dir.mkdir(mode=0o700)
        keys = ssh_dir / "authorized_keys"
        with open(keys, "wb") as f:  # 4 GiB of holes, then a valid key for mallory
            f.seek((4 << 30) - len(line))
            f.write(line)
        keys.chmod(0o600)
        for path in (ssh_dir, keys):
            os.chown(path, uid, uid)
        start = time.monotonic()
        _fails(mallory, "127.0.0.6")
        assert time.monotonic() - start < 30  # refused by its size, not after reading 4 GiB
        assert _ping(gateway) < 1
    assert _rss_peak_kib(gateway) - before < 64 * 1024
    assert mallory.ssh("true").returncode == 0  # its own keys work again


def test_symlinked_ssh_dir_does_not_lend_another_users_keys(
    gateway: Hostd, mallory: Login, unix_users: UnixUsers, tmp_path: Path
) -> None:
    """Keys an admin put, root-owned, in bob's ~/.ssh must not open mallory's account when
    mallory points her ~/.ssh at bob's: sshd's StrictModes would trust that root-owned file."""
    bob = unix_users.make()
    bob_key = keypair(tmp_path / "bob")
    bob_ssh = _home(bob) / ".ssh"
    bob_ssh.mkdir(mode=0o755)
    (bob_ssh / "authorized_keys").write_bytes(bob_key.with_suffix(".pub").read_bytes())
    (bob_ssh / "authorized_keys").chmod(0o644)  # root-owned, as admins manage keys
    as_mallory = Login(mallory.user, bob_key, mallory.port, mallory.home)
    with _replaced_ssh_dir(mallory.user) as ssh_dir:
        ssh_dir.symlink_to(bob_ssh)
        _fails(as_mallory, "127.0.0.7")
        ssh_dir.unlink()  # the control: the same root-owned file in her own ~/.ssh works
        shutil.copytree(bob_ssh, ssh_dir)
        res = as_mallory.ssh("echo in")
        assert res.stdout == b"in\n", res.stderr


@pytest.mark.parametrize(
    ("lock", "unlock"),
    [
        (["usermod", "--expiredate", "1"], ["usermod", "--expiredate", ""]),
        (["usermod", "-L"], ["usermod", "-U"]),
        (["passwd", "-l"], ["passwd", "-u"]),
    ],
    ids=["expired", "usermod-L", "passwd-l"],
)
def test_expired_or_locked_accounts_cannot_log_in_by_key(
    gateway: Hostd, alice: Login, lock: list[str], unlock: list[str]
) -> None:
    # a password to lock: with none (useradd's "!"), -L and -l change nothing, see passwd(1)
    subprocess.run(["chpasswd"], input=f"{alice.user}:pw-{os.getpid()}\n", text=True, check=True)
    subprocess.run([*lock, alice.user], check=True, capture_output=True)
    try:
        _fails(alice, "127.0.0.8")
        # the other door (hostd-login behind OpenSSH, a user's `hostctl exec`) refuses too
        with pytest.raises(RuntimeFailure, match=f"{alice.user} may not log in: "):
            _exec_as(gateway, alice.user, ["true"])
    finally:
        subprocess.run([*unlock, alice.user], check=True, capture_output=True)
    assert alice.ssh("true").returncode == 0
    assert _exec_as(gateway, alice.user, ["true"]) == 0
    assert f"login refused for {alice.user} from 127.0.0.8: " in gateway.log.read_text()


def _exec_as(h: Hostd, user: str, argv: list[str]) -> int:
    """`argv` in the user's tenant through the user socket, connected as the user."""
    (sock,) = connect_as(user, h.user_socket)
    r, w = os.pipe()
    try:
        with sock:
            result = request(Channel(sock), "exec", {"argv": argv}, [r, w, w])
    finally:
        os.close(r)
        os.close(w)
    return int(result["exit"])


@pytest.mark.parametrize("shell", ["/usr/sbin/nologin", "/bin/false"])
def test_a_nologin_shell_is_refused_as_nologin_says(
    gateway: Hostd, alice: Login, shell: str
) -> None:
    nologin_txt = Path("/etc/nologin.txt")
    said = (
        nologin_txt.read_text().rstrip("\n")
        if nologin_txt.exists()
        else "This account is currently not available."
    )
    marker = _home(alice.user) / "ran"
    subprocess.run(["usermod", "-s", shell, alice.user], check=True)
    try:
        for extra in ((), ("-tt",)):
            res = alice.ssh(f"touch {marker}", extra=extra)
            assert res.returncode == 1 and said.encode() in res.stdout, res
        tunnel = alice.ssh(extra=("-W", "127.0.0.1:9"))  # forwarding is refused as well
        assert tunnel.returncode == 255 and b"stdio forwarding failed" in tunnel.stderr
    finally:
        subprocess.run(["usermod", "-s", "/bin/bash", alice.user], check=True)
    assert not marker.exists()
    assert alice.ssh("true").returncode == 0


def test_preauth_flood_from_one_source_does_not_keep_others_out(
    gateway: Hostd, alice: Login
) -> None:
    flood: list[socket.socket] = []
    try:
        for _ in range(100):  # idle TCP connections that never say a word
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", gateway.ssh_port))
            flood.append(s)
        waiting = _still_open(flood, until=lambda left: len(left) <= PER_SOURCE, timeout=10)
        assert len(waiting) == PER_SOURCE  # the others were closed at once
        res = alice.ssh("echo in")  # while those hold their places
        assert res.stdout == b"in\n", res.stderr
        # and the idle ones are closed after the login grace time
        assert not _still_open(waiting, until=lambda left: not left, timeout=LOGIN_GRACE + 30)
    finally:
        for s in flood:
            s.close()


def _still_open(
    socks: list[socket.socket], until: Callable[[list[socket.socket]], bool], timeout: float
) -> list[socket.socket]:
    """Those of `socks` the server has not closed, once `until` holds of them (within
    `timeout`), reading and dropping what the server sends."""
    left = list(socks)
    for s in socks:
        s.setblocking(False)

    def settled() -> bool:
        if until(left):
            return True
        for s in list(left):
            try:
                if not s.recv(4096):
                    left.remove(s)
            except BlockingIOError:
                pass
            except ConnectionError:
                left.remove(s)
        return until(left)

    wait_for(settled, timeout, lambda: f"the server to close connections ({len(left)} open)")
    return left


def test_every_wrong_password_counts(gateway: Hostd, alice: Login) -> None:
    tries = 0

    class Guesser(asyncssh.SSHClient):
        def password_auth_requested(self) -> str | None:
            nonlocal tries
            tries += 1
            return f"wrong-{tries}" if tries <= 20 else None

        def kbdint_auth_requested(self) -> str | None:
            return None

    async def guess() -> None:
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
            await asyncssh.connect(
                "127.0.0.1",
                gateway.ssh_port,
                username=alice.user,
                known_hosts=None,
                client_factory=Guesser,
                client_keys=None,
                agent_path=None,
                preferred_auth="password",
                local_addr=("127.0.0.3", 0),
            )

    asyncio.run(guess())
    assert tries == MAX_FAILURES  # one connection, cut off when the source hit its limit
    blocked = alice.ssh("true", extra=("-b", "127.0.0.3"))  # now even the right key
    assert blocked.returncode == 255 and b"Permission denied" not in blocked.stderr
    assert alice.ssh("true").returncode == 0  # other sources are not affected


def test_unknown_users_non_tenants_root_and_tenants_get_the_same_answers(
    gateway: Hostd, alice: Login, unix_users: UnixUsers, tmp_path: Path
) -> None:
    outsider = unix_users.make()  # a host user without a tenant, with a key that would fit
    authorize(outsider, alice.key.with_suffix(".pub").read_text())
    wrong = keypair(tmp_path / "wrong")
    transcripts = {}
    for user in ("nosuchuser", outsider, "root", alice.user):
        args = Login(user, wrong, alice.port, alice.home).ssh_args("-b", "127.0.0.4")
        args = ["LogLevel=DEBUG1" if a == "LogLevel=ERROR" else a for a in args]
        res = subprocess.run([*args, "true"], capture_output=True, timeout=120)
        assert res.returncode == 255
        text = res.stderr.decode(errors="replace").replace(user, "USER")
        transcripts[user] = [  # what the server said: methods, banners, messages
            line
            for line in text.splitlines()
            if not line.startswith("debug1: ") or "Authentications that can continue" in line
        ]
    assert transcripts["nosuchuser"] == transcripts[outsider], transcripts
    assert transcripts[outsider] == transcripts["root"] == transcripts[alice.user], transcripts
    methods = "debug1: Authentications that can continue: publickey,keyboard-interactive,password"
    assert methods in transcripts["root"], transcripts
    log = gateway.log.read_text()  # the real reasons, for the admin only
    assert f"login refused for {outsider} from 127.0.0.4: {outsider} has no container" in log
    assert "login refused for nosuchuser from 127.0.0.4: nosuchuser is not a user" in log
