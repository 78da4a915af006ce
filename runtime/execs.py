"""Programs run inside a running container: collected (`run`), on a pty (`tty`), on given
stdio (`spawn`), or as an argv for the caller to run. What runs inside is the container's: the
runc that waits for it on the host is charged to the container's session cgroup."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import cgroups, proc, ttyexec
from runtime.names import check_name
from runtime.runc import Runc
from runtime.spec import exec_process
from runtime.ttyexec import TtyProcess

EXEC_TIMEOUT = 60.0  # seconds a collected command may take
EXEC_MAX_OUTPUT = 1 << 20  # bytes of its output kept


@dataclass(frozen=True)
class ExecSpec:
    """A program to run inside, and as whom: the same whichever way it runs."""

    argv: Sequence[str]
    user: str = "0:0"  # UID[:GID] inside
    groups: Sequence[int] = ()  # supplementary GIDs
    env: Sequence[str] = ()  # NAME=value, over the container's own environment
    cwd: str | None = None  # None: /

    def ids(self) -> tuple[int, int]:
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)


class Execs:
    def __init__(self, runc: Runc, cgroup_parent: str, layout: Callable[[], cgroups.Layout]):
        self.runc = runc
        self.cgroup_parent = cgroup_parent
        self.layout = layout  # the host's cgroup mounts

    def run(
        self, name: str, spec: ExecSpec, input: bytes | None, timeout: float, max_output: int
    ) -> proc.Result:
        """Run and collect the output; the exit status is in the result. Bounded in time and
        output, or the program could hold a thread of ours forever or fill our memory."""
        session = self._session(name)
        return proc.run(
            # runc, while it waits, and the program: in the session cgroup
            cgroups.join_argv(session, self.runc.exec_argv(name, spec, session.exec_options)),
            input=input,
            timeout=timeout,
            max_output=max_output,
            check=False,
            fix=f"the command inside {name!r} misbehaved: see its journal",
        )

    def tty(
        self, name: str, config: Path, spec: ExecSpec, size: tuple[int, int], charged: bool
    ) -> TtyProcess:
        """Start on a new pty of the container's own devpts, of `size` (rows, columns);
        `charged`: the helper that waits for the program (and its runc) first joins the
        container's session cgroup, so the container's limits cover it."""
        process = self._process(config, spec, size)
        session = self._session(name)
        prefix = cgroups.join_argv(session, []) if charged else []
        return ttyexec.start(self.runc.base_argv(), name, process, prefix, session.exec_options)

    def spawn(
        self, name: str, config: Path, spec: ExecSpec, stdio: Sequence[int]
    ) -> subprocess.Popen[bytes]:
        """Start without a terminal on `stdio` (fds or subprocess.PIPE), runc charged. The
        command and environment reach runc as a process.json in a memfd, never on its argv,
        which every host user can read in `ps`."""
        process = self._process(config, spec, None)
        fd = os.memfd_create("hostd-process", 0)  # not CLOEXEC: runc reads it as its fd
        try:
            os.write(fd, json.dumps(process).encode())
            session = self._session(name)
            cmd = [*self.runc.base_argv(), "exec", *session.exec_options]
            cmd += ["--process", f"/proc/self/fd/{fd}", name]
            return subprocess.Popen(
                cgroups.join_argv(session, cmd),
                stdin=stdio[0],
                stdout=stdio[1],
                stderr=stdio[2],
                pass_fds=[fd],
                env=proc.child_env(),
            )
        finally:
            os.close(fd)

    def _session(self, name: str) -> cgroups.SessionCgroup:
        """The container's session cgroup (made if missing)."""
        plan = cgroups.session_plan(self.layout(), self.cgroup_parent, check_name(name))
        cgroups.apply_session(plan)
        return plan

    @staticmethod
    def _process(config: Path, spec: ExecSpec, size: tuple[int, int] | None) -> dict[str, Any]:
        return exec_process(json.loads(config.read_text()), spec, size)
