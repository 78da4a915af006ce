"""Host-wide limits hostd depends on: kernel settings raised at start, and home quotas.

Each tenant's user namespace is owned by its range's root ID (runtime.userns), so the kernel
charges the tenant's inotify instances and watches to that ID against the host's per-user
limits: those limits are each tenant's cap, which root inside cannot lift, and host root's own
share is left alone. Measured on a booted tenant of the default image (systemd, journald,
dockerd, containerd): 8 instances and 25 watches. The defaults (128 instances) leave a tenant
room for about 15 inner systemd containers; hostd raises them for heavier tenants (Docker
builds, IDE file watchers). Watches cost kernel memory charged to the tenant's memory cgroup.
Every tenant's tasks take host PIDs: hostd raises kernel.pid_max to the 64-bit ceiling.
packaging/sysctl.d/60-hostd.conf sets the same values at boot.

Headroom (for `hostctl doctor`): how many tenants memory, the state dir's file system, the
host's PIDs, the kernel's key quotas and the subordinate ID space allow, from the tenants'
quotas and what the running ones use; a warning when one would be over 80 % full.

A tenant's home is bind-mounted into its container, outside its disk volume: where the file
system holding the home enforces user quotas, `[limits] home` becomes the user's block quota.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hostd.units import human_size
from runtime import mountinfo, proc, sysctl
from runtime.limits import Limits
from runtime.mountinfo import Mount

# (key under /proc/sys, the least value hostd needs), the same as in 60-hostd.conf.
INOTIFY: tuple[tuple[str, int], ...] = (
    ("fs/inotify/max_user_instances", 1024),  # per tenant: 128 tenants' worth of idle ones
    ("fs/inotify/max_user_watches", 524288),  # per tenant; memory charged to its cgroup
)
SETTINGS = (
    *INOTIFY,
    ("kernel/pid_max", 4194304),  # the 64-bit ceiling (systemd's default): 32768 is 8 tenants
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
    """For doctor: the inotify settings now, each tenant's own cap, and what hostd raises."""
    low = []
    parts = []
    for key, minimum in INOTIFY:
        value = int(sysctl.read(key))
        parts.append(f"{sysctl.name(key)} = {value}")
        if value < minimum:
            low.append(f"{sysctl.name(key)} to {minimum}")
    key, minimum = INOTIFY[0]
    instances = max(int(sysctl.read(key)), minimum)
    text = ", ".join(parts) + (
        f" (per tenant: room for {instances // IDLE_INOTIFY_INSTANCES} systemd and Docker stacks "
        f"at {IDLE_INOTIFY_INSTANCES} instances each)"
    )
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


# -- headroom: how many tenants the host's limits allow (for `hostctl doctor`) -----------------

MiB = 2**20
# What doctor assumes an idle tenant of the default image costs where it cannot measure one:
# memory with dockerd up (issue 11 measured ~38 MB), inotify use (see above). Every container
# inside a tenant takes one session keyring from runc ("_ses." + a 64-hex ID: 70 bytes).
IDLE_MEMORY = 40 * MiB
IDLE_INOTIFY_INSTANCES = 8
KEYRING_BYTES = 70
FULL = 0.8  # warn when a limit would be this full


@dataclass(frozen=True)
class TenantLoad:
    """What doctor knows of one tenant: its quota and ID range (the state), and what it uses
    now (its cgroup; None when it is not running)."""

    user: str
    range_start: int
    quota: Limits
    memory: int | None = None
    pids: int | None = None
    volume: int = 0  # bytes of host disk its sparse volume takes


def _total(values: list[int | None]) -> tuple[int, int]:
    """Sum of the finite quotas, and how many are unlimited."""
    return sum(v for v in values if v is not None), sum(v is None for v in values)


def _unlimited(n: int) -> str:
    return f", {n} unlimited" if n else ""


def memory_headroom(
    total: int, available: int, tenants: list[TenantLoad] | None
) -> tuple[bool, str]:
    """Memory against the tenants' quotas (overcommitted on purpose: most idle) and against
    their idle cost, measured on the running ones where there are some."""
    used = [t.memory for t in tenants or [] if t.memory is not None]
    idle = sum(used) // len(used) if used else IDLE_MEMORY
    basis = f"the mean of {len(used)} running" if used else "assumed"
    text = (
        f"{human_size(available)} available of {human_size(total)}; {total // idle} tenants "
        f"fit at {human_size(idle)} each ({basis})"
    )
    if tenants is None:
        return True, f"{text}; no tenants yet"
    quotas, unlimited = _total([t.quota.memory for t in tenants])
    text += (
        f"; {len(tenants)} tenants' quotas add up to {human_size(quotas)} "
        f"({quotas / total:.1f}x{_unlimited(unlimited)})"
    )
    stopped = len(tenants) - len(used)
    left = available - stopped * idle
    if left >= total * (1 - FULL):
        return True, text
    after = f"starting the {stopped} stopped would leave" if stopped else "only"
    return False, (
        f"{text}: {after} {human_size(max(left, 0))} available: add memory, or move tenants "
        "to another host"
    )


