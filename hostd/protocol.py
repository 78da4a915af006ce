"""hostd's socket protocol as data: every operation with its request and reply records, who may
call it and how many file descriptors it takes, and errors that travel as codes.

Messages are JSON lines. A client sends `{"op": NAME, "args": {...}}`; the server answers with
zero or more `{"progress": TEXT}` lines, possibly `{"tty": true}` carrying a pty master, and one
final `{"ok": true, "result": ...}` or `{"ok": false, "error": {"code", "cause", "fix"}}`. The
client raises `ERROR_CODES[code](cause, fix)`: no error is ever parsed back from text.

The login hook imports this module under the system's python3: standard library and
runtime.errors only, and nothing slow to import.
"""

import json
import types
import typing
from typing import Any, NamedTuple, TypeVar

from runtime.errors import ERROR_CODES, Internal, RuntimeFailure

ADMIN = "admin"  # the admin socket: root and members of the admin group
TENANT = "tenant"  # the user socket: a tenant, confined to their own container
T = TypeVar("T")


# -- requests ------------------------------------------------------------------------------


class NoArgs(NamedTuple):
    pass


class UserArgs(NamedTuple):
    user: str


class StatusArgs(NamedTuple):
    user: str | None = None  # None: every tenant (a tenant's own on the user socket)


class ImageArgs(NamedTuple):
    name: str


class ImageBuildArgs(NamedTuple):
    name: str
    recipe: str | None = None


class ImageImportArgs(NamedTuple):
    name: str  # the tarball comes as the one file descriptor
    filename: str | None = None  # where it came from, for the manifest


# Limits as admins write them ("1.5", "2G", "none" lifts one); None leaves one as it is.
LIMITS = ("cpus", "memory", "pids", "disk")


class UserAddArgs(NamedTuple):
    user: str
    image: str | None = None
    cpus: str | None = None
    memory: str | None = None
    pids: str | None = None
    disk: str | None = None


class QuotaSetArgs(NamedTuple):
    user: str
    cpus: str | None = None
    memory: str | None = None
    pids: str | None = None
    disk: str | None = None


class UserSetArgs(NamedTuple):
    """A tenant's settings; None leaves one as it is."""

    user: str
    auto_stop: str | None = None  # "3d", "off", or "default" ([sessions] auto_stop)


class UserRemoveArgs(NamedTuple):
    user: str
    keep_data: bool = False


class UserRebaseArgs(NamedTuple):
    user: str
    image: str | None = None  # None: the tenant's own image
    restart: bool = False


class UserExportArgs(NamedTuple):
    """The archive goes to the first file descriptor; a parent archive (or its manifest copy)
    for an incremental comes as the second."""

    user: str
    with_home: bool = False
    since: str | None = None  # the parent's file name, for messages


class UserImportArgs(NamedTuple):
    """The archives come as file descriptors, in order: a full one, then its incrementals."""

    files: list[str]  # their names, for messages
    as_user: str | None = None  # None: the user named in the archive
    range: str = "auto"  # auto: a new ID range here (files shifted); keep: the archive's
    with_home: bool = False
    start: bool = True  # start it if it was running when exported


class PortsArgs(NamedTuple):
    user: str
    ports: str  # PORT or FIRST-LAST


class RangeArgs(NamedTuple):
    start: int


class TransferArgs(NamedTuple):
    id: str  # an archive id (32 hex digits), staged on this host by `hostctl user move`


class ReceiveArgs(NamedTuple):
    """More of a staged archive: the bytes from `offset` come as the one file descriptor."""

    id: str
    offset: int  # bytes already staged (`transfer.offset`)
    size: int  # the whole archive's


class TransferImportArgs(NamedTuple):
    """A chain staged on this host by `hostctl user move`: a full archive, its incrementals."""

    ids: list[str]
    as_user: str | None = None  # None: the user named in the archives
    range: str = "auto"
    start: bool = False  # start it once imported (it ran on the source until the move)
    with_home: bool = False  # extract the home the last archive holds (never over files)


class ExecArgs(NamedTuple):
    """A command inside: on the caller's stdio (3 fds), or on a pty sent back (`tty`)."""

    argv: list[str]
    user: str = ""  # the tenant (the caller, on the user socket)
    as_user: str = "root"  # the account inside (the caller's own, on the user socket)
    login: bool = False  # a login: the account check applies
    tty: bool = False
    rows: int = 24
    cols: int = 80
    term: str = ""
    env: dict[str, str] | None = None  # the client's; hostd keeps few (sessions.client_env)


