"""The SSH gateway: users `ssh -p 2222 alice@host` and land in their own container.

asyncssh runs in hostd's event loop. Authentication uses the user's ~/.ssh/authorized_keys on
the host, read as the user by a child process (hostd.accounts; asyncssh enforces from=,
command=, no-pty, restrict and the other options) and, when enabled, passwords through PAM;
then the PAM account stage (locked or expired accounts stay out) and the login shell (nologin).
Before authentication nothing tells who exists, no blocking work runs on the event loop, and
connections, attempts and time are capped per source and in all.

Sessions run inside the container as the user's own account: a shell or command on a pty of
the container's devpts, an exec request on pipes (separate stdout and stderr, exit status,
signals), the sftp subsystem (the container's sftp-server, so scp works too), and -L
forwarding to addresses inside the container's network namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import pwd
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
from asyncssh.constants import EXTENDED_DATA_STDERR

from hostd import accounts, aio
from hostd.config import GatewaySettings
from hostd.sessions import SIGNALS, PipeProgram, Program, Sessions
from hostd.tenants import Tenants
from runtime import netconnect
from runtime.errors import RuntimeFailure
from runtime.ttyexec import TtyProcess

log = logging.getLogger(__name__)
T = TypeVar("T")

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
FAILURE_WINDOW = 60.0  # seconds over which failed attempts per source are counted
AUTH_WORKERS = 8  # threads for authentication work (one per source at a time)
WRONG = "\b\n\r\177INCORRECT"  # PAM's password for refused names: no password is this (sshd's)


class FailureLimiter:
    """Failed attempts per source address in a sliding minute."""

    def __init__(self, limit: int, window: float = FAILURE_WINDOW) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, source: str) -> deque[float]:
        times = self._failures.get(source, deque())
        while times and times[0] < time.monotonic() - self.window:
            times.popleft()
        if not times:  # forget quiet sources: the table stays as small as the attack
            self._failures.pop(source, None)
        return times

    def blocked(self, source: str) -> bool:
        return len(self._recent(source)) >= self.limit

    def failed(self, source: str) -> None:
        times = self._recent(source)
        times.append(time.monotonic())
        self._failures[source] = times


class PreauthSlots:
    """Connections that have not logged in yet, capped in all and per source address, so a
    flood from one source cannot take the places of others (sshd's MaxStartups, per source)."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total, self.per_source = total, per_source
        self._used: Counter[str] = Counter()

    def take(self, source: str) -> str | None:
        """Take a place for `source`, or say why there is none."""
        if self._used[source] >= self.per_source:
            return f"{self.per_source} connections from it are already logging in"
        if self._used.total() >= self.total:
            return f"{self.total} connections are already logging in"
        self._used[source] += 1
        return None

    def give_back(self, source: str) -> None:
        self._used[source] -= 1
        if self._used[source] <= 0:
            del self._used[source]


class SourceQueue:
    """Blocking authentication work (NSS, PAM, the key reader) in a bounded pool, one job at a
    time per source address: a source that floods waits for itself, never for others' turns.
    A turn ends when the work ends, even if the client gave up waiting for it."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="hostd-auth")
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def run(self, source: str, work: Callable[[], T]) -> T:
        lock, users = self._locks.get(source) or (asyncio.Lock(), 0)
        self._locks[source] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave(source)
            raise
        loop = asyncio.get_running_loop()
        job = self._pool.submit(work)
        job.add_done_callback(lambda _: self._done(loop, source))
        return await asyncio.wrap_future(job)

    def _done(self, loop: asyncio.AbstractEventLoop, source: str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: hostd is stopping
            loop.call_soon_threadsafe(self._release, source)

    def _release(self, source: str) -> None:
        self._locks[source][0].release()
        self._leave(source)

    def _leave(self, source: str) -> None:
        lock, users = self._locks[source]
        if users == 1:
            del self._locks[source]
        else:
            self._locks[source] = (lock, users - 1)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Admission:
    """What hostd found out about a login name before any credential is checked."""

    keys: asyncssh.SSHAuthorizedKeys | None  # those its authorized_keys allows
    refusal: str | None  # why no credential can succeed (logged, never told the client)
    unavailable: str | None  # what a session says instead of running (nologin shell)


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
    """One client connection: every name gets the same treatment before authentication (the
    same methods, no banner, the same work in a worker), the real reason is logged only."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.conn: asyncssh.SSHServerConnection | None = None
        self.source = "?"
        self.user = ""
        self.admission: Admission | None = None
        self.pending = False  # holds a pre-auth slot
        self.tries = 0  # names and credentials tried on this connection
        self.failures = 0  # failed passwords, each counted against the source

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.source = str((conn.get_extra_info("peername") or ("?",))[0])
        if self.gw.limiter.blocked(self.source):
            reason: str | None = "too many failed logins"
        else:
            reason = self.gw.preauth.take(self.source)
        if reason:
            log.warning("refusing a connection from %s: %s", self.source, reason)
            conn.abort()
            return
        self.pending = True

    def _leave_preauth(self) -> None:
        if self.pending:
            self.pending = False
            self.gw.preauth.give_back(self.source)

    def _tried(self) -> None:
        """Count an attempt; after too many the connection is closed, as sshd's MaxAuthTries."""
        assert self.conn is not None
        self.tries += 1
        if self.tries >= self.gw.settings.max_auth_tries or self.gw.limiter.blocked(self.source):
            log.warning(
                "disconnecting %s (last name tried: %s): too many attempts", self.source, self.user
            )
            self.conn.disconnect(
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "Too many authentication failures"
            )

    async def begin_auth(self, username: str) -> bool:
        assert self.conn is not None
        if self.user:  # another name on the same connection: one more attempt
            self._tried()
        self.user, self.admission = username, None
        self.conn.set_authorized_keys(None)
        admission = await self.gw.admit(username, self.source)
        if self.user != username:  # pragma: no cover - asyncssh waits for begin_auth
            return True
        self.admission = admission
        if admission.refusal:
            log.warning(
                "login refused for %s from %s: %s", username, self.source, admission.refusal
            )
        elif admission.keys is not None:
            self.conn.set_authorized_keys(admission.keys)
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Called for keys that are not in the user's authorized_keys: a failed attempt."""
        self._tried()
        return False

    def password_auth_supported(self) -> bool:
        return self.gw.settings.password_auth

    async def validate_password(self, username: str, password: str) -> bool:
        admission = self.admission
        refused = admission is None or admission.refusal is not None
        ok = False
        if not self.gw.limiter.blocked(self.source):
            # refused names go through PAM too, with a password that cannot match: the same
            # work, the same failure delay, and no way to learn root's password by timing
            ok = (
                await self.gw.check_password(username, WRONG if refused else password, self.source)
                and not refused
            )
        if not ok:
            log.warning("wrong password for %s from %s", username, self.source)
            self.failures += 1
            self.gw.limiter.failed(self.source)
            self._tried()
        return ok

    def auth_completed(self) -> None:
        self._leave_preauth()
        log.info("%s logged in from %s", self.user, self.source)

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.conn is not None
        logged_in = self.conn.get_extra_info("username") is not None
        self._leave_preauth()
        if self.user and not logged_in and not self.failures:  # tried and failed
            log.warning("failed login for %s from %s", self.user, self.source)
            self.gw.limiter.failed(self.source)

    def session_requested(self) -> _Session:
        unavailable = self.admission.unavailable if self.admission else None
        if unavailable is not None:
            return _Session(_say_unavailable(unavailable), None, 3, False)
        return _Session(self.gw.session, None, 3, False)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Callable[[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]], Awaitable[None]]:
        """-L forwarding: connect from inside the user's container."""
        user = self.user
        if self.admission is None or self.admission.unavailable is not None:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "This account is not available"
            )

        async def forward(
            reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]
        ) -> None:
            """A forward counts as a session of the tenant (the same cap), and its blocking
            work runs in the tenant's own pool."""
            loop = asyncio.get_running_loop()
            try:
                with self.gw.sessions.slot(user) as pool:
                    pid = await self.gw.running_pid(user)
                    sock = await loop.run_in_executor(
                        pool, netconnect.connect_in, pid, dest_host, dest_port
                    )
                    inner_reader, inner_writer = await asyncio.open_connection(sock=sock)
                    await asyncio.gather(_pump(reader, inner_writer), _pump(inner_reader, writer))
            except RuntimeFailure as exc:
                log.info("forward for %s to %s:%s failed: %s", user, dest_host, dest_port, exc)
                writer.close()

        return forward


