"""Range sources with a real hostd: `source = "deterministic"` gives a user the formula's range,
and a second hostd (its own state dir and subuid files) gives that user the same one; a
collision is one line with nothing left behind. `source = "subid"` reads the real getsubids
(libsubid's files provider) in a mount namespace whose /etc/subuid and /etc/subgid are test
files."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd import config as config_mod
from runtime import fsutil
from runtime.ids import RANGE_SIZE
from tests.hostd_harness import Hostd, UnixUsers, other_hostd

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def deterministic_host(model: Hostd, tag: str, busybox_tar: Path) -> Iterator[Hostd]:
    """A hostd on this machine as a server of its own: its own state dir, subuid files, bridge
    and sockets; source = deterministic with `model`'s [subids] and [users] bounds; a
    busybox image. Its state is fresh: the session's holds ranges that earlier tests' removed
    tenants left quarantined, and a formula range may fall on one of them."""
    first = config_mod.load(model.config)
    work = Path(tempfile.mkdtemp(prefix=f"hostd-it-ranges-{tag}-", dir="/var/tmp"))
    os.chmod(work, 0o711)
    sections = {
        "runtime": 'default_image = "bb"\n',
        "subids": f'source = "deterministic"\nmin = {first.subids.min}\nmax = {first.subids.max}\n',
        "users": f"min_uid = {first.users.min_uid}\n",
    }
    try:
        with other_hostd(work, work / "state", tag, sections) as h:
            h.hostctl("image", "import", "bb", str(busybox_tar))
            yield h
    finally:
        fsutil.remove_tree(work)


@pytest.fixture(scope="module")
def deterministic(hostd: Hostd, busybox_tar: Path) -> Iterator[Hostd]:
    with deterministic_host(hostd, "rd", busybox_tar) as h:
        yield h


@pytest.fixture(scope="module")
def other_host(hostd: Hostd, busybox_tar: Path) -> Iterator[Hostd]:
    """A second server, with the same bounds."""
    with deterministic_host(hostd, "rg", busybox_tar) as h:
        yield h


def formula_start(h: Hostd, user: str) -> int:
    cfg = config_mod.load(h.config)
    return cfg.subids.min + (pwd.getpwnam(user).pw_uid - cfg.users.min_uid) * RANGE_SIZE


@contextlib.contextmanager
def tenant(h: Hostd, user: str, *args: str) -> Iterator[str]:
    """`hostctl user add`'s output; the tenant removed and its range released afterwards."""
    out = h.hostctl("user", "add", user, *args).stdout
    try:
        yield out
    finally:
        start = int(out.split("IDs ")[1].split("-")[0])
        h.hostctl("user", "remove", user)
        h.hostctl("ranges", "release", str(start))


def test_the_same_user_gets_the_formulas_range_on_both_hosts(
    deterministic: Hostd, other_host: Hostd, unix_users: UnixUsers
) -> None:
    early, user = unix_users.make(), unix_users.make()
    start = formula_start(deterministic, user)
    ids = f"IDs {start}-{start + RANGE_SIZE - 1}"
    # the other host has a tenant added before: a local allocator would hand out another range
    with tenant(other_host, early), tenant(deterministic, user) as here:
        assert ids in here
        assert f"hostd-ids:{start}:{RANGE_SIZE}" in deterministic.subuid.read_text().splitlines()
        with tenant(other_host, user) as there:
            assert ids in there
            line = f"hostd-ids:{start}:{RANGE_SIZE}"
            assert line in other_host.subuid.read_text().splitlines()
            assert line in other_host.subgid.read_text().splitlines()


def test_a_foreign_entry_in_the_way_is_one_line_and_nothing_is_left(
    deterministic: Hostd, unix_users: UnixUsers
) -> None:
    user = unix_users.make()
    start = formula_start(deterministic, user)
    foreign = f"podman-ci:{start + 4096}:4096"
    before = deterministic.subuid.read_text()
    deterministic.subuid.write_text(before + foreign + "\n")
    try:
        res = deterministic.hostctl("user", "add", user, check=False)
        assert res.returncode != 0
        assert res.stderr.splitlines() == [
            f"hostctl: {user}'s deterministic ID range {start}-{start + RANGE_SIZE - 1} "
            f"(uid {pwd.getpwnam(user).pw_uid}) collides with podman-ci's entry {foreign} in "
            f"{deterministic.subuid}: remove that entry (a tenant keeps its range), or move "
            "[subids] min and max"
        ]
        assert deterministic.hostctl("user", "show", user, check=False).returncode != 0
        assert user not in deterministic.hostctl("ranges").stdout
        assert deterministic.subuid.read_text() == before + foreign + "\n"
    finally:
        deterministic.subuid.write_text(before)


