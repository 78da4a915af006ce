"""Root inside a system container is nobody on the host."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from runtime.containers import Runtime
from runtime.execs import ExecSpec
from tests.conftest import ContainerFactory, load_busybox, sh

NON_NAMESPACED_KNOBS = ("kernel/threads-max", "vm/swappiness", "kernel/panic")


def test_uid_map_is_only_the_given_range(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("sec")
    ids = rt.get(name).ids
    for kind in ("uid_map", "gid_map"):
        fields = sh(rt, name, f"cat /proc/self/{kind}").split()
        assert fields == ["0", str(ids.start), "65536"]
    # and the host sees the container's root as the range's first ID
    assert os.stat(f"/proc/{rt.state(name).pid}").st_uid == ids.start


@pytest.mark.parametrize("knob", NON_NAMESPACED_KNOBS)
def test_host_knobs_cannot_be_written(
    rt: Runtime, make_container: ContainerFactory, busybox_tar: Path, knob: str
) -> None:
    name = make_container("knob")
    path = f"/proc/sys/{knob}"
    before = Path(path).read_text()
    res = rt.exec(name, ExecSpec(["sh", "-c", f"echo 1 > {path}"]))
    assert res.returncode != 0
    load_busybox(rt, name, busybox_tar)
    res = rt.exec(
        name,
        ExecSpec(
            [
                "docker",
                "run",
                "--rm",
                "--privileged",
                "busybox:local",
                "sh",
                "-c",
                f"echo 1 > {path}",
            ]
        ),
    )
    assert res.returncode != 0, "an inner --privileged container changed a host knob"
    assert Path(path).read_text() == before


def test_sysrq_trigger_cannot_be_written(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("sysrq")
    assert rt.exec(name, ExecSpec(["sh", "-c", "echo h > /proc/sysrq-trigger"])).returncode != 0


def test_no_block_devices_and_no_host_disk(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("dev")
    root_dev = os.stat("/").st_dev
    major, minor = os.major(root_dev), os.minor(root_dev)
    res = rt.exec(name, ExecSpec(["mknod", "/tmp/disk", "b", str(major), str(minor)]))
    assert res.returncode != 0 and "Operation not permitted" in res.stderr
    mount_src = subprocess.run(
        ["findmnt", "-no", "SOURCE", "/"], capture_output=True, text=True, check=True
    ).stdout.strip()
    res = rt.exec(name, ExecSpec(["mount", mount_src, "/mnt"]))
    assert res.returncode != 0
    assert sh(rt, name, "ls /mnt | wc -l").strip() == "0"


def test_containers_see_neither_processes_nor_files_of_each_other(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    a, b = make_container("iso-a"), make_container("iso-b")
    sh(rt, a, "echo secret > /root/secret-a && (nohup sleep 4242 >/dev/null 2>&1 &)")
    assert "sleep 4242" in sh(rt, a, "ps -eo args")
    assert "sleep 4242" not in sh(rt, b, "ps -eo args")
    assert rt.exec(b, ExecSpec(["test", "-e", "/root/secret-a"])).returncode != 0
    # on the host, a's file belongs to a's range and is absent from b's storage
    upper_a = rt.state_dir / "containers" / a / "data/upper/root/secret-a"
    assert upper_a.stat().st_uid == rt.get(a).ids.start
    assert not (rt.state_dir / "containers" / b / "data/upper/root/secret-a").exists()


def test_host_dev_null_keeps_its_owner(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("null")
    sh(rt, name, "echo x > /dev/null")
    st = os.stat("/dev/null")
    assert (st.st_uid, st.st_gid) == (0, 0)
