"""hostd answers ahead of the tenants' programs (its event loop and status workers run at nice
hostd.priority.NICE, and so does its session's autogroup), and no program of a tenant inherits
that: whatever hostd starts runs at nice 0 outside hostd's session, over SSH, `hostctl exec`
and the container's own init alike."""

from __future__ import annotations

import subprocess
import sys
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
        ours = Path(f"/proc/{hostd.proc.pid}/autogroup").read_text().split()
        assert ours[-1] == str(NICE), ours
        show = "cat /proc/self/stat /proc/1/stat /proc/self/autogroup /proc/1/autogroup"
        over_ssh = subprocess.run(
            [*ssh_argv(hostd.ssh_port, key, user), show],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        by_exec = hostd.hostctl("exec", user, "--", "sh", "-c", show)
        lines = [*over_ssh.splitlines(), *by_exec.stdout.splitlines()]
        assert sum(line.startswith("/autogroup-") for line in lines) == 4, lines
        for line in lines:
            if line.startswith("/autogroup-"):  # "/autogroup-ID nice N"
                group = line.split()
                assert group[0] != ours[0], f"a tenant's program is in hostd's session: {line}"
                assert group[-1] == "0", f"a tenant's program is favoured: {line}"
            else:
                assert _nice(line) == 0, f"a tenant's program runs at another nice: {line}"
    finally:
        hostd.hostctl("user", "remove", user)


def test_only_a_session_of_hostds_own_is_favoured() -> None:
    """`hostd &` from an admin's shell must not favour that shell's whole session."""
    favour = (  # its log at debug on stderr: why a write was refused, if it was
        "import logging, os\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "from hostd.priority import favour_this_session\n"
        "favour_this_session()\n"
        "print(os.getpid(), os.getsid(0), open('/proc/self/autogroup').read().strip())\n"
    )
    # Empty where no process above us called setsid since boot (the kernel's root autogroup,
    # as under a CI runner started by PID 1): a child in our session has the same line.
    callers = Path("/proc/self/autogroup").read_text().strip()
    for own_session in (False, True):
        res = subprocess.run(
            [sys.executable, "-c", favour],
            capture_output=True,
            text=True,
            check=True,
            start_new_session=own_session,
        )
        said = f"own session {own_session}, ours {callers!r}: {res.stdout.strip()} {res.stderr}"
        _pid, _sid, *group = res.stdout.strip().split(maxsplit=2)
        if own_session:
            assert group and group[0].endswith(f" nice {NICE}"), said
        else:
            assert (group[0] if group else "") == callers, said
