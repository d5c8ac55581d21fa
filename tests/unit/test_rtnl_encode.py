"""The hand-written write messages against pyroute2's encoding of the same requests.

markrouted writes rules, routes and the conntrack delete with its own encoder
(``rules.message``, ``routes.message``, ``conntrack.message``) so that the
daemon never loads pyroute2. Each object of the tables below, covering every
field markrouted writes, is encoded twice more by pyroute2:

* as a ``fibmsg``/``rtmsg``/``nfct_msg`` built from the object's attributes
  by their netlink names, which pyroute2 packs by its own type definitions;
* through ``IPBatch`` (pyroute2's request compiler: IPRoute's API, the
  messages kept instead of sent) with the keyword arguments markrouted gave
  ``IPRoute.rule()``/``IPRoute.route()`` when pyroute2 carried its writes:
  the new encoder writes what was written before.

The messages must be equal as the kernel parses them (``canonical``): type,
flags, fixed header and every attribute's bytes, sequence number and port id
aside, attributes taken by type.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import IPBatch
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from markrouted.kernel import conntrack, netlink, nl, routes, rules
from markrouted.model import AF_INET, AF_INET6, MAIN_TABLE, RT_SCOPE_LINK, RTN_UNREACHABLE, Route, Rule

RTPROT_MARKROUTED = 109
FR_ACT_TO_TBL = 1
UNREACHABLE_METRIC = 0xFFFFFFFF - 1

RULES = [
    Rule(AF_INET, 10000, MAIN_TABLE, suppress_prefixlength=0),
    Rule(AF_INET6, 10000, MAIN_TABLE, suppress_prefixlength=0),
    Rule(AF_INET, 10100, 101, fwmark=0x00010000, fwmask=0x00FF0000),
    Rule(AF_INET6, 10100, 101, fwmark=0x00010000, fwmask=0x00FF0000),
    Rule(AF_INET, 10101, 300, fwmark=0, fwmask=0xFF000000),  # unmarked packets; a table > 255
    Rule(AF_INET, 10200, 70000, fwmark=0xFFFFFFFF, fwmask=0xFFFFFFFF),
    Rule(AF_INET, 10300, 101, src="192.0.2.2", src_len=32),
    Rule(AF_INET6, 10300, 4000000000, src="2001:db8:7::2", src_len=128),
    Rule(AF_INET6, 10301, 102, src="2001:db8:7::", src_len=64, fwmark=0x2, fwmask=0xFF),
    Rule(AF_INET, 10302, 102, src="198.18.0.0", src_len=15, suppress_prefixlength=24),
]

ROUTES = [
    Route(AF_INET, 101, "0.0.0.0/0", 0, 7, gateway="192.0.2.1"),
    Route(AF_INET, 300, "0.0.0.0/0", 10, 7, gateway="198.18.0.1", onlink=True),
    Route(AF_INET, 101, "192.0.2.0/24", 0, 7, prefsrc="192.0.2.2", scope=RT_SCOPE_LINK),
    Route(AF_INET, 70000, "0.0.0.0/0", 0, 7, scope=RT_SCOPE_LINK),  # a point-to-point uplink
    Route(AF_INET, 101, "0.0.0.0/0", UNREACHABLE_METRIC, 0, type=RTN_UNREACHABLE),
    Route(AF_INET6, 101, "::/0", 1024, 7, gateway="2001:db8:7::1"),
    Route(AF_INET6, 4000000000, "::/0", 1024, 7, gateway="fe80::1"),
    Route(AF_INET6, 102, "2001:db8:7::/64", 1024, 7, prefsrc="2001:db8:7::2"),
    Route(AF_INET6, 300, "::/0", 1024, 7, gateway="2001:db8:99::1", onlink=True),
    Route(AF_INET6, 101, "::/0", UNREACHABLE_METRIC, 0, type=RTN_UNREACHABLE),
]


# ------------------------------------------------------------------ normalising


def attributes(data: bytes, offset: int) -> list[tuple[int, bytes]]:
    """(type, whole padded attribute) in the order of the message, which they must fill exactly."""
    out = []
    while offset < len(data):
        alen, atype = struct.unpack_from("=HH", data, offset)
        out.append((atype, data[offset : offset + ((alen + 3) & ~3)]))
        offset += (alen + 3) & ~3
    assert offset == len(data), "attributes must fill the message exactly"
    return out


TABLE_ATTR = 15  # FRA_TABLE and RTA_TABLE alike


def canonical(data: bytes, fixed: int) -> tuple[int, int, bytes, list[bytes]]:
    """What the kernel parses: (type, flags, the fixed header, the attributes by type).

    Sequence number and port id are the socket's business; attributes are
    taken as the kernel's nla_parse takes them (by type, the last of a type
    wins), so their order and a repeated identical one do not count; with a
    table attribute, the header's table byte does not count either (the
    kernel takes the attribute; pyroute2 0.7 puts 252 there, 0.9 254). The
    message is checked whole: its length field, and attributes filling it.
    """
    length, mtype, flags, _seq, _pid = nl.HDR.unpack_from(data)
    assert length == len(data), "the length field must cover the message exactly"
    header = bytearray(data[nl.HDR.size : nl.HDR.size + fixed])
    by_type = dict(attributes(data, nl.HDR.size + fixed))
    if fixed == nl.RTMSG.size and TABLE_ATTR in by_type:
        header[4] = 0  # rtm_table / fib_rule_hdr.table
    return mtype, flags, bytes(header), [by_type[t] for t in sorted(by_type)]


def ours(mtype: int, flags: int, body: bytes, fixed: int = nl.RTMSG.size) -> bytes:
    """markrouted's message, framed as nl.Socket frames it; each attribute is sent once."""
    data = nl.HDR.pack(nl.HDR.size + len(body), mtype, flags, 0, 0) + body
    types = [t for t, _a in attributes(data, nl.HDR.size + fixed)]
    assert len(types) == len(set(types)), f"an attribute sent twice: {types}"
    return data