def _say_unavailable(
    message: str,
) -> Callable[[asyncssh.SSHServerProcess[bytes]], Awaitable[None]]:
    """A session that does what the user's login shell (nologin) would: say so, exit 1."""

    async def session(process: asyncssh.SSHServerProcess[bytes]) -> None:
        end = "\r\n" if process.get_terminal_type() else "\n"
        process.stdout.write(f"{message}{end}".encode())
        process.exit(1)

    return session


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
    def __init__(
        self, tenants: Tenants, settings: GatewaySettings, key_dir: Path, sessions: Sessions
    ) -> None:
        self.tenants = tenants
        self.sessions = sessions
        self.settings = settings
        self.key_path = key_dir / "ssh_host_ed25519_key"
        self.limiter = FailureLimiter(settings.max_failures)
        self.preauth = PreauthSlots(
            settings.max_unauthenticated, settings.max_unauthenticated_per_source
        )
        self.auth_work = SourceQueue(AUTH_WORKERS)
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
            lambda: _Server(self),
            host,
            port,
            server_host_keys=[self.host_key()],
            encoding=None,
            line_editor=False,
            keepalive_interval=30,
            login_timeout=self.settings.login_grace,
        )
        log.info("SSH gateway listening on %s:%s", host, port)

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
        self.auth_work.close()

    def refusal(self, user: str) -> str | None:
        """Why `user` may not log in here at all, or None. Blocks (NSS, the state)."""
        try:
            pw = pwd.getpwnam(user)
        except (KeyError, ValueError):
            return f"{user} is not a user of this host"
        if pw.pw_uid == 0:
            return "root cannot log in through hostd"
        try:
            self.tenants.get(user)
        except RuntimeFailure:
            return f"{user} has no container here: ask an admin to add you"
        return None

    async def admit(self, user: str, source: str) -> Admission:
        """What `user` may log in with, found out in a worker (one at a time per source)."""
        return await self.auth_work.run(source, lambda: self._admission(user, source))

    def _admission(self, user: str, source: str) -> Admission:
        """The same work for every name: PAM's account stage and a key reader, as the user or,
        for names that are refused anyway, as nobody on a home that does not exist."""
        account = accounts.login_refusal(user, source)  # locked, expired, pam_access...
        refusal = self.refusal(user) or account
        pw = accounts.decoy() if refusal is not None else pwd.getpwnam(user)
        text = accounts.authorized_keys(pw)
        if refusal is not None:
            return Admission(None, refusal, None)
        keys = None
        if text:
            try:
                keys = asyncssh.import_authorized_keys(text)
            except ValueError as exc:
                log.warning("ignoring %s's authorized_keys: %s", user, exc)
        return Admission(keys, None, accounts.shell_refusal(pw))

    async def check_password(self, user: str, password: str, source: str) -> bool:
        """PAM's auth and account stages for service hostd, in a worker."""
        import pam  # python-pam: only needed when passwords are on

        return bool(
            await self.auth_work.run(
                source, lambda: pam.authenticate(user, password, accounts.PAM_SERVICE)
            )
        )

    async def running_pid(self, user: str) -> int:
        """Start the container if needed; the host PID of its init. Blocking work runs in the
        tenant's own pool."""
        loop = asyncio.get_running_loop()
        with self.sessions.pool(user) as pool:
            return await loop.run_in_executor(pool, self.sessions.running_pid, user)

    # -- sessions --------------------------------------------------------------------------

    async def session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        user = str(process.get_extra_info("username"))
        try:
            with self.sessions.slot(user) as pool:
                status = await self._session(process, user, pool)
        except ClientGone:
            log.info("%s's client left; its session's program was hung up", user)
            return
        except RuntimeFailure as exc:  # HostdError included: the cap, the account, the start
            process.stderr.write(f"hostd: {exc}\r\n".encode())
            status = 255
        process.exit(status)

    async def _session(
        self, process: asyncssh.SSHServerProcess[bytes], user: str, pool: Executor
    ) -> int:
        loop = asyncio.get_running_loop()
        term = process.get_terminal_type()

        def progress(message: str) -> None:  # from the pool's thread
            if term:
                loop.call_soon_threadsafe(process.stderr.write, f"hostd: {message}\r\n".encode())

        session = await loop.run_in_executor(
            pool, self.sessions.prepare, user, user, True, progress
        )
        if process.subsystem == "sftp":
            argv, term = [SFTP_SERVER], None
        elif process.subsystem:
            process.stderr.write(f"hostd: no subsystem {process.subsystem}\r\n".encode())
            return 1
        elif process.command:
            argv = [session.shell, "-c", process.command]
        else:
            argv = [session.shell, "-l"]
        env = session.env(process.env, term)
        if term:
            cols, rows = process.get_terminal_size()[:2]
            tty = await loop.run_in_executor(
                pool, self.sessions.spawn_tty, session, argv, env, rows or 24, cols or 80
            )
            status = await _supervise(process, tty, _tty_pumps(process, tty))
        else:
            pipes = await loop.run_in_executor(pool, self.sessions.spawn_pipes, session, argv, env)
            status = await _supervise(process, pipes, _pipe_pumps(process, pipes))
        if await loop.run_in_executor(pool, self.tenants.is_down, user):
            process.stderr.write(b"\r\nhostd: your container was stopped\r\n")
        return status


