"""The start queue: arrival order, the bound, places told once per change, slots freed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from hostd.startqueue import STARTING, StartQueue, auto_slots, ordinal
from tests.hostd_harness import wait_for

TIMEOUT = 10.0


class Caller:
    """A thread that takes a slot, records what it heard, and holds the slot until released."""

    def __init__(self, queue: StartQueue, name: str, log: list[str] | None = None) -> None:
        self.queue, self.name = queue, name
        self.heard: list[str] = []
        self.inside = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.log = log
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with self.queue.slot(self.name, self.heard.append):
                if self.log is not None:
                    self.log.append(self.name)
                self.inside.set()
                assert self.release.wait(TIMEOUT)
        except BaseException as exc:
            self.error = exc

    def start_and_queue(self) -> Caller:
        """Start it and wait until it holds its slot or waits in line."""
        self.thread.start()
        wait_for(lambda: self.name in self.queue.view, TIMEOUT, f"{self.name} in the queue")
        return self

    def finish(self) -> None:
        self.release.set()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive() and self.error is None


@contextmanager
def callers(queue: StartQueue, names: str) -> Iterator[dict[str, Caller]]:
    made = {n: Caller(queue, n) for n in names}
    try:
        yield made
    finally:
        for c in made.values():
            c.release.set()


def test_auto_is_two_per_cpu_at_least_two() -> None:
    assert [auto_slots(n) for n in (1, 2, 3, 8)] == [2, 4, 6, 16]


def test_ordinals() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "101st",
        "111th",
    ]


def test_no_slot_count_below_one() -> None:
    with pytest.raises(ValueError):
        StartQueue(0)


def test_waiters_hear_their_place_once_per_change_and_go_in_arrival_order() -> None:
    queue = StartQueue(1)
    with callers(queue, "abcd") as c:
        for name in "abcd":
            c[name].start_and_queue()
        assert c["a"].inside.is_set()
        assert dict(queue.view) == {"a": STARTING, "b": 1, "c": 2, "d": 3}
        wait_for(lambda: c["d"].heard, TIMEOUT, "d told its place")
        assert c["d"].heard == ["waiting to start: 3rd in line, 1 starting"]
        for first, nxt, place in zip("abc", "bcd", ("2nd", "1st", None), strict=True):
            c[first].finish()
            wait_for(c[nxt].inside.is_set, TIMEOUT, f"{nxt} starting")
            if place:  # a place skipped while d was not scheduled would not be told
                told = f"waiting to start: {place} in line, 1 starting"
                wait_for(lambda told=told: told in c["d"].heard, TIMEOUT, f"d told {told}")
        c["d"].finish()
        assert c["a"].heard == []  # a free slot: no waiting, nothing said
        assert c["b"].heard == ["waiting to start: 1st in line, 1 starting"]
        assert c["d"].heard == [
            "waiting to start: 3rd in line, 1 starting",
            "waiting to start: 2nd in line, 1 starting",
            "waiting to start: 1st in line, 1 starting",
        ]
    assert dict(queue.view) == {}


def test_the_bound_holds_and_order_is_kept_under_many_threads() -> None:
    queue = StartQueue(3)
    inside, most, entered = 0, 0, []
    guard = threading.Lock()
    first_waiting = threading.Event()

    def start(name: str) -> None:
        nonlocal inside, most
        with queue.slot(name, lambda _: first_waiting.set()):
            with guard:
                inside += 1
                most = max(most, inside)
                entered.append(name)
            with guard:
                inside -= 1

    # Arrival order is only defined for callers that wait in line, one after another: hold
    # the slots, queue 40 callers in a known order, then let them go.
    holders = [Caller(queue, f"h{i}") for i in range(3)]
    for h in holders:
        h.start_and_queue()
    threads = []
    for i in range(40):
        t = threading.Thread(target=start, args=(f"t{i:02}",), daemon=True)
        t.start()
        wait_for(lambda i=i: f"t{i:02}" in queue.view, TIMEOUT, f"t{i:02} waiting")
        threads.append(t)
    for h in holders:
        h.finish()
    for t in threads:
        t.join(TIMEOUT)
    assert entered == [f"t{i:02}" for i in range(40)]
    assert 1 <= most <= 3
    assert dict(queue.view) == {}


def test_never_more_than_the_bound_at_once() -> None:
    queue = StartQueue(4)
    inside, most = 0, 0
    guard = threading.Lock()
    everyone_in = threading.Barrier(60, timeout=TIMEOUT)
    full = threading.Barrier(4, timeout=TIMEOUT)  # each boot waits until 4 run: the most

    def start(i: int) -> None:
        nonlocal inside, most
        everyone_in.wait()
        for _ in range(5):
            with queue.slot(f"u{i}", lambda _: None):
                with guard:
                    inside += 1
                    most = max(most, inside)
                    assert list(queue.view.values()).count(STARTING) <= 4
                full.wait()
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=start, args=(i,), daemon=True) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
        assert not t.is_alive()
    assert most == 4 and inside == 0 and dict(queue.view) == {}


def test_a_start_that_raises_frees_its_slot() -> None:
    queue = StartQueue(1)
    with pytest.raises(RuntimeError), queue.slot("a", lambda _: None):
        raise RuntimeError("boot failed")
    assert dict(queue.view) == {}
    with queue.slot("b", lambda _: None):  # would wait for ever if a's slot were still taken
        assert dict(queue.view) == {"b": STARTING}


def test_a_waiter_whose_progress_raises_leaves_the_line() -> None:
    """A client gone while waiting: its place goes, the one behind moves up."""
    queue = StartQueue(1)

    def gone(_: str) -> None:
        raise BrokenPipeError

    with callers(queue, "ac") as c:
        c["a"].start_and_queue()
        with pytest.raises(BrokenPipeError), queue.slot("b", gone):
            pytest.fail("b got a slot")
        c["c"].start_and_queue()
        assert dict(queue.view) == {"a": STARTING, "c": 1}
        c["a"].finish()
        wait_for(c["c"].inside.is_set, TIMEOUT, "c starting")
        c["c"].finish()


def test_no_progress_flood_when_places_do_not_change() -> None:
    """Slots freed and taken again ahead of a waiter without moving it: it hears nothing."""
    queue = StartQueue(2)
    with callers(queue, "abw") as c:
        c["a"].start_and_queue()
        c["b"].start_and_queue()
        c["w"].start_and_queue()
        wait_for(lambda: c["w"].heard, TIMEOUT, "w told its place")
        for _ in range(50):  # wake-ups that change nothing for w
            with queue._cond:
                queue._cond.notify_all()
        c["a"].finish()
        wait_for(c["w"].inside.is_set, TIMEOUT, "w starting")
        assert c["w"].heard == ["waiting to start: 1st in line, 2 starting"]
        c["b"].finish()
        c["w"].finish()
