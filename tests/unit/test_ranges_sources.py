"""`[subids] source` through Tenants.add (fake runtime, real state and subuid files): each
source's range, its collisions (nothing left behind), switching source on a host with tenants,
and check_free for a given range."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from hostd import config, ranges
from hostd.errors import HostdError
from hostd.tenants import Tenants
from runtime import proc
from runtime.errors import Conflict
from runtime.ids import RANGE_SIZE
from runtime.limits import Limits
from tests.unit.test_tenants import MIN, Host, make_host, nothing_recorded

# make_host's [users] min_uid is 1000 (no login.defs) and its span holds 4 ranges from MIN
ALICE, BOB, CAROL = 1002, 1000, 1001  # uids: formula ranges MIN + 2, 0 and 1 ranges up


def at(slot: int) -> int:
    return MIN + slot * RANGE_SIZE


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    """The test host; its owner of ranges is taken as existing: a unit test never creates a
    real account (CI's fresh machine has no hostd-ids when unit tests run)."""
    monkeypatch.setattr(ranges, "ensure_owner", lambda *_: False)
    h = make_host(tmp_path)
    yield h
    h.state.close()


def switch(host: Host, source: str) -> Tenants:
    """hostd restarted with `[subids] source` set (a drop-in), as an admin switches it."""
    dropins = host.root / "hostd.toml.d"
    dropins.mkdir(exist_ok=True)
    (dropins / "source.toml").write_text(f'[subids]\nsource = "{source}"\n')
    host.cfg = config.load(host.root / "hostd.toml")
    assert host.cfg.subids.source == source
    return host.tenants()


def directory(tenants: Tenants, granted: dict[str, tuple[int, int]]) -> None:
    """The subid provider (getsubids) gives each user (start, count), for UIDs and GIDs."""

    def run(argv: Sequence[str]) -> proc.Result:
        user = argv[-1]
        if user not in granted:
            return proc.Result(("getsubids", *argv), 1, "", "Error fetching ranges\n")
        start, count = granted[user]
        return proc.Result(("getsubids", *argv), 0, f"0: {user} {start} {count}\n", "")

    tenants.ranges.getsubids = run


def write(host: Host, line: str) -> None:
    for name in ("subuid", "subgid"):
        with (host.root / name).open("a") as f:
            f.write(line + "\n")


def files(host: Host) -> tuple[str | None, ...]:
    """subuid and subgid as they are (None: missing)."""
    paths = (host.root / "subuid", host.root / "subgid")
    return tuple(p.read_text() if p.exists() else None for p in paths)


# -- deterministic ---------------------------------------------------------------------------


def test_deterministic_gives_the_formulas_range(host: Host) -> None:
    tenants = switch(host, "deterministic")
    t = tenants.add(host.user("alice", uid=ALICE))
    assert t.range_start == at(2)
    assert host.ranges() == {at(2): ("alice", "active")} and host.registered() == [at(2)]


def test_the_same_user_gets_the_same_range_on_another_host(host: Host, tmp_path: Path) -> None:
    """Another host: other state, other subuid files, other tenants added before."""
    (tmp_path / "other").mkdir()
    other = make_host(tmp_path / "other")
    try:
        here, there = switch(host, "deterministic"), switch(other, "deterministic")
        there.add(other.user("carol", uid=CAROL))
        a = here.add(host.user("alice", uid=ALICE)).range_start
        assert there.add(other.user("alice", uid=ALICE)).range_start == a == at(2)
    finally:
        other.state.close()


def test_a_uid_past_max_is_a_one_line_error_and_nothing_is_left(host: Host) -> None:
    tenants = switch(host, "deterministic")
    with pytest.raises(HostdError) as info:
        tenants.add(host.user("dave", uid=1004))
    start = at(4)
    assert str(info.value) == (
        f"uid 1004's deterministic ID range {start}-{start + RANGE_SIZE - 1} "
        f"(start = {MIN} + (uid - 1000) * 65536) ends past [subids] max {at(4) - 1} "
        f"(it fits uids 1000-1003): raise [subids] max to at least {start + RANGE_SIZE - 1} "
        "or lower [subids] min"
    )
    assert nothing_recorded(host) and host.rt.boxes == {}


@pytest.mark.parametrize("file", ["subuid", "subgid"])
def test_a_foreign_entry_in_the_way_is_a_conflict_and_nothing_is_left(
    host: Host, file: str
) -> None:
    tenants = switch(host, "deterministic")
    (host.root / file).write_text(f"mallory:{at(2) + 100}:10\n")
    before = files(host)
    with pytest.raises(Conflict) as info:
        tenants.add(host.user("alice", uid=ALICE))
    assert str(info.value) == (
        f"alice's deterministic ID range {at(2)}-{at(3) - 1} (uid {ALICE}) collides with "
        f"mallory's entry mallory:{at(2) + 100}:10 in {host.root / file}: remove that entry "
        "(a tenant keeps its range), or move [subids] min and max"
    )
    assert host.state.tenants() == [] and host.ranges() == {} and host.rt.boxes == {}
    assert files(host) == before


def test_the_users_own_entry_is_a_conflict_they_could_map_it(host: Host) -> None:
    """useradd (SUB_UID_DETERMINISTIC) may have given alice her formula range under her own
    name: with it, newuidmap would let her be her container's root on the host."""
    tenants = switch(host, "deterministic")
    write(host, f"alice:{at(2)}:{RANGE_SIZE}")
    with pytest.raises(Conflict, match=f"alice's entry alice:{at(2)}:65536 in"):
        tenants.add(host.user("alice", uid=ALICE))


# -- switching source on a host with tenants -------------------------------------------------


def test_switching_source_keeps_existing_ranges_new_tenants_follow_the_new_one(
    host: Host,
) -> None:
    local = host.tenants()
    assert local.add(host.user("alice", uid=ALICE)).range_start == at(0)  # first free
    det = switch(host, "deterministic")
    assert det.get("alice").range_start == at(0)  # never re-ranged
    assert det.add(host.user("carol", uid=CAROL)).range_start == at(1)  # the formula's
    with pytest.raises(Conflict) as info:  # bob's formula range is alice's, given locally
        det.add(host.user("bob", uid=BOB))
    assert info.value.cause.startswith(
        f"bob's deterministic ID range {at(0)}-{at(1) - 1} (uid {BOB}) collides with "
        f"alice's range {at(0)}-{at(1) - 1} in hostd's state (active since "
    )
    assert host.state.tenant("bob") is None
    back = switch(host, "local")
    assert back.add(host.user("dave", uid=1003)).range_start == at(2)  # first free again
    assert {t.user: t.range_start for t in host.state.tenants()} == {
        "alice": at(0),
        "carol": at(1),
        "dave": at(2),
    }
    assert host.registered() == [at(0), at(1), at(2)]


def test_a_kept_range_still_wins_over_the_source(host: Host) -> None:
    host.tenants().add(host.user("alice", uid=ALICE))
    host.tenants().remove("alice", keep_data=True)
    assert switch(host, "deterministic").add("alice").range_start == at(0)


def test_a_removed_user_gets_their_quarantined_formula_range_back_and_nobody_else(
    host: Host,
) -> None:
    tenants = switch(host, "deterministic")
    tenants.add(host.user("alice", uid=ALICE))
    tenants.remove("alice")
    assert host.ranges() == {at(2): ("alice", "quarantined")}
    assert tenants.add("alice").range_start == at(2)
    assert host.ranges() == {at(2): ("alice", "active")}
    tenants.remove("alice")
    with pytest.raises(Conflict, match=f"alice's range {at(2)}-{at(3) - 1} in hostd's state "):
        tenants.ranges.check_free(at(2), "bob")


def test_an_undone_add_puts_a_reclaimed_range_back_in_quarantine(host: Host) -> None:
    tenants = switch(host, "deterministic")
    tenants.add(host.user("alice", uid=ALICE))
    tenants.remove("alice")
    entries = files(host)
    t = tenants._reserve(host.getpwnam("alice"), "default", Limits())
    assert host.ranges() == {at(2): ("alice", "active")}
    tenants._undo_add(t, None)  # what a failed add and reconcile after a crash do
    assert host.ranges() == {at(2): ("alice", "quarantined")} and files(host) == entries


def test_a_release_cut_short_gets_its_entries_back_at_start(host: Host) -> None:
    """A crash between a release's removal of the entries and the end of its transaction
    leaves the range quarantined without entries: hostd's next start enters them again."""
    tenants = host.tenants()
    tenants.add(host.user("alice", uid=ALICE))
    tenants.remove("alice")
    ((start, _),) = host.ranges().items()
    entries = files(host)
    with tenants.ranges.locked():
        tenants.ranges.files.remove(tenants.ranges.owner, start, RANGE_SIZE)
    assert files(host) != entries and host.ranges() == {start: ("alice", "quarantined")}
    (done,) = tenants.migrate_ranges()
    assert done.startswith(f"entered the quarantined IDs {start}-") and files(host) == entries
    assert tenants.migrate_ranges() == []  # nothing more to do


# -- subid ------------------------------------------------------------------------------------


def test_subid_takes_the_directorys_range_and_writes_no_entry(host: Host) -> None:
    tenants = switch(host, "subid")
    directory(tenants, {"alice": (at(3), RANGE_SIZE)})
    assert tenants.add(host.user("alice", uid=ALICE)).range_start == at(3)
    assert host.ranges() == {at(3): ("alice", "active")}
    assert host.registered() == []  # the directory owns it: no hostd-ids entry


def test_subid_with_the_files_provider_leaves_the_users_entry_theirs(host: Host) -> None:
    """With `files`, the directory IS /etc/subuid: alice's own entry is her grant; neither add
    nor the start-up migration moves it to hostd's owner."""
    write(host, f"alice:{at(1)}:{RANGE_SIZE}")
    before = files(host)
    tenants = switch(host, "subid")
    directory(tenants, {"alice": (at(1), RANGE_SIZE)})
    tenants.add(host.user("alice", uid=ALICE))
    assert tenants.migrate_ranges() == []
    assert files(host) == before
    tenants.remove("alice")
    assert files(host) == before and host.ranges() == {at(1): ("alice", "quarantined")}


def test_migration_still_moves_a_range_the_directory_does_not_give(host: Host) -> None:
    """A local-era tenant under her own name (an old hostd) is moved to the owner even with
    source = subid, when the directory gives her another range (or none)."""
    host.tenants().add(host.user("alice", uid=ALICE))
    for name in ("subuid", "subgid"):
        (host.root / name).write_text(f"alice:{at(0)}:{RANGE_SIZE}\n")
    tenants = switch(host, "subid")
    directory(tenants, {"alice": (at(3), RANGE_SIZE)})
    assert len(tenants.migrate_ranges()) == 1
    assert host.registered() == [at(0)]


def test_subid_range_over_another_tenants_is_a_conflict(host: Host) -> None:
    host.tenants().add(host.user("bob", uid=BOB))
    tenants = switch(host, "subid")
    directory(tenants, {"alice": (at(0) + 5, RANGE_SIZE)})
    with pytest.raises(Conflict) as info:
        tenants.add(host.user("alice", uid=ALICE))
    assert info.value.cause.startswith(
        f"alice's ID range {at(0) + 5}-{at(1) + 4} from the subid provider collides with "
        f"bob's range {at(0)}-{at(1) - 1} in hostd's state"
    )
    assert info.value.fix == "give the user a range in the directory that nothing on this host uses"
    assert host.state.tenant("alice") is None and host.registered() == [at(0)]


def test_subid_user_without_a_range_is_told_what_the_directory_must_hold(host: Host) -> None:
    tenants = switch(host, "subid")
    directory(tenants, {"alice": (at(1), 1000)})
    with pytest.raises(HostdError) as info:
        tenants.add(host.user("alice", uid=ALICE))
    assert str(info.value) == (
        "alice's ranges in the subid provider hold 1000 IDs, not 65536: give alice one range "
        "of 65536 IDs, the same for subuid and subgid in the directory"
    )
    with pytest.raises(HostdError, match="the subid provider has no subuid range for bob"):
        tenants.add(host.user("bob", uid=BOB))
    assert nothing_recorded(host)


# -- check_free ------------------------------------------------------------------------------


def test_check_free_names_what_a_given_range_collides_with(host: Host) -> None:
    tenants = host.tenants()
    tenants.add(host.user("alice", uid=ALICE))
    (host.root / "subgid").write_text(
        (host.root / "subgid").read_text() + f"podman:{at(2)}:{RANGE_SIZE}\n"
    )
    r = tenants.ranges
    with r.locked():
        r.check_free(at(1), "bob")  # free: no error
        with pytest.raises(Conflict) as info:
            r.check_free(at(0) + 1, "bob")
        assert str(info.value).startswith(
            f"IDs {at(0) + 1}-{at(1)} for bob collide with alice's range {at(0)}-{at(1) - 1} "
            "in hostd's state (active since "
        )
        assert info.value.fix == "import with --range auto, or free those IDs first"
        with pytest.raises(Conflict, match=f"podman's entry podman:{at(2)}:65536 in .*subgid"):
            r.check_free(at(2), "bob")


def test_local_is_the_default_and_an_unknown_source_is_refused(tmp_path: Path) -> None:
    main = tmp_path / "hostd.toml"
    assert config.load(main).subids.source == "local"
    main.write_text('[subids]\nsource = "ldap"\n')
    with pytest.raises(HostdError) as info:
        config.load(main)
    assert str(info.value).endswith("use one of 'local', 'deterministic', 'subid'")
