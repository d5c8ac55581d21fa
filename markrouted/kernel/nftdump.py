"""Reading back ``inet markrouted`` over nfnetlink: chains, hooks, rule comments, named sets.

Drift detection compares each chain's hook and the comments of its rules
(every comment carries a digest of its rule, see ``model.NftRule``); nothing
else of the table is needed. libnftables can only list a table by fetching
and decoding all of it, set elements included — over half a second for a
thousand policies — while these two kernel-filtered dumps, decoded with
struct, take milliseconds. The named sets are listed with their handles but
without elements; ``elements`` dumps one set's elements on request (100,000
intervals are 200,000 kernel elements: ``nft`` decides when that is worth it,
see its cache of elements). Writes go through libnftables (replacing the
table) and the raw batch of ``nftraw`` (refilling pick chains); see ``nft``.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

from ..model import NFT_TABLE, BaseHook, Interval, NftChain, NftRule, NftSet, NftTable
from . import nl
from .errors import KernelError
from .nl import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFPROTO_INET, NFTA_GEN_ID, NLM_F_ACK, NLM_F_DUMP

NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETGEN = 1, 4, 7, 16
NFT_MSG_GETSET, NFT_MSG_GETSETELEM = 10, 13
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_KEY_LEN, NFTA_SET_TIMEOUT, NFTA_SET_HANDLE = 1, 2, 3, 5, 11, 16
NFT_SET_ANONYMOUS, NFT_SET_INTERVAL, NFT_SET_MAP, NFT_SET_TIMEOUT = 0x1, 0x4, 0x8, 0x10
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_EXPIRATION = 1, 3, 5
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 1

NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE = 1, 3, 4, 5, 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_USERDATA = 1, 2, 7
NFTNL_UDATA_RULE_COMMENT = 0
HOOKS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting", 5: "ingress"}
POLICIES = {0: "drop", 1: "accept"}

_HDR = nl.HDR
_NFGEN = nl.NFGENMSG
_attrs = nl.attrs
_str = nl.cstr
_attr_str = nl.nla_str


def comment_of(userdata: bytes | None) -> str:
    """The comment TLV of a rule's userdata (type u8, length u8, NUL-terminated value)."""
    data = userdata or b""
    offset = 0
    while offset + 2 <= len(data):
        utype, length = data[offset], data[offset + 1]
        value = data[offset + 2 : offset + 2 + length]
        if utype == NFTNL_UDATA_RULE_COMMENT:
            return _str(value)
        offset += 2 + length
    return ""


