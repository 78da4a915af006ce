"""Backups without hostd: names, chains, which archive a run writes, retention, the pick of a
restore, leftovers of a crash, and a directory hostd cannot trust (a fake exporter writes)."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest

from hostd import protocol as p
from hostd.archive import CHUNK_SIZE, Manifest
from hostd.backups import (
    Archive,
    Backups,
    chain_at,
    chains,
    expired,
    next_kind,
    parse_archive,
    parse_time,
    stamp,
)
from hostd.config import BackupSettings
from hostd.errors import HostdError
from hostd.service import Service
from hostd.sessions import Sessions
from hostd.tenants import Tenants
from hostd.transfer import Transfers
from runtime.containers import Runtime
from runtime.errors import Busy, NotFound, RuntimeFailure
from tests.unit.test_service import FakeSessions, FakeTenants, World, _tenant, error, result

T0 = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def _a(day: int, kind: str) -> Archive:
    found = parse_archive(f"{stamp(T0 + timedelta(days=day))}-{kind}.hostd")
    assert found is not None
    return found


def test_names_sort_as_times_and_other_files_are_no_archives() -> None:
    when = datetime(2026, 12, 1, 3, 4, 5, 678901, tzinfo=UTC)
    assert stamp(when) == "20261201T030405.678Z"
    a = parse_archive("20261201T030405.678Z-incr.hostd")
    assert a is not None and (a.kind, a.time) == ("incr", when.replace(microsecond=678000))
    assert a.name == "20261201T030405.678Z-incr.hostd"
    for name in (
        ".20261201T030405.678Z-full.hostd.tmp",
        "20261201T030405.678Z-full.manifest.json",
        "20261201T030405.678Z-diff.hostd",
        "../20261201T030405.678Z-full.hostd",
        "notes.txt",
    ):
        assert parse_archive(name) is None


def test_at_takes_dates_times_and_backup_names() -> None:
    assert parse_time("2026-12-01T03:00") == T0
    assert parse_time("2026-12-01T04:00+01:00") == T0
    assert parse_time("20261201T030000.000Z") == T0
    assert parse_time("2026-12-01") == T0.replace(hour=23, minute=59, second=59, microsecond=999999)
    with pytest.raises(HostdError, match="is not a time"):
        parse_time("yesterday")


def test_chains_group_a_full_with_the_incrementals_after_it() -> None:
    f0, i1, f2, i3 = _a(0, "full"), _a(1, "incr"), _a(2, "full"), _a(3, "incr")
    orphan = _a(-1, "incr")
    assert chains([i3, f2, orphan, i1, f0]) == [[f0, i1], [f2, i3]]


def test_a_full_every_n_runs_and_when_asked() -> None:
    assert next_kind([], 7, False) == "full"
    chain = [_a(0, "full"), _a(1, "incr")]
    assert next_kind(chain, 3, False) == "incr"
    assert next_kind(chain, 2, False) == "full"
    assert next_kind(chain, 3, True) == "full"
    assert next_kind(chain[:1], 1, False) == "full"  # full_every = 1: only fulls


def test_retention_deletes_whole_chains_never_a_kept_incrementals_full() -> None:
    f0, i1, i2, f3, i4 = _a(0, "full"), _a(1, "incr"), _a(2, "incr"), _a(3, "full"), _a(4, "incr")
    assert expired([f0, i1, i2, f3, i4], keep=1) == [f0, i1, i2]
    assert expired([f0, i1, i2, f3, i4], keep=2) == []
    orphan = _a(-1, "incr")
    assert expired([orphan, f3, i4], keep=1) == [orphan]


def test_restore_picks_the_chain_up_to_the_time() -> None:
    f0, i1, i2, f3 = _a(0, "full"), _a(1, "incr"), _a(2, "incr"), _a(3, "full")
    found = [f0, i1, i2, f3]
    assert chain_at(found, None) == [f3]
    assert chain_at(found, f3.time - timedelta(seconds=1)) == [f0, i1, i2]
    assert chain_at(found, i1.time) == [f0, i1]
    assert chain_at(found, f0.time - timedelta(days=1)) == []


class FakeExporter:
    """Writes `<user> <n>` as the archive and a manifest whose id is `<n>`; records the id of
    the parent it was given, its thread's scheduling policy and whether it was asked to run in
    the background; fails for users in `failing`."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.parents: list[int | None] = []
        self.policies: list[tuple[int, bool]] = []
        self.block: threading.Event | None = None
        self.entered = threading.Event()
        self.running: set[str] = set()

    def frozen_for_export(self, user: str) -> bool:
        return user in self.running

    def export(
        self,
        user: str,
        out: int,
        since: tuple[int, str] | None,
        with_home: bool,
        progress: object,
        manifest_to: int | None = None,
        background: bool = False,
    ) -> None:
        self.entered.set()
        if self.block is not None:
            self.block.wait(10)
        self.policies.append((os.sched_getscheduler(0), background))
        parent = None if since is None else Manifest.parse(os.read(since[0], 1 << 20), since[1])
        self.parents.append(None if parent is None else int(parent.id, 16))
        n = len(self.parents)
        os.write(out, f"{user} {n}".encode())
        if user in self.failing:
            raise RuntimeFailure(f"cannot read {user}'s volume", "check it")
        assert manifest_to is not None
        os.write(manifest_to, manifest(n))


