"""A tenant cannot take on their container's IDs on the host, and a new tenant never gets the
IDs of a removed one.

The route attacked: newuidmap/newgidmap (setuid root, package uidmap) map whatever range
/etc/subuid and /etc/subgid grant the caller. An old hostd registered each tenant's range
under the tenant's own name, so the tenant could map it onto a process of their own, become
the range's root on the host and reach everything their container's root owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.config import ID_OWNER
from hostd.subids import SubIdEntry, SubIdFiles, parse
from runtime.ids import RANGE_SIZE
from tests.hostd_harness import Hostd, UnixUsers, wait_for

REAL = SubIdFiles(Path("/etc/subuid"), Path("/etc/subgid"))  # what newuidmap reads


def _ranges(h: Hostd) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(h.hostctl("--json", "ranges").stdout)
    return rows


def _range_of(h: Hostd, user: str, status: str = "active") -> int:
    starts = [r["start"] for r in _ranges(h) if (r["user"], r["status"]) == (user, status)]
    assert len(starts) == 1, _ranges(h)
    return int(str(starts[0]))


def _entries_at(path: Path, start: int) -> list[SubIdEntry]:
    return [e for e in parse(path.read_text()) if e.start == start]


def _cleanup(h: Hostd, users: list[str]) -> None:
    """Remove the users' tenants and release every range they left quarantined."""
    for user in users:
        h.hostctl("user", "remove", user, check=False)
    for r in _ranges(h):
        if r["user"] in users and r["status"] == "quarantined":
            h.hostctl("ranges", "release", str(r["start"]))


@contextlib.contextmanager
def _registered(owner: str, start: int) -> Iterator[None]:
    """`owner:start:65536` in the machine's /etc/subuid and /etc/subgid for a while, added and
    taken out under shadow's lock (other programs may change the files meanwhile)."""
    with REAL.locked():
        before = REAL.read()
        REAL.add(owner, start, RANGE_SIZE)
    try:
        yield
    finally:
        with REAL.locked():
            if SubIdEntry(owner, start, RANGE_SIZE) not in before[0]:
                REAL.remove(owner, start, RANGE_SIZE)


