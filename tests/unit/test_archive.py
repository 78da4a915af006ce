"""The archive format (hostd.archive): a round trip through the real `zstd`, an incremental
chain, and every malformed input refused with one line, before or instead of a wrong image.
No root: archives and staging images are temp files."""

from __future__ import annotations

import dataclasses
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd import archive as a
from hostd.errors import HostdError
from runtime.limits import Limits

SCHEMA = 5
C = a.CHUNK_SIZE
VOLUME = 3 * C + 4096  # four chunks, the last one short
ID, PARENT = "a" * 32, "b" * 32


def header(**changes: object) -> a.Header:
    h = a.Header(
        format=1,
        schema=SCHEMA,
        id=ID,
        kind="full",
        parent=None,
        user="alice",
        created="2026-12-01T10:00:00+00:00",
        host="h1",
        hostd="0.1",
        consistency="frozen",
        chunk_size=C,
        volume_size=VOLUME,
        with_home=False,
        data_size=2 * C,
    )
    return dataclasses.replace(h, **changes)  # type: ignore[arg-type]


RECORD = a.TenantRecord(
    user="alice",
    range_start=200000,
    image="default",
    image_version="default@20261130T101010-a1b2c3",
    limits=Limits(1.5, 2 << 30, 500, 1 << 30),
    ports=((8080, 8081),),
    auto_stop=None,
    desired="running",
    created="2026-11-01T10:00:00+00:00",
)


def chunk(fill: int, size: int = C) -> bytes:
    return bytes([fill]) * size


def write(
    path: Path,
    h: a.Header | None = None,
    chunks: dict[int, bytes] | None = None,
    home: list[bytes] | None = None,
    manifest_chunks: dict[int, str] | None = None,
    extra: list[tuple[str, bytes]] | None = None,
    record: bytes | None = None,
    manifest_home: list[str] | None = None,
) -> a.Manifest:
    """An archive as hostd writes one (or, with the overrides, as an attacker might)."""
    h = h or header()
    chunks = {0: chunk(1), 2: chunk(2)} if chunks is None else chunks
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with a.Writer(fd) as w:
            hs = w.add(a.HEADER, h.encode())
            ts = w.add(a.TENANT, record if record is not None else RECORD.encode())
            sums = {n: w.add(f"volume/{n:08d}", data) for n, data in sorted(chunks.items())}
            pieces = [w.add(f"home/{i:08d}", p) for i, p in enumerate(home or [])]
            for name, data in extra or []:
                w.add(name, data)
            home_sums = tuple(manifest_home if manifest_home is not None else pieces)
            m = a.Manifest(h.id, h.volume_size, manifest_chunks or sums, home_sums, hs, ts)
            w.add(a.MANIFEST, m.encode())
            w.finish()
    finally:
        os.close(fd)
    return m


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def restore(
    archive: Path, image: Path, parent: a.Manifest | None = None, home: Path | None = None
) -> a.Manifest:
    fd = os.open(archive, os.O_RDONLY)
    vol = os.open(image, os.O_RDWR | os.O_CREAT, 0o600)
    r = a.Reader(fd, archive.name, SCHEMA)
    try:
        r.header()
        r.tenant()
        with open(home, "wb") if home else open(os.devnull, "wb") as sink:
            return r.restore(vol, sink if home else None, parent)
    finally:
        r.close()
        os.close(fd)
        os.close(vol)


def refused(archive: Path, tmp: Path, parent: a.Manifest | None = None) -> str:
    with pytest.raises(HostdError) as err:
        restore(archive, tmp / "staging.img", parent)
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_round_trip_restores_the_image_sparse(tmp: Path) -> None:
    last = chunk(7, 4096)
    chunks = {0: chunk(1), 2: chunk(2), 3: last}
    m = write(tmp / "x.hostd", header(with_home=True), chunks, home=[b"h0", b"h1"])
    image = tmp / "img"
    got = restore(tmp / "x.hostd", image, home=tmp / "home.tar")
    assert got == m and sorted(got.chunks) == [0, 2, 3]
    data = image.read_bytes()
    assert len(data) == VOLUME
    assert data[:C] == chunk(1) and data[C : 2 * C] == bytes(C) and data[3 * C :] == last
    assert os.stat(image).st_blocks * 512 < 3 * C + 8192  # chunk 1 stayed a hole
    assert (tmp / "home.tar").read_bytes() == b"h0h1"


