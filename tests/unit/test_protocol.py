"""hostd's socket protocol as data: the table of operations, request decoding that names the
field at fault, replies, and errors that travel as codes and come back as their classes."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from typing import Any

import pytest

from hostd import protocol as p
from runtime.errors import ERROR_CODES, Busy, Conflict, Internal, NotFound, RuntimeFailure


def _bad(line: bytes) -> str:
    with pytest.raises(RuntimeFailure) as info:
        p.decode_request(line)
    assert type(info.value) is RuntimeFailure and info.value.code == "invalid"
    return info.value.cause


def _request(op: str, args: object) -> bytes:
    return json.dumps({"op": op, "args": args}).encode()


def test_every_op_is_described_once() -> None:
    assert len(p.OPS) == 33 and all(name == op.name for name, op in p.OPS.items())
    for op in p.OPS.values():
        assert op.callers and op.callers <= {p.ADMIN, p.TENANT}
        assert hasattr(op.request, "_fields")
        reply = typing.get_args(op.reply)[0] if typing.get_origin(op.reply) is list else op.reply
        assert hasattr(reply, "_fields")
    assert {n for n, op in p.OPS.items() if p.TENANT in op.callers} == {"status", "start", "exec"}
    fds = {"exec": 3, "image.import": 1, "user.export": 2, "user.import": p.IMPORT_FDS}
    fds["transfer.receive"] = 1
    assert {n: op.fds for n, op in p.OPS.items() if op.fds} == fds
    assert p.MAX_FDS == p.IMPORT_FDS == 16
    assert p.max_fds(p.ADMIN) == 16 and p.max_fds(p.TENANT) == 3  # exec's stdio


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("ping", p.NoArgs()),
        ("status", p.StatusArgs()),
        ("status", p.StatusArgs("alice")),
        ("user.add", p.UserAddArgs("alice", memory="2G", cpus="1.5")),
        ("quota.set", p.QuotaSetArgs("alice", pids="none")),
        ("ranges.release", p.RangeArgs(300000)),
        ("user.remove", p.UserRemoveArgs("alice", keep_data=True)),
        ("exec", p.ExecArgs(["sh", "-c", "x"], user="a", tty=True, env={"LANG": "C"})),
    ],
)
def test_requests_round_trip(op: str, args: Any) -> None:
    line = p.encode_request(op, args)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    spec, decoded = p.decode_request(line.rstrip(b"\n"))
    assert spec is p.OPS[op] and decoded == args and type(decoded) is type(args)


def test_defaults_fill_missing_optional_fields() -> None:
    _, req = p.decode_request(_request("exec", {"argv": ["true"]}))
    assert req == p.ExecArgs(["true"], user="", as_user="root", login=False, rows=24, cols=80)
    _, req = p.decode_request(b'{"op": "ping"}')
    assert req == p.NoArgs()


@pytest.mark.parametrize(
    ("op", "args", "cause"),
    [
        ("quota.set", {"user": "a", "pids": 5}, "field 'pids' must be a string"),
        ("ranges.release", {"start": "1"}, "field 'start' must be an integer"),
        ("ranges.release", {"start": True}, "field 'start' must be an integer"),
        ("ranges.release", {"start": 1.5}, "field 'start' must be an integer"),
        ("user.remove", {"user": "a", "keep_data": 1}, "field 'keep_data' must be true or false"),
        ("exec", {"argv": "ls"}, "field 'argv' must be a list"),
        ("exec", {"argv": ["ls", 1]}, "field 'argv[1]' must be a string"),
        ("exec", {"argv": [], "env": []}, "field 'env' must be an object"),
        ("exec", {"argv": [], "env": {"A": 1}}, "field 'env.A' must be a string"),
        ("exec", {"argv": [], "rows": None}, "field 'rows' must be an integer"),
        ("exec", {}, "field 'argv' is missing"),
        ("status", {"user": "a", "evil": 1}, "unknown field 'evil'"),
        ("status", [], "the arguments must be an object"),
        ("user.show", {}, "field 'user' is missing"),
    ],
)
def test_bad_requests_name_the_field(op: str, args: object, cause: str) -> None:
    assert _bad(_request(op, args)) == f"bad request: {cause}"


def test_bad_request_lines() -> None:
    assert _bad(b"{").startswith("bad request: not JSON")
    assert _bad(b"[1]") == 'bad request: a request is {"op": NAME, "args": {...}}'
    assert _bad(b'{"op": "ping", "more": 1}').startswith("bad request: a request is")
    assert _bad(b"[" * 100000) == "bad request: request nested too deeply"
    assert _bad(b'{"op": "nope"}') == "unknown operation 'nope'"
    assert _bad(b'{"op": 5}') == "unknown operation '5'"
    assert _bad(b'{"op": "' + b"x" * 1000 + b'"}') == f"unknown operation {'x' * 64!r}"


def test_the_client_checks_its_own_request_before_sending() -> None:
    with pytest.raises(RuntimeFailure, match="field 'user' must be a string"):
        p.encode_request("user.show", {"user": 5})
    with pytest.raises(RuntimeFailure, match="unknown operation 'nope'"):
        p.encode_request("nope")


def test_fds_per_operation() -> None:
    p.check_fds(p.OPS["exec"], 3)
    p.check_fds(p.OPS["exec"], 0)  # a pty session sends none
    p.check_fds(p.OPS["image.import"], 1)
    with pytest.raises(RuntimeFailure, match="status takes at most 0 file descriptors, got 1"):
        p.check_fds(p.OPS["status"], 1)
    with pytest.raises(RuntimeFailure, match="image.import takes at most 1"):
        p.check_fds(p.OPS["image.import"], 2)


@pytest.mark.parametrize("cls", [RuntimeFailure, NotFound, Conflict, Busy, Internal])
def test_every_error_code_round_trips(cls: type[RuntimeFailure]) -> None:
    message = json.loads(p.error_line(cls("it broke: badly", "fix: it")))
    assert message == {
        "ok": False,
        "error": {"code": cls.code, "cause": "it broke: badly", "fix": "fix: it"},
    }
    exc = p.error_of(message["error"])
    assert type(exc) is cls and (exc.cause, exc.fix) == ("it broke: badly", "fix: it")
    assert ERROR_CODES[cls.code] is cls


@pytest.mark.parametrize(
    "error",
    [
        "x: y",
        None,
        {"code": "weird", "cause": "c", "fix": "f"},
        {"code": "busy", "cause": 1, "fix": "f"},
    ],
)
def test_unknown_or_malformed_errors_are_internal(error: object) -> None:
    assert isinstance(p.error_of(error), Internal)


def test_replies_are_json_data_and_decode_back() -> None:
    status = p.Status("a", "running", 1.5, 10, 0.25, 3, 0, p.Quota(None, 1, 2, 3), 0, 65535, "d")
    line = json.loads(p.ok_line([status]))
    assert line["ok"] is True and line["result"][0]["quota"] == {
        "cpus": None,
        "memory": 1,
        "pids": 2,
        "disk": 3,
    }
    assert p.decode_reply("status", line["result"]) == [status]
    assert json.loads(p.progress_line("hi")) == {"progress": "hi"}
    assert json.loads(p.TTY_LINE) == {"tty": True}


def test_a_reply_of_the_wrong_shape_is_an_internal_error() -> None:
    with pytest.raises(Internal, match="hostd's reply to ping does not fit"):
        p.decode_reply("ping", {"pid": "1"})
    with pytest.raises(Internal):
        p.decode_reply("status", {"user": "a"})


def test_the_protocol_loads_only_the_standard_library_and_runtime_errors() -> None:
    code = "import hostd.protocol, sys, json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ours = {m for m in json.loads(out.stdout) if m.split(".")[0] in ("hostd", "runtime")}
    assert ours == {"hostd", "hostd.protocol", "runtime", "runtime.errors"}
