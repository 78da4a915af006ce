"""A TCP connection made from inside a container's network namespace (a port forwarded into it).

A short-lived helper process (`python -m runtime.netconnect`) enters the namespace, connects,
and hands the connected socket back over a socketpair: the caller never changes namespace.
"""

from __future__ import annotations

import socket
import subprocess
import sys

from runtime import proc
from runtime.errors import RuntimeFailure

CONNECT_TIMEOUT = 10.0


def connect_in(netns_pid: int, host: str, port: int) -> socket.socket:
    """A socket connected to host:port as seen from inside the namespace of `netns_pid`."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent:
        helper = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime.netconnect",
                str(child.fileno()),
                str(netns_pid),
                host,
                str(port),
            ],
            pass_fds=[child.fileno()],
            env=proc.child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        child.close()
        _, fds, _, _ = socket.recv_fds(parent, 16, 1)
    _, err = helper.communicate()
    if not fds:
        raise RuntimeFailure(
            f"cannot connect to {host}:{port} inside: {err.decode(errors='replace').strip()}",
            "check that something listens there inside the container",
        )
    return socket.socket(fileno=fds[0])


def _helper_main(sock_fd: int, netns_pid: int, host: str, port: int) -> int:
    from runtime.syscalls import enter_netns

    enter_netns(netns_pid)
    try:
        conn = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        sys.stderr.write(exc.strerror or str(exc))
        return 1
    with conn, socket.socket(fileno=sock_fd) as to_caller:
        socket.send_fds(to_caller, [b"ok"], [conn.fileno()])
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
