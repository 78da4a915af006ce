"""One VM per test session (systemd as PID 1, cgroup v2), hostd installed and started in it.

Its disks: the cached image under a throwaway overlay (vda), hostd's state directory holding
this session's default tenant image, built on the host (vdb, mounted at /var/lib/hostd: no
debootstrap under emulation), and the staging disk with hostd's packages, built here (vdc).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime import fsutil
from runtime.containers import Runtime
from tests.vm import install, machine

STATE_SIZE = "16G"  # sparse: the tenant image and the tenants' volumes


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


def report(config: pytest.Config, line: str) -> None:
    """A measurement on the terminal, whatever the capture mode."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[vm] {line}")


@pytest.fixture
def measured(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Show a measurement on the terminal."""
    return lambda line: report(request.config, line)


@pytest.fixture(scope="session")
def vm(rt: Runtime, request: pytest.FixtureRequest) -> Iterator[machine.Machine]:
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: apt-get install {pkg}")
    began = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix="hostd-vm-disks-", dir="/var/tmp"))
    try:
        img, built = machine.image(staging / "build.log")
        if built:
            report(request.config, f"VM image built in {built:.0f} s: {img.directory}")
        disks = _disks(rt, staging)
        with machine.boot(img, disks) as (vm, boot):
            report(request.config, f"VM booted to multi-user in {boot:.0f} s")
            installing = time.monotonic()
            install.install_hostd(vm)
            took = time.monotonic() - installing
            report(request.config, f"hostd's package installed and started in {took:.0f} s")
            report(request.config, f"VM ready with hostd in {time.monotonic() - began:.0f} s")
            yield vm
            report(request.config, f"VM session took {time.monotonic() - began:.0f} s in all")
    finally:
        fsutil.remove_tree(staging)


def _disks(rt: Runtime, staging: Path) -> list[machine.Disk]:
    """The state disk (the default image, as hostd's image store lays it out) and the
    staging disk, made from trees in `staging` (hard links into the host's image: no copy)."""
    state = staging / "state"
    images = state / "images"
    (images / ".versions").mkdir(parents=True)
    images.chmod(0o700)
    version = rt.images.resolve("default")
    subprocess.run(["cp", "-a", "--link", str(version), str(images / ".versions")], check=True)
    (images / "default").symlink_to(f".versions/{version.name}")
    state.chmod(0o711)
    state_disk = machine.Disk(staging / "state.img")
    machine.make_disk(state_disk.path, state, STATE_SIZE, install.STATE_LABEL)
    fsutil.remove_tree(state)
    payload = staging / "install"
    payload.mkdir()
    install.stage(payload)
    install_disk = machine.Disk(staging / "install.img", read_only=True)
    machine.make_disk(install_disk.path, payload, "1G", install.LABEL)  # ~2x 30 MB
    return [state_disk, install_disk]
