"""`Runtime`: the one facade of system containers (create, start, stop, kill, delete, state,
limits, rebase, exec). Each step lives in a module of its own; this class holds the settings
and the lock, and says in which order the steps run:
    records    the record and directory of a container (layout there)
    storage    state dir, data volume, root filesystem, shares, /etc files, rebase set-aside
    lifecycle  host checks, halting init, the Docker readiness probe
    execs      programs run inside (one ExecSpec)
    netplan / network   addresses and forwards as data / applied with netlink and nft
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import fields, replace
from ipaddress import IPv4Address
from pathlib import Path

from runtime import (
    cgroups,
    fsutil,
    inside,
    lifecycle,
    lxcfs,
    mountinfo,
    network,
    proc,
    records,
    snapshot,
    storage,
)
from runtime.errors import Busy, Conflict, RuntimeFailure
from runtime.execs import EXEC_MAX_OUTPUT, EXEC_TIMEOUT, Execs, ExecSpec
from runtime.ids import IdRange
from runtime.images import ImageStore
from runtime.limits import Limits
from runtime.names import check_name, hostname_for
from runtime.netplan import Forward, NetworkConfig
from runtime.records import Container, ContainerState, Rebased, Records, Report
from runtime.runc import CpusetBusy, Runc, RuncState
from runtime.settings import RootfsMode, Settings
from runtime.shares import Share
from runtime.snapshot import ImportedVolume, VolumeSnapshot
from runtime.spec import ContainerSpec, build_config
from runtime.ttyexec import TtyProcess
from runtime.undo import Undo
from runtime.userns import user_namespace

log = logging.getLogger(__name__)
# When a changed limit takes effect (set_limits): on the running container, or at its next start.
NOW, NEXT_START = "now", "at next start"
CPUS_NOW_SET_LATER = "now (its CPU set at next start)"  # the cap now; cgroup v1 refused the set
STAGING = "staging"  # below the state dir: staging files (imported volumes, clones)
CLK_TCK = os.sysconf("SC_CLK_TCK")  # the unit of a process's start time in /proc
DISK_WALK_TTL = 30.0  # seconds a disk walk of a container without a mounted volume is kept
_LXCFS_LOCK = threading.Lock()  # one lxcfs per host, started by whichever start comes first
_BACKGROUND_LOCK = threading.Lock()  # the background cgroup: made by its first user, removed
_background_users = 0  # by its last (a user's child must never find it gone)


WAIT_FOR_SYSTEMD = (
    "until [ -d /run/systemd/system ] && [ -S /run/systemd/private ]; do sleep 0.02; done; "
    "exec systemctl is-system-running --wait"
)
CONSOLE_TAIL = 16 << 10  # bytes of the console log read to explain a failed start
BOOT_LINES = 5  # lines of it (or of the journal) shown
LINE_MAX = 200  # characters of each
_TERMINAL_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|.)")


def printable_lines(text: str, lines: int) -> list[str]:
    """The last `lines` non-empty lines of what a container wrote, safe for a terminal and a
    log: escape sequences and control characters removed, each cut at LINE_MAX."""
    text = _TERMINAL_ESCAPE.sub("", text)
    kept = ["".join(c for c in line if c.isprintable()).strip() for line in text.splitlines()]
    return [line[:LINE_MAX] for line in kept if line][-lines:]


class Runtime:
    def __init__(self, settings: Settings) -> None:
        """Open the state dir (made, or opened to the containers' root users, here once:
        never per request, under the lock) and the image store."""
        self.settings = settings
        self.state_dir = settings.state_dir
        storage.prepare_state_dir(settings.state_dir)
        self.images = ImageStore(
            settings.state_dir / "images", settings.recipes_dir, settings.cache_dir
        )
        self.runc = Runc(settings.runc, settings.state_dir / "runc")
        self.records = Records(settings.state_dir)
        self.execs = Execs(self.runc, settings.cgroup_parent, self.cgroup_layout)
        self._layout: cgroups.Layout | None = None
        # name: (its creation, when, bytes) of the last disk walk of a container
        self._walked: dict[str, tuple[str, float, int]] = {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise changes across processes (range checks, directory creation)."""
        with open(self.state_dir / "lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # -- records -----------------------------------------------------------------------------

    def get(self, name: str) -> Container:
        return self.records.get(name)

    def exists(self, name: str) -> bool:
        """Whether anything of container `name` is on disk, complete or not."""
        return self.records.exists(name)

    def incomplete(self) -> list[str]:
        """Containers whose creation was interrupted (no meta.json): remains to delete."""
        return self.records.incomplete()

    def containers(self) -> list[Container]:
        return self.records.all()

    def close_dirs(self) -> None:
        """Give every container directory its mode (0711 before hostd 0.2), running ones too."""
        for c in self.containers():
            records.close(self.records.dir(c.name), c.ids)

    def staging_file(self) -> Path:
        """A new empty 0600 file in <state>/staging, on the containers' file system, so that
        create() can rename an imported volume in. Named after this process: leftovers of dead
        ones are removed by thaw_leftovers()."""
        path = self._staging_name()
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        return path

    def _staging_name(self) -> Path:
        """A new name in the staging dir (made 0700 if missing), marked as this process's."""
        staging = self.state_dir / STAGING
        staging.mkdir(mode=0o700, exist_ok=True)
        return staging / f"{os.getpid()}-{secrets.token_hex(8)}"

    def _clear_staging(self) -> None:
        """Remove what processes that are gone left in the staging dir (files, mount points)."""
        staging = self.state_dir / STAGING
        if not staging.is_dir():
            return
        for entry in staging.iterdir():
            pid = entry.name.partition("-")[0]
            if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
                continue
            log.info("removing %s, left by a process that is gone", entry)
            if entry.is_dir() and not entry.is_symlink():
                fsutil.remove_tree(entry)
            else:
                entry.unlink()

    def console_log(self, c: Container) -> Path:
        return records.console_log(self.records.dir(c.name), c)

    def boot_messages(self, name: str, lines: int = BOOT_LINES) -> list[str]:
        """What the container says about a start gone wrong, as printable text: the errors
        its journal holds while it still runs, else the last lines its init wrote to the
        console (init's own failures, before the journal runs)."""
        if self.state(name).status == "running":
            journal = ["journalctl", "-b", "-p", "warning", "-q", "-o", "cat", "--no-pager"]
            res = self.exec(name, ExecSpec([*journal, "-n", str(lines)]), timeout=10)
            if said := printable_lines(res.stdout, lines):
                return said
        log = self.console_log(self.get(name))
        try:  # the container wrote it: not followed if it is a link, only its tail read
            data = inside.read_tail_under(str(log.parent), log.name, CONSOLE_TAIL)
        except RuntimeFailure:  # never started, or not a plain file any more
            return []
        return printable_lines(data.decode(errors="replace"), lines)

    # -- create --------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        image: str,
        ids: IdRange,
        hostname: str | None = None,
        shares: Sequence[Share] = (),
        limits: Limits | None = None,
        address: IPv4Address | None = None,
        volume: ImportedVolume | None = None,
    ) -> Container:
        """Prepare a container (storage, root filesystem, bundle); transactional.

        With `volume` (an exported data volume in a staging file) the container is made on it:
        checked, grown to limits.disk, its owners shifted from volume.ids to `ids`, and, when
        it ran on another image version than the one it is created on (the caller compares
        volume.image_version with the returned record's image_dir name), its upper layer set
        aside as a rebase does. The staging file is gone afterwards, on failure too."""
        try:
            return self._create(name, image, ids, hostname, shares, limits, address, volume)
        finally:
            if volume is not None:  # renamed in, or not wanted any more
                volume.path.unlink(missing_ok=True)

    def _create(
        self,
        name: str,
        image: str,
        ids: IdRange,
        hostname: str | None,
        shares: Sequence[Share],
        limits: Limits | None,
        address: IPv4Address | None,
        imported: ImportedVolume | None,
    ) -> Container:
        check_name(name)
        lifecycle.check_host(self.settings.runc)
        with self._locked():
            self._check_new(name, ids, address)
            image_dir = self.images.resolve(image)
            cdir = self.records.dir(name)
            limits = limits or Limits()
            with Undo() as undo:
                self.records.root.mkdir(mode=0o711, parents=True, exist_ok=True)
                cdir.mkdir(mode=0o700)
                undo.push(fsutil.remove_tree, cdir)
                records.close(cdir, ids)
                wanted = self.settings.rootfs_mode
                scratch = None
                if imported is not None:  # where the volume is mounted while owners move
                    scratch = self._staging_name()
                    scratch.mkdir(mode=0o700)
                    undo.push(fsutil.remove_tree, scratch)
                mode = storage.make(
                    cdir, image_dir / "rootfs", ids, limits.disk, wanted, imported, scratch
                )
                if scratch is not None:
                    scratch.rmdir()
                if imported is not None and imported.image_version != image_dir.name:
                    fsutil.unmount_all(cdir / "rootfs")  # the overlay holds the upper layer
                    aside = storage.set_aside(cdir, ids, undo)
                    log.info(
                        "%s ran on %s: upper set aside in %s", name, imported.image_version, aside
                    )
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
                storage.write_etc(cdir, c, self.settings.network, self.settings.docker_idle_stop)
                self.records.write(c)
            return c

    def _check_new(self, name: str, ids: IdRange, address: IPv4Address | None) -> None:
        """The one check of a new container against the others (under the lock): its name is
        free, its ID range overlaps none, its address (in the subnet) is nobody's."""
        if self.records.exists(name):
            raise Conflict(
                f"container {name!r} already exists", "delete it first or pick another name"
            )
        if address is not None:
            self.network_config().check_address(address)
        for other in self.containers():
            if other.ids.overlaps(ids):
                raise Conflict(
                    f"ID range {ids} overlaps {other.ids} of container {other.name!r}",
                    "give each container its own range",
                )
            if address is not None and other.address == str(address):
                raise Conflict(
                    f"address {address} belongs to container {other.name!r}",
                    "give each container its own address",
                )

    # -- start / stop --------------------------------------------------------------------------

    def spec(self, c: Container) -> ContainerSpec:
        """What runc gets to run the container (see runtime.spec)."""
        return ContainerSpec(
            name=c.name,
            hostname=c.hostname,
            ids=c.ids,
            rootfs=str(self.records.dir(c.name) / "rootfs"),
            cgroups_path=self._cgroup_plan(c).runc_path,
            binds=tuple(storage.binds(self.records.dir(c.name), c, self.settings.lxcfs)),
            limits=c.limits,
            cpu_set=self._cpu_set(c.name, c.limits),
        )

    def start(self, name: str) -> ContainerState:
        c = self.get(name)
        lifecycle.check_host(self.settings.runc)
        with self._locked():
            snapshot.check_not_held(self.records.dir(name))
            current = self.runc.state(name)
            if current is not None and current.status == "created":
                # A start cut short: its caller died between `runc create` and `runc start`
                # (starts hold this lock throughout). Nothing runs there yet: start afresh.
                log.warning("%s: clearing a start that was cut short", name)
                lifecycle.halt(self.runc, name, current.pid, 0)
                self._release_held(c)
                current = None
            if current is not None and current.status in ("running", "paused", "created"):
                raise Conflict(f"container {name!r} is already {current.status}", "stop it first")
            if current is not None:
                self.runc.delete(name)
            cdir = self.records.dir(name)
            records.close(cdir, c.ids)  # made open (0711) by hostd before 0.2
            plan = self._cgroup_plan(c)
            with Undo() as undo:
                undo.push(storage.unmount, cdir, c)
                storage.mount(cdir, c)
                storage.write_etc(cdir, c, self.settings.network, self.settings.docker_idle_stop)
                if self.settings.lxcfs is not None:
                    with _LXCFS_LOCK:
                        lxcfs.ensure_running(self.settings.lxcfs)
                cgroups.apply(plan)
                undo.push(cgroups.remove, plan)
                undo.push(self.runc.delete, name)
                pid = self._runc_create(c)
                if c.address is not None:  # before init runs, so it boots with its network
                    undo.push(network.detach, name)
                    network.attach(self.network_config(), name, IPv4Address(c.address), pid)
                self.runc.start(name)
        return self.state(name)

    def _runc_create(self, c: Container) -> int:
        """`runc create` in a user namespace owned by the range's root, not by host root: the
        kernel then charges the container's inotify instances, namespaces... to that ID
        against the host's per-user limits, a cap root inside cannot lift (see runtime.userns).
        """
        cdir = self.records.dir(c.name)
        with user_namespace(c.ids.map_line(), c.ids.map_line(), owner=c.ids.root) as userns:
            spec = replace(self.spec(c), userns_path=f"/proc/{os.getpid()}/fd/{userns}")
            config = json.dumps(build_config(spec), indent=1)
            fsutil.atomic_write(cdir / "config.json", config, mode=0o600)
            return self.runc.create(cdir, c.name, self.console_log(c))

    def stop(self, name: str, timeout: float = 30.0) -> None:
        """Ask systemd to halt; kill everything if it has not within `timeout` seconds
        (at once with timeout 0)."""
        c = self.get(name)
        snapshot.check_not_held(self.records.dir(name))  # frozen: a halt would wait for nothing
        st = self.runc.state(name)
        if st is not None and st.status in ("running", "paused", "created") and st.pid:
            lifecycle.halt(self.runc, name, st.pid, timeout)
        self._release(c)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.get(name)
        self.runc.kill(name, sig, all_processes=sig == signal.SIGKILL)

    def _release(self, c: Container) -> None:
        with self._locked():
            self._release_held(c)

    def _release_held(self, c: Container) -> None:
        """Drop everything a stopped container holds: runc state, cgroups, mounts, its link.
        Call with the lock held."""
        self.runc.delete(c.name)
        if c.address is not None:
            network.detach(c.name)
        cgroups.remove(self._cgroup_plan(c))
        storage.unmount(self.records.dir(c.name), c)

    def delete(self, name: str, force: bool = False) -> None:
        """Delete a container and all its data; also the remains of one whose creation was
        interrupted (a crash before its meta.json was written)."""
        cdir = self.records.dir(name)
        if cdir.is_dir() and not (cdir / "meta.json").exists():
            with self._locked():
                self.runc.delete(name)
                fsutil.remove_tree(cdir)
            return
        c = self.get(name)
        snapshot.check_not_held(cdir)
        st = self.state(name)
        if st.status != "stopped":
            if not force:
                raise Conflict(
                    f"container {name!r} is {st.status}", "stop it first, or delete with force"
                )
            self.stop(name, timeout=0)  # killed, and everything it held released
        else:
            self._release(c)  # what a stop cut short may have left
        with self._locked():
            fsutil.remove_tree(cdir)

    # -- export ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def volume_snapshot(self, name: str) -> Iterator[VolumeSnapshot]:
        """The container's data volume, consistent and unchanging while inside: a stopped
        container's unmounted (and not started meanwhile: Busy), a running one's frozen
        (runtime.snapshot), or a clone of it where the file system clones files, thawed at
        once. Stop, start, delete, rebase and a disk change are Busy while it is held."""
        c, cdir = self.get(name), self.records.dir(name)
        if c.limits.disk is None:
            raise RuntimeFailure(
                f"container {name!r} keeps its data in a plain directory, not a volume",
                "give it a disk limit first (hostctl user set --disk)",
            )
        image = cdir / "data.img"
        with contextlib.ExitStack() as stack:
            with self._locked():
                stack.enter_context(snapshot.held(cdir))
                st = self.runc.state(name)
                status = "stopped" if st is None else st.status
                freeze = stack.enter_context(contextlib.ExitStack())
                if status == "stopped":
                    storage.unmount(cdir, c)  # what a stop cut short may have left
                elif status == "running":
                    t0 = time.monotonic()
                    freeze.enter_context(snapshot.frozen(cdir, self._freezer(c), cdir / "data"))
                    log.info("%s frozen in %.3f s", name, time.monotonic() - t0)
                else:
                    raise Busy(f"container {name!r} is {status}", "try again once it runs")
            if status == "stopped":
                yield VolumeSnapshot(image, image.stat().st_size, "stopped")
                return
            clone = self.staging_file()
            stack.callback(clone.unlink, missing_ok=True)
            if snapshot.reflink(image, clone):
                freeze.close()  # thawed: the clone does not change
                yield VolumeSnapshot(clone, clone.stat().st_size, "frozen")
            else:
                clone.unlink()
                yield VolumeSnapshot(image, image.stat().st_size, "frozen")

    def thaw_leftovers(self) -> list[str]:
        """Thaw the containers a runtime killed while it held them frozen left frozen (their
        marker is there, nobody holds their snapshot), and remove staging files left by dead
        processes and the background cgroup of a killed backup; the names of the containers
        thawed. For hostd's start."""
        thawed = []
        with self._locked():
            self._clear_staging()
            plan = cgroups.background_plan(self.cgroup_layout(), self.settings.cgroup_parent)
            cgroups.remove_background(plan)
            for c in self.containers():
                cdir = self.records.dir(c.name)
                if not (cdir / snapshot.MARKER).exists():
                    continue
                try:
                    with snapshot.held(cdir):
                        snapshot.thaw(cdir, self._freezer(c), cdir / "data")
                except Busy:  # a live snapshot: not a leftover
                    continue
                log.warning("%s: thawed, left frozen by a runtime that died", c.name)
                thawed.append(c.name)
        return thawed

    def _freezer(self, c: Container) -> cgroups.Freezer:
        return cgroups.freezer(self.cgroup_layout(), self.settings.cgroup_parent, c.name)

    # -- limits and usage ----------------------------------------------------------------------

    def set_limits(self, name: str, limits: Limits) -> dict[str, str]:
        """Apply new limits to the running container where possible, then record them: for
        each limit that changed, when it takes effect (NOW, NEXT_START, CPUS_NOW_SET_LATER).
        A change the container refuses leaves its cgroups, volume and record as they were."""
        c = self.get(name)
        changed = [
            f.name for f in fields(Limits) if getattr(limits, f.name) != getattr(c.limits, f.name)
        ]
        if "disk" in changed:  # a volume being read must not change size
            snapshot.check_not_held(self.records.dir(name))
        cgroup = [key for key in changed if key != "disk"]
        live = bool(cgroup) and self.state(name).status == "running"
        applied = dict.fromkeys(cgroup, NOW if live else NEXT_START)
        cpus_before = self.runc.cpu_set(name) if live else ""
        set_later = live and not self._update_cgroups(name, c.limits, limits, cpus_before)
        if set_later and "cpus" in applied:  # else still an earlier change's set, now kept
            applied["cpus"] = CPUS_NOW_SET_LATER
        if "disk" in changed:
            running = self.state(name).status != "stopped"
            try:
                grown = storage.resize(self.records.dir(name), c, limits.disk, running)
            except BaseException:
                if live:
                    self._restore_cgroups(name, c.limits, cpus_before)
                raise
            applied["disk"] = NOW if grown else NEXT_START
        with self._locked():
            self.records.write(replace(self.get(name), limits=limits))
        return applied

    def _update_cgroups(self, name: str, old: Limits, new: Limits, cpus_before: str) -> bool:
        """Give the running container's cgroups `new` limits, or restore `old` and raise.
        False when the CPU set is left for the next start: on cgroup v1 the kernel refuses to
        shrink it below what cgroups made inside (the tenant's, e.g. its Docker's) hold, and
        those are not ours to change; the CPU cap applies at once all the same."""
        args = new.runc_update_args()
        try:
            self.runc.update(name, [*args, "--cpuset-cpus", self._cpu_set(name, new)])
            return True
        except CpusetBusy:
            pass  # nothing written: runc sets the cpuset before the other controllers
        except RuntimeFailure:
            self._restore_cgroups(name, old, cpus_before)
            raise
        try:
            self.runc.update(name, [*args, "--cpuset-cpus", cpus_before])
        except RuntimeFailure:
            self._restore_cgroups(name, old, cpus_before)
            raise
        return False

    def _restore_cgroups(self, name: str, old: Limits, cpus_before: str) -> None:
        """Put back the limits a refused `runc update` may have half written (runc's own undo
        writes the new values again). The refusal is what the caller reports."""
        try:
            self.runc.update(name, [*old.runc_update_args(), "--cpuset-cpus", cpus_before])
        except RuntimeFailure as exc:
            log.error("cannot restore the limits of %s: %s", name, exc)

    @staticmethod
    def _cpu_set(name: str, limits: Limits) -> str:
        return limits.cpu_set(os.cpu_count() or 1, zlib.crc32(name.encode()))

    def _cgroup_plan(self, c: Container) -> cgroups.CgroupPlan:
        return cgroups.plan(self.cgroup_layout(), self.settings.cgroup_parent, c.name, c.ids.root)

    def cgroup_layout(self) -> cgroups.Layout:
        """The host's cgroup mounts, read once: hierarchies are mounted at boot, not while we
        run, and /proc/self/mountinfo is long on a host with many tenants."""
        if self._layout is None:
            self._layout = cgroups.detect(mountinfo.current())
        return self._layout

    @contextlib.contextmanager
    def background(self) -> Iterator[list[str]]:
        """An argv prefix that runs a program behind every container for CPU, for hostd's bulk
        work (a backup's compression); [] when no container runs, as nobody is slowed then.
        The prefix is valid inside the block only."""
        global _background_users
        plan = cgroups.background_plan(self.cgroup_layout(), self.settings.cgroup_parent)
        with _BACKGROUND_LOCK:
            ready = cgroups.apply_background(plan)
            if ready:
                _background_users += 1
        try:
            yield cgroups.join_argv(plan, []) if ready else []
        finally:
            if ready:
                with _BACKGROUND_LOCK:
                    _background_users -= 1
                    if not _background_users:
                        cgroups.remove_background(plan)

    def usage(self, name: str) -> cgroups.Usage | None:
        """Memory, CPU time and tasks used now (None when not running): a few cgroup files,
        no program run."""
        return self._usage(name) if self.state(name).status == "running" else None

    def _usage(self, name: str) -> cgroups.Usage:
        return cgroups.usage(self.cgroup_layout(), self.settings.cgroup_parent, name)

    def disk_used(self, name: str) -> int | None:
        """Bytes of the container's own storage (upper layer, Docker data, shifted copy): of
        its volume at once, None if that is not known; without one, a walk of its
        directories, kept for DISK_WALK_TTL seconds."""
        return self._disk_used(self.get(name))

    def _disk_used(self, c: Container) -> int | None:
        cdir = self.records.dir(c.name)
        if c.limits.disk is not None:
            return storage.volume_used(cdir)
        now = time.monotonic()
        walked = self._walked.get(c.name)
        if walked is None or walked[0] != c.created or now - walked[1] >= DISK_WALK_TTL:
            walked = (c.created, now, storage.walked_used(cdir))
            self._walked[c.name] = walked
        return walked[2]

    def report(self, name: str) -> Report:
        """State, uptime, usage and disk of a container, each file read once and no program
        run: `hostctl status` asks this of every tenant, during start storms too."""
        c = self.get(name)
        st = self.runc.state(name) or RuncState("stopped", 0)
        return Report(
            ContainerState(c, st.status, st.pid),
            _uptime(st),
            self._usage(name) if st.status == "running" else None,
            self._disk_used(c),
        )

    # -- images --------------------------------------------------------------------------------

    def rebase(self, name: str, image: str) -> Rebased | None:
        """Move a stopped container to the current version of `image`; None if already there.
        Its volume (Docker's data) stays. Its upper layer cannot stay over a new lower (its
        copies of the dpkg status, of /etc files... would hide the new image's): it is set
        aside whole on the volume, where the container sees it under storage.SET_ASIDE. A
        shifted copy is redone from the new template. Transactional: a failure leaves the old
        image."""
        with self._locked():
            c = self.get(name)
            target = self.images.resolve(image)
            if c.image == image and Path(c.image_dir) == target:
                return None
            st = self.runc.state(name)
            if st is not None and st.status != "stopped":
                raise Conflict(f"container {name!r} is {st.status}", "stop it first")
            cdir = self.records.dir(name)
            snapshot.check_not_held(cdir)
            shipped = {p.split()[0] for p in self.images.manifest(target).packages}
            storage.unmount(cdir, c)  # nothing of the old root stays mounted over what moves
            try:
                with Undo() as undo:
                    aside = storage.rebase(cdir, c, target, undo)
                    self.records.write(replace(c, image=image, image_dir=str(target)))
                packages = tuple(sorted(storage.dpkg_installed_in(aside) - shipped))
            finally:
                storage.unmount(cdir, c)
            if c.rootfs_mode is RootfsMode.COPY:
                fsutil.remove_tree(cdir / "lower.old")
        log.info("%s rebased from %s to %s", name, c.image_dir, target)
        return Rebased(c.image_dir, str(target), f"{storage.SET_ASIDE}/{aside.name}", packages)

    def prune_images(self) -> list[str]:
        """Delete the image versions no container uses any more (nor current); their names."""
        with self._locked():
            return self.images.prune([Path(c.image_dir) for c in self.containers()])

    # -- network -------------------------------------------------------------------------------

    def network_config(self) -> NetworkConfig:
        if self.settings.network is None:
            raise RuntimeFailure(
                "containers have addresses but no network is configured", "configure the bridge"
            )
        return self.settings.network

    def setup_network(self, forwards: Sequence[Forward] = ()) -> bool:
        """Bridge, sysctls and nft rules of the host, with these forwards (idempotent).
        True when the bridge had to be created."""
        return network.setup_host(self.network_config(), forwards)

    def bridge_present(self) -> bool:
        return network.bridge_present(self.network_config())

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

    def unattached(self, names: Iterable[str]) -> list[str]:
        """Those of these running containers with an address that are off the bridge (one
        look at the links and the nft table for all)."""
        running = []
        for name in names:
            try:
                st = self.state(name)
            except RuntimeFailure:  # deleted meanwhile
                continue
            if st.container.address is not None and st.status == "running":
                running.append(name)
        return network.unattached(self.network_config(), running) if running else []

    # -- queries -------------------------------------------------------------------------------

    def uptime(self, name: str) -> float | None:
        """Seconds since the container's init started, None when it has none."""
        return _uptime(self.runc.state(name))

    def state(self, name: str) -> ContainerState:
        c = self.get(name)
        st = self.runc.state(name) or RuncState("stopped", 0)
        return ContainerState(c, st.status, st.pid)

    def states(self) -> list[ContainerState]:
        return [self.state(c.name) for c in self.containers()]

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        """Return once systemd finished booting (`running`): then docker.socket listens (a unit
        that failed would make it `degraded`), and the first docker call starts dockerd; nobody
        waits for a dockerd they may not use."""
        deadline = time.monotonic() + timeout
        while True:  # until systemd's private socket exists, systemctl cannot ask it
            left = max(deadline - time.monotonic(), 1.0)
            # One exec: until systemd's private socket exists, systemctl cannot ask it (it
            # says "offline"), and each poll from here is a `runc exec` (50-300 ms)
            wait = ExecSpec(["/bin/sh", "-c", WAIT_FOR_SYSTEMD])
            status = self.exec(name, wait, timeout=left).stdout.strip()
            # "offline" too, until systemd has made /run/systemd/system just after exec
            if status not in ("", "offline") or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # poll interval; the deadline bounds the wait
        if status != "running":
            failed = ExecSpec(["systemctl", "--failed", "--no-legend", "--plain"])
            lines = self.exec(name, failed).stdout.splitlines()
            units = ", ".join(line.split()[0] for line in lines if line.strip())
            raise RuntimeFailure(
                f"container {name!r} booted {status or 'nothing'}"
                + (f" (failed units: {units})" if units else ""),
                f"see `journalctl` inside, or {self.console_log(self.get(name))}",
            )

    # -- exec ----------------------------------------------------------------------------------

    def exec_argv(self, name: str, spec: ExecSpec) -> list[str]:
        """argv that runs `spec` inside without a terminal, for callers running it themselves."""
        return self.runc.exec_argv(name, spec)

    def exec(
        self,
        name: str,
        spec: ExecSpec,
        *,
        input: bytes | None = None,
        timeout: float = EXEC_TIMEOUT,
        max_output: int = EXEC_MAX_OUTPUT,
    ) -> proc.Result:
        """Run `spec` inside and collect its output (bounded); the exit status is in the
        result."""
        self._require_running(name)
        return self.execs.run(name, spec, input, timeout, max_output)

    def exec_tty(
        self, name: str, spec: ExecSpec, *, rows: int = 24, cols: int = 80, charged: bool = False
    ) -> TtyProcess:
        """Start `spec` on a new pty inside (see Execs.tty)."""
        self._require_running(name)
        config = self.records.dir(name) / "config.json"
        return self.execs.tty(name, config, spec, (rows, cols), charged)

    def spawn(self, name: str, spec: ExecSpec, stdio: Sequence[int]) -> subprocess.Popen[bytes]:
        """Start `spec` inside without a terminal, on `stdio` (see Execs.spawn)."""
        self._require_running(name)
        return self.execs.spawn(name, self.records.dir(name) / "config.json", spec, stdio)

    def _require_running(self, name: str) -> None:
        st = self.state(name)
        if st.status != "running":
            raise Conflict(f"container {name!r} is {st.status}", "start it first")


def _uptime(st: RuncState | None) -> float | None:
    """Seconds since init started, from its start time in clock ticks after boot."""
    if st is None or not st.started:
        return None
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - st.started / CLK_TCK)
