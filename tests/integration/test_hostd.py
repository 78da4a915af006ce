"""hostd end to end: a real daemon, hostctl, Unix users, crashes and concurrency."""

from __future__ import annotations

import functools
import json
import os
import pwd
import signal
import socket
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hostd.api import Channel
from hostd.client import request
from hostd.config import ID_OWNER
from hostd.state import State, Tenant, utc_now
from hostd.subids import parse
from runtime import mountinfo
from runtime.containers import Runtime
from runtime.errors import NotFound, RuntimeFailure
from runtime.limits import Limits
from tests.conftest import CGROUP_PARENT, TEST_GATEWAY
from tests.hostd_harness import Hostd, UnixUsers, connect_as, login_as, wait_for


def _tenant_rows(h: Hostd) -> dict[str, tuple[int, str]]:
    with sqlite3.connect(h.state_dir / "hostd.db") as db:
        return {u: (s, p) for u, s, p in db.execute("SELECT user, range_start, phase FROM tenants")}


def _subuid_owners(h: Hostd) -> dict[str, int]:
    """The range each user may use (active or kept): in the subuid/subgid files under hostd's
    own owner, and the state's record of whose it is. Quarantined ranges count for nobody."""
    text = h.subuid.read_text() if h.subuid.exists() else ""
    assert text == (h.subgid.read_text() if h.subgid.exists() else "")
    entries = parse(text)
    assert {e.owner for e in entries} <= {ID_OWNER}
    with sqlite3.connect(h.state_dir / "hostd.db") as db:
        rows = db.execute("SELECT user, start FROM ranges WHERE status != 'quarantined'")
        return {u: s for u, s in rows if s in {e.start for e in entries}}


def _assert_gone(h: Hostd, user: str) -> None:
    cdir = h.state_dir / "containers" / user
    assert not cdir.exists()
    assert mountinfo.mounts_under(str(cdir)) == []
    assert list(Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}/{user}")) == []
    assert user not in _tenant_rows(h)
    assert user not in _subuid_owners(h)


