"""Export and import of a tenant: its data volume, its record and, if asked, its home, as one
archive (hostd.archive), and back, on this host or another.

Export holds the tenant's lock while it reads a consistent volume (Runtime.volume_snapshot: a
stopped container's as it lies, a running one's frozen), so nothing starts, stops or removes
it meanwhile. The home is read by `tar` running as the user, never as root.

Import is an add (Tenants' own steps: the reservation, its undo, and reconcile after a crash)
whose container is made on the archive's volume. What can fail cheaply is checked from the
archives' first members before any data is written; the volume is streamed into a staging
file, checked against the manifests, and only then handed to Runtime.create, which shifts its
owners to the range given here. A failure, a full disk included, leaves nothing: no row, no
subuid entry, no container, no staging file. The home is extracted by `tar` as the user, who
cannot be made to write where they could not themselves, and never over their files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import IO

from hostd import archive
from hostd import protocol as p
from hostd.archive import CHUNK_SIZE, Header, Manifest, Meter, Reader, TenantRecord, Writer
from hostd.errors import HostdError
from hostd.state import MIGRATIONS, Tenant, utc_now
from hostd.tenants import Tenants, home_share
from hostd.units import human_size
from runtime.errors import Busy, Conflict, NotFound, RuntimeFailure
from runtime.ids import RANGE_SIZE, IdRange
from runtime.records import Container
from runtime.snapshot import ImportedVolume
from runtime.volume import data_chunks

log = logging.getLogger(__name__)

SCHEMA = len(MIGRATIONS)
TAR_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}  # messages parsed below: untranslated
SKIPPED = b": skipping existing file"  # GNU tar's words for a file --skip-old-files kept
Progress = Callable[[str], None]


class Transfers:
    def __init__(self, tenants: Tenants) -> None:
        self.tenants = tenants
        self._under_way: set[str] = set()
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def _only(self, user: str) -> Iterator[None]:
        """One export or import of a user at a time: a second is refused, not queued."""
        with self._guard:
            if user in self._under_way:
                raise Busy(f"an export or import of {user} is under way", "wait for it to end")
            self._under_way.add(user)
        try:
            yield
        finally:
            with self._guard:
                self._under_way.discard(user)

    # -- export ----------------------------------------------------------------------------

    def frozen_for_export(self, user: str) -> bool:
        """Whether an export of `user` now would freeze a running container."""
        return not self.tenants.is_down(user)

    def export(
        self,
        user: str,
        out: int,
        since: tuple[int, str] | None,
        with_home: bool,
        progress: Progress,
        manifest_to: int | None = None,
        background: bool = False,
    ) -> p.Exported:
        """Write `user`'s archive to `out`: full, or with `since` (the parent's fd and name)
        only the chunks changed since that archive. Its manifest also goes to `manifest_to`
        once the archive is complete (the copy backups keep, for the next incremental).
        `background`: the compression and the home's tar run behind every tenant (a stopped
        tenant's backup)."""
        began = time.monotonic()
        t = self.tenants.get(user)
        parent = None
        if since is not None:
            progress(f"reading the parent's manifest from {since[1]}")
            parent = archive.parent_manifest(since[0], since[1], SCHEMA)
        meter = Meter(progress, "exported")
        behind = self.tenants.runtime.background() if background else contextlib.nullcontext([])
        with self._only(user), behind as prefix, Writer(out, prefix) as w:
            head, hs, ts, chunks, sent, frozen = self._export_volume(t, w, parent, meter, with_home)
            pieces: list[str] = []
            warning = None
            if with_home:
                progress(f"reading {t.home} as {user}")
                pieces, warning = self._export_home(t, w, meter, prefix)
            manifest = Manifest(head.id, head.volume_size, chunks, (*pieces,), hs, ts).encode()
            w.add(archive.MANIFEST, manifest)
            w.finish()
        if manifest_to is not None:
            with open(manifest_to, "wb", closefd=False) as f:
                f.write(manifest)
        st = os.fstat(out)
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        self.tenants.state.log_event(
            user, f"export {head.kind} id={head.id} {head.consistency} chunks={sent}"
        )
        return p.Exported(
            user,
            head.id,
            head.kind,
            head.parent,
            size,
            sent,
            len(chunks),
            len(pieces),
            head.consistency,
            frozen,
            round(time.monotonic() - began, 1),
            warning,
        )

    def _export_volume(
        self, t: Tenant, w: Writer, parent: Manifest | None, meter: Meter, with_home: bool
    ) -> tuple[Header, str, str, dict[int, str], int, float | None]:
        """Header, record and the volume's chunks, under the tenant's lock, from a snapshot
        (held as briefly as the copy allows); the header, their sha256, every chunk's sha256,
        how many were written, and how long the container was frozen."""
        tenants = self.tenants
        with tenants._lock(t.user):
            t = tenants.get(t.user)
            if t.phase != "ready":
                raise Busy(f"{t.user} is being set up or removed ({t.phase})", "try again later")
            record = self._record(t)
            with tenants.runtime.volume_snapshot(t.user) as snap:
                held = time.monotonic()
                if snap.consistency == "frozen":
                    meter.progress("frozen: exporting the volume")
                else:
                    meter.progress("stopped: exported as it is")
                head = Header(
                    format=archive.FORMAT,
                    schema=SCHEMA,
                    id=uuid.uuid4().hex,
                    kind="full" if parent is None else "incremental",
                    parent=None if parent is None else parent.id,
                    user=t.user,
                    created=utc_now(),
                    host=os.uname().nodename,
                    hostd=version("hostd"),
                    consistency=snap.consistency,
                    chunk_size=CHUNK_SIZE,
                    volume_size=snap.size,
                    with_home=with_home,
                    data_size=min(os.stat(snap.path).st_blocks * 512, snap.size),
                )
                hs = w.add(archive.HEADER, head.encode())
                ts = w.add(archive.TENANT, record.encode())
                chunks: dict[int, str] = {}
                sent = 0
                old = parent.chunks if parent is not None else {}
                for n, data in data_chunks(snap.path, CHUNK_SIZE):
                    digest = chunks[n] = archive.sha256(data)
                    if old.get(n) != digest:
                        w.add(f"volume/{n:08d}", data, digest)
                        sent += 1
                    meter.update(w.written)
                held = time.monotonic() - held
        frozen = None
        if head.consistency == "frozen":
            frozen = round(held, 1)
            meter.progress(f"thawed: frozen for {frozen:.1f} s")
        return head, hs, ts, chunks, sent, frozen

    def _record(self, t: Tenant) -> TenantRecord:
        state = self.tenants.state
        return TenantRecord(
            user=t.user,
            range_start=t.range_start,
            image=t.image,
            image_version=Path(self.tenants.runtime.get(t.user).image_dir).name,
            limits=state.quota(t.user),
            ports=tuple((a, b) for a, b, u in state.port_grants() if u == t.user),
            auto_stop=state.auto_stops().get(t.user),
            desired=t.desired,
            created=t.created,
        )

    def _export_home(
        self, t: Tenant, w: Writer, meter: Meter, behind: Sequence[str]
    ) -> tuple[list[str], str | None]:
        """The home as a tar stream made by `tar` as the user (started behind the argv prefix
        `behind`), in pieces; the pieces' sha256 and what tar could not read, if anything."""
        pw = self.tenants.getpwnam(t.user)
        argv = ["tar", "-C", pw.pw_dir, "--one-file-system", "-cf", "-", "."]
        with _as_user(argv, pw, stdin=subprocess.PIPE, behind=behind) as (tar, errors):
            assert tar.stdout is not None and tar.stdin is not None
            tar.stdin.close()
            pieces: list[str] = []
            while piece := tar.stdout.read(CHUNK_SIZE):
                pieces.append(w.add(f"home/{len(pieces):08d}", piece))
                meter.update(w.written)
            code = tar.wait()
        if code > 1 and not pieces:
            raise HostdError(
                f"tar as {t.user} could not read {pw.pw_dir}: {errors.last}", "see why"
            )
        warning = None
        if code > 1:
            warning = f"tar as {t.user} could not read all of {pw.pw_dir}: {errors.last}"
        return pieces, warning

    # -- import ----------------------------------------------------------------------------

    def import_(
        self,
        fds: Sequence[int],
        names: Sequence[str],
        as_user: str | None,
        range_mode: str,
        with_home: bool,
        start: bool,
        progress: Progress,
    ) -> p.Imported:
        """Make a tenant from a chain of archives: a full one, then its incrementals."""
        if not fds or len(fds) != len(names):
            raise HostdError(
                f"{len(names)} archive names for {len(fds)} files", "use `hostctl user import FILE`"
            )
        if range_mode not in ("auto", "keep"):
            raise HostdError(f"range {range_mode[:16]!r} is not auto or keep", "give one of them")
        began = time.monotonic()
        readers: list[Reader] = []
        try:
            records = []
            for fd, name in zip(fds, names, strict=True):
                readers.append(Reader(fd, name, SCHEMA))
                readers[-1].header()
                records.append(readers[-1].tenant())
            archive.check_chain(readers)
            done = self._import(readers, records[-1], as_user, range_mode, with_home, progress)
        finally:
            for r in readers:
                r.close()
        started, warning = done.started, done.warning
        if start and records[-1].desired == "running":
            try:
                self.tenants.start(done.user, progress)
                started = True
            except RuntimeFailure as exc:
                warning = f"{done.user} is imported but did not start: {exc}"
        return done._replace(
            started=started, warning=warning, seconds=round(time.monotonic() - began, 1)
        )

    def _import(
        self,
        readers: list[Reader],
        record: TenantRecord,
        as_user: str | None,
        range_mode: str,
        with_home: bool,
        progress: Progress,
    ) -> p.Imported:
        last = readers[-1]
        assert last.head is not None
        if with_home and not last.head.with_home:
            raise HostdError(f"{last.name} holds no home directory", "import without --with-home")
        user = as_user or record.user
        tenants = self.tenants
        pw = tenants._unix_account(user)
        with self._only(user), tenants._lock(user):
            self._check(user, record, readers)
            pick = None
            if range_mode == "keep":
                pick = lambda: self._keep_range(record.range_start, user)  # noqa: E731
            t = tenants._reserve(pw, record.image, record.limits, pick)
            progress(f"reserved IDs {IdRange(t.range_start)} for {user}")
            try:
                container, chunks, skipped = self._make(t, pw, record, readers, with_home, progress)
            except BaseException:
                self._undo(t)
                raise
            tenants.state.log_event(
                user,
                f"import from={last.head.host} id={last.head.id} archives={len(readers)}"
                f" range={t.range_start} was={record.range_start}",
            )
        version = Path(container.image_dir).name
        warning = None
        if version != record.image_version:
            warning = (
                f"{user}'s image {record.image} is {version} here, not {record.image_version}: "
                f"their own changes to its system files are set aside inside (as by `hostctl user "
                f"rebase {user}`); their Docker data and files are kept"
            )
        return p.Imported(
            user,
            t.range_start,
            t.range_start + RANGE_SIZE - 1,
            t.range_start != record.range_start,
            record.image,
            version,
            len(readers),
            chunks,
            skipped,
            False,
            warning,
            0.0,
        )

    def _check(self, user: str, record: TenantRecord, readers: Sequence[Reader]) -> None:
        """What can fail before any data is written, cheaply: the user, the image, the ports,
        the disk space (the range is checked under the allocation locks, by `_reserve`)."""
        tenants = self.tenants
        if tenants.state.tenant(user) is not None:
            raise Conflict(
                f"{user} is already a tenant here",
                "remove them first, or import as another user (--as)",
            )
        if tenants.runtime.exists(user):
            raise Conflict(
                f"a container named {user} is kept here (`user remove --keep-data`)",
                f"add {user} again (`hostctl user add {user}`), or delete it "
                f"(`hostd-runtime delete {user}`)",
            )
        try:
            tenants.runtime.images.resolve(record.image)
        except NotFound:
            raise NotFound(
                f"image {record.image} does not exist on this host",
                f"build or import it first (`hostctl image build {record.image}`)",
            ) from None
        for first, last in record.ports:
            tenants.addresses.check_grant(first, last)
            for a, b, owner in tenants.state.port_grants():
                if a <= last and first <= b:
                    raise Conflict(
                        f"ports {first}-{last} of the archive overlap {a}-{b} granted to {owner}",
                        f"revoke those first (`hostctl ports revoke {owner} {a}-{b}`)",
                    )
        need = max(r.head.data_size for r in readers if r.head is not None)
        st = os.statvfs(tenants.config.paths.state_dir)
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise HostdError(
                f"{tenants.config.paths.state_dir} has {human_size(free)} free, the volume "
                f"needs up to {human_size(need)}",
                "free space there, then import again",
            )

    def _keep_range(self, start: int, user: str) -> int:
        """--range keep: the archive's range, if nothing here holds it but the user's own kept
        or quarantined record (called under the allocation locks)."""
        self.tenants.ranges.check_free(start, user)
        return start

    def _make(
        self,
        t: Tenant,
        pw: pwd.struct_passwd,
        record: TenantRecord,
        readers: Sequence[Reader],
        with_home: bool,
        progress: Progress,
    ) -> tuple[Container, int, int | None]:
        """The reserved tenant's container on the archives' volume, then its quota, auto-stop,
        home, phase and ports; the container, the chunks read and the home files kept."""
        tenants = self.tenants
        runtime = tenants.runtime
        with contextlib.ExitStack() as stack:
            image = runtime.staging_file()
            stack.callback(image.unlink, missing_ok=True)
            home = runtime.staging_file() if with_home else None
            if home is not None:
                stack.callback(home.unlink, missing_ok=True)
            chunks = self._restore(image, home, readers, progress)
            progress("creating the container on the imported volume")
            head = readers[-1].head
            assert head is not None
            disk = max(record.limits.disk or tenants._whole_disk(), head.volume_size)
            container = runtime.create(
                t.user,
                record.image,
                IdRange(t.range_start),
                shares=[home_share(pw)],
                limits=replace(record.limits, disk=disk),
                address=tenants.addresses.address(t.user),
                volume=ImportedVolume(image, IdRange(record.range_start), record.image_version),
            )
            tenants._home_quota(t.user, pw.pw_dir, progress)
            if record.auto_stop is not None:
                tenants.state.set_auto_stop(t.user, record.auto_stop)
            skipped = None
            if home is not None:
                progress(f"restoring {pw.pw_dir} as {t.user}")
                skipped = _import_home(home, pw)
        tenants.state.set_phase(t.user, "ready")
        for first, last in record.ports:  # only a ready tenant may have port grants
            tenants.grant_ports(t.user, first, last)
        return container, chunks, skipped

    def _restore(
        self, image: Path, home: Path | None, readers: Sequence[Reader], progress: Progress
    ) -> int:
        """Each archive's chunks into the staging image, over its parent's; the last one's home
        pieces into `home`. The volume's data chunks."""
        parent: Manifest | None = None
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            with open(home or os.devnull, "wb") as sink:
                for r in readers:
                    progress(f"reading {r.name}")
                    into = sink if home is not None and r is readers[-1] else None
                    parent = r.restore(fd, into, parent, Meter(progress, "read"))
        finally:
            os.close(fd)
        assert parent is not None
        return len(parent.chunks)

    def _undo(self, t: Tenant) -> None:
        """Roll back an import as an add is: the container, the ports with the row, the range."""
        tenants = self.tenants
        if tenants.state.tenant(t.user) is None:
            return
        tenants.state.set_phase(t.user, "adding")
        tenants._undo_add(t, None)
        tenants.apply_network()


