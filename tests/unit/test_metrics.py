"""The metrics endpoint: the exposition text, the HTTP server on a loop, the counter cache,
and contrib/'s alert rules and Grafana dashboard held to the metrics that exist.

The server runs on 127.0.0.1 on a port the kernel picks; no root needed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import missing
from test_daemon_loop import Log
from test_derive import WAN1, WAN2, WORLD

from markrouted.config import parse
from markrouted.derive import derive
from markrouted.metrics import METRICS, CounterCache, Metrics, MetricsServer, listen_problem, render
from markrouted.model import Health, TargetResult

ROOT = Path(__file__).resolve().parents[2]
CONFIG = parse(WAN1 + WAN2 + """
[[policy]]
name = "ssh"
proto = "tcp"
dport = [22]
uplinks = ["wan2", "wan1"]
[[policy]]
name = "web"
balance = { wan1 = 3, wan2 = 1 }
""")
LINE = re.compile(r'^([a-z_:][a-z0-9_:]*)(\{([a-z_]+="(?:[^"\\\n]|\\.)*",?)*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


def sample() -> str:
    desired = derive(CONFIG, WORLD, {"wan2": Health(False, "health check: 3 failed rounds")})
    m = Metrics()
    m.transition("wan2", "down")
    m.reconciled(0.003)
    m.reconciled(2.0)
    m.probe_round("wan2", (TargetResult("192.0.2.53", False, None, "timeout"),))
    m.probe_round("wan1", (TargetResult("192.0.2.53", True, 0.0123),))
    m.in_sync = True
    counts = {"policy_ssh": (7, 420), "policy_web": (3, 180), "uplink_wan1": (100, 9000), "uplink_wan2": (5, 300)}
    return render(m, CONFIG, desired, counts, {0x10000: 4, 0x20000: 0})


def samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value, every line checked against the exposition grammar."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.fullmatch(r"# (HELP|TYPE) [a-z_]+ .+", line), line
            continue
        m = LINE.match(line)
        assert m, f"not exposition format: {line!r}"
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
    return out


def test_every_metric_asked_for_is_served() -> None:
    got = samples(sample())
    assert got['markrouted_uplink_up{uplink="wan1"}'] == 1 and got['markrouted_uplink_up{uplink="wan2"}'] == 0
    assert got['markrouted_uplink_transitions_total{uplink="wan2",to="down"}'] == 1
    assert got['markrouted_probe_rtt_seconds{uplink="wan1",target="192.0.2.53"}'] == pytest.approx(0.0123)
    assert 'markrouted_probe_rtt_seconds{uplink="wan2",target="192.0.2.53"}' not in got  # no answer, no RTT
    assert got['markrouted_probe_loss_ratio{uplink="wan2",target="192.0.2.53"}'] == 1
    assert got['markrouted_probe_loss_ratio{uplink="wan1",target="192.0.2.53"}'] == 0
    # ssh prefers wan2, which is down: wan1 carries it
    assert got['markrouted_policy_uplink{policy="ssh",uplink="wan1"}'] == 1
    assert got['markrouted_policy_uplink{policy="ssh",uplink="wan2"}'] == 0
    assert got['markrouted_policy_packets_total{policy="ssh"}'] == 7
    assert got['markrouted_policy_bytes_total{policy="web"}'] == 180
    assert got['markrouted_uplink_bytes_total{uplink="wan1"}'] == 9000
    assert got['markrouted_uplink_flows{uplink="wan1"}'] == 4
    assert got['markrouted_reconcile_seconds_bucket{le="0.005"}'] == 1
    assert got['markrouted_reconcile_seconds_bucket{le="+Inf"}'] == 2
    assert got["markrouted_reconcile_seconds_count"] == 2
    for name in ("markrouted_drift_repairs_total", "markrouted_config_reload_success",
                 "markrouted_config_reload_timestamp_seconds", "markrouted_in_sync"):
        assert name in got
    assert got['markrouted_conntrack_cleared_total{uplink="wan2"}'] == 0
    served = {k.split("{")[0] for k in got}
    assert served == (set(METRICS) - {"markrouted_reconcile_seconds"}) | {
        "markrouted_reconcile_seconds_bucket", "markrouted_reconcile_seconds_sum", "markrouted_reconcile_seconds_count"}


def test_a_probe_round_counts_once_however_often_it_is_seen() -> None:
    m = Metrics()
    last = (TargetResult("192.0.2.53", False, None, "timeout"),)
    for _ in range(3):
        m.probe_round("wan1", last)
    m.probe_round("wan1", (TargetResult("192.0.2.53", True, 0.01),))
    window, rtt = m.probes["wan1"]["192.0.2.53"]
    assert list(window) == [False, True] and rtt == 0.01


def _get(port: int, path: str = "/metrics") -> tuple[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return head, body


def test_the_server_answers_many_clients_without_holding_the_loop() -> None:
    reads: list[float] = []

    def read() -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
        reads.append(time.monotonic())
        time.sleep(0.2)  # a slow kernel: in the thread, never on the loop
        return {"policy_ssh": (1, 60)}, {}

    cache = CounterCache(read)
    desired = derive(CONFIG, WORLD)

    async def scrape() -> str:
        counts, flows = await cache.get()
        return render(Metrics(), CONFIG, desired, counts, flows)

    async def main() -> None:
        server = MetricsServer(scrape, Log())
        await server.start(("127.0.0.1", 0))
        assert server.server is not None
        port = server.server.sockets[0].getsockname()[1]
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.create_task(ticker())
        clients = ThreadPoolExecutor(50)
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*[loop.run_in_executor(clients, _get, port) for _ in range(50)])
        clients.shutdown()
        t.cancel()
        assert all(h.startswith("HTTP/1.0 200 OK") and "text/plain; version=0.0.4" in h for h, _ in results)
        assert all('markrouted_policy_packets_total{policy="ssh"} 1' in b for _, b in results)
        assert len(reads) == 1  # 50 concurrent scrapes, one counter reading
        assert ticks > 10  # the loop went on while the counters were read
        head, _ = await asyncio.to_thread(_get, port, "/")
        assert head.startswith("HTTP/1.0 404")
        # garbage and a client that says nothing end their own connection only
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"\x00\xff garbage\r\n\r\n")
        head, _ = await asyncio.to_thread(_get, port)
        assert head.startswith("HTTP/1.0 200")
        await server.close()

    asyncio.run(main())


def test_listen_problems_are_said_plainly() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        assert listen_problem(("127.0.0.1", port)) == f"metrics: cannot listen on 127.0.0.1:{port}: the port is in use"
    finally:
        s.close()
    assert listen_problem(("127.0.0.1", port)) is None
    assert listen_problem(("192.0.2.1", 9826)) == (
        "metrics: cannot listen on 192.0.2.1:9826: no interface of this host has that address")


# ------------------------------------------------------------------ contrib/


def _names(expr: str) -> set[str]:
    return set(re.findall(r"\b(markrouted_[a-z_]+)", expr))


def _served() -> set[str]:
    names = set(METRICS)
    names |= {f"markrouted_reconcile_seconds_{s}" for s in ("bucket", "sum", "count")}
    return names


def test_alert_rules_pass_promtool_and_use_served_metrics() -> None:
    path = ROOT / "contrib" / "prometheus-alerts.yml"
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("needs promtool (Debian package prometheus)")
    else:
        proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    exprs = re.findall(r"^\s*expr:\s*(.+)$", path.read_text(), re.M)
    assert len(exprs) == 4
    used = set().union(*(_names(e) for e in exprs))
    assert used == {"markrouted_uplink_up", "markrouted_in_sync", "markrouted_config_reload_success"}
    assert used <= _served()


def test_dashboard_queries_use_only_served_metrics() -> None:
    dash = json.loads((ROOT / "contrib" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs.append(dash["templating"]["list"][1]["query"]["query"])
    used = set().union(*(_names(e) for e in exprs))
    unknown = used - _served()
    assert not unknown, f"the dashboard queries metrics that do not exist: {sorted(unknown)}"
    # every metric asked for has a panel
    assert {"markrouted_uplink_up", "markrouted_probe_rtt_seconds", "markrouted_policy_packets_total",
            "markrouted_uplink_bytes_total", "markrouted_in_sync"} <= used


def test_the_example_hook_is_valid_shell() -> None:
    hook = ROOT / "contrib" / "hooks.d" / "50-wireguard-restart"
    assert hook.stat().st_mode & 0o777 == 0o755
    proc = subprocess.run(["sh", "-n", str(hook)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