def test_chain_applies_changes_and_punches_removed_chunks(tmp: Path) -> None:
    full = write(tmp / "full", chunks={0: chunk(1), 1: chunk(2), 2: chunk(3)})
    # chunk 1 changed, chunk 2 gone (zeroed inside), chunk 0 the same (so not in the archive)
    inc = header(id="c" * 32, kind="incremental", parent=ID)
    sums = {0: full.chunks[0], 1: a.sha256(chunk(9))}
    write(tmp / "inc", inc, chunks={1: chunk(9)}, manifest_chunks=sums)
    image = tmp / "img"
    restore(tmp / "full", image)
    restore(tmp / "inc", image, parent=full)
    data = image.read_bytes()
    assert data[:C] == chunk(1) and data[C : 2 * C] == chunk(9)
    assert data[2 * C : 3 * C] == bytes(C)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert os.lseek(fd, 2 * C, os.SEEK_HOLE) == 2 * C  # punched, not written with zeros
    finally:
        os.close(fd)


def test_incremental_missing_an_unchanged_chunk_is_refused(tmp: Path) -> None:
    full = write(tmp / "full")
    inc = header(id="c" * 32, kind="incremental", parent=ID)
    lying = {0: a.sha256(chunk(5)), 2: full.chunks[2]}  # says 0 changed, but does not carry it
    write(tmp / "inc", inc, chunks={}, manifest_chunks=lying)
    assert "neither present nor unchanged" in refused(tmp / "inc", tmp, parent=full)


def test_parent_manifest_from_archive_or_copy(tmp: Path) -> None:
    m = write(tmp / "full")
    (tmp / "full.manifest.json").write_bytes(m.encode())
    for path in (tmp / "full", tmp / "full.manifest.json"):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert a.parent_manifest(fd, path.name, SCHEMA) == m
        finally:
            os.close(fd)


def test_garbage_is_refused(tmp: Path) -> None:
    (tmp / "junk").write_bytes(os.urandom(100000))
    assert "not a hostd archive or is damaged" in refused(tmp / "junk", tmp)


def test_a_plain_tar_is_refused(tmp: Path) -> None:
    src = tmp / "f"
    src.write_text("x")
    with tarfile.open(tmp / "t.tar", "w") as t:
        t.add(src, "hostd-archive.json")
    assert "not a hostd archive" in refused(tmp / "t.tar", tmp)


@pytest.mark.parametrize("keep", [0.2, 0.6, 0.999])
def test_truncated_is_refused(tmp: Path, keep: float) -> None:
    write(tmp / "full", chunks={n: os.urandom(C) for n in range(3)})
    data = (tmp / "full").read_bytes()
    (tmp / "cut").write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in refused(tmp / "cut", tmp) or "damaged" in refused(tmp / "cut", tmp)


def test_flipped_byte_in_the_stream_is_refused(tmp: Path) -> None:
    write(tmp / "full", chunks={0: os.urandom(C)})
    data = bytearray((tmp / "full").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp / "flipped").write_bytes(bytes(data))
    assert "damaged" in refused(tmp / "flipped", tmp)


def test_checksum_mismatch_is_refused(tmp: Path) -> None:
    write(tmp / "x", manifest_chunks={0: a.sha256(chunk(1)), 2: a.sha256(chunk(3))})
    assert "chunk 2 of x does not match its checksum" in refused(tmp / "x", tmp)


def test_home_checksum_mismatch_is_refused(tmp: Path) -> None:
    write(tmp / "x", header(with_home=True), home=[b"piece"], manifest_home=[a.sha256(b"other")])
    assert "the home in x does not match its checksums" in refused(tmp / "x", tmp)


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"format": 2}, "archive format 2, newer than this hostd's 1"),
        ({"schema": SCHEMA + 1}, f"state schema {SCHEMA + 1}, newer"),
        ({"chunk_size": C // 2}, "a chunk size other than"),
        ({"kind": "incremental"}, "a bad kind"),
        ({"user": "../root"}, "an invalid user name"),
        ({"volume_size": 0}, "a volume size out of bounds"),
    ],
)
def test_bad_headers_are_refused(tmp: Path, changes: dict[str, object], said: str) -> None:
    write(tmp / "x", header(**changes))
    assert said in refused(tmp / "x", tmp)


def test_unknown_record_field_is_refused(tmp: Path) -> None:
    write(tmp / "x", record=RECORD.encode()[:-2] + b', "extra": 1}\n')
    assert "other fields in its tenant.json" in refused(tmp / "x", tmp)


