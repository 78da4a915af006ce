"""volume.data_chunks: the chunks an export reads of a sparse volume image."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from runtime import volume

CHUNK = 64 << 10


def image(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


def test_holes_and_zero_chunks_are_left_out(tmp_path: Path) -> None:
    img = image(
        tmp_path / "v.img",
        10 * CHUNK,
        {
            0: b"head",
            3 * CHUNK: bytes(CHUNK),  # written, but all zeros: left out all the same
            5 * CHUNK - 1: b"xy",  # across a boundary: two chunks
            9 * CHUNK + 7: b"tail",
        },
    )
    found = dict(volume.data_chunks(img, CHUNK))
    assert sorted(found) == [0, 4, 5, 9]
    assert found[0][:4] == b"head" and len(found[0]) == CHUNK
    assert found[4][-1:] == b"x" and found[5][:1] == b"y"
    assert found[9][7:11] == b"tail"


def test_the_last_chunk_is_short_and_a_file_of_holes_has_none(tmp_path: Path) -> None:
    img = image(tmp_path / "v.img", 2 * CHUNK + 100, {2 * CHUNK + 99: b"z"})
    assert [(i, len(b)) for i, b in volume.data_chunks(img, CHUNK)] == [(2, 100)]
    empty = image(tmp_path / "e.img", 50 * CHUNK, {})
    assert list(volume.data_chunks(empty, CHUNK)) == []
    assert list(volume.data_chunks(image(tmp_path / "z.img", 0, {}), CHUNK)) == []


@given(st.dictionaries(st.integers(0, 8 * CHUNK - 1), st.binary(min_size=1, max_size=300)))
def test_chunks_rebuild_the_image(writes: dict[int, bytes]) -> None:
    """Writing the chunks back into an empty file of the same size gives the same bytes."""
    base = Path(os.environ.get("TMPDIR", "/tmp"))
    src, dst = base / f"chunks-src-{os.getpid()}", base / f"chunks-dst-{os.getpid()}"
    try:
        image(src, 8 * CHUNK, writes)
        with open(dst, "wb") as out:
            out.truncate(8 * CHUNK)
            for index, data in volume.data_chunks(src, CHUNK):
                assert data.strip(b"\0")
                os.pwrite(out.fileno(), data, index * CHUNK)
        assert dst.read_bytes() == src.read_bytes()
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
