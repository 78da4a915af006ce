"""`hostctl status` answers while every admin worker is busy (a start storm holds them all):
admins' reads are served by a pool of their own, not queued behind the slow requests."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hostd import config as config_mod
from hostd.client import call
from tests.hostd_harness import Hostd, UnixUsers, wait_for

BUSY_SECONDS = 120  # how long each request holding a worker would last


def sleepers(arg: str) -> list[int]:
    """PIDs of `sleep <arg>` processes on the host (the tenant's, seen from outside)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if (
                entry.name.isdigit()
                and (entry / "cmdline").read_bytes() == f"sleep\0{arg}\0".encode()
            ):
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def busy_admin_workers(hostd: Hostd, user: str, count: int) -> Iterator[None]:
    """`count` admin requests in progress (each an exec of a long sleep in `user`'s
    container), ended by killing those sleeps afterwards, on failure too."""
    arg = f"{BUSY_SECONDS}.{os.getpid()}"
    stdio = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
    pool = ThreadPoolExecutor(max_workers=count)
    try:
        args = {"user": user, "argv": ["sleep", arg]}
        for _ in range(count):
            pool.submit(call, hostd.admin_socket, "exec", args, stdio)
        wait_for(lambda: len(sleepers(arg)) == count, 60, f"{count} sleeps holding workers")
        yield
    finally:
        for pid in sleepers(arg):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pool.shutdown(wait=True)
        for fd in stdio:
            os.close(fd)


def test_status_answers_while_every_admin_worker_is_busy(
    hostd: Hostd, unix_users: UnixUsers
) -> None:
    user = unix_users.make()
    hostd.hostctl("user", "add", user)
    try:
        hostd.hostctl("start", user)
        workers = config_mod.load(hostd.config).api.admin_workers
        with busy_admin_workers(hostd, user, workers):
            t0 = time.monotonic()
            rows = call(hostd.admin_socket, "status", {})
            listed = call(hostd.admin_socket, "user.list", {})
            took = time.monotonic() - t0
            # Queued behind the sleeps it would take BUSY_SECONDS; the bound is 0.5 s,
            # generous here for a loaded 2-core machine.
            assert took < 5, f"status and user.list took {took:.1f} s with every worker busy"
            mine = next(r for r in rows if r["user"] == user)
            assert mine["state"] == "running" and mine["pids"] > workers
            assert user in {r["user"] for r in listed}
    finally:
        hostd.hostctl("user", "remove", user)