def encoded(msg: Any, mtype: int, flags: int) -> bytes:
    msg["header"]["type"] = mtype
    msg["header"]["flags"] = flags
    msg.encode()
    return bytes(msg.data)


# ------------------------------------------------------------------ pyroute2 messages by attribute


def rule_fibmsg(rule: Rule) -> Any:
    msg = fibmsg()
    msg["family"] = rule.family
    msg["src_len"] = rule.src_len if rule.src else 0
    msg["table"] = rule.table if rule.table < 256 else 252
    msg["action"] = FR_ACT_TO_TBL
    attrs: list[tuple[str, Any]] = [("FRA_PRIORITY", rule.priority), ("FRA_TABLE", rule.table),
                                    ("FRA_PROTOCOL", RTPROT_MARKROUTED)]
    if rule.fwmask:
        attrs += [("FRA_FWMARK", rule.fwmark), ("FRA_FWMASK", rule.fwmask)]
    if rule.src:
        attrs.append(("FRA_SRC", rule.src))
    if rule.suppress_prefixlength != 0xFFFFFFFF:
        attrs.append(("FRA_SUPPRESS_PREFIXLEN", rule.suppress_prefixlength))
    msg["attrs"] = attrs
    return msg


def route_rtmsg(route: Route) -> Any:
    dst, dst_len = route.dst.split("/")
    msg = rtmsg()
    msg["family"] = route.family
    msg["dst_len"] = int(dst_len)
    msg["table"] = route.table if route.table < 256 else 252
    msg["proto"] = RTPROT_MARKROUTED
    msg["scope"] = route.scope
    msg["type"] = route.type
    msg["flags"] = 4 if route.onlink else 0  # RTNH_F_ONLINK
    attrs: list[tuple[str, Any]] = [("RTA_TABLE", route.table), ("RTA_PRIORITY", route.metric)]
    if int(dst_len):
        attrs.append(("RTA_DST", dst))
    if route.oif:
        attrs.append(("RTA_OIF", route.oif))
    for name, value in (("RTA_GATEWAY", route.gateway), ("RTA_PREFSRC", route.prefsrc)):
        if value:
            attrs.append((name, value))
    msg["attrs"] = attrs
    return msg


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("mtype, flags", [(rules.RTM_NEWRULE, netlink.ADD), (rules.RTM_DELRULE, netlink.DELETE)])
def test_rule_as_pyroute2_encodes_it(rule: Rule, mtype: int, flags: int) -> None:
    theirs = encoded(rule_fibmsg(rule), mtype, flags)
    assert canonical(ours(mtype, flags, rules.message(rule)), nl.RTMSG.size) == canonical(theirs, nl.RTMSG.size)


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize("mtype, flags", [(routes.RTM_NEWROUTE, netlink.REPLACE),
                                          (routes.RTM_DELROUTE, netlink.DELETE)])
def test_route_as_pyroute2_encodes_it(route: Route, mtype: int, flags: int) -> None:
    theirs = encoded(route_rtmsg(route), mtype, flags)
    assert canonical(ours(mtype, flags, routes.message(route)), nl.RTMSG.size) == canonical(theirs, nl.RTMSG.size)


@pytest.mark.parametrize("mark, mask", [(0x00020000, 0x00FF0000), (0x2, 0xFF), (0, 0xFFFFFFFF),
                                        (0x80000000, 0xF0000000)])
