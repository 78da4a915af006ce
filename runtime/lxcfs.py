"""A truthful /proc inside: one lxcfs (FUSE, a host-root process) serves every container.

lxcfs answers reads of its /proc files with the figures of the reading process's cgroup
(memory limit, CPU quota, the container's own uptime and load), so `free`, `top` and `nproc`
inside show the container, not the host. Its files are bound over the container's own.

lxcfs keeps running when hostd exits: the containers' binds point into it, and a new lxcfs
does not heal them. Stop it only when no container runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from runtime import mountinfo, proc, syscalls
from runtime.errors import RuntimeFailure
from runtime.spec import Bind

DEFAULT_MOUNTPOINT = Path("/var/lib/hostd/lxcfs")
PROC_FILES = ("cpuinfo", "diskstats", "loadavg", "meminfo", "stat", "swaps", "uptime")
SYS_FILES = ("devices/system/cpu/online",)
# Not "ro": the FUSE mount's flags are locked in the user namespace, asking for ro is EPERM.
BIND_OPTIONS = ("rbind", "nosuid", "nodev", "noexec")
# Without them loadavg is the host's, and the CPU count follows the cpuset only, not the quota.
OPTIONS = ("--enable-loadavg", "--enable-cfs")
FSTYPE = "fuse.lxcfs"
LXCFS_RUNTIME_DIR = Path("/run/lxcfs")  # lxcfs's own (compiled in), shared with any other lxcfs
ERROR_LINE = re.compile(r"^\S+\.c: \d+: ")  # lxcfs's errors: "../src/lxcfs.c: 1152: func: ..."
START_TIMEOUT = 10.0
EXIT_TIMEOUT = 10.0  # unmounted, lxcfs exits after its loadavg thread's next 5 s round


def _sidecar(mountpoint: Path, suffix: str) -> Path:
    """Our pid file and log next to the mount point (the default /run/lxcfs.pid is locked by
    the distribution's lxcfs.service, if any)."""
    return mountpoint.with_name(mountpoint.name + suffix)


def is_mounted(mountpoint: Path) -> bool:
    where = str(mountpoint.resolve())
    return any(m.target == where and m.fstype == FSTYPE for m in mountinfo.current())


def _serving(mountpoint: Path) -> bool:
    """Mounted, and a live lxcfs answers (a crashed one leaves a mount failing with ENOTCONN)."""
    if not is_mounted(mountpoint):
        return False
    try:
        (mountpoint / "proc/meminfo").read_bytes()
    except OSError:
        return False
    return True


def _processes() -> Iterator[tuple[int, str, list[bytes]]]:
    """(pid, program, argv) of every live process (zombies have no exe and are skipped)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{entry}/exe")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
        except OSError:
            continue
        # "/usr/bin/lxcfs (deleted)" once the package was upgraded under it
        yield int(entry), os.path.basename(exe.removesuffix(" (deleted)")), argv


def _pids(mountpoint: Path) -> list[int]:
    """Processes running lxcfs with `mountpoint` as their last argument."""
    where = os.fsencode(mountpoint.resolve())
    return [
        pid
        for pid, program, argv in _processes()
        if program == "lxcfs" and argv and argv[-1] == where
    ]


def _last_error(log: Path, offset: int) -> str:
    """The last error lxcfs logged after `offset`, else its last line."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "no output"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ERROR_LINE.sub("", ln) for ln in lines if ERROR_LINE.match(ln)]
    return (errors or lines or ["no output"])[-1]


def ensure_running(mountpoint: Path) -> None:
    """Make sure an lxcfs serves at `mountpoint`, starting one if needed."""
    mountpoint = mountpoint.resolve()
    if _serving(mountpoint):
        return
    lxcfs = proc.require("lxcfs", "lxcfs fuse3")
    setsid = proc.require("setsid", "util-linux")
    if is_mounted(mountpoint) or _pids(mountpoint):  # a dead mount, or an lxcfs not answering
        stop(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    log, pidfile = _sidecar(mountpoint, ".log"), _sidecar(mountpoint, ".pid")
    offset = log.stat().st_size if log.exists() else 0
    # Through the chokepoint: the shell starts lxcfs in the background with stdio on the log,
    # prints its pid and returns at once; lxcfs (which never daemonizes itself) is orphaned
    # to init, so it outlives us and never becomes our zombie. `setsid` gives it a session of
    # its own without a fork (a background job of a shell without job control leads no
    # process group), so the pid stays lxcfs's. It is watched by a pidfd, not found by its
    # argv: a process reads with an empty cmdline for a moment while it execs.
    argv = [setsid, lxcfs, *OPTIONS, "--pidfile", str(pidfile), str(mountpoint)]
    started = proc.run(["sh", "-c", '"$@" </dev/null >>"$0" 2>&1 & echo $!', str(log), *argv])
    try:
        pidfd: int | None = os.pidfd_open(int(started.stdout))
    except ProcessLookupError:  # it failed at once, and init has reaped it already
        pidfd = None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _serving(mountpoint):
            exited = pidfd is None or select.select([pidfd], [], [], 0.05)[0]
            if exited or time.monotonic() > deadline:
                stop(mountpoint)
                raise RuntimeFailure(
                    f"lxcfs did not start at {mountpoint}: {_last_error(log, offset)}",
                    f"see {log}; check that /dev/fuse exists (modprobe fuse) and fuse3 is "
                    "installed",
                )
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int, mountpoint: Path) -> int | None:
    """A pidfd of `pid` if it still is our lxcfs once opened, so a recycled pid is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if pid in _pids(mountpoint):
        return fd
    os.close(fd)
    return None


def _end(pidfd: int) -> None:
    """Wait for the process to exit, then ask it with SIGTERM, then force it with SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if select.select([pidfd], [], [], EXIT_TIMEOUT)[0]:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, sig)
    select.select([pidfd], [], [], EXIT_TIMEOUT)


