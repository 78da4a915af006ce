"""The network of containers as plain data: addresses, forwards, the nft ruleset, resolv.conf.

Every container with an address sits behind a host bridge, reaches the outside through NAT,
and reaches neither the other containers nor the host's services. A forward sends a host port
(range) to the same port of one container; the host's users, root aside, reach containers only
that way. Everything here is a pure function of the settings (stdlib only, cheap to import);
runtime.network applies it with netlink and nft.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from runtime.errors import RuntimeFailure

PREFIX = "hostd"  # every link and table we create is named so
IFNAMSIZ = 15  # longest interface name the kernel takes
CONTAINER_IF = "eth0"  # the container's end of its veth pair
MIN_SUBNET = 28  # longest prefix: 16 addresses, 13 for containers
_BRIDGE = re.compile(rf"{PREFIX}[A-Za-z0-9]{{0,{IFNAMSIZ - len(PREFIX)}}}")
_TABLE = re.compile(rf"{PREFIX}[A-Za-z0-9_]{{0,58}}")


def check_bridge(name: str) -> str:
    if not isinstance(name, str) or not _BRIDGE.fullmatch(name):
        raise RuntimeFailure(
            f"invalid bridge name {name!r}",
            f'use "{PREFIX}" followed by up to {IFNAMSIZ - len(PREFIX)} letters or digits',
        )
    return name


def is_project_table(name: str) -> bool:
    """Whether an nft table's name is one this project makes."""
    return bool(_TABLE.fullmatch(name))


def check_nft_table(name: str) -> str:
    if not isinstance(name, str) or not is_project_table(name):
        raise RuntimeFailure(
            f"invalid nft table name {name!r}",
            f'use "{PREFIX}" followed by up to 58 letters, digits or "_"',
        )
    return name


def check_subnet(subnet: str) -> str:
    """The bridge's subnet: a private IPv4 network with room for a few containers."""
    try:
        net = IPv4Network(subnet)
    except (ValueError, TypeError):
        raise RuntimeFailure(
            f"invalid subnet {subnet!r}", 'use an IPv4 network like "10.213.0.0/16"'
        ) from None
    if net.prefixlen > MIN_SUBNET or not net.is_private:
        raise RuntimeFailure(
            f"unusable subnet {subnet}",
            f"use a private IPv4 network of at least 16 addresses (/{MIN_SUBNET})",
        )
    return str(net)


@dataclass(frozen=True)
class NetworkConfig:
    bridge: str = "hostd0"
    subnet: str = "10.213.0.0/16"  # the bridge takes the first host address, containers the rest
    nft_table: str = "hostd"
    # Nameservers for the containers' resolv.conf. The bridge address among them opens port 53
    # there to containers, for a resolver the admin runs on it; others are reached through NAT.
    dns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bridge(self.bridge)
        check_nft_table(self.nft_table)
        check_subnet(self.subnet)
        for server in self.dns:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise RuntimeFailure(
                    f"invalid nameserver {server!r}", "give IP addresses"
                ) from None

    def network(self) -> IPv4Network:
        return IPv4Network(self.subnet)

    def bridge_address(self) -> IPv4Interface:
        net = self.network()
        return IPv4Interface((net.network_address + 1, net.prefixlen))

    def capacity(self) -> int:
        """How many container addresses the subnet has (all but network, bridge, broadcast)."""
        return self.network().num_addresses - 3

    def address_for(self, index: int) -> IPv4Address:
        """The address number `index` (0, 1, ...) of the containers: .2, .3, ..."""
        if index < 0:
            raise ValueError(f"negative address index {index}")
        if index >= self.capacity():
            raise RuntimeFailure(
                f"subnet {self.subnet} is full ({self.capacity()} addresses)",
                "configure a larger subnet",
            )
        return self.network().network_address + 2 + index

    def check_address(self, address: IPv4Address) -> IPv4Address:
        """`address`, if the subnet may give it to a container."""
        net = self.network()
        first, last = net.network_address + 2, net.broadcast_address - 1
        if not first <= address <= last:
            raise RuntimeFailure(
                f"{address} is not a container address of {self.subnet}",
                f"use one from {first} to {last}",
            )
        return address


