"""What `hostctl status` reads of a container without running a program: cgroup usage from
the files of either cgroup version, whether a volume is mounted (device numbers), and the disk
walk of a container without a mounted volume, done once per DISK_WALK_TTL."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from runtime import cgroups, containers, storage, volume
from runtime.cgroups import Hierarchy, Layout, Usage
from runtime.containers import Runtime
from runtime.ids import IdRange
from runtime.limits import Limits
from runtime.records import Container, ContainerState
from runtime.settings import RootfsMode, Settings


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v1_usage_reads_memory_cpuacct_and_pids_of_the_leaf(tmp_path: Path) -> None:
    layout = Layout(
        1,
        tuple(Hierarchy(str(tmp_path / c), (c,)) for c in ("cpuacct", "memory", "pids", "systemd")),
    )
    write(tmp_path / "memory/hostd/alice/memory.usage_in_bytes", "41943040\n")
    write(tmp_path / "cpuacct/hostd/alice/cpuacct.usage", "2500000000\n")
    write(tmp_path / "pids/hostd/alice/pids.current", "17\n")
    assert cgroups.usage(layout, "hostd", "alice") == Usage(40 << 20, 2.5, 17)


def test_v2_usage_reads_memory_current_cpu_stat_and_pids(tmp_path: Path) -> None:
    layout = Layout(2, (Hierarchy(str(tmp_path), ()),))
    node = tmp_path / "hostd/alice"
    write(node / "memory.current", "1048576\n")
    write(node / "cpu.stat", "usage_usec 1250000\nuser_usec 1000000\nsystem_usec 250000\n")
    write(node / "pids.current", "3\n")
    assert cgroups.usage(layout, "hostd", "alice") == Usage(1 << 20, 1.25, 3)


def test_a_plain_or_missing_directory_is_no_mounted_volume(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    assert not volume.mounted(tmp_path / "data")
    assert not volume.mounted(tmp_path / "gone")


@pytest.fixture
def plain_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Runtime, list[str]]:
    """A Runtime over a temp state dir with one stopped container without a disk limit, its
    disk walks counted (each walk answers 4096 more than the last)."""
    monkeypatch.setattr(storage, "prepare_state_dir", lambda path: path.mkdir())  # modes aside
    rt = Runtime(Settings(tmp_path / "state"))
    rt.records.root.mkdir(parents=True)
    c = Container(
        "alice",
        "default",
        "/x",
        IdRange(1 << 20),
        "alice",
        RootfsMode.IDMAPPED,
        "t0",
        (),
        Limits(disk=None),
    )
    rt.records.dir("alice").mkdir()
    rt.records.write(c)
    walks: list[str] = []

    def walk(cdir: Path) -> int:
        walks.append(cdir.name)
        return 4096 * len(walks)

    monkeypatch.setattr(storage, "walked_used", walk)
    return rt, walks


def test_disk_walk_is_kept_for_its_ttl_then_done_again(
    plain_container: tuple[Runtime, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    rt, walks = plain_container
    now = [1000.0]
    monkeypatch.setattr(containers.time, "monotonic", lambda: now[0])
    assert [rt.disk_used("alice") for _ in range(3)] == [4096] * 3
    now[0] += containers.DISK_WALK_TTL
    assert rt.disk_used("alice") == 8192
    assert walks == ["alice", "alice"]


def test_a_container_made_again_under_the_same_name_is_walked_again(
    plain_container: tuple[Runtime, list[str]],
) -> None:
    rt, walks = plain_container
    assert rt.disk_used("alice") == 4096
    rt.records.write(replace(rt.get("alice"), created="t1"))
    assert rt.disk_used("alice") == 8192


def test_usage_of_a_stopped_container_is_none_without_reading_cgroups(
    plain_container: tuple[Runtime, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    rt, _ = plain_container
    monkeypatch.setattr(rt, "state", lambda name: ContainerState(rt.get(name), "stopped", 0))
    monkeypatch.setattr(cgroups, "usage", pytest.fail)
    assert rt.usage("alice") is None
