"""HTTP and HTTPS health probes: a GET that must answer 2xx or 3xx in time.

The socket is made like every probe's (bound to the uplink's interface, from
its address, with its mark: see probe.py) and connected to the target
address; the URL's host is only the Host header and the TLS server name. The
answer's status line is all that is read: the probe ends there, so a large
page costs nothing. A small protocol on the loop, not streams: with many
uplinks, the per-probe machinery is most of the cost.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time

from ..model import TargetResult
from .probe import _prepare

USER_AGENT = "markrouted-health-check"
STATUS_LINE_MAX = 1024


def tls_context(verify: bool, cafile: str | None) -> ssl.SSLContext:
    """The context of an uplink's HTTPS probes (made once per check: loading a CA store is slow).

    Raises OSError or ssl.SSLError when ``cafile`` cannot be read.
    """
    if not verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cafile)


class _StatusLine(asyncio.Protocol):
    def __init__(self, request: bytes, done: asyncio.Future[bytes]) -> None:
        self.request = request
        self.done = done
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if b"\n" in self.data or len(self.data) > STATUS_LINE_MAX:
            if not self.done.done():
                self.done.set_result(self.data.split(b"\n", 1)[0])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is not None:
                self.done.set_exception(exc)
            else:
                self.done.set_result(self.data.split(b"\n", 1)[0])


def request(host: str, port: int, path: str, tls: bool) -> bytes:
    default = 443 if tls else 80
    authority = host if port == default else f"{host}:{port}"
    return (f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {USER_AGENT}\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n").encode("ascii")


def status_problem(line: bytes) -> str | None:
    """None for a 2xx/3xx status line; else what is wrong with the answer."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
        return "not an HTTP answer" if line else "connection closed without an answer"
    code = int(parts[1])
    if 200 <= code < 400:
        return None
    return f"HTTP {code}"


async def http_probe(ifname: str, mark: int, source: str, target: str, port: int, host: str, path: str,
                     timeout: float, tls: ssl.SSLContext | None) -> TargetResult:
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    transport: asyncio.Transport | None = None
    try:
        _prepare(sock, ifname, mark, source)
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        done: asyncio.Future[bytes] = loop.create_future()

        async def exchange() -> bytes:
            nonlocal transport
            await loop.sock_connect(sock, (target, port))
            protocol = _StatusLine(request(host, port, path, tls is not None), done)
            if tls is None:
                transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
            else:
                transport, _ = await loop.create_connection(lambda: protocol, sock=sock, ssl=tls,
                                                            server_hostname=host.strip("[]"),
                                                            ssl_handshake_timeout=timeout)
            return await done

        try:
            line = await asyncio.wait_for(exchange(), timeout)
        except asyncio.TimeoutError:
            return TargetResult(target, False, error=f"no answer in {timeout:g}s")
        except ssl.SSLCertVerificationError as exc:
            return TargetResult(target, False, error=f"TLS certificate: {exc.verify_message or exc.reason}")
        except ssl.SSLError as exc:
            return TargetResult(target, False, error=f"TLS: {exc.reason or exc}")
        except OSError as exc:
            # asyncio's connect error says "Connect call failed (address)": the errno says more
            return TargetResult(target, False, error=os.strerror(exc.errno) if exc.errno else str(exc))
        rtt = time.perf_counter() - start
        problem = status_problem(line)
        if problem is not None:
            return TargetResult(target, False, error=problem)
        return TargetResult(target, True, rtt=rtt)
    finally:
        if transport is not None:
            transport.abort()  # closes the socket too; no TLS goodbye to wait for
        else:
            sock.close()
