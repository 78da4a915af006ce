"""The socket protocol's bounds: requests read on the event loop with size and fd caps, the
bounded worker pools, connection caps, the [api] settings and the client's view of a refusal."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.api import Channel
from hostd.apiserver import Door, Refused, Request, Workers, read_request
from hostd.client import request
from hostd.config import ApiSettings, load
from hostd.errors import HostdError
from hostd.protocol import MAX_FDS, error_line
from runtime.errors import Busy, NotFound
from tests.hostd_harness import wait_for


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server.setblocking(False)
    with server, client:
        yield server, client


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def read(server: socket.socket, max_size: int = 4096) -> Request | None:
    return asyncio.run(asyncio.wait_for(read_request(server, max_size), 10))


def test_a_request_line_its_fds_and_what_follows(pair: tuple[socket.socket, ...]) -> None:
    server, client = pair
    r, w = os.pipe()
    socket.send_fds(client, [b'{"op": "exec"}\nmore'], [r, w, w])
    req = read(server)
    assert req is not None and req.line == b'{"op": "exec"}' and req.rest == b"more"
    assert len(req.fds) == 3 and all(os.get_inheritable(fd) is False for fd in req.fds)
    for fd in [r, w, *req.fds]:
        os.close(fd)


def test_end_of_stream_before_a_request(pair: tuple[socket.socket, ...]) -> None:
    server, client = pair
    client.sendall(b'{"op": ')
    client.shutdown(socket.SHUT_WR)
    assert read(server) is None


@pytest.mark.parametrize(
    "batches", [[MAX_FDS + 1], [MAX_FDS // 2 + 1] * 2, [1] * (MAX_FDS + 1), [200]]
)
def test_too_many_fds_are_refused_and_none_stay_open(
    pair: tuple[socket.socket, ...], batches: list[int]
) -> None:
    server, client = pair
    r, w = os.pipe()
    before = open_fds()
    for n in batches:  # one sendmsg each: the kernel does not merge their fds
        socket.send_fds(client, [b" "], [r] * n)
    client.sendall(b"\n")
    with pytest.raises(Refused, match=f"more than {MAX_FDS} file descriptors"):
        read(server)
    assert open_fds() == before
    os.close(r)
    os.close(w)


def test_a_long_request_is_refused_after_reading_at_most_the_cap(
    pair: tuple[socket.socket, ...],
) -> None:
    server, client = pair
    client.setblocking(False)
    sent = 0
    try:
        while sent < 1 << 20:  # as much as the socket takes, no newline
            sent += client.send(b"x" * 65536)
    except BlockingIOError:
        pass
    with pytest.raises(Refused, match=r"longer than 4 KiB \(\[api\] max_request\)"):
        read(server, 4096)
    left = 0
    try:
        while chunk := server.recv(1 << 20):
            left += len(chunk)
    except BlockingIOError:
        pass
    assert sent - left <= 4097  # hostd read no more than the cap and one byte


def test_workers_are_bounded_refuse_when_busy_and_are_reused() -> None:
    pool = Workers(2, "workers")
    release = threading.Event()
    started = threading.Semaphore(0)

    def job() -> None:
        started.release()
        release.wait(30)

    assert pool.try_submit(job) and pool.try_submit(job)
    assert started.acquire(timeout=30) and started.acquire(timeout=30)
    assert not pool.try_submit(job)  # refused, not queued
    release.set()
    done = threading.Event()
    # accepted once a worker is free again
    wait_for(lambda: pool.try_submit(done.set), 30, "a free worker", interval=0)
    assert done.wait(30)
    assert pool.threads == 2


def test_admin_workers_queue_work_beyond_their_size() -> None:
    pool = Workers(1, "admin_workers", queue_when_busy=True)
    release = threading.Event()
    done = [threading.Event() for _ in range(3)]

    def job(i: int) -> None:
        release.wait(30)
        done[i].set()

    places: list[int] = []
    assert all(pool.try_submit(functools.partial(job, i), places.append) for i in range(3))
    assert pool.threads == 1 and places == [1, 2]  # the first ran at once; the others heard
    release.set()
    assert all(d.wait(30) for d in done)


def test_connection_caps_name_their_setting() -> None:
    door = Door("user", False, 3, 2, Workers(1, "workers"))
    door.enter(1000)
    assert door.refusal(1000) is None
    door.enter(1000)
    refusal = door.refusal(1000)
    assert isinstance(refusal, Busy) and "[api] max_connections_per_user" in refusal.cause
    assert "uid 1000 has 2 connections" in refusal.cause
    door.enter(1001)
    refusal = door.refusal(1002)
    assert refusal is not None and "has 3 connections ([api] max_connections)" in refusal.cause
    for uid in (1000, 1000, 1001):
        door.leave(uid)
    assert door.open == 0 and not door.per_uid and door.refusal(1000) is None
    assert isinstance(door.busy(), Busy) and "([api] workers)" in door.busy().cause


def test_the_client_reads_a_refusal_sent_before_its_request(
    pair: tuple[socket.socket, ...],
) -> None:
    server, client = pair
    server.send(error_line(NotFound("uid 5 has no container here", "ask an admin")))
    server.close()  # before the client sends: its send fails with EPIPE
    with pytest.raises(NotFound) as info:
        request(Channel(client), "status")
    assert (info.value.cause, info.value.fix) == ("uid 5 has no container here", "ask an admin")


def test_api_settings_defaults_and_bad_values(tmp_path: Path) -> None:
    main, dropins = tmp_path / "hostd.toml", tmp_path / "none"
    assert load(main, dropins).api == ApiSettings(512, 64, 256, 16, 10.0, 65536)
    main.write_text('[api]\nmax_connections_per_user = 2\nmax_request = "1M"\n')
    api = load(main, dropins).api
    assert (api.max_connections_per_user, api.max_request) == (2, 1 << 20)
    for line, fix in [
        ("workers = 0", "from 1 to 4096"),
        ("max_connections = true", "from 1 to 65536"),
        ('max_request = "1K"', 'from "4K" to "16M"'),
        ('max_request = "1G"', 'from "4K" to "16M"'),
        ("request_timeout = 0", "positive number of seconds"),
    ]:
        main.write_text(f"[api]\n{line}\n")
        with pytest.raises(HostdError, match=fix):
            load(main, dropins)
