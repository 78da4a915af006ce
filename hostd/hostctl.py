"""`hostctl`: the admin's tool. A thin client of hostd's admin socket; `doctor` works without it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

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


def _limits(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--cpus", help="hard cap in CPUs, e.g. 1.5")
    sp.add_argument("--memory", help="e.g. 2G ('none' lifts the limit)")
    sp.add_argument("--pids", help="most tasks at once, e.g. 2000")
    sp.add_argument("--disk", help="e.g. 20G")


def _import_options(sp: argparse.ArgumentParser) -> None:
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


def _image(sp: Parser) -> None:
    add_image_commands(sp.add_subparsers(dest="sub", required=True))


def _user(sp: Parser) -> None:
    user = sp.add_subparsers(dest="sub", required=True)
    a = user.add_parser("add", help="make a Unix user a tenant")
    a.add_argument("user")
    a.add_argument("--image")
    _limits(a)
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
    _import_options(im)
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


def _quota(sp: Parser) -> None:
    q = sp.add_subparsers(dest="sub", required=True).add_parser(
        "set", help="change a tenant's limits"
    )
    q.add_argument("user")
    _limits(q)


def _ports(sp: Parser) -> None:
    ports = sp.add_subparsers(dest="sub", required=True)
    for verb in ("grant", "revoke"):
        pg = ports.add_parser(verb, help=f"{verb} host ports (PORT or FIRST-LAST)")
        pg.add_argument("user")
        pg.add_argument("ports")
    ports.add_parser("list", help="every grant")


def _ranges(sp: Parser) -> None:
    ranges = sp.add_subparsers(dest="sub")  # none: list
    ranges.add_parser("list", help="every recorded range (the default)")
    rel = ranges.add_parser("release", help="let a quarantined range be handed out again")
    rel.add_argument("start", type=int, help="first ID of the range (see `hostctl ranges`)")


def _transfer(sp: Parser) -> None:
    transfer = sp.add_subparsers(dest="sub", required=True)
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


def _backup(sp: Parser) -> None:
    backup = sp.add_subparsers(dest="sub", required=True)
    br = backup.add_parser("run", help="back up tenants now (every one by default)")
    br.add_argument("user", nargs="*", help="only these tenants")
    br.add_argument("--full", action="store_true", help="full archives: start new chains")
    backup.add_parser("list", help="archives, kind, size, time, chain").add_argument(
        "user", nargs="?"
    )
    bs = backup.add_parser("restore", help="make a tenant again from its backups")
    bs.add_argument("user")
    bs.add_argument("--at", metavar="TIME", help="from the last backup at or before TIME (UTC)")
    _import_options(bs)


def _one_user(sp: Parser) -> None:
    sp.add_argument("user")


def _status(sp: Parser) -> None:
    sp.add_argument("user", nargs="?")


def _exec(sp: Parser) -> None:
    sp.add_argument("user")
    sp.add_argument("--user", dest="as_user", default="root", help="account inside (root)")
    sp.add_argument("-t", "--tty", action="store_true")
    sp.add_argument("command", nargs="*", help="after `--`")


def _logs(sp: Parser) -> None:
    sp.add_argument("user")
    sp.add_argument("-n", "--lines", type=int, default=100)
    sp.add_argument("-f", "--follow", action="store_true")


def _nothing(sp: Parser) -> None:
    pass


def _completion(sp: Parser) -> None:
    sp.add_argument("shell", choices=("bash",))


# Every command: its help, and what builds its arguments and subcommands.
COMMANDS: dict[str, tuple[str, Callable[[Parser], None]]] = {
    "image": ("system-container images", _image),
    "user": ("tenants", _user),
    "quota": ("limits", _quota),
    "ports": ("host ports forwarded to tenants", _ports),
    "ranges": ("subordinate ID ranges: whose, and quarantined ones", _ranges),
    "transfer": ("archives arriving from `user move` (it runs these over ssh)", _transfer),
    "backup": ("backups into [backup] dir of hostd.toml", _backup),
    "start": ("start a tenant's container", _one_user),
    "stop": ("stop a tenant's container", _one_user),
    "restart": ("restart a tenant's container", _one_user),
    "status": ("state and usage against quota", _status),
    "exec": ("run a command in a tenant's container", _exec),
    "logs": ("the container's journal", _logs),
    "doctor": ("check the host", _nothing),
    "completion": ("print a shell completion script", _completion),
}


def _parser(command: str | None = None) -> Parser:
    """The command line's parser. With `command`, only that command's arguments and
    subcommands are built, the others named only: what parsing it needs, at a fraction of
    the cost of the whole tree (--help, usage errors and completion get the whole tree)."""
    p = Parser(prog="hostctl", description=__doc__)
    p.set_defaults(json=False)
    p.add_argument("--config", help="hostd's configuration (/etc/hostd/hostd.toml)")
    p.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (text, build) in COMMANDS.items():
        sp = sub.add_parser(name, help=text)
        if command in (None, name):
            build(sp)
    return p


def _command(words: Sequence[str]) -> str | None:
    """The command the words name (the first word that is not an option or --config's
    value), if it is one; None for anything else."""
    after_config = False
    for word in words:
        if after_config:
            after_config = False
        elif word == "--config":
            after_config = True
        elif not word.startswith("-"):
            return word if word in COMMANDS and word != "completion" else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in words:  # everything after `--` is the command to exec, options included
        cut = words.index("--")
        words, command = words[:cut], words[cut + 1 :]
    parser = _parser(_command(words))
    args = parser.parse_args(words)
    if args.cmd == "exec":
        args.command = [*args.command, *command]
    if args.cmd == "completion":  # of the whole tree: _command gave it
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
