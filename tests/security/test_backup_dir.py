"""Attacks on the backup directory: a host user writing, reading or planting there, a symlink
planted where a tenant's backups go or as an archive, a directory users could swap, names that
climb out, and a tenant asking for backups. Each attack is performed for real and must fail."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.api import Channel
from hostd.client import request
from runtime.errors import RuntimeFailure
from tests.hostd_harness import Hostd, UnixUsers, connect_as, probe_as


@pytest.fixture(scope="module")
def backups(hostd: Hostd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    parent = tmp_path_factory.mktemp("backups")
    parent.chmod(0o755)  # host users may look in (the dir itself must keep them out)
    where = parent / "dir"
    with hostd.configured("backup", f'[backup]\ndir = "{where}"\n'):
        yield where


@pytest.fixture
def tenants(hostd: Hostd, unix_users: UnixUsers) -> Iterator[list[str]]:
    """Two stopped tenants (a backup of a fresh one is quick)."""
    users = [unix_users.make(), unix_users.make()]
    try:
        for user in users:
            hostd.hostctl("user", "add", user, "--disk", "1G")
        yield users
    finally:
        for user in users:
            hostd.hostctl("user", "remove", user, check=False)


def _run(hostd: Hostd, *users: str) -> list[dict[str, object]]:
    res = hostd.hostctl("backup", "run", *users, "--json", check=False)
    found: list[dict[str, object]] = json.loads(res.stdout)
    return found


def test_a_host_user_cannot_write_plant_or_read_there(
    hostd: Hostd, backups: Path, tenants: list[str]
) -> None:
    user, _ = tenants
    (r,) = _run(hostd, user)
    assert isinstance(r["archive"], dict)
    archive = backups / user / str(r["archive"]["name"])
    for path in (backups, backups / user):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    st = archive.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    ops = [
        ("create", str(backups / "x")),
        ("symlink", str(backups / "planted")),
        ("create", str(backups / user / "x")),
        ("read", str(archive)),
        ("list", str(backups)),
    ]
    pw = pwd.getpwnam(user)  # the tenant's own host account, after its own backup
    got = probe_as(pw.pw_uid, pw.pw_gid, ops)
    assert got == {f"{op} {path}": "EACCES" for op, path in ops}
    assert sorted(os.listdir(backups / user)) == sorted(
        [archive.name, archive.name.replace(".hostd", ".manifest.json")]
    )


def test_a_symlink_planted_for_a_tenant_is_not_followed(
    hostd: Hostd, backups: Path, tenants: list[str]
) -> None:
    victim, other = tenants
    target = Path(pwd.getpwnam(victim).pw_dir) / "stolen"
    target.mkdir()
    os.chown(target, pwd.getpwnam(victim).pw_uid, pwd.getpwnam(victim).pw_gid)
    link = backups / victim
    backups.mkdir(mode=0o700, exist_ok=True)
    shutil.rmtree(link, ignore_errors=True)
    link.symlink_to(target)
    try:
        bad, good = _run(hostd, victim, other)
        assert bad["archive"] is None and "is not a directory" in str(bad["error"])
        assert isinstance(good["archive"], dict)
        assert os.listdir(target) == []  # nothing written through the link
        res = hostd.hostctl("backup", "restore", victim, check=False)
        assert res.returncode == 1 and "is not a directory" in res.stderr
    finally:
        link.unlink()


def test_a_planted_archive_link_is_never_restored(
    hostd: Hostd, backups: Path, tenants: list[str]
) -> None:
    """A symlink named like an archive (to another tenant's) is no archive: a restore of
    `victim` never gets `other`'s data."""
    victim, other = tenants
    (r,) = _run(hostd, other)
    assert isinstance(r["archive"], dict)
    name = str(r["archive"]["name"])
    (backups / victim).mkdir(mode=0o700, exist_ok=True)
    planted = backups / victim / name
    planted.symlink_to(backups / other / name)
    try:
        hostd.hostctl("user", "remove", victim)
        assert json.loads(hostd.hostctl("backup", "list", victim, "--json").stdout) == []
        res = hostd.hostctl("backup", "restore", victim, check=False)
        assert res.returncode == 1 and f"no backup of {victim}" in res.stderr
    finally:
        planted.unlink()


def test_names_that_climb_out_are_refused(hostd: Hostd, backups: Path) -> None:
    for command in (("run", "../etc"), ("list", "../etc"), ("restore", "../etc")):
        res = hostd.hostctl("backup", *command, check=False)
        assert res.returncode == 1, res
        assert "invalid user name '../etc'" in res.stderr or "is not a tenant" in res.stderr
    assert not (backups.parent / "etc").exists()


def test_a_tenant_cannot_ask_for_backups(hostd: Hostd, backups: Path, tenants: list[str]) -> None:
    user, _ = tenants
    hostd.hostctl("start", user)
    for op, args in (("backup.run", {}), ("backup.restore", {"user": user})):
        (sock,) = connect_as(user, hostd.user_socket)
        with sock, pytest.raises(RuntimeFailure, match=f"{op} is for admins"):
            request(Channel(sock), op, None if op == "backup.run" else args)
    hostd.hostctl("stop", user)


@pytest.mark.parametrize("how", ["writable", "symlink"])
def test_a_directory_users_could_swap_is_refused(
    hostd: Hostd, tenants: list[str], tmp_path: Path, how: str
) -> None:
    user, _ = tenants
    tmp_path.chmod(0o755)
    real = tmp_path / "real"
    if how == "writable":  # in the user's own home: they could rename it and put theirs
        where = Path(pwd.getpwnam(user).pw_dir) / "backups"
        expected = "can be written by users other than root"
    else:
        real.mkdir(mode=0o700)
        where = tmp_path / "link"
        where.symlink_to(real)
        expected = "is not a directory (a symlink or a file)"
    # read after the module's backup.toml, so it wins
    with hostd.configured("zz-backup", f'[backup]\ndir = "{where}"\n'):
        res = hostd.hostctl("backup", "run", user, check=False)
    assert res.returncode == 1 and expected in res.stderr, res.stderr
    assert not real.exists() or os.listdir(real) == []
    assert how == "symlink" or not where.exists()  # nothing made in the user's home
