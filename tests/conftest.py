"""Fixtures for integration and security tests: a real runtime in a private state dir, real
runc and dockerd, a real hostd.

The default image is built once per session (debootstrap, ~45 s; packages are cached in
/var/cache/hostd/debootstrap). Everything a test creates is removed afterwards, on failure too.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from hostd import config as config_mod
from hostd.daemon import restore_default_signals
from runtime import fsutil, lxcfs, network
from runtime.containers import Runtime
from runtime.execs import ExecSpec
from runtime.ids import IdRange
from runtime.limits import Limits
from runtime.settings import Settings
from tests.hostd_harness import Hostd, UnixUsers, free_port, free_subnet, make_busybox_tar

CGROUP_PARENT = "hostd-test"
# Never the production hostd0, nor the names test_network.py uses (hostdn/u/v<pid>).
TEST_BRIDGE = f"hostdt{os.getpid()}"  # pid_max is 7 digits at most: within IFNAMSIZ
TEST_TABLE = f"hostd_test_{os.getpid()}"
TEST_SUBNET = free_subnet(20)  # the hostd fixture's bridge network, this session's own
TEST_GATEWAY = TEST_SUBNET.network_address + 1  # the bridge's address, the tenants' DNS
_starts = itertools.count(1_000_000, 65536)


ROOT_DIRS = ("tests/integration", "tests/security", "tests/e2e")
# The default image's inner storage driver: native overlay mounts on the tenant's volume (never
# vfs, which copies every layer).
INNER_DRIVER = "overlay2"

# The unit tests run hostd's sessions and gateway in this process: from the signals hostd
# itself starts with, whatever ignored the runner inherited (nohup).
restore_default_signals()

# Timings never decide a test: a loaded machine must not fail a property test.
settings.register_profile("hostd", deadline=None)
settings.load_profile("hostd")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(d in str(item.fspath) for d in ROOT_DIRS):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _needs_root(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("integration") is not None:
        require_root()


def require_root() -> None:
    """Skip, saying what to do, where integration tests cannot run."""
    if os.geteuid() != 0:
        pytest.skip("integration tests need root (user namespaces, mounts, runc): run as root")
    for tool, pkg in (
        ("runc", "runc"),
        ("debootstrap", "debootstrap"),
        ("busybox", "busybox-static"),
    ):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: apt-get install {pkg}")


def next_range() -> IdRange:
    return IdRange(next(_starts))


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    require_root()  # before any session fixture builds on it
    path = Path(tempfile.mkdtemp(prefix="hostd-it-", dir="/var/tmp"))
    os.chmod(path, 0o711)
    yield path
    fsutil.remove_tree(path)


@pytest.fixture(scope="session")
def rt(state_dir: Path) -> Iterator[Runtime]:
    runtime = Runtime(Settings(state_dir, cgroup_parent=CGROUP_PARENT))
    runtime.images.build("default")
    yield runtime
    for c in runtime.containers():
        runtime.delete(c.name, force=True)


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_tar(tmp_path_factory.mktemp("busybox"))


ContainerFactory = Callable[..., str]


@pytest.fixture
def make_container(rt: Runtime) -> Iterator[ContainerFactory]:
    """Create (and by default start and wait for) containers; all deleted at teardown."""
    made: list[str] = []
    counter = itertools.count()

    def make(
        prefix: str = "t", image: str = "default", start: bool = True, limits: Limits | None = None
    ) -> str:
        name = f"{prefix}{os.getpid()}-{next(counter)}"
        rt.create(name, image, next_range(), limits=limits)
        made.append(name)
        if start:
            rt.start(name)
            rt.wait_ready(name)
        return name

    yield make
    for name in made:
        if (rt.state_dir / "containers" / name).exists():
            rt.delete(name, force=True)


def sh(rt: Runtime, name: str, script: str, input: bytes | None = None) -> str:
    """Run a shell script as root inside; fail the test with its output if it fails."""
    res = rt.exec(name, ExecSpec(["sh", "-c", script]), input=input, timeout=300)
    assert res.returncode == 0, f"{script!r} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def load_busybox(rt: Runtime, name: str, tar: Path) -> None:
    sh(rt, name, "docker import - busybox:local >/dev/null", input=tar.read_bytes())


@pytest.fixture(scope="session")
def hostd(rt: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostd]:
    """A real hostd sharing the session's state dir (and default image); its subordinate ID
    files are temp files, never the machine's /etc/subuid."""
    tmp = tmp_path_factory.mktemp("hostd")
    run = Path(tempfile.mkdtemp(prefix="hostd-it-", dir="/run"))
    os.chmod(run, 0o755)  # test users must reach the user socket
    h = Hostd(
        config=tmp / "hostd.toml",
        subuid=tmp / "subuid",
        subgid=tmp / "subgid",
        admin_socket=run / "admin.sock",
        user_socket=run / "user.sock",
        state_dir=rt.state_dir,
        log=tmp / "hostd.log",
        ssh_port=free_port(),
    )
    h.config.write_text(
        f'[paths]\nstate_dir = "{rt.state_dir}"\nrun_dir = "{run}"\n'
        f'admin_socket = "{h.admin_socket}"\nuser_socket = "{h.user_socket}"\n'
        f'subuid = "{h.subuid}"\nsubgid = "{h.subgid}"\n'
        f'[runtime]\ncgroup_parent = "{CGROUP_PARENT}"\nstop_timeout = 10\n'
        "[subids]\nmin = 200000000\nmax = 300000000\n"
        # Small sparse volumes by default: doctor's disk headroom (the sum of quotas against
        # the free space) stays ok on a test machine with tens of GB free and many tenants.
        '[limits]\ndisk = "2G"\n'
        f'[gateway]\nlisten = "127.0.0.1:{h.ssh_port}"\nmax_failures = 1000\n'
        "max_unauthenticated_per_source = 64\n"
        f'[network]\nbridge = "{TEST_BRIDGE}"\nnft_table = "{TEST_TABLE}"\n'
        f'subnet = "{TEST_SUBNET}"\ndns = ["{TEST_GATEWAY}"]\n'
    )
    h.start()
    yield h
    h.stop()
    shutil.rmtree(run)
    settings = config_mod.load(h.config).runtime_settings()
    hostd_rt = Runtime(settings)
    for c in hostd_rt.containers():  # tenants of this hostd, then its bridge, rules and lxcfs
        if c.address is not None:
            hostd_rt.delete(c.name, force=True)
    network.teardown_host(hostd_rt.network_config())
    assert settings.lxcfs is not None
    lxcfs.stop(settings.lxcfs)


@pytest.fixture(scope="session")
def unix_users() -> Iterator[UnixUsers]:
    users = UnixUsers()
    yield users
    users.remove_all()
