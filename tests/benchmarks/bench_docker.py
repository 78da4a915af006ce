"""Benchmark: Docker in a hostd tenant against the host's own Docker (the `docker` group).

One run, rounds alternating between the sides: `docker run --rm`, a 10-layer build with
BuildKit and with the legacy builder (no cache), `docker compose up -d --wait` of three
services with healthchecks and `down`, `docker save` and `docker load` of a 100 MB image.
Prints the medians, the ratios tenant / host and the issue's goals (BuildKit build <= 0.9x,
run --rm <= 1.05x, compose up <= 1.1x), and a second tenant whose daemon.json uses the
containerd image store instead of the image's overlay2 graph driver, to see which is faster.

    sudo .venv/bin/python -m tests.benchmarks.bench_docker [--runs 7] [--markdown]
                                                          [--state-dir DIR]

The host's Docker is what an admin of a Debian 12 host gets from its packages: docker.io,
containerd (and the host's runc) from bookworm, `apt-get download`-ed into /var/cache/hostd/bench
and unpacked into a private tree, never installed: the dockerd runs with its own data root,
exec root, socket and bridge, without iptables, and is stopped and removed at the end. Compose
v2 for it is trixie's docker-compose binary (Debian 12 has only compose v1). The tenants are
made by a private hostd with `hostctl user add` and quotas. Both sides run the same shell
script as the same user: over SSH through hostd's gateway in the tenant, with runuser on the
host; the script times each docker command itself, so the SSH login is not in the figures.
Without --state-dir it builds the default image in a fresh directory first (about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from runtime import fsutil
from tests.benchmarks.images import state_with_default_image
from tests.e2e.conftest import add_developer
from tests.hostd_harness import Hostd, Login, UnixUsers, make_busybox_tar, other_hostd

CACHE = Path("/var/cache/hostd/bench")
BOOKWORM = ("docker.io", "containerd")  # what `apt-get install docker.io` brings on Debian 12
TRIXIE = ("docker-compose",)  # compose v2; its Go binary needs glibc 2.34, bookworm has 2.36
TRIXIE_SOURCE = (
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    "http://deb.debian.org/debian trixie main\n"
)
BRIDGE, BRIDGE_ADDR = "hostdbd0", "10.231.250.1/25"  # the host dockerd's default bridge
COMPOSE_BRIDGE, COMPOSE_SUBNET = "hostdbc0", "10.231.250.128/26"  # the compose project's
CGROUP_PARENT = "hostd-bench-docker"
# the alternative to the image's overlay2 graph driver: the containerd image store
CONTAINERD_STORE = '{"storage-driver": "overlayfs", "features": {"containerd-snapshotter": true}}'
BIG = 100 * 10**6

TEN_LAYERS = "FROM busybox:local\n" + "".join(f"RUN echo {i} > /f{i}\n" for i in range(10))
COMPOSE = f"""\
x-service: &service
  image: busybox:local
  command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
  healthcheck: {{test: ["CMD", "true"], interval: 200ms, timeout: 5s, retries: 100}}
services:
  db: *service
  api:
    <<: *service
    depends_on: {{db: {{condition: service_healthy}}}}
  web:
    <<: *service
    depends_on: {{api: {{condition: service_healthy}}}}
networks:
  default:
    driver_opts: {{com.docker.network.bridge.name: {COMPOSE_BRIDGE}}}
    ipam: {{config: [{{subnet: {COMPOSE_SUBNET}}}]}}
"""
# `t CMD...` runs CMD and prints its wall time in ns; untimed steps keep both sides alike
PRELUDE = 'set -e\nt() { s=$(date +%s%N); "$@" >/dev/null; echo $(( $(date +%s%N) - s )); }\n'
PRUNE = "docker image prune -f >/dev/null\n"


@dataclass(frozen=True)
class Op:
    labels: tuple[str, ...]  # one per `t` line of the script
    script: str


OPS = (
    Op(("docker run --rm busybox true",), "t docker run --rm busybox:local true\n"),
    Op(
        ("build 10 layers, BuildKit",),
        f"t env DOCKER_BUILDKIT=1 docker build --no-cache -q -t bk:1 ctx\n{PRUNE}",
    ),
    Op(
        ("build 10 layers, legacy builder",),
        f"t env DOCKER_BUILDKIT=0 docker build --no-cache -q -t legacy:1 ctx\n{PRUNE}",
    ),
    Op(
        ("compose up -d --wait (3 healthy)", "compose down"),
        "cd proj\nt docker compose -p bench up -d --wait\nt docker compose -p bench down\n",
    ),
    Op(
        ("docker save 100 MB", "docker load 100 MB"),
        "t docker save -o save.tar big:1\ndocker rmi big:1 >/dev/null\n"
        "t docker load -i save.tar\nrm save.tar\n",
    ),
)
GOALS = {
    "docker run --rm busybox true": 1.05,
    "build 10 layers, BuildKit": 0.9,
    "compose up -d --wait (3 healthy)": 1.1,
}


class Side(Protocol):
    @property
    def name(self) -> str: ...

    def sh(self, script: str) -> str:
        """Run `script` as the user in their bench directory, with this side's Docker."""
        ...


