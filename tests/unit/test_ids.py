"""ID ranges: validated at construction, so a bad one never reaches a uid_map."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.errors import RuntimeFailure
from runtime.ids import MAX_ID, MIN_START, RANGE_SIZE, IdRange

MAX_START = MAX_ID - RANGE_SIZE + 1
starts = st.integers(MIN_START, MAX_START)


@st.composite
def nearby_starts(draw: st.DrawFn) -> tuple[int, int]:
    """Two starts, often close enough to overlap or touch."""
    a = draw(starts)
    near = st.integers(max(MIN_START, a - 2 * RANGE_SIZE), min(MAX_START, a + 2 * RANGE_SIZE))
    return a, draw(st.one_of(starts, near))


def test_valid_range_properties() -> None:
    r = IdRange(65536)
    assert (r.start, r.end, r.root, r.size) == (65536, 131071, 65536, 65536)
    assert str(r) == "65536-131071"
    assert r.map_line() == "0 65536 65536\n"


@pytest.mark.parametrize("start", [0, -1, -65536])
def test_start_at_or_below_zero_is_refused_as_mapping_root(start: int) -> None:
    with pytest.raises(RuntimeFailure, match="root"):
        IdRange(start)


@pytest.mark.parametrize("start", [1, 1000, MIN_START - 1])
def test_start_in_host_account_space_is_refused(start: int) -> None:
    with pytest.raises(RuntimeFailure) as info:
        IdRange(start)
    assert f"below {MIN_START}" in info.value.cause
    assert "root" not in info.value.cause


@pytest.mark.parametrize("size", [0, 1, RANGE_SIZE - 1, RANGE_SIZE + 1, 2 * RANGE_SIZE])
def test_only_the_standard_size_is_accepted(size: int) -> None:
    with pytest.raises(RuntimeFailure, match=str(size)):
        IdRange(MIN_START, size)


def test_last_possible_range_ends_at_the_largest_id() -> None:
    assert IdRange(MAX_START).end == MAX_ID == 2**32 - 2


@pytest.mark.parametrize("start", [MAX_START + 1, 2**32 - 1, 2**40])
def test_range_past_the_largest_id_is_refused(start: int) -> None:
    with pytest.raises(RuntimeFailure, match="largest host ID"):
        IdRange(start)


def test_adjacent_ranges_do_not_overlap_but_shifted_ones_do() -> None:
    a = IdRange(MIN_START)
    assert not a.overlaps(IdRange(MIN_START + RANGE_SIZE))
    assert a.overlaps(IdRange(MIN_START + RANGE_SIZE - 1))
    assert a.overlaps(a)


@given(nearby_starts())
def test_overlaps_is_symmetric_interval_intersection(pair: tuple[int, int]) -> None:
    a, b = IdRange(pair[0]), IdRange(pair[1])
    shared = range(max(a.start, b.start), min(a.end, b.end) + 1)
    assert a.overlaps(b) == b.overlaps(a) == (len(shared) > 0)


@given(starts)
def test_map_line_maps_zero_to_start_for_the_whole_range(start: int) -> None:
    inside, outside, count = map(int, IdRange(start).map_line().split())
    assert (inside, outside, count) == (0, start, RANGE_SIZE)
