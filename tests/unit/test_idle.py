"""Auto-stop of idle tenants (hostd.idle): the idle decision on a fake clock against the
in-memory runtime, the /proc scan on a made-up /proc, the setting's parsing. No root."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from hostd import config
from hostd.config import SessionSettings, format_duration, parse_duration
from hostd.idle import MAX_PERIOD, AutoStopper, busy_ranges, period
from hostd.sessions import Sessions
from hostd.tenants import Tenants
from runtime.containers import Runtime
from tests.unit.test_tenants import Host, make_host

DAY = 86400


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """A host with one running tenant, alice, and an auto-stopper over it."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.clock = Clock()
        self.tenants: Tenants = host.tenants()
        self.sessions = Sessions(self.tenants, _runtime(host), SessionSettings(8), clock=self.clock)
        self.busy: set[int] = set()  # range starts the scan finds in use
        self.scans = 0
        self.stopper = AutoStopper(self.tenants, self.sessions, scan=self._scan)
        self.alice = self.tenants.add(host.user("alice", uid=1500))
        self.tenants.start("alice")

    def _scan(self, starts: Iterable[int]) -> set[int]:
        self.scans += 1
        return self.busy & set(starts)

    def after(self, seconds: float) -> list[str]:
        """Let `seconds` pass, then check."""
        self.clock.now += seconds
        return self.stopper.check()

    def running(self) -> bool:
        return self.host.rt.state("alice").status == "running"


def _runtime(host: Host) -> Runtime:
    return host.rt  # type: ignore[return-value]  # the fake stands in for the real one


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(make_host(tmp_path))
    yield w
    w.host.state.close()


def test_off_by_default_nothing_is_stopped_nor_scanned(world: World) -> None:
    assert world.tenants.config.sessions.auto_stop == 0
    assert world.after(365 * DAY) == []
    assert world.running() and world.scans == 0
    assert world.tenants.auto_stop_setting("alice") == "off (default)"


def test_an_idle_tenant_is_stopped_after_its_time_and_says_why(world: World) -> None:
    assert world.tenants.set_auto_stop("alice", 3 * DAY) == "3d"
    assert world.after(3 * DAY - 1) == [] and world.running()
    assert world.after(1) == ["stopped alice, idle for 3d"]
    assert not world.running()
    status = world.tenants.status("alice")
    assert status.state == "stopped"
    assert status.reason is not None and status.reason.startswith("idle since 20")
    assert status.reason.endswith("; starts at the next login")
    assert world.host.state.tenant("alice").desired == "stopped"  # type: ignore[union-attr]
    assert world.host.state.events("alice")[-1][2].startswith("auto-stop idle-since=")
    assert world.after(10 * DAY) == []  # stopped once


def test_a_stop_that_fails_leaves_it_running_and_not_dormant(world: World) -> None:
    world.tenants.set_auto_stop("alice", 60)
    world.host.rt.fail("stop")
    assert world.after(60) == []
    assert world.running() and world.host.state.dormant("alice") is None
    assert world.host.state.tenant("alice").desired == "running"  # type: ignore[union-attr]
    assert world.after(60) == ["stopped alice, idle for 1m"]  # the next check stops it


def test_a_dormant_tenant_stays_stopped_at_reconcile_and_starts_at_its_next_session(
    world: World,
) -> None:
    world.tenants.set_auto_stop("alice", 60)
    world.after(60)
    assert world.host.tenants().reconcile() == [] and not world.running()  # a restarted hostd
    with world.sessions.slot("alice"):
        world.sessions.running_pid("alice")
    assert world.running()
    assert world.tenants.status("alice").reason is None
    assert world.host.state.dormant("alice") is None


def test_a_user_process_or_dockerd_keeps_it_up_and_the_clock_restarts_when_it_ends(
    world: World,
) -> None:
    world.tenants.set_auto_stop("alice", 60)
    world.busy = {world.alice.range_start}
    assert world.after(600) == [] and world.running()
    world.busy = set()
    assert world.after(59) == [] and world.running()
    assert world.after(1) == ["stopped alice, idle for 1m"]


