"""A container's root filesystem: an overlay over the shared, read-only image template.

The lower layer is the template itself seen through an ID-mapped mount (files owned by 0 appear
owned by the range's root), so no per-container copy is made. Where the kernel or file system
refuses ID-mapped mounts, a one-time copy of the template with IDs shifted by the range start
is the lower layer instead.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path

from runtime import idshift, mountinfo, proc, syscalls
from runtime.errors import RuntimeFailure
from runtime.ids import IdRange
from runtime.settings import RootfsMode
from runtime.userns import user_namespace

log = logging.getLogger(__name__)

# errnos with which the kernel says "no ID-mapped mounts here"
_UNSUPPORTED = (errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP)


# The template is shared by every container of the image, and the mapping makes each
# container's root its owner: read-only, or root inside could change every container's image
# (and plant setuid-root files on the host).
TEMPLATE_ATTRS = syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV


@dataclass(frozen=True)
class RootfsPaths:
    lower: Path  # ID-mapped mount point of the template, or the shifted copy
    upper: Path
    work: Path
    merged: Path  # what runc gets as root.path


def mount(template: Path, ids: IdRange, paths: RootfsPaths, mode: RootfsMode) -> None:
    """Mount the lower layer (ID-mapped mode) and the overlay; already mounted parts are kept."""
    if mode is RootfsMode.IDMAPPED and not mountinfo.is_mounted(str(paths.lower)):
        try:
            with user_namespace(ids.map_line(), ids.map_line()) as userns:
                syscalls.idmapped_bind(str(template), str(paths.lower), userns, TEMPLATE_ATTRS)
        except OSError as exc:
            raise idmap_failure(paths.lower, exc) from exc
    if not mountinfo.is_mounted(str(paths.merged)):
        options = f"lowerdir={paths.lower},upperdir={paths.upper},workdir={paths.work}"
        try:
            syscalls.mount("overlay", str(paths.merged), "overlay", 0, options)
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot mount the overlay root filesystem at {paths.merged}: {exc.strerror}",
                "check that the kernel has overlayfs (modprobe overlay)",
            ) from exc


def idmap_failure(where: Path, exc: OSError) -> RuntimeFailure:
    return RuntimeFailure(
        f"ID-mapped mounts unsupported on {where} ({exc.strerror})",
        'upgrade the kernel to >= 5.19 or set the rootfs mode to "copy"',
    )


def idmap_unsupported(exc: BaseException) -> bool:
    cause = exc.__cause__ if isinstance(exc, RuntimeFailure) else exc
    return isinstance(cause, OSError) and cause.errno in _UNSUPPORTED


def shifted_copy(template: Path, dest: Path, ids: IdRange) -> None:
    """Copy the template to `dest` with every owner shifted into `ids` (one time, fallback)."""
    proc.run(["cp", "-a", "--reflink=auto", f"{template}/.", str(dest)], fix="free disk space")
    idshift.shift_tree(dest, None, ids)
