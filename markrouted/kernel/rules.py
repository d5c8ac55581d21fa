"""An ip rule on the wire: decoding, encoding, ownership and the events that concern it.

Where an ip rule lives, end to end:

* ``model.Rule``: its identity, normalised to the form the kernel echoes back;
* ``derive.derive_rules``: which rules the config wants;
* here: decoding a rule from an rtnetlink dump (struct, only the fields
  markrouted uses), the message that writes one, the ownership
  filter (markrouted's proto tag AND a priority inside one of its ranges) and
  the event filter (which RTM_NEWRULE/RTM_DELRULE wake the daemon);
* ``netlink.Netlink``: the I/O (dumps, and one request per write);
* ``collisions.analyse``: foreign rules that collide with markrouted's;
* ``tests/fakekernel.py``: the in-memory double, held to the same ownership
  rule by the conformance scenarios (``tests/conformance.py``).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ..model import RTPROT_MARKROUTED, SUPPRESS_UNSET, Rule, in_ranges
from . import nl

RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
FRA_SRC, FRA_PRIORITY, FRA_FWMARK = 2, 6, 10
FRA_SUPPRESS_PREFIXLEN, FRA_TABLE, FRA_FWMASK, FRA_PROTOCOL = 14, 15, 16, 21
FR_ACT_TO_TBL = 1


@dataclass(frozen=True)
class RawRule:
    """A rule as dumped: the identity's fields plus the protocol that says whose it is."""

    family: int
    table: int
    priority: int
    protocol: int
    src: str | None
    src_len: int
    fwmark: int | None
    fwmask: int | None
    suppress_prefixlength: int


def dump_header(family: int) -> bytes:
    return nl.RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)


def decode(msg: bytes, family: int) -> RawRule | None:
    """One RTM_NEWRULE message of a dump (None: another family's)."""
    fam, _dl, src_len, _tos, tbl, _r1, _r2, _action, _flags = nl.RTMSG.unpack_from(msg, nl.HDR.size)
    if fam != family:
        return None
    a = nl.attrs(msg, nl.HDR.size + nl.RTMSG.size, len(msg))
    fwmark, fwmask, protocol, src = a.get(FRA_FWMARK), a.get(FRA_FWMASK), a.get(FRA_PROTOCOL), a.get(FRA_SRC)
    return RawRule(
        family=fam, table=nl.u32(a.get(FRA_TABLE), tbl), priority=nl.u32(a.get(FRA_PRIORITY)),
        protocol=protocol[0] if protocol else 0, src=socket.inet_ntop(family, src) if src else None,
        src_len=src_len,
        fwmark=nl.u32(fwmark) if fwmark is not None else None,
        fwmask=nl.u32(fwmask) if fwmask is not None else None,
        suppress_prefixlength=nl.u32(a.get(FRA_SUPPRESS_PREFIXLEN), SUPPRESS_UNSET),
    )


def owned(raw: RawRule, starts: Iterable[int]) -> bool:
    """markrouted's: its proto tag AND a priority in the range of one of ``starts``."""
    return raw.protocol == RTPROT_MARKROUTED and in_ranges(raw.priority, starts)


def to_rule(raw: RawRule) -> Rule:
    """The model's identity of a dumped rule (a mask without a mark is no fwmark match)."""
    return Rule(
        family=raw.family,
        priority=raw.priority,
        table=raw.table,
        fwmark=raw.fwmark or 0,
        fwmask=(raw.fwmask or 0) if raw.fwmark is not None else 0,
        src=raw.src,
        src_len=raw.src_len,
        suppress_prefixlength=raw.suppress_prefixlength,
    )


def message(rule: Rule) -> bytes:
    """The body of the RTM_NEWRULE or RTM_DELRULE of ``rule``, tagged as markrouted's.

    The bytes pyroute2's ``IPRoute.rule()`` encodes for the same rule
    (tests/unit/test_rtnl_encode.py compares them): the fib_rule_hdr,
    FRA_TABLE always (the header's byte cannot hold a table above 255), the
    mark and mask only as a pair, no FRA_SUPPRESS_PREFIXLEN when unset.
    """
    src_len = rule.src_len if rule.src is not None else 0
    table = rule.table if rule.table <= 255 else nl.RT_TABLE_COMPAT
    out = [nl.RTMSG.pack(rule.family, 0, src_len, 0, table, 0, 0, FR_ACT_TO_TBL, 0),
           nl.nla(FRA_PRIORITY, struct.pack("=I", rule.priority)),
           nl.nla(FRA_TABLE, struct.pack("=I", rule.table)),
           nl.nla(FRA_PROTOCOL, struct.pack("=B", RTPROT_MARKROUTED))]
    if rule.src is not None:
        out.append(nl.nla(FRA_SRC, socket.inet_pton(rule.family, rule.src)))
    if rule.fwmask:
        out.append(nl.nla(FRA_FWMARK, struct.pack("=I", rule.fwmark)))
        out.append(nl.nla(FRA_FWMASK, struct.pack("=I", rule.fwmask)))
    if rule.suppress_prefixlength != SUPPRESS_UNSET:
        out.append(nl.nla(FRA_SUPPRESS_PREFIXLEN, struct.pack("=I", rule.suppress_prefixlength)))
    return b"".join(out)


def event(mtype: int, msg: bytes, body: int, lo: int, hi: int) -> str | None:
    """What a rule event says, if it may concern markrouted: tagged as ours or in [lo, hi]."""
    if mtype not in (RTM_NEWRULE, RTM_DELRULE):
        return None
    a = nl.attrs(msg, body + nl.RTMSG.size, len(msg))
    prio = nl.u32(a.get(FRA_PRIORITY))
    proto = a.get(FRA_PROTOCOL)
    if (proto[0] if proto else 0) != RTPROT_MARKROUTED and not lo <= prio <= hi:
        return None
    return f"rule {'added' if mtype == RTM_NEWRULE else 'removed'} at priority {prio}"

