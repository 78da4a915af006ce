"""With `source = "deterministic"` the uid decides the range: a uid crafted to land on another
tenant's range, below min_uid, past max (shadow's wrap-around would fold it back onto others),
or onto a foreign subuid entry is refused by a real hostd, one line each, nothing left behind,
the other tenant untouched."""

from __future__ import annotations

import contextlib
import pwd
import subprocess
from collections.abc import Iterator

from hostd import config as config_mod
from runtime.ids import RANGE_SIZE
from tests.hostd_harness import Hostd, UnixUsers

HUGE_UID = 4_000_000_000  # (uid - min_uid) * 65536 is far past any max, and past 2**32


def free_uid(first: int, count: int = 1) -> int:
    """The lowest uid >= first with `count` free uids from it (no account has them)."""
    uid = first
    while any(_taken(u) for u in range(uid, uid + count)):
        uid += 1
    return uid


def _taken(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@contextlib.contextmanager
def accounts(*uids: int) -> Iterator[list[str]]:
    """Host accounts with these exact uids (an admin or directory gave them), with homes."""
    names: list[str] = []
    try:
        for uid in uids:
            name = f"hdrng{uid}"
            subprocess.run(["useradd", "-m", "-u", str(uid), name], check=True)
            names.append(name)
        yield names
    finally:
        for name in names:
            subprocess.run(["userdel", "-r", "-f", name], capture_output=True, check=False)


def refused(h: Hostd, user: str) -> str:
    """`hostctl user add`'s error, checked to be one line that left no trace of `user`."""
    before = h.subuid.read_text(), h.subgid.read_text()
    res = h.hostctl("user", "add", user, check=False)
    assert res.returncode != 0, res.stdout
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("hostctl: "), res.stderr
    assert h.hostctl("user", "show", user, check=False).returncode != 0
    assert user not in h.hostctl("ranges").stdout
    assert (h.subuid.read_text(), h.subgid.read_text()) == before
    return res.stderr.strip()


def test_crafted_uids_never_get_another_tenants_or_a_foreign_range(
    hostd: Hostd, unix_users: UnixUsers
) -> None:
    victim = unix_users.make()
    out = hostd.hostctl("user", "add", victim).stdout  # source = local: the first free range
    start = int(out.split("IDs ")[1].split("-")[0])
    min_uid = config_mod.load(hostd.config).users.min_uid
    onto = free_uid(min_uid + 2000)  # with min below, this uid's formula range is the victim's
    lo = start - (onto - min_uid) * RANGE_SIZE
    pair = free_uid(min_uid + 5000, 2)  # two uids whose ranges a foreign entry straddles
    pair_start = lo + (pair - min_uid) * RANGE_SIZE
    hi = pair_start + 2 * RANGE_SIZE - 1
    low = free_uid(min_uid - 100)
    assert low < min_uid and not _taken(HUGE_UID)
    foreign = f"ci-runner:{pair_start + RANGE_SIZE - 100}:200"
    files = hostd.subuid.read_text(), hostd.subgid.read_text()
    settings = f'[subids]\nsource = "deterministic"\nmin = {lo}\nmax = {hi}\n'
    try:
        with (
            accounts(onto, low, HUGE_UID, pair, pair + 1) as names,
            hostd.configured("60-crafted-uids", settings) as h,
        ):
            on_victim, below, huge, left, right = names
            h.subuid.write_text(files[0] + foreign + "\n")
            h.subgid.write_text(files[1] + foreign + "\n")
            victims = f"{victim}'s range {start}-{start + RANGE_SIZE - 1} in hostd's state (active"
            assert victims in refused(h, on_victim)
            assert f"{below} is a system account (uid {low} < {min_uid})" in refused(h, below)
            assert f"uid {HUGE_UID}'s deterministic ID range" in refused(h, huge)
            for user in (left, right):
                assert f"collides with ci-runner's entry {foreign} in" in refused(h, user)
            show = h.hostctl("user", "show", victim).stdout
            assert f"{start}-{start + RANGE_SIZE - 1}" in show
    finally:
        hostd.subuid.write_text(files[0])
        hostd.subgid.write_text(files[1])
        hostd.hostctl("user", "remove", victim)
        hostd.hostctl("ranges", "release", str(start))
