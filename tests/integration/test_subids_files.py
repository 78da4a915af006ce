"""hostd and shadow-utils share /etc/subuid and /etc/subgid: same locks, same format, same owner.

Everything happens in a private copy of /etc (usermod --prefix); the real files are never touched.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hostd.subids import SubIdEntry, SubIdFiles, allocate
from runtime.ids import RANGE_SIZE

HEADER = "# ranges by useradd and by hostd\n"


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """A prefix for usermod -P: users alice and bob, subuid/subgid with a comment only."""
    if shutil.which("usermod") is None:
        pytest.skip("usermod missing: apt-get install passwd")
    etc = tmp_path / "etc"
    etc.mkdir()
    users = {"root": 0, "alice": 1000, "bob": 1001}
    (etc / "passwd").write_text(
        "".join(f"{u}:x:{i}:{i}::/home/{u}:/bin/sh\n" for u, i in users.items())
    )
    (etc / "group").write_text("".join(f"{u}:x:{i}:\n" for u, i in users.items()))
    for name, line in (("shadow", "{}:*:19000:0:99999:7:::\n"), ("gshadow", "{}:!::\n")):
        (etc / name).write_text("".join(line.format(u) for u in users))
        (etc / name).chmod(0o640)
    for name in ("subuid", "subgid"):
        (etc / name).write_text(HEADER)
    return etc


def _files(etc: Path) -> SubIdFiles:
    return SubIdFiles(etc / "subuid", etc / "subgid", lock_timeout=1)


def _usermod(etc: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["usermod", "--prefix", str(etc.parent), *args], capture_output=True, text=True
    )


def test_usermod_waits_while_hostd_holds_the_lock(etc: Path) -> None:
    files = _files(etc)
    with files.locked():
        usermod = subprocess.Popen(
            ["usermod", "--prefix", str(etc.parent), "--add-subuids", "200000-265535", "alice"],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)  # shadow retries once a second
        assert usermod.poll() is None
        assert (etc / "subuid").read_text() == HEADER
    _, err = usermod.communicate(timeout=30)
    assert usermod.returncode == 0, err
    assert (etc / "subuid").read_text() == HEADER + "alice:200000:65536\n"


def test_usermod_takes_over_the_lock_of_a_dead_hostd(etc: Path) -> None:
    def die_holding_the_lock() -> None:
        with _files(etc).locked():
            os._exit(0)

    child = multiprocessing.get_context("fork").Process(target=die_holding_the_lock)
    child.start()
    child.join()
    assert (etc / "subuid.lock").read_text() == str(child.pid)
    res = _usermod(etc, "--add-subuids", "200000-265535", "alice")  # reads the pid as shadow
    assert res.returncode == 0, res.stderr
    assert not (etc / "subuid.lock").exists()


def test_hostd_and_usermod_see_each_others_ranges(etc: Path) -> None:
    res = _usermod(etc, "-v", "100000-165535", "-w", "100000-165535", "alice")
    assert res.returncode == 0, res.stderr
    files = _files(etc)
    with files.locked():
        uid_entries, gid_entries = files.read()
        assert uid_entries == gid_entries == [SubIdEntry("alice", 100000, RANGE_SIZE)]
        start = allocate(uid_entries, gid_entries, [], 100000, 600100000)
        assert start == 165536
        files.add("bob", start, RANGE_SIZE)

    # shadow parses hostd's line: it can remove bob's range again, keeping the rest
    res = _usermod(etc, "-V", "165536-231071", "-W", "165536-231071", "bob")
    assert res.returncode == 0, res.stderr
    for name in ("subuid", "subgid"):
        assert (etc / name).read_text() == HEADER + "alice:100000:65536\n"


def test_rewrite_keeps_owner_and_mode_and_new_files_are_root_0644(tmp_path: Path) -> None:
    files = SubIdFiles(tmp_path / "subuid", tmp_path / "subgid")
    files.subuid.write_text(HEADER)
    os.chown(files.subuid, 1234, 5678)
    files.subuid.chmod(0o640)
    with files.locked():
        files.add("alice", 100000, RANGE_SIZE)
    uid_st, gid_st = files.subuid.stat(), files.subgid.stat()
    assert (uid_st.st_uid, uid_st.st_gid, uid_st.st_mode & 0o7777) == (1234, 5678, 0o640)
    assert (gid_st.st_uid, gid_st.st_gid, gid_st.st_mode & 0o7777) == (0, 0, 0o644)
    assert files.subuid.read_text() == HEADER + "alice:100000:65536\n"
