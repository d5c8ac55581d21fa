"""markrouted's own netlink writes against the kernel: what is written is what reads back.

Rules and routes covering every field markrouted writes (IPv4 and IPv6, mark
and mask, sources, suppress_prefixlength, tables above 255, unreachable
routes, gateways, preferred sources, scope link, onlink, metrics) are written
one by one in a namespace of the test's own and read back by the dumps the
reconciler uses: each must compare equal to the model object it was written
from, a second add must say "already there", a delete must remove exactly it,
a second delete must say "not there". The conntrack delete must remove the
entries whose mark matches under the mask, IPv4 and IPv6 alike, and nothing
else. None of it may import pyroute2 (the daemon's memory: about 11 MB).

Each operation list runs through ``rtnl_writer.py`` inside the namespace.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import time
from typing import Any

import pytest

from conftest import PYTHON, ROOT
from markrouted.model import AF_INET, AF_INET6, MAIN_TABLE, RT_SCOPE_LINK, RTN_UNREACHABLE, Route, Rule

from .kernelhost import wait_carrier

pytestmark = pytest.mark.kernel

WRITER = os.path.join(ROOT, "tests", "kernel", "rtnl_writer.py")
START = 10000  # every rule below lies in rule_priority 10000's range
UNREACHABLE_METRIC = 0xFFFFFFFF - 1

RULES = [
    Rule(AF_INET, 10000, MAIN_TABLE, suppress_prefixlength=0),
    Rule(AF_INET6, 10000, MAIN_TABLE, suppress_prefixlength=0),
    Rule(AF_INET, 10100, 101, fwmark=0x00010000, fwmask=0x00FF0000),
    Rule(AF_INET6, 10100, 101, fwmark=0x00010000, fwmask=0x00FF0000),
    Rule(AF_INET, 10101, 300, fwmark=0x01000000, fwmask=0xFF000000),
    Rule(AF_INET, 10200, 70000, fwmark=0xFFFFFFFF, fwmask=0xFFFFFFFF),
    Rule(AF_INET, 10300, 101, src="192.0.2.2", src_len=32),
    Rule(AF_INET6, 10300, 4000000000, src="2001:db8:7::2", src_len=128),
    Rule(AF_INET6, 10301, 102, src="2001:db8:7::", src_len=64, fwmark=0x2, fwmask=0xFF),
    Rule(AF_INET, 10302, 102, src="198.18.0.0", src_len=15, suppress_prefixlength=24),
]


def routes_via(oif: int) -> list[Route]:
    return [
        Route(AF_INET, 101, "0.0.0.0/0", 0, oif, gateway="192.0.2.3"),
        Route(AF_INET, 300, "0.0.0.0/0", 10, oif, gateway="198.18.0.1", onlink=True),
        Route(AF_INET, 101, "192.0.2.0/24", 0, oif, prefsrc="192.0.2.2", scope=RT_SCOPE_LINK),
        Route(AF_INET, 70000, "0.0.0.0/0", 0, oif, scope=RT_SCOPE_LINK),
        Route(AF_INET, 101, "0.0.0.0/0", UNREACHABLE_METRIC, 0, type=RTN_UNREACHABLE),
        Route(AF_INET6, 101, "::/0", 1024, oif, gateway="2001:db8:7::3"),
        Route(AF_INET6, 4000000000, "::/0", 1024, oif, gateway="fe80::1"),
        Route(AF_INET6, 102, "2001:db8:7::/64", 1024, oif, prefsrc="2001:db8:7::2"),
        Route(AF_INET6, 300, "::/0", 1024, oif, gateway="2001:db8:99::1", onlink=True),
        Route(AF_INET6, 101, "::/0", UNREACHABLE_METRIC, 0, type=RTN_UNREACHABLE),
    ]


def plain(obj: Rule | Route) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def write(netns: Any, ops: list[list[Any]]) -> list[Any]:
    proc = subprocess.run([*netns.nsenter(), PYTHON, WRITER], input=json.dumps(ops), capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["pyroute2"] == [], f"the writes imported pyroute2: {out['pyroute2'][:5]}"
    results: list[Any] = out["results"]
    return results


@pytest.fixture
def link(netns: Any) -> int:
    """A veth pair inside the namespace, up: mrw0 192.0.2.2/24 2001:db8:7::2/64, its peer .1/::1."""
    netns.sh("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
    netns.ip("link", "add", "mrw0", "type", "veth", "peer", "name", "mrw1")
    for dev, host in (("mrw0", 2), ("mrw1", 1)):
        netns.ip("addr", "add", f"192.0.2.{host}/24", "dev", dev)
        netns.ip("-6", "addr", "add", f"2001:db8:7::{host}/64", "dev", dev, "nodad")
        netns.ip("link", "set", dev, "up")
    wait_carrier(netns, ("mrw0", "mrw1"))
    # IPv6 configures the address's prefix route once the link has carrier
    end = time.monotonic() + 10
    while not netns.ip("-6", "route", "show", "2001:db8:7::/64", "dev", "mrw0").strip():
        assert time.monotonic() < end, "no IPv6 prefix route on mrw0"
        time.sleep(0.01)
    index: int = json.loads(netns.ip("-j", "link", "show", "mrw0"))[0]["ifindex"]
    return index


def test_rules_read_back_as_written(netns: Any) -> None:
    n = len(RULES)
    out = write(netns, [*(["add_rule", plain(r)] for r in RULES), ["rules", [START]]])
    assert out[:n] == [True] * n, out[:n]
    assert sorted(Rule(**r) for r in out[n]) == sorted(RULES)
    # iproute2 sees them too, tagged as markrouted's (proto 109)
    tagged = [r for family in ("-4", "-6") for r in json.loads(netns.ip(family, "-j", "rule", "show"))
              if str(r.get("protocol")) in ("109", "markrouted")]
    assert len(tagged) == n, tagged

    half = RULES[::2]
    out = write(netns, [*(["add_rule", plain(r)] for r in RULES), *(["del_rule", plain(r)] for r in half),
                        ["rules", [START]], *(["del_rule", plain(r)] for r in RULES), ["rules", [START]]])
    again, deleted, after_del, rest, empty = (out[:n], out[n : n + len(half)], out[n + len(half)],
                                              out[n + len(half) + 1 : -1], out[-1])
    assert again == [False] * n, "a second add of the same rule is EEXIST, reported as False"
    assert deleted == [True] * len(half)
    assert sorted(Rule(**r) for r in after_del) == sorted(RULES[1::2]), "a delete removes exactly its rule"
    assert rest == [i % 2 == 1 for i in range(n)], "deleting a missing rule is False"
    assert empty == []


def test_each_rule_field_is_its_own(netns: Any) -> None:
    """A delete with one field changed finds no rule: every field is part of what was written."""
    base = RULES[8]  # source, mark and mask, IPv6
    variants = [dataclasses.replace(base, fwmark=0x3), dataclasses.replace(base, fwmask=0xF),
                dataclasses.replace(base, src="2001:db8:8::", src_len=64), dataclasses.replace(base, src_len=48),
                dataclasses.replace(base, table=103), dataclasses.replace(base, priority=10302)]
    out = write(netns, [["add_rule", plain(base)], *(["del_rule", plain(v)] for v in variants),
                        ["rules", [START]]])
    assert out[0] is True
    assert out[1:-1] == [False] * len(variants)
    assert [Rule(**r) for r in out[-1]] == [base]


def test_routes_read_back_as_written(netns: Any, link: int) -> None:
    routes = routes_via(link)
    ops: list[list[Any]] = [["set_route", plain(r)] for r in routes]
    ops += [["routes"]]
    ops += [["set_route", plain(r)] for r in routes]  # a replace of the same route changes nothing
    ops += [["routes"]]
    ops += [["del_route", plain(r)] for r in routes]
    ops += [["routes"]]
    ops += [["del_route", plain(r)] for r in routes]
    out = write(netns, ops)
    n = len(routes)
    assert out[:n] == [None] * n, out[:n]
    assert sorted(Route(**r) for r in out[n]) == sorted(routes)
    assert out[n + 1 : 2 * n + 1] == [None] * n, "a replace of a route that is there succeeds"
    assert sorted(Route(**r) for r in out[2 * n + 1]) == sorted(routes), "a replace must not duplicate"
    assert out[2 * n + 2 : 3 * n + 2] == [True] * n
    assert out[3 * n + 2] == []
    assert out[3 * n + 3 :] == [False] * n, "deleting a missing route is False"


def test_route_replace_takes_the_slot_in_place(netns: Any, link: int) -> None:
    old = Route(AF_INET, 101, "0.0.0.0/0", 0, link, gateway="192.0.2.3")
    new = dataclasses.replace(old, gateway="192.0.2.4")
    old6 = Route(AF_INET6, 300, "::/0", 1024, link, gateway="2001:db8:7::3")
    new6 = dataclasses.replace(old6, gateway="2001:db8:99::1", onlink=True)
    out = write(netns, [["set_route", plain(old)], ["set_route", plain(old6)],
                        ["set_route", plain(new)], ["set_route", plain(new6)], ["routes"]])
    assert sorted(Route(**r) for r in out[-1]) == sorted([new, new6])


def test_a_refused_route_is_a_kernel_error_with_its_errno(netns: Any, link: int) -> None:
    """A gateway that is not on the link and not onlink: the kernel's ENETUNREACH, named."""
    bad = Route(AF_INET, 101, "198.51.100.0/24", 0, link, gateway="203.0.113.1")
    out = write(netns, [["set_route", plain(bad)], ["routes"]])
    assert out[0]["code"] == errno.ENETUNREACH, out[0]
    assert out[0]["error"] == f"replace {bad}: {os.strerror(errno.ENETUNREACH)}"
    assert out[1] == []


