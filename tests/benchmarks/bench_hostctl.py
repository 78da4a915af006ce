"""Benchmark: how fast hostctl answers, against the issue's goals.

Prints median and p95 of N rounds, and the median's ratio to the goal, for: the interpreter
alone (the floor), `hostctl --help` (goal 50 ms), `hostctl exec USER -- true` (goal 100 ms),
`hostctl status USER`, and the exec request alone, sent in-process (hostd's side: the session,
the account check, runc exec).

    sudo .venv/bin/python -m tests.benchmarks.bench_hostctl [--runs 30] [--state-dir DIR]

hostctl runs as its console script does, from this checkout, with bytecode cached in a temp
dir (bench_ssh.cache_bytecode). It starts its own
hostd (the setup of bench_ssh: temp config and subuid files, a bridge and nft table of its own)
with one tenant, started, and removes all of it at the end. Without --state-dir it builds the
default image in a fresh directory first (about a minute).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hostd.client import call
from runtime import fsutil
from tests.benchmarks.bench_ssh import REPO, Bench
from tests.benchmarks.images import state_with_default_image
from tests.hostd_harness import UnixUsers

HOSTCTL = "import sys; from hostd.hostctl import main; sys.exit(main())"


class HostctlBench(Bench):
    """bench_ssh's hostd and account, without its sshd: hostctl needs none."""

    def _setup(self) -> None:
        self.users = UnixUsers()
        self._undo.callback(self.users.remove_all)
        self.user = self.users.make()
        self.hostd = self._hostd()


def _rounds(runs: int, once: Callable[[], object]) -> list[float]:
    once()  # warm: bytecode written, page cache, the container's first exec
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return times


def _command(argv: list[str]) -> Callable[[], object]:
    def once() -> None:
        subprocess.run(argv, cwd=REPO, check=True, stdout=subprocess.DEVNULL)

    return once


def _p95(times: list[float]) -> float:
    return statistics.quantiles(times, n=20)[-1] if len(times) > 1 else times[0]


def measure(b: Bench, runs: int) -> None:
    h = b.hostd
    h.hostctl("user", "add", b.user)
    h.hostctl("start", b.user)
    hostctl = [sys.executable, "-c", HOSTCTL, "--config", str(h.config)]
    stdio = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
    exec_args = {"user": b.user, "argv": ["true"]}  # a dict: also what hostctl sent before
    rows: list[tuple[str, list[float], float | None]] = [
        (
            "python -c pass (the floor)",
            _rounds(runs, _command([sys.executable, "-c", ""])),
            None,
        ),
        ("hostctl --help", _rounds(runs, _command([*hostctl, "--help"])), 0.050),
        (
            "hostctl exec USER -- true",
            _rounds(runs, _command([*hostctl, "exec", b.user, "--", "true"])),
            0.100,
        ),
        ("hostctl status USER", _rounds(runs, _command([*hostctl, "status", b.user])), None),
        (
            "exec request in-process (hostd's side)",
            _rounds(runs, lambda: call(h.admin_socket, "exec", exec_args, stdio)),
            None,
        ),
    ]
    for fd in stdio:
        os.close(fd)
    print(f"\n{'metric':40} {'median ms':>10} {'p95 ms':>8} {'goal ms':>8} {'ratio':>7}")
    for label, times, goal in rows:
        median = statistics.median(times)
        ratio = f"{median / goal:6.2f}x" if goal else "-"
        goal_ms = f"{goal * 1000:.0f}" if goal else "-"
        print(f"{label:40} {median * 1000:10.1f} {_p95(times) * 1000:8.1f} {goal_ms:>8} {ratio:>7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument(
        "--state-dir",
        type=Path,
        help="reuse a state dir holding a default image (not one a running hostd uses)",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hostd-bench-hostctl-"))
    try:
        with state_with_default_image(args.state_dir) as state, HostctlBench(work, state) as b:
            measure(b, args.runs)
    finally:
        fsutil.remove_tree(work)


if __name__ == "__main__":
    main()
