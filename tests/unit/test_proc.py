"""The program chokepoint: pipes for stdio, one-line failures, no systemd service variables."""

from __future__ import annotations

import os

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


def test_output_is_capped_and_the_program_killed() -> None:
    with pytest.raises(RuntimeFailure, match=r"printed more than 100000 bytes"):
        proc.run(["sh", "-c", "yes"], max_output=100_000, timeout=30)


def test_a_slow_program_is_killed_at_the_timeout() -> None:
    with pytest.raises(RuntimeFailure, match=r"took longer than 0.3 s"):
        proc.run(["sleep", "30"], timeout=0.3)


def test_a_program_holding_its_output_open_is_killed_at_the_timeout() -> None:
    # the output pipe stays open in a background child: the timeout still holds
    with pytest.raises(RuntimeFailure, match=r"took longer"):
        proc.run(["sh", "-c", "sleep 30 & echo started"], timeout=0.5)


def test_large_input_and_output_pass_whole() -> None:
    data = bytes(range(256)) * 8192  # 2 MiB: more than a pipe buffer each way
    res = proc.run(["cat"], input=data, timeout=30)
    assert res.stdout == data.decode(errors="replace")


def test_as_user_runs_with_only_that_users_ids_in_the_root_dir() -> None:
    if os.geteuid() != 0:
        pytest.skip("running a program as another user needs root: run as root")
    res = proc.run(["sh", "-c", "id -u; id -g; id -G; pwd"], as_user=(65534, 65534, [65534]))
    assert res.stdout.split() == ["65534", "65534", "65534", "/"]
