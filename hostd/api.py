"""hostd's socket protocol: JSON lines over a unix stream socket, with file descriptors.

A client sends one request line `{"op": ..., "args": {...}}`, optionally carrying file
descriptors (its stdin/stdout/stderr for `exec`, a tarball for `image.import`). The server
answers with zero or more `{"progress": "..."}` lines, possibly a `{"tty": true}` line carrying
a pty master, and one final `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.

The login hook imports this module: standard library only, and nothing slow to import
(the server's side of reading requests is in `hostd.apiserver`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hostd.errors import HostdError

MAX_REPLY = 1 << 20  # a reply line a client accepts (a status of every tenant fits)
# File descriptors an operation accepts: the caller's stdio for exec (none for a pty session),
# the tarball for image.import. They are facts of the protocol, not tunables.
FDS_PER_OP = {"exec": 3, "image.import": 1}
MAX_FDS = max(FDS_PER_OP.values())


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """Who is on the other end, as the kernel saw it at connect time (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


class ClientGone(OSError):
    """The other end left or stopped reading (a send failed or timed out)."""


def error_line(message: str) -> bytes:
    return json.dumps({"ok": False, "error": message}).encode() + b"\n"


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """The operation and its arguments; ValueError for anything else."""
    try:
        request = json.loads(line)
    except RecursionError:  # deeply nested JSON: the decoder gives up, so do we
        raise ValueError("request nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("args") or {}, dict):
        raise ValueError('a request is {"op": NAME, "args": {...}}')
    return str(request.get("op")), dict(request.get("args") or {})


def check_fds(op: str, fds: Sequence[int]) -> None:
    """Refuse file descriptors the operation does not take (the caller closes them)."""
    allowed = FDS_PER_OP.get(op, 0)
    if len(fds) > allowed:
        raise HostdError(
            f"{op} takes at most {allowed} file descriptors, got {len(fds)}",
            "send only the ones hostctl sends",
        )


class Channel:
    """Message framing over a connected unix socket, in blocking mode. `buffered`: bytes
    already read from the socket after the last message."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self._buf = buffered
        self._fds: list[int] = []

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(message).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except OSError as exc:
            raise ClientGone(exc.errno, f"the other end is gone: {exc.strerror}") from exc

    def receive(self, max_size: int = MAX_REPLY) -> tuple[dict[str, Any] | None, list[int]]:
        """The next message and the fds that came with it; (None, []) at end of stream."""
        while b"\n" not in self._buf:
            if len(self._buf) > max_size:
                raise ValueError("message too long")
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, MAX_FDS)
            except ConnectionResetError:  # the server closed with our request unread
                data, fds = b"", []
            self._fds += fds
            if not data:
                close_fds(self._fds)
                self._fds = []
                return None, []
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        fds, self._fds = self._fds, []
        return json.loads(line), fds