def test_add_start_docker_restart_hostd_remove(
    hostd: Hostd, rt: Runtime, unix_users: UnixUsers, busybox_tar: Path
) -> None:
    user = unix_users.make()
    out = hostd.hostctl("user", "add", user, "--memory", "2G", "--pids", "3000").stdout
    start = _subuid_owners(hostd)[user]
    assert f"IDs {start}-{start + 65535}" in out
    hostd.hostctl("start", user)
    hostd.hostctl(
        "exec", user, "--", "docker", "import", "-", "busybox:local", input=busybox_tar.read_bytes()
    )
    res = hostd.hostctl("exec", user, "--", "docker", "run", "--rm", "busybox:local", "echo", "hi")
    assert res.stdout.strip() == "hi"
    # the account inside: same name, host home with host ownership, sudo and docker
    home = pwd.getpwnam(user).pw_dir
    script = "id -nG; touch ~/from-inside; sudo -n true && docker ps -q | wc -l"
    res = hostd.hostctl("exec", user, "--user", user, "--", "sh", "-c", script)
    assert {"sudo", "docker"} <= set(res.stdout.split()[:-1])
    st = os.stat(f"{home}/from-inside")
    assert (st.st_uid, st.st_gid) == (pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    assert hostd.hostctl("exec", user, "--", "sh", "-c", "exit 9", check=False).returncode == 9

    init = rt.state(user).pid
    hostd.stop()
    assert rt.state(user).status == "running"  # containers outlive hostd
    hostd.start()
    assert rt.state(user).pid == init
    assert '"state": "running"' in hostd.hostctl("--json", "status", user).stdout
    res = hostd.hostctl("exec", user, "--", "docker", "images", "-q", "busybox:local")
    assert res.stdout.strip()
    hostd.hostctl("user", "remove", user)
    _assert_gone(hostd, user)
    assert Path(home, "from-inside").exists()  # the host home is the user's, not the tenant's


def test_a_host_shutdown_halts_tenants_cleanly_and_the_next_hostd_brings_them_back(
    hostd: Hostd, rt: Runtime, unix_users: UnixUsers
) -> None:
    """`hostd --halt-tenants` (hostd-tenants.service's ExecStop, after hostd.service stopped)
    lets each tenant's systemd stop Docker and halt; their desired state stays running."""
    user = unix_users.make()
    hostd.hostctl("user", "add", user)
    hostd.hostctl("start", user)
    hostd.hostctl("exec", user, "--", "docker", "info", "--format", "{{.ID}}")  # dockerd up
    hostd.stop()
    halt = [sys.executable, "-m", "hostd.daemon", "--config", str(hostd.config), "--halt-tenants"]
    res = subprocess.run(halt, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{user}: halted" in res.stderr
    assert rt.state(user).status == "stopped"
    assert mountinfo.mounts_under(str(hostd.state_dir / "containers" / user)) == []
    hostd.start()  # its reconcile starts it again
    assert rt.state(user).status == "running"
    journal = ["journalctl", "--no-pager", "-o", "cat", "-u", "docker.service"]
    log = hostd.hostctl("exec", user, "--", *journal).stdout
    assert "Stopped docker.service" in log, log  # a clean stop, not a kill
    hostd.hostctl("user", "remove", user)


def _half_done_or_over(hostd: Hostd, add: subprocess.Popen[bytes], user: str) -> str | None:
    if add.poll() is not None:
        return "over"
    return "adding" if _tenant_rows(hostd).get(user, (0, ""))[1] == "adding" else None


def test_kill_9_mid_add_is_repaired_on_restart(hostd: Hostd, unix_users: UnixUsers) -> None:
    """Kill hostd while an add is half done (its state row says `adding`), restart it."""
    caught = 0
    for _ in range(10):
        user = unix_users.make()
        add = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hostd.hostctl",
                "--config",
                str(hostd.config),
                "user",
                "add",
                user,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seen = functools.partial(_half_done_or_over, hostd, add, user)
        if wait_for(seen, 90, f"{user}'s add half done or over", interval=0) == "adding":
            hostd.stop(signal.SIGKILL)
            caught += 1
        add.wait(timeout=60)
        if hostd.proc is not None:  # the add finished before we saw it half done
            hostd.hostctl("user", "remove", user)
            continue
        hostd.start()  # reconcile rolls the interrupted add back
        _assert_gone(hostd, user)
        hostd.hostctl("user", "add", user)  # and the user can be added again
        assert _tenant_rows(hostd)[user][1] == "ready"
        hostd.hostctl("user", "remove", user)
        if caught >= 3:
            break
    assert caught >= 1, "never caught an add half-way"


def test_bad_input_leaves_state_unchanged(hostd: Hostd, unix_users: UnixUsers) -> None:
    user = unix_users.make()
    hostd.hostctl("user", "add", user)
    before = (_tenant_rows(hostd), _subuid_owners(hostd))
    cases = {
        ("user", "add", "nosuchuser"): "no Unix account named 'nosuchuser'",
        ("user", "add", "root"): "root is a system account",
        ("user", "add", "daemon"): "daemon is a system account",
        ("user", "add", "../etc"): "invalid user name",
        ("user", "add", "a/b"): "invalid user name",
        ("user", "add", user): "already a tenant",
        ("quota", "set", user, "--memory", "10XB"): "invalid memory size '10XB'",
        ("quota", "set", user, "--memory", "-1"): "memory",
        ("quota", "set", user, "--pids", "0"): "pids",
        ("quota", "set", user, "--cpus", "9999"): "cpus",
        ("quota", "set", "nosuchuser", "--pids", "10"): "nosuchuser is not a tenant",
        ("start", "nosuchuser"): "nosuchuser is not a tenant",
        ("user", "add", unix_users.make(), "--image", "nope"): "image 'nope' not found",
    }
    for args, message in cases.items():
        res = hostd.hostctl(*args, check=False)
        assert res.returncode == 1, args
        assert message in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr
    assert (_tenant_rows(hostd), _subuid_owners(hostd)) == before
    hostd.hostctl("user", "remove", user)


def test_twenty_parallel_adds_get_disjoint_ranges(hostd: Hostd, unix_users: UnixUsers) -> None:
    users = [unix_users.make() for _ in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda u: hostd.hostctl("user", "add", u, check=False), users))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results]
    owners = _subuid_owners(hostd)
    starts = sorted(owners[u] for u in users)
    assert all(b - a >= 65536 for a, b in zip(starts, starts[1:], strict=False))
    assert {u: s for u, (s, _) in _tenant_rows(hostd).items() if u in users} == {
        u: owners[u] for u in users
    }
    with ThreadPoolExecutor(20) as pool:
        removed = list(pool.map(lambda u: hostd.hostctl("user", "remove", u, check=False), users))
    assert [r.returncode for r in removed] == [0] * 20
    for u in users:
        _assert_gone(hostd, u)


