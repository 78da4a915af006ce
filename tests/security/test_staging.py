"""Archives staged for `hostctl user move` (hostd/staging.py) against a real hostd: a tenant
cannot send one, an id cannot name a path outside the staging dir, and what is staged is
root's alone. Each test performs the attack and sees it fail."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd import protocol as p
from hostd.api import Channel
from hostd.client import call, request
from runtime.errors import RuntimeFailure
from tests.hostd_harness import Hostd, UnixUsers, connect_as

ID = "5a" * 16


@pytest.fixture(scope="module")
def tenant(hostd: Hostd, unix_users: UnixUsers) -> Iterator[str]:
    user = unix_users.make()
    hostd.hostctl("user", "add", user)
    yield user
    hostd.hostctl("user", "remove", user, check=False)


def _incoming(hostd: Hostd) -> Path:
    return hostd.state_dir / "incoming"


@contextlib.contextmanager
def _pipe(data: bytes) -> Iterator[int]:
    """The read end of a pipe holding `data`, its write end closed."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    try:
        yield r
    finally:
        os.close(r)


def test_a_tenant_cannot_stage_an_archive(hostd: Hostd, tenant: str) -> None:
    before = sorted(os.listdir(_incoming(hostd))) if _incoming(hostd).exists() else []
    for op, args in (
        ("transfer.receive", p.ReceiveArgs(ID, 0, 5)),
        ("transfer.offset", p.TransferArgs(ID)),
        ("transfer.verify", p.TransferArgs(ID)),
        ("transfer.discard", p.TransferArgs(ID)),
    ):
        with (
            connect_as(tenant, hostd.user_socket)[0] as conn,
            _pipe(b"12345") as fd,
            pytest.raises(RuntimeFailure, match=f"{op} is for admins"),
        ):
            request(Channel(conn), op, args, [fd] if op == "transfer.receive" else [])
    with pytest.raises(PermissionError):  # the admin socket is not theirs to open
        connect_as(tenant, hostd.admin_socket)
    after = sorted(os.listdir(_incoming(hostd))) if _incoming(hostd).exists() else []
    assert after == before


@pytest.mark.parametrize("bad", ["../../escaped", "a/b", f"../{ID}", "..", ID.upper()])
def test_an_id_cannot_name_a_path(hostd: Hostd, tmp_path: Path, bad: str) -> None:
    with _pipe(b"12345") as fd, pytest.raises(RuntimeFailure, match="is not an archive id"):
        call(hostd.admin_socket, "transfer.receive", p.ReceiveArgs(bad, 0, 5), [fd])
    for op in ("transfer.offset", "transfer.discard", "transfer.verify"):
        with pytest.raises(RuntimeFailure, match="is not an archive id"):
            call(hostd.admin_socket, op, p.TransferArgs(bad))
    assert not (hostd.state_dir / "escaped").exists()
    assert not (hostd.state_dir.parent / "escaped").exists()


def test_staged_archives_are_roots_alone(hostd: Hostd, tenant: str) -> None:
    res = hostd.hostctl("transfer", "receive", ID, "--offset", "0", "--size", "5", input=b"12345")
    assert res.stdout == f"5 of 5 bytes of {ID} staged\n"
    try:
        path = _incoming(hostd) / f"{ID}.hostd"
        st, dir_st = path.stat(), _incoming(hostd).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
        assert (dir_st.st_uid, stat.S_IMODE(dir_st.st_mode)) == (0, 0o700)
        # the tenant tries to read it, and to plant a file of their own next to it
        for script in (f"cat {path}", f"echo x > {_incoming(hostd)}/{'6' * 32}.hostd"):
            res2 = subprocess.run(["sh", "-c", script], user=tenant, capture_output=True)
            assert res2.returncode != 0 and b"Permission denied" in res2.stderr
        assert hostd.hostctl("transfer", "offset", ID).stdout == "5\n"
    finally:
        hostd.hostctl("transfer", "discard", ID)
    assert not path.exists()
