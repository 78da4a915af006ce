"""`hostctl`: the admin's tool. Talks to hostd's admin socket; `doctor` works without it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hostd import config as config_mod
from hostd import doctor
from hostd.client import call
from hostd.errors import HostdError
from hostd.units import format_size, human_size
from runtime.cli import add_image_commands, print_recipes, print_table
from runtime.errors import RuntimeFailure
from runtime.ids import RANGE_SIZE
from runtime.ttyexec import relay

LIMIT_FLAGS = ("cpus", "memory", "pids", "disk")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hostctl", description=__doc__)
    p.add_argument("--config", type=Path, default=config_mod.MAIN)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True)

    def limits(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cpus", help="hard cap in CPUs, e.g. 1.5")
        sp.add_argument("--memory", help="e.g. 2G ('none' lifts the limit)")
        sp.add_argument("--pids", help="most tasks at once, e.g. 2000")
        sp.add_argument("--disk", help="e.g. 20G")

    add_image_commands(
        sub.add_parser("image", help="system-container images").add_subparsers(
            dest="sub", required=True
        )
    )

    user = sub.add_parser("user", help="tenants").add_subparsers(dest="sub", required=True)
    a = user.add_parser("add", help="make a Unix user a tenant")
    a.add_argument("user")
    a.add_argument("--image")
    limits(a)
    user.add_parser("list")
    s = user.add_parser("show")
    s.add_argument("user")
    rb = user.add_parser("rebase", help="move a tenant to the current version of an image")
    rb.add_argument("user")
    rb.add_argument("image", nargs="?", help="default: the tenant's own image")
    rb.add_argument("--restart", action="store_true", help="stop and start it if running")
    rm = user.add_parser("remove")
    rm.add_argument("user")
    rm.add_argument("--keep-data", action="store_true", help="keep the container and its IDs")

    quota = sub.add_parser("quota", help="limits").add_subparsers(dest="sub", required=True)
    q = quota.add_parser("set")
    q.add_argument("user")
    limits(q)

    ports = sub.add_parser("ports", help="host ports forwarded to tenants").add_subparsers(
        dest="sub", required=True
    )
    for verb in ("grant", "revoke"):
        pg = ports.add_parser(verb, help=f"{verb} host ports (PORT or FIRST-LAST)")
        pg.add_argument("user")
        pg.add_argument("ports")
    ports.add_parser("list")

    ranges = sub.add_parser("ranges", help="subordinate ID ranges: whose, and quarantined ones")
    ranges_sub = ranges.add_subparsers(dest="sub")  # none: list
    ranges_sub.add_parser("list", help="every recorded range (the default)")
    rel = ranges_sub.add_parser("release", help="let a quarantined range be handed out again")
    rel.add_argument("start", type=int, help="first ID of the range (see `hostctl ranges`)")

    for verb in ("start", "stop", "restart"):
        sub.add_parser(verb, help=f"{verb} a tenant's container").add_argument("user")
    st = sub.add_parser("status", help="state and usage against quota")
    st.add_argument("user", nargs="?")
    e = sub.add_parser("exec", help="run a command in a tenant's container")
    e.add_argument("user")
    e.add_argument("--user", dest="as_user", default="root", help="account inside (root)")
    e.add_argument("-t", "--tty", action="store_true")
    e.add_argument("command", nargs="*", help="after `--`")
    lg = sub.add_parser("logs", help="the container's journal")
    lg.add_argument("user")
    lg.add_argument("-n", "--lines", type=int, default=100)
    lg.add_argument("-f", "--follow", action="store_true")
    sub.add_parser("doctor", help="check the host")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in words:  # everything after `--` is the command to exec, options included
        cut = words.index("--")
        words, command = words[:cut], words[cut + 1 :]
    args = _parser().parse_args(words)
    if args.cmd == "exec":
        args.command = [*args.command, *command]
    try:
        return _run(args)
    except RuntimeFailure as exc:
        print(f"hostctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "doctor":
        cfg = config_mod.load(args.config)
        checks = doctor.run(cfg)
        print_table(
            args.json,
            [c._asdict() for c in checks],
            ("CHECK", "STATUS", "DETAIL"),
            [(c.name, "ok" if c.ok else "FIX", c.detail) for c in checks],
        )
        return 0 if all(c.ok for c in checks) else 1
    sock = config_mod.load(args.config).paths.admin_socket

    def progress(msg: str) -> None:
        if not args.json:
            print(f"... {msg}", file=sys.stderr, flush=True)

    def rpc(op: str, **kw: Any) -> Any:
        return call(sock, op, kw, progress=progress)

    if args.cmd == "image":
        if args.sub == "build" and args.name is None:
            print_recipes(args.json, rpc("image.recipes"))
        elif args.sub == "build":
            m = rpc("image.build", name=args.name, recipe=args.recipe)
            _print(args, m, f"built {m['name']}@{m['version']} ({format_size(m['size'])})")
        elif args.sub == "import":
            with open(args.tarball, "rb") as f:
                request = {"name": args.name, "filename": str(args.tarball.resolve())}
                m = call(sock, "image.import", request, [f.fileno()], progress)
            _print(args, m, f"imported {m['name']}@{m['version']} ({format_size(m['size'])})")
        elif args.sub == "list":
            ms = rpc("image.list")
            print_table(
                args.json,
                ms,
                ("NAME", "VERSION", "SIZE", "PACKAGES", "CREATED"),
                [
                    (
                        m["name"],
                        m["version"],
                        format_size(m["size"]),
                        str(len(m["packages"])),
                        m["created"],
                    )
                    for m in ms
                ],
            )
        else:
            _print(args, rpc("image.remove", name=args.name), f"removed image {args.name}")
    elif args.cmd == "user":
        if args.sub == "add":
            t = rpc("user.add", user=args.user, image=args.image, **_limits(args))
            _print(
                args,
                t,
                f"added {t['user']}: IDs {t['range_start']}-"
                f"{t['range_start'] + 65535}, image {t['image']}",
            )
        elif args.sub == "list":
            _status_table(args, rpc("user.list"))
        elif args.sub == "show":
            info = rpc("user.show", user=args.user)
            if args.json:
                _print(args, info, "")
            else:
                _show(info)
        elif args.sub == "rebase":
            _rebased(
                args, rpc("user.rebase", user=args.user, image=args.image, restart=args.restart)
            )
        else:
            rpc("user.remove", user=args.user, keep_data=args.keep_data)
            _print(
                args,
                {"removed": args.user},
                f"removed {args.user}" + (" (data kept)" if args.keep_data else ""),
            )
    elif args.cmd == "quota":
        res = rpc("quota.set", user=args.user, **_limits(args))
        when = ", ".join(f"{k} {v}" for k, v in res["applied"].items())
        _print(args, res, f"quota of {args.user}: {_quota_text(res['quota'])} (applied: {when})")
    elif args.cmd == "ports":
        if args.sub == "list":
            grants = rpc("ports.list")
            rows = [
                (
                    f"{g['first']}-{g['last']}" if g["first"] != g["last"] else str(g["first"]),
                    g["user"],
                    g["address"],
                )
                for g in grants
            ]
            print_table(args.json, grants, ("PORTS", "USER", "ADDRESS"), rows)
        else:
            res = rpc(f"ports.{args.sub}", user=args.user, ports=args.ports)
            verb = "granted to" if res["granted"] else "revoked from"
            _print(args, res, f"ports {res['first']}-{res['last']} {verb} {args.user}")
    elif args.cmd == "ranges":
        if args.sub == "release":
            r = rpc("ranges.release", start=args.start)
            ids = f"{r['start']}-{r['start'] + RANGE_SIZE - 1}"
            _print(
                args,
                r,
                f"released IDs {ids} (formerly {r['user']}'s, quarantined since "
                f"{r['since']}): new tenants may get them",
            )
        else:
            rs = rpc("ranges.list")
            print_table(
                args.json,
                rs,
                ("START", "COUNT", "USER", "STATUS", "SINCE"),
                [
                    (str(r["start"]), str(RANGE_SIZE), r["user"], r["status"], r["since"])
                    for r in rs
                ],
            )
    elif args.cmd in ("start", "stop", "restart"):
        _print(args, rpc(args.cmd, user=args.user), f"{args.cmd}: {args.user} done")
    elif args.cmd == "status":
        _status_table(args, rpc("status", user=args.user))
    elif args.cmd == "exec":
        return _exec(sock, args.user, args.command, args.as_user, args.tty, progress)
    elif args.cmd == "logs":
        cmd = ["journalctl", "--no-pager", "-n", str(args.lines)] + (["-f"] if args.follow else [])
        return _exec(sock, args.user, cmd, "root", False, progress)
    return 0


def _exec(sock: Path, user: str, command: list[str], as_user: str, tty: bool, progress: Any) -> int:
    if not command:
        raise HostdError("no command given", "add one after `--`")
    args: dict[str, Any] = {"user": user, "argv": command, "as_user": as_user}
    if tty:
        size = shutil.get_terminal_size()
        args.update(
            tty=True, rows=size.lines, cols=size.columns, term=os.environ.get("TERM", "xterm")
        )

        def session(master: int) -> None:
            try:
                relay(master)
            finally:
                os.close(master)

        result = call(sock, "exec", args, progress=progress, on_tty=session)
    else:
        fds = [sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno()]
        result = call(sock, "exec", args, fds, progress)
    return int(result["exit"])


def _rebased(args: argparse.Namespace, r: dict[str, Any]) -> None:
    if r["old"] == r["new"]:
        _print(args, r, f"{r['user']} is already on {r['new']}: nothing to do")
        return
    how = " (restarted)" if r["restarted"] else ""
    pruned = f"; pruned {', '.join(r['pruned'])}" if r["pruned"] else ""
    _print(args, r, f"rebased {r['user']} from {r['old']} to {r['new']}{how}{pruned}")
    if not args.json:
        print(f"hostctl: warning: {r['warning']}", file=sys.stderr)


def _limits(args: argparse.Namespace) -> dict[str, str]:
    return {k: getattr(args, k) for k in LIMIT_FLAGS if getattr(args, k) is not None}


def _quota_text(q: dict[str, Any]) -> str:
    parts = [f"cpus={q['cpus'] if q['cpus'] is not None else 'unlimited'}"]
    for key in ("memory", "disk"):
        parts.append(f"{key}={format_size(q[key]) if q[key] is not None else 'unlimited'}")
    parts.append(f"pids={q['pids'] if q['pids'] is not None else 'unlimited'}")
    return " ".join(parts)


def _used(value: Any, limit: Any, fmt: Any = str) -> str:
    used = "-" if value is None else fmt(value)
    return used if limit is None else f"{used}/{fmt(limit)}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return (
        f"{s // 86400}d{s % 86400 // 3600}h"
        if s >= 86400
        else time.strftime("%H:%M:%S", time.gmtime(s))
    )


def _status_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print_table(
        args.json,
        rows,
        ("USER", "STATE", "UPTIME", "MEMORY", "CPU", "PIDS", "DISK"),
        [
            (
                r["user"],
                r["state"],
                _duration(r["uptime"]),
                _used(r["memory"], r["quota"]["memory"], human_size),
                _used(
                    None if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.1f}s",
                    None if r["quota"]["cpus"] is None else f"{r['quota']['cpus']} cpus",
                ),
                _used(r["pids"], r["quota"]["pids"]),
                _used(r["disk"], r["quota"]["disk"], human_size),
            )
            for r in rows
        ],
    )


def _show(info: dict[str, Any]) -> None:
    fields = [
        ("user", info["user"]),
        ("uid", info["uid"]),
        ("home", info["home"]),
        ("image", info["image"]),
        ("ids", f"{info['range_start']}-{info['range_start'] + 65535}"),
        ("state", info["state"]),
        ("uptime", _duration(info["uptime"])),
        ("quota", _quota_text(info["quota"])),
        ("created", info["created"]),
    ]
    for key, value in fields:
        print(f"{key + ':':9} {value}")
    for at, _, what in info["events"]:
        print(f"{'event:':9} {at} {what}")


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1) if args.json else text)


if __name__ == "__main__":
    sys.exit(main())
