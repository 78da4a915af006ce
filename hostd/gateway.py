"""The SSH gateway: users `ssh -p 2222 alice@host` and land in their own container.

asyncssh runs in hostd's event loop. Authentication uses the user's ~/.ssh/authorized_keys on
the host (asyncssh enforces from=, command=, no-pty, restrict and the other options) and, when
enabled, passwords through PAM. Sessions run inside the container as the user's own account:
a shell or command on a pty of the container's devpts, an exec request on pipes (separate
stdout and stderr, exit status, signals), the sftp subsystem (the container's sftp-server, so
scp works too), and -L forwarding to addresses inside the container's network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import pwd
import signal
import stat
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.constants import EXTENDED_DATA_STDERR

from hostd.config import GatewaySettings
from hostd.service import PASSED_ENV
from hostd.tenants import Tenants
from runtime import netconnect
from runtime.errors import RuntimeFailure
from runtime.proc import child_env
from runtime.ttyexec import TtyProcess

log = logging.getLogger(__name__)

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
PAM_SERVICE = "hostd"
FAILURE_WINDOW = 60.0  # seconds over which failed logins per source are counted
SIGNALS = {name: getattr(signal, f"SIG{name}") for name in ("INT", "TERM", "HUP", "KILL", "QUIT",
                                                            "USR1", "USR2")}  # fmt: skip


class FailureLimiter:
    """Failed logins per source address in a sliding minute."""

    def __init__(self, limit: int, window: float = FAILURE_WINDOW) -> None:
        self.limit, self.window = limit, window
        self._failures: defaultdict[str, deque[float]] = defaultdict(deque)

    def _recent(self, source: str) -> deque[float]:
        times = self._failures[source]
        while times and times[0] < time.monotonic() - self.window:
            times.popleft()
        return times

    def blocked(self, source: str) -> bool:
        return len(self._recent(source)) >= self.limit

    def failed(self, source: str) -> None:
        self._recent(source).append(time.monotonic())


def read_authorized_keys(pw: pwd.struct_passwd) -> str | None:
    """The user's authorized_keys, if it is safe to trust (as sshd's StrictModes)."""
    path = Path(pw.pw_dir) / ".ssh" / "authorized_keys"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, pw.pw_uid) or st.st_mode & 0o022:
            log.warning("ignoring %s: must be a file owned by %s, not writable by others",
                        path, pw.pw_name)  # fmt: skip
            return None
        return f.read()


class _Session(asyncssh.SSHServerProcess[bytes]):
    """A session whose sftp subsystem also goes to hostd (which runs the container's own
    sftp-server) instead of asyncssh's built-in SFTP server."""

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"

    def session_started(self) -> None:
        # as asyncssh's SSHServerStreamSession.session_started, minus its SFTP/SCP branches
        chan, conn = self._chan, self._conn
        assert chan is not None and conn is not None and self._session_factory is not None
        stdin: asyncssh.SSHReader[bytes] = asyncssh.SSHReader(self, chan)
        stdout: asyncssh.SSHWriter[bytes] = asyncssh.SSHWriter(self, chan)
        stderr: asyncssh.SSHWriter[bytes] = asyncssh.SSHWriter(self, chan, EXTENDED_DATA_STDERR)
        handler = self._session_factory(stdin, stdout, stderr)
        if inspect.isawaitable(handler):
            conn.create_task(handler, stdin.logger)


