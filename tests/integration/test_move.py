"""`hostctl user move` between two real hostd instances on this machine (two state dirs, two
admin sockets, two gateways and bridges, loopback only), over a real OpenSSH server on
127.0.0.1 that lets root in with a test key: the move itself (the tenant runs there with its
files, owners and quota; it is gone here), a transfer cut mid-way and resumed by the same
command, and a damaged archive refused before the tenant is stopped."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime import fsutil
from runtime.containers import Runtime
from tests.hostd_harness import (
    SSH_OPTIONS,
    SSHD,
    Hostd,
    UnixUsers,
    free_port,
    keypair,
    other_hostd,
    start_sshd,
    stop_sshd,
)

REPO = Path(__file__).resolve().parents[2]

# Stands between ssh and the target's hostctl: while the control file names a fault, each
# `transfer receive` gets its stdin cut half-way through the archive (then ends as a broken
# ssh does, 255) or with the byte there flipped. It logs the bytes it passed on, one line per
# receive.
WRAPPER = """\
import os, subprocess, sys
control, log, args = sys.argv[1], sys.argv[2], sys.argv[3:]
if "receive" not in args:
    os.execvp(args[0], args)
fault = open(control).read() if os.path.exists(control) else "none"
at = int(args[args.index("--size") + 1]) // 2
child = subprocess.Popen(args, stdin=subprocess.PIPE)
done = 0
while data := sys.stdin.buffer.read1(65536):
    if fault == "cut":
        data = data[: at - done]
    elif fault == "flip" and done <= at < done + len(data):
        i = at - done
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
    child.stdin.write(data)
    done += len(data)
    if fault == "cut" and done >= at:
        break
child.stdin.close()
code = child.wait()
with open(log, "a") as f:
    f.write(f"{done}\\n")
