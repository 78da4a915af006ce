"""`hostd`: the daemon. asyncio accepts on the admin and user sockets; each request is served
in its own thread (runtime calls block). Containers are not children of hostd: stopping or
restarting it leaves them running, and the next start reconciles state with reality."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from hostd import config as config_mod
from hostd import hostlimits
from hostd.api import Channel, peer_of
from hostd.gateway import Gateway
from hostd.notify import notify, watchdog_interval
from hostd.service import Service
from hostd.sessions import Sessions
from hostd.state import State
from hostd.tenants import Tenants
from runtime.containers import Runtime, prepare_state_dir
from runtime.errors import RuntimeFailure

log = logging.getLogger("hostd")


def setup_logging(debug: bool) -> None:
    """journald under systemd (JOURNAL_STREAM is set), stderr otherwise."""
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="hostd")
        except ImportError:
            pass
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def listen(path: Path, mode: int, group: str | None) -> socket.socket:
    """A listening unix socket at `path`, replacing a stale one, with the given access."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            log.warning("group %s does not exist: the admin socket is for root only", group)
            mode &= 0o700
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class Daemon:
    def __init__(self, cfg: config_mod.Config) -> None:
        self.cfg = cfg
        prepare_state_dir(cfg.paths.state_dir)
        for line in hostlimits.raise_settings():  # before any tenant starts
            log.info("%s", line)
        self.state = State(cfg.paths.state_dir / "hostd.db")
        self.tenants = Tenants(cfg, self.state, Runtime(cfg.runtime_settings()))
        for line in self.tenants.migrate_ranges():  # before any request can allocate a range
            log.info("upgrade: %s", line)
        self.sessions = Sessions(self.tenants, cfg.sessions)  # one cap for both doors
        self.service = Service(self.tenants, cfg.users.admin_group, self.sessions)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        notify("STATUS=reconciling")
        for line in await asyncio.to_thread(self.tenants.reconcile):
            log.info("reconcile: %s", line)
        gateway = None
        if self.cfg.gateway.enabled:
            gateway = Gateway(self.tenants, self.cfg.gateway, self.cfg.paths.state_dir / "ssh",
                              self.sessions)  # fmt: skip
            await gateway.start()
        paths = self.cfg.paths
        admin = listen(paths.admin_socket, 0o660, self.cfg.users.admin_group)
        user = listen(paths.user_socket, 0o666, None)
        tasks = [
            asyncio.create_task(self._accept(admin, True)),
            asyncio.create_task(self._accept(user, False)),
        ]
        interval = watchdog_interval()
        if interval:
            tasks.append(asyncio.create_task(self._watchdog(interval)))
        notify("READY=1")
        notify(f"STATUS=serving {len(self.state.tenants())} tenants")
        log.info("hostd ready: admin socket %s, user socket %s", paths.admin_socket,
                 paths.user_socket)  # fmt: skip
        await stop.wait()
        notify("STOPPING=1")
        log.info("hostd stopping; containers keep running")
        for task in tasks:
            task.cancel()
        if gateway is not None:
            await gateway.close()
        for sock, path in ((admin, paths.admin_socket), (user, paths.user_socket)):
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.state.close()

    async def _accept(self, sock: socket.socket, admin: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(True)
            threading.Thread(target=self._serve, args=(conn, admin), daemon=True).start()

    def _serve(self, conn: socket.socket, admin: bool) -> None:
        with conn:
            self.service.handle(Channel(conn), peer_of(conn), admin)

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)  # the ping period systemd asked for


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hostd", description=__doc__)
    p.add_argument("--config", type=Path, default=config_mod.MAIN)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.debug)
    try:
        if os.geteuid() != 0:
            raise RuntimeFailure("hostd must run as root", "start it with systemctl or sudo")
        daemon = Daemon(config_mod.load(args.config))
        asyncio.run(daemon.run())
    except RuntimeFailure as exc:
        log.error("%s", exc)
        notify(f"STATUS=failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
