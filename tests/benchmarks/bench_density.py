"""Benchmark: N tenants on one host, started all at once (issue 11).

Adds N tenants (real Unix users, `hostctl user add`), starts them all at once (`hostctl start`
in parallel, each followed by `hostctl exec U -- docker info`), then prints: the storm's time,
time to first docker per tenant (median, p95), `hostctl status` latency during the storm and
after (and hostd's side of it, sent in-process), used memory per idle tenant (the host's
MemTotal - MemAvailable, the tenant's memory cgroup, the PSS of its processes) with dockerd up
and with it stopped, hostd's own RSS and threads, the inotify instances of the busiest tenant
against fs.inotify.max_user_instances, the reconcile after hostd is killed (-9) and started
again with them all running (from its start to the end of its reconcile), the time to remove
one tenant and then all the others, and what was left behind (state dir, mounts, loops, links,
nft, cgroups, subuid files).

    sudo .venv/bin/python -m tests.benchmarks.bench_density [N] [--state-dir DIR] [--markdown]

It starts its own hostd (bench_ssh's setup, with a bridge, nft table, subnet and cgroup parent
of its own) and removes everything it made at the end, also on failure, Ctrl-C or SIGTERM.
Without --state-dir it builds the default image in a fresh directory first (about a minute).
`--markdown` appends the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hostd import hostlimits
from hostd.client import call
from runtime import fsutil, sysctl
from tests.benchmarks.bench_ssh import Bench
from tests.benchmarks.cli import add_common_args, publish, unwind_on_sigterm
from tests.benchmarks.images import state_with_default_image
from tests.hostd_harness import Hostd, UnixUsers, host_view, wait_for

PARENT = "hostd-density"  # cgroup parent of this bench's tenants
NFT_TABLE = "hostd_density"
DROPIN = (
    f'[runtime]\ncgroup_parent = "{PARENT}"\n'
    f'[network]\nbridge = "hostdd0"\nnft_table = "{NFT_TABLE}"\n'
    'subnet = "10.233.0.0/24"\ndns = ["10.233.0.1"]\n'
)
DOCKER_INFO = ("--", "docker", "info", "--format", "{{.ServerVersion}}")  # after `exec U`
ADDERS = 4  # adds in parallel (they serialise on the ranges lock anyway)


class DensityBench(Bench):
    """bench_ssh's hostd, without sshd, with N accounts."""

    def __init__(self, work: Path, state: Path, n: int) -> None:
        self.n = n
        super().__init__(work, state)

    def _setup(self) -> None:
        self.users = UnixUsers()
        self._undo.callback(self.users.remove_all)
        self.tenants = [self.users.make() for _ in range(self.n)]
        self.user = self.tenants[0]
        dropins = self.work / "hostd.toml.d"
        dropins.mkdir()
        (dropins / "density.toml").write_text(DROPIN)
        self.hostd = self._hostd()
        self._undo.callback(self._remove_tenants)  # runs before hostd stops

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.hostd.hostctl(*args, check=check)

    def _remove_tenants(self) -> None:
        """Whatever tenants are still there (after a failure or Ctrl-C), in parallel."""
        if self.hostd.proc is None or self.hostd.proc.poll() is not None:
            return
        parallel(lambda u: self.ctl("user", "remove", u, check=False), self.tenants, self.n)


def parallel(job: Callable[[str], object], users: Iterable[str], workers: int) -> list[object]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(job, users))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def p95(times: list[float]) -> float:
    return statistics.quantiles(times, n=20)[-1] if len(times) > 1 else times[0]


def used_memory() -> int:
    """MemTotal - MemAvailable, bytes."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def cgroup_dirs(user: str, controller: str) -> list[str]:
    """The tenant's cgroup directory and every one below it (v1 `controller`, or v2)."""
    roots = [f"/sys/fs/cgroup/{controller}/{PARENT}/{user}", f"/sys/fs/cgroup/{PARENT}/{user}"]
    top = next((r for r in roots if os.path.isdir(r)), None)
    return [] if top is None else [d for d, _, _ in os.walk(top)]


