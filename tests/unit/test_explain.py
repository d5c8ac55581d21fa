"""explain.classify/matches: which policy a described packet matches, as the nft rules would.

One config of several policies in file order, and a table of packets: the
answer must be the first policy whose every given field matches, none for a
packet arriving on an uplink (it keeps that uplink), and local-socket matchers
(uid/gid/cgroup) never match forwarded traffic.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from test_derive import config

from markrouted.explain import Packet, classify, matches, proto_number

POLICIES = """\
[[policy]]
name = "ssh-from-lan"
iif = "lan0"
proto = "tcp"
dport = [22, "2200-2299"]
uplinks = ["wan2"]

[[policy]]
name = "backup-user"
uid = ["1000-1999"]
uplinks = ["wan2"]

[[policy]]
name = "ops-group"
gid = [27]
proto = "udp"
uplinks = ["wan1"]

[[policy]]
name = "backup-cgroup"
cgroup = "system.slice/backup.service"
uplinks = ["wan2"]

[[policy]]
name = "dns-v4"
family = "ipv4"
proto = "udp"
dport = [53]
uplinks = ["wan1"]

[[policy]]
name = "ntp-source-port"
sport = [123]
uplinks = ["wan1"]

[[policy]]
name = "to-docs-nets"
daddr = ["198.51.100.0/24", "2001:db8:5::/48"]
uplinks = ["wan1"]

[[policy]]
name = "from-v6-lan"
saddr = ["2001:db8:9::/64"]
uplinks = ["wan2"]

[[policy]]
name = "pings"
proto = "icmpv6"
uplinks = ["wan2"]

