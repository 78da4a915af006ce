"""Container and image names end up in paths, cgroup names and hostnames: keep them tame."""

from __future__ import annotations

import re

from runtime.errors import RuntimeFailure

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def check_name(name: str, what: str = "container") -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise RuntimeFailure(
            f"invalid {what} name {name!r}",
            "use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit, no '..'",
        )
    return name


def hostname_for(name: str) -> str:
    """A valid hostname derived from a container name ('_' and '.' are not allowed in labels)."""
    return re.sub(r"[_.]", "-", name).strip("-").lower() or "container"
