"""A container's delegated cgroup subtree, planned as data and applied in one place.

The inner systemd and dockerd must create and manage cgroups below their own root, so before
every start the container's cgroup directories are created and handed to the container's root
ID (runc removes them when the container exits).
- cgroup v1: one directory per hierarchy (controllers and name=systemd); cpuset needs its
  cpus/mems filled in before a task can join. On hybrid hosts runc also uses the cgroup2 tree.
- cgroup v2: one node, its parent enabling the controllers; the node, cgroup.procs,
  cgroup.subtree_control and cgroup.threads are chowned. systemd inside moves itself into the
  leaf init.scope, so the node holds no process once controllers are enabled below it.
Containers' nodes sit below a parent: a top-level `hostd` of our own, or, under systemd, the
cgroup that hostd-tenants.service delegates (SYSTEMD_PARENT): a slice of their own, outside
hostd.service, so restarting hostd leaves them be. A parent systemd made is never removed.
systemd removes the cgroup of a unit whose processes have all exited, so that unit's one
process only holds it (`hostd --hold-tenants`); on v2 in a leaf of its own, HOLDER, since a
node enabling controllers for its children may hold no process.
Session helpers (`runc exec`, the pty helper) that hostd keeps on the host for a container are
charged to it: they join a root-owned child of its cgroup, `hostd-sessions`, in the memory, pids
and cpu hierarchies, so the container's limits cover them too. On v2 the programs they start
inside go there as well (`runc exec --cgroup`): the node itself holds no process, and runc's
fallback, init's own leaf, is the inner systemd's init.scope, which it caps at 15 % of the
tenant's tasks (DefaultTasksMax). On v1 they join the container's cgroup, as runc does.
hostd's own bulk work (a backup's compression) runs in BACKGROUND beside the containers, with
the least CPU weight there is: SCHED_IDLE alone counts only among hostd's own tasks, and hostd's
session or unit as a whole weighs as much as all the tenants' parent, or more.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.errors import RuntimeFailure
from runtime.mountinfo import Mount

V1_DELEGATED_FILES = ("cgroup.procs", "tasks", "cgroup.clone_children")
V2_DELEGATED_FILES = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")
V2_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "pids")
CPUSET_FILES = ("cpuset.cpus", "cpuset.mems")
UNIFIED = "unified"  # marks the cgroup2 tree of a hybrid host
SESSIONS = "hostd-sessions"  # child of a container's cgroup holding its helpers on the host
BACKGROUND = ".background"  # beside the containers: hostd's bulk work (no user name has a dot)
BACKGROUND_WEIGHT = (("cpu.weight", "1"), ("cpu.shares", "2"))  # v2's and v1's least
OWN_PARENT = "hostd"  # the containers' parent cgroup without systemd
SYSTEMD_PARENT = "hostd.slice/hostd-tenants.service"  # packaging/systemd/hostd-tenants.service
HOLDER = ".holder"  # v2: the leaf of hostd-tenants.service's process (no user name has a dot)
SYSTEMD_UNITS = (".slice", ".service", ".scope")  # suffixes of the cgroups systemd makes
SYSTEMD_DIR = "/run/systemd/system"  # exists when systemd is PID 1
SESSION_CONTROLLERS = ("memory", "pids", "cpu")  # v1 hierarchies the helpers are charged in
# Joins the cgroups whose cgroup.procs files are its arguments, then runs the rest: the program
# is charged from its first page on (v1 leaves pages charged where they were allocated).
_JOIN = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ >"$1" || exit 125; shift; n=$((n-1)); '
    'done; exec "$@"'
)


@dataclass(frozen=True)
class Hierarchy:
    root: str  # mount point
    controllers: tuple[str, ...]  # v1 super options naming controllers (or name=systemd)


@dataclass(frozen=True)
class Layout:
    """Where the host's cgroup hierarchies are mounted."""

    version: int  # 1 (legacy or hybrid) or 2 (unified)
    hierarchies: tuple[Hierarchy, ...]  # v1: one per hierarchy; v2: the single root


