"""Subordinate IDs: allocation never collides, files keep others' lines, locks are shadow's."""

from __future__ import annotations

import multiprocessing
import os
import pwd
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd import subids
from hostd.errors import HostdError
from hostd.subids import SubIdEntry, SubIdFiles, allocate, owner_problem, parse
from runtime.ids import RANGE_SIZE

USER, UID = "alice", 1000
COUNT = 4  # small ranges in a small space, so hypothesis hits every edge
SPACE = 80

entry_lists = st.lists(
    st.builds(
        SubIdEntry,
        owner=st.sampled_from([USER, str(UID), "hostd-ids", "bob", "podman-user"]),
        start=st.one_of(st.integers(0, SPACE), st.integers(0, SPACE // 4).map(lambda n: 4 * n)),
        count=st.one_of(st.integers(1, 12), st.sampled_from([4, 8])),
    ),
    max_size=8,
)
reserved_starts = st.lists(st.integers(0, SPACE), max_size=4)
bounds = st.integers(0, 20).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo - 1, SPACE)))


def _spans(entries: list[SubIdEntry], reserved: list[int]) -> list[SubIdEntry]:
    return entries + [SubIdEntry("(reserved)", s, COUNT) for s in reserved]


def _lowest_free(taken: list[SubIdEntry], lo: int, hi: int) -> int | None:
    """The answer by brute force: every start from lo up."""
    for start in range(lo, hi - COUNT + 2):
        if not any(SubIdEntry(USER, start, COUNT).overlaps(t) for t in taken):
            return start
    return None


@given(entry_lists, entry_lists, reserved_starts, bounds)
def test_allocate_takes_lowest_free_start_or_says_it_is_full(
    uid_entries: list[SubIdEntry],
    gid_entries: list[SubIdEntry],
    reserved: list[int],
    lo_hi: tuple[int, int],
) -> None:
    lo, hi = lo_hi
    expected = _lowest_free(_spans(uid_entries + gid_entries, reserved), lo, hi)
    if expected is None:
        with pytest.raises(HostdError, match=f"no free subordinate ID range of {COUNT} between"):
            allocate(uid_entries, gid_entries, reserved, lo, hi, COUNT)
    else:
        assert allocate(uid_entries, gid_entries, reserved, lo, hi, COUNT) == expected


@given(entry_lists, entry_lists, reserved_starts, bounds)
def test_allocate_never_overlaps_any_owner_and_fills_the_space_with_distinct_ranges(
    uid_entries: list[SubIdEntry],
    gid_entries: list[SubIdEntry],
    reserved: list[int],
    lo_hi: tuple[int, int],
) -> None:
    lo, hi = lo_hi
    given_out: list[int] = []
    while True:  # each allocation is recorded before the next, as hostd's state does
        try:
            start = allocate(uid_entries, gid_entries, reserved + given_out, lo, hi, COUNT)
        except HostdError:
            break
        got = SubIdEntry("hostd-ids", start, COUNT)
        assert lo <= got.start and got.end <= hi
        assert not any(got.overlaps(e) for e in _spans(uid_entries + gid_entries, reserved))
        assert not any(got.overlaps(SubIdEntry("", s, COUNT)) for s in given_out)
        given_out.append(start)
    assert len(given_out) <= (hi - lo + 1) // COUNT


def test_allocate_never_hands_out_the_users_own_range() -> None:
    """useradd gives a user a range under their name: theirs to newuidmap, so never their
    container's (the old hostd reused it, which made the tenant root of their container)."""
    for owner in (USER, str(UID)):
        mine = SubIdEntry(owner, 100000, RANGE_SIZE)
        assert allocate([mine], [mine], [], 100000, 600100000) == 165536


def test_allocate_fills_a_gap_of_exactly_one_range() -> None:
    taken = [SubIdEntry("bob", 100000, RANGE_SIZE), SubIdEntry("carol", 231072, RANGE_SIZE)]
    assert allocate(taken, taken, [], 100000, 600100000) == 165536


def test_allocate_skips_reserved_ranges_and_foreign_gid_entries() -> None:
    gid = [SubIdEntry("podman", 100000, RANGE_SIZE)]
    assert allocate([], gid, [165536], 100000, 600100000) == 231072


def test_allocate_in_a_full_space_names_the_limits_and_the_fix() -> None:
    full = [SubIdEntry("bob", 100000, RANGE_SIZE)]
    with pytest.raises(HostdError) as err:
        allocate(full, full, [], 100000, 231070)
    assert str(err.value) == (
        "no free subordinate ID range of 65536 between 100000 and 231070: "
        "raise SUB_UID_MAX in /etc/login.defs or [subids] max in hostd.toml, "
        "or release quarantined ranges (`hostctl ranges`)"
    )


