"""Auto-stop of idle tenants: `[sessions] auto_stop` (off by default) or an admin's per-tenant
setting (`hostctl user set USER --auto-stop 3d|off|default`).

A tenant is idle when hostd saw no session of it (gateway login or forward, hostd-login,
`hostctl exec`: all hold a `Sessions.slot`) for the period AND nothing of the user's runs
inside: no process of an account (inner uid 1000-65533: the user's tmux or nohup work) and no
dockerd (it stops by itself once no container runs). The clock starts at the latest of: the
last session, the last time something of the user's was seen, the container's start, and
hostd's own start (a restarted hostd forgets when sessions ended: it waits a whole period
again rather than stop early).

A stopped tenant is recorded as dormant (desired `stopped`, so neither reconcile nor a
restarted hostd starts it again) and is started by its next session, as any stopped tenant is.
The check runs on a thread of its own, woken every few seconds to once a minute; it forks
nothing: one pass over /proc (a stat per process, the name read only of processes of root
inside) for all tenants at once, and only when some running tenant has auto-stop on.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from hostd.config import format_duration
from hostd.sessions import Sessions
from hostd.tenants import Tenants
from runtime.errors import RuntimeFailure
from runtime.ids import RANGE_SIZE

log = logging.getLogger(__name__)

USER_IDS = range(1000, 65534)  # inner uids of people's accounts (65534: nobody, a daemon's)
MAX_PERIOD = 60.0  # seconds between checks at most (and while auto-stop is off everywhere)
MIN_PERIOD = 0.5
CHECKS_PER_PERIOD = 6  # checks within the shortest auto-stop setting

Scan = Callable[[Iterable[int]], set[int]]


def busy_ranges(starts: Iterable[int], proc: Path = Path("/proc")) -> set[int]:
    """The range starts among `starts` whose container runs something of a user's: a process
    of an account (inner uid in USER_IDS) or dockerd (run by root inside)."""
    ordered = sorted(starts)
    busy: set[int] = set()
    try:
        entries = list(os.scandir(proc))
    except OSError:
        return busy
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            uid = entry.stat(follow_symlinks=False).st_uid  # the process's effective uid
        except OSError:  # it ended meanwhile
            continue
        i = bisect.bisect_right(ordered, uid) - 1
        if i < 0 or ordered[i] in busy or uid - ordered[i] >= RANGE_SIZE:
            continue
        inner = uid - ordered[i]
        if inner in USER_IDS or (inner == 0 and _name(entry.path) == "dockerd"):
            busy.add(ordered[i])
    return busy


def _name(path: str) -> str:
    """The process's command name (at most 16 bytes, set by the kernel or the process)."""
    try:
        with open(f"{path}/comm", "rb") as f:
            return f.read(64).decode(errors="replace").strip()
    except OSError:
        return ""


def idle_since(*times: float | None) -> float:
    """Since when a tenant is idle: the latest of the times it was in use (or started)."""
    return max(t for t in times if t is not None)


def is_due(after: int, since: float, now: float) -> bool:
    """Stop it: auto-stop is on for it (`after` > 0) and it was idle that long."""
    return after > 0 and now - since >= after


def period(settings: Iterable[int]) -> float:
    """Seconds between checks: well under the shortest setting that is on."""
    on = [s for s in settings if s > 0]
    if not on:
        return MAX_PERIOD
    return max(MIN_PERIOD, min(MAX_PERIOD, min(on) / CHECKS_PER_PERIOD))


class AutoStopper:
    """The periodic check, on the sessions' clock (monotonic); `scan` finds busy ranges."""

    def __init__(self, tenants: Tenants, sessions: Sessions, scan: Scan = busy_ranges) -> None:
        self.tenants = tenants
        self.sessions = sessions
        self.clock = sessions.clock
        self.scan = scan
        self.default = tenants.config.sessions.auto_stop
        self._born = self.clock()
        self._seen: dict[str, float] = {}  # user -> when something of theirs last ran
        self._wake = threading.Event()

    def wake(self) -> None:
        """Check again now: a setting may have changed."""
        self._wake.set()

    def run(self) -> None:
        """Check forever (on a daemon thread): a failed check is logged, the next one runs."""
        while True:
            self._wake.wait(period([self.default, *self.tenants.state.auto_stops().values()]))
            self._wake.clear()
            try:
                for line in self.check():
                    log.info("auto-stop: %s", line)
            except Exception:
                log.exception("auto-stop check failed")

    def check(self) -> list[str]:
        """Stop every tenant idle for its auto-stop time; what was done, one line each."""
        now = self.clock()
        own = self.tenants.state.auto_stops()
        candidates: list[tuple[str, int, int]] = []  # user, after, range start
        for t in self.tenants.state.tenants():
            after = own.get(t.user, self.default)
            if t.phase != "ready" or t.desired != "running" or after <= 0:
                continue
            try:
                st = self.tenants.runtime.state(t.user)
            except RuntimeFailure:  # removed meanwhile
                continue
            if st.status == "running":
                candidates.append((t.user, after, t.range_start))
        busy = self.scan(c[2] for c in candidates) if candidates else set()
        done = []
        for user, after, start in candidates:
            if start in busy:
                self._seen[user] = now
            since = self._since(user, now)
            if is_due(after, since, now) and self._stop(user, since):
                self._seen.pop(user, None)
                done.append(f"stopped {user}, idle for {format_duration(after)}")
        return done

    def _stop(self, user: str, since: float) -> bool:
        """Stop one tenant; a failure is logged and tried again at the next check, and does not
        keep the others running."""
        try:
            return self.tenants.auto_stop(user, functools.partial(self._still_idle, user, since))
        except RuntimeFailure as exc:
            log.warning("auto-stop: cannot stop %s: %s", user, exc)
            return False

    def _since(self, user: str, now: float) -> float:
        up = self.tenants.runtime.uptime(user)
        started = None if up is None else now - up
        return idle_since(self._born, started, self._seen.get(user), self.sessions.last_use(user))

    def _still_idle(self, user: str, since: float) -> str | None:
        """Asked under the tenant's lock, new sessions held off: idle since when (a UTC time),
        or None if a session came after `since`, the start of the idle time found."""
        last = self.sessions.last_use(user)
        if self.sessions.count(user) or (last is not None and last > since):
            return None
        now = self.clock()
        wall = datetime.fromtimestamp(time.time() - (now - since), UTC)
        return wall.isoformat(timespec="seconds")
