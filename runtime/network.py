"""Tenant networking: a host bridge, one veth pair per container, and the project's nft table.

Every tenant gets a fixed IPv4 address behind the bridge, reaches the outside through NAT,
and reaches neither the other tenants nor the host's services. A port grant forwards a host
port (range) to the same port of one tenant; the host's users, root aside, reach tenants
only that way. The plans (names, addresses, the nft ruleset,
resolv.conf) are pure functions; `setup_host`, `teardown_host`, `attach` and `detach` apply
them, and are the only code here that talks to netlink (pyroute2) or runs `nft`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from runtime import proc, sysctl
from runtime.errors import RuntimeFailure

PREFIX = "hostd"  # every link we create is named so
IFNAMSIZ = 15  # longest interface name the kernel takes
TENANT_IF = "eth0"  # the container's end of its veth pair
_BRIDGE = re.compile(rf"{PREFIX}[A-Za-z0-9]{{0,{IFNAMSIZ - len(PREFIX)}}}")
_TABLE = re.compile(rf"{PREFIX}[A-Za-z0-9_]{{0,58}}")


@dataclass(frozen=True)
class NetworkConfig:
    bridge: str = "hostd0"
    subnet: str = "10.213.0.0/16"  # the bridge takes the first host address, tenants the rest
    nft_table: str = "hostd"
    # Nameservers for the tenants' resolv.conf. The bridge address among them opens port 53
    # there to tenants, for a resolver the admin runs on it; others are reached through NAT.
    dns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _BRIDGE.fullmatch(self.bridge):
            raise RuntimeFailure(
                f"invalid bridge name {self.bridge!r}",
                f"use {PREFIX!r} followed by up to {IFNAMSIZ - len(PREFIX)} letters or digits",
            )
        if not _TABLE.fullmatch(self.nft_table):
            raise RuntimeFailure(
                f"invalid nft table name {self.nft_table!r}",
                f"use {PREFIX!r} followed by letters, digits or '_'",
            )
        try:
            net = IPv4Network(self.subnet)
            for server in self.dns:
                ipaddress.ip_address(server)
        except ValueError as exc:
            raise RuntimeFailure(f"invalid network setting: {exc}", "fix the address") from None
        if net.prefixlen > 30:
            raise RuntimeFailure(f"subnet {self.subnet} is too small", "use a /30 or larger")

    def network(self) -> IPv4Network:
        return IPv4Network(self.subnet)

    def bridge_address(self) -> IPv4Interface:
        net = self.network()
        return IPv4Interface((net.network_address + 1, net.prefixlen))

    def capacity(self) -> int:
        """How many tenant addresses the subnet has (all but network, bridge, broadcast)."""
        return self.network().num_addresses - 3

    def address_for(self, index: int) -> IPv4Address:
        """The address of tenant number `index` (0, 1, ...): .2, .3, ..."""
        if index < 0:
            raise ValueError(f"negative tenant index {index}")
        if index >= self.capacity():
            raise RuntimeFailure(
                f"subnet {self.subnet} is full ({self.capacity()} addresses)",
                "configure a larger subnet",
            )
        return self.network().network_address + 2 + index

    def check_tenant_address(self, address: IPv4Address) -> IPv4Address:
        net = self.network()
        first, last = net.network_address + 2, net.broadcast_address - 1
        if not first <= address <= last:
            raise RuntimeFailure(
                f"{address} is not a tenant address of {self.subnet}",
                f"use one from {first} to {last}",
            )
        return address


@dataclass(frozen=True)
class PortGrant:
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


def tenant_mac(container: str) -> str:
    """MAC of the container's eth0: 02 + the same hex digits as its veth name, so either one
    finds the other (and detach can find its neighbour entry after the veth is gone)."""
    return _mac(_digest(container))


def _bridge_mac(bridge: str) -> str:
    # Fixed, or the bridge would take the lowest port MAC and change it whenever that tenant
    # leaves, leaving the others with a stale gateway entry. (No container name has a space.)
    return _mac(_digest(f"bridge {bridge}"))


# -- the nft ruleset -----------------------------------------------------------------------


def ruleset(cfg: NetworkConfig, grants: Sequence[PortGrant] = ()) -> str:
    """The whole nft table: NAT, isolation, port grants. Pure and deterministic."""
    ordered = sorted(grants, key=lambda g: (g.first, g.last, g.address))
    for grant in ordered:
        cfg.check_tenant_address(grant.address)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.first <= a.last:
            raise RuntimeFailure(
                f"ports {a.ports()} ({a.address}) and {b.ports()} ({b.address}) overlap",
                "grant every host port to one tenant only",
            )
    br, net, gw = f'"{cfg.bridge}"', cfg.subnet, cfg.bridge_address().ip
    dns = any(ipaddress.ip_address(s) == gw for s in cfg.dns)
    dnat = [
        f"meta l4proto {{ tcp, udp }} th dport {g.ports()} dnat ip to {g.address}" for g in ordered
    ]
    chains: list[tuple[str, list[str]]] = [
        # Port grants, for traffic to any local address, from elsewhere (not from a tenant)
        # and from the host itself (127.0.0.1 included, hence the masquerade below).
        (
            "prerouting",
            [
                "type nat hook prerouting priority dstnat; policy accept;",
                f"iifname != {br} meta nfproto ipv4 fib daddr type local jump grants",
            ],
        ),
        (
            "output",
            [
                "type nat hook output priority -100; policy accept;",
                "meta nfproto ipv4 fib daddr type local jump grants",
            ],
        ),
        ("grants", dnat),
        (
            "postrouting",
            [
                "type nat hook postrouting priority srcnat; policy accept;",
                f"oifname != {br} ip saddr {net} masquerade",
                # 127.0.0.1:port DNATed to a tenant (needs route_localnet on the bridge)
                f"oifname {br} ip saddr 127.0.0.0/8 masquerade",
            ],
        ),
        # Tenants reach no host service: only answers, and DNS if the bridge serves it.
        # This also closes what route_localnet opens (tenant packets to 127.0.0.1).
        (
            "input",
            [
                "type filter hook input priority filter; policy accept;",
                f"iifname {br} jump from_tenants",
            ],
        ),
        (
            "from_tenants",
            [
                "ct state established,related accept",
                *([f"ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 accept"] if dns else []),
                "drop",
            ],
        ),
        # The host's other users reach tenants on granted ports only, as everybody else:
        # root (hostd, the admin) may connect directly.
        (
            "local_out",
            [
                "type filter hook output priority filter; policy accept;",
                f"oifname {br} jump to_tenants",
            ],
        ),
        (
            "to_tenants",
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
                # tenant to tenant through the host (ports are isolated on the bridge as well)
                f"iifname {br} oifname {br} drop",
                # out: IPv4 from the subnet only (no spoofed sources, no IPv6)
                f"iifname {br} ip saddr {net} accept",
                f"iifname {br} drop",
                # in: answers and granted ports only
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
# tenant's veth to that port's own chain, which passes only its MAC with its IPv4 address
# (in ARP too) and drops the rest: another tenant's address or MAC, IPv6, other ethertypes.
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
    cfg.check_tenant_address(address)
    veth, mac, chain = veth_name(container), tenant_mac(container), _port_chain(container)
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


def _nft(script: str, fix: str) -> None:
    nft = proc.require("nft", "nftables")
    proc.run([nft, "-f", "-"], input=script.encode(), fix=fix)


def _bridge_tables() -> list[str]:
    """The project's bridge-family tables (of every hostd on this host)."""
    nft = proc.require("nft", "nftables")
    out = proc.run([nft, "list", "tables", "bridge"], fix="check `nft list tables`").stdout
    names = (line.split()[-1] for line in out.splitlines() if line.startswith("table bridge "))
    return [name for name in names if _TABLE.fullmatch(name)]


