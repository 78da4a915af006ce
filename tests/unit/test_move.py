"""`hostctl user move` without hosts: the target URL, the ssh command line, the transfer loop
(resume, retries, giving up with how to resume) against a fake target, the spool (only the
admin's own archives are reused), and the target's staging (hostd.staging) on temp dirs
with real pipes and real archives. No root."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hostd import move
from hostd.errors import HostdError
from hostd.staging import Staging, check_id
from hostd.state import MIGRATIONS
from runtime.errors import Busy, Conflict, NotFound, RuntimeFailure
from tests.unit.test_archive import header, write

ID = "0123456789abcdef" * 2


# -- the target ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "target", "args"),
    [
        ("ssh://host2", move.Target("host2"), ["--", "host2"]),
        ("ssh://admin@host2:2200/", move.Target("host2", "admin", 2200), None),
        ("ssh://[::1]:22", move.Target("::1", None, 22), ["-p", "22", "--", "::1"]),
    ],
)
def test_target_parses(text: str, target: move.Target, args: list[str] | None) -> None:
    assert move.Target.parse(text) == target
    if args is not None:
        assert target.ssh_args() == args
    assert move.Target("h", "a", 2).ssh_args() == ["-l", "a", "-p", "2", "--", "h"]


@pytest.mark.parametrize(
    "text",
    ["host2", "http://host2", "ssh://", "ssh://h:99999", "ssh://a:pw@h", "ssh://h/x", "ssh://@h"],
)
def test_target_refuses_anything_else(text: str) -> None:
    with pytest.raises(HostdError, match="is not ssh://"):
        move.Target.parse(text)


def test_remote_command_is_quoted_once() -> None:
    remote = move.Remote(move.Target("h", port=2), "ssh -i 'my key'", "sudo hostctl")
    argv = remote.argv("transfer", "offset", "a b;c")
    assert argv[:3] == ["ssh", "-i", "my key"]
    assert argv[-3:] == ["--", "h", "sudo hostctl transfer offset 'a b;c' --json"]
    assert "ServerAliveInterval=15" in argv


def test_meter_says_rate_and_time_left() -> None:
    meter = move.Meter(lambda _: None, 100 << 20, 10 << 20)
    assert meter.line(30 << 20, 2.0) == "sent 30M of 100M (30%) at 10M/s, 0m07s left"


# -- the transfer loop ---------------------------------------------------------------------


class FakeTarget(move.Remote):
    """A target that stages what it is sent, and cuts the first `cuts` sends after `keep`
    bytes (or with a broken ssh, if `keep` is None)."""

    def __init__(self, cuts: int, keep: int | None) -> None:
        super().__init__(move.Target("t"), "ssh", "hostctl")
        self.staged = b""
        self.cuts = cuts
        self.keep = keep
        self.offsets: list[int] = []

    def call(self, *args: str) -> Any:
        assert args == ("transfer", "offset", ID)
        return {"id": ID, "size": len(self.staged)}

    def send(self, archive_id: str, fd: int, offset: int, size: int, meter: move.Meter) -> int:
        assert offset == len(self.staged)
        self.offsets.append(offset)
        rest = os.pread(fd, size - offset, offset)
        if self.cuts:
            self.cuts -= 1
            if self.keep is None:
                raise move.Broken("ssh to t failed (Connection reset)", "")
            rest = rest[: self.keep]
        self.staged += rest
        return len(self.staged)


@pytest.fixture
def data(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "archive"
    path.write_bytes(os.urandom(10000))
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def test_a_cut_transfer_resumes_where_the_target_stopped(data: int) -> None:
    target, said, slept = FakeTarget(cuts=2, keep=3000), list[str](), list[float]()
    sent = move.transfer(target, ID, data, 1, said.append, slept.append)
    assert target.staged == os.pread(data, 10000, 0) and sent == 10000
    assert target.offsets == [0, 3000, 6000]  # each break moved it on: the count starts again
    assert slept == [2.0, 2.0]


def test_broken_ssh_is_retried_with_backoff_then_given_up(data: int) -> None:
    target, said, slept = FakeTarget(cuts=5, keep=None), list[str](), list[float]()
    with pytest.raises(move.Broken) as err:
        move.transfer(target, ID, data, 2, said.append, slept.append)
    assert slept == [2.0, 4.0]
    assert str(err.value) == (
        "the transfer to t broke: ssh to t failed (Connection reset): run the same "
        "`hostctl user move USER TARGET` again: it resumes from there"
    )
    assert said[-1].endswith("trying again in 4 s (2 of 2)")


def test_the_next_run_sends_only_the_rest(data: int) -> None:
    target = FakeTarget(cuts=1, keep=4000)
    with pytest.raises(move.Broken):
        move.transfer(target, ID, data, 0, lambda _: None)
    said: list[str] = []
    assert move.transfer(target, ID, data, 0, said.append) == 6000
    assert said[0] == "resuming at 3.9K of 9.8K" and target.staged == os.pread(data, 10000, 0)
    assert move.transfer(target, ID, data, 0, said.append) == 0  # all there: nothing sent


# -- the spool -----------------------------------------------------------------------------


def spooled(spool: Path, named: str, archive_id: str, **changes: Any) -> Path:
    path = spool / f"{named}.{archive_id}.hostd"
    h = header(**{"id": archive_id, "user": named, "schema": len(MIGRATIONS), **changes})
    write(path, h)
    return path


def test_spool_reuses_only_the_admins_own_private_archives(tmp_path: Path) -> None:
    spool = move.Spool(tmp_path, "alice")
    full = spooled(tmp_path, "alice", ID)
    later = spooled(tmp_path, "alice", "f" * 32, kind="incremental", parent=ID, created="z")
    readable = spooled(tmp_path, "alice", "e" * 32)
    readable.chmod(0o644)  # another user could have planted or read it
    spooled(tmp_path, "alice", "d" * 32, user="bob")  # named for alice, bob's inside
    os.rename(spooled(tmp_path, "alice", "c" * 32), tmp_path / f"alice.{'9' * 32}.hostd")
    (tmp_path / f"alice.{'8' * 32}.hostd").write_bytes(b"garbage")
    os.symlink(full, tmp_path / f"alice.{'7' * 32}.hostd")
    found = spool.archives()
    assert [(s.path, s.head.kind) for s in found] == [(full, "full"), (later, "incremental")]


def test_spool_files_are_new_and_private(tmp_path: Path) -> None:
    spool = move.Spool(tmp_path / "spool", "alice")
    spool.prepare()
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    part = spool.create()
    assert stat.S_IMODE(part.stat().st_mode) == 0o600 and part.suffix == ".part"
    assert spool.complete(part, ID).name == f"alice.{ID}.hostd"
    with pytest.raises(RuntimeFailure, match="invalid user name"):
        move.Spool(tmp_path, "../x")


# -- staging on the target -----------------------------------------------------------------


def piped(data: bytes) -> int:
    """The read end of a pipe a thread writes `data` into, then closes."""
    r, w = os.pipe()

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), open(w, "wb") as f:  # a refusal reads none
            f.write(data)

    threading.Thread(target=feed, daemon=True).start()
    return r


def receive(staging: Staging, archive_id: str, offset: int, size: int, data: bytes) -> int:
    fd = piped(data)
    try:
        return staging.receive(archive_id, offset, size, fd)
    finally:
        os.close(fd)


@pytest.fixture
def staging(tmp_path: Path) -> Staging:
    return Staging(tmp_path / "incoming", reserve=0)


def test_staging_receives_in_pieces(staging: Staging) -> None:
    body = os.urandom(300000)
    assert staging.offset(ID) == 0
    assert receive(staging, ID, 0, len(body), body[:100000]) == 100000  # the sender broke
    assert staging.offset(ID) == 100000
    with pytest.raises(Conflict, match="100000 bytes of archive .* are staged here, not 0"):
        receive(staging, ID, 0, len(body), body)
    assert receive(staging, ID, 100000, len(body), body[100000:] + b"more") == len(body)
    path = staging.path(ID)
    assert path.read_bytes() == body
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(staging.directory.stat().st_mode) == 0o700
    assert staging.discard(ID) and not path.exists() and not staging.discard(ID)


@pytest.mark.parametrize("bad", ["../x", "a/b", ID.upper(), ID + "0", "", f"..{ID[2:]}"])
def test_staging_ids_are_hex_only(staging: Staging, bad: str) -> None:
    with pytest.raises(HostdError, match="is not an archive id"):
        check_id(bad)
    with pytest.raises(HostdError, match="is not an archive id"):
        receive(staging, bad, 0, 10, b"x" * 10)
    assert not staging.directory.exists()


def test_staging_is_bounded(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "incoming", max_staged=2, reserve=0)
    for n in range(2):
        receive(staging, f"{n}" * 32, 0, 10, b"x" * 10)
    with pytest.raises(Busy, match="2 archives are staged on this host already"):
        receive(staging, "2" * 32, 0, 10, b"x" * 10)
    huge = Staging(tmp_path / "incoming", reserve=1 << 60)
    with pytest.raises(HostdError, match="the archive needs 10 more and .* free space"):
        receive(huge, "3" * 32, 0, 10, b"x" * 10)
    assert staging.staged() == ["0" * 32, "1" * 32]  # the refused ones left nothing


def test_stale_archives_go(staging: Staging) -> None:
    receive(staging, ID, 0, 5, b"12345")
    assert staging.remove_stale() == []
    later = os.stat(staging.path(ID)).st_mtime + staging.stale_after + 1
    assert staging.remove_stale(now=lambda: later) == [ID]
    assert staging.staged() == []


def test_a_staging_dir_others_can_enter_is_refused(staging: Staging) -> None:
    staging.directory.mkdir(mode=0o755)
    os.chmod(staging.directory, 0o755)
    with pytest.raises(HostdError, match="is not a directory only hostd can enter"):
        receive(staging, ID, 0, 5, b"12345")


def test_verify_reads_every_checksum(staging: Staging, tmp_path: Path) -> None:
    archive = tmp_path / "a.hostd"
    write(archive, header(id=ID, schema=len(MIGRATIONS)))
    body = archive.read_bytes()
    receive(staging, ID, 0, len(body), body)
    assert staging.verify(ID, len(MIGRATIONS), lambda _: None).kind == "full"
    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 0xFF
    other = "e" * 32
    receive(staging, other, 0, len(body), bytes(damaged))
    with pytest.raises(HostdError) as err:
        staging.verify(other, len(MIGRATIONS), lambda _: None)
    assert "\n" not in str(err.value)
    with pytest.raises(NotFound, match=f"no archive {'f' * 32} is staged"):
        staging.verify("f" * 32, len(MIGRATIONS), lambda _: None)


def test_verify_refuses_an_archive_staged_under_another_id(
    staging: Staging, tmp_path: Path
) -> None:
    archive = tmp_path / "a.hostd"
    write(archive, header(id="a" * 32, schema=len(MIGRATIONS)))
    body = archive.read_bytes()
    receive(staging, ID, 0, len(body), body)
    with pytest.raises(HostdError, match=f"staged on this host is archive {'a' * 32}"):
        staging.verify(ID, len(MIGRATIONS), lambda _: None)


# -- the whole move, against a fake source hostd and a fake target -------------------------


class FakeSource:
    """The source hostd as hostctl's Client sees it: exports write real archives."""

    json = False

    def __init__(self, tmp: Path) -> None:
        self.ops: list[str] = []
        self.lines: list[str] = []
        self.ids = iter(f"{n:x}" * 32 for n in range(1, 15))

    def progress(self, text: str) -> None:
        self.lines.append(text)

    say = progress

    def raw(self, op: str, request: object = None) -> Any:
        assert op == "user.show"
        return {"tenant": {"desired": "running"}}

    def __call__(self, op: str, request: Any = None, fds: list[int] | None = None) -> Any:
        self.ops.append(op)
        if op != "user.export":
            return None
        assert fds is not None and len(fds) == (1 if request.since is None else 2)
        archive_id = next(self.ids)
        kind = {"kind": "incremental", "parent": "1" * 32} if request.since else {}
        h = header(id=archive_id, user="alice", schema=len(MIGRATIONS), **kind)
        write(Path(f"/proc/self/fd/{fds[0]}"), h)
        return SimpleNamespace(id=archive_id)


