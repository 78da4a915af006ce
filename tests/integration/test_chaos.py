"""Chaos: hostd killed -9 at random moments of adds, starts, stops, removes, port grants and
range releases from several clients at once, started again, and what it then says checked
against what the host holds (issue 11: "kill -9 at any moment").

Each round: client threads run random `hostctl` operations on a small pool of users; after a
random delay hostd gets SIGKILL (the clients' errors are expected then); hostd starts again on
the same config and state and finishes its reconcile; then the state, the runtime's
containers, the subuid/subgid files, mounts, loop devices, links, nft rules and cgroups must
agree. At the end every tenant is removed and nothing may be left.

    HOSTD_CHAOS_SEED=<n>    replay a run (the seed is printed at the start)
    HOSTD_CHAOS_ROUNDS=<n>  rounds (default 15: under 2 minutes on 2 cores, and the image build)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from hostd import config as config_mod
from hostd.subids import parse
from runtime.containers import Runtime
from tests.conftest import CGROUP_PARENT, TEST_TABLE
from tests.hostd_harness import Hostd, HostView, UnixUsers, host_view

POOL = 5  # test users
CLIENTS = 3  # threads sending operations at once
ROUNDS = int(os.environ.get("HOSTD_CHAOS_ROUNDS", "15"))
GROUPS = ("user", "ports", "ranges")  # commands with a subcommand
PORT_BASE = 47000  # each user's grants: PORT_BASE + 10 * its index + 0..3
QUOTAS = (
    (),
    ("--memory", "1G"),
    ("--pids", "2000", "--disk", "2G"),
    ("--cpus", "1", "--disk", "1G"),
)


@dataclass(frozen=True)
class StateRows:
    """hostd's state database, read directly (read-only)."""

    tenants: dict[str, tuple[int, str, str]]  # user: range_start, phase, desired
    ranges: dict[int, tuple[str, str]]  # start: user, status
    failures: dict[str, str]  # user: reason
    grants: list[tuple[int, int, str]]  # first, last, user
    addresses: dict[str, int]  # user: slot


def read_state(h: Hostd) -> StateRows:
    with contextlib.closing(
        sqlite3.connect(f"file:{h.state_dir}/hostd.db?mode=ro", uri=True)
    ) as db:
        return StateRows(
            {
                u: (s, p, d)
                for u, s, p, d in db.execute(
                    "SELECT user, range_start, phase, desired FROM tenants"
                )
            },
            {s: (u, st) for s, u, st in db.execute("SELECT start, user, status FROM ranges")},
            dict(db.execute("SELECT user, reason FROM failures").fetchall()),
            db.execute("SELECT first, last, user FROM port_grants").fetchall(),
            dict(db.execute("SELECT user, idx FROM addresses").fetchall()),
        )


class Clients:
    """Threads sending random operations until stopped; they note what they sent and each
    answer no crash explains."""

    def __init__(self, h: Hostd, users: list[str], rng: random.Random) -> None:
        self.h = h
        self.users = users
        self.stopping = threading.Event()
        self.bad: list[str] = []  # tracebacks and internal errors: never right, kill or not
        self.sent: list[tuple[str, ...]] = []
        seeds = [rng.randrange(2**32) for _ in range(CLIENTS)]
        self.threads = [
            threading.Thread(target=self._run, args=(random.Random(s),), daemon=True) for s in seeds
        ]
        for t in self.threads:
            t.start()

    def _op(self, rng: random.Random) -> tuple[str, ...]:
        i = rng.randrange(len(self.users))
        user = self.users[i]
        port = str(PORT_BASE + 10 * i + rng.randrange(4))
        quarantined = [
            str(start)
            for start, (owner, status) in read_state(self.h).ranges.items()
            if owner in self.users and status == "quarantined"
        ]
        return rng.choices(
            [
                ("user", "add", user, *rng.choice(QUOTAS)),
                ("ranges", "release", rng.choice(quarantined or ["0"])),
                ("start", user),
                ("stop", user),
                ("restart", user),
                ("user", "remove", user),
                ("ports", "grant", user, port),
                ("ports", "revoke", user, port),
                ("status",),
            ],
            weights=[3, 1, 4, 2, 1, 2, 2, 1, 1],
        )[0]

    def _run(self, rng: random.Random) -> None:
        while not self.stopping.is_set():
            op = self._op(rng)
            self.sent.append(op)
            res = self.h.hostctl(*op, check=False)
            if "Traceback" in res.stderr + res.stdout or "internal error" in res.stderr:
                self.bad.append(f"hostctl {' '.join(op)}: {res.stderr[-1500:]}")

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=600)


def check_agreement(h: Hostd, rt: Runtime, users: list[str]) -> None:
    """State, runtime and host agree, for the pool's users (and on ranges, for all)."""
    rows = read_state(h)
    view = host_view(h.state_dir, users, CGROUP_PARENT, TEST_TABLE)
    tenants = {u for u in users if u in rows.tenants}
    problems = [f"{u} is {rows.tenants[u][1]}" for u in tenants if rows.tenants[u][1] != "ready"]
    containers = {c.name for c in rt.containers()} & set(users)
    if containers != tenants:
        problems.append(f"containers {sorted(containers)} but tenants {sorted(tenants)}")
    problems += [f"{n}'s creation is incomplete" for n in rt.incomplete()]
    status = {n: rt.state(n).status for n in containers}
    running = {n for n, s in status.items() if s == "running"}
    problems += [f"{n} is {s}" for n, s in status.items() if s not in ("running", "stopped")]
    for u in tenants:
        if rows.tenants[u][2] == "running" and u not in running and not rows.failures.get(u):
            problems.append(f"{u} should run but is {status.get(u)}, with no reason")
    problems += _range_problems(h, rows)
    problems += _host_problems(view, rows, rt, set(users), running)
    assert not problems, "; ".join(problems)
    _check_status(h, rows, tenants)


