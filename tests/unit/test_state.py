"""The state database: migrations, tenant bookkeeping, thread safety and crash safety."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostd import state
from hostd.errors import HostdError
from hostd.state import MIGRATIONS, State, Tenant
from runtime.errors import Busy, Conflict, NotFound, RuntimeFailure
from runtime.limits import MAX_LIMIT, Limits


def make_tenant(user: str, range_start: int, **changes: object) -> Tenant:
    tenant = Tenant(
        user=user,
        uid=1000,
        gid=1000,
        home=f"/home/{user}",
        range_start=range_start,
        image="default",
        phase="adding",
        desired="running",
        created="2024-01-01T00:00:00+00:00",
    )
    return replace(tenant, **changes)  # type: ignore[arg-type]


def raw(path: Path) -> closing[sqlite3.Connection]:
    """A connection that bypasses State, to look at the file as another process would."""
    return closing(sqlite3.connect(path, isolation_level=None))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "hostd.db"  # the daemon makes the state dir (prepare_state_dir)


@pytest.fixture
def db(db_path: Path) -> Iterator[State]:
    with State(db_path) as s:
        yield s


def test_new_database_is_migrated_to_the_latest_version(db_path: Path) -> None:
    with State(db_path) as s:
        assert s.schema_version == len(MIGRATIONS)
    assert db_path.stat().st_mode & 0o777 == 0o600
    with raw(db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"tenants", "quotas", "events"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_an_empty_file_is_migrated(db_path: Path) -> None:
    db_path.touch()
    with State(db_path) as s:
        assert s.schema_version == len(MIGRATIONS)


def test_reopening_keeps_data_and_version(db_path: Path) -> None:
    with State(db_path) as s:
        s.begin_add(make_tenant("alice", 100000), Limits(memory=2**30))
    for _ in range(2):
        with State(db_path) as s:
            assert s.schema_version == len(MIGRATIONS)
            assert [t.user for t in s.tenants()] == ["alice"]
            assert s.quota("alice") == Limits(memory=2**30)


def test_database_from_a_newer_hostd_is_refused_untouched(db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    before = db_path.read_bytes()
    with pytest.raises(HostdError) as info:
        State(db_path)
    assert str(info.value) == (
        f"{db_path} has schema version {len(MIGRATIONS) + 1}, "
        f"newer than this hostd ({len(MIGRATIONS)}): upgrade hostd"
    )
    assert db_path.read_bytes() == before


def test_a_failing_migration_leaves_the_previous_version(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    State(db_path).close()
    broken = (*MIGRATIONS, ("CREATE TABLE extra (x INTEGER)", "NOT SQL AT ALL"))
    monkeypatch.setattr(state, "MIGRATIONS", broken)
    with pytest.raises(sqlite3.OperationalError):
        State(db_path)
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'extra'").fetchone()


def test_begin_add_records_tenant_and_quota(db: State) -> None:
    alice = make_tenant("alice", 100000)
    db.begin_add(alice, Limits(cpus=1.5, pids=500))
    assert db.tenant("alice") == alice
    assert db.quota("alice") == Limits(cpus=1.5, pids=500)
    assert db.tenant("bob") is None


def test_begin_add_requires_phase_adding(db: State) -> None:
    with pytest.raises(ValueError, match="adding"):
        db.begin_add(make_tenant("alice", 100000, phase="ready"), Limits())
    assert db.tenants() == []


def test_duplicate_user_is_refused_and_nothing_changes(db: State) -> None:
    db.begin_add(make_tenant("alice", 100000), Limits(memory=1 << 30))
    with pytest.raises(Conflict, match="^user alice is already a tenant: "):
        db.begin_add(make_tenant("alice", 200000, image="other"), Limits(memory=1))
    assert db.tenants() == [make_tenant("alice", 100000)]
    assert db.quota("alice") == Limits(memory=1 << 30)
    assert db.range_starts() == [100000]


def test_taken_range_is_refused_and_nothing_changes(db: State) -> None:
    db.begin_add(make_tenant("alice", 100000), Limits())
    with pytest.raises(Conflict) as info:
        db.begin_add(make_tenant("bob", 100000), Limits(pids=10))
    assert "100000" in info.value.cause and "alice" in info.value.cause
    assert db.tenant("bob") is None
    with raw(db.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM quotas").fetchone()[0] == 1


def test_phase_and_desired_updates(db: State) -> None:
    db.begin_add(make_tenant("alice", 100000), Limits())
    db.set_phase("alice", "ready")
    db.set_desired("alice", "stopped")
    tenant = db.tenant("alice")
    assert tenant is not None and (tenant.phase, tenant.desired) == ("ready", "stopped")


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.set_phase("alice", "gone"),
        lambda s: s.set_desired("alice", "paused"),
        lambda s: make_tenant("bob", 1, phase="nope"),
        lambda s: make_tenant("bob", 1, desired="nope"),
        lambda s: s.events(limit=-1),
        lambda s: s.delete_tenant("alice", "released"),
    ],
)
def test_invalid_values_are_programming_errors(db: State, call: object) -> None:
    db.begin_add(make_tenant("alice", 100000), Limits())
    with pytest.raises(ValueError):
        call(db)  # type: ignore[operator]


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.set_phase("bob", "ready"),
        lambda s: s.set_desired("bob", "stopped"),
        lambda s: s.delete_tenant("bob", "free"),
        lambda s: s.quota("bob"),
        lambda s: s.set_quota("bob", Limits()),
    ],
)
def test_unknown_user_is_reported(db: State, call: object) -> None:
    with pytest.raises(NotFound, match="^bob is not a tenant: add them with"):
        call(db)  # type: ignore[operator]


def test_delete_cascades_quota_and_frees_the_range(db: State) -> None:
    db.begin_add(make_tenant("alice", 100000), Limits(disk=10 << 30))
    db.log_event("alice", "add")
    db.delete_tenant("alice", "free")
    assert db.tenant("alice") is None
    assert db.range_starts() == []
    assert db.ranges() == []
    with raw(db.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM quotas").fetchone()[0] == 0
    assert [e[1:] for e in db.events()] == [("alice", "add")]  # the audit log outlives tenants
    db.begin_add(make_tenant("alice", 100000), Limits())


def _statuses(db: State) -> list[tuple[int, str, str]]:
    return [(r.start, r.user, r.status) for r in db.ranges()]


def test_a_range_is_active_then_kept_or_quarantined_or_freed(db: State) -> None:
    for user, start in [("alice", 100000), ("bob", 165536), ("carol", 231072)]:
        db.begin_add(make_tenant(user, start), Limits())
    assert _statuses(db) == [
        (100000, "alice", "active"),
        (165536, "bob", "active"),
        (231072, "carol", "active"),
    ]
    db.delete_tenant("alice", "kept")
    db.delete_tenant("bob", "quarantined")
    db.delete_tenant("carol", "free")
    assert _statuses(db) == [(100000, "alice", "kept"), (165536, "bob", "quarantined")]
    assert db.range_starts() == [100000, 165536]  # allocation avoids both
    assert db.kept_range("alice") == 100000
    assert db.kept_range("bob") is None


def test_a_kept_range_is_adopted_only_by_its_user(db: State) -> None:
    db.begin_add(make_tenant("alice", 100000), Limits())
    db.delete_tenant("alice", "kept")
    with pytest.raises(Conflict) as info:
        db.begin_add(make_tenant("bob", 100000), Limits())
    assert str(info.value).startswith("ID range starting at 100000 is kept for alice since ")
    assert db.tenant("bob") is None  # the whole add was rolled back
    with raw(db.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM quotas").fetchone()[0] == 0
    db.begin_add(make_tenant("alice", 100000), Limits())
    assert _statuses(db) == [(100000, "alice", "active")]
    assert db.kept_range("alice") is None


def test_a_quarantined_range_is_taken_only_by_its_old_user(db: State) -> None:
    db.begin_add(make_tenant("alice", 100000), Limits())
    db.delete_tenant("alice", "quarantined")
    fix = r"release it first \(`hostctl ranges release 100000`\)"
    with pytest.raises(Conflict, match=f"is quarantined for alice since .*: {fix}"):
        db.begin_add(make_tenant("bob", 100000), Limits())
    assert db.tenants() == []
    db.begin_add(make_tenant("alice", 100000), Limits())
    assert _statuses(db) == [(100000, "alice", "active")]


def test_release_refuses_ranges_in_use_and_runs_first_before_forgetting(db: State) -> None:
    db.begin_add(make_tenant("alice", 100000), Limits())
    db.begin_add(make_tenant("bob", 165536), Limits())
    db.delete_tenant("bob", "kept")
    ran: list[int] = []
    refusals = [
        (100000, "is active for alice since .*: remove the tenant first"),
        (165536, "is kept for bob since .*: add bob again"),
        (300000, "^no ID range starts at 300000: see `hostctl ranges`$"),
    ]
    for start, message in refusals:
        with pytest.raises(RuntimeFailure, match=message):
            db.release_range(start, lambda: ran.append(start))  # noqa: B023 (runs at once)
    assert ran == []

    db.delete_tenant("alice", "quarantined")

    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        db.release_range(100000, fail)
    assert _statuses(db) == [(100000, "alice", "quarantined"), (165536, "bob", "kept")]
    released = db.release_range(100000, lambda: ran.append(100000))
    assert (released.start, released.user, released.status) == (100000, "alice", "quarantined")
    assert ran == [100000]
    assert _statuses(db) == [(165536, "bob", "kept")]
    db.begin_add(make_tenant("carol", 100000), Limits())  # allocatable again


def test_keep_range_records_a_container_kept_by_an_older_hostd(db: State) -> None:
    db.keep_range(100000, "alice")
    assert db.kept_range("alice") == 100000
    with pytest.raises(Conflict, match="is kept for alice"):
        db.keep_range(100000, "bob")


def test_migration_3_records_every_tenants_range_as_active(db_path: Path) -> None:
    """An installation from before the ranges table: each tenant's range becomes active."""
    with raw(db_path) as conn:
        for statements in MIGRATIONS[:2]:
            for sql in statements:
                conn.execute(sql)
        conn.execute("PRAGMA user_version = 2")
        for user, start, phase in [("alice", 100000, "ready"), ("bob", 165536, "removing")]:
            conn.execute(
                "INSERT INTO tenants VALUES (?, 1000, 1000, '/home/x', ?, 'default', ?,"
                " 'running', '2024-01-01T00:00:00+00:00')",
                (user, start, phase),
            )
    with State(db_path) as s:
        assert s.schema_version == len(MIGRATIONS)
        assert [(r.start, r.user, r.status, r.since) for r in s.ranges()] == [
            (100000, "alice", "active", "2024-01-01T00:00:00+00:00"),
            (165536, "bob", "active", "2024-01-01T00:00:00+00:00"),
        ]
        s.delete_tenant("bob", "quarantined")  # reconcile finishing bob's removal
        assert [r.status for r in s.ranges()] == ["active", "quarantined"]