@dataclass(frozen=True)
class TenantSide:
    name: str
    login: Login

    def sh(self, script: str) -> str:
        home = pwd.getpwnam(self.login.user).pw_dir
        return self.login.sh(f"cd {home}/hostd-bench\n{PRELUDE}{script}", timeout=600)


@dataclass(frozen=True)
class HostSide:
    name: str
    user: str
    env: str  # shell exports that point the docker CLI at the private dockerd

    def sh(self, script: str) -> str:
        home = pwd.getpwnam(self.user).pw_dir
        res = subprocess.run(
            [
                "runuser",
                "-u",
                self.user,
                "--",
                "bash",
                "-c",
                f"{self.env}cd {home}/hostd-bench\n{PRELUDE}{script}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, f"host: `{script}` exited {res.returncode}:\n{res.stderr}"
        return res.stdout


def fetch_debs() -> list[Path]:
    """The host Docker's packages, downloaded once into the cache (never installed)."""
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for packages, options in ((BOOKWORM, []), (TRIXIE, trixie_apt())):
        missing = [p for p in packages if not any(debs.glob(f"{p}_*.deb"))]
        if missing:
            subprocess.run(
                ["apt-get", "-q", *options, "-o", "APT::Sandbox::User=root", "download", *missing],
                cwd=debs,
                check=True,
            )
    return sorted(p for name in BOOKWORM + TRIXIE for p in debs.glob(f"{name}_*.deb"))


def trixie_apt() -> list[str]:
    """apt options for a private trixie package list in the cache: the host's apt sources
    and lists stay as they are."""
    apt = CACHE / "apt"
    for d in ("lists/partial", "cache/archives/partial", "parts"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "trixie.list").write_text(TRIXIE_SOURCE)
    options = [
        "-o",
        f"Dir::Etc::SourceList={apt}/trixie.list",
        "-o",
        f"Dir::Etc::SourceParts={apt}/parts",
        "-o",
        f"Dir::State::Lists={apt}/lists",
        "-o",
        f"Dir::Cache={apt}/cache",
    ]
    if not any((apt / "lists").glob("*_Packages")):
        subprocess.run(["apt-get", "-q", *options, "update"], check=True, capture_output=True)
    return options


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def host_docker(work: Path, user: str) -> Iterator[HostSide]:
    """A private dockerd from Debian 12's packages, its socket open to the user's group (the
    `docker` group's daemon); everything it made is removed at the end, on failure too."""
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        raise SystemExit(
            f"bridge {BRIDGE} exists: another bench_docker runs? If not, `ip link del {BRIDGE}`"
        )
    tree = work / "tree"
    for deb in fetch_debs():
        run("dpkg-deb", "-x", str(deb), str(tree))
    client = work / "client"  # DOCKER_CONFIG, with compose v2 as a CLI plugin
    (client / "cli-plugins").mkdir(parents=True)
    shutil.copy(tree / "usr/libexec/docker/cli-plugins/docker-compose", client / "cli-plugins")
    pw = pwd.getpwnam(user)
    for path in (client, client / "cli-plugins"):
        os.chown(path, pw.pw_uid, pw.pw_gid)
    rundir = Path(tempfile.mkdtemp(prefix="hostd-bench-docker-", dir="/run"))
    rundir.chmod(0o755)  # the user reaches the socket (its group is the user's)
    made_run_docker = not Path("/run/docker").exists()  # dockerd makes /run/docker/plugins
    search = f"{tree}/usr/bin:{tree}/usr/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
    (rundir / "daemon.json").write_text(json.dumps({"deprecated-key-path": f"{rundir}/key.json"}))
    proc: subprocess.Popen[bytes] | None = None
    try:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", BRIDGE_ADDR, "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        with open(work / "dockerd.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    f"{tree}/usr/sbin/dockerd",
                    "--config-file",
                    f"{rundir}/daemon.json",
                    "--data-root",
                    f"{work}/data-root",
                    "--exec-root",
                    f"{rundir}/exec",
                    "--pidfile",
                    f"{rundir}/dockerd.pid",
                    "-H",
                    f"unix://{rundir}/docker.sock",
                    "--group",
                    str(pw.pw_gid),
                    "--iptables=false",
                    "--ip6tables=false",
                    "--ip-forward=false",
                    "--ip-masq=false",
                    f"--bridge={BRIDGE}",
                    f"--cgroup-parent={CGROUP_PARENT}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={"PATH": search},
            )
        env = (
            f"export DOCKER_HOST=unix://{rundir}/docker.sock DOCKER_CONFIG={client} "
            f"PATH={tree}/usr/bin:$PATH\n"
        )
        side = HostSide("host", user, env)
        _wait_answers(side, proc, work / "dockerd.log")
        yield side
    finally:
        if proc is not None:
            _stop(proc, rundir / "exec/containerd/containerd.pid")
        for bridge in (BRIDGE, COMPOSE_BRIDGE):
            subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        _remove_cgroups()
        fsutil.remove_tree(rundir)
        fsutil.remove_tree(work / "data-root")
        if made_run_docker:
            fsutil.remove_tree(Path("/run/docker"))


def _wait_answers(side: HostSide, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"dockerd exited: {log.read_text()[-2000:]}"
        with contextlib.suppress(AssertionError):
            side.sh("docker version >/dev/null")
            return
        assert time.monotonic() < deadline, f"dockerd did not answer in 60 s: see {log}"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes], containerd_pidfile: Path) -> None:
    """dockerd by its PID (it stops its containers and its containerd); if it will not go,
    SIGKILL, and then its containerd, by the PID in the pidfile it wrote."""
    containerd = int(containerd_pidfile.read_text()) if containerd_pidfile.exists() else None
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        with contextlib.suppress(OSError):  # gone already, or the PID is someone else's now
            if (
                containerd is not None
                and str(containerd_pidfile.parent)
                in Path(f"/proc/{containerd}/cmdline").read_text()
            ):
                os.kill(containerd, signal.SIGKILL)


def _remove_cgroups() -> None:
    """What the host dockerd left under its cgroup parent (BuildKit's sub-cgroups), deepest
    first."""
    for controller in Path("/sys/fs/cgroup").iterdir():
        top = controller / CGROUP_PARENT
        if top.is_dir():
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                os.rmdir(dirpath)


def workload(user: str, busybox: Path) -> None:
    """The build context, compose project and the 100 MB image (busybox plus random bytes, so
    nothing compresses or dedupes it) in ~/hostd-bench, the user's own."""
    pw = pwd.getpwnam(user)
    root = Path(pw.pw_dir) / "hostd-bench"
    (root / "ctx").mkdir(parents=True)
    (root / "proj").mkdir()
    (root / "ctx/Dockerfile").write_text(TEN_LAYERS)
    (root / "proj/compose.yaml").write_text(COMPOSE)
    shutil.copy(busybox, root / "busybox.tar")
    shutil.copy(busybox, root / "big.tar")
    blob = root / "blob"
    with open(blob, "wb") as f:
        for _ in range(BIG // 2**20 + 1):
            f.write(os.urandom(2**20))
        f.truncate(BIG)
    with tarfile.open(root / "big.tar", "a") as tar:
        tar.add(blob, arcname="blob")
    blob.unlink()
    for path in (root, *root.rglob("*")):
        os.chown(path, pw.pw_uid, pw.pw_gid)


def load_images(side: Side) -> None:
    side.sh(
        "docker import busybox.tar busybox:local >/dev/null\n"
        "docker import big.tar big:1 >/dev/null\n"
    )


def tenant(
    stack: contextlib.ExitStack, h: Hostd, users: UnixUsers, work: Path, busybox: Path, name: str
) -> TenantSide:
    """A developer made a tenant with quotas by `hostctl user add`, logged in over SSH, with the
    workload in their home; removed again by `stack`."""
    directory = work / name
    directory.mkdir()
    login = add_developer(h, users, directory, busybox)
    stack.callback(h.hostctl, "user", "remove", login.user, check=False)
    workload(login.user, busybox)
    return TenantSide(name, login)


def use_containerd_store(h: Hostd, side: TenantSide) -> None:
    """The tenant's Docker switched to the containerd image store (its images are then gone:
    load_images again)."""
    h.hostctl(
        "exec",
        side.login.user,
        "--",
        "sh",
        "-c",
        f"echo '{CONTAINERD_STORE}' > /etc/docker/daemon.json && systemctl restart docker",
    )
    deadline = time.monotonic() + 60
    while side.login.ssh("docker info --format '{{.Driver}}'").stdout.strip() != b"overlayfs":
        assert time.monotonic() < deadline, "the tenant's dockerd did not come back on containerd"
        time.sleep(0.2)


def describe(side: Side) -> str:
    """The side's Docker: versions, storage driver, compose and buildx."""
    return " ".join(
        side.sh(
            "docker version --format 'docker CLI {{.Client.Version}}, dockerd {{.Server.Version}}"
            '{{range .Server.Components}}{{if ne .Name "Engine"}}, {{.Name}} {{.Version}}{{end}}'
            "{{end}},'\n"
            "echo \"storage driver $(docker info --format '{{.Driver}}'),\"\n"
            'echo "compose $(docker compose version --short),"\n'
            "bx=$(docker buildx version 2>/dev/null | cut -d' ' -f2) || true\n"
            'echo "buildx ${bx:-none, BuildKit built into dockerd}"\n'
        ).split()
    )


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem / 2**20:.1f} GiB RAM, "
        f"kernel {platform.release()}, {Path('/etc/debian_version').read_text().strip()}"
    )


