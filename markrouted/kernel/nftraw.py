"""The fast paths: refilling small chains, and changing set elements, each with one raw nf_tables batch.

A failover rewrites a few one-rule ``pick_N`` chains. Through libnftables
each write first fetches its cache of the whole table — with a thousand
policies, thousands of anonymous sets — which costs more than everything else
a failover does together. The rules of those chains use a tiny vocabulary
(``goto``, ``drop``, ``meta nfproto``, ``numgen random mod N < W``), so they
are encoded here directly into one nfnetlink batch: flush each chain, append
its rules, all or nothing, exactly as libnftables would send them.

The vocabulary itself is parsed in the pure core (``model.raw_statements``,
``NftRule.raw``), so the diff knows which changed chains can be refilled
this way; any other change is written by replacing the table through
libnftables (``nft``). The statements come from the same expression JSON
derive renders for libnftables, so both paths install the same rules (and
the same comments, which is what drift detection compares).

Set elements go the same way: libnftables fetches a set's every element
before changing one (1.3 s for 100,000 prefixes), while the change itself is
a few element messages. An interval is two kernel elements, its start and
its end (the address after it, flagged INTERVAL_END), as nft sends them.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

from ..model import NFT_TABLE, NftChain, NftRule, RawStatement, SetElements
from . import nl
from .nl import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_REQUEST,
)

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 6, 8
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS = 1, 3
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 1
#: elements per message: the element list is one attribute, whose length is 16 bits
ELEMENTS_PER_MESSAGE = 1000

NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA = 1, 2, 4, 7
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFT_REG_VERDICT, NFT_REG32_00 = 0, 8
NF_DROP, NF_ACCEPT, NFT_GOTO, NFT_RETURN = 0, 1, -4, -5
NFT_META_NFPROTO = 15
NFT_CMP_EQ, NFT_CMP_LT = 0, 2
NFT_NG_RANDOM = 1
NFT_BYTEORDER_HTON = 1

_nla = nl.nla
_str = nl.nla_str


def _u32(atype: int, value: int) -> bytes:
    return _nla(atype, struct.pack(">I", value & 0xFFFFFFFF))


def _s32(atype: int, value: int) -> bytes:
    return _nla(atype, struct.pack(">i", value))


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nla(NFTA_LIST_ELEM, _str(NFTA_EXPR_NAME, name) + _nla(NFTA_EXPR_DATA, b"".join(attrs), True), True)


def _verdict(code: int, chain: str | None = None) -> bytes:
    inner = _s32(1, code) + (_str(2, chain) if chain else b"")  # NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN
    data = _nla(2, inner, True)  # NFTA_DATA_VERDICT
    return _expr("immediate", _u32(1, NFT_REG_VERDICT), _nla(2, data, True))


def _cmp(op: int, value: bytes) -> bytes:
    return _expr("cmp", _u32(1, NFT_REG32_00), _u32(2, op), _nla(3, _nla(1, value), True))


def _statement(st: RawStatement) -> bytes:
    if st.kind == "goto":
        return _verdict(NFT_GOTO, st.name)
    if st.kind == "verdict":
        return _verdict({"drop": NF_DROP, "accept": NF_ACCEPT, "return": NFT_RETURN}[st.name])
    if st.kind == "nfproto":
        proto = NFPROTO_IPV4 if st.name == "ipv4" else NFPROTO_IPV6
        meta = _expr("meta", _u32(1, NFT_REG32_00), _u32(2, NFT_META_NFPROTO))
        return meta + _cmp(NFT_CMP_EQ, bytes([proto]))
    if st.kind != "numgen_lt":
        raise ValueError(f"no raw encoding for {st}")
    numgen = _expr("numgen", _u32(1, NFT_REG32_00), _u32(2, st.mod), _u32(3, NFT_NG_RANDOM), _u32(4, 0))
    # numgen leaves a host-order u32; cmp compares bytes, as nft does: to network order first
    order = _expr("byteorder", _u32(1, NFT_REG32_00), _u32(2, NFT_REG32_00), _u32(3, NFT_BYTEORDER_HTON),
                  _u32(4, 4), _u32(5, 4))
    return numgen + order + _cmp(NFT_CMP_LT, struct.pack(">I", st.bound))


def encode_rule(rule: NftRule) -> bytes | None:
    """The NFTA_RULE_EXPRESSIONS payload of a rule, or None if outside the vocabulary."""
    if rule.raw is None:
        return None
    return b"".join(_statement(st) for st in rule.raw)


def _userdata(comment: str) -> bytes:
    raw = comment.encode()[:254] + b"\0"
    return bytes([0, len(raw)]) + raw  # NFTNL_UDATA_RULE_COMMENT


def interval_elements(lo: int, hi: int, width: int) -> list[bytes]:
    """The kernel elements of one interval of an interval set: its start, and its end (the next
    address, flagged INTERVAL_END) unless it reaches the top of the address space."""
    def elem(value: int, flags: int) -> bytes:
        key = _nla(NFTA_SET_ELEM_KEY, _nla(NFTA_DATA_VALUE, value.to_bytes(width, "big")), True)
        return _nla(NFTA_LIST_ELEM, key + (_u32(NFTA_SET_ELEM_FLAGS, flags) if flags else b""), True)

    out = [elem(lo, 0)]
    if hi + 1 < 1 << (8 * width):
        out.append(elem(hi + 1, NFT_SET_ELEM_INTERVAL_END))
    return out


class RawRefill:
    """One nfnetlink socket that replaces the rules of whole chains in one batch."""

    def __init__(self) -> None:
        self.nl = nl.Socket(NETLINK_NETFILTER)

    def close(self) -> None:
        self.nl.close()

    def _msg(self, mtype: int, flags: int, family: int, attrs: bytes, res_id: int = 0) -> tuple[int, bytes]:
        return self.nl.frame(mtype, flags, nl.NFGENMSG.pack(family, 0, socket.htons(res_id)) + attrs)

    def refill(self, chains: Sequence[NftChain], table: str = NFT_TABLE) -> None:
        msgs: list[bytes] = []
        acks: set[int] = set()
        _, data = self._msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES)
        msgs.append(data)
        for chain in chains:
            ident = _str(NFTA_RULE_TABLE, table) + _str(NFTA_RULE_CHAIN, chain.name)
            seq, data = self._msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE, NLM_F_REQUEST | NLM_F_ACK,
                                  NFPROTO_INET, ident)
            msgs.append(data)
            acks.add(seq)
            for rule in chain.rules:
                expr = encode_rule(rule)
                if expr is None:
                    raise ValueError(f"rule outside the raw vocabulary: {rule.text}")
                attrs = ident + _nla(NFTA_RULE_EXPRESSIONS, expr, True) + _nla(NFTA_RULE_USERDATA,
                                                                              _userdata(rule.comment))
                seq, data = self._msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
                                      NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK, NFPROTO_INET, attrs)
                msgs.append(data)
                acks.add(seq)
        _, data = self._msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES)
        msgs.append(data)
        what = f"refill chains {', '.join(c.name for c in chains)}"
        self.nl.send(b"".join(msgs), what, answers=len(acks))
        self.nl.acks(acks, what)

    def set_elements(self, changes: Sequence[SetElements], table: str = NFT_TABLE) -> None:
        """The "set elements" update of static interval sets in one batch: every delete, then every add."""
        msgs: list[bytes] = []
        acks: set[int] = set()
        _, data = self._msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES)
        msgs.append(data)
        for mtype, flags, pick in ((NFT_MSG_DELSETELEM, 0, "delete"), (NFT_MSG_NEWSETELEM, NLM_F_CREATE, "add")):
            for change in changes:
                width = 4 if change.version == 4 else 16
                elements = [e for lo, hi in getattr(change, pick) for e in interval_elements(lo, hi, width)]
                ident = _str(NFTA_SET_ELEM_LIST_TABLE, table) + _str(NFTA_SET_ELEM_LIST_SET, change.name)
                for start in range(0, len(elements), ELEMENTS_PER_MESSAGE):
                    chunk = b"".join(elements[start:start + ELEMENTS_PER_MESSAGE])
                    seq, data = self._msg((NFNL_SUBSYS_NFTABLES << 8) | mtype, NLM_F_REQUEST | NLM_F_ACK | flags,
                                          NFPROTO_INET, ident + _nla(NFTA_SET_ELEM_LIST_ELEMENTS, chunk, True))
                    msgs.append(data)
                    acks.add(seq)
        _, data = self._msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES)
        msgs.append(data)
        what = f"set elements {', '.join(c.name for c in changes)}"
        self.nl.send(b"".join(msgs), what, answers=len(acks))
        self.nl.acks(acks, what)
