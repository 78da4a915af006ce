"""Client side of hostd's sockets, for hostctl and the login hook."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hostd.api import Channel, ClientGone
from hostd.errors import HostdError


def _quiet(_: str) -> None:
    pass


# The fixes for "hostd is not running" and "no permission": an admin's, and a user's
ADMIN_FIXES = (
    "start it: `systemctl start hostd`",
    "run as root or as a member of group hostd-admin",
)
USER_FIXES = (
    "ask an admin to start it (`systemctl start hostd`)",
    "ask an admin to check hostd's user socket",
)


def connect(path: Path, fixes: tuple[str, str] = ADMIN_FIXES) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise HostdError(f"hostd is not running (no socket at {path})", fixes[0]) from None
    except PermissionError:
        sock.close()
        raise HostdError(f"no permission to use {path}", fixes[1]) from None
    return Channel(sock)


def call(
    path: Path,
    op: str,
    args: dict[str, Any] | None = None,
    fds: Sequence[int] = (),
    progress: Callable[[str], None] = _quiet,
    on_tty: Callable[[int], None] | None = None,
) -> Any:
    """Send one request and return its result; a failure raises HostdError with the message.
    `on_tty` receives a pty master sent back by `exec` and runs the session."""
    chan = connect(path)
    with chan.sock:
        return request(chan, op, args, fds, progress, on_tty)


def request(
    chan: Channel,
    op: str,
    args: dict[str, Any] | None = None,
    fds: Sequence[int] = (),
    progress: Callable[[str], None] = _quiet,
    on_tty: Callable[[int], None] | None = None,
) -> Any:
    """`call` on an already connected channel."""
    with contextlib.suppress(ClientGone):  # refused before reading: its reason waits for us
        chan.send({"op": op, "args": args or {}}, fds)
    while True:
        msg, got = chan.receive()
        if msg is None:
            raise HostdError("hostd closed the connection", "see hostd's log")
        if "progress" in msg:
            progress(str(msg["progress"]))
        elif msg.get("tty") and got and on_tty is not None:
            on_tty(got[0])
        elif "ok" in msg:
            if not msg["ok"]:
                cause, _, fix = str(msg["error"]).rpartition(": ")
                raise HostdError(cause or fix, fix if cause else "see hostd's log")
            return msg.get("result")