class BackupRunArgs(NamedTuple):
    users: list[str] | None = None  # None: every tenant
    full: bool = False  # a full archive even where an incremental would do


class BackupListArgs(NamedTuple):
    user: str | None = None  # None: every user with backups


class BackupRestoreArgs(NamedTuple):
    user: str  # whose backups (hostd finds and opens the files itself)
    at: str | None = None  # the last backup at or before this time; None: the latest
    as_user: str | None = None  # restore as another user
    range: str = "auto"  # "keep": the range recorded in the archive
    with_home: bool = False
    start: bool = True


# -- replies -------------------------------------------------------------------------------


class Pong(NamedTuple):
    pid: int


class RecipeInfo(NamedTuple):
    recipe: str
    alias_of: str | None
    description: str
    suite: str
    built: str | None  # the version of the image of that name, if built


class ImageInfo(NamedTuple):
    name: str
    version: str
    created: str
    source: str
    size: int
    packages: list[str]


class Quota(NamedTuple):
    cpus: float | None
    memory: int | None
    pids: int | None
    disk: int | None


class TenantInfo(NamedTuple):
    user: str
    uid: int
    gid: int
    home: str
    range_start: int
    range_end: int
    image: str
    phase: str
    desired: str
    created: str


class Status(NamedTuple):
    user: str
    state: str
    uptime: float | None  # seconds, to 0.1
    memory: int | None
    cpu_seconds: float | None  # to 0.01
    pids: int | None
    disk: int | None  # None: not known (a stopped volume that does not record it)
    quota: Quota
    range_start: int
    range_end: int
    image: str
    reason: str | None = None  # why its last start failed (state "failed")
    place: int | None = None  # in the start queue (state "queued"), from 1


class PortRange(NamedTuple):
    first: int
    last: int


class Event(NamedTuple):
    at: str
    what: str


class UserDetails(NamedTuple):
    tenant: TenantInfo
    status: Status
    address: str
    ports: list[PortRange]
    image_version: str  # the image directory it runs, e.g. default@20261130T101010-a1b2c3
    events: list[Event]
    auto_stop: str = ""  # "3d", "off", or the default's: "off (default)"


class UserSettings(NamedTuple):
    user: str
    auto_stop: str


class Done(NamedTuple):
    """An operation on a tenant or an image that has nothing else to say."""

    name: str
    done: str  # what: removed, start, stop, restart


class Rebased(NamedTuple):
    user: str
    image: str
    old: str
    new: str
    restarted: bool
    warning: str | None
    pruned: list[str]


class Exported(NamedTuple):
    user: str
    id: str
    kind: str  # full | incremental
    parent: str | None
    size: int | None  # bytes written; None: not a regular file (a pipe)
    chunks: int  # volume chunks in this archive
    volume_chunks: int  # data chunks of the volume
    home_pieces: int
    consistency: str  # frozen | stopped
    frozen: float | None  # seconds the container was frozen
    seconds: float
    warning: str | None = None  # files of the home tar could not read


class Imported(NamedTuple):
    user: str
    range_start: int
    range_end: int
    shifted: bool  # its files moved from the archive's ID range to this one
    image: str
    image_version: str
    archives: int
    chunks: int
    home_skipped: int | None  # files of the home archive already there, left as they were
    started: bool
    warning: str | None  # what the user should know (their old system files set aside...)
    seconds: float


class QuotaSet(NamedTuple):
    quota: Quota
    applied: dict[str, str]  # limit -> "now", "at next start" (or the runtime's words)


class PortsChanged(NamedTuple):
    user: str
    first: int
    last: int
    granted: bool


class PortGrant(NamedTuple):
    first: int
    last: int
    user: str
    address: str


class RangeInfo(NamedTuple):
    start: int
    end: int
    user: str
    status: str  # active | kept | quarantined
    since: str


class Staged(NamedTuple):
    id: str
    size: int  # bytes of it staged on this host


class Verified(NamedTuple):
    """A staged archive read through, every checksum right."""

    id: str
    user: str
    kind: str  # full | incremental
    parent: str | None