@pytest.mark.parametrize(
    "name",
    ["volume/../../x", "home/../..", "/etc/passwd", "volume/1", "volume/0000000a", "other"],
)
def test_unexpected_member_names_are_refused(tmp: Path, name: str) -> None:
    write(tmp / "x", chunks={}, extra=[(name, b"x")])
    assert "unexpected member" in refused(tmp / "x", tmp)


def test_chunk_past_the_volume_is_refused(tmp: Path) -> None:
    write(tmp / "x", chunks={4: chunk(1, 10)})
    assert "volume/00000004 past the volume's end" in refused(tmp / "x", tmp)


def test_chunk_longer_than_the_volume_end_is_refused(tmp: Path) -> None:
    write(tmp / "x", chunks={3: chunk(1, 8192)})
    assert "a volume/00000003 of 8192 bytes" in refused(tmp / "x", tmp)


def test_chunks_out_of_order_are_refused(tmp: Path) -> None:
    write(tmp / "x", chunks={}, extra=[("volume/00000002", b"x"), ("volume/00000001", b"y")])
    assert "out of order" in refused(tmp / "x", tmp)


def test_home_without_with_home_is_refused(tmp: Path) -> None:
    write(tmp / "x", home=[b"sneaked in"])
    assert "home/00000000 out of place" in refused(tmp / "x", tmp)


def test_oversized_header_is_refused_before_reading_it(tmp: Path) -> None:
    fd = os.open(tmp / "x", os.O_WRONLY | os.O_CREAT, 0o600)
    with a.Writer(fd) as w:
        w.add(a.HEADER, b" " * (a.MAX_JSON + 1))
        w.finish()
    os.close(fd)
    assert f"a hostd-archive.json of {a.MAX_JSON + 1} bytes" in refused(tmp / "x", tmp)


def raw_tar(path: Path, members: list[tarfile.TarInfo]) -> None:
    """An archive with tar members hostd never writes (links, devices), zstd-compressed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with a.Writer(fd) as w:
        for info in members:
            w._write(info.tobuf(tarfile.PAX_FORMAT))
        w.finish()
    os.close(fd)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE])
def test_links_and_devices_are_refused(tmp: Path, kind: bytes) -> None:
    info = tarfile.TarInfo(a.HEADER)
    info.type, info.linkname = kind, "/etc/shadow"
    raw_tar(tmp / "x", [info])
    assert "a member that is not a file" in refused(tmp / "x", tmp)


def test_members_after_the_manifest_are_refused(tmp: Path) -> None:
    m = write(tmp / "x")
    fd = os.open(tmp / "y", os.O_WRONLY | os.O_CREAT, 0o600)
    with a.Writer(fd) as w:
        w.add(a.HEADER, header().encode())
        w.add(a.TENANT, RECORD.encode())
        w.add("volume/00000000", chunk(1))
        w.add("volume/00000002", chunk(2))
        w.add(a.MANIFEST, m.encode())
        w.add("volume/00000003", b"late")
        w.finish()
    os.close(fd)
    assert "members after its manifest" in refused(tmp / "y", tmp)


def readers(paths: list[Path]) -> Iterator[a.Reader]:
    for p in paths:
        r = a.Reader(os.open(p, os.O_RDONLY), p.name, SCHEMA)
        r.header()
        yield r


def test_chain_order_is_checked(tmp: Path) -> None:
    write(tmp / "full")
    write(tmp / "inc", header(id="c" * 32, kind="incremental", parent=ID))
    write(tmp / "other", header(id="d" * 32, kind="incremental", parent=PARENT))
    a.check_chain(list(readers([tmp / "full", tmp / "inc"])))
    with pytest.raises(HostdError, match="inc is an incremental archive"):
        a.check_chain(list(readers([tmp / "inc", tmp / "full"])))
    with pytest.raises(HostdError, match=f"other does not follow full .its parent is {PARENT}"):
        a.check_chain(list(readers([tmp / "full", tmp / "other"])))


def test_writer_reports_a_full_disk(tmp: Path) -> None:
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with (
            pytest.raises(HostdError, match="the archive's file system is full"),
            a.Writer(fd) as w,
        ):
            for n in range(16):
                w.add(f"volume/{n:08d}", os.urandom(C))
            w.finish()
    finally:
        os.close(fd)