def disk_headroom(
    where: str, size: int, free: int, tenants: list[TenantLoad] | None, default: int | None
) -> tuple[bool, str]:
    """The state dir's file system against the sparse volumes: each may grow to its quota, and
    a full file system fails every tenant's writes at once (I/O errors in their volumes)."""
    text = f"{human_size(free)} free of {human_size(size)} on {where}"
    growth = 0
    if tenants is None:
        text += "; no tenants yet"
        if default:
            text += f"; room for {free // default} full volumes of {human_size(default)}"
    else:
        quotas, unlimited = _total([t.quota.disk for t in tenants])
        taken = sum(t.volume for t in tenants)
        growth = sum(max(t.quota.disk - t.volume, 0) for t in tenants if t.quota.disk is not None)
        text += (
            f"; {len(tenants)} tenants' volumes take {human_size(taken)}, quotas add up to "
            f"{human_size(quotas)} ({quotas / max(taken + free, 1):.1f}x the space"
            f"{_unlimited(unlimited)})"
        )
    if growth > free:
        return False, (
            f"{text}: the volumes may grow by {human_size(growth)} more than is free, and a "
            "full file system fails every tenant's writes: add space, or lower disk quotas "
            "(`hostctl quota set USER --disk SIZE`)"
        )
    if free < size * (1 - FULL):
        return False, f"{text}: less than {1 - FULL:.0%} free: add space or remove data"
    return True, text


def pid_headroom(
    pid_max: int,
    threads_max: int,
    tasks: int,
    tenants: list[TenantLoad] | None,
    default: int | None,
) -> tuple[bool, str]:
    """Every task of every tenant takes a host PID and counts against threads-max: the pids
    quotas bound what one tenant can take (a fork bomb included), these bound them all."""
    raised = max(pid_max, _minimum("kernel/pid_max"))
    cap, name = min((raised, "kernel.pid_max"), (threads_max, "kernel.threads-max"))
    text = f"{name} = {cap} binds ({tasks} tasks now)"
    if raised > pid_max:
        text += f"; hostd raises kernel.pid_max from {pid_max} to {raised} when it starts"
    if tasks > cap * FULL:
        return False, f"{text}: over {FULL:.0%} used: stop tenants, or raise {name}"
    if tenants is None:
        room = f"; room for {cap // default} tenants at {default} each" if default else ""
        return True, f"{text}; no tenants yet{room}"
    quotas, unlimited = _total([t.quota.pids for t in tenants])
    text += f"; {len(tenants)} tenants' quotas add up to {quotas}{_unlimited(unlimited)}"
    if quotas <= cap:
        return True, text
    return False, (
        f"{text}: tenants at their quotas would leave the host no tasks: lower pids quotas "
        f"(`hostctl quota set USER --pids N`) or raise {name}"
    )


def _minimum(key: str) -> int:
    return dict(SETTINGS)[key]


@dataclass(frozen=True)
class KeyUse:
    """One user's line of /proc/key-users: keys and bytes held, against their quotas."""

    keys: int
    max_keys: int
    bytes: int
    max_bytes: int

    def fullness(self) -> float:
        """The larger fraction of its two quotas used."""
        return max(self.keys / max(self.max_keys, 1), self.bytes / max(self.max_bytes, 1))


def parse_key_users(text: str) -> dict[int, KeyUse]:
    """/proc/key-users: `uid: usage nkeys/nikeys qnkeys/maxkeys qnbytes/maxbytes`."""
    found = {}
    for line in text.splitlines():
        uid, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) == 4:
            keys, max_keys = fields[2].split("/")
            used, max_bytes = fields[3].split("/")
            found[int(uid)] = KeyUse(int(keys), int(max_keys), int(used), int(max_bytes))
    return found


def keys_headroom(
    max_keys: int, max_bytes: int, users: dict[int, KeyUse], tenants: list[TenantLoad] | None
) -> tuple[bool, str]:
    """A tenant's keys are charged to its range's root (not host root), against
    kernel.keys.maxkeys/maxbytes: every container inside takes a session keyring, so they
    bound how many containers each tenant can run. Host root's keys have root_maxkeys."""
    inside = min(max_keys, max_bytes // KEYRING_BYTES)
    text = (
        f"each tenant may hold {max_keys} keys, {max_bytes} bytes "
        f"(kernel.keys.maxkeys/maxbytes): about {inside} containers inside"
    )
    root = users.get(0)
    if root is not None:
        text += f"; root holds {root.keys}/{root.max_keys}"
    busy = [(t.user, users[t.range_start]) for t in tenants or [] if t.range_start in users]
    if busy:
        user, most = max(busy, key=lambda b: b[1].fullness())
        text += f"; busiest tenant {user} {most.keys}/{most.max_keys} keys, {most.bytes} bytes"
    full = [user for user, use in [*busy, ("root", root)] if use and use.fullness() > FULL]
    if not full:
        return True, text
    return False, (
        f"{text}: {', '.join(full)} over {FULL:.0%}: sysctl -w kernel.keys.maxkeys="
        f"{max(2000, 2 * max_keys)} kernel.keys.maxbytes={max(2000000, 2 * max_bytes)} (root: "
        "kernel.keys.root_maxkeys, root_maxbytes), and in /etc/sysctl.d"
    )


def free_ranges(taken: list[tuple[int, int]], lo: int, hi: int, count: int) -> int:
    """How many ranges of `count` IDs still fit in [lo, hi] between the `taken` (first, last)."""
    free, start = 0, lo
    for first, last in [*sorted(taken), (hi + 1, hi + 1)]:
        if first > start:
            free += (min(first, hi + 1) - start) // count
        start = max(start, last + 1)
    return free


def subid_headroom(
    taken: list[tuple[int, int]], lo: int, hi: int, count: int, quarantined: int
) -> tuple[bool, str]:
    """Tenants' ID ranges come from [subids] min..max: say how many more tenants fit."""
    free, size = free_ranges(taken, lo, hi, count), (hi - lo + 1) // count
    text = f"{free} of {size} ranges of {count} IDs free in {lo}-{hi}"
    if quarantined:
        text += f"; {quarantined} quarantined (`hostctl ranges release START` frees one)"
    if free >= size * (1 - FULL):
        return True, text
    return False, (
        f"{text}: raise [subids] max in hostd.toml (or SUB_UID_MAX in /etc/login.defs), or "
        "release quarantined ranges"
    )