# -- source = subid, through the real getsubids ----------------------------------------------

CHILD = """
import sys
from pathlib import Path
from hostd.ranges import Ranges
from hostd.state import State, Tenant, utc_now
from hostd.subids import SubIdFiles
from runtime.errors import RuntimeFailure
from runtime.limits import Limits
import pwd

db, subuid, subgid, user = sys.argv[1:]
state = State(Path(db))
files = SubIdFiles(Path(subuid), Path(subgid))
ranges = Ranges(state, files, "hostd-ids", (100000, 600100000), source="subid")
pw = pwd.getpwnam(user)
with ranges.locked():
    try:
        start = ranges.range_for(pw)
    except RuntimeFailure as exc:
        print(f"ERROR {exc}")
        sys.exit(0)
    t = Tenant(user, pw.pw_uid, pw.pw_gid, pw.pw_dir, start, "default", "adding", "stopped",
               utc_now())
    state.begin_add(t, Limits())
    ranges.register(start)
print(start)
"""


def in_namespace(work: Path, user: str, uids: str, gids: str) -> str:
    """Ranges.range_for + register for `user` with source = subid, in a private mount
    namespace where /etc/subuid and /etc/subgid are `work`'s subuid and subgid (hostd's
    [paths] too, as on a host where the directory is /etc/subuid: the `files` provider)."""
    (work / "subuid").write_text(uids)
    (work / "subgid").write_text(gids)
    script = (
        'mount --make-rprivate / && mount --bind "$1" /etc/subuid && '
        'mount --bind "$2" /etc/subgid && shift 2 && exec "$@"'
    )
    res = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", work / "subuid", work / "subgid"]
        + [sys.executable, "-c", CHILD, work / "hostd.db", work / "subuid", work / "subgid", user],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_subid_reads_the_users_range_through_libsubid_and_writes_no_entry(
    tmp_path: Path, unix_users: UnixUsers
) -> None:
    user, other = unix_users.make(), unix_users.make()
    uid = pwd.getpwnam(user).pw_uid
    # the user's entry by uid, as libsubid's files provider also matches it; another's entry
    uids = f"{other}:300000:65536\n{uid}:500000:65536\n"
    gids = f"{other}:300000:65536\n{user}:500000:65536\n"
    assert in_namespace(tmp_path, user, uids, gids) == "500000"
    assert (tmp_path / "subuid").read_text() == uids  # the directory's: nothing of hostd's
    assert (tmp_path / "subgid").read_text() == gids


@pytest.mark.parametrize(
    ("uids", "gids", "error"),
    [
        ("", "", "the subid provider has no subuid range for USER"),
        (
            "USER:500000:1000\n",
            "USER:500000:1000\n",
            "USER's ranges in the subid provider hold 1000 IDs, not 65536",
        ),
        (
            "USER:500000:65536\n",
            "USER:600000:65536\n",
            "USER's subuid ranges 500000-565535 and subgid ranges 600000-665535 in the subid "
            "provider differ",
        ),
        (
            "USER:500000:65536\nmallory:560000:10\n",
            "USER:500000:65536\n",
            "USER's ID range 500000-565535 from the subid provider collides with mallory's "
            "entry mallory:560000:10 in",
        ),
    ],
    ids=["none", "size", "differ", "collides"],
)
def test_subid_errors_say_what_the_directory_must_hold(
    tmp_path: Path, unix_users: UnixUsers, uids: str, gids: str, error: str
) -> None:
    user = unix_users.make()
    out = in_namespace(tmp_path, user, uids.replace("USER", user), gids.replace("USER", user))
    assert out.startswith("ERROR " + error.replace("USER", user)), out
    assert len(out.splitlines()) == 1
