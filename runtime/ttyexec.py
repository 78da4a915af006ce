"""A process on a pty inside a container, started through a short-lived helper process.

runc 1.1 hands out a pty only with `exec --detach`: it sends the master over a console socket
and exits, and the program is orphaned. Only a child subreaper can then learn its exit status.
Making the caller (a daemon, a test) a subreaper would give it every orphan of every runc it
starts, so a helper (`python -m runtime.ttyexec`) takes that role: it runs runc, passes the
master and the program's PID to the caller over a socket, waits for the program and exits
with its status. Only the helper can reap the program, so only the helper can signal it
safely (a PID, once reaped, may be another user's process): it holds a pidfd of it and
forwards the signals its caller writes on the socket; the caller closing the socket hangs up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import tty
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime import proc
from runtime.errors import RuntimeFailure

ERROR_EXIT = 125  # the helper failed before the program ran; stderr says why
MAX_REQUEST = 1 << 20  # bytes of the request (process.json) the helper accepts


class TtyProcess:
    """A program inside a container on a pty: `master` is the pty master's fd, `pid` the
    program's host PID (for display: signals go through `signal`), `exit_fd` a pidfd of the
    helper, readable once the program has ended."""

    def __init__(
        self, helper: subprocess.Popen[bytes], control: socket.socket, master: int, pid: int
    ) -> None:
        self._helper = helper
        self._control = control
        self._control.setblocking(False)
        self.master = master
        self.pid = pid
        self.exit_fd = os.pidfd_open(helper.pid)  # our child, not yet reaped: its PID is its own

    @property
    def helper_pid(self) -> int:
        """PID of the helper (our child) that exits with the program."""
        return self._helper.pid

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, sig: int) -> None:
        """Have the helper send `sig` to the program. The helper is the program's subreaper, the
        only process that can reap it, so the pidfd it signals through is always the program's;
        a signal after the end is dropped."""
        with contextlib.suppress(OSError):  # the helper has exited, or is not reading
            self._control.send(bytes([sig]))

    def hangup(self) -> None:
        self.signal(signal.SIGHUP)

    def close_master(self) -> None:
        """Drop this process's copy of the master (after handing it to someone else)."""
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def wait(self) -> int:
        """The program's exit status (128 + N when killed by signal N)."""
        status = self._helper.wait()
        self.close()
        return status if status >= 0 else 128 - status

    def close(self) -> None:
        """Release our fds; a helper still running takes this as a hang-up."""
        self.close_master()
        self._control.close()
        if self.exit_fd >= 0:
            os.close(self.exit_fd)
            self.exit_fd = -1