def _range_problems(h: Hostd, rows: StateRows) -> list[str]:
    """Each recorded range once in both files, nothing else there; a tenant's range active
    and its own, no active range without its tenant."""
    uid_text, gid_text = (p.read_text() if p.exists() else "" for p in (h.subuid, h.subgid))
    problems = [] if uid_text == gid_text else ["subuid and subgid differ"]
    starts = [e.start for e in parse(uid_text)]
    problems += [f"range {s} listed twice" for s in set(starts) if starts.count(s) > 1]
    if set(starts) != set(rows.ranges):
        problems.append(
            f"subuid has {sorted(set(starts) - set(rows.ranges))} not in the state, "
            f"the state has {sorted(set(rows.ranges) - set(starts))} not in subuid"
        )
    for user, (start, _, _) in rows.tenants.items():
        if rows.ranges.get(start) != (user, "active"):
            problems.append(f"{user}'s range {start} is {rows.ranges.get(start)}")
    for start, (user, st) in rows.ranges.items():
        if st == "active" and rows.tenants.get(user, (None,))[0] != start:
            problems.append(f"range {start} active for {user}, who has no such tenant")
    return problems


def _host_problems(
    view: HostView, rows: StateRows, rt: Runtime, users: set[str], running: set[str]
) -> list[str]:
    """Directories, mounts and loops only of existing containers; links, nft and cgroups only
    of running ones (and a link and a pin for each); forwards exactly to the tenants with grants."""
    containers = {c.name for c in rt.containers()}
    problems = [
        f"{kind[:-1]} of {n}, which has no container"
        for kind in ("dirs", "mounts", "loops")
        for n in (getattr(view, kind) & users) - containers
    ]
    for kind in ("links", "nft", "cgroups"):
        stray = getattr(view, kind) - running
        problems += [f"{kind[:-1]} of {n}, which is not running" for n in stray]
    problems += [f"no link of running {n}" for n in running - view.links]
    problems += [f"no nft pin of running {n}" for n in running - view.nft]
    net = rt.network_config()
    granted = {str(net.address_for(rows.addresses[u])) for _, _, u in rows.grants}
    if view.dnat != granted:
        problems.append(f"nft forwards to {sorted(view.dnat)}, grants to {sorted(granted)}")
    return problems


def _check_status(h: Hostd, rows: StateRows, tenants: set[str]) -> None:
    """`hostctl status` answers, shows no tenant half added or removed, and a reason for each
    failed one."""
    shown = {s["user"]: s for s in json.loads(h.hostctl("--json", "status").stdout)}
    for u in tenants:
        assert shown[u]["state"] in ("running", "stopped", "failed"), shown[u]
        if shown[u]["state"] == "failed":
            assert shown[u]["reason"], shown[u]


def _kill_and_restart(h: Hostd, clients: Clients, rng: random.Random) -> None:
    """SIGKILL hostd at a random moment of the clients' work; start it again once they
    stopped, in one round of four killing it once more in the middle of its reconcile; return
    when a reconcile is over."""
    time.sleep(rng.uniform(0.3, 6.0))  # the random moment of the crash, not a wait
    h.stop(signal.SIGKILL)
    clients.stop()
    if rng.random() < 0.25:
        h.start(reconciled=False)
        time.sleep(rng.uniform(0.0, 2.0))  # a moment of the reconcile
        h.stop(signal.SIGKILL)
    h.start()


@pytest.fixture
def pool(hostd: Hostd, unix_users: UnixUsers) -> Iterator[list[str]]:
    """The test's users; their tenants removed afterwards (hostd running again first)."""
    users = [unix_users.make() for _ in range(POOL)]
    yield users
    if hostd.proc is None or hostd.proc.poll() is not None:
        hostd.start()
    for u in users:
        hostd.hostctl("user", "remove", u, check=False)


def test_kill_9_at_random_moments(hostd: Hostd, pool: list[str]) -> None:
    seed = int(os.environ.get("HOSTD_CHAOS_SEED", random.randrange(2**32)))
    print(f"HOSTD_CHAOS_SEED={seed} HOSTD_CHAOS_ROUNDS={ROUNDS}")
    rng = random.Random(seed)
    rt = Runtime(config_mod.load(hostd.config).runtime_settings())
    ops: Counter[str] = Counter()
    t0 = time.monotonic()
    for n in range(ROUNDS):
        clients = Clients(hostd, pool, rng)
        _kill_and_restart(hostd, clients, rng)
        ops.update(" ".join(op[:2] if op[0] in GROUPS else op[:1]) for op in clients.sent)
        assert not clients.bad, f"round {n} (seed {seed}): {clients.bad}"
        try:
            check_agreement(hostd, rt, pool)
        except AssertionError as exc:
            raise AssertionError(f"round {n} (seed {seed}): {exc}") from None
    print(f"{ROUNDS} rounds in {time.monotonic() - t0:.0f} s, operations sent: {dict(ops)}")
    for u in set(pool) & set(read_state(hostd).tenants):
        hostd.hostctl("user", "remove", u)
    view = host_view(hostd.state_dir, pool, CGROUP_PARENT, TEST_TABLE)
    assert [t for u in pool for t in view.traces(u)] == []
    check_agreement(hostd, rt, pool)
