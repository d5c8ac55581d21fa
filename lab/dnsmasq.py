"""dnsmasq in the lab: an upstream resolver on the server, a local one on the host that fills nft sets.

::

    host: dnsmasq 127.0.0.1:53 ──(isp1 or isp2)──► server: dnsmasq 198.18.0.10:53
          conf: nftset= lines from                         answers video.example with
          ``markrouted dnsmasq-config``                    the server's own addresses

Debian's ``dnsmasq-base`` (the binary, no system service) is used. Both run in
the foreground inside their namespace and are stopped by the test. ``query``
asks a DNS server from inside a namespace, as a resolver library would: run
as ``python3 lab/dnsmasq.py query SERVER NAME A|AAAA`` (stdout: the addresses).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from typing import Any

DNSMASQ = "/usr/sbin/dnsmasq"
QTYPES = {"A": 1, "AAAA": 28}


def available() -> str | None:
    """Why dnsmasq cannot be used here (None: it can)."""
    if not os.path.exists(DNSMASQ) and not shutil.which("dnsmasq"):
        return "dnsmasq is not installed (Debian package dnsmasq-base; scripts/install-deps --test)"
    return None


def upstream_conf(listen: str, answers: dict[str, list[str]]) -> str:
    """An authoritative-looking resolver: fixed answers, nothing forwarded."""
    lines = [f"listen-address={listen}", "bind-interfaces", "no-resolv", "no-hosts", "port=53"]
    for name, addresses in answers.items():
        lines += [f"address=/{name}/{address}" for address in addresses]
    return "\n".join(lines) + "\n"


def local_conf(upstream: str, nftset_lines: str) -> str:
    """The host's resolver: forwards to ``upstream``, fills the sets of ``markrouted dnsmasq-config``."""
    lines = ["listen-address=127.0.0.1", "bind-interfaces", "no-resolv", "no-hosts", "port=53",
             f"server={upstream}"]
    return "\n".join(lines) + "\n" + nftset_lines


def start(lab: Any, role: str, conf: str, name: str) -> subprocess.Popen[str]:
    """dnsmasq in ``role``'s namespace with ``conf``, in the foreground; ready when it answers."""
    path = os.path.join(lab.run_dir, f"dnsmasq-{name}.conf")
    with open(path, "w") as f:
        f.write(conf)
    proc: subprocess.Popen[str] = lab.popen(
        role, DNSMASQ, "--keep-in-foreground", f"--conf-file={path}", "--user=root", "--pid-file=",
        "--log-facility=-", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc


def stop(proc: subprocess.Popen[str]) -> str:
    """Stop a dnsmasq started by ``start``; its output."""
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def _name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"


def query(server: str, name: str, qtype: str = "A", timeout: float = 2.0) -> list[str]:
    """The addresses of one DNS answer (an empty list for none); raises OSError when nothing answers."""
    ident = random.randrange(1 << 16)
    packet = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + _name(name) + struct.pack(">HH", QTYPES[qtype], 1)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, 53))
        end = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, end - time.monotonic()))
            data = sock.recv(4096)
            if len(data) >= 12 and struct.unpack(">H", data[:2])[0] == ident:
                break
    _id, _flags, qd, an, _ns, _ar = struct.unpack(">HHHHHH", data[:12])
    offset = 12
    for _ in range(qd):
        offset = _skip_name(data, offset) + 4
    out = []
    for _ in range(an):
        offset = _skip_name(data, offset)
        rtype, _cls, _ttl, length = struct.unpack(">HHIH", data[offset:offset + 10])
        offset += 10
        rdata = data[offset:offset + length]
        offset += length
        if rtype == 1 and length == 4:
            out.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == 28 and length == 16:
            out.append(socket.inet_ntop(socket.AF_INET6, rdata))
    return out


def _skip_name(data: bytes, offset: int) -> int:
    while True:
        length = data[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


def resolve(lab: Any, role: str, server: str, name: str, qtype: str = "A", deadline: float = 10.0) -> list[str]:
    """``query`` run inside ``role``'s namespace, retried until it answers or ``deadline`` passes."""
    end = time.monotonic() + deadline
    script = os.path.abspath(__file__)
    last = ""
    while time.monotonic() < end:
        proc = subprocess.run([*lab.nsenter(role), sys.executable, script, "query", server, name, qtype],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            return proc.stdout.split()
        last = proc.stderr.strip()
        time.sleep(0.1)
    raise TimeoutError(f"no DNS answer from {server} for {name} {qtype} within {deadline}s: {last}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "query":
        try:
            print("\n".join(query(sys.argv[2], sys.argv[3], sys.argv[4])))
        except OSError as exc:
            print(f"no answer: {exc}", file=sys.stderr)
            sys.exit(1)
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
