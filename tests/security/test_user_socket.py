"""Nobody can slow or stop hostd for others through its unix sockets (issue 8, item 5), and no
tenant can keep hostd from starting (item 4). Each test performs the attack against a real
hostd with real Unix users and checks that it fails."""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import socket
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from hostd import config as config_mod
from hostd.api import Channel
from hostd.client import call, request
from runtime.containers import Runtime
from runtime.execs import ExecSpec
from tests.hostd_harness import POLL_INTERVAL, Hostd, UnixUsers, connect_as, wait_for

FLOOD = 300
PER_USER = 64  # [api] max_connections_per_user, the default the test hostd runs with
MAX_THREADS = 64
OVERSIZED = 8  # connections sending 2 MiB requests at once


def _pid(h: Hostd) -> int:
    assert h.proc is not None
    return h.proc.pid


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _status_kib(pid: int, key: str) -> int:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith(f"{key}:")))


def _fd_targets(pid: int) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def _reply(conn: socket.socket, timeout: float = 60) -> str:
    """Everything hostd sends on `conn` until it closes it (fails if it does not in time)."""
    conn.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := conn.recv(65536):
            data += chunk
    return data.decode()


def _answered(conns: list[socket.socket]) -> int:
    """How many of `conns` hostd has written to (or closed) by now."""
    poller = select.poll()  # not select(): these fds may be above FD_SETSIZE
    for conn in conns:
        poller.register(conn, select.POLLIN)
    return len(poller.poll(0))


def _timed_status(h: Hostd, user: str | None) -> float:
    """Seconds for a status request: on the admin socket, or on the user socket as `user`."""
    start = time.monotonic()
    if user is None:
        assert isinstance(call(h.admin_socket, "status"), list)
    else:
        with connect_as(user, h.user_socket)[0] as conn:
            result = request(Channel(conn), "status")
        assert [s["user"] for s in result] == [user]
    return time.monotonic() - start


@pytest.fixture
def tenants(hostd: Hostd, unix_users: UnixUsers) -> Iterator[list[str]]:
    """Two tenants (not started: their status is enough), removed afterwards."""
    made = [unix_users.make(), unix_users.make()]
    try:
        for user in made:
            hostd.hostctl("user", "add", user)
        yield made
    finally:
        if hostd.proc is None:
            hostd.start()
        for user in made:
            hostd.hostctl("user", "remove", user, check=False)


def test_idle_connections_cost_no_threads_and_others_are_served(
    hostd: Hostd, unix_users: UnixUsers, tenants: list[str]
) -> None:
    flooder, other = tenants
    outsider = unix_users.make()  # a host user who is not a tenant
    pid = _pid(hostd)
    refused = connect_as(outsider, hostd.user_socket, FLOOD)
    held = connect_as(flooder, hostd.user_socket, FLOOD)
    try:
        # hostd answered each of them on connect but PER_USER of the tenant's, which wait for
        # their request (poll: the last ones may still be in the listen backlog)
        wait_for(
            lambda: _answered(refused) >= FLOOD and _answered(held) >= FLOOD - PER_USER,
            30,
            "hostd's answers to the flood",
        )
        assert _answered(held) == FLOOD - PER_USER
        assert _threads(pid) <= MAX_THREADS
        assert _timed_status(hostd, None) < 1.0  # hostctl status, as an admin
        assert _timed_status(hostd, other) < 1.0  # another tenant, on the user socket
        assert _threads(pid) <= MAX_THREADS
        outsider_uid = pwd.getpwnam(outsider).pw_uid
        for conn in refused:
            assert f"uid {outsider_uid} is not a tenant" in _reply(conn)
        replies = [_reply(conn) for conn in held]  # the idle ones: once request_timeout passed
        over = [r for r in replies if "([api] max_connections_per_user)" in r]
        idle = [r for r in replies if "([api] request_timeout)" in r]
        assert (len(over), len(idle)) == (FLOOD - PER_USER, PER_USER)
        assert _timed_status(hostd, flooder) < 1.0  # and its slots are free again
    finally:
        for conn in refused + held:
            conn.close()


