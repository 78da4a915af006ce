"""Kernel settings under /proc/sys: the one place that reads and writes them.

Keys are paths below /proc/sys ("fs/inotify/max_user_instances"), so interface names with
dots stay unambiguous; messages show them as sysctl(8) does ("fs.inotify.max_user_instances").
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import RuntimeFailure

ROOT = Path("/proc/sys")


def name(key: str) -> str:
    """The key as sysctl(8) and sysctl.d files spell it."""
    return key.replace("/", ".")


def read(key: str) -> str:
    try:
        return (ROOT / key).read_text().strip()
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot read {name(key)}: {exc.strerror or exc}", "check that /proc is mounted"
        ) from None


def write(key: str, value: str) -> None:
    try:
        (ROOT / key).write_text(value)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot set {name(key)}: {exc.strerror or exc}", "run as root with /proc/sys writable"
        ) from None


def raise_to(key: str, minimum: int) -> tuple[int, int]:
    """Set a numeric setting to at least `minimum`, never lowering a value someone set
    higher. Returns (before, after)."""
    before = int(read(key))
    if before < minimum:
        write(key, str(minimum))
    return before, max(before, minimum)
