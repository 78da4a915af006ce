"""The runc driver: the argv it builds and the errors it reports."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import runtime.runc
from runtime.errors import RuntimeFailure
from runtime.execs import ExecSpec
from runtime.runc import Runc, RuncState, _runc_error

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


def _state_json(runc: Runc, cid: str, pid: int, start: object, **more: object) -> Path:
    directory = runc.root / cid
    directory.mkdir(parents=True)
    state = {"id": cid, "init_process_pid": pid, "init_process_start": start, **more}
    (directory / "state.json").write_text(json.dumps(state))
    return directory


def _start_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_state_of_a_live_init_without_starting_runc(tmp_path: Path) -> None:
    runc = fake_runc(tmp_path, "exit 99")  # never run
    me = os.getpid()
    started = _start_of(me)
    created = _state_json(runc, "alice", me, started)
    assert runc.state("alice") == RuncState("running", me, started)
    (created / "exec.fifo").touch()  # `runc create` done, `runc start` not yet
    assert runc.state("alice") == RuncState("created", me, started)
    assert runc.state("bob") is None


def test_state_json_is_parsed_again_only_once_runc_replaced_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runc = fake_runc(tmp_path, "exit 99")
    me = os.getpid()
    started = _start_of(me)
    directory = _state_json(runc, "alice", me, started)
    parses: list[bytes] = []
    counting = SimpleNamespace(loads=lambda b: parses.append(b) or json.loads(b))
    monkeypatch.setattr(runtime.runc, "json", counting)
    for _ in range(3):
        assert runc.state("alice") == RuncState("running", me, started)
    assert len(parses) == 1
    # runc writes a new file and renames it over the old one: a restart's new init
    new = directory / "state.json.new"
    new.write_text(json.dumps({"init_process_pid": me, "init_process_start": started - 1}))
    new.rename(directory / "state.json")
    assert runc.state("alice") == RuncState("stopped", 0)
    assert len(parses) == 2
    (directory / "state.json").unlink()
    assert runc.state("alice") is None


def test_state_is_stopped_when_init_is_gone_reused_or_a_zombie(tmp_path: Path) -> None:
    runc = fake_runc(tmp_path, "exit 99")
    me = os.getpid()
    _state_json(runc, "reused", me, _start_of(me) - 1)  # another process with the same PID
    _state_json(runc, "none", 0, 0)
    child = subprocess.Popen(["true"])
    _state_json(runc, "zombie", child.pid, _start_of(child.pid))
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)  # poll interval
    try:
        for cid in ("reused", "none", "zombie"):
            assert runc.state(cid) == RuncState("stopped", 0), cid
    finally:
        child.wait()
    assert runc.state("zombie") == RuncState("stopped", 0)  # reaped: gone


@pytest.mark.parametrize(
    ("controller", "file", "frozen"),
    [("freezer", "freezer.state", "FROZEN"), ("", "cgroup.freeze", "1")],
)
def test_state_is_paused_when_frozen(
    tmp_path: Path, controller: str, file: str, frozen: str
) -> None:
    runc = fake_runc(tmp_path, "exit 99")
    me = os.getpid()
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    _state_json(runc, "alice", me, _start_of(me), cgroup_paths={controller: str(cgroup)})
    (cgroup / file).write_text(frozen + "\n")
    assert runc.state("alice") == RuncState("paused", me, _start_of(me))
    (cgroup / file).write_text("THAWED\n" if controller else "0\n")
    assert runc.state("alice") == RuncState("running", me, _start_of(me))


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


def test_exec_argv_puts_the_program_where_the_options_say() -> None:
    argv = RUNC.exec_argv("alice", ExecSpec(["id"]), ("--cgroup", "hostd-sessions"))
    assert argv == [*BASE, "--cgroup", "hostd-sessions", "--user", "0:0", "alice", "id"]


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
