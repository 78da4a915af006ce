"""hostd-login: the OpenSSH login hook (sshd's `ForceCommand` for members of hostd-users).

It runs as the user who logged in and asks hostd's user socket (which knows the caller by
SO_PEERCRED) to run, in the caller's own container and as the caller's account there, what sshd
would have run: the login shell, `$SHELL -c "$SSH_ORIGINAL_COMMAND"`, or the sftp server.
hostd starts the container first if it is stopped.

It runs under the system's /usr/bin/python3, which ordinary users can execute, with the standard
library only: import nothing here beyond hostd.api, hostd.client, hostd.errors, hostd.protocol,
runtime.errors, runtime.proc and runtime.ttyexec (whose helper-process part loads
runtime.syscalls lazily).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import select
import shlex
import signal
import stat
import struct
import sys
import syslog
import termios
import threading
from pathlib import Path

from hostd.client import USER_FIXES, connect, request
from hostd.protocol import ExecArgs
from runtime.errors import NotFound, RuntimeFailure
from runtime.ttyexec import relay

DEFAULT_SOCKET = "/run/hostd/user.sock"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"  # inside the container (openssh-sftp-server)
SFTP_NAMES = ("internal-sftp", "sftp-server")
ERROR_EXIT = 255  # like ssh: the command did not run

# The account's shell inside (hostd puts SHELL from its passwd entry in the environment), run
# as sshd runs it: `-l` for a login session, `-c COMMAND` for a command.
_LOGIN_SHELL = 'exec "${SHELL:-/bin/sh}" -l'
_SHELL_COMMAND = 'exec "${SHELL:-/bin/sh}" -c "$1"'


def command_argv(original: str | None) -> list[str]:
    """What to run inside for the client's request: `original` is SSH_ORIGINAL_COMMAND,
    None for a shell session. sshd sets it to the Subsystem's command for `sftp` (and `scp`,
    which speaks sftp by default): such a request runs the sftp server inside directly, no
    shell in between (whose start-up files could write to the binary stream)."""
    if original is None:
        return ["/bin/sh", "-c", _LOGIN_SHELL, "hostd-login"]
    try:
        words = shlex.split(original)
    except ValueError:
        words = []
    if words and os.path.basename(words[0]) in SFTP_NAMES:
        return [SFTP_SERVER, *words[1:]]
    return ["/bin/sh", "-c", _SHELL_COMMAND, "hostd-login", original]


def _user_facing(exc: RuntimeFailure) -> RuntimeFailure:
    """hostd's fixes are written for admins; say what the user can do instead. On the user
    socket, what hostd cannot find is the caller as a tenant (refused at connect, where hostd
    knows only the UID, or by the request)."""
    if isinstance(exc, NotFound):
        user = f"uid {os.getuid()}"
        with contextlib.suppress(KeyError):
            user = pwd.getpwuid(os.getuid()).pw_name
        return NotFound(
            f"{user} is not a tenant", f"ask an admin to make you one (`hostctl user add {user}`)"
        )
    return exc


def _window_size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return size.lines or 24, size.columns or 80


def _tty_session(master: int) -> None:
    try:
        rows, cols = _window_size(sys.stdin.fileno())  # a resize may have come meanwhile
        _set_size(master, rows, cols)
        relay(master)
    finally:
        os.close(master)


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _exit_when_client_leaves(fd: int) -> None:
    """In the background: once sshd closes its end of our stdout (the client went away), exit,
    which closes the connection to hostd and makes it end the program inside. (sshd itself
    leaves a command without a terminal running until it writes to the closed pipe.)"""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, 0)  # only POLLERR / POLLHUP: the reading end is gone
        while True:
            for _, events in poller.poll():
                if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    os._exit(ERROR_EXIT)

    threading.Thread(target=watch, name="client-watch", daemon=True).start()


def run(socket_path: Path, original: str | None) -> int:
    """Run the session; returns the program's exit status."""
    argv = command_argv(original)
    interactive = os.isatty(sys.stdin.fileno())
    env = dict(os.environ)  # hostd keeps LANG, LC_*...
    fds: list[int] = []
    if interactive:  # sshd allocated a pty: a pty inside, relayed
        rows, cols = _window_size(sys.stdin.fileno())
        term = os.environ.get("TERM") or "xterm"
        args = ExecArgs(argv, env=env, tty=True, rows=rows, cols=cols, term=term)
    else:  # our own stdio: stdout and stderr stay apart and binary-safe (scp, sftp, docker)
        args = ExecArgs(argv, env=env)
        fds = [sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno()]

    def progress(message: str) -> None:
        if interactive:
            sys.stderr.write(f"hostd: {message}\n")
            sys.stderr.flush()

    chan = connect(socket_path, USER_FIXES)
    with chan.sock:
        if not interactive:
            _exit_when_client_leaves(sys.stdout.fileno())
        try:
            result = request(chan, "exec", args, fds, progress, on_tty=_tty_session)
        except RuntimeFailure as exc:
            raise _user_facing(exc) from None
    return int(result["exit"])


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # ^C while the container starts: no traceback
    socket_path = Path(os.environ.get("HOSTD_USER_SOCKET") or DEFAULT_SOCKET)
    try:
        return run(socket_path, os.environ.get("SSH_ORIGINAL_COMMAND"))
    except RuntimeFailure as exc:
        message = str(exc)
    except OSError as exc:
        message = f"the session failed ({exc.strerror or exc}): log in again"
    except Exception as exc:  # never a traceback for the user
        message = f"internal error ({type(exc).__name__}: {exc}): report it to an admin"
    _report(message)
    return ERROR_EXIT


def _report(message: str) -> None:
    """One line on stderr, and the same in the auth log: sshd drops the stderr of a subsystem
    (sftp, and scp by default), so there only the admin can see why a session failed."""
    try:
        sys.stderr.write(f"hostd: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass
    syslog.openlog("hostd-login", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_WARNING, f"uid {os.getuid()}: {message}")


if __name__ == "__main__":
    sys.exit(main())