class ClientGone(Exception):
    """The SSH channel closed while the session's program still ran."""


async def _supervise(
    process: asyncssh.SSHServerProcess[bytes],
    program: Program,
    pumps: tuple[Awaitable[Any], Awaitable[Any]],
) -> int:
    """Copy between the client and the program until the program's output ends and it exits;
    if the client leaves first, hang the program up (raising ClientGone once it ended)."""
    exited = asyncio.ensure_future(aio.ready(program.exit_fd))
    to_program, from_program = (asyncio.ensure_future(p) for p in pumps)
    gone = False
    try:
        try:
            await _unless_closed(process, from_program)
            await _unless_closed(process, asyncio.shield(exited))
        except ClientGone:
            gone = True
            program.hangup()
            await exited
    except BaseException:  # cancelled: hostd is stopping
        program.hangup()
        exited.cancel()
        program.close()
        raise
    finally:
        _cancel(to_program)
        _cancel(from_program)
    status = program.wait()  # it has ended: this does not block
    if gone:
        raise ClientGone
    return status


def _pipe_pumps(
    process: asyncssh.SSHServerProcess[bytes], program: PipeProgram
) -> tuple[Awaitable[Any], Awaitable[Any]]:
    """Client to the program's stdin; its stdout and stderr to the client (one channel: its
    end comes with process.exit())."""
    ends = [program.stream(i) for i in range(3)]
    for fd in ends:
        os.set_blocking(fd, False)
    out = asyncio.gather(_fd_to(ends[1], process.stdout), _fd_to(ends[2], process.stderr))
    return _from_client(process, program, ends[0], None, program.close_stdin), out


