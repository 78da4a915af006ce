"""A user's ~/.ssh/authorized_keys, read by a short-lived process running as that user.

hostd is root, and the file, the directories on the way to it and their contents belong to the
user, who can make them a FIFO, a 4 GiB sparse file, a symlink to someone else's keys or a
FUSE mount that never answers. So the reading is done by a child that has the user's IDs and
groups and no capabilities (it cannot see more than the user can), opens every component below
the home without following symlinks and without blocking (O_NONBLOCK: a FIFO does not wait for a
writer), takes only a regular file of at most MAX_SIZE bytes, and applies sshd's StrictModes to
the file, ~/.ssh and the home: owned by the user or root, not writable by group or others.
As AuthorizedKeysFile in sshd, only the one file `.ssh/authorized_keys` counts.

This module is the child's whole program (hostd.accounts.authorized_keys starts it and never
trusts what it says): it runs under the system's /usr/bin/python3 (hostd's own interpreter may
sit under /root) with this file as its script on stdin, so it imports os, stat and sys only,
which also keeps its start cheap.
"""

from __future__ import annotations

import os
import stat
import sys

MAX_SIZE = 1 << 20
KEYS_PATH = (".ssh", "authorized_keys")  # below the home; the only file that counts
# Exit statuses of the child: keys on stdout, no file (quiet), an unsafe file (reason on stdout)
FOUND, MISSING, UNSAFE = 0, 2, 3


class Unsafe(Exception):
    """A component of the path is something sshd's StrictModes would not trust."""


def _check(st: os.stat_result, what: str, uid: int) -> None:
    if st.st_uid not in (0, uid):
        raise Unsafe(f"{what} is owned by uid {st.st_uid}, not by the user or root")
    if st.st_mode & 0o022:
        raise Unsafe(f"{what} is writable by group or others (mode {st.st_mode & 0o7777:o})")


def read_keys(home: str, uid: int, limit: int = MAX_SIZE) -> bytes | None:
    """The contents of HOME/.ssh/authorized_keys if it is safe to trust, None if it is absent.

    Runs as the user (in the child). Raises Unsafe if any check fails."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(home, flags | os.O_DIRECTORY)  # admin-made path: symlinks above are fine
    except FileNotFoundError:
        return None
    try:
        _check(os.fstat(fd), "the home directory", uid)
        *dirs, name = KEYS_PATH
        for part in dirs:
            try:
                sub = os.open(part, flags | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as exc:  # ELOOP or ENOTDIR: a symlink or not a directory
                raise Unsafe(f"~/{part} cannot be opened as a directory ({exc.strerror})") from None
            os.close(fd)
            fd = sub
            _check(os.fstat(fd), f"~/{part}", uid)
        try:
            file = os.open(name, flags | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Unsafe(f"~/{'/'.join(KEYS_PATH)} cannot be opened ({exc.strerror})") from None
        os.close(fd)
        fd = file
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unsafe(f"~/{'/'.join(KEYS_PATH)} is not a regular file")
        _check(st, f"~/{'/'.join(KEYS_PATH)}", uid)
        if st.st_size > limit:
            raise Unsafe(f"~/{'/'.join(KEYS_PATH)} is larger than {limit} bytes")
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
        if len(data) > limit:
            raise Unsafe(f"~/{'/'.join(KEYS_PATH)} grew beyond {limit} bytes")
        return data
    finally:
        os.close(fd)


def _child_main(home: str) -> int:
    """In the child: keys to stdout, or why not."""
    try:
        data = read_keys(home, os.getuid())
    except Unsafe as exc:
        sys.stdout.write(str(exc))
        return UNSAFE
    except OSError as exc:
        sys.stdout.write(f"cannot read ~/{'/'.join(KEYS_PATH)} ({exc.strerror})")
        return UNSAFE
    if data is None:
        return MISSING
    sys.stdout.buffer.write(data)
    return FOUND


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