# ------------------------------------------------------------------ conntrack

MASK = 0x00FF0000
WAN2 = 0x00020000
# sport -> ct mark of crafted UDP entries; which of them wan2's clear must delete
ENTRIES4 = {1001: WAN2, 1002: WAN2 | 0x01000001, 1003: 0x2, 1004: 0x00010000, 1005: 0, 1006: 0x00030000}
ENTRIES6 = {1101: WAN2, 1102: 0x00010000, 1103: WAN2 | 0xFF}
DOOMED = {1001, 1002, 1101, 1103}


def conntrack_marks(netns: Any) -> dict[int, int]:
    """sport -> mark of the namespace's crafted entries, IPv4 and IPv6."""
    out = {}
    for family in ("ipv4", "ipv6"):
        for line in netns.sh("conntrack", "-L", "-f", family, check=False).splitlines():
            fields: dict[str, str] = {}
            for f in line.split():  # the original direction's fields come first
                key, _, value = f.partition("=")
                fields.setdefault(key, value)
            if fields.get("dport") == "2000":
                out[int(fields["sport"])] = int(fields.get("mark", "0"))
    return out


def test_conntrack_clear_deletes_only_the_marked_entries(netns: Any) -> None:
    for sport, mark in ENTRIES4.items():
        netns.sh("conntrack", "-I", "-p", "udp", "-s", "192.0.2.50", "-d", "192.0.2.60", "--sport", str(sport),
                 "--dport", "2000", "-t", "300", "-m", str(mark))
    for sport, mark in ENTRIES6.items():
        netns.sh("conntrack", "-I", "-p", "udp", "-s", "2001:db8:c::50", "-d", "2001:db8:c::60",
                 "--sport", str(sport), "--dport", "2000", "-t", "300", "-m", str(mark))
    before = conntrack_marks(netns)
    assert before == {**ENTRIES4, **ENTRIES6}, before
    assert write(netns, [["clear", WAN2, MASK]]) == [None]
    after = conntrack_marks(netns)
    assert after == {s: m for s, m in before.items() if s not in DOOMED}, after
    # nothing left to match: still no error (ENOENT, if the kernel says so, is "none matched")
    assert write(netns, [["clear", WAN2, MASK], ["clear", 0x00070000, MASK]]) == [None, None]
    assert conntrack_marks(netns) == after
