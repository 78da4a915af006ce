"""Client side of hostd's sockets, for hostctl and the login hook."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hostd.api import Channel, ClientGone, close_fds
from hostd.errors import HostdError
from hostd.protocol import encode_request, error_of
from runtime.errors import Internal


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
    args: object = None,
    fds: Sequence[int] = (),
    progress: Callable[[str], None] = _quiet,
    on_tty: Callable[[int], None] | None = None,
) -> Any:
    """Send one request (`args`: the op's request dataclass) and return its result as JSON
    data; a failure raises the error class of its code (runtime.errors.ERROR_CODES).
    `on_tty` receives a pty master sent back by `exec` and runs the session."""
    chan = connect(path)
    with chan.sock:
        return request(chan, op, args, fds, progress, on_tty)


def request(
    chan: Channel,
    op: str,
    args: object = None,
    fds: Sequence[int] = (),
    progress: Callable[[str], None] = _quiet,
    on_tty: Callable[[int], None] | None = None,
) -> Any:
    """`call` on an already connected channel."""
    line = encode_request(op, args)
    with contextlib.suppress(ClientGone):  # refused before reading: its reason waits for us
        chan.send(line, fds)
    while True:
        try:
            msg, got = chan.receive()
        except ValueError as exc:  # not JSON, or too long
            raise Internal(f"hostd sent a malformed reply ({exc})", "see hostd's log") from None
        if msg is None:
            raise HostdError("hostd closed the connection", "see hostd's log")
        if "progress" in msg:
            progress(str(msg["progress"]))
        elif msg.get("tty") and got and on_tty is not None:
            on_tty(got.pop(0))
        elif "ok" in msg:
            close_fds(got)
            if not msg["ok"]:
                raise error_of(msg.get("error"))
            return msg.get("result")
        close_fds(got)
