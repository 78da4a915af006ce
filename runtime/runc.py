"""Driver for the runc binary: argv building and output parsing, one method per runc verb."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runtime import proc
from runtime.errors import Conflict, RuntimeFailure

if TYPE_CHECKING:  # execs imports this module
    from runtime.execs import ExecSpec


@dataclass(frozen=True)
class RuncState:
    status: str  # created | running | paused | stopped
    pid: int
    started: int = 0  # init's start time, clock ticks after boot (0 when stopped)


# init's PID and start time, and the cgroup paths, as state.json records them
_Saved = tuple[int, object, dict[str, str]]


@dataclass(frozen=True)
class Runc:
    binary: str
    root: Path  # runc's own state directory, private to this runtime
    # container: (state.json's inode, size, mtime and ctime; what it says)
    _parsed: dict[str, tuple[tuple[int, ...], _Saved]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def base_argv(self) -> list[str]:
        return self._base()

    def _base(self) -> list[str]:
        return [self.binary, "--root", str(self.root)]

    def create(self, bundle: Path, cid: str, console_log: Path) -> int:
        """`runc create`: namespaces made, init waiting for `start`; returns init's host PID.
        init inherits our stdio, so it gets a log file (never a shared file like /dev/null)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(console_log, flags, 0o600)  # never through a link planted there
        os.fchmod(fd, 0o600)  # a log from an older hostd was world-readable
        with open(fd, "wb") as log:
            done = subprocess.run(
                [*self._base(), "create", "--bundle", str(bundle), cid],
                env=proc.child_env(),
                stdout=log,
                stderr=log,
                input=b"",
                check=False,
            )
        if done.returncode != 0:
            error = _runc_error(console_log.read_text(errors="replace"))
            raise RuntimeFailure(f"runc could not start {cid}: {error}", f"see {console_log}")
        st = self.state(cid)
        if st is None or not st.pid:
            raise RuntimeFailure(f"runc created {cid} but reports no init", f"see {console_log}")
        return st.pid

    def start(self, cid: str) -> None:
        """Let the created container's init (systemd) run."""
        proc.run([*self._base(), "start", cid], fix="see the container's console.log")

    def state(self, cid: str) -> RuncState | None:
        """runc's view of the container, or None when runc does not know it: what `runc state`
        says, read as runc 1.1 derives it (libcontainer's runType and isPaused) from its
        state.json, /proc and the freezer, without starting runc (~10-20 ms a time, and every
        session and status asks)."""
        directory = f"{self.root}/{cid}"
        saved = self._saved(cid, f"{directory}/state.json")
        if saved is None:
            return None
        pid, start, cgroup_paths = saved
        started = _process_start(pid) if pid else None
        if started is None or started != start:
            return RuncState("stopped", 0)
        if _frozen(cgroup_paths):
            return RuncState("paused", pid, started)
        if os.path.exists(f"{directory}/exec.fifo"):  # removed by `runc start`
            return RuncState("created", pid, started)
        return RuncState("running", pid, started)

    def _saved(self, cid: str, path: str) -> _Saved | None:
        """What state.json says of init and the cgroups, parsed again only once runc wrote
        the file anew (it replaces it whole): it is ~16 KB of JSON, and `hostctl status`
        asks it of every tenant."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._parsed.pop(cid, None)
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = self._parsed.get(cid)
        if known is not None and known[0] == key:
            return known[1]
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            return None
        saved = (
            int(data.get("init_process_pid") or 0),
            data.get("init_process_start"),
            data.get("cgroup_paths") or {},
        )
        self._parsed[cid] = (key, saved)  # a file replaced meanwhile has another key: parsed again
        return saved

    def kill(self, cid: str, signal: int, all_processes: bool = False) -> None:
        argv = [*self._base(), "kill", *(["--all"] if all_processes else []), cid, str(signal)]
        proc.run(argv, check=False)

    def update(self, cid: str, args: Sequence[str]) -> None:
        """`runc update`: give every flag (runc sets an omitted one to 0 or empty in its saved
        config). runc writes one controller after another, and its own undo of a refusal
        midway rewrites the new values: a caller restores the old ones itself."""
        res = proc.run([*self._base(), "update", *args, cid], check=False)
        if res.returncode != 0:
            raise _update_failure(cid, _runc_error(res.stderr))

    def cpu_set(self, cid: str) -> str:
        """The CPUs the running container's cgroup allows now (its cpuset.cpus), "" if unset."""
        data = json.loads((self.root / cid / "state.json").read_bytes())
        paths = data.get("cgroup_paths") or {}
        return _read(Path(paths.get("cpuset") or paths[""], "cpuset.cpus"))

    def delete(self, cid: str) -> None:
        proc.run([*self._base(), "delete", "--force", cid], check=False)

    def exec_argv(self, cid: str, spec: ExecSpec, options: Sequence[str] = ()) -> list[str]:
        """argv of `runc exec` without a terminal: stdio and exit status pass straight through.
        `options`: more `runc exec` flags (where the program goes: `--cgroup`)."""
        cmd = [*self._base(), "exec", *options, "--user", spec.user]
        for gid in spec.groups:
            cmd += ["--additional-gids", str(gid)]
        if spec.cwd:
            cmd += ["--cwd", spec.cwd]
        for e in spec.env:
            cmd += ["--env", e]
        return [*cmd, cid, *spec.argv]


class CpusetBusy(Conflict):
    """cgroup v1 refused a smaller CPU set: cgroups below the container's (made inside, by its
    Docker) hold CPUs outside it, and a parent's set must cover its children's."""


_MEMORY_BUSY = re.compile(r"unable to set memory limit to \d+ \(current usage: (\d+)")


def _update_failure(cid: str, error: str) -> RuntimeFailure:
    """runc's refusal of new limits as what happened and what to do about it."""
    memory = _MEMORY_BUSY.search(error)
    if memory:
        used = int(memory[1]) / 2**20
        return Conflict(
            f"{cid} already uses {used:.0f} MiB of memory, more than the new limit",
            "choose a larger memory limit (the old one stays in place)",
        )
    if "cpuset.cpus" in error and "device or resource busy" in error:
        return CpusetBusy(
            f"cgroups made inside {cid} hold CPUs outside its new CPU set",
            "set the CPUs while it is stopped",
        )
    return RuntimeFailure(
        f"runc could not change the limits of {cid}: {error}",
        "check the limits asked for (the old ones stay in place)",
    )


# logrus quotes msg Go-style (\" and \\ inside), and may put more fields after it.
_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


def _process_start(pid: int) -> int | None:
    """The start time (clock ticks after boot) of a live process, None if it is gone or a
    zombie: a PID reused by another process has another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in (b"Z", b"X", b"x") else int(fields[19])


def _frozen(cgroup_paths: dict[str, str]) -> bool:
    """Whether the container's cgroup is frozen: the v1 freezer, or v2's one unified path."""
    if cgroup_paths.get("freezer"):
        return _read(f"{cgroup_paths['freezer']}/freezer.state") == "FROZEN"
    if cgroup_paths.get(""):
        return _read(f"{cgroup_paths['']}/cgroup.freeze") == "1"
    return False


def _read(path: str | Path) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _runc_error(log: str) -> str:
    """The message of runc's last error line (runc logs `level=error msg="..."`)."""
    lines = [ln for ln in log.splitlines() if ln.strip()]
    for line in reversed(lines):
        found = _MSG.search(line)
        if "level=error" in line and found:
            return re.sub(r'\\(["\\])', r"\1", found.group(1))
    return lines[-1] if lines else "no output"
