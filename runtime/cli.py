"""`hostd-runtime`: the runtime library on the command line, for admins and debugging.

(The daemon and `hostctl` manage users; this tool manages bare system containers.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from runtime.containers import Runtime
from runtime.errors import RuntimeFailure
from runtime.execs import ExecSpec
from runtime.ids import IdRange
from runtime.output import add_image_commands, print_json, print_recipes, print_table
from runtime.settings import RootfsMode, Settings
from runtime.ttyexec import relay


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hostd-runtime", description=__doc__)
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/hostd"))
    p.add_argument("--rootfs-mode", default="auto", help="auto (default), idmapped or copy")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True)

    add_image_commands(
        sub.add_parser("image", help="build, import, list, remove images").add_subparsers(
            dest="image_cmd", required=True
        )
    )

    c = sub.add_parser("create", help="create a container")
    c.add_argument("name")
    c.add_argument("--image", default="default")
    c.add_argument("--uid-start", type=int, required=True, help="first host ID of its range")
    s = sub.add_parser("start", help="start a container")
    s.add_argument("name")
    s.add_argument(
        "--wait", action="store_true", help="until systemd is up (Docker starts at its first use)"
    )
    st = sub.add_parser("stop", help="halt a container (systemd shutdown, then kill)")
    st.add_argument("name")
    st.add_argument("--timeout", type=float, default=30.0)
    k = sub.add_parser("kill", help="send a signal to init")
    k.add_argument("name")
    k.add_argument("signal", nargs="?", default="KILL")
    d = sub.add_parser("delete", help="delete a container and all its data")
    d.add_argument("name")
    d.add_argument("--force", action="store_true", help="kill it first if running")
    sub.add_parser("list", help="list containers")
    e = sub.add_parser("exec", help="run a command inside")
    e.add_argument("-t", "--tty", action="store_true")
    e.add_argument("--user", default="0:0", help="UID[:GID] inside")
    e.add_argument("name")
    e.add_argument("command", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="hostd-runtime: %(message)s")
    try:
        mode = RootfsMode.parse(args.rootfs_mode)
        rt = Runtime(Settings(args.state_dir, rootfs_mode=mode))
        return _dispatch(rt, args)
    except RuntimeFailure as exc:
        print(f"hostd-runtime: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(rt: Runtime, args: argparse.Namespace) -> int:
    def progress(msg: str) -> None:
        if not args.json:
            print(f"... {msg}", flush=True)

    if args.cmd == "image":
        if args.image_cmd == "build" and args.name is None:
            print_recipes(args.json, rt.images.recipe_summaries())
        elif args.image_cmd == "build":
            m = rt.images.build(args.name, args.recipe, progress)
            _out(args, asdict(m), f"built {m.name}@{m.version}")
        elif args.image_cmd == "import":
            m = rt.images.import_tarball(args.name, Path(args.tarball), progress)
            _out(args, asdict(m), f"imported {m.name}@{m.version}")
        elif args.image_cmd == "list":
            ms = rt.images.manifests()
            rows = [
                (m.name, m.version, f"{m.size / 2**20:.0f} MiB", str(len(m.packages)), m.created)
                for m in ms
            ]
            print_table(
                args.json,
                [asdict(m) for m in ms],
                ("NAME", "VERSION", "SIZE", "PACKAGES", "CREATED"),
                rows,
            )
        else:
            rt.images.remove(args.name, [Path(c.image_dir) for c in rt.containers()])
            _out(args, {"removed": args.name}, f"removed {args.name}")
    elif args.cmd == "create":
        c = rt.create(args.name, args.image, IdRange(args.uid_start))
        _out(args, json.loads(c.to_json()), f"created {c.name} ({c.rootfs_mode} rootfs)")
    elif args.cmd == "start":
        rt.start(args.name)
        if args.wait:
            progress("waiting for systemd")
            rt.wait_ready(args.name)
        _out(args, {"started": args.name}, f"started {args.name}")
    elif args.cmd == "stop":
        rt.stop(args.name, args.timeout)
        _out(args, {"stopped": args.name}, f"stopped {args.name}")
    elif args.cmd == "kill":
        name = args.signal if args.signal.startswith("SIG") else f"SIG{args.signal}"
        sig = int(args.signal) if args.signal.isdigit() else signal.Signals[name]
        rt.kill(args.name, sig)
    elif args.cmd == "delete":
        rt.delete(args.name, force=args.force)
        _out(args, {"deleted": args.name}, f"deleted {args.name}")
    elif args.cmd == "list":
        states = rt.states()
        lines = [
            (
                s.container.name,
                s.status,
                str(s.pid or "-"),
                s.container.image,
                str(s.container.ids),
                s.container.rootfs_mode.value,
            )
            for s in states
        ]
        data = [
            {**json.loads(s.container.to_json()), "status": s.status, "pid": s.pid} for s in states
        ]
        print_table(args.json, data, ("NAME", "STATUS", "PID", "IMAGE", "IDS", "ROOTFS"), lines)
    elif args.cmd == "exec":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            raise RuntimeFailure("no command given", "add one after `--`")
        if args.tty:
            size = shutil.get_terminal_size()
            term = os.environ.get("TERM", "xterm")
            spec = ExecSpec(command, user=args.user, env=[f"TERM={term}"])
            p = rt.exec_tty(args.name, spec, rows=size.lines, cols=size.columns)
            relay(p.master)
            return p.wait()
        rt.state(args.name)  # a clear error for an unknown container
        argv = rt.exec_argv(args.name, ExecSpec(command, user=args.user))
        os.execvp(argv[0], argv)
    return 0


def _out(args: argparse.Namespace, data: object, text: str) -> None:
    if args.json:
        print_json(data)
    else:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
