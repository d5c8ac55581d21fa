"""Small traffic helper run inside the lab's namespaces (stdlib only).

  agent.py serve PORT...               accept TCP on every port (v4 and v6), answer each
                                       connection with the peer address it sees, then
                                       echo whatever arrives until the peer closes
  agent.py connect ADDR PORT TIMEOUT [SRC]
                                       connect, print the address the server saw; exit 1
                                       when the connection fails
"""

from __future__ import annotations

import selectors
import socket
import sys
import threading


def _handle(conn: socket.socket, peer: str) -> None:
    with conn:
        try:
            conn.sendall((peer + "\n").encode())
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                conn.sendall(data)
        except OSError:
            return


def serve(ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for port in ports:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        s.listen(512)
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            conn, addr = sock.accept()
            peer = addr[0]
            if peer.startswith("::ffff:"):
                peer = peer[7:]
            threading.Thread(target=_handle, args=(conn, peer), daemon=True).start()


def connect(addr: str, port: int, timeout: float, src: str | None) -> int:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            if src:
                s.bind((src, 0))
            s.connect((addr, port))
            line = b""
            while not line.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                line += chunk
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(line.decode().strip())
    return 0


def main(argv: list[str]) -> int:
    if argv[0] == "serve":
        serve([int(p) for p in argv[1:]])
        return 0
    if argv[0] == "connect":
        return connect(argv[1], int(argv[2]), float(argv[3]), argv[4] if len(argv) > 4 else None)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