def _table_script(table: str, text: str = "", family: str = "inet") -> str:
    """One transaction: create the table if missing (so that deleting it cannot fail),
    delete it, load `text` (none: the table is removed)."""
    return f"table {family} {table}\ndelete table {family} {table}\n{text}"


# -- the host's own services ----------------------------------------------------------------

_LISTEN, _UNCONNECTED = "0A", "07"  # TCP_LISTEN; TCP_CLOSE, as a bound UDP socket shows


def host_services(proc_net: Path = Path("/proc/net")) -> set[int]:
    """Ports on which sockets of the caller's network namespace listen (TCP) or wait (bound,
    unconnected UDP), on any address. A grant of one of them would DNAT its traffic away from
    the host's service: hostd's own SSH gateway, a database on 127.0.0.1, ..."""
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
    """Text of the tenants' /etc/resolv.conf."""
    lines = ["# written by hostd"]
    lines += [f"nameserver {server}" for server in cfg.dns] or ["# no nameserver configured"]
    return "\n".join(lines) + "\n"


# Behind systemd-resolved, /etc/resolv.conf names only its stub 127.0.0.53; the servers it
# forwards to are listed in the second file.
RESOLV_CONFS = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf"))


def host_nameservers(paths: Sequence[Path] = RESOLV_CONFS) -> tuple[str, ...]:
    """The host's nameservers a tenant can use, from the first of `paths` that has any: IPv4
    (tenants have no IPv6) and not loopback (a local resolver is not reachable from a tenant)."""
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


