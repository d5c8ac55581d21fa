"""DNS health probes: a UDP query for a name, to the target as the resolver.

A resolver that times out while ping still answers is an outage users feel
at once; only asking it finds that. The query leaves like every probe (bound
to the uplink's interface, from its address, with its mark: see probe.py);
the probe succeeds on an answer with the query's id and rcode NOERROR.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

from ..model import TargetResult
from .probe import _prepare

RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
TYPE_A, CLASS_IN = 1, 1


def query(name: str, ident: int) -> bytes:
    """A recursive query for the A records of ``name``."""
    header = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split(".")) + b"\0"
    return header + qname + struct.pack("!HH", TYPE_A, CLASS_IN)


def answer_problem(data: bytes, ident: int) -> str | None:
    """None for a NOERROR answer to query ``ident``; "" when it is not ours; else the problem."""
    if len(data) < 12:
        return ""
    their_id, flags = struct.unpack_from("!HH", data)
    if their_id != ident or not flags & 0x8000:
        return ""
    rcode = flags & 0x000F
    if rcode == 0:
        return None
    return f"DNS {RCODES.get(rcode, f'rcode {rcode}')}"


async def dns_probe(ifname: str, mark: int, source: str, target: str, name: str, timeout: float,
                    port: int = 53) -> TargetResult:
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        _prepare(sock, ifname, mark, source)
        loop = asyncio.get_running_loop()
        ident = int.from_bytes(os.urandom(2), "big")
        start = time.perf_counter()

        async def exchange() -> str | None:
            sock.connect((target, port))
            await loop.sock_sendall(sock, query(name, ident))
            while True:
                problem = answer_problem(await loop.sock_recv(sock, 4096), ident)
                if problem != "":
                    return problem

        try:
            problem = await asyncio.wait_for(exchange(), timeout)
        except asyncio.TimeoutError:
            return TargetResult(target, False, error=f"no answer in {timeout:g}s")
        except OSError as exc:
            return TargetResult(target, False, error=exc.strerror or str(exc))
        if problem is not None:
            return TargetResult(target, False, error=problem)
        return TargetResult(target, True, rtt=time.perf_counter() - start)
    finally:
        sock.close()
