"""A route on the wire: decoding, encoding, ownership and the events that concern it.

Where a route lives, end to end:

* ``model.Route``: its identity and its slot (``key``: what ``ip route
  replace`` changes in place);
* ``derive.derive_routes``: which routes the config wants in each uplink table;
* here: decoding a route from an rtnetlink dump (struct, only the fields
  markrouted uses), the message that writes one, the ownership
  filter (markrouted's proto tag, in a table that is not reserved) and the
  event filter (which RTM_NEWROUTE/RTM_DELROUTE wake the daemon);
* ``netlink.Netlink``: the I/O (dumps the kernel filters by protocol or table,
  one request per write);
* ``collisions.analyse``: foreign routes in an uplink's table;
* ``tests/fakekernel.py``: the in-memory double, held to the same rules by the
  conformance scenarios (``tests/conformance.py``).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass

from ..model import AF_INET, MAIN_TABLE, RESERVED_TABLES, RTN_UNICAST, RTPROT_MARKROUTED, Route
from . import nl

RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 6, 7, 9, 15
RTNH_F_ONLINK = 0x4
_NEXTHOP = struct.Struct("=HBBi")


@dataclass(frozen=True)
class RawRoute:
    family: int
    table: int
    dst: str | None
    dst_len: int
    protocol: int
    scope: int
    type: int
    flags: int
    oif: int | None
    gateway: str | None
    prefsrc: str | None
    priority: int
    nexthops: tuple[tuple[int, str | None], ...] = ()


def _addr(family: int, value: bytes | None) -> str | None:
    return socket.inet_ntop(family, value) if value else None


def dump_request(family: int, table: int | None, protocol: int, strict: bool) -> tuple[bytes, bytes]:
    """(header, attributes) of a route dump; with strict checking the kernel filters."""
    extra = struct.pack("=HHI", 8, RTA_TABLE, table) if table is not None and strict else b""
    return nl.RTMSG.pack(family, 0, 0, 0, 0, protocol if strict else 0, 0, 0, 0), extra


def decode(msg: bytes, family: int, table: int | None = None, protocol: int = 0) -> RawRoute | None:
    """One RTM_NEWROUTE message of a dump (None: not of that family, table or protocol)."""
    fam, dst_len, _s, _tos, tbl, proto, scope, rtype, flags = nl.RTMSG.unpack_from(msg, nl.HDR.size)
    if fam != family or (protocol and proto != protocol):
        return None
    a = nl.attrs(msg, nl.HDR.size + nl.RTMSG.size, len(msg))
    tbl = nl.u32(a.get(RTA_TABLE), tbl)
    if table is not None and tbl != table:
        return None
    hops: list[tuple[int, str | None]] = []
    mp = a.get(RTA_MULTIPATH)
    off = 0
    while mp and off + _NEXTHOP.size <= len(mp):
        hlen, _hf, _hh, hidx = _NEXTHOP.unpack_from(mp, off)
        if hlen < _NEXTHOP.size:
            break
        hops.append((hidx, _addr(family, nl.attrs(mp, off + _NEXTHOP.size, off + hlen).get(RTA_GATEWAY))))
        off += (hlen + 3) & ~3
    oif = a.get(RTA_OIF)
    return RawRoute(
        family=fam, table=tbl, dst=_addr(family, a.get(RTA_DST)), dst_len=dst_len, protocol=proto,
        scope=scope, type=rtype, flags=flags, oif=nl.u32(oif) if oif else None,
        gateway=_addr(family, a.get(RTA_GATEWAY)), prefsrc=_addr(family, a.get(RTA_PREFSRC)),
        priority=nl.u32(a.get(RTA_PRIORITY)), nexthops=tuple(hops),
    )


def owned(raw: RawRoute) -> bool:
    """markrouted's: its proto tag, in a table that is not unspec/default/main/local."""
    return raw.protocol == RTPROT_MARKROUTED and raw.table not in RESERVED_TABLES


def foreign(raw: RawRoute) -> bool:
    """Someone else's route in a table markrouted could own (what collisions are checked on)."""
    return raw.protocol != RTPROT_MARKROUTED and raw.table not in RESERVED_TABLES


def to_route(r: RawRoute) -> Route:
    """The model's identity of a dumped route (``ifname`` is filled in by the caller)."""
    # the kernel keeps route prefixes without host bits, and inet_ntop's text is
    # the canonical form derive writes (ipaddress' str) for unicast prefixes
    dst = r.dst or ("0.0.0.0" if r.family == AF_INET else "::")
    unicast = r.type == RTN_UNICAST
    return Route(
        family=r.family,
        table=r.table,
        dst=f"{dst}/{r.dst_len}",
        metric=r.priority,
        # the kernel echoes IPv6 unreachable routes with "dev lo"
        oif=(r.oif or 0) if unicast else 0,
        gateway=r.gateway,
        prefsrc=r.prefsrc,
        scope=r.scope,
        onlink=bool(r.flags & RTNH_F_ONLINK),
        type=r.type,
    )


def message(route: Route) -> bytes:
    """The body of the RTM_NEWROUTE or RTM_DELROUTE of ``route``, tagged as markrouted's.

    The bytes pyroute2's ``IPRoute.route()`` encodes for the same route
    (tests/unit/test_rtnl_encode.py compares them): the rtmsg with protocol,
    scope, type and the onlink flag, RTA_TABLE and RTA_PRIORITY always
    (metric 0 included), no RTA_DST for a default route, the rest when set.
    """
    net = ipaddress.ip_network(route.dst)
    family = route.family
    table = route.table if route.table <= 255 else nl.RT_TABLE_COMPAT
    flags = RTNH_F_ONLINK if route.onlink else 0
    out = [nl.RTMSG.pack(family, net.prefixlen, 0, 0, table, RTPROT_MARKROUTED, route.scope, route.type, flags)]
    if net.prefixlen:
        out.append(nl.nla(RTA_DST, net.network_address.packed))
    out.append(nl.nla(RTA_TABLE, struct.pack("=I", route.table)))
    out.append(nl.nla(RTA_PRIORITY, struct.pack("=I", route.metric)))
    if route.oif:
        out.append(nl.nla(RTA_OIF, struct.pack("=I", route.oif)))
    if route.gateway:
        out.append(nl.nla(RTA_GATEWAY, socket.inet_pton(family, route.gateway)))
    if route.prefsrc:
        out.append(nl.nla(RTA_PREFSRC, socket.inet_pton(family, route.prefsrc)))
    return b"".join(out)


def event(mtype: int, msg: bytes, body: int, tables: Collection[int]) -> str | None:
    """What a route event says, if it may concern markrouted.

    Its own routes, any route in an uplink's table (``tables``) and the main
    table's default routes (where ``gateway = "auto"`` learns from); a full BGP
    table in main wakes nobody.
    """
    if mtype not in (RTM_NEWROUTE, RTM_DELROUTE):
        return None
    _family, dst_len, _s, _t, table, proto = struct.unpack_from("=BBBBBB", msg, body)
    table = nl.u32(nl.attrs(msg, body + nl.RTMSG.size, len(msg)).get(RTA_TABLE), table)
    if proto != RTPROT_MARKROUTED and table not in tables and not (table == MAIN_TABLE and dst_len == 0):
        return None
    return f"route {'added' if mtype == RTM_NEWROUTE else 'removed'} in table {table}"
