"""Tenants on the bridge: their addresses, the host ports granted to them, and the one place
that hands the runtime the resulting forwards.

Checks live where their data is: the state refuses a grant to a non-tenant or over another
grant (in one transaction); here, ports the host itself uses or privileged ones; the runtime,
an address outside the subnet or already another container's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address

from hostd.backend import ContainerRuntime
from hostd.errors import HostdError
from hostd.state import State
from runtime.errors import Conflict, RuntimeFailure
from runtime.netplan import Forward, host_services
from runtime.records import Container

log = logging.getLogger(__name__)


class Addresses:
    def __init__(
        self,
        state: State,
        runtime: ContainerRuntime,
        privileged_ports: bool,
        listening: Callable[[], set[int]] = host_services,
    ) -> None:
        self.state = state
        self.runtime = runtime
        self.network = runtime.network_config()
        self.privileged_ports = privileged_ports
        self.listening = listening  # ports host services listen on
        self._apply = threading.Lock()  # one bridge and nft table for all tenants

    def _slot(self, address: str) -> int:
        return int(IPv4Address(address)) - int(self.network.address_for(0))

    def address(self, user: str, containers: Iterable[Container] | None = None) -> IPv4Address:
        """The tenant's address on the bridge: allocated once, then kept in the state. A new
        one avoids those of containers the state does not know (kept by `remove --keep-data`);
        `containers` is the runtime's list when the caller has it."""
        slot = self.state.address_slots().get(user)
        if slot is None:
            others = self.runtime.containers() if containers is None else containers
            held = [self._slot(c.address) for c in others if c.address and c.name != user]
            slot = self.state.address_index(user, exclude=held)
        return self.network.address_for(slot)

    def adopt(self, user: str, address: str | None) -> None:
        """Give a re-added tenant the address its kept container has, if still free."""
        self.state.address_index(user, prefer=None if address is None else self._slot(address))

    def forwards(self) -> list[Forward]:
        return [Forward(a, b, self.address(u)) for a, b, u in self.state.port_grants()]

    def apply(self) -> None:
        """Bridge and nft rules exactly as the state says (when hostd starts, when a start
        finds the bridge gone, and after every change)."""
        with self._apply:
            self.runtime.setup_network(self.forwards())

    def reattach(self, users: Iterable[str]) -> list[str]:
        """Put these running tenants' veths back on the bridge where they are off it; what was
        done."""
        done = []
        for user in self.runtime.unattached(users):
            try:
                if self.runtime.ensure_attached(user):
                    done.append(f"re-attached {user} to the bridge")
            except RuntimeFailure as exc:  # stopped meanwhile, say: the others still matter
                done.append(f"cannot re-attach {user}: {exc}")
        return done

    def grant(self, user: str, first: int, last: int) -> None:
        self.check_grant(first, last)
        self.state.grant_ports(user, first, last)
        try:
            self.apply()
        except BaseException:
            self.state.revoke_ports(user, first, last)
            raise
        self.state.log_event(user, f"ports grant {first}-{last}")

    def check_grant(self, first: int, last: int) -> None:
        """What the host refuses of a grant (privileged ports, a host service listening);
        the state refuses ports granted to someone else."""
        if first < 1024 and not self.privileged_ports:
            raise HostdError(
                f"ports below 1024 ({first}) are privileged",
                "grant ports >= 1024, or set [network] privileged_ports = true",
            )
        busy = sorted(p for p in self.listening() if first <= p <= last)
        if busy:
            raise Conflict(
                f"port {busy[0]} is in use on the host: a service listens on it",
                "grant other ports, or move that service first",
            )

    def revoke(self, user: str, first: int, last: int) -> None:
        self.state.revoke_ports(user, first, last)
        self.apply()
        self.state.log_event(user, f"ports revoke {first}-{last}")
