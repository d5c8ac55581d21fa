"""Health probes that test the uplink, not the current routing.

Every probe socket is bound to the uplink's interface (SO_BINDTODEVICE),
carries the uplink's source address and its fwmark (SO_MARK), so it leaves by
that uplink whatever the routing tables prefer right now: a probe of the
backup never sneaks out by the primary, and a probe of a dead uplink never
succeeds through another one. All probes share the daemon's asyncio loop; no
thread per target.

ICMP uses raw sockets (CAP_NET_RAW), one per uplink and family, matching
echo replies by identifier and sequence and handing each to a callback (no
future or task per probe: with many uplinks, that machinery cost more than
the probing); TCP probes succeed when the connect completes.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
import struct
import time
from collections.abc import Callable

from ..model import TargetResult
from .errors import PermissionDenied

SO_MARK = 36
SO_BINDTODEVICE = 25
ICMP_ECHO, ICMP_ECHOREPLY = 8, 0
ICMP6_ECHO, ICMP6_ECHOREPLY = 128, 129
PAYLOAD = b"markrouted-probe"

_ids = itertools.count((os.getpid() * 7919) & 0xFFFF)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _prepare(sock: socket.socket, ifname: str, mark: int, source: str | None) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except PermissionError as exc:
        sock.close()
        raise PermissionDenied(
            "health probes need CAP_NET_RAW (to bind to the uplink's interface) and CAP_NET_ADMIN (to mark)"
        ) from exc
    if source:
        sock.bind((source, 0))


class IcmpProber:
    """Echo requests out of one uplink, for one address family."""

    def __init__(self, ifname: str, mark: int, source: str, family: int) -> None:
        self.family = family
        proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
        try:
            self.sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
        except PermissionError as exc:
            raise PermissionDenied("ICMP health checks need CAP_NET_RAW (raw sockets)") from exc
        _prepare(self.sock, ifname, mark, source)
        self.ident = next(_ids) & 0xFFFF
        self.seq = itertools.count(1)
        self.waiting: dict[int, Callable[[float], None]] = {}  # seq -> called with the reply's arrival
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.waiting.clear()

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(2048)
            except BlockingIOError:
                return
            except OSError:
                return
            if self.family == socket.AF_INET:
                if len(data) < 20:
                    continue
                data = data[(data[0] & 0x0F) * 4 :]
                want = ICMP_ECHOREPLY
            else:
                want = ICMP6_ECHOREPLY
            if len(data) < 8 or data[0] != want:
                continue
            ident, seq = struct.unpack_from("!HH", data, 4)
            if ident != self.ident:
                continue
            on_reply = self.waiting.pop(seq, None)
            if on_reply is not None:
                on_reply(time.perf_counter())

    def send(self, target: str, on_reply: Callable[[float], None]) -> int | TargetResult:
        """Send one echo request now: its sequence number, or the failed result.

        ``on_reply`` is called with the arrival time (``time.perf_counter``) of
        the matching reply; :meth:`forget` the sequence when giving up on it.
        """
        seq = next(self.seq) & 0xFFFF
        kind = ICMP_ECHO if self.family == socket.AF_INET else ICMP6_ECHO
        header = struct.pack("!BBHHH", kind, 0, 0, self.ident, seq)
        if self.family == socket.AF_INET:  # the kernel computes ICMPv6 checksums itself
            header = struct.pack("!BBHHH", kind, 0, _checksum(header + PAYLOAD), self.ident, seq)
        self.waiting[seq] = on_reply
        try:
            self.sock.sendto(header + PAYLOAD, (target, 0))
        except OSError as exc:
            self.waiting.pop(seq, None)
            return TargetResult(target, False, error=os.strerror(exc.errno or errno.EIO))
        return seq

    def forget(self, seq: int) -> None:
        """No reply is expected any more (timed out, or the round was cancelled)."""
        self.waiting.pop(seq, None)


async def tcp_probe(ifname: str, mark: int, source: str, target: str, port: int, timeout: float) -> TargetResult:
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        _prepare(sock, ifname, mark, source)
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (target, port)), timeout)
        except asyncio.TimeoutError:
            return TargetResult(target, False, error=f"no answer in {timeout:g}s")
        except OSError as exc:
            return TargetResult(target, False, error=exc.strerror or str(exc))
        return TargetResult(target, True, rtt=time.perf_counter() - start)
    finally:
        sock.close()
