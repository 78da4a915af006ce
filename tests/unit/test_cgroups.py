"""cgroup layout detection, the delegation plan, and applying it to a fake cgroup tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from runtime import cgroups, mountinfo
from runtime.cgroups import CgroupDir, Hierarchy, Layout
from runtime.errors import RuntimeFailure

# /proc/self/mountinfo of a hybrid (v1 controllers + v2 unified) Debian host.
V1_HYBRID = """\
23 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime shared:8 - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime shared:11 - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime shared:13 - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime shared:14 - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime shared:15 - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime shared:16 - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime shared:17 - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:18 - cgroup2 cgroup2 rw
"""
V2_UNIFIED = """\
23 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 23 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
"""
V1_ROOTS = (
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "memory",
    "pids",
    "systemd",
    "unified",
)
OWNER = 231072


def detect(text: str) -> Layout:
    return cgroups.detect(mountinfo.parse(text))


def dirs_by_path(plan: cgroups.CgroupPlan) -> dict[str, CgroupDir]:
    return {d.path: d for d in plan.dirs}


# -- detect ----------------------------------------------------------------------------------


def test_detects_hybrid_host_as_v1_with_one_hierarchy_per_controller_mount() -> None:
    layout = detect(V1_HYBRID)
    assert layout.version == 1
    assert [h.root for h in layout.hierarchies] == [f"/sys/fs/cgroup/{r}" for r in V1_ROOTS]
    by_root = {h.root: h.controllers for h in layout.hierarchies}
    assert by_root["/sys/fs/cgroup/cpuset"] == ("cpuset",)
    assert by_root["/sys/fs/cgroup/systemd"] == ("name=systemd",)
    assert by_root["/sys/fs/cgroup/unified"] == ("unified",)


def test_v1_hierarchy_with_joined_controllers_keeps_them_all() -> None:
    line = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    assert detect(line).hierarchies == (
        Hierarchy("/sys/fs/cgroup/cpu,cpuacct", ("cpu", "cpuacct")),
    )


def test_detects_unified_host_as_v2() -> None:
    assert detect(V2_UNIFIED) == Layout(2, (Hierarchy("/sys/fs/cgroup", ()),))


# -- plan ------------------------------------------------------------------------------------


def test_v1_plan_has_shared_parent_and_delegated_leaf_per_hierarchy() -> None:
    plan = cgroups.plan(detect(V1_HYBRID), "hostd", "alice", OWNER)
    assert plan.runc_path == "/hostd/alice"
    assert plan.owner == OWNER
    expected_paths = []
    for root in V1_ROOTS:
        expected_paths += [f"/sys/fs/cgroup/{root}/hostd", f"/sys/fs/cgroup/{root}/hostd/alice"]
    assert [d.path for d in plan.dirs] == expected_paths
    for d in plan.dirs:
        is_leaf = d.path.endswith("/alice")
        unified = d.path.startswith("/sys/fs/cgroup/unified/")
        v1_files = ("cgroup.procs", "tasks", "cgroup.clone_children")
        v2_files = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")
        assert d.chown == ((v2_files if unified else v1_files) if is_leaf else ())
        assert d.enable_controllers == ()


def test_v1_plan_fills_cpuset_dirs_from_their_parent_only() -> None:
    plan = cgroups.plan(detect(V1_HYBRID), "hostd", "alice", OWNER)
    for d in plan.dirs:
        in_cpuset = d.path.startswith("/sys/fs/cgroup/cpuset/")
        assert d.copy_from_parent == (("cpuset.cpus", "cpuset.mems") if in_cpuset else ()), d.path


def test_v2_plan_enables_controllers_on_parent_and_delegates_leaf() -> None:
    plan = cgroups.plan(detect(V2_UNIFIED), "hostd", "alice", OWNER)
    assert plan.runc_path == "/hostd/alice"
    assert plan.dirs == (
        CgroupDir("/sys/fs/cgroup/hostd", (), (), ("cpuset", "cpu", "io", "memory", "pids")),
        CgroupDir(
            "/sys/fs/cgroup/hostd/alice",
            ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads"),
        ),
    )


@pytest.mark.parametrize("text", [V1_HYBRID, V2_UNIFIED])
def test_plan_lists_parents_before_children(text: str) -> None:
    layout = detect(text)
    plan = cgroups.plan(layout, "hostd", "alice", OWNER)
    roots = {h.root for h in layout.hierarchies}
    seen: set[str] = set()
    for d in plan.dirs:
        assert os.path.dirname(d.path) in seen | roots, d.path
        seen.add(d.path)


# -- apply and remove on a fake tree ---------------------------------------------------------


@pytest.fixture
def chowned(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[int, int]]:
    """Paths apply() chowned (still chowned for real, to our own ID, to keep its errors)."""
    calls: dict[str, tuple[int, int]] = {}
    real_chown = os.chown

    def chown(path: str, uid: int, gid: int) -> None:
        calls[str(path)] = (uid, gid)
        real_chown(path, uid, gid)

    monkeypatch.setattr(cgroups.os, "chown", chown)
    return calls


def v1_tree(tmp_path: Path, *controllers: str) -> Layout:
    """Empty v1 hierarchy roots; a cpuset root gets the values the kernel would show."""
    hierarchies = []
    for controller in controllers:
        root = tmp_path / controller
        root.mkdir()
        if controller == "cpuset":
            (root / "cpuset.cpus").write_text("0-3\n")
            (root / "cpuset.mems").write_text("0\n")
        hierarchies.append(Hierarchy(str(root), (controller,)))
    return Layout(1, tuple(hierarchies))


def v2_tree(tmp_path: Path, available: str) -> Layout:
    """A v2 root whose shared parent exists (the kernel fills cgroup.controllers on mkdir)."""
    (tmp_path / "hostd").mkdir()
    (tmp_path / "hostd/cgroup.controllers").write_text(available + "\n")
    return Layout(2, (Hierarchy(str(tmp_path), ()),))


def test_apply_v1_creates_dirs_copies_cpuset_and_delegates_leaf(
    tmp_path: Path, chowned: dict[str, tuple[int, int]]
) -> None:
    plan = cgroups.plan(v1_tree(tmp_path, "cpuset", "pids"), "hostd", "alice", os.getuid())
    cgroups.apply(plan)
    for sub in ("hostd", "hostd/alice"):
        assert (tmp_path / "cpuset" / sub / "cpuset.cpus").read_text() == "0-3"
        assert (tmp_path / "cpuset" / sub / "cpuset.mems").read_text() == "0"
        assert (tmp_path / "pids" / sub).is_dir()
    own = (os.getuid(), os.getuid())
    for controller in ("cpuset", "pids"):
        leaf = f"{tmp_path}/{controller}/hostd/alice"
        assert chowned.pop(leaf) == own
        for fname in ("cgroup.procs", "tasks", "cgroup.clone_children"):
            assert chowned.pop(f"{leaf}/{fname}") == own
    assert chowned == {}  # the shared parents stay the host's


def test_apply_is_idempotent_and_shares_the_parent(tmp_path: Path) -> None:
    layout = v1_tree(tmp_path, "cpuset", "pids")
    for name in ("alice", "alice", "bob"):
        cgroups.apply(cgroups.plan(layout, "hostd", name, os.getuid()))
    assert sorted(p.name for p in (tmp_path / "pids/hostd").iterdir()) == ["alice", "bob"]


def test_apply_v2_enables_the_available_controllers_in_plan_order(tmp_path: Path) -> None:
    plan = cgroups.plan(v2_tree(tmp_path, "memory pids cpu hugetlb"), "hostd", "a", os.getuid())
    cgroups.apply(plan)
    assert (tmp_path / "hostd/cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (tmp_path / "hostd/a").is_dir()


def test_apply_v2_writes_nothing_when_no_controller_is_available(tmp_path: Path) -> None:
    cgroups.apply(cgroups.plan(v2_tree(tmp_path, ""), "hostd", "a", os.getuid()))
    assert not (tmp_path / "hostd/cgroup.subtree_control").exists()


def test_remove_keeps_a_sibling_container_and_the_shared_parent(tmp_path: Path) -> None:
    layout = v1_tree(tmp_path, "pids", "systemd")
    alice, bob = (cgroups.plan(layout, "hostd", n, os.getuid()) for n in ("alice", "bob"))
    cgroups.apply(alice)
    cgroups.apply(bob)
    cgroups.remove(alice)
    assert cgroups.exists(alice) == []
    assert cgroups.exists(bob) == [f"{tmp_path}/pids/hostd/bob", f"{tmp_path}/systemd/hostd/bob"]
    cgroups.remove(bob)
    assert os.listdir(tmp_path / "pids") == os.listdir(tmp_path / "systemd") == []


def test_remove_deletes_sub_cgroups_left_by_the_inner_systemd(tmp_path: Path) -> None:
    plan = cgroups.plan(v1_tree(tmp_path, "systemd"), "hostd", "alice", os.getuid())
    cgroups.apply(plan)
    leaf = tmp_path / "systemd/hostd/alice"
    (leaf / "init.scope").mkdir()
    (leaf / "system.slice/docker.service").mkdir(parents=True)
    cgroups.remove(plan)
    assert not (tmp_path / "systemd/hostd").exists()


def test_remove_of_an_absent_container_is_a_no_op(tmp_path: Path) -> None:
    plan = cgroups.plan(v1_tree(tmp_path, "pids"), "hostd", "alice", os.getuid())
    cgroups.remove(plan)
    cgroups.apply(plan)
    cgroups.remove(plan)
    cgroups.remove(plan)
    assert cgroups.exists(plan) == []


# -- session helpers ---------------------------------------------------------------------------


def test_session_helpers_are_charged_in_memory_pids_and_cpu_on_v1() -> None:
    plan = cgroups.session_plan(detect(V1_HYBRID), "hostd", "alice")
    assert plan.dirs == tuple(
        f"/sys/fs/cgroup/{c}/hostd/alice/hostd-sessions" for c in ("cpu", "memory", "pids")
    )
    assert plan.procs[1] == "/sys/fs/cgroup/memory/hostd/alice/hostd-sessions/cgroup.procs"
    assert plan.exec_options == ()  # runc exec joins the container's own cgroups


def test_session_helpers_share_the_tenant_node_on_v2() -> None:
    plan = cgroups.session_plan(detect(V2_UNIFIED), "hostd", "alice")
    assert plan.procs == ("/sys/fs/cgroup/hostd/alice/hostd-sessions/cgroup.procs",)
    # The programs too: not runc's fallback, the inner systemd's init.scope (15 % of the tasks).
    assert plan.exec_options == ("--cgroup", "hostd-sessions")


def test_the_join_wrapper_moves_itself_before_the_program_runs(tmp_path: Path) -> None:
    dirs = tuple(str(tmp_path / n) for n in ("memory", "pids"))
    for d in dirs:
        os.mkdir(d)
    argv = cgroups.join_argv(
        cgroups.SessionCgroup(dirs), ["sh", "-c", 'echo $$; cat "$0"', f"{dirs[0]}/cgroup.procs"]
    )
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    pid = out[0]  # the program's PID is the wrapper's: it joined, then exec'd
    assert out[1:] == [pid]
    assert (tmp_path / "pids/cgroup.procs").read_text().strip() == pid


def test_the_join_wrapper_stops_when_it_cannot_join(tmp_path: Path) -> None:
    argv = cgroups.join_argv(cgroups.SessionCgroup((str(tmp_path / "gone"),)), ["echo", "ran"])
    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode == 125 and "ran" not in res.stdout


def test_a_session_cgroup_made_by_someone_else_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "tenant" / "hostd-sessions"
    plan = cgroups.SessionCgroup((str(d),))
    with pytest.raises(RuntimeFailure, match="the container is not running"):
        cgroups.apply_session(plan)
    d.parent.mkdir()
    if os.geteuid() == 0:
        cgroups.apply_session(plan)  # made by root: used
        os.chown(d, 231072, 231072)  # as if the container's root had made it
    with pytest.raises(RuntimeFailure, match="is not root's: the container made it"):
        cgroups.apply_session(plan)


# -- hostd's background work ------------------------------------------------------------------


def test_background_work_goes_beside_the_containers_in_the_cpu_hierarchy() -> None:
    v1 = cgroups.background_plan(detect(V1_HYBRID), "hostd")
    assert v1.dirs == ("/sys/fs/cgroup/cpu/hostd/.background",)
    v2 = cgroups.background_plan(detect(V2_UNIFIED), "hostd.slice/hostd-tenants.service")
    assert v2.dirs == ("/sys/fs/cgroup/hostd.slice/hostd-tenants.service/.background",)


def test_background_gets_the_least_cpu_weight_of_v1_or_v2(tmp_path: Path) -> None:
    for weight, value in (("cpu.shares", "2"), ("cpu.weight", "1")):
        d = tmp_path / weight / ".background"
        d.mkdir(parents=True)  # a cgroup file system makes the file with the directory
        (d / weight).touch()
        assert cgroups.apply_background(cgroups.SessionCgroup((str(d),)))
        assert (d / weight).read_text() == value


def test_no_background_without_a_parent_or_a_weight_to_set(tmp_path: Path) -> None:
    """No container runs (no parent), or the cpu controller is off there: none, nothing left."""
    assert not cgroups.apply_background(cgroups.SessionCgroup((str(tmp_path / "p/.background"),)))
    assert not cgroups.apply_background(cgroups.SessionCgroup((str(tmp_path / ".background"),)))
    assert os.listdir(tmp_path) == []


# -- the parent under systemd ------------------------------------------------------------------


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where systemd, when it is PID 1, says so (not there yet)."""
    path = tmp_path / "run-systemd-system"
    monkeypatch.setattr(cgroups, "SYSTEMD_DIR", str(path))
    return path


