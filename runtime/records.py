"""What the runtime records of a container, and where: `<state>/containers/<name>/`.

    meta.json            the record (image version, ID range, rootfs mode, limits, address)
    config.json          the OCI bundle's config, regenerated at every start
    rootfs/              overlay mount point (runc's root)
    lower/               ID-mapped template mount point (read-only, nosuid, nodev), or the
                         shifted copy
    data/upper, work     overlay upper and work directories
    data/docker, data/containerd   bound at /var/lib/docker and /var/lib/containerd
    data/previous/<when> upper layers set aside by rebases
    data.img             the capped data volume, mounted at data/ (when there is a disk limit)
    etc/, dev/, shares/  files, device nodes and share mount points bound into the container
    console.log          output of init; data/console.log on a capped volume
Deleting the container deletes the directory: nothing else is left behind.

The directory is mode 0710, owner root, group the range's root: only root and the container's
own root (which runc runs as when it sets the container up) can pass it. What lies below is
the container's (setuid files it made, its device nodes) and must not be reachable by host
users; the overlay itself keeps setuid working (sudo inside), which is safe only because of this.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime import fsutil
from runtime.cgroups import Usage
from runtime.errors import NotFound
from runtime.ids import IdRange
from runtime.limits import Limits
from runtime.names import check_name
from runtime.rootfs import RootfsPaths
from runtime.settings import RootfsMode
from runtime.shares import Share


@dataclass(frozen=True)
class Container:
    """What meta.json records about a container."""

    name: str
    image: str
    image_dir: str  # the image version it was created from
    ids: IdRange
    hostname: str
    rootfs_mode: RootfsMode  # IDMAPPED or COPY, as it was made
    created: str
    shares: tuple[Share, ...] = ()
    limits: Limits = Limits()  # disk: size of the data volume (data.img); None: a plain dir
    address: str | None = None  # IPv4 address on the host bridge; None: loopback only

    def to_json(self) -> str:
        data = asdict(self)
        data["ids"] = self.ids.start
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Container:
        data: dict[str, Any] = json.loads(text)
        data["ids"] = IdRange(int(data["ids"]))
        data["rootfs_mode"] = RootfsMode(data["rootfs_mode"])
        data["shares"] = tuple(Share(**s) for s in data.get("shares", ()))
        limits = data.get("limits", {})
        if "disk" in data:  # written before disk was one of the limits
            limits = {**limits, "disk": data.pop("disk")}
        data["limits"] = Limits(**limits)
        return cls(**data)


@dataclass(frozen=True)
class ContainerState:
    container: Container
    status: str  # stopped | created | running | paused
    pid: int  # host PID of init while running, else 0


@dataclass(frozen=True)
class Report:
    """What `hostctl status` shows of a container."""

    state: ContainerState
    uptime: float | None  # seconds since its init started, None when stopped
    usage: Usage | None  # None unless running
    disk: int | None  # bytes of its own storage, None if not known


@dataclass(frozen=True)
class Rebased:
    """What a rebase did."""

    old_image_dir: str
    new_image_dir: str
    set_aside: str  # the old upper layer, as the container sees it (under storage.SET_ASIDE)
    packages: tuple[str, ...]  # installed in the old root, not in the new image: to reinstall


class Records:
    """The containers' directories and their meta.json."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "containers"

    def dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def get(self, name: str) -> Container:
        try:
            return Container.from_json((self.dir(name) / "meta.json").read_text())
        except FileNotFoundError:
            raise NotFound(
                f"container {name!r} does not exist", "create it first (see `list`)"
            ) from None

    def write(self, c: Container) -> None:
        fsutil.atomic_write(self.dir(c.name) / "meta.json", c.to_json(), mode=0o600)

    def exists(self, name: str) -> bool:
        """Whether anything of container `name` is on disk, complete or not."""
        return self.dir(name).is_dir()

    def incomplete(self) -> list[str]:
        """Containers whose creation was interrupted (no meta.json): remains to delete."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not (p / "meta.json").exists())

    def all(self) -> list[Container]:
        if not self.root.is_dir():
            return []
        return [self.get(p.name) for p in sorted(self.root.iterdir()) if (p / "meta.json").exists()]


def rootfs_paths(cdir: Path) -> RootfsPaths:
    return RootfsPaths(cdir / "lower", cdir / "data/upper", cdir / "data/work", cdir / "rootfs")


def share_dir(cdir: Path, index: int) -> Path:
    return cdir / "shares" / str(index)


def console_log(cdir: Path, c: Container) -> Path:
    """Where init's output goes: root inside can write there without end, so on the
    container's own capped volume when it has one."""
    return cdir / ("data/console.log" if c.limits.disk is not None else "console.log")


def close(cdir: Path, ids: IdRange) -> None:
    """Mode 0710 root:<range's root group>: passable for root and the container's root only."""
    os.chown(cdir, 0, ids.root)
    os.chmod(cdir, 0o710)
