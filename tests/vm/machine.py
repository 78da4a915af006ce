"""A Debian 12 virtual machine for the tests that need systemd as PID 1 and cgroup v2 (the test
machines have neither): an image built once with debootstrap and cached, booted by qemu in
software emulation on a throwaway copy-on-write overlay, reached by SSH on a loopback port.

The image is cached under /var/cache/hostd/vm/<hash of the recipe>: a changed recipe builds a
new one (into a temporary name, then renamed: a half-built image is never used).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime import fsutil
from tests.hostd_harness import free_port, wait_for

CACHE = Path("/var/cache/hostd/vm")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# The least a server running hostd has: systemd, a kernel, sshd for the test to come in, and
# the Depends and Recommends of hostd's package (packaging/debian/control): the VM has no
# network, the .deb is installed offline as apt-get installs it by default.
PACKAGES = (
    "systemd", "systemd-sysv", "linux-image-amd64", "initramfs-tools", "udev", "openssh-server",
    "adduser", "debootstrap", "e2fsprogs", "fuse3", "iproute2", "lxcfs", "nftables",
    "openssh-client", "procps", "runc", "uidmap", "python3", "python3-pyroute2", "python3-systemd",
    "quota", "zstd",
)  # fmt: skip
# Run in the new tree (chroot): the network of qemu's user mode (static: no DHCP wait), no
# timers or units a test VM does not need, sshd for root by key only.
SETUP = """set -eu
echo hostd-vm >/etc/hostname
printf '127.0.0.1 localhost\\n127.0.1.1 hostd-vm\\n' >/etc/hosts
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >/etc/fstab
cat >/etc/systemd/network/10-qemu.network <<EOF
[Match]
Name=en* eth*
[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
EOF
systemctl enable systemd-networkd
systemctl mask systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer e2scrub_reap.service fstrim.timer
printf 'PasswordAuthentication no\\nUseDNS no\\n' >/etc/ssh/sshd_config.d/hostd-vm.conf
install -d -m 0700 /root/.ssh
"""
IMAGE_SIZE = "4G"
MEMORY = "4096"
CPUS = "2"
BOOT_TIMEOUT = 600.0  # seconds from qemu's start to sshd answering: generous, emulation is slow
# The connection counts as lost after 30 s x this without a word from the VM: under emulation
# on a loaded host, a guest can stall for a minute or more (ssh's default gives up after 90 s)
ALIVE_COUNT = 10
HOST_ALIAS = "hostd-vm"  # the name the image's host key is known under, whatever the port


def recipe_hash() -> str:
    """What decides the image's content: change any of it and a new image is built."""
    recipe = {"suite": SUITE, "mirror": MIRROR, "packages": PACKAGES, "setup": SETUP,
              "size": IMAGE_SIZE, "format": 1}  # fmt: skip
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    """A built image: the root file system, the kernel and initrd to boot it, the SSH key that
    root inside accepts and the known_hosts line of the image's host key."""

    directory: Path

    @property
    def root(self) -> Path:
        return self.directory / "root.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def key(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"


def image(log: Path) -> tuple[Image, float]:
    """The cached image, built first if the recipe changed; and the seconds the build took
    (0 when cached). One build at a time: a second session waits for the first."""
    final = CACHE / recipe_hash()
    with cache_locked():
        if final.is_dir():
            return Image(final), 0.0
        began = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
        try:
            _build(work, log)
            os.rename(work, final)
        finally:
            fsutil.remove_tree(work)
        return Image(final), time.monotonic() - began


@contextlib.contextmanager
def cache_locked() -> Iterator[None]:
    """One writer of the cache at a time, across test sessions."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(work: Path, log: Path) -> None:
    tree = work / "tree"
    with open(log, "ab") as out:
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--cache-dir={_debs()}",
             "--include=" + ",".join(PACKAGES), SUITE, str(tree), MIRROR],
            stdout=out, stderr=subprocess.STDOUT, check=True, timeout=1800,
        )  # fmt: skip
        subprocess.run(
            ["chroot", str(tree), "/bin/sh", "-c", SETUP],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
            stdout=out, stderr=subprocess.STDOUT, check=True, timeout=300,
        )  # fmt: skip
    img = Image(work)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", HOST_ALIAS,
                    "-f", str(img.key)], check=True)  # fmt: skip
    authorized = tree / "root/.ssh/authorized_keys"
    shutil.copy(f"{img.key}.pub", authorized)
    os.chmod(authorized, 0o600)
    host_key = (tree / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2]
    img.known_hosts.write_text(f"{HOST_ALIAS} {' '.join(host_key)}\n")
    shutil.copy(_one(tree, "boot/vmlinuz-*"), img.kernel)
    shutil.copy(_one(tree, "boot/initrd.img-*"), img.initrd)
    make_disk(img.root, tree, IMAGE_SIZE, "hostd-vm-root")
    fsutil.remove_tree(tree)


def _debs() -> Path:
    """debootstrap's package cache, the VM's own (builds of tenant images use another)."""
    path = CACHE / "debs"
    path.mkdir(exist_ok=True)
    return path


def _one(tree: Path, pattern: str) -> str:
    found = glob.glob(str(tree / pattern))
    assert len(found) == 1, f"expected one {pattern} in the VM tree, found {found}"
    return found[0]


def make_disk(path: Path, tree: Path, size: str, label: str) -> None:
    """An ext4 image of `size` (sparse) holding `tree` (owners, modes, xattrs, links kept)."""
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(tree), str(path), size],
        check=True,
        stdout=subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class Disk:
    """An extra disk for the VM: its label names it inside (`mount LABEL=...`)."""

    path: Path
    read_only: bool = False


class Machine:
    """A running VM: root over SSH on 127.0.0.1:`port`; the guest reaches nothing but that.
    `argv` boots it (qemu with -no-reboot: a reboot inside ends qemu, `reboot` starts it again
    on the same disks)."""

    def __init__(self, img: Image, workdir: Path, port: int, argv: Sequence[str]) -> None:
        self.image = img
        self.workdir = workdir
        self.port = port
        self.argv = list(argv)
        self.console = workdir / "console.log"
        self._control = workdir / "ssh.control"
        self.ssh_log = workdir / "ssh.log"
        self.qemu: subprocess.Popen[bytes] | None = None

    def power_on(self) -> float:
        """Start qemu; return once sshd answers and systemd has finished starting, with the
        seconds that took."""
        began = time.monotonic()
        with open(self.console, "ab") as console:
            self.qemu = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
            )
        _wait_booted(self, self.qemu)
        return time.monotonic() - began

    def reboot(self, timeout: float = BOOT_TIMEOUT) -> tuple[float, float]:
        """`systemctl reboot` inside, then boot the same disks again: the seconds the shutdown
        took (until qemu exited) and the boot."""
        assert self.qemu is not None
        began = time.monotonic()
        self.run("systemctl reboot", check=False, timeout=60)
        try:
            self.qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the VM did not shut down:\n{tail(self.console)}") from None
        down = time.monotonic() - began
        self.close_ssh()
        return down, self.power_on()

    def power_off(self) -> None:
        """qemu killed (the overlay is thrown away: no clean shutdown needed)."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.close_ssh()
        if self.qemu is not None:
            _kill(self.qemu)

    def ssh_argv(self, *command: str, master: str = "no", control: str = "") -> list[str]:
        """ssh as root into the VM; through the shared connection once `open_master` ran
        (one key exchange under emulation instead of one per command), or through `control`
        ("none": a connection of its own). What ssh itself says goes to `ssh_log`."""
        return [
            "ssh", "-p", str(self.port), "-i", str(self.image.key), "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", f"HostKeyAlias={HOST_ALIAS}",
            "-o", f"UserKnownHostsFile={self.image.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=30", "-o", "ServerAliveInterval=30",
            "-o", f"ServerAliveCountMax={ALIVE_COUNT}", "-o", "LogLevel=INFO",
            "-E", str(self.ssh_log), "-o", f"ControlMaster={master}",
            "-o", f"ControlPath={control or self._control}", "root@127.0.0.1", *command,
        ]  # fmt: skip

    def run(
        self, script: str, input: bytes | None = None, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a bash script as root in the VM; with `check`, fail the test showing its output
        if it exits non-zero."""
        # `exit $?` after the script: bash never execs its last command in place, so a
        # command killed by signal N exits 128 + N here; ssh's own 255 then means a lost VM
        res = subprocess.run(
            self.ssh_argv("bash", "-c", _quote(f"{script}\nexit $?")),
            input=input,
            capture_output=True,
            timeout=timeout,
        )
        out = subprocess.CompletedProcess(
            res.args, res.returncode, res.stdout.decode(errors="replace"),
            res.stderr.decode(errors="replace"),
        )  # fmt: skip
        if check:
            # 255: ssh lost the VM (or never reached it); above 128: killed by a signal. What
            # ssh, the console and the VM itself (over a new connection) say shows why
            lost = f"\n{self.post_mortem()}" if out.returncode > 128 else ""
            assert out.returncode == 0, (
                f"in the VM, {script!r} exited {out.returncode}:\n{out.stdout}\n{out.stderr}{lost}"
            )
        return out

    def sh(self, script: str, input: bytes | None = None, timeout: float = 600) -> str:
        """The output of a script that must succeed."""
        return self.run(script, input=input, timeout=timeout).stdout

    def post_mortem(self) -> str:
        """What ssh logged, the console's last lines and, over a connection of its own, the
        VM's state: for a command that lost the VM."""
        script = (
            "uptime; free -m; systemctl --no-pager --lines=0 status hostd; "
            "journalctl -b --no-pager -o short-monotonic -n 60; "
            "ps -eo pid,ni,stat,etime,time,rss,comm --sort=-time | head -15"
        )
        try:
            res = subprocess.run(
                self.ssh_argv("bash", "-c", _quote(script), control="none"),
                capture_output=True, timeout=120,
            )  # fmt: skip
            state = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired:
            state = "(no answer within 120 s)"
        return (
            f"ssh's log:\n{tail(self.ssh_log, 20)}\nits console:\n{tail(self.console)}\n"
            f"the VM now:\n{state}"
        )

    def answers(self) -> bool:
        try:
            return self.run("true", timeout=60, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def open_master(self) -> None:
        """The shared connection, in the background (ssh -f: its stdio on /dev/null)."""
        subprocess.run(
            ["ssh", "-f", "-N", *self.ssh_argv(master="yes")[1:]], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120,
        )  # fmt: skip

    def close_ssh(self) -> None:
        subprocess.run(self.ssh_argv("-O", "exit"), capture_output=True, timeout=30)


def _quote(script: str) -> str:
    """ssh joins its arguments into one line for the remote shell: quote the script once."""
    return "'" + script.replace("'", "'\\''") + "'"


@contextlib.contextmanager
def boot(img: Image, disks: Sequence[Disk] = ()) -> Iterator[tuple[Machine, float]]:
    """Boot `img` on a fresh overlay with `disks` attached (vdb, vdc, ... in order); yield the
    machine once sshd answers and systemd has finished starting, with the seconds that took.
    qemu is killed and the overlay deleted on the way out, whatever happened."""
    workdir = Path(tempfile.mkdtemp(prefix="hostd-vm-", dir="/var/tmp"))
    try:
        overlay = workdir / "overlay.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img.root),
             str(overlay)], check=True,
        )  # fmt: skip
        port = free_port()
        # TCG with one thread for both vCPUs: with a thread per vCPU (MTTCG, qemu 7.2), the VM
        # hung at a tenant's first start in about one full CI run in three (both vCPU threads
        # at 100%, nothing on the console, sshd silent for minutes), never in a run of the VM
        # tests alone; one thread costs ~10% here
        argv = [
            "qemu-system-x86_64", "-accel", "tcg,thread=single", "-m", MEMORY, "-smp", CPUS,
            "-nographic", "-no-reboot", "-kernel", str(img.kernel), "-initrd", str(img.initrd),
            "-append", "root=/dev/vda rw console=ttyS0 panic=-1",
            "-drive", f"file={overlay},format=qcow2,if=virtio",
            "-nic", f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        ]  # fmt: skip
        for d in disks:
            ro = ",readonly=on" if d.read_only else ""
            argv += ["-drive", f"file={d.path},format=raw,if=virtio{ro}"]
        machine = Machine(img, workdir, port, argv)
        try:
            yield machine, machine.power_on()
        finally:
            machine.power_off()
    finally:
        shutil.rmtree(workdir)


def _wait_booted(machine: Machine, qemu: subprocess.Popen[bytes]) -> None:
    def up() -> bool:
        if qemu.poll() is not None:
            raise AssertionError(f"qemu exited {qemu.returncode}:\n{tail(machine.console)}")
        return machine.answers()

    wait_for(up, BOOT_TIMEOUT, lambda: f"the VM's sshd:\n{tail(machine.console)}", interval=1)
    machine.open_master()
    state = machine.run("systemctl is-system-running --wait", check=False, timeout=BOOT_TIMEOUT)
    assert state.stdout.strip() == "running", (
        f"the VM's systemd is {state.stdout.strip()}:\n"
        + machine.run("systemctl --failed --no-legend", check=False).stdout
    )


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log (the console's, ssh's)."""
    with contextlib.suppress(OSError):
        text = path.read_bytes().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
    return f"(nothing in {path.name})"


def _kill(qemu: subprocess.Popen[bytes]) -> None:
    """qemu by its PID: SIGTERM, then SIGKILL if it lingers."""
    if qemu.poll() is None:
        qemu.send_signal(signal.SIGTERM)
        try:
            qemu.wait(timeout=30)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()
