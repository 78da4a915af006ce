"""`user rebase` without root: which packages a set-aside root had, and what the admin reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hostd import ctl
from hostd import protocol as p
from hostd.state import Tenant
from hostd.tenants import _set_aside_warning
from runtime.records import Rebased
from runtime.storage import dpkg_installed

STATUS = """Package: htop
Status: install ok installed
Version: 3.3.0-4
Description: interactive processes viewer
 Status: install ok installed

Package: removed-one
Status: deinstall ok config-files

Package: half
Status: install reinstreq half-installed

Package: Evil$(reboot)
Status: install ok installed

Package: vim
Status: install ok installed
"""


def test_dpkg_installed_names_only_installed_valid_packages() -> None:
    assert dpkg_installed(STATUS) == {"htop", "vim"}
    assert dpkg_installed("") == set()
    assert dpkg_installed("\x00\xff garbage\n\n:::") == set()


def _tenant() -> Tenant:
    return Tenant(
        "alice",
        1000,
        1000,
        "/home/alice",
        200000000,
        "default",
        "ready",
        "running",
        "2026-11-30T10:00:00+00:00",
    )


def test_warning_names_what_is_set_aside_and_where() -> None:
    done = Rebased(
        "/s/default@1",
        "/s/default@2",
        "/var/backups/hostd-rebase/20261130T100000Z",
        ("htop", "vim"),
    )
    text = _set_aside_warning(_tenant(), done)
    assert "/var/backups/hostd-rebase/20261130T100000Z" in text
    assert "packages they installed" in text and "/etc" in text
    assert text.endswith("packages to reinstall: htop vim")
    assert "\n" not in text
    assert "reinstall" not in _set_aside_warning(_tenant(), Rebased("a", "b", "/x", ()))


def test_hostctl_says_nothing_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    same: dict[str, Any] = {
        "user": "alice",
        "image": "default",
        "old": "default@2",
        "new": "default@2",
        "restarted": False,
        "warning": None,
        "pruned": [],
    }
    ctl._rebased(ctl.Client(Path("/none"), json=False), p.Rebased(**same))
    out, err = capsys.readouterr()
    assert out == "alice is already on default@2: nothing to do\n" and err == ""


def test_hostctl_prints_the_move_and_the_warning(capsys: pytest.CaptureFixture[str]) -> None:
    moved: dict[str, Any] = {
        "user": "alice",
        "image": "default",
        "old": "default@1",
        "new": "default@2",
        "restarted": True,
        "warning": "set aside at /x",
        "pruned": ["default@1"],
    }
    ctl._rebased(ctl.Client(Path("/none"), json=False), p.Rebased(**moved))
    out, err = capsys.readouterr()
    assert out == "rebased alice from default@1 to default@2 (restarted); pruned default@1\n"
    assert err == "hostctl: warning: set aside at /x\n"