def signal_pidfd(pidfd: int, sig: int) -> None:
    """Send `sig` to the process behind `pidfd`; nothing if it has ended (even when its PID
    now belongs to another process: that is what the pidfd is for)."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, sig)


def relay(master: int) -> None:
    """Connect this process's terminal (or plain stdio) to a pty master until it closes;
    window size changes follow SIGWINCH."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None

    def follow_size(*_: object) -> None:
        size = shutil.get_terminal_size()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", size.lines, size.columns, 0, 0))

    previous = signal.signal(signal.SIGWINCH, follow_size)
    if saved is not None:
        tty.setraw(stdin)
    inputs = [stdin, master]
    try:
        while True:
            ready, _, _ = select.select(inputs, [], [])
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the program and all its children closed the pty
                    break
                if not data:
                    break
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 65536)
                if data:
                    os.write(master, data)
                else:
                    inputs.remove(stdin)
    finally:
        signal.signal(signal.SIGWINCH, previous)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def start(
    runc_base: Sequence[str],
    cid: str,
    process: dict[str, Any],
    prefix: Sequence[str] = (),
    exec_options: Sequence[str] = (),
) -> TtyProcess:
    """Run `process` (a runc process.json) in container `cid` on a new pty. `prefix` wraps the
    helper (e.g. to charge it to the container's cgroup); `exec_options` are more `runc exec`
    flags. The request goes over a socket, not the helper's argv, which every user can read
    in `ps`."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    request = json.dumps(
        {"runc": list(runc_base), "options": list(exec_options), "cid": cid, "process": process}
    )
    with child:
        helper = subprocess.Popen(
            [*prefix, sys.executable, "-m", "runtime.ttyexec", str(child.fileno())],
            pass_fds=[child.fileno()],
            env=proc.child_env(),
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    try:
        parent.sendall(request.encode() + b"\0")
        msg, fds, _, _ = socket.recv_fds(parent, 64, 1)
    except OSError:
        fds = []
    if not fds:
        parent.close()
        _, err = helper.communicate()
        raise RuntimeFailure(
            f"cannot start a terminal session: {err.decode(errors='replace').strip()}",
            "check that the container is running and the command exists",
        )
    return TtyProcess(helper, parent, fds[0], int(msg))


class _Failed(Exception):
    """The helper could not start the program; the message says why."""


def _receive_request(caller: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\0"):
        chunk = caller.recv(65536)
        if not chunk or len(data) > MAX_REQUEST:
            raise _Failed("no complete request from the caller")
        data += chunk
    request: dict[str, Any] = json.loads(data[:-1])
    return request


def _run_runc(request: dict[str, Any]) -> tuple[int, int]:
    """`runc exec --detach` of the request: the program's PID and its pty master."""
    with tempfile.TemporaryDirectory(prefix="hostd-tty-") as tmp:
        console, pid_file, process_file = (Path(tmp) / n for n in ("console", "pid", "process"))
        process_file.write_text(json.dumps(request["process"]))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(console))
            listener.listen(1)
            runc = subprocess.Popen(
                [
                    *request["runc"],
                    "exec",
                    *request["options"],
                    "--process",
                    str(process_file),
                    "--detach",
                    "--console-socket",
                    str(console),
                    "--pid-file",
                    str(pid_file),
                    request["cid"],
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            listener.settimeout(30)
            try:
                conn, _ = listener.accept()
                with conn:
                    _, fds, _, _ = socket.recv_fds(conn, 64, 1)
            except TimeoutError:
                fds = []
            _, err = runc.communicate()
        if runc.returncode != 0 or not fds:
            lines = err.decode(errors="replace").strip().splitlines()
            raise _Failed(lines[-1] if lines else "runc sent no terminal")
        return int(pid_file.read_text()), fds[0]


def forward_signals(caller: socket.socket, pidfd: int) -> None:
    """Until the program behind `pidfd` ends: each byte from the caller is a signal for it;
    the caller's end of the socket (done, or gone) is a hang-up."""
    inputs = [caller.fileno(), pidfd]
    while pidfd not in select.select(inputs, [], [])[0]:
        try:
            data = caller.recv(64)
        except OSError:
            data = b""
        if not data:
            signal_pidfd(pidfd, signal.SIGHUP)
            inputs.remove(caller.fileno())
        for sig in data:
            if sig in signal.valid_signals():
                signal_pidfd(pidfd, sig)


def _helper_main(sock_fd: int) -> int:
    from runtime.syscalls import set_child_subreaper

    set_child_subreaper()
    with socket.socket(fileno=sock_fd) as caller:
        try:
            pid, master = _run_runc(_receive_request(caller))
        except _Failed as exc:
            sys.stderr.write(str(exc))
            return ERROR_EXIT
        # We are its subreaper since runc left: no one else can reap it, so the PID is its own.
        pidfd = os.pidfd_open(pid)
        with contextlib.suppress(OSError):  # if the caller is gone, forward_signals hangs up
            socket.send_fds(caller, [str(pid).encode()], [master])
        os.close(master)  # the caller's copy is the terminal's only holder outside the container
        forward_signals(caller, pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(_helper_main(int(sys.argv[1])))