# -- applying: netlink, sysctl, nft --------------------------------------------------------


@contextlib.contextmanager
def _as_failure(what: str, fix: str) -> Iterator[None]:
    """Netlink and OS errors as a RuntimeFailure naming what failed."""
    try:
        yield
    except NetlinkError as exc:
        raise RuntimeFailure(f"{what}: {os.strerror(exc.code)}", fix) from None
    except OSError as exc:
        raise RuntimeFailure(f"{what}: {exc.strerror or exc}", fix) from None


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def setup_host(cfg: NetworkConfig, grants: Sequence[PortGrant] = ()) -> bool:
    """Bridge up with its address, nft table (re)applied, forwarding on. Idempotent: call it
    again with the new grants whenever they change; attached tenants are not disturbed.
    True when the bridge had to be created (running tenants then need re-attaching).

    Sets the host-wide net.ipv4.ip_forward=1 (NAT for the tenants needs it; it is left on by
    teardown_host, as other services may rely on it) and route_localnet on the bridge (so
    that 127.0.0.1:<granted port> reaches the tenant; the nft input chain keeps tenants from
    using it to reach the host's loopback services). If the bridge did not exist and a step
    fails, everything done is undone.
    """
    text = ruleset(cfg, grants)  # invalid grants fail before any change
    proc.require("nft", "nftables")
    with IPRoute() as ipr:
        fresh = _index(ipr, cfg.bridge) is None
        try:
            # The table first: no tenant packet is ever forwarded without it.
            _nft(
                _table_script(cfg.nft_table, text) + bridge_ruleset(cfg),
                "the kernel needs nf_tables with nat, fib and conntrack (modprobe nft_fib_inet)",
            )
            _ensure_bridge(ipr, cfg)
            sysctl.write("net/ipv4/ip_forward", "1")
            sysctl.write(f"net/ipv4/conf/{cfg.bridge}/forwarding", "1")
            sysctl.write(f"net/ipv4/conf/{cfg.bridge}/route_localnet", "1")
        except BaseException:
            if fresh:
                with contextlib.suppress(RuntimeFailure):  # the first failure is the news
                    _remove_host(ipr, cfg)
            raise
    return fresh


