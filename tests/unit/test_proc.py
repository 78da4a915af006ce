"""The program chokepoint: pipes for stdio, one-line failures, no systemd service variables."""

from __future__ import annotations

import pytest

from runtime import proc
from runtime.errors import RuntimeFailure


def test_children_never_get_hostds_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("HOSTD_TEST_KEEP", "kept")
    out = proc.run(["env"]).stdout.splitlines()
    assert "HOSTD_TEST_KEEP=kept" in out
    assert not any(line.startswith(("NOTIFY_SOCKET=", "WATCHDOG_USEC=")) for line in out)


def test_failure_is_one_line_with_the_fix() -> None:
    with pytest.raises(RuntimeFailure) as info:
        proc.run(["sh", "-c", "echo first >&2; echo last words >&2; exit 3"], fix="do this")
    assert str(info.value) == "sh failed: last words: do this"


def test_missing_program_names_the_package() -> None:
    with pytest.raises(RuntimeFailure, match=r"no-such-tool not found: install it with `apt-get"):
        proc.require("no-such-tool", "some-package")
