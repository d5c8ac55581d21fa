"""kernel/events.py on crafted netlink bytes: what wakes the daemon and what is dropped early.

The filter is what keeps a router carrying a full BGP table from waking
markrouted for every route, and what lets the daemon ignore its
own nftables transactions while noticing everybody else's. Messages are built
here field by field from the kernel's headers (rtnetlink.h, fib_rules.h,
nf_tables.h), not by pyroute2, so the parser is checked against the wire
format rather than against another parser.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable

import pytest

from markrouted.kernel.events import (
    NFT_MSG_NEWGEN,
    NFTA_GEN_PROC_PID,
    NFNL_SUBSYS_NFTABLES,
    NLMSG_OVERRUN,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    Interest,
    NftWatch,
    Overflow,
    drain,
    parse_rtnl,
)

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
FRA_PRIORITY, FRA_TABLE, FRA_PROTOCOL = 6, 15, 21
RT_TABLE_COMPAT, RT_TABLE_MAIN, RT_TABLE_LOCAL = 252, 254, 255
RTPROT_KERNEL, RTPROT_BOOT, RTPROT_DHCP, RTPROT_MARKROUTED = 2, 3, 16, 109
NFPROTO_INET, NFPROTO_IPV4 = 1, 2
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_DELRULE = 0, 2, 3, 8

INTEREST = Interest(tables=frozenset({101, 102}), prio_lo=10000, prio_hi=10999)


# ------------------------------------------------------------------ building messages


def attr(atype: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def u32(atype: int, value: int) -> bytes:
    return attr(atype, struct.pack("=I", value))


def nlmsg(mtype: int, body: bytes, pid: int = 0, flags: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), mtype, flags, 1, pid) + body
    return raw + b"\0" * (-len(raw) % 4)


def link(mtype: int = RTM_NEWLINK, index: int = 3, flags: int = 0x1) -> bytes:
    # struct ifinfomsg: family, pad, type, index, flags, change
    return nlmsg(mtype, struct.pack("=BxHiII", 0, 1, index, flags, 0xFFFFFFFF) + attr(3, b"eth1\0"))


def address(mtype: int = RTM_NEWADDR, index: int = 3, family: int = AF_INET) -> bytes:
    # struct ifaddrmsg: family, prefixlen, flags, scope, index
    return nlmsg(mtype, struct.pack("=BBBBI", family, 24, 0, 0, index) + attr(2, bytes([203, 0, 113, 2])))


def route(table: int, dst_len: int = 0, proto: int = RTPROT_BOOT, mtype: int = RTM_NEWROUTE,
          family: int = AF_INET, big_table: bool = False) -> bytes:
    """A route message; ``big_table``: the table only in RTA_TABLE, as for ids > 255."""
    header_table = RT_TABLE_COMPAT if big_table else table
    # struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    body = struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, header_table, proto, 0, 1, 0)
    body += u32(RTA_TABLE, table)
    if dst_len:
        body += attr(RTA_DST, bytes(4 if family == AF_INET else 16))
    body += u32(RTA_OIF, 3)
    return nlmsg(mtype, body)


def rule(priority: int | None, proto: int = 0, mtype: int = RTM_NEWRULE, table: int = 102) -> bytes:
    # struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags
    body = struct.pack("=BBBBBBBBI", AF_INET, 0, 0, 0, table, 0, 0, 1, 0)
    body += u32(FRA_TABLE, table)
    if priority is not None:
        body += u32(FRA_PRIORITY, priority)
    if proto:
        body += attr(FRA_PROTOCOL, bytes([proto]))
    return nlmsg(mtype, body)


def nft(kind: int, table: str, family: int = NFPROTO_INET, extra: bytes = b"") -> bytes:
    # struct nfgenmsg: family, version, res_id (big endian); attribute 1 names the table
    body = struct.pack("=BBH", family, 0, 0) + attr(1, table.encode() + b"\0") + extra
    return nlmsg((NFNL_SUBSYS_NFTABLES << 8) | kind, body)


def newgen(pid: int, gen: int = 7) -> bytes:
    body = struct.pack("=BBH", 0, 0, socket.htons(gen & 0xFFFF))
    body += attr(1, struct.pack(">I", gen)) + attr(NFTA_GEN_PROC_PID, struct.pack(">I", pid))
    body += attr(3, b"nft\0")
    return nlmsg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN, body)


def kinds(data: bytes, interest: Interest = INTEREST) -> list[str]:
    return [e.kind for e in parse_rtnl(data, interest)]


# ------------------------------------------------------------------ rtnetlink


@pytest.mark.parametrize("mtype", [RTM_NEWLINK, RTM_DELLINK])
def test_every_link_event_counts(mtype: int) -> None:
    """Links are few, and any of them may be (or become) an uplink's interface."""
    events = parse_rtnl(link(mtype, index=42), INTEREST)
    assert [e.kind for e in events] == ["link"]
    assert "42" in events[0].text


