"""Chokepoint for running programs: every external command the runtime starts goes through here."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
_SERVICE_ONLY = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


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


MAX_OUTPUT = 16 << 20  # bytes of stdout + stderr kept from one program, by default


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    max_output: int = MAX_OUTPUT,
    as_user: tuple[int, int, Sequence[int]] | None = None,
    check: bool = True,
    fix: str = "see the message above",
) -> Result:
    """Run a program to completion with pipes for all stdio (never the host's /dev/null).
    A program that runs past `timeout` seconds or prints more than `max_output` bytes is
    killed: the caller's memory and time stay bounded whatever the program does.
    `as_user` (uid, gid, groups): run it as that user, in /."""
    who: dict[str, Any] = {}
    if as_user is not None:
        uid, gid, groups = as_user
        who = {"user": uid, "group": gid, "extra_groups": list(groups), "cwd": "/"}
    try:
        p = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else child_env(),
            **who,
        )
    except FileNotFoundError as exc:
        raise RuntimeFailure(
            f"{argv[0]} not found", "install it or fix the configured path"
        ) from exc
    name = " ".join(argv[:3])
    with p:
        try:
            out, err = _communicate(p, input or b"", timeout, max_output)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeFailure(f"`{name}` took longer than {timeout} s", fix) from exc
        except _OutputLimit as exc:
            raise RuntimeFailure(f"`{name}` printed more than {max_output} bytes", fix) from exc
        finally:
            if p.returncode is None:
                p.kill()
                p.wait()
    result = Result(
        tuple(argv), p.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check and result.returncode != 0:
        raise RuntimeFailure(f"{argv[0]} failed: {result.last_error_line()}", fix)
    return result


class _OutputLimit(Exception):
    pass


def _communicate(
    p: subprocess.Popen[bytes], data: bytes, timeout: float | None, limit: int
) -> tuple[bytes, bytes]:
    """Feed `data` to `p` and collect its stdout and stderr, at most `limit` bytes in all
    (_OutputLimit past it) within `timeout` seconds (subprocess.TimeoutExpired past it)."""
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    chunks: dict[int, list[bytes]] = {p.stdout.fileno(): [], p.stderr.fileno(): []}
    total, view = 0, memoryview(data)

    def left() -> float | None:
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise subprocess.TimeoutExpired(p.args, timeout or 0)
        return remaining

    with selectors.DefaultSelector() as sel:
        for f in (p.stdout, p.stderr):
            sel.register(f, selectors.EVENT_READ)
        if view:
            os.set_blocking(p.stdin.fileno(), False)
            sel.register(p.stdin, selectors.EVENT_WRITE)
        else:
            p.stdin.close()
        while sel.get_map():
            for key, _ in sel.select(left()):
                if key.fileobj is p.stdin:
                    try:
                        view = view[os.write(key.fd, view[:65536]) :]
                    except BrokenPipeError:
                        view = view[:0]
                    if not view:
                        sel.unregister(p.stdin)
                        p.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                total += len(chunk)
                if total > limit:
                    raise _OutputLimit
                chunks[key.fd].append(chunk)
    p.wait(left())
    return b"".join(chunks[p.stdout.fileno()]), b"".join(chunks[p.stderr.fileno()])
