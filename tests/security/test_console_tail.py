"""The console log explains failed starts to admins and users: hostd reads what the container
wrote there. A planted symlink must not make it read a host file, escape sequences must not
reach an admin's terminal, and a huge log costs only its tail."""

from __future__ import annotations

import os

from runtime.containers import CONSOLE_TAIL, LINE_MAX, Runtime
from tests.conftest import ContainerFactory


def test_a_planted_symlink_is_not_followed(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("console", start=False)
    log = rt.console_log(rt.get(name))
    log.unlink(missing_ok=True)
    os.symlink("/etc/shadow", log)
    assert rt.boot_messages(name) == []
    os.symlink("../../../../../../etc/shadow", log.with_name("link"))
    log.unlink()
    os.rename(log.with_name("link"), log)
    assert rt.boot_messages(name) == []


def test_escapes_and_control_characters_are_removed(
    rt: Runtime, make_container: ContainerFactory
) -> None:
    name = make_container("console", start=False)
    log = rt.console_log(rt.get(name))
    log.write_bytes(
        b"\x1b]0;owned title\x07\x1b[2J\x1b[0;1;31m[FAILED]\x1b[0m Failed to start x.\r\n"
        b"bell\x07 and back\x08space\n\n   \nlast \xff line\n"
    )
    lines = rt.boot_messages(name)
    assert lines == ["[FAILED] Failed to start x.", "bell and backspace", "last \ufffd line"]
    assert all(ch.isprintable() for line in lines for ch in line)


def test_only_the_tail_of_a_huge_log_is_read(rt: Runtime, make_container: ContainerFactory) -> None:
    name = make_container("console", start=False)
    log = rt.console_log(rt.get(name))
    with open(log, "wb") as f:
        f.truncate(1 << 40)  # a sparse terabyte: reading it all would never end
        f.seek(1 << 40)
        f.write(b"x" * 1000 + b"\n" + b"the end\n")
    lines = rt.boot_messages(name)
    assert lines[-1] == "the end" and len(lines[-2]) == LINE_MAX
    assert sum(len(line) for line in lines) <= CONSOLE_TAIL
