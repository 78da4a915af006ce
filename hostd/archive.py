"""The tenant archive, format 1: what `hostctl user export` writes and `user import` reads.

One zstd stream (the `zstd` program as a child: compression on all cores, outside the GIL) of
a POSIX tar stream whose members come in this order, and nothing else:

    hostd-archive.json   the header: format, schema, id, kind, parent, volume size...
    tenant.json          the tenant's record: range, image, limits, ports, auto-stop...
    volume/NNNNNNNN      chunk N (bytes N*4 MiB on) of the data volume image; holes and zero
                         chunks are left out, and an incremental holds only the chunks whose
                         sha256 differs from its parent's manifest
    home/NNNNNNNN        consecutive pieces of a tar of the user's home, made as the user
    manifest.json        the sha256 of every data chunk of the volume (not only this archive's),
                         of each home piece, of the header and of the record

Reading never trusts the stream: the tar headers are parsed here (regular files only, exact
names, in order, within bounds), chunks are hashed as they are written to the staging image,
and the manifest, last, is checked against them. Any flaw is one HostdError naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import IO, Any, NoReturn

from hostd.errors import HostdError
from hostd.units import human_size
from runtime import proc
from runtime.errors import RuntimeFailure
from runtime.limits import Limits
from runtime.names import check_name

FORMAT = 1
MiB = 1 << 20
CHUNK_SIZE = 4 * MiB
MAX_JSON = MiB  # header and tenant record
MAX_MANIFEST = 64 * MiB  # a chunk's entry is ~80 bytes: volumes up to ~3 TiB
MAX_VOLUME = MAX_MANIFEST // 80 * CHUNK_SIZE
MAX_PORT_GRANTS = 1024
HEADER, TENANT, MANIFEST = "hostd-archive.json", "tenant.json", "manifest.json"
KINDS = ("full", "incremental")
CONSISTENCY = ("frozen", "stopped")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK = 512  # tar's
PIPE_SIZE = MiB  # of the pipes to and from zstd (fs.pipe-max-size is 1 MiB by default)
_ZERO = bytes(BLOCK)
_PIECE = re.compile(r"(volume|home)/([0-9]{8})")
_SHA = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{32}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,254}")
FIX = "give an archive written by `hostctl user export USER`, copied whole"
Progress = Callable[[str], None]


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def chunk_count(volume_size: int) -> int:
    return -(-volume_size // CHUNK_SIZE)


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    format: int
    schema: int  # hostd's state schema (len(state.MIGRATIONS)) at export
    id: str  # uuid4 hex
    kind: str  # full | incremental
    parent: str | None  # the id of the archive an incremental follows
    user: str
    created: str
    host: str
    hostd: str  # hostd's version
    consistency: str  # frozen | stopped
    chunk_size: int
    volume_size: int
    with_home: bool
    data_size: int  # bytes the volume image had allocated: what its import writes at most

    def encode(self) -> bytes:
        return _encode(asdict(self))

    @classmethod
    def parse(cls, data: bytes, name: str, schema: int) -> Header:
        """The header of archive `name`, refused if this hostd cannot read it (`schema`: ours)."""
        d = _fields(data, name, HEADER, _HEADER_TYPES)
        if d["format"] > FORMAT:
            raise HostdError(
                f"{name} has archive format {d['format']}, newer than this hostd's {FORMAT}",
                "upgrade hostd on this host, then import it",
            )
        if d["schema"] > schema:
            raise HostdError(
                f"{name} comes from a hostd with state schema {d['schema']}, newer than this "
                f"one's {schema}",
                "upgrade hostd on this host, then import it",
            )
        h = cls(**d)
        _check(h.format == FORMAT and h.schema >= 1, name, "an unknown format or schema")
        _check(bool(_ID.fullmatch(h.id)), name, "a malformed id")
        _check(h.kind in KINDS and (h.parent is None) == (h.kind == "full"), name, "a bad kind")
        _check(h.parent is None or bool(_ID.fullmatch(h.parent)), name, "a malformed parent")
        _check(h.consistency in CONSISTENCY, name, "an unknown consistency")
        _check(h.chunk_size == CHUNK_SIZE, name, f"a chunk size other than {CHUNK_SIZE}")
        _check(0 < h.volume_size <= MAX_VOLUME, name, "a volume size out of bounds")
        _check(0 <= h.data_size <= h.volume_size, name, "a data size out of bounds")
        _check_name(h.user, name, "user")
        return h


_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "format": (int,),
    "schema": (int,),
    "id": (str,),
    "kind": (str,),
    "parent": (str, type(None)),
    "user": (str,),
    "created": (str,),
    "host": (str,),
    "hostd": (str,),
    "consistency": (str,),
    "chunk_size": (int,),
    "volume_size": (int,),
    "with_home": (bool,),
    "data_size": (int,),
}


@dataclass(frozen=True)
class TenantRecord:
    """What hostd knew of the tenant: enough to make it again elsewhere."""

    user: str
    range_start: int
    image: str
    image_version: str  # the basename of the image directory it ran on
    limits: Limits
    ports: tuple[tuple[int, int], ...]
    auto_stop: int | None  # seconds; None: the host's default
    desired: str  # running | stopped
    created: str

    def encode(self) -> bytes:
        data = asdict(self)
        data["ports"] = [list(r) for r in self.ports]
        return _encode(data)

    @classmethod
    def parse(cls, data: bytes, name: str) -> TenantRecord:
        d = _fields(data, name, TENANT, _TENANT_TYPES)
        limits = d["limits"]
        _check(isinstance(limits, dict) and set(limits) == set(_LIMIT_TYPES), name, "bad limits")
        for key, kinds in _LIMIT_TYPES.items():
            value = limits[key]
            _check(type(value) in kinds and (value is None or value > 0), name, f"a bad {key}")
        ports = d["ports"]
        _check(len(ports) <= MAX_PORT_GRANTS, name, "too many port grants")
        for r in ports:
            _check(
                isinstance(r, list)
                and len(r) == 2
                and all(type(x) is int for x in r)
                and 0 < r[0] <= r[1] < 65536,
                name,
                "a bad port grant",
            )
        after = d["auto_stop"]
        _check(after is None or after >= 0, name, "a bad auto-stop")
        _check(d["desired"] in ("running", "stopped"), name, "a bad desired state")
        _check(d["range_start"] >= 0, name, "a bad range")
        _check_name(d["user"], name, "user")
        _check_name(d["image"], name, "image")
        _check(bool(_VERSION.fullmatch(d["image_version"])), name, "a bad image version")
        cpus = limits["cpus"]
        return cls(
            user=d["user"],
            range_start=d["range_start"],
            image=d["image"],
            image_version=d["image_version"],
            limits=Limits(
                None if cpus is None else float(cpus),
                limits["memory"],
                limits["pids"],
                limits["disk"],
            ),
            ports=tuple((a, b) for a, b in ports),
            auto_stop=after,
            desired=d["desired"],
            created=d["created"],
        )


_TENANT_TYPES: dict[str, tuple[type, ...]] = {
    "user": (str,),
    "range_start": (int,),
    "image": (str,),
    "image_version": (str,),
    "limits": (dict,),
    "ports": (list,),
    "auto_stop": (int, type(None)),
    "desired": (str,),
    "created": (str,),
}
_LIMIT_TYPES: dict[str, tuple[type, ...]] = {
    "cpus": (float, int, type(None)),
    "memory": (int, type(None)),
    "pids": (int, type(None)),
    "disk": (int, type(None)),
}


@dataclass(frozen=True)
class Manifest:
    id: str
    volume_size: int
    chunks: Mapping[int, str]  # every data chunk of the volume at export: index -> sha256
    home: tuple[str, ...]  # sha256 of each home piece
    header_sha256: str
    tenant_sha256: str

    def encode(self) -> bytes:
        return _encode(
            {
                "id": self.id,
                "volume": {
                    "size": self.volume_size,
                    "chunks": {str(n): h for n, h in sorted(self.chunks.items())},
                },
                "home": list(self.home),
                "header_sha256": self.header_sha256,
                "tenant_sha256": self.tenant_sha256,
            }
        )

    @classmethod
    def parse(cls, data: bytes, name: str) -> Manifest:
        d = _fields(data, name, MANIFEST, _MANIFEST_TYPES)
        volume = d["volume"]
        _check(set(volume) == {"size", "chunks"}, name, "a bad volume entry in its manifest")
        size, chunks = volume["size"], volume["chunks"]
        _check(type(size) is int and 0 < size <= MAX_VOLUME, name, "a bad volume size")
        _check(isinstance(chunks, dict), name, "bad chunks in its manifest")
        count = chunk_count(size)
        parsed: dict[int, str] = {}
        for key, value in chunks.items():
            _check(
                key.isdigit() and len(key) <= 8 and int(key) < count,
                name,
                f"a chunk index past the volume's end ({key[:16]!r})",
            )
            _check(isinstance(value, str) and bool(_SHA.fullmatch(value)), name, "a bad sha256")
            parsed[int(key)] = value
        home = d["home"]
        _check(all(isinstance(h, str) and _SHA.fullmatch(h) for h in home), name, "a bad sha256")
        for key in ("header_sha256", "tenant_sha256"):
            _check(bool(_SHA.fullmatch(d[key])), name, "a bad sha256")
        _check(bool(_ID.fullmatch(d["id"])), name, "a malformed id")
        return cls(d["id"], size, parsed, tuple(home), d["header_sha256"], d["tenant_sha256"])


_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "volume": (dict,),
    "home": (list,),
    "header_sha256": (str,),
    "tenant_sha256": (str,),
}


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"


def _fields(data: bytes, name: str, member: str, types: dict[str, tuple[type, ...]]) -> Any:
    """The JSON object of `member`, with exactly the fields of `types`, of those types."""
    try:
        d = json.loads(data)
    except (ValueError, RecursionError):
        _bad(name, f"its {member} is not JSON")
    _check(isinstance(d, dict), name, f"a {member} that is not an object")
    fields = set(d)
    _check(fields == set(types), name, f"other fields in its {member} than format {FORMAT}'s")
    for key, kinds in types.items():
        _check(type(d[key]) in kinds, name, f"a field {key!r} of the wrong type in its {member}")
    return d


def _check_name(value: str, name: str, what: str) -> None:
    try:
        check_name(value, what)
    except RuntimeFailure:
        _bad(name, f"an invalid {what} name")


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        _bad(name, what)


def _bad(name: str, what: str) -> NoReturn:
    raise HostdError(f"{name} is not a valid hostd archive: it has {what}", FIX)


# -- writing -------------------------------------------------------------------------------


def _tar_header(name: str, size: int) -> bytes:
    """A ustar header of a regular file (no pax records: short ASCII names, small sizes)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(time.time())
    return info.tobuf(tarfile.PAX_FORMAT)


