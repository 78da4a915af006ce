"""Names become paths, cgroup names and hostnames: only tame ones get through."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.errors import RuntimeFailure
from runtime.names import check_name, hostname_for

valid_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True).filter(
    lambda n: ".." not in n
)
HOSTNAME_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@pytest.mark.parametrize("name", ["alice", "a.b-c_1", "A", "0day", "x" * 63])
def test_accepts_tame_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "a/b",
        "..",
        ".",
        ".hidden",
        "-x",
        "_x",
        "a..b",
        "x" * 64,
        "al ice",
        "alice\n",
        "café",
        "a\x00b",
    ],
)
def test_rejects_names_that_could_escape_or_confuse(name: str) -> None:
    with pytest.raises(RuntimeFailure, match="invalid container name"):
        check_name(name)


def test_error_names_what_was_checked() -> None:
    with pytest.raises(RuntimeFailure, match="invalid image name '../x'"):
        check_name("../x", "image")


@pytest.mark.parametrize(
    ("name", "hostname"),
    [("alice", "alice"), ("a_b.c", "a-b-c"), ("Web.Server_1", "web-server-1"), ("db_", "db")],
)
def test_hostname_for_replaces_characters_hostnames_lack(name: str, hostname: str) -> None:
    assert hostname_for(name) == hostname


@given(valid_names)
def test_every_valid_name_gives_a_valid_hostname_label(name: str) -> None:
    assert HOSTNAME_LABEL.fullmatch(hostname_for(name))
