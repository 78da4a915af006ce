"""Host checks of the lifecycle that need no root: what the kernel knows."""

from __future__ import annotations

from runtime.lifecycle import has_filesystem


def test_has_filesystem_reads_the_kernels_list() -> None:
    assert has_filesystem("proc")  # built into every kernel hostd runs on
    assert not has_filesystem("hostd-no-such-fs")
    assert not has_filesystem("nodev")  # a flag column of /proc/filesystems, not a type
