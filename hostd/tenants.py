"""Tenants: Unix users turned into owners of a system container. The daemon's core logic.

Adding a user is a transaction over three stores: the state database, /etc/subuid+subgid and
the runtime's container directory. The state row is written first (phase `adding`, with the
range), so a crash at any later point is repaired by `reconcile()`, and a range recorded in
the state is never handed out again until an admin releases it. The subuid/subgid entries name
the dedicated owner (`[subids] owner`), never the tenant: the state says whose range it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from hostd import hostlimits, passwd
from hostd.config import Config
from hostd.errors import HostdError
from hostd.state import IdRangeRecord, State, Tenant, utc_now
from hostd.subids import SubIdEntry, SubIdFiles, allocate, ensure_owner
from runtime import inside
from runtime.containers import Runtime
from runtime.errors import RuntimeFailure
from runtime.execs import ExecSpec
from runtime.ids import RANGE_SIZE, IdRange
from runtime.limits import Limits
from runtime.names import check_name
from runtime.netplan import Forward, host_services
from runtime.records import Container, Rebased
from runtime.shares import Share

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
INNER_ID_LIMIT = 60000  # inner IDs for the user's account stay below the range's nobody (65534)
FALLBACK_INNER_ID = 1000


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class TenantStatus:
    user: str
    state: str  # stopped | running | ... (the runtime's), or the tenant's phase while not ready
    uptime: float | None  # seconds since its init started
    memory: int | None  # bytes in use
    cpu_seconds: float | None
    pids: int | None
    disk: int  # bytes of its storage
    quota: Limits
    range_start: int
    image: str


@dataclass(frozen=True)
class Rebase:
    """What `user rebase` did (old == new: nothing to do)."""

    user: str
    image: str
    old: str  # image version, e.g. default@20261130T101010-a1b2c3
    new: str
    restarted: bool = False
    warning: str | None = None  # what was set aside, where the user finds it
    pruned: tuple[str, ...] = ()  # image versions no tenant used any more, deleted


@dataclass(frozen=True)
class Account:
    """An account inside a container, as runc exec needs it."""

    ids: str  # uid:gid
    groups: list[int]
    env: list[str]
    home: str


def inner_id(host_id: int) -> int:
    """The account's ID inside: the host's when it fits the range's usual user space."""
    return host_id if 0 < host_id < INNER_ID_LIMIT else FALLBACK_INNER_ID