def test_fds_beyond_the_cap_are_refused_and_not_kept(
    hostd: Hostd, tenants: list[str], tmp_path: Path
) -> None:
    pid = _pid(hostd)
    marker = tmp_path / "passed-to-hostd"
    marker.write_text("")
    fd = os.open(marker, os.O_RDONLY)
    before = len(_fd_targets(pid))
    try:
        attacks: list[tuple[str, list[int], str]] = [
            # the user socket's cap is exec's stdio (the admin socket's: an archive chain)
            ("status", [200], "more than 3 file descriptors"),  # one sendmsg with 200 fds
            ("status", [3] * 67, "more than 3 file descriptors"),  # 3 at a time, 201 in all
            ("status", [3], "status takes at most 0 file descriptors, got 3"),
        ]
        for op, batches, refusal in attacks:
            with connect_as(tenants[0], hostd.user_socket)[0] as conn:
                for n in batches:
                    with contextlib.suppress(OSError):  # hostd may have closed it already
                        socket.send_fds(conn, [b" "], [fd] * n)
                with contextlib.suppress(OSError):
                    conn.sendall(f'{{"op": "{op}"}}\n'.encode())
                assert refusal in _reply(conn)
            assert str(marker) not in _fd_targets(pid)
    finally:
        os.close(fd)
    assert len(_fd_targets(pid)) <= before + 2  # nothing of the attack stayed open


def test_oversized_requests_are_refused_without_growing_hostd(
    hostd: Hostd, tenants: list[str]
) -> None:
    pid = _pid(hostd)
    conns = connect_as(tenants[0], hostd.user_socket, OVERSIZED)
    rss = _status_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS: measure this peak
    payload = b"x" * (2 << 20)  # 2 MiB and no newline, on each connection at once
    sent = dict.fromkeys(conns, 0)
    for conn in conns:
        conn.setblocking(False)

    def all_sent_or_refused() -> bool:
        _, writable, _ = select.select([], list(sent), [], POLL_INTERVAL)
        for conn in writable:
            try:
                sent[conn] += conn.send(payload[sent[conn] : sent[conn] + 65536])
            except OSError:  # hostd closed it: refused
                del sent[conn]
                continue
            if sent[conn] == len(payload):
                del sent[conn]
        return not sent

    try:
        wait_for(all_sent_or_refused, 60, "hostd to read or refuse the requests", interval=0)
        for conn in conns:
            conn.setblocking(True)
            assert "request longer than 64 KiB ([api] max_request)" in _reply(conn)
    finally:
        for conn in conns:
            conn.close()
    grown = _status_kib(pid, "VmHWM") - rss
    assert grown < 4 * 1024, f"hostd's peak RSS grew by {grown} KiB for {OVERSIZED} x 2 MiB"


SLOW_UNIT = """\
[Unit]
Description=hostd test: a boot that waits until /run/hostd-test-go exists
[Service]
Type=oneshot
TimeoutStartSec=infinity
ExecStart=/bin/sh -c 'while [ ! -e /run/hostd-test-go ]; do sleep 0.1; done'
[Install]
WantedBy=multi-user.target
"""


def _waiting_for_the_file(rt: Runtime, name: str) -> bool:
    """Whether reconcile started the container and its boot now waits for the file."""
    if rt.state(name).status != "running":
        return False
    res = rt.exec(name, ExecSpec(["systemctl", "is-active", "hostd-test-slow.service"]))
    return res.stdout.strip() == "activating"


def test_a_tenant_slow_to_boot_does_not_keep_hostd_closed(hostd: Hostd, tenants: list[str]) -> None:
    """The tenant's systemd waits for a file before it finishes booting, so reconcile's start
    of it (which waits for `running`) lasts until the test creates that file: hostd must serve
    meanwhile, and reconcile must still be busy while it does."""
    slow, other = tenants
    rt = Runtime(config_mod.load(hostd.config).runtime_settings())
    hostd.hostctl("start", slow)
    unit = "/etc/systemd/system/hostd-test-slow.service"
    script = f"cat > {unit} && systemctl enable -q hostd-test-slow.service"
    assert rt.exec(slow, ExecSpec(["sh", "-c", script]), input=SLOW_UNIT.encode()).returncode == 0
    hostd.stop()
    rt.stop(slow, 10)  # its desired state stays "running": the next hostd starts it
    offset = hostd.log.stat().st_size
    try:
        hostd.start(reconciled=False)  # returns once the admin socket answers
        assert _timed_status(hostd, None) < 1.0
        assert _timed_status(hostd, other) < 1.0  # only the slow tenant's requests wait
        wait_for(partial(_waiting_for_the_file, rt, slow), 60, "the slow tenant's start")
        assert not hostd.reconciled(offset), "reconcile finished before the tenant booted"
        assert _timed_status(hostd, None) < 1.0
    finally:
        with contextlib.suppress(Exception):
            rt.exec(slow, ExecSpec(["touch", "/run/hostd-test-go"]))
    wait_for(partial(hostd.reconciled, offset), 120, "reconcile's end once the tenant booted")
    assert f"reconcile: restarted {slow}" in hostd.log.read_text()
