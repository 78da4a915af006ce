"""Benchmark: the fast paths of issue 11, each against its goal.

Definitions (the figures printed, each the median of --runs rounds, with its parts):
- cold new user to docker: an existing Unix user who is not a tenant, from `hostctl user add U`
  to the first successful `docker info` inside (`user add` + `start` + `exec -- docker info`;
  dockerd is socket-activated by that first call). Goal 1.0 s.
- cold SSH login: the tenant exists but is stopped; `ssh -p GATEWAY U@127.0.0.1 true` through
  hostd's gateway (the login starts the container) until it returns. Goal 0.8 s.
- remove: `hostctl user remove U` of a running tenant. Goal 0.3 s.
- reconcile: hostd killed (-9, its tenants keep running) and started again with --tenants
  running, from its start until it logs the end of its reconcile. Goal 2 s for 100 tenants
  (bench_density measures that N; here a few).
- first docker call after an idle stop: Docker stopped inside as its idle stop does
  (docker.service and containerd.service; docker.socket keeps listening), then `docker info`
  timed inside the tenant, as a user typing it in their shell meets it. Goal 0.6 s.
- reference: `python -c pass`, the interpreter each hostctl starts (three in the cold path),
  to compare runs on days when the machine is faster or slower (it varied 20-34 ms here).

    sudo .venv/bin/python -m tests.benchmarks.bench_fastpaths [--runs 5] [--tenants 3]
        [--state-dir DIR] [--markdown]

It starts its own hostd with the gateway (bench_ssh's setup, with a bridge, nft table, subnet
and cgroup parent of its own) and removes everything it made at the end. Without --state-dir it
builds the default image in a fresh directory first (about a minute). `--markdown` appends the
table to docs/benchmarks.md. hostd and hostctl run from the current directory's checkout (run
it from another checkout, with PYTHONPATH naming this one, to measure that checkout).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime import fsutil
from tests.benchmarks.bench_density import DOCKER_INFO, reconcile, timed
from tests.benchmarks.bench_ssh import Bench
from tests.benchmarks.cli import add_common_args, publish, unwind_on_sigterm
from tests.benchmarks.images import state_with_default_image
from tests.hostd_harness import UnixUsers, authorize

DROPIN = (
    '[runtime]\ncgroup_parent = "hostd-fast"\n'
    '[network]\nbridge = "hostdf0"\nnft_table = "hostd_fast"\n'
    'subnet = "10.234.0.0/24"\ndns = ["10.234.0.1"]\n'
)
GOALS = {"cold": 1.0, "login": 0.8, "remove": 0.3, "reconcile": 2.0, "idle": 0.6}
# Inside a tenant whose Docker is up: stopped as hostd-docker-idle stops it, then the first
# call timed (microseconds on stdout).
AFTER_IDLE = (
    "systemctl stop docker.service containerd.service && "
    "s=$(date +%s%N) && docker info >/dev/null && e=$(date +%s%N) && echo $(((e - s) / 1000))"
)


class FastBench(Bench):
    """bench_ssh's hostd with its gateway, without sshd; one account with a key, and
    `tenants` more for the reconcile."""

    def __init__(self, work: Path, state: Path, tenants: int) -> None:
        self.n = tenants
        super().__init__(work, state)

    def _setup(self) -> None:
        self.users = UnixUsers()
        self._undo.callback(self.users.remove_all)
        self.user = self.users.make()
        self.others = [self.users.make() for _ in range(self.n)]
        self.key = self.work / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True
        )
        authorize(self.user, self.key.with_suffix(".pub").read_text())
        dropins = self.work / "hostd.toml.d"
        dropins.mkdir()
        (dropins / "fast.toml").write_text(DROPIN)
        self.hostd = self._hostd()
        self._undo.callback(self._remove_others)  # runs before hostd stops

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.hostd.hostctl(*args)

    def _remove_others(self) -> None:
        if self.hostd.proc is None or self.hostd.proc.poll() is not None:
            return
        for u in self.others:
            self.hostd.hostctl("user", "remove", u, check=False)

    def login(self) -> None:
        res = self.ssh(self.hostd.ssh_port, "true")
        assert res.returncode == 0, res.stderr

    def docker_info(self) -> None:
        out = self.ctl("exec", self.user, *DOCKER_INFO).stdout.strip()
        assert out, "docker info answered nothing"

    def docker_after_idle(self) -> float:
        """Seconds of the first `docker info` inside after an idle stop of Docker."""
        return int(self.ctl("exec", self.user, "--", "sh", "-c", AFTER_IDLE).stdout) / 1e6


def cold_round(b: FastBench) -> dict[str, float]:
    """One round on b.user, who is not a tenant at its start nor at its end."""
    t: dict[str, float] = {}
    t["add"] = timed(lambda: b.ctl("user", "add", b.user))
    t["start"] = timed(lambda: b.ctl("start", b.user))
    t["docker"] = timed(b.docker_info)
    t["cold"] = t["add"] + t["start"] + t["docker"]
    t["idle"] = b.docker_after_idle()
    b.ctl("stop", b.user)
    t["login"] = timed(b.login)
    t["remove"] = timed(lambda: b.ctl("user", "remove", b.user))
    return t


Row = tuple[str, str, str, str]  # metric, value, goal, ratio


def _row(label: str, times: list[float], goal: float | None) -> Row:
    median = statistics.median(times)
    spread = f"{median:.3f} s ({min(times):.3f}-{max(times):.3f})"
    return (
        label,
        spread,
        f"<= {goal} s" if goal else "",
        f"{median / goal:.2f}x" if goal else "",
    )


def measure(b: FastBench, runs: int) -> list[Row]:
    rounds = []
    for i in range(runs):
        rounds.append(cold_round(b))
        print(f"round {i + 1}: {rounds[-1]}", file=sys.stderr, flush=True)
    for u in b.others:
        b.ctl("user", "add", u)
        b.ctl("start", u)
    recon = [reconcile(b.hostd) for _ in range(max(1, runs // 2))]
    interpreter = [timed(lambda: subprocess.run([sys.executable, "-c", "pass"])) for _ in range(9)]

    def col(key: str) -> list[float]:
        return [r[key] for r in rounds]

    return [
        _row("cold new user to docker info (add+start+docker)", col("cold"), GOALS["cold"]),
        _row("  hostctl user add", col("add"), None),
        _row("  hostctl start", col("start"), None),
        _row("  first docker info (dockerd socket-activated)", col("docker"), None),
        _row("first docker info after an idle stop, inside", col("idle"), GOALS["idle"]),
        _row("cold SSH login (gateway, `ssh U true`)", col("login"), GOALS["login"]),
        _row("hostctl user remove of a running tenant", col("remove"), GOALS["remove"]),
        _row(f"reconcile after kill -9, {b.n} running", recon, None),
        _row("reference: the interpreter alone (`python -c pass`)", interpreter, None),
    ]


def table(rows: list[Row], runs: int) -> str:
    load = os.getloadavg()
    head = f"### Fast paths, measured {time.strftime('%Y-%m-%d')}, {runs} rounds"
    lines = [
        f"{head} ({os.cpu_count()} cores, load {load[0]:.2f} / {load[1]:.2f} at end)",
        "",
        "| metric | median (min-max) | goal | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {v} | {g} | {r} |" for m, v, g, r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tenants", type=int, default=3, help="running during the reconcile")
    add_common_args(ap)
    args = ap.parse_args()
    unwind_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="hostd-bench-fast-"))
    try:
        with (
            state_with_default_image(args.state_dir) as state,
            FastBench(work, state, args.tenants) as b,
        ):
            rows = measure(b, args.runs)
    finally:
        fsutil.remove_tree(work)
    text = table(rows, args.runs)
    publish(text, args.markdown)


if __name__ == "__main__":
    main()
