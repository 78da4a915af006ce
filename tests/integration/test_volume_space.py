"""A tenant's volume gives back to the host what is deleted inside, and a stopped tenant's
disk usage is still known (from its file system, without mounting it)."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.containers import Runtime
from runtime.limits import Limits
from tests.conftest import next_range, sh
from tests.hostd_harness import wait_for

MiB = 2**20
COMMIT = 30  # seconds: ext4 discards freed blocks at its journal commit, every 5 s


def _host_bytes(image: Path) -> int:
    return os.stat(image).st_blocks * 512


def test_deleted_space_goes_back_to_the_host(rt: Runtime) -> None:
    name = f"space{os.getpid()}"
    rt.create(name, "default", next_range(), limits=Limits(disk=1024 * MiB))
    image = rt.state_dir / "containers" / name / "data.img"
    try:
        rt.start(name)
        rt.wait_ready(name)
        before = _host_bytes(image)
        sh(rt, name, "dd if=/dev/urandom of=/root/big bs=1M count=300 conv=fsync status=none")
        assert _host_bytes(image) >= before + 300 * MiB
        sh(rt, name, "rm /root/big && sync")
        wait_for(
            lambda: _host_bytes(image) < before + 30 * MiB,
            COMMIT,
            lambda: f"data.img to shrink back to ~{before // MiB} MiB on the host",
        )
        running = rt.disk_used(name)
        assert running is not None and running < 100 * MiB
        rt.stop(name)
        stopped = rt.disk_used(name)  # not the empty mount point's few KiB
        assert stopped is not None and abs(stopped - running) <= 4 * MiB
    finally:
        rt.delete(name, force=True)