def manifest(n: int) -> bytes:
    sha = "0" * 64
    return Manifest(f"{n:032x}", CHUNK_SIZE, {0: sha}, (), sha, sha).encode()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(hours=1)
        return self.now


@pytest.fixture
def exporter() -> FakeExporter:
    return FakeExporter()


@pytest.fixture
def backup_dir(tmp_path: Path) -> Iterator[Path]:
    os.chmod(tmp_path, 0o755)
    yield tmp_path / "backups"


def _backups(path: Path | None, exporter: FakeExporter, keep: int = 2, every: int = 3) -> Backups:
    return Backups(BackupSettings(path, keep, every, False), exporter, Clock())


def _quiet(_: str) -> None:
    pass


def _files(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def test_a_run_writes_archives_and_manifests_hostd_alone_can_read(
    backup_dir: Path, exporter: FakeExporter
) -> None:
    backups = _backups(backup_dir, exporter)
    (a, b) = backups.run(["alice", "bob"], False, _quiet)
    assert a.error is None and a.archive is not None and a.archive.kind == "full"
    assert stat.S_IMODE(backup_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((backup_dir / "alice").stat().st_mode) == 0o700
    name = a.archive.name
    assert _files(backup_dir / "alice") == [name, name.replace(".hostd", ".manifest.json")]
    archive = backup_dir / "alice" / name
    assert archive.read_bytes() == b"alice 1" and a.archive.size == 7
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    copy = backup_dir / "alice" / name.replace(".hostd", ".manifest.json")
    assert copy.read_bytes() == manifest(1)
    assert exporter.policies == [(os.SCHED_IDLE, True), (os.SCHED_IDLE, True)]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the worker thread gets its own back
    exporter.running.add("alice")  # frozen while it is copied: no idle priority for that one
    backups.run(["alice", "bob"], False, _quiet)
    assert exporter.policies[2:] == [(os.SCHED_OTHER, False), (os.SCHED_IDLE, True)]


def test_incrementals_get_the_last_archives_manifest_then_a_new_chain(
    backup_dir: Path, exporter: FakeExporter
) -> None:
    backups = _backups(backup_dir, exporter, keep=1, every=2)
    kinds = []
    for _ in range(5):
        (r,) = backups.run(["alice"], False, _quiet)
        assert r.archive is not None
        kinds.append(r.archive.kind)
    assert kinds == ["full", "incr", "full", "incr", "full"]
    assert exporter.parents == [None, 1, None, 3, None]
    (only,) = backups.listing("alice")["alice"]
    assert only.kind == "full" and only.chain == only.stem
    assert len(_files(backup_dir / "alice")) == 2  # the archive and its manifest
    (r,) = backups.run(["alice"], True, _quiet)  # --full, whatever the count
    assert r.archive is not None and r.archive.kind == "full"


def test_retention_keeps_the_newest_chains_whole(backup_dir: Path, exporter: FakeExporter) -> None:
    backups = _backups(backup_dir, exporter, keep=1, every=2)
    results = [backups.run(["alice"], False, _quiet)[0] for _ in range(4)]
    written = [r.archive.name for r in results if r.archive is not None]
    assert [r.removed for r in results] == [(), (), tuple(written[:2]), ()]
    kept = backups.listing("alice")["alice"]
    assert [a.name for a in kept] == written[2:] and {a.chain for a in kept} == {kept[0].stem}


def test_one_failing_tenant_does_not_stop_the_others_and_keeps_its_backups(
    backup_dir: Path, exporter: FakeExporter
) -> None:
    backups = _backups(backup_dir, exporter, keep=1, every=1)
    backups.run(["alice", "bob"], False, _quiet)
    exporter.failing = {"alice"}
    a, b = backups.run(["alice", "bob"], False, _quiet)
    assert a.archive is None and a.error == "cannot read alice's volume: check it"
    assert b.archive is not None and b.error is None and len(b.removed) == 1
    assert len(backups.listing("alice")["alice"]) == 1  # the old one, and no half archive
    assert len(_files(backup_dir / "alice")) == 2


def test_a_second_run_is_busy(backup_dir: Path, exporter: FakeExporter) -> None:
    backups = _backups(backup_dir, exporter)
    exporter.block = threading.Event()
    first = threading.Thread(target=backups.run, args=(["alice"], False, _quiet))
    first.start()
    try:
        assert exporter.entered.wait(10)
        with pytest.raises(Busy, match="a backup run is under way"):
            backups.run(["bob"], False, _quiet)
        with pytest.raises(Busy), backups.chain_files("alice", None):
            pass
    finally:
        exporter.block.set()
        first.join()


def test_restore_opens_the_chain_in_order(backup_dir: Path, exporter: FakeExporter) -> None:
    backups = _backups(backup_dir, exporter, every=3)
    for _ in range(4):
        backups.run(["alice"], False, _quiet)
    archives = backups.listing("alice")["alice"]
    with backups.chain_files("alice", None) as files:
        assert [os.read(fd, 100) for fd, _ in files] == [b"alice 4"]
        assert [name for _, name in files] == [str(backup_dir / "alice" / archives[3].name)]
    with backups.chain_files("alice", archives[1].time) as files:
        assert [os.read(fd, 100) for fd, _ in files] == [b"alice 1", b"alice 2"]
    with (
        pytest.raises(NotFound, match="no backup of alice at or before 2026"),
        backups.chain_files("alice", T0),
    ):
        pass
    with pytest.raises(NotFound, match="no backups of bob"), backups.chain_files("bob", None):
        pass
    with (
        pytest.raises(RuntimeFailure, match="invalid user name '../alice'"),
        backups.chain_files("../alice", None),
    ):
        pass


def test_a_crash_leaves_nothing_a_restore_picks_and_the_next_run_clears_it(
    backup_dir: Path, exporter: FakeExporter
) -> None:
    backups = _backups(backup_dir, exporter)
    backups.run(["alice"], False, _quiet)
    user = backup_dir / "alice"
    left = [
        ".20261202T000000.000Z-incr.hostd.tmp",
        ".20261202T000000.000Z-incr.manifest.json.tmp",
        "20261202T000000.000Z-incr.manifest.json",  # renamed; its archive never was
    ]
    for name in left:
        (user / name).write_bytes(b"half")
    (user / "README").write_text("the admin's own")
    assert [a.kind for a in backups.listing("alice")["alice"]] == ["full"]
    backups.run(["alice"], False, _quiet)
    assert not set(left) & set(_files(user)) and (user / "README").exists()
    assert [a.kind for a in backups.listing("alice")["alice"]] == ["full", "incr"]


@pytest.mark.parametrize("damage", ["lost", "truncated"])
def test_a_lost_or_damaged_manifest_copy_starts_a_new_chain(
    backup_dir: Path, exporter: FakeExporter, damage: str
) -> None:
    backups = _backups(backup_dir, exporter)
    (r,) = backups.run(["alice"], False, _quiet)
    assert r.archive is not None
    copy = backup_dir / "alice" / (r.archive.stem + ".manifest.json")
    if damage == "lost":
        copy.unlink()
    else:
        copy.write_bytes(copy.read_bytes()[:-10])
    (r,) = backups.run(["alice"], False, _quiet)
    assert r.archive is not None and r.archive.kind == "full"


def test_a_clock_gone_back_keeps_the_order(backup_dir: Path, exporter: FakeExporter) -> None:
    backups = _backups(backup_dir, exporter)
    backups.run(["alice"], False, _quiet)
    backups.clock = lambda: T0  # before the first one
    (r,) = backups.run(["alice"], False, _quiet)
    assert r.archive is not None and r.archive.kind == "incr"
    assert [a.kind for a in backups.listing("alice")["alice"]] == ["full", "incr"]


def test_backups_off_say_how_to_turn_them_on(exporter: FakeExporter) -> None:
    with pytest.raises(HostdError, match=r"backups are off \(\[backup\] dir is empty\)"):
        _backups(None, exporter).run(["alice"], False, _quiet)


def test_a_symlinked_or_open_directory_is_refused(
    backup_dir: Path, exporter: FakeExporter, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    backup_dir.symlink_to(elsewhere)
    with pytest.raises(HostdError, match="is not a directory"):
        _backups(backup_dir, exporter).run(["alice"], False, _quiet)
    backup_dir.unlink()
    backup_dir.mkdir()
    os.chmod(backup_dir, 0o777)
    with pytest.raises(HostdError, match="can be written by users other than root"):
        _backups(backup_dir, exporter).run(["alice"], False, _quiet)
    os.chmod(backup_dir, 0o700)
    os.chmod(tmp_path, 0o777)  # a directory above: a user could swap the backup dir
    try:
        with pytest.raises(HostdError, match="a directory above"):
            _backups(backup_dir, exporter).run(["alice"], False, _quiet)
    finally:
        os.chmod(tmp_path, 0o755)
    (backup_dir / "bob").symlink_to(elsewhere)  # a tenant's own directory, planted
    a, b = _backups(backup_dir, exporter).run(["alice", "bob"], False, _quiet)
    assert a.archive is not None
    assert b.archive is None and b.error is not None and "is not a directory" in b.error
    assert os.listdir(elsewhere) == []


class FakeTransfers:
    def __init__(self) -> None:
        self.imported: list[tuple[list[bytes], list[str], str | None, str, bool]] = []

    def import_(
        self,
        fds: list[int],
        names: list[str],
        as_user: str | None,
        range_mode: str,
        with_home: bool,
        start: bool,
        progress: Callable[[str], None],
    ) -> p.Imported:
        self.imported.append(([os.read(fd, 100) for fd in fds], names, as_user, range_mode, start))
        return p.Imported(
            "bob", 1, 2, True, "default", "default@1", len(fds), 3, None, start, None, 1.0
        )


@pytest.fixture
def world(backup_dir: Path, exporter: FakeExporter) -> World:
    tenants, sessions = FakeTenants(), FakeSessions()
    tenants.tenants["alice"] = _tenant("alice")
    service = Service(
        cast(Tenants, tenants), cast(Runtime, tenants.runtime), "nogroup", cast(Sessions, sessions)
    )
    service.backups = _backups(backup_dir, exporter)
    service.transfers = cast(Transfers, FakeTransfers())
    return World(service, tenants, sessions, [])


def test_the_ops_run_list_and_restore_through_the_service(world: World, backup_dir: Path) -> None:
    runs = [p.decode_reply("backup.run", result(world, "backup.run", {})) for _ in range(2)]
    assert [[(r.user, r.archive and r.archive.kind) for r in run] for run in runs] == [
        [("root", "full"), ("alice", "full")],
        [("root", "incremental"), ("alice", "incremental")],
    ]
    (only,) = p.decode_reply("backup.run", result(world, "backup.run", {"users": ["alice"]}))
    assert only.user == "alice"
    assert error(world, "backup.run", {"users": ["alice", "ghost"]})["code"] == "not_found"
    listed = p.decode_reply("backup.list", result(world, "backup.list", {"user": "alice"}))
    assert [b.kind for b in listed] == ["full", "incremental", "incremental"]
    assert {b.chain for b in listed} == {listed[0].name}
    assert listed[0].created.endswith("Z") and listed[0].size == len(b"alice 2")
    args = {"user": "alice", "at": listed[1].created, "as_user": "bob", "start": False}
    done = p.decode_reply("backup.restore", result(world, "backup.restore", args))
    assert done.archives == 2
    transfers = cast(FakeTransfers, world.service.transfers)
    (contents, names, as_user, range_mode, start) = transfers.imported[-1]
    assert contents == [b"alice 2", b"alice 4"] and (as_user, range_mode, start) == (
        "bob",
        "auto",
        False,
    )
    assert names == [str(backup_dir / "alice" / b.name) for b in listed[:2]]
    bad = error(world, "backup.restore", {"user": "alice", "at": "soon"})
    assert bad["cause"] == "'soon' is not a time"
