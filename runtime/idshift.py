"""Shift the owners of a file tree from one ID range to another: a shifted copy of an image
template (host IDs 0..65535 to a container's range), or a data volume imported under another
range than it was exported from.

Each inode is changed once (hardlinks), owners outside the old range are left alone (they map
to nobody inside either way), and what a chown loses or would leave wrong is put right: the
setuid/setgid bits (cleared by the kernel on chown), the POSIX ACLs' user and group IDs, and a
v3 file capability (its root ID is the host ID of the namespace root that set it; the kernel
drops the xattr on chown). No symlink is ever followed: the walk, lchown, and the xattr calls
work on the entries themselves. The tree must be one nobody else changes meanwhile (a private
mount, a directory only root reaches).
"""

from __future__ import annotations

import os
import stat
import struct

from runtime.ids import RANGE_SIZE, IdRange

ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
CAP_XATTR = "security.capability"
ACL_VERSION = 2  # posix_acl_xattr_header.a_version
ACL_USER, ACL_GROUP = 0x02, 0x08  # the entry tags carrying an ID (linux/posix_acl_xattr.h)
_ACL_ENTRY = struct.Struct("<HHI")  # e_tag, e_perm, e_id
_ACL_HEADER = struct.Struct("<I")
VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_REVISION_3 = 0x03000000  # vfs_ns_cap_data: ... then the root ID (u32)
VFS_CAP_V3_SIZE = 24
_SETID = stat.S_ISUID | stat.S_ISGID


class Shift:
    """The ID map: `old` host IDs (a range, or None for 0..65535) onto `new`'s."""

    def __init__(self, old: IdRange | None, new: IdRange) -> None:
        self.start = 0 if old is None else old.start
        self.offset = new.start - self.start

    def __call__(self, host_id: int) -> int | None:
        """The new ID of `host_id`, None when it is outside the old range (left alone)."""
        if self.start <= host_id < self.start + RANGE_SIZE:
            return host_id + self.offset
        return None


def shift_tree(root: str | os.PathLike[str], old: IdRange | None, new: IdRange) -> int:
    """Shift every owner below `root` (itself included) from `old` to `new` (None: host IDs
    0..65535, as an image template has them); the number of inodes changed."""
    shift = Shift(old, new)
    seen: set[tuple[int, int]] = set()
    changed = int(_shift(os.fspath(root), os.lstat(root), shift))
    stack = [os.fspath(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                changed += _shift(entry.path, st, shift)
    return changed


def _shift(path: str, st: os.stat_result, shift: Shift) -> bool:
    """Shift one inode; True if anything of it changed."""
    uid, gid = shift(st.st_uid), shift(st.st_gid)
    link = stat.S_ISLNK(st.st_mode)
    names = [] if link else os.listxattr(path, follow_symlinks=False)
    xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in names if _ours(n)}
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):  # setuid/setgid to an ID outside the range: not kept
        mode &= ~((stat.S_ISUID if uid is None else 0) | (stat.S_ISGID if gid is None else 0))
    rewritten = {n: v for n, v in ((n, _rewrite(n, v, shift)) for n, v in xattrs.items()) if v}
    if uid is None and gid is None and not rewritten and mode == stat.S_IMODE(st.st_mode):
        return False
    if uid is not None or gid is not None:
        os.lchown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    if link:
        return True
    for name, value in xattrs.items():  # chown dropped the capability: every one is set again
        if name == CAP_XATTR or name in rewritten:
            os.setxattr(path, name, rewritten.get(name, value), follow_symlinks=False)
    if mode & _SETID or mode != stat.S_IMODE(st.st_mode):
        os.chmod(path, mode)  # last: chown cleared the bits, and an ACL write may touch them
    return True


def _ours(name: str) -> bool:
    return name == CAP_XATTR or name in ACL_XATTRS


def _rewrite(name: str, value: bytes, shift: Shift) -> bytes | None:
    """The xattr with its IDs shifted; None when nothing in it changes (or it is not in a
    format we know: left as it is)."""
    if name == CAP_XATTR:
        return shift_capability(value, shift)
    return shift_acl(value, shift)


def shift_acl(value: bytes, shift: Shift) -> bytes | None:
    """A posix_acl xattr with the IDs of its named user and group entries shifted."""
    size = len(value) - _ACL_HEADER.size
    if size < 0 or size % _ACL_ENTRY.size or _ACL_HEADER.unpack_from(value)[0] != ACL_VERSION:
        return None
    out, changed = bytearray(value), False
    for offset in range(_ACL_HEADER.size, len(value), _ACL_ENTRY.size):
        tag, perm, host_id = _ACL_ENTRY.unpack_from(value, offset)
        new = shift(host_id) if tag in (ACL_USER, ACL_GROUP) else None
        if new is not None:
            _ACL_ENTRY.pack_into(out, offset, tag, perm, new)
            changed = True
    return bytes(out) if changed else None


def shift_capability(value: bytes, shift: Shift) -> bytes | None:
    """A v3 security.capability with its root ID shifted; None for v2 (the root of every
    namespace), a root ID outside the range (honoured nowhere inside), or anything else."""
    if len(value) != VFS_CAP_V3_SIZE:
        return None
    magic, root = struct.unpack_from("<I", value)[0], struct.unpack_from("<I", value, 20)[0]
    new = shift(root)
    if magic & VFS_CAP_REVISION_MASK != VFS_CAP_REVISION_3 or new is None:
        return None
    return value[:20] + struct.pack("<I", new)
