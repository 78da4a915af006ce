"""Accounts inside a container, from its own /etc/passwd and /etc/group.

hostd used to ask `getent` inside, as root: a program of the tenant's choosing, whose output
and run time are the tenant's too. The files are read instead (size-capped, resolved inside
the container, see runtime.inside) and parsed here, as plain data.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_DB = 4 << 20  # bytes of /etc/passwd or /etc/group read at most


@dataclass(frozen=True)
class Entry:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]  # supplementary groups, without gid


ROOT = Entry("root", 0, 0, "/root", "/bin/sh", ())


def lookup(passwd: str, group: str, name: str) -> Entry | None:
    """`name`'s entry and supplementary groups (as `id -G` would list them), or None."""
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) != 7 or fields[0] != name:
            continue
        try:
            uid, gid = int(fields[2]), int(fields[3])
        except ValueError:
            return None
        return Entry(
            name,
            uid,
            gid,
            fields[5] or "/",
            fields[6] or "/bin/sh",
            _supplementary(group, name, gid),
        )
    return None


def has_group(group: str, name: str, gid: int) -> bool:
    """Whether a group named `name`, or one with `gid`, exists (groupadd would refuse both)."""
    for line in group.splitlines():
        fields = line.split(":")
        if len(fields) == 4 and (fields[0] == name or fields[2] == str(gid)):
            return True
    return False


def _supplementary(group: str, name: str, gid: int) -> tuple[int, ...]:
    found: list[int] = []
    for line in group.splitlines():
        fields = line.split(":")
        if len(fields) != 4 or name not in fields[3].split(","):
            continue
        try:
            g = int(fields[2])
        except ValueError:
            continue
        if g != gid and g not in found:
            found.append(g)
    return tuple(found)
