"""One session path for both doors into a container: the SSH gateway, and the user socket
(hostd-login behind OpenSSH, `hostctl exec`).

Every session goes the same way: a slot under the tenant's cap (`[sessions] max_per_tenant`)
→ the account check (PAM's account stage, for logins) → the container running (started if
needed, saying so) → the account inside → the client's environment, filtered by one rule →
the program on pipes or a pty, its helpers on the host charged to the tenant's cgroup →
signals through pidfds, so a late signal never reaches a process that merely reuses a PID →
hang-up when the client leaves. Blocking steps run in the tenant's own small thread pool (the
gateway) or in the request's thread (the user socket): one tenant's slow sessions queue
behind each other, never in front of another tenant's login.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, Protocol

from hostd.config import SessionSettings
from hostd.errors import HostdError
from hostd.tenants import Account, Progress, Tenants
from runtime.containers import Runtime
from runtime.execs import ExecSpec
from runtime.ttyexec import TtyProcess, signal_pidfd

# Client environment a session may carry into the container (as sshd's AcceptEnv)
PASSED_ENV = ("LANG", "LC_", "TZ", "SSH_CONNECTION", "SSH_CLIENT")
MAX_ENV = 32  # variables kept from the client
MAX_ENV_VALUE = 4096  # characters of one value
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TERM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
DEFAULT_TERM = "xterm"
POOL_WORKERS = 2  # threads for one tenant's blocking session work (each tenant has its own)
# Signals a client may send (SSH names them without the SIG prefix)
SIGNALS = {
    name: signal.Signals[f"SIG{name}"]
    for name in ("INT", "TERM", "HUP", "KILL", "QUIT", "USR1", "USR2")
}


def no_refusal(user: str) -> str | None:
    """The account check until one is wired in: nobody is refused."""
    return None


def _quiet(_: str) -> None:
    pass


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _one_line(value: str) -> bool:
    return len(value) <= MAX_ENV_VALUE and not any(c in value for c in "\n\r\0")


def client_env(given: Mapping[Any, Any]) -> list[str]:
    """`NAME=value` for the client's variables a session keeps: names from PASSED_ENV, values
    of one line, at most MAX_ENV_VALUE long, MAX_ENV of them. One rule for both doors."""
    kept: list[str] = []
    for raw_name, raw_value in given.items():
        name, value = _text(raw_name), _text(raw_value)
        if name is None or value is None or not _ENV_NAME.fullmatch(name):
            continue
        if name.startswith(PASSED_ENV) and _one_line(value) and len(kept) < MAX_ENV:
            kept.append(f"{name}={value}")
    return kept


def terminal_env(term: object) -> str:
    """TERM for a pty session: the client's if it looks like a terminal name."""
    text = _text(term)
    return f"TERM={text if text and _TERM.fullmatch(text) else DEFAULT_TERM}"


class Program(Protocol):
    """A session's program as hostd holds it (its `runc exec`, or the pty helper)."""

    exit_fd: int  # a pidfd, readable once the program has ended

    def signal(self, sig: int) -> None: ...

    def hangup(self) -> None: ...

    def wait(self) -> int: ...

    def close(self) -> None: ...


class PipeProgram:
    """`runc exec` without a terminal, our child; runc passes the signals it gets on to the
    program. Its pidfd is opened before anything can reap it, and carries every signal."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.exit_fd = os.pidfd_open(popen.pid)  # unreaped: the PID is still this process's

    def stream(self, which: int) -> int:
        """Our end of pipe 0 (stdin), 1 or 2, or -1 where the client's own fd was passed."""
        f: IO[bytes] | None = (self._popen.stdin, self._popen.stdout, self._popen.stderr)[which]
        return f.fileno() if f is not None else -1

    def close_stdin(self) -> None:
        """The client's input ended: so does the program's."""
        if self._popen.stdin is not None:
            self._popen.stdin.close()

    def signal(self, sig: int) -> None:
        if self.exit_fd >= 0:
            signal_pidfd(self.exit_fd, sig)

    def hangup(self) -> None:
        self.signal(signal.SIGHUP)

    def wait(self) -> int:
        """The program's exit status (runc's own, 128 + N, if runc died of signal N)."""
        status = self._popen.wait()
        self.close()
        return status if status >= 0 else 128 - status

    def close(self) -> None:
        if self.exit_fd >= 0:
            os.close(self.exit_fd)
            self.exit_fd = -1
        for f in (self._popen.stdin, self._popen.stdout, self._popen.stderr):
            if f is not None:
                f.close()


@dataclass(frozen=True)
class Session:
    """A session ready to run its program: the container runs, the account inside is known."""

    user: str  # the tenant: its container's name
    account: Account

    @property
    def shell(self) -> str:
        shells = [e.split("=", 1)[1] for e in self.account.env if e.startswith("SHELL=")]
        return shells[0] if shells else "/bin/bash"

    def env(self, given: Mapping[Any, Any], term: object | None = None) -> list[str]:
        """The program's environment: the account's, the client's kept variables, and TERM
        when `term` is not None (a pty)."""
        tty = [terminal_env(term)] if term is not None else []
        return [*self.account.env, *client_env(given), *tty]


