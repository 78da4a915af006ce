"""A tenant flooding logins cannot crowd others out of the start queue (issue 11).

The attack: a stopped tenant's own host user opens 20 logins at once on the user socket (what
hostd-login does), each of which would start the container. With one start slot
(`[runtime] parallel_starts = 1`), the tenant's starts must make one start and hold one place:
another tenant started meanwhile waits behind that one start, not behind 20."""

from __future__ import annotations

import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor

from hostd.api import Channel
from hostd.client import call, request
from tests.hostd_harness import Hostd, UnixUsers, connect_as, wait_for

FLOOD = 20
PLACE = re.compile(r"waiting to start: (\d+)[a-z]{2} in line")


def _login(conn: socket.socket) -> tuple[int, list[str]]:
    """One exec of `true` on a connected user socket: its exit status and what it heard."""
    heard: list[str] = []
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(in_w)
    try:
        with conn:
            stdio = [in_r, out_w, out_w]
            result = request(Channel(conn), "exec", {"argv": ["true"]}, stdio, heard.append)
    finally:
        for fd in (in_r, out_r, out_w):
            os.close(fd)
    return int(result["exit"]), heard


def _state(hostd: Hostd, user: str) -> str:
    rows = call(hostd.admin_socket, "status", {"user": user})
    return str(rows[0]["state"])


def test_a_login_flood_makes_one_start_and_one_place(hostd: Hostd, unix_users: UnixUsers) -> None:
    attacker, victim = unix_users.make(), unix_users.make()
    with hostd.configured("queue", "[runtime]\nparallel_starts = 1\n"):
        try:
            hostd.hostctl("user", "add", attacker)
            hostd.hostctl("user", "add", victim)
            conns = connect_as(attacker, hostd.user_socket, FLOOD)
            victim_heard: list[str] = []
            with ThreadPoolExecutor(FLOOD) as pool:
                logins = [pool.submit(_login, c) for c in conns]
                wait_for(lambda: _state(hostd, attacker) == "starting", 60, "the flood's start")
                call(hostd.admin_socket, "start", {"user": victim}, progress=victim_heard.append)
                results = [f.result() for f in logins]
            assert [code for code, _ in results] == [0] * FLOOD
            heard = [line for _, lines in results for line in lines]
            # One start: one login heard it begin, none waited in the queue (the others
            # waited for the tenant's own lock, then found it running).
            assert heard.count("starting the container") == 1, heard
            assert not [line for line in heard if PLACE.search(line)], heard
            # The victim, started while that one boots, waits behind it only (not 20).
            assert {int(p) for p in PLACE.findall(" ".join(victim_heard))} == {1}, victim_heard
            assert _state(hostd, attacker) == "running" and _state(hostd, victim) == "running"
        finally:
            for user in (attacker, victim):
                hostd.hostctl("user", "remove", user, check=False)
