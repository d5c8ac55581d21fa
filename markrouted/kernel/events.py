"""Kernel change notifications: rtnetlink and nf_tables multicast groups.

Events only tell the daemon that a reconcile is due; what changed is read
afresh by the reconcile (level-triggered), so the parsing here is limited to
the fixed headers needed to drop what cannot matter *early* — a router
carrying a full BGP table must not wake markrouted for every route.

Plain netlink sockets from the standard library are used for listening, the
same on every pyroute2 version. Which rule and route events concern
markrouted is decided where rules and routes live (``rules.event``,
``routes.event``); this module only routes messages to them. On
ENOBUFS (the socket's queue overflowed, events were lost) the socket is
closed and reopened and the caller resyncs everything.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..model import NFT_TABLE
from . import nl, routes, rules
from .nft import concerns
from .routes import RTM_DELROUTE, RTM_NEWROUTE
from .rules import RTM_DELRULE, RTM_NEWRULE
from .nl import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFPROTO_INET, NFTA_GEN_ID, NFTA_GEN_PROC_PID, SOL_NETLINK

NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
RCVBUF = 8 * 1024 * 1024  # a 5,000-route burst overflowed 2 MiB

RTNLGRP_LINK = 1
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_IFADDR = 9
RTNLGRP_IPV6_ROUTE = 11
RTNLGRP_IPV6_RULE = 19
NFNLGRP_NFTABLES = 7

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
NLMSG_OVERRUN = nl.NLMSG_OVERRUN
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_NAME = 3
NFTA_TABLE_NAME = 1  # every nf_tables object message names its table in attribute 1

_NLMSGHDR = nl.HDR

__all__ = [
    "NETLINK_NETFILTER", "NFNL_SUBSYS_NFTABLES", "NFPROTO_INET", "NFTA_GEN_ID", "NFTA_GEN_PROC_PID",
    "NFT_MSG_NEWGEN", "NLMSG_OVERRUN", "RTM_DELADDR", "RTM_DELLINK", "RTM_DELROUTE", "RTM_DELRULE",
    "RTM_NEWADDR", "RTM_NEWLINK", "RTM_NEWROUTE", "RTM_NEWRULE", "SOL_NETLINK",
    "Event", "Interest", "NftWatch", "Overflow", "drain", "open_nft", "open_rtnl", "parse_rtnl",
]


class Overflow(Exception):
    """Events were lost: everything must be re-read."""


@dataclass
class Interest:
    """What the daemon cares about; updated after each reconcile."""

    tables: frozenset[int] = frozenset()
    prio_lo: int = 0
    prio_hi: int = 0


@dataclass
class Event:
    kind: str  # link | address | route | rule | nft
    text: str


def _attrs(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    return iter(nl.attrs(data, offset, end).items())


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes, int]]:
    """(type, flags, sequence, message, body offset) for each message of a datagram."""
    for mtype, flags, seq, msg in nl.messages(data):
        yield mtype, flags, seq, msg, _NLMSGHDR.size


def parse_rtnl(data: bytes, interest: Interest) -> list[Event]:
    """The events of one rtnetlink datagram that could change markrouted's view."""
    out = []
    for mtype, _flags, _pid, msg, body in _messages(data):
        if mtype == NLMSG_OVERRUN:
            raise Overflow()
        if mtype in (RTM_NEWLINK, RTM_DELLINK):
            index = struct.unpack_from("=i", msg, body + 4)[0]
            out.append(Event("link", f"link {index} {'changed' if mtype == RTM_NEWLINK else 'removed'}"))
        elif mtype in (RTM_NEWADDR, RTM_DELADDR):
            index = struct.unpack_from("=I", msg, body + 4)[0]
            out.append(Event("address", f"address {'added' if mtype == RTM_NEWADDR else 'removed'} on link {index}"))
        elif (text := routes.event(mtype, msg, body, interest.tables)) is not None:
            out.append(Event("route", text))
        elif (text := rules.event(mtype, msg, body, interest.prio_lo, interest.prio_hi)) is not None:
            out.append(Event("rule", text))
    return out


NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFTA_SET_ELEM_LIST_SET = 12, 14, 2


def dnsmasq_elements(kind: int, attrs: dict[int, bytes]) -> bool:
    """An element added to or removed from a set only dnsmasq writes (``NAME_dns_v4``/``_v6``):
    nothing markrouted desires changed, so no pass is due (docs/design.md, destination sets)."""
    if kind not in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM):
        return False
    name = attrs.get(NFTA_SET_ELEM_LIST_SET, b"").rstrip(b"\0")
    return name.endswith((b"_dns_v4", b"_dns_v6"))


@dataclass
class NftWatch:
    """Follows nf_tables transactions; reports those that touched our table and were not ours.

    Every object message names its table in attribute 1 (whether that is ours
    is decided with the table, ``nft.concerns``); a transaction ends
    with NEWGEN carrying the id of the task (thread) that made it. Our own
    writes are recognised by that id and ignored: the process's pid and the
    thread ids the daemon registers in ``also_own`` (its kernel worker).
    """

    own_pid: int = field(default_factory=os.getpid)
    touched: bool = False
    also_own: set[int] = field(default_factory=set)
    #: the nf_tables generation of the last transaction seen (None: none yet)
    last_gen: int | None = None

    def feed(self, data: bytes) -> list[Event]:
        out = []
        for mtype, _flags, _pid, msg, body in _messages(data):
            if mtype == NLMSG_OVERRUN:
                raise Overflow()
            if mtype >> 8 != NFNL_SUBSYS_NFTABLES:
                continue
            kind = mtype & 0xFF
            family = msg[body] if len(msg) > body else 0
            attrs = dict(_attrs(msg, body + 4, len(msg)))
            if kind == NFT_MSG_NEWGEN:
                gen = attrs.get(NFTA_GEN_ID)
                if gen and len(gen) >= 4:
                    self.last_gen = nl.be32(gen)
                pid = nl.be32(attrs.get(NFTA_GEN_PROC_PID), -1)
                if self.touched and pid != self.own_pid and pid not in self.also_own:
                    # the process's name (comm) comes with its pid: it may be gone when the pass runs
                    comm = attrs.get(NFTA_GEN_PROC_NAME, b"").split(b"\0", 1)[0].decode(errors="replace")
                    who = f"pid {pid} ({comm})" if comm else f"pid {pid}"
                    out.append(Event("nft", f"table inet {NFT_TABLE} changed by {who}"))
                self.touched = False
                continue
            if concerns(family, attrs.get(NFTA_TABLE_NAME, b"")) and not dnsmasq_elements(kind, attrs):
                self.touched = True
        return out


def _open(proto: int, groups: tuple[int, ...]) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((0, 0))
    for group in groups:
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    return sock


def open_rtnl() -> socket.socket:
    return _open(
        socket.NETLINK_ROUTE,
        (RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR, RTNLGRP_IPV4_ROUTE,
         RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE),
    )


def open_nft() -> socket.socket:
    return _open(NETLINK_NETFILTER, (NFNLGRP_NFTABLES,))


def drain(sock: socket.socket) -> Iterator[bytes]:
    """Every datagram queued now; raises Overflow on ENOBUFS."""
    while True:
        try:
            yield sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                raise Overflow() from exc
            raise