def test_the_default_parent_is_hostd_tenants_service_while_systemd_runs_it(
    tmp_path: Path, systemd: Path
) -> None:
    layout = Layout(2, (Hierarchy(str(tmp_path / "cg"), ()),))
    assert cgroups.default_parent(layout) == "hostd"  # no systemd
    systemd.mkdir()
    assert cgroups.default_parent(layout) == "hostd"  # the unit is not active
    (tmp_path / "cg" / cgroups.SYSTEMD_PARENT).mkdir(parents=True)
    assert cgroups.default_parent(layout) == "hostd.slice/hostd-tenants.service"


def test_the_default_parent_on_v1_is_read_in_the_name_systemd_hierarchy(
    tmp_path: Path, systemd: Path
) -> None:
    systemd.mkdir()
    layout = Layout(
        1,
        (
            Hierarchy(str(tmp_path / "cpu"), ("cpu",)),
            Hierarchy(str(tmp_path / "sd"), ("name=systemd",)),
        ),
    )
    (tmp_path / "cpu" / cgroups.SYSTEMD_PARENT).mkdir(parents=True)  # not where systemd says
    assert cgroups.default_parent(layout) == "hostd"
    (tmp_path / "sd" / cgroups.SYSTEMD_PARENT).mkdir(parents=True)
    assert cgroups.default_parent(layout) == cgroups.SYSTEMD_PARENT


