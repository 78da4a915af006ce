"""Auto-stop of idle tenants: with `[sessions] auto_stop` set (a few seconds here), a tenant
nobody uses is stopped, says why in `hostctl status`, stays stopped across a hostd restart,
and its next SSH login starts it again; a user's own process or an open session keeps a
tenant up. Seen through hostctl and SSH, waiting on real conditions."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import new_tenants
from tests.hostd_harness import Hostd, Login, UnixUsers, wait_for

AUTO_STOP = 5  # seconds, in the drop-in below


@pytest.fixture(scope="module")
def auto_hostd(hostd: Hostd) -> Iterator[Hostd]:
    with hostd.configured("autostop", f'[sessions]\nauto_stop = "{AUTO_STOP}s"\n') as h:
        yield h


@pytest.fixture
def logins(auto_hostd: Hostd, unix_users: UnixUsers, tmp_path: Path) -> Iterator[list[Login]]:
    """Three new tenants (not logged in yet); removed afterwards."""
    with new_tenants(auto_hostd, unix_users, tmp_path, 3) as made:
        yield made


def status(hostd: Hostd, user: str) -> dict[str, object]:
    (row,) = json.loads(hostd.hostctl("status", user, "--json").stdout)
    return dict(row)


def state(hostd: Hostd, user: str) -> object:
    return status(hostd, user)["state"]


def stops(hostd: Hostd) -> str:
    """hostd's log of its auto-stops: what a failed check here shows."""
    lines = hostd.log.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if "idle since" in line or "auto-stop" in line)


def test_idle_tenants_stop_and_start_again_at_the_next_login(
    auto_hostd: Hostd, logins: list[Login]
) -> None:
    worker, idle, watched = logins
    # worker leaves a process of its own running; idle logs in and out; watched keeps a
    # session open (as root inside: no process of a user's account, only the session)
    worker.sh("setsid nohup sleep 3600 </dev/null >/dev/null 2>&1 &")
    session = subprocess.Popen(
        auto_hostd.hostctl_argv("exec", watched.user, "--", "sleep", "3600"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: state(auto_hostd, watched.user) == "running", 60, "watched started")
        idle.sh("true")  # the last of the three to be used: when it stops, the others were due
        wait_for(lambda: state(auto_hostd, idle.user) == "stopped", 60, "the idle tenant stopped")
        reason = str(status(auto_hostd, idle.user)["reason"])
        assert reason.startswith("idle since ") and reason.endswith("starts at the next login")
        shown = auto_hostd.hostctl("user", "show", idle.user).stdout
        assert f"reason:   {reason}" in shown and f"autostop: {AUTO_STOP}s (default)" in shown
        # its sleep keeps it up, and its open session this one
        assert state(auto_hostd, worker.user) == "running", stops(auto_hostd)
        assert state(auto_hostd, watched.user) == "running", stops(auto_hostd)
        assert f"{watched.user}: stopped" not in stops(auto_hostd)
    finally:
        session.terminate()  # the client goes: hostd hangs the session up
        session.wait(timeout=60)
    wait_for(lambda: state(auto_hostd, watched.user) == "stopped", 60, "watched stopped")

    auto_hostd.stop()  # a restarted hostd leaves the dormant tenants stopped
    auto_hostd.start()
    assert state(auto_hostd, idle.user) == "stopped"
    assert str(status(auto_hostd, idle.user)["reason"]).startswith("idle since ")
    # the next login gets a shell: the container starts again, transparently
    assert idle.sh("echo back; id -un").split() == ["back", idle.user]
    assert status(auto_hostd, idle.user)["reason"] is None
    # ...and an admin's own setting wins over the default
    auto_hostd.hostctl("user", "set", worker.user, "--auto-stop", "off")
    assert "autostop: off" in auto_hostd.hostctl("user", "show", worker.user).stdout
    bad = auto_hostd.hostctl("user", "set", worker.user, "--auto-stop", "soon", check=False)
    assert bad.returncode == 1 and "is not a duration" in bad.stderr
