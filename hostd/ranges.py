"""Tenants' subordinate ID ranges, in the two places that must agree: the state (whose range it
is: active, kept or quarantined) and /etc/subuid+subgid (so useradd, usermod and newuidmap see
it taken). Entries there name the dedicated owner (`[subids] owner`), never the tenant.

The checks on ranges are hostd's and live here and in the state: a new range overlaps no entry
of either file and no range the state records (allocate); the state refuses a range it already
has. The runtime only refuses containers whose ranges overlap each other.
"""

from __future__ import annotations

import contextlib
import pwd
import threading
from collections.abc import Callable, Iterator, Sequence

from hostd.state import IdRangeRecord, State, Tenant
from hostd.subids import SubIdEntry, SubIdFiles, allocate, ensure_owner
from runtime.ids import RANGE_SIZE, IdRange
from runtime.records import Container

GetPwNam = Callable[[str], pwd.struct_passwd]


class Ranges:
    def __init__(
        self,
        state: State,
        files: SubIdFiles,
        owner: str,
        bounds: tuple[int, int],
        getpwnam: GetPwNam = pwd.getpwnam,
    ) -> None:
        self.state = state
        self.files = files
        self.owner = owner  # who the ranges are registered under
        self.bounds = bounds  # [subids] min and max
        self.getpwnam = getpwnam
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

    def register(self, start: int) -> None:
        """Enter the range in both files (an entry already there stays). Call inside locked()."""
        self.files.add(self.owner, start, RANGE_SIZE)

    def free(self, t: Tenant) -> None:
        """Forget a tenant whose range nothing ran on (an undone add): entries, then record."""
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
        would let the user map, to the owner. Idempotent; returns what was done."""
        done = []
        if ensure_owner(self.owner, min_uid):
            done.append(f"created the locked system account {self.owner} for tenants' ID ranges")
        with self.locked():
            done += self._record_kept(containers)
            for r in self.state.ranges():
                if self.files.reown(r.start, RANGE_SIZE, self._legacy_owners(r.user), self.owner):
                    what = f"IDs {IdRange(r.start)} of {r.user} moved to owner {self.owner}"
                    self.state.log_event(r.user, what)
                    done.append(f"{what} in {self.files.subuid} and {self.files.subgid}")
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
