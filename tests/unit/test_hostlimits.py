"""Host limits: kernel settings raised (never lowered), the packaged sysctl.d file, home quota
detection, and the container joining a user namespace made for it (checked without root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostd import hostlimits
from runtime import sysctl
from runtime.errors import RuntimeFailure
from runtime.ids import IdRange
from runtime.mountinfo import Mount
from runtime.spec import ContainerSpec, build_config

PACKAGED = Path(__file__).resolve().parents[2] / "packaging" / "sysctl.d" / "60-hostd.conf"


@pytest.fixture
def proc_sys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /proc/sys holding the kernel's defaults of the settings hostd raises."""
    monkeypatch.setattr(sysctl, "ROOT", tmp_path)
    (tmp_path / "fs/inotify").mkdir(parents=True)
    (tmp_path / "fs/inotify/max_user_instances").write_text("128\n")
    (tmp_path / "fs/inotify/max_user_watches").write_text("8192\n")
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel/pid_max").write_text("32768\n")
    return tmp_path


def test_packaged_sysctl_file_sets_what_hostd_raises() -> None:
    lines = [ln for ln in PACKAGED.read_text().splitlines() if ln and not ln.startswith("#")]
    found = {k.strip(): int(v) for k, _, v in (ln.partition("=") for ln in lines)}
    assert found == {sysctl.name(key): value for key, value in hostlimits.SETTINGS}


def test_settings_are_raised_and_reported(proc_sys: Path) -> None:
    assert hostlimits.raise_settings() == [
        "raised fs.inotify.max_user_instances from 128 to 1024",
        "raised fs.inotify.max_user_watches from 8192 to 524288",
        "raised kernel.pid_max from 32768 to 4194304",
    ]
    assert (proc_sys / "fs/inotify/max_user_instances").read_text() == "1024"
    assert hostlimits.raise_settings() == []  # nothing more to do
    assert "hostd raises" not in hostlimits.settings_report()


def test_a_higher_value_set_by_the_admin_is_kept(proc_sys: Path) -> None:
    (proc_sys / "fs/inotify/max_user_instances").write_text("8192\n")
    (proc_sys / "kernel/pid_max").write_text("4194304\n")
    assert hostlimits.raise_settings() == ["raised fs.inotify.max_user_watches from 8192 to 524288"]
    assert (proc_sys / "fs/inotify/max_user_instances").read_text() == "8192\n"


def test_doctor_says_what_hostd_will_raise(proc_sys: Path) -> None:
    report = hostlimits.settings_report()
    assert report.startswith("fs.inotify.max_user_instances = 128, ")
    assert report.endswith(
        "hostd raises fs.inotify.max_user_instances to 1024 and "
        "fs.inotify.max_user_watches to 524288 when it starts"
    )


def test_an_unwritable_setting_is_one_line_with_a_fix(proc_sys: Path) -> None:
    (proc_sys / "fs/inotify/max_user_watches").unlink()
    (proc_sys / "fs/inotify/max_user_watches").mkdir()
    with pytest.raises(RuntimeFailure) as info:
        hostlimits.raise_settings()
    assert str(info.value).startswith("cannot read fs.inotify.max_user_watches")


def _mount(target: str, fstype: str = "ext4", *options: str) -> Mount:
    return Mount(target, fstype, "/dev/sda1", ("rw", *options))


@pytest.mark.parametrize(
    ("mounts", "enforced", "target"),
    [
        ([_mount("/"), _mount("/home", "ext4", "usrquota")], True, "/home"),
        ([_mount("/"), _mount("/home", "xfs", "uquota")], True, "/home"),
        ([_mount("/", "ext4", "usrjquota=aquota.user", "jqfmt=vfsv1")], True, "/"),
        ([_mount("/", "ext4", "usrquota"), _mount("/home")], False, "/home"),  # nearest wins
        ([_mount("/"), _mount("/home2", "ext4", "usrquota")], False, "/"),  # not a prefix
        ([_mount("/"), _mount("/home", "xfs", "prjquota")], False, "/home"),  # project only
    ],
)
def test_home_quota_support_is_the_nearest_mount(
    mounts: list[Mount], enforced: bool, target: str
) -> None:
    support = hostlimits.home_quota("/home/alice", mounts)
    assert (support.enforced, support.mount.target) == (enforced, target)


def test_home_quota_says_which() -> None:
    on = hostlimits.home_quota("/home/a", [_mount("/"), _mount("/home", "ext4", "usrquota")])
    assert on.describe() == "enforced (ext4 usrquota on /home)"
    off = hostlimits.home_quota("/home/a", [_mount("/")])
    assert off.describe() == (
        "not available: / (ext4) has no usrquota; homes are outside the tenants' disk caps"
    )


def test_setquota_gets_kib_blocks_rounded_up() -> None:
    assert hostlimits.setquota_argv("alice", 10 * 2**30 + 1, "/home") == [
        "setquota",
        "-u",
        "alice",
        "10485761",
        "10485761",
        "0",
        "0",
        "/home",
    ]


def test_container_joins_the_user_namespace_made_for_it() -> None:
    spec = ContainerSpec(
        "alice", "alice", IdRange(231072), "/r", "/hostd/alice", userns_path="/proc/42/fd/7"
    )
    linux = build_config(spec)["linux"]
    assert linux["namespaces"][0] == {"type": "user", "path": "/proc/42/fd/7"}
    assert all(set(ns) == {"type"} for ns in linux["namespaces"][1:])  # the rest are new
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 231072, "size": 65536}]


@pytest.mark.parametrize(
    ("taken", "free"),
    [
        ([], 10),
        ([(0, 99999), (755360, 999999)], 10),  # outside the bounds
        ([(100000, 165535), (120000, 130000)], 9),  # overlapping entries
        ([(400000, 400000)], 9),  # one ID in the middle costs a whole range
        ([(100000, 755359)], 0),
    ],
)
def test_free_ranges_count_whole_ranges_between_the_taken(
    taken: list[tuple[int, int]], free: int
) -> None:
    assert hostlimits.free_ranges(taken, 100000, 755359, 65536) == free