[[policy]]
name = "web"
dport = [80, 443]
balance = { wan1 = 1, wan2 = 1 }
"""

CONFIG = config(POLICIES)
TCP, UDP, ICMP, ICMPV6, SCTP, GRE = 6, 17, 1, 58, 132, 47
V4_DST = "203.0.113.5"
V6_DST = "2001:db8:7::5"


def pkt(daddr: str = V4_DST, **kw: object) -> Packet:
    fields: dict[str, object] = dict(kw)
    if "saddr" in fields and isinstance(fields["saddr"], str):
        fields["saddr"] = ipaddress.ip_address(fields["saddr"])
    return Packet(daddr=ipaddress.ip_address(daddr), **fields)  # type: ignore[arg-type]


CASES = [
    # ports, ranges, proto, iif
    pytest.param(pkt(proto=TCP, dport=22, iif="lan0"), "ssh-from-lan", id="forwarded-ssh"),
    pytest.param(pkt(proto=TCP, dport=2250, iif="lan0"), "ssh-from-lan", id="forwarded-port-in-range"),
    pytest.param(pkt(proto=TCP, dport=2299, iif="lan0"), "ssh-from-lan", id="range-upper-edge"),
    pytest.param(pkt(proto=TCP, dport=2300, iif="lan0"), None, id="past-range"),
    pytest.param(pkt(proto=UDP, dport=22, iif="lan0"), None, id="wrong-proto"),
    pytest.param(pkt(proto=TCP, dport=22), None, id="local-ssh-is-not-iif"),
    pytest.param(pkt(proto=TCP, dport=22, iif="lan1"), None, id="other-lan"),
    # uid / gid / cgroup: local sockets only
    pytest.param(pkt(proto=TCP, dport=9, uid=1000), "backup-user", id="uid-range-low"),
    pytest.param(pkt(proto=TCP, dport=9, uid=1999), "backup-user", id="uid-range-high"),
    pytest.param(pkt(proto=TCP, dport=9, uid=2000), None, id="uid-outside"),
    pytest.param(pkt(proto=TCP, dport=9, uid=1000, iif="lan0"), None, id="uid-never-forwarded"),
    pytest.param(pkt(proto=UDP, dport=9, gid=27), "ops-group", id="gid"),
    pytest.param(pkt(proto=TCP, dport=9, gid=27), None, id="gid-wrong-proto"),
    pytest.param(pkt(proto=TCP, dport=9, cgroup="/system.slice/backup.service/"), "backup-cgroup",
                 id="cgroup-slashes-ignored"),
    pytest.param(pkt(proto=TCP, dport=9, cgroup="system.slice/other.service"), None, id="other-cgroup"),
    pytest.param(pkt(proto=TCP, dport=9, cgroup="system.slice/backup.service", iif="lan0"), None,
                 id="cgroup-never-forwarded"),
    # families
    pytest.param(pkt(proto=UDP, dport=53), "dns-v4", id="dns-v4"),
    pytest.param(pkt(V6_DST, proto=UDP, dport=53), None, id="dns-v6-not-v4-policy"),
    pytest.param(pkt(proto=UDP, dport=53, iif="lan0"), "dns-v4", id="dns-forwarded"),
    pytest.param(pkt(proto=UDP, sport=123, dport=123), "ntp-source-port", id="sport"),
    pytest.param(pkt(proto=GRE), None, id="no-ports-for-gre"),
    pytest.param(pkt(proto=SCTP, sport=123), "ntp-source-port", id="sctp-has-ports"),
    pytest.param(pkt("198.51.100.77", proto=GRE), "to-docs-nets", id="daddr-v4"),
    pytest.param(pkt("2001:db8:5:1::1", proto=GRE), "to-docs-nets", id="daddr-v6"),
    pytest.param(pkt("2001:db8:6::1", proto=GRE), None, id="daddr-v6-outside"),
    pytest.param(pkt(V6_DST, proto=GRE, saddr="2001:db8:9::42"), "from-v6-lan", id="saddr-v6"),
    pytest.param(pkt(V6_DST, proto=GRE), None, id="saddr-unknown"),
    pytest.param(pkt(V4_DST, proto=GRE, saddr="192.0.2.9"), None, id="saddr-other-family"),
    pytest.param(pkt(V6_DST, proto=ICMPV6), "pings", id="icmpv6"),
    pytest.param(pkt(V4_DST, proto=ICMP), None, id="icmp-v4-is-not-icmpv6"),
    # first match wins
    pytest.param(pkt("198.51.100.1", proto=TCP, dport=443), "to-docs-nets", id="daddr-before-web"),
    pytest.param(pkt(proto=TCP, dport=443), "web", id="web"),
    pytest.param(pkt("198.51.100.1", proto=UDP, dport=53), "dns-v4", id="dns-before-daddr"),
    pytest.param(pkt(proto=TCP, dport=22, iif="lan0", uid=1000), "ssh-from-lan", id="ssh-before-uid"),
    pytest.param(pkt(proto=TCP, dport=443, uid=1500), "backup-user", id="uid-before-web"),
    # packets arriving on an uplink keep it: no policy
    pytest.param(pkt(proto=TCP, dport=443, iif="eth0"), None, id="inbound-on-wan1"),
    pytest.param(pkt("198.51.100.1", proto=UDP, dport=53, iif="eth1"), None, id="inbound-on-wan2"),
    pytest.param(pkt(proto=TCP, dport=8080), None, id="unmatched-follows-main"),
]


@pytest.mark.parametrize(("packet", "expected"), CASES)
def test_classify(packet: Packet, expected: str | None) -> None:
    found = classify(CONFIG, packet)
    assert (found.name if found else None) == expected


def test_every_policy_is_reachable() -> None:
    """The table above exercises each policy at least once."""
    names = {p.name for p in CONFIG.policies}
    hit = {found.name for case in CASES if (found := classify(CONFIG, case.values[0]))}  # type: ignore[arg-type]
    assert hit == names


@pytest.mark.parametrize(
    ("body", "packet", "expected"),
    [
        pytest.param("", pkt(), True, id="empty-policy-matches-all"),
        pytest.param("", pkt(V6_DST), True, id="empty-policy-matches-v6"),
        pytest.param('family = "ipv6"', pkt(), False, id="family-ipv6"),
        pytest.param('proto = "tcp"', pkt(), False, id="proto-given-packet-has-none"),
        pytest.param("dport = [443]", pkt(proto=UDP, dport=443), True, id="dport-any-port-proto"),
        pytest.param("dport = [443]", pkt(proto=ICMP, dport=443), False, id="dport-needs-port-proto"),
        pytest.param("dport = [443]", pkt(proto=TCP), False, id="dport-packet-without-port"),
        pytest.param('saddr = ["0.0.0.0/0"]', pkt(saddr="192.0.2.1"), True, id="saddr-any-v4"),
        pytest.param('saddr = ["0.0.0.0/0"]', pkt(V6_DST, saddr="2001:db8::1"), False, id="saddr-v4-net-v6-packet"),
    ],
)
def test_matches(body: str, packet: Packet, expected: bool) -> None:
    cfg = config(f'[[policy]]\nname = "p"\nuplinks = ["wan1"]\n{body}\n')
    assert matches(cfg.policies[0], packet) is expected


def test_uplink_interfaces_are_passed_by_classify_only() -> None:
    p = CONFIG.policies[-1]  # web
    packet = pkt(proto=TCP, dport=443, iif="eth0")
    assert matches(p, packet) is True
    assert matches(p, packet, frozenset({"eth0"})) is False


def test_packet_family() -> None:
    assert pkt().family == socket.AF_INET
    assert pkt(V6_DST).family == socket.AF_INET6


@pytest.mark.parametrize(
    ("text", "number"),
    [("tcp", 6), ("UDP", 17), ("icmp", 1), ("icmpv6", 58), ("ipv6-icmp", 58), ("sctp", 132), ("47", 47)],
)
def test_proto_number(text: str, number: int) -> None:
    assert proto_number(text) == number


def test_proto_number_unknown() -> None:
    with pytest.raises(ValueError, match="unknown protocol 'bogus'"):
        proto_number("bogus")


def test_a_policy_whose_cgroup_does_not_exist_is_skipped() -> None:
    """derive renders no rule for a missing cgroup; classify must agree when told what exists."""
    cfg = config(
        '[[policy]]\nname = "backup"\ncgroup = "system.slice/backup.service"\nuplinks = ["wan2"]\n'
        '[[policy]]\nname = "rest"\nuplinks = ["wan1"]\n'
    )
    packet = pkt(cgroup="system.slice/backup.service")
    found = classify(cfg, packet)
    assert found is not None and found.name == "backup"
    found = classify(cfg, packet, frozenset({"system.slice/backup.service"}))
    assert found is not None and found.name == "backup"
    found = classify(cfg, packet, frozenset())
    assert found is not None and found.name == "rest"
