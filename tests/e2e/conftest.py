"""Product-level tests: a real hostd, a tenant made with `hostctl user add` with quotas (so the
capped volume is in play), used as its user over SSH through hostd's gateway, the way a
developer meets hostd. Every user-visible feature gets a test here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostd_harness import Hostd, Login, UnixUsers, login_as, wait_for

# What an admin gives a developer: every limit set, the volume capped.
QUOTAS = ("--cpus", "2", "--memory", "4G", "--pids", "4096", "--disk", "8G")


def add_developer(
    hostd: Hostd, unix_users: UnixUsers, directory: Path, busybox_tar: Path, *options: str
) -> Login:
    """A new Unix user made a tenant by `hostctl user add` with quotas, logged in over SSH,
    with a `busybox:local` image in their Docker (there is no registry here)."""
    user = unix_users.make()
    hostd.hostctl("user", "add", user, *QUOTAS, *options)
    try:
        login = login_as(user, hostd.ssh_port, directory)
        login.sh("docker import - busybox:local >/dev/null", input=busybox_tar.read_bytes())
    except BaseException:
        hostd.hostctl("user", "remove", user, check=False)
        raise
    return login


@contextlib.contextmanager
def new_tenants(
    hostd: Hostd, unix_users: UnixUsers, directory: Path, count: int
) -> Iterator[list[Login]]:
    """`count` new Unix users made tenants with quotas, each with an SSH login (not used
    yet), removed afterwards."""
    made: list[Login] = []
    try:
        for i in range(count):
            user = unix_users.make()
            hostd.hostctl("user", "add", user, *QUOTAS)
            (directory / str(i)).mkdir()
            made.append(login_as(user, hostd.ssh_port, directory / str(i)))
        yield made
    finally:
        for login in made:
            hostd.hostctl("user", "remove", login.user, check=False)


def context(login: Login, name: str, dockerfile: str) -> str:
    """A build context directory `name` in the user's home holding `dockerfile`."""
    login.sh(f"mkdir -p {name} && cat > {name}/Dockerfile", input=dockerfile.encode())
    return name


@pytest.fixture(scope="module")
def dev(
    hostd: Hostd,
    unix_users: UnixUsers,
    tmp_path_factory: pytest.TempPathFactory,
    busybox_tar: Path,
) -> Iterator[Login]:
    """One developer per test module, on the default image."""
    login = add_developer(hostd, unix_users, tmp_path_factory.mktemp("dev"), busybox_tar)
    yield login
    hostd.hostctl("user", "remove", login.user, check=False)


def wait_inside(
    login: Login, condition: str, what: str, diagnose: str = "true", timeout: int = 60
) -> None:
    """Poll the shell `condition`, as the user in their tenant, until it holds; else fail
    saying `what` did not happen, with the output of the shell `diagnose`."""

    def diagnosis() -> str:
        res = login.ssh(f"{{ {diagnose}; }} 2>&1", timeout=60)
        return f"{what}, then: {res.stdout.decode(errors='replace')[-3000:]}"

    wait_for(lambda: login.ssh(condition, timeout=timeout + 60).returncode == 0, timeout, diagnosis)
