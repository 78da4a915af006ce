"""Undo steps of a half-done operation, run in reverse when it fails: creation and changes of
a container are transactional."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Undo:
    """Push an undo step after each step done; all run, last first, if the block fails."""

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def push(self, fn: Callable[..., object], *args: object) -> None:
        self._steps.append((fn, args))

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            return
        for fn, args in reversed(self._steps):
            try:
                fn(*args)
            except Exception:  # keep undoing; the original error is what the caller sees
                log.exception("undo step %s failed", getattr(fn, "__name__", fn))
