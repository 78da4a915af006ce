"""What a developer does with images and containers after the first build, over SSH on a tenant
with its capped volume: save and load, copy files in and out, an interactive `docker exec -it`,
a published port, and a prune that gives the space back."""

from __future__ import annotations

import json
import os
import pty
import pwd
import re
import signal
from pathlib import Path

from tests.e2e.conftest import context, wait_inside
from tests.hostd_harness import Hostd, Login, read_until, set_winsize, wait_for


def test_save_load_round_trip(dev: Login) -> None:
    ctx = context(dev, "ctx-save", "FROM busybox:local\nRUN echo saved > /saved\n")
    dev.sh(f"docker build -q -t saved:1 {ctx}")
    dev.sh("docker save saved:1 | gzip > saved.tar.gz && docker rmi saved:1")
    gone = dev.ssh("docker image inspect saved:1")
    assert gone.returncode != 0, "docker rmi left the image behind"
    loaded = dev.sh("gunzip -c saved.tar.gz | docker load")
    assert "saved:1" in loaded, loaded
    assert dev.sh("docker run --rm saved:1 cat /saved") == "saved\n"


def test_cp_both_ways(dev: Login) -> None:
    """`docker cp` into a running inner container and back out into the home, which is the
    user's host home: the copy lands there as theirs."""
    dev.sh("docker run -d --name cpbox busybox:local sleep 600 && docker exec cpbox mkdir /data")
    try:
        dev.sh("mkdir -p cp-in && echo to-container > cp-in/note && docker cp cp-in cpbox:/data/")
        assert dev.sh("docker exec cpbox cat /data/cp-in/note") == "to-container\n"
        dev.sh("docker exec cpbox sh -c 'echo from-container > /data/out'")
        dev.sh("docker cp cpbox:/data/out cp-out")
        pw = pwd.getpwnam(dev.user)
        copied = Path(pw.pw_dir) / "cp-out"
        assert copied.read_text() == "from-container\n"
        assert (copied.stat().st_uid, copied.stat().st_gid) == (pw.pw_uid, pw.pw_gid)
    finally:
        dev.ssh("docker rm -f cpbox")


def resize_follows(ssh: int, fd: int, seen: bytearray) -> None:
    """Resize the client's terminal until the shell in `docker exec -it` on the other side
    reports the new size. The docker CLI drops a SIGWINCH that comes while its first resize
    request is under way (docker/cli tty.go: MonitorTtySize calls signal.Notify only after
    initTtySize, the stream already runs), so one lost early resize is Docker's, not ours;
    the next one must arrive (3 tries of 3 s at most)."""
    sizes: list[str] = []
    for attempt in range(3):
        rows, cols = 50 + attempt, 132
        set_winsize(fd, rows, cols)
        os.kill(ssh, signal.SIGWINCH)
        want = f"{rows} {cols}"
        wait = f'for i in $(seq 30); do [ "$(stty size)" = "{want}" ] && break; sleep 0.1; done'
        os.write(fd, f"{wait}; stty size; echo RESIZED-$(({attempt}+100))\n".encode())
        out = read_until(fd, rb"(\d+ \d+)\s+RESIZED-%d" % (attempt + 100), seen)
        got = re.findall(rb"(\d+ \d+)\s+RESIZED-%d" % (attempt + 100), out)[-1].decode()
        if got == want:
            return
        sizes.append(f"{want} -> {got}")
    raise AssertionError(f"the inner terminal did not follow a resize: {sizes}")


def test_exec_it_on_a_pty(dev: Login) -> None:
    """`ssh -tt ... docker exec -it`: the inner shell has a terminal of the client's size that
    follows a resize, Ctrl-C reaches the inner process, and the exit status comes back."""
    dev.sh("docker run -d --name itbox busybox:local sleep 600")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - becomes ssh
        os.execvp("ssh", [*dev.ssh_args("-tt"), "docker exec -it itbox sh"])
    seen = bytearray()
    try:
        set_winsize(fd, 30, 100)
        os.write(fd, b"tty; stty size; echo MARK-$((6*7))\n")
        read_until(fd, rb"/dev/pts/\d+\s+30 100\s+MARK-42", seen)
        resize_follows(pid, fd, seen)
        # The trap is set before READY is printed, so the ^C sent after READY is the trap's.
        os.write(
            fd,
            b'sh -c \'trap "echo GOT-$((2*3))-INT; exit 0" INT; echo READY-$((1+1));'
            b" while :; do sleep 0.1; done'\n",
        )
        read_until(fd, rb"READY-2", seen)
        os.write(fd, b"\x03")
        read_until(fd, rb"GOT-6-INT", seen)
        os.write(fd, b"exit 5\n")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 5, bytes(seen)[-500:]
    finally:
        os.close(fd)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        dev.ssh("docker rm -f itbox")


def test_run_publish_port(dev: Login) -> None:
    """`docker run -p`: busybox httpd in an inner container answers on the tenant's loopback."""
    serve = "mkdir /www && echo hello-from-web > /www/index.html && exec httpd -f -p 80 -h /www"
    dev.sh(f"docker run -d --name web -p 8080:80 busybox:local sh -c '{serve}'")
    try:
        fetch = "curl -fsS http://127.0.0.1:8080/"
        wait_inside(dev, fetch, "answer on the published port", diagnose="docker logs web")
        assert dev.sh(fetch) == "hello-from-web\n"
    finally:
        dev.ssh("docker rm -f web")


def disk_used(hostd: Hostd, user: str) -> int:
    """Bytes used on the tenant's volume, as the admin sees them."""
    (row,) = json.loads(hostd.hostctl("--json", "status", user).stdout)
    return int(row["disk"])


def test_system_prune_frees_space(dev: Login, hostd: Hostd, busybox_tar: Path) -> None:
    """`docker system prune -af` empties the image store and build cache and the volume gets
    the space back. Runs last here: it takes busybox:local too (restored afterwards)."""
    big = 64_000_000
    ctx = context(dev, "ctx-big", f"FROM busybox:local\nRUN head -c {big} /dev/urandom > /big\n")
    dev.sh(f"docker build -q -t big:1 {ctx} && docker run --name stopped big:1 true")
    before = disk_used(hostd, dev.user)
    try:
        dev.sh("docker system prune -af")
        left = dev.sh("docker system df --format '{{.Type}}={{.TotalCount}}'").splitlines()
        assert {"Images=0", "Containers=0", "Build Cache=0"} <= set(left), left
        wait_for(  # ext4 counts freed blocks at its journal commit
            lambda: disk_used(hostd, dev.user) <= before - big,
            60,
            lambda: f"the volume to shrink from {before} (now {disk_used(hostd, dev.user)})",
            interval=0.5,
        )
    finally:
        dev.sh("docker import - busybox:local >/dev/null", input=busybox_tar.read_bytes())
