"""Where and how the runtime runs containers. Cheap to import (stdlib and plain-data modules
only: no netlink, no runc), so that a configuration can be checked without loading the rest."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from runtime.errors import RuntimeFailure
from runtime.netplan import NetworkConfig

DEFAULT_RECIPES = Path(__file__).resolve().parent / "recipes"  # package data


class RootfsMode(StrEnum):
    """How a container's lower layer is made: the image template through an ID-mapped mount,
    or a copy with shifted owners. As a setting, `auto` tries the first and falls back."""

    AUTO = "auto"
    IDMAPPED = "idmapped"
    COPY = "copy"

    @classmethod
    def parse(cls, value: object) -> RootfsMode:
        """The mode named `value`: the one check of a mode given as text (config, CLI)."""
        if isinstance(value, str) and value in {m.value for m in cls}:
            return cls(value)
        raise RuntimeFailure(f"unknown rootfs mode {value!r}", 'use "auto", "idmapped" or "copy"')


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    recipes_dir: Path = DEFAULT_RECIPES
    cache_dir: Path = Path("/var/cache/hostd/debootstrap")
    runc: str = "runc"
    cgroup_parent: str = "hostd"
    rootfs_mode: RootfsMode = RootfsMode.AUTO
    lxcfs: Path | None = None  # lxcfs mount point: a truthful /proc inside; None: the host's
    network: NetworkConfig | None = None  # the host bridge; None: containers get only loopback
    docker_idle_stop: int = 900  # seconds the inner Docker may idle before it stops; 0: never
