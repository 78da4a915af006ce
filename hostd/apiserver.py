"""The server's side of hostd's sockets: reading requests on the event loop, connection caps
per socket and per UID, and the bounded pools of threads that serve requests.

A connection costs no thread until its request has arrived whole: reading is non-blocking, on
the event loop, bounded in time (by the caller), size and file descriptors. Requests are then
served by a pool of its socket; when the user socket's pool is busy the request is refused,
not queued, since the requests ahead of it may be sessions that last for hours (admins' requests
wait for admins' requests only).
"""

from __future__ import annotations

import array
import contextlib
import logging
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from hostd import aio
from hostd.api import close_fds
from hostd.protocol import ADMIN, MAX_FDS, TENANT, error_line, max_fds
from runtime.errors import Busy, RuntimeFailure

log = logging.getLogger(__name__)

_INT = array.array("i").itemsize
LOG_EVERY = 60.0  # seconds between two log lines about the same cap (a flood must not flood)


class Refused(RuntimeFailure):
    """A request the server will not read to its end (too long, too many fds)."""


@dataclass(frozen=True)
class Request:
    line: bytes  # the request, without its newline
    rest: bytes  # what the client sent after it
    fds: list[int]  # passed with it; whoever serves the request closes them


async def read_request(
    sock: socket.socket, max_size: int, max_fds: int = MAX_FDS
) -> Request | None:
    """The first request line on non-blocking `sock` and its fds; None if the client closed
    first. Raises Refused past `max_size` bytes or `max_fds` fds: the kernel discards fds that
    do not fit the control buffer, and those received are closed, so none stay in hostd."""
    buf = bytearray()
    fds: list[int] = []
    try:
        while True:
            await aio.ready(sock.fileno())
            try:
                data, got, truncated = _recv(sock, max_size + 1 - len(buf), max_fds - len(fds))
            except (BlockingIOError, InterruptedError):
                continue
            fds += got
            if truncated:
                raise Refused(
                    f"more than {max_fds} file descriptors sent with a request",
                    "send only those the operation takes",
                )
            if not data:
                close_fds(fds)
                return None
            buf += data
            end = buf.find(b"\n")
            if end >= 0:
                return Request(bytes(buf[:end]), bytes(buf[end + 1 :]), fds)
            if len(buf) > max_size:
                raise Refused(
                    f"request longer than {max_size // 1024} KiB ([api] max_request)",
                    "send a smaller request",
                )
    except BaseException:
        close_fds(fds)
        raise


def _recv(sock: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int], bool]:
    """Data, fds (close-on-exec) and whether more fds came than `max_fds` (the kernel dropped
    the rest). CMSG_LEN, not CMSG_SPACE: the padding of CMSG_SPACE would admit one fd more."""
    data, ancillary, flags, _ = sock.recvmsg(
        size, socket.CMSG_LEN(max_fds * _INT), socket.MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _INT])
    return data, list(fds), bool(flags & socket.MSG_CTRUNC)


def refuse(conn: socket.socket, error: RuntimeFailure) -> None:
    """Send the error (non-blocking: a fresh socket's buffer takes it) and close."""
    with contextlib.suppress(OSError):
        conn.send(error_line(error))
    conn.close()


class Workers:
    """At most `size` daemon threads, started as needed and reused. When all are busy,
    `try_submit` refuses the job, or queues it if `queue_when_busy` (for admins, who then wait
    only for admins). A user's job is never queued: those ahead may be hours-long sessions.
    Daemon threads: a session in progress does not hold up hostd's exit."""

    def __init__(
        self,
        size: int,
        name: str,
        queue_when_busy: bool = False,
        on_thread: Callable[[], None] | None = None,
    ) -> None:
        self.size = size
        self.name = name  # the [api] setting of its size
        self.queue_when_busy = queue_when_busy
        self.on_thread = on_thread  # run first in each new thread
        self._lock = threading.Lock()
        self._jobs_in = 0  # running or queued
        self._threads = 0
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    @property
    def threads(self) -> int:
        return self._threads

    def try_submit(
        self, job: Callable[[], None], on_queued: Callable[[int], None] = lambda _: None
    ) -> bool:
        """Run `job`, or queue it (`on_queued` hears its place in line first, before any
        worker can take it), or refuse it."""
        with self._lock:
            if self._jobs_in >= self.size and not self.queue_when_busy:
                return False
            self._jobs_in += 1
            if self._jobs_in > self.size:
                on_queued(self._jobs_in - self.size)
            spawn = self._threads < min(self._jobs_in, self.size)
            if spawn:
                self._threads += 1
        if spawn:
            threading.Thread(
                target=self._work, name=f"{self.name}-{self._threads}", daemon=True
            ).start()
        self._jobs.put(job)
        return True

    def _work(self) -> None:
        if self.on_thread is not None:
            self.on_thread()
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:  # jobs answer their clients themselves; this is a bug
                log.exception("a %s worker's job failed", self.name)
            finally:
                with self._lock:
                    self._jobs_in -= 1


@dataclass
class Door:
    """One listening socket: its caps, its pool, and its open connections (counted on the
    event loop only, so without a lock)."""

    name: str  # "user" or "admin"
    admin: bool
    max_connections: int
    max_per_uid: int | None  # None: no per-UID cap
    pool: Workers
    open: int = 0
    per_uid: Counter[int] = field(default_factory=Counter)
    _logged: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    @property
    def max_fds(self) -> int:
        """File descriptors a request may bring: what this door's ops take at most."""
        return max_fds(ADMIN if self.admin else TENANT)

    def refusal(self, uid: int) -> Busy | None:
        """Why a new connection of `uid` is over a cap, or None."""
        if self.max_per_uid is not None and self.per_uid[uid] >= self.max_per_uid:
            return self._over(
                "max_connections_per_user",
                Busy(
                    f"uid {uid} has {self.per_uid[uid]} connections to hostd's {self.name}"
                    " socket ([api] max_connections_per_user)",
                    "close some sessions, or ask an admin to raise the limit",
                ),
            )
        if self.open >= self.max_connections:
            return self._over(
                "max_connections",
                Busy(
                    f"hostd's {self.name} socket has {self.open} connections"
                    " ([api] max_connections)",
                    "try again later, or ask an admin to raise it",
                ),
            )
        return None

    def busy(self) -> Busy:
        """The refusal of a request that found every worker busy."""
        return self._over(
            "workers",
            Busy(
                f"hostd is serving {self.pool.size} requests on its {self.name} socket at once"
                f" ([api] {self.pool.name})",
                "try again later, or ask an admin to raise it",
            ),
        )

    def _over(self, cap: str, error: Busy) -> Busy:
        now = time.monotonic()
        if now - self._logged.get(cap, -LOG_EVERY) >= LOG_EVERY:
            self._logged[cap] = now
            log.warning("refused a connection: %s (said at most once a minute)", error)
        return error

    def enter(self, uid: int) -> None:
        self.open += 1
        self.per_uid[uid] += 1

    def leave(self, uid: int) -> None:
        self.open -= 1
        self.per_uid[uid] -= 1
        if not self.per_uid[uid]:
            del self.per_uid[uid]
