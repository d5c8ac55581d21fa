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
#: how long a wait for the kernel's next answer may last: the kernel answers a
#: request at once, so silence this long means the answer was lost (or the
#: socket is wrong), and a daemon must not wait for it forever
TIMEOUT = 10.0
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
#: what one queued answer costs in the receive buffer (a small skb's true size, generously)
ANSWER_COST = 2048
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
    """One netlink socket for requests: sequence numbers, answers, errors.

    Every wait for an answer ends after ``timeout`` seconds of silence with a
    KernelError naming what was awaited, never in a hang.
    """

    def __init__(self, protocol: int, rcvbuf: int = 1 << 20, timeout: float = TIMEOUT) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        except OSError as exc:
            raise KernelError(f"cannot open a netlink socket: {exc}") from exc
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.timeout = timeout
        self.sock.settimeout(timeout)  # each recv polls with this deadline
        self.seq = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def frame(self, mtype: int, flags: int, body: bytes) -> tuple[int, bytes]:
        seq = next(self.seq)
        return seq, HDR.pack(HDR.size + len(body), mtype, flags, seq, 0) + body

    def send(self, data: bytes, what: str, answers: int = 0) -> None:
        """Send one datagram (a whole batch), the buffers first grown to hold it and ``answers`` acks.

        The kernel refuses a datagram larger than the send buffer (EMSGSIZE),
        and it handles a batch within this call, queueing the acknowledgements
        before anyone reads them: those beyond the receive buffer would be
        dropped (ENOBUFS).
        """
        self._grow(socket.SO_SNDBUF, SO_SNDBUFFORCE, len(data) + 4096)
        if answers:
            self._grow(socket.SO_RCVBUF, SO_RCVBUFFORCE, answers * ANSWER_COST)
        try:
            self.sock.send(data)
        except OSError as exc:
            raise KernelError(f"{what}: {exc.strerror or exc}", exc.errno) from exc

    def _grow(self, option: int, force: int, size: int) -> None:
        # the kernel reports twice the size it was given (its bookkeeping overhead)
        if self.sock.getsockopt(socket.SOL_SOCKET, option) >= 2 * size:
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, force, size)  # beyond the sysctl limit: CAP_NET_ADMIN
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, option, size)

    def recv(self, size: int, what: str) -> bytes:
        """The next datagram; KernelError if none comes within the timeout."""
        try:
            return self.sock.recv(size)
        except TimeoutError as exc:
            raise KernelError(f"{what}: no answer from the kernel within {self.timeout:g} s", errno.ETIMEDOUT) from exc
        except OSError as exc:  # ENOBUFS: answers were dropped, waiting on would never end
            raise KernelError(f"{what}: {exc.strerror or exc}", exc.errno) from exc

    def request(self, mtype: int, flags: int, body: bytes, what: str) -> Iterator[bytes]:
        """Send one request; yield its answers until done (a dump's end, or the ack).

        Raises Interrupted when a dump's answers were marked inconsistent.
        """
        seq, data = self.frame(mtype, flags, body)
        self.sock.send(data)
        interrupted = False
        while True:
            for rtype, rflags, rseq, msg in messages(self.recv(1 << 20, what)):
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
            for rtype, _f, rseq, msg in messages(self.recv(1 << 16, what)):
                if rtype == NLMSG_ERROR and rseq in seqs:
                    code = error_of(msg)
                    if code:
                        raise_for(code, what)
                    seqs.discard(rseq)
