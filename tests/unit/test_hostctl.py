"""hostctl against a fake hostd on a temporary unix socket: parsing (--json anywhere, usage
errors), output (aligned tables, `user show`, JSON as hostd sent it), --version, shell
completion, errors as one line with exit 1, and what it loads."""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from hostd import hostctl
from hostd import protocol as p
from hostd.hostctl import main
from runtime.errors import NotFound, RuntimeFailure

QUOTA = p.Quota(1.5, 2 << 30, 100, None)
STATUS = [
    p.Status("alice", "running", 3725.3, 50 << 20, 12.25, 31, 1 << 30, QUOTA, 300000, 365535, "d"),
    p.Status(
        "bo", "stopped", None, None, None, None, None, p.Quota(None, None, None, 4 << 30), 0, 1, "d"
    ),
    p.Status("cy", "queued", None, None, None, None, 0, QUOTA, 2, 3, "d", place=3),
]
TENANT = p.TenantInfo(
    "alice", 1001, 1001, "/home/alice", 300000, 365535, "default", "ready", "running", "then"
)
REPLIES: dict[str, object] = {
    "status": STATUS,
    "user.list": STATUS,
    "user.add": TENANT,
    "user.show": p.UserDetails(
        TENANT,
        STATUS[0],
        "10.231.64.2",
        [p.PortRange(8080, 8080), p.PortRange(20000, 20009)],
        "default@20261130T101010-a1b2c3",
        [p.Event("2026-11-30T10:00:00Z", "added")],
        "14d (default)",
    ),
    "user.set": p.UserSettings("alice", "3d"),
    "ports.list": [
        p.PortGrant(8080, 8080, "alice", "10.231.64.2"),
        p.PortGrant(20000, 20009, "bo", "10.231.64.3"),
    ],
    "ranges.list": [p.RangeInfo(300000, 365535, "alice", "active", "then")],
    "image.list": [p.ImageInfo("default", "default@1", "then", "recipe", 748100 << 10, ["a 1"])],
    "start": p.Done("alice", "start"),
    "exec": p.Exited(5),
    "user.export": p.Exported(
        "alice", "a" * 32, "full", None, 7, 3, 40, 0, "frozen", 2.1, 12.3, None
    ),
    "user.import": p.Imported(
        "alice", 400000, 465535, True, "default", "default@2", 2, 40, 3, True, "set aside", 9.9
    ),
}


@dataclass
class FakeHostd:
    """Answers each request with REPLIES[op] (or `errors[op]`), after one progress line."""

    path: Path
    requests: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, RuntimeFailure] = field(default_factory=dict)
    fd_counts: list[int] = field(default_factory=list)

    def serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        data, fds = b"", list[int]()
        while not data.endswith(b"\n"):
            chunk, got, _, _ = socket.recv_fds(conn, 65536, 3)
            data, fds = data + chunk, fds + got
        request = json.loads(data)
        self.requests.append(request)
        op = request["op"]
        if op == "exec" and fds:
            os.write(fds[1], b"out of the container\n")
        if op == "user.export" and op not in self.errors:
            os.write(fds[0], b"ARCHIVE")
        self.fd_counts.append(len(fds))
        for fd in fds:
            os.close(fd)
        conn.sendall(p.progress_line(f"doing {op}"))
        if op in self.errors:
            conn.sendall(p.error_line(self.errors[op]))
        else:
            conn.sendall(p.ok_line(REPLIES[op]))


