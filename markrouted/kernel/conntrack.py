"""Clearing the conntrack entries pinned to an uplink that went down.

An entry's ct mark keeps sending a flow to its uplink until the entry times
out (15-30 s and more); after a failover those flows must re-route. Only the
entries whose ct mark carries the dead uplink's value under ``mark_mask`` are
deleted — a global flush would cut every unrelated session too (VyOS PR #5120).
The kernel does the filtering: one IPCTNL_MSG_CT_DELETE with CTA_MARK and
CTA_MARK_MASK and no tuple, for all families.
"""

from __future__ import annotations

from .errors import KernelError


def clear_mark(value: int, mask: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket

    try:
        sock = NFCTSocket(nfgen_family=0)  # AF_UNSPEC: IPv4 and IPv6 alike
    except OSError as exc:
        raise KernelError(f"conntrack: {exc}") from exc
    try:
        result = sock.flush(mark=value, mark_mask=mask)
        if result is not None and not isinstance(result, (list, tuple)):
            list(result)
    except NetlinkError as exc:
        if exc.code != 2:  # ENOENT: nothing matched
            raise KernelError(f"conntrack: delete entries with mark {value:#x}/{mask:#x}: {exc}", exc.code) from exc
    finally:
        sock.close()
