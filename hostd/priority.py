"""hostd's own CPU priority. Its answers run a little ahead of the tenants' programs on a loaded
host (during a start storm of a hundred tenants on two cores, `status` must still answer within
half a second); backups of stopped tenants run behind them."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

NICE = -5  # a weight of 3121 against a nice-0 task's 1024
AUTOGROUP = "/proc/self/autogroup"


def favour_this_thread() -> None:
    """Nice NICE for the calling thread only, with SCHED_RESET_ON_FORK first, so whatever it
    starts (a thread, runc, a tenant's init or shell) starts at nice 0: nobody's program
    inherits hostd's priority. Best effort: without CAP_SYS_NICE nothing changes."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, NICE)  # 0: this thread (Linux nice is per thread)
    except PermissionError as exc:
        log.debug("hostd's own priority left as it is: %s", exc)


def favour_this_session() -> None:
    """Where the kernel schedules each session as one group (autogroup: processes outside any
    CPU cgroup, as on a host without systemd), a thread's nice counts only within its
    session; hostd's session as a whole then gets weight NICE against the others' (an
    admin's login, a start storm's clients). Only for a session of hostd's own (systemd's, or
    `setsid hostd`), never its caller's shell. Best effort, as above."""
    if os.getsid(0) != os.getpid():
        return
    try:
        with open(AUTOGROUP, "w") as f:
            f.write(str(NICE))
    except OSError as exc:  # no autogroup in this kernel, or no CAP_SYS_NICE
        log.debug("hostd's session's priority left as it is: %s", exc)


@contextlib.contextmanager
def idle() -> Iterator[None]:
    """Run the calling thread (and what it starts: zstd, tar) at SCHED_IDLE, which is also
    the idle I/O class where the I/O scheduler has one. That counts only among hostd's own
    tasks: against the tenants, a stopped tenant's backup compresses (and tars the home) in
    the runtime's background cgroup. Restored after, as the thread serves other requests."""
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, *before)
