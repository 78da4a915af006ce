"""hostd's durable state: tenants, their quotas, whose ID range is whose, and an audit log, in one
SQLite file.

Every write is one transaction (WAL, synchronous=FULL), so `kill -9` or a power cut at any point
leaves either the whole change or none of it. The schema is versioned by PRAGMA user_version and
grows only by appending to MIGRATIONS, so an older database is brought up to date on open and a
newer one is refused rather than misread.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from hostd.errors import HostdError
from runtime.errors import Busy, Conflict, NotFound
from runtime.limits import Limits

PHASES = ("adding", "ready", "removing")
DESIRED = ("running", "stopped")
BUSY_TIMEOUT_S = 10.0  # how long a writer waits for another process's transaction to finish

# Migration N (1-based) takes the database from user_version N-1 to N in one transaction.
# Never edit a released migration: append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tenants (
            user TEXT PRIMARY KEY,
            uid INTEGER NOT NULL,
            gid INTEGER NOT NULL,
            home TEXT NOT NULL,
            range_start INTEGER NOT NULL UNIQUE,
            image TEXT NOT NULL,
            phase TEXT NOT NULL CHECK (phase IN ('adding', 'ready', 'removing')),
            desired TEXT NOT NULL CHECK (desired IN ('running', 'stopped')),
            created TEXT NOT NULL
        )""",
        """CREATE TABLE quotas (
            user TEXT PRIMARY KEY REFERENCES tenants(user) ON DELETE CASCADE,
            cpus REAL,
            memory INTEGER,
            pids INTEGER,
            disk INTEGER
        )""",
        # No foreign key on purpose: the audit log outlives the tenants it mentions.
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at TEXT NOT NULL,
            user TEXT,
            what TEXT NOT NULL
        )""",
    ),
    (  # 2: networking: one address per tenant, host ports granted to tenants
        """CREATE TABLE addresses (
            user TEXT PRIMARY KEY REFERENCES tenants(user) ON DELETE CASCADE,
            idx INTEGER NOT NULL UNIQUE
        )""",
        """CREATE TABLE port_grants (
            first INTEGER NOT NULL,
            last INTEGER NOT NULL,
            user TEXT NOT NULL REFERENCES tenants(user) ON DELETE CASCADE,
            PRIMARY KEY (first, last),
            CHECK (0 < first AND first <= last AND last < 65536)
        )""",
    ),
    (  # 3: which ID range is whose, outliving the tenant row (kept, quarantined)
        """CREATE TABLE ranges (
            start INTEGER PRIMARY KEY,
            user TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('active', 'kept', 'quarantined')),
            since TEXT NOT NULL
        )""",
        """INSERT INTO ranges (start, user, status, since)
            SELECT range_start, user, 'active', created FROM tenants""",
    ),
    (  # 4: why a tenant's last start failed, until it starts or is stopped
        """CREATE TABLE failures (
            user TEXT PRIMARY KEY REFERENCES tenants(user) ON DELETE CASCADE,
            at TEXT NOT NULL,
            reason TEXT NOT NULL
        )""",
    ),
    (  # 5: auto-stop of idle tenants: an admin's per-tenant setting, and who was stopped why
        """CREATE TABLE auto_stop (
            user TEXT PRIMARY KEY REFERENCES tenants(user) ON DELETE CASCADE,
            after INTEGER NOT NULL CHECK (after >= 0)
        )""",
        """CREATE TABLE dormant (
            user TEXT PRIMARY KEY REFERENCES tenants(user) ON DELETE CASCADE,
            idle_since TEXT NOT NULL,
            at TEXT NOT NULL
        )""",
    ),
)

_TENANT_COLUMNS = "user, uid, gid, home, range_start, image, phase, desired, created"


def utc_now() -> str:
    """The timestamp format of the state database: ISO-8601 in UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")


def _check_desired(desired: str) -> None:
    if desired not in DESIRED:
        raise ValueError(f"desired state {desired!r} is not one of {DESIRED}")


@dataclass(frozen=True)
class IdRangeRecord:
    """Who an ID range (65536 IDs from `start`) belongs to, and since when in this status.

    A range is its tenant's (active), waits for a re-add of its user (kept: the container and
    its data stay), or is held back after a removal until an admin releases it (quarantined),
    so a new tenant never inherits files or namespaces of a removed one.
    """

    start: int
    user: str
    status: str  # active | kept | quarantined
    since: str


