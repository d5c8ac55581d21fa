"""Reading back ``inet markrouted`` over nfnetlink: chains, hooks and rule comments.

Drift detection compares each chain's hook and the comments of its rules
(every comment carries a digest of its rule, see ``model.NftRule``); nothing
else of the table is needed. libnftables can only list a table by fetching
and decoding all of it, set elements included — over half a second for a
thousand policies — while these two kernel-filtered dumps, decoded with
struct, take milliseconds. Writes go through libnftables (replacing the
table) and the raw batch of ``nftraw`` (refilling pick chains); see ``nft``.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

from ..model import NFT_TABLE, BaseHook, NftChain, NftRule, NftTable
from . import nl
from .errors import KernelError
from .nl import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFPROTO_INET, NFTA_GEN_ID, NLM_F_ACK, NLM_F_DUMP

NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETGEN = 1, 4, 7, 16

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
        return NftTable(tuple(NftChain(n, bases[n], tuple(rules.get(n, ()))) for n in order))