class _Server(asyncssh.SSHServer):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.conn: asyncssh.SSHServerConnection | None = None
        self.source = "?"
        self.user = ""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.source = str((conn.get_extra_info("peername") or ("?",))[0])
        if self.gw.limiter.blocked(self.source):
            log.warning("refusing %s: too many failed logins", self.source)
            conn.close()

    def begin_auth(self, username: str) -> bool:
        assert self.conn is not None
        self.user = username
        reason = self.gw.refusal(username)
        if reason:
            log.warning("login refused for %s from %s: %s", username, self.source, reason)
            self.conn.send_auth_banner(f"hostd: {reason}\r\n")
            return True  # no key or password can succeed
        keys = read_authorized_keys(pwd.getpwnam(username))
        if keys:
            with contextlib.suppress(ValueError):
                self.conn.set_authorized_keys(asyncssh.import_authorized_keys(keys))
        return True

    def session_requested(self) -> _Session:
        return _Session(self.gw.session, None, 3, False)

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return self.gw.settings.password_auth

    async def validate_password(self, username: str, password: str) -> bool:
        if self.gw.refusal(username):
            return False
        import pam  # python-pam: only needed when passwords are on

        ok = await asyncio.to_thread(pam.authenticate, username, password, PAM_SERVICE)
        return bool(ok)

    def auth_completed(self) -> None:
        log.info("%s logged in from %s", self.user, self.source)

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.conn is not None
        if self.user and self.conn.get_extra_info("username") is None:  # tried and failed
            log.warning("failed login for %s from %s", self.user or "?", self.source)
            self.gw.limiter.failed(self.source)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Callable[[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]], Awaitable[None]]:
        """-L forwarding: connect from inside the user's container."""
        user = self.user

        async def forward(reader: asyncssh.SSHReader[bytes],
                          writer: asyncssh.SSHWriter[bytes]) -> None:  # fmt: skip
            try:
                pid = await self.gw.running_pid(user)
                sock = await asyncio.to_thread(netconnect.connect_in, pid, dest_host, dest_port)
            except RuntimeFailure as exc:
                log.info("forward for %s to %s:%s failed: %s", user, dest_host, dest_port, exc)
                writer.close()
                return
            inner_reader, inner_writer = await asyncio.open_connection(sock=sock)
            await asyncio.gather(_pump(reader, inner_writer), _pump(inner_reader, writer))

        return forward


async def _pump(src: Any, dst: Any, pass_eof: bool = True) -> None:
    """Copy until end of stream, then (unless told not to) pass the end on."""
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, asyncssh.Error):
        pass
    finally:
        if pass_eof:
            with contextlib.suppress(Exception):
                dst.write_eof()


