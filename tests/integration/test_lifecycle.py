"""Create, boot, exec, stop and delete system containers with the real runc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from runtime import mountinfo
from runtime.containers import Runtime
from runtime.execs import ExecSpec
from runtime.settings import RootfsMode
from tests.conftest import CGROUP_PARENT, INNER_DRIVER, ContainerFactory, sh
from tests.hostd_harness import read_until


def _cgroup_dirs(name: str) -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}/{name}") if p.is_dir()]


def test_create_maps_the_shared_template(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("create", start=False)
    c = rt.get(name)
    assert c.rootfs_mode is RootfsMode.IDMAPPED
    cdir = rt.state_dir / "containers" / name
    template = Path(c.image_dir) / "rootfs"
    # the template is seen through an ID-mapped mount: same files, owned by the range's root
    assert os.stat(template / "usr/sbin/dockerd").st_uid == 0
    assert os.stat(cdir / "rootfs/usr/sbin/dockerd").st_uid == c.ids.start
    assert os.stat(cdir / "rootfs/usr/bin/sudo").st_mode & 0o4000  # setuid kept
    # nothing of the template was copied into the container's storage
    assert not any((cdir / "data/upper").iterdir())


def test_boot_reaches_running_with_docker_ready(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    name = make_container("boot")
    assert rt.state(name).status == "running"
    assert sh(rt, name, "systemctl is-system-running").strip() == "running"
    assert sh(rt, name, "hostname").strip() == rt.get(name).hostname
    res = rt.exec(name, ExecSpec(["sudo", "-n", "true"]))
    assert res.returncode == 0 and "unable to resolve host" not in res.stderr
    assert sh(rt, name, "docker info --format '{{.Driver}}'").strip() == INNER_DRIVER
    assert sh(rt, name, "findmnt -no FSTYPE /run").strip() == "tmpfs"


def test_exec_passes_exit_status_and_user(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("exec")
    assert rt.exec(name, ExecSpec(["sh", "-c", "exit 7"])).returncode == 7
    assert rt.exec(name, ExecSpec(["id", "-u"], user="1000:1000")).stdout.strip() == "1000"
    res = rt.exec(name, ExecSpec(["sh", "-c", "cat; echo err >&2"]), input=b"in\n")
    assert (res.stdout, res.stderr) == ("in\n", "err\n")


def test_exec_with_terminal(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("tty")
    script = "tty; stty size; read line; stty size; echo got-$line; exit 5"
    p = rt.exec_tty(name, ExecSpec(["sh", "-c", script], env=["TERM=xterm"]), rows=40, cols=100)
    first = read_until(p.master, rb"40 100", bytearray())
    assert b"/dev/pts/0" in first
    p.resize(50, 120)
    os.write(p.master, b"hello\n")
    second = read_until(p.master, rb"got-hello", bytearray())
    assert b"50 120" in second
    assert p.wait() == 5


def test_stop_then_start_again(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("restart")
    sh(rt, name, "echo persisted > /root/file")
    rt.stop(name)
    cdir = rt.state_dir / "containers" / name
    assert rt.state(name).status == "stopped"
    assert mountinfo.mounts_under(str(cdir)) == []
    assert _cgroup_dirs(name) == []
    rt.start(name)
    rt.wait_ready(name)
    assert sh(rt, name, "cat /root/file").strip() == "persisted"


# A child that starts the container and is killed -9 between `runc create` and `runc start`.
CUT_SHORT = """
import os, signal, sys
from pathlib import Path
from runtime.containers import Runtime
from runtime.runc import Runc
from runtime.settings import Settings
Runc.start = lambda self, name: os.kill(os.getpid(), signal.SIGKILL)
Runtime(Settings(Path(sys.argv[1]), cgroup_parent=sys.argv[2])).start(sys.argv[3])
"""


def test_a_start_cut_short_by_kill_9_is_started_afresh(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    name = make_container("cut", start=False)
    child = subprocess.run(
        [sys.executable, "-c", CUT_SHORT, str(rt.state_dir), CGROUP_PARENT, name], check=False
    )
    assert child.returncode == -signal.SIGKILL
    assert rt.state(name).status == "created"  # init waits on runc's exec fifo, for ever
    rt.start(name)
    rt.wait_ready(name)
    assert rt.state(name).status == "running"
    rt.stop(name)
    assert mountinfo.mounts_under(str(rt.state_dir / "containers" / name)) == []
    assert _cgroup_dirs(name) == []


def test_delete_leaves_nothing(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("gone")
    cdir = rt.state_dir / "containers" / name
    assert mountinfo.mounts_under(str(cdir)) and _cgroup_dirs(name)
    rt.delete(name, force=True)
    assert not cdir.exists()
    assert mountinfo.mounts_under(str(cdir)) == []
    assert _cgroup_dirs(name) == []
    assert rt.runc.state(name) is None
    assert not (rt.state_dir / "runc" / name).exists()
    assert name not in [c.name for c in rt.containers()]


def test_remains_of_an_interrupted_create_are_listed_and_deleted(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    name = make_container("half", start=False)
    cdir = rt.state_dir / "containers" / name
    (cdir / "meta.json").unlink()  # as if the creating process died before its last step
    assert name in rt.incomplete() and name not in [c.name for c in rt.containers()]
    assert mountinfo.mounts_under(str(cdir))  # the rootfs was already mounted
    rt.delete(name)
    assert not cdir.exists() and mountinfo.mounts_under(str(cdir)) == []
