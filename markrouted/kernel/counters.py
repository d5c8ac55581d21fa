"""Reading what markrouted's traffic amounts to: named nft counters and conntrack entries.

Counters: every policy's decision rules count into the policy's named counter,
every uplink's ``set_``/``restore_`` chains into the uplink's (``derive``).
They are read with one kernel-filtered nf_tables object dump (NFT_MSG_GETOBJ,
table ``inet markrouted``, type counter), decoded with struct: never the table
itself. A replace of the table re-declares them with the values read just
before (``nft.Nft.apply``), so they count on across reloads and failovers.

Flows: the conntrack entries whose ct mark carries an uplink's value under
``mark_mask``, counted by one ctnetlink dump per uplink with CTA_MARK and
CTA_MARK_MASK, so the kernel does the filtering (as ``conntrack.clear_mark``
does for the delete) and only matching entries cross to user space.

Both open their own netlink socket per call: they run off the daemon's loop
(a thread), beside the kernel thread's sockets, and share nothing with them.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

from ..model import NFT_TABLE
from . import nl
from .errors import KernelError

NFT_MSG_GETOBJ = 19
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
CTA_MARK, CTA_MARK_MASK = 8, 21

_U64 = struct.Struct(">Q")


def _u64(value: bytes | None) -> int:
    return _U64.unpack(value[:8])[0] if value and len(value) >= 8 else 0


def decode_counter(msg: bytes, table: str = NFT_TABLE) -> tuple[str, int, int] | None:
    """(name, packets, bytes) of one NFT_MSG_NEWOBJ message, None if not a counter of ``table``."""
    a = nl.attrs(msg, nl.HDR.size + nl.NFGENMSG.size, len(msg))
    if nl.cstr(a.get(NFTA_OBJ_TABLE)) != table or nl.be32(a.get(NFTA_OBJ_TYPE)) != NFT_OBJECT_COUNTER:
        return None
    data = a.get(NFTA_OBJ_DATA) or b""
    inner = nl.attrs(data, 0, len(data))
    return nl.cstr(a.get(NFTA_OBJ_NAME)), _u64(inner.get(NFTA_COUNTER_PACKETS)), _u64(inner.get(NFTA_COUNTER_BYTES))


def counter_request(table: str = NFT_TABLE) -> bytes:
    """The body of the dump: counters of ``table`` only (the kernel filters by both)."""
    return (nl.NFGENMSG.pack(nl.NFPROTO_INET, 0, 0) + nl.nla_str(NFTA_OBJ_TABLE, table)
            + nl.nla(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER)))


def read_counters(table: str = NFT_TABLE) -> dict[str, tuple[int, int]]:
    """name -> (packets, bytes) of every named counter of the table; {} when it does not exist."""
    sock = nl.Socket(nl.NETLINK_NETFILTER, 4 << 20)
    try:
        for _attempt in range(5):
            out: dict[str, tuple[int, int]] = {}
            try:
                for msg in sock.request((nl.NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ,
                                        nl.NLM_F_REQUEST | nl.NLM_F_DUMP, counter_request(table),
                                        "nf_tables: list counters"):
                    found = decode_counter(msg, table)
                    if found is not None:
                        out[found[0]] = (found[1], found[2])
            except nl.Interrupted:
                continue
            except KernelError as exc:
                if exc.code == 2:  # ENOENT: no such table
                    return {}
                raise
            return out
        raise KernelError("nf_tables counter dump kept being interrupted")
    finally:
        sock.close()


def flows_request(value: int, mask: int) -> bytes:
    """The body of a conntrack dump of the entries whose ct mark under ``mask`` is ``value``."""
    return (nl.NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
            + nl.nla(CTA_MARK, struct.pack(">I", value))
            + nl.nla(CTA_MARK_MASK, struct.pack(">I", mask)))


def count_flows(values: Iterable[int], mask: int) -> dict[int, int]:
    """mark value -> how many conntrack entries (all families) carry it under ``mask``."""
    out: dict[int, int] = {}
    sock = nl.Socket(nl.NETLINK_NETFILTER, 4 << 20)
    try:
        for value in values:
            for _attempt in range(5):
                n = 0
                try:
                    for _msg in sock.request(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET,
                                             nl.NLM_F_REQUEST | nl.NLM_F_DUMP, flows_request(value, mask),
                                             f"conntrack: list entries with mark {value:#x}/{mask:#x}"):
                        n += 1
                except nl.Interrupted:
                    continue
                out[value] = n
                break
            else:
                raise KernelError("conntrack dump kept being interrupted")
    finally:
        sock.close()
    return out