def test_conntrack_delete_as_pyroute2_encodes_it(mark: int, mask: int) -> None:
    msg = nfct_msg.create_from(mark=mark, mark_mask=mask)
    msg["nfgen_family"] = socket.AF_UNSPEC
    theirs = encoded(msg, conntrack.CT_DELETE, nl.NLM_F_REQUEST | nl.NLM_F_ACK)
    mine = ours(conntrack.CT_DELETE, nl.NLM_F_REQUEST | nl.NLM_F_ACK, conntrack.message(mark, mask), nl.NFGENMSG.size)
    assert canonical(mine, nl.NFGENMSG.size) == canonical(theirs, nl.NFGENMSG.size)


# ------------------------------------------------------------------ what IPRoute itself sent


def rule_keywords(rule: Rule) -> dict[str, Any]:
    """The ``IPRoute.rule()`` keywords markrouted's writes used."""
    out: dict[str, Any] = {"family": rule.family, "priority": rule.priority, "table": rule.table,
                           "action": "to_tbl", "FRA_PROTOCOL": RTPROT_MARKROUTED}
    if rule.table > 255:
        out["FRA_TABLE"] = rule.table
    if rule.fwmask:
        out["FRA_FWMARK"] = rule.fwmark
        out["FRA_FWMASK"] = rule.fwmask
    if rule.src is not None:
        out["src"] = rule.src
        out["src_len"] = rule.src_len
    if rule.suppress_prefixlength != 0xFFFFFFFF:
        out["FRA_SUPPRESS_PREFIXLEN"] = rule.suppress_prefixlength
    return out


def route_keywords(route: Route) -> dict[str, Any]:
    """The ``IPRoute.route()`` keywords markrouted's writes used."""
    dst, dst_len = route.dst.split("/")
    out: dict[str, Any] = {"family": route.family, "dst": dst, "dst_len": int(dst_len), "table": route.table,
                           "proto": RTPROT_MARKROUTED, "type": route.type, "priority": route.metric,
                           "scope": route.scope}
    if route.table > 255:
        out["RTA_TABLE"] = route.table
    if route.oif:
        out["oif"] = route.oif
    if route.gateway:
        out["gateway"] = route.gateway
    if route.prefsrc:
        out["prefsrc"] = route.prefsrc
    if route.onlink:
        out["flags"] = 4
    return out


@pytest.fixture(scope="module")
def batch() -> Iterator[Any]:
    """pyroute2's request compiler: IPRoute's API, the messages kept instead of sent."""
    ipb = IPBatch()
    try:
        yield ipb
    finally:
        ipb.close()


def compiled(ipb: Any) -> bytes:
    data = bytes(ipb.batch)
    ipb.reset()
    return data


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("command, mtype, flags", [("add", rules.RTM_NEWRULE, netlink.ADD),
                                                   ("del", rules.RTM_DELRULE, netlink.DELETE)])
def test_rule_as_iproute_sent_it(batch: Any, rule: Rule, command: str, mtype: int, flags: int) -> None:
    batch.rule(command, **rule_keywords(rule))
    theirs = compiled(batch)
    assert canonical(ours(mtype, flags, rules.message(rule)), nl.RTMSG.size) == canonical(theirs, nl.RTMSG.size)


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize("command, mtype, flags", [("replace", routes.RTM_NEWROUTE, netlink.REPLACE),
                                                   ("del", routes.RTM_DELROUTE, netlink.DELETE)])
def test_route_as_iproute_sent_it(batch: Any, route: Route, command: str, mtype: int, flags: int) -> None:
    batch.route(command, **route_keywords(route))
    theirs = compiled(batch)
    assert canonical(ours(mtype, flags, routes.message(route)), nl.RTMSG.size) == canonical(theirs, nl.RTMSG.size)


@pytest.mark.parametrize("changed", [
    dataclasses.replace(RULES[2], fwmark=0x00020000),
    dataclasses.replace(RULES[2], fwmask=0x00FE0000),
    dataclasses.replace(RULES[2], priority=10101),
    dataclasses.replace(RULES[2], table=102),
], ids=str)
def test_canonical_form_tells_one_field_apart(changed: Rule) -> None:
    """The comparison is not vacuous: one field differs, the forms differ."""
    a = canonical(ours(rules.RTM_NEWRULE, netlink.ADD, rules.message(RULES[2])), nl.RTMSG.size)
    b = canonical(encoded(rule_fibmsg(changed), rules.RTM_NEWRULE, netlink.ADD), nl.RTMSG.size)
    assert a != b