def _tty_pumps(
    process: asyncssh.SSHServerProcess[bytes], program: TtyProcess
) -> tuple[Awaitable[Any], Awaitable[Any]]:
    os.set_blocking(program.master, False)
    return (
        _from_client(process, program, program.master, program.resize, None),
        _fd_to(program.master, process.stdout),
    )


async def _from_client(
    process: asyncssh.SSHServerProcess[bytes],
    program: Program,
    fd: int,
    resize: Callable[[int, int], None] | None,
    at_end: Callable[[], None] | None,
) -> None:
    """The client's input to `fd`, its signal requests to the program (by pidfd), its window
    size to the pty; `at_end` of its input (a pipe is closed, a pty stays)."""
    try:
        while True:
            try:
                data = await process.stdin.read(65536)
            except asyncssh.SignalReceived as sig:
                if sig.signal in SIGNALS:
                    program.signal(SIGNALS[sig.signal])
                continue
            except asyncssh.TerminalSizeChanged as size:
                if resize is not None:
                    resize(size.height, size.width)
                continue
            except asyncssh.BreakReceived:
                continue
            if not data:
                break
            await _write_all(fd, data)
    except (ConnectionError, asyncssh.Error, OSError):
        pass
    finally:
        if at_end is not None:
            at_end()


async def _fd_to(fd: int, dst: asyncssh.SSHWriter[bytes]) -> None:
    """Copy from a non-blocking fd to the client until end of file (EIO: the pty's last
    holder inside closed it)."""
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                await aio.ready(fd)
                continue
            except OSError:
                return
            if not data:
                return
            dst.write(data)
            await dst.drain()
    except (ConnectionError, asyncssh.Error):
        pass


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await aio.ready(fd, write=True)


async def _unless_closed(process: asyncssh.SSHServerProcess[bytes], work: Awaitable[Any]) -> None:
    """Await `work`, or raise ClientGone if the client's channel closes first."""
    job = asyncio.ensure_future(work)
    closed = asyncio.ensure_future(process.wait_closed())
    try:
        done, _ = await asyncio.wait({job, closed}, return_when=asyncio.FIRST_COMPLETED)
        if job not in done:
            _cancel(job)
            raise ClientGone
        job.result()
    finally:
        closed.cancel()


def _cancel(job: asyncio.Future[Any]) -> None:
    """Cancel `job` and take whatever it ends with (a gather ends with CancelledError as its
    exception, which asyncio would log as never retrieved)."""
    job.cancel()
    job.add_done_callback(lambda f: f.cancelled() or f.exception())
