"""What the tenant benchmarks' command lines share: a state dir to reuse, `--markdown`, and a
SIGTERM that unwinds through their cleanups."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from types import FrameType

from tests.benchmarks.bench_ssh import REPO


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--state-dir",
        type=Path,
        help="reuse a state dir holding a default image (not one a running hostd uses)",
    )
    ap.add_argument(
        "--markdown", action="store_true", help="append the table to docs/benchmarks.md"
    )


def unwind_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the cleanups like Ctrl-C


def publish(text: str, markdown: bool) -> None:
    """Print the table; with --markdown, append it to docs/benchmarks.md too."""
    print(text)
    if markdown:
        with open(REPO / "docs/benchmarks.md", "a") as f:
            f.write("\n" + text)
