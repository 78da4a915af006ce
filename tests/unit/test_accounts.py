"""Account checks that need no real account: lock marks, nologin shells, the capped reader."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from hostd import accounts


@pytest.mark.parametrize(
    ("password", "locked"),
    [
        (b"!", False),  # useradd's "no password": key logins work (as OpenSSH + PAM)
        (b"!!", False),
        (b"*", False),
        (b"$y$j9T$salt$hash", False),
        (b"!$y$j9T$salt$hash", True),  # usermod -L, passwd -l
        (b"!!$y$j9T$salt$hash", True),
        (b"!*", True),
    ],
)
def test_lock_marks(password: bytes, locked: bool) -> None:
    assert accounts.is_locked(password) is locked


def _pw(shell: str) -> pwd.struct_passwd:
    return pwd.struct_passwd(("u", "x", 1000, 1000, "", "/home/u", shell))


@pytest.mark.parametrize("shell", ["/usr/sbin/nologin", "/sbin/nologin", "/bin/false"])
def test_nologin_shells_are_refused_with_nologin_txt_or_the_default(
    shell: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accounts, "NOLOGIN_TXT", tmp_path / "nologin.txt")
    assert accounts.shell_refusal(_pw(shell)) == "This account is currently not available."
    (tmp_path / "nologin.txt").write_text("Maintenance until Monday.\n")
    assert accounts.shell_refusal(_pw(shell)) == "Maintenance until Monday."


@pytest.mark.parametrize("shell", ["/bin/bash", "", "/usr/bin/zsh"])
def test_real_shells_are_fine(shell: str) -> None:
    assert accounts.shell_refusal(_pw(shell)) is None


def test_unknown_users_are_refused() -> None:
    assert accounts.account_refusal("no-such-user-here") == (
        "no-such-user-here is not a user of this host"
    )
