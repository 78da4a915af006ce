"""Applying the network plan (runtime.netplan): the host bridge, one veth pair per container,
the project's nft tables. The only code of the runtime that talks to netlink (pyroute2) or
runs `nft`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from runtime import proc, sysctl
from runtime.errors import RuntimeFailure
from runtime.netplan import (
    CONTAINER_IF,
    PREFIX,
    Forward,
    NetworkConfig,
    bridge_mac,
    bridge_ruleset,
    container_mac,
    is_project_table,
    pin_script,
    port_group,
    ruleset,
    table_script,
    unpin_script,
    veth_name,
)


def _nft(script: str, fix: str) -> None:
    nft = proc.require("nft", "nftables")
    proc.run([nft, "-f", "-"], input=script.encode(), fix=fix)


def _bridge_tables() -> list[str]:
    """The project's bridge-family tables (of every hostd on this host)."""
    nft = proc.require("nft", "nftables")
    out = proc.run([nft, "list", "tables", "bridge"], fix="check `nft list tables`").stdout
    names = (line.split()[-1] for line in out.splitlines() if line.startswith("table bridge "))
    return [name for name in names if is_project_table(name)]


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


def bridge_present(cfg: NetworkConfig) -> bool:
    """Whether the bridge exists: one ioctl, where setup_host re-applies the nft table."""
    try:
        socket.if_nametoindex(cfg.bridge)
    except OSError:
        return False
    return True


def setup_host(cfg: NetworkConfig, forwards: Sequence[Forward] = ()) -> bool:
    """Bridge up with its address, nft table (re)applied, forwarding on. Idempotent: call it
    again with the new forwards whenever they change; attached containers are not disturbed.
    True when the bridge had to be created (running containers then need re-attaching).

    Sets the host-wide net.ipv4.ip_forward=1 (NAT for the containers needs it; it is left on by
    teardown_host, as other services may rely on it) and route_localnet on the bridge (so
    that 127.0.0.1:<forwarded port> reaches the container; the nft input chain keeps them from
    using it to reach the host's loopback services). If the bridge did not exist and a step
    fails, everything done is undone.
    """
    text = ruleset(cfg, forwards)  # invalid forwards fail before any change
    proc.require("nft", "nftables")
    with IPRoute() as ipr:
        fresh = _index(ipr, cfg.bridge) is None
        try:
            # The table first: no container packet is ever forwarded without it.
            _nft(
                table_script(cfg.nft_table, text) + bridge_ruleset(cfg),
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
            ipr.link("add", ifname=cfg.bridge, kind="bridge", address=bridge_mac(cfg.bridge))
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
        table_script(cfg.nft_table) + table_script(cfg.nft_table, family="bridge"),
        f"check `nft list tables | grep {cfg.nft_table}`",
    )


def teardown_host(cfg: NetworkConfig) -> None:
    """Delete the bridge and the nft table; refuses while a container is attached."""
    with IPRoute() as ipr:
        index = _index(ipr, cfg.bridge)
        if index is not None:
            ports = _ports(ipr, index)
            if ports:
                names = ", ".join(ports)
                raise RuntimeFailure(
                    f"{len(ports)} container(s) still attached to {cfg.bridge} ({names})",
                    "stop them (or detach them) first",
                )
        _remove_host(ipr, cfg)