def test_under_systemd_containers_go_below_its_unit_which_is_never_removed(
    tmp_path: Path,
) -> None:
    """v1 cpuset filled in from the top down through hostd.slice; removing the last container
    leaves the cgroups systemd made."""
    layout = v1_tree(tmp_path, "cpuset")
    plan = cgroups.plan(layout, cgroups.SYSTEMD_PARENT, "alice", os.getuid())
    assert [d.path for d in plan.dirs] == [
        f"{tmp_path}/cpuset/hostd.slice",
        f"{tmp_path}/cpuset/hostd.slice/hostd-tenants.service",
        f"{tmp_path}/cpuset/hostd.slice/hostd-tenants.service/alice",
    ]
    assert plan.runc_path == "/hostd.slice/hostd-tenants.service/alice"
    cgroups.apply(plan)
    assert (tmp_path / "cpuset" / cgroups.SYSTEMD_PARENT / "alice/cpuset.cpus").read_text() == "0-3"
    plan = cgroups.plan(v1_tree(tmp_path, "pids"), cgroups.SYSTEMD_PARENT, "alice", os.getuid())
    cgroups.apply(plan)
    cgroups.remove(plan)
    assert cgroups.exists(plan) == []
    assert (tmp_path / "pids" / cgroups.SYSTEMD_PARENT).is_dir()


