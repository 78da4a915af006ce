"""Benchmark: export and import of a tenant against a plain `tar | zstd` of the same volume
(issue 13; goal: both >= 0.8x of tar's throughput).

A tenant (a real Unix user, `hostctl user add`) gets a realistic volume: copies of its image's
/usr, /etc and dpkg trees (many small files) up to --fill MB, a 64 MB random file (no
compression) and a 64 MB text file (much), and is stopped. Then, --runs times each, alternating:
`hostctl user export USER -o FILE` against `tar -C <the volume mounted read-only> -cf - . |
zstd -q -T0 -3 > FILE`, and `hostctl user import FILE --as USER2 --no-start` (a new ID range:
every file shifted) against `zstd -d | tar -x` into an empty directory. Throughput counts the
bytes the volume's file system uses; medians. Last, an incremental export after a 10 MB change.

    sudo .venv/bin/python -m tests.benchmarks.bench_backup [--runs 3] [--fill 320] [--markdown]

It starts its own hostd (bench_ssh's setup, with a bridge, nft table, subnet and cgroup parent
of its own) and removes everything it made at the end, also on failure, Ctrl-C or SIGTERM.
Without --state-dir it builds the default image in a fresh directory first (about a minute).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from runtime import fsutil
from tests.benchmarks.bench_ssh import Bench
from tests.benchmarks.cli import add_common_args, publish, unwind_on_sigterm
from tests.benchmarks.images import state_with_default_image
from tests.hostd_harness import UnixUsers

DROPIN = (
    '[runtime]\ncgroup_parent = "hostd-bench-backup"\n'
    '[network]\nbridge = "hostdk0"\nnft_table = "hostd_bench_backup"\n'
    'subnet = "10.234.0.0/24"\ndns = ["10.234.0.1"]\n'
)
MB = 1_000_000
FILL = """
set -e
mkdir -p /srv/fill && n=0
for round in 1 2 3 4 5 6; do
  for d in /usr/share /usr/lib /usr/bin /etc /var/lib/dpkg; do
    [ "$(du -sm /srv/fill | cut -f1)" -ge {fill} ] && break 2
    n=$((n + 1)) && cp -a "$d" "/srv/fill/$n"
  done
done
head -c 64M /dev/urandom > /srv/random.bin
seq 1 20000000 | head -c 64M > /srv/text.log
sync
"""


class BackupBench(Bench):
    """bench_ssh's hostd without sshd; two accounts: the tenant and the one imported as."""

    def _setup(self) -> None:
        self.users = UnixUsers()
        self._undo.callback(self.users.remove_all)
        self.user, self.other = self.users.make(), self.users.make()
        dropins = self.work / "hostd.toml.d"
        dropins.mkdir()
        (dropins / "backup.toml").write_text(DROPIN)
        self.hostd = self._hostd()
        self._undo.callback(self._remove_tenants)  # runs before hostd stops

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.hostd.hostctl(*args, check=check)

    def _remove_tenants(self) -> None:
        if self.hostd.proc is not None and self.hostd.proc.poll() is None:
            for user in (self.user, self.other):
                self.ctl("user", "remove", user, check=False)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def shell(script: str) -> None:
    subprocess.run(["sh", "-ec", script], check=True)


def used_bytes(mountpoint: Path) -> int:
    st = os.statvfs(mountpoint)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def measure(b: BackupBench, runs: int, fill: int) -> list[tuple[str, str]]:
    work, user = b.work, b.user
    b.ctl("user", "add", user, "--disk", "4G")
    b.ctl("start", user)
    b.ctl("exec", user, "--", "sh", "-c", FILL.replace("{fill}", str(fill)))
    files = int(b.ctl("exec", user, "--", "sh", "-c", "find /srv | wc -l").stdout)
    b.ctl("stop", user)
    volume = b.state / "containers" / user / "data.img"
    mnt = work / "mnt"
    mnt.mkdir()
    archive, tarball, dest = work / "full.hostd", work / "full.tar.zst", work / "extract"

    def export() -> None:
        archive.unlink(missing_ok=True)
        b.ctl("user", "export", user, "-o", str(archive))

    def tar_zstd() -> None:
        shell(f"tar -C {mnt} -cf - . | zstd -q -T0 -3 > {tarball}")

    def import_() -> None:
        b.ctl("user", "remove", b.other, check=False)
        b.ctl("user", "import", str(archive), "--as", b.other, "--no-start")

    def untar() -> None:
        if dest.exists():
            fsutil.remove_tree(dest)
        dest.mkdir()
        shell(f"zstd -d -q -T0 < {tarball} | tar -C {dest} -xf -")

    subprocess.run(["mount", "-o", "ro,noload,loop", str(volume), str(mnt)], check=True)
    try:
        used = used_bytes(mnt)
        times: dict[str, list[float]] = {"export": [], "tar": [], "import": [], "untar": []}
        for _ in range(runs):
            times["tar"].append(timed(tar_zstd))
            times["export"].append(timed(export))
            times["untar"].append(timed(untar))
            times["import"].append(timed(import_))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    b.ctl("user", "remove", b.other)
    fsutil.remove_tree(dest)

    b.ctl("start", user)
    b.ctl("exec", user, "--", "sh", "-c", "head -c 10M /dev/urandom > /srv/change.bin && sync")
    b.ctl("stop", user)
    incr = work / "incr.hostd"
    incr_time = timed(
        lambda: b.ctl("user", "export", user, "--since", str(archive), "-o", str(incr))
    )

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: used / MB / v for k, v in med.items()}

    def size(path: Path) -> str:
        return f"{path.stat().st_size / MB:.0f} MB"

    return [
        ("volume: file system used, files", f"{used / MB:.0f} MB, {files} files"),
        ("export: hostctl user export", f"{rate['export']:.0f} MB/s ({med['export']:.1f} s)"),
        ("export baseline: tar \\| zstd -T0 -3", f"{rate['tar']:.0f} MB/s ({med['tar']:.1f} s)"),
        ("export / baseline (goal >= 0.8)", f"{med['tar'] / med['export']:.2f}x"),
        ("import: hostctl user import --as", f"{rate['import']:.0f} MB/s ({med['import']:.1f} s)"),
        ("import baseline: zstd -d \\| tar -x", f"{rate['untar']:.0f} MB/s ({med['untar']:.1f} s)"),
        ("import / baseline (goal >= 0.8)", f"{med['untar'] / med['import']:.2f}x"),
        ("archive size: hostd / tar.zst", f"{size(archive)} / {size(tarball)}"),
        ("incremental after a 10 MB change", f"{size(incr)} in {incr_time:.1f} s"),
    ]


def table(rows: list[tuple[str, str]], runs: int) -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()[:2])
    head = (
        f"### Measured {time.strftime('%Y-%m-%d')}, {runs} rounds, medians"
        f" ({os.cpu_count()} cores, load {load} at end)\n\n"
    )
    lines = ["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fill", type=int, default=320, help="MB of small files copied in")
    add_common_args(ap)
    args = ap.parse_args()
    unwind_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="hostd-bench-backup-", dir="/var/tmp"))
    try:
        with state_with_default_image(args.state_dir) as state, BackupBench(work, state) as b:
            rows = measure(b, args.runs, args.fill)
    finally:
        fsutil.remove_tree(work)
    publish(table(rows, args.runs), args.markdown)


if __name__ == "__main__":
    main()
