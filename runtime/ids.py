"""ID ranges a container's user namespace maps: validated once, then trusted."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import RuntimeFailure

RANGE_SIZE = 65536
MIN_START = 65536  # IDs below belong to the host's own system and human accounts
MAX_ID = 2**32 - 2  # 2**32 - 1 is the kernel's "invalid ID"


@dataclass(frozen=True)
class IdRange:
    """`size` host IDs from `start`, seen inside as 0 .. size-1 (for users and groups alike)."""

    start: int
    size: int = RANGE_SIZE

    def __post_init__(self) -> None:
        if self.size != RANGE_SIZE:
            raise RuntimeFailure(
                f"ID range size {self.size} is not supported",
                f"give every container exactly {RANGE_SIZE} IDs",
            )
        if self.start < MIN_START:
            raise RuntimeFailure(
                f"ID range starting at {self.start} would map host IDs below {MIN_START}"
                + (" including root" if self.start <= 0 else ""),
                f"pick a start >= {MIN_START} from /etc/subuid's free space",
            )
        if self.end > MAX_ID:
            raise RuntimeFailure(
                f"ID range {self.start}-{self.end} goes past the largest host ID {MAX_ID}",
                "pick a lower start",
            )

    @property
    def end(self) -> int:
        """Last host ID in the range (inclusive)."""
        return self.start + self.size - 1

    @property
    def root(self) -> int:
        """The host ID that is root inside."""
        return self.start

    def overlaps(self, other: IdRange) -> bool:
        return self.start <= other.end and other.start <= self.end

    def map_line(self) -> str:
        """The /proc/PID/uid_map (and gid_map) content for this range."""
        return f"0 {self.start} {self.size}\n"

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"