def test_an_open_session_keeps_it_up_and_its_end_restarts_the_clock(world: World) -> None:
    world.tenants.set_auto_stop("alice", 60)
    with world.sessions.slot("alice"):
        assert world.after(600) == [] and world.running()
    assert world.after(59) == [] and world.running()
    assert world.after(1) != []


def test_a_session_arriving_during_the_stop_wins(world: World) -> None:
    world.tenants.set_auto_stop("alice", 60)
    stopper = world.stopper

    def session_meanwhile(user: str, since: float) -> str | None:
        with world.sessions.slot(user):  # a login between the check and the lock
            pass
        return AutoStopper._still_idle(stopper, user, since)

    stopper._still_idle = session_meanwhile  # type: ignore[method-assign]
    assert world.after(60) == [] and world.running()
    assert "alice" not in world.tenants.stopping


def test_a_session_waits_for_a_stop_under_way_and_starts_it_again(world: World) -> None:
    world.tenants.stopping.add("alice")  # auto-stop holds the lock and stops it
    world.host.rt.stop("alice", 1)  # as it will have done once the session gets the lock
    with world.sessions.slot("alice"):
        assert world.sessions.running_pid("alice") == world.host.rt.state("alice").pid
    assert world.running()


def test_an_admin_stop_and_the_default_setting(world: World, tmp_path: Path) -> None:
    world.tenants.stop("alice")
    world.tenants.set_auto_stop("alice", 1)
    assert world.after(DAY) == []  # desired stopped: nothing to do
    assert world.tenants.status("alice").reason is None
    assert world.tenants.set_auto_stop("alice", 0) == "off"
    assert world.tenants.set_auto_stop("alice", None) == "off (default)"


def test_the_setting_parses_and_prints() -> None:
    assert [parse_duration(v) for v in ("off", "14d", "12h", "30s", 90, "0")] == [
        0,
        14 * DAY,
        12 * 3600,
        30,
        90,
        0,
    ]
    assert [format_duration(s) for s in (0, 14 * DAY, 90, 120, 3600)] == [
        "off",
        "14d",
        "90s",
        "2m",
        "1h",
    ]
    for bad in ("3 weeks", "-1d", "1.5h", True):
        with pytest.raises(ValueError, match="like"):
            parse_duration(bad)


def test_the_config_key(tmp_path: Path) -> None:
    main = tmp_path / "hostd.toml"
    main.write_text('[sessions]\nauto_stop = "14d"\n')
    assert config.load(main, tmp_path / "none").sessions.auto_stop == 14 * DAY


def test_checks_come_well_within_the_shortest_setting() -> None:
    assert period([0]) == MAX_PERIOD
    assert period([0, 14 * DAY]) == MAX_PERIOD
    assert period([0, 6, 14 * DAY]) == 1.0
    assert period([1]) == 0.5


def test_the_scan_finds_account_processes_and_dockerd(tmp_path: Path) -> None:
    """Made-up /proc entries are ours: choose ranges so that our uid is a given inner uid."""
    uid = os.getuid()
    (tmp_path / "self").mkdir()  # not a process
    for pid, comm in (("10", "bash"), ("11", "dockerd")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "comm").write_text(comm + "\n")
    user_range = uid - 1000  # our uid is inner 1000: an account's
    assert busy_ranges([user_range], tmp_path) == {user_range}
    assert busy_ranges([uid - 65534], tmp_path) == set()  # inner nobody
    assert busy_ranges([uid + 1], tmp_path) == set()  # below the range
    (tmp_path / "11" / "comm").write_text("containerd\n")
    assert busy_ranges([uid], tmp_path) == set()  # root inside, no dockerd
    (tmp_path / "10" / "comm").write_text("dockerd\n")
    assert busy_ranges([uid], tmp_path) == {uid}
    assert busy_ranges([], tmp_path / "gone") == set()
