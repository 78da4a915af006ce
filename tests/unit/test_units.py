"""Sizes, CPUs and counts as admins type them: what is accepted, and what the error says."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd.errors import HostdError
from hostd.units import MAX, format_size, parse_count, parse_cpus, parse_size

K, M, G, T = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 * M),
        ("2G", 2 * G),
        ("10GiB", 10 * G),
        ("10gib", 10 * G),
        ("10GB", 10 * G),
        ("1.5G", 3 * G // 2),
        ("100000", 100000),
        ("100000B", 100000),
        ("1T", T),
        ("4k", 4 * K),
        (" 2 G ", 2 * G),
        ("1.0001K", 1024),  # fractions of a byte are cut off
        ("1048576T", MAX),
    ],
)
def test_parse_size_accepts(text: str, size: int) -> None:
    assert parse_size(text, "memory") == size


@pytest.mark.parametrize(
    "text",
    ["-1", "0", "0G", "10XB", "", "abc", "1.5", "1.5B", "G", "1iB", "1.G", ".5G", "1e3", "١٢"],
)
def test_parse_size_rejects_with_value_and_what(text: str) -> None:
    with pytest.raises(HostdError) as info:
        parse_size(text, "memory")
    assert str(info.value) == (
        f"invalid memory size {text!r}: use a positive size like 512M, 2G or 1T"
    )


@pytest.mark.parametrize("text", ["1048577T", "2000000000000000000", "9" * 30 + "T"])
def test_parse_size_rejects_absurd_sizes(text: str) -> None:
    with pytest.raises(HostdError) as info:
        parse_size(text, "disk")
    assert str(info.value) == f"disk size {text!r} is too large: use at most 1048576T"


def test_parse_size_rejects_huge_input_quickly() -> None:
    with pytest.raises(HostdError, match="invalid disk size"):
        parse_size("9" * 100_000, "disk")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (512 * M, "512M"),
        (2 * G, "2G"),
        (3 * G // 2, "1.5G"),
        (5 * T // 4, "1.25T"),
        (1025 * K, "1025K"),  # exact beats short
        (1000, "1000"),
        (123456789, "117.74M"),  # not exact in any unit: rounded
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


# Other sizes are rounded for display (see 123456789 above): only these must parse back exactly.
multiples_of_units = st.one_of(
    st.integers(1, K - 1),
    st.sampled_from([K, M, G, T]).flatmap(
        lambda unit: st.integers(1, MAX // unit).map(lambda n: n * unit)
    ),
)


@given(multiples_of_units)
def test_format_size_parses_back(size: int) -> None:
    assert parse_size(format_size(size), "memory") == size


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0.5", 0.5), ("2", 2.0), ("8", 8.0), ("1.234", 1.23), ("0.01", 0.01), (" 3 ", 3.0)],
)
def test_parse_cpus_accepts(text: str, cpus: float) -> None:
    assert parse_cpus(text, 8) == cpus


@pytest.mark.parametrize("text", ["0", "0.0", "0.001", "-1", "-0.5", "", "two", "1e2", "nan"])
def test_parse_cpus_rejects(text: str) -> None:
    with pytest.raises(HostdError) as info:
        parse_cpus(text, 8)
    assert str(info.value) == f"invalid cpus {text!r}: use a positive number of CPUs like 0.5 or 2"


def test_parse_cpus_says_how_many_the_host_has() -> None:
    with pytest.raises(HostdError) as info:
        parse_cpus("8.5", 8)
    assert str(info.value) == (
        "cpus '8.5' is more than this host has: use at most 8 (its CPU count)"
    )


@pytest.mark.parametrize(("text", "count"), [("1", 1), ("4096", 4096), (" 100 ", 100)])
def test_parse_count_accepts(text: str, count: int) -> None:
    assert parse_count(text, "pids") == count


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "1e3", "", "many", "0x10"])
def test_parse_count_rejects(text: str) -> None:
    with pytest.raises(HostdError) as info:
        parse_count(text, "pids")
    assert str(info.value) == f"invalid pids {text!r}: use a positive whole number like 4096"


def test_parse_count_rejects_absurd_counts() -> None:
    with pytest.raises(HostdError, match="pids '9999999999999999999' is too large"):
        parse_count("9" * 19, "pids")
