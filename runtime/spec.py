"""The OCI runtime config (config.json) of a system container, built by a pure function."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime import seccomp
from runtime.ids import IdRange
from runtime.limits import Limits

if TYPE_CHECKING:  # execs imports this module
    from runtime.execs import ExecSpec

# Every capability of kernel 6.x, by number. Inside the user namespace they only act on
# objects the namespace owns, which is what makes systemd, dockerd and `--privileged` work.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

NAMESPACES = ("user", "mount", "pid", "network", "ipc", "uts", "cgroup")

# Kernel interfaces that leak host information or act on the host: hidden or read-only even
# though the user namespace already denies most writes.
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sysrq-trigger")


@dataclass(frozen=True)
class Bind:
    source: str  # host path
    destination: str  # path inside
    options: tuple[str, ...] = ("rbind", "nosuid", "nodev")


@dataclass(frozen=True)
class ContainerSpec:
    """Everything config.json depends on; the runtime fills it from a container's state."""

    name: str
    hostname: str
    ids: IdRange
    rootfs: str  # absolute path of the prepared (mounted) root filesystem
    cgroups_path: str
    binds: tuple[Bind, ...] = ()
    limits: Limits = Limits()
    cpu_set: str | None = None  # cpuset.cpus, from Limits.cpu_set
    init: tuple[str, ...] = ("/sbin/init",)
    env: tuple[str, ...] = ("container=hostd",)
    machine: str = field(default_factory=platform.machine)  # picks the seccomp ABIs
    userns_path: str | None = None  # an existing user namespace to join (runtime.userns)


def _tmpfs(dest: str, options: tuple[str, ...]) -> dict[str, Any]:
    return {"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": list(options)}


def mounts(spec: ContainerSpec) -> list[dict[str, Any]]:
    """The mount list, in mount order."""
    fs = [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        _tmpfs("/dev", ("nosuid", "strictatime", "mode=755", "size=65536k")),
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        _tmpfs("/dev/shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            # rw: a read-only sysfs marks the net namespace's sysfs superblock read-only, and
            # the kernel then refuses the rw sysfs of an inner `docker run --privileged`.
            # Host-owned sysfs files stay unwritable from the user namespace anyway.
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "rw"],
        },
        # A stale /run (dockerd/containerd pid files) would stop the inner containerd.
        _tmpfs("/run", ("nosuid", "nodev", "mode=755", "size=20%")),
        _tmpfs("/run/lock", ("nosuid", "nodev", "noexec", "mode=1777", "size=5m")),
        _tmpfs("/tmp", ("nosuid", "nodev", "mode=1777")),
    ]
    fs += [
        {
            "destination": b.destination,
            "type": "bind",
            "source": b.source,
            "options": list(b.options),
        }
        for b in spec.binds
    ]
    return fs


def build_config(spec: ContainerSpec) -> dict[str, Any]:
    """config.json for `spec`: a pure function, so it is unit-tested without root."""
    id_map = [{"containerID": 0, "hostID": spec.ids.start, "size": spec.ids.size}]
    caps = list(CAPABILITIES)
    return {
        "ociVersion": "1.0.2",
        "hostname": spec.hostname,
        "root": {"path": spec.rootfs, "readonly": False},
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(spec.init),
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *spec.env],
            "cwd": "/",
            "capabilities": {
                k: caps for k in ("bounding", "effective", "permitted", "inheritable", "ambient")
            },
            "noNewPrivileges": False,
        },
        "mounts": mounts(spec),
        "linux": {
            "namespaces": [_namespace(t, spec) for t in NAMESPACES],
            "uidMappings": id_map,
            "gidMappings": id_map,
            "cgroupsPath": spec.cgroups_path,
            # Device access is bounded by the user namespace (no mknod of real devices, only
            # the nodes bound into /dev); the inner Docker must be free to give its containers
            # what it has, `--privileged` included, so the devices cgroup allows all.
            "resources": _resources(spec),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "seccomp": seccomp.profile(spec.machine),
        },
    }


def _namespace(kind: str, spec: ContainerSpec) -> dict[str, Any]:
    """runc makes every namespace, except a user namespace made beforehand (its mappings stay
    in the config: runc 1.1 needs them to know the container's root on the host)."""
    if kind == "user" and spec.userns_path is not None:
        return {"type": kind, "path": spec.userns_path}
    return {"type": kind}


def _resources(spec: ContainerSpec) -> dict[str, Any]:
    res: dict[str, Any] = {"devices": [{"allow": True, "access": "rwm"}]}
    res.update(spec.limits.resources())
    if spec.cpu_set is not None:
        res.setdefault("cpu", {})["cpus"] = spec.cpu_set
    return res


def exec_process(
    config: dict[str, Any], spec: ExecSpec, size: tuple[int, int] | None
) -> dict[str, Any]:
    """process.json for `runc exec --process`: the container's own process settings (its
    capabilities for root, none but the bounding set for others), with a terminal of `size`
    (rows, columns) set before the program runs, or none."""
    uid, gid = spec.ids()
    process = dict(config["process"])
    process.update(
        terminal=size is not None,
        args=list(spec.argv),
        user={"uid": uid, "gid": gid, "additionalGids": list(spec.groups)},
        env=[*process.get("env", []), *spec.env],
        cwd=spec.cwd or "/",
    )
    if uid != 0:  # as after a login: no capabilities until sudo; the bounding set allows it
        process["capabilities"] = {"bounding": process["capabilities"]["bounding"]}
    if size is not None:
        process["consoleSize"] = {"height": size[0], "width": size[1]}
    return process