def attach(cfg: NetworkConfig, container: str, address: IPv4Address, netns_pid: int) -> None:
    """Connect the network namespace of process `netns_pid` to the bridge: eth0 with
    `address`, lo up, default route via the bridge. The host end is an isolated bridge port
    that learns nothing and floods nothing; a static FDB entry and a permanent neighbour
    entry pin the container's MAC and address, so another cannot take over its traffic
    by claiming its address, and the bridge table drops what the port sends from another
    MAC or address. Replaces an earlier attachment; undone if it fails half-way."""
    cfg.check_address(address)
    host, mac, gw = veth_name(container), container_mac(container), cfg.bridge_address()
    with IPRoute() as ipr:
        bridge = _index(ipr, cfg.bridge)
        if bridge is None:
            raise RuntimeFailure(
                f"bridge {cfg.bridge} does not exist", "set up the host network first"
            )
        _unlink(container)  # the earlier port's pin is replaced by the new one below
        with _as_failure(
            f"cannot attach {container} (pid {netns_pid}) to {cfg.bridge}",
            "check that the container is running and has no eth0 of its own",
        ):
            ipr.link(
                "add",
                ifname=host,
                kind="veth",
                group=port_group(cfg),
                peer={"ifname": CONTAINER_IF, "address": mac, "net_ns_pid": netns_pid},
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
            _configure_inside(netns_pid, address, gw)
            with _as_failure(f"cannot bring up {host}", "check `ip link`"):
                ipr.link("set", index=index, state="up")
        except BaseException:
            detach(container)
            raise


def attached(cfg: NetworkConfig, container: str) -> bool:
    """Whether the container's host veth exists and is a pinned port of the bridge (a veth
    attached by an earlier version, without group and pin, is not: re-attach it)."""
    return not unattached(cfg, [container])


def unattached(cfg: NetworkConfig, containers: Iterable[str]) -> list[str]:
    """Those of `containers` whose host veth is missing, off the bridge or not pinned: one
    link dump and one `nft` for all of them (reconcile asks it of every running tenant)."""
    with IPRoute() as ipr:
        bridge = _index(ipr, cfg.bridge)
        ports = {
            str(link.get_attr("IFLA_IFNAME"))
            for link in ipr.get_links()
            if bridge is not None
            and link.get_attr("IFLA_MASTER") == bridge
            and link.get_attr("IFLA_GROUP") == port_group(cfg)
        }
    pinned = _pinned(cfg) if ports else set()
    return [c for c in containers if veth_name(c) not in ports & pinned]


def _pinned(cfg: NetworkConfig) -> set[str]:
    """The veths pinned in the bridge table's `ports` map (none if it is missing)."""
    nft = proc.require("nft", "nftables")
    got = proc.run([nft, "-j", "list", "map", "bridge", cfg.nft_table, "ports"], check=False)
    if got.returncode != 0:
        return set()
    maps = [item["map"] for item in json.loads(got.stdout)["nftables"] if "map" in item]
    return {str(elem[0]) for m in maps for elem in m.get("elem", ())}


def _configure_inside(netns_pid: int, address: IPv4Address, gw: IPv4Interface) -> None:
    """Configure lo, eth0 and the default route inside the namespace, from a short-lived
    helper (entering a namespace from a multi-threaded daemon, or from a fork of it, is
    unsafe): `nsenter --net` running `ip -batch`, one exec of each, where a Python helper
    spent about half a second importing pyroute2 on every start."""
    interface = IPv4Interface((address, gw.network.prefixlen))
    steps = [
        ("bring lo up", "link set lo up"),
        (f"add {interface} to {CONTAINER_IF}", f"addr add {interface} dev {CONTAINER_IF}"),
        (f"bring {CONTAINER_IF} up", f"link set {CONTAINER_IF} up"),
        (f"add the default route via {gw.ip}", f"route add default via {gw.ip}"),
    ]
    script = "".join(f"{command}\n" for _, command in steps)
    nsenter, ip = proc.require("nsenter", "util-linux"), proc.require("ip", "iproute2")
    argv = [nsenter, f"--net=/proc/{netns_pid}/ns/net", "--", ip, "-batch", "-"]
    done = proc.run(argv, input=script.encode(), check=False, timeout=30)
    if done.returncode != 0:
        raise RuntimeFailure(
            f"cannot configure the network of pid {netns_pid}: {_batch_error(done, steps)}",
            "check that the container is running and its network is unconfigured",
        )


def _batch_error(done: proc.Result, steps: list[tuple[str, str]]) -> str:
    """`<step>: <reason>` from what `ip -batch` said ("RTNETLINK answers: File exists",
    then "Command failed -:4"), else its last line (nsenter's own failure)."""
    lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
    failed = re.fullmatch(r"Command failed -:(\d+)", lines[-1]) if lines else None
    if failed is None or not 1 <= int(failed.group(1)) <= len(steps):
        return done.last_error_line()
    reason = lines[-2].rsplit("answers: ", 1)[-1] if len(lines) > 1 else "failed"
    return f"{steps[int(failed.group(1)) - 1][0]}: {reason}"


def detach(container: str) -> None:
    """Delete the container's host veth (its peer goes with it), the neighbour entry
    pinning its address and its port's pin in every bridge table of the project. Safe to
    call when any of them is already gone."""
    _unlink(container)
    tables = _bridge_tables()
    if tables:
        _nft(unpin_script(tables, container), "check `nft list tables bridge`")


def _unlink(container: str) -> None:
    """Delete the container's host veth and the neighbour entries pinning its address."""
    mac = container_mac(container)
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