@dataclass(frozen=True)
class CgroupDir:
    path: str
    chown: tuple[str, ...]  # files inside to hand over; empty for the shared parent
    copy_from_parent: tuple[str, ...] = ()  # v1 cpuset: inherit cpus and mems
    enable_controllers: tuple[str, ...] = ()  # v2: written to cgroup.subtree_control


@dataclass(frozen=True)
class CgroupPlan:
    runc_path: str  # linux.cgroupsPath in config.json
    owner: int  # host ID of root inside
    dirs: tuple[CgroupDir, ...]  # parents first


def detect(mounts: list[Mount]) -> Layout:
    unified = [m for m in mounts if m.target == "/sys/fs/cgroup" and m.fstype == "cgroup2"]
    if unified:
        return Layout(2, (Hierarchy("/sys/fs/cgroup", ()),))
    v1 = [
        Hierarchy(m.target, tuple(o for o in m.super_options if o not in ("rw", "ro")))
        for m in mounts
        if m.fstype == "cgroup"
    ]
    # Hybrid hosts also mount an (empty) cgroup2 tree, where runc puts the container too.
    v1 += [Hierarchy(m.target, (UNIFIED,)) for m in mounts if m.fstype == "cgroup2"]
    return Layout(1, tuple(sorted(v1, key=lambda h: h.root)))


def systemd_runs() -> bool:
    """Whether systemd is PID 1 (sd_booted(3))."""
    return os.path.isdir(SYSTEMD_DIR)


def default_parent(layout: Layout) -> str:
    """The parent when the admin has not chosen one: under systemd, hostd-tenants.service's
    cgroup if that unit is active (its cgroup exists), else a top-level one of our own."""
    first = layout.hierarchies[0].root  # v2: the root; v1: in sorted order, one of them
    systemd = next((h.root for h in layout.hierarchies if "name=systemd" in h.controllers), first)
    if systemd_runs() and os.path.isdir(f"{systemd}/{SYSTEMD_PARENT}"):
        return SYSTEMD_PARENT
    return OWN_PARENT


