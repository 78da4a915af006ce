"""Accounts inside a container, parsed from its passwd and group files."""

from __future__ import annotations

from hostd.passwd import Entry, lookup

PASSWD = """root:x:0:0:root:/root:/bin/bash
# a comment
broken line
alice:x:1001:1001:Alice,,,:/home/alice:/bin/zsh
bob:x:notanumber:1002::/home/bob:/bin/sh
carol:x:1003:1003:::
"""
GROUP = """root:x:0:
sudo:x:27:alice,carol
docker:x:998:alice
alice:x:1001:alice
odd:x:zz:alice
"""


def test_lookup_gives_ids_home_shell_and_supplementary_groups() -> None:
    assert lookup(PASSWD, GROUP, "alice") == Entry(
        "alice", 1001, 1001, "/home/alice", "/bin/zsh", (27, 998)
    )


def test_unknown_and_malformed_accounts_are_none() -> None:
    assert lookup(PASSWD, GROUP, "nobody-here") is None
    assert lookup(PASSWD, GROUP, "bob") is None
    assert lookup(PASSWD, GROUP, "broken line") is None


def test_empty_home_and_shell_get_defaults() -> None:
    assert lookup(PASSWD, GROUP, "carol") == Entry("carol", 1003, 1003, "/", "/bin/sh", (27,))
