"""Benchmark: ID-mapped overlay against the chown-copy fallback, measured in one run.

Prints, per root filesystem mode, the time to create a container from the template, the cold
start to dockerd answering, and the tenant's disk use after the first boot, with the ratios
copy / ID-mapped and the issue's goals (create <= 0.2 s, cold start <= 2 s, <= 20 MB disk).

    sudo .venv/bin/python tests/benchmarks/bench_runtime.py [--runs 3] [--state-dir DIR]

Without --state-dir it uses a fresh directory and builds the default image there first.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from runtime import fsutil
from runtime.containers import Runtime
from runtime.ids import IdRange
from runtime.settings import RootfsMode, Settings

GOALS = {"create_s": 0.2, "ready_s": 2.0, "disk_mb": 20.0}
LABELS = {
    "create_s": "create from template (s)",
    "ready_s": "cold start to docker ready (s)",
    "disk_mb": "tenant disk after first boot (MB)",
}


def _disk_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sxB1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1e6


def measure(rt: Runtime, name: str, ids: IdRange) -> dict[str, float]:
    t0 = time.perf_counter()
    c = rt.create(name, "default", ids)
    t1 = time.perf_counter()
    rt.start(name)
    rt.wait_ready(name)
    t2 = time.perf_counter()
    cdir = rt.state_dir / "containers" / name
    # the tenant's own bytes: upper layer and Docker's data, plus the copy in copy mode
    disk = _disk_mb(cdir / "data")
    if c.rootfs_mode.value == "copy":
        disk += _disk_mb(cdir / "lower")
    rt.delete(name, force=True)
    return {"create_s": t1 - t0, "ready_s": t2 - t1, "disk_mb": disk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--state-dir", type=Path)
    args = ap.parse_args()
    state = args.state_dir or Path(tempfile.mkdtemp(prefix="hostd-bench-", dir="/var/tmp"))
    try:
        runtimes = {
            mode: Runtime(
                Settings(state, rootfs_mode=RootfsMode(mode), cgroup_parent="hostd-bench")
            )
            for mode in ("idmapped", "copy")
        }
        if not (state / "images" / "default").exists():
            print("building the default image ...", flush=True)
            runtimes["idmapped"].images.build("default")
        results: dict[str, dict[str, list[float]]] = {m: {k: [] for k in GOALS} for m in runtimes}
        start = 1_900_000_000
        for run in range(args.runs):
            for mode, rt in runtimes.items():  # alternate modes so drift hits both alike
                sample = measure(rt, f"bench-{mode}-{run}", IdRange(start))
                start += 65536
                for k, v in sample.items():
                    results[mode][k].append(v)
        print(f"\nmedian of {args.runs} runs")
        print(f"{'metric':36} {'idmapped':>10} {'copy':>10} {'copy/idmapped':>14}  goal (idmapped)")
        for key, label in LABELS.items():
            a = statistics.median(results["idmapped"][key])
            b = statistics.median(results["copy"][key])
            verdict = "met" if a <= GOALS[key] else "MISSED"
            print(f"{label:36} {a:10.3f} {b:10.3f} {b / a:13.1f}x  <= {GOALS[key]} ({verdict})")
    finally:
        if args.state_dir is None:
            fsutil.remove_tree(state)


if __name__ == "__main__":
    main()
