"""A tenant cannot send as another tenant: frames its port brings in must carry its own MAC
and IPv4 address (ARP included), or they never reach the host, the bridge or the outside.

Root inside a tenant owns its network namespace (CAP_NET_ADMIN, CAP_NET_RAW): it can add any
address to eth0, change its MAC and write raw frames. Two tenants (namespaces held by a
process, attached by runtime.network as a container is) on a test bridge of this process's
own; a packet socket on the host's bridge device records what arrives there.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime import netplan, network
from runtime.netplan import NetworkConfig, container_mac
from runtime.network import attach, detach
from tests.hostd_harness import POLL_INTERVAL, free_subnet, wait_for
from tests.integration.test_network import (
    Namespaces,
    Tenant,
    force_remove,
    run,
)

PID = os.getpid()
CFG = NetworkConfig(
    bridge=f"hostds{PID}",  # apart from hostdt/hostdn/hostdu/hostdv<pid> of other tests
    subnet=str(free_subnet(24)),  # this session's own, apart from the default one
    nft_table=f"hostd_test_{PID}_s",
)
GW = str(CFG.bridge_address().ip)
ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0003, 0x0800, 0x0806, 0x86DD
FORGED_MAC = "02:00:5e:00:53:99"

# Run inside a tenant: write one raw Ethernet frame on eth0 (argv: hex of the frame).
SEND_FRAME = """
import socket, sys
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
    s.bind(("eth0", 0))
    s.send(bytes.fromhex(sys.argv[1]))
"""
# Run inside a tenant: one UDP datagram from a given local address (argv: src dst port data).
SEND_UDP_FROM = """
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.bind((sys.argv[1], 0))
    s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
"""


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def udp_frame(src_mac: str, dst_mac: str, src: str, dst: str, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ETH_P_IP) + header + udp


def arp_frame(eth_src: str, sender_mac: str, sender_ip: str, target_ip: str) -> bytes:
    """A gratuitous-style ARP request, broadcast."""
    arp = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        ETH_P_IP,
        6,
        4,
        1,
        mac_bytes(sender_mac),
        socket.inet_aton(sender_ip),
        bytes(6),
        socket.inet_aton(target_ip),
    )
    return b"\xff" * 6 + mac_bytes(eth_src) + struct.pack("!H", ETH_P_ARP) + arp


def ipv6_frame(src_mac: str, payload: bytes) -> bytes:
    """An IPv6 UDP datagram to all nodes (ff02::1) from a link-local address."""
    src, dst = (
        socket.inet_pton(socket.AF_INET6, "fe80::1"),
        socket.inet_pton(socket.AF_INET6, "ff02::1"),
    )
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    header = struct.pack("!IHBB16s16s", 6 << 28, len(udp), socket.IPPROTO_UDP, 64, src, dst)
    return (
        b"\x33\x33\x00\x00\x00\x01"
        + mac_bytes(src_mac)
        + struct.pack("!H", ETH_P_IPV6)
        + (header + udp)
    )


@dataclass(frozen=True)
class Frame:
    src_mac: str
    ethertype: int
    sender: str | None  # IPv4 source, or ARP sender address
    raw: bytes


class Recorder:
    """Every frame the host's bridge device receives (what reaches the host's IP stack)."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))

    def close(self) -> None:
        self.sock.close()

    def until(self, marker: bytes, timeout: float = 10) -> list[Frame]:
        """Frames received until one carrying `marker` (sent last, by the same port: frames
        of one port arrive in order, so anything sent before it and missing was dropped)."""
        frames: list[Frame] = []
        self.sock.settimeout(POLL_INTERVAL)

        def arrived() -> bool:
            raw, addr = self.sock.recvfrom(65535)
            if addr[2] == socket.PACKET_OUTGOING:
                return False
            frames.append(parse(raw))
            return marker in raw

        what = f"{marker!r} (else the port drops legitimate traffic)"
        wait_for(arrived, timeout, what, interval=0, ignore=(TimeoutError,))
        return frames


def parse(raw: bytes) -> Frame:
    src_mac = raw[6:12].hex(":")
    ethertype = struct.unpack("!H", raw[12:14])[0]
    sender = None
    if ethertype == ETH_P_IP:
        sender = socket.inet_ntoa(raw[26:30])
    elif ethertype == ETH_P_ARP:
        sender = socket.inet_ntoa(raw[28:32])
    return Frame(src_mac, ethertype, sender, raw)


@dataclass
class Pair:
    a: Tenant  # the attacker
    b: Tenant  # the victim
    bridge_mac: str
    recorder: Recorder

    def send(self, frame: bytes) -> None:
        self.a.run(sys.executable, "-c", SEND_FRAME, frame.hex())

    def legit(self, marker: bytes) -> bytes:
        """A's own, well-formed datagram to the bridge address."""
        return udp_frame(
            container_mac(self.a.container), self.bridge_mac, str(self.a.address), GW, marker
        )


@pytest.fixture
def pair() -> Iterator[Pair]:
    spaces = Namespaces()
    containers: list[str] = []
    recorder = None
    try:
        a, b = (spaces.add(f"s{tag}", CFG.address_for(i)) for i, tag in enumerate("ab"))
        containers = [a.container, b.container]
        network.setup_host(CFG)
        for t in (a, b):
            attach(CFG, t.container, t.address, t.pid)
        bridge_mac = Path(f"/sys/class/net/{CFG.bridge}/address").read_text().strip()
        # A knows the gateway for good: its sends never wait on an ARP exchange
        a.run("ip", "neigh", "replace", GW, "lladdr", bridge_mac, "dev", "eth0", "nud", "permanent")
        recorder = Recorder(CFG.bridge)
        yield Pair(a, b, bridge_mac, recorder)
    finally:
        if recorder is not None:
            recorder.close()
        try:
            for container in containers:
                detach(container)
            network.teardown_host(CFG)
        finally:
            force_remove(CFG, containers)
            run("nft", "delete", "table", "bridge", CFG.nft_table, check=False)
            spaces.remove_all()