@dataclass(frozen=True)
class Tenant:
    """A Unix user with a system container; `phase` tracks half-done adds and removals."""

    user: str
    uid: int
    gid: int
    home: str
    range_start: int
    image: str
    phase: str
    desired: str
    created: str

    def __post_init__(self) -> None:
        _check_phase(self.phase)
        _check_desired(self.desired)


@dataclass(frozen=True)
class TenantRecord:
    """A tenant with what the state holds about it beside its row."""

    tenant: Tenant
    quota: Limits
    failure: str | None  # why its last start failed
    dormant: str | None  # idle since when, if stopped for idleness


class State:
    """The state database (in an existing directory). Thread-safe: one connection, used under
    a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # 0600 before SQLite makes it
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; _write() issues BEGIN/COMMIT itself.
        self._db = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            self._check_version()
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
            # Reads have a connection of their own: in WAL they never wait for a write, whose
            # COMMIT waits for the disk (fsync), which may take seconds on a busy host.
            self._read_lock = threading.Lock()
            self._reader = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._reader.execute("PRAGMA query_only = ON")
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> State:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._db.close()

    @property
    def schema_version(self) -> int:
        with self._reading() as db:
            return _user_version(db)

    def _check_version(self) -> None:
        """Refuse a database written by a newer hostd before changing anything in it."""
        found, known = _user_version(self._db), len(MIGRATIONS)
        if found > known:
            raise HostdError(
                f"{self.path} has schema version {found}, newer than this hostd ({known})",
                "upgrade hostd",
            )

    def _migrate(self) -> None:
        for version, statements in enumerate(MIGRATIONS, start=1):
            with self._write() as db:
                # Read inside the transaction: another process may have migrated meanwhile.
                if _user_version(db) >= version:
                    continue
                for sql in statements:
                    db.execute(sql)
                db.execute(f"PRAGMA user_version = {version}")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The reading connection, for one statement whose rows are all fetched inside (an
        unfinished statement would hold its read snapshot)."""
        with self._read_lock:
            yield self._reader

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        with self._lock:
            # IMMEDIATE takes the write lock now, so checks made inside stay true until COMMIT.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (disk full...)
                    self._db.execute("ROLLBACK")
                raise

    def _change_one(self, user: str, sql: str, params: tuple[object, ...]) -> None:
        with self._write() as db:
            if db.execute(sql, params).rowcount == 0:
                raise not_a_tenant(user)

    def begin_add(self, tenant: Tenant, quota: Limits) -> None:
        """Record a tenant being added (phase 'adding') with its quota, both or neither."""
        if tenant.phase != "adding":
            raise ValueError(f"a new tenant starts in phase 'adding', not {tenant.phase!r}")
        with self._write() as db:
            try:
                db.execute(
                    f"INSERT INTO tenants ({_TENANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    astuple(tenant),
                )
            except sqlite3.IntegrityError:
                if db.execute("SELECT 1 FROM tenants WHERE user = ?", (tenant.user,)).fetchone():
                    raise Conflict(
                        f"user {tenant.user} is already a tenant",
                        "remove it first, or pick another user",
                    ) from None
                owner = db.execute(
                    "SELECT user FROM tenants WHERE range_start = ?", (tenant.range_start,)
                ).fetchone()
                if owner:
                    raise Conflict(
                        f"ID range starting at {tenant.range_start} is already given to {owner[0]}",
                        "allocate a range that is not in the state database (any phase)",
                    ) from None
                raise
            db.execute(
                "INSERT INTO quotas (user, cpus, memory, pids, disk) VALUES (?, ?, ?, ?, ?)",
                (tenant.user, *astuple(quota)),
            )
            _take_range(db, tenant.range_start, tenant.user)

    def set_phase(self, user: str, phase: str) -> None:
        _check_phase(phase)
        self._change_one(user, "UPDATE tenants SET phase = ? WHERE user = ?", (phase, user))

    def set_desired(self, user: str, desired: str) -> None:
        """An explicit start or stop: a tenant stopped for idleness is no longer dormant."""
        _check_desired(desired)
        with self._write() as db:
            sql = "UPDATE tenants SET desired = ? WHERE user = ?"
            if db.execute(sql, (desired, user)).rowcount == 0:
                raise not_a_tenant(user)
            db.execute("DELETE FROM dormant WHERE user = ?", (user,))

    # -- auto-stop -------------------------------------------------------------------------

    def set_auto_stop(self, user: str, after: int | None) -> None:
        """The tenant's own idle time before auto-stop (seconds, 0: never); None: the default."""
        with self._write() as db:
            if not db.execute("SELECT 1 FROM tenants WHERE user = ?", (user,)).fetchone():
                raise not_a_tenant(user)
            db.execute("DELETE FROM auto_stop WHERE user = ?", (user,))
            if after is not None:
                db.execute("INSERT INTO auto_stop (user, after) VALUES (?, ?)", (user, after))

    def auto_stops(self) -> dict[str, int]:
        """Every tenant's own auto-stop setting, by user (the others take the default)."""
        with self._reading() as db:
            return {str(u): int(a) for u, a in db.execute("SELECT user, after FROM auto_stop")}

    def set_dormant(self, user: str, idle_since: str) -> None:
        """Record a tenant stopped for idleness: desired 'stopped' (reconcile leaves it so; the
        next session starts it), and since when it was idle."""
        with self._write() as db:
            sql = "UPDATE tenants SET desired = 'stopped' WHERE user = ?"
            if db.execute(sql, (user,)).rowcount == 0:
                raise not_a_tenant(user)
            db.execute(
                "INSERT OR REPLACE INTO dormant (user, idle_since, at) VALUES (?, ?, ?)",
                (user, idle_since, utc_now()),
            )

    def dormant(self, user: str) -> str | None:
        """Since when the tenant was idle, if it was stopped for it and not started since."""
        with self._reading() as db:
            row = db.execute("SELECT idle_since FROM dormant WHERE user = ?", (user,)).fetchone()
        return None if row is None else str(row[0])

    def set_failure(self, user: str, reason: str | None) -> None:
        """Record why the tenant's start failed; None clears it (it started, or was stopped)."""
        with self._write() as db:
            db.execute("DELETE FROM failures WHERE user = ?", (user,))
            if reason is not None:
                db.execute(
                    "INSERT INTO failures (user, at, reason) VALUES (?, ?, ?)",
                    (user, utc_now(), reason),
                )

    def failure(self, user: str) -> str | None:
        with self._reading() as db:
            row = db.execute("SELECT reason FROM failures WHERE user = ?", (user,)).fetchone()
        return None if row is None else str(row[0])

    def set_image(self, user: str, image: str) -> None:
        self._change_one(user, "UPDATE tenants SET image = ? WHERE user = ?", (image, user))

    def delete_tenant(self, user: str, range_to: str) -> None:
        """Forget a tenant; its quota goes with it (ON DELETE CASCADE), its events stay. Its ID
        range becomes `range_to`: "kept" or "quarantined", or "free" (its record goes)."""
        if range_to not in ("kept", "quarantined", "free"):
            raise ValueError(f"range_to {range_to!r} is not kept, quarantined or free")
        with self._write() as db:
            row = db.execute("SELECT range_start FROM tenants WHERE user = ?", (user,)).fetchone()
            if row is None:
                raise not_a_tenant(user)
            db.execute("DELETE FROM tenants WHERE user = ?", (user,))
            if range_to == "free":
                db.execute("DELETE FROM ranges WHERE start = ? AND user = ?", (row[0], user))
            else:
                db.execute(
                    "UPDATE ranges SET status = ?, since = ? WHERE start = ? AND user = ?",
                    (range_to, utc_now(), row[0], user),
                )

    def reclaimed(self, t: Tenant) -> bool:
        """Whether t's add took back its user's quarantined range: undone, it is quarantined
        again, not freed (also after a crash: the audit log says so)."""
        with self._reading() as db:
            row = db.execute(
                "SELECT 1 FROM events WHERE user = ? AND what = ? AND at >= ?",
                (t.user, _reclaim(t.range_start), t.created),
            ).fetchone()
        return row is not None

    def tenant(self, user: str) -> Tenant | None:
        with self._reading() as db:
            row = db.execute(
                f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE user = ?", (user,)
            ).fetchone()
        return None if row is None else Tenant(*row)

    def tenants(self) -> list[Tenant]:
        """Every tenant, in any phase, ordered by user name."""
        with self._reading() as db:
            rows = db.execute(f"SELECT {_TENANT_COLUMNS} FROM tenants ORDER BY user")
            return [Tenant(*row) for row in rows]

    def records(self, user: str | None = None) -> list[TenantRecord]:
        """Every tenant (or just `user`) with its quota, failure and dormancy, ordered by user
        name: one statement, so one snapshot however many tenants `hostctl status` lists."""
        columns = ", ".join(f"t.{c}" for c in _TENANT_COLUMNS.split(", "))
        where, params = ("WHERE t.user = ?", (user,)) if user is not None else ("", ())
        with self._reading() as db:
            rows = db.execute(
                f"SELECT {columns}, q.cpus, q.memory, q.pids, q.disk, f.reason, d.idle_since"
                " FROM tenants t LEFT JOIN quotas q ON q.user = t.user"
                " LEFT JOIN failures f ON f.user = t.user"
                f" LEFT JOIN dormant d ON d.user = t.user {where} ORDER BY t.user",
                params,
            ).fetchall()
        return [TenantRecord(Tenant(*r[:9]), Limits(*r[9:13]), r[13], r[14]) for r in rows]

    def range_starts(self) -> list[int]:
        """Every ID range handed out, whatever the tenant's phase, and every kept or
        quarantined one: allocation must avoid them."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT range_start FROM tenants UNION SELECT start FROM ranges ORDER BY 1"
            )
            return [start for (start,) in rows]

    # -- ID ranges -------------------------------------------------------------------------

    def ranges(self) -> list[IdRangeRecord]:
        """Every recorded ID range, by start."""
        with self._reading() as db:
            rows = db.execute("SELECT start, user, status, since FROM ranges ORDER BY start")
            return [IdRangeRecord(*row) for row in rows]

    def kept_range(self, user: str) -> int | None:
        """Start of the range kept for `user` by `user remove --keep-data`, if any."""
        with self._reading() as db:
            row = db.execute(
                "SELECT start FROM ranges WHERE user = ? AND status = 'kept'", (user,)
            ).fetchone()
        return None if row is None else int(row[0])

    def keep_range(self, start: int, user: str) -> None:
        """Record a range as kept for `user` (a container kept by an older hostd)."""
        with self._write() as db:
            record = _range(db, start)
            if record is not None:
                raise _range_in_use(record)
            db.execute(
                "INSERT INTO ranges (start, user, status, since) VALUES (?, ?, 'kept', ?)",
                (start, user, utc_now()),
            )

    def release_range(self, start: int, first: Callable[[], None]) -> IdRangeRecord:
        """Forget a quarantined range so allocation may hand it out again; refused for a
        range in use (active) or waiting for its user (kept). `first` runs once the range is
        known to be releasable, before the record goes (it must be idempotent: a crash in
        between leaves the range quarantined). Returns what was released."""
        with self._write() as db:
            record = _range(db, start)
            if record is None:
                raise NotFound(f"no ID range starts at {start}", "see `hostctl ranges`")
            if record.status != "quarantined":
                raise _range_in_use(record)
            first()
            db.execute("DELETE FROM ranges WHERE start = ?", (start,))
            return record

    def quota(self, user: str) -> Limits:
        with self._reading() as db:
            row = db.execute(
                "SELECT q.cpus, q.memory, q.pids, q.disk"
                " FROM tenants t LEFT JOIN quotas q ON q.user = t.user WHERE t.user = ?",
                (user,),
            ).fetchone()
        if row is None:
            raise not_a_tenant(user)
        return Limits(*row)

    def set_quota(self, user: str, quota: Limits) -> None:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM tenants WHERE user = ?", (user,)).fetchone():
                raise not_a_tenant(user)
            db.execute(
                "INSERT OR REPLACE INTO quotas (user, cpus, memory, pids, disk)"
                " VALUES (?, ?, ?, ?, ?)",
                (user, *astuple(quota)),
            )

    # -- networking ------------------------------------------------------------------------

    def address_index(
        self, user: str, exclude: Iterable[int] = (), prefer: int | None = None
    ) -> int:
        """The tenant's network address slot: its own, else `prefer` if free, else the lowest
        free one not in `exclude` (slots held outside the database); then kept."""
        with self._write() as db:
            row = db.execute("SELECT idx FROM addresses WHERE user = ?", (user,)).fetchone()
            if row:
                return int(row[0])
            if not db.execute("SELECT 1 FROM tenants WHERE user = ?", (user,)).fetchone():
                raise not_a_tenant(user)
            used = {int(r[0]) for r in db.execute("SELECT idx FROM addresses")} | set(exclude)
            if prefer is not None and prefer not in used:
                idx = prefer
            else:
                idx = next(i for i in range(len(used) + 1) if i not in used)
            db.execute("INSERT INTO addresses (user, idx) VALUES (?, ?)", (user, idx))
            return idx

    def address_slots(self) -> dict[str, int]:
        """Every tenant's address slot, by user."""
        with self._reading() as db:
            return {str(u): int(i) for u, i in db.execute("SELECT user, idx FROM addresses")}

    def grant_ports(self, user: str, first: int, last: int) -> None:
        """Give `user` the host ports first..last; refused if any belongs to someone, or while
        the tenant is being added or removed (a rolled-back add would leave its forwards)."""
        with self._write() as db:
            row = db.execute("SELECT phase FROM tenants WHERE user = ?", (user,)).fetchone()
            if not row:
                raise not_a_tenant(user)
            if row[0] != "ready":
                raise Busy(f"{user} is being set up or removed ({row[0]})", "try again in a minute")
            clash = db.execute(
                "SELECT first, last, user FROM port_grants WHERE first <= ? AND ? <= last",
                (last, first),
            ).fetchone()
            if clash:
                owner = "them" if clash[2] == user else clash[2]
                raise Conflict(
                    f"ports {first}-{last} overlap {clash[0]}-{clash[1]} granted to {owner}",
                    "revoke those first or pick other ports",
                )
            db.execute(
                "INSERT INTO port_grants (first, last, user) VALUES (?, ?, ?)", (first, last, user)
            )

    def revoke_ports(self, user: str, first: int, last: int) -> None:
        with self._write() as db:
            gone = db.execute(
                "DELETE FROM port_grants WHERE user = ? AND first = ? AND last = ?",
                (user, first, last),
            ).rowcount
            if not gone:
                raise NotFound(
                    f"{user} has no grant of ports {first}-{last}", "see `hostctl ports list`"
                )

    def port_grants(self) -> list[tuple[int, int, str]]:
        """(first, last, user) of every grant, by port."""
        with self._reading() as db:
            rows = db.execute("SELECT first, last, user FROM port_grants ORDER BY first")
            return [(int(a), int(b), str(u)) for a, b, u in rows]

    def log_event(self, user: str | None, what: str) -> None:
        """Append to the audit log of admin actions (add, remove, quota, start, stop)."""
        with self._write() as db:
            db.execute(
                "INSERT INTO events (at, user, what) VALUES (?, ?, ?)", (utc_now(), user, what)
            )

    def events(
        self, user: str | None = None, limit: int = 100
    ) -> list[tuple[str, str | None, str]]:
        """The latest `limit` events as (at, user, what), oldest first; user None means all."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        where, params = ("", ()) if user is None else ("WHERE user = ?", (user,))
        with self._reading() as db:
            rows = db.execute(
                "SELECT at, user, what FROM"
                f" (SELECT id, at, user, what FROM events {where} ORDER BY id DESC LIMIT ?)"
                " ORDER BY id",
                (*params, limit),
            )
            return [(at, who, what) for at, who, what in rows]


def _user_version(db: sqlite3.Connection) -> int:
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


def _range(db: sqlite3.Connection, start: int) -> IdRangeRecord | None:
    row = db.execute(
        "SELECT start, user, status, since FROM ranges WHERE start = ?", (start,)
    ).fetchone()
    return None if row is None else IdRangeRecord(*row)


def _take_range(db: sqlite3.Connection, start: int, user: str) -> None:
    """Make the range at `start` active for `user`: a new one, or their own again (kept, or
    quarantined since their removal: the quarantine keeps a range from other users; the
    same user re-added or imported under a fixed range gets their own back)."""
    record = _range(db, start)
    if record is None:
        db.execute(
            "INSERT INTO ranges (start, user, status, since) VALUES (?, ?, 'active', ?)",
            (start, user, utc_now()),
        )
    elif record.user == user and record.status in ("kept", "quarantined"):
        db.execute(
            "UPDATE ranges SET status = 'active', since = ? WHERE start = ?", (utc_now(), start)
        )
        if record.status == "quarantined":  # an undone add puts it back (State.reclaimed)
            db.execute(
                "INSERT INTO events (at, user, what) VALUES (?, ?, ?)",
                (utc_now(), user, _reclaim(start)),
            )
    else:
        raise _range_in_use(record)


def _reclaim(start: int) -> str:
    return f"reclaim quarantined range={start}"


def _range_in_use(r: IdRangeRecord) -> Conflict:
    fixes = {
        "active": f"remove the tenant first (`hostctl user remove {r.user}`)",
        "kept": f"add {r.user} again, or add and remove them without --keep-data",
        "quarantined": f"release it first (`hostctl ranges release {r.start}`)",
    }
    return Conflict(
        f"ID range starting at {r.start} is {r.status} for {r.user} since {r.since}",
        fixes[r.status],
    )


def not_a_tenant(user: str) -> NotFound:
    return NotFound(f"{user} is not a tenant", f"add them with `hostctl user add {user}`")
