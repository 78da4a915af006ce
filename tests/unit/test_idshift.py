"""runtime.idshift: owners, ACLs and file capabilities moved from one ID range to another."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from runtime import idshift
from runtime.ids import IdRange

OLD, NEW = IdRange(200_000), IdRange(500_000)
SHIFT = idshift.Shift(OLD, NEW)
CAP_NET_RAW = 1 << 13
ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x04, 0x10, 0x20


def acl(*named: tuple[int, int]) -> bytes:
    """A posix_acl xattr value (rw for the owner, r for each named (tag, host ID) entry)."""
    entries = [(ACL_USER_OBJ, 6, 0xFFFFFFFF)]
    entries += [(tag, 4, i) for tag, i in named if tag == idshift.ACL_USER]
    entries.append((ACL_GROUP_OBJ, 4, 0xFFFFFFFF))
    entries += [(tag, 4, i) for tag, i in named if tag == idshift.ACL_GROUP]
    entries += [(ACL_MASK, 4, 0xFFFFFFFF), (ACL_OTHER, 0, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def cap_v3(root: int, effective: bool = True) -> bytes:
    return struct.pack("<IIIIII", 0x03000000 | effective, CAP_NET_RAW, 0, 0, 0, root)


def cap_v2() -> bytes:
    return struct.pack("<IIIII", 0x02000001, CAP_NET_RAW, 0, 0, 0)


def test_ids_in_the_old_range_move_and_others_stay() -> None:
    assert SHIFT(OLD.start) == NEW.start and SHIFT(OLD.end) == NEW.end
    assert SHIFT(OLD.start + 1000) == NEW.start + 1000
    assert SHIFT(0) is None and SHIFT(OLD.start - 1) is None and SHIFT(OLD.end + 1) is None
    template = idshift.Shift(None, NEW)  # an image template: host IDs 0..65535
    assert template(0) == NEW.start and template(65535) == NEW.end and template(65536) is None


def test_acl_named_entries_are_shifted_and_the_rest_kept() -> None:
    value = acl((idshift.ACL_USER, OLD.start + 1234), (idshift.ACL_GROUP, 77))
    out = idshift.shift_acl(value, SHIFT)
    assert out == acl((idshift.ACL_USER, NEW.start + 1234), (idshift.ACL_GROUP, 77))
    assert idshift.shift_acl(acl((idshift.ACL_GROUP, 5)), SHIFT) is None  # nothing to change
    assert idshift.shift_acl(acl(), SHIFT) is None
    assert idshift.shift_acl(b"\x01\x00\x00\x00", SHIFT) is None  # unknown version
    assert idshift.shift_acl(value[:-3], SHIFT) is None  # truncated


def test_v3_capability_root_moves_v2_and_strangers_are_kept() -> None:
    assert idshift.shift_capability(cap_v3(OLD.start), SHIFT) == cap_v3(NEW.start)
    assert idshift.shift_capability(cap_v3(OLD.start + 5, False), SHIFT) == cap_v3(
        NEW.start + 5, False
    )
    assert idshift.shift_capability(cap_v3(7), SHIFT) is None  # root outside: honoured nowhere
    assert idshift.shift_capability(cap_v2(), SHIFT) is None
    assert idshift.shift_capability(b"\x00" * 24, SHIFT) is None


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("chown and security.capability need root")


def test_a_tree_is_shifted_once_per_inode_with_bits_acls_and_caps(
    as_root: None, tmp_path: Path
) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    files = {
        "setuid": (0, 0, 0o4755),
        "setgid": (1000, 50, 0o2755),
        "plain": (4242, 4242, 0o644),
        "stranger-setuid": (None, None, 0o4755),  # owned outside the range
    }
    for name, (uid, gid, mode) in files.items():
        p = root / name
        p.write_text(name)
        os.chown(p, 7 if uid is None else OLD.start + uid, 7 if gid is None else OLD.start + gid)
        os.chmod(p, mode)
    os.link(root / "plain", root / "hardlink")
    (root / "sub").mkdir()
    os.chown(root / "sub", OLD.start + 1000, OLD.start + 1000)
    os.chmod(root / "sub", 0o2775)
    os.setxattr(root / "sub", "system.posix_acl_default", acl((idshift.ACL_USER, OLD.start + 9)))
    capped = root / "sub" / "capped"
    capped.write_text("")
    os.chown(capped, OLD.start, OLD.start)
    os.setxattr(capped, idshift.CAP_XATTR, cap_v3(OLD.start))
    v2 = root / "sub" / "v2"
    v2.write_text("")
    os.chown(v2, OLD.start, OLD.start)
    os.setxattr(v2, idshift.CAP_XATTR, cap_v2())
    os.setxattr(
        root / "plain", "system.posix_acl_access", acl((idshift.ACL_USER, OLD.start + 1234))
    )
    host = tmp_path / "host-file"
    host.write_text("")
    os.chown(host, 12, 12)
    os.symlink(host, root / "sub" / "link")
    os.lchown(root / "sub" / "link", OLD.start, OLD.start)
    os.chown(root, OLD.start, OLD.start)

    # root, 3 shifted files (plain once for both names), sub, capped, v2, the link; the
    # stranger's setuid bit cleared
    assert idshift.shift_tree(root, OLD, NEW) == 9

    def owner(p: Path) -> tuple[int, int, int]:
        st = os.lstat(p)
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert owner(root / "setuid") == (NEW.start, NEW.start, 0o4755)
    assert owner(root / "setgid") == (NEW.start + 1000, NEW.start + 50, 0o2755)
    assert owner(root / "hardlink") == (NEW.start + 4242, NEW.start + 4242, 0o640)  # the ACL's
    assert owner(root / "stranger-setuid") == (7, 7, 0o755)
    assert owner(root / "sub") == (NEW.start + 1000, NEW.start + 1000, 0o2775)
    assert owner(root / "sub" / "link")[:2] == (NEW.start, NEW.start)
    assert owner(host)[:2] == (12, 12)  # never followed
    assert os.getxattr(root / "plain", "system.posix_acl_access") == acl(
        (idshift.ACL_USER, NEW.start + 1234)
    )
    assert os.getxattr(root / "sub", "system.posix_acl_default") == acl(
        (idshift.ACL_USER, NEW.start + 9)
    )
    assert os.getxattr(capped, idshift.CAP_XATTR) == cap_v3(NEW.start)
    assert os.getxattr(v2, idshift.CAP_XATTR) == cap_v2()  # chown dropped it: set again
    back = idshift.shift_tree(root, NEW, OLD)  # and back: the same tree, less the stranger's bit
    assert back == 8 and owner(root / "setuid") == (OLD.start, OLD.start, 0o4755)
    assert os.getxattr(capped, idshift.CAP_XATTR) == cap_v3(OLD.start)
