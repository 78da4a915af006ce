"""The session path's rules that need no container: the environment filter, the per-tenant cap
and pools, signals by pidfd, and the pty helper's signal forwarding."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from types import SimpleNamespace
from typing import Any, cast

import pytest

from hostd.config import SessionSettings
from hostd.errors import HostdError
from hostd.sessions import MAX_ENV, MAX_ENV_VALUE, PipeProgram, Sessions, client_env, terminal_env
from hostd.tenants import Tenants
from runtime import ttyexec
from runtime.containers import Runtime


def test_env_keeps_passed_names_with_one_line_values() -> None:
    given = {
        "LANG": "C.UTF-8",
        "LC_TIME": "C",
        "TZ": "UTC",
        "EVIL": "1",
        "LD_PRELOAD": "/x.so",
        "LC_NL": "a\nb",
        "LC_CR": "a\rb",
        "LC_NUL": "a\0b",
        "LC_HUGE": "x" * (MAX_ENV_VALUE + 1),
        "LC_MAX": "y" * MAX_ENV_VALUE,
        "LC_X=Y": "z",
        "LC_ BAD": "z",
        b"LC_BYTES": b"ok",
        "LC_BADUTF8": b"\xff",
        "LC_NUMBER": 5,
    }
    assert client_env(given) == [
        "LANG=C.UTF-8",
        "LC_TIME=C",
        "TZ=UTC",
        f"LC_MAX={'y' * MAX_ENV_VALUE}",
        "LC_BYTES=ok",
    ]


def test_env_keeps_a_bounded_number_of_variables() -> None:
    kept = client_env({f"LC_V{i}": "x" for i in range(MAX_ENV * 10)})
    assert len(kept) == MAX_ENV


def test_term_must_look_like_a_terminal_name() -> None:
    assert terminal_env("xterm-256color") == "TERM=xterm-256color"
    for bad in ("", "x\nLD_PRELOAD=/x.so", "a" * 100, None, b"\xff", "../../x"):
        assert terminal_env(bad) == "TERM=xterm"


def _sessions(cap: int) -> Sessions:
    tenants = cast(Tenants, SimpleNamespace())
    return Sessions(tenants, cast(Runtime, None), SessionSettings(max_per_tenant=cap))


def test_the_cap_refuses_one_more_session_and_names_the_setting() -> None:
    sessions = _sessions(2)
    with sessions.slot("alice") as pool, sessions.slot("alice") as same:
        assert pool is same  # one pool per tenant
        with pytest.raises(HostdError) as refused, sessions.slot("alice"):
            pass
        assert str(refused.value) == (
            "alice has 2 sessions open, the most allowed: "
            "end one, or ask an admin to raise [sessions] max_per_tenant"
        )
        with sessions.slot("bob") as other:  # another tenant is not affected
            assert other is not pool
        assert sessions.count("alice") == 2
    assert sessions.count("alice") == 0
    with sessions.slot("alice") as fresh:  # the pool went with the last session
        assert fresh is not pool


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "600"])


def test_signals_go_through_the_pidfd_and_a_late_one_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[tuple[int, int]] = []
    real = signal.pidfd_send_signal

    def record(fd: int, sig: int, *args: Any) -> None:
        sent.append((fd, sig))
        real(fd, sig, *args)

    def no_kill(*_: object) -> None:
        raise AssertionError("a signal by PID: it may reach a reused PID")

    monkeypatch.setattr(signal, "pidfd_send_signal", record)
    monkeypatch.setattr(os, "kill", no_kill)
    program = PipeProgram(_sleeper())
    pidfd = program.exit_fd
    program.signal(signal.SIGTERM)
    assert program.wait() == 128 + signal.SIGTERM
    assert sent == [(pidfd, signal.SIGTERM)]
    program.signal(signal.SIGKILL)  # after the end: nothing, no error
    program.hangup()
    assert sent == [(pidfd, signal.SIGTERM)]


def test_a_dead_pidfd_is_handled_quietly() -> None:
    child = _sleeper()
    pidfd = os.pidfd_open(child.pid)
    try:
        child.kill()
        child.wait()  # reaped: its PID is free for anyone now
        with pytest.raises(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        ttyexec.signal_pidfd(pidfd, signal.SIGTERM)  # the same, quietly
    finally:
        os.close(pidfd)


def _forwarding(child: subprocess.Popen[bytes]) -> tuple[socket.socket, int]:
    """Run the pty helper's forwarding loop for `child` in a forked process (as the helper)."""
    ours, theirs = socket.socketpair()
    pidfd = os.pidfd_open(child.pid)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the helper's side
        ours.close()
        ttyexec.forward_signals(theirs, pidfd)
        os._exit(0)
    theirs.close()
    os.close(pidfd)
    return ours, pid


@pytest.mark.parametrize("hangup", [False, True], ids=["signal", "caller-gone"])
def test_the_pty_helper_forwards_signals_and_hangs_up(hangup: bool) -> None:
    child = _sleeper()
    caller, forwarder = _forwarding(child)
    try:
        if hangup:
            caller.close()
        else:
            caller.send(bytes([signal.SIGUSR1, 0, 200]))  # invalid numbers are dropped
        assert child.wait(timeout=60) == -(signal.SIGHUP if hangup else signal.SIGUSR1)
        _, status = os.waitpid(forwarder, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # it returned once the program ended
    finally:
        caller.close()
        if child.poll() is None:
            child.kill()
            child.wait()