def tenant_pids(user: str) -> list[int]:
    pids = []
    for d in cgroup_dirs(user, "memory"):
        try:
            pids += [int(p) for p in Path(d, "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            continue
    return pids


def pss(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += sum(int(ln.split()[1]) * 1024 for ln in text.splitlines() if ln.startswith("Pss:"))
    return total


def cgroup_memory(user: str) -> int:
    for path in (
        f"/sys/fs/cgroup/memory/{PARENT}/{user}/memory.usage_in_bytes",
        f"/sys/fs/cgroup/{PARENT}/{user}/memory.current",
    ):
        if os.path.exists(path):
            return int(Path(path).read_text())
    return 0


def inotify_instances(pids: Iterable[int]) -> int:
    count = 0
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify"
            except OSError:
                continue
    return count


def hostd_self(pid: int) -> tuple[int, int]:
    """hostd's (RSS bytes, threads)."""
    fields = dict(
        ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln
    )
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["Threads"])


def leftovers(b: DensityBench, subuid_before: str) -> list[str]:
    """What of the tenants is still on the host after they were all removed."""
    view = host_view(b.state, b.tenants, PARENT, NFT_TABLE)
    found = view.left(b.tenants)
    if Path("/etc/subuid").read_text() != subuid_before:
        found.append("/etc/subuid changed")
    for ids in (b.hostd.subuid, b.hostd.subgid):
        text = ids.read_text() if ids.exists() else ""
        found += [f"{ids.name} line of {u}" for u in b.tenants if f"{u}:" in text]
    return found


def reconcile(h: Hostd) -> float:
    """Seconds from hostd's start, after a kill -9 (its tenants keep running), until it
    logged the end of its reconcile."""
    assert h.proc is not None
    h.proc.kill()
    h.proc.wait()
    h.proc = None
    offset = h.log.stat().st_size
    t0 = time.perf_counter()
    h.start(reconciled=False)
    wait_for(lambda: h.reconciled(offset), 300, "reconcile's end", interval=0.01)
    return time.perf_counter() - t0


ASK_EVERY = 0.25  # s between the starts of two status requests: an admin's `watch`, not a flood


class StatusSampler:
    """A status request asked every ASK_EVERY seconds by a process in a session of its own, as
    from an admin's login (with the kernel's autogroup scheduling, a process in the bench's
    session shares one CPU weight with its hundreds of `hostctl`): the latencies."""

    SCRIPT = (
        "import subprocess, sys, time\n"
        "from hostd.client import call\n"
        "every, argv = float(sys.argv[1]), sys.argv[2:]\n"
        "while True:\n"
        "    t = time.perf_counter()\n"
        "    if len(argv) == 1:  # hostd's answer alone, on its admin socket\n"
        "        call(argv[0], 'status', {})\n"
        "    else:  # the whole command: interpreter, parse, request\n"
        "        subprocess.run(argv, capture_output=True, check=True)\n"
        "    took = time.perf_counter() - t\n"
        "    print(took, flush=True)\n"
        "    time.sleep(max(0.0, every - took))  # the sampling period\n"
    )

    def __init__(self, *ask: str) -> None:
        """`ask`: hostd's admin socket, or a hostctl command line."""
        self._proc = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, str(ASK_EVERY), *ask],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def stop(self) -> list[float]:
        self._proc.terminate()
        out, _ = self._proc.communicate()
        return [float(line) for line in out.splitlines() if line.count(".") == 1]


Row = tuple[str, str, str]  # metric, value, goal


def measure(b: DensityBench) -> list[Row]:
    n, h = b.n, b.hostd
    assert h.proc is not None
    subuid_before = Path("/etc/subuid").read_text()
    idle_before = used_memory()
    t_add = timed(lambda: parallel(lambda u: b.ctl("user", "add", u), b.tenants, ADDERS))
    print(f"added {n} tenants in {t_add:.1f} s", file=sys.stderr, flush=True)

    first_docker: dict[str, float] = {}
    failures: list[str] = []
    t0 = time.perf_counter()

    def start_and_docker(u: str) -> None:
        res = b.ctl("start", u, check=False)
        if res.returncode == 0:
            res = b.ctl("exec", u, *DOCKER_INFO, check=False)
        if res.returncode != 0 or not res.stdout.strip():
            failures.append(f"{u}: {res.stderr.strip() or res.stdout.strip()}")
        else:
            first_docker[u] = time.perf_counter() - t0

    # The whole `hostctl status` (an interpreter starting on a loaded host), and hostd's own
    # answer to the same request sent from here.
    command = StatusSampler(*h.hostctl_argv("status"))
    answer = StatusSampler(str(h.admin_socket))
    parallel(start_and_docker, b.tenants, n)
    storm = time.perf_counter() - t0
    during, answered = command.stop(), answer.stop()
    print(f"storm: {storm:.1f} s, {len(failures)} failed", file=sys.stderr, flush=True)
    for line in failures[:10]:
        print(f"  {line}", file=sys.stderr)

    after = [timed(lambda: b.ctl("status")) for _ in range(10)]
    inproc = [timed(lambda: call(h.admin_socket, "status", {})) for _ in range(10)]
    rss, threads = hostd_self(h.proc.pid)
    running = list(first_docker)
    up_used = (used_memory() - idle_before) / max(1, len(running))
    up_cg = statistics.median(cgroup_memory(u) for u in running) if running else 0
    up_pss = statistics.median(pss(tenant_pids(u)) for u in running) if running else 0
    busiest = max((inotify_instances(tenant_pids(u)) for u in running), default=0)
    limit = int(sysctl.read("fs/inotify/max_user_instances"))
    t_reconcile = reconcile(h)
    stop_docker = ("--", "systemctl", "stop", "docker.service", "containerd.service")
    parallel(lambda u: b.ctl("exec", u, *stop_docker, check=False), running, 8)
    down_used = (used_memory() - idle_before) / max(1, len(running))
    down_cg = statistics.median(cgroup_memory(u) for u in running) if running else 0
    down_pss = statistics.median(pss(tenant_pids(u)) for u in running) if running else 0

    first, rest = b.tenants[0], b.tenants[1:]
    t_one = timed(lambda: b.ctl("user", "remove", first))
    t_rest = timed(lambda: parallel(lambda u: b.ctl("user", "remove", u), rest, n))
    left = leftovers(b, subuid_before)

    docker_times = sorted(first_docker.values()) or [float("nan")]
    mib = 2**20
    inotify_goal = dict(hostlimits.SETTINGS)["fs/inotify/max_user_instances"]
    return [
        ("tenants reaching docker", f"{len(running)} of {n}", f"{n} of {n}"),
        ("storm: all started and docker answered", f"{storm:.1f} s", ""),
        ("time to first docker, median", f"{statistics.median(docker_times):.2f} s", ""),
        ("time to first docker, p95", f"{p95(docker_times):.2f} s", ""),
        (
            f"hostctl status during the storm, median / max ({len(during)} calls)",
            f"{statistics.median(during):.2f} / {max(during):.2f} s" if during else "-",
            "",
        ),
        (
            f"hostd's answer to status during the storm, median / max ({len(answered)} calls)",
            f"{statistics.median(answered):.2f} / {max(answered):.2f} s" if answered else "-",
            "<= 0.5 s",
        ),
        (
            f"hostctl status of {n} after, median / p95",
            f"{statistics.median(after):.3f} / {p95(after):.3f} s",
            "<= 0.3 s",
        ),
        (
            "status request in-process (hostd's side), median",
            f"{statistics.median(inproc):.3f} s",
            "",
        ),
        ("used memory per tenant, dockerd up (host)", f"{up_used / mib:.1f} MiB", ""),
        ("memory cgroup per tenant, dockerd up (median)", f"{up_cg / mib:.1f} MiB", ""),
        ("PSS per tenant, dockerd up (median)", f"{up_pss / mib:.1f} MiB", ""),
        ("used memory per tenant, dockerd stopped (host)", f"{down_used / mib:.1f} MiB", ""),
        ("memory cgroup per tenant, dockerd stopped (median)", f"{down_cg / mib:.1f} MiB", ""),
        ("PSS per tenant, dockerd stopped (median)", f"{down_pss / mib:.1f} MiB", "<= 20 MiB"),
        ("hostd RSS / threads", f"{rss / mib:.0f} MiB / {threads}", ""),
        (
            f"reconcile after kill -9 with {len(running)} running (start to its end)",
            f"{t_reconcile:.2f} s",
            "<= 2 s (100)",
        ),
        (
            "inotify instances of the busiest tenant / max_user_instances",
            f"{busiest} / {limit}",
            f"limit >= {inotify_goal} (per tenant)",
        ),
        ("hostctl user remove of one tenant", f"{t_one:.2f} s", "<= 0.3 s"),
        (f"remove the other {n - 1} in parallel", f"{t_rest:.1f} s", ""),
        ("left behind", ", ".join(left) or "nothing", "nothing"),
    ]


def table(rows: list[Row], n: int) -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    head = f"### Measured {time.strftime('%Y-%m-%d')}, N = {n}"
    lines = [
        f"{head} ({os.cpu_count()} cores, {ram:.1f} GiB, load {load:.2f} at end)",
        "",
        "| metric | value | goal |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {v} | {g} |" for m, v, g in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", nargs="?", type=int, default=100, help="tenants (default 100)")
    ap.add_argument("--n", dest="n_opt", type=int, help="the same as N")
    add_common_args(ap)
    args = ap.parse_args()
    n = args.n_opt or args.n
    unwind_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="hostd-bench-density-"))
    try:
        with state_with_default_image(args.state_dir) as state:
            b = DensityBench(work, state, n)
            with b:
                rows = measure(b)
    finally:
        fsutil.remove_tree(work)
    text = table(rows, n)
    publish(text, args.markdown)


if __name__ == "__main__":
    main()
