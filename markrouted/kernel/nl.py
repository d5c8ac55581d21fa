"""The netlink wire format, for the few paths where pyroute2's generality costs too much.

Shared by the struct-decoded dumps (``rtdump``, ``nftdump``), the raw nf_tables
refill (``nftraw``) and the event listener (``events``): message framing,
attribute encoding and decoding, one request/answer loop that turns the
kernel's error replies into typed errors, and the netlink numbers more than
one of them needs (each object's own attribute numbers live with the object:
``rules``, ``routes``, ``nftdump``/``nftraw``).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Iterator

from .errors import KernelError, denied

HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_DUMP_INTR = 0x10
NLM_F_CREATE, NLM_F_APPEND = 0x400, 0x800
NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 2, 3, 4
NLA_F_NESTED = 0x8000
SOL_NETLINK = 270

#: rtnetlink: the fixed header of rule and route messages (struct rtmsg / fib_rule_hdr)
RTMSG = struct.Struct("=BBBBBBBBI")
#: its table byte for a table above 255, which then travels in an attribute
RT_TABLE_COMPAT = 252

#: nfnetlink and its nf_tables subsystem
NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big endian)
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10
NFTA_GEN_ID, NFTA_GEN_PROC_PID = 1, 2


def u32(value: bytes | None, default: int = 0) -> int:
    """A host-order u32 attribute (rtnetlink)."""
    if not value or len(value) < 4:
        return default
    out: int = struct.unpack("=I", value[:4])[0]
    return out


def be32(value: bytes | None, default: int = 0) -> int:
    """A network-order u32 attribute (nfnetlink)."""
    if not value or len(value) < 4:
        return default
    out: int = struct.unpack(">I", value[:4])[0]
    return out


class Interrupted(Exception):
    """The kernel's state changed during a dump (NLM_F_DUMP_INTR): ask again."""


def attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """The attributes between offset and end, by type (the last one of a type wins)."""
    out: dict[int, bytes] = {}
    while offset + 4 <= end:
        length, atype = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[atype & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, sequence, whole message) for each message of a datagram."""
    offset = 0
    while offset + HDR.size <= len(data):
        length, mtype, flags, seq, _pid = HDR.unpack_from(data, offset)
        if length < HDR.size:
            return
        yield mtype, flags, seq, data[offset : offset + length]
        offset += (length + 3) & ~3


def nla(atype: int, payload: bytes, nested: bool = False) -> bytes:
    body = struct.pack("=HH", 4 + len(payload), atype | (NLA_F_NESTED if nested else 0)) + payload
    return body + b"\0" * ((4 - len(body) % 4) % 4)


def nla_str(atype: int, value: str) -> bytes:
    return nla(atype, value.encode() + b"\0")


def cstr(value: bytes | None) -> str:
    """A NUL-terminated string attribute."""
    return value.split(b"\0", 1)[0].decode(errors="replace") if value else ""


def error_of(msg: bytes) -> int:
    """The errno of an NLMSG_ERROR message (0: an acknowledgement)."""
    code: int = -struct.unpack_from("=i", msg, HDR.size)[0]
    return code


def raise_for(code: int, what: str) -> None:
    if code in (errno.EPERM, errno.EACCES):
        raise denied(what)
    raise KernelError(f"{what}: {os.strerror(code)}", code)


class Socket:
    """One netlink socket for requests: sequence numbers, answers, errors."""

    def __init__(self, protocol: int, rcvbuf: int = 1 << 20) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        except OSError as exc:
            raise KernelError(f"cannot open a netlink socket: {exc}") from exc
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.seq = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def frame(self, mtype: int, flags: int, body: bytes) -> tuple[int, bytes]:
        seq = next(self.seq)
        return seq, HDR.pack(HDR.size + len(body), mtype, flags, seq, 0) + body

    def request(self, mtype: int, flags: int, body: bytes, what: str) -> Iterator[bytes]:
        """Send one request; yield its answers until done (a dump's end, or the ack).

        Raises Interrupted when a dump's answers were marked inconsistent.
        """
        seq, data = self.frame(mtype, flags, body)
        self.sock.send(data)
        interrupted = False
        while True:
            for rtype, rflags, rseq, msg in messages(self.sock.recv(1 << 20)):
                if rseq != seq:
                    continue  # a late answer to an earlier request
                if rflags & NLM_F_DUMP_INTR:
                    interrupted = True
                if rtype == NLMSG_DONE or (rtype == NLMSG_ERROR and error_of(msg) == 0):
                    if interrupted:
                        raise Interrupted()
                    return
                if rtype == NLMSG_ERROR:
                    raise_for(error_of(msg), what)
                yield msg

    def acks(self, seqs: set[int], what: str) -> None:
        """Wait for the acknowledgement of every sequence number given."""
        while seqs:
            for rtype, _f, rseq, msg in messages(self.sock.recv(1 << 16)):
                if rtype == NLMSG_ERROR and rseq in seqs:
                    code = error_of(msg)
                    if code:
                        raise_for(code, what)
                    seqs.discard(rseq)