class Sessions:
    """Sessions of all tenants: their caps, their pools, and the steps every session takes."""

    def __init__(
        self,
        tenants: Tenants,
        runtime: Runtime,
        settings: SessionSettings,
        refusal: Callable[[str], str | None] = no_refusal,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tenants = tenants
        self.clock = clock  # when sessions begin and end, for auto-stop (hostd.idle)
        self.runtime = runtime  # the whole runtime: sessions exec and spawn, Tenants do not
        self.max_per_tenant = settings.max_per_tenant
        self.refusal = refusal  # the account check for logins (PAM's account stage)
        self._guard = threading.Lock()
        self._open: dict[str, int] = {}  # sessions per tenant
        self._last: dict[str, float] = {}  # when a session of each tenant began or ended
        self._holders: dict[str, int] = {}  # users of each tenant's pool
        self._pools: dict[str, ThreadPoolExecutor] = {}

    def count(self, user: str) -> int:
        with self._guard:
            return self._open.get(user, 0)

    def last_use(self, user: str) -> float | None:
        """When (`clock`) a session of `user` last began or ended, for auto-stop."""
        with self._guard:
            return self._last.get(user)

    @contextlib.contextmanager
    def pool(self, user: str) -> Iterator[ThreadPoolExecutor]:
        """The tenant's own threads for blocking work, kept while anyone holds them."""
        with self._guard:
            self._holders[user] = self._holders.get(user, 0) + 1
            if user not in self._pools:
                self._pools[user] = ThreadPoolExecutor(POOL_WORKERS, f"session-{user}")
            pool = self._pools[user]
        try:
            yield pool
        finally:
            with self._guard:
                self._holders[user] -= 1
                if not self._holders[user]:
                    del self._holders[user]
                    self._pools.pop(user).shutdown(wait=False)

    @contextlib.contextmanager
    def slot(self, user: str) -> Iterator[ThreadPoolExecutor]:
        """Room for one more session of `user`, held until it ends (with the tenant's pool);
        refused over the cap."""
        with self._guard:
            count = self._open.get(user, 0)
            if count >= self.max_per_tenant:
                raise HostdError(
                    f"{user} has {count} sessions open, the most allowed",
                    "end one, or ask an admin to raise [sessions] max_per_tenant",
                )
            self._open[user] = count + 1
            self._last[user] = self.clock()
        try:
            with self.pool(user) as pool:
                yield pool
        finally:
            with self._guard:
                self._last[user] = self.clock()
                self._open[user] -= 1
                if not self._open[user]:
                    del self._open[user]

    def prepare(self, user: str, account: str, login: bool, progress: Progress = _quiet) -> Session:
        """Blocking. For a login of `user`, the account check first; then the container running
        (started if needed, which `progress` hears of) and `account` inside."""
        if login:
            reason = self.refusal(user)
            if reason:
                raise HostdError(
                    f"{user} may not log in: {reason}", "ask an admin about your account"
                )
        self.running_pid(user, progress)
        return Session(user, self.tenants.account(user, account))

    def running_pid(self, user: str, progress: Progress = _quiet) -> int:
        """Blocking. Start the container if needed; the host PID of its init. One being
        stopped (for idleness, say) is started again once stopped: call it with a slot held,
        so auto-stop, which checks the slots after marking the stop, never stops it under us."""
        state = self.runtime.state(user)
        if state.status == "running" and user not in self.tenants.stopping:
            return state.pid
        self.tenants.start(user, progress)
        return self.runtime.state(user).pid

    def spawn_pipes(
        self,
        s: Session,
        argv: Sequence[str],
        env: Sequence[str],
        stdio: Sequence[int] | None = None,
    ) -> PipeProgram:
        """Start `argv` without a terminal: on new pipes, or on the client's own stdin, stdout
        and stderr (`stdio`). runc stays on the host meanwhile, charged to the tenant."""
        a = s.account
        ends = list(stdio) if stdio is not None else [subprocess.PIPE] * 3
        spec = ExecSpec(argv, user=a.ids, groups=a.groups, env=env, cwd=a.home)
        popen = self.runtime.spawn(s.user, spec, ends)
        return PipeProgram(popen)

    def spawn_tty(
        self, s: Session, argv: Sequence[str], env: Sequence[str], rows: int, cols: int
    ) -> TtyProcess:
        """Start `argv` on a pty inside; its helper stays on the host, charged to the tenant."""
        a = s.account
        spec = ExecSpec(argv, user=a.ids, groups=a.groups, env=env, cwd=a.home)
        return self.runtime.exec_tty(s.user, spec, rows=rows, cols=cols, charged=True)
