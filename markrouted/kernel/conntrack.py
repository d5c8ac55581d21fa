"""Clearing the conntrack entries pinned to an uplink that went down.

An entry's ct mark keeps sending a flow to its uplink until the entry times
out (15-30 s and more); after a failover those flows must re-route. Only the
entries whose ct mark carries the dead uplink's value under ``mark_mask`` are
deleted — a global flush would cut every unrelated session too (VyOS PR #5120).
The kernel does the filtering: one IPCTNL_MSG_CT_DELETE with CTA_MARK and
CTA_MARK_MASK and no tuple, for all families (nfgen family AF_UNSPEC), encoded
here with ``nl``'s helpers; tests/unit/test_rtnl_encode.py compares it with
pyroute2's encoding of the same request.

A policy with ``failback = "migrate"`` sets one conntrack label bit on its
flows (docs/design.md); when a better tier returns, only its flows on a worse
uplink are cleared. The kernel filters deletes by mark but not by label, so
those entries are dumped filtered by the uplink's mark, picked by their label
bit here, and deleted one by one by their original tuple (copied as the dump
gave it). ``count`` is the same dump, counted (``plan --down``).
"""

from __future__ import annotations

import errno
import socket
import struct

from . import nl
from .errors import KernelError

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2
CTA_TUPLE_ORIG, CTA_MARK, CTA_ID, CTA_MARK_MASK, CTA_LABELS = 1, 8, 12, 21, 22
CT_GET = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
#: the message type of a delete: nfnetlink's subsystem in the high byte
CT_DELETE = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE


def message(value: int, mask: int) -> bytes:
    """The body of the delete: entries whose ct mark under ``mask`` is ``value``, any family."""
    return (nl.NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
            + nl.nla(CTA_MARK, struct.pack(">I", value))
            + nl.nla(CTA_MARK_MASK, struct.pack(">I", mask)))


def clear_mark(value: int, mask: int) -> None:
    """Delete the entries; ENOENT (none matched) is success."""
    sock = nl.Socket(nl.NETLINK_NETFILTER)
    try:
        for _answer in sock.request(CT_DELETE, nl.NLM_F_REQUEST | nl.NLM_F_ACK, message(value, mask),
                                    f"conntrack: delete entries with mark {value:#x}/{mask:#x}"):
            pass  # answered by its acknowledgement alone
    except KernelError as exc:
        if exc.code != errno.ENOENT:
            raise
    finally:
        sock.close()


def has_label(labels: bytes | None, bit: int) -> bool:
    """Whether the CTA_LABELS bitmap (host-order 32-bit words, bit 0 first) has ``bit`` set."""
    if labels is None or len(labels) * 8 <= bit:
        return False
    word = struct.unpack_from("=I", labels, (bit // 32) * 4)[0]
    return bool(word >> (bit % 32) & 1)


def _entries(sock: nl.Socket, value: int, mask: int, label: int | None) -> list[tuple[int, bytes, bytes]]:
    """(family, original tuple attribute, id attribute) of the entries with the mark (and label bit)."""
    out = []
    what = f"conntrack: list entries with mark {value:#x}/{mask:#x}"
    for msg in sock.request(CT_GET, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, message(value, mask), what):
        family = msg[nl.HDR.size]
        start = nl.HDR.size + nl.NFGENMSG.size
        found = nl.attrs(msg, start, len(msg))
        mark = found.get(CTA_MARK)
        if mark is None or struct.unpack(">I", mark)[0] & mask != value:
            continue  # a kernel too old to filter the dump
        if label is not None and not has_label(found.get(CTA_LABELS), label):
            continue
        tup = found.get(CTA_TUPLE_ORIG)
        if tup is not None:
            ident = found.get(CTA_ID)
            out.append((family, tup, ident or b""))
    return out


def count(value: int, mask: int, label: int | None = None) -> int:
    """How many entries carry the mark under ``mask`` (and, if given, the label bit)."""
    sock = nl.Socket(nl.NETLINK_NETFILTER)
    try:
        return len(_entries(sock, value, mask, label))
    finally:
        sock.close()


def clear_labelled(value: int, mask: int, label: int) -> int:
    """Delete the entries with the mark under ``mask`` and the label bit; how many went.

    An entry gone between the dump and its delete (ENOENT) is not an error.
    """
    sock = nl.Socket(nl.NETLINK_NETFILTER)
    deleted = 0
    try:
        for family, tup, ident in _entries(sock, value, mask, label):
            body = (nl.NFGENMSG.pack(family, 0, 0) + nl.nla(CTA_TUPLE_ORIG, tup, True)
                    + (nl.nla(CTA_ID, ident) if ident else b""))
            try:
                for _answer in sock.request(CT_DELETE, nl.NLM_F_REQUEST | nl.NLM_F_ACK, body,
                                            f"conntrack: delete an entry with label {label}"):
                    pass
                deleted += 1
            except KernelError as exc:
                if exc.code != errno.ENOENT:
                    raise
    finally:
        sock.close()
    return deleted
