"""A process on a pty inside a container, started through a short-lived helper process.

runc 1.1 hands out a pty only with `exec --detach`: it sends the master over a console socket
and exits, and the program is orphaned. Only a child subreaper can then learn its exit status.
Making the caller (a daemon, a test) a subreaper would give it every orphan of every runc it
starts, so a helper (`python -m runtime.ttyexec`) takes that role: it runs runc, passes the
master and the program's PID to the caller over a socket, waits for the program and exits
with its status.
"""

from __future__ import annotations

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


class TtyProcess:
    """A program inside a container on a pty: `master` is the pty master's fd."""

    def __init__(self, helper: subprocess.Popen[bytes], master: int, pid: int) -> None:
        self._helper = helper
        self.master = master
        self.pid = pid

    @property
    def helper_pid(self) -> int:
        """PID of the helper (our child) that exits with the program."""
        return self._helper.pid

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close_master(self) -> None:
        """Drop this process's copy of the master (after handing it to someone else)."""
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def wait(self) -> int:
        """The program's exit status (128 + N when killed by signal N)."""
        status = self._helper.wait()
        self.close_master()
        return status


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


def start(runc_base: Sequence[str], cid: str, process: dict[str, Any]) -> TtyProcess:
    """Run `process` (a runc process.json) in container `cid` on a new pty."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    request = json.dumps({"runc": list(runc_base), "cid": cid, "process": process})
    with parent:
        helper = subprocess.Popen(
            [sys.executable, "-m", "runtime.ttyexec", str(child.fileno()), request],
            pass_fds=[child.fileno()],
            env=proc.child_env(),
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        child.close()
        msg, fds, _, _ = socket.recv_fds(parent, 64, 1)
    if not fds:
        _, err = helper.communicate()
        raise RuntimeFailure(
            f"cannot start a terminal session: {err.decode(errors='replace').strip()}",
            "check that the container is running and the command exists",
        )
    return TtyProcess(helper, fds[0], int(msg))


def _helper_main(sock_fd: int, request: dict[str, Any]) -> int:
    from runtime.syscalls import set_child_subreaper

    set_child_subreaper()
    with tempfile.TemporaryDirectory(prefix="hostd-tty-") as tmp:
        console, pid_file, process_file = (Path(tmp) / n for n in ("console", "pid", "process"))
        process_file.write_text(json.dumps(request["process"]))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(console))
            listener.listen(1)
            runc = subprocess.Popen(
                [*request["runc"], "exec", "--process", str(process_file), "--detach",
                 "--console-socket", str(console), "--pid-file", str(pid_file), request["cid"]],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            listener.settimeout(30)
            try:
                conn, _ = listener.accept()
                with conn:
                    _, fds, _, _ = socket.recv_fds(conn, 64, 1)
            except TimeoutError:
                fds = []
            _, err = runc.communicate()
        if runc.returncode != 0 or not fds:
            sys.stderr.write(
                err.decode(errors="replace").strip().splitlines()[-1:][0]
                if err
                else "runc sent no terminal"
            )
            return ERROR_EXIT
        pid = int(pid_file.read_text())
    with socket.socket(fileno=sock_fd) as to_caller:
        socket.send_fds(to_caller, [str(pid).encode()], fds)
    os.close(fds[0])
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(_helper_main(int(sys.argv[1]), json.loads(sys.argv[2])))