# What an installation at each schema version holds, by the migration that made the table:
# a ready tenant with a quota, an address and a port grant, its range, an audit line, a failed
# start, an auto-stop setting. Rows of later tables only exist from their version on.
OLD_ROWS = {
    "tenants": "INSERT INTO tenants VALUES ('alice', 1000, 1000, '/home/alice', 100000,"
    " 'default', 'ready', 'running', '2024-01-01T00:00:00+00:00')",
    "quotas": "INSERT INTO quotas VALUES ('alice', 1.5, 1073741824, 512, NULL)",
    "events": "INSERT INTO events (at, user, what) VALUES ('2024-01-01T00:00:00+00:00',"
    " 'alice', 'user add')",
    "addresses": "INSERT INTO addresses VALUES ('alice', 7)",
    "port_grants": "INSERT INTO port_grants VALUES (8000, 8009, 'alice')",
    "ranges": "INSERT INTO ranges VALUES (100000, 'alice', 'active', '2024-01-01T00:00:00+00:00')",
    "failures": "INSERT INTO failures VALUES ('alice', '2024-01-02T00:00:00+00:00', 'no pids')",
    "auto_stop": "INSERT INTO auto_stop VALUES ('alice', 86400)",
}


@pytest.mark.parametrize("version", range(len(MIGRATIONS)))
def test_every_released_schema_upgrades_keeping_its_data(db_path: Path, version: int) -> None:
    """An upgrade from each schema hostd ever shipped: the database reaches the latest version
    and keeps everything it held; the tables it did not have start empty."""
    with raw(db_path) as conn:
        for statements in MIGRATIONS[:version]:
            for sql in statements:
                conn.execute(sql)
        conn.execute(f"PRAGMA user_version = {version}")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, sql in OLD_ROWS.items():
            if table in tables:
                conn.execute(sql)
    with State(db_path) as s:
        assert s.schema_version == len(MIGRATIONS)
        if version == 0:  # nothing was there
            assert s.tenants() == [] and s.ranges() == []
            return
        (alice,) = s.tenants()
        assert (alice.user, alice.phase, alice.range_start) == ("alice", "ready", 100000)
        assert s.quota("alice") == Limits(cpus=1.5, memory=2**30, pids=512)
        assert [what for _, _, what in s.events("alice")] == ["user add"]
        assert [(r.start, r.user, r.status) for r in s.ranges()] == [(100000, "alice", "active")]
        assert s.address_slots() == ({"alice": 7} if "addresses" in tables else {})
        had_grants = "port_grants" in tables
        assert s.port_grants() == ([(8000, 8009, "alice")] if had_grants else [])
        assert s.failure("alice") == ("no pids" if "failures" in tables else None)
        assert s.auto_stops() == ({"alice": 86400} if "auto_stop" in tables else {})
        assert s.dormant("alice") is None
        s.set_dormant("alice", "2024-01-03T00:00:00+00:00")  # the newest tables work too
        assert s.dormant("alice") == "2024-01-03T00:00:00+00:00"