@pytest.fixture(autouse=True)
def _keep_ip_forward() -> Iterator[None]:
    """setup_host turns on forwarding for the whole host: put it back as it was."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text()
    yield
    path.write_text(before)


def test_raw_frames_with_anothers_address_or_a_forged_mac_are_dropped(pair: Pair) -> None:
    a_mac, b_mac = container_mac(pair.a.container), container_mac(pair.b.container)
    a_ip, b_ip = str(pair.a.address), str(pair.b.address)
    attacks = {
        "b-ip": udp_frame(a_mac, pair.bridge_mac, b_ip, GW, b"spoof-b-ip"),
        "b-mac": udp_frame(b_mac, pair.bridge_mac, a_ip, GW, b"spoof-b-mac"),
        "b-both": udp_frame(b_mac, pair.bridge_mac, b_ip, GW, b"spoof-b-both"),
        "forged-mac": udp_frame(FORGED_MAC, pair.bridge_mac, a_ip, GW, b"spoof-forged"),
        "outside-ip": udp_frame(a_mac, pair.bridge_mac, "192.0.2.7", GW, b"spoof-outside"),
        "arp-b-ip": arp_frame(a_mac, a_mac, b_ip, GW),
        "arp-b-mac": arp_frame(a_mac, b_mac, a_ip, GW),
        "arp-forged-eth": arp_frame(FORGED_MAC, FORGED_MAC, a_ip, GW),
        "ipv6": ipv6_frame(a_mac, b"spoof-ipv6"),
    }
    for frame in attacks.values():
        pair.send(frame)
    own_arp = arp_frame(a_mac, a_mac, a_ip, GW)
    pair.send(own_arp)  # A's own ARP passes ...
    pair.send(pair.legit(b"legit-1"))  # ... and so does its own datagram
    frames = pair.recorder.until(b"legit-1")
    arrived = [name for name, attack in attacks.items() if any(attack in f.raw for f in frames)]
    assert arrived == []
    assert any(own_arp in f.raw for f in frames)
    # the host's entry for B still names B's MAC
    neigh = run("ip", "neigh", "show", b_ip, "dev", CFG.bridge).stdout
    assert b_mac in neigh and "PERMANENT" in neigh


def test_a_tenant_sending_from_anothers_address_reaches_nothing(pair: Pair) -> None:
    """What root inside would do with ordinary tools: take B's address, send from it."""
    a, b_ip = pair.a, str(pair.b.address)
    a.run("ip", "addr", "add", f"{b_ip}/32", "dev", "eth0")
    a.run(sys.executable, "-c", SEND_UDP_FROM, b_ip, GW, "9", "spoof-socket")
    a.run(sys.executable, "-c", SEND_UDP_FROM, str(a.address), GW, "9", "legit-2")
    frames = pair.recorder.until(b"legit-2")
    assert not any(b"spoof-socket" in f.raw for f in frames)
    assert b_ip not in {f.sender for f in frames}


def test_a_tenant_with_a_forged_mac_reaches_nothing_until_it_puts_its_own_back(
    pair: Pair,
) -> None:
    a = pair.a
    a.run("ip", "link", "set", "eth0", "address", FORGED_MAC)
    a.run(sys.executable, "-c", SEND_UDP_FROM, str(a.address), GW, "9", "spoof-link")
    a.run("ip", "link", "set", "eth0", "address", container_mac(a.container))
    a.run(sys.executable, "-c", SEND_UDP_FROM, str(a.address), GW, "9", "legit-3")
    frames = pair.recorder.until(b"legit-3")
    assert FORGED_MAC not in {f.src_mac for f in frames}
    assert not any(b"spoof-link" in f.raw for f in frames)


def test_a_port_without_its_pin_passes_nothing(pair: Pair) -> None:
    """Fail closed: a port of the bridge whose pin is gone (flushed by hand, say) drops
    everything until attach pins it again."""
    veth = netplan.veth_name(pair.a.container)
    assert int(Path(f"/sys/class/net/{veth}/netdev_group").read_text()) == netplan.port_group(CFG)
    run("nft", "delete", "element", "bridge", CFG.nft_table, "ports", f'{{ "{veth}" }}')
    assert not network.attached(CFG, pair.a.container)  # reconcile re-attaches it
    pair.send(pair.legit(b"unpinned"))
    subprocess.run(
        ["nft", "-f", "-"],
        input=netplan.pin_script(CFG, pair.a.container, pair.a.address).encode(),
        check=True,
    )
    assert network.attached(CFG, pair.a.container)
    pair.send(pair.legit(b"legit-4"))
    frames = pair.recorder.until(b"legit-4")
    assert not any(b"unpinned" in f.raw for f in frames)


def test_a_port_attached_without_a_group_is_attached_again(pair: Pair) -> None:
    """A veth of an earlier version (no group, no pin) passes everything: reconcile must see
    it as unattached, and attach then pins it."""
    a = pair.a
    run("ip", "link", "set", netplan.veth_name(a.container), "group", "default")
    assert not network.attached(CFG, a.container)
    attach(CFG, a.container, a.address, a.pid)
    assert network.attached(CFG, a.container)


def test_tenants_keep_their_normal_traffic(pair: Pair) -> None:
    for t in (pair.a, pair.b):  # the host reaches both, their answers come back
        run("busybox", "ping", "-c", "1", "-W", "3", str(t.address))
