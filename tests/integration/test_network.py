"""Tenant networking on the real kernel: isolation, NAT, port grants, complete removal.

Traffic stays between the host and network namespaces made here (`hostd-test-*`), on a test
bridge, subnet and nft table of this process's own, all removed afterwards, on failure too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from runtime import network
from runtime.errors import RuntimeFailure
from runtime.netplan import Forward, NetworkConfig, container_mac, veth_name
from runtime.network import attach, detach, unattached
from tests.hostd_harness import free_subnet, wait_for

PID = os.getpid()
SUBNET = free_subnet(24)
CFG = NetworkConfig(
    bridge=f"hostdn{PID}",  # not conftest's hostdt<pid>/hostd_test_<pid> of the hostd fixture
    subnet=str(SUBNET),  # this session's own, outside the default 10.213.0.0/16
    nft_table=f"hostd_test_{PID}_n",
    dns=(str(SUBNET.network_address + 1),),  # the bridge serves DNS: port 53 open to tenants
)
GW = str(CFG.bridge_address().ip)
GRANTED, UNGRANTED, SINK, HOST_SERVICE = 20001, 20002, 20003, 8081

# What a tenant's client does: connect, and with "http" also ask and print the status line.
CLIENT = """
import socket, sys
host, port, timeout, http = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
with socket.create_connection((host, port), timeout=timeout) as s:
    if http == "http":
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        print(s.makefile("rb").readline().decode().strip())
"""
UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    with open(sys.argv[2], "ab") as f:
        f.write(s.recv(2048) + b"\\n")
"""
SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""
UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo " + data, peer)
"""


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables"), ("busybox", "busybox-static")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: apt-get install {pkg}")


@pytest.fixture(scope="module", autouse=True)
def _keep_ip_forward() -> Iterator[None]:
    """setup_host turns on forwarding for the whole host: put it back as it was."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text()
    yield
    path.write_text(before)


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert not check or done.returncode == 0, f"{argv} exited {done.returncode}: {done.stderr}"
    return done


@dataclass
class Tenant:
    container: str
    netns: str
    address: IPv4Address
    sleeper: subprocess.Popen[bytes]  # holds the namespace, like a container's init

    @property
    def pid(self) -> int:
        return self.sleeper.pid

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.netns, *argv, check=check)

    # Refusals from a tenant are drops, seen as timeouts: 3 s leaves room for ARP retries,
    # so that a connection that would work does not fail for want of time.
    def connect(self, host: str, port: int, timeout: float = 3.0) -> bool:
        done = self.run(
            sys.executable, "-c", CLIENT, host, str(port), str(timeout), "-", check=False
        )
        return done.returncode == 0

    def http_status(self, host: str, port: int, timeout: float = 3.0) -> str | None:
        done = self.run(
            sys.executable, "-c", CLIENT, host, str(port), str(timeout), "http", check=False
        )
        return done.stdout.strip() if done.returncode == 0 else None


