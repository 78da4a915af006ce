"""Container network plans (names, addresses, nft ruleset, resolv.conf), checked without root."""

from __future__ import annotations

import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.errors import RuntimeFailure
from runtime.netplan import (
    IFNAMSIZ,
    Forward,
    NetworkConfig,
    bridge_ruleset,
    container_mac,
    host_nameservers,
    host_services,
    pin_script,
    port_group,
    resolv_conf,
    ruleset,
    unpin_script,
    veth_name,
)

CFG = NetworkConfig(bridge="hostd0", subnet="10.213.0.0/16", nft_table="hostd")
A, B = IPv4Address("10.213.0.2"), IPv4Address("10.213.0.3")
FORWARDS = (Forward(20001, 20001, B), Forward(30000, 30010, A))


def rules(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def chain(text: str, name: str) -> list[str]:
    lines = rules(text)
    start = lines.index(f"chain {name} {{") + 1
    return lines[start : lines.index("}", start)]


# -- ruleset ---------------------------------------------------------------------------------


def test_ruleset_is_one_table_of_the_project() -> None:
    text = ruleset(CFG)
    assert text.startswith("table inet hostd {\n")
    assert text.endswith("}\n")
    assert text.count("table ") == 1


def test_ruleset_is_deterministic_whatever_the_forward_order() -> None:
    assert ruleset(CFG, FORWARDS) == ruleset(CFG, FORWARDS[::-1]) == ruleset(CFG, list(FORWARDS))


def test_containers_are_masqueraded_on_the_way_out() -> None:
    assert 'oifname != "hostd0" ip saddr 10.213.0.0/16 masquerade' in chain(
        ruleset(CFG), "postrouting"
    )


def test_containers_cannot_reach_each_other_through_the_host() -> None:
    forward = chain(ruleset(CFG), "forward")
    assert forward[1] == 'iifname "hostd0" oifname "hostd0" drop'  # before any accept
    assert forward[-1] == 'oifname "hostd0" drop'  # nothing reaches a tenant unasked


def test_containers_may_send_only_ipv4_from_their_subnet() -> None:
    forward = chain(ruleset(CFG), "forward")
    accept = forward.index('iifname "hostd0" ip saddr 10.213.0.0/16 accept')
    assert forward[accept + 1] == 'iifname "hostd0" drop'


def test_containers_reach_no_host_service_without_dns() -> None:
    text = ruleset(CFG)
    assert chain(text, "input")[1:] == ['iifname "hostd0" jump from_containers']
    assert chain(text, "from_containers") == ["ct state established,related accept", "drop"]


def test_host_users_but_root_reach_containers_only_through_forwards() -> None:
    text = ruleset(CFG)
    assert chain(text, "local_out")[1:] == ['oifname "hostd0" jump to_containers']
    assert chain(text, "to_containers") == [
        "ct state established,related accept",
        "ct status dnat accept",  # a granted port, from 127.0.0.1 say
        "meta skuid 0 accept",
        "reject",
    ]


def test_dns_on_the_bridge_address_is_allowed_when_configured() -> None:
    with_dns = NetworkConfig(dns=("10.213.0.1",))
    assert chain(ruleset(with_dns), "from_containers") == [
        "ct state established,related accept",
        "ip daddr 10.213.0.1 meta l4proto { tcp, udp } th dport 53 accept",
        "drop",
    ]
    # other nameservers are reached through NAT: nothing opens on the host
    elsewhere = NetworkConfig(dns=("192.0.2.53",))
    assert chain(ruleset(elsewhere), "from_containers") == chain(ruleset(CFG), "from_containers")


def test_forwards_dnat_from_elsewhere_and_from_the_host_itself() -> None:
    text = ruleset(CFG, FORWARDS)
    prerouting, output = chain(text, "prerouting"), chain(text, "output")
    assert prerouting[0].startswith("type nat hook prerouting")
    assert prerouting[1:] == [
        'iifname != "hostd0" meta nfproto ipv4 fib daddr type local jump forwards'
    ]
    assert output[0].startswith("type nat hook output")
    assert output[1:] == ["meta nfproto ipv4 fib daddr type local jump forwards"]
    assert chain(text, "forwards") == [
        "meta l4proto { tcp, udp } th dport 20001 dnat ip to 10.213.0.3",
        "meta l4proto { tcp, udp } th dport 30000-30010 dnat ip to 10.213.0.2",
    ]


def test_forwarded_ports_reach_containers_and_localhost_is_masqueraded() -> None:
    text = ruleset(CFG, FORWARDS)
    assert 'oifname "hostd0" ct status dnat accept' in chain(text, "forward")
    assert 'oifname "hostd0" ip saddr 127.0.0.0/8 masquerade' in chain(text, "postrouting")


def test_no_forwards_means_an_empty_forwards_chain() -> None:
    assert chain(ruleset(CFG), "forwards") == []


def test_overlapping_forwards_are_refused() -> None:
    with pytest.raises(RuntimeFailure, match="overlap"):
        ruleset(CFG, [Forward(20001, 20005, A), Forward(20005, 20005, B)])


def test_forwards_must_target_a_container_address() -> None:
    for address in ("10.213.0.1", "10.213.255.255", "10.214.0.2"):
        with pytest.raises(RuntimeFailure, match="not a container address"):
            ruleset(CFG, [Forward(20001, 20001, IPv4Address(address))])


@pytest.mark.parametrize("first,last", [(0, 10), (10, 9), (1, 65536)])
def test_port_ranges_are_checked(first: int, last: int) -> None:
    with pytest.raises(RuntimeFailure, match="invalid port range"):
        Forward(first, last, A)


def nft_check(script: str) -> None:
    """`nft -c` needs CAP_NET_ADMIN: check in a throwaway user and network namespace."""
    if shutil.which("nft") is None or shutil.which("unshare") is None:
        pytest.skip("nft or unshare missing: apt-get install nftables util-linux")
    probe = subprocess.run(["unshare", "-U", "-r", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged user namespaces: {probe.stderr.decode().strip()}")
    done = subprocess.run(
        ["unshare", "-U", "-r", "-n", "nft", "-c", "-f", "-"],
        input=script.encode(),
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()


def test_nft_accepts_the_ruleset() -> None:
    for cfg, grants in ((CFG, ()), (NetworkConfig(dns=("10.213.0.1",)), FORWARDS)):
        nft_check(ruleset(cfg, grants))


# -- MAC and address pinning per bridge port ---------------------------------------------------


def test_bridge_table_sends_each_port_to_its_own_chain() -> None:
    text = bridge_ruleset(CFG)
    assert text.startswith("table bridge hostd {\n")
    assert "map ports { type ifname : verdict; }" in text
    assert "type filter hook prerouting priority filter; policy accept;" in text
    group = port_group(CFG)
    assert text.splitlines()[-3:] == [
        "flush chain bridge hostd prerouting",
        f"add rule bridge hostd prerouting iifgroup {group} iifname vmap @ports",
        f"add rule bridge hostd prerouting iifgroup {group} drop",  # a port without a pin
    ]
    assert "delete" not in text  # applied again (new grants), it keeps the pinned ports


def test_a_port_passes_only_its_own_mac_with_its_own_address() -> None:
    mac, veth = container_mac("alice"), veth_name("alice")
    lines = pin_script(CFG, "alice", A).splitlines()
    chain = f"bridge hostd port_{veth}"
    assert lines == [
        f"add chain {chain}",
        f"flush chain {chain}",  # a re-attach with a new address replaces the old rules
        f"add rule {chain} ether saddr != {mac} drop",
        f"add rule {chain} arp saddr ether {mac} arp saddr ip 10.213.0.2 accept",
        f"add rule {chain} ip saddr 10.213.0.2 accept",
        f"add rule {chain} drop",  # other addresses, IPv6, other ethertypes, VLAN tags
        f'add element bridge hostd ports {{ "{veth}" : jump port_{veth} }}',
    ]


def test_port_groups_are_per_bridge_and_never_the_default() -> None:
    groups = {port_group(NetworkConfig(bridge=f"hostd{i}")) for i in range(1000)}
    assert len(groups) == 1000
    assert all(0 < g < 2**31 for g in groups)
    assert port_group(CFG) == port_group(NetworkConfig(bridge="hostd0", subnet="10.9.0.0/16"))


def test_pins_are_for_container_addresses_only() -> None:
    with pytest.raises(RuntimeFailure, match="not a container address"):
        pin_script(CFG, "alice", IPv4Address("10.213.0.1"))


def test_unpin_removes_the_port_from_every_table_present_or_not() -> None:
    veth = veth_name("alice")
    assert unpin_script([], "alice") == ""
    text = unpin_script(["hostd", "hostd_test"], "alice")
    for table in ("hostd", "hostd_test"):
        assert f'delete element bridge {table} ports {{ "{veth}" }}' in text
        assert f"delete chain bridge {table} port_{veth}" in text
    # created first in the same transaction, so that deleting cannot fail
    assert text.index(f"add chain bridge hostd port_{veth}") < text.index("delete chain")


def test_nft_accepts_the_bridge_table_pins_and_unpins() -> None:
    nft_check(
        bridge_ruleset(CFG)
        + bridge_ruleset(CFG)
        + pin_script(CFG, "alice", A)
        + pin_script(CFG, "alice", A)
        + pin_script(CFG, "bob", B)
        + unpin_script(["hostd"], "alice")
        + unpin_script(["hostd"], "carol")
    )


# -- names and addresses -----------------------------------------------------------------------


@given(st.text(min_size=1, max_size=80))
def test_veth_names_fit_the_kernel_and_are_ours(container: str) -> None:
    name = veth_name(container)
    assert len(name) <= IFNAMSIZ
    assert name.startswith("hostd")
    assert name.isascii() and name.isalnum()
    assert name == veth_name(container)  # stable


def test_veth_names_differ_between_containers_and_from_the_bridge() -> None:
    names = {veth_name(f"user{i}") for i in range(1000)}
    assert len(names) == 1000
    assert "hostd0" not in names
    assert veth_name("alice") == "hostd2bd806c97f"  # stable across runs and machines


def test_container_mac_is_local_unicast_and_matches_the_veth_name() -> None:
    mac = container_mac("alice")
    assert mac == "02:2b:d8:06:c9:7f"
    assert mac.replace(":", "")[2:] == veth_name("alice")[len("hostd") :]


def test_addresses_start_after_the_bridge() -> None:
    assert str(CFG.bridge_address()) == "10.213.0.1/16"
    assert CFG.address_for(0) == IPv4Address("10.213.0.2")
    assert CFG.address_for(1) == IPv4Address("10.213.0.3")


def test_a_full_subnet_says_so() -> None:
    small = NetworkConfig(subnet="10.213.128.0/24")
    assert small.address_for(252) == IPv4Address("10.213.128.254")
    with pytest.raises(RuntimeFailure, match=r"subnet 10.213.128.0/24 is full"):
        small.address_for(253)


@given(st.integers(min_value=16, max_value=28), st.data())
def test_every_container_address_is_in_the_subnet_and_not_reserved(
    prefix: int, data: st.DataObject
) -> None:
    cfg = NetworkConfig(subnet=f"10.213.0.0/{prefix}")
    net = IPv4Network(cfg.subnet)
    index = data.draw(st.integers(min_value=0, max_value=cfg.capacity() - 1))
    address = cfg.address_for(index)
    assert address in net
    assert address not in (net.network_address, net.broadcast_address, cfg.bridge_address().ip)
    assert cfg.check_address(address) == address


@pytest.mark.parametrize(
    "fields",
    [
        {"bridge": "br0"},
        {"bridge": "hostd0123456789x"},  # 16 characters
        {"bridge": "hostd 0"},
        {"nft_table": "filter"},
        {"nft_table": "hostd;flush ruleset"},
        {"subnet": "10.213.0.1/16"},  # host bits set
        {"subnet": "10.213.0.0/29"},  # room for 5 containers only
        {"subnet": "8.8.0.0/16"},  # not private
        {"dns": ("not-an-address",)},
    ],
)
def test_bad_settings_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(RuntimeFailure):
        NetworkConfig(**fields)  # type: ignore[arg-type]


# -- resolv.conf -------------------------------------------------------------------------------


def test_resolv_conf_lists_the_nameservers() -> None:
    text = resolv_conf(NetworkConfig(dns=("10.213.0.1", "192.0.2.53")))
    assert [ln for ln in text.splitlines() if not ln.startswith("#")] == [
        "nameserver 10.213.0.1",
        "nameserver 192.0.2.53",
    ]
    assert text.endswith("\n")


def test_resolv_conf_without_nameservers_has_none() -> None:
    text = resolv_conf(NetworkConfig())
    assert not [ln for ln in text.splitlines() if ln.startswith("nameserver")]


def test_host_nameservers_skip_loopback_ipv6_and_comments(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# nameserver 192.0.2.99\n"
        "; nameserver 192.0.2.98\n"
        "nameserver 127.0.0.53\n"
        "nameserver ::1\n"
        "nameserver 192.0.2.53  # primary\n"
        "nameserver 2001:db8::53\n"
        "nameserver bogus\n"
        "nameserver\n"
        "search example.org\n"
        "nameserver 198.51.100.53\n"
        "nameserver 192.0.2.53\n"
    )
    assert host_nameservers([conf]) == ("192.0.2.53", "198.51.100.53")


def test_host_nameservers_behind_systemd_resolved_are_its_upstream_servers(
    tmp_path: Path,
) -> None:
    stub, upstream = tmp_path / "resolv.conf", tmp_path / "resolve-resolv.conf"
    stub.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    upstream.write_text("nameserver 192.0.2.53\n")
    assert host_nameservers([stub, upstream]) == ("192.0.2.53",)
    stub.write_text("nameserver 198.51.100.53\n")  # the first file wins when it has any
    assert host_nameservers([stub, upstream]) == ("198.51.100.53",)


def test_host_nameservers_of_missing_files(tmp_path: Path) -> None:
    assert host_nameservers([tmp_path / "missing", tmp_path / "gone"]) == ()


def _proc_net_rows(*sockets: tuple[str, str, str]) -> str:
    """A /proc/net/{tcp,udp}[6] file with these (local, remote, state) rows."""
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    return header + "".join(
        f"  {i}: {local} {remote} {state} 00000000:00000000 00:00000000 00000000  0\n"
        for i, (local, remote, state) in enumerate(sockets)
    )


def test_host_services_are_tcp_listeners_and_bound_udp_sockets(tmp_path: Path) -> None:
    any6 = "0" * 32
    (tmp_path / "tcp").write_text(
        _proc_net_rows(
            ("0100007F:1538", "00000000:0000", "0A"),  # 127.0.0.1:5432 listening
            ("0100007F:AF04", "0100007F:4E21", "01"),  # a connection's end
        )
    )
    (tmp_path / "tcp6").write_text(_proc_net_rows((f"{any6}:08AE", f"{any6}:0000", "0A")))
    (tmp_path / "udp").write_text(
        _proc_net_rows(
            ("00000000:0035", "00000000:0000", "07"),  # DNS, bound
            ("0A000002:9C40", "08080808:0035", "01"),  # a connected client
        )
    )
    assert host_services(tmp_path) == {5432, 2222, 53}  # no udp6 file: no IPv6