class Tenants:
    def __init__(self, config: Config, state: State, runtime: Runtime) -> None:
        self.config = config
        self.state = state
        self.runtime = runtime
        self.subids = SubIdFiles(config.paths.subuid, config.paths.subgid)
        self.owner = config.subids.owner  # who the ranges are registered under
        self.network = runtime.network_config()
        self._alloc = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._network = threading.Lock()  # one bridge and nft table for all tenants
        self.stopping: set[str] = set()  # containers being stopped right now

    def _lock(self, user: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(user, threading.Lock())

    # -- lookups ---------------------------------------------------------------------------

    def get(self, user: str) -> Tenant:
        check_name(user, "user")
        tenant = self.state.tenant(user)
        if tenant is None:
            raise HostdError(f"{user} is not a tenant", f"add them with `hostctl user add {user}`")
        return tenant

    def _account(self, user: str) -> pwd.struct_passwd:
        check_name(user, "user")
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise HostdError(
                f"no Unix account named {user!r}", f"create it first (`adduser {user}`)"
            ) from None
        if pw.pw_uid == 0 or pw.pw_uid < self.config.users.min_uid:
            raise HostdError(
                f"{user} is a system account (uid {pw.pw_uid} < {self.config.users.min_uid})",
                "only human users can be tenants (see [users] min_uid in hostd.toml)",
            )
        if not os.path.isdir(pw.pw_dir):
            raise HostdError(
                f"home directory {pw.pw_dir} of {user} does not exist",
                f"create it (`mkhomedir_helper {user}`)",
            )
        return pw

    def _share(self, pw: pwd.struct_passwd) -> Share:
        return Share(
            pw.pw_dir, pw.pw_dir, pw.pw_uid, pw.pw_gid, inner_id(pw.pw_uid), inner_id(pw.pw_gid)
        )

    # -- add / remove ----------------------------------------------------------------------

    def add(
        self,
        user: str,
        image: str | None = None,
        quota: Limits | None = None,
        progress: Progress = _quiet,
    ) -> Tenant:
        pw = self._account(user)
        image = image or self.config.runtime.default_image
        quota = quota or self.config.limits
        self.runtime.images.resolve(image)  # fail before touching anything
        with self._lock(user):
            if self.state.tenant(user) is not None:
                raise HostdError(f"{user} is already a tenant", "see `hostctl user show`")
            with self._alloc, self.subids.locked():
                kept = self.state.kept_range(user)
                start = kept if kept is not None else self._allocate()
                tenant = Tenant(
                    user,
                    pw.pw_uid,
                    pw.pw_gid,
                    pw.pw_dir,
                    start,
                    image,
                    "adding",
                    "stopped",
                    utc_now(),
                )
                self.state.begin_add(tenant, quota)
                try:
                    self.subids.add(self.owner, start, RANGE_SIZE)
                except BaseException:
                    self.state.delete_tenant(user, "free" if kept is None else "kept")
                    raise
            try:
                self._home_quota(user, pw.pw_dir, progress)
                progress(f"creating the container ({RANGE_SIZE} IDs from {start})")
                self._create_container(tenant, pw, quota)
            except BaseException:
                self._forget(tenant, undo_add=True)
                raise
            self.state.set_phase(user, "ready")
            self.state.log_event(user, f"add image={image} range={start}")
            log.info("added tenant %s (IDs %s)", user, IdRange(start))
            return replace(tenant, phase="ready")

    def _allocate(self) -> int:
        """A fresh range: free in both files and in the state (quarantined ones included).
        Call with the subuid files locked."""
        uids, gids = self.subids.read()
        cfg = self.config.subids
        return allocate(uids, gids, self.state.range_starts(), cfg.min, cfg.max, RANGE_SIZE)

    def _create_container(self, t: Tenant, pw: pwd.struct_passwd, quota: Limits) -> None:
        ids = IdRange(t.range_start)
        try:
            existing = self.runtime.get(t.user)
        except RuntimeFailure:
            existing = None
        if existing is not None:  # kept by `user remove --keep-data`: adopt it
            if existing.ids != ids:
                raise HostdError(
                    f"a container named {t.user} exists with IDs {existing.ids}, not {ids}",
                    f"delete it (`hostd-runtime delete {t.user}`) or restore /etc/subuid",
                )
            kept = None if existing.address is None else self._slot(IPv4Address(existing.address))
            self.state.address_index(t.user, prefer=kept)
            self.runtime.set_limits(t.user, replace(quota, disk=existing.limits.disk))
            return
        self.runtime.create(
            t.user,
            t.image,
            ids,
            shares=[self._share(pw)],
            limits=replace(quota, disk=quota.disk or self._whole_disk()),
            address=self.address(t.user),
        )

    def _home_quota(self, user: str, home: str, progress: Progress) -> None:
        """The home is outside the container's volume: cap it with `[limits] home` where the
        host enforces user quotas (hostlimits); unset, the user's quota is left alone."""
        if self.config.home_quota is not None:
            done = hostlimits.apply_home_quota(user, home, self.config.home_quota)
            progress(done)
            log.info("%s: %s", user, done)

    def _slot(self, address: IPv4Address) -> int:
        return int(address) - int(self.network.address_for(0))

    def address(self, user: str) -> IPv4Address:
        """The tenant's address on the bridge (allocated once, kept in the state)."""
        held = [
            self._slot(IPv4Address(c.address))
            for c in self.runtime.containers()
            if c.address is not None and c.name != user
        ]
        return self.network.address_for(self.state.address_index(user, exclude=held))

    def _whole_disk(self) -> int:
        """The volume size of an unlimited tenant: the host file system's (the file is sparse)."""
        st = os.statvfs(self.config.paths.state_dir)
        return st.f_blocks * st.f_frsize

    def _forget(self, t: Tenant, undo_add: bool = False) -> None:
        """Drop a tenant: container, then state row (in that order). A removal quarantines
        its range (the subuid entries stay, allocation skips it) until an admin releases it.
        Undoing an add frees the range (nothing ran on it), except for a container kept from
        before it (`remove --keep-data`): that stays, with its IDs, as it was before the add."""
        kept = self._kept_before(t) if undo_add else None
        if kept is None and self.runtime.exists(t.user):
            self.runtime.delete(t.user, force=True)
        if not undo_add:
            self.state.delete_tenant(t.user, "quarantined")
        elif kept is not None and kept.ids.start == t.range_start:
            self.state.delete_tenant(t.user, "kept")
        else:
            with self.subids.locked():
                self.subids.remove(self.owner, t.range_start, RANGE_SIZE)
            self.state.delete_tenant(t.user, "free")

    def _kept_before(self, t: Tenant) -> Container | None:
        """t's container if it existed before t was (re-)added: not the add's to delete."""
        try:
            c = self.runtime.get(t.user)
        except RuntimeFailure:
            return None
        return c if datetime.fromisoformat(c.created) < datetime.fromisoformat(t.created) else None

    def remove(self, user: str, keep_data: bool = False, progress: Progress = _quiet) -> None:
        """Stop and forget a tenant. Without `keep_data` its files go and its IDs are
        quarantined; with it, container and IDs stay reserved for a later `add`."""
        with self._lock(user):
            t = self.get(user)
            if keep_data:
                progress("stopping the container")
                self._stop_container(user)
                self.state.delete_tenant(user, "kept")
            else:
                self.state.set_phase(user, "removing")  # a crash from here on is finished later
                progress("stopping the container")
                self._stop_container(user)
                progress("deleting the container and its data")
                self._forget(t)
            self.state.log_event(user, "remove" + (" keep-data" if keep_data else ""))
        self.apply_network()  # their port grants went with them
        if not keep_data:
            self._prune()  # the version of their image, if nobody else uses it

    # -- run state -------------------------------------------------------------------------

    def start(self, user: str, progress: Progress = _quiet) -> None:
        with self._lock(user):
            self._start(self.get(user), progress)

    def _start(self, t: Tenant, progress: Progress) -> None:
        """Start t's container and wait until it is ready; call with t's lock held."""
        if self.runtime.state(t.user).status != "running":
            progress("starting the container")
            if self.apply_network():  # the bridge was gone: deleted by hand, say
                for line in self._reattach():
                    log.warning("%s", line)
            self.runtime.start(t.user)
        progress("waiting for systemd and dockerd")
        self.runtime.wait_ready(t.user)
        self._ensure_account(t)
        self.state.set_desired(t.user, "running")

    def stop(self, user: str) -> None:
        with self._lock(user):
            self.get(user)
            self._stop_container(user)
            self.state.set_desired(user, "stopped")

    def _stop_container(self, user: str) -> None:
        self.stopping.add(user)
        try:
            self.runtime.stop(user, self.config.runtime.stop_timeout)
        except RuntimeFailure as exc:
            if "does not exist" not in exc.cause:
                raise
        finally:
            self.stopping.discard(user)

    def is_down(self, user: str) -> bool:
        """Stopped or being stopped (sessions inside are ending because of it)."""
        return user in self.stopping or self.runtime.state(user).status != "running"

    def restart(self, user: str, progress: Progress = _quiet) -> None:
        self.stop(user)
        self.start(user, progress)

    def rebase(
        self,
        user: str,
        image: str | None = None,
        restart: bool = False,
        progress: Progress = _quiet,
    ) -> Rebase:
        """Move a tenant to the current version of `image` (default: its own image name),
        keeping its Docker data and home; its old upper layer is set aside (Runtime.rebase).
        A running tenant is refused unless `restart`: then stopped, moved and started again,
        or, if the move fails, started again on its old image."""
        with self._lock(user):
            t = self.get(user)
            if t.phase != "ready":
                raise HostdError(
                    f"{user} is being set up or removed ({t.phase})", "try again in a minute"
                )
            image = image or t.image
            target = self.runtime.images.resolve(image)  # an unknown image fails here
            old = self.runtime.get(user)
            if old.image == image and Path(old.image_dir) == target:
                return Rebase(user, image, target.name, target.name)
            running = self.runtime.state(user).status != "stopped"
            if running and not restart:
                raise HostdError(
                    f"{user}'s container is running",
                    f"stop it first (`hostctl stop {user}`), or rebase with --restart",
                )
            if running:
                progress("stopping the container")
                self._stop_container(user)
            progress(f"moving {user} from {Path(old.image_dir).name} to {target.name}")
            try:
                done = self.runtime.rebase(user, image)
            except BaseException:
                if running:
                    self._start_again(t, progress)
                raise
            if done is None:  # moved meanwhile, by the runtime's own CLI
                return Rebase(user, image, target.name, target.name)
            self.state.set_image(user, image)
            self.state.log_event(
                user,
                f"rebase image={image} from={Path(done.old_image_dir).name}"
                f" to={target.name} set-aside={done.set_aside}",
            )
            warning = _set_aside_warning(t, done)
            if running:
                try:
                    self._start(replace(t, image=image), progress)
                except RuntimeFailure as exc:
                    raise HostdError(
                        f"{user} is now on {target.name} but did not come up: {exc.cause}",
                        f"{exc.fix}; {warning}",
                    ) from exc
        return Rebase(
            user, image, Path(done.old_image_dir).name, target.name, running, warning, self._prune()
        )

    def _prune(self) -> tuple[str, ...]:
        """Delete the image versions no tenant uses any more; housekeeping that never fails
        the change it follows."""
        try:
            return tuple(self.runtime.prune_images())
        except (RuntimeFailure, OSError) as exc:
            log.warning("cannot prune unused image versions: %s", exc)
            return ()

    def _start_again(self, t: Tenant, progress: Progress) -> None:
        """Start a tenant whose rebase failed on its old image; the failure is what counts."""
        try:
            progress("starting the container again on its old image")
            self._start(t, progress)
        except RuntimeFailure as exc:
            log.error("cannot start %s again after a failed rebase: %s", t.user, exc)

    def _ensure_account(self, t: Tenant) -> None:
        """The user's account inside: same name, home at the host path, sudo and docker."""
        uid, gid = inner_id(t.uid), inner_id(t.gid)
        script = (
            'getent group "$1" >/dev/null || getent group "$3" >/dev/null '
            '|| groupadd -g "$3" "$1"; '
            'getent passwd "$1" >/dev/null || useradd -u "$2" -g "$3" -G sudo,docker '
            '-M -d "$4" -s /bin/bash "$1"'
        )
        res = self.runtime.exec(
            t.user, ExecSpec(["sh", "-c", script, "-", t.user, str(uid), str(gid), t.home])
        )
        if res.returncode != 0:
            raise HostdError(
                f"cannot create the account {t.user} inside: {res.last_error_line()}",
                "see `hostctl logs`",
            )

    def account(self, container: str, account: str) -> Account:
        """runc's numeric IDs, login environment and home of an account inside."""
        if re.fullmatch(r"\d+(:\d+)?", account):
            uid, _, gid = account.partition(":")
            return Account(f"{uid}:{gid or uid}", [], [], "/")
        pid = self.runtime.state(container).pid
        if not pid:
            raise HostdError(f"{container}'s container is not running", "start it first")
        try:
            users, groups = (
                inside.read_file(pid, f"/etc/{db}", passwd.MAX_DB).decode(errors="replace")
                for db in ("passwd", "group")
            )
            entry = passwd.lookup(users, groups, account)
        except RuntimeFailure:
            if account != "root":
                raise
            entry = passwd.ROOT  # an admin can still get in to repair the files
        if entry is None:
            raise HostdError(
                f"no account {account!r} inside {container}'s container",
                "give an existing user (or root)",
            )
        name, shell = entry.name, entry.shell
        env = [f"HOME={entry.home}", f"USER={name}", f"LOGNAME={name}", f"SHELL={shell}"]
        return Account(f"{entry.uid}:{entry.gid}", list(entry.groups), env, entry.home)

    def set_quota(self, user: str, changes: dict[str, Any]) -> dict[str, str]:
        """Change some limits. Says for each whether it applies "now" (to the running
        container) or "at next start"."""
        with self._lock(user):
            t = self.get(user)
            self._home_quota(user, t.home, _quiet)  # [limits] home may have changed
            quota = replace(self.state.quota(user), **changes)
            disk = self.runtime.get(user).limits.disk
            if "disk" in changes:  # no disk quota: a volume as big as the host's file system
                disk = quota.disk or self._whole_disk()
            live = self.runtime.set_limits(user, replace(quota, disk=disk))
            when = {key: "now" if live.get(key, True) else "at next start" for key in changes}
            self.state.set_quota(user, quota)
            self.state.log_event(user, "quota " + " ".join(f"{k}={v}" for k, v in changes.items()))
            return when

    # -- ports -----------------------------------------------------------------------------

    def grants(self) -> list[Forward]:
        return [Forward(a, b, self.address(u)) for a, b, u in self.state.port_grants()]

    def apply_network(self) -> bool:
        """Bridge and nft rules exactly as the state says (when hostd or a container starts,
        and after every change). True when the bridge had to be created."""
        with self._network:
            return self.runtime.setup_network(self.grants())

    def _reattach(self) -> list[str]:
        """Put running tenants whose veth is off the bridge back on it; what was done."""
        done = []
        for t in self.state.tenants():
            try:
                if t.phase == "ready" and self.runtime.ensure_attached(t.user):
                    done.append(f"re-attached {t.user} to the bridge")
            except RuntimeFailure as exc:  # stopped meanwhile, say: the others still matter
                done.append(f"cannot re-attach {t.user}: {exc}")
        return done

    def grant_ports(self, user: str, first: int, last: int) -> None:
        self.get(user)
        if first < 1024 and not self.config.network.privileged_ports:
            raise HostdError(
                f"ports below 1024 ({first}) are privileged",
                "grant ports >= 1024, or set [network] privileged_ports = true",
            )
        busy = sorted(p for p in host_services() if first <= p <= last)
        if busy:
            raise HostdError(
                f"port {busy[0]} is in use on the host: a service listens on it",
                "grant other ports, or move that service first",
            )
        self.state.grant_ports(user, first, last)
        try:
            self.apply_network()
        except BaseException:
            self.state.revoke_ports(user, first, last)
            raise
        self.state.log_event(user, f"ports grant {first}-{last}")

    def revoke_ports(self, user: str, first: int, last: int) -> None:
        self.state.revoke_ports(user, first, last)
        self.apply_network()
        self.state.log_event(user, f"ports revoke {first}-{last}")

    # -- status ----------------------------------------------------------------------------

    def status(self, user: str) -> TenantStatus:
        t = self.get(user)
        quota = self.state.quota(user)
        if t.phase != "ready":
            return TenantStatus(
                user, t.phase, None, None, None, None, 0, quota, t.range_start, t.image
            )
        st = self.runtime.state(user)
        used = self.runtime.usage(user) if st.status == "running" else None
        return TenantStatus(
            user=user,
            state=st.status,
            uptime=_uptime(st.pid) if st.pid else None,
            memory=used.memory if used else None,
            cpu_seconds=used.cpu_seconds if used else None,
            pids=used.pids if used else None,
            disk=self.runtime.disk_used(user),
            quota=quota,
            range_start=t.range_start,
            image=t.image,
        )

    # -- ID ranges -------------------------------------------------------------------------

    def release_range(self, start: int) -> IdRangeRecord:
        """Let allocation hand a quarantined range out again (an admin's decision): its
        subuid/subgid entries go, then its record."""
        with self._alloc, self.subids.locked():
            return self.state.release_range(
                start, lambda: self.subids.remove(self.owner, start, RANGE_SIZE)
            )

    def migrate_ranges(self) -> list[str]:
        """Bring an installation from before the dedicated owner up to date, once, at start:
        create the owner, record ranges of containers kept by `remove --keep-data`, and give
        every recorded range's entries under the user's own name (or uid), which newuidmap
        would let the user map, to the owner. Idempotent; returns what was done."""
        done = []
        if ensure_owner(self.owner, self.config.users.min_uid):
            done.append(f"created the locked system account {self.owner} for tenants' ID ranges")
        with self._alloc, self.subids.locked():
            done += self._record_kept_containers()
            for r in self.state.ranges():
                if self.subids.reown(r.start, RANGE_SIZE, self._legacy_owners(r.user), self.owner):
                    what = f"IDs {IdRange(r.start)} of {r.user} moved to owner {self.owner}"
                    self.state.log_event(r.user, what)
                    done.append(f"{what} in {self.subids.subuid} and {self.subids.subgid}")
        return done

    def _record_kept_containers(self) -> list[str]:
        """Record as kept the ranges of containers an older hostd kept (no tenant row, an
        entry under the container's user in subuid); call with the subuid files locked."""
        uids, _ = self.subids.read()
        recorded = {r.start for r in self.state.ranges()}
        tenants = {t.user for t in self.state.tenants()}
        done = []
        for c in self.runtime.containers():
            start = c.ids.start
            if c.name in tenants or start in recorded:
                continue
            if any(SubIdEntry(o, start, RANGE_SIZE) in uids for o in self._legacy_owners(c.name)):
                self.state.keep_range(start, c.name)
                done.append(f"recorded IDs {c.ids} as kept for {c.name}")
        return done

    def _legacy_owners(self, user: str) -> set[str]:
        """How an older hostd named `user` in subuid/subgid: by name, or by uid."""
        owners = {user}
        tenant = self.state.tenant(user)
        if tenant is not None:
            owners.add(str(tenant.uid))
        with contextlib.suppress(KeyError):
            owners.add(str(pwd.getpwnam(user).pw_uid))
        return owners - {self.owner}

    # -- crash repair ----------------------------------------------------------------------

    def _running(self, user: str) -> bool:
        try:
            return self.runtime.state(user).status == "running"
        except RuntimeFailure:  # removed meanwhile
            return True

    def reconcile(self) -> list[str]:
        """Finish or roll back what a crash interrupted; restart tenants that should run.
        Returns what was done, one line each."""
        self.runtime.close_dirs()
        self.apply_network()
        done = self._reattach()
        # Requests are served meanwhile: each repair happens under the user's lock, on what
        # the state says once it is held (a request may have finished the work).
        for user in [t.user for t in self.state.tenants() if t.phase != "ready"]:
            with self._lock(user):
                t = self.state.tenant(user)
                if t is not None and t.phase == "adding":
                    self._forget(t, undo_add=True)
                    done.append(f"rolled back the interrupted add of {t.user}")
                elif t is not None and t.phase == "removing":
                    self._stop_container(t.user)
                    self._forget(t)
                    done.append(f"finished removing {t.user}")
        for name in self.runtime.incomplete():
            with self._lock(name):  # an add holds it while it creates the container
                if name in self.runtime.incomplete():
                    self.runtime.delete(name, force=True)
                    done.append(f"removed the remains of the interrupted creation of {name}")
        for t in self.state.tenants():
            if t.phase == "ready" and t.desired == "running" and not self._running(t.user):
                try:
                    self.start(t.user)
                    done.append(f"restarted {t.user}")
                except RuntimeFailure as exc:
                    done.append(f"cannot restart {t.user}: {exc}")
        return done


def _set_aside_warning(t: Tenant, done: Rebased) -> str:
    """What the tenant loses from sight, and where they still find it."""
    text = (
        f"{t.user}'s own changes to the old system files (packages they installed, edits "
        f"under /etc, files outside their home and Docker's data) are not carried over: they "
        f"are set aside inside the container at {done.set_aside} (on their disk quota: "
        "`sudo rm -rf` it once done)"
    )
    if done.packages:
        text += f"; packages to reinstall: {' '.join(done.packages)}"
    return text


def _uptime(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            now = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, now - start_ticks / os.sysconf("SC_CLK_TCK"))
