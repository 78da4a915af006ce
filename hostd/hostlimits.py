"""Host-wide limits hostd depends on: kernel settings raised at start, and home quotas.

Each tenant's user namespace is owned by its range's root ID (runtime.userns), so the kernel
charges the tenant's inotify instances and watches to that ID against the host's per-user
limits: those limits are each tenant's cap, which root inside cannot lift, and host root's own
share is left alone. Measured on a booted tenant of the default image (systemd, journald,
dockerd, containerd): 8 instances and 25 watches. The defaults (128 instances) leave a tenant
room for about 15 inner systemd containers; hostd raises them for heavier tenants (Docker
builds, IDE file watchers). Watches cost kernel memory charged to the tenant's memory cgroup.
packaging/sysctl.d/60-hostd.conf sets the same values at boot.

A tenant's home is bind-mounted into its container, outside its disk volume: where the file
system holding the home enforces user quotas, `[limits] home` becomes the user's block quota.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hostd.units import human_size
from runtime import mountinfo, proc, sysctl
from runtime.mountinfo import Mount

# (key under /proc/sys, the least value hostd needs), the same as in 60-hostd.conf.
SETTINGS: tuple[tuple[str, int], ...] = (
    ("fs/inotify/max_user_instances", 1024),  # per tenant: 128 tenants' worth of idle ones
    ("fs/inotify/max_user_watches", 524288),  # per tenant; memory charged to its cgroup
)
# Mount options that turn on enforced user quotas (ext4: usrquota/quota/usrjquota=...;
# xfs: usrquota/uquota/quota).
_USER_QUOTA = ("usrquota", "quota", "uquota")


def raise_settings() -> list[str]:
    """Raise the kernel settings to what hostd needs (never lowering any): what changed."""
    changed = []
    for key, minimum in SETTINGS:
        before, after = sysctl.raise_to(key, minimum)
        if after != before:
            changed.append(f"raised {sysctl.name(key)} from {before} to {after}")
    return changed


def settings_report() -> str:
    """For doctor: each setting now, and what hostd will raise at start."""
    low = []
    parts = []
    for key, minimum in SETTINGS:
        value = int(sysctl.read(key))
        parts.append(f"{sysctl.name(key)} = {value}")
        if value < minimum:
            low.append(f"{sysctl.name(key)} to {minimum}")
    text = ", ".join(parts) + " (per-user: each tenant's own cap)"
    return f"{text}; hostd raises {' and '.join(low)} when it starts" if low else text


@dataclass(frozen=True)
class HomeQuota:
    """How homes under a path can be capped: the mount holding it, and whether it enforces
    user quotas."""

    mount: Mount
    enforced: bool

    def describe(self) -> str:
        m = self.mount
        if self.enforced:
            return f"enforced ({m.fstype} usrquota on {m.target})"
        return (
            f"not available: {m.target} ({m.fstype}) has no usrquota; homes are outside "
            "the tenants' disk caps"
        )


def home_quota(path: str, mounts: list[Mount] | None = None) -> HomeQuota:
    """The quota support of the file system holding `path` (its longest mount prefix)."""
    real = os.path.realpath(path)
    found = mounts if mounts is not None else mountinfo.current()
    holding = [m for m in found if real == m.target or real.startswith(m.target.rstrip("/") + "/")]
    mount = max(holding, key=lambda m: len(m.target))  # "/" always holds it
    enforced = any(opt.split("=")[0] in (*_USER_QUOTA, "usrjquota") for opt in mount.super_options)
    return HomeQuota(mount, enforced)


def setquota_argv(user: str, limit: int, mountpoint: str) -> list[str]:
    """setquota(8) for a block limit in bytes (soft = hard); inodes stay unlimited."""
    blocks = -(-limit // 1024)  # 1 KiB blocks, rounded up
    return ["setquota", "-u", user, str(blocks), str(blocks), "0", "0", mountpoint]


def apply_home_quota(user: str, home: str, limit: int) -> str:
    """Cap the user's blocks on the file system holding their home; says what was done."""
    support = home_quota(home)
    if not support.enforced:
        return f"home quota {human_size(limit)} not set: {support.describe()}"
    proc.require("setquota", "quota")
    proc.run(
        setquota_argv(user, limit, support.mount.target),
        fix=f"check `quotaon -pu {support.mount.target}`",
    )
    return f"home quota {human_size(limit)} on {support.mount.target}"
