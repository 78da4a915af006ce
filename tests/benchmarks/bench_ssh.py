"""Benchmark: hostd's SSH gateway against OpenSSH into the host, measured in one run.

Prints, for the gateway (into the user's container) and for a plain sshd on loopback (into the
host, the same user and key): warm login to first command output, scp of 200 MB up and down,
and the cold first login (container stopped) to a ready shell, with the ratios against the
issue's goals (warm login <= 1.5x OpenSSH, scp >= 0.5x OpenSSH's throughput). Then the same
warm login and scp through OpenSSH with hostd-login as its ForceCommand (the other way in).

    sudo .venv/bin/python -m tests.benchmarks.bench_ssh [--runs 10] [--state-dir DIR]

It starts its own hostd (temp config, temp subuid files, a bridge and nft table of its own) and
two sshd of its own, creates one test account, and removes all of it at the end. Without
--state-dir it builds the default image in a fresh directory first (about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import select
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hostd import config as config_mod
from runtime import fsutil, lxcfs, network
from runtime.containers import Runtime
from tests.benchmarks.images import state_with_default_image
from tests.hostd_harness import (
    SSH_OPTIONS,
    Hostd,
    UnixUsers,
    authorize,
    free_port,
    start_sshd,
    stop_sshd,
)

SIZE = 200 * 2**20
REPO = Path(__file__).resolve().parents[2]


def cache_bytecode(cache: Path) -> None:
    """hostd and every hostctl run from here with their bytecode cached in `cache`, as
    installed (the package compiles it at install): under PYTHONDONTWRITEBYTECODE each
    hostctl would compile every module it imports (~50 ms a command on this machine)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache)


class Bench:
    """The servers and the account under test. Whatever was set up is undone by close(),
    also when setting up fails half-way."""

    def __init__(self, work: Path, state: Path) -> None:
        self.work, self.state = work, state
        self._undo = contextlib.ExitStack()
        cache_bytecode(work / "pycache")
        try:
            self._setup()
        except BaseException:
            self._undo.close()
            raise

    def _setup(self) -> None:
        self.users = UnixUsers()
        self._undo.callback(self.users.remove_all)
        self.user = self.users.make()
        subprocess.run(["usermod", "-p", "*", self.user], check=True)  # sshd without PAM
        self.key = self.work / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True
        )
        authorize(self.user, self.key.with_suffix(".pub").read_text())
        self.hostd = self._hostd()
        # hostd-login runs as the user: its launcher and modules live where users may read
        self.login_dir = Path(tempfile.mkdtemp(prefix="hostd-bench-login-", dir="/run"))
        self._undo.callback(fsutil.remove_tree, self.login_dir)
        self.login_dir.chmod(0o755)
        subprocess.run(
            [
                "bash",
                str(REPO / "packaging/install-login-hook.sh"),
                "--prefix",
                str(self.login_dir),
            ],
            check=True,
            capture_output=True,
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.sshd_port = self._sshd("host")
        self.login_port = self._sshd("login")

    def _hostd(self) -> Hostd:
        run = Path(tempfile.mkdtemp(prefix="hostd-bench-", dir="/run"))
        self._undo.callback(fsutil.remove_tree, run)
        run.chmod(0o755)  # hostd-login, running as the user, connects to the user socket
        h = Hostd(
            config=self.work / "hostd.toml",
            subuid=self.work / "subuid",
            subgid=self.work / "subgid",
            admin_socket=run / "admin.sock",
            user_socket=run / "user.sock",
            state_dir=self.state,
            log=self.work / "hostd.log",
            ssh_port=free_port(),
        )
        h.config.write_text(
            f'[paths]\nstate_dir = "{self.state}"\nrun_dir = "{run}"\n'
            f'admin_socket = "{h.admin_socket}"\nuser_socket = "{h.user_socket}"\n'
            f'subuid = "{h.subuid}"\nsubgid = "{h.subgid}"\n'
            '[runtime]\ncgroup_parent = "hostd-bench"\n'
            f'[gateway]\nlisten = "127.0.0.1:{h.ssh_port}"\n'
            '[network]\nbridge = "hostdb0"\nnft_table = "hostd_bench"\n'
            'subnet = "10.232.0.0/24"\ndns = ["10.232.0.1"]\n'
        )
        self._undo.callback(self._remove_hostd, h)
        h.start()
        return h

    def _remove_hostd(self, h: Hostd) -> None:
        """The tenant, then hostd, then its bridge, rules and lxcfs."""
        if h.proc is not None and h.proc.poll() is None:
            h.hostctl("user", "remove", self.user, check=False)
            h.stop()
        settings = config_mod.load(h.config).runtime_settings()
        network.teardown_host(Runtime(settings).network_config())
        assert settings.lxcfs is not None
        lxcfs.stop(settings.lxcfs)

    def _sshd(self, name: str) -> int:
        """An sshd into the host ("host"), or one that hands the user to hostd-login ("login"),
        as etc/sshd_config.d/hostd.conf does. Returns its port."""
        port = free_port()
        host_key = self.work / f"ssh_host_ed25519_key_{name}"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True
        )
        cfg = self.work / f"sshd_config_{name}"
        cfg.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"PidFile {self.work}/sshd_{name}.pid\nUsePAM no\nPasswordAuthentication no\n"
            "AuthorizedKeysFile .ssh/authorized_keys\n"
            "Subsystem sftp /usr/lib/openssh/sftp-server\n"
            + (
                f"SetEnv HOSTD_USER_SOCKET={self.hostd.user_socket}\n"
                f"Match User {self.user}\n  ForceCommand {self.login_dir}/bin/hostd-login\n"
                if name == "login"
                else ""
            )
        )
        proc = start_sshd(cfg, port, self.work / f"sshd_{name}.log")
        self._undo.callback(stop_sshd, proc)
        return port

    def opts(self, port_flag: str, port: int) -> list[str]:
        return [port_flag, str(port), "-i", str(self.key), *SSH_OPTIONS]

    def ssh(self, port: int, command: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ssh", *self.opts("-p", port), f"{self.user}@127.0.0.1", command],
            capture_output=True,
            timeout=300,
        )

    def first_output(self, port: int) -> float:
        t0 = time.perf_counter()
        res = self.ssh(port, "echo ready")
        assert res.stdout == b"ready\n", res.stderr
        return time.perf_counter() - t0

    def scp(self, port: int, src: str, dst: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(["scp", *self.opts("-P", port), src, dst], check=True, timeout=600)
        return time.perf_counter() - t0

    def shell_ready(self, port: int) -> float:
        """Seconds from starting `ssh -tt` to the shell answering a command."""
        t0 = time.perf_counter()
        pid, fd = pty.fork()
        if pid == 0:
            os.execvp("ssh", ["ssh", "-tt", *self.opts("-p", port), f"{self.user}@127.0.0.1"])
        os.write(fd, b"echo READY-$((40+2))\n")
        seen = b""
        deadline = time.monotonic() + 120
        while b"READY-42" not in seen and time.monotonic() < deadline:
            if select.select([fd], [], [], 1)[0]:
                seen += os.read(fd, 65536)
        elapsed = time.perf_counter() - t0
        os.write(fd, b"exit\n")
        os.waitpid(pid, 0)
        os.close(fd)
        assert b"READY-42" in seen, seen[-300:]
        return elapsed

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *_: object) -> None:
        self._undo.close()


