"""Idle tenants cost little: a tenant's Docker (dockerd, containerd) starts at its first use
through docker.socket and stops again after `[runtime] docker_idle_stop` with no container
running and no client, while the socket keeps listening for the next call. Seen as the user
over SSH, with the idle time set short in hostd's configuration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import new_tenants, wait_inside
from tests.hostd_harness import Hostd, Login, UnixUsers

IDLE_STOP = 5  # seconds, in the drop-in below
DOCKER_DOWN = "! pgrep -x dockerd >/dev/null && ! pgrep -x containerd >/dev/null"
SOCKET_LISTENS = "systemctl is-active -q docker.socket && test -S /run/docker.sock"
DOCKERD_PID = "pgrep -x dockerd"
KEEPER = "sleep 86399"  # what the --restart always container runs: found by pgrep -f
USER_RULE = "-s 192.0.2.7/32 -j DROP"  # in DOCKER-USER, where Docker's docs put one's own
# What to show when Docker did not stop: the setting, the watcher, what it watches, what runs.
WHY = (
    "cat /etc/default/hostd-docker-idle; systemctl status --no-pager hostd-docker-idle;"
    " for i in 1 2 3; do sudo cat /proc/$(pgrep -x dockerd)/io; sleep 1; done;"
    " grep docker.sock /proc/net/unix; ps -ef"
)


@pytest.fixture(scope="module")
def idle_hostd(hostd: Hostd) -> Iterator[Hostd]:
    with hostd.configured("idle", f'[runtime]\ndocker_idle_stop = "{IDLE_STOP}s"\n') as h:
        yield h


@pytest.fixture
def tenants(
    idle_hostd: Hostd, unix_users: UnixUsers, tmp_path: Path, busybox_tar: Path
) -> Iterator[list[Login]]:
    """Two new tenants, logged in over SSH (their containers started by the login) and
    nothing else: their Docker has not been used yet."""
    with new_tenants(idle_hostd, unix_users, tmp_path, 2) as logins:
        for login in logins:
            login.sh("true")
        yield logins


def load_busybox(login: Login, busybox_tar: Path) -> None:
    login.sh("docker import - busybox:local >/dev/null", input=busybox_tar.read_bytes())


def test_docker_starts_on_first_use_and_stops_when_idle(
    tenants: list[Login], busybox_tar: Path
) -> None:
    dev = tenants[0]
    # A login (and hostctl start) did not wait for Docker, nor start it
    dev.sh(f"{DOCKER_DOWN} && {SOCKET_LISTENS}")
    load_busybox(dev, busybox_tar)  # the first call starts it
    assert dev.sh("docker run --rm busybox:local echo activated").strip() == "activated"
    # containerd starts without the `modprobe overlay` a container cannot run (an error each time)
    journal = dev.sh("sudo journalctl -b -u containerd --no-pager -o cat")
    assert "/sbin/modprobe" not in journal, journal
    dev.sh(f"sudo iptables -I DOCKER-USER {USER_RULE}")  # the user's own firewall rule
    wait_inside(dev, DOCKER_DOWN, "dockerd and containerd idle-stopped", WHY, timeout=60)
    dev.sh(SOCKET_LISTENS)
    # Docker's own chains and bridge went with it (its next start is quicker), the user's
    # rule stayed
    stopped = dev.sh("sudo iptables-save")
    assert ":DOCKER " not in stopped and ":DOCKER-ISOLATION" not in stopped, stopped
    assert USER_RULE in stopped and "docker0" not in dev.sh("ip -br link"), stopped
    # ...and the next call starts them again, images kept, its rules made again once each
    assert dev.sh("docker run --rm busybox:local echo again").strip() == "again"
    dev.sh(DOCKERD_PID)
    rules = dev.sh("sudo iptables-save")
    assert rules.count(USER_RULE) == 1 and rules.count("-j MASQUERADE") == 1, rules
    assert ":DOCKER-ISOLATION-STAGE-1" in rules and "docker0" in dev.sh("ip -br link")


def test_a_running_container_keeps_docker_up(
    tenants: list[Login], busybox_tar: Path, idle_hostd: Hostd
) -> None:
    """Two tenants use Docker at once; one leaves a `--restart always` container running.
    The other's dockerd idle-stops (so the idle time has passed); the first keeps the same
    dockerd and its container, and after a tenant restart the container runs again with
    no docker call (restart policies are honoured at boot)."""
    busy, quiet = tenants
    for login in tenants:
        load_busybox(login, busybox_tar)
    busy.sh(f"docker run -d --restart always --name keeper busybox:local {KEEPER} >/dev/null")
    quiet.sh("docker ps >/dev/null")
    pid = busy.sh(DOCKERD_PID).strip()
    wait_inside(quiet, DOCKER_DOWN, "the control tenant's dockerd idle-stopped", WHY)
    assert busy.sh(DOCKERD_PID).strip() == pid, "dockerd stopped under a running container"
    busy.sh(f"pgrep -f '{KEEPER}' >/dev/null")
    idle_hostd.hostctl("restart", busy.user)
    wait_inside(busy, f"pgrep -f '{KEEPER}' >/dev/null", "the keeper running after restart")
    busy.sh("docker rm -f keeper >/dev/null")
    wait_inside(busy, DOCKER_DOWN, "dockerd idle-stopped once the keeper is gone", WHY)
