"""A user namespace with a given mapping, as a file descriptor: for ID-mapped mounts, and
for a container to join (so that the namespace has the owner we choose, not runc's root).

The namespace is made by a short-lived helper process (util-linux's `setpriv` and `unshare`
exec'ing a shell that waits for its stdin to close: three small execs where a Python helper
took 25-200 ms to start, twice a container start), never by the caller itself: unsharing in a
multi-threaded daemon or in preexec_fn is unsafe.

The kernel charges the namespaced counters (inotify instances and watches, user, mount, net...
namespaces) of everything inside a user namespace to its owner, level by level up to the host,
against each level's `/proc/sys/user/max_*`. Root inside may raise its own namespace's limits,
not those of the host: a namespace owned by the range's root ID (instead of runc's root) makes
the host's per-user limits a per-container cap that root inside cannot lift, and keeps one
container from using up host root's share, which every other container would need.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from runtime import proc
from runtime.errors import RuntimeFailure


@contextmanager
def user_namespace(uid_map: str, gid_map: str, owner: int | None = None) -> Iterator[int]:
    """Yield an fd of a fresh user namespace with the given /proc/PID/{uid,gid}_map contents,
    owned by host ID `owner` (uid and gid; None: ours); closed on exit."""
    helper = subprocess.Popen(
        _helper_argv(owner),
        env=proc.child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert helper.stdin is not None and helper.stdout is not None and helper.stderr is not None
    try:
        if helper.stdout.readline() != b"ready\n":
            helper.wait()
            raise RuntimeFailure(
                f"cannot create a user namespace: {helper.stderr.read().decode().strip()}",
                "enable user namespaces (sysctl user.max_user_namespaces > 0)",
            )
        for kind, content in (("uid_map", uid_map), ("gid_map", gid_map)):
            with open(f"/proc/{helper.pid}/{kind}", "w") as f:
                f.write(content)
        fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.stdin.close()
        helper.wait()
        helper.stdout.close()
        helper.stderr.close()
    try:
        yield fd
    finally:
        os.close(fd)


def _helper_argv(owner: int | None) -> list[str]:
    """The helper: take the owner's IDs (none other, no capabilities left), enter a new user
    namespace, say so, and live until stdin closes."""
    unshare = [proc.require("unshare", "util-linux"), "--user", "--"]
    wait = ["/bin/sh", "-c", "echo ready; read -r _ || :"]
    if owner is None:
        return [*unshare, *wait]
    ids = [f"--reuid={owner}", f"--regid={owner}", "--clear-groups"]
    return [proc.require("setpriv", "util-linux"), *ids, "--", *unshare, *wait]