class Gateway:
    def __init__(self, tenants: Tenants, settings: GatewaySettings, key_dir: Path) -> None:
        self.tenants = tenants
        self.runtime = tenants.runtime
        self.settings = settings
        self.key_path = key_dir / "ssh_host_ed25519_key"
        self.limiter = FailureLimiter(settings.max_failures)
        self._acceptor: asyncssh.SSHAcceptor | None = None

    def host_key(self) -> asyncssh.SSHKey:
        """The host key, made on first start and kept, so its fingerprint never changes."""
        if not self.key_path.exists():
            self.key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = asyncssh.generate_private_key("ssh-ed25519")
            tmp = self.key_path.with_suffix(".tmp")
            key.write_private_key(str(tmp))
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.key_path)
        return asyncssh.read_private_key(str(self.key_path))

    async def start(self) -> None:
        host, port = self.settings.listen
        self._acceptor = await asyncssh.create_server(
            lambda: _Server(self), host, port, server_host_keys=[self.host_key()],
            encoding=None, line_editor=False, keepalive_interval=30,
        )  # fmt: skip
        log.info("SSH gateway listening on %s:%s", host, port)

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()

    def refusal(self, user: str) -> str | None:
        """Why `user` may not log in here, or None."""
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return f"{user} is not a user of this host"
        if pw.pw_uid == 0:
            return "root cannot log in through hostd"
        try:
            self.tenants.get(user)
        except RuntimeFailure:
            return f"{user} has no container here: ask an admin to add you"
        return None

    async def running_pid(self, user: str) -> int:
        """Start the container if needed; the host PID of its init."""
        if self.runtime.state(user).status != "running":
            await asyncio.to_thread(self.tenants.start, user)
        return self.runtime.state(user).pid

    # -- sessions --------------------------------------------------------------------------

    async def session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        user = str(process.get_extra_info("username"))
        try:
            if self.runtime.state(user).status != "running":
                if process.get_terminal_type():
                    process.stderr.write(b"hostd: starting your container...\r\n")
                await self.running_pid(user)
            account = await asyncio.to_thread(self.tenants.account, user, user)
        except RuntimeFailure as exc:
            process.stderr.write(f"hostd: {exc}\r\n".encode())
            process.exit(255)
            return
        env = account.env + [f"{k}={v}" for k, v in process.env.items()
                             if str(k).startswith(PASSED_ENV)]  # fmt: skip
        shell = next((e.split("=", 1)[1] for e in account.env if e.startswith("SHELL=")),
                     "/bin/bash")  # fmt: skip
        if process.subsystem == "sftp":
            argv, tty = [SFTP_SERVER], False
        elif process.subsystem:
            process.stderr.write(f"hostd: no subsystem {process.subsystem}\r\n".encode())
            process.exit(1)
            return
        else:
            argv = [shell, "-c", process.command] if process.command else [shell, "-l"]
            tty = bool(process.get_terminal_type())
        try:
            if tty:
                status = await self._run_tty(process, user, argv, account, env)
            else:
                status = await self._run_pipes(process, user, argv, account, env)
        except ClientGone:
            log.info("%s's client left; its session's program was ended", user)
            return
        except RuntimeFailure as exc:
            process.stderr.write(f"hostd: {exc}\r\n".encode())
            status = 255
        if self.tenants.is_down(user):
            process.stderr.write(b"\r\nhostd: your container was stopped\r\n")
        process.exit(status)

    async def _run_pipes(self, process: asyncssh.SSHServerProcess[bytes], user: str,
                         argv: list[str], account: Any, env: list[str]) -> int:  # fmt: skip
        cmd = self.runtime.exec_argv(user, argv, user=account.ids, groups=account.groups,
                                     env=env, cwd=account.home)  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=child_env(),
        )  # fmt: skip
        assert proc.stdin and proc.stdout and proc.stderr
        stdin = proc.stdin

        async def feed() -> None:
            try:
                while True:
                    try:
                        data = await process.stdin.read(65536)
                    except asyncssh.SignalReceived as sig:
                        if sig.signal in SIGNALS:  # runc exec passes it to the program
                            proc.send_signal(SIGNALS[sig.signal])
                        continue
                    except (asyncssh.TerminalSizeChanged, asyncssh.BreakReceived):
                        continue
                    if not data:
                        break
                    stdin.write(data)
                    await stdin.drain()
            except (ConnectionError, asyncssh.Error):
                pass
            finally:
                with contextlib.suppress(Exception):
                    stdin.close()

        feeder = asyncio.create_task(feed())
        outputs = asyncio.gather(  # one channel: its end comes with process.exit()
            _pump(proc.stdout, process.stdout, pass_eof=False),
            _pump(proc.stderr, process.stderr, pass_eof=False),
        )
        try:
            await _unless_closed(process, outputs)
            return await proc.wait()
        finally:
            feeder.cancel()
            if proc.returncode is None:  # the client went away: end the program
                proc.terminate()
                await proc.wait()

    async def _run_tty(self, process: asyncssh.SSHServerProcess[bytes], user: str,
                       argv: list[str], account: Any, env: list[str]) -> int:  # fmt: skip
        cols, rows = process.get_terminal_size()[:2]
        term = process.get_terminal_type() or "xterm"
        tty: TtyProcess = await asyncio.to_thread(
            self.runtime.exec_tty, user, argv, user=account.ids, groups=account.groups,
            env=[*env, f"TERM={term}"], cwd=account.home, rows=rows or 24, cols=cols or 80,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        master = tty.master
        os.set_blocking(master, False)
        output: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO: every holder of the terminal closed it
                data = b""
            if not data:
                loop.remove_reader(master)
            output.put_nowait(data)

        loop.add_reader(master, readable)

        async def to_client() -> None:
            while data := await output.get():
                process.stdout.write(data)
                await process.stdout.drain()

        async def from_client() -> None:
            while True:
                try:
                    data = await process.stdin.read(65536)
                except asyncssh.TerminalSizeChanged as size:
                    tty.resize(size.height, size.width)
                    continue
                except asyncssh.SignalReceived as sig:
                    if sig.signal in SIGNALS:
                        os.kill(tty.pid, SIGNALS[sig.signal])
                    continue
                except asyncssh.BreakReceived:
                    continue
                if not data:
                    return
                os.write(master, data)

        reader = asyncio.create_task(from_client())
        try:
            with contextlib.suppress(ConnectionError, asyncssh.Error):
                await _unless_closed(process, to_client())
            return await asyncio.to_thread(tty.wait)
        finally:
            reader.cancel()
            loop.remove_reader(master)
            if tty.master >= 0:  # the client left first: hang up the session
                with contextlib.suppress(ProcessLookupError):
                    os.kill(tty.pid, signal.SIGHUP)
                await asyncio.to_thread(tty.wait)


class ClientGone(Exception):
    """The SSH channel closed while the session's program still ran."""


async def _unless_closed(process: asyncssh.SSHServerProcess[bytes], work: Awaitable[Any]) -> None:
    """Await `work`, or raise ClientGone if the client's channel closes first."""
    job = asyncio.ensure_future(work)
    closed = asyncio.ensure_future(process.wait_closed())
    try:
        done, _ = await asyncio.wait({job, closed}, return_when=asyncio.FIRST_COMPLETED)
        if job not in done:
            job.cancel()
            raise ClientGone
        job.result()
    finally:
        closed.cancel()
