"""Range sources' pure parts: shadow's deterministic formula and its bounds, getsubids' output
and its errors (a fake runner), and the bounds on running getsubids (a fake program)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd import rangesource
from hostd.errors import HostdError
from hostd.rangesource import deterministic_start, directory_start, parse_getsubids, provider
from runtime import proc
from runtime.errors import RuntimeFailure
from runtime.ids import MAX_ID, RANGE_SIZE

LO, HI, MIN_UID = 100000, 600100000, 1000  # shadow's defaults: SUB_UID_MIN/MAX, UID_MIN


def test_the_formula_is_shadows() -> None:
    """start = SUB_UID_MIN + (uid - UID_MIN) * SUB_UID_COUNT, as find_new_sub_uids_deterministic
    computes it (shadow-maint/shadow lib/find_new_sub_uids.c)."""
    assert deterministic_start(1000, MIN_UID, LO, HI) == 100000
    assert deterministic_start(1001, MIN_UID, LO, HI) == 165536
    assert deterministic_start(1234, MIN_UID, LO, HI) == 100000 + 234 * 65536
    assert rangesource.formula(MIN_UID, LO) == "start = 100000 + (uid - 1000) * 65536"


@given(st.lists(st.integers(MIN_UID, MIN_UID + 9000), min_size=2, max_size=20, unique=True))
def test_distinct_uids_never_overlap_and_stay_in_bounds(uids: list[int]) -> None:
    starts = sorted(deterministic_start(u, MIN_UID, LO, HI) for u in uids)
    assert all(LO <= s <= HI - RANGE_SIZE + 1 for s in starts)
    assert all(b - a >= RANGE_SIZE for a, b in zip(starts, starts[1:], strict=False))


def test_the_last_uid_that_fits_and_the_first_that_does_not() -> None:
    last = rangesource.last_uid(MIN_UID, LO, HI)
    assert deterministic_start(last, MIN_UID, LO, HI) + RANGE_SIZE - 1 <= HI
    with pytest.raises(HostdError) as info:
        deterministic_start(last + 1, MIN_UID, LO, HI)
    start = LO + (last + 1 - MIN_UID) * RANGE_SIZE
    assert str(info.value) == (
        f"uid {last + 1}'s deterministic ID range {start}-{start + RANGE_SIZE - 1} "
        f"(start = 100000 + (uid - 1000) * 65536) ends past [subids] max {HI} "
        f"(it fits uids 1000-{last}): raise [subids] max to at least {start + RANGE_SIZE - 1} "
        "or lower [subids] min"
    )


def test_a_huge_uid_never_wraps_around() -> None:
    """shadow's UNSAFE_..._WRAP would fold it back onto other users' ranges: never here."""
    with pytest.raises(HostdError) as info:
        deterministic_start(2**32 - 2, MIN_UID, LO, MAX_ID)
    assert "ends past [subids] max" in str(info.value)
    assert info.value.fix == f"lower [subids] min: no ID range can end past {MAX_ID}"


def test_a_uid_below_min_uid_has_no_range() -> None:
    with pytest.raises(HostdError) as info:
        deterministic_start(999, MIN_UID, LO, HI)
    assert str(info.value) == (
        "uid 999 is below [users] min_uid 1000: it has no deterministic ID range: "
        "only human users (uid >= min_uid) can be tenants"
    )


# -- getsubids --------------------------------------------------------------------------------


def fake(uids: str, gids: str) -> tuple[rangesource.Runner, list[list[str]]]:
    """A getsubids that prints `uids` (or with -g `gids`); records its arguments."""
    calls: list[list[str]] = []

    def run(argv: Sequence[str]) -> proc.Result:
        calls.append(list(argv))
        out = gids if argv[0] == "-g" else uids
        err = "" if out else "Error fetching ranges\n"
        return proc.Result(("getsubids", *argv), 0 if out else 1, out, err)

    return run, calls


def test_a_users_one_range_from_the_provider() -> None:
    run, calls = fake("0: alice 300000 65536\n", "0: alice 300000 65536\n")
    assert directory_start("alice", run) == 300000
    assert calls == [["alice"], ["-g", "alice"]]


def test_of_several_ranges_the_lowest_whole_one_both_lists_share() -> None:
    uids = "0: alice 500000 65536\n1: alice 300000 65536\n2: alice 100000 1000\n"
    gids = "0: alice 300000 65536\n1: alice 500000 65536\n"
    assert directory_start("alice", fake(uids, gids)[0]) == 300000


@pytest.mark.parametrize(
    ("uids", "gids", "cause"),
    [
        ("", "", "the subid provider has no subuid range for alice"),
        ("0: alice 300000 65536\n", "", "the subid provider has no subgid range for alice"),
        (
            "0: alice 300000 100000\n",
            "0: alice 300000 100000\n",
            "alice's ranges in the subid provider hold 100000 IDs, not 65536",
        ),
        (
            "0: alice 300000 65536\n",
            "0: alice 400000 65536\n",
            "alice's subuid ranges 300000-365535 and subgid ranges 400000-465535 in the subid "
            "provider differ",
        ),
    ],
    ids=["none", "no-subgid", "size", "differ"],
)
def test_what_the_directory_must_hold_is_said(uids: str, gids: str, cause: str) -> None:
    with pytest.raises(HostdError) as info:
        directory_start("alice", fake(uids, gids)[0])
    assert info.value.cause == cause
    assert info.value.fix.startswith("give alice one range of 65536 IDs, the same for subuid")


def test_a_directory_range_over_host_ids_is_refused() -> None:
    run, _ = fake("0: alice 0 65536\n", "0: alice 0 65536\n")
    with pytest.raises(HostdError, match="starts at 0: outside 65536-4294967294"):
        directory_start("alice", run)


@pytest.mark.parametrize(
    "text", ["alice 300000 65536", "0: alice -1 65536", "0: alice 300000 65536 extra", "\x1b[2J"]
)
def test_output_that_is_not_getsubids_is_refused_not_guessed(text: str) -> None:
    with pytest.raises(HostdError, match="not `INDEX: USER START COUNT`"):
        parse_getsubids(text + "\n")


def test_parse_reads_every_line() -> None:
    assert parse_getsubids("0: bob 1 2\n1: bob 300000 65536\n") == [(1, 2), (300000, 65536)]


def getsubids_program(path_dir: Path, script: str) -> None:
    prog = path_dir / "getsubids"
    prog.write_text(f"#!/bin/sh\n{script}\n")
    prog.chmod(0o755)


@pytest.fixture
def path_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return tmp_path


def test_a_provider_that_hangs_fails_in_bounded_time(
    path_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    getsubids_program(path_dir, "exec sleep 30")
    monkeypatch.setattr(rangesource, "GETSUBIDS_TIMEOUT", 0.3)
    with pytest.raises(RuntimeFailure, match=r"took longer than 0.3 s"):
        rangesource.run_getsubids(["alice"])


def test_a_provider_that_floods_is_cut_off(path_dir: Path) -> None:
    getsubids_program(path_dir, "exec yes '0: alice 300000 65536'")
    with pytest.raises(RuntimeFailure, match=f"printed more than {64 << 10} bytes"):
        rangesource.run_getsubids(["alice"])


def test_getsubids_missing_names_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeFailure) as info:
        rangesource.run_getsubids(["alice"])
    assert str(info.value) == "getsubids not found: install it with `apt-get install uidmap`"


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("passwd: files\n", "files"),
        ("passwd: files\nsubid:   sss  # FreeIPA\n", "sss"),
        ("# subid: sss\n", "files"),
        ("subid:\n", "files"),
    ],
)
def test_the_provider_named_in_nsswitch(tmp_path: Path, text: str, name: str) -> None:
    (tmp_path / "nsswitch.conf").write_text(text)
    assert provider(tmp_path / "nsswitch.conf") == name
    assert provider(tmp_path / "missing") == "files"