class FakeRemote(move.Remote):
    """The target: stages what is sent; `imports` says how the import ends."""

    def __init__(self, imports: str = "ok", verify: str = "ok") -> None:
        super().__init__(move.Target("t"), "ssh", "hostctl")
        self.staged: dict[str, bytes] = {}
        self.imports = imports
        self.verifies = verify
        self.tenants: list[str] = []
        self.commands: list[tuple[str, ...]] = []
        self.events: list[str] = []  # the source's, to see the order across both

    def call(self, *args: str) -> Any:
        self.commands.append(args)
        if args[0] == "transfer" and args[1] in ("verify", "import"):
            self.events.append(f"there: {args[1]}")
        if args == ("user", "list"):
            if self.imports == "lost" and self.commands.count(args) > 1:
                raise move.Broken("ssh to t failed (no route)", "")
            return [{"user": u} for u in self.tenants]
        verb, archive_id = args[1], args[2]
        if verb == "offset":
            return {"size": len(self.staged.get(archive_id, b""))}
        if verb == "discard":
            self.staged.pop(archive_id, None)
        if verb == "verify" and self.verifies != "ok":
            raise HostdError(f"chunk 0 of the archive {archive_id} is damaged", "copy it")
        if verb == "import":
            if self.imports in ("answer lost", "lost"):
                self.tenants.append("alice") if self.imports == "answer lost" else None
                raise move.Broken("ssh to t failed (Connection reset)", "")
            if self.imports == "refused":
                raise HostdError("on t: range 200000 is taken", "use --range auto")
            self.tenants.append("alice")
            return {"warning": None}
        return {}

    def send(self, archive_id: str, fd: int, offset: int, size: int, meter: move.Meter) -> int:
        self.staged[archive_id] = os.pread(fd, size, 0)
        return size


