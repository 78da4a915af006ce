"""Start storms wait in line (issue 11): with `[runtime] parallel_starts = 1`, three tenants
started at once by `hostctl start` boot one at a time; the waiting clients hear their place,
`hostctl status` shows them `queued` and `starting`, and all end running."""

from __future__ import annotations

import re
import select
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

from hostd.client import call
from tests.hostd_harness import Hostd, UnixUsers, busy_admin_workers

PLACE = re.compile(r"waiting to start: (\d+)[a-z]{2} in line, (\d+) starting")
WAITING = re.compile(r"waiting for hostd: 1st in line \(\[api\] admin_workers = 1 at once\)")


def test_three_starts_with_one_slot_queue_and_all_run(hostd: Hostd, unix_users: UnixUsers) -> None:
    users = [unix_users.make() for _ in range(3)]
    seen: set[tuple[str, str, int | None]] = set()  # (user, state, place) in status
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for row in call(hostd.admin_socket, "status", {}):
                if row["user"] in users:
                    seen.add((row["user"], row["state"], row.get("place")))

    with hostd.configured("queue", "[runtime]\nparallel_starts = 1\n"):
        try:
            for user in users:
                hostd.hostctl("user", "add", user)
            with ThreadPoolExecutor(4) as pool:
                watcher = pool.submit(watch)
                starts = [pool.submit(hostd.hostctl, "start", user) for user in users]
                outputs = [s.result().stderr for s in starts]
                done.set()
                watcher.result()
            rows = {r["user"]: r for r in call(hostd.admin_socket, "status", {})}
            assert [rows[u]["state"] for u in users] == ["running"] * 3
            places = [[int(p) for p, _ in PLACE.findall(out)] for out in outputs]
            starting = [{int(n) for _, n in PLACE.findall(out)} for out in outputs]
            # One slot: whoever came second or third waited, heard its place, each one once
            # and counting down to the front, with one tenant starting meanwhile.
            assert sorted(len(p) > 0 for p in places) == [False, True, True], outputs
            for told, count in zip(places, starting, strict=True):
                assert told == sorted(told, reverse=True) and told[-1:] in ([], [1])
                assert count <= {1}
            assert "... starting the container" in outputs[0] + outputs[1] + outputs[2]
            states = {state for _, state, _ in seen}
            assert {"queued", "starting"} <= states, seen
            assert {place for _, state, place in seen if state == "queued"} <= {1, 2}
            assert all(place is None for _, state, place in seen if state != "queued")
        finally:
            done.set()
            for user in users:
                hostd.hostctl("user", "remove", user, check=False)


def test_admin_requests_waiting_for_a_worker_hear_so(hostd: Hostd, unix_users: UnixUsers) -> None:
    """A storm larger than the admin pool: a request that waits for a worker says so at once
    (then its place in the start queue, as above), and runs once a worker is free."""
    busy, waiting = unix_users.make(), unix_users.make()
    started: list[subprocess.Popen[str]] = []
    with hostd.configured("one-worker", "[api]\nadmin_workers = 1\n"):
        try:
            for user in (busy, waiting):
                hostd.hostctl("user", "add", user)
            hostd.hostctl("start", busy)
            with busy_admin_workers(hostd, busy, 1):
                start = subprocess.Popen(
                    hostd.hostctl_argv("start", waiting), stderr=subprocess.PIPE, text=True
                )
                started.append(start)
                assert start.stderr is not None
                ready, _, _ = select.select([start.stderr], [], [], 60)
                first = start.stderr.readline() if ready else "(nothing within 60 s)"
                assert WAITING.search(first), first
            assert start.wait(timeout=300) == 0, start.stderr.read()
            (row,) = [r for r in call(hostd.admin_socket, "status", {}) if r["user"] == waiting]
            assert row["state"] == "running"
        finally:
            for client in started:
                client.kill()
                client.wait()
            for user in (busy, waiting):
                hostd.hostctl("user", "remove", user, check=False)