def unified_path(proc_cgroup: str) -> str:
    """The cgroup v2 path in the text of /proc/PID/cgroup (its "0::/path" line)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise RuntimeFailure("no cgroup v2 line in /proc/self/cgroup", "mount cgroup2 (systemd does)")


def hold(layout: Layout, own: str, pid: int) -> str | None:
    """Move process `pid`, alone in the cgroup `own` (its v2 path), to the leaf HOLDER below
    it, so that `own` may enable controllers for the tenants beside it; the leaf's path. v1
    (hybrid too: its v2 tree enables no controller) lets a process stay where it is: None."""
    if layout.version != 2:
        return None
    leaf = f"{layout.hierarchies[0].root}{own.rstrip('/')}/{HOLDER}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(leaf)
    with open(f"{leaf}/cgroup.procs", "w") as f:
        f.write(str(pid))
    return leaf


def plan(layout: Layout, parent: str, name: str, owner: int) -> CgroupPlan:
    """`parent` may have a parent of its own (systemd's "hostd.slice/..."): every ancestor is
    listed, so a v1 cpuset is filled in from the top down."""
    parts = parent.split("/")
    ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
    dirs: list[CgroupDir] = []
    for h in layout.hierarchies:
        root = h.root
        if layout.version == 1 and UNIFIED in h.controllers:
            dirs += [CgroupDir(f"{root}/{a}", ()) for a in ancestors]
            dirs.append(CgroupDir(f"{root}/{parent}", ()))
            dirs.append(CgroupDir(f"{root}/{parent}/{name}", V2_DELEGATED_FILES))
        elif layout.version == 1:
            inherit = CPUSET_FILES if "cpuset" in h.controllers else ()
            dirs += [CgroupDir(f"{root}/{a}", (), inherit) for a in ancestors]
            dirs.append(CgroupDir(f"{root}/{parent}", (), inherit))
            dirs.append(CgroupDir(f"{root}/{parent}/{name}", V1_DELEGATED_FILES, inherit))
        else:  # systemd enabled the controllers above a unit it delegates
            dirs += [CgroupDir(f"{root}/{a}", ()) for a in ancestors]
            dirs.append(CgroupDir(f"{root}/{parent}", (), (), V2_CONTROLLERS))
            dirs.append(CgroupDir(f"{root}/{parent}/{name}", V2_DELEGATED_FILES))
    return CgroupPlan(f"/{parent}/{name}", owner, tuple(dirs))


@dataclass(frozen=True)
class SessionCgroup:
    """Where a container's session helpers go: one directory per hierarchy charged."""

    dirs: tuple[str, ...]
    exec_options: tuple[str, ...] = ()  # `runc exec` flags putting the program there too

    @property
    def procs(self) -> tuple[str, ...]:
        return tuple(f"{d}/cgroup.procs" for d in self.dirs)


def session_plan(layout: Layout, parent: str, name: str) -> SessionCgroup:
    if layout.version == 2:
        return SessionCgroup(
            (f"{layout.hierarchies[0].root}/{parent}/{name}/{SESSIONS}",), ("--cgroup", SESSIONS)
        )
    return SessionCgroup(
        tuple(
            f"{h.root}/{parent}/{name}/{SESSIONS}"
            for h in layout.hierarchies
            if UNIFIED not in h.controllers and set(h.controllers) & set(SESSION_CONTROLLERS)
        )
    )


def apply_session(p: SessionCgroup) -> None:
    """Create the directories (idempotent). They must be root's: one the container's root
    made in its own cgroup would let it set the limits of hostd's helpers."""
    for d in p.dirs:
        if not _mkdir(d):
            raise RuntimeFailure(
                f"no cgroup {os.path.dirname(d)}: the container is not running", "start it first"
            )
        if os.stat(d, follow_symlinks=False).st_uid != 0:
            raise RuntimeFailure(
                f"{d} is not root's: the container made it",
                "restart the container (`hostctl restart`)",
            )


def background_plan(layout: Layout, parent: str) -> SessionCgroup:
    """Where hostd's background work goes: BACKGROUND below the containers' parent, in the
    cpu hierarchy on v1."""
    if layout.version == 2:
        return SessionCgroup((f"{layout.hierarchies[0].root}/{parent}/{BACKGROUND}",))
    return SessionCgroup(
        tuple(
            f"{h.root}/{parent}/{BACKGROUND}" for h in layout.hierarchies if "cpu" in h.controllers
        )
    )


def apply_background(p: SessionCgroup) -> bool:
    """Create the directories with the least CPU weight; False, with none left, when there is
    no parent (no container runs: nobody to yield to) or no CPU weight to set in it."""
    made = []
    for d in p.dirs:
        if not _mkdir(d):
            break
        made.append(d)
        if not any(_write_if_present(f"{d}/{f}", value) for f, value in BACKGROUND_WEIGHT):
            break
    else:
        return bool(p.dirs)
    remove_background(SessionCgroup(tuple(made)))
    return False


def _mkdir(path: str) -> bool:
    """Make a cgroup directory (one already there will do); False when its parent is not."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    except FileNotFoundError:
        return False
    return True


def remove_background(p: SessionCgroup) -> None:
    for d in p.dirs:
        _rmdir_if_unused(d)


def _write_if_present(path: str, value: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # never created: a cgroup's files exist
    except FileNotFoundError:
        return False
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    return True


def join_argv(p: SessionCgroup, argv: Sequence[str]) -> list[str]:
    """`argv` behind a shell that first moves itself into the session cgroups."""
    return ["/bin/sh", "-c", _JOIN, "hostd-join", str(len(p.procs)), *p.procs, *argv]


def apply(p: CgroupPlan) -> None:
    """Create the directories (idempotent) and hand the container's ones to its root."""
    for d in p.dirs:
        with contextlib.suppress(FileExistsError):
            os.mkdir(d.path, 0o755)
        for fname in d.copy_from_parent:
            with open(f"{os.path.dirname(d.path)}/{fname}") as src:
                value = src.read().strip()
            with open(f"{d.path}/{fname}", "w") as dst:
                dst.write(value)
        if d.enable_controllers:
            _enable(d.path, d.enable_controllers)
        if d.chown:
            os.chown(d.path, p.owner, p.owner)
            for fname in d.chown:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(f"{d.path}/{fname}", p.owner, p.owner)


def _enable(path: str, controllers: tuple[str, ...]) -> None:
    with open(f"{path}/cgroup.controllers") as f:
        available = set(f.read().split())
    wanted = [c for c in controllers if c in available]
    if wanted:
        with open(f"{path}/cgroup.subtree_control", "w") as f:
            f.write(" ".join(f"+{c}" for c in wanted))


def remove(p: CgroupPlan) -> None:
    """Remove the container's directories (children first), then the parents if now empty."""
    for d in reversed(p.dirs):
        if d.chown:
            _rmdir_tree(d.path)
        else:
            _rmdir_if_unused(d.path)


def _rmdir_tree(path: str) -> None:
    """rmdir a cgroup and any sub-cgroups left by the inner systemd/dockerd (deepest first)."""
    if not os.path.isdir(path):
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _rmdir_tree(entry.path)
    os.rmdir(path)


def _rmdir_if_unused(path: str) -> None:
    """The shared parent goes once no container is below it, unless systemd made it."""
    if path.endswith(SYSTEMD_UNITS):
        return
    try:
        os.rmdir(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise


def exists(p: CgroupPlan) -> list[str]:
    """The container's own cgroup directories still present (for checks after removal)."""
    return [d.path for d in p.dirs if d.chown and os.path.isdir(d.path)]


@dataclass(frozen=True)
class Usage:
    memory: int  # bytes
    cpu_seconds: float  # CPU time since start
    pids: int  # tasks


def usage(layout: Layout, parent: str, name: str) -> Usage:
    """Current usage read from the container's cgroup files."""
    if layout.version == 2:
        node = f"{layout.hierarchies[0].root}/{parent}/{name}"
        stat = dict(line.split() for line in _read(f"{node}/cpu.stat").splitlines())
        return Usage(
            int(_read(f"{node}/memory.current")),
            int(stat["usage_usec"]) / 1e6,
            int(_read(f"{node}/pids.current")),
        )
    roots = {c: h.root for h in layout.hierarchies for c in h.controllers}
    leaf = f"/{parent}/{name}"
    return Usage(
        int(_read(f"{roots['memory']}{leaf}/memory.usage_in_bytes")),
        int(_read(f"{roots['cpuacct']}{leaf}/cpuacct.usage")) / 1e9,
        int(_read(f"{roots['pids']}{leaf}/pids.current")),
    )


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


@dataclass(frozen=True)
class Freezer:
    """Where a container's cgroup is frozen and thawed (v1 freezer.state, v2 cgroup.freeze),
    and how its state says it is: freezing waits for every task, so it is not at once."""

    control: str  # the file written
    freeze: str  # what is written to freeze
    thaw: str  # ... and to thaw
    status: str  # the file read
    frozen: str  # a line of it once every task is frozen


def freezer(layout: Layout, parent: str, name: str) -> Freezer:
    if layout.version == 2:
        node = f"{layout.hierarchies[0].root}/{parent}/{name}"
        return Freezer(f"{node}/cgroup.freeze", "1", "0", f"{node}/cgroup.events", "frozen 1")
    root = next((h.root for h in layout.hierarchies if "freezer" in h.controllers), None)
    if root is None:
        raise RuntimeFailure(
            "no cgroup v1 freezer hierarchy is mounted",
            "mount it (mount -t cgroup -o freezer cgroup /sys/fs/cgroup/freezer)",
        )
    state = f"{root}/{parent}/{name}/freezer.state"
    return Freezer(state, "FROZEN", "THAWED", state, "FROZEN")


def set_frozen(f: Freezer, frozen: bool) -> None:
    with open(f.control, "w") as out:
        out.write(f.freeze if frozen else f.thaw)


def is_frozen(f: Freezer) -> bool:
    return f.frozen in _read(f.status).splitlines()