def test_tenants_and_ranges_cover_every_phase_in_order(db: State) -> None:
    for user, start in [("carol", 300000), ("alice", 500000), ("bob", 100000)]:
        db.begin_add(make_tenant(user, start), Limits())
    db.set_phase("bob", "ready")
    db.set_phase("carol", "removing")
    assert [t.user for t in db.tenants()] == ["alice", "bob", "carol"]
    assert db.range_starts() == [100000, 300000, 500000]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(
    st.builds(
        Limits,
        cpus=st.none() | st.floats(min_value=0.01, max_value=1024),
        memory=st.none() | st.integers(1, MAX_LIMIT),
        pids=st.none() | st.integers(1, MAX_LIMIT),
        disk=st.none() | st.integers(1, MAX_LIMIT),
    )
)
def test_quota_round_trips(db: State, quota: Limits) -> None:
    if db.tenant("alice") is None:
        db.begin_add(make_tenant("alice", 100000), Limits())
    db.set_quota("alice", quota)
    assert db.quota("alice") == quota


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpus": 0.0},
        {"cpus": float("nan")},
        {"cpus": float("inf")},
        {"memory": -1},
        {"pids": 0},
        {"disk": MAX_LIMIT + 1},
    ],
)
def test_out_of_range_quota_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(RuntimeFailure, match="out of range"):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_events_are_filtered_and_limited(db: State) -> None:
    for i in range(5):
        db.log_event("alice", f"quota {i}")
    db.log_event("bob", "add")
    db.log_event(None, "reload")
    assert [what for _, _, what in db.events("alice", limit=2)] == ["quota 3", "quota 4"]
    assert [(who, what) for _, who, what in db.events(limit=3)] == [
        ("alice", "quota 4"),
        ("bob", "add"),
        (None, "reload"),
    ]
    assert db.events(limit=0) == []
    at = db.events()[0][0]
    assert at.endswith("+00:00") and at[:4].isdigit() and "T" in at


