"""Host directories shared into a container, with one host user's files owned by an inner user.

An ID-mapped bind maps exactly that host user and group to the inner IDs (seen through the
container's range), so files created inside land on the host owned by the host user, and
nothing else in the directory becomes writable to the container.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from runtime import mountinfo, syscalls
from runtime.errors import RuntimeFailure
from runtime.ids import IdRange
from runtime.userns import user_namespace

SHARE_ATTRS = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV


@dataclass(frozen=True)
class Share:
    source: str  # host directory
    destination: str  # path inside
    host_uid: int
    host_gid: int
    inner_uid: int
    inner_gid: int

    def maps(self, ids: IdRange) -> tuple[str, str]:
        """uid_map and gid_map of the mount's user namespace: host ID -> the inner ID's host ID."""
        return (
            f"{self.host_uid} {ids.start + self.inner_uid} 1\n",
            f"{self.host_gid} {ids.start + self.inner_gid} 1\n",
        )


def mount(share: Share, ids: IdRange, target: Path) -> None:
    """ID-mapped bind of `share.source` at `target` (kept if already mounted). The source is
    the host user's directory, which they may have replaced by a symlink to anything (another
    home, /etc): its last component is not followed, and it must be theirs."""
    if mountinfo.is_mounted(str(target)):
        return
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(share.source, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot share {share.source} into the container: not a directory ({exc.strerror})",
            f"make {share.source} a real directory (not a symlink) owned by uid {share.host_uid}",
        ) from exc
    try:
        owner = os.fstat(fd).st_uid
        if owner != share.host_uid:
            raise RuntimeFailure(
                f"cannot share {share.source} into the container: owned by uid {owner}, "
                f"not {share.host_uid}",
                f"chown {share.host_uid} {share.source}",
            )
        with user_namespace(*share.maps(ids)) as userns:
            syscalls.idmapped_bind(fd, str(target), userns, SHARE_ATTRS)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot share {share.source} into the container: {exc.strerror}",
            "the directory must exist on a file system with ID-mapped mounts (ext4, xfs, btrfs)",
        ) from exc
    finally:
        os.close(fd)
