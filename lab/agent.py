"""Small traffic helper run inside the lab's namespaces (stdlib only).

  agent.py serve PORT...               accept TCP on every port (v4 and v6), answer each
                                       connection with the peer address it sees, then
                                       echo whatever arrives until the peer closes
  agent.py connect ADDR PORT TIMEOUT [SRC]
                                       connect, print the address the server saw; exit 1
                                       when the connection fails
  agent.py connect-many ADDR PORT COUNT TIMEOUT [MAX_FAILURES]
                                       COUNT connections one after the other, one line
                                       each: the address the server saw, or "-" when the
                                       connection failed (one process for hundreds of
                                       connections: the balance test needs many); stops
                                       early after MAX_FAILURES failures
  agent.py hold ADDR PORT TIMEOUT      one long-lived connection: print "PEER LOCALPORT",
                                       then send every line read on stdin and print the
                                       echo (or "error: ..."), until stdin closes

It runs as any user (the uid tests run it through setpriv), so it only needs
to be world-readable, and it imports nothing outside the standard library.
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


def _read_line(s: socket.socket) -> str:
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            raise ConnectionError("closed by the peer")
        line += chunk
    return line.decode().strip()


def _open(addr: str, port: int, timeout: float, src: str | None = None) -> tuple[socket.socket, str]:
    """A connected socket and the first line the server sent (its view of us)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        if src:
            s.bind((src, 0))
        s.connect((addr, port))
        return s, _read_line(s)
    except BaseException:
        s.close()
        raise


def connect(addr: str, port: int, timeout: float, src: str | None) -> int:
    try:
        s, peer = _open(addr, port, timeout, src)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    s.close()
    print(peer)
    return 0


def connect_many(addr: str, port: int, count: int, timeout: float, max_failures: int) -> int:
    failures = 0
    for _ in range(count):
        try:
            s, peer = _open(addr, port, timeout)
            s.close()
        except OSError:
            peer = "-"
            failures += 1
        print(peer, flush=True)
        if failures >= max_failures:
            break
    return 0


def hold(addr: str, port: int, timeout: float) -> int:
    try:
        s, peer = _open(addr, port, timeout)
    except OSError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    with s:
        print(f"{peer} {s.getsockname()[1]}", flush=True)
        for line in sys.stdin:
            try:
                s.sendall(line.encode())
                print(_read_line(s), flush=True)
            except OSError as exc:
                print(f"error: {exc}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "serve":
        serve([int(p) for p in argv[1:]])
        return 0
    if argv and argv[0] == "connect":
        return connect(argv[1], int(argv[2]), float(argv[3]), argv[4] if len(argv) > 4 else None)
    if argv and argv[0] == "connect-many":
        limit = int(argv[5]) if len(argv) > 5 else int(argv[3])
        return connect_many(argv[1], int(argv[2]), int(argv[3]), float(argv[4]), limit)
    if argv and argv[0] == "hold":
        return hold(argv[1], int(argv[2]), float(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
