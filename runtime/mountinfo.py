"""Reading /proc/self/mountinfo: which mounts exist, and what cgroup layout the host has."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mount:
    target: str
    fstype: str
    source: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:  # nearly every field: a host with many tenants has many mounts
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse(text: str) -> list[Mount]:
    # Only space, tab, newline and backslash are escaped: split on exactly "\n" and " ", as
    # paths may hold other characters str.split() and str.splitlines() would break on.
    mounts = []
    for line in text.split("\n"):
        words = line.split(" ")
        # the separator is the first "-" after the 6 fixed fields (a target may be "-" too)
        sep = next((i for i in range(6, len(words)) if words[i] == "-"), None)
        if sep is None or len(words) < sep + 4:
            continue
        fields, rest = words[:sep], words[sep + 1 :]
        mounts.append(
            Mount(_unescape(fields[4]), rest[0], _unescape(rest[1]), tuple(rest[2].split(",")))
        )
    return mounts


def current() -> list[Mount]:
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:
        return parse(f.read())


def mounts_under(path: str, mounts: list[Mount] | None = None) -> list[str]:
    """Mount points at or below `path` in the order to unmount them: deepest first, and among
    equally deep ones newest first (an overlay uses a volume mounted beside it before it)."""
    prefix = path.rstrip("/") + "/"
    targets = [m.target for m in (mounts if mounts is not None else current())]
    hits = [t for t in reversed(targets) if t == path.rstrip("/") or t.startswith(prefix)]
    return sorted(dict.fromkeys(hits), key=lambda t: t.count("/"), reverse=True)


def is_mounted(path: str) -> bool:
    return any(m.target == path.rstrip("/") for m in current())
