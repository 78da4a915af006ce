"""`hostctl status` answers while every admin worker is busy (a start storm holds them all):
admins' reads are served by a pool of their own, not queued behind the slow requests."""

from __future__ import annotations

import time

from hostd import config as config_mod
from hostd.client import call
from tests.hostd_harness import Hostd, UnixUsers, busy_admin_workers


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