@pytest.mark.parametrize("mtype", [RTM_NEWADDR, RTM_DELADDR])
@pytest.mark.parametrize("family", [AF_INET, AF_INET6])
def test_every_address_event_counts(mtype: int, family: int) -> None:
    assert kinds(address(mtype, family=family)) == ["address"]


@pytest.mark.parametrize(
    "case, msg, wakes",
    [
        ("uplink table 102", route(102, 24, RTPROT_KERNEL), True),
        ("uplink table, deleted", route(101, 0, RTPROT_MARKROUTED, RTM_DELROUTE), True),
        ("uplink table, IPv6", route(102, 64, RTPROT_KERNEL, family=AF_INET6), True),
        ("main table default (DHCP)", route(RT_TABLE_MAIN, 0, RTPROT_DHCP), True),
        ("main table default removed", route(RT_TABLE_MAIN, 0, RTPROT_DHCP, RTM_DELROUTE), True),
        ("main table default IPv6 (RA)", route(RT_TABLE_MAIN, 0, 9, family=AF_INET6), True),
        ("our proto in a table we no longer use", route(107, 0, RTPROT_MARKROUTED), True),
        ("uplink table id > 255 only in RTA_TABLE", route(102, 0, big_table=True), True),
        ("main table, not a default", route(RT_TABLE_MAIN, 24, RTPROT_KERNEL), False),
        ("main table host route (a BGP feed)", route(RT_TABLE_MAIN, 32, 186), False),
        ("local table", route(RT_TABLE_LOCAL, 32, RTPROT_KERNEL), False),
        ("unrelated table", route(5000, 32, RTPROT_BOOT, big_table=True), False),
        ("unrelated table default", route(200, 0, RTPROT_BOOT), False),
        ("unrelated IPv6 table", route(5000, 128, RTPROT_BOOT, family=AF_INET6, big_table=True), False),
    ],
)
def test_route_events_are_filtered_early(case: str, msg: bytes, wakes: bool) -> None:
    assert kinds(msg) == (["route"] if wakes else []), case


def test_route_filter_follows_the_interest() -> None:
    """After a reload that adds table 103, its routes start to matter."""
    msg = route(103, 24, RTPROT_KERNEL)
    assert kinds(msg) == []
    assert kinds(msg, Interest(frozenset({101, 102, 103}), 10000, 10999)) == ["route"]


@pytest.mark.parametrize(
    "case, msg, wakes",
    [
        ("in our priority range", rule(10100), True),
        ("range start", rule(10000), True),
        ("range end", rule(10999), True),
        ("ours, deleted", rule(10200, RTPROT_MARKROUTED, RTM_DELRULE), True),
        ("our proto outside the range (an old rule_priority)", rule(20000, RTPROT_MARKROUTED), True),
        ("foreign, below the range", rule(9999), False),
        ("foreign, above the range", rule(11000), False),
        ("foreign, no priority attribute", rule(None), False),
        ("foreign proto, outside the range", rule(500, RTPROT_BOOT), False),
    ],
)
def test_rule_events_are_filtered_early(case: str, msg: bytes, wakes: bool) -> None:
    assert kinds(msg) == (["rule"] if wakes else []), case


def test_a_datagram_with_many_messages() -> None:
    data = b"".join([route(5000, 32, big_table=True), link(), route(RT_TABLE_MAIN, 0, RTPROT_DHCP),
                     rule(9000), address(), rule(10100)])
    assert kinds(data) == ["link", "route", "address", "rule"]