class Namespaces:
    """Network namespaces `hostd-test-<tag>-<pid>`, each held by a process, plus the servers
    started in them; remove_all() kills exactly those processes and deletes the namespaces."""

    def __init__(self) -> None:
        self.tenants: list[Tenant] = []
        self.servers: list[subprocess.Popen[bytes]] = []

    def add(self, tag: str, address: IPv4Address) -> Tenant:
        netns = f"hostd-test-{tag}-{PID}"
        run("ip", "netns", "add", netns)
        sleeper = subprocess.Popen(
            ["ip", "netns", "exec", netns, "sleep", "600"], stdin=subprocess.DEVNULL
        )
        tenant = Tenant(f"{tag}{PID}", netns, address, sleeper)
        self.tenants.append(tenant)
        # `ip netns exec` joins the namespace, then execs: attach only once it has joined.
        want = os.stat(f"/run/netns/{netns}").st_ino
        joined = lambda: os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino == want  # noqa: E731
        wait_for(joined, 10, f"{netns} to hold")
        return tenant

    def serve(self, tenant: Tenant, *argv: str) -> None:
        self.servers.append(
            subprocess.Popen(
                ["ip", "netns", "exec", tenant.netns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def remove_all(self) -> None:
        for child in [*self.servers, *(t.sleeper for t in self.tenants)]:
            child.kill()
            child.wait()
        for tenant in self.tenants:
            run("ip", "netns", "delete", tenant.netns, check=False)


def http_status(host: str, port: int, timeout: float = 1.0) -> str | None:
    """From the host: the HTTP status line at host:port, or None if nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.makefile("rb").readline().decode().strip() or None
    except OSError:
        return None


def udp_echo(host: str, port: int, timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"ping", (host, port))
        try:
            return s.recv(2048)
        except OSError:
            return None


def force_remove(cfg: NetworkConfig, containers: list[str]) -> None:
    """Last resort after a failed test: our links and table only, by their exact names."""
    for name in [*(veth_name(c) for c in containers), cfg.bridge]:
        run("ip", "link", "delete", name, check=False)
    run("nft", "delete", "table", "inet", cfg.nft_table, check=False)


@contextlib.contextmanager
def listening(host: str, port: int) -> Iterator[None]:
    """A host service: the kernel completes the handshake, nothing else is needed."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            pytest.skip(f"cannot listen on {host}:{port} for the test: {exc}")
        s.listen(8)
        yield


@dataclass
class Net:
    a: Tenant
    b: Tenant
    c: Tenant  # the adversarial one: tests may reconfigure it
    spaces: Namespaces


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    """Three tenants on the test bridge; port GRANTED goes to B, where servers listen on
    GRANTED (TCP: HTTP, UDP: echo) and UNGRANTED (HTTP)."""
    spaces = Namespaces()
    containers: list[str] = []
    try:
        a, b, c = (spaces.add(tag, CFG.address_for(i)) for i, tag in enumerate("abc"))
        containers = [t.container for t in (a, b, c)]
        network.setup_host(CFG, [Forward(GRANTED, GRANTED, b.address)])
        for t in (a, b, c):
            attach(CFG, t.container, t.address, t.pid)
        for port in (GRANTED, UNGRANTED):
            spaces.serve(b, sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0")
        spaces.serve(b, sys.executable, "-c", UDP_ECHO, str(GRANTED))
        # The host reaches tenants directly: wait until B's servers answer.
        for port in (GRANTED, UNGRANTED):
            wait_for(functools.partial(http_status, str(b.address), port), 10, f"HTTP on B:{port}")
        wait_for(lambda: udp_echo(str(b.address), GRANTED, 0.2), 10, "UDP echo on B")
        yield Net(a, b, c, spaces)
    finally:
        try:
            for container in containers:
                detach(container)
            network.teardown_host(CFG)
        finally:
            force_remove(CFG, containers)
            spaces.remove_all()


# -- what a tenant sees ----------------------------------------------------------------------


def test_tenant_has_its_address_and_a_default_route(net: Net) -> None:
    addr = net.a.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert f"inet {net.a.address}/24" in addr
    assert net.a.run("ip", "route", "show", "default").stdout.split()[:3] == ["default", "via", GW]
    assert "UP" in net.a.run("ip", "-o", "link", "show", "lo").stdout


def test_host_ends_are_isolated_ports_of_the_bridge(net: Net) -> None:
    for t in (net.a, net.b):
        details = run("ip", "-d", "link", "show", veth_name(t.container)).stdout
        assert f"master {CFG.bridge}" in details
        assert "isolated on" in details
        assert "learning off" in details


def test_tenants_cannot_reach_each_other(net: Net) -> None:
    b = str(net.b.address)
    assert http_status(b, UNGRANTED) == "HTTP/1.0 200 OK"  # B's server answers the host
    assert net.a.http_status(b, UNGRANTED) is None
    assert net.a.run("busybox", "ping", "-c", "1", "-W", "3", b, check=False).returncode != 0
    # nor through a port granted to the other tenant
    assert net.a.http_status(GW, GRANTED) is None


def test_a_tenant_routing_through_the_host_does_not_reach_another(net: Net, tmp_path: Path) -> None:
    """Isolated ports stop A's frames to B; a route via the gateway would make the host
    forward them instead: the nft forward chain stops that."""
    received = tmp_path / "received"
    received.touch()
    net.spaces.serve(net.b, sys.executable, "-c", UDP_SINK, str(SINK), str(received))
    b = str(net.b.address)

    def got(marker: str) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(marker.encode(), (b, SINK))
        return marker in received.read_text()

    wait_for(lambda: got("host-1"), 10, "the UDP sink in B")  # the host reaches it
    net.c.run("ip", "route", "add", f"{b}/32", "via", GW, "dev", "eth0")
    try:
        net.c.run(sys.executable, "-c", SEND_UDP, b, str(SINK), "from-c")
        wait_for(lambda: got("host-2"), 10, "a datagram from the host after C's")
        assert "from-c" not in received.read_text()
    finally:
        net.c.run("ip", "route", "del", f"{b}/32", check=False)


def test_tenants_reach_no_host_service_but_dns_on_the_bridge(net: Net) -> None:
    with listening(GW, HOST_SERVICE), listening(GW, 53):
        assert http_status(GW, HOST_SERVICE, 1) is None  # no HTTP, but the host connects:
        with socket.create_connection((GW, HOST_SERVICE), timeout=1):
            pass
        assert not net.a.connect(GW, HOST_SERVICE)
        assert net.a.connect(GW, 53, timeout=5)  # configured: CFG.dns is the bridge address


def test_tenants_cannot_use_route_localnet_to_reach_host_loopback(net: Net) -> None:
    """route_localnet on the bridge lets packets for 127.0.0.1 in; the nft input chain must
    stop them (else a tenant reaches the host's loopback-only services)."""
    c = net.c
    c.run("ip", "addr", "flush", "dev", "lo")
    c.run("sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1")
    c.run("ip", "route", "add", "127.0.0.1/32", "via", GW, "dev", "eth0")
    try:
        with listening("127.0.0.1", HOST_SERVICE):
            with socket.create_connection(("127.0.0.1", HOST_SERVICE), timeout=1):
                pass
            assert not c.connect("127.0.0.1", HOST_SERVICE)
    finally:
        c.run("ip", "route", "del", "127.0.0.1/32", check=False)
        c.run("ip", "addr", "add", "127.0.0.1/8", "dev", "lo", check=False)


# -- port grants -------------------------------------------------------------------------------


def test_granted_port_reaches_the_tenant_from_the_host(net: Net) -> None:
    assert http_status("127.0.0.1", GRANTED, 5) == "HTTP/1.0 200 OK"
    assert http_status(GW, GRANTED, 5) == "HTTP/1.0 200 OK"
    assert udp_echo("127.0.0.1", GRANTED, 5) == b"echo ping"


def test_ungranted_port_reaches_nothing(net: Net) -> None:
    assert http_status(str(net.b.address), UNGRANTED) == "HTTP/1.0 200 OK"  # it is listening
    assert http_status("127.0.0.1", UNGRANTED) is None
    assert http_status(GW, UNGRANTED) is None


def test_other_host_users_reach_tenants_only_on_granted_ports(net: Net) -> None:
    """Root (hostd, the admin) connects to tenants directly; any other host user gets the
    granted ports, like everybody else, and is refused the rest."""

    def as_nobody(host: str, port: int) -> str | None:
        done = subprocess.run(
            ["/usr/bin/python3", "-c", CLIENT, host, str(port), "3", "http"],
            user=65534,
            group=65534,
            extra_groups=[],
            capture_output=True,
            text=True,
        )
        return done.stdout.strip() if done.returncode == 0 else None

    b = str(net.b.address)
    assert http_status(b, UNGRANTED) == "HTTP/1.0 200 OK"  # root
    assert as_nobody("127.0.0.1", GRANTED) == "HTTP/1.0 200 OK"
    assert as_nobody(b, UNGRANTED) is None
    assert as_nobody(b, GRANTED) is None  # the grant is a host port, not a way in


def test_a_tenant_claiming_anothers_address_does_not_get_its_traffic(net: Net) -> None:
    c, b = net.c, str(net.b.address)
    c.run("ip", "addr", "add", f"{b}/32", "dev", "eth0")
    try:
        c.run("busybox", "arping", "-U", "-c", "2", "-I", "eth0", "-s", b, b, check=False)
        neigh = run("ip", "neigh", "show", b, "dev", CFG.bridge).stdout
        assert container_mac(net.b.container) in neigh and "PERMANENT" in neigh
        assert http_status("127.0.0.1", GRANTED, 5) == "HTTP/1.0 200 OK"  # still B's server
    finally:
        c.run("ip", "addr", "del", f"{b}/32", "dev", "eth0", check=False)


def test_changing_grants_keeps_tenants_attached(net: Net) -> None:
    try:
        network.setup_host(CFG, [Forward(UNGRANTED, UNGRANTED, net.b.address)])
        assert http_status("127.0.0.1", UNGRANTED, 5) == "HTTP/1.0 200 OK"
        assert http_status("127.0.0.1", GRANTED) is None
        assert f"inet {net.a.address}/24" in net.a.run("ip", "-4", "-o", "addr").stdout
    finally:
        network.setup_host(CFG, [Forward(GRANTED, GRANTED, net.b.address)])
    assert http_status("127.0.0.1", GRANTED, 5) == "HTTP/1.0 200 OK"


def test_outbound_traffic_is_masqueraded(net: Net) -> None:
    table = run("nft", "list", "table", "inet", CFG.nft_table).stdout
    assert f'oifname != "{CFG.bridge}" ip saddr {CFG.subnet} masquerade' in table
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    localnet = Path(f"/proc/sys/net/ipv4/conf/{CFG.bridge}/route_localnet")
    assert localnet.read_text().strip() == "1"


# -- attach and teardown -----------------------------------------------------------------------


@pytest.fixture
def spaces() -> Iterator[Namespaces]:
    made = Namespaces()
    yield made
    made.remove_all()


def test_attach_is_idempotent_and_undone_when_it_fails(net: Net, spaces: Namespaces) -> None:
    d = spaces.add("d", CFG.address_for(10))
    try:
        attach(CFG, d.container, d.address, d.pid)
        attach(CFG, d.container, d.address, d.pid)  # replaces the first veth
        ports = run("ip", "-o", "link", "show", "master", CFG.bridge).stdout
        assert ports.count(veth_name(d.container)) == 1
        assert d.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.count("inet ") == 1
        run("busybox", "ping", "-c", "1", "-W", "3", str(d.address))  # the host reaches it
        assert unattached(CFG, [d.container, "hostd-absent"]) == ["hostd-absent"]
        detach(d.container)
        assert unattached(CFG, [d.container]) == [d.container]

        # A namespace that already has a default route fails at the last step.
        d.run("ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1")
        d.run("ip", "addr", "add", "192.0.2.2/24", "dev", "other0")
        d.run("ip", "link", "set", "other0", "up")
        d.run("ip", "route", "add", "default", "via", "192.0.2.1")
        with pytest.raises(RuntimeFailure, match="default route via .*: File exists"):
            attach(CFG, d.container, d.address, d.pid)
        assert run("ip", "link", "show", veth_name(d.container), check=False).returncode != 0
        assert str(d.address) not in run("ip", "neigh", "show", "dev", CFG.bridge).stdout
        assert "eth0" not in d.run("ip", "-o", "link").stdout
    finally:
        detach(d.container)


def test_attach_to_a_process_that_is_gone_says_so(net: Net) -> None:
    gone = int(Path("/proc/sys/kernel/pid_max").read_text())  # never a live PID
    with pytest.raises(RuntimeFailure, match="cannot attach"):
        attach(CFG, f"gone{PID}", CFG.address_for(11), gone)
    assert run("ip", "link", "show", veth_name(f"gone{PID}"), check=False).returncode != 0


def test_teardown_leaves_nothing(spaces: Namespaces) -> None:
    cfg = NetworkConfig(
        bridge=f"hostdu{PID}", subnet=str(free_subnet(24)), nft_table=f"hostd_test_{PID}_u"
    )
    e = spaces.add("e", cfg.address_for(0))
    try:
        assert network.setup_host(cfg)  # the bridge was made
        assert not network.setup_host(cfg)  # idempotent
        attach(cfg, e.container, e.address, e.pid)
        with pytest.raises(RuntimeFailure, match="still attached"):
            network.teardown_host(cfg)
        detach(e.container)
        network.teardown_host(cfg)
        network.teardown_host(cfg)  # nothing left to remove is fine
        detach(e.container)

        links = run("ip", "-o", "link").stdout
        assert cfg.bridge not in links and veth_name(e.container) not in links
        assert cfg.nft_table not in run("nft", "list", "tables").stdout
        assert container_mac(e.container) not in run("ip", "neigh").stdout
        assert not Path(f"/proc/sys/net/ipv4/conf/{cfg.bridge}").exists()
        assert "eth0" not in e.run("ip", "-o", "link").stdout
    finally:
        force_remove(cfg, [e.container])


def test_attach_without_the_bridge_says_what_to_do(spaces: Namespaces) -> None:
    cfg = NetworkConfig(bridge=f"hostdv{PID}", nft_table=f"hostd_test_{PID}_v")
    f = spaces.add("f", cfg.address_for(0))
    with pytest.raises(RuntimeFailure, match=f"bridge {cfg.bridge} does not exist"):
        attach(cfg, f.container, f.address, f.pid)
    assert run("ip", "link", "show", veth_name(f.container), check=False).returncode != 0
