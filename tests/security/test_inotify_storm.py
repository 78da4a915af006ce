"""inotify on a host with the kernel's default limits: one tenant cannot use up the instances
the others (and host root) need, and 30 tenants started at once all come up.

Before, every tenant's user namespace was owned by host root (runc made it), so the kernel
charged all tenants' instances to root: 16 idle tenants used up the default 128 and the next
tenant's systemd died at inotify_init1 (EMFILE); a tenant that raised its own namespace's limit
could take them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from hostd import hostlimits
from runtime import sysctl
from tests.hostd_harness import Hostd, UnixUsers, wait_for

KERNEL_DEFAULTS = {"fs/inotify/max_user_instances": 128, "fs/inotify/max_user_watches": 8192}
STORM = 30
SMALL = ("--memory", "768M", "--disk", "1G", "--pids", "2000")
# Root inside lifts its own namespace's limit, then opens instances until the kernel says no,
# in processes of its own (each with room for 4096 fds) and holds them.
FLOOD = r"""
echo 2147483647 > /proc/sys/user/max_inotify_instances || exit 3
for i in 1 2 3; do
  (ulimit -n 4096; exec perl -e '$n = 0; $n++ while syscall(294, 0) >= 0; $e = "$!";
     open(my $f, ">", "/tmp/flood.$ARGV[0]"); print $f "$n $e\n"; close $f; sleep 600' $i) \
    </dev/null >/dev/null 2>&1 &
done
"""


# The machine's own values, read at collection: before the session's hostd raised them.
MACHINE = {key: sysctl.read(key) for key in KERNEL_DEFAULTS}


@pytest.fixture(scope="module")
def default_limits(hostd: Hostd) -> Iterator[Hostd]:
    """The kernel's default inotify limits, then hostd restarted so it raises them; the
    machine's own values come back afterwards, on failure too."""
    saved = MACHINE
    try:
        for key, default in KERNEL_DEFAULTS.items():
            sysctl.write(key, str(default))
        hostd.stop()
        hostd.start()
        yield hostd
    finally:
        for key, text in saved.items():
            sysctl.write(key, text)


@contextlib.contextmanager
def tenants(hostd: Hostd, users: list[str]) -> Iterator[list[str]]:
    """Make the users tenants (in parallel); remove them all afterwards, on failure too."""
    added: list[str] = []

    def add(user: str) -> None:
        hostd.hostctl("user", "add", user, *SMALL)
        added.append(user)

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(add, users))
        yield users
    finally:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda u: hostd.hostctl("user", "remove", u, check=False), added))


def start_and_ask_docker(hostd: Hostd, user: str) -> str:
    """'' when the tenant starts and its dockerd answers, else what went wrong."""
    res = hostd.hostctl("start", user, check=False)
    if res.returncode != 0:
        return f"{user}: start failed: {res.stderr.strip()}"
    res = hostd.hostctl(
        "exec", user, "--", "docker", "info", "--format", "{{.ServerVersion}}", check=False
    )
    if res.returncode != 0 or not res.stdout.strip():
        return f"{user}: docker info failed: {res.stderr.strip()}"
    return ""


def host_root_can_use_inotify() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        assert ctypes.get_errno() == errno.EMFILE, os.strerror(ctypes.get_errno())
        return False
    os.close(fd)
    return True


def test_hostd_raised_the_limits(default_limits: Hostd) -> None:
    for key, minimum in hostlimits.SETTINGS:
        assert int(sysctl.read(key)) == minimum
    assert "raised fs.inotify.max_user_instances from 128 to 1024" in default_limits.log.read_text()


def _flood_report(hostd: Hostd, user: str, i: int) -> str:
    """Flooder `i`'s line ("<count> <error>") once it wrote all of it, else ""."""
    res = hostd.hostctl("exec", user, "--", "cat", f"/tmp/flood.{i}", check=False)
    return res.stdout if res.returncode == 0 and res.stdout.endswith("\n") else ""


def test_one_tenant_cannot_take_the_inotify_instances_of_others(
    default_limits: Hostd, unix_users: UnixUsers
) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("the flood calls inotify_init1 by its x86_64 number (294)")
    hostd = default_limits
    cap = int(sysctl.read("fs/inotify/max_user_instances"))
    with tenants(hostd, [unix_users.make(), unix_users.make()]) as (attacker, victim):
        assert start_and_ask_docker(hostd, attacker) == ""
        hostd.hostctl("exec", attacker, "--", "sh", "-c", FLOOD)
        counts = []
        for i in (1, 2, 3):  # each flooder writes its count once the kernel refused it
            done = partial(_flood_report, hostd, attacker, i)
            out = wait_for(done, 120, f"flooder {i}'s count", interval=0.2)
            count, _, reason = out.strip().partition(" ")
            assert reason == "Too many open files"
            counts.append(int(count))
        assert 0 < sum(counts) <= cap, "the tenant went past its cap"
        # while the attacker holds all it may, the others still get theirs
        assert host_root_can_use_inotify(), "a tenant used up host root's inotify instances"
        assert start_and_ask_docker(hostd, victim) == ""


def test_thirty_tenants_started_at_once_all_run_docker(
    default_limits: Hostd, unix_users: UnixUsers
) -> None:
    hostd = default_limits
    with tenants(hostd, [unix_users.make() for _ in range(STORM)]) as users:
        with ThreadPoolExecutor(STORM) as pool:
            failures = [f for f in pool.map(lambda u: start_and_ask_docker(hostd, u), users) if f]
        assert failures == []
        assert host_root_can_use_inotify()
