"""hostd's socket protocol: JSON lines over a unix stream socket, with file descriptors.

A client sends one request line `{"op": ..., "args": {...}}`, optionally carrying file
descriptors (its stdin/stdout/stderr for `exec`, a tarball for `image.import`). The server
answers with zero or more `{"progress": "..."}` lines, possibly a `{"tty": true}` line carrying
a pty master, and one final `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1 << 20
MAX_FDS = 4


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """Who is on the other end, as the kernel saw it at connect time (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


class Channel:
    """Message framing over a connected unix socket, in blocking mode."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._fds: list[int] = []

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(message).encode() + b"\n"
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def receive(self) -> tuple[dict[str, Any] | None, list[int]]:
        """The next message and the fds that came with it; (None, []) at end of stream."""
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_MESSAGE:
                raise ValueError("message too long")
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, MAX_FDS)
            self._fds += fds
            if not data:
                for fd in self._fds:
                    os.close(fd)
                self._fds = []
                return None, []
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        fds, self._fds = self._fds, []
        return json.loads(line), fds
