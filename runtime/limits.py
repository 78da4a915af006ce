"""Resource limits of a container, and how they become cgroup settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from runtime.errors import RuntimeFailure

MAX_LIMIT = 2**63 - 1  # the largest a limit may be (what SQLite and the kernel's s64 hold)
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    """What a container may use; None is unlimited. The one limits type: hostd's defaults,
    a tenant's quota and a container's record all use it."""

    cpus: float | None = None  # hard cap in CPUs
    memory: int | None = None  # bytes of memory (swap included)
    pids: int | None = None  # tasks at once
    disk: int | None = None  # bytes of the data volume

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not 0 < value <= MAX_LIMIT:  # false for NaN, infinity
                raise RuntimeFailure(
                    f"limit {f.name} = {value} is out of range",
                    "give a positive number, or none for unlimited",
                )

    def resources(self) -> dict[str, Any]:
        """linux.resources entries (besides devices) for these limits."""
        res: dict[str, Any] = {}
        if self.memory is not None:  # memory+swap = memory: no swapping past the limit
            res["memory"] = {"limit": self.memory, "swap": self.memory}
        if self.cpus is not None:  # a hard cap, and a share in proportion under contention
            res["cpu"] = {
                "quota": round(self.cpus * CPU_PERIOD_US),
                "period": CPU_PERIOD_US,
                "shares": self.shares(),
            }
        if self.pids is not None:
            res["pids"] = {"limit": self.pids}
        return res

    def shares(self) -> int:
        """cpu.shares: 1024 per CPU of the cap (the kernel's default for one)."""
        return round(1024 * self.cpus) if self.cpus is not None else 1024

    def cpu_set(self, host_cpus: int, seed: int) -> str:
        """The CPUs the container may run on: ceil(cpus) of them (so `nproc` inside tells its
        share), starting at a CPU chosen by `seed` so containers spread over the host."""
        if self.cpus is None or math.ceil(self.cpus) >= host_cpus:
            return f"0-{host_cpus - 1}" if host_cpus > 1 else "0"
        first = seed % host_cpus
        cpus = sorted((first + i) % host_cpus for i in range(math.ceil(self.cpus)))
        return ",".join(str(c) for c in cpus)

    def runc_update_args(self) -> list[str]:
        """`runc update` flags setting every limit, lifting the ones that are None."""
        quota = round(self.cpus * CPU_PERIOD_US) if self.cpus is not None else -1
        memory = str(self.memory if self.memory is not None else -1)
        return [
            "--memory",
            memory,
            "--memory-swap",
            memory,
            "--cpu-period",
            str(CPU_PERIOD_US),
            "--cpu-quota",
            str(quota),
            "--cpu-share",
            str(self.shares()),
            "--pids-limit",
            str(self.pids if self.pids is not None else -1),
        ]
