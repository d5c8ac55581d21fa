"""Clearing the conntrack entries pinned to an uplink that went down.

An entry's ct mark keeps sending a flow to its uplink until the entry times
out (15-30 s and more); after a failover those flows must re-route. Only the
entries whose ct mark carries the dead uplink's value under ``mark_mask`` are
deleted — a global flush would cut every unrelated session too (VyOS PR #5120).
The kernel does the filtering: one IPCTNL_MSG_CT_DELETE with CTA_MARK and
CTA_MARK_MASK and no tuple, for all families (nfgen family AF_UNSPEC), encoded
here with ``nl``'s helpers; tests/unit/test_rtnl_encode.py compares it with
pyroute2's encoding of the same request.
"""

from __future__ import annotations

import errno
import socket
import struct

from . import nl
from .errors import KernelError

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
CTA_MARK, CTA_MARK_MASK = 8, 21
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
