"""The tenant's account inside their container: created at start, looked up for every exec.

The container's /etc/passwd and /etc/group are the tenant's: they are read from the host
without trusting them (runtime.inside: size-capped, resolved inside the container) and parsed
as plain data (hostd.passwd). Only a missing account makes hostd run anything inside, and then
groupadd and useradd with a plain argv: no shell, no string built from the tenant's data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from hostd import passwd
from hostd.backend import ContainerRuntime
from hostd.errors import HostdError
from hostd.state import Tenant
from runtime import inside
from runtime.errors import NotFound, RuntimeFailure
from runtime.execs import ExecSpec

INNER_ID_LIMIT = 60000  # inner IDs for the user's account stay below the range's nobody (65534)
FALLBACK_INNER_ID = 1000
INNER_GROUPS = "sudo,docker"  # the user administers their container and its Docker

ReadFile = Callable[[int, str, int], bytes]  # (pid, path inside, most bytes): runtime.inside


@dataclass(frozen=True)
class Account:
    """An account inside a container, as runc exec needs it."""

    ids: str  # uid:gid
    groups: list[int]
    env: list[str]
    home: str


def inner_id(host_id: int) -> int:
    """The account's ID inside: the host's when it fits the range's usual user space."""
    return host_id if 0 < host_id < INNER_ID_LIMIT else FALLBACK_INNER_ID


class InnerAccounts:
    def __init__(self, runtime: ContainerRuntime, read_file: ReadFile = inside.read_file) -> None:
        self.runtime = runtime
        self.read_file = read_file

    def _databases(self, pid: int) -> tuple[str, str]:
        """The container's /etc/passwd and /etc/group (its init is `pid`)."""
        users, groups = (
            self.read_file(pid, f"/etc/{db}", passwd.MAX_DB).decode(errors="replace")
            for db in ("passwd", "group")
        )
        return users, groups

    def ensure(self, t: Tenant, pid: int) -> None:
        """The user's account inside (same name, home at the host path, sudo and docker),
        created if missing; an existing one is the tenant's and left as it is."""
        uid, gid = inner_id(t.uid), inner_id(t.gid)
        try:
            users, groups = self._databases(pid)
        except RuntimeFailure as exc:
            raise HostdError(
                f"cannot read the accounts inside {t.user}'s container: {exc.cause}", exc.fix
            ) from exc
        if passwd.lookup(users, groups, t.user) is not None:
            return
        if not passwd.has_group(groups, t.user, gid):
            self._run(t.user, ["groupadd", "-g", str(gid), t.user])
        self._run(
            t.user,
            ["useradd", "-u", str(uid), "-g", str(gid), "-G", INNER_GROUPS, "-M"]
            + ["-d", t.home, "-s", "/bin/bash", t.user],
        )

    def _run(self, user: str, argv: list[str]) -> None:
        res = self.runtime.exec(user, ExecSpec(argv))
        if res.returncode != 0:
            raise HostdError(
                f"cannot create the account {user} inside: {res.last_error_line()}",
                f"see `hostctl logs {user}`",
            )

    def account(self, container: str, account: str) -> Account:
        """runc's numeric IDs, login environment and home of an account inside."""
        if re.fullmatch(r"\d+(:\d+)?", account):
            uid, _, gid = account.partition(":")
            return Account(f"{uid}:{gid or uid}", [], [], "/")
        pid = self.runtime.state(container).pid
        if not pid:
            raise HostdError(f"{container}'s container is not running", "start it first")
        try:
            entry = passwd.lookup(*self._databases(pid), account)
        except RuntimeFailure:
            if account != "root":
                raise
            entry = passwd.ROOT  # an admin can still get in to repair the files
        if entry is None:
            raise NotFound(
                f"no account {account!r} inside {container}'s container",
                "give an existing user (or root)",
            )
        name, shell = entry.name, entry.shell
        env = [f"HOME={entry.home}", f"USER={name}", f"LOGNAME={name}", f"SHELL={shell}"]
        return Account(f"{entry.uid}:{entry.gid}", list(entry.groups), env, entry.home)
