"""What `hostctl status` and `user show` report of a tenant: its state and what it uses."""

from __future__ import annotations

from dataclasses import dataclass

from hostd.backend import ContainerRuntime
from hostd.startqueue import STARTING
from hostd.state import TenantRecord
from runtime.limits import Limits


@dataclass(frozen=True)
class TenantStatus:
    user: str
    state: str  # stopped | running | ... (the runtime's), failed, or the phase while not ready
    uptime: float | None  # seconds since its init started
    memory: int | None  # bytes in use
    cpu_seconds: float | None
    pids: int | None
    disk: int | None  # bytes of its storage, None if not known
    quota: Limits
    range_start: int
    image: str
    reason: str | None = None  # why it failed (state "failed") or is stopped (auto-stopped)
    place: int | None = None  # in the start queue (state "queued"), from 1


def tenant_status(
    runtime: ContainerRuntime, record: TenantRecord, place: int | None = None
) -> TenantStatus:
    """A tenant being added or removed has no container to ask: its phase stands for it.
    One in the start queue (`place`: hostd.startqueue's) is `queued` there, then `starting`
    until ready. One whose last start failed is `failed`, with the reason, until a start
    succeeds or an admin stops it (a container that booted degraded may still be running).
    One stopped for idleness (`dormant`: idle since when) is `stopped`, saying so."""
    t, quota, failure = record.tenant, record.quota, record.failure
    if t.phase != "ready":
        return TenantStatus(
            t.user, t.phase, None, None, None, None, None, quota, t.range_start, t.image
        )
    report = runtime.report(t.user)
    st, used = report.state, report.usage
    failed = failure is not None and place is None
    state = "failed" if failed else st.status
    reason = failure if failed else None
    if place is not None:
        state = "starting" if place == STARTING else "queued"
    elif not failed and record.dormant is not None and st.status == "stopped":
        reason = f"idle since {record.dormant}; starts at the next login"
    return TenantStatus(
        user=t.user,
        state=state,
        reason=reason,
        place=place or None,
        uptime=report.uptime,
        memory=used.memory if used else None,
        cpu_seconds=used.cpu_seconds if used else None,
        pids=used.pids if used else None,
        disk=report.disk,
        quota=quota,
        range_start=t.range_start,
        image=t.image,
    )
