"""`hostctl`: the admin's tool. A thin client of hostd's admin socket; `doctor` works without it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from runtime.errors import RuntimeFailure
from runtime.output import add_image_commands

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: --help stays quick
if TYPE_CHECKING:
    from typing import Any

USERS_GROUP = "hostd-users"  # offered by shell completion where a tenant's name goes


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that remembers its options, positionals and subcommands (for shell
    completion), and takes --json wherever it is put."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.options: list[str] = []
        self.positionals: list[str] = []
        self.commands: dict[str, Parser] = {}
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
        )

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options += action.option_strings
        if not action.option_strings:
            self.positionals.append(action.dest)
        return action

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        self.commands = action.choices  # filled as subcommands are added
        return action


class _Version(argparse.Action):
    """--version: the package's, read only when asked for (importlib.metadata is slow)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import version

        print(f"hostctl {version('hostd')}")
        parser.exit()


def _parser() -> Parser:
    p = Parser(prog="hostctl", description=__doc__)
    p.set_defaults(json=False)
    p.add_argument("--config", help="hostd's configuration (/etc/hostd/hostd.toml)")
    p.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True)

    def limits(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cpus", help="hard cap in CPUs, e.g. 1.5")
        sp.add_argument("--memory", help="e.g. 2G ('none' lifts the limit)")
        sp.add_argument("--pids", help="most tasks at once, e.g. 2000")
        sp.add_argument("--disk", help="e.g. 20G")

    def import_options(sp: argparse.ArgumentParser) -> None:
        """What `user import` and `backup restore` share: they import a chain of archives."""
        sp.add_argument("--as", dest="as_user", metavar="USER", help="another user of this host")
        sp.add_argument(
            "--range",
            choices=("auto", "keep"),
            default="auto",
            help="auto: a new ID range from [subids], files shifted (default); keep: the archive's",
        )
        sp.add_argument("--with-home", action="store_true", help="restore the home's files too")
        sp.add_argument("--no-start", action="store_true", help="leave it stopped")

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
    user.add_parser("list", help="every tenant, its state and usage")
    user.add_parser("show", help="one tenant in detail").add_argument("user")
    us = user.add_parser("set", help="change a tenant's settings")
    us.add_argument("user")
    us.add_argument(
        "--auto-stop",
        metavar="WHEN",
        help='stop the container after this long idle: "3d", "12h", "off", or "default"',
    )
    rb = user.add_parser("rebase", help="move a tenant to the current version of an image")
    rb.add_argument("user")
    rb.add_argument("image", nargs="?", help="default: the tenant's own image")
    rb.add_argument("--restart", action="store_true", help="stop and start it if running")
    ex = user.add_parser("export", help="write a tenant (volume, record; home) to an archive")
    ex.add_argument("user")
    ex.add_argument("-o", "--output", default="-", help="the archive (default: stdout)")
    ex.add_argument(
        "--since",
        metavar="PARENT",
        help="incremental: only what changed since archive PARENT (or its .manifest.json)",
    )
    ex.add_argument("--with-home", action="store_true", help="the home directory too")
    ex.add_argument("--force", action="store_true", help="overwrite an existing file")
    im = user.add_parser("import", help="make a tenant from archives of `user export`")
    im.add_argument("files", nargs="+", metavar="FILE", help="a full archive, then incrementals")
    import_options(im)
    rm = user.add_parser("remove", help="remove a tenant and its container")
    rm.add_argument("user")
    rm.add_argument("--keep-data", action="store_true", help="keep the container and its IDs")
    mv = user.add_parser("move", help="move a tenant to another server, over ssh")
    mv.add_argument("user")
    mv.add_argument("target", metavar="ssh://[LOGIN@]HOST[:PORT]")
    mv.add_argument("--as", dest="as_user", metavar="USER", help="its user there (the same)")
    mv.add_argument(
        "--range", choices=("auto", "keep"), default="auto", help="its IDs there (auto: new)"
    )
    mv.add_argument("--keep-source", action="store_true", help="leave it here, stopped")
    mv.add_argument("--with-home", action="store_true", help="the home goes too (after the stop)")
    mv.add_argument(
        "--remote-hostctl", default="hostctl", metavar="CMD", help='there, e.g. "sudo hostctl"'
    )
    mv.add_argument("--ssh", default="ssh", metavar="CMD", help="the ssh client and its options")
    mv.add_argument("--spool", default="/var/tmp", metavar="DIR", help="archives wait here")
    mv.add_argument("--retries", type=int, default=3, help="of a broken transfer (3)")

    quota = sub.add_parser("quota", help="limits").add_subparsers(dest="sub", required=True)
    q = quota.add_parser("set", help="change a tenant's limits")
    q.add_argument("user")
    limits(q)

    ports = sub.add_parser("ports", help="host ports forwarded to tenants").add_subparsers(
        dest="sub", required=True
    )
    for verb in ("grant", "revoke"):
        pg = ports.add_parser(verb, help=f"{verb} host ports (PORT or FIRST-LAST)")
        pg.add_argument("user")
        pg.add_argument("ports")
    ports.add_parser("list", help="every grant")

    ranges = sub.add_parser("ranges", help="subordinate ID ranges: whose, and quarantined ones")
    ranges_sub = ranges.add_subparsers(dest="sub")  # none: list
    ranges_sub.add_parser("list", help="every recorded range (the default)")
    rel = ranges_sub.add_parser("release", help="let a quarantined range be handed out again")
    rel.add_argument("start", type=int, help="first ID of the range (see `hostctl ranges`)")

    transfer = sub.add_parser(
        "transfer", help="archives arriving from `user move` (it runs these over ssh)"
    ).add_subparsers(dest="sub", required=True)
    transfer.add_parser("offset", help="bytes of an archive staged here").add_argument("id")
    tr = transfer.add_parser("receive", help="stage more of an archive, read from stdin")
    tr.add_argument("id")
    tr.add_argument("--offset", type=int, required=True, help="bytes staged already")
    tr.add_argument("--size", type=int, required=True, help="the whole archive's")
    transfer.add_parser("verify", help="check a staged archive, importing nothing").add_argument(
        "id"
    )
    ti = transfer.add_parser("import", help="make a tenant from staged archives (full first)")
    ti.add_argument("ids", nargs="+", metavar="id")
    ti.add_argument("--as", dest="as_user", metavar="USER", help="its user here")
    ti.add_argument("--range", choices=("auto", "keep"), default="auto")
    ti.add_argument("--start", action="store_true", help="start it once imported")
    ti.add_argument("--with-home", action="store_true", help="the home the last archive holds")
    transfer.add_parser("discard", help="remove a staged archive").add_argument("id")
    backup = sub.add_parser("backup", help="backups into [backup] dir of hostd.toml")
    backup_sub = backup.add_subparsers(dest="sub", required=True)
    br = backup_sub.add_parser("run", help="back up tenants now (every one by default)")
    br.add_argument("user", nargs="*", help="only these tenants")
    br.add_argument("--full", action="store_true", help="full archives: start new chains")
    backup_sub.add_parser("list", help="archives, kind, size, time, chain").add_argument(
        "user", nargs="?"
    )
    bs = backup_sub.add_parser("restore", help="make a tenant again from its backups")
    bs.add_argument("user")
    bs.add_argument("--at", metavar="TIME", help="from the last backup at or before TIME (UTC)")
    import_options(bs)

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
    comp = sub.add_parser("completion", help="print a shell completion script")
    comp.add_argument("shell", choices=("bash",))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in words:  # everything after `--` is the command to exec, options included
        cut = words.index("--")
        words, command = words[:cut], words[cut + 1 :]
    parser = _parser()
    args = parser.parse_args(words)
    if args.cmd == "exec":
        args.command = [*args.command, *command]
    if args.cmd == "completion":
        print(completion_bash(parser), end="")
        return 0
    from hostd import ctl  # the protocol and the client: not for --help or usage errors

    try:
        return ctl.run(args)
    except RuntimeFailure as exc:
        print(f"hostctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def completion_bash(parser: Parser) -> str:
    """A bash completion script for the commands and options of `parser`, and tenants'
    names (members of hostd-users) where a user goes."""
    words: list[str] = []
    users: list[str] = []

    def walk(node: Parser, path: str) -> None:
        words.append(f'        ["{path}"]="{" ".join([*node.commands, *node.options])}"')
        if "user" in node.positionals:
            users.append(f'        ["{path}"]=1')
        for name, child in node.commands.items():
            walk(child, f"{path} {name}")

    walk(parser, parser.prog)
    return _BASH.format(
        words="\n".join(words), users="\n".join(users), group=USERS_GROUP, prog=parser.prog
    )


_BASH = """\
# bash completion for {prog}; generated by `{prog} completion bash`
_{prog}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} path={prog} word i candidates
    local -A words=(
{words}
    )
    local -A users=(
{users}
    )
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        [[ $word == -- ]] && return 0
        if [[ -n ${{words["$path $word"]+set}} ]]; then
            path="$path $word"
        fi
    done
    candidates=${{words[$path]}}
    if [[ $cur != -* && -n ${{users[$path]+set}} ]]; then
        candidates+=" $(getent group {group} | cut -d: -f4 | tr , ' ')"
    fi
    mapfile -t COMPREPLY < <(compgen -W "$candidates" -- "$cur")
}}
complete -o bashdefault -o default -F _{prog} {prog}
"""


if __name__ == "__main__":
    sys.exit(main())
