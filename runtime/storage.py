"""A container's storage: the state dir, the data volume, the root filesystem over its image,
shares, the /etc files and device nodes bound in, disk usage, and what a rebase sets aside.

Everything here works on one container directory (layout in runtime.records); the caller holds
the runtime lock where other processes could race it.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from pathlib import Path

from runtime import fsutil, idshift, inside, lxcfs, mountinfo, netplan, rootfs, shares, volume
from runtime.errors import Conflict, RuntimeFailure
from runtime.ids import IdRange
from runtime.netplan import NetworkConfig
from runtime.records import Container, rootfs_paths, share_dir
from runtime.settings import RootfsMode
from runtime.snapshot import ImportedVolume
from runtime.spec import Bind
from runtime.undo import Undo

log = logging.getLogger(__name__)

# The inner Docker's idle time, as an EnvironmentFile of the image's hostd-docker-idle.service
DOCKER_IDLE = "/etc/default/hostd-docker-idle"
SET_ASIDE = "/var/backups/hostd-rebase"  # where a container sees the upper layers rebases set aside
DPKG_STATUS_MAX = 32 << 20  # bytes of a set-aside dpkg status file read
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]*")  # Debian policy 5.6.1

# The directories at the top of the data volume: name, mode when made, owned by the range's root
VOLUME_DIRS = (
    ("work", 0o711, False),
    ("upper", 0o755, True),
    ("docker", 0o710, True),
    ("containerd", 0o710, True),
)
# Character devices the container's root may open, besides runc's defaults (null, zero, full,
# random, urandom, tty). Our own nodes, owned by the container's root: the host's are 0600.
DEVICES = {"fuse": (10, 229, "/dev/fuse"), "net-tun": (10, 200, "/dev/net/tun")}


def prepare_state_dir(path: Path) -> None:
    """The containers' root users, unprivileged on the host, must pass through the state dir
    and every directory above it to their root filesystems (else runc fails with a bare
    "permission denied"). The state dir, and what is made above it, is the runtime's own:
    created 0711, opened to passing if closed. The directories above are the admin's: a closed
    one is refused, before anything is made. Once per process (Runtime() calls it), never per
    request: it changes modes the runtime lock does not cover."""
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
        if not mode & stat.S_IXOTH:  # the umask, or an older version, made it so
            os.chmod(d, mode | 0o011)
            log.info("%s: mode %04o, so that the containers may pass", d, mode | 0o011)


# -- creation ----------------------------------------------------------------------------------


def make(
    cdir: Path,
    template: Path,
    ids: IdRange,
    disk: int | None,
    wanted: RootfsMode,
    imported: ImportedVolume | None = None,
    scratch: Path | None = None,
) -> RootfsMode:
    """Directories, data volume (new, or `imported`: see adopt_volume), device nodes and the
    root filesystem of a new container; the mode its root filesystem got (`auto`: ID-mapped
    where the file system allows it)."""
    (cdir / "data").mkdir(mode=0o711)
    if imported is not None:
        if disk is None or scratch is None:
            raise RuntimeFailure(
                "an imported volume needs a disk limit", "give the container a disk limit"
            )
        adopt_volume(cdir, imported, ids, disk, scratch)
        volume.mount(cdir / "data.img", cdir / "data")
    elif disk is not None:  # everything writable of the container goes on the capped volume
        volume.create(cdir / "data.img", disk)
        volume.mount(cdir / "data.img", cdir / "data")
    _volume_dirs(cdir / "data", ids, imported is not None)
    for sub in ("rootfs", "lower", "etc", "dev"):
        (cdir / sub).mkdir(mode=0o700 if sub == "lower" else 0o711)
    for node, (major, minor, _) in DEVICES.items():
        os.mknod(cdir / "dev" / node, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chown(cdir / "dev" / node, ids.root, ids.root)
        os.chmod(cdir / "dev" / node, 0o666)  # mknod applied the umask
    paths = rootfs_paths(cdir)
    if wanted is not RootfsMode.COPY:
        try:
            rootfs.mount(template, ids, paths, RootfsMode.IDMAPPED)
            return RootfsMode.IDMAPPED
        except RuntimeFailure as exc:
            fsutil.unmount_all(cdir)
            if wanted is RootfsMode.IDMAPPED or not rootfs.idmap_unsupported(exc):
                raise
            log.warning("%s; falling back to a shifted copy of the image", exc.cause)
    rootfs.shifted_copy(template, paths.lower, ids)
    rootfs.mount(template, ids, paths, RootfsMode.COPY)
    return RootfsMode.COPY


def adopt_volume(
    cdir: Path, imported: ImportedVolume, ids: IdRange, disk: int, scratch: Path
) -> None:
    """The imported volume becomes the container's data.img (checked and grown: volume.adopt),
    its owners shifted from the range it was exported under to `ids` on a mount at `scratch`
    (an empty directory only root reaches) that is nosuid, nodev, noexec: while owners move,
    nothing in it may run or open a device."""
    image = cdir / "data.img"
    volume.adopt(imported.path, image, disk)
    if imported.ids == ids:
        return
    volume.mount(image, scratch, f"{volume.MOUNT_OPTIONS},nosuid,nodev,noexec")
    try:
        changed = idshift.shift_tree(scratch, imported.ids, ids)
    finally:
        volume.unmount(scratch)
    log.info("%s: %d files shifted from %s to %s", cdir.name, changed, imported.ids, ids)


def _volume_dirs(data: Path, ids: IdRange, imported: bool) -> None:
    """The top of the data directory (or volume) as a start needs it: its directories made, or
    of an imported volume checked (what is bound into the container or mounted by the
    runtime must be a directory, not a link to the host), a fresh overlay work directory, and
    no old console log (the runtime opens it as root)."""
    os.chown(data, 0, 0)
    os.chmod(data, 0o711)
    if imported:
        for name in (*(d for d, _, _ in VOLUME_DIRS), "previous"):
            st = os.lstat(data / name) if os.path.lexists(data / name) else None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise volume.damaged(f"data/{name} is not a directory")
        fsutil.remove_tree(data / "work")
        if os.path.lexists(data / "console.log"):
            if os.path.isdir(data / "console.log") and not os.path.islink(data / "console.log"):
                fsutil.remove_tree(data / "console.log")
            else:
                os.unlink(data / "console.log")
    for name, mode, theirs in VOLUME_DIRS:
        if not os.path.lexists(data / name):
            (data / name).mkdir(mode=mode)
        owner = ids.root if theirs else 0
        os.chown(data / name, owner, owner, follow_symlinks=False)


def write_etc(
    cdir: Path, c: Container, network: NetworkConfig | None, docker_idle_stop: int
) -> None:
    """hostname and hosts (so `sudo` can resolve its own name), resolv.conf with an address,
    and the seconds after which an idle inner Docker stops (read by the image's
    hostd-docker-idle unit): bound into the container over the image's."""
    hosts = (
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{c.hostname}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    files = [
        ("hostname", c.hostname + "\n"),
        ("hosts", hosts),
        ("docker-idle", f"DOCKER_IDLE_STOP={docker_idle_stop}\n"),
    ]
    if c.address is not None:
        if network is None:
            raise RuntimeFailure("an address needs a network", "configure the bridge")
        files.append(("resolv.conf", netplan.resolv_conf(network)))
    for fname, text in files:
        fsutil.atomic_write(cdir / "etc" / fname, text)
        os.chown(cdir / "etc" / fname, c.ids.root, c.ids.root)


def binds(cdir: Path, c: Container, lxcfs_dir: Path | None) -> list[Bind]:
    """What of the container directory (and of lxcfs) the OCI spec binds inside."""
    # The inner Docker's data is a plain file system, as on a host: setuid programs work in
    # inner containers whatever the storage driver, and nothing is locked (see volume.py).
    found = [
        Bind(str(cdir / "data/docker"), "/var/lib/docker", ("rbind",)),
        Bind(str(cdir / "data/containerd"), "/var/lib/containerd", ("rbind",)),
        Bind(str(cdir / "etc/hostname"), "/etc/hostname", ("bind", "nosuid", "nodev")),
        Bind(str(cdir / "etc/hosts"), "/etc/hosts", ("bind", "nosuid", "nodev")),
        Bind(str(cdir / "etc/docker-idle"), DOCKER_IDLE, ("bind", "nosuid", "nodev")),
    ]
    if c.address is not None:
        found.append(
            Bind(str(cdir / "etc/resolv.conf"), "/etc/resolv.conf", ("bind", "nosuid", "nodev"))
        )
    if (cdir / "data/previous").is_dir():  # writable: the container's root deletes it when done
        found.append(Bind(str(cdir / "data/previous"), SET_ASIDE, ("bind", "nosuid", "nodev")))
    found += [
        Bind(str(cdir / "dev" / node), dest, ("bind", "nosuid"))
        for node, (_, _, dest) in DEVICES.items()
    ]
    found += [
        Bind(str(share_dir(cdir, i)), share.destination, ("rbind", "nosuid", "nodev"))
        for i, share in enumerate(c.shares)
    ]
    if lxcfs_dir is not None:
        found += lxcfs.binds(lxcfs_dir)
    return found


# -- mounts --------------------------------------------------------------------------------------


def mount(cdir: Path, c: Container) -> None:
    """Everything a start needs mounted: volume, root filesystem, shares (mounted parts kept)."""
    if c.limits.disk is not None:
        mount_volume(cdir, c)
    rootfs.mount(Path(c.image_dir) / "rootfs", c.ids, rootfs_paths(cdir), c.rootfs_mode)
    for i, share in enumerate(c.shares):
        shares.mount(share, c.ids, share_dir(cdir, i))


def unmount(cdir: Path, c: Container) -> None:
    fsutil.unmount_all(cdir)
    if c.limits.disk is not None:
        volume.unmount(cdir / "data")  # waits until the loop device is released


def mount_volume(cdir: Path, c: Container) -> None:
    """Mount the data volume, first growing or shrinking it to a size changed while the
    container ran (the kernel may not allow it live)."""
    assert c.limits.disk is not None
    image, data = cdir / "data.img", cdir / "data"
    if not mountinfo.is_mounted(str(data)) and image.stat().st_size != c.limits.disk:
        volume.resize(image, data, c.limits.disk)
    volume.mount(image, data)


def resize(cdir: Path, c: Container, size: int | None, running: bool) -> bool:
    """Change the data volume's size; True when it took effect on the running container.
    Growing is live where the kernel allows it (CAP_SYS_RESOURCE); shrinking needs the
    container stopped."""
    if c.limits.disk is None or size is None:
        raise RuntimeFailure(
            f"container {c.name!r} has no capped volume or lost it",
            "recreate it with a disk size",
        )
    size = volume.check_size(size)
    if running and size < c.limits.disk:
        raise Conflict(
            f"lowering the disk of {c.name!r} needs it stopped",
            "stop it, then set the size again",
        )
    live = running and volume.can_grow_live()
    if not running or live:
        live = volume.resize(cdir / "data.img", cdir / "data", size) and running
    return live


def volume_used(cdir: Path) -> int | None:
    """Bytes used on the container's volume: of a mounted one by statvfs, else as its
    superblock recorded them at unmount (None if it does not say). No walk, no mount."""
    data = cdir / "data"
    if volume.mounted(data):
        return volume.usage(data)[0]
    return volume.recorded_usage(cdir / "data.img")


def walked_used(cdir: Path) -> int:
    """Bytes of the container's own storage outside a mounted volume (the data directory,
    the shifted copy): a walk of each."""
    return sum(
        fsutil.disk_usage(cdir / sub)
        for sub in ("data", "lower")
        if not mountinfo.is_mounted(str(cdir / sub))
    )


# -- rebase ------------------------------------------------------------------------------------


def rebase(cdir: Path, c: Container, target: Path, undo: Undo) -> Path:
    """Put a stopped container's storage over image version `target`: a new shifted copy
    (copy mode), the upper layer set aside; where it was set aside. Mounts the volume only."""
    copy = c.rootfs_mode is RootfsMode.COPY
    if c.limits.disk is not None:
        mount_volume(cdir, c)
    if copy:
        fsutil.remove_tree(cdir / "lower.new")  # from an interrupted rebase
        (cdir / "lower.new").mkdir(mode=0o700)
        undo.push(fsutil.remove_tree, cdir / "lower.new")
        rootfs.shifted_copy(target / "rootfs", cdir / "lower.new", c.ids)
    aside = set_aside(cdir, c.ids, undo)
    if copy:
        _swap(cdir / "lower", cdir / "lower.old", undo)
        _swap(cdir / "lower.new", cdir / "lower", undo)
    return aside


def dpkg_installed(status: str) -> set[str]:
    """Names of the packages a dpkg status file says are installed (valid names only: the
    file may be anything its container wrote)."""
    found = set()
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[:1] != " "
        )
        name = fields.get("Package", "").strip()
        if fields.get("Status", "").split()[-1:] == ["installed"] and _PACKAGE_NAME.fullmatch(name):
            found.add(name)
    return found


def dpkg_installed_in(upper: Path) -> set[str]:
    """dpkg_installed() of the root whose upper layer is `upper`; empty if dpkg's status never
    changed there. The file is the container's: read without following its links, capped."""
    try:
        status = inside.read_file_under(str(upper), "var/lib/dpkg/status", DPKG_STATUS_MAX)
    except RuntimeFailure:  # absent (no package installed), or not a plain file
        return set()
    return dpkg_installed(status.decode(errors="replace"))


def set_aside(cdir: Path, ids: IdRange, undo: Undo) -> Path:
    """Move the upper layer to data/previous/<UTC time> and start an empty one. The container
    is stopped: nothing of it can race us, but it may have planted entries in data/previous."""
    previous = cdir / "data/previous"  # ours: the container sees only what is below it
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


def _swap(src: Path, dest: Path, undo: Undo) -> None:
    """Rename `src` to `dest` (which must not exist), renamed back on undo."""
    os.rename(src, dest)
    undo.push(os.rename, dest, src)