sys.exit(255 if fault == "cut" else code)
"""


@dataclass
class Link:
    """The way to the target: an sshd for root, and the options `user move` needs."""

    root: Path
    port: int
    key: Path
    control: Path  # the wrapper's fault, if any
    log: Path  # the wrapper's bytes per receive

    def receives(self) -> list[int]:
        return [int(n) for n in self.log.read_text().split()] if self.log.exists() else []


@pytest.fixture(scope="module")
def target(rt: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostd]:
    """A second hostd: its own state dir (the session's image copied in as hard links: the
    templates are only ever mounted read-only), sockets, subuid files, ID window, bridge,
    nft table, cgroup parent and gateway."""
    tmp = tmp_path_factory.mktemp("target")
    state = Path(tempfile.mkdtemp(prefix="hostd-it-move-", dir="/var/tmp"))
    os.chmod(state, 0o711)
    subprocess.run(["cp", "-al", str(rt.state_dir / "images"), str(state)], check=True)
    sections = {"runtime": "stop_timeout = 10\n", "subids": "min = 400000000\nmax = 500000000\n"}
    try:
        with other_hostd(tmp, state, "mv", sections) as h:
            yield h
    finally:
        fsutil.remove_tree(state)


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    """A real sshd on 127.0.0.1 that lets root in with a test key (its own config, host key
    and authorized keys file; the machine's sshd and root's ~/.ssh are never touched)."""
    if shutil.which(SSHD) is None or shutil.which("ssh") is None:
        pytest.skip("OpenSSH missing: apt-get install openssh-server openssh-client")
    root = Path(tempfile.mkdtemp(prefix=f"hostd-move-ssh-{os.getpid()}-", dir="/run"))
    made_run_sshd = not os.path.isdir("/run/sshd")
    proc = None
    try:
        keypair(root / "host_key")
        key = keypair(root / "admin_key")
        (root / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        (root / "authorized_keys").chmod(0o600)
        (root / "cut.py").write_text(WRAPPER)
        port = free_port()
        config = root / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root}/host_key\n"
            f"PidFile {root}/sshd.pid\nAuthorizedKeysFile {root}/authorized_keys\n"
            "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes yes\n"
        )
        if made_run_sshd:
            os.makedirs("/run/sshd", mode=0o755)
        proc = start_sshd(config, port, root / "sshd.log")
        yield Link(root, port, key, root / "fault", root / "receives.log")
    finally:
        if proc is not None:
            stop_sshd(proc)
        shutil.rmtree(root, ignore_errors=True)
        if made_run_sshd:
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")


def move(
    source: Hostd, target: Hostd, link: Link, user: str, *extra: str, spool: Path
) -> subprocess.CompletedProcess[str]:
    """`hostctl user move` from `source` to `target` through `link` (and its wrapper)."""
    ssh = shlex.join(["ssh", "-F", "/dev/null", "-i", str(link.key), *SSH_OPTIONS])
    hostctl = shlex.join(
        [sys.executable, str(link.root / "cut.py"), str(link.control), str(link.log)]
        + ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "hostd.hostctl"]
        + ["--config", str(target.config)]
    )
    return source.hostctl(
        *("user", "move", user, f"ssh://root@127.0.0.1:{link.port}", "--ssh", ssh),
        *("--remote-hostctl", hostctl, "--spool", str(spool), *extra),
        check=False,
    )


def tenants(h: Hostd) -> list[str]:
    return [t["user"] for t in json.loads(h.hostctl("user", "list", "--json").stdout)]


def inside(h: Hostd, user: str, script: str, input: bytes | None = None) -> str:
    return h.hostctl("exec", user, "--", "sh", "-c", script, input=input).stdout


@pytest.fixture
def tenant(hostd: Hostd, target: Hostd, unix_users: UnixUsers, link: Link) -> Iterator[str]:
    """A running tenant of the source hostd with quotas and files of root and of the user;
    removed from both hosts at the end."""
    user = unix_users.make()
    hostd.hostctl("user", "add", user, "--memory", "1G", "--pids", "700", "--disk", "3G")
    hostd.hostctl("start", user)
    inside(hostd, user, "echo precious > /srv/root-file")
    hostd.hostctl("exec", user, "--user", user, "--", "sh", "-c", "echo mine > /var/tmp/f")
    link.control.unlink(missing_ok=True)
    link.log.unlink(missing_ok=True)
    yield user
    link.control.unlink(missing_ok=True)
    for h in (hostd, target):
        h.hostctl("user", "remove", user, check=False)


def test_move_cut_resumed_and_done(
    hostd: Hostd, target: Hostd, link: Link, tenant: str, tmp_path: Path, busybox_tar: Path
) -> None:
    inside(
        hostd, tenant, "docker import - busybox:moved >/dev/null", input=busybox_tar.read_bytes()
    )
    spool = tmp_path / "spool"
    link.control.write_text("cut")
    res = move(hostd, target, link, tenant, "--retries", "0", spool=spool)
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("hostctl: the transfer to 127.0.0.1 broke: ") and last.endswith(
        "run the same `hostctl user move USER TARGET` again: it resumes from there"
    )
    (full,) = spool.glob(f"{tenant}.*.hostd")
    size = full.stat().st_size
    assert link.receives() == [size // 2]
    assert json.loads(hostd.hostctl("status", tenant, "--json").stdout)[0]["state"] == "running"
    assert tenant not in tenants(target)

    link.control.unlink()
    res = move(hostd, target, link, tenant, spool=spool)
    assert res.returncode == 0, res.stderr
    assert f"reusing {full}" in res.stderr and "resuming at" in res.stderr
    sent = link.receives()[1:]
    assert sent[0] == size - size // 2  # only the rest of the full archive, then the incremental
    assert len(sent) == 2
    assert res.stdout == f"moved {tenant} to 127.0.0.1 as {tenant}; removed here\n"

    # there: running, its files with their owners, its quota, its image; a new ID range
    status = json.loads(target.hostctl("status", tenant, "--json").stdout)[0]
    assert status["state"] == "running"
    quota = status["quota"]
    assert (quota["memory"], quota["pids"], quota["disk"]) == (1 << 30, 700, 3 << 30)
    assert status["range_start"] >= 400000000
    owners = inside(target, tenant, "stat -c '%U %n' /srv/root-file /var/tmp/f; cat /srv/root-file")
    assert owners.split("\n") == ["root /srv/root-file", f"{tenant} /var/tmp/f", "precious", ""]
    assert "busybox:moved" in inside(
        target, tenant, "docker images --format '{{.Repository}}:{{.Tag}}'"
    )
    # here: gone, its range quarantined; nothing left in either spool or staging
    assert tenant not in tenants(hostd)
    ranges = json.loads(hostd.hostctl("ranges", "--json").stdout)
    assert any(r["user"] == tenant and r["status"] == "quarantined" for r in ranges)
    assert list(spool.iterdir()) == []
    assert list((target.state_dir / "incoming").iterdir()) == []


def test_a_damaged_archive_is_refused_before_the_stop(
    hostd: Hostd, target: Hostd, link: Link, tenant: str, tmp_path: Path
) -> None:
    link.control.write_text("flip")
    res = move(hostd, target, link, tenant, spool=tmp_path / "spool")
    assert res.returncode == 1, (res.stderr, link.receives())
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("hostctl: on 127.0.0.1: ") and "damaged" in lines[-1], lines
    assert lines[-1].endswith(
        f"({tenant} is untouched here): run the same `hostctl user move USER TARGET` "
        "again: it exports it anew"
    )
    assert not any("stopping" in line for line in lines)
    assert json.loads(hostd.hostctl("status", tenant, "--json").stdout)[0]["state"] == "running"
    assert inside(hostd, tenant, "cat /srv/root-file") == "precious\n"
    assert tenant not in tenants(target)
    assert list((target.state_dir / "incoming").iterdir()) == []
    assert list((tmp_path / "spool").iterdir()) == []


def test_with_home_the_home_goes_too_read_after_the_stop(
    hostd: Hostd, target: Hostd, link: Link, tenant: str, unix_users: UnixUsers, tmp_path: Path
) -> None:
    """Moved under another name (whose home is empty): the home comes out there as theirs."""
    pw = pwd.getpwnam(tenant)
    notes = Path(pw.pw_dir) / "notes.txt"
    notes.write_text("mine\n")
    os.chown(notes, pw.pw_uid, pw.pw_gid)
    other = unix_users.make()
    try:
        res = move(hostd, target, link, tenant, "--as", other, "--with-home", spool=tmp_path)
        assert res.returncode == 0, res.stderr
        there = pwd.getpwnam(other)
        moved = Path(there.pw_dir) / "notes.txt"
        assert moved.read_text() == "mine\n" and moved.stat().st_uid == there.pw_uid
    finally:
        target.hostctl("user", "remove", other, check=False)