def measure(sides: list[Side], runs: int) -> dict[str, dict[str, list[float]]]:
    """Every op on every side in turn, `runs` rounds: drift hits all sides alike."""
    results: dict[str, dict[str, list[float]]] = {s.name: {} for s in sides}
    start = time.monotonic()
    for r in range(runs):
        print(
            f"round {r + 1}/{runs} at {time.monotonic() - start:.0f} s, "
            f"load {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
            flush=True,
        )
        for op in OPS:
            for side in sides:
                times = [int(ns) / 1e9 for ns in side.sh(op.script).split()]
                assert len(times) == len(op.labels), f"{side.name}: {op.script}: {times}"
                for label, secs in zip(op.labels, times, strict=True):
                    results[side.name].setdefault(label, []).append(secs)
    return results


def report(
    results: dict[str, dict[str, list[float]]],
    info: dict[str, str],
    runs: int,
    load: tuple[float, float],
    markdown: bool,
) -> None:
    med = {side: {k: statistics.median(v) for k, v in r.items()} for side, r in results.items()}
    head = [
        f"metric (median of {runs}, s)",
        "host",
        "tenant",
        "tenant/host",
        "goal",
        "tenant containerd store",
        "containerd/tenant",
    ]
    rows = []
    for op in OPS:
        for label in op.labels:
            h, t, o = med["host"][label], med["tenant"][label], med["tenant-containerd"][label]
            goal = GOALS.get(label)
            verdict = (
                "" if goal is None else f"<= {goal}x " + ("met" if t / h <= goal else "NOT met")
            )
            rows.append(
                [
                    label,
                    f"{h:.3f}",
                    f"{t:.3f}",
                    f"{t / h:.2f}x",
                    verdict,
                    f"{o:.3f}",
                    f"{o / t:.2f}x",
                ]
            )
    wins = [k for k in med["tenant"] if med["tenant"][k] < med["tenant-containerd"][k]]
    geo = statistics.geometric_mean(
        [med["tenant-containerd"][k] / med["tenant"][k] for k in med["tenant"]]
    )
    lines = [
        f"machine: {machine()}; load average {load[0]:.2f} at start, {load[1]:.2f} at end",
        *(f"{name}: {text}" for name, text in info.items()),
        "client: the same script as the same user, the docker CLI next to its daemon "
        "(tenant: over SSH through hostd's gateway; host: runuser); the script times each "
        "command, so the SSH login is not counted",
        "note: the host's BuildKit is the one built into Debian 12's dockerd 20.10 (no "
        "buildx); that is what an admin of this OS gets, not a current Docker on the host",
    ]
    if markdown:
        print("\n".join(f"- {line}" for line in lines) + "\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print("\n" + "\n".join(lines) + "\n")
        widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
        for row in (head, *rows):
            print(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
    print(
        f"\ndaemon.json: the image's overlay2 graph driver is faster in {len(wins)} of "
        f"{len(med['tenant'])} measures ({', '.join(wins) or 'none'}); containerd image store "
        f"/ overlay2, geometric mean {geo:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument(
        "--state-dir",
        type=Path,
        help="reuse a state dir holding a default image (not one a running hostd uses)",
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on kill as on Ctrl-C
    work = Path(tempfile.mkdtemp(prefix="hostd-bench-docker-", dir="/var/tmp"))
    work.chmod(0o755)  # the user runs the host's docker CLI from here
    load0 = os.getloadavg()[0]
    try:
        with contextlib.ExitStack() as stack:
            state = stack.enter_context(state_with_default_image(args.state_dir))
            users = UnixUsers()
            stack.callback(users.remove_all)
            (work / "busybox").mkdir()
            busybox = make_busybox_tar(work / "busybox")
            h = stack.enter_context(other_hostd(work, state, "bt"))
            a = tenant(stack, h, users, work, busybox, "tenant")
            b = tenant(stack, h, users, work, busybox, "tenant-containerd")
            use_containerd_store(h, b)
            (work / "host").mkdir(mode=0o755)
            host = stack.enter_context(host_docker(work / "host", a.login.user))
            sides: list[Side] = [host, a, b]
            for side in sides:
                load_images(side)
            info = {s.name: describe(s) for s in sides}
            results = measure(sides, args.runs)
        report(results, info, args.runs, (load0, os.getloadavg()[0]), args.markdown)
    finally:
        fsutil.remove_tree(work)


if __name__ == "__main__":
    main()
