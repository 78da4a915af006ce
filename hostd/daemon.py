"""`hostd`: the daemon. asyncio accepts on the admin and user sockets and reads each request
there (bounded in time, size and fds); bounded pools of threads serve them (runtime calls
block). Containers are not children of hostd: stopping or restarting it leaves them running,
and each start reconciles state with reality in the background, after the sockets are open."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import grp
import logging
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hostd import accounts, configfiles, hostlimits, protocol
from hostd import config as config_mod
from hostd.api import Channel, Peer, close_fds, peer_of
from hostd.apiserver import Door, Refused, Request, Workers, read_request, refuse
from hostd.gateway import Gateway
from hostd.idle import AutoStopper
from hostd.notify import notify, watchdog_interval
from hostd.priority import favour_this_session, favour_this_thread
from hostd.service import PARALLEL_TRANSFERS, QUICK_OPS, TRANSFER_OPS, Service
from hostd.sessions import Sessions
from hostd.startqueue import ordinal
from hostd.state import State
from hostd.tenants import Tenants
from runtime import cgroups, mountinfo
from runtime.containers import Runtime
from runtime.errors import NotFound, RuntimeFailure

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
        runtime = Runtime(cfg.runtime_settings())  # makes the state dir
        for line in hostlimits.raise_settings():  # before any tenant starts
            log.info("%s", line)
        self.state = State(cfg.paths.state_dir / "hostd.db")
        self.runtime = runtime
        self.tenants = Tenants(cfg, self.state, runtime)
        for line in self.tenants.migrate_ranges():  # before any request can allocate a range
            log.info("upgrade: %s", line)
        # one cap and one account check (locked, expired, nologin) for both doors
        self.sessions = Sessions(
            self.tenants, runtime, cfg.sessions, refusal=accounts.account_refusal
        )
        self.auto_stopper = AutoStopper(self.tenants, self.sessions)
        self.service = Service(
            self.tenants, runtime, cfg.users.admin_group, self.sessions, self._after_admin
        )
        self._tenant_uids: frozenset[int] = frozenset()
        self._refresh_tenants()
        api = cfg.api
        users = Workers(api.workers, "workers")
        admins = Workers(api.admin_workers, "admin_workers", queue_when_busy=True)
        # Admins' reads (`status`) in a pool of their own: never queued behind a start storm,
        # and ahead of the tenants' programs for the CPU.
        self._quick = Workers(
            api.admin_workers, "admin_workers", queue_when_busy=True, on_thread=favour_this_thread
        )
        # Exports and imports: a few at once, the others told their place in line.
        self._transfers = Workers(PARALLEL_TRANSFERS, "transfers", queue_when_busy=True)
        self._user = Door("user", False, api.max_connections, api.max_connections_per_user, users)
        self._admin = Door("admin", True, api.max_connections, None, admins)
        self._receiving: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _refresh_tenants(self) -> None:
        """Reload the tenants' UIDs, which the event loop checks callers of the user socket
        against without touching the database. Called (in a worker) after every admin request,
        before its reply, and after reconcile: only these add or remove tenants. So a user
        added by `hostctl user add` passes once the command returns; a removed one may pass
        until then and is refused by the request itself."""
        self._tenant_uids = frozenset(t.uid for t in self.state.tenants())  # one atomic store

    def _after_admin(self) -> None:
        """After each admin request: who is a tenant, and auto-stop settings, may have changed."""
        self._refresh_tenants()
        self.auto_stopper.wake()

    async def run(self) -> None:
        try:
            await self._run()
        finally:  # whatever ended it: the database is closed by us, not by interpreter exit
            self.state.close()

    async def _run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        paths = self.cfg.paths
        admin, user = await asyncio.to_thread(self._listen)
        gateway = None
        if self.cfg.gateway.enabled:
            gateway = Gateway(
                self.tenants, self.cfg.gateway, self.cfg.paths.state_dir / "ssh", self.sessions
            )
            await gateway.start()
        tasks = [
            asyncio.create_task(self._accept(admin, self._admin)),
            asyncio.create_task(self._accept(user, self._user)),
        ]
        interval = watchdog_interval()
        if interval:
            tasks.append(asyncio.create_task(self._watchdog(interval)))
        notify("STATUS=reconciling")
        notify("READY=1")
        log.info(
            "hostd ready: admin socket %s, user socket %s; reconciling",
            paths.admin_socket,
            paths.user_socket,
        )
        # A thread of its own: a tenant slow to start delays no request but its own (per-user
        # locks), and a daemon thread does not hold up hostd's exit.
        threading.Thread(target=self._reconcile, name="reconcile", daemon=True).start()
        # Its own thread too: a stop under a tenant's lock delays nobody else.
        threading.Thread(target=self.auto_stopper.run, name="auto-stop", daemon=True).start()
        await stop.wait()
        notify("STOPPING=1")
        log.info("hostd stopping; containers keep running")
        for task in [*tasks, *self._receiving]:
            task.cancel()
        if gateway is not None:
            await gateway.close()
        for sock, path in ((admin, paths.admin_socket), (user, paths.user_socket)):
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _listen(self) -> tuple[socket.socket, socket.socket]:
        paths = self.cfg.paths
        return (
            listen(paths.admin_socket, 0o660, self.cfg.users.admin_group),
            listen(paths.user_socket, 0o666, None),
        )

    def _reconcile(self) -> None:
        try:
            for name in self.runtime.thaw_leftovers():  # a hostd killed during an export
                log.warning("reconcile: thawed %s, left frozen by an export cut short", name)
            for line in self.tenants.reconcile():
                log.info("reconcile: %s", line)
            for archive_id in self.service.staging.remove_stale():
                log.info("reconcile: removed the incoming archive %s (a day old)", archive_id)
            self._refresh_tenants()
            notify(f"STATUS=serving {len(self.state.tenants())} tenants")
        except RuntimeFailure as exc:  # hostd keeps serving; the log says what to fix
            log.error("reconcile failed: %s", exc)
            notify(f"STATUS=reconcile failed: {exc}")
        except Exception:
            log.exception("reconcile failed")
            notify("STATUS=reconcile failed: see the log")
        finally:
            log.info("reconcile finished")

    async def _accept(self, sock: socket.socket, door: Door) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE, ENOBUFS...: until some connection is closed
                log.warning("accepting on the %s socket failed: %s", door.name, exc)
                await asyncio.sleep(0.1)  # a retry period, not a wait for a condition
                continue
            try:
                self._admit(conn, door)
            except Exception:  # a bug: drop this connection, keep accepting the others
                log.exception("admitting a connection to the %s socket failed", door.name)
                conn.close()

    def _admit(self, conn: socket.socket, door: Door) -> None:
        """Check the caller before spending anything on them: on the user socket, tenants and
        root only; then the connection caps. Runs on the event loop: no blocking call."""
        conn.setblocking(False)
        try:
            peer = peer_of(conn)
        except OSError:
            conn.close()
            return
        if not door.admin and peer.uid != 0 and peer.uid not in self._tenant_uids:
            refuse(
                conn,
                NotFound(
                    f"uid {peer.uid} is not a tenant",
                    "ask an admin to make you one (`hostctl user add YOUR-NAME`)",
                ),
            )
            return
        refusal = door.refusal(peer.uid)
        if refusal is not None:
            refuse(conn, refusal)
            return
        door.enter(peer.uid)
        task = asyncio.create_task(self._receive(conn, peer, door))
        self._receiving.add(task)
        task.add_done_callback(self._receiving.discard)

    async def _receive(self, conn: socket.socket, peer: Peer, door: Door) -> None:
        """Read the request on the loop, then hand it to the door's pool (which then owns the
        connection), or refuse it."""
        api = self.cfg.api
        refusal: RuntimeFailure | None = None
        try:
            request = await asyncio.wait_for(
                read_request(conn, api.max_request, door.max_fds), api.request_timeout
            )
        except TimeoutError:
            request = None
            refusal = RuntimeFailure(
                f"no request within {api.request_timeout:g} s of connecting"
                " ([api] request_timeout)",
                "send it at once",
            )
        except Refused as exc:
            request, refusal = None, exc
        except OSError:  # the client reset the connection
            request = None
        except BaseException:  # cancelled at shutdown
            conn.close()
            door.leave(peer.uid)
            raise
        if request is not None:
            pool = self._pool(door, request.line)
            serve = functools.partial(self._serve, conn, peer, door, request)
            if pool.try_submit(serve, functools.partial(_say_queued, conn, pool)):
                return
            close_fds(request.fds)
            refusal = door.busy()
        if refusal is None:
            conn.close()
        else:
            refuse(conn, refusal)
        door.leave(peer.uid)

    def _pool(self, door: Door, line: bytes) -> Workers:
        """Admins' quick reads and transfers have pools of their own; the rest the door's."""
        if not door.admin:
            return door.pool
        op = _op_name(line)
        if op in QUICK_OPS:
            return self._quick
        return self._transfers if op in TRANSFER_OPS else door.pool

    def _serve(self, conn: socket.socket, peer: Peer, door: Door, request: Request) -> None:
        """Serve one request in a worker of `door`'s pool. Replies are sent blocking, but a
        client that stops reading makes a send fail after [api] request_timeout."""
        try:
            conn.setblocking(True)
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.cfg.api.request_timeout)
            )
            self.service.handle(
                Channel(conn, request.rest), peer, door.admin, request.line, request.fds
            )
        finally:
            conn.close()
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: hostd is exiting
                self._loop.call_soon_threadsafe(door.leave, peer.uid)

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)  # the ping period systemd asked for


def _say_queued(conn: socket.socket, pool: Workers, place: int) -> None:
    """Tell an admin whose request waits for a worker (a start storm, say) that it waits, and
    why. Non-blocking: a fresh connection's buffer takes one line."""
    setting = f"[api] {pool.name}" if pool.name != "transfers" else "exports and imports"
    text = f"waiting for hostd: {ordinal(place)} in line ({setting} = {pool.size} at once)"
    with contextlib.suppress(OSError):
        conn.send(protocol.progress_line(text))