@pytest.fixture
def hostd(tmp_path: Path) -> Iterator[FakeHostd]:
    fake = FakeHostd(tmp_path / "admin.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(fake.path))
    listener.listen(8)
    thread = threading.Thread(target=fake.serve, args=(listener,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


@pytest.fixture
def config(tmp_path: Path, hostd: FakeHostd) -> str:
    cfg = tmp_path / "hostd.toml"
    cfg.write_text(f'[paths]\nadmin_socket = "{hostd.path}"\n')
    return str(cfg)


def run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def _columns_aligned(text: str) -> None:
    """Every row's cells start where the header's words do."""
    lines = text.splitlines()
    head = lines[0]
    starts = [i for i, c in enumerate(head) if c != " " and (i == 0 or head[i - 1] == " ")]
    for line in lines[1:]:
        for start in starts[1:]:
            assert line[start - 2 : start] == "  " and line[start] != " ", (line, start)


@pytest.mark.parametrize(
    "words",
    [["--json", "user", "list"], ["user", "--json", "list"], ["user", "list", "--json"]],
)
def test_json_anywhere(
    capfd: pytest.CaptureFixture[str], config: str, hostd: FakeHostd, words: list[str]
) -> None:
    code, out, err = run(capfd, "--config", config, *words)
    assert code == 0 and err == ""  # no progress lines with --json
    assert json.loads(out) == p.to_json(STATUS)


def test_json_numbers_are_hostds(capfd: pytest.CaptureFixture[str], config: str) -> None:
    _, out, _ = run(capfd, "--config", config, "status", "--json")
    assert '"uptime": 3725.3' in out and '"cpu_seconds": 12.25' in out


@pytest.mark.parametrize(
    ("words", "head"),
    [
        (["status"], "USER   STATE      UPTIME    MEMORY"),
        (["user", "list"], "USER   STATE"),
        (["ports", "list"], "PORTS        USER   ADDRESS"),
        (["ranges"], "START   END     USER   STATUS  SINCE"),
        (["image", "list"], "NAME     VERSION    SIZE"),
    ],
)
def test_tables_are_aligned(
    capfd: pytest.CaptureFixture[str], config: str, words: list[str], head: str
) -> None:
    code, out, err = run(capfd, "--config", config, *words)
    assert code == 0 and out.startswith(head), out
    _columns_aligned(out)
    assert err.startswith("... doing ")  # progress, on stderr


def test_status_row(capfd: pytest.CaptureFixture[str], config: str) -> None:
    _, out, _ = run(capfd, "--config", config, "status")
    alice, bo, cy = out.splitlines()[1:]
    assert alice.split() == [
        "alice",
        "running",
        "01:02:05",
        "50M/2G",
        "12.2s/1.5",
        "cpus",
        "31/100",
        "1G",
    ]
    assert bo.split() == ["bo", "stopped", "-", "-", "-", "-", "-/4G"]  # disk usage not known
    assert cy.split()[:3] == ["cy", "queued", "#3"]  # its place in the start queue


def test_image_sizes_are_readable(capfd: pytest.CaptureFixture[str], config: str) -> None:
    code, out, _ = run(capfd, "--config", config, "image", "list")
    assert code == 0 and out.splitlines()[1].split()[2] == "730.6M"  # not 748100K


def test_user_set_auto_stop(
    capfd: pytest.CaptureFixture[str], config: str, hostd: FakeHostd
) -> None:
    code, out, _ = run(capfd, "--config", config, "user", "set", "alice", "--auto-stop", "3d")
    assert code == 0 and out == "alice: auto-stop 3d\n"
    assert hostd.requests[-1] == {"op": "user.set", "args": {"user": "alice", "auto_stop": "3d"}}


def test_user_show(capfd: pytest.CaptureFixture[str], config: str, hostd: FakeHostd) -> None:
    code, out, _ = run(capfd, "--config", config, "user", "show", "alice")
    assert code == 0
    assert hostd.requests[-1] == {"op": "user.show", "args": {"user": "alice"}}
    assert out.splitlines() == [
        "user:     alice (uid 1001)",
        "home:     /home/alice",
        "address:  10.231.64.2",
        "ports:    8080, 20000-20009",
        "image:    default (default@20261130T101010-a1b2c3)",
        "ids:      300000-365535",
        "state:    running",
        "uptime:   01:02:05",
        "quota:    cpus=1.5 memory=2G disk=unlimited pids=100",
        "autostop: 14d (default)",
        "created:  then",
        "event:    2026-11-30T10:00:00Z added",
    ]


def test_user_show_of_a_queued_tenant_says_its_place(
    capfd: pytest.CaptureFixture[str], config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    details = REPLIES["user.show"]
    assert isinstance(details, p.UserDetails)
    monkeypatch.setitem(REPLIES, "user.show", details._replace(status=STATUS[2]))
    _, out, _ = run(capfd, "--config", config, "user", "show", "alice")
    assert "state:    queued (3rd in line)" in out.splitlines()


def test_user_add_sends_the_limits_given(
    capfd: pytest.CaptureFixture[str], config: str, hostd: FakeHostd
) -> None:
    code, out, _ = run(capfd, "--config", config, "user", "add", "alice", "--memory", "2G")
    assert (code, out) == (0, "added alice: IDs 300000-365535, image default\n")
    assert hostd.requests[-1] == {
        "op": "user.add",
        "args": {
            "user": "alice",
            "image": None,
            "cpus": None,
            "memory": "2G",
            "pids": None,
            "disk": None,
        },
    }


def test_exec_passes_stdio_and_returns_the_exit_status(
    capfd: pytest.CaptureFixture[str],
    config: str,
    hostd: FakeHostd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        code, out, _ = run(capfd, "--config", config, "exec", "alice", "--", "ls", "--json", "-l")
    assert code == 5 and out == "out of the container\n"
    assert hostd.requests[-1]["args"]["argv"] == ["ls", "--json", "-l"]  # after --: the command


def test_an_error_is_one_line_and_exit_1(
    capfd: pytest.CaptureFixture[str], config: str, hostd: FakeHostd
) -> None:
    hostd.errors["start"] = NotFound("ghost is not a tenant", "add them")
    code, out, err = run(capfd, "--config", config, "start", "ghost")
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == "hostctl: ghost is not a tenant: add them"


def test_hostd_not_running(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "none.toml"
    cfg.write_text(f'[paths]\nadmin_socket = "{tmp_path}/none.sock"\n')
    code, _, err = run(capfd, "--config", str(cfg), "status")
    assert code == 1
    assert err == (
        f"hostctl: hostd is not running (no socket at {tmp_path}/none.sock): "
        "start it: `systemctl start hostd`\n"
    )


@pytest.mark.parametrize(
    "words", [[], ["user"], ["user", "nope"], ["ranges", "release", "x"], ["--bogus", "status"]]
)
def test_usage_errors_exit_2(capfd: pytest.CaptureFixture[str], words: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(words)
    assert info.value.code == 2
    assert "usage: hostctl" in capfd.readouterr().err


def test_version(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capfd.readouterr().out == f"hostctl {version('hostd')}\n"


def _complete(script: Path, line: str, path: str) -> list[str]:
    """What bash offers for `line` (the word being completed is its last, maybe empty)."""
    words = line.split(" ")
    shell = (
        f"source {script}; COMP_WORDS=({' '.join(repr(w) for w in words)}); "
        f"COMP_CWORD={len(words) - 1}; _hostctl; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    env = {**os.environ, "PATH": path}
    res = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, check=True)
    return res.stdout.split()


def test_bash_completion(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, script, _ = run(capfd, "completion", "bash")
    assert code == 0 and "complete -o bashdefault -o default -F _hostctl hostctl" in script
    (tmp_path / "hostctl.bash").write_text(script)
    bin_dir = tmp_path / "bin"  # getent for the members of hostd-users
    bin_dir.mkdir()
    getent = bin_dir / "getent"
    getent.write_text('#!/bin/sh\n[ "$2" = hostd-users ] && echo "hostd-users:x:999:alice,bob"\n')
    getent.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    comp = tmp_path / "hostctl.bash"
    assert _complete(comp, "hostctl us", path) == ["user"]
    assert _complete(comp, "hostctl user ", path) == [
        "add",
        "list",
        "show",
        "set",
        "rebase",
        "export",
        "import",
        "remove",
        "move",
        "-h",
        "--help",
        "--json",
    ]
    assert _complete(comp, "hostctl user add --m", path) == ["--memory"]
    assert _complete(comp, "hostctl user import --r", path) == ["--range"]
    assert _complete(comp, "hostctl user show ", path)[-2:] == ["alice", "bob"]
    assert _complete(comp, "hostctl exec alice -- l", path) == []  # the command: not ours
    assert "--version" in _complete(comp, "hostctl --", path)
    assert _complete(comp, "hostctl --json ranges r", path) == ["release"]


def _loaded(*modules: str) -> set[str]:
    code = f"import sys, json, {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


HEAVY = {
    "pyroute2",
    "asyncssh",
    "runtime.containers",
    "runtime.network",
    "hostd.tenants",
    "hostd.doctor",
}


def test_help_and_usage_load_neither_protocol_nor_configuration() -> None:
    loaded = _loaded("hostd.hostctl")
    assert not loaded & {*HEAVY, "hostd.protocol", "hostd.client", "hostd.config"}


def test_a_request_loads_no_runtime_and_not_the_whole_configuration() -> None:
    # all that `hostctl exec` and every other request (but doctor) import
    loaded = _loaded("hostd.hostctl", "hostd.ctl", "hostd.configfiles")
    assert not loaded & {*HEAVY, "hostd.config", "runtime.netplan", "dataclasses"}


def _suggested_commands() -> list[tuple[str, str]]:
    """Every `hostctl ...` in backquotes in a string of hostd/ (docstrings aside: what a user
    is told to run), with each f-string field and each upper-case placeholder (USER, SIZE) as
    "1", which fits every argument type of the parser."""
    found = set()  # a literal part of an f-string is walked on its own too
    for path in sorted(Path(hostctl.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if id(node) in docstrings or isinstance(node, ast.FormattedValue):
                continue
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "1" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            for command in re.findall(r"`hostctl ([^`]*)`", str(text)):
                found.add((f"{path.name}:{node.lineno}", command))
    return sorted(found)


def test_every_suggested_command_parses(capfd: pytest.CaptureFixture[str]) -> None:
    suggested = _suggested_commands()
    assert len(suggested) > 10  # the walk found the fix texts
    refused = []
    for where, command in suggested:
        words = [re.sub(r"^[A-Z][A-Z-]*$", "1", w) for w in command.split()]
        try:
            whole = hostctl._parser().parse_args(words)
        except SystemExit as exc:  # --help exits 0; a usage error 2
            if exc.code != 0:
                refused.append(f"{where}: `hostctl {command}`")
            continue
        # main builds only the named command's branch: it must read the words the same way
        assert hostctl._parser(hostctl._command(words)).parse_args(words) == whole, command
    capfd.readouterr()
    assert refused == []


@pytest.mark.parametrize(
    ("words", "command"),
    [
        (["start", "alice"], "start"),
        (["--json", "user", "show", "alice"], "user"),
        (["--config", "user", "start", "alice"], "start"),  # a configuration file named user
        (["--config=/etc/x.toml", "exec", "alice", "--", "ls"], "exec"),
        (["completion", "bash"], None),  # the whole tree, to describe it
        (["--help"], None),
        (["bogus"], None),
    ],
)
def test_only_the_named_commands_branch_is_built(words: list[str], command: str | None) -> None:
    assert hostctl._command(words) == command


def test_export_writes_a_new_private_file_opened_by_hostctl(
    capfd: pytest.CaptureFixture[str], hostd: FakeHostd, config: str, tmp_path: Path
) -> None:
    out = tmp_path / "alice.hostd"
    code, stdout, _ = run(capfd, "--config", config, "user", "export", "alice", "-o", str(out))
    assert code == 0 and out.read_bytes() == b"ARCHIVE"
    assert out.stat().st_mode & 0o777 == 0o600
    assert hostd.requests[-1]["args"] == {"user": "alice", "with_home": False, "since": None}
    assert "exported alice (full " in stdout and "frozen for 2.1 s" in stdout
    code, _, err = run(capfd, "--config", config, "user", "export", "alice", "-o", str(out))
    assert code == 1 and f"hostctl: {out} exists: give another file, or --force" in err
    code, _, _ = run(capfd, "--config", config, "user", "export", "bo", "-o", str(out), "--force")
    assert code == 0 and hostd.requests[-1]["args"]["user"] == "bo"


def test_export_since_sends_the_parent_and_a_failure_removes_the_file(
    capfd: pytest.CaptureFixture[str], hostd: FakeHostd, config: str, tmp_path: Path
) -> None:
    parent, out = tmp_path / "full.hostd", tmp_path / "inc.hostd"
    parent.write_bytes(b"parent")
    hostd.errors["user.export"] = RuntimeFailure("chunk 3 went wrong", "try again")
    args = ("--config", config, "user", "export", "alice", "-o", str(out), "--since", str(parent))
    code, _, err = run(capfd, *args)
    assert code == 1 and err.endswith("\nhostctl: chunk 3 went wrong: try again\n")
    assert hostd.fd_counts[-1] == 2 and hostd.requests[-1]["args"]["since"] == str(parent)
    assert not out.exists()
    code, _, err = run(capfd, *args[:-1], str(tmp_path / "missing"))
    assert code == 1 and "cannot read" in err and not out.exists()


def test_import_sends_the_archives_in_order(
    capfd: pytest.CaptureFixture[str], hostd: FakeHostd, config: str, tmp_path: Path
) -> None:
    files = [tmp_path / "full.hostd", tmp_path / "inc.hostd"]
    for f in files:
        f.write_bytes(b"x")
    code, out, err = run(
        capfd,
        "--config",
        config,
        "user",
        "import",
        *map(str, files),
        "--as",
        "bo",
        "--range",
        "keep",
        "--no-start",
    )
    assert code == 0 and hostd.fd_counts[-1] == 2
    assert hostd.requests[-1]["args"] == {
        "files": [str(f) for f in files],
        "as_user": "bo",
        "range": "keep",
        "with_home": False,
        "start": False,
    }
    assert "imported alice: IDs 400000-465535 (files shifted from the archive's range)" in out
    assert "3 existing entries left as they were" in out and "hostctl: warning: set aside" in err
    code, _, err = run(capfd, "--config", config, "user", "import", str(tmp_path / "nope"))
    assert code == 1 and "cannot read" in err
