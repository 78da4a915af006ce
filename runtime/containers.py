"""The lifecycle API of system containers: create, start, stop, kill, delete, state, exec.

All of a container's state lives in one directory, `<state>/containers/<name>/`:
    meta.json            what it is (image version, ID range, rootfs mode)
    config.json          the OCI bundle's config, regenerated at every start
    rootfs/              overlay mount point (runc's root)
    lower/               ID-mapped template mount point (read-only, nosuid, nodev), or the
                         shifted copy
    data/upper, work     overlay upper and work directories
    data/docker, data/containerd   bound at /var/lib/docker and /var/lib/containerd (no
                         nosuid/nodev: BuildKit must be free to remount them)
    data/previous/<when> upper layers set aside by rebases, bound at SET_ASIDE inside
    etc/hostname, etc/hosts        bound over the image's
    dev/fuse, dev/net-tun          device nodes usable by the container's root
    console.log          output of init (systemd); data/console.log on a capped volume,
                         where what root inside writes to it counts against the tenant's disk
Deleting the container deletes the directory: nothing else is left behind.

The directory is mode 0710, owner root, group the range's root: only root and the container's
own root (which runc runs as when it sets the container up) can pass it. What lies below is
the tenant's (setuid files it made, its device nodes) and must not be reachable by host users;
the overlay itself keeps setuid working (sudo inside), which is safe only because of this.
The template is ID-mapped read-only, nosuid and nodev: the container's root, which the
mapping makes root of the template, cannot write to the image every tenant shares.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import select
import signal
import stat
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from runtime import (
    cgroups,
    fsutil,
    inside,
    lxcfs,
    mountinfo,
    network,
    proc,
    rootfs,
    shares,
    ttyexec,
    volume,
)
from runtime.errors import RuntimeFailure
from runtime.ids import IdRange
from runtime.images import ImageStore
from runtime.limits import Limits
from runtime.names import check_name, hostname_for
from runtime.network import NetworkConfig
from runtime.runc import Runc
from runtime.shares import Share
from runtime.spec import Bind, ContainerSpec, build_config, exec_process
from runtime.ttyexec import TtyProcess
from runtime.userns import user_namespace

log = logging.getLogger(__name__)
_LXCFS_LOCK = threading.Lock()  # one lxcfs per host, started by whichever start comes first

EXEC_TIMEOUT = 60.0  # seconds a command hostd runs inside may take
EXEC_MAX_OUTPUT = 1 << 20  # bytes of its output hostd keeps
SYSTEMD_HALT = int(signal.SIGRTMIN) + 3  # what `systemctl halt` amounts to for PID 1
DEFAULT_RECIPES = Path(__file__).resolve().parent.parent / "packaging" / "images"
SET_ASIDE = "/var/backups/hostd-rebase"  # where a container sees the upper layers rebases set aside
DPKG_STATUS_MAX = 32 << 20  # bytes of a set-aside dpkg status file hostd reads
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]*")  # Debian policy 5.6.1

# Character devices the container's root may open, besides runc's defaults (null, zero, full,
# random, urandom, tty). Our own nodes, owned by the container's root: the host's are 0600.
DEVICES = {"fuse": (10, 229, "/dev/fuse"), "net-tun": (10, 200, "/dev/net/tun")}


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    recipes_dir: Path = DEFAULT_RECIPES
    cache_dir: Path = Path("/var/cache/hostd/debootstrap")
    runc: str = "runc"
    cgroup_parent: str = "hostd"
    rootfs_mode: str = "auto"  # auto | idmapped | copy
    lxcfs: Path | None = None  # lxcfs mount point: a truthful /proc inside; None: the host's
    network: NetworkConfig | None = None  # the host bridge; None: containers get only loopback


@dataclass(frozen=True)
class Container:
    """What meta.json records about a container."""

    name: str
    image: str
    image_dir: str  # the image version it was created from
    ids: IdRange
    hostname: str
    rootfs_mode: rootfs.RootfsMode
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
        data["rootfs_mode"] = rootfs.RootfsMode(data["rootfs_mode"])
        data["shares"] = tuple(Share(**s) for s in data.get("shares", ()))
        limits = data.get("limits", {})
        if "disk" in data:  # written before disk was one of the limits
            limits = {**limits, "disk": data.pop("disk")}
        data["limits"] = Limits(**limits)
        return cls(**data)


@dataclass(frozen=True)
class Rebased:
    """What a rebase did."""

    old_image_dir: str
    new_image_dir: str
    set_aside: str  # the old upper layer, as the container sees it (under SET_ASIDE)
    packages: tuple[str, ...]  # installed in the old root, not in the new image: to reinstall


@dataclass(frozen=True)
class ContainerState:
    container: Container
    status: str  # stopped | created | running | paused
    pid: int  # host PID of init while running, else 0


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir
        self.images = ImageStore(
            settings.state_dir / "images", settings.recipes_dir, settings.cache_dir
        )
        self.runc = Runc(settings.runc, settings.state_dir / "runc")
        if settings.rootfs_mode not in ("auto", "idmapped", "copy"):
            raise RuntimeFailure(
                f"unknown rootfs mode {settings.rootfs_mode!r}", 'use "auto", "idmapped" or "copy"'
            )

    # -- paths and records -----------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.state_dir / "containers" / check_name(name)

    def _share_dir(self, name: str, index: int) -> Path:
        return self._dir(name) / "shares" / str(index)

    def _paths(self, name: str) -> rootfs.RootfsPaths:
        return _rootfs_paths(self._dir(name))

    def get(self, name: str) -> Container:
        try:
            return Container.from_json((self._dir(name) / "meta.json").read_text())
        except FileNotFoundError:
            raise RuntimeFailure(
                f"container {name!r} does not exist", "create it first (see `list`)"
            ) from None

    def exists(self, name: str) -> bool:
        """Whether anything of container `name` is on disk, complete or not."""
        return self._dir(name).is_dir()

    def incomplete(self) -> list[str]:
        """Containers whose creation was interrupted (no meta.json): remains to delete."""
        root = self.state_dir / "containers"
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if not (p / "meta.json").exists())

    def containers(self) -> list[Container]:
        root = self.state_dir / "containers"
        if not root.is_dir():
            return []
        return [self.get(p.name) for p in sorted(root.iterdir()) if (p / "meta.json").exists()]

    def close_dirs(self) -> None:
        """Give every container directory its mode (0711 before hostd 0.2), running ones too."""
        for c in self.containers():
            _close(self._dir(c.name), c.ids)

    def console_log(self, c: Container) -> Path:
        """Where init's output goes: root inside can write there without end, so on the
        tenant's own capped volume when it has one."""
        return self._dir(c.name) / (
            "data/console.log" if c.limits.disk is not None else "console.log"
        )

    def _cgroup_plan(self, c: Container) -> cgroups.CgroupPlan:
        layout = cgroups.detect(mountinfo.current())
        return cgroups.plan(layout, self.settings.cgroup_parent, c.name, c.ids.root)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise changes across processes (range checks, directory creation)."""
        prepare_state_dir(self.state_dir)
        with open(self.state_dir / "lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # -- checks ----------------------------------------------------------------------------

    def check_host(self) -> None:
        """Fail early, with the fix, when runc or a kernel feature is missing."""
        proc.require(self.settings.runc, "runc")
        if not os.path.exists("/proc/self/ns/user"):
            raise RuntimeFailure(
                "the kernel has no user namespaces", "use a kernel built with CONFIG_USER_NS=y"
            )
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                raise RuntimeFailure(
                    "user namespaces are disabled", "run `sysctl -w user.max_user_namespaces=15000`"
                )
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read().split():
                raise RuntimeFailure(
                    "the kernel has no overlay file system", "run `modprobe overlay`"
                )

    # -- create ----------------------------------------------------------------------------

    def create(
        self,
        name: str,
        image: str,
        ids: IdRange,
        hostname: str | None = None,
        shares: Sequence[Share] = (),
        limits: Limits | None = None,
        address: IPv4Address | None = None,
    ) -> Container:
        """Prepare a container (storage, root filesystem, bundle); transactional."""
        check_name(name)
        self.check_host()
        with self._locked():
            cdir = self._dir(name)
            if cdir.exists():
                raise RuntimeFailure(
                    f"container {name!r} already exists", "delete it first or pick another name"
                )
            if address is not None:
                if self.settings.network is None:
                    raise RuntimeFailure("an address needs a network", "configure the bridge")
                self.settings.network.check_tenant_address(address)
            for other in self.containers():
                if other.ids.overlaps(ids):
                    raise RuntimeFailure(
                        f"ID range {ids} overlaps {other.ids} of container {other.name!r}",
                        "give each container its own range",
                    )
                if address is not None and other.address == str(address):
                    raise RuntimeFailure(
                        f"address {address} belongs to container {other.name!r}",
                        "give each container its own address",
                    )
            image_dir = self.images.resolve(image)
            with _Undo() as undo:
                (self.state_dir / "containers").mkdir(mode=0o711, parents=True, exist_ok=True)
                cdir.mkdir(mode=0o700)
                undo.push(fsutil.remove_tree, cdir)
                _close(cdir, ids)
                limits = limits or Limits()
                mode = self._prepare_storage(cdir, image_dir / "rootfs", ids, limits.disk)
                c = Container(
                    name=name,
                    image=image,
                    image_dir=str(image_dir),
                    ids=ids,
                    hostname=hostname or hostname_for(name),
                    rootfs_mode=mode,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    shares=tuple(shares),
                    limits=limits,
                    address=None if address is None else str(address),
                )
                self._write_etc(c)
                fsutil.atomic_write(cdir / "meta.json", c.to_json(), mode=0o600)
            return c

    def _prepare_storage(
        self, cdir: Path, template: Path, ids: IdRange, disk: int | None
    ) -> rootfs.RootfsMode:
        (cdir / "data").mkdir(mode=0o711)
        if disk is not None:  # everything writable of the container goes on the capped volume
            volume.create(cdir / "data.img", disk)
            volume.mount(cdir / "data.img", cdir / "data")
            os.chmod(cdir / "data", 0o711)
        for sub in ("rootfs", "lower", "data/work", "etc", "dev"):
            (cdir / sub).mkdir(mode=0o700 if sub == "lower" else 0o711)
        for sub in ("data/upper", "data/docker", "data/containerd"):
            (cdir / sub).mkdir(mode=0o755 if sub == "data/upper" else 0o710)
            os.chown(cdir / sub, ids.root, ids.root)
        for node, (major, minor, _) in DEVICES.items():
            os.mknod(cdir / "dev" / node, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chown(cdir / "dev" / node, ids.root, ids.root)
            os.chmod(cdir / "dev" / node, 0o666)  # mknod applied the umask
        paths = _rootfs_paths(cdir)
        wanted = self.settings.rootfs_mode
        if wanted in ("auto", "idmapped"):
            try:
                rootfs.mount(template, ids, paths, rootfs.RootfsMode.IDMAPPED)
                return rootfs.RootfsMode.IDMAPPED
            except RuntimeFailure as exc:
                fsutil.unmount_all(cdir)
                if wanted == "idmapped" or not rootfs.idmap_unsupported(exc):
                    raise
                log.warning("%s; falling back to a shifted copy of the image", exc.cause)
        rootfs.shifted_copy(template, paths.lower, ids)
        rootfs.mount(template, ids, paths, rootfs.RootfsMode.COPY)
        return rootfs.RootfsMode.COPY

    def _write_etc(self, c: Container) -> None:
        """hostname and hosts, bound into the container so `sudo` can resolve its own name."""
        etc = self._dir(c.name) / "etc"
        hosts = (
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{c.hostname}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
        )
        files = [("hostname", c.hostname + "\n"), ("hosts", hosts)]
        if c.address is not None:
            files.append(("resolv.conf", network.resolv_conf(self.network_config())))
        for fname, text in files:
            fsutil.atomic_write(etc / fname, text)
            os.chown(etc / fname, c.ids.root, c.ids.root)

    # -- start / stop ----------------------------------------------------------------------

    def spec(self, c: Container) -> ContainerSpec:
        cdir = self._dir(c.name)
        # The inner Docker's data is a plain file system, as on a host: setuid programs work in
        # inner containers whatever the storage driver, and nothing is locked (see volume.py).
        binds = [
            Bind(str(cdir / "data/docker"), "/var/lib/docker", ("rbind",)),
            Bind(str(cdir / "data/containerd"), "/var/lib/containerd", ("rbind",)),
            Bind(str(cdir / "etc/hostname"), "/etc/hostname", ("bind", "nosuid", "nodev")),
            Bind(str(cdir / "etc/hosts"), "/etc/hosts", ("bind", "nosuid", "nodev")),
        ]
        if c.address is not None:
            binds.append(
                Bind(str(cdir / "etc/resolv.conf"), "/etc/resolv.conf", ("bind", "nosuid", "nodev"))
            )
        if (cdir / "data/previous").is_dir():  # writable: the tenant deletes it when done
            binds.append(Bind(str(cdir / "data/previous"), SET_ASIDE, ("bind", "nosuid", "nodev")))
        binds += [
            Bind(str(cdir / "dev" / node), dest, ("bind", "nosuid"))
            for node, (_, _, dest) in DEVICES.items()
        ]
        binds += [
            Bind(str(self._share_dir(c.name, i)), share.destination, ("rbind", "nosuid", "nodev"))
            for i, share in enumerate(c.shares)
        ]
        if self.settings.lxcfs is not None:
            binds += lxcfs.binds(self.settings.lxcfs)
        return ContainerSpec(
            name=c.name,
            hostname=c.hostname,
            ids=c.ids,
            rootfs=str(cdir / "rootfs"),
            cgroups_path=self._cgroup_plan(c).runc_path,
            binds=tuple(binds),
            limits=c.limits,
            cpu_set=self._cpu_set(c.name, c.limits),
        )

    def start(self, name: str) -> ContainerState:
        c = self.get(name)
        self.check_host()
        with self._locked():
            current = self.runc.state(name)
            if current is not None and current.status in ("running", "paused", "created"):
                raise RuntimeFailure(
                    f"container {name!r} is already {current.status}", "stop it first"
                )
            if current is not None:
                self.runc.delete(name)
            cdir = self._dir(name)
            _close(cdir, c.ids)  # made open (0711) by hostd before 0.2
            plan = self._cgroup_plan(c)
            with _Undo() as undo:
                undo.push(self._unmount, c)
                if c.limits.disk is not None:
                    self._mount_volume(c)
                rootfs.mount(Path(c.image_dir) / "rootfs", c.ids, self._paths(name), c.rootfs_mode)
                for i, share in enumerate(c.shares):
                    shares.mount(share, c.ids, self._share_dir(name, i))
                self._write_etc(c)
                if self.settings.lxcfs is not None:
                    with _LXCFS_LOCK:
                        lxcfs.ensure_running(self.settings.lxcfs)
                cgroups.apply(plan)
                undo.push(cgroups.remove, plan)
                undo.push(self.runc.delete, name)
                pid = self._create(c)
                if c.address is not None:  # before init runs, so it boots with its network
                    undo.push(network.detach, name)
                    network.attach(self.network_config(), name, IPv4Address(c.address), pid)
                self.runc.start(name)
        return self.state(name)

    def _create(self, c: Container) -> int:
        """`runc create` in a user namespace owned by the range's root, not by host root: the
        kernel then charges the container's inotify instances, namespaces... to that ID
        against the host's per-user limits, a cap root inside cannot lift (see runtime.userns).
        """
        cdir = self._dir(c.name)
        with user_namespace(c.ids.map_line(), c.ids.map_line(), owner=c.ids.root) as userns:
            spec = replace(self.spec(c), userns_path=f"/proc/{os.getpid()}/fd/{userns}")
            config = json.dumps(build_config(spec), indent=1)
            fsutil.atomic_write(cdir / "config.json", config, mode=0o600)
            return self.runc.create(cdir, c.name, self.console_log(c))

    def stop(self, name: str, timeout: float = 30.0) -> None:
        """Ask systemd to halt; kill everything if it has not within `timeout` seconds
        (at once with timeout 0)."""
        c = self.get(name)
        st = self.runc.state(name)
        if st is not None and st.status in ("running", "paused", "created") and st.pid:
            with _pidfd(st.pid) as pidfd:
                if pidfd is not None:
                    halted = False
                    if timeout > 0:
                        self.runc.kill(name, SYSTEMD_HALT)
                        halted = _wait_readable(pidfd, timeout)
                        if not halted:
                            log.warning("%s did not halt within %s s: killing it", name, timeout)
                    if not halted:
                        self.runc.kill(name, signal.SIGKILL, all_processes=True)
                        _wait_readable(pidfd, 10.0)
        self._release(c)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.get(name)
        self.runc.kill(name, sig, all_processes=sig == signal.SIGKILL)

    def set_limits(self, name: str, limits: Limits) -> dict[str, bool]:
        """Record new limits and apply them to the running container where possible: for
        each limit that changed, whether it took effect now (else at the next start)."""
        c = self.get(name)
        changed = [
            f.name for f in fields(Limits) if getattr(limits, f.name) != getattr(c.limits, f.name)
        ]
        live = {"disk": self._resize(c, limits.disk)} if "disk" in changed else {}
        with self._locked():
            c = replace(self.get(name), limits=limits)
            fsutil.atomic_write(self._dir(name) / "meta.json", c.to_json(), mode=0o600)
        cgroup = [key for key in changed if key != "disk"]
        if cgroup:
            running = self.state(name).status == "running"
            if running:
                update = [*limits.runc_update_args(), "--cpuset-cpus", self._cpu_set(name, limits)]
                self.runc.update(name, update)
            live.update(dict.fromkeys(cgroup, running))
        return live

    @staticmethod
    def _cpu_set(name: str, limits: Limits) -> str:
        return limits.cpu_set(os.cpu_count() or 1, zlib.crc32(name.encode()))

    def usage(self, name: str) -> cgroups.Usage | None:
        """Memory, CPU time and tasks used now (None when not running)."""
        c = self.get(name)
        if self.state(name).status != "running":
            return None
        layout = cgroups.detect(mountinfo.current())
        return cgroups.usage(layout, self.settings.cgroup_parent, c.name)

    def disk_used(self, name: str) -> int:
        """Bytes of the container's own storage (upper layer, Docker data, shifted copy)."""
        cdir = self._dir(name)
        if self.get(name).limits.disk is not None and mountinfo.is_mounted(str(cdir / "data")):
            return volume.usage(cdir / "data")[0]
        return sum(
            fsutil.disk_usage(cdir / sub)
            for sub in ("data", "lower")
            if not mountinfo.is_mounted(str(cdir / sub))
        )

    def _release(self, c: Container) -> None:
        """Drop everything a stopped container holds: runc state, cgroups, mounts."""
        with self._locked():
            self.runc.delete(c.name)
            if c.address is not None:
                network.detach(c.name)
            cgroups.remove(self._cgroup_plan(c))
            self._unmount(c)

    def network_config(self) -> NetworkConfig:
        if self.settings.network is None:
            raise RuntimeFailure(
                "containers have addresses but no network is configured", "configure the bridge"
            )
        return self.settings.network

    def ensure_attached(self, name: str) -> bool:
        """Re-attach a running container whose veth is gone or off the bridge (after the
        bridge was re-created, say). True when it had to."""
        c, st = self.get(name), self.state(name)
        if c.address is None or st.status != "running":
            return False
        cfg = self.network_config()
        if network.attached(cfg, name):
            return False
        network.attach(cfg, name, IPv4Address(c.address), st.pid)
        return True

    def setup_network(self, grants: Sequence[network.PortGrant] = ()) -> bool:
        """Bridge, sysctls and nft rules of the host, with these port grants (idempotent).
        True when the bridge had to be created."""
        return network.setup_host(self.network_config(), grants)

    def _unmount(self, c: Container) -> None:
        cdir = self._dir(c.name)
        fsutil.unmount_all(cdir)
        if c.limits.disk is not None:
            volume.unmount(cdir / "data")  # waits until the loop device is released

    def _mount_volume(self, c: Container) -> None:
        """Mount the data volume, first growing or shrinking it to a size changed while the
        container ran (the kernel may not allow it live)."""
        assert c.limits.disk is not None
        image, data = self._dir(c.name) / "data.img", self._dir(c.name) / "data"
        if not mountinfo.is_mounted(str(data)) and image.stat().st_size != c.limits.disk:
            volume.resize(image, data, c.limits.disk)
        volume.mount(image, data)

    def _resize(self, c: Container, size: int | None) -> bool:
        """Change the data volume's size; True when it took effect on the running container.
        Growing is live where the kernel allows it (CAP_SYS_RESOURCE); shrinking needs the
        container stopped."""
        if c.limits.disk is None or size is None:
            raise RuntimeFailure(
                f"container {c.name!r} has no capped volume or lost it",
                "recreate it with a disk size",
            )
        size = volume.check_size(size)
        running = self.state(c.name).status != "stopped"
        if running and size < c.limits.disk:
            raise RuntimeFailure(
                f"lowering the disk of {c.name!r} needs it stopped",
                "stop it, then set the size again",
            )
        cdir = self._dir(c.name)
        live = running and volume.can_grow_live()
        if not running or live:
            live = volume.resize(cdir / "data.img", cdir / "data", size) and running
        return live

    def rebase(self, name: str, image: str) -> Rebased | None:
        """Move a stopped container to the current version of `image`; None if already there.
        Its volume (Docker's data) stays. Its upper layer cannot stay over a new lower (its
        copies of the dpkg status, of /etc files... would hide the new image's): it is set
        aside whole on the volume, where the container sees it under SET_ASIDE. A shifted copy
        is redone from the new template. Transactional: a failure leaves the old image."""
        with self._locked():
            c = self.get(name)
            target = self.images.resolve(image)
            if c.image == image and Path(c.image_dir) == target:
                return None
            st = self.runc.state(name)
            if st is not None and st.status != "stopped":
                raise RuntimeFailure(f"container {name!r} is {st.status}", "stop it first")
            cdir = self._dir(name)
            copy = c.rootfs_mode is rootfs.RootfsMode.COPY
            shipped = {p.split()[0] for p in self.images.manifest(target).packages}
            self._unmount(c)  # nothing of the old root stays mounted over what moves
            try:
                if c.limits.disk is not None:
                    self._mount_volume(c)
                with _Undo() as undo:
                    if copy:
                        fsutil.remove_tree(cdir / "lower.new")  # from an interrupted rebase
                        (cdir / "lower.new").mkdir(mode=0o700)
                        undo.push(fsutil.remove_tree, cdir / "lower.new")
                        rootfs.shifted_copy(target / "rootfs", cdir / "lower.new", c.ids)
                    aside = _set_aside(cdir, c.ids, undo)
                    if copy:
                        _swap(cdir / "lower", cdir / "lower.old", undo)
                        _swap(cdir / "lower.new", cdir / "lower", undo)
                    new = replace(c, image=image, image_dir=str(target))
                    fsutil.atomic_write(cdir / "meta.json", new.to_json(), mode=0o600)
                packages = tuple(sorted(_dpkg_installed_in(aside) - shipped))
            finally:
                self._unmount(c)
            if copy:
                fsutil.remove_tree(cdir / "lower.old")
        log.info("%s rebased from %s to %s", name, c.image_dir, target)
        return Rebased(c.image_dir, str(target), f"{SET_ASIDE}/{aside.name}", packages)

    def prune_images(self) -> list[str]:
        """Delete the image versions no container uses any more (nor current); their names."""
        with self._locked():
            return self.images.prune([Path(c.image_dir) for c in self.containers()])

    def delete(self, name: str, force: bool = False) -> None:
        """Delete a container and all its data; also the remains of one whose creation was
        interrupted (a crash before its meta.json was written)."""
        cdir = self._dir(name)
        if cdir.is_dir() and not (cdir / "meta.json").exists():
            with self._locked():
                self.runc.delete(name)
                fsutil.remove_tree(cdir)
            return
        c = self.get(name)
        st = self.state(name)
        if st.status != "stopped":
            if not force:
                raise RuntimeFailure(
                    f"container {name!r} is {st.status}", "stop it first, or delete with force"
                )
            self.stop(name, timeout=0)
        self._release(c)
        with self._locked():
            fsutil.remove_tree(self._dir(name))

    # -- queries ---------------------------------------------------------------------------

    def state(self, name: str) -> ContainerState:
        c = self.get(name)
        st = self.runc.state(name)
        if st is None:
            return ContainerState(c, "stopped", 0)
        return ContainerState(c, st.status, st.pid if st.status != "stopped" else 0)

    def states(self) -> list[ContainerState]:
        return [self.state(c.name) for c in self.containers()]

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        """Return once systemd finished booting (`running`) and the inner dockerd answers."""
        deadline = time.monotonic() + timeout
        while True:  # until systemd's private socket exists, systemctl cannot ask it
            left = max(deadline - time.monotonic(), 1.0)
            res = self.exec(name, ["systemctl", "is-system-running", "--wait"], timeout=left)
            status = res.stdout.strip()
            if status or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # poll interval; the deadline bounds the wait
        if status != "running":
            failed = self.exec(name, ["systemctl", "--failed", "--no-legend", "--plain"]).stdout
            units = ", ".join(line.split()[0] for line in failed.splitlines() if line.strip())
            raise RuntimeFailure(
                f"container {name!r} booted {status or 'nothing'}"
                + (f" (failed units: {units})" if units else ""),
                f"see `journalctl` inside, or {self.console_log(self.get(name))}",
            )
        pid = self.state(name).pid
        while not _docker_ping(pid):
            if time.monotonic() > deadline:
                raise RuntimeFailure(
                    f"the Docker daemon in {name!r} did not answer",
                    "see `journalctl -u docker` inside",
                )
            time.sleep(0.05)  # poll interval; the deadline above bounds the wait

    # -- exec ------------------------------------------------------------------------------

    def exec_argv(
        self,
        name: str,
        argv: Sequence[str],
        *,
        user: str = "0:0",
        groups: Sequence[int] = (),
        env: Sequence[str] = (),
        cwd: str | None = None,
    ) -> list[str]:
        """argv that runs `argv` inside without a terminal, for callers spawning it themselves."""
        return self.runc.exec_argv(name, argv, user=user, groups=groups, env=env, cwd=cwd)

    def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        user: str = "0:0",
        groups: Sequence[int] = (),
        env: Sequence[str] = (),
        cwd: str | None = None,
        input: bytes | None = None,
        timeout: float = EXEC_TIMEOUT,
        max_output: int = EXEC_MAX_OUTPUT,
    ) -> proc.Result:
        """Run `argv` inside and collect its output; the exit status is in the result. What
        runs inside is the tenant's: bounded in time and output, or it could hold a thread of
        ours forever or fill our memory."""
        self._require_running(name)
        cmd = self.exec_argv(name, argv, user=user, groups=groups, env=env, cwd=cwd)
        return proc.run(
            self._charged(name, cmd),  # runc, while it waits on the host
            input=input,
            timeout=timeout,
            max_output=max_output,
            check=False,
            fix=f"the command inside {name!r} misbehaved: see its journal",
        )

    def exec_tty(
        self,
        name: str,
        argv: Sequence[str],
        *,
        user: str = "0:0",
        groups: Sequence[int] = (),
        env: Sequence[str] = (),
        cwd: str | None = None,
        rows: int = 24,
        cols: int = 80,
        charged: bool = False,
    ) -> TtyProcess:
        """Start `argv` inside on a new pty of the container's own devpts; `charged`: the helper
        that waits for the program (and its runc) first joins the container's session cgroup,
        so the container's limits cover it."""
        self._require_running(name)
        uid, _, gid = user.partition(":")
        config = json.loads((self._dir(name) / "config.json").read_text())
        process = exec_process(
            config,
            argv,
            uid=int(uid),
            gid=int(gid or uid),
            groups=groups,
            env=env,
            cwd=cwd or "/",
            size=(rows, cols),
        )
        prefix = self._charged(name, []) if charged else []
        return ttyexec.start(self.runc.base_argv(), name, process, prefix)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        stdio: Sequence[int],
        *,
        user: str = "0:0",
        groups: Sequence[int] = (),
        env: Sequence[str] = (),
        cwd: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside without a terminal, on `stdio` (fds or subprocess.PIPE), with its
        runc charged to the container. The command and environment reach runc as a process.json
        in a memfd, never on its argv, which every host user can read in `ps`."""
        self._require_running(name)
        uid, _, gid = user.partition(":")
        config = json.loads((self._dir(name) / "config.json").read_text())
        process = exec_process(
            config,
            argv,
            uid=int(uid),
            gid=int(gid or uid),
            groups=groups,
            env=env,
            cwd=cwd or "/",
            size=None,
        )
        fd = os.memfd_create("hostd-process", 0)  # not CLOEXEC: runc reads it as its fd
        try:
            os.write(fd, json.dumps(process).encode())
            cmd = [*self.runc.base_argv(), "exec", "--process", f"/proc/self/fd/{fd}", name]
            return subprocess.Popen(
                self._charged(name, cmd),
                stdin=stdio[0],
                stdout=stdio[1],
                stderr=stdio[2],
                pass_fds=[fd],
                env=proc.child_env(),
            )
        finally:
            os.close(fd)

    def _charged(self, name: str, argv: Sequence[str]) -> list[str]:
        layout = cgroups.detect(mountinfo.current())
        plan = cgroups.session_plan(layout, self.settings.cgroup_parent, check_name(name))
        cgroups.apply_session(plan)
        return cgroups.join_argv(plan, argv)

    def _require_running(self, name: str) -> None:
        st = self.state(name)
        if st.status != "running":
            raise RuntimeFailure(f"container {name!r} is {st.status}", "start it first")


def prepare_state_dir(path: Path) -> None:
    """The containers' root users, unprivileged on the host, must pass through the state dir
    and every directory above it to their root filesystems (else runc fails with a bare
    "permission denied"). The state dir, and what is made above it, is hostd's own: created
    0711, opened to passing if closed. The directories above are the admin's: a closed one is
    refused, before anything is made."""
    ours = [path]
    while not ours[-1].parent.exists():
        ours.append(ours[-1].parent)
    for d in (ours[-1].parent, *ours[-1].parent.parents):
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise RuntimeFailure(
                f"{d} (mode {stat.S_IMODE(mode):04o}) is closed to the containers' root users",
                f"chmod o+x {d}, or choose a state_dir under directories others may pass",
            )
    path.mkdir(mode=0o711, parents=True, exist_ok=True)
    if (path / "images").is_dir():  # templates hold root's setuid files (0711 before 0.2)
        os.chmod(path / "images", 0o700)
    for d in ours:
        mode = stat.S_IMODE(d.stat().st_mode)
        if not mode & stat.S_IXOTH:  # the umask, or an older hostd, made it so
            os.chmod(d, mode | 0o011)
            log.info("%s: mode %04o, so that the containers may pass", d, mode | 0o011)


def dpkg_installed(status: str) -> set[str]:
    """Names of the packages a dpkg status file says are installed (valid names only: the
    file may be anything its tenant wrote)."""
    found = set()
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[:1] != " "
        )
        name = fields.get("Package", "").strip()
        if fields.get("Status", "").split()[-1:] == ["installed"] and _PACKAGE_NAME.fullmatch(name):
            found.add(name)
    return found


def _dpkg_installed_in(upper: Path) -> set[str]:
    """dpkg_installed() of the root whose upper layer is `upper`; empty if dpkg's status never
    changed there. The file is the tenant's: read without following its links, size-capped."""
    try:
        status = inside.read_file_under(str(upper), "var/lib/dpkg/status", DPKG_STATUS_MAX)
    except RuntimeFailure:  # absent (no package installed), or not a plain file
        return set()
    return dpkg_installed(status.decode(errors="replace"))