def test_entry_end_and_overlaps() -> None:
    a = SubIdEntry("a", 100000, RANGE_SIZE)
    assert a.end == 165535
    assert a.overlaps(SubIdEntry("b", 165535, 1))
    assert not a.overlaps(SubIdEntry("b", 165536, RANGE_SIZE))
    assert not a.overlaps(SubIdEntry("b", 34464, RANGE_SIZE))


def test_parse_reads_entries_as_shadow_does_and_skips_the_rest() -> None:
    text = (
        "# managed by hand\n"
        "\n"
        "bob:100000:65536\n"
        "1001:165536:65536\n"
        "hex:0x3a980:0x10000\n"  # shadow's strtoul(..., 0) reads hex and octal too
        "oct:0400000:010\n"
        "#old:1:2\n"
        "bad:12\n"
        "bad:1:2:3\n"
        ":1:2\n"
        "bad:x:2\n"
        "bad:1:2 \n"
        "bad:09:1\n"
        "crlf:1:2\r\n"
        "last:300000:65536"
    )
    assert parse(text) == [
        SubIdEntry("bob", 100000, 65536),
        SubIdEntry("1001", 165536, 65536),
        SubIdEntry("hex", 240000, 65536),
        SubIdEntry("oct", 131072, 8),
        SubIdEntry("last", 300000, 65536),
    ]


# --- files -------------------------------------------------------------------------------------

ORIGINAL = (
    "# comment kept as is\n"
    "\n"
    "bob:100000:65536\n"
    "  weird line that is not an entry\n"
    "crlf:1:2\r\n"
    "caf\xe9:165536:65536\n"
)


@pytest.fixture
def files(tmp_path: Path) -> SubIdFiles:
    return SubIdFiles(tmp_path / "subuid", tmp_path / "subgid", lock_timeout=0.5)


def _write_both(files: SubIdFiles, data: bytes) -> None:
    files.subuid.write_bytes(data)
    files.subgid.write_bytes(data)


def test_add_then_remove_leaves_every_other_byte(files: SubIdFiles) -> None:
    original = ORIGINAL.encode("latin-1") + b"\xff\xfe:raw bytes\n"  # not UTF-8 either
    _write_both(files, original)
    with files.locked():
        files.add(USER, 231072, RANGE_SIZE)
        for path in (files.subuid, files.subgid):
            assert path.read_bytes() == original + b"alice:231072:65536\n"
        files.remove(USER, 231072, RANGE_SIZE)
    for path in (files.subuid, files.subgid):
        assert path.read_bytes() == original
    assert sorted(p.name for p in files.subuid.parent.iterdir()) == ["subgid", "subuid"]


def test_add_is_idempotent_and_knows_equivalent_lines(files: SubIdFiles) -> None:
    _write_both(files, b"alice:0x3a980:65536\n")
    with files.locked():
        files.add(USER, 240000, RANGE_SIZE)
        files.add(USER, 300000, RANGE_SIZE)
        files.add(USER, 300000, RANGE_SIZE)
    assert files.subuid.read_text() == "alice:0x3a980:65536\nalice:300000:65536\n"
    assert files.read() == (parse(files.subuid.read_text()),) * 2


def test_add_after_a_last_line_without_newline(files: SubIdFiles) -> None:
    _write_both(files, b"bob:100000:65536")
    with files.locked():
        files.add(USER, 165536, RANGE_SIZE)
    assert files.subgid.read_text() == "bob:100000:65536\nalice:165536:65536\n"


def test_add_after_a_change_cut_short_between_the_files_makes_them_alike(
    files: SubIdFiles,
) -> None:
    """A remove killed after subuid, before subgid, then the range entered again: appending to
    subuid alone would leave the files in different orders."""
    files.subuid.write_text("bob:100000:65536\ncarol:300000:65536\n")
    files.subgid.write_text("bob:100000:65536\nalice:165536:65536\ncarol:300000:65536\n")
    with files.locked():
        assert files.add(USER, 165536, RANGE_SIZE)
        assert not files.add(USER, 165536, RANGE_SIZE)
    want = "bob:100000:65536\ncarol:300000:65536\nalice:165536:65536\n"
    assert (files.subuid.read_text(), files.subgid.read_text()) == (want, want)


def test_remove_takes_only_that_range_and_is_idempotent(files: SubIdFiles) -> None:
    text = "alice:100000:65536\nbob:165536:65536\nalice:165536:65536\nalice:231072:65536"
    _write_both(files, text.encode())
    with files.locked():
        files.remove(USER, 231072, RANGE_SIZE)  # the last line, without a newline
        files.remove(USER, 165536, RANGE_SIZE)
        inode = files.subuid.stat().st_ino
        files.remove(USER, 165536, RANGE_SIZE)
        files.remove("carol", 100000, RANGE_SIZE)
    assert files.subuid.read_text() == "alice:100000:65536\nbob:165536:65536\n"
    assert files.subuid.stat().st_ino == inode  # nothing to remove: not rewritten


