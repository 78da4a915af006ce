"""Tenants: Unix users turned into owners of a system container. The daemon's core logic.

Adding a user is one transaction over three stores, in this order:
  1. check the user (a human Unix account with a home), look at the runtime's containers once
     (one kept by `remove --keep-data` is adopted, the others' addresses avoided) and resolve
     the image, so bad input fails before anything changes;
  2. reserve: the state row (phase `adding`, with its ID range) and the range's subuid/subgid
     entries, under the allocation locks (hostd.ranges);
  3. create the container (or adopt the kept one), cap the home, mark the tenant `ready`.
A failure in 3 undoes 2; a crash anywhere after 2 is undone by `reconcile()`, and a range
recorded in the state is never handed out again until an admin releases it.

Who checks what: hostd the users and ranges (Unix account and uid here; ranges against
/etc/subuid and the state in hostd.ranges; "already a tenant" and ranges in use in the state's
own transaction); the runtime its containers' invariants (names, images, overlapping ranges or
addresses among containers).
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from hostd import hostlimits
from hostd.addresses import Addresses
from hostd.backend import ContainerRuntime
from hostd.config import Config, format_duration
from hostd.errors import HostdError
from hostd.inneraccounts import Account, InnerAccounts, ReadFile, inner_id
from hostd.ranges import GetPwNam, Ranges
from hostd.startqueue import StartQueue
from hostd.state import IdRangeRecord, State, Tenant, not_a_tenant, utc_now
from hostd.status import TenantStatus, tenant_status
from hostd.subids import SubIdFiles
from runtime import inside
from runtime.errors import Busy, Conflict, NotFound, RuntimeFailure
from runtime.ids import RANGE_SIZE, IdRange
from runtime.limits import Limits
from runtime.names import check_name
from runtime.records import Container, Rebased
from runtime.shares import Share

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


__all__ = ["Account", "Progress", "Rebase", "TenantStatus", "Tenants"]


def _quiet(_: str) -> None:
    pass


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


class Tenants:
    def __init__(
        self,
        config: Config,
        state: State,
        runtime: ContainerRuntime,
        *,
        getpwnam: GetPwNam = pwd.getpwnam,
        read_file: ReadFile = inside.read_file,
    ) -> None:
        self.config = config
        self.state = state
        self.runtime = runtime
        self.getpwnam = getpwnam  # the host's accounts (a seam for tests)
        subids = SubIdFiles(config.paths.subuid, config.paths.subgid)
        bounds = (config.subids.min, config.subids.max)
        self.ranges = Ranges(
            state,
            subids,
            config.subids.owner,
            bounds,
            getpwnam,
            source=config.subids.source,
            min_uid=config.users.min_uid,
        )
        self.addresses = Addresses(state, runtime, config.network.privileged_ports)
        self.inner = InnerAccounts(runtime, read_file)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.stopping: set[str] = set()  # containers being stopped right now
        self.starts = StartQueue(config.runtime.parallel_starts)

    def _lock(self, user: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(user, threading.Lock())

    # -- lookups ---------------------------------------------------------------------------

    def get(self, user: str) -> Tenant:
        tenant = self.state.tenant(user)
        if tenant is None:
            raise not_a_tenant(user)
        return tenant

    def _unix_account(self, user: str) -> pwd.struct_passwd:
        """The user's host account, if it may own a container: a valid name, a human's uid,
        an existing home."""
        check_name(user, "user")
        try:
            pw = self.getpwnam(user)
        except KeyError:
            raise NotFound(
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

    def account(self, container: str, account: str) -> Account:
        """runc's numeric IDs, login environment and home of an account inside."""
        return self.inner.account(container, account)

    def address(self, user: str) -> IPv4Address:
        """The tenant's address on the bridge (allocated once, kept in the state)."""
        return self.addresses.address(user)

    # -- add / remove ----------------------------------------------------------------------

    def add(
        self,
        user: str,
        image: str | None = None,
        quota: Limits | None = None,
        progress: Progress = _quiet,
    ) -> Tenant:
        pw = self._unix_account(user)
        quota = quota or self.config.limits
        with self._lock(user):
            containers = self.runtime.containers()
            kept = next((c for c in containers if c.name == user), None)
            image = self._image_for(user, image, kept)
            tenant = self._reserve(pw, image, quota)
            try:
                if kept is None:
                    progress(f"creating the container ({RANGE_SIZE} IDs from {tenant.range_start})")
                    self.runtime.create(
                        user,
                        image,
                        IdRange(tenant.range_start),
                        shares=[home_share(pw)],
                        limits=replace(quota, disk=quota.disk or self._whole_disk()),
                        address=self.addresses.address(user, containers),
                    )
                else:
                    self._adopt(tenant, kept, quota)
                self._home_quota(user, pw.pw_dir, progress)
            except BaseException:
                self._undo_add(tenant, kept)
                raise
            self.state.set_phase(user, "ready")
            self.state.log_event(user, f"add image={image} range={tenant.range_start}")
            log.info("added tenant %s (IDs %s)", user, IdRange(tenant.range_start))
            return replace(tenant, phase="ready")

    def _image_for(self, user: str, image: str | None, kept: Container | None) -> str:
        """The image asked for, else the kept container's, else the default; an unknown one
        fails here, before anything changes. A kept container stays on its own image: moving
        it is `rebase`'s work."""
        if kept is None:
            image = image or self.config.runtime.default_image
            self.runtime.images.resolve(image)
            return image
        if image is not None and image != kept.image:
            raise Conflict(
                f"the container kept for {user} is on image {kept.image}, not {image}",
                f"add {user} without --image, then `hostctl user rebase {user} {image}`",
            )
        return kept.image

    def _reserve(
        self,
        pw: pwd.struct_passwd,
        image: str,
        quota: Limits,
        pick: Callable[[], int] | None = None,
    ) -> Tenant:
        """The state row (phase `adding`, with the range kept for the user or a fresh one, or
        the one `pick` says under the allocation locks) and the range's subuid/subgid
        entries: both or neither."""
        with self.ranges.locked():
            kept = self.state.kept_range(pw.pw_name)
            if pick is not None:
                start = pick()
            else:
                start = kept if kept is not None else self.ranges.range_for(pw)
            t = Tenant(
                pw.pw_name,
                pw.pw_uid,
                pw.pw_gid,
                pw.pw_dir,
                start,
                image,
                "adding",
                "stopped",
                utc_now(),
            )
            self.state.begin_add(t, quota)  # refuses an existing tenant or a range in use
            try:
                self.ranges.register(start)
            except BaseException:
                self.state.delete_tenant(t.user, "kept" if start == kept else "free")
                raise
        return t

    def _adopt(self, t: Tenant, kept: Container, quota: Limits) -> None:
        """Take over the container kept by `remove --keep-data`: same IDs, same address, its
        volume as it is (a volume does not shrink), the quota's other limits."""
        ids = IdRange(t.range_start)
        if kept.ids != ids:
            raise Conflict(
                f"a container named {t.user} exists with IDs {kept.ids}, not {ids}",
                f"delete it (`hostd-runtime delete {t.user}`) or restore /etc/subuid",
            )
        self.addresses.adopt(t.user, kept.address)
        self.runtime.set_limits(t.user, replace(quota, disk=kept.limits.disk))

    def _undo_add(self, t: Tenant, kept: Container | None) -> None:
        """Roll back an add: a container kept from before stays as it was, with its range
        kept; otherwise the container goes and the range is freed (nothing ran on it)."""
        if kept is not None and kept.ids.start == t.range_start:
            self.state.delete_tenant(t.user, "kept")
            return
        if kept is None and self.runtime.exists(t.user):
            self.runtime.delete(t.user, force=True)
        self.ranges.free(t)

    def _kept_before(self, t: Tenant) -> Container | None:
        """t's container if it existed before t was (re-)added: not the add's to delete."""
        try:
            c = self.runtime.get(t.user)
        except RuntimeFailure:
            return None
        return c if datetime.fromisoformat(c.created) < datetime.fromisoformat(t.created) else None

    def _home_quota(self, user: str, home: str, progress: Progress) -> None:
        """The home is outside the container's volume: cap it with `[limits] home` where the
        host enforces user quotas (hostlimits); unset, the user's quota is left alone."""
        if self.config.home_quota is not None:
            done = hostlimits.apply_home_quota(user, home, self.config.home_quota)
            progress(done)
            log.info("%s: %s", user, done)

    def _whole_disk(self) -> int:
        """The volume size of an unlimited tenant: the host file system's (the file is sparse)."""
        st = os.statvfs(self.config.paths.state_dir)
        return st.f_blocks * st.f_frsize

    def remove(self, user: str, keep_data: bool = False, progress: Progress = _quiet) -> None:
        """Stop and forget a tenant. Without `keep_data` its files go and its IDs are
        quarantined; with it, container and IDs stay reserved for a later `add`. A failure
        half-way leaves the tenant `removing`: run it again (or reconcile finishes it)."""
        with self._lock(user):
            self.get(user)
            forwards = self.addresses.forwards()
            if keep_data:
                progress("stopping the container")
                self._stop_container(user)
                self.state.delete_tenant(user, "kept")
            else:
                self.state.set_phase(user, "removing")  # a crash from here on is finished later
                progress("deleting the container and its data")
                self._delete(user)
            self.state.log_event(user, "remove" + (" keep-data" if keep_data else ""))
        if self.addresses.forwards() != forwards:  # their port grants went with them
            self.apply_network()
        if not keep_data:
            self._prune()  # the version of their image, if nobody else uses it

    def _delete(self, user: str) -> None:
        """Container, then state row; the range stays quarantined until an admin releases it.
        A running container is killed at once, not halted: its data goes with it, so a clean
        shutdown would only make the caller wait (about half a second of systemd's)."""
        self.stopping.add(user)
        try:
            if self.runtime.exists(user):
                self.runtime.delete(user, force=True)
        finally:
            self.stopping.discard(user)
        self.state.delete_tenant(user, "quarantined")

    # -- run state -------------------------------------------------------------------------

    def start(self, user: str, progress: Progress = _quiet) -> None:
        with self._lock(user):
            self._start(self.get(user), progress)

    def _start(self, t: Tenant, progress: Progress) -> None:
        """Start t's container and wait until it is ready; call with t's lock held. The
        intent is recorded first: a start cut short by a crash is taken up by reconcile."""
        self.state.set_desired(t.user, "running")
        try:
            st = self.runtime.state(t.user)
            if st.status == "running":  # never queues
                self._ready(t, st.pid, progress)
            else:
                with self.starts.slot(t.user, progress):  # a boot burns CPU: K at once
                    progress("starting the container")
                    if not self.runtime.bridge_present():  # deleted by hand, say
                        self.apply_network()
                        for line in self._reattach():
                            log.warning("%s", line)
                    self._ready(t, self.runtime.start(t.user).pid, progress)
        except RuntimeFailure as exc:
            failure = self._explained(t.user, exc)
            self.state.set_failure(t.user, failure.cause)
            log.warning("%s: start failed: %s", t.user, failure)
            raise failure from exc
        self.state.set_failure(t.user, None)

    def _ready(self, t: Tenant, pid: int, progress: Progress) -> None:
        """Wait for systemd inside; meanwhile make the user's account there (a first start
        runs groupadd and useradd: runc exec needs a running init, not a booted system)."""
        progress("waiting for systemd (Docker starts at its first use)")
        with ThreadPoolExecutor(1, thread_name_prefix="hostd-account") as pool:
            account = pool.submit(self.inner.ensure, t, pid)
            self.runtime.wait_ready(t.user)  # its failure, if any, is the one to tell
            account.result()

    def _explained(self, user: str, exc: RuntimeFailure) -> RuntimeFailure:
        """The failure with what the container said about it (journal or console), on the
        same one line, and a fix for the host limit that is the usual cause when init ran out
        of one."""
        try:
            lines = self.runtime.boot_messages(user)
        except RuntimeFailure as more:  # explaining must not hide the failure itself
            log.warning("%s: cannot read why its start failed: %s", user, more)
            lines = []
        if not lines:
            return exc
        said = " | ".join(lines)
        fix = exc.fix
        if re.search(r"inotify|Too many open files", said):
            fix = "raise fs.inotify.max_user_instances (see `hostctl doctor`), then start it again"
        return type(exc)(f"{exc.cause}; it said: {said}", fix)

    def stop(self, user: str) -> None:
        with self._lock(user):
            self.get(user)
            self._stop_container(user)
            self.state.set_desired(user, "stopped")
            self.state.set_failure(user, None)

    def _stop_container(self, user: str) -> None:
        """Stop it if there is a (complete) container: one deleted meanwhile is stopped."""
        self.stopping.add(user)
        try:
            self.runtime.stop(user, self.config.runtime.stop_timeout)
        except RuntimeFailure:
            if self.runtime.exists(user) and user not in self.runtime.incomplete():
                raise
        finally:
            self.stopping.discard(user)

    def auto_stop(self, user: str, still_idle: Callable[[], str | None]) -> bool:
        """Stop a running tenant that hostd.idle found idle. Under its lock and marked
        `stopping` (new sessions then wait and start it again), `still_idle` says since when it
        is idle, or None if a session came meanwhile. Recorded as dormant, so it stays stopped
        until its next session starts it. Whether it was stopped."""
        with self._lock(user):
            t = self.state.tenant(user)
            if t is None or t.phase != "ready" or t.desired != "running":
                return False
            try:
                if self.runtime.state(user).status != "running":
                    return False
            except RuntimeFailure:  # removed meanwhile
                return False
            self.stopping.add(user)
            try:
                since = still_idle()
                if since is None:
                    return False
                # Recorded first: status never shows it stopped without saying why.
                self.state.set_dormant(user, since)
                try:
                    self._stop_container(user)
                except BaseException:
                    self.state.set_desired(user, "running")  # not stopped: not dormant either
                    raise
            finally:
                self.stopping.discard(user)
            self.state.log_event(user, f"auto-stop idle-since={since}")
            log.info("%s: stopped, idle since %s; it starts at the next login", user, since)
            return True

    def set_auto_stop(self, user: str, after: int | None) -> str:
        """The tenant's own auto-stop time (seconds, 0: never; None: the default); the
        setting as `auto_stop_setting` says it."""
        self.state.set_auto_stop(user, after)
        setting = self.auto_stop_setting(user)
        self.state.log_event(user, f"auto-stop {setting}")
        return setting

    def auto_stop_setting(self, user: str) -> str:
        """The setting as people read it: "3d", "off", or the default's, like "off (default)"."""
        own = self.state.auto_stops().get(user)
        if own is not None:
            return format_duration(own)
        return f"{format_duration(self.config.sessions.auto_stop)} (default)"

    def is_down(self, user: str) -> bool:
        """Stopped or being stopped (sessions inside are ending because of it)."""
        return user in self.stopping or self.runtime.state(user).status != "running"

    def restart(self, user: str, progress: Progress = _quiet) -> None:
        self.stop(user)
        self.start(user, progress)

    def set_quota(self, user: str, changes: dict[str, Any]) -> dict[str, str]:
        """Change some limits. Says for each when it applies: "now" (to the running
        container), "at next start", or as the runtime puts it. A change the container
        refuses is recorded nowhere."""
        with self._lock(user):
            t = self.get(user)
            self._home_quota(user, t.home, _quiet)  # [limits] home may have changed
            quota = replace(self.state.quota(user), **changes)
            disk = self.runtime.get(user).limits.disk
            if "disk" in changes:  # no disk quota: a volume as big as the host's file system
                disk = quota.disk or self._whole_disk()
            applied = self.runtime.set_limits(user, replace(quota, disk=disk))
            when = {key: applied.get(key, "now") for key in changes}  # unchanged: in force
            self.state.set_quota(user, quota)
            self.state.log_event(user, "quota " + " ".join(f"{k}={v}" for k, v in changes.items()))
            return when

    # -- rebase ----------------------------------------------------------------------------

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
                raise Busy(
                    f"{user} is being set up or removed ({t.phase})", "try again in a minute"
                )
            image = image or t.image
            target = self.runtime.images.resolve(image)  # an unknown image fails here
            old = self.runtime.get(user)
            if old.image == image and Path(old.image_dir) == target:
                return Rebase(user, image, target.name, target.name)
            running = self.runtime.state(user).status != "stopped"
            if running and not restart:
                raise Conflict(
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

    def _start_again(self, t: Tenant, progress: Progress) -> None:
        """Start a tenant whose rebase failed on its old image; the failure is what counts."""
        try:
            progress("starting the container again on its old image")
            self._start(t, progress)
        except RuntimeFailure as exc:
            log.error("cannot start %s again after a failed rebase: %s", t.user, exc)

    def _prune(self) -> tuple[str, ...]:
        """Delete the image versions no tenant uses any more; housekeeping that never fails
        the change it follows."""
        try:
            return tuple(self.runtime.prune_images())
        except (RuntimeFailure, OSError) as exc:
            log.warning("cannot prune unused image versions: %s", exc)
            return ()

    # -- network, status, ranges: the helpers' work, under Tenants' names --------------------

    def apply_network(self) -> None:
        self.addresses.apply()

    def _reattach(self) -> list[str]:
        return self.addresses.reattach(t.user for t in self.state.tenants() if t.phase == "ready")

    def grant_ports(self, user: str, first: int, last: int) -> None:
        self.addresses.grant(user, first, last)

    def revoke_ports(self, user: str, first: int, last: int) -> None:
        self.addresses.revoke(user, first, last)

    def status(self, user: str) -> TenantStatus:
        (status,) = self.statuses(user)
        return status

    def statuses(self, user: str | None = None) -> list[TenantStatus]:
        """Of every tenant, or of `user`: one read of the state, one pass over each container's
        files, no lock taken (the start queue's snapshot says who waits)."""
        records = self.state.records(user)
        if user is not None and not records:
            raise not_a_tenant(user)
        place = self.starts.view
        statuses = []
        for record in records:
            try:
                statuses.append(tenant_status(self.runtime, record, place.get(record.tenant.user)))
            except NotFound:  # its container was deleted since the read: a removal
                if user is not None:
                    raise
        return statuses

    def release_range(self, start: int) -> IdRangeRecord:
        return self.ranges.release(start)

    def migrate_ranges(self) -> list[str]:
        return self.ranges.migrate(self.runtime.containers(), self.config.users.min_uid)

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
        unfinished = [t.user for t in self.state.tenants() if t.phase != "ready"]
        for user in unfinished:
            with self._lock(user):
                t = self.state.tenant(user)
                if t is not None and t.phase == "adding":
                    self._undo_add(t, self._kept_before(t))
                    done.append(f"rolled back the interrupted add of {t.user}")
                elif t is not None and t.phase == "removing":
                    self._delete(t.user)
                    done.append(f"finished removing {t.user}")
        if unfinished:  # port grants went with the tenants removed or rolled back
            self.apply_network()
        for name in self.runtime.incomplete():
            with self._lock(name):  # an add holds it while it creates the container
                if name in self.runtime.incomplete():
                    self.runtime.delete(name, force=True)
                    done.append(f"removed the remains of the interrupted creation of {name}")
        restart = [
            t.user
            for t in self.state.tenants()
            if t.phase == "ready" and t.desired == "running" and not self._running(t.user)
        ]
        # Together, through the start queue: after a reboot all come back in about the time
        # of a start storm. As many threads as slots, so logins meanwhile queue behind only
        # the starts under way, not behind every tenant of the host.
        with ThreadPoolExecutor(self.starts.slots, thread_name_prefix="hostd-restart") as pool:
            done.extend(pool.map(self._restart, restart))
        return done

    def _restart(self, user: str) -> str:
        """Reconcile's start of a tenant that should run: what happened, one line."""
        try:
            self.start(user)
            return f"restarted {user}"
        except RuntimeFailure as exc:
            return f"cannot restart {user}: {exc}"


def home_share(pw: pwd.struct_passwd) -> Share:
    """The user's home, at the same path inside, their files owned by their account there."""
    return Share(
        pw.pw_dir, pw.pw_dir, pw.pw_uid, pw.pw_gid, inner_id(pw.pw_uid), inner_id(pw.pw_gid)
    )


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