def _op_name(line: bytes) -> str | None:
    """The op a request line asks for, None if it is not a valid request (its handler says
    why)."""
    try:
        return protocol.decode_request(line)[0].name
    except RuntimeFailure:
        return None


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def restore_default_signals() -> None:
    """Signals the launcher ignored (nohup: SIGHUP; `hostd &` in a script: SIGQUIT) stay
    ignored in everything hostd runs, tenants' sessions too: a program whose client vanished
    would not hang up. Back to the defaults before anything starts."""
    for sig in (signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


HALT_WORKERS = 32  # containers halted at once at shutdown (each mostly waits for its init)


def halt_tenants(cfg: config_mod.Config) -> int:
    """Halt every running container cleanly (their systemd gets SIGRTMIN+3 and `stop_timeout`
    to stop dockerd), all at once; hostd-tenants.service's ExecStop at host shutdown, when
    hostd itself has stopped. Desired states stay as they are: hostd's next start brings the
    tenants back. Exit status 1 if any could not be halted."""
    runtime = Runtime(cfg.runtime_settings())
    names = [s.container.name for s in runtime.states() if s.status != "stopped"]

    def halt(name: str) -> bool:
        try:
            runtime.stop(name, cfg.runtime.stop_timeout)
        except RuntimeFailure as exc:
            log.error("%s: cannot halt it: %s", name, exc)
            return False
        log.info("%s: halted", name)
        return True

    log.info("halting %d container(s)", len(names))
    if not names:
        return 0
    with ThreadPoolExecutor(min(len(names), HALT_WORKERS), "hostd-halt") as pool:
        return 0 if all(pool.map(halt, names)) else 1


def hold_tenants() -> int:
    """hostd-tenants.service's process: its cgroup, the tenants' parent, lives as long as the
    unit has a process (systemd removes an exited unit's cgroup). It moves to a leaf of its own
    (v2), tells systemd it is ready, then waits for the unit's stop."""
    layout = cgroups.detect(mountinfo.current())
    with open("/proc/self/cgroup") as f:
        own = cgroups.unified_path(f.read())
    leaf = cgroups.hold(layout, own, os.getpid())
    log.info("holding the tenants' cgroup %s%s", own, f" from {leaf}" if leaf else "")
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    notify("READY=1")
    signal.sigwait(stops)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    restore_default_signals()
    p = argparse.ArgumentParser(prog="hostd", description=__doc__)
    p.add_argument("--config", type=Path, default=configfiles.MAIN)
    p.add_argument("--debug", action="store_true")
    p.add_argument(
        "--halt-tenants",
        action="store_true",
        help="halt every running tenant cleanly and exit (for host shutdown; hostd not running)",
    )
    p.add_argument(
        "--hold-tenants",
        action="store_true",
        help="hold the cgroup of the tenants until SIGTERM (hostd-tenants.service's process)",
    )
    args = p.parse_args(argv)
    setup_logging(args.debug)
    try:
        if os.geteuid() != 0:
            raise RuntimeFailure("hostd must run as root", "start it with systemctl or sudo")
        if args.halt_tenants:
            return halt_tenants(config_mod.load(args.config))
        if args.hold_tenants:
            return hold_tenants()
        daemon = Daemon(config_mod.load(args.config))
        favour_this_session()
        favour_this_thread()  # the event loop's: it reads every request
        asyncio.run(daemon.run())
    except RuntimeFailure as exc:
        log.error("%s", exc)
        notify(f"STATUS=failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