def moving(tmp_path: Path, remote: FakeRemote, **options: Any) -> tuple[FakeSource, move.Move]:
    args = SimpleNamespace(
        user="alice",
        target="ssh://t",
        as_user=None,
        range="auto",
        keep_source=False,
        with_home=False,
        remote_hostctl="hostctl",
        ssh="ssh",
        spool=str(tmp_path / "spool"),
        retries=0,
    )
    for key, value in options.items():
        setattr(args, key, value)
    source = FakeSource(tmp_path)
    m = move.Move(source, args)  # type: ignore[arg-type]
    m.remote = remote
    remote.events = source.ops
    return source, m


FULL, INCREMENTAL = "1" * 32, "2" * 32


def test_a_move_stops_only_after_the_check_and_removes_at_the_end(tmp_path: Path) -> None:
    remote = FakeRemote()
    source, m = moving(tmp_path, remote)
    m.run()
    assert source.ops == [
        "user.export",
        "there: verify",
        "stop",
        "user.export",
        "there: import",
        "user.remove",
    ]
    assert remote.commands[-1] == (
        "transfer",
        "import",
        FULL,
        INCREMENTAL,
        "--range",
        "auto",
        "--start",
    )
    assert list((tmp_path / "spool").iterdir()) == []


def test_keep_source_leaves_it_stopped(tmp_path: Path) -> None:
    source, m = moving(tmp_path, FakeRemote(), keep_source=True, as_user="bob")
    m.run()
    assert [op for op in source.ops if "there" not in op] == ["user.export", "stop", "user.export"]
    assert source.lines[-1] == "moved alice to t as bob; kept here, stopped"


