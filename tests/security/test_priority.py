"""hostd answers ahead of the tenants' programs (its event loop and status workers run at nice
hostd.priority.NICE), and no program of a tenant inherits that: whatever hostd starts runs at
nice 0, over SSH, `hostctl exec` and the container's own init alike."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hostd.priority import NICE
from tests.hostd_harness import Hostd, UnixUsers, authorize, ssh_argv


def _nice(stat: str) -> int:
    """The nice field of a /proc/PID/stat line (the 19th; the name may hold spaces)."""
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_hostd_is_favoured_and_tenants_programs_are_not(
    hostd: Hostd, unix_users: UnixUsers, tmp_path: Path
) -> None:
    assert hostd.proc is not None
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    user = unix_users.make()
    hostd.hostctl("user", "add", user)
    try:
        authorize(user, key.with_suffix(".pub").read_text())
        hostd.hostctl("start", user)
        hostd.hostctl("status")  # a status worker exists from here on
        tasks = Path(f"/proc/{hostd.proc.pid}/task")
        nices = [_nice((t / "stat").read_text()) for t in tasks.iterdir()]
        assert _nice(Path(f"/proc/{hostd.proc.pid}/stat").read_text()) == NICE
        assert nices.count(NICE) >= 2, f"the event loop and a status worker: {nices}"
        over_ssh = subprocess.run(
            [*ssh_argv(hostd.ssh_port, key, user), "cat /proc/self/stat /proc/1/stat"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        by_exec = hostd.hostctl("exec", user, "--", "cat", "/proc/self/stat").stdout
        for line in [*over_ssh.splitlines(), by_exec]:
            assert _nice(line) == 0, f"a tenant's program runs at another nice: {line}"
    finally:
        hostd.hostctl("user", "remove", user)
