"""Waiting on raw file descriptors in the event loop (sockets, pty masters, pidfds)."""

from __future__ import annotations

import asyncio


async def ready(fd: int, write: bool = False) -> None:
    """Wait until `fd` is readable (a pidfd: its process ended), or writable."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    add, remove = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )
    add(fd, wake)
    try:
        await done
    finally:
        remove(fd)
