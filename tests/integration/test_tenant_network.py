"""Tenants on the network: isolated from each other and the host, reachable on granted ports."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import netplan
from tests.conftest import TEST_BRIDGE, TEST_GATEWAY, TEST_SUBNET, TEST_TABLE
from tests.hostd_harness import Hostd, UnixUsers, wait_for

SERVE = (
    "docker run -d --name web{port} -p {port}:80 busybox:local sh -c "
    "'mkdir /www && echo served-by-{user} > /www/index.html && httpd -f -p 80 -h /www'"
)


def _address(h: Hostd, user: str) -> str:
    details = json.loads(h.hostctl("user", "show", user, "--json").stdout)
    script = "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1"
    inside = h.hostctl("exec", user, "--", "sh", "-c", script).stdout.strip()
    assert details["tenant"]["user"] == user and details["address"] == inside  # what show says
    return inside


def _serve(h: Hostd, user: str, port: int, busybox_tar: Path) -> None:
    h.hostctl(
        "exec", user, "--", "docker", "import", "-", "busybox:local", input=busybox_tar.read_bytes()
    )
    h.hostctl("exec", user, "--", "sh", "-c", SERVE.format(port=port, user=user))
    fetch = ("exec", user, "--", "curl", "-fsS", f"http://127.0.0.1:{port}/")
    wait_for(lambda: h.hostctl(*fetch, check=False).returncode == 0, 10, f"web{port} inside")


def _http(address: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{address}:{port}/", timeout=10) as reply:
        return str(reply.read().decode())


@contextlib.contextmanager
def _granted(h: Hostd, user: str, port: int) -> Iterator[None]:
    h.hostctl("ports", "grant", user, str(port))
    try:
        yield
    finally:
        h.hostctl("ports", "revoke", user, str(port))


def _refused(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(3)
        return s.connect_ex((address, port)) != 0


@pytest.fixture(scope="module")
def two_tenants(hostd: Hostd, unix_users: UnixUsers, busybox_tar: Path) -> tuple[str, str]:
    a, b = unix_users.make(), unix_users.make()
    for user in (a, b):
        hostd.hostctl("user", "add", user)
        hostd.hostctl("start", user)
    _serve(hostd, b, 20001, busybox_tar)
    _serve(hostd, b, 20002, busybox_tar)
    return a, b


def test_granted_port_serves_the_tenants_container(
    hostd: Hostd, two_tenants: tuple[str, str]
) -> None:
    _, b = two_tenants
    hostd.hostctl("ports", "grant", b, "20001")
    bridge = str(
        netplan.NetworkConfig(TEST_BRIDGE, str(TEST_SUBNET), TEST_TABLE).bridge_address().ip
    )
    assert _http("127.0.0.1", 20001).strip() == f"served-by-{b}"
    assert _http(bridge, 20001).strip() == f"served-by-{b}"
    assert _refused("127.0.0.1", 20002)  # published inside, but not granted
    listing = hostd.hostctl("ports", "list").stdout
    assert f"20001  {b}" in listing
    hostd.hostctl("ports", "revoke", b, "20001")
    assert _refused("127.0.0.1", 20001)


def test_tenants_cannot_reach_each_other_or_the_host(
    hostd: Hostd, two_tenants: tuple[str, str]
) -> None:
    a, b = two_tenants
    b_address = _address(hostd, b)
    probe = f"curl -sS --max-time 3 http://{b_address}:20001/"
    assert hostd.hostctl("exec", a, "--", "sh", "-c", probe, check=False).returncode != 0
    ping = f"ping -c 1 -W 2 {b_address}"
    assert hostd.hostctl("exec", a, "--", "sh", "-c", ping, check=False).returncode != 0
    # the host's own services (here: hostd's neighbour, a listener on the bridge address)
    with socket.socket() as listener:
        bridge = netplan.NetworkConfig(TEST_BRIDGE, str(TEST_SUBNET), TEST_TABLE)
        listener.bind((str(bridge.bridge_address().ip), 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = f"curl -sS --max-time 3 http://{bridge.bridge_address().ip}:{port}/"
        assert hostd.hostctl("exec", a, "--", "sh", "-c", probe, check=False).returncode != 0
    # DNS: the configured nameserver
    resolv = hostd.hostctl("exec", a, "--", "cat", "/etc/resolv.conf").stdout
    assert f"nameserver {TEST_GATEWAY}" in resolv
    # the inner Docker cannot take host ports: B's published 20002 is not on the host
    assert _refused("127.0.0.1", 20002)


def test_port_grant_bad_input(hostd: Hostd, two_tenants: tuple[str, str]) -> None:
    a, b = two_tenants
    hostd.hostctl("ports", "grant", a, "21000-21009")
    before = hostd.hostctl("--json", "ports", "list").stdout
    listener = socket.create_server(("127.0.0.1", 0))  # a host service, on loopback only
    service, gateway = listener.getsockname()[1], hostd.ssh_port
    cases = {
        ("ports", "grant", b, "21005-21020"): "overlap 21000-21009 granted to",
        ("ports", "grant", b, "80"): "ports below 1024 (80) are privileged",
        ("ports", "grant", b, f"{service - 1}-{service}"): f"port {service} is in use on the host",
        ("ports", "grant", b, str(gateway)): f"port {gateway} is in use on the host",
        ("ports", "grant", b, "70000"): "invalid port range '70000'",
        ("ports", "grant", b, "x-y"): "invalid port range",
        ("ports", "grant", "nosuchuser", "22000"): "nosuchuser is not a tenant",
        ("ports", "revoke", b, "21000-21009"): "has no grant of ports 21000-21009",
        ("quota", "set", b, "--disk", "0"): "disk",
        ("quota", "set", b, "--memory", "10XB"): "invalid memory size",
        ("quota", "set", b, "--cpus", "1000"): "cpus",
    }
    with listener:
        for args, message in cases.items():
            res = hostd.hostctl(*args, check=False)
            assert res.returncode == 1 and message in res.stderr, (args, res.stderr)
    assert hostd.hostctl("--json", "ports", "list").stdout == before
    hostd.hostctl("ports", "revoke", a, "21000-21009")


def test_removal_leaves_no_network_objects(
    hostd: Hostd, unix_users: UnixUsers, two_tenants: tuple[str, str]
) -> None:
    user = unix_users.make()
    hostd.hostctl("user", "add", user, "--disk", "1G")
    hostd.hostctl("start", user)
    hostd.hostctl("ports", "grant", user, "23000")
    veth = netplan.veth_name(user)
    assert veth in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    image = hostd.state_dir / "containers" / user / "data.img"
    loops = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
    assert loops.strip()
    hostd.hostctl("user", "remove", user)
    assert veth not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    rules = subprocess.run(
        ["nft", "list", "table", "inet", TEST_TABLE], capture_output=True, text=True
    ).stdout
    assert "23000" not in rules
    assert not subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True
    ).stdout.strip()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f"/containers/{user}/" not in mounts


def test_restart_recreates_the_network_state_says(
    hostd: Hostd, two_tenants: tuple[str, str]
) -> None:
    _, b = two_tenants
    with _granted(hostd, b, 20001):
        assert _http("127.0.0.1", 20001).strip() == f"served-by-{b}"
        hostd.stop()
        subprocess.run(["ip", "link", "del", TEST_BRIDGE], check=True)  # lost, e.g. by a reboot
        subprocess.run(["nft", "delete", "table", "inet", TEST_TABLE], check=True)
        hostd.start()  # reconcile: bridge, rules and B's attachment as the state says
        assert _http("127.0.0.1", 20001).strip() == f"served-by-{b}"
        assert "re-attached" in hostd.log.read_text()


def test_a_start_brings_back_a_bridge_deleted_under_hostd(
    hostd: Hostd, two_tenants: tuple[str, str]
) -> None:
    a, b = two_tenants
    with _granted(hostd, b, 20001):
        hostd.hostctl("stop", a)
        subprocess.run(["ip", "link", "del", TEST_BRIDGE], check=True)  # by hand, hostd running
        hostd.hostctl("start", a)  # not "bridge does not exist": the bridge comes back
        assert _address(hostd, a)
        assert _http("127.0.0.1", 20001).strip() == f"served-by-{b}"  # B was re-attached
        assert f"re-attached {b} to the bridge" in hostd.log.read_text()