def test_concurrent_use_from_threads(db: State) -> None:
    per_thread = 25
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(per_thread):
                user = f"u{n}-{i}"
                db.begin_add(make_tenant(user, 100000 + (n * per_thread + i) * 65536), Limits())
                db.set_phase(user, "ready")
                db.log_event(user, "add")
                assert db.tenant(user) is not None
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(db.tenants()) == 8 * per_thread
    assert all(t.phase == "ready" for t in db.tenants())
    assert len(set(db.range_starts())) == 8 * per_thread
    assert len(db.events(limit=1000)) == 8 * per_thread


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from hostd.state import State, Tenant
    from runtime.limits import Limits

    s = State(Path(sys.argv[1]))
    base = int(sys.argv[2])
    for i in range(100000):
        user = f"c{base}-{i}"
        s.begin_add(
            Tenant(user, 1000, 1000, "/home/x", (base + i) * 65536, "default",
                   "adding", "running", "2024-01-01T00:00:00+00:00"),
            Limits(cpus=1.0, memory=i + 1, pids=i + 1, disk=i + 1),
        )
        print(user, flush=True)
    """
)


def test_reads_do_not_wait_for_a_write_in_progress(db: State) -> None:
    """A write's COMMIT waits for the disk (seconds on a busy host): `status` reads meanwhile
    answer from the last committed state instead of queueing behind it."""
    db.begin_add(make_tenant("alice", 100000), Limits())
    inside, release = threading.Event(), threading.Event()

    def slow_write() -> None:
        with db._write() as conn:
            conn.execute("UPDATE tenants SET phase = 'ready' WHERE user = 'alice'")
            inside.set()
            release.wait(30)

    writer = threading.Thread(target=slow_write)
    writer.start()
    try:
        assert inside.wait(10)
        read: list[list[Tenant]] = []
        reader = threading.Thread(target=lambda: read.append(db.tenants()))
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "a read waited for the write"
        assert [t.phase for t in read[0]] == ["adding"]  # not committed yet
    finally:
        release.set()
        writer.join()
    after = db.tenant("alice")
    assert after is not None and after.phase == "ready"


@pytest.mark.parametrize("kill_after", [1, 37, 150])
def test_sigkill_while_adding_leaves_a_consistent_database(db_path: Path, kill_after: int) -> None:
    committed: list[str] = []
    for round_, base in enumerate([10, 200000]):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db_path), str(base)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        for _ in range(kill_after * (round_ + 1)):
            committed.append(child.stdout.readline().strip())
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate()
        committed += rest.split()
        assert child.returncode == -signal.SIGKILL

        with raw(db_path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
            orphans = conn.execute(
                "SELECT COUNT(*) FROM tenants WHERE user NOT IN (SELECT user FROM quotas)"
            ).fetchone()[0]
            assert orphans == 0
        with State(db_path) as s:
            users = {t.user for t in s.tenants()}
            assert set(committed) <= users  # every reported commit survived
            assert len(users) <= len(committed) + round_ + 1  # at most one unreported each


def test_address_slots_are_stable_lowest_free_and_freed_with_the_tenant(db: State) -> None:
    for i, user in enumerate(("a", "b", "c")):
        db.begin_add(make_tenant(user, 100000 + i * 65536), Limits())
    assert [db.address_index(u) for u in ("a", "b", "c")] == [0, 1, 2]
    assert db.address_index("b") == 1  # kept
    db.delete_tenant("b", "quarantined")
    db.begin_add(make_tenant("d", 400000), Limits())
    assert db.address_index("d") == 1  # the freed slot is reused
    with pytest.raises(NotFound, match="is not a tenant"):
        db.address_index("nobody")


def test_port_grants_never_overlap_and_go_with_the_tenant(db: State) -> None:
    db.begin_add(make_tenant("a", 100000), Limits())
    db.begin_add(make_tenant("b", 165536), Limits())
    with pytest.raises(Busy, match="a is being set up or removed"):
        db.grant_ports("a", 20000, 20009)  # a rolled-back add would leave its forwards
    db.set_phase("a", "ready")
    db.set_phase("b", "ready")
    db.grant_ports("a", 20000, 20009)
    with pytest.raises(Conflict, match="overlap 20000-20009 granted to a"):
        db.grant_ports("b", 20005, 20020)
    with pytest.raises(Conflict, match="granted to them"):
        db.grant_ports("a", 20009, 20009)
    db.grant_ports("b", 20010, 20010)
    assert db.port_grants() == [(20000, 20009, "a"), (20010, 20010, "b")]
    with pytest.raises(NotFound, match="has no grant of ports 20000-20001"):
        db.revoke_ports("a", 20000, 20001)
    db.delete_tenant("a", "kept")
    assert db.port_grants() == [(20010, 20010, "b")]
    db.revoke_ports("b", 20010, 20010)
    assert db.port_grants() == []
