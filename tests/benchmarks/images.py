"""The state dir a benchmark's hostd and runtime use, with the default image in it."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runtime import fsutil
from runtime.containers import Runtime
from runtime.settings import Settings


@contextlib.contextmanager
def state_with_default_image(reuse: Path | None) -> Iterator[Path]:
    """`reuse` if given (kept afterwards), else a new state dir under /var/tmp, removed with
    its images at the end; the default image is built in it if it has none."""
    state = reuse or Path(tempfile.mkdtemp(prefix="hostd-bench-", dir="/var/tmp"))
    try:
        if not (state / "images" / "default").exists():
            print("building the default image ...", file=sys.stderr, flush=True)
            Runtime(Settings(state)).images.build("default")
        yield state
    finally:
        if reuse is None:
            Runtime(Settings(state)).images.prune([])
            fsutil.remove_tree(state)