def _ensure_bridge(ipr: Any, cfg: NetworkConfig) -> None:
    want = cfg.bridge_address()
    fix = f"check `ip addr show {cfg.bridge}`"
    with _as_failure(f"cannot set up bridge {cfg.bridge}", fix):
        index = _index(ipr, cfg.bridge)
        if index is None:
            ipr.link("add", ifname=cfg.bridge, kind="bridge", address=_bridge_mac(cfg.bridge))
            index = _index(ipr, cfg.bridge)
        present = False
        for msg in ipr.get_addr(index=index, family=socket.AF_INET):
            addr = IPv4Interface((msg.get_attr("IFA_ADDRESS"), msg["prefixlen"]))
            if addr == want:
                present = True
            else:  # left by an earlier subnet setting
                ipr.addr("del", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        if not present:
            ipr.addr("add", index=index, address=str(want.ip), prefixlen=want.network.prefixlen)
        ipr.link("set", index=index, state="up")


def _ports(ipr: Any, bridge: int) -> list[str]:
    return [
        str(link.get_attr("IFLA_IFNAME"))
        for link in ipr.get_links()
        if link.get_attr("IFLA_MASTER") == bridge
    ]


def _remove_host(ipr: Any, cfg: NetworkConfig) -> None:
    # The bridge (and its route_localnet) before the table that guards it.
    with _as_failure(f"cannot delete bridge {cfg.bridge}", f"check `ip link show {cfg.bridge}`"):
        index = _index(ipr, cfg.bridge)
        if index is not None:
            ipr.link("del", index=index)
    _nft(
        _table_script(cfg.nft_table) + _table_script(cfg.nft_table, family="bridge"),
        f"check `nft list tables | grep {cfg.nft_table}`",
    )


def teardown_host(cfg: NetworkConfig) -> None:
    """Delete the bridge and the nft table; refuses while a tenant is attached."""
    with IPRoute() as ipr:
        index = _index(ipr, cfg.bridge)
        if index is not None:
            ports = _ports(ipr, index)
            if ports:
                raise RuntimeFailure(
                    f"{len(ports)} tenant(s) still attached to {cfg.bridge} ({', '.join(ports)})",
                    "stop their containers (or detach them) first",
                )
        _remove_host(ipr, cfg)


def attach(cfg: NetworkConfig, container: str, address: IPv4Address, netns_pid: int) -> None:
    """Connect the network namespace of process `netns_pid` to the bridge: eth0 with
    `address`, lo up, default route via the bridge. The host end is an isolated bridge port
    that learns nothing and floods nothing; a static FDB entry and a permanent neighbour
    entry pin the tenant's MAC and address, so another tenant cannot take over its traffic
    by claiming its address, and the bridge table drops what the port sends from another
    MAC or address. Replaces an earlier attachment; undone if it fails half-way."""
    cfg.check_tenant_address(address)
    host, mac, gw = veth_name(container), tenant_mac(container), cfg.bridge_address()
    with IPRoute() as ipr:
        bridge = _index(ipr, cfg.bridge)
        if bridge is None:
            raise RuntimeFailure(
                f"bridge {cfg.bridge} does not exist", "set up the host network first"
            )
        detach(container)
        with _as_failure(
            f"cannot attach {container} (pid {netns_pid}) to {cfg.bridge}",
            "check that the container is running and has no eth0 of its own",
        ):
            ipr.link(
                "add",
                ifname=host,
                kind="veth",
                group=port_group(cfg),
                peer={"ifname": TENANT_IF, "address": mac, "net_ns_pid": netns_pid},
            )
        try:
            _nft(pin_script(cfg, container, address), "run `hostctl doctor` (nftables)")
            with _as_failure(f"cannot attach {container} to {cfg.bridge}", "check `ip link`"):
                index = _index(ipr, host)
                ipr.link("set", index=index, master=bridge)
                ipr.brport("set", index=index, isolated=1, learning=0, unicast_flood=0)
                ipr.neigh(  # `bridge fdb add <mac> dev <host> master static`
                    "add",
                    family=socket.AF_BRIDGE,
                    ifindex=index,
                    lladdr=mac,
                    flags=ndmsg.NTF_MASTER,
                    state=ndmsg.NUD_NOARP,
                )
                ipr.neigh(
                    "replace",
                    ifindex=bridge,
                    dst=str(address),
                    lladdr=mac,
                    state=ndmsg.NUD_PERMANENT,
                )
            _configure_tenant(netns_pid, address, gw)
            with _as_failure(f"cannot bring up {host}", "check `ip link`"):
                ipr.link("set", index=index, state="up")
        except BaseException:
            detach(container)
            raise


def attached(cfg: NetworkConfig, container: str) -> bool:
    """Whether the container's host veth exists and is a pinned port of the bridge (a veth
    attached by an earlier version, without group and pin, is not: re-attach it)."""
    with IPRoute() as ipr:
        bridge, host = _index(ipr, cfg.bridge), _index(ipr, veth_name(container))
        if bridge is None or host is None:
            return False
        link = ipr.get_links(host)[0]
        if link.get_attr("IFLA_MASTER") != bridge or link.get_attr("IFLA_GROUP") != port_group(cfg):
            return False
    nft = proc.require("nft", "nftables")
    element = f'{{ "{veth_name(container)}" }}'
    get = [nft, "get", "element", "bridge", cfg.nft_table, "ports", element]
    return proc.run(get, check=False).returncode == 0


def _configure_tenant(netns_pid: int, address: IPv4Address, gw: IPv4Interface) -> None:
    """Configure eth0, lo and the default route inside the namespace, from a short-lived
    helper (`python -m runtime.network`): entering a namespace from a multi-threaded daemon,
    or from a fork of it, is unsafe."""
    interface = IPv4Interface((address, gw.network.prefixlen))
    argv = [sys.executable, "-m", "runtime.network", str(netns_pid), str(interface), str(gw.ip)]
    done = proc.run(argv, check=False, timeout=30)
    if done.returncode != 0:
        raise RuntimeFailure(
            f"cannot configure the network of pid {netns_pid}: {done.last_error_line()}",
            "check that the container is running and its network is unconfigured",
        )


def _helper_main(netns_pid: str, interface: str, gateway: str) -> int:
    """Helper side: join the namespace, then configure it through a netlink socket there.
    Prints what failed as one line."""
    addr = IPv4Interface(interface)
    step = "join the network namespace"
    try:
        netns.setns(f"/proc/{netns_pid}/ns/net", flags=0)
        with IPRoute() as ipr:
            step = "bring lo up"
            ipr.link("set", index=_index(ipr, "lo"), state="up")
            step = f"find {TENANT_IF}"
            eth = _index(ipr, TENANT_IF)
            if eth is None:
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
            step = f"add {addr} to {TENANT_IF}"
            ipr.addr("add", index=eth, address=str(addr.ip), prefixlen=addr.network.prefixlen)
            step = f"bring {TENANT_IF} up"
            ipr.link("set", index=eth, state="up")
            step = f"add the default route via {gateway}"
            ipr.route("add", dst="0.0.0.0/0", gateway=gateway)
    except NetlinkError as exc:
        print(f"{step}: {os.strerror(exc.code)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{step}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def detach(container: str) -> None:
    """Delete the container's host veth (its peer goes with it), the neighbour entry
    pinning its address and its port's pin in every bridge table of the project. Safe to
    call when any of them is already gone."""
    mac = tenant_mac(container)
    with IPRoute() as ipr, _as_failure(f"cannot detach {container}", "check `ip link`"):
        index = _index(ipr, veth_name(container))
        if index is not None:
            with contextlib.suppress(NetlinkError):  # gone meanwhile with its namespace
                ipr.link("del", index=index)
        bridges = [
            link["index"]
            for link in ipr.get_links()
            if str(link.get_attr("IFLA_IFNAME")).startswith(PREFIX)
            and link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "bridge"
        ]
        for bridge in bridges:
            for entry in ipr.get_neighbours(family=socket.AF_INET, ifindex=bridge):
                if str(entry.get_attr("NDA_LLADDR")).lower() == mac:
                    ipr.neigh("del", ifindex=bridge, dst=entry.get_attr("NDA_DST"))
    tables = _bridge_tables()
    if tables:
        _nft(unpin_script(tables, container), "check `nft list tables bridge`")


if __name__ == "__main__":
    sys.exit(_helper_main(*sys.argv[1:]))
