"""Attacks on the host paths of a tenant: the shared image template, setuid files and device
nodes in its directories, symlinks it plants for hostd to follow, files it makes huge.
Each attack is performed for real and must fail; a control shows what it would have reached."""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import inside, mountinfo, shares
from runtime.containers import Runtime
from runtime.errors import RuntimeFailure
from runtime.execs import ExecSpec
from runtime.ids import IdRange
from runtime.shares import Share
from tests.conftest import ContainerFactory, sh
from tests.hostd_harness import Hostd, UnixUsers, probe_as


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def tenant(hostd: Hostd, unix_users: UnixUsers) -> Iterator[str]:
    """A tenant made as an admin makes one, with setuid files planted by root inside."""
    user = unix_users.make()
    hostd.hostctl("user", "add", user, "--memory", "2G", "--pids", "2000", "--disk", "4G")
    hostd.hostctl("start", user)
    hostd.hostctl(
        "exec", user, "--", "sh", "-c", "cp /usr/bin/id /opt/suid && chmod 6755 /opt/suid"
    )
    yield user
    hostd.hostctl("user", "remove", user, check=False)


def test_template_is_mounted_read_only_nosuid_nodev(hostd: Hostd, tenant: str) -> None:
    lower = str(hostd.state_dir / "containers" / tenant / "lower")
    lines = [ln.split() for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
    options = [set(fields[5].split(",")) for fields in lines if fields[4] == lower]
    assert options, f"{lower} is not mounted"
    assert {"ro", "nosuid", "nodev"} <= options[0]


def test_device_nodes_on_the_volume_cannot_be_opened_inside(
    hostd: Hostd, rt: Runtime, tenant: str
) -> None:
    """The volume is mounted without nodev (BuildKit must remount it freely): a device node
    on it (root inside cannot make one; a restored archive could hold one) is still refused
    by the container's device cgroup."""
    root = rt.get(tenant).ids.root
    root_dev = os.stat("/").st_dev
    node = hostd.state_dir / "containers" / tenant / "data/docker/disk"
    os.mknod(node, stat.S_IFBLK | 0o666, os.makedev(os.major(root_dev), os.minor(root_dev)))
    try:
        os.chown(node, root, root)
        res = hostd.hostctl(
            "exec", tenant, "--", "sudo", "head", "-c", "512", "/var/lib/docker/disk", check=False
        )
        assert res.returncode != 0
        assert "Operation not permitted" in res.stderr, res.stderr
    finally:
        node.unlink()


def test_the_ranges_root_cannot_write_the_shared_template(
    hostd: Hostd, rt: Runtime, tenant: str
) -> None:
    """Acting as the container's root on the host (what newuidmap on the tenant's own range
    gave before): the template stays unchanged and no setuid-root file appears in it."""
    ids = rt.get(tenant).ids
    cdir = hostd.state_dir / "containers" / tenant
    template = Path(rt.get(tenant).image_dir) / "rootfs"
    planted = [
        ("write", str(cdir / "lower/opt/planted")),
        ("write", str(cdir / "lower/etc/sudoers.d/x")),
    ]
    result = probe_as(ids.root, ids.root, [("stat", str(cdir / "lower/etc")), *planted])
    assert result[f"stat {cdir / 'lower/etc'}"] == "ok"  # it reaches the mount: only ro stops it
    assert {result[f"{op} {p}"] for op, p in planted} == {"EROFS"}
    assert not (template / "opt/planted").exists()
    assert not (template / "etc/sudoers.d/x").exists()


def test_host_users_reach_nothing_of_a_tenant(
    hostd: Hostd, rt: Runtime, tenant: str, unix_users: UnixUsers
) -> None:
    cdir = hostd.state_dir / "containers" / tenant
    suid = cdir / "rootfs/opt/suid"
    st = os.stat(suid)  # the control: root inside did plant a setuid+setgid file
    assert st.st_mode & 0o6000 == 0o6000 and st.st_uid == rt.get(tenant).ids.root
    other = pwd.getpwnam(unix_users.make())
    paths = [
        cdir / p
        for p in (
            "rootfs/opt/suid",
            "rootfs",
            "lower",
            "data",
            "dev/fuse",
            "dev/net-tun",
            "meta.json",
            "config.json",
            "data/console.log",
        )
    ]
    paths.append(hostd.state_dir / "images" / "default")
    ops = [("stat", str(p)) for p in paths] + [
        ("exec", str(suid)),
        ("open", str(cdir / "dev/fuse")),
    ]
    result = probe_as(other.pw_uid, other.pw_gid, ops)
    assert set(result.values()) == {"EACCES"}, result
    # ... and the tenant's own host account neither: its container's IDs are not its own
    own = pwd.getpwnam(tenant)
    result = probe_as(own.pw_uid, own.pw_gid, ops)
    assert set(result.values()) == {"EACCES"}, result


def test_the_console_log_lies_on_the_tenants_own_volume(hostd: Hostd, tenant: str) -> None:
    """Root inside can write to init's output without end: it must fill the tenant's capped
    volume, never the host's state dir."""
    cdir = hostd.state_dir / "containers" / tenant
    log = cdir / "data/console.log"
    assert os.stat(log).st_dev == os.stat(cdir / "data").st_dev != os.stat(cdir).st_dev
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    assert not (cdir / "console.log").exists()


def test_device_nodes_still_work_inside(hostd: Hostd, tenant: str) -> None:
    script = "exec 3<>/dev/fuse && exec 4<>/dev/net/tun && echo opened"
    assert hostd.hostctl("exec", tenant, "--", "sh", "-c", script).stdout.strip() == "opened"


def test_a_huge_passwd_inside_costs_hostd_nothing(hostd: Hostd, tenant: str) -> None:
    """hostd reads the tenant's /etc/passwd for each login: a 2 GiB one is refused in one
    line, without hostd reading it whole."""
    assert hostd.proc is not None
    before = _rss_kib(hostd.proc.pid)
    hostd.hostctl(
        "exec",
        tenant,
        "--",
        "sh",
        "-c",
        "cp /etc/passwd /etc/passwd.orig && truncate -s 2G /etc/passwd",
    )
    try:
        res = hostd.hostctl("exec", tenant, "--user", tenant, "--", "true", check=False)
        assert res.returncode != 0
        assert "/etc/passwd in the container is larger than" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert _rss_kib(hostd.proc.pid) - before < 64 * 1024
    finally:  # from the host: runc itself cannot exec in a container with such a passwd
        etc = hostd.state_dir / "containers" / tenant / "rootfs/etc"
        os.replace(etc / "passwd.orig", etc / "passwd")
    assert (
        hostd.hostctl("exec", tenant, "--user", tenant, "--", "id", "-un").stdout.strip() == tenant
    )


def test_output_of_commands_inside_is_bounded(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    name = make_container("flood")
    with pytest.raises(RuntimeFailure, match="printed more than"):
        rt.exec(name, ExecSpec(["sh", "-c", "yes"]), timeout=60)
    with pytest.raises(RuntimeFailure, match="took longer than"):
        rt.exec(name, ExecSpec(["sleep", "60"]), timeout=1)


def test_symlinks_inside_do_not_lead_hostd_to_host_files(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    """The tenant points /run/docker.sock and /etc/passwd at host paths: hostd, as root,
    must resolve them inside the container, never on the host."""
    name = make_container("links")
    pid = rt.state(name).pid
    host_sock = Path(f"/run/hostd-sec-{os.getpid()}.sock")
    host_file = Path(f"/run/hostd-sec-{os.getpid()}.secret")
    host_file.write_text("root:x:0:0:host secret:/:/bin/sh\n")
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(host_sock))
        listener.listen(8)
        listener.settimeout(0)
        sh(rt, name, f"ln -sf {host_sock} /run/docker.sock && ln -sf {host_file} /etc/passwd")
        # the control: the old way, through /proc/<pid>/root, reaches the host's objects
        assert "host secret" in Path(f"/proc/{pid}/root/etc/passwd").read_text()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(f"/proc/{pid}/root/run/docker.sock")
        listener.accept()[0].close()
        # hostd's way stays inside
        with pytest.raises(RuntimeFailure) as info:
            inside.read_file(pid, "/etc/passwd", 1 << 20)
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno in (errno.ENOENT, errno.EXDEV)  # not the host file
        rt.wait_ready(name, timeout=30)  # readiness never connects to the planted socket
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
        host_sock.unlink(missing_ok=True)
        host_file.unlink(missing_ok=True)


def test_the_home_share_follows_no_symlink_and_must_be_the_users(
    rt: Runtime, tmp_path: Path, unix_users: UnixUsers
) -> None:
    user = pwd.getpwnam(unix_users.make())
    ids = IdRange(3_000_000)
    link = tmp_path / "home-link"
    link.symlink_to("/etc")
    target = tmp_path / "target"
    for source, message in (
        (link, "not a directory"),
        (tmp_path, f"owned by uid 0, not {user.pw_uid}"),
    ):
        share = Share(str(source), "/home/x", user.pw_uid, user.pw_gid, 1000, 1000)
        with pytest.raises(RuntimeFailure, match=message):
            shares.mount(share, ids, target)
        assert not mountinfo.is_mounted(str(target))
