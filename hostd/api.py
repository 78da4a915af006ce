"""hostd's socket transport: JSON lines over a unix stream socket, with file descriptors.

What the lines say (operations, requests, replies, errors) is `hostd.protocol`; this module
frames them and knows who is on the other end. The login hook imports it: standard library
only, and nothing slow to import (the server's side of reading requests is `hostd.apiserver`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from hostd.protocol import MAX_FDS, MAX_REPLY


class Peer(NamedTuple):
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """Who is on the other end, as the kernel saw it at connect time (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


class ClientGone(OSError):
    """The other end left or stopped reading (a send failed or timed out)."""


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Channel:
    """Message framing over a connected unix socket, in blocking mode. `buffered`: bytes
    already read from the socket after the last message."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock = sock
        self._buf = buffered
        self._fds: list[int] = []

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one line (from hostd.protocol), with `fds`."""
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
        message = json.loads(line)
        if not isinstance(message, dict):
            close_fds(fds)
            raise ValueError("a message is a JSON object")
        return message, fds