def measure(b: Bench, runs: int, work: Path) -> None:
    """Take every figure, then print them side by side."""
    gw, host = b.hostd.ssh_port, b.sshd_port
    b.hostd.hostctl("user", "add", b.user)
    cold = b.shell_ready(gw)  # the container starts on this first login
    b.first_output(gw)
    warm_gw = statistics.median(b.first_output(gw) for _ in range(runs))
    warm_host = statistics.median(b.first_output(host) for _ in range(runs))
    blob = work / "blob"
    blob.write_bytes(os.urandom(SIZE))
    target = f"{b.user}@127.0.0.1"
    up_gw = b.scp(gw, str(blob), f"{target}:blob-gw")
    up_host = b.scp(host, str(blob), f"{target}:blob-host")
    down_gw = b.scp(gw, f"{target}:blob-gw", str(work / "back-gw"))
    down_host = b.scp(host, f"{target}:blob-host", str(work / "back-host"))
    warm_shell_gw = b.shell_ready(gw)
    warm_shell_host = b.shell_ready(host)
    login = b.login_port
    warm_login = statistics.median(b.first_output(login) for _ in range(runs))
    up_login = b.scp(login, str(blob), f"{target}:blob-login")
    down_login = b.scp(login, f"{target}:blob-login", str(work / "back-login"))
    mb = SIZE / 2**20
    rows = [
        ("gateway: warm first output (s)", warm_gw, warm_host, warm_gw / warm_host, "<= 1.5x"),
        (
            "gateway: warm shell prompt (s)",
            warm_shell_gw,
            warm_shell_host,
            warm_shell_gw / warm_shell_host,
            "",
        ),
        ("gateway: scp 200 MB up (MB/s)", mb / up_gw, mb / up_host, up_host / up_gw, ">= 0.5x"),
        (
            "gateway: scp 200 MB down (MB/s)",
            mb / down_gw,
            mb / down_host,
            down_host / down_gw,
            ">= 0.5x",
        ),
        ("hostd-login: warm first output (s)", warm_login, warm_host, warm_login / warm_host, ""),
        ("hostd-login: scp 200 MB up (MB/s)", mb / up_login, mb / up_host, up_host / up_login, ""),
        (
            "hostd-login: scp 200 MB down (MB/s)",
            mb / down_login,
            mb / down_host,
            down_host / down_login,
            "",
        ),
    ]
    print(f"\n{'metric':38} {'hostd':>10} {'OpenSSH':>10} {'ratio':>8}  goal")
    for label, a, c, ratio, goal in rows:
        print(f"{label:38} {a:10.3f} {c:10.3f} {ratio:7.2f}x  {goal}")
    # OpenSSH has no container to start: nothing to compare with
    print(f"{'gateway: cold login to a shell (s)':38} {cold:10.3f} {'-':>10} {'-':>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument(
        "--state-dir",
        type=Path,
        help="reuse a state dir holding a default image (not one a running hostd uses)",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hostd-bench-ssh-"))
    try:
        with state_with_default_image(args.state_dir) as state, Bench(work, state) as b:
            measure(b, args.runs, work)
    finally:
        fsutil.remove_tree(work)


if __name__ == "__main__":
    main()