def test_v2_enables_controllers_in_the_delegated_unit_only(tmp_path: Path) -> None:
    unit = tmp_path / cgroups.SYSTEMD_PARENT
    unit.mkdir(parents=True)
    (unit / "cgroup.controllers").write_text("cpu memory pids\n")
    plan = cgroups.plan(
        Layout(2, (Hierarchy(str(tmp_path), ()),)), cgroups.SYSTEMD_PARENT, "a", os.getuid()
    )
    cgroups.apply(plan)
    assert (unit / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert not (tmp_path / "hostd.slice/cgroup.subtree_control").exists()  # systemd's slice


def test_the_holder_of_hostd_tenants_service_finds_its_v2_cgroup() -> None:
    hybrid = "12:pids:/hostd.slice/x\n1:name=systemd:/hostd.slice/x\n0::/hostd.slice/x\n"
    assert cgroups.unified_path(hybrid) == "/hostd.slice/x"
    assert cgroups.unified_path("0::/\n") == "/"
    with pytest.raises(RuntimeFailure, match="no cgroup v2 line"):
        cgroups.unified_path("1:name=systemd:/x\n")


def test_the_holder_moves_to_a_leaf_on_v2_only(tmp_path: Path) -> None:
    """On v2 the unit's cgroup must hold no process to enable controllers for the tenants."""
    own = tmp_path / cgroups.SYSTEMD_PARENT
    own.mkdir(parents=True)
    v2 = Layout(2, (Hierarchy(str(tmp_path), ()),))
    leaf = cgroups.hold(v2, f"/{cgroups.SYSTEMD_PARENT}", 4242)
    assert leaf == f"{own}/.holder"
    assert (own / ".holder" / "cgroup.procs").read_text() == "4242"
    assert cgroups.hold(v2, f"/{cgroups.SYSTEMD_PARENT}", 4243) == leaf  # the leaf exists
    v1 = Layout(1, (Hierarchy(str(tmp_path / "v1"), ("name=systemd",)),))
    assert cgroups.hold(v1, f"/{cgroups.SYSTEMD_PARENT}", 4242) is None
    assert not (tmp_path / "v1").exists()
