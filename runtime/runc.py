"""Driver for the runc binary: argv building and output parsing, one method per runc verb."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime import proc
from runtime.errors import RuntimeFailure


@dataclass(frozen=True)
class RuncState:
    status: str  # created | running | paused | stopped
    pid: int


@dataclass(frozen=True)
class Runc:
    binary: str
    root: Path  # runc's own state directory, private to this runtime

    def _base(self) -> list[str]:
        return [self.binary, "--root", str(self.root)]

    def run_detached(self, bundle: Path, cid: str, console_log: Path) -> None:
        """`runc run -d`: the container's init inherits our stdio, so give it a log file."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(console_log, "wb") as log:
            done = subprocess.run(
                [*self._base(), "run", "--detach", "--bundle", str(bundle), cid],
                stdout=log,
                stderr=log,
                input=b"",
                check=False,
            )
        if done.returncode != 0:
            error = _runc_error(console_log.read_text(errors="replace"))
            raise RuntimeFailure(
                f"runc could not start {cid}: {error}",
                f"see {console_log}",
            )

    def state(self, cid: str) -> RuncState | None:
        """runc's view of the container, or None when runc does not know it."""
        res = proc.run([*self._base(), "state", cid], check=False)
        if res.returncode != 0:
            return None
        data = json.loads(res.stdout)
        return RuncState(str(data["status"]), int(data.get("pid", 0)))

    def kill(self, cid: str, signal: int, all_processes: bool = False) -> None:
        argv = [*self._base(), "kill", *(["--all"] if all_processes else []), cid, str(signal)]
        proc.run(argv, check=False)

    def delete(self, cid: str) -> None:
        proc.run([*self._base(), "delete", "--force", cid], check=False)

    def exec_argv(
        self,
        cid: str,
        argv: Sequence[str],
        *,
        user: str = "0:0",
        env: Sequence[str] = (),
        cwd: str | None = None,
        console_socket: Path | None = None,
        pid_file: Path | None = None,
    ) -> list[str]:
        """argv of `runc exec`; with a console socket the process gets a pty and runc detaches."""
        cmd = [*self._base(), "exec", "--user", user]
        if cwd:
            cmd += ["--cwd", cwd]
        for e in env:
            cmd += ["--env", e]
        if console_socket is not None:
            cmd += ["--tty", "--detach", "--console-socket", str(console_socket)]
        if pid_file is not None:
            cmd += ["--pid-file", str(pid_file)]
        return [*cmd, cid, *argv]


def _runc_error(log: str) -> str:
    """The message of runc's last error line (runc logs `level=error msg="..."`)."""
    lines = [ln for ln in log.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "level=error" in line and 'msg="' in line:
            return line.split('msg="', 1)[1].rsplit('"', 1)[0]
    return lines[-1] if lines else "no output"
