"""Files inside a running container, reached from the host without trusting it.

`/proc/<pid>/root/<path>` resolves the container's symlinks against the *host's* root: a
container's `/run/docker.sock -> /run/hostd/admin.sock` or `/etc/passwd -> /etc/shadow` would
lead root on the host to the host's own file. Here every path is walked with openat2's
RESOLVE_IN_ROOT from the container's root, so absolute symlinks and `..` stay inside it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

from runtime import syscalls
from runtime.errors import RuntimeFailure

# No magic links (/proc/self/fd/N, /proc/self/root) either: they jump outside any root.
_RESOLVE = syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS


@contextlib.contextmanager
def _opened(root_dir: str, path: str, flags: int, resolve: int) -> Iterator[int]:
    root = os.open(root_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = syscalls.openat2(root, path.lstrip("/"), flags, resolve)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot open {path} in the container: {os.strerror(exc.errno or 0)}",
            "check that it exists there and is a plain file or socket",
        ) from exc
    finally:
        os.close(root)
    try:
        yield fd
    finally:
        os.close(fd)


def read_file(pid: int, path: str, limit: int) -> bytes:
    """A regular file of the container's root file system, at most `limit` bytes. Mounts are
    not crossed (a container's FUSE mount over it could block the reader forever), FIFOs and
    devices are refused."""
    return read_file_under(f"/proc/{pid}/root", path, limit)


def read_file_under(root_dir: str, path: str, limit: int) -> bytes:
    """read_file() of a tree the container wrote that is not a running container's root (an
    upper layer, say): `root_dir` itself is trusted, what lies below it is not."""
    with _regular(root_dir, path) as (fd, _):
        data = os.read(fd, limit + 1)
    if len(data) > limit:
        raise RuntimeFailure(f"{path} in the container is larger than {limit} bytes", "shrink it")
    return data


def read_tail_under(root_dir: str, path: str, limit: int) -> bytes:
    """The last `limit` bytes of a file the container wrote (its console log, say), found as
    read_file_under() finds it."""
    with _regular(root_dir, path) as (fd, size):
        return os.pread(fd, limit, max(0, size - limit))


@contextlib.contextmanager
def _regular(root_dir: str, path: str) -> Iterator[tuple[int, int]]:
    """`path` under `root_dir` opened for reading, and its size; a regular file or an error."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
    with _opened(root_dir, path, flags, _RESOLVE | syscalls.RESOLVE_NO_XDEV) as fd:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RuntimeFailure(
                f"{path} in the container is not a regular file", "restore it as a plain file"
            )
        yield fd, st.st_size
