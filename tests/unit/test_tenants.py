"""Tenants' transactions and every error path, against an in-memory runtime (fake_runtime):
the real state database and subuid/subgid files on a temp dir, made-up Unix users. No root."""

from __future__ import annotations

import pwd
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostd import config
from hostd.errors import HostdError
from hostd.startqueue import STARTING
from hostd.state import State, Tenant
from hostd.subids import SubIdEntry, parse
from hostd.tenants import Tenants
from runtime.errors import Busy, Conflict, NotFound, RuntimeFailure
from runtime.ids import RANGE_SIZE, IdRange
from runtime.limits import Limits
from runtime.netplan import Forward
from tests.hostd_harness import wait_for
from tests.unit.fake_runtime import FakeRuntime

MIN, SLOTS = 100000, 4  # the test host has room for 4 ranges
OWNER = "hostd-ids"


@dataclass
class Host:
    root: Path
    cfg: config.Config
    state: State
    rt: FakeRuntime
    accounts: dict[str, pwd.struct_passwd]

    def tenants(self) -> Tenants:
        """A Tenants over this host's stores (a new one: a restarted hostd)."""
        return Tenants(
            self.cfg,
            self.state,
            self.rt,
            getpwnam=self.getpwnam,
            read_file=self.rt.read_file,
        )

    def getpwnam(self, name: str) -> pwd.struct_passwd:
        return self.accounts[name]

    def user(self, name: str, uid: int = 2000, home: bool = True) -> str:
        path = self.root / "home" / name
        if home:
            path.mkdir(parents=True)
        self.accounts[name] = pwd.struct_passwd((name, "x", uid, uid, "", str(path), "/bin/bash"))
        return name

    def entries(self) -> tuple[list[SubIdEntry], list[SubIdEntry]]:
        files = [self.root / "subuid", self.root / "subgid"]
        uids, gids = (parse(f.read_text()) if f.exists() else [] for f in files)
        return uids, gids

    def registered(self) -> list[int]:
        """Range starts in subuid, checked to be the same in subgid, all under the owner."""
        uids, gids = self.entries()
        assert uids == gids
        assert all((e.owner, e.count) == (OWNER, RANGE_SIZE) for e in uids)
        return sorted(e.start for e in uids)

    def ranges(self) -> dict[int, tuple[str, str]]:
        return {r.start: (r.user, r.status) for r in self.state.ranges()}


def make_host(root: Path) -> Host:
    (root / "hostd.toml").write_text(
        f"""
[paths]
state_dir = "{root}"
subuid = "{root}/subuid"
subgid = "{root}/subgid"
login_defs = "{root}/login.defs"
[subids]
min = {MIN}
max = {MIN + SLOTS * RANGE_SIZE - 1}
owner = "{OWNER}"
"""
    )
    cfg = config.load(root / "hostd.toml")
    return Host(root, cfg, State(root / "hostd.db"), FakeRuntime(), {})


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = make_host(tmp_path)
    yield h
    h.state.close()


@pytest.fixture
def tenants(host: Host) -> Tenants:
    return host.tenants()


def nothing_recorded(host: Host) -> bool:
    return (
        host.state.tenants() == []
        and host.ranges() == {}
        and host.registered() == []
        and host.state.address_slots() == {}
    )


# -- add ---------------------------------------------------------------------------------------


def test_add_is_one_straight_transaction(host: Host, tenants: Tenants) -> None:
    user = host.user("alice")
    t = tenants.add(user, quota=Limits(memory=1 << 30, disk=5 << 30))
    assert (t.phase, t.range_start, t.image, t.desired) == ("ready", MIN, "default", "stopped")
    assert host.state.tenant(user) == t
    assert host.ranges() == {MIN: (user, "active")}
    assert host.registered() == [MIN]
    assert host.rt.calls == [("containers", ""), ("create", user)]  # one look, one change
    c = host.rt.get(user)
    assert c.ids == IdRange(MIN)
    assert c.address == "10.213.0.2" and tenants.address(user) == IPv4Address("10.213.0.2")
    assert c.limits == Limits(memory=1 << 30, disk=5 << 30)
    (share,) = c.shares
    assert (share.source, share.destination, share.inner_uid) == (t.home, t.home, 2000)
    assert host.state.events(user)[-1][2] == f"add image=default range={MIN}"


