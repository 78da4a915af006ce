"""config.json of a system container: the isolation it promises, checked without root."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import seccomp
from runtime.execs import ExecSpec
from runtime.ids import MAX_ID, MIN_START, RANGE_SIZE, IdRange
from runtime.limits import Limits
from runtime.spec import CAPABILITIES, Bind, ContainerSpec, build_config, exec_process

START = 231072
BINDS = (
    Bind("/state/alice/data/docker", "/var/lib/docker"),
    Bind("/state/alice/etc/hosts", "/etc/hosts", ("bind", "nosuid", "nodev")),
)
STANDARD_TMPFS = ("/dev", "/dev/shm", "/run", "/run/lock", "/tmp")


def make_spec(**overrides: Any) -> ContainerSpec:
    fields: dict[str, Any] = {
        "name": "alice",
        "hostname": "alice-box",
        "ids": IdRange(START),
        "rootfs": "/state/alice/rootfs",
        "cgroups_path": "/hostd/alice",
        "binds": BINDS,
    }
    return ContainerSpec(**{**fields, **overrides})


@pytest.fixture
def config() -> dict[str, Any]:
    return build_config(make_spec())


def mount_at(config: dict[str, Any], destination: str) -> dict[str, Any]:
    found = [m for m in config["mounts"] if m["destination"] == destination]
    assert len(found) == 1, f"{destination} mounted {len(found)} times"
    return found[0]


def destinations(config: dict[str, Any]) -> list[str]:
    return [m["destination"] for m in config["mounts"]]


def test_namespaces_are_exactly_the_isolating_set(config: dict[str, Any]) -> None:
    types = [ns["type"] for ns in config["linux"]["namespaces"]]
    assert sorted(types) == sorted(["user", "mount", "pid", "network", "ipc", "uts", "cgroup"])
    assert all(set(ns) == {"type"} for ns in config["linux"]["namespaces"])  # no host ns paths


def test_uid_and_gid_maps_are_the_single_container_range(config: dict[str, Any]) -> None:
    expected = [{"containerID": 0, "hostID": START, "size": 65536}]
    assert config["linux"]["uidMappings"] == expected
    assert config["linux"]["gidMappings"] == expected


@given(st.integers(MIN_START, MAX_ID - RANGE_SIZE + 1))
def test_host_root_is_never_mapped(start: int) -> None:
    linux = build_config(make_spec(ids=IdRange(start)))["linux"]
    for entry in linux["uidMappings"] + linux["gidMappings"]:
        assert not entry["hostID"] <= 0 < entry["hostID"] + entry["size"]


def test_every_capability_set_is_full(config: dict[str, Any]) -> None:
    caps = config["process"]["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted", "inheritable", "ambient"}
    for name, granted in caps.items():
        assert granted == list(CAPABILITIES), name


def test_capability_list_has_every_kernel_6_capability_once() -> None:
    assert len(CAPABILITIES) == len(set(CAPABILITIES)) == 41  # CAP_LAST_CAP is 40
    assert CAPABILITIES[0] == "CAP_CHOWN"
    assert CAPABILITIES[-1] == "CAP_CHECKPOINT_RESTORE"


def test_proc_and_sys_are_their_kernel_file_systems(config: dict[str, Any]) -> None:
    assert mount_at(config, "/proc")["type"] == "proc"
    assert mount_at(config, "/sys")["type"] == "sysfs"


def test_cgroup_file_system_is_writable_for_the_inner_systemd(config: dict[str, Any]) -> None:
    cgroup = mount_at(config, "/sys/fs/cgroup")
    assert cgroup["type"] == "cgroup"
    assert "rw" in cgroup["options"]
    assert "ro" not in cgroup["options"]


@pytest.mark.parametrize("destination", STANDARD_TMPFS)
def test_scratch_directories_are_tmpfs(config: dict[str, Any], destination: str) -> None:
    assert mount_at(config, destination)["type"] == "tmpfs"


def test_devpts_is_a_private_instance_with_usable_ptmx(config: dict[str, Any]) -> None:
    pts = mount_at(config, "/dev/pts")
    assert pts["type"] == "devpts"
    assert "newinstance" in pts["options"]
    assert "ptmxmode=0666" in pts["options"]


def test_mqueue_is_mounted(config: dict[str, Any]) -> None:
    assert mount_at(config, "/dev/mqueue")["type"] == "mqueue"


def test_parents_are_mounted_before_what_lies_below_them(config: dict[str, Any]) -> None:
    order = destinations(config)
    for parent, child in [
        ("/dev", "/dev/pts"),
        ("/dev", "/dev/shm"),
        ("/dev", "/dev/mqueue"),
        ("/sys", "/sys/fs/cgroup"),
        ("/run", "/run/lock"),
    ]:
        assert order.index(parent) < order.index(child), (parent, child)


def test_host_interfaces_are_masked_or_read_only(config: dict[str, Any]) -> None:
    assert "/proc/sysrq-trigger" in config["linux"]["readonlyPaths"]
    assert "/proc/kcore" in config["linux"]["maskedPaths"]


def test_binds_follow_the_standard_mounts_with_their_options(config: dict[str, Any]) -> None:
    standard = build_config(make_spec(binds=()))["mounts"]
    assert config["mounts"][: len(standard)] == standard
    assert config["mounts"][len(standard) :] == [
        {
            "destination": "/var/lib/docker",
            "type": "bind",
            "source": "/state/alice/data/docker",
            "options": ["rbind", "nosuid", "nodev"],
        },
        {
            "destination": "/etc/hosts",
            "type": "bind",
            "source": "/state/alice/etc/hosts",
            "options": ["bind", "nosuid", "nodev"],
        },
    ]


def test_init_defaults_to_sbin_init(config: dict[str, Any]) -> None:
    assert config["process"]["args"] == ["/sbin/init"]
    custom = build_config(make_spec(init=("/lib/systemd/systemd", "--log-level=debug")))
    assert custom["process"]["args"] == ["/lib/systemd/systemd", "--log-level=debug"]


def test_init_runs_as_root_inside_with_the_container_env(config: dict[str, Any]) -> None:
    process = config["process"]
    assert process["user"] == {"uid": 0, "gid": 0}
    assert "container=hostd" in process["env"]
    assert any(e.startswith("PATH=") for e in process["env"])


def test_spec_fields_are_passed_through(config: dict[str, Any]) -> None:
    assert config["hostname"] == "alice-box"
    assert config["root"] == {"path": "/state/alice/rootfs", "readonly": False}
    assert config["linux"]["cgroupsPath"] == "/hostd/alice"


def test_devices_cgroup_allows_everything(config: dict[str, Any]) -> None:
    # No type, major or minor: the rule matches every device.
    assert config["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]


def test_config_survives_json(config: dict[str, Any]) -> None:
    assert json.loads(json.dumps(config)) == config


def test_tty_process_of_a_user_sets_the_terminal_before_start_and_drops_capabilities() -> None:
    config = build_config(make_spec())
    spec = ExecSpec(["bash", "-l"], user="1000", env=["TERM=xterm"], cwd="/home/a")
    process = exec_process(config, spec, (40, 100))
    assert process["terminal"] is True
    assert process["consoleSize"] == {"height": 40, "width": 100}
    assert process["args"] == ["bash", "-l"]
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": []}
    assert process["cwd"] == "/home/a"
    bounding = config["process"]["capabilities"]["bounding"]
    assert process["capabilities"] == {"bounding": bounding}  # sudo still works
    assert process["env"][-1] == "TERM=xterm" and process["env"][0].startswith("PATH=")
    assert config["process"]["terminal"] is False  # the container's own config is untouched


def test_a_process_without_terminal_has_no_console_size() -> None:
    config = build_config(make_spec())
    process = exec_process(config, ExecSpec(["true"], groups=[27]), None)
    assert process["terminal"] is False and "consoleSize" not in process
    assert process["cwd"] == "/"
    assert process["user"] == {"uid": 0, "gid": 0, "additionalGids": [27]}
    assert process["capabilities"] == config["process"]["capabilities"]  # root keeps them


def test_limits_give_memory_without_extra_swap_a_cpu_cap_and_share_and_pids() -> None:
    limits = Limits(cpus=1.5, memory=512 * 2**20, pids=700)
    res = build_config(make_spec(limits=limits))["linux"]["resources"]
    assert res["memory"] == {"limit": 512 * 2**20, "swap": 512 * 2**20}
    assert res["cpu"] == {"quota": 150000, "period": 100000, "shares": 1536}
    assert res["pids"] == {"limit": 700}
    assert res["devices"] == [{"allow": True, "access": "rwm"}]


def test_no_limits_leave_only_the_device_rule() -> None:
    assert set(build_config(make_spec())["linux"]["resources"]) == {"devices"}


def test_runc_update_sets_every_limit_and_lifts_missing_ones() -> None:
    args = Limits(memory=2**30).runc_update_args()
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs == {
        "--memory": str(2**30),
        "--memory-swap": str(2**30),
        "--cpu-period": "100000",
        "--cpu-quota": "-1",
        "--cpu-share": "1024",
        "--pids-limit": "-1",
    }


@pytest.mark.parametrize(
    ("cpus", "host", "seed", "expected"),
    [(None, 8, 3, "0-7"), (1, 8, 3, "3"), (1.5, 8, 7, "0,7"), (2, 2, 0, "0-1"), (16, 8, 1, "0-7")],
)
def test_cpu_set_has_ceil_cpus_spread_by_seed(
    cpus: float | None, host: int, seed: int, expected: str
) -> None:
    assert Limits(cpus=cpus).cpu_set(host, seed) == expected


def test_cpu_set_lands_in_the_resources() -> None:
    res = build_config(make_spec(cpu_set="2,3"))["linux"]["resources"]
    assert res["cpu"] == {"cpus": "2,3"}


def test_the_default_seccomp_profile_of_the_machine_is_applied() -> None:
    linux = build_config(make_spec(machine="x86_64"))["linux"]
    assert linux["seccomp"] == seccomp.profile("x86_64")
    assert "SCMP_ARCH_X86" in linux["seccomp"]["architectures"]
    assert build_config(make_spec(machine="aarch64"))["linux"]["seccomp"] == seccomp.profile(
        "aarch64"
    )


def test_the_profile_does_not_need_no_new_privileges() -> None:
    """setuid programs (sudo, su) inside keep working under the filter."""
    assert build_config(make_spec())["process"]["noNewPrivileges"] is False
