"""The start queue: at most K containers boot at once, the others wait in arrival order.

A boot burns CPU (systemd, its units, the tenant's account set up inside); a hundred at once
on a small host make every one of them, and hostd's own answers, slow. A caller waiting for a
slot hears its place in line, and again whenever it changes; status reads `view`, a snapshot
replaced whole on every change, so it never takes the queue's lock.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

Progress = Callable[[str], None]

STARTING = 0  # a name's place in `view` while it holds a slot


def auto_slots(cpus: int | None = None) -> int:
    """The host-sized default of `[runtime] parallel_starts`: two boots per CPU, at least 2
    (measured with tests/benchmarks/bench_density.py, docs/benchmarks.md)."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    return max(2, 2 * cpus)


_SUFFIXES = {1: "st", 2: "nd", 3: "rd"}  # codespell:ignore nd


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else _SUFFIXES.get(n % 10, "th")
    return f"{n}{suffix}"


class _Ticket:
    """One caller's place; a name may come back after its start, so places are objects."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class StartQueue:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a start queue needs at least one slot")
        self.slots = slots
        self._cond = threading.Condition()
        self._waiting: deque[_Ticket] = deque()
        self._starting: list[_Ticket] = []
        self.view: Mapping[str, int] = MappingProxyType({})  # name -> place, STARTING

    @contextmanager
    def slot(self, name: str, progress: Progress) -> Iterator[None]:
        """Wait for a slot in arrival order, telling `progress` the place while it changes;
        hold it for the block. An exception (in the block or from `progress`) frees it."""
        ticket = _Ticket(name)
        with self._cond:
            self._waiting.append(ticket)
            self._publish()
        try:
            self._wait_turn(ticket, progress)
        except BaseException:
            with self._cond:
                self._waiting.remove(ticket)
                self._publish()
                self._cond.notify_all()  # the one behind may be first now
            raise
        try:
            yield
        finally:
            with self._cond:
                self._starting.remove(ticket)
                self._publish()
                self._cond.notify_all()

    def _wait_turn(self, ticket: _Ticket, progress: Progress) -> None:
        """Block until `ticket` is first and a slot is free, then take it. `progress` is
        called outside the lock: a slow client must not hold up the queue."""
        told = 0  # the place last told
        while True:
            with self._cond:
                if self._waiting[0] is ticket and len(self._starting) < self.slots:
                    self._waiting.popleft()
                    self._starting.append(ticket)
                    self._publish()
                    self._cond.notify_all()  # a further slot may be free for the next
                    return
                place, starting = self._waiting.index(ticket) + 1, len(self._starting)
                if place == told:
                    self._cond.wait()
                    continue
            told = place
            progress(f"waiting to start: {ordinal(place)} in line, {starting} starting")

    def _publish(self) -> None:
        """The snapshot status reads: one reference replaced under the lock, read without it."""
        places = {t.name: STARTING for t in self._starting}
        places.update((t.name, i) for i, t in enumerate(self._waiting, 1))
        self.view = MappingProxyType(places)