def test_missing_files_read_empty_and_are_created_0644(files: SubIdFiles) -> None:
    assert files.read() == ([], [])
    with files.locked():
        files.remove(USER, 100000, RANGE_SIZE)
        assert not files.subuid.exists()
        files.add(USER, 100000, RANGE_SIZE)
    for path in (files.subuid, files.subgid):
        assert path.read_text() == "alice:100000:65536\n"
        assert path.stat().st_mode & 0o7777 == 0o644


def test_rewrite_keeps_mode(files: SubIdFiles) -> None:
    _write_both(files, b"")
    files.subuid.chmod(0o600)
    with files.locked():
        files.add(USER, 100000, RANGE_SIZE)
    assert files.subuid.stat().st_mode & 0o7777 == 0o600
    assert files.subgid.stat().st_mode & 0o7777 == 0o644


def test_changes_outside_locked_are_refused(files: SubIdFiles) -> None:
    with pytest.raises(AssertionError):
        files.add(USER, 100000, RANGE_SIZE)
    with pytest.raises(AssertionError):
        files.remove(USER, 100000, RANGE_SIZE)
    assert not files.subuid.exists()


def test_reown_moves_only_that_range_in_place(files: SubIdFiles) -> None:
    text = (
        "# kept\n"
        "alice:100000:65536\n"  # alice's own (useradd's): stays hers
        "alice:165536:65536\n"  # her container's, from an old hostd
        "bob:231072:65536\n"
        "1000:296608:65536"  # by uid, last line without a newline
    )
    _write_both(files, text.encode())
    with files.locked():
        assert files.reown(165536, RANGE_SIZE, {USER, str(UID)}, "hostd-ids") == [
            files.subuid,
            files.subgid,
        ]
        files.reown(296608, RANGE_SIZE, {USER, str(UID)}, "hostd-ids")
        inode = files.subuid.stat().st_ino
        assert files.reown(165536, RANGE_SIZE, {USER, str(UID)}, "hostd-ids") == []
    assert files.subuid.stat().st_ino == inode  # done already: not rewritten
    expected = (
        "# kept\n"
        "alice:100000:65536\n"
        "hostd-ids:165536:65536\n"
        "bob:231072:65536\n"
        "hostd-ids:296608:65536"
    )
    assert files.subuid.read_text() == files.subgid.read_text() == expected


def test_reown_drops_a_line_the_new_owner_has_already(files: SubIdFiles) -> None:
    files.subuid.write_text("hostd-ids:165536:65536\nalice:165536:65536\n")
    files.subgid.write_text("alice:165536:65536\n")
    with files.locked():
        assert files.reown(165536, RANGE_SIZE, {USER}, "hostd-ids") == [
            files.subuid,
            files.subgid,
        ]
    assert files.subuid.read_text() == files.subgid.read_text() == "hostd-ids:165536:65536\n"


@pytest.mark.parametrize(
    ("uid", "shell", "shadow", "problem"),
    [
        (998, "/usr/sbin/nologin", "owner:!:20787::::::", None),  # as useradd --system makes it
        (998, "/bin/false", "owner:*:19000:0:99999:7:::", None),
        (998, "/usr/sbin/nologin", "owner:$6$salt$hash:19000::::::", "usable or empty password"),
        (998, "/usr/sbin/nologin", "owner::19000::::::", "usable or empty password"),
        (998, "/usr/sbin/nologin", "", "usable or empty password"),  # passwd's "x", no shadow
        (998, "/bin/bash", "owner:!:19000::::::", "has the login shell /bin/bash"),
        (0, "/usr/sbin/nologin", "owner:!:19000::::::", "has uid 0: not a system account"),
        (1000, "/usr/sbin/nologin", "owner:!:19000::::::", "has uid 1000: not a system account"),
    ],
)
def test_owner_problem_names_what_would_let_someone_act_as_the_owner(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    uid: int,
    shell: str,
    shadow: str,
    problem: str | None,
) -> None:
    (tmp_path / "shadow").write_text(f"root:*:19000::::::\n{shadow}\n")
    monkeypatch.setattr(subids, "SHADOW", tmp_path / "shadow")
    pw = pwd.struct_passwd(("owner", "x", uid, uid, "", "/nonexistent", shell))
    found = owner_problem(pw, 1000)
    assert found is None if problem is None else problem in str(found)


