"""The authorized_keys reader (run as the user in hostd; here in-process on a temp home)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hostd.authkeys import MAX_SIZE, Unsafe, read_keys

KEY = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7g test\n"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    home.chmod(0o755)
    (home / ".ssh/authorized_keys").write_bytes(KEY)
    (home / ".ssh/authorized_keys").chmod(0o600)
    return home


def read(home: Path) -> bytes | None:
    return read_keys(str(home), os.getuid())


def test_a_safe_file_is_read(home: Path) -> None:
    assert read(home) == KEY


def test_missing_parts_are_no_keys(tmp_path: Path, home: Path) -> None:
    assert read(tmp_path / "nohome") is None
    (home / ".ssh/authorized_keys").unlink()
    assert read(home) is None
    (home / ".ssh").rmdir()
    assert read(home) is None


def test_a_symlinked_ssh_dir_is_refused(tmp_path: Path, home: Path) -> None:
    (home / ".ssh").rename(tmp_path / "elsewhere")
    (home / ".ssh").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Unsafe, match="~/.ssh cannot be opened as a directory"):
        read(home)


def test_a_symlinked_file_is_refused(tmp_path: Path, home: Path) -> None:
    (tmp_path / "keys").write_bytes(KEY)
    (home / ".ssh/authorized_keys").unlink()
    (home / ".ssh/authorized_keys").symlink_to(tmp_path / "keys")
    with pytest.raises(Unsafe, match="cannot be opened"):
        read(home)


def test_a_fifo_is_refused_without_waiting_for_a_writer(home: Path) -> None:
    (home / ".ssh/authorized_keys").unlink()
    os.mkfifo(home / ".ssh/authorized_keys", 0o600)
    start = time.monotonic()
    with pytest.raises(Unsafe, match="not a regular file"):
        read(home)
    assert time.monotonic() - start < 5  # a blocking open would never return


def test_a_huge_sparse_file_is_refused_unread(home: Path) -> None:
    with open(home / ".ssh/authorized_keys", "r+b") as f:
        f.truncate(4 << 30)
    with pytest.raises(Unsafe, match=f"larger than {MAX_SIZE} bytes"):
        read(home)


@pytest.mark.parametrize("part", ["", ".ssh", ".ssh/authorized_keys"])
def test_group_or_other_writable_parts_are_refused(home: Path, part: str) -> None:
    path = home / part
    path.chmod(path.stat().st_mode | 0o020)
    with pytest.raises(Unsafe, match="writable by group or others"):
        read(home)


def test_a_file_of_someone_else_is_refused(home: Path) -> None:
    if os.getuid() == 0:
        os.chown(home / ".ssh/authorized_keys", 54321, 54321)
        uid = 12345
    else:  # the file is ours: read it as if we were another user
        uid = os.getuid() + 1
    with pytest.raises(Unsafe, match="owned by uid"):
        read_keys(str(home), uid)