def _set_aside(cdir: Path, ids: IdRange, undo: _Undo) -> Path:
    """Move the upper layer to data/previous/<UTC time> and start an empty one. The container
    is stopped: nothing of it can race us, but it may have planted entries in data/previous."""
    previous = cdir / "data/previous"  # hostd's: the container sees only what is below it
    if not os.path.lexists(previous):
        previous.mkdir(mode=0o755)
        os.chown(previous, ids.root, ids.root)
        undo.push(os.rmdir, previous)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = previous / stamp, 1
    while os.path.lexists(aside):
        n += 1
        aside = previous / f"{stamp}-{n}"
    _swap(cdir / "data/upper", aside, undo)
    (cdir / "data/upper").mkdir(mode=0o755)
    undo.push(os.rmdir, cdir / "data/upper")
    os.chown(cdir / "data/upper", ids.root, ids.root)
    return aside


def _swap(src: Path, dest: Path, undo: _Undo) -> None:
    """Rename `src` to `dest` (which must not exist), renamed back on undo."""
    os.rename(src, dest)
    undo.push(os.rename, dest, src)


def _rootfs_paths(cdir: Path) -> rootfs.RootfsPaths:
    return rootfs.RootfsPaths(
        cdir / "lower", cdir / "data/upper", cdir / "data/work", cdir / "rootfs"
    )


class _Undo:
    """Undo steps of a half-done operation, in reverse, when it fails."""

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def push(self, fn: Callable[..., object], *args: object) -> None:
        self._steps.append((fn, args))

    def __enter__(self) -> _Undo:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            return
        for fn, args in reversed(self._steps):
            try:
                fn(*args)
            except Exception:  # keep undoing; the original error is what the caller sees
                log.exception("undo step %s failed", getattr(fn, "__name__", fn))


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _wait_readable(fd: int, timeout: float) -> bool:
    """Wait until `fd` is readable (a pidfd: the process exited), at most `timeout` seconds."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def _docker_ping(pid: int) -> bool:
    """Whether the dockerd of the container whose init is `pid` answers. The socket path is
    resolved inside the container: the tenant controls what /run/docker.sock is."""
    try:
        with inside.connect_unix(pid, "/run/docker.sock", timeout=2) as s:
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in s.recv(64).split(b"\r\n", 1)[0]
    except (OSError, RuntimeFailure):
        return False


def _close(cdir: Path, ids: IdRange) -> None:
    """Mode 0710 root:<range's root group>: passable for root and the container's root only."""
    os.chown(cdir, 0, ids.root)
    os.chmod(cdir, 0o710)