def test_add_without_a_quota_takes_the_defaults(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    assert host.state.quota("alice") == host.cfg.limits


def test_an_unlimited_disk_gets_a_volume_as_big_as_the_file_system(
    host: Host, tenants: Tenants
) -> None:
    tenants.add(host.user("alice"), quota=Limits(disk=None))
    assert host.rt.get("alice").limits.disk == tenants._whole_disk() > 0
    assert host.state.quota("alice").disk is None


def test_tenants_get_their_own_range_and_address(host: Host, tenants: Tenants) -> None:
    for i, name in enumerate(("a", "b", "c")):
        tenants.add(host.user(name, uid=2000 + i))
    assert host.registered() == [MIN, MIN + RANGE_SIZE, MIN + 2 * RANGE_SIZE]
    assert [c.address for c in host.rt.containers()] == ["10.213.0.2", "10.213.0.3", "10.213.0.4"]


def test_a_range_in_subuid_is_never_given(host: Host, tenants: Tenants) -> None:
    (host.root / "subuid").write_text(f"bob:{MIN}:{RANGE_SIZE}\n")  # useradd gave bob one
    t = tenants.add(host.user("alice"))
    assert t.range_start == MIN + RANGE_SIZE
    assert parse((host.root / "subuid").read_text()) == [
        SubIdEntry("bob", MIN, RANGE_SIZE),
        SubIdEntry(OWNER, MIN + RANGE_SIZE, RANGE_SIZE),
    ]


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        (lambda h: "nosuchuser", NotFound, "no Unix account named 'nosuchuser'"),
        (lambda h: h.user("root", uid=0), HostdError, "root is a system account"),
        (lambda h: h.user("daemon", uid=1), HostdError, r"daemon is a system account \(uid 1"),
        (lambda h: h.user("nohome", home=False), HostdError, "home directory .* does not exist"),
        (lambda h: "../etc", RuntimeFailure, "invalid user name"),
        (lambda h: "a/b", RuntimeFailure, "invalid user name"),
    ],
)
def test_users_who_cannot_be_tenants_are_refused_before_anything_changes(
    host: Host, tenants: Tenants, setup: object, error: type[Exception], message: str
) -> None:
    user = setup(host)  # type: ignore[operator]
    with pytest.raises(error, match=message):
        tenants.add(user)
    assert nothing_recorded(host) and host.rt.calls == []


def test_an_existing_tenant_is_refused(host: Host, tenants: Tenants) -> None:
    first = tenants.add(host.user("alice"))
    with pytest.raises(Conflict, match="user alice is already a tenant"):
        tenants.add("alice", quota=Limits(pids=1))
    assert host.state.tenants() == [first] and host.state.quota("alice") == host.cfg.limits
    assert host.registered() == [MIN] and list(host.rt.boxes) == ["alice"]


def test_no_free_range_is_refused_with_the_fix(host: Host, tenants: Tenants) -> None:
    for i in range(SLOTS):
        tenants.add(host.user(f"u{i}", uid=2000 + i))
    with pytest.raises(HostdError, match="no free subordinate ID range") as info:
        tenants.add(host.user("late", uid=3000))
    assert "hostctl ranges" in info.value.fix
    assert host.state.tenant("late") is None and len(host.registered()) == SLOTS


def test_an_unknown_image_is_refused_before_anything_changes(host: Host, tenants: Tenants) -> None:
    progress: list[str] = []
    with pytest.raises(NotFound, match="image 'nosuchimage' does not exist"):
        tenants.add(host.user("alice"), image="nosuchimage", progress=progress.append)
    assert nothing_recorded(host) and progress == [] and host.rt.calls == [("containers", "")]


@pytest.mark.parametrize("conflict", [False, True])
def test_a_failed_create_rolls_back_state_subuid_and_address(
    host: Host, tenants: Tenants, conflict: bool
) -> None:
    tenants.add(host.user("bob", uid=2001))
    if conflict:  # its checks are the runtime's: here, a half-made container of that name
        host.rt.half_made.add("alice")
    else:
        host.rt.fail("create")
    with pytest.raises(RuntimeFailure):
        tenants.add(host.user("alice"))
    assert [t.user for t in host.state.tenants()] == ["bob"]
    assert host.ranges() == {MIN: ("bob", "active")} and host.registered() == [MIN]
    assert host.state.address_slots() == {"bob": 0} and list(host.rt.boxes) == ["bob"]
    assert tenants.add("alice").range_start == MIN + RANGE_SIZE  # nothing was left behind