class BackupInfo(NamedTuple):
    user: str
    name: str  # <UTC time>-<full|incr>.hostd in <dir>/<user>/
    kind: str  # full | incremental
    size: int
    created: str  # ISO 8601, UTC
    chain: str  # the name of the chain's full archive ("": none, so it cannot be restored)


class BackupResult(NamedTuple):
    """One tenant's part of a run: the archive written (None: it failed, see error)."""

    user: str
    archive: BackupInfo | None
    error: str | None
    removed: list[str]  # what retention deleted after it


class Exited(NamedTuple):
    exit: int


# -- operations ----------------------------------------------------------------------------


class Op(NamedTuple):
    name: str
    request: type[Any]
    reply: Any  # a reply record, or list[...] of one
    callers: frozenset[str] = frozenset({ADMIN})
    fds: int = 0  # file descriptors it takes at most


_BOTH = frozenset({ADMIN, TENANT})
IMPORT_FDS = 16  # archives of one chain: a full one and up to 15 incrementals
OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("ping", NoArgs, Pong),
        Op("image.recipes", NoArgs, list[RecipeInfo]),
        Op("image.build", ImageBuildArgs, ImageInfo),
        Op("image.import", ImageImportArgs, ImageInfo, fds=1),
        Op("image.list", NoArgs, list[ImageInfo]),
        Op("image.remove", ImageArgs, Done),
        Op("user.add", UserAddArgs, TenantInfo),
        Op("user.list", NoArgs, list[Status]),
        Op("user.show", UserArgs, UserDetails),
        Op("user.set", UserSetArgs, UserSettings),
        Op("user.remove", UserRemoveArgs, Done),
        Op("user.rebase", UserRebaseArgs, Rebased),
        Op("user.export", UserExportArgs, Exported, fds=2),
        Op("user.import", UserImportArgs, Imported, fds=IMPORT_FDS),
        Op("quota.set", QuotaSetArgs, QuotaSet),
        Op("start", UserArgs, Done, _BOTH),
        Op("stop", UserArgs, Done),
        Op("restart", UserArgs, Done),
        Op("status", StatusArgs, list[Status], _BOTH),
        Op("ports.grant", PortsArgs, PortsChanged),
        Op("ports.revoke", PortsArgs, PortsChanged),
        Op("ports.list", NoArgs, list[PortGrant]),
        Op("ranges.list", NoArgs, list[RangeInfo]),
        Op("ranges.release", RangeArgs, RangeInfo),
        Op("transfer.offset", TransferArgs, Staged),
        Op("transfer.receive", ReceiveArgs, Staged, fds=1),
        Op("transfer.verify", TransferArgs, Verified),
        Op("transfer.import", TransferImportArgs, Imported),
        Op("transfer.discard", TransferArgs, Done),
        Op("backup.run", BackupRunArgs, list[BackupResult]),
        Op("backup.list", BackupListArgs, list[BackupInfo]),
        Op("backup.restore", BackupRestoreArgs, Imported),
        Op("exec", ExecArgs, Exited, _BOTH, fds=3),  # the caller's stdio; none for a pty
    )
}
MAX_FDS = max(op.fds for op in OPS.values())


def max_fds(caller: str) -> int:
    """The most file descriptors any op this caller may use takes: a door's cap (tenants need
    only exec's stdio, admins an archive chain)."""
    return max(op.fds for op in OPS.values() if caller in op.callers)


MAX_REPLY = 1 << 20  # a reply line a client accepts (a status of every tenant fits)


def op_named(name: object) -> Op:
    if not isinstance(name, str) or name not in OPS:
        raise RuntimeFailure(f"unknown operation {str(name)[:64]!r}", "see `hostctl --help`")
    return OPS[name]


def check_fds(op: Op, count: int) -> None:
    """Refuse file descriptors the operation does not take (the caller closes them)."""
    if count > op.fds:
        raise RuntimeFailure(
            f"{op.name} takes at most {op.fds} file descriptors, got {count}",
            "send only the ones hostctl sends",
        )


# -- encoding ------------------------------------------------------------------------------


def encode_request(op: str, args: object = None) -> bytes:
    """A request line; `args` is the op's request record (checked as the server would)."""
    spec = op_named(op)
    data = to_json(args) if args is not None else {}
    decode(spec.request, data)  # a mistake is ours: say so before hostd does
    return _line({"op": op, "args": data})