def test_quota_status_logs_and_keep_data(hostd: Hostd, unix_users: UnixUsers) -> None:
    user = unix_users.make()
    hostd.hostctl("user", "add", user, "--memory", "1G")
    res = hostd.hostctl("quota", "set", user, "--memory", "2G", "--pids", "1500")
    assert "applied: memory at next start, pids at next start" in res.stdout
    hostd.hostctl("start", user)
    res = hostd.hostctl("quota", "set", user, "--memory", "3G")
    assert "applied: memory now" in res.stdout
    limit = hostd.hostctl("exec", user, "--", "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    assert int(limit.stdout) == 3 * 2**30
    table = hostd.hostctl("status", user).stdout
    assert table.splitlines()[0].split() == [
        "USER",
        "STATE",
        "UPTIME",
        "MEMORY",
        "CPU",
        "PIDS",
        "DISK",
    ]
    row = table.splitlines()[1].split()
    # the CPU column has a space ("1.2s/2 cpus"): PIDS is second from the end
    assert row[:2] == [user, "running"] and row[3].endswith("/3G") and row[-2].endswith("/1500")
    assert "Startup finished" in hostd.hostctl("logs", user, "-n", "200").stdout
    show = hostd.hostctl("user", "show", user).stdout
    assert "quota:" in show and "memory=3G" in show
    # --keep-data: the container and its IDs stay reserved, a later add adopts them
    start = _subuid_owners(hostd)[user]
    hostd.hostctl("exec", user, "--", "sh", "-c", "echo kept > /root/marker")
    hostd.hostctl("user", "remove", user, "--keep-data")
    assert user not in _tenant_rows(hostd) and _subuid_owners(hostd)[user] == start
    # a re-add interrupted by a crash (its state row says `adding`) is rolled back on restart
    # without touching the kept container or its IDs
    hostd.stop()
    pw = pwd.getpwnam(user)
    with State(hostd.state_dir / "hostd.db") as db:
        db.begin_add(
            Tenant(
                user,
                pw.pw_uid,
                pw.pw_gid,
                pw.pw_dir,
                start,
                "default",
                "adding",
                "stopped",
                utc_now(),
            ),
            Limits(),
        )
    hostd.start()
    assert user not in _tenant_rows(hostd) and _subuid_owners(hostd)[user] == start
    assert (hostd.state_dir / "containers" / user / "meta.json").exists()
    hostd.hostctl("user", "add", user)
    hostd.hostctl("start", user)
    assert hostd.hostctl("exec", user, "--", "cat", "/root/marker").stdout.strip() == "kept"
    hostd.hostctl("user", "remove", user)
    _assert_gone(hostd, user)


def _request_as(user: str, path: Path, op: str, args: dict[str, object]) -> object:
    with connect_as(user, path)[0] as conn:
        return request(Channel(conn), op, args, [0, 1, 2] if op == "exec" else [])


def test_user_socket_is_limited_to_the_callers_container(
    hostd: Hostd, unix_users: UnixUsers, capfd: pytest.CaptureFixture[str]
) -> None:
    tenant, other = unix_users.make(), unix_users.make()
    hostd.hostctl("user", "add", tenant)
    exec_args: dict[str, object] = {"argv": ["id", "-un"], "user": "root", "as_user": "root"}
    capfd.readouterr()
    assert _request_as(tenant, hostd.user_socket, "exec", exec_args) == {"exit": 0}
    assert capfd.readouterr().out.strip() == tenant  # as themselves, never as root
    status = _request_as(tenant, hostd.user_socket, "status", {"user": other})
    assert [s["user"] for s in status] == [tenant]  # type: ignore[attr-defined]
    with pytest.raises(RuntimeFailure, match="user.add is for admins"):
        _request_as(tenant, hostd.user_socket, "user.add", {"user": other})
    with pytest.raises(NotFound, match=f"uid {pwd.getpwnam(other).pw_uid} is not a tenant"):
        _request_as(other, hostd.user_socket, "exec", exec_args)
    with pytest.raises(PermissionError):
        connect_as(tenant, hostd.admin_socket)
    hostd.hostctl("user", "remove", tenant)


def test_hostctl_says_when_hostd_is_not_running(tmp_path: Path) -> None:
    cfg = tmp_path / "hostd.toml"
    cfg.write_text(f'[paths]\nadmin_socket = "{tmp_path}/none.sock"\n')
    res = subprocess.run(
        [sys.executable, "-m", "hostd.hostctl", "--config", str(cfg), "status"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"hostctl: hostd is not running (no socket at {tmp_path}/none.sock): "
        "start it: `systemctl start hostd`"
    )


def test_hostd_refuses_a_state_dir_the_containers_cannot_reach(tmp_path: Path) -> None:
    """Under a 0700 directory (as /root is) the containers' root users could not reach their
    root filesystems: hostd says so at start, not runc at a user's first login."""
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    cfg = tmp_path / "hostd.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{closed}/state"\nrun_dir = "{tmp_path}/run"\n')
    res = subprocess.run(
        [sys.executable, "-m", "hostd.daemon", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"ERROR hostd: {closed} (mode 0700) is closed to the containers' root users: "
        f"chmod o+x {closed}, or choose a state_dir under directories others may pass"
    )
    assert not (closed / "state").exists()


def test_image_import_passes_the_file_not_the_path(hostd: Hostd, busybox_tar: Path) -> None:
    out = hostd.hostctl("image", "import", "bbimp", str(busybox_tar)).stdout
    assert out.startswith("imported bbimp@")
    assert "bbimp" in hostd.hostctl("image", "list").stdout
    hostd.hostctl("image", "remove", "bbimp")
    assert "bbimp" not in hostd.hostctl("image", "list").stdout


def test_doctor(hostd: Hostd) -> None:
    res = hostd.hostctl("doctor", check=False)
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    names = [line.split("  ")[0] for line in lines[1:]]
    assert names == [
        "kernel",
        "user namespaces",
        "state dir",
        "ID-mapped mounts",
        "overlay",
        "cgroups",
        "tenant cgroups",
        "runc",
        "subuid files",
        "ID range owner",
        "ID ranges",
        "nftables",
        "tenant DNS",
        "disk quota",
        "lxcfs",
        "seccomp",
        "apparmor",
        "inotify",
        "home quotas",
        "memory headroom",
        "disk headroom",
        "task headroom",
        "kernel keys",
        "subuid space",
    ]
    assert f"tenants use {TEST_GATEWAY} (configured)" in res.stdout
    (where,) = [line for line in lines if line.startswith("tenant cgroups")]
    assert where.split()[-1] == CGROUP_PARENT  # the harness's, set in its hostd.toml
    assert "syscalls denied)" in res.stdout
    assert res.returncode == 0, res.stdout


def test_ready_notification_and_unit_file(hostd: Hostd, tmp_path: Path) -> None:
    """Type=notify: READY=1 reaches NOTIFY_SOCKET; the unit file passes systemd's checks."""
    hostd.stop()
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(sock_path))
        listener.settimeout(60)
        os.environ["NOTIFY_SOCKET"] = str(sock_path)
        try:
            hostd.start()
        finally:
            del os.environ["NOTIFY_SOCKET"]
        messages = []
        while "READY=1" not in messages:
            messages.append(listener.recv(4096).decode())
    assert messages[0].startswith("STATUS=")
    # systemd's socket is gone now (as when systemd re-executes): hostd still stops cleanly
    hostd.stop()
    assert "hostd stopping" in hostd.log.read_text().splitlines()[-1]
    hostd.start()
    exe = Path(sys.executable).with_name("hostd")  # installed with this environment's hostd
    if not exe.exists():
        pytest.skip(f"no hostd entry point next to {sys.executable}: pip install -e .")
    units = []  # every unit, with the ones it names (hostd.service needs hostd-tenants.service)
    for unit in sorted((Path(__file__).parents[2] / "packaging/systemd").iterdir()):
        units.append(tmp_path / unit.name)
        text = unit.read_text().replace("/usr/sbin/hostd", str(exe))
        units[-1].write_text(text.replace("/usr/bin/hostctl", str(exe.with_name("hostctl"))))
    assert {u.name for u in units} >= {
        "hostd.service",
        "hostd-tenants.service",
        "hostd-backup.timer",
    }
    # --man=no: its man pages come with the package (tests/integration/test_deb.py checks them)
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


FAILING_UNIT = """[Unit]
Description=a unit that fails at boot
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo hostd-test: cannot go on; exit 3'
[Install]
WantedBy=multi-user.target
"""


def test_a_failed_start_says_why_in_status_and_show(
    hostd: Hostd, unix_users: UnixUsers, tmp_path: Path
) -> None:
    user = unix_users.make()
    login = login_as(user, hostd.ssh_port, tmp_path)
    hostd.hostctl("user", "add", user)
    hostd.hostctl("start", user)
    unit = "/etc/systemd/system/hostd-test-fail.service"
    script = f"cat > {unit} && systemctl enable hostd-test-fail.service"
    hostd.hostctl("exec", user, "--", "sh", "-c", script, input=FAILING_UNIT.encode())
    res = hostd.hostctl("restart", user, check=False)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()[-1:]) == 1
    error = res.stderr.strip().splitlines()[-1]
    assert "booted degraded (failed units: hostd-test-fail.service)" in error, error
    said = error.split("; it said: ", 1)[1]  # from its journal: the unit's failure
    assert "hostd-test-fail.service" in said, error
    status = json.loads(hostd.hostctl("status", user, "--json").stdout)[0]
    assert status["state"] == "failed" and "hostd-test-fail.service" in status["reason"]
    show = hostd.hostctl("user", "show", user).stdout
    assert "reason:" in show and "hostd-test-fail.service" in show
    assert f"{user}: start failed: " in hostd.log.read_text()
    hostd.hostctl("stop", user)
    res = login.ssh("true")  # the login starts it, and the user hears why it failed
    err = res.stderr.decode(errors="replace")
    assert res.returncode != 0 and "it said: " in err, err
    assert "hostd-test-fail.service" in err.split("it said: ", 1)[1], err
    hostd.hostctl(
        "exec",
        user,
        "--",
        "rm",
        "-f",
        unit,
        unit.replace("system/", "system/multi-user.target.wants/"),
    )
    hostd.hostctl("restart", user)
    status = json.loads(hostd.hostctl("status", user, "--json").stdout)[0]
    assert status["state"] == "running" and status["reason"] is None
    hostd.hostctl("user", "remove", user)


def test_signals_its_launcher_ignored_reach_no_tenant(hostd: Hostd, unix_users: UnixUsers) -> None:
    """The harness starts hostd as the quickstart does (`nohup hostd &`: SIGHUP and SIGQUIT
    ignored); a program in a tenant must still hang up when its client goes."""
    user = unix_users.make()
    hostd.hostctl("user", "add", user)
    try:
        assert hostd.proc is not None
        inside = hostd.hostctl("exec", user, "--", "cat", "/proc/self/status").stdout
        for who, status in (
            ("hostd", Path(f"/proc/{hostd.proc.pid}/status").read_text()),
            ("a program in the tenant", inside),
        ):
            line = next(ln for ln in status.splitlines() if ln.startswith("SigIgn:"))
            ignored = int(line.split()[1], 16)
            for sig in (signal.SIGHUP, signal.SIGQUIT):
                assert not ignored & (1 << (sig - 1)), f"{sig.name} is ignored in {who}"
    finally:
        hostd.hostctl("user", "remove", user)