class NftDumper:
    def __init__(self) -> None:
        self.nl = nl.Socket(NETLINK_NETFILTER, 4 << 20)
        #: the named sets' handles at the last ``read`` (a set re-created has a new one)
        self.handles: dict[str, int] = {}

    def close(self) -> None:
        self.nl.close()

    def _request(self, msg: int, flags: int, attrs: bytes) -> Iterator[bytes]:
        body = _NFGEN.pack(NFPROTO_INET, 0, 0) + attrs
        for _attempt in range(5):
            try:
                return iter(list(self.nl.request((NFNL_SUBSYS_NFTABLES << 8) | msg, nl.NLM_F_REQUEST | flags,
                                                 body, "nf_tables")))
            except nl.Interrupted:
                continue
        raise KernelError("nf_tables dump kept being interrupted")

    def generation(self) -> int | None:
        """The namespace's nf_tables generation id, bumped by every commit of anyone.

        None when it cannot be read: the id only ever saves work.
        """
        try:
            for item in self._request(NFT_MSG_GETGEN, NLM_F_ACK, b""):
                value = _attrs(item, _HDR.size + _NFGEN.size, len(item)).get(NFTA_GEN_ID)
                if value and len(value) >= 4:
                    return nl.be32(value)
        except (KernelError, OSError):
            return None
        return None

    def read(self, table: str = NFT_TABLE) -> NftTable | None:
        """The table's chains and rule comments; None when it does not exist."""
        try:
            list(self._request(NFT_MSG_GETTABLE, NLM_F_ACK, _attr_str(NFTA_TABLE_NAME, table)))
        except KernelError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise
        start = _HDR.size + _NFGEN.size
        order: list[str] = []
        bases: dict[str, BaseHook | None] = {}
        for item in self._request(NFT_MSG_GETCHAIN, NLM_F_DUMP, _attr_str(NFTA_CHAIN_TABLE, table)):
            a = _attrs(item, start, len(item))
            if _str(a.get(NFTA_CHAIN_TABLE)) != table:
                continue
            name = _str(a.get(NFTA_CHAIN_NAME))
            base = None
            if NFTA_CHAIN_HOOK in a:
                hook = _attrs(a[NFTA_CHAIN_HOOK], 0, len(a[NFTA_CHAIN_HOOK]))
                num = struct.unpack(">I", hook[NFTA_HOOK_HOOKNUM][:4])[0] if NFTA_HOOK_HOOKNUM in hook else -1
                prio = struct.unpack(">i", hook[NFTA_HOOK_PRIORITY][:4])[0] if NFTA_HOOK_PRIORITY in hook else 0
                pol = struct.unpack(">I", a[NFTA_CHAIN_POLICY][:4])[0] if NFTA_CHAIN_POLICY in a else 1
                base = BaseHook(_str(a.get(NFTA_CHAIN_TYPE)), HOOKS.get(num, str(num)), prio,
                                POLICIES.get(pol, str(pol)))
            order.append(name)
            bases[name] = base
        rules: dict[str, list[NftRule]] = {name: [] for name in order}
        for item in self._request(NFT_MSG_GETRULE, NLM_F_DUMP, _attr_str(NFTA_RULE_TABLE, table)):
            a = _attrs(item, start, len(item))
            if _str(a.get(NFTA_RULE_TABLE)) != table:
                continue
            chain = _str(a.get(NFTA_RULE_CHAIN))
            rules.setdefault(chain, []).append(NftRule("", "", comment_of(a.get(NFTA_RULE_USERDATA))))
        chains = tuple(NftChain(n, bases[n], tuple(rules.get(n, ()))) for n in order)
        found = self.sets(table)
        self.handles = {s.name: handle for s, handle in found}
        return NftTable(chains, tuple(s for s, _handle in found))

    def sets(self, table: str = NFT_TABLE) -> list[tuple[NftSet, int]]:
        """The table's named address sets, each with its handle; elements not read (see ``elements``)."""
        out: list[tuple[NftSet, int]] = []
        start = _HDR.size + _NFGEN.size
        for item in self._request(NFT_MSG_GETSET, NLM_F_DUMP, _attr_str(NFTA_SET_TABLE, table)):
            a = _attrs(item, start, len(item))
            if _str(a.get(NFTA_SET_TABLE)) != table:
                continue
            flags = nl.be32(a.get(NFTA_SET_FLAGS))
            if flags & (NFT_SET_ANONYMOUS | NFT_SET_MAP):
                continue
            key_len = nl.be32(a.get(NFTA_SET_KEY_LEN))
            if key_len not in (4, 16):
                continue
            timeout = struct.unpack(">Q", a[NFTA_SET_TIMEOUT][:8])[0] // 1000 if NFTA_SET_TIMEOUT in a else 0
            handle = struct.unpack(">Q", a[NFTA_SET_HANDLE][:8])[0] if NFTA_SET_HANDLE in a else 0
            dynamic = bool(flags & NFT_SET_TIMEOUT)
            out.append((NftSet(_str(a.get(NFTA_SET_NAME)), 4 if key_len == 4 else 6, (), dynamic,
                               timeout if dynamic else 0), handle))
        return out

    def elements(self, name: str, interval: bool = True, table: str = NFT_TABLE) -> tuple[list[Interval], int]:
        """A set's elements as sorted inclusive intervals, and how many the kernel holds.

        An interval set holds each interval as two elements, its start and its
        end (the next address, flagged INTERVAL_END); a plain set, single addresses.
        """
        keys: list[tuple[int, bool]] = []
        width = 4
        for key, flags, _expires in self._element_keys(name, table):
            width = len(key)
            keys.append((int.from_bytes(key, "big"), bool(flags & NFT_SET_ELEM_INTERVAL_END)))
        keys.sort(key=lambda k: (k[0], not k[1]))  # at one value, an interval's end before the next's start
        if not interval:
            return [(value, value) for value, _end in keys], len(keys)
        top = (1 << (8 * width)) - 1
        out: list[Interval] = []
        open_at: int | None = None
        for value, is_end in keys:
            if is_end:
                if open_at is not None:
                    out.append((open_at, value - 1))
                    open_at = None
            else:
                if open_at is None:
                    open_at = value
        if open_at is not None:
            out.append((open_at, top))
        return out, len(keys)

    def timed(self, name: str, table: str = NFT_TABLE) -> list[tuple[int, int, int]]:
        """The elements of a plain set with timeouts: (address, its width in bytes, milliseconds left)."""
        return [(int.from_bytes(value, "big"), len(value), expires)
                for value, _flags, expires in self._element_keys(name, table)]

    def _element_keys(self, name: str, table: str) -> Iterator[tuple[bytes, int, int]]:
        """(key bytes, element flags, milliseconds to expiry or 0) of each element of a set."""
        start = _HDR.size + _NFGEN.size
        request = _attr_str(NFTA_SET_ELEM_LIST_TABLE, table) + _attr_str(NFTA_SET_ELEM_LIST_SET, name)
        for item in self._request(NFT_MSG_GETSETELEM, NLM_F_DUMP, request):
            a = _attrs(item, start, len(item))
            data = a.get(NFTA_SET_ELEM_LIST_ELEMENTS)
            if not data:
                continue
            offset, end = 0, len(data)
            while offset + 4 <= end:
                length, _atype = struct.unpack_from("=HH", data, offset)
                if length < 4:
                    break
                elem = _attrs(data, offset + 4, offset + length)
                offset += (length + 3) & ~3
                key = elem.get(NFTA_SET_ELEM_KEY)
                value = _attrs(key, 0, len(key)).get(NFTA_DATA_VALUE) if key else None
                if not value:
                    continue
                expiration = elem.get(NFTA_SET_ELEM_EXPIRATION)
                expires = struct.unpack(">Q", expiration[:8])[0] if expiration and len(expiration) >= 8 else 0
                yield value, nl.be32(elem.get(NFTA_SET_ELEM_FLAGS)), expires
