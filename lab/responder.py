"""A slow or sick health-check target, run inside an ISP's namespace (stdlib only).

  responder.py CONTROL ADDRESS... [--http PORT] [--https PORT CERT KEY] [--dns PORT]

This kernel has no netem, so latency is made in userspace: the responder
answers ICMP echo requests (v4 and v6), HTTP and HTTPS GETs and DNS queries
sent to ADDRESS after the delay the CONTROL file says. The namespace's own
echo replies must be switched off (the ``icmp_echo_ignore_all`` sysctls of
that namespace), or the kernel answers first. CONTROL is a JSON file, read
again whenever it changes (write it atomically)::

    {"delay_ms": 20, "http_status": 200, "dns": "answer"}

``dns`` is ``"answer"`` (NOERROR with one A record), ``"silent"`` (no answer)
or ``"servfail"``. A plain TCP connect cannot be delayed from userspace (the
kernel completes the handshake): delay the ICMP, HTTP or DNS probes instead.
It prints "ready" once every socket is open.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import struct
import sys
from typing import Any


class Control:
    def __init__(self, path: str) -> None:
        self.path = path
        self.mtime = -1.0
        self.values: dict[str, Any] = {"delay_ms": 0, "http_status": 200, "dns": "answer"}

    def get(self) -> dict[str, Any]:
        try:
            mtime = os.stat(self.path).st_mtime_ns / 1e9
        except OSError:
            return self.values
        if mtime != self.mtime:
            try:
                with open(self.path) as f:
                    self.values.update(json.load(f))
                self.mtime = mtime
            except (OSError, ValueError):
                pass
        return self.values

    def delay(self) -> float:
        return float(self.get().get("delay_ms", 0)) / 1000


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp(loop: asyncio.AbstractEventLoop, control: Control, address: str) -> None:
    v6 = ":" in address
    family = socket.AF_INET6 if v6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                         socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    sock.bind((address, 0))

    def readable() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(4096)
            except BlockingIOError:
                return
            if not v6:
                data = data[(data[0] & 0x0F) * 4:]
            if len(data) < 8 or data[0] != (128 if v6 else 8):
                continue
            body = data[4:]
            reply = struct.pack("!BBH", 129 if v6 else 0, 0, 0) + body
            if not v6:  # the kernel computes ICMPv6 checksums itself
                reply = reply[:2] + struct.pack("!H", _checksum(reply)) + reply[4:]
            loop.call_later(control.delay(), _send, sock, reply, peer[0])

    loop.add_reader(sock.fileno(), readable)


def _send(sock: socket.socket, data: bytes, peer: str) -> None:
    try:
        sock.sendto(data, (peer, 0))
    except OSError:
        pass


async def http(control: Control, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (await reader.readline()).strip():
            pass
        await asyncio.sleep(control.delay())
        status = int(control.get().get("http_status", 200))
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".encode())
        await writer.drain()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


class Dns(asyncio.DatagramProtocol):
    def __init__(self, control: Control) -> None:
        self.control = control
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        mode = self.control.get().get("dns", "answer")
        if mode == "silent" or len(data) < 12:
            return
        end = 12
        while end < len(data) and data[end]:
            end += data[end] + 1
        question = data[12:end + 5]
        rcode = 2 if mode == "servfail" else 0
        answers = 0 if rcode else 1
        reply = struct.pack("!HHHHHH", struct.unpack_from("!H", data)[0], 0x8180 | rcode, 1, answers, 0, 0)
        reply += question
        if answers:
            reply += struct.pack("!HHHLH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton("192.0.2.53")
        asyncio.get_running_loop().call_later(self.control.delay(), self._send, reply, addr)

    def _send(self, reply: bytes, addr: tuple[Any, ...]) -> None:
        if self.transport is not None:
            self.transport.sendto(reply, addr)


async def main(argv: list[str]) -> None:
    control = Control(argv[0])
    addresses: list[str] = []
    http_port = https_port = dns_port = 0
    cert = key = ""
    args = iter(argv[1:])
    for arg in args:
        if arg == "--http":
            http_port = int(next(args))
        elif arg == "--https":
            https_port, cert, key = int(next(args)), next(args), next(args)
        elif arg == "--dns":
            dns_port = int(next(args))
        else:
            addresses.append(arg)
    loop = asyncio.get_running_loop()
    tls = None
    if https_port:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
    for address in addresses:
        icmp(loop, control, address)
        if http_port:
            await asyncio.start_server(lambda r, w: http(control, r, w), address, http_port)
        if https_port:
            await asyncio.start_server(lambda r, w: http(control, r, w), address, https_port, ssl=tls)
        if dns_port:
            await loop.create_datagram_endpoint(lambda: Dns(control), local_addr=(address, dns_port))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass
