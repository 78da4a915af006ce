"""hostd end to end: a real daemon, hostctl, Unix users, crashes and concurrency."""

from __future__ import annotations

import os
import pwd
import sqlite3
from pathlib import Path

from hostd.subids import parse
from runtime import mountinfo
from runtime.containers import Runtime
from tests.integration.conftest import CGROUP_PARENT
from tests.integration.hostd_harness import Hostd, UnixUsers


def _tenant_rows(h: Hostd) -> dict[str, tuple[int, str]]:
    with sqlite3.connect(h.state_dir / "hostd.db") as db:
        return {u: (s, p) for u, s, p in db.execute("SELECT user, range_start, phase FROM tenants")}


def _subuid_owners(h: Hostd) -> dict[str, int]:
    text = h.subuid.read_text() if h.subuid.exists() else ""
    assert text == (h.subgid.read_text() if h.subgid.exists() else "")
    return {e.owner: e.start for e in parse(text)}


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
    hostd.hostctl("exec", user, "--", "docker", "import", "-", "busybox:local",
                  input=busybox_tar.read_bytes())  # fmt: skip
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
