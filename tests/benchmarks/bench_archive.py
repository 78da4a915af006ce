"""Benchmark: export and import throughput of the tenant archive against a plain
`tar --sparse | zstd` of the same volume image (issue 13's goal: >= 0.8x).

    sudo .venv/bin/python -m tests.benchmarks.bench_archive [--source /usr/share] [--size 4G]

A sparse ext4 image like a tenant's volume is filled with `--source` (mkfs.ext4 -d), then
written as an archive the way `hostctl user export` does (data_chunks, sha256 per chunk,
hostd.archive.Writer: zstd -T0 -3) and read back the way `user import` does (Reader.restore
into a staging image), each against the baseline run in the same process: `tar --sparse -cf
- data.img | zstd -q -T0 -3` and `zstd -dc | tar -x`. Prints seconds, MiB/s of volume data
and the ratio (ours / baseline speed). Everything is in a temp dir removed at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hostd import archive as a
from hostd.units import parse_size
from runtime.limits import Limits
from runtime.volume import data_chunks

SCHEMA = 5


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def export(image: Path, out: Path) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    size = image.stat().st_size
    head = a.Header(
        1, SCHEMA, "a" * 32, "full", None, "bench", "now", "h", "0", "stopped", a.CHUNK_SIZE,
        size, False, image.stat().st_blocks * 512,
    )  # fmt: skip
    record = a.TenantRecord("bench", 0, "default", "default@1", Limits(), (), None, "stopped", "")
    with a.Writer(fd) as w:
        hs, ts = w.add(a.HEADER, head.encode()), w.add(a.TENANT, record.encode())
        sums = {}
        for n, data in data_chunks(image, a.CHUNK_SIZE):  # as hostd.transfer does
            sums[n] = w.add(f"volume/{n:08d}", data, a.sha256(data))
        w.add(a.MANIFEST, a.Manifest(head.id, size, sums, (), hs, ts).encode())
        w.finish()
    os.close(fd)


def restore(archive: Path, staging: Path) -> None:
    fd, vol = os.open(archive, os.O_RDONLY), os.open(staging, os.O_RDWR | os.O_CREAT, 0o600)
    reader = a.Reader(fd, archive.name, SCHEMA)
    try:
        reader.header()
        reader.tenant()
        reader.restore(vol, None, None)
    finally:
        reader.close()
        os.close(fd)
        os.close(vol)


def sh(script: str) -> None:
    subprocess.run(["sh", "-c", script], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path("/usr/share"))
    ap.add_argument("--size", default="4G")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hostd-bench-", dir="/var/tmp") as tmp:
        t = Path(tmp)
        image = t / "data.img"
        with open(image, "wb") as f:
            f.truncate(parse_size(args.size, "size"))
        sh(f"mkfs.ext4 -q -F -d {args.source} {image}")
        data = image.stat().st_blocks * 512
        rows = [
            ("export", timed(lambda: export(image, t / "ours.hostd")), timed(lambda: sh(
                f"tar --sparse -C {t} -cf - data.img | zstd -q -T0 -3 > {t}/base.hostd"
            ))),
            ("import", timed(lambda: restore(t / "ours.hostd", t / "staging.img")), timed(
                lambda: sh(f"mkdir {t}/x && zstd -dcq {t}/base.hostd | tar -C {t}/x -xf -")
            )),
        ]  # fmt: skip
        sh(f"cmp {image} {t}/staging.img")  # the restored image is the volume, bit for bit
        mib = data / (1 << 20)
        print(f"volume {args.size} of {args.source}: {mib:.0f} MiB of data")
        print(f"archive {(t / 'ours.hostd').stat().st_size >> 20} MiB, "
              f"tar|zstd {(t / 'base.hostd').stat().st_size >> 20} MiB")  # fmt: skip
        print("| step | hostd (s) | MiB/s | tar+zstd (s) | MiB/s | ratio |")
        print("|---|---|---|---|---|---|")
        for step, ours, base in rows:
            print(f"| {step} | {ours:.2f} | {mib / ours:.0f} | {base:.2f} | {mib / base:.0f} "
                  f"| {base / ours:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
