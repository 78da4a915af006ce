"""`hostctl user export` / `user import`: a developer's tenant, running, exported (frozen),
then changed and exported again (incremental), removed, and imported from the chain under a
new ID range: their inner image runs, their Docker volume, /etc and installed state came
back with the right owners, the deleted file is gone, their quota and port grant came back,
and nothing on the host is owned by the old range."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.ids import RANGE_SIZE
from tests.e2e.conftest import add_developer
from tests.hostd_harness import Hostd, Login, UnixUsers, free_port


def owned_by_range(root: Path, start: int) -> list[str]:
    """Paths under `root` whose owner or group is in the range at `start` (never followed)."""
    found = []
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            if start <= st.st_uid < start + RANGE_SIZE or start <= st.st_gid < start + RANGE_SIZE:
                found.append(os.path.join(top, name))
    return found


def range_of(hostd: Hostd, user: str) -> int:
    return int(
        json.loads(hostd.hostctl("user", "show", user, "--json").stdout)["tenant"]["range_start"]
    )


@pytest.fixture
def dev(hostd: Hostd, unix_users: UnixUsers, tmp_path: Path, busybox_tar: Path) -> Iterator[Login]:
    login = add_developer(hostd, unix_users, tmp_path, busybox_tar)
    yield login
    hostd.hostctl("user", "remove", login.user, check=False)


def test_export_remove_import_keeps_docker_data_and_files(
    hostd: Hostd, dev: Login, tmp_path: Path
) -> None:
    user = dev.user
    port = free_port()
    hostd.hostctl("ports", "grant", user, str(port))
    dev.sh(
        "docker volume create data >/dev/null && "
        "docker run --rm -v data:/v busybox:local sh -c "
        "'echo kept > /v/f; echo gone > /v/g; "
        "dd if=/dev/urandom of=/v/big bs=1048576 count=64 2>/dev/null' && "
        "echo system | sudo tee /etc/hostd-export-test >/dev/null && "
        "sudo chown 1234:5678 /etc/hostd-export-test"
    )
    full = tmp_path / "full.hostd"
    res = hostd.hostctl("user", "export", user, "-o", str(full))
    assert "frozen for" in res.stdout and full.stat().st_mode & 0o777 == 0o600
    assert "frozen: exporting the volume" in res.stderr

    dev.sh("docker run --rm -v data:/v busybox:local sh -c 'echo changed > /v/f; rm /v/g'")
    inc = tmp_path / "inc.hostd"
    res = hostd.hostctl("user", "export", user, "-o", str(inc), "--since", str(full))
    assert f"exported {user} (incremental" in res.stdout
    assert full.stat().st_size > 64 << 20
    assert inc.stat().st_size < 16 << 20, res.stdout  # the changed chunks, not the big file

    old = range_of(hostd, user)
    hostd.hostctl("user", "remove", user)  # the old range is quarantined
    res = hostd.hostctl("user", "import", str(full), str(inc))
    assert "files shifted from the archive's range" in res.stdout and "started" in res.stdout
    new = range_of(hostd, user)
    assert new != old

    login = dev  # the same user and key: their home was never touched
    assert "busybox:local" in login.sh("docker images --format '{{.Repository}}:{{.Tag}}'")
    assert login.sh("docker run --rm -v data:/v busybox:local sh -c 'cat /v/f; ls /v'") == (
        "changed\nbig\nf\n"
    )
    assert login.sh("stat -c '%u:%g %s' /etc/hostd-export-test").strip() == "1234:5678 7"
    show = json.loads(hostd.hostctl("user", "show", user, "--json").stdout)
    assert show["status"]["quota"]["memory"] == 4 << 30
    assert show["status"]["quota"]["disk"] == 8 << 30
    assert show["ports"] == [{"first": port, "last": port}]
    assert owned_by_range(hostd.state_dir / "containers" / user, old) == []


def test_a_tenant_whose_build_keeps_forking_is_frozen_for_every_export(
    hostd: Hostd, dev: Login, tmp_path: Path
) -> None:
    """A build forks without a pause; each export of the running tenant still freezes it (a
    cgroup v1 freezer asked once could stay FREEZING for good: Busy) and thaws it after."""
    loop = "while :; do /bin/true; done"  # /bin/true is busybox's: a fork and exec each time
    cid = dev.sh(f"docker run -d busybox:local sh -c '{loop}'").strip()
    try:
        for i in range(5):
            archive = tmp_path / f"{i}.hostd"
            res = hostd.hostctl("user", "export", dev.user, "-o", str(archive))
            assert "frozen for" in res.stdout, res
            archive.unlink()
        state = dev.sh(f"docker inspect -f '{{{{.State.Status}}}}' {cid}").strip()
        assert state == "running"  # thawed: the build goes on
    finally:
        dev.sh(f"docker rm -f {cid} >/dev/null")
