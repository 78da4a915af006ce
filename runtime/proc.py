"""Chokepoint for running programs: every external command the runtime starts goes through here."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from runtime.errors import RuntimeFailure


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def last_error_line(self) -> str:
        lines = [ln.strip() for ln in (self.stderr or self.stdout).splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}"


# Set by systemd for hostd itself. Inherited, they would make runc relay a container's
# sd_notify to hostd's manager (and wait for it), or hand hostd's sockets on.
_SERVICE_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                 "LISTEN_FDNAMES")  # fmt: skip


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for programs we start: ours without systemd's per-service variables."""
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_ONLY}
    env.update(extra or {})
    return env


def require(program: str, package: str) -> str:
    """Absolute path of `program`, or a failure telling which package provides it."""
    path = shutil.which(program)
    if path is None:
        raise RuntimeFailure(f"{program} not found", f"install it with `apt-get install {package}`")
    return path


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    fix: str = "see the message above",
) -> Result:
    """Run a program to completion with pipes for all stdio (never the host's /dev/null)."""
    try:
        done = subprocess.run(
            list(argv),
            input=input if input is not None else b"",
            capture_output=True,
            env=dict(env) if env is not None else child_env(),
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise RuntimeFailure(
            f"{argv[0]} not found", "install it or fix the configured path"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"`{' '.join(argv[:3])}` took longer than {timeout} s", fix) from exc
    result = Result(
        tuple(argv),
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        raise RuntimeFailure(f"{argv[0]} failed: {result.last_error_line()}", fix)
    return result