class _Tail:
    """A child's stderr, drained in a thread (a full pipe would stop the child): its last
    line, and how many lines said a file was skipped."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.last = ""
        self.skipped = 0
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        for line in stream:
            if SKIPPED in line:
                self.skipped += not line.startswith(b"tar: .: ")  # the home itself
            else:
                self.last = line[:300].decode(errors="replace").strip()

    def join(self) -> None:
        self._thread.join()


@contextlib.contextmanager
def _as_user(
    argv: list[str],
    pw: pwd.struct_passwd,
    stdin: int | IO[bytes] | None,
    behind: Sequence[str] = (),
) -> Iterator[tuple[subprocess.Popen[bytes], _Tail]]:
    """`argv` run as the user (their uid, gid and groups; never root), in /, stdout piped;
    killed if the block fails. `behind`: an argv prefix run as root first (only root may move
    a process into another cgroup), which setpriv then turns into the user."""
    groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    uid: int | None = pw.pw_uid
    gid: int | None = pw.pw_gid
    extra: list[int] | None = groups
    if behind:  # the prefix runs as root, setpriv becomes the user: no switch in the fork
        ids = [
            f"--reuid={pw.pw_uid}",
            f"--regid={pw.pw_gid}",
            f"--groups={','.join(map(str, groups))}",
        ]
        argv = [*behind, "setpriv", *ids, "--", *argv]
        uid = gid = extra = None
    child = subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        user=uid,
        group=gid,
        extra_groups=extra,
        cwd="/",
        env={**TAR_ENV, "HOME": pw.pw_dir},
    )
    assert child.stderr is not None
    tail = _Tail(child.stderr)
    try:
        yield child, tail
    except BaseException:
        child.kill()
        raise
    finally:
        child.wait()
        tail.join()
        for f in (child.stdin, child.stdout, child.stderr):
            if f is not None:
                f.close()


def _import_home(tarball: Path, pw: pwd.struct_passwd) -> int:
    """Extract the home's tar into the home as the user, never over a file that is there;
    how many files and directories (the home itself aside) were left as they were."""
    argv = [
        "tar",
        "-C",
        pw.pw_dir,
        "-xf",
        "-",
        "--skip-old-files",  # also leaves existing directories' owner and mode alone
        "--warning=existing-file",
    ]
    with open(tarball, "rb") as f, _as_user(argv, pw, stdin=f) as (tar, errors):
        assert tar.stdout is not None
        tar.stdout.read()
        code = tar.wait()
    errors.join()
    if code != 0:
        raise HostdError(
            f"restoring {pw.pw_dir} as {pw.pw_name} failed: {errors.last or f'tar exit {code}'}",
            "import without --with-home, then restore the files by hand",
        )
    return errors.skipped
