"""Failed SSH logins are counted per source address over a sliding window."""

from __future__ import annotations

import pytest

from hostd import gateway
from hostd.gateway import FailureLimiter


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
