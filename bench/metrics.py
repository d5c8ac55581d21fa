#!/usr/bin/python3
"""A scrape of the metrics endpoint with 1,000 policies and 16 uplinks.

Run: ``/usr/bin/python3 bench/metrics.py [--runs 200]`` (no root needed). It prints
a table and writes ``bench/results-metrics.md``.

Two configs of 16 uplinks and 1,000 policies: ``bench/daemon.py``'s (each policy
lists 3 uplinks, every tenth a 3:1 balance), and a worst case where every
policy lists all 16 uplinks (16,000 ``markrouted_policy_uplink`` series). Each
uplink has a health check of two targets with a full loss window. The kernel's
counters are given (an in-memory reading, as the cache holds it between
reads), so what is timed is the daemon's share of a scrape:

* ``render``: the exposition text from the daemon's state;
* ``scrape``: a whole ``GET /metrics`` over loopback TCP against the server on
  an asyncio loop, from the request's first byte sent to the answer's last
  byte received (a fresh connection each time, as Prometheus makes).

The target: a scrape in at most 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon import POLICIES, UPLINKS, config_text  # noqa: E402

from markrouted.config import parse  # noqa: E402
from markrouted.derive import derive  # noqa: E402
from markrouted.metrics import CounterCache, Metrics, MetricsServer, render  # noqa: E402
from markrouted.model import AF_INET, AF_INET6, Address, Link, MainDefault, Observed, TargetResult  # noqa: E402
from markrouted.model import counter_name  # noqa: E402

TARGET_MS = 10.0


def world() -> Observed:
    links, addresses, defaults = [Link(1, "lo", True, True)], [], []
    for i in range(UPLINKS):
        index = 2 + i
        links.append(Link(index, f"u{i}", True, True))
        addresses += [Address(index, AF_INET, f"198.18.{i}.2", 24), Address(index, AF_INET6, f"2001:db8:{0x100 + i:x}::2", 64)]
        defaults += [MainDefault(AF_INET, index, f"198.18.{i}.1", 100 + i),
                     MainDefault(AF_INET6, index, f"2001:db8:{0x100 + i:x}::1", 100 + i)]
    return Observed(tuple(links), tuple(addresses), tuple(defaults), {})


def all_uplinks_text() -> str:
    every = ", ".join(f'"u{i}"' for i in range(UPLINKS))
    out = [config_text().split("[[policy]]")[0]]
    for j in range(POLICIES):
        out.append(f'[[policy]]\nname = "p{j}"\nproto = "tcp"\ndport = [{1024 + j}]\nuplinks = [{every}]\n')
    return "\n".join(out)


def state(text: str) -> tuple[object, ...]:
    config = parse(text)
    desired = derive(config, world())
    m = Metrics()
    for i in range(UPLINKS):
        for k in range(20):
            m.probe_round(f"u{i}", (TargetResult("192.0.2.1", k % 7 != 0, 0.012), TargetResult("198.51.100.1", True, 0.02)))
        m.transition(f"u{i}", "down")
        m.transition(f"u{i}", "up")
    for k in range(100):
        m.reconciled(0.001 * k)
    counts = {counter_name("policy", p.name): (123456 + n, 98765432 + n) for n, p in enumerate(config.policies)}
    counts.update({counter_name("uplink", u.name): (10**9, 10**12) for u in config.uplinks})
    flows = {u.mark: 5000 for u in desired.uplinks}
    return config, desired, m, counts, flows


def get(port: int) -> tuple[float, int]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        size = 0
        while chunk := s.recv(1 << 20):
            size += len(chunk)
        return time.perf_counter() - start, size


def bench(name: str, text: str, runs: int) -> list[str]:
    config, desired, m, counts, flows = state(text)
    renders = []
    for _ in range(runs):
        t = time.perf_counter()
        body = render(m, config, desired, counts, flows)  # type: ignore[arg-type]
        renders.append(time.perf_counter() - t)
    series = sum(1 for line in body.splitlines() if not line.startswith("#"))
    cache = CounterCache(lambda: (counts, flows))  # type: ignore[arg-type,return-value]

    async def scrape() -> str:
        c, f = await cache.get()
        return render(m, config, desired, c, f)  # type: ignore[arg-type]

    scrapes: list[float] = []
    size = 0

    async def main() -> None:
        nonlocal size
        server = MetricsServer(scrape, None)
        await server.start(("127.0.0.1", 0))
        assert server.server is not None
        port = server.server.sockets[0].getsockname()[1]
        await cache.get()  # the first reading, as after the first scrape
        for _ in range(runs):
            seconds, size = await asyncio.get_running_loop().run_in_executor(None, get, port)
            scrapes.append(seconds)
        await server.close()
        cache.close()

    asyncio.run(main())
    ms = lambda xs: f"{statistics.median(xs) * 1000:.2f} / {sorted(xs)[int(len(xs) * 0.95)] * 1000:.2f} / {max(xs) * 1000:.2f}"  # noqa: E731
    ok = statistics.median(scrapes) * 1000 <= TARGET_MS
    return [f"| {name} | {series} | {size // 1024} KiB | {ms(renders)} | {ms(scrapes)} | {'yes' if ok else 'NO'} |"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    rows = ["| config | series | body | render ms (median / p95 / max) | scrape ms (median / p95 / max) | ≤ 10 ms |",
            "| --- | --- | --- | --- | --- | --- |"]
    rows += bench(f"{POLICIES} policies × {UPLINKS} uplinks (3 listed each)", config_text(), args.runs)
    rows += bench(f"{POLICIES} policies × {UPLINKS} uplinks (all 16 listed)", all_uplinks_text(), args.runs)
    text = "\n".join(rows)
    print(text)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results-metrics.md")
    with open(out, "w") as f:
        f.write("# A scrape of the metrics endpoint\n\n`/usr/bin/python3 bench/metrics.py --runs "
                f"{args.runs}` (see its docstring), Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
                "shared with other work while measured.\n\n" + text + "\n\nThe kernel's counters are read "
                "in a thread of their own, at most once per 5 s whatever the number of scrapes "
                "(`metrics.CounterCache`); that reading is not part of these figures.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