def test_a_refused_import_starts_the_tenant_here_again(tmp_path: Path) -> None:
    remote = FakeRemote(imports="refused")
    source, m = moving(tmp_path, remote)
    with pytest.raises(HostdError) as err:
        m.run()
    assert str(err.value) == "on t: range 200000 is taken (alice runs here again): use --range auto"
    assert source.ops[-3:] == ["user.export", "there: import", "start"]
    assert ("transfer", "discard", INCREMENTAL) in remote.commands
    kept = [p.name for p in (tmp_path / "spool").iterdir()]
    assert kept == [f"alice.{FULL}.hostd"]  # the next run reuses it: only changes go again


def test_an_import_whose_answer_was_lost_counts_if_the_target_has_it(tmp_path: Path) -> None:
    source, m = moving(tmp_path, FakeRemote(imports="answer lost"))
    m.run()
    assert source.ops[-2:] == ["there: import", "user.remove"]


def test_an_import_lost_with_the_target_leaves_the_decision_to_the_admin(tmp_path: Path) -> None:
    source, m = moving(tmp_path, FakeRemote(imports="lost"))
    with pytest.raises(HostdError, match="lost t while it imported alice: it may have it now"):
        m.run()
    assert source.ops[-2:] == ["user.export", "there: import"]  # neither started nor removed


def test_a_damaged_archive_is_discarded_before_the_stop(tmp_path: Path) -> None:
    remote = FakeRemote(verify="damaged")
    source, m = moving(tmp_path, remote)
    with pytest.raises(HostdError, match=r"damaged \(alice is untouched here\)"):
        m.run()
    assert source.ops == ["user.export", "there: verify"]
    assert remote.staged == {} and list((tmp_path / "spool").iterdir()) == []


def test_the_target_name_must_be_free(tmp_path: Path) -> None:
    remote = FakeRemote()
    remote.tenants = ["alice"]
    source, m = moving(tmp_path, remote)
    with pytest.raises(HostdError, match="alice is a tenant on t already"):
        m.run()
    assert source.ops == []
