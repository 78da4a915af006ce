"""Chokepoint for the syscalls Python lacks (mount API, namespaces, prctl), via cffi.

Every function raises OSError with the kernel's errno on failure.
"""

from __future__ import annotations

import os

from runtime._syscalls import ffi, lib


def _check(ret: int, what: str, path: str = "") -> int:
    if ret < 0:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}", path or None)
    return ret


def _enc(path: str) -> bytes:
    return os.fsencode(path)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    _check(
        lib.mount(
            _enc(source), _enc(target), _enc(fstype), flags, _enc(data) if data else ffi.NULL
        ),
        f"mount {fstype} on {target}",
        target,
    )


def umount(target: str, detach: bool = False) -> None:
    _check(lib.umount2(_enc(target), lib.MNT_DETACH if detach else 0), f"umount {target}", target)


MOUNT_ATTR_RDONLY: int = lib.MOUNT_ATTR_RDONLY
MOUNT_ATTR_NOSUID: int = lib.MOUNT_ATTR_NOSUID
MOUNT_ATTR_NODEV: int = lib.MOUNT_ATTR_NODEV
RESOLVE_IN_ROOT: int = lib.RESOLVE_IN_ROOT
RESOLVE_NO_SYMLINKS: int = lib.RESOLVE_NO_SYMLINKS
RESOLVE_NO_MAGICLINKS: int = lib.RESOLVE_NO_MAGICLINKS
RESOLVE_NO_XDEV: int = lib.RESOLVE_NO_XDEV


def idmapped_bind(source: str | int, target: str, userns_fd: int, attrs: int = 0) -> None:
    """Bind `source` (a path, or an fd opened with O_PATH) at `target` with its IDs shifted
    through the user namespace `userns_fd`, and the MOUNT_ATTR_* flags `attrs` set."""
    if isinstance(source, int):
        dfd, path, flags, name = source, b"", lib.AT_EMPTY_PATH, f"fd {source}"
    else:
        dfd, path, flags, name = -100, _enc(source), 0, source
    tree = _check(
        lib.hostd_open_tree(
            dfd, path, flags | lib.OPEN_TREE_CLONE | lib.OPEN_TREE_CLOEXEC | lib.AT_RECURSIVE
        ),
        f"open_tree {name}",
        name,
    )
    source = name
    try:
        attr = ffi.new("struct mount_attr *")
        attr.attr_set = lib.MOUNT_ATTR_IDMAP | attrs
        attr.userns_fd = userns_fd
        _check(
            lib.hostd_mount_setattr(
                tree,
                b"",
                lib.AT_EMPTY_PATH | lib.AT_RECURSIVE,
                attr,
                ffi.sizeof("struct mount_attr"),
            ),
            f"mount_setattr(MOUNT_ATTR_IDMAP) on {source}",
            source,
        )
        _check(
            lib.hostd_move_mount(tree, b"", -100, _enc(target), lib.MOVE_MOUNT_F_EMPTY_PATH),
            f"move_mount to {target}",
            target,
        )
    finally:
        os.close(tree)


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """open(2) relative to `dirfd` with RESOLVE_* restrictions on the path walk: with
    RESOLVE_IN_ROOT, `dirfd` is the root (absolute symlinks and `..` stay below it)."""
    return _check(
        lib.hostd_openat2(dirfd, _enc(path), flags | os.O_CLOEXEC, mode, resolve),
        f"open {path}",
        path,
    )


def enter_netns(pid: int) -> None:
    """Move this (single-threaded helper) process into the network namespace of `pid`."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(lib.setns(fd, lib.CLONE_NEWNET), f"setns(net of pid {pid})")
    finally:
        os.close(fd)


def set_child_subreaper() -> None:
    """Adopt orphaned descendants, so a detached `runc exec` can be waited for."""
    _check(lib.hostd_set_child_subreaper(), "prctl(PR_SET_CHILD_SUBREAPER)")


__all__ = [
    "enter_netns",
    "idmapped_bind",
    "mount",
    "openat2",
    "set_child_subreaper",
    "umount",
]