def decode_request(line: bytes) -> tuple[Op, Any]:
    """The operation and its request dataclass; RuntimeFailure (invalid) naming what is wrong."""
    try:
        message = json.loads(line)
    except RecursionError:  # deeply nested JSON: the decoder gives up, so do we
        raise _bad("request nested too deeply") from None
    except ValueError as exc:
        raise _bad(f"not JSON ({exc})") from None
    if not isinstance(message, dict) or set(message) - {"op", "args"}:
        raise _bad('a request is {"op": NAME, "args": {...}}')
    op = op_named(message.get("op"))
    return op, decode(op.request, message.get("args", {}))


def ok_line(result: object) -> bytes:
    return _line({"ok": True, "result": to_json(result)})


def progress_line(text: str) -> bytes:
    return _line({"progress": text})


TTY_LINE = b'{"tty": true}\n'  # sent with the pty master of an exec


def error_line(exc: RuntimeFailure) -> bytes:
    error = {"code": exc.code, "cause": exc.cause, "fix": exc.fix}
    return _line({"ok": False, "error": error})


def error_of(data: object) -> RuntimeFailure:
    """The exception an error reply stands for (Internal if it is not one)."""
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), str) for k in ("code", "cause", "fix")
    ):
        return Internal(f"hostd sent a malformed error: {str(data)[:200]}", "see hostd's log")
    return ERROR_CODES.get(data["code"], Internal)(data["cause"], data["fix"])


def decode_reply(op: str, data: object) -> Any:
    """A result as the op's reply type; Internal if hostd answered something else."""
    kind = OPS[op].reply
    try:
        if typing.get_origin(kind) is list:
            return _convert(data, kind, "result")
        return decode(kind, data)
    except RuntimeFailure as exc:
        raise Internal(
            f"hostd's reply to {op} does not fit this client ({exc.cause})",
            "install hostd and hostctl from the same version",
        ) from None


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _bad(what: str) -> RuntimeFailure:
    return RuntimeFailure(f"bad request: {what}", "see `hostctl --help`")


def to_json(value: object) -> Any:
    """Records (NamedTuples), lists and dicts of them as JSON data."""
    if _is_record(type(value)):
        return {k: to_json(v) for k, v in value._asdict().items()}  # type: ignore[attr-defined]
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def _is_record(kind: object) -> bool:
    return isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields")


def decode(kind: type[T], data: object, where: str = "") -> T:
    """`data` (from JSON) as the record `kind`, checking every field's name and type."""
    if not isinstance(data, dict):
        raise _bad(f"{_field(where.rstrip('.'))} must be an object")
    hints = _hints(kind)
    unknown = sorted(str(k) for k in data if k not in hints)
    if unknown:
        raise _bad(f"unknown {_field(where + unknown[0][:64])}")
    values = {}
    defaults = kind._field_defaults  # type: ignore[attr-defined]
    for key in kind._fields:  # type: ignore[attr-defined]
        if key in data:
            values[key] = _convert(data[key], hints[key], where + key)
        elif key not in defaults:
            raise _bad(f"{_field(where + key)} is missing")
    return kind(**values)


def _field(name: str) -> str:
    return f"field {name!r}" if name else "the arguments"


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(kind: type[Any]) -> dict[str, Any]:
    if kind not in _HINTS:
        _HINTS[kind] = typing.get_type_hints(kind)
    return _HINTS[kind]


_SCALARS: dict[Any, tuple[tuple[type, ...], str]] = {
    str: ((str,), "a string"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    bool: ((bool,), "true or false"),
}


def _convert(value: object, kind: Any, name: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = (a for a in args if a is not type(None))
        return _convert(value, kind, name)
    if kind in _SCALARS:
        types_, what = _SCALARS[kind]
        if not isinstance(value, types_) or (kind is not bool and isinstance(value, bool)):
            raise _bad(f"{_field(name)} must be {what}")
        return float(value) if kind is float else value  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise _bad(f"{_field(name)} must be a list")
        return [_convert(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(f"{_field(name)} must be an object")
        return {k: _convert(v, args[1], f"{name}.{k}"[:128]) for k, v in value.items()}
    if _is_record(kind):
        return decode(kind, value, f"{name}.")
    raise TypeError(f"no decoder for {kind!r}")  # a protocol definition the decoder lacks
