"""A real hostd for integration tests (temp config and subuid files) and Unix test users."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import ipaddress
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from hostd.client import call
from runtime import mountinfo
from runtime.netplan import veth_name

T = TypeVar("T")
POLL_INTERVAL = 0.05  # seconds between two looks at a condition; the timeout bounds the wait


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str | Callable[[], str],
    *,
    interval: float = POLL_INTERVAL,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Poll `predicate` until it returns something true, and return that: tests wait for a
    real condition, never for a guessed time. An exception of the `ignore` types counts as
    "not yet", any other ends the wait. After `timeout` seconds fail, naming `what` (a text,
    or a function making one then) and the last value or exception seen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last: object = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {said}; last: {last!r}")
        time.sleep(interval)


@dataclass
class Hostd:
    config: Path
    subuid: Path
    subgid: Path
    admin_socket: Path
    user_socket: Path
    state_dir: Path
    log: Path
    ssh_port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self, reconciled: bool = True) -> None:
        """Start hostd; return once its admin socket answers and, if `reconciled`, once it
        logged the end of its reconcile (which runs in the background, after the sockets)."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                # as the quickstart starts it (`setsid nohup hostd &`): SIGHUP and SIGQUIT
                # ignored, and a session of its own, as systemd gives each service (the
                # kernel's autogroup scheduling then weighs hostd apart from what the tests
                # and benchmarks start)
                ["sh", "-c", 'trap "" HUP QUIT; exec "$@"', "hostd"]
                + [sys.executable, "-m", "hostd.daemon", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_for(lambda: self._running() and self._answers(), 60, "hostd's admin socket")
        if reconciled:  # reconcile may start every tenant
            wait_for(lambda: self._running() and self.reconciled(offset), 300, "reconcile's end")

    def _running(self) -> bool:
        """True while hostd runs; fails the test, with hostd's last words, once it exited."""
        assert self.proc is not None and self.proc.poll() is None, (
            f"hostd exited: {self.log.read_text()[-2000:]}"
        )
        return True

    def reconciled(self, offset: int) -> bool:
        """Whether hostd logged the end of a reconcile after byte `offset` of its log."""
        with open(self.log, "rb") as log:
            log.seek(offset)
            return b"hostd: reconcile finished" in log.read()

    @contextlib.contextmanager
    def configured(self, name: str, text: str) -> Iterator[Hostd]:
        """hostd restarted with the drop-in `<config>.d/<name>.toml` holding `text`; restarted
        without it afterwards."""
        dropin = Path(f"{self.config}.d/{name}.toml")
        dropin.parent.mkdir(exist_ok=True)
        dropin.write_text(text)
        try:
            self.stop()
            self.start()
            yield self
        finally:
            dropin.unlink(missing_ok=True)
            self.stop()
            self.start()

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.admin_socket))
                return True
            except OSError:
                return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
        self.proc = None

    def hostctl_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "hostd.hostctl", "--config", str(self.config), *args]

    def hostctl(
        self, *args: str, input: bytes | None = None, check: bool = True, user: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        raw = subprocess.run(
            self.hostctl_argv(*args),
            input=input or b"",
            capture_output=True,
            timeout=600,
            user=user,
        )
        res = subprocess.CompletedProcess(
            raw.args,
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )
        if check:
            assert res.returncode == 0, f"hostctl {' '.join(args)}: {res.stderr}{res.stdout}"
        return res


def connect_as(user: str, path: Path, count: int = 1) -> list[socket.socket]:
    """`count` sockets connected to `path` by a process running as `user`, so hostd's
    SO_PEERCRED sees that user (the child hands the connected sockets back and exits).
    PermissionError if the user may not connect."""
    pw = pwd.getpwnam(user)
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only connects
        code = 1
        try:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            conns = []
            try:
                for _ in range(count):
                    conns.append(socket.socket(socket.AF_UNIX))
                    conns[-1].connect(str(path))
                for i in range(0, count, 200):  # SCM_RIGHTS takes at most 253 fds at once
                    socket.send_fds(child, [b"ok"], [c.fileno() for c in conns[i : i + 200]])
            except PermissionError:
                child.sendall(b"EACCES")
            code = 0
        finally:
            os._exit(code)
    got: list[socket.socket] = []
    with parent:
        child.close()
        while len(got) < count:
            msg, fds, _, _ = socket.recv_fds(parent, 16, 200)
            got += [socket.socket(fileno=fd) for fd in fds]
            if not fds:
                for conn in got:
                    conn.close()
                os.waitpid(pid, 0)
                raise PermissionError(msg.decode() or "the child could not connect")
    os.waitpid(pid, 0)
    return got


def authorize(user: str, line: str) -> None:
    """Make `line` the user's authorized_keys, as StrictModes wants: ~/.ssh 0700, the file
    0600, both theirs."""
    pw = pwd.getpwnam(user)
    ssh_dir = Path(pw.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(line)
    for path in (ssh_dir, keys):
        os.chown(path, pw.pw_uid, pw.pw_gid)
    keys.chmod(0o600)


# OpenSSH client options of every test and benchmark: non-interactive, any host key trusted
SSH_OPTIONS = [
    *("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"),
    *("-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"),
]


def ssh_argv(port: int, key: Path, user: str, *extra: str) -> list[str]:
    """An OpenSSH client command for `user` at 127.0.0.1:`port` with `key`."""
    return ["ssh", "-p", str(port), "-i", str(key), *SSH_OPTIONS, *extra, f"{user}@127.0.0.1"]


@dataclass(frozen=True)
class Login:
    """An SSH login as a user does it: their key, OpenSSH's client, hostd's gateway."""

    user: str
    key: Path
    port: int
    home: Path  # a client-side HOME with an ssh config for this login (for the docker CLI)

    def ssh_args(self, *extra: str) -> list[str]:
        return ssh_argv(self.port, self.key, self.user, *extra)

    def ssh(
        self, *command: str, input: bytes = b"", extra: tuple[str, ...] = (), timeout: float = 300
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self.ssh_args(*extra), *command], input=input, capture_output=True, timeout=timeout
        )

    def sh(self, script: str, input: bytes = b"", timeout: float = 300) -> str:
        """Run `script` in the user's shell over SSH; its stdout, or fail with its stderr."""
        res = self.ssh(script, input=input, timeout=timeout)
        out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
        tail = f"{out[-3000:]}{err[-3000:]}"
        assert res.returncode == 0, f"`{script}` exited {res.returncode}:\n{tail}"
        return out


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Give the terminal on `fd` this size (ssh sends it on, and again on SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def read_until(fd: int, pattern: bytes, seen: bytearray) -> bytes:
    """Read the client's terminal until `pattern` matches what arrived (bounded: 60 s)."""

    def arrived() -> bool:
        if re.search(pattern, seen):
            return True
        if select.select([fd], [], [], POLL_INTERVAL)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the process on the other side of the pty is gone
                chunk = b""
            assert chunk, f"terminal closed before {pattern!r}: {bytes(seen)[-500:]!r}"
            seen.extend(chunk)
        return re.search(pattern, seen) is not None

    wait_for(arrived, 60, lambda: f"{pattern!r} in {bytes(seen)[-500:]!r}", interval=0)
    return bytes(seen)


def keypair(key: Path) -> Path:
    """A new ed25519 key pair at `key` and `key`.pub, without passphrase."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def login_as(user: str, port: int, directory: Path) -> Login:
    """A key pair for `user` in `directory`, authorized in their ~/.ssh, and a client HOME."""
    key = keypair(directory / "id_ed25519")
    authorize(user, key.with_suffix(".pub").read_text())
    home = directory / "client-home"
    (home / ".ssh").mkdir(mode=0o700, parents=True)
    (home / ".ssh/config").write_text(
        f"Host 127.0.0.1\n  IdentityFile {key}\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
    )
    return Login(user, key, port, home)


def make_busybox_tar(directory: Path) -> Path:
    """A 1 MB image for an inner Docker (no registry here): busybox-static and its applets,
    as `directory`/busybox.tar for `docker import`."""
    root = directory / "busybox-root"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    subprocess.run([str(root / "bin/busybox"), "--install", "-s", str(root / "bin")], check=True)
    for link in (root / "bin").iterdir():  # point the applets at /bin/busybox inside the image
        if link.is_symlink():
            link.unlink()
            link.symlink_to("busybox")
    (root / "sbin").mkdir()
    (root / "sbin/init").symlink_to("/bin/busybox")
    tar = directory / "busybox.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    return tar


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_SUBNET_POOL = ipaddress.IPv4Network("10.240.0.0/12")  # apart from every fixed test subnet
_handed_out: list[ipaddress.IPv4Network] = []


def free_subnet(prefixlen: int) -> ipaddress.IPv4Network:
    """A private IPv4 subnet for a test bridge that no interface of this host has an address
    in, and not handed out before in this session: concurrent test sessions (helpers, CI)
    get networks of their own. The search starts at a place our PID picks."""
    listing = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    used = [
        ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
        for link in json.loads(listing)
        for a in link.get("addr_info", [])
    ] + _handed_out
    subnets = list(_SUBNET_POOL.subnets(new_prefix=prefixlen))
    first = os.getpid() % len(subnets)
    for net in subnets[first:] + subnets[:first]:
        if not any(net.overlaps(u) for u in used):
            _handed_out.append(net)
            return net
    raise RuntimeError(f"no free /{prefixlen} left in {_SUBNET_POOL}")


@dataclass(frozen=True)
class HostView:
    """What the host holds of containers, as the kernel and the files show it rather than as
    hostd says: the one look behind the benchmarks' "nothing left behind" and the chaos
    test's cross-checks. Each field is the set of container names with such a trace."""

    dirs: frozenset[str]  # directories under <state>/containers
    mounts: frozenset[str]  # a mount at or below its directory
    loops: frozenset[str]  # a loop device backed by a file in its directory
    links: frozenset[str]  # its host veth
    nft: frozenset[str]  # its veth named in the nft ruleset
    cgroups: frozenset[str]  # a cgroup directory (any v1 controller, or v2)
    dnat: frozenset[str]  # addresses the nft table forwards host ports to (any container)

    def traces(self, name: str) -> list[str]:
        """What is there of container `name`, one phrase each."""
        return [f"{kind[:-1]} of {name}" for kind in _TRACES if name in getattr(self, kind)]

    def left(self, names: Iterable[str]) -> list[str]:
        """Every trace of any container, and of `names` (what a full removal must leave: [])."""
        every = {n for kind in _TRACES for n in getattr(self, kind)} | set(names)
        return [trace for name in sorted(every) for trace in self.traces(name)]


_TRACES = ("dirs", "mounts", "loops", "links", "nft", "cgroups")


def host_view(
    state_dir: Path, names: Iterable[str], cgroup_parent: str, nft_table: str
) -> HostView:
    """Look at the host now. Traces found by path (dirs, mounts, loops) are of any container;
    those found by name (links, nft, cgroups) of `names` only."""
    names = list(names)
    containers = state_dir / "containers"
    prefix = f"{containers}/"

    def owner(path: str) -> str | None:
        return path[len(prefix) :].split("/")[0] if path.startswith(prefix) else None

    dirs = {p.name for p in containers.iterdir()} if containers.is_dir() else set()
    mounts = {owner(t) for t in mountinfo.mounts_under(str(containers))}
    loops = set()
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        with contextlib.suppress(OSError), open(backing) as f:
            loops.add(owner(f.read().strip()))
    links = set(os.listdir("/sys/class/net"))
    ruleset = subprocess.run(
        ["nft", "list", "ruleset"], capture_output=True, text=True, check=True
    ).stdout
    table = subprocess.run(
        ["nft", "list", "table", "inet", nft_table], capture_output=True, text=True
    ).stdout  # no table (yet, or any more): no forwards
    cgroups = glob.glob(f"/sys/fs/cgroup/*/{cgroup_parent}/*") + glob.glob(
        f"/sys/fs/cgroup/{cgroup_parent}/*"
    )
    return HostView(
        dirs=frozenset(dirs),
        mounts=frozenset(m for m in mounts if m),
        loops=frozenset(lo for lo in loops if lo),
        links=frozenset(n for n in names if veth_name(n) in links),
        nft=frozenset(n for n in names if veth_name(n) in ruleset),
        cgroups=frozenset(n for n in names if any(Path(c).name == n for c in cgroups)),
        dnat=frozenset(re.findall(r"dnat ip to ([0-9.]+)", table)),
    )


class UnixUsers:
    """Real accounts for tests (useradd), all removed at the end of the session."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self._n = 0

    def make(self) -> str:
        self._n += 1
        name = f"hdit{os.getpid() % 100000}x{self._n}"
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
        self.made.append(name)
        return name

    def remove_all(self) -> None:
        for name in self.made:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["userdel", "-r", "-f", name], check=True, capture_output=True)


SSHD = "/usr/sbin/sshd"


def start_sshd(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """A real OpenSSH server with this config, its output in `log`; returns once it answers."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )

    def answers() -> bool:
        assert proc.poll() is None, f"sshd exited: {log.read_text()[-2000:]}"
        with socket.socket() as s:
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            return s.recv(64).startswith(b"SSH-2.0-")

    wait_for(answers, 30, f"sshd's banner on port {port}", ignore=(OSError,))
    return proc


def children(pid: int) -> list[int]:
    """PIDs of the children of `pid`, all its threads'."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def stop_sshd(proc: subprocess.Popen[bytes]) -> None:
    """End sshd (by its PID) and the per-connection sshd processes it forked."""
    if proc.poll() is not None:
        return
    pids = [proc.pid]
    while pids:  # the tree below sshd, collected before anything dies and is reparented
        pid = pids.pop()
        for child in children(pid):
            pids.append(child)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


BUSY_SECONDS = 120  # how long each request holding a worker would last


def sleepers(arg: str) -> list[int]:
    """PIDs of `sleep <arg>` processes on the host (the tenant's, seen from outside)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if (
                entry.name.isdigit()
                and (entry / "cmdline").read_bytes() == f"sleep\0{arg}\0".encode()
            ):
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def busy_admin_workers(hostd: Hostd, user: str, count: int) -> Iterator[None]:
    """`count` admin requests in progress (each an exec of a long sleep in `user`'s
    container), ended by killing those sleeps afterwards, on failure too."""
    arg = f"{BUSY_SECONDS}.{os.getpid()}"
    stdio = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
    pool = ThreadPoolExecutor(max_workers=count)
    try:
        args = {"user": user, "argv": ["sleep", arg]}
        for _ in range(count):
            pool.submit(call, hostd.admin_socket, "exec", args, stdio)
        wait_for(lambda: len(sleepers(arg)) == count, 60, f"{count} sleeps holding workers")
        yield
    finally:
        for pid in sleepers(arg):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pool.shutdown(wait=True)
        for fd in stdio:
            os.close(fd)


@contextlib.contextmanager
def other_hostd(
    work: Path, state: Path, tag: str, sections: dict[str, str] | None = None
) -> Iterator[Hostd]:
    """A second hostd on this machine, as another server would be: its config, subuid files
    and log in `work`, its state dir `state`, sockets in a run dir of its own, its own
    gateway port, bridge, nft table, subnet and cgroup parent (named after `tag`, a few
    letters); `sections` adds lines to sections of its hostd.toml. At the end it is stopped
    and its containers, network and lxcfs removed (`work` and `state` are the caller's)."""
    from hostd import config as config_mod
    from runtime import fsutil, lxcfs, network
    from runtime.containers import Runtime

    run = Path(tempfile.mkdtemp(prefix=f"hostd-{tag}-", dir="/run"))
    run.chmod(0o755)
    h = Hostd(
        config=work / "hostd.toml",
        subuid=work / "subuid",
        subgid=work / "subgid",
        admin_socket=run / "admin.sock",
        user_socket=run / "user.sock",
        state_dir=state,
        log=work / "hostd.log",
        ssh_port=free_port(),
    )
    subnet = free_subnet(24)
    toml = {
        "paths": f'state_dir = "{state}"\nrun_dir = "{run}"\nadmin_socket = "{h.admin_socket}"\n'
        f'user_socket = "{h.user_socket}"\nsubuid = "{h.subuid}"\nsubgid = "{h.subgid}"\n',
        "runtime": f'cgroup_parent = "hostd-{tag}"\n',
        "gateway": f'listen = "127.0.0.1:{h.ssh_port}"\n',
        "network": f'bridge = "hostd{tag}{os.getpid()}"\nnft_table = "hostd_{tag}_{os.getpid()}"\n'
        f'subnet = "{subnet}"\ndns = ["{subnet.network_address + 1}"]\n',
    }
    for section, lines in (sections or {}).items():
        toml[section] = toml.get(section, "") + lines
    h.config.write_text("".join(f"[{s}]\n{lines}" for s, lines in toml.items()))
    try:
        h.start()
        yield h
    finally:
        h.stop()
        settings = config_mod.load(h.config).runtime_settings()
        rt = Runtime(settings)
        for c in rt.containers():  # what a failure left behind
            rt.delete(c.name, force=True)
        network.teardown_host(rt.network_config())
        assert settings.lxcfs is not None
        lxcfs.stop(settings.lxcfs)
        fsutil.remove_tree(run)


HOST_PYTHON = "/usr/bin/python3"  # executable by every host user (the venv's is not)

# Run as a host user: each attempt, and the errno name it got (or "ok").
_PROBE = """
import errno, json, os, subprocess, sys
out = {}
for op, path in json.loads(sys.argv[1]):
    try:
        if op == "stat":
            os.stat(path)
        elif op == "open":
            os.close(os.open(path, os.O_RDWR))
        elif op == "exec":
            subprocess.run([path], check=True)
        elif op == "write":
            with open(path, "w") as f:
                f.write("x")
        elif op == "create":
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        elif op == "symlink":
            os.symlink("/tmp", path)
        elif op == "read":
            with open(path, "rb") as f:
                f.read(1)
        elif op == "list":
            os.listdir(path)
        else:
            raise ValueError(op)
        out[op + " " + path] = "ok"
    except OSError as exc:
        out[op + " " + path] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""


def probe_as(uid: int, gid: int, ops: list[tuple[str, str]]) -> dict[str, str]:
    """Try each (op, path) as a host user with no supplementary groups: stat, open (read and
    write), exec, write, create, symlink, read, list. What each got, by "op path": "ok" or the
    errno's name."""
    res = subprocess.run(
        [HOST_PYTHON, "-c", _PROBE, json.dumps(ops)],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout.splitlines()[-1]))