class Writer:
    """An archive being written to `fd`: tar members piped into a `zstd` child writing to it,
    started behind `prefix` (the runtime's background cgroup, say). Use as a context manager
    and call `finish()`; an exception kills zstd."""

    def __init__(self, fd: int, prefix: Sequence[str] = ()) -> None:
        zstd = proc.require("zstd", "zstd")
        self._zstd = subprocess.Popen(
            [*prefix, zstd, "-q", "-T0", "-3", "-c"],
            stdin=subprocess.PIPE,
            stdout=fd,
            stderr=subprocess.PIPE,
            env=proc.child_env(),
        )
        assert self._zstd.stdin is not None
        with contextlib.suppress(OSError):  # fewer, larger writes (the default pipe: 64 KiB)
            fcntl.fcntl(self._zstd.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.written = 0  # bytes of tar stream (uncompressed)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is not None or self._zstd.returncode is None:
            self._zstd.kill()
            self._zstd.wait()
        for f in (self._zstd.stdin, self._zstd.stderr):
            if f is not None:
                with contextlib.suppress(OSError):  # what is buffered for a dead zstd: lost
                    f.close()

    def add(self, name: str, data: bytes | memoryview, digest: str | None = None) -> str:
        """Write one member; its sha256 (`digest`, when the caller has it: hashing is a fifth
        of an export's CPU time)."""
        pad = -len(data) % BLOCK
        self._write(_tar_header(name, len(data)))
        self._write(data)
        if pad:
            self._write(_ZERO[:pad])
        return sha256(data) if digest is None else digest

    def _write(self, data: bytes | memoryview) -> None:
        assert self._zstd.stdin is not None
        try:
            self._zstd.stdin.write(data)
        except OSError:  # zstd is gone: its own message says why
            self._failed()
        self.written += len(data)

    def finish(self) -> None:
        """End the tar stream and wait for zstd to write all of it."""
        self._write(_ZERO * 2)
        assert self._zstd.stdin is not None
        try:
            self._zstd.stdin.close()
        except OSError:
            self._failed()
        if self._zstd.wait() != 0:
            self._failed()

    def _failed(self) -> NoReturn:
        self._zstd.kill()
        self._zstd.wait()
        said = _said(self._zstd.stderr)
        if "No space left" in said:
            raise HostdError(
                "the archive's file system is full", "free space there, or write it elsewhere"
            )
        raise HostdError(
            f"writing the archive failed (zstd: {said or 'exit ' + str(self._zstd.returncode)})",
            "check where it goes (a full disk, a closed pipe) and export again",
        )


def _said(stream: IO[bytes] | None) -> str:
    """The last line a child wrote to its stderr pipe (bounded)."""
    if stream is None:
        return ""
    lines = stream.read(4096).decode(errors="replace").strip().splitlines()
    return lines[-1][:200] if lines else ""


# -- reading -------------------------------------------------------------------------------


class Reader:
    """One archive file being read once, front to back: a `zstd -d` child over `fd`, its tar
    stream parsed here. `header()`, `tenant()`, then `restore()`, then `close()`."""

    def __init__(self, fd: int, name: str, schema: int) -> None:
        self.name = name
        self.schema = schema
        zstd = proc.require("zstd", "zstd")
        self._zstd = subprocess.Popen(
            [zstd, "-d", "-q", "-c"],
            stdin=fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=proc.child_env(),
        )
        assert self._zstd.stdout is not None
        with contextlib.suppress(OSError):  # fewer, larger reads (the default pipe: 64 KiB)
            fcntl.fcntl(self._zstd.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.read = 0  # bytes of tar stream
        self.head: Header | None = None
        self.header_sha = self.tenant_sha = ""

    def close(self) -> None:
        if self._zstd.returncode is None:
            self._zstd.kill()
            self._zstd.wait()
        for f in (self._zstd.stdout, self._zstd.stderr):
            if f is not None:
                f.close()

    # -- the tar stream --------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        assert self._zstd.stdout is not None
        data = self._zstd.stdout.read(n)
        self.read += len(data)
        if len(data) < n:
            self._ended_early()
        return data

    def _ended_early(self) -> NoReturn:
        """The stream ended inside the tar: zstd's failure if it failed, else truncation."""
        try:
            code = self._zstd.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            said = _said(self._zstd.stderr)
            raise HostdError(
                f"{self.name} is not a hostd archive or is damaged (zstd: {said or code})", FIX
            )
        raise HostdError(f"{self.name} ends early: it is truncated", FIX)

    def _next(self) -> tuple[str, int] | None:
        """The next member's name and size; None at the end of the tar stream."""
        block = self._read(BLOCK)
        if block == _ZERO:
            return None
        return _parse_tar_header(block, self.name)

    def _data(self, size: int) -> bytes:
        data = self._read(size)
        self._read(-size % BLOCK)
        return data

    def _member(self, expected: str, bound: int) -> bytes:
        got = self._next()
        if got is None or got[0] != expected:
            _bad(self.name, f"{got[0] if got else 'the end'!r} where {expected} belongs")
        if got[1] > bound:
            _bad(self.name, f"a {expected} of {got[1]} bytes (at most {bound})")
        return self._data(got[1])

    def _end(self) -> None:
        """After the manifest: the end of the tar stream, then of zstd's, nothing else."""
        assert self._zstd.stdout is not None
        if self._next() is not None or self._read(BLOCK) != _ZERO:
            _bad(self.name, "members after its manifest")
        if self._zstd.stdout.read(BLOCK * 20).strip(b"\0"):  # tar may pad to its record size
            _bad(self.name, "data after its end")
        if self._zstd.wait() != 0:
            self._ended_early()

    # -- members ---------------------------------------------------------------------------

    def header(self) -> Header:
        data = self._member(HEADER, MAX_JSON)
        self.header_sha = sha256(data)
        self.head = Header.parse(data, self.name, self.schema)
        return self.head

    def tenant(self) -> TenantRecord:
        data = self._member(TENANT, MAX_JSON)
        self.tenant_sha = sha256(data)
        record = TenantRecord.parse(data, self.name)
        assert self.head is not None
        _check(record.user == self.head.user, self.name, "a record of another user")
        return record

    def restore(
        self,
        volume: int | None,
        home: IO[bytes] | None,
        parent: Manifest | None,
        meter: Meter | None = None,
    ) -> Manifest:
        """Read the rest: chunks written with pwrite into the image `volume` (an incremental's
        over its `parent`'s, whose chunks this one no longer has are punched out), home pieces
        to `home`, then the manifest, checked against what was read. None for `volume` and
        `home`: read only to check, e.g. for the manifest of a parent given to --since."""
        h = self.head
        assert h is not None
        if h.kind == "incremental" and volume is not None:
            assert parent is not None  # the caller checked the chain
        if volume is not None:
            _writing(os.ftruncate, volume, h.volume_size)
        present: dict[int, Future[str]] = {}
        pieces: list[str] = []
        # Hashing and writing chunk N overlap reading chunk N+1 (both release the GIL): the
        # import keeps up with `zstd -d | tar -x`. At most two chunks are in flight.
        with ThreadPoolExecutor(1, thread_name_prefix="hostd-import") as pool:
            last: Future[str] | None = None
            while True:
                got = self._next()
                if got is None:
                    raise HostdError(f"{self.name} ends before its manifest: truncated", FIX)
                member, size = got
                if member == MANIFEST:
                    _check(size <= MAX_MANIFEST, self.name, f"a manifest of {size} bytes")
                    manifest = Manifest.parse(self._data(size), self.name)
                    break
                piece = _PIECE.fullmatch(member)
                if piece is None:
                    _bad(self.name, f"an unexpected member {member[:100]!r}")
                n = int(piece[2])
                if piece[1] == "volume":
                    data = self._chunk(n, size, present, bool(pieces))
                    present[n] = pool.submit(_store, data, volume, n * CHUNK_SIZE)
                    if last is not None:
                        last.result()  # a full disk is said here
                    last = present[n]
                else:
                    _check(h.with_home and n == len(pieces), self.name, f"{member} out of place")
                    _check(0 < size <= CHUNK_SIZE, self.name, f"a {member} of {size} bytes")
                    data = self._data(size)
                    pieces.append(sha256(data))
                    if home is not None:
                        _writing(home.write, data)
                if meter is not None:
                    meter.update(self.read)
        sums = {n: future.result() for n, future in present.items()}
        self._end()
        self._verify(manifest, sums, pieces, parent if volume is not None else None)
        if volume is not None and parent is not None:
            gone = sorted(set(parent.chunks) - set(manifest.chunks))
            punch_chunks(volume, gone, h.volume_size)
        return manifest

    def _chunk(self, n: int, size: int, present: Mapping[int, object], after_home: bool) -> bytes:
        """Volume chunk `n`, checked for its place and size, read."""
        h = self.head
        assert h is not None
        member = f"volume/{n:08d}"
        _check(not after_home and n > max(present, default=-1), self.name, f"{member} out of order")
        _check(n < chunk_count(h.volume_size), self.name, f"{member} past the volume's end")
        room = min(CHUNK_SIZE, h.volume_size - n * CHUNK_SIZE)
        _check(0 < size <= room, self.name, f"a {member} of {size} bytes")
        return self._data(size)

    def _verify(
        self,
        m: Manifest,
        present: Mapping[int, str],
        pieces: list[str],
        parent: Manifest | None,
    ) -> None:
        h = self.head
        assert h is not None
        _check(m.id == h.id and m.volume_size == h.volume_size, self.name, "another's manifest")
        _check(m.header_sha256 == self.header_sha, self.name, "a header its manifest disowns")
        _check(m.tenant_sha256 == self.tenant_sha, self.name, "a record its manifest disowns")
        for n, digest in present.items():
            if m.chunks.get(n) != digest:
                raise HostdError(
                    f"chunk {n} of {self.name} does not match its checksum: the archive is damaged",
                    "copy it again from where it was written, or import another backup",
                )
        if list(m.home) != pieces:
            raise HostdError(
                f"the home in {self.name} does not match its checksums: the archive is damaged",
                "copy it again from where it was written, or import another backup",
            )
        absent = set(m.chunks) - set(present)
        if h.kind == "full":
            _check(not absent, self.name, f"{len(absent)} chunks missing from a full archive")
        elif parent is not None:
            changed = [n for n in absent if parent.chunks.get(n) != m.chunks[n]]
            _check(
                not changed,
                self.name,
                f"chunk {min(changed, default=0)} neither present nor unchanged since its parent",
            )


def _store(data: bytes, volume: int | None, offset: int) -> str:
    """A chunk's sha256, after writing it at `offset` of the image `volume` (if any)."""
    if volume is not None:
        _writing(os.pwrite, volume, data, offset)
    return sha256(data)


def _parse_tar_header(block: bytes, name: str) -> tuple[str, int]:
    """Name and size of a ustar header of a regular file; anything else is refused."""
    _check(block[257:263] == b"ustar\0", name, "a member that is not POSIX tar")
    try:
        stored = int(block[148:156].strip(b"\0 ") or b"x", 8)
        size = int(block[124:136].strip(b"\0 ") or b"x", 8)
    except ValueError:
        _bad(name, "a damaged tar header")
    _check(stored == sum(block[:148]) + 8 * 32 + sum(block[156:]), name, "a damaged tar header")
    member = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    _check(block[156:157] in (b"0", b"\0"), name, f"a member that is not a file ({member[:64]!r})")
    try:
        text = (prefix + b"/" + member if prefix else member).decode("ascii")
    except UnicodeDecodeError:
        _bad(name, "a member name that is not ASCII")
    return text, size


def _writing(fn: Callable[..., object], *args: Any) -> None:
    """A write to the staging image or home file; a full disk is said so."""
    try:
        fn(*args)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HostdError(
                "the disk of hostd's state dir filled up during the import",
                "free space there (nothing of the import is left), then import again",
            ) from None
        raise


def punch_chunks(fd: int, chunks: Iterable[int], size: int) -> None:
    """Make the chunks holes in the image `fd` (runs of them at once: `fallocate` is util-
    linux's, Python has no punch-hole)."""
    runs: list[list[int]] = []
    for n in chunks:
        if n * CHUNK_SIZE >= size:
            continue
        if runs and runs[-1][1] == n:
            runs[-1][1] = n + 1
        else:
            runs.append([n, n + 1])
    path = f"/proc/{os.getpid()}/fd/{fd}"
    for first, end in runs:
        offset = first * CHUNK_SIZE
        length = min(end * CHUNK_SIZE, size) - offset
        proc.run(["fallocate", "-p", "-o", str(offset), "-l", str(length), path])


def parent_manifest(fd: int, name: str, schema: int) -> Manifest:
    """The manifest of `--since PARENT`: a parent archive (read through), or the
    `X.manifest.json` copy kept next to it."""
    try:
        magic = os.pread(fd, 4, 0)
    except OSError:  # a pipe: an archive, read from the start
        magic = ZSTD_MAGIC
    if magic != ZSTD_MAGIC:
        data = os.read(fd, MAX_MANIFEST + 1)
        _check(len(data) <= MAX_MANIFEST, name, "a manifest too large")
        return Manifest.parse(data, name)
    reader = Reader(fd, name, schema)
    try:
        reader.header()
        reader.tenant()
        return reader.restore(None, None, None)
    finally:
        reader.close()


class Meter:
    """Progress of a long copy: bytes and rate, at most once every `every` seconds."""

    def __init__(self, progress: Progress, verb: str, every: float = 2.0) -> None:
        self.progress = progress
        self.verb = verb
        self.every = every
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.progress(f"{self.verb} {human_size(done)} ({self.rate(done)})")

    def rate(self, done: int) -> str:
        return f"{human_size(int(done / max(time.monotonic() - self.start, 1e-3)))}/s"


def check_chain(readers: Sequence[Reader]) -> None:
    """Archives imported together: a full one, then incrementals each of the one before."""
    heads = [(r.name, r.head) for r in readers]
    name, first = heads[0]
    assert first is not None
    if first.kind != "full":
        raise HostdError(
            f"{name} is an incremental archive (of {first.parent}), not a full one",
            "give the full archive it follows first, then the incrementals in order",
        )
    for (before, prev), (name, h) in zip(heads, heads[1:], strict=False):
        assert prev is not None and h is not None
        if h.parent != prev.id:
            raise HostdError(
                f"{name} does not follow {before} (its parent is {h.parent or 'none'}, "
                f"not {prev.id})",
                "give the archives in the order they were exported, from the full one",
            )
        if h.user != first.user:
            raise HostdError(f"{name} is {h.user}'s, not {first.user}'s", "give one tenant's")