def test_a_failure_after_create_deletes_the_new_container(
    host: Host, tenants: Tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeFailure("no quota on the home", "test")

    monkeypatch.setattr(tenants, "_home_quota", broken)
    with pytest.raises(RuntimeFailure, match="no quota on the home"):
        tenants.add(host.user("alice"))
    assert nothing_recorded(host) and host.rt.boxes == {}


def test_a_failed_subuid_write_drops_the_state_row(host: Host, tenants: Tenants) -> None:
    (host.root / "subgid").mkdir()  # cannot be written as a file
    with pytest.raises(OSError):
        tenants.add(host.user("alice"))
    assert host.state.tenants() == [] and host.ranges() == {} and host.rt.boxes == {}


# -- adopting a kept container -------------------------------------------------------------------


def test_a_kept_container_is_adopted_with_its_range_address_and_volume(
    host: Host, tenants: Tenants
) -> None:
    tenants.add(host.user("alice"), quota=Limits(disk=5 << 30))
    tenants.add(host.user("bob", uid=2001))
    tenants.remove("alice", keep_data=True)
    assert host.ranges()[MIN] == ("alice", "kept") and host.registered() == [MIN, MIN + RANGE_SIZE]
    assert host.state.address_slots() == {"bob": 1}  # alice's slot went with her row
    tenants.add(host.user("carol", uid=2002))  # must not take alice's kept address
    assert host.rt.get("carol").address == "10.213.0.4"
    host.rt.calls.clear()
    t = tenants.add("alice", quota=Limits(memory=1 << 30, disk=1 << 30))
    assert (t.phase, t.range_start) == ("ready", MIN)
    assert ("create", "alice") not in host.rt.calls
    c = host.rt.get("alice")
    assert c.limits == Limits(memory=1 << 30, disk=5 << 30)  # a volume does not shrink
    assert tenants.address("alice") == IPv4Address(c.address or "")
    assert host.ranges()[MIN] == ("alice", "active") and host.registered().count(MIN) == 1


def test_a_kept_container_keeps_its_image(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"), image="other")
    tenants.remove("alice", keep_data=True)
    with pytest.raises(Conflict, match="kept for alice is on image other, not default"):
        tenants.add("alice", image="default")
    assert host.state.tenant("alice") is None and host.ranges()[MIN] == ("alice", "kept")
    assert tenants.add("alice").image == "other"


def test_a_container_with_other_ids_is_not_adopted(host: Host, tenants: Tenants) -> None:
    foreign = IdRange(MIN + 2 * RANGE_SIZE)
    host.rt.create("alice", "default", foreign, shares=(), limits=Limits(), address=None)
    with pytest.raises(Conflict, match=f"exists with IDs {foreign}, not {IdRange(MIN)}") as info:
        tenants.add(host.user("alice"))
    assert "hostd-runtime delete alice" in info.value.fix
    assert host.rt.get("alice").ids == foreign  # not the add's to delete
    assert nothing_recorded(host)


def test_a_failed_adoption_keeps_the_container_and_its_range(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    tenants.remove("alice", keep_data=True)
    host.rt.fail("set_limits")
    with pytest.raises(RuntimeFailure, match="set_limits failed"):
        tenants.add("alice")
    assert host.state.tenant("alice") is None
    assert host.ranges() == {MIN: ("alice", "kept")} and host.registered() == [MIN]
    assert "alice" in host.rt.boxes
    assert tenants.add("alice").range_start == MIN


# -- remove --------------------------------------------------------------------------------------


def test_remove_deletes_the_container_and_quarantines_the_range(
    host: Host, tenants: Tenants
) -> None:
    tenants.add(host.user("alice"))
    tenants.grant_ports("alice", 30000, 30001)
    tenants.start("alice")
    host.rt.pruned = ["default@old"]
    tenants.remove("alice")
    assert host.rt.boxes == {} and host.state.tenants() == []
    assert host.ranges()[MIN] == ("alice", "quarantined")
    assert host.registered() == [MIN]  # still taken for useradd and newuidmap
    assert host.rt.forwards == [] and host.state.port_grants() == []
    assert ("prune_images", "") in host.rt.calls
    assert tenants.add("alice").range_start == MIN + RANGE_SIZE  # never handed out again


def test_remove_keep_data_stops_and_keeps(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    tenants.start("alice")
    tenants.remove("alice", keep_data=True)
    assert host.rt.state("alice").status == "stopped"
    assert host.ranges()[MIN] == ("alice", "kept") and host.state.tenant("alice") is None
    assert ("prune_images", "") not in host.rt.calls


def test_remove_kills_at_once_and_keep_data_halts(host: Host, tenants: Tenants) -> None:
    """The data goes: no clean shutdown to wait for, one delete that kills and releases."""
    for user in ("alice", "bob"):
        tenants.add(host.user(user))
        tenants.start(user)
    host.rt.calls.clear()
    tenants.remove("alice")
    assert [c for c in host.rt.calls if c[0] in ("stop", "delete")] == [("delete", "alice")]
    tenants.remove("bob", keep_data=True)
    assert ("stop", "bob") in host.rt.calls and ("delete", "bob") not in host.rt.calls


def test_remove_applies_the_network_only_when_grants_went(host: Host, tenants: Tenants) -> None:
    for user in ("alice", "bob"):
        tenants.add(host.user(user))
    tenants.grant_ports("bob", 30000, 30001)
    applied = host.rt.calls.count(("setup_network", ""))
    tenants.remove("alice")
    assert host.rt.calls.count(("setup_network", "")) == applied
    tenants.remove("bob")
    assert host.rt.calls.count(("setup_network", "")) == applied + 1
    assert host.rt.forwards == []


def test_a_failed_remove_is_left_removing_and_can_be_retried(host: Host, tenants: Tenants) -> None:
    step = "delete"
    tenants.add(host.user("alice"))
    tenants.start("alice")
    host.rt.fail(step)
    with pytest.raises(RuntimeFailure, match=f"{step} failed"):
        tenants.remove("alice")
    t = host.state.tenant("alice")
    assert t is not None and t.phase == "removing"
    assert tenants.status("alice").state == "removing"
    tenants.remove("alice")
    assert host.state.tenant("alice") is None and host.rt.boxes == {}
    assert host.ranges()[MIN] == ("alice", "quarantined")


def test_remove_of_a_tenant_whose_container_is_gone(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    host.rt.delete("alice", force=True)  # by hand, with hostd-runtime
    tenants.remove("alice")
    assert host.state.tenant("alice") is None


def test_remove_of_a_non_tenant(host: Host, tenants: Tenants) -> None:
    with pytest.raises(NotFound, match="^bob is not a tenant: add them with"):
        tenants.remove("bob")


# -- start, stop, the account inside ------------------------------------------------------------


def test_start_waits_and_creates_the_account_inside_once(host: Host, tenants: Tenants) -> None:
    t = tenants.add(host.user("alice", uid=1500))
    tenants.start("alice")
    assert host.rt.state("alice").status == "running"
    assert host.state.tenant("alice") == replace(t, desired="running")
    assert host.rt.execs == [
        ["groupadd", "-g", "1500", "alice"],
        ["useradd", "-u", "1500", "-g", "1500", "-G", "sudo,docker", "-M"]
        + ["-d", t.home, "-s", "/bin/bash", "alice"],
    ]
    account = tenants.account("alice", "alice")
    assert (account.ids, account.home) == ("1500:1500", t.home)
    assert set(account.groups) == {27, 998}  # sudo, docker
    assert f"HOME={t.home}" in account.env and "USER=alice" in account.env
    tenants.restart("alice")  # the account exists now: nothing runs inside
    assert len(host.rt.execs) == 2 and host.rt.state("alice").status == "running"


def test_a_large_uid_maps_to_the_fallback_and_an_existing_gid_is_used(
    host: Host, tenants: Tenants
) -> None:
    tenants.add(host.user("alice", uid=70000))
    host.rt.boxes["alice"].files["/etc/group"] += "staff:x:1000:\n"
    tenants.start("alice")
    assert [argv[0] for argv in host.rt.execs] == ["useradd"]
    assert tenants.account("alice", "alice").ids == "1000:1000"


def test_a_refused_useradd_names_the_cause(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    host.rt.refused["useradd"] = "useradd: group 'docker' does not exist"
    with pytest.raises(HostdError, match="cannot create the account alice inside: useradd: group"):
        tenants.start("alice")
    assert host.state.tenant("alice").desired == "running"  # type: ignore[union-attr]  # asked for


def test_unreadable_accounts_inside_fail_the_start(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    del host.rt.boxes["alice"].files["/etc/passwd"]
    with pytest.raises(HostdError, match="cannot read the accounts inside alice's container"):
        tenants.start("alice")


def test_accounts_inside(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    with pytest.raises(HostdError, match="alice's container is not running"):
        tenants.account("alice", "root")
    assert tenants.account("alice", "0").ids == "0:0"  # numeric: no lookup at all
    assert tenants.account("alice", "5:6").ids == "5:6"
    tenants.start("alice")
    with pytest.raises(NotFound, match="no account 'mallory' inside alice's container"):
        tenants.account("alice", "mallory")
    del host.rt.boxes["alice"].files["/etc/passwd"]  # broken by the tenant
    assert tenants.account("alice", "root").ids == "0:0"  # an admin can still get in
    with pytest.raises(RuntimeFailure, match="cannot open /etc/passwd"):
        tenants.account("alice", "alice")


def test_start_repairs_a_missing_bridge(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    tenants.add(host.user("bob", uid=2001))
    tenants.start("bob")
    host.rt.bridge_up = False  # deleted by hand
    host.rt.detached.add("bob")
    tenants.start("alice")
    assert "bob" not in host.rt.detached  # put back on the new bridge


def test_stop_and_unknown_tenants(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    tenants.start("alice")
    assert not tenants.is_down("alice")
    tenants.stop("alice")
    assert tenants.is_down("alice") and host.state.tenant("alice").desired == "stopped"  # type: ignore[union-attr]
    for call in (tenants.start, tenants.stop, tenants.restart, tenants.status):
        with pytest.raises(NotFound, match="nosuchuser is not a tenant"):
            call("nosuchuser")


def test_a_failed_start_says_why_until_the_tenant_starts_or_is_stopped(
    host: Host, tenants: Tenants
) -> None:
    tenants.add(host.user("alice"))
    host.rt.boxes["alice"].console = ["\x1b[0;1;31m[FAILED]\x1b[0m x", "Failed to start Docker"]
    host.rt.fail("wait_ready", RuntimeFailure("container 'alice' booted degraded", "see"))
    with pytest.raises(RuntimeFailure) as info:
        tenants.start("alice")
    assert "booted degraded; it said: " in str(info.value)
    assert str(info.value).endswith("Failed to start Docker: see")
    host.rt.boxes["alice"].status = "stopped"
    status = tenants.status("alice")
    assert status.state == "failed" and status.reason == info.value.cause
    tenants.start("alice")  # it works now
    assert tenants.status("alice").state == "running" and tenants.status("alice").reason is None
    host.rt.fail("start", RuntimeFailure("runc create failed", "see the log"))
    tenants.stop("alice")
    with pytest.raises(RuntimeFailure, match="runc create failed; it said"):
        tenants.start("alice")
    assert tenants.status("alice").state == "failed"
    tenants.stop("alice")  # an admin's stop clears it
    assert tenants.status("alice").state == "stopped" and tenants.status("alice").reason is None


def test_a_start_that_ran_out_of_inotify_instances_says_what_to_raise(
    host: Host, tenants: Tenants
) -> None:
    tenants.add(host.user("alice"))
    host.rt.boxes["alice"].console = ["Failed to allocate manager object: Too many open files"]
    host.rt.fail("wait_ready", RuntimeFailure("container 'alice' booted offline", "see"))
    with pytest.raises(RuntimeFailure, match="raise fs.inotify.max_user_instances"):
        tenants.start("alice")


def test_a_start_is_remembered_before_it_runs(host: Host, tenants: Tenants) -> None:
    """hostd killed in the middle of a start: reconcile takes the start up again."""
    tenants.add(host.user("alice"))
    host.rt.fail("wait_ready", RuntimeFailure("container 'alice' booted degraded", "see"))
    with pytest.raises(RuntimeFailure, match="booted degraded"):
        tenants.start("alice")
    assert host.state.tenant("alice").desired == "running"  # type: ignore[union-attr]
    host.rt.boxes["alice"].status = "stopped"  # hostd and the container gone
    assert "restarted alice" in host.tenants().reconcile()
    assert host.rt.state("alice").status == "running"


# -- quotas ----------------------------------------------------------------------------------


def test_set_quota_says_which_limits_apply_now(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"), quota=Limits(memory=1 << 30, pids=100, disk=1 << 30))
    when = tenants.set_quota("alice", {"memory": 2 << 30, "disk": 2 << 30})
    assert when == {"memory": "at next start", "disk": "now"}  # stopped: cgroups come later
    tenants.start("alice")
    assert tenants.set_quota("alice", {"pids": 200, "cpus": None}) == {
        "pids": "now",
        "cpus": "now",
    }
    assert tenants.set_quota("alice", {"pids": 200}) == {"pids": "now"}  # unchanged: nothing to do
    quota = Limits(cpus=None, memory=2 << 30, pids=200, disk=2 << 30)
    assert host.state.quota("alice") == quota and host.rt.get("alice").limits == quota
    assert host.state.events("alice")[-1][2] == "quota pids=200"


def test_lifting_the_disk_quota_gives_the_whole_file_system(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"), quota=Limits(disk=1 << 30))
    tenants.set_quota("alice", {"disk": None})
    assert host.state.quota("alice").disk is None
    assert host.rt.get("alice").limits.disk == tenants._whole_disk()


def test_a_failed_quota_change_is_not_recorded(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"), quota=Limits(pids=100))
    host.rt.fail("set_limits")
    with pytest.raises(RuntimeFailure):
        tenants.set_quota("alice", {"pids": 5})
    assert host.state.quota("alice").pids == 100
    with pytest.raises(NotFound):
        tenants.set_quota("nosuchuser", {"pids": 5})


# -- ports -----------------------------------------------------------------------------------


def test_grants_are_forwarded_to_the_tenants_address(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    tenants.add(host.user("bob", uid=2001))
    tenants.grant_ports("bob", 30000, 30009)
    tenants.grant_ports("alice", 30010, 30010)
    assert host.rt.forwards == [
        Forward(30000, 30009, IPv4Address("10.213.0.3")),
        Forward(30010, 30010, IPv4Address("10.213.0.2")),
    ]
    with pytest.raises(Conflict, match="overlap 30000-30009 granted to bob"):
        tenants.grant_ports("alice", 30005, 30020)
    with pytest.raises(NotFound, match="nosuchuser is not a tenant"):
        tenants.grant_ports("nosuchuser", 31000, 31000)
    with pytest.raises(HostdError, match=r"ports below 1024 \(80\) are privileged"):
        tenants.grant_ports("alice", 80, 80)
    tenants.revoke_ports("bob", 30000, 30009)
    assert host.rt.forwards == [Forward(30010, 30010, IPv4Address("10.213.0.2"))]
    with pytest.raises(NotFound, match="bob has no grant of ports 30000-30009"):
        tenants.revoke_ports("bob", 30000, 30009)
    assert [e[2] for e in host.state.events("bob")][-2:] == [
        "ports grant 30000-30009",
        "ports revoke 30000-30009",
    ]


def test_a_port_a_host_service_listens_on_is_refused(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(Conflict, match=f"port {port} is in use on the host"):
            tenants.grant_ports("alice", port - 1, port)
    assert host.state.port_grants() == []


def test_a_grant_the_network_cannot_apply_is_withdrawn(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    host.rt.fail("setup_network")
    with pytest.raises(RuntimeFailure, match="setup_network failed"):
        tenants.grant_ports("alice", 30000, 30000)
    assert host.state.port_grants() == []


# -- status ----------------------------------------------------------------------------------


def test_status_of_a_stopped_a_running_and_a_half_added_tenant(
    host: Host, tenants: Tenants
) -> None:
    tenants.add(host.user("alice"), quota=Limits(pids=100))
    s = tenants.status("alice")
    assert (s.state, s.memory, s.uptime, s.disk, s.quota.pids) == (
        "stopped",
        None,
        None,
        11 << 20,
        100,
    )
    tenants.start("alice")
    s = tenants.status("alice")
    assert (s.state, s.memory, s.cpu_seconds, s.pids) == ("running", 64 << 20, 1.5, 12)
    assert (s.range_start, s.image) == (MIN, "default")
    host.state.set_phase("alice", "adding")
    assert tenants.status("alice").state == "adding"


def test_status_of_all_reads_each_tenants_own_records(host: Host, tenants: Tenants) -> None:
    """One statement reads every tenant's quota, failure and dormancy: none gets another's.
    A container deleted since that read (a removal) is left out of the list."""
    for user, pids in (("alice", 100), ("bob", 200), ("carol", 300)):
        tenants.add(host.user(user), quota=Limits(pids=pids))
    host.state.set_failure("bob", "it broke")
    host.state.set_dormant("carol", "2026-11-01T00:00:00+00:00")
    got = [(s.user, s.state, s.quota.pids, s.reason) for s in tenants.statuses()]
    assert got == [
        ("alice", "stopped", 100, None),
        ("bob", "failed", 200, "it broke"),
        ("carol", "stopped", 300, "idle since 2026-11-01T00:00:00+00:00; starts at the next login"),
    ]
    assert [s.user for s in tenants.statuses("bob")] == ["bob"]
    with pytest.raises(NotFound, match="dave is not a tenant"):
        tenants.statuses("dave")
    host.rt.delete("bob", force=True)  # as a removal does, after status read the state
    assert [s.user for s in tenants.statuses()] == ["alice", "carol"]
    with pytest.raises(NotFound, match="container 'bob' does not exist"):
        tenants.status("bob")


# -- ranges ----------------------------------------------------------------------------------


def test_release_range_hands_a_quarantined_range_out_again(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    with pytest.raises(Conflict, match=f"ID range starting at {MIN} is active for alice"):
        tenants.release_range(MIN)
    with pytest.raises(NotFound, match="no ID range starts at 5"):
        tenants.release_range(5)
    tenants.remove("alice")
    record = tenants.release_range(MIN)
    assert (record.user, record.status) == ("alice", "quarantined")
    assert host.ranges() == {} and host.registered() == []
    assert tenants.add(host.user("bob", uid=2001)).range_start == MIN


def test_a_kept_range_is_not_released(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    tenants.remove("alice", keep_data=True)
    with pytest.raises(Conflict, match="is kept for alice"):
        tenants.release_range(MIN)


# -- reconcile after a crash -------------------------------------------------------------------


def crash_in_add(host: Host, monkeypatch: pytest.MonkeyPatch, after_create: bool) -> None:
    """An add whose process dies before it finishes: no undo runs."""
    crashing = host.tenants()
    monkeypatch.setattr(crashing, "_undo_add", lambda *_: None)
    if after_create:
        monkeypatch.setattr(crashing, "_home_quota", lambda *_: _die())
    else:
        host.rt.fail("create")
    with pytest.raises(RuntimeFailure):
        crashing.add("alice")


def _die() -> None:
    raise RuntimeFailure("killed", "test")


@pytest.mark.parametrize("after_create", [False, True])
def test_reconcile_rolls_back_an_interrupted_add(
    host: Host, monkeypatch: pytest.MonkeyPatch, after_create: bool
) -> None:
    host.user("alice")
    crash_in_add(host, monkeypatch, after_create)
    assert host.state.tenant("alice").phase == "adding"  # type: ignore[union-attr]
    assert ("alice" in host.rt.boxes) == after_create and host.registered() == [MIN]
    done = host.tenants().reconcile()
    assert "rolled back the interrupted add of alice" in done
    assert nothing_recorded(host) and host.rt.boxes == {}


def test_reconcile_keeps_a_container_the_interrupted_add_adopted(
    host: Host, tenants: Tenants, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenants.add(host.user("alice"))
    tenants.remove("alice", keep_data=True)
    host.rt.age("alice")  # created long before the re-add
    crash_in_add(host, monkeypatch, after_create=True)
    host.tenants().reconcile()
    assert host.state.tenant("alice") is None and "alice" in host.rt.boxes
    assert host.ranges() == {MIN: ("alice", "kept")} and host.registered() == [MIN]


def test_reconcile_finishes_an_interrupted_remove(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    tenants.start("alice")
    host.rt.fail("delete")
    with pytest.raises(RuntimeFailure):
        tenants.remove("alice")
    done = host.tenants().reconcile()
    assert "finished removing alice" in done
    assert host.state.tenant("alice") is None and host.rt.boxes == {}
    assert host.ranges() == {MIN: ("alice", "quarantined")}


def test_reconcile_drops_the_forwards_of_a_tenant_it_removes(host: Host, tenants: Tenants) -> None:
    """Found by the chaos test: reconcile applied the network before it finished a removal,
    so the nft forwards of the removed tenant's port grants stayed."""
    tenants.add(host.user("alice"))
    tenants.grant_ports("alice", 8080, 8080)
    host.rt.fail("delete")
    with pytest.raises(RuntimeFailure):
        tenants.remove("alice")
    assert host.rt.forwards  # the crash: the grant is still in the state and applied
    host.tenants().reconcile()
    assert host.state.port_grants() == [] and host.rt.forwards == []


def test_reconcile_removes_half_made_containers_and_restarts_tenants(
    host: Host, tenants: Tenants
) -> None:
    tenants.add(host.user("alice"))
    tenants.add(host.user("bob", uid=2001))
    tenants.start("alice")
    tenants.start("bob")
    tenants.stop("bob")
    host.rt.boxes["alice"].status = "stopped"  # the host rebooted
    host.rt.half_made.add("carol")
    done = host.tenants().reconcile()
    assert "removed the remains of the interrupted creation of carol" in done
    assert "restarted alice" in done and "restarted bob" not in done
    assert host.rt.state("alice").status == "running" and not host.rt.half_made
    assert ("close_dirs", "") in host.rt.calls


def test_reconcile_reports_a_tenant_that_cannot_restart(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    tenants.start("alice")
    host.rt.boxes["alice"].status = "stopped"
    host.rt.fail("start")
    done = host.tenants().reconcile()
    assert "cannot restart alice: start failed: test" in done


# -- rebase ------------------------------------------------------------------------------------


def test_rebase_refusals(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    with pytest.raises(NotFound, match="image 'nosuchimage' does not exist"):
        tenants.rebase("alice", "nosuchimage")
    tenants.start("alice")
    with pytest.raises(Conflict, match="alice's container is running") as info:
        tenants.rebase("alice", "other")
    assert "--restart" in info.value.fix
    host.state.set_phase("alice", "removing")
    with pytest.raises(Busy, match=r"alice is being set up or removed \(removing\)"):
        tenants.rebase("alice", "other")
    with pytest.raises(NotFound):
        tenants.rebase("nosuchuser")
    assert host.rt.get("alice").image == "default"


def test_rebase_to_the_current_version_does_nothing(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    tenants.start("alice")
    done = tenants.rebase("alice")
    assert done.old == done.new == "default@v1" and not done.restarted
    assert ("rebase", "alice") not in host.rt.calls


def test_rebase_moves_a_stopped_tenant(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    host.rt.pruned = ["default@v1"]
    done = tenants.rebase("alice", "other")
    assert (done.image, done.old, done.new, done.restarted) == (
        "other",
        "default@v1",
        "other@v1",
        False,
    )
    assert done.warning is not None and "packages to reinstall: vim" in done.warning
    assert done.pruned == ("default@v1",)
    assert host.state.tenant("alice").image == "other"  # type: ignore[union-attr]


def test_rebase_with_restart_and_its_failure(host: Host, tenants: Tenants) -> None:
    tenants.add(host.user("alice"))
    tenants.start("alice")
    host.rt.fail("rebase")
    with pytest.raises(RuntimeFailure, match="rebase failed"):
        tenants.rebase("alice", "other", restart=True)
    assert host.rt.state("alice").status == "running"  # started again on its old image
    assert host.rt.get("alice").image == "default"
    done = tenants.rebase("alice", "other", restart=True)
    assert done.restarted and host.rt.state("alice").status == "running"
    assert host.rt.get("alice").image == "other"


def test_a_rebased_tenant_that_does_not_come_up_is_told_where_its_files_are(
    host: Host, tenants: Tenants
) -> None:
    tenants.add(host.user("alice"))
    tenants.start("alice")
    host.rt.fail("wait_ready", RuntimeFailure("container 'alice' booted degraded", "see logs"))
    with pytest.raises(HostdError, match="alice is now on other@v1 but did not come up") as info:
        tenants.rebase("alice", "other", restart=True)
    assert "set aside inside the container" in info.value.fix


# -- properties --------------------------------------------------------------------------------

USERS = ("a", "b", "c", "d", "e")
OPS = st.lists(
    st.tuples(st.sampled_from(("add", "remove", "keep", "release")), st.sampled_from(USERS)),
    max_size=14,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_ranges_and_addresses_never_overlap(ops: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        host = make_host(Path(tmp))
        try:
            tenants = host.tenants()
            for i, name in enumerate(USERS):
                host.user(name, uid=2000 + i)
            for op, user in ops:
                try:
                    if op == "add":
                        tenants.add(user)
                    elif op in ("remove", "keep"):
                        tenants.remove(user, keep_data=op == "keep")
                    else:
                        tenants.release_range(next(iter(host.ranges()), MIN))
                except RuntimeFailure:
                    pass
                _check_invariants(host)
        finally:
            host.state.close()


def _check_invariants(host: Host) -> None:
    starts = host.registered()
    assert all(b - a >= RANGE_SIZE for a, b in zip(starts, starts[1:], strict=False))
    assert sorted(host.ranges()) == starts  # every recorded range is registered, and only those
    active: list[Tenant] = host.state.tenants()
    assert all(host.ranges()[t.range_start] == (t.user, "active") for t in active)
    containers = host.rt.containers()
    ids = [c.ids for c in containers]
    assert not any(a.overlaps(b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    addresses = [c.address for c in containers]
    assert len(set(addresses)) == len(addresses)
    for c in containers:  # a container is a tenant's, or kept for its user with its range
        assert host.ranges()[c.ids.start][0] == c.name


# -- the start queue -----------------------------------------------------------------------------


class HeldBoots:
    """Boots (wait_ready) of the fake runtime that last until released, counted."""

    def __init__(self, rt: FakeRuntime) -> None:
        self.rt = rt
        self.booting: set[str] = set()
        self.most = 0
        self.release = threading.Event()
        self._guard = threading.Lock()
        rt.wait_ready = self.wait_ready  # type: ignore[method-assign]

    def wait_ready(self, name: str) -> None:
        with self._guard:
            self.booting.add(name)
            self.most = max(self.most, len(self.booting))
        try:
            assert self.release.wait(10), f"{name}'s boot was never released"
        finally:
            with self._guard:
                self.booting.discard(name)


def with_slots(host: Host, slots: int) -> Tenants:
    host.cfg = replace(host.cfg, runtime=replace(host.cfg.runtime, parallel_starts=slots))
    return host.tenants()


def test_queued_and_starting_tenants_show_so_and_a_running_one_never_queues(
    host: Host,
) -> None:
    tenants = with_slots(host, 1)
    for i, name in enumerate(("alice", "bob", "carol")):
        tenants.add(host.user(name, uid=2000 + i))
    tenants.start("carol")  # running before the storm
    boots = HeldBoots(host.rt)
    heard: dict[str, list[str]] = {"alice": [], "bob": []}
    threads = [
        threading.Thread(target=tenants.start, args=(n, heard[n].append), daemon=True)
        for n in ("alice", "bob")
    ]
    try:
        threads[0].start()
        wait_for(lambda: "alice" in boots.booting, 10, "alice booting")
        threads[1].start()
        wait_for(lambda: heard["bob"], 10, "bob told his place")
        assert heard["bob"] == ["waiting to start: 1st in line, 1 starting"]
        assert (tenants.status("alice").state, tenants.status("alice").place) == ("starting", None)
        assert (tenants.status("bob").state, tenants.status("bob").place) == ("queued", 1)
        host.rt.wait_ready = lambda name: None  # type: ignore[method-assign]
        tenants.start("carol")  # running: not behind the queue
    finally:
        boots.release.set()
        for t in threads:
            t.join(10)
    assert boots.most == 1
    assert heard["alice"][0] == "starting the container"
    assert heard["bob"][1] == "starting the container"
    assert {tenants.status(n).state for n in ("alice", "bob", "carol")} == {"running"}


def test_a_failed_start_in_the_queue_frees_its_slot(host: Host) -> None:
    tenants = with_slots(host, 1)
    tenants.add(host.user("alice"))
    tenants.add(host.user("bob", uid=2001))
    host.rt.fail("wait_ready", RuntimeFailure("container 'alice' booted degraded", "see"))
    with pytest.raises(RuntimeFailure, match="booted degraded"):
        tenants.start("alice")
    assert dict(tenants.starts.view) == {}
    tenants.start("bob")
    assert tenants.status("bob").state == "running"


def test_reconcile_restarts_tenants_together_through_the_queue(host: Host) -> None:
    tenants = with_slots(host, 2)
    names = [host.user(n, uid=2000 + i) for i, n in enumerate(("alice", "bob", "carol"))]
    for name in names:
        tenants.add(name)
        tenants.start(name)
        host.rt.boxes[name].status = "stopped"  # the host rebooted
    boots = HeldBoots(host.rt)
    done: list[str] = []
    again = host.tenants()
    thread = threading.Thread(target=lambda: done.extend(again.reconcile()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(boots.booting) == 2, 10, "two tenants booting at once")
        assert list(again.starts.view.values()).count(STARTING) == 2
    finally:
        boots.release.set()
        thread.join(10)
    assert boots.most == 2
    assert [line for line in done if line.startswith("restarted")] == [
        f"restarted {n}" for n in names
    ]
