"""Parsing /proc/self/mountinfo text, and which mounts lie below a path."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.mountinfo import Mount, _unescape, mounts_under, parse


def escape(path: str) -> str:
    """What the kernel does to paths in mountinfo (fs/proc_namespace.c: " \\t\\n\\\\")."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def line(target: str, fstype: str = "ext4", source: str = "/dev/sda1", opts: str = "rw") -> str:
    return f"36 25 8:1 / {escape(target)} rw,relatime shared:1 - {fstype} {escape(source)} {opts}"


def mounts(*targets: str) -> list[Mount]:
    return [Mount(t, "tmpfs", "tmpfs", ("rw",)) for t in targets]


paths = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1)


def test_parses_target_type_source_and_super_options() -> None:
    text = "31 23 0:28 / /sys/fs/cgroup rw,relatime shared:8 - tmpfs tmpfs rw,mode=755\n"
    assert parse(text) == [Mount("/sys/fs/cgroup", "tmpfs", "tmpfs", ("rw", "mode=755"))]


@pytest.mark.parametrize("optional", ["", " shared:1", " shared:1 master:2 propagate_from:3"])
def test_any_number_of_optional_fields(optional: str) -> None:
    text = f"36 25 8:1 / /mnt rw{optional} - ext4 /dev/sda1 rw,errors=remount-ro"
    assert parse(text) == [Mount("/mnt", "ext4", "/dev/sda1", ("rw", "errors=remount-ro"))]


def test_unescapes_octal_escapes_in_target_and_source() -> None:
    text = r"36 25 8:1 / /mnt/my\040disk\011x rw - ext4 /dev/disk\134by\040label rw"
    [m] = parse(text)
    assert m.target == "/mnt/my disk\tx"
    assert m.source == "/dev/disk\\by label"


def test_skips_blank_and_truncated_lines() -> None:
    text = "\n36 25 8:1 / /mnt rw\n" + line("/ok") + "\n\n"
    assert [m.target for m in parse(text)] == ["/ok"]


@given(paths)
def test_unescape_inverts_the_kernels_escaping(path: str) -> None:
    assert _unescape(escape(path)) == path


@given(paths, paths)
def test_parse_recovers_any_target_and_source(target: str, source: str) -> None:
    text = "\n".join([line("/before"), line(target, source=source), line("/after")])
    assert [(m.target, m.source) for m in parse(text)] == [
        ("/before", "/dev/sda1"),
        (target, source),
        ("/after", "/dev/sda1"),
    ]


def test_mounts_under_lists_path_and_descendants_deepest_first() -> None:
    found = mounts_under("/a/b", mounts("/", "/a", "/a/b", "/a/b/c", "/a/b/c/d", "/a/b/e"))
    assert set(found) == {"/a/b", "/a/b/c", "/a/b/c/d", "/a/b/e"}
    assert found[0] == "/a/b/c/d"
    assert found[-1] == "/a/b"


def test_mounts_under_does_not_match_a_sibling_sharing_the_prefix() -> None:
    assert mounts_under("/a/b", mounts("/a/bc", "/a/b-old/x", "/a/b/x")) == ["/a/b/x"]


def test_mounts_under_ignores_a_trailing_slash() -> None:
    assert mounts_under("/a/b/", mounts("/a/b", "/a/bc")) == ["/a/b"]


def test_mounts_under_unmounts_the_newer_of_two_siblings_first() -> None:
    # the overlay at rootfs uses the volume at data, mounted before it
    assert mounts_under("/c", mounts("/c/data", "/c/lower", "/c/rootfs")) == [
        "/c/rootfs",
        "/c/lower",
        "/c/data",
    ]


def test_mounts_under_lists_stacked_mounts_once() -> None:
    assert mounts_under("/a", mounts("/a/x", "/a/x")) == ["/a/x"]


@given(st.lists(st.lists(st.sampled_from("ab"), min_size=1, max_size=4), max_size=12))
def test_mounts_under_puts_every_mount_before_its_ancestors(parts: list[list[str]]) -> None:
    targets = ["/r/" + "/".join(p) for p in parts] + ["/r", "/rr"]
    found = mounts_under("/r", mounts(*targets))
    assert set(found) == set(targets) - {"/rr"}
    for i, outer in enumerate(found):
        assert not any(inner.startswith(outer + "/") for inner in found[i + 1 :])