@dataclass(frozen=True)
class Forward:
    """Host ports first..last (TCP and UDP) forwarded to the same ports of `address`."""

    first: int
    last: int
    address: IPv4Address

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.last <= 65535:
            raise RuntimeFailure(
                f"invalid port range {self.first}-{self.last}",
                "use ports from 1 to 65535, the first not above the last",
            )

    def ports(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def veth_name(container: str) -> str:
    """Host end of the container's veth pair: `hostd` + 10 hex digits, stable across runs."""
    return PREFIX + _digest(container).hex()[: IFNAMSIZ - len(PREFIX)]


def _mac(digest: bytes) -> str:
    """A locally administered unicast MAC."""
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def container_mac(container: str) -> str:
    """MAC of the container's eth0: 02 + the same hex digits as its veth name, so either one
    finds the other (and detach can find its neighbour entry after the veth is gone)."""
    return _mac(_digest(container))


def bridge_mac(bridge: str) -> str:
    # Fixed, or the bridge would take the lowest port MAC and change it whenever that container
    # leaves, leaving the others with a stale gateway entry. (No container name has a space.)
    return _mac(_digest(f"bridge {bridge}"))


# -- the nft ruleset -----------------------------------------------------------------------


def ruleset(cfg: NetworkConfig, forwards: Sequence[Forward] = ()) -> str:
    """The whole nft table: NAT, isolation, forwards. Pure and deterministic."""
    ordered = sorted(forwards, key=lambda f: (f.first, f.last, f.address))
    for forward in ordered:
        cfg.check_address(forward.address)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.first <= a.last:
            raise RuntimeFailure(
                f"ports {a.ports()} ({a.address}) and {b.ports()} ({b.address}) overlap",
                "forward every host port to one container only",
            )
    br, net, gw = f'"{cfg.bridge}"', cfg.subnet, cfg.bridge_address().ip
    dns = any(ipaddress.ip_address(s) == gw for s in cfg.dns)
    dnat = [
        f"meta l4proto {{ tcp, udp }} th dport {f.ports()} dnat ip to {f.address}" for f in ordered
    ]
    chains: list[tuple[str, list[str]]] = [
        # Forwards, for traffic to any local address, from elsewhere (not from a container)
        # and from the host itself (127.0.0.1 included, hence the masquerade below).
        (
            "prerouting",
            [
                "type nat hook prerouting priority dstnat; policy accept;",
                f"iifname != {br} meta nfproto ipv4 fib daddr type local jump forwards",
            ],
        ),
        (
            "output",
            [
                "type nat hook output priority -100; policy accept;",
                "meta nfproto ipv4 fib daddr type local jump forwards",
            ],
        ),
        ("forwards", dnat),
        (
            "postrouting",
            [
                "type nat hook postrouting priority srcnat; policy accept;",
                f"oifname != {br} ip saddr {net} masquerade",
                # 127.0.0.1:port DNATed to a container (needs route_localnet on the bridge)
                f"oifname {br} ip saddr 127.0.0.0/8 masquerade",
            ],
        ),
        # Containers reach no host service: only answers, and DNS if the bridge serves it.
        # This also closes what route_localnet opens (container packets to 127.0.0.1).
        (
            "input",
            [
                "type filter hook input priority filter; policy accept;",
                f"iifname {br} jump from_containers",
            ],
        ),
        (
            "from_containers",
            [
                "ct state established,related accept",
                *([f"ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 accept"] if dns else []),
                "drop",
            ],
        ),
        # The host's other users reach containers on forwarded ports only, as everybody else:
        # root (hostd, the admin) may connect directly.
        (
            "local_out",
            [
                "type filter hook output priority filter; policy accept;",
                f"oifname {br} jump to_containers",
            ],
        ),
        (
            "to_containers",
            [
                "ct state established,related accept",
                "ct status dnat accept",
                "meta skuid 0 accept",
                "reject",
            ],
        ),
        (
            "forward",
            [
                "type filter hook forward priority filter; policy accept;",
                # container to container through the host (ports are isolated on the bridge as well)
                f"iifname {br} oifname {br} drop",
                # out: IPv4 from the subnet only (no spoofed sources, no IPv6)
                f"iifname {br} ip saddr {net} accept",
                f"iifname {br} drop",
                # in: answers and forwarded ports only
                f"oifname {br} ct state established,related accept",
                f"oifname {br} ct status dnat accept",
                f"oifname {br} drop",
            ],
        ),
    ]
    body = "".join(
        f"\tchain {name} {{\n" + "".join(f"\t\t{rule}\n" for rule in rules) + "\t}\n"
        for name, rules in chains
    )
    return f"table inet {cfg.nft_table} {{\n{body}}}\n"


# -- MAC and address pinning per bridge port (nft bridge family) -----------------------------
#
# A table of the family `bridge`, named as the inet one, sees every frame a port brings in,
# before the bridge or the host's IP stack does. A verdict map sends the frames of each
# container's veth to that port's own chain, which passes only its MAC with its IPv4 address
# (in ARP too) and drops the rest: another container's address or MAC, IPv6, other ethertypes.
# The bridge's ports are told from other hostd bridges' by their interface group (kernels
# without CONFIG_NFT_BRIDGE_META have no `meta ibrname`): a port of the group that has no
# pin passes nothing. attach pins a port before the veth joins the bridge; detach unpins it.


def port_group(cfg: NetworkConfig) -> int:
    """Interface group of the bridge's ports: from its name, never 0 (the default group)."""
    return int.from_bytes(_digest(f"group {cfg.bridge}")[:4], "big") % 0x7FFFFFFF + 1


def _port_chain(container: str) -> str:
    return f"port_{veth_name(container)}"


def bridge_ruleset(cfg: NetworkConfig) -> str:
    """The bridge-family table. Applying it again keeps the ports already pinned."""
    table, group = f"bridge {cfg.nft_table}", port_group(cfg)
    return (
        f"table {table} {{\n"
        "\tmap ports { type ifname : verdict; }\n"
        "\tchain prerouting { type filter hook prerouting priority filter; policy accept; }\n"
        "}\n"
        f"flush chain {table} prerouting\n"
        f"add rule {table} prerouting iifgroup {group} iifname vmap @ports\n"
        f"add rule {table} prerouting iifgroup {group} drop\n"
    )


def pin_script(cfg: NetworkConfig, container: str, address: IPv4Address) -> str:
    """Pin the container's port to its MAC and address (replacing an earlier pin)."""
    cfg.check_address(address)
    veth, mac, chain = veth_name(container), container_mac(container), _port_chain(container)
    rules = (
        f"ether saddr != {mac} drop",
        f"arp saddr ether {mac} arp saddr ip {address} accept",
        f"ip saddr {address} accept",
        "drop",
    )
    path = f"bridge {cfg.nft_table} {chain}"
    return (
        f"add chain {path}\nflush chain {path}\n"
        + "".join(f"add rule {path} {rule}\n" for rule in rules)
        + f'add element bridge {cfg.nft_table} ports {{ "{veth}" : jump {chain} }}\n'
    )


def unpin_script(tables: Sequence[str], container: str) -> str:
    """Remove the container's pin from each bridge table, whether it is there or not."""
    veth, chain = veth_name(container), _port_chain(container)
    return "".join(
        f"add chain bridge {t} {chain}\n"
        f'add element bridge {t} ports {{ "{veth}" : jump {chain} }}\n'
        f'delete element bridge {t} ports {{ "{veth}" }}\n'
        f"delete chain bridge {t} {chain}\n"
        for t in tables
    )


def table_script(table: str, text: str = "", family: str = "inet") -> str:
    """One transaction: create the table if missing (so that deleting it cannot fail),
    delete it, load `text` (none: the table is removed)."""
    return f"table {family} {table}\ndelete table {family} {table}\n{text}"


# -- the host's own services ----------------------------------------------------------------

_LISTEN, _UNCONNECTED = "0A", "07"  # TCP_LISTEN; TCP_CLOSE, as a bound UDP socket shows


def host_services(proc_net: Path = Path("/proc/net")) -> set[int]:
    """Ports on which sockets of the caller's network namespace listen (TCP) or wait (bound,
    unconnected UDP), on any address. A forward of one of them would DNAT its traffic away from
    the host's service: a daemon's own port, a database on 127.0.0.1, ..."""
    ports = set()
    for name, state in (
        ("tcp", _LISTEN),
        ("tcp6", _LISTEN),
        ("udp", _UNCONNECTED),
        ("udp6", _UNCONNECTED),
    ):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
        for line in lines:
            local, status = line.split()[1:4:2]
            if status == state:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


# -- resolv.conf ---------------------------------------------------------------------------


def resolv_conf(cfg: NetworkConfig) -> str:
    """Text of the containers' /etc/resolv.conf."""
    lines = ["# written by hostd"]
    lines += [f"nameserver {server}" for server in cfg.dns] or ["# no nameserver configured"]
    return "\n".join(lines) + "\n"


# Behind systemd-resolved, /etc/resolv.conf names only its stub 127.0.0.53; the servers it
# forwards to are listed in the second file.
RESOLV_CONFS = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))


def host_nameservers(paths: Sequence[Path] = RESOLV_CONFS) -> tuple[str, ...]:
    """The host's nameservers a container can use, from the first of `paths` that has any: IPv4
    (containers have no IPv6) and not loopback (a local resolver is not reachable from one)."""
    for path in paths:
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        found: list[str] = []
        for line in text.splitlines():
            words = line.split()
            if len(words) < 2 or words[0] != "nameserver":
                continue
            try:
                addr = ipaddress.ip_address(words[1])
            except ValueError:
                continue
            if addr.version == 4 and not addr.is_loopback and str(addr) not in found:
                found.append(str(addr))
        if found:
            return tuple(found)
    return ()
