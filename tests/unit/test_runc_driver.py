"""The runc driver: the argv it builds and the errors it reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import RuntimeFailure
from runtime.execs import ExecSpec
from runtime.runc import Runc, _runc_error

RUNC = Runc("/usr/sbin/runc", Path("/state/runc"))
BASE = ["/usr/sbin/runc", "--root", "/state/runc", "exec"]


def fake_runc(tmp_path: Path, script: str) -> Runc:
    """A Runc whose binary is a shell script (no kernel objects, no root)."""
    binary = tmp_path / "runc"
    binary.write_text(f"#!/bin/sh\n{script}\n")
    binary.chmod(0o755)
    return Runc(str(binary), tmp_path / "root")


# -- _runc_error -----------------------------------------------------------------------------


def test_error_is_the_msg_of_the_last_error_line() -> None:
    log = (
        'time="2024-05-01T10:00:00Z" level=warning msg="cgroup v1 is deprecated"\n'
        'time="2024-05-01T10:00:00Z" level=error msg="first failure"\n'
        'time="2024-05-01T10:00:01Z" level=error msg="runc run failed: invalid rootfs: stat '
        '/state/alice/rootfs: no such file or directory"\n'
        "\n"
    )
    assert _runc_error(log) == (
        "runc run failed: invalid rootfs: stat /state/alice/rootfs: no such file or directory"
    )


def test_error_msg_is_unquoted() -> None:
    # logrus quotes msg Go-style: inner quotes and backslashes come escaped.
    log = (
        'time="2024-05-01T10:00:00Z" level=error msg="runc run failed: unable to start container'
        ' process: exec: \\"/sbin/init\\": stat /sbin/init: no such file or directory"'
    )
    assert _runc_error(log) == (
        "runc run failed: unable to start container process: "
        'exec: "/sbin/init": stat /sbin/init: no such file or directory'
    )


def test_error_msg_stops_at_its_closing_quote() -> None:
    log = 'time="2024-05-01T10:00:00Z" level=error msg="signal failed" error="no such process"'
    assert _runc_error(log) == "signal failed"


def test_without_error_line_the_last_line_is_the_error() -> None:
    assert _runc_error("systemd 252 running in system mode\nFailed to mount /sys\n\n") == (
        "Failed to mount /sys"
    )
    assert _runc_error("\n  \n") == "no output"


def test_create_failure_reports_runc_error_and_log(tmp_path: Path) -> None:
    runc = fake_runc(
        tmp_path, """echo 'time="2024-05-01T10:00:00Z" level=error msg="no config"' >&2; exit 1"""
    )
    with pytest.raises(RuntimeFailure) as info:
        runc.create(tmp_path, "alice", tmp_path / "console.log")
    assert info.value.cause == "runc could not start alice: no config"
    assert info.value.fix == f"see {tmp_path / 'console.log'}"


def test_state_parses_runc_json_and_none_when_unknown(tmp_path: Path) -> None:
    runc = fake_runc(
        tmp_path,
        """[ "$4" = alice ] || { echo 'level=error msg="container does not exist"' >&2; exit 1; }
echo '{"ociVersion": "1.0.2", "id": "alice", "pid": 4242, "status": "running"}'""",
    )
    state = runc.state("alice")
    assert state is not None
    assert (state.status, state.pid) == ("running", 4242)
    assert runc.state("bob") is None


# -- exec_argv -------------------------------------------------------------------------------


def test_exec_argv_without_terminal() -> None:
    assert RUNC.exec_argv("alice", ExecSpec(["ls", "-l"])) == [
        *BASE,
        "--user",
        "0:0",
        "alice",
        "ls",
        "-l",
    ]


def test_exec_argv_with_user_cwd_and_env() -> None:
    spec = ExecSpec(["id"], user="1000:1000", cwd="/home/u", env=["HOME=/home/u", "TERM=xterm"])
    argv = RUNC.exec_argv("alice", spec)
    assert argv == [
        *BASE,
        "--user",
        "1000:1000",
        "--cwd",
        "/home/u",
        "--env",
        "HOME=/home/u",
        "--env",
        "TERM=xterm",
        "alice",
        "id",
    ]


def test_exec_argv_options_of_the_command_stay_after_the_container_id() -> None:
    argv = RUNC.exec_argv("alice", ExecSpec(["--tty", "-c", "x"]))
    assert argv[-4:] == ["alice", "--tty", "-c", "x"]
    assert "--tty" not in argv[:-3]