def stop(mountpoint: Path) -> None:
    """Unmount lxcfs at `mountpoint` and end the lxcfs serving it; a no-op when none is."""
    mountpoint = mountpoint.resolve()
    pidfds = [fd for fd in (_pidfd(p, mountpoint) for p in _pids(mountpoint)) if fd is not None]
    try:
        while is_mounted(mountpoint):
            try:
                syscalls.umount(str(mountpoint))
            except OSError:  # busy: detach it, the open files fail once lxcfs is ended
                syscalls.umount(str(mountpoint), detach=True)
        for fd in pidfds:  # lxcfs exits by itself once unmounted
            _end(fd)
    finally:
        for fd in pidfds:
            os.close(fd)
    _sidecar(mountpoint, ".pid").unlink(missing_ok=True)  # lxcfs removes it unless killed
    with contextlib.suppress(OSError):
        mountpoint.rmdir()
    if not any(program == "lxcfs" for _, program, _ in _processes()):
        # lxcfs's own runtime directory, made at every start by any lxcfs
        for d in (LXCFS_RUNTIME_DIR / "controllers", LXCFS_RUNTIME_DIR / "root", LXCFS_RUNTIME_DIR):
            with contextlib.suppress(OSError):
                d.rmdir()


def binds(mountpoint: Path) -> tuple[Bind, ...]:
    """Binds of the lxcfs files over the container's own; only those lxcfs provides (none
    when it is not running, so a container still starts, with the host's figures)."""
    files = [(f"proc/{f}", f"/proc/{f}") for f in PROC_FILES]
    files += [(f"sys/{f}", f"/sys/{f}") for f in SYS_FILES]
    return tuple(
        Bind(str(mountpoint / src), dest, BIND_OPTIONS)
        for src, dest in files
        if os.path.exists(mountpoint / src)
    )
