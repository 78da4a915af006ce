"""Tenants' subordinate ID ranges, in the two places that must agree: the state (whose range it
is: active, kept or quarantined) and /etc/subuid+subgid (so useradd, usermod and newuidmap see
it taken). Entries there name the dedicated owner (`[subids] owner`), never the tenant.

The checks on ranges are hostd's and live here and in the state: a new range overlaps no entry
of either file and no range the state records (allocate, check_free); the state refuses a range
it already has. The runtime only refuses containers whose ranges overlap each other.

Where a new range comes from is `[subids] source` (hostd.rangesource). A range the subid
provider gives is the directory's: hostd records it in the state but writes no entry for it.
"""

from __future__ import annotations

import contextlib
import pwd
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from hostd import rangesource
from hostd.rangesource import Runner
from hostd.state import IdRangeRecord, State, Tenant
from hostd.subids import SubIdEntry, SubIdFiles, allocate, ensure_owner
from runtime.errors import Conflict, RuntimeFailure
from runtime.ids import RANGE_SIZE, IdRange
from runtime.records import Container

GetPwNam = Callable[[str], pwd.struct_passwd]


@dataclass(frozen=True)
class Claim:
    """IDs start..end (inclusive) someone holds: `holder` says whose (claims of one holder
    never collide), `label` names it for an admin."""

    start: int
    end: int
    holder: str
    label: str


def first_overlap(claims: Iterable[Claim]) -> tuple[Claim, Claim] | None:
    """Two claims of different holders that share an ID, if any (the earliest found)."""
    widest: Claim | None = None  # of the claims so far, the one reaching highest
    for c in sorted(claims, key=lambda c: (c.start, c.end)):
        if widest is not None and c.start <= widest.end and c.holder != widest.holder:
            return widest, c
        if widest is None or c.end > widest.end:
            widest = c
    return None