def _map_as(user: str, tool: str, start: int) -> tuple[subprocess.CompletedProcess[str], str]:
    """As `user` (their IDs only, no extra groups): make a user namespace, ask `tool` to map
    `start`.. onto it. Returns newuidmap's result and the namespace's map afterwards."""
    pw = pwd.getpwnam(user)
    uid, gid = pw.pw_uid, pw.pw_gid
    target = subprocess.Popen(
        ["unshare", "--user", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        user=uid,
        group=gid,
        extra_groups=[],
        cwd="/",
    )
    try:
        ours = os.readlink("/proc/self/ns/user")

        def unshared() -> bool:
            assert target.poll() is None, "unshare --user failed"
            return os.readlink(f"/proc/{target.pid}/ns/user") != ours

        wait_for(unshared, 30, "unshare --user to unshare", interval=0.01)
        res = subprocess.run(
            [tool, str(target.pid), "0", str(start), str(RANGE_SIZE)],
            capture_output=True,
            text=True,
            timeout=60,
            user=uid,
            group=gid,
            extra_groups=[],
            cwd="/",
        )
        kind = "uid_map" if tool == "newuidmap" else "gid_map"
        mapped = Path(f"/proc/{target.pid}/{kind}").read_text()
    finally:
        assert target.stdin is not None
        target.stdin.close()
        target.wait(timeout=30)
    return res, mapped


def test_tenant_cannot_map_their_containers_ids_with_newuidmap(
    hostd: Hostd, unix_users: UnixUsers
) -> None:
    for tool in ("unshare", "newuidmap", "newgidmap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: apt-get install uidmap util-linux")
    user = unix_users.make()
    hostd.hostctl("user", "add", user)
    try:
        start = _range_of(hostd, user)
        # hostd registered the range under its locked owner, never under the user
        for path in (hostd.subuid, hostd.subgid):
            assert _entries_at(path, start) == [SubIdEntry(ID_OWNER, start, RANGE_SIZE)]
        owner = pwd.getpwnam(ID_OWNER)
        assert os.path.basename(owner.pw_shell) == "nologin" and owner.pw_uid < 1000

        # the attack, with exactly hostd's lines in the files newuidmap reads
        with _registered(ID_OWNER, start):
            for tool in ("newuidmap", "newgidmap"):
                res, mapped = _map_as(user, tool, start)
                assert res.returncode != 0 and "not allowed" in res.stderr, (tool, res)
                assert mapped == "", f"{tool} mapped {mapped!r}"
        # control: registered under the user's own name (the old hostd), the attack works
        with _registered(user, start):
            for tool in ("newuidmap", "newgidmap"):
                res, mapped = _map_as(user, tool, start)
                assert res.returncode == 0, (tool, res)
                assert mapped.split() == ["0", str(start), str(RANGE_SIZE)]
    finally:
        _cleanup(hostd, [user])


def test_a_removed_tenants_range_is_quarantined_until_an_admin_releases_it(
    hostd: Hostd, unix_users: UnixUsers
) -> None:
    gone, new, later = unix_users.make(), unix_users.make(), unix_users.make()
    try:
        hostd.hostctl("user", "add", gone)
        start = _range_of(hostd, gone)
        hostd.hostctl("user", "remove", gone)
        assert _range_of(hostd, gone, "quarantined") == start
        for path in (hostd.subuid, hostd.subgid):  # still taken for useradd and podman too
            assert _entries_at(path, start) == [SubIdEntry(ID_OWNER, start, RANGE_SIZE)]
        table = hostd.hostctl("ranges").stdout.splitlines()
        assert table[0].split() == ["START", "END", "USER", "STATUS", "SINCE"]
        assert any(
            line.split()[:4] == [str(start), str(start + RANGE_SIZE - 1), gone, "quarantined"]
            for line in table[1:]
        )

        # neither a new tenant nor the removed user coming back gets the old IDs
        hostd.hostctl("user", "add", new)
        hostd.hostctl("user", "add", gone)
        assert start not in (_range_of(hostd, new), _range_of(hostd, gone))
        res = hostd.hostctl("ranges", "release", str(_range_of(hostd, new)), check=False)
        assert res.returncode == 1 and f"is active for {new}" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1

        since = next(r["since"] for r in _ranges(hostd) if r["start"] == start)
        out = hostd.hostctl("ranges", "release", str(start)).stdout
        assert out == (
            f"released IDs {start}-{start + RANGE_SIZE - 1} (formerly {gone}'s, "
            f"quarantined since {since}): new tenants may get them\n"
        )
        assert all(r["start"] != start for r in _ranges(hostd))
        assert _entries_at(hostd.subuid, start) == _entries_at(hostd.subgid, start) == []
        # allocation takes the lowest free range: this one again, now that it is released
        hostd.hostctl("user", "add", later)
        assert _range_of(hostd, later) == start
    finally:
        _cleanup(hostd, [gone, new, later])


_SQL = """
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
rows = []
for sql, params in json.loads(sys.argv[2]):
    rows = db.execute(sql, params).fetchall()
db.close()
print(json.dumps(rows))
"""


def _sql(h: Hostd, *statements: tuple[str, list[object]]) -> list[list[object]]:
    """Run SQL on hostd's database in a process of its own, closed at the end (the way an
    admin would; a connection kept in this long-lived process would outlive hostd's)."""
    done = subprocess.run(
        [sys.executable, "-c", _SQL, str(h.state_dir / "hostd.db"), json.dumps(statements)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows: list[list[object]] = json.loads(done.stdout)
    return rows


def test_an_old_installation_is_migrated_at_start(hostd: Hostd, unix_users: UnixUsers) -> None:
    """Ranges under the users' names and a state without the ranges table (schema 2), as the
    old hostd left them: one tenant and one kept by `remove --keep-data` (by uid)."""
    tenant, kept = unix_users.make(), unix_users.make()
    try:
        hostd.hostctl("user", "add", tenant)
        hostd.hostctl("user", "add", kept)
        hostd.hostctl("user", "remove", kept, "--keep-data")
        starts = {tenant: _range_of(hostd, tenant), kept: _range_of(hostd, kept, "kept")}
        hostd.stop()
        old = {tenant: tenant, kept: str(pwd.getpwnam(kept).pw_uid)}
        files = SubIdFiles(hostd.subuid, hostd.subgid)
        with files.locked():
            for user, start in starts.items():
                files.reown(start, RANGE_SIZE, {ID_OWNER}, old[user])
        others = _sql(hostd, ("SELECT * FROM ranges WHERE user NOT IN (?, ?)", [tenant, kept]))
        # schema 2: without the tables of later migrations (ranges, failures, auto-stop)
        drops = [
            (f"DROP TABLE {table}", []) for table in ("ranges", "failures", "auto_stop", "dormant")
        ]
        _sql(hostd, *drops, ("PRAGMA user_version = 2", []))

        for _ in range(2):  # the second start finds nothing left to do
            hostd.start()
            for user, start in starts.items():
                for path in (hostd.subuid, hostd.subgid):
                    assert _entries_at(path, start) == [SubIdEntry(ID_OWNER, start, RANGE_SIZE)]
                moved = f"upgrade: IDs {start}-{start + RANGE_SIZE - 1} of {user} moved to owner"
                assert hostd.log.read_text().count(moved) == 1
            assert _range_of(hostd, tenant) == starts[tenant]
            assert _range_of(hostd, kept, "kept") == starts[kept]
            hostd.stop()
        hostd.start()
        # ranges of earlier tests, lost with the dropped table
        _sql(hostd, *(("INSERT OR IGNORE INTO ranges VALUES (?, ?, ?, ?)", r) for r in others))
        hostd.hostctl("user", "add", kept)  # adopts the kept container and its IDs
        assert _range_of(hostd, kept) == starts[kept]
    finally:
        if hostd.proc is None:
            hostd.start()
        _cleanup(hostd, [tenant, kept])
