"""An in-memory container runtime for unit tests of hostd's tenant logic (hostd.backend).

It keeps the real Runtime's rules that Tenants relies on (a name is taken once, ranges and
addresses of containers never overlap, an unknown image or container is refused) and can be
told to fail at any step: `fail("create")` makes the next create raise before it changes
anything. Each container's /etc/passwd and /etc/group live here too; `exec` of groupadd and
useradd edits them, and `read_file` (the seam for runtime.inside.read_file) reads them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from runtime.cgroups import Usage
from runtime.errors import Busy, Conflict, NotFound, RuntimeFailure
from runtime.execs import ExecSpec
from runtime.ids import IdRange
from runtime.limits import Limits
from runtime.netplan import Forward, NetworkConfig
from runtime.proc import Result
from runtime.records import Container, ContainerState, Rebased, Report
from runtime.settings import RootfsMode
from runtime.shares import Share
from runtime.snapshot import ImportedVolume, VolumeSnapshot

FIRST_PID = 5_000_000  # above any pid_max: /proc/<pid> never exists for them
BASE_PASSWD = "root:x:0:0:root:/root:/bin/bash\n"
BASE_GROUP = "root:x:0:\nsudo:x:27:\ndocker:x:998:\n"


class Images:
    def __init__(self, names: Sequence[str]) -> None:
        self.versions = {name: 1 for name in names}

    def resolve(self, name: str) -> Path:
        if name not in self.versions:
            raise NotFound(f"image {name!r} does not exist", "build it first")
        return Path(f"/images/{name}@v{self.versions[name]}")


@dataclass
class Box:
    """One container: its record, run state and account files."""

    record: Container
    status: str = "stopped"
    console: list[str] = field(default_factory=list)  # what init said last
    pid: int = 0
    files: dict[str, str] = field(
        default_factory=lambda: {"/etc/passwd": BASE_PASSWD, "/etc/group": BASE_GROUP}
    )
    imported: ImportedVolume | None = None  # what it was created on, if it was imported


class FakeRuntime:
    def __init__(self, images: Sequence[str] = ("default", "other")) -> None:
        self._images = Images(images)
        self.boxes: dict[str, Box] = {}
        self.half_made: set[str] = set()  # directories without meta.json (a crash in create)
        self.failures: dict[str, RuntimeFailure] = {}
        self.calls: list[tuple[str, str]] = []  # (operation, container), in order
        self.execs: list[list[str]] = []
        self.forwards: list[Forward] = []
        self.bridge_up = False
        self.pruned: list[str] = []
        self.detached: set[str] = set()  # running containers whose veth is off the bridge
        self.refused: dict[str, str] = {}  # program inside -> its error (exit status 1)
        self.network = NetworkConfig(subnet="10.213.0.0/24")
        self._next_pid = FIRST_PID
        self.snapshots: set[str] = set()  # containers whose volume snapshot is held
        self.frozen: list[str] = []  # leftovers thaw_leftovers() finds (test control)
        self._files = tempfile.TemporaryDirectory(prefix="fake-runtime-")  # removed with self

    # -- test controls ---------------------------------------------------------------------

    def fail(self, operation: str, error: RuntimeFailure | None = None) -> None:
        """Make the next call of `operation` raise (once), before it changes anything."""
        self.failures[operation] = error or RuntimeFailure(f"{operation} failed", "test")

    def _step(self, operation: str, name: str = "") -> None:
        self.calls.append((operation, name))
        error = self.failures.pop(operation, None)
        if error is not None:
            raise error

    def age(self, name: str) -> None:
        """Make a container look created a day ago (kept from before an add)."""
        box = self._box(name)
        created = datetime.fromisoformat(box.record.created) - timedelta(days=1)
        box.record = replace(box.record, created=created.strftime("%Y-%m-%dT%H:%M:%SZ"))

    def _box(self, name: str) -> Box:
        if name not in self.boxes:
            raise NotFound(f"container {name!r} does not exist", "create it first")
        return self.boxes[name]

    def volume_image(self, name: str) -> Path:
        """The file standing for a container's data volume (made sparse at its disk size)."""
        path = Path(self._files.name) / f"{name}.img"
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(self._box(name).record.limits.disk or 0)
        return path

    def read_file(self, pid: int, path: str, limit: int) -> bytes:
        """runtime.inside.read_file for these containers."""
        box = next((b for b in self.boxes.values() if b.pid == pid and pid), None)
        if box is None or path not in box.files:
            raise RuntimeFailure(f"cannot open {path} in the container", "check that it exists")
        return box.files[path].encode()[: limit + 1]

    # -- ContainerRuntime ------------------------------------------------------------------

    @property
    def images(self) -> Images:
        return self._images

    def get(self, name: str) -> Container:
        return self._box(name).record

    def exists(self, name: str) -> bool:
        return name in self.boxes or name in self.half_made

    def containers(self) -> list[Container]:
        self.calls.append(("containers", ""))
        return [self.boxes[n].record for n in sorted(self.boxes)]

    def incomplete(self) -> list[str]:
        return sorted(self.half_made)

    def close_dirs(self) -> None:
        self._step("close_dirs")

    def create(
        self,
        name: str,
        image: str,
        ids: IdRange,
        *,
        shares: Sequence[Share],
        limits: Limits,
        address: IPv4Address | None,
        volume: ImportedVolume | None = None,
    ) -> Container:
        try:
            return self._create(name, image, ids, shares, limits, address, volume)
        finally:  # the real one renames it in, or deletes it on failure
            if volume is not None:
                volume.path.unlink(missing_ok=True)

    def _create(
        self,
        name: str,
        image: str,
        ids: IdRange,
        shares: Sequence[Share],
        limits: Limits,
        address: IPv4Address | None,
        volume: ImportedVolume | None,
    ) -> Container:
        self._step("create", name)
        if self.exists(name):
            raise Conflict(f"container {name!r} already exists", "delete it first")
        image_dir = self._images.resolve(image)
        for other in self.boxes.values():
            if other.record.ids.overlaps(ids):
                raise Conflict(f"ID range {ids} overlaps {other.record.ids}", "own range")
            if address is not None and other.record.address == str(address):
                raise Conflict(f"address {address} belongs to {other.record.name}", "own one")
        if address is not None:
            self.network.check_address(address)
        record = Container(
            name=name,
            image=image,
            image_dir=str(image_dir),
            ids=ids,
            hostname=name,
            rootfs_mode=RootfsMode.IDMAPPED,
            created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            shares=tuple(shares),
            limits=limits,
            address=None if address is None else str(address),
        )
        self.boxes[name] = Box(record, imported=volume)
        if volume is not None:
            os.rename(volume.path, self.volume_image(name))
        return record

    def start(self, name: str) -> ContainerState:
        box = self._box(name)
        self._step("start", name)
        self._not_held(name)
        if box.status == "running":
            raise Conflict(f"container {name!r} is already running", "stop it first")
        self._next_pid += 1
        box.status, box.pid = "running", self._next_pid
        return self.state(name)

    def wait_ready(self, name: str) -> None:
        self._step("wait_ready", name)

    def boot_messages(self, name: str) -> list[str]:
        return list(self._box(name).console)

    def _not_held(self, name: str) -> None:
        if name in self.snapshots:
            raise Busy(f"a snapshot of container {name!r} is being taken", "try again")

    def stop(self, name: str, timeout: float) -> None:
        box = self._box(name)
        self._step("stop", name)
        self._not_held(name)
        box.status, box.pid = "stopped", 0

    def delete(self, name: str, force: bool) -> None:
        self._step("delete", name)
        if name in self.half_made:
            self.half_made.discard(name)
            return
        box = self._box(name)
        self._not_held(name)
        if box.status != "stopped" and not force:
            raise Conflict(f"container {name!r} is {box.status}", "stop it first")
        del self.boxes[name]

    def rebase(self, name: str, image: str) -> Rebased | None:
        box = self._box(name)
        self._step("rebase", name)
        target = self._images.resolve(image)
        if box.record.image == image and box.record.image_dir == str(target):
            return None
        if box.status != "stopped":
            raise Conflict(f"container {name!r} is {box.status}", "stop it first")
        old = box.record.image_dir
        box.record = replace(box.record, image=image, image_dir=str(target))
        return Rebased(old, str(target), "/var/lib/hostd-set-aside/1", ("vim",))

    def prune_images(self) -> list[str]:
        self._step("prune_images")
        return list(self.pruned)

    def staging_file(self) -> Path:
        fd, path = tempfile.mkstemp(dir=self._files.name, prefix="staging-")
        os.close(fd)
        return Path(path)

    @contextlib.contextmanager
    def volume_snapshot(self, name: str) -> Iterator[VolumeSnapshot]:
        box = self._box(name)
        self._step("volume_snapshot", name)
        self._not_held(name)
        if box.record.limits.disk is None:
            raise RuntimeFailure(f"container {name!r} has no volume", "give it a disk limit")
        image = self.volume_image(name)
        self.snapshots.add(name)
        try:
            consistency = "frozen" if box.status == "running" else "stopped"
            yield VolumeSnapshot(image, image.stat().st_size, consistency)
        finally:
            self.snapshots.discard(name)

    def thaw_leftovers(self) -> list[str]:
        self._step("thaw_leftovers")
        thawed, self.frozen = self.frozen, []
        return thawed

    def state(self, name: str) -> ContainerState:
        box = self._box(name)
        return ContainerState(box.record, box.status, box.pid)

    def exec(self, name: str, spec: ExecSpec) -> Result:
        argv = spec.argv
        box = self._box(name)
        self._step("exec", name)
        self.execs.append(list(argv))
        if box.status != "running":
            raise RuntimeFailure(f"container {name!r} is not running", "start it first")
        if argv[0] in self.refused:
            return Result(tuple(argv), 1, "", self.refused[argv[0]] + "\n")
        user = argv[-1]
        if argv[0] == "groupadd":
            box.files["/etc/group"] += f"{user}:x:{argv[argv.index('-g') + 1]}:\n"
        elif argv[0] == "useradd":
            uid, gid = argv[argv.index("-u") + 1], argv[argv.index("-g") + 1]
            home, shell = argv[argv.index("-d") + 1], argv[argv.index("-s") + 1]
            box.files["/etc/passwd"] += f"{user}:x:{uid}:{gid}::{home}:{shell}\n"
            for group in argv[argv.index("-G") + 1].split(","):
                box.files["/etc/group"] = _join(box.files["/etc/group"], group, user)
        return Result(tuple(argv), 0, "", "")

    def set_limits(self, name: str, limits: Limits) -> dict[str, str]:
        box = self._box(name)
        self._step("set_limits", name)
        changed = [
            f.name
            for f in fields(Limits)
            if getattr(limits, f.name) != getattr(box.record.limits, f.name)
        ]
        box.record = replace(box.record, limits=limits)
        live = {key: key == "disk" or box.status == "running" for key in changed}
        return {key: "now" if now else "at next start" for key, now in live.items()}

    def background(self) -> contextlib.AbstractContextManager[list[str]]:
        """No cgroups here: programs run as they are."""
        return contextlib.nullcontext([])

    def uptime(self, name: str) -> float | None:
        """Unknown: the fake keeps no clock (auto-stop then counts from hostd's start)."""
        return None

    def report(self, name: str) -> Report:
        st = self.state(name)
        running = st.status == "running"
        return Report(
            st, 42.0 if st.pid else None, Usage(64 << 20, 1.5, 12) if running else None, 11 << 20
        )

    def network_config(self) -> NetworkConfig:
        return self.network

    def setup_network(self, forwards: Sequence[Forward]) -> bool:
        self._step("setup_network")
        self.forwards = list(forwards)
        created, self.bridge_up = not self.bridge_up, True
        return created

    def bridge_present(self) -> bool:
        return self.bridge_up

    def unattached(self, names: Iterable[str]) -> list[str]:
        self._step("unattached")
        return [n for n in names if n in self.boxes and n in self.detached]

    def ensure_attached(self, name: str) -> bool:
        if self._box(name).status != "running" or name not in self.detached:
            return False
        self.detached.discard(name)
        return True


def _join(group_db: str, group: str, user: str) -> str:
    """Add `user` to the members of `group` (as useradd -G does)."""
    lines = []
    for line in group_db.splitlines():
        fields_ = line.split(":")
        if fields_[0] == group:
            members = [m for m in fields_[3].split(",") if m] + [user]
            line = ":".join([*fields_[:3], ",".join(members)])
        lines.append(line)
    return "\n".join(lines) + "\n"
