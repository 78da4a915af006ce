"""Where a new tenant's ID range comes from, so one user gets the same range on every server.

`local` is hostd's allocator (first free range: depends on the host's history). `deterministic`
computes the range from the uid as shadow's SUB_UID_DETERMINISTIC does:
`start = min + (uid - min_uid) * 65536`, within [min, max]. `subid` asks the system's libsubid
provider (`subid:` in /etc/nsswitch.conf, e.g. sss for SSSD/FreeIPA) through `getsubids`: the
directory owns that range, and the user may map it with newuidmap outside hostd.
The pure parts live here; hostd.ranges checks the result against the files and the state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from hostd.errors import HostdError
from runtime import proc
from runtime.ids import MAX_ID, MIN_START, RANGE_SIZE

SOURCES = ("local", "deterministic", "subid")
NSSWITCH = Path("/etc/nsswitch.conf")
GETSUBIDS_TIMEOUT = 10.0  # seconds: a directory that does not answer fails the add, not hostd
GETSUBIDS_MAX_OUTPUT = 64 << 10  # bytes: a few hundred ranges; more is not a sane answer

Runner = Callable[[Sequence[str]], proc.Result]

# getsubids prints one `INDEX: OWNER START COUNT` line per range
_LINE = re.compile(r"(\d+): (\S+) (\d{1,10}) (\d{1,10})")


def formula(min_uid: int, lo: int) -> str:
    """The deterministic mapping, as doctor and the docs show it."""
    return f"start = {lo} + (uid - {min_uid}) * {RANGE_SIZE}"


def deterministic_start(uid: int, min_uid: int, lo: int, hi: int) -> int:
    """The range start shadow's SUB_UID_DETERMINISTIC gives `uid`: it must fit in [lo, hi]
    (no wrap-around: that is what would make two users' ranges overlap)."""
    if uid < min_uid:
        raise HostdError(
            f"uid {uid} is below [users] min_uid {min_uid}: it has no deterministic ID range",
            "only human users (uid >= min_uid) can be tenants",
        )
    start = lo + (uid - min_uid) * RANGE_SIZE
    end = start + RANGE_SIZE - 1
    if end > hi:
        raise HostdError(
            f"uid {uid}'s deterministic ID range {start}-{end} ({formula(min_uid, lo)}) "
            f"ends past [subids] max {hi} (it fits uids {min_uid}-{last_uid(min_uid, lo, hi)})",
            f"raise [subids] max to at least {end} or lower [subids] min"
            if end <= MAX_ID
            else f"lower [subids] min: no ID range can end past {MAX_ID}",
        )
    return start


def last_uid(min_uid: int, lo: int, hi: int) -> int:
    """The highest uid whose deterministic range fits in [lo, hi]."""
    return min_uid + (hi - lo + 1) // RANGE_SIZE - 1


def run_getsubids(argv: Sequence[str]) -> proc.Result:
    """getsubids, bounded in time and output (the provider may be a remote directory)."""
    path = proc.require("getsubids", "uidmap")
    return proc.run(
        [path, *argv],
        timeout=GETSUBIDS_TIMEOUT,
        max_output=GETSUBIDS_MAX_OUTPUT,
        check=False,
        fix="check the subid provider (`subid:` in /etc/nsswitch.conf) answers `getsubids USER`",
    )


def parse_getsubids(text: str) -> list[tuple[int, int]]:
    """(start, count) of each range getsubids printed; anything else is refused, not guessed."""
    found = []
    for line in text.splitlines():
        m = _LINE.fullmatch(line.strip())
        if m is None:
            raise HostdError(
                f"getsubids printed {line[:80]!r}, not `INDEX: USER START COUNT`",
                "check the subid provider (`subid:` in /etc/nsswitch.conf)",
            )
        found.append((int(m[3]), int(m[4])))
    return found


def directory_ranges(user: str, gids: bool, run: Runner) -> list[tuple[int, int]]:
    """The user's subordinate UID (or GID) ranges from libsubid; none when it has none."""
    res = run(["-g", user] if gids else [user])
    if res.returncode != 0:
        return []  # getsubids says "Error fetching ranges" for a user without any, too
    return parse_getsubids(res.stdout)


def directory_start(user: str, run: Runner) -> int:
    """The start of the user's range in the subid provider: a range of exactly 65536 IDs,
    the same for UIDs and GIDs (the lowest, if the directory holds several)."""
    uids, gids = directory_ranges(user, False, run), directory_ranges(user, True, run)
    fix = f"give {user} one range of {RANGE_SIZE} IDs, the same for subuid and subgid"
    if not uids or not gids:
        which = "subuid" if not uids else "subgid"
        raise HostdError(f"the subid provider has no {which} range for {user}", f"{fix} there")
    whole = sorted(set(uids) & set(gids))
    fitting = [start for start, count in whole if count == RANGE_SIZE]
    if not fitting:
        sizes = sorted({count for _, count in uids + gids} - {RANGE_SIZE})
        if sizes:
            said = ", ".join(map(str, sizes))
            cause = f"{user}'s ranges in the subid provider hold {said} IDs, not {RANGE_SIZE}"
        else:
            cause = (
                f"{user}'s subuid ranges {_spans(uids)} and subgid ranges {_spans(gids)} "
                "in the subid provider differ"
            )
        raise HostdError(cause, f"{fix} in the directory")
    start = fitting[0]
    if start < MIN_START or start + RANGE_SIZE - 1 > MAX_ID:
        raise HostdError(
            f"{user}'s range from the subid provider starts at {start}: outside "
            f"{MIN_START}-{MAX_ID}, it would map host system IDs",
            f"{fix}, starting at {MIN_START} or above, in the directory",
        )
    return start


def _spans(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{start}-{start + count - 1}" for start, count in ranges)


def provider(nsswitch: Path | None = None) -> str:
    """The libsubid provider named in nsswitch.conf: `files` (/etc/subuid) when none is."""
    try:
        text = (nsswitch or NSSWITCH).read_text(errors="replace")
    except FileNotFoundError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition("#")[0].partition(":")
        if key.strip() == "subid" and value.strip():
            return value.strip()
    return "files"
