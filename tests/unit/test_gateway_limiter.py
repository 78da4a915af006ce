"""Pre-auth bookkeeping of the gateway: failures per source over a sliding window, places
for connections that have not logged in, and authentication work queued per source."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hostd import gateway
from hostd.gateway import FailureLimiter, PreauthSlots, SourceQueue


def test_a_source_is_blocked_after_the_limit_and_freed_after_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(gateway.time, "monotonic", lambda: now[0])
    limiter = FailureLimiter(limit=3, window=60)
    for _ in range(3):
        assert not limiter.blocked("192.0.2.1")
        limiter.failed("192.0.2.1")
    assert limiter.blocked("192.0.2.1")
    assert not limiter.blocked("192.0.2.2")  # others are not affected
    now[0] += 61
    assert not limiter.blocked("192.0.2.1")


def test_failures_of_quiet_sources_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(gateway.time, "monotonic", lambda: now[0])
    limiter = FailureLimiter(limit=3, window=60)
    for i in range(1000):
        limiter.failed(f"192.0.2.{i % 250}")
    now[0] += 61
    for i in range(250):
        assert not limiter.blocked(f"192.0.2.{i}")
    assert not limiter._failures  # the table does not grow with every address ever seen


def test_preauth_places_are_capped_per_source_and_in_all() -> None:
    slots = PreauthSlots(total=5, per_source=2)
    assert slots.take("a") is None and slots.take("a") is None
    assert slots.take("a") == "2 connections from it are already logging in"
    assert slots.take("b") is None and slots.take("b") is None and slots.take("c") is None
    assert slots.take("d") == "5 connections are already logging in"
    slots.give_back("a")
    assert slots.take("d") is None  # a place freed by one source goes to another
    assert slots.take("a") == "5 connections are already logging in"


def test_one_source_waits_for_itself_not_others() -> None:
    """A source whose work hangs holds one worker; another source's work runs meanwhile."""

    async def scenario() -> None:
        queue = SourceQueue(workers=2)
        release = threading.Event()
        try:
            slow = [asyncio.create_task(queue.run("flood", release.wait)) for _ in range(5)]
            await asyncio.sleep(0)
            other = await asyncio.wait_for(queue.run("other", lambda: "done"), timeout=10)
            assert other == "done"
            assert not any(task.done() for task in slow)
            slow[0].cancel()  # a client that gives up does not free its source's turn early
            await asyncio.sleep(0.05)
            assert not any(task.done() for task in slow[1:])
            release.set()
            assert await asyncio.wait_for(asyncio.gather(*slow[1:]), timeout=10) == [True] * 4
        finally:
            release.set()
            queue.close()

    asyncio.run(scenario())