class Ranges:
    def __init__(
        self,
        state: State,
        files: SubIdFiles,
        owner: str,
        bounds: tuple[int, int],
        getpwnam: GetPwNam = pwd.getpwnam,
        *,
        source: str = "local",
        min_uid: int = 1000,
        getsubids: Runner = rangesource.run_getsubids,
    ) -> None:
        self.state = state
        self.files = files
        self.owner = owner  # who the ranges are registered under
        self.bounds = bounds  # [subids] min and max
        self.getpwnam = getpwnam
        self.source = source  # [subids] source: where new tenants' ranges come from
        self.min_uid = min_uid  # [users] min_uid: the deterministic formula's uid offset
        self.getsubids = getsubids
        self._alloc = threading.Lock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold allocation in this process and shadow's locks on both files."""
        with self._alloc, self.files.locked():
            yield

    def allocate(self) -> int:
        """A fresh range: free in both files and in the state (quarantined ones included).
        Call inside locked()."""
        uids, gids = self.files.read()
        lo, hi = self.bounds
        return allocate(uids, gids, self.state.range_starts(), lo, hi, RANGE_SIZE)

    def range_for(self, pw: pwd.struct_passwd) -> int:
        """The start of a new range for this user from `[subids] source`, free in both files
        and the state (Conflict naming what it collides with). Call inside locked()."""
        if self.source == "local":
            return self.allocate()
        if self.source == "deterministic":
            lo, hi = self.bounds
            start = rangesource.deterministic_start(pw.pw_uid, self.min_uid, lo, hi)
            what = f"{pw.pw_name}'s deterministic ID range {IdRange(start)} (uid {pw.pw_uid})"
            fix = "remove that entry (a tenant keeps its range), or move [subids] min and max"
        else:
            start = rangesource.directory_start(pw.pw_name, self.getsubids)
            what = f"{pw.pw_name}'s ID range {IdRange(start)} from the subid provider"
            fix = "give the user a range in the directory that nothing on this host uses"
        clash = self._collision(start, pw.pw_name)
        if clash is not None:
            raise Conflict(f"{what} collides with {clash[0]}", clash[1] or fix)
        return start

    def check_free(self, start: int, user: str) -> None:
        """Refuse (Conflict) a given range for `user` that the files or the state already
        hold, e.g. an imported tenant's kept range. Call inside locked()."""
        clash = self._collision(start, user)
        if clash is not None:
            raise Conflict(
                f"IDs {IdRange(start)} for {user} collide with {clash[0]}",
                clash[1] or "import with --range auto, or free those IDs first",
            )

    def _collision(self, start: int, user: str) -> tuple[str, str | None] | None:
        """What the range from `start` overlaps (and its own fix, if it has one): a range the
        state records (any status), else an entry of either file. Entries of every owner
        count (the user's own would let them newuidmap into it), but the user's own range
        (kept or quarantined for them) with hostd's entries of it, and for source = subid the
        user's own entry of exactly this range: that is the directory's grant (the `files`
        provider reads it from there)."""
        new = SubIdEntry(user, start, RANGE_SIZE)
        records = {r.start: r for r in self.state.ranges()}
        for s in self.state.range_starts():
            if new.overlaps(SubIdEntry("", s, RANGE_SIZE)):
                r = records.get(s)
                if r is None:
                    return f"the range {IdRange(s)} of a tenant in hostd's state", None
                if (r.start, r.user) == (start, user) and r.status != "active":
                    continue  # their own, kept or quarantined: theirs again (state._take_range)
                what = (
                    f"{r.user}'s range {IdRange(s)} in hostd's state ({r.status} since {r.since})"
                )
                if r.status != "quarantined":
                    return what, None
                return (
                    what,
                    f"release it (`hostctl ranges release {s}`) once nothing of its is left",
                )
        own = self._legacy_owners(user) | {user} if self.source == "subid" else set[str]()
        if start in records and records[start].user == user:  # their own range, entries too
            own.add(self.owner)
        uids, gids = self.files.read()
        for path, entries in ((self.files.subuid, uids), (self.files.subgid, gids)):
            for e in entries:
                if e.count <= 0 or not new.overlaps(e):
                    continue
                if e.owner in own and (e.start, e.count) == (start, RANGE_SIZE):
                    continue
                return f"{e.owner}'s entry {e.owner}:{e.start}:{e.count} in {path}", None
        return None

    def register(self, start: int) -> None:
        """Enter the range in both files (an entry already there stays), unless the subid
        provider gives it to its recorded user: the directory owns it. Call inside locked()."""
        if not self._directory_owns(start):
            self.files.add(self.owner, start, RANGE_SIZE)

    def _directory_owns(self, start: int) -> bool:
        """Whether source = subid and the provider gives this range to the user the state
        records it for (hostd then writes no entry of its own for it, nor moves theirs)."""
        if self.source != "subid":
            return False
        user = next((r.user for r in self.state.ranges() if r.start == start), None)
        if user is None:
            return False
        try:
            return rangesource.directory_start(user, self.getsubids) == start
        except RuntimeFailure:
            return False

    def free(self, t: Tenant) -> None:
        """Forget a tenant whose range nothing ran on (an undone add): entries, then record;
        a quarantined range it took back stays quarantined, entries and all."""
        if self.state.reclaimed(t):
            self.state.delete_tenant(t.user, "quarantined")
            return
        with self.locked():
            self.files.remove(self.owner, t.range_start, RANGE_SIZE)
        self.state.delete_tenant(t.user, "free")

    def release(self, start: int) -> IdRangeRecord:
        """Let allocation hand a quarantined range out again (an admin's decision): its
        subuid/subgid entries go, then its record."""
        with self.locked():
            return self.state.release_range(
                start, lambda: self.files.remove(self.owner, start, RANGE_SIZE)
            )

    def migrate(self, containers: Sequence[Container], min_uid: int) -> list[str]:
        """Bring an installation from before the dedicated owner up to date, once, at start:
        create the owner, record ranges of containers kept by `remove --keep-data`, and give
        every recorded range's entries under the user's own name (or uid), which newuidmap
        would let the user map, to the owner. Then every recorded range has its entries again:
        a release cut short by a crash (entries gone, record kept) leaves one quarantined
        without them. Idempotent; returns what was done."""
        done = []
        if ensure_owner(self.owner, min_uid):
            done.append(f"created the locked system account {self.owner} for tenants' ID ranges")
        with self.locked():
            done += self._record_kept(containers)
            for r in self.state.ranges():
                if self._directory_owns(r.start):
                    continue  # the user's own entry, given by the directory: leave it theirs
                if self.files.reown(r.start, RANGE_SIZE, self._legacy_owners(r.user), self.owner):
                    what = f"IDs {IdRange(r.start)} of {r.user} moved to owner {self.owner}"
                    self.state.log_event(r.user, what)
                    done.append(f"{what} in {self.files.subuid} and {self.files.subgid}")
                if self.files.add(self.owner, r.start, RANGE_SIZE):
                    done.append(
                        f"entered the {r.status} IDs {IdRange(r.start)} of {r.user} again in "
                        f"{self.files.subuid} and {self.files.subgid}"
                    )
        return done

    def _record_kept(self, containers: Sequence[Container]) -> list[str]:
        """Record as kept the ranges of containers an older hostd kept (no tenant row, an
        entry under the container's user in subuid); call inside locked()."""
        uids, _ = self.files.read()
        recorded = {r.start for r in self.state.ranges()}
        tenants = {t.user for t in self.state.tenants()}
        done = []
        for c in containers:
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
            owners.add(str(self.getpwnam(user).pw_uid))
        return owners - {self.owner}
