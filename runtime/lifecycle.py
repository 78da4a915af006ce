"""Steps of a container's life the Runtime composes: host checks before anything is made, and
halting init."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
from collections.abc import Iterator

from runtime import proc
from runtime.errors import RuntimeFailure
from runtime.runc import Runc

log = logging.getLogger(__name__)

SYSTEMD_HALT = int(signal.SIGRTMIN) + 3  # what `systemctl halt` amounts to for PID 1


def check_host(runc: str) -> None:
    """Fail early, with the fix, when runc or a kernel feature is missing."""
    proc.require(runc, "runc")
    if not os.path.exists("/proc/self/ns/user"):
        raise RuntimeFailure(
            "the kernel has no user namespaces", "use a kernel built with CONFIG_USER_NS=y"
        )
    with open("/proc/sys/user/max_user_namespaces") as f:
        if int(f.read()) == 0:
            raise RuntimeFailure(
                "user namespaces are disabled", "run `sysctl -w user.max_user_namespaces=15000`"
            )
    if not has_filesystem("overlay"):
        # A module on most kernels (Debian's), not loaded at boot: load it as `mount -t` would.
        with contextlib.suppress(RuntimeFailure):
            proc.run(["modprobe", "overlay"], timeout=60)
        if not has_filesystem("overlay"):
            raise RuntimeFailure("the kernel has no overlay file system", "run `modprobe overlay`")


def has_filesystem(fstype: str) -> bool:
    """Whether the running kernel knows `fstype` now (built in or its module loaded)."""
    with open("/proc/filesystems") as f:
        return fstype in (line.split()[-1] for line in f if line.strip())


def halt(runc: Runc, name: str, pid: int, timeout: float) -> None:
    """Ask systemd (init, `pid`) to halt; kill every process if it has not within `timeout`
    seconds (at once with timeout 0). Returns once init is gone (or after 10 s more)."""
    with _pidfd(pid) as pidfd:
        if pidfd is None:
            return
        halted = False
        if timeout > 0:
            runc.kill(name, SYSTEMD_HALT)
            halted = _wait_readable(pidfd, timeout)
            if not halted:
                log.warning("%s did not halt within %s s: killing it", name, timeout)
        if not halted:
            runc.kill(name, signal.SIGKILL, all_processes=True)
            _wait_readable(pidfd, 10.0)


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _wait_readable(fd: int, timeout: float) -> bool:
    """Wait until `fd` is readable (a pidfd: the process exited), at most `timeout` seconds."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)
