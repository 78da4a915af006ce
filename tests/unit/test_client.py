"""The client against a server thread on a socketpair: progress lines, a pty master sent back,
errors raised as the class of their code, and hostd gone or out of reach."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hostd import client
from hostd import protocol as p
from hostd.api import Channel
from hostd.errors import HostdError
from runtime.errors import ERROR_CODES, Internal, RuntimeFailure

Server = Callable[[socket.socket], None]


@pytest.fixture
def talk() -> Iterator[Callable[[Server], Channel]]:
    """A channel whose other end runs `server` in a thread (joined afterwards)."""
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def start(server: Server) -> Channel:
        ours, theirs = socket.socketpair()
        socks.extend((ours, theirs))

        def run() -> None:
            with theirs:
                server(theirs)

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()
        return Channel(ours)

    yield start
    for t in threads:
        t.join(10)
    for s in socks:
        s.close()


def _request(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        data += sock.recv(65536)
    return dict(json.loads(data))


def test_progress_then_the_result(talk: Callable[[Server], Channel]) -> None:
    seen: list[dict[str, Any]] = []

    def server(sock: socket.socket) -> None:
        seen.append(_request(sock))
        sock.sendall(p.progress_line("one") + p.progress_line("two") + p.ok_line(p.Pong(7)))

    heard: list[str] = []
    assert client.request(talk(server), "ping", None, progress=heard.append) == {"pid": 7}
    assert heard == ["one", "two"]
    assert seen == [{"op": "ping", "args": {}}]


def test_a_request_goes_as_the_protocol_encodes_it(talk: Callable[[Server], Channel]) -> None:
    seen: list[dict[str, Any]] = []

    def server(sock: socket.socket) -> None:
        seen.append(_request(sock))
        sock.sendall(p.ok_line([]))

    client.request(talk(server), "status", p.StatusArgs("alice"))
    assert seen == [{"op": "status", "args": {"user": "alice"}}]


def test_a_bad_request_is_refused_before_it_is_sent(talk: Callable[[Server], Channel]) -> None:
    sent: list[bytes] = []
    chan = talk(lambda sock: sent.append(sock.recv(100)))
    with pytest.raises(RuntimeFailure, match="field 'user' must be a string"):
        client.request(chan, "user.show", {"user": 1})
    chan.sock.close()


def test_a_pty_master_reaches_on_tty(talk: Callable[[Server], Channel]) -> None:
    def server(sock: socket.socket) -> None:
        _request(sock)
        r, w = os.pipe()
        os.write(w, b"from the pty")
        os.close(w)
        socket.send_fds(sock, [p.TTY_LINE], [r])
        os.close(r)
        sock.sendall(p.ok_line(p.Exited(3)))

    got: list[bytes] = []

    def on_tty(master: int) -> None:
        got.append(os.read(master, 100))
        os.close(master)

    args = p.ExecArgs(["sh"], tty=True)
    assert client.request(talk(server), "exec", args, on_tty=on_tty) == {"exit": 3}
    assert got == [b"from the pty"]


def test_fds_nobody_asked_for_are_closed(talk: Callable[[Server], Channel]) -> None:
    r, w = os.pipe()

    def server(sock: socket.socket) -> None:
        _request(sock)
        socket.send_fds(sock, [p.TTY_LINE], [r])  # no on_tty: the client closes it
        sock.sendall(p.ok_line(p.Exited(0)))

    chan = talk(server)
    before = set(os.listdir("/proc/self/fd"))
    client.request(chan, "exec", p.ExecArgs(["true"], tty=True))
    assert set(os.listdir("/proc/self/fd")) <= before
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_errors_come_back_as_the_class_of_their_code(
    talk: Callable[[Server], Channel], code: str
) -> None:
    def server(sock: socket.socket) -> None:
        _request(sock)
        sock.sendall(p.error_line(ERROR_CODES[code]("cause: with colon", "the fix")))

    with pytest.raises(RuntimeFailure) as info:
        client.request(talk(server), "ping")
    assert type(info.value) is ERROR_CODES[code]
    assert (info.value.cause, info.value.fix) == ("cause: with colon", "the fix")


def test_hostd_gone_mid_request(talk: Callable[[Server], Channel]) -> None:
    def server(sock: socket.socket) -> None:
        _request(sock)
        sock.sendall(p.progress_line("working"))

    with pytest.raises(HostdError, match="hostd closed the connection: see hostd's log"):
        client.request(talk(server), "ping")


@pytest.mark.parametrize("reply", [b"nonsense\n", b"[1, 2]\n"])
def test_a_malformed_reply_is_internal(talk: Callable[[Server], Channel], reply: bytes) -> None:
    def server(sock: socket.socket) -> None:
        _request(sock)
        sock.sendall(reply)

    with pytest.raises(Internal, match="hostd sent a malformed reply"):
        client.request(talk(server), "ping")


def test_no_socket_means_hostd_is_not_running(tmp_path: Path) -> None:
    with pytest.raises(HostdError) as info:
        client.call(tmp_path / "none.sock", "ping")
    assert info.value.cause == f"hostd is not running (no socket at {tmp_path}/none.sock)"
    assert info.value.fix == client.ADMIN_FIXES[0]
    with pytest.raises(HostdError) as info:
        client.connect(tmp_path / "none.sock", client.USER_FIXES)
    assert info.value.fix == client.USER_FIXES[0]


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # root may connect anywhere: the kernel's refusal is played by the socket
    def refuse(self: socket.socket, address: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(HostdError) as info:
        client.call(tmp_path / "admin.sock", "ping")
    assert info.value.cause == f"no permission to use {tmp_path}/admin.sock"
    assert info.value.fix == "run as root or as a member of group hostd-admin"
