"""systemd readiness notification (Type=notify): systemd-python when present, else the
NOTIFY_SOCKET datagram protocol it implements."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", "STATUS=...", "WATCHDOG=1"); False when not under systemd,
    or when its socket is gone: a notification is never worth stopping hostd for (one that
    failed at shutdown once kept hostd from closing its database)."""
    try:
        return _send(state)
    except OSError as exc:
        log.debug("cannot notify systemd (%s): %s", state, exc)
        return False


def _send(state: str) -> bool:
    try:
        from systemd import daemon

        return bool(daemon.notify(state))
    except ImportError:
        pass
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(address)
        s.sendall(state.encode())
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (half its timeout), if any."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