def test_overrun_raises_overflow() -> None:
    with pytest.raises(Overflow):
        parse_rtnl(link() + nlmsg(NLMSG_OVERRUN, b""), INTEREST)


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, struct.pack("=IHHII", 4, RTM_NEWLINK, 0, 0, 0),
                                  struct.pack("=IHHII", 16, 3, 0, 0, 0)])  # NLMSG_DONE
def test_short_or_empty_datagrams_give_nothing(data: bytes) -> None:
    assert parse_rtnl(data, INTEREST) == []


# ------------------------------------------------------------------ nf_tables


def transaction(pid: int, *messages: bytes) -> bytes:
    return b"".join(messages) + newgen(pid)


def test_nft_own_transactions_are_ignored() -> None:
    watch = NftWatch(own_pid=1000)
    data = transaction(1000, nft(NFT_MSG_NEWTABLE, "markrouted"), nft(NFT_MSG_NEWCHAIN, "markrouted"))
    assert watch.feed(data) == []


@pytest.mark.parametrize("kind", [NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_DELRULE])
def test_nft_someone_else_touching_our_table_is_reported(kind: int) -> None:
    watch = NftWatch(own_pid=1000)
    events = watch.feed(transaction(4242, nft(kind, "markrouted")))
    assert [e.kind for e in events] == ["nft"]
    assert "4242" in events[0].text


def test_nft_flush_ruleset_is_reported() -> None:
    """``nft flush ruleset``: one transaction deleting every table, ours among them."""
    watch = NftWatch(own_pid=1000)
    data = transaction(4242, nft(NFT_MSG_DELTABLE, "filter", NFPROTO_IPV4), nft(NFT_MSG_DELTABLE, "markrouted"),
                       nft(NFT_MSG_DELTABLE, "other"))
    assert [e.kind for e in watch.feed(data)] == ["nft"]


@pytest.mark.parametrize("msg", [nft(NFT_MSG_NEWTABLE, "firewall"), nft(NFT_MSG_DELRULE, "markrouted", NFPROTO_IPV4),
                                 nft(NFT_MSG_NEWCHAIN, "markrouted2")])
def test_nft_other_tables_are_ignored(msg: bytes) -> None:
    """Another table, or a table called markrouted in another family, is not ours."""
    assert NftWatch(own_pid=1000).feed(transaction(4242, msg)) == []


def test_nft_state_is_per_transaction_and_spans_datagrams() -> None:
    watch = NftWatch(own_pid=1000)
    # our own write, then someone else's on another table: nothing to report
    assert watch.feed(transaction(1000, nft(NFT_MSG_NEWTABLE, "markrouted"))) == []
    assert watch.feed(transaction(4242, nft(NFT_MSG_NEWTABLE, "firewall"))) == []
    # a foreign transaction whose messages arrive in two datagrams
    assert watch.feed(nft(NFT_MSG_DELRULE, "markrouted")) == []
    assert [e.kind for e in watch.feed(newgen(4242))] == ["nft"]
    # ... and is reported once
    assert watch.feed(newgen(4242)) == []


def test_nft_overrun_raises_overflow() -> None:
    with pytest.raises(Overflow):
        NftWatch(own_pid=1).feed(nlmsg(NLMSG_OVERRUN, b""))


# ------------------------------------------------------------------ the socket


class FakeSocket:
    def __init__(self, datagrams: Iterable[bytes | OSError]) -> None:
        self.queue = list(datagrams)

    def recv(self, size: int) -> bytes:
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "empty")
        item = self.queue.pop(0)
        if isinstance(item, OSError):
            raise item
        return item


def test_drain_reads_until_the_queue_is_empty() -> None:
    assert list(drain(FakeSocket([b"a", b"b"]))) == [b"a", b"b"]  # type: ignore[arg-type]


def test_drain_turns_enobufs_into_overflow() -> None:
    got = []
    with pytest.raises(Overflow):
        for data in drain(FakeSocket([b"a", OSError(errno.ENOBUFS, "No buffer space")])):  # type: ignore[arg-type]
            got.append(data)
    assert got == [b"a"]


def test_drain_lets_other_errors_through() -> None:
    with pytest.raises(OSError) as info:
        list(drain(FakeSocket([OSError(errno.EBADF, "bad fd")])))  # type: ignore[arg-type]
    assert not isinstance(info.value, Overflow) and info.value.errno == errno.EBADF