@pytest.mark.parametrize("name", ["", "a:b", "a\nb", "#a"])
def test_names_that_would_break_the_file_are_refused(files: SubIdFiles, name: str) -> None:
    with files.locked(), pytest.raises(HostdError, match="cannot be written to"):
        files.add(name, 100000, RANGE_SIZE)
    assert not files.subuid.exists()


# --- locks -------------------------------------------------------------------------------------


def _lock_of(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _leftovers(files: SubIdFiles) -> list[str]:
    return sorted(p.name for p in files.subuid.parent.iterdir())


def test_locked_creates_shadow_lock_files_and_removes_them(files: SubIdFiles) -> None:
    with files.locked():
        for path in (files.subuid, files.subgid):
            assert _lock_of(path).read_text() == str(os.getpid())  # no newline, as shadow
        assert _leftovers(files) == ["subgid.lock", "subuid.lock"]
    assert _leftovers(files) == []


def test_stale_lock_of_a_dead_process_is_taken_over(files: SubIdFiles) -> None:
    _lock_of(files.subuid).write_text(str(_dead_pid()))
    _lock_of(files.subgid).write_text(str(os.getpid()))  # ours, yet not held: from before a reboot
    with files.locked():
        files.add(USER, 100000, RANGE_SIZE)
    assert _leftovers(files) == ["subgid", "subuid"]


def test_live_lock_makes_locked_wait_then_fail(files: SubIdFiles, live_pid: int) -> None:
    lock = _lock_of(files.subgid)
    lock.write_text(str(live_pid))
    began = time.monotonic()
    with pytest.raises(HostdError) as err, files.locked():
        pytest.fail("got the lock")
    assert time.monotonic() - began >= 0.5
    assert str(err.value) == (
        f"{lock} is held by pid {live_pid}: "
        "wait for useradd/usermod to finish or remove a stale lock"
    )
    assert lock.read_text() == str(live_pid)
    assert _leftovers(files) == ["subgid.lock"]  # our subuid.lock was released


def test_lock_without_a_valid_pid_is_not_taken_over(files: SubIdFiles) -> None:
    _lock_of(files.subuid).write_text("123\n")
    with (
        pytest.raises(HostdError, match=r"holds no valid pid \('123\\n'\): wait for"),
        files.locked(),
    ):
        pytest.fail("got the lock")


def test_locked_gets_the_lock_once_its_holder_lets_go(tmp_path: Path, live_pid: int) -> None:
    files = SubIdFiles(tmp_path / "subuid", tmp_path / "subgid", lock_timeout=10)
    lock = _lock_of(files.subuid)
    lock.write_text(str(live_pid))
    release = threading.Timer(0.3, lock.unlink)
    release.start()
    began = time.monotonic()
    with files.locked():
        assert time.monotonic() - began >= 0.3
        assert lock.read_text() == str(os.getpid())
    release.join()


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    files = SubIdFiles(tmp_path / "subuid", tmp_path / "subgid", lock_timeout=10)
    inside = threading.Event()
    events: list[str] = []

    def hold() -> None:
        with files.locked():
            inside.set()
            time.sleep(0.2)
            events.append("first out")

    first = threading.Thread(target=hold)
    first.start()
    inside.wait()
    with files.locked():
        events.append("second in")
        files.add(USER, 100000, RANGE_SIZE)
    first.join()
    assert events == ["first out", "second in"]


def _allocate_and_add(subuid: str, subgid: str, user: str) -> int:
    files = SubIdFiles(Path(subuid), Path(subgid))
    with files.locked():
        uid_entries, gid_entries = files.read()
        start = allocate(uid_entries, gid_entries, [], 100000, 600100000)
        time.sleep(0.01)  # widen the window a lost update would need
        files.add(user, start, RANGE_SIZE)
    return start


def test_concurrent_adders_get_disjoint_ranges(files: SubIdFiles) -> None:
    header = b"# shared with useradd\nbob:100000:65536\n"
    _write_both(files, header)
    jobs = [(str(files.subuid), str(files.subgid), f"user{i}") for i in range(10)]
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        starts = pool.starmap(_allocate_and_add, jobs)
    assert len(set(starts)) == 10
    uid_entries, gid_entries = files.read()
    assert uid_entries == gid_entries
    assert sorted(e.owner for e in uid_entries) == ["bob"] + sorted(f"user{i}" for i in range(10))
    ranges = sorted(uid_entries, key=lambda e: e.start)
    assert all(a.end < b.start for a, b in zip(ranges, ranges[1:], strict=False))
    for path in (files.subuid, files.subgid):
        text = path.read_bytes()
        assert text.startswith(header) and text.endswith(b"\n")
        assert len(parse(text.decode())) == len(text.splitlines()) - 1  # all but the comment
    assert _leftovers(files) == ["subgid", "subuid"]
