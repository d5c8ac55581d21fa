"""A real Prometheus scrapes the daemon in the lab, and hooks see a real failover.

Prometheus (Debian's package) runs in the lab's host namespace beside
markrouted, scraping ``127.0.0.1:9826`` every second; the test reads what it
stored through its HTTP API. Then a recording hook sees the failover and
failback of a line cut, in order, with the right fields. Deadlines only bound
the waits; nothing is asserted about time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import missing
from lab.topology import PYTHON, SERVER4, Lab, lab_config, policy

from .conftest import Running

pytestmark = pytest.mark.e2e

METRICS_PORT, PROMETHEUS_PORT = 9826, 9090
WAIT = 60.0  # only reached when something is broken

QUERY = """\
import json, sys, urllib.parse, urllib.request
url = "http://127.0.0.1:%d/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[1]})
try:
    with urllib.request.urlopen(url, timeout=5) as r:
        print(r.read().decode())
except OSError as exc:
    print(json.dumps({"status": "down", "error": str(exc)}))
""" % PROMETHEUS_PORT


def config(settings: str = "") -> str:
    """Uplinks named after their ISPs; ssh prefers isp2."""
    text = lab_config(policy("ssh", ["wan2", "wan1"], proto="tcp", dport=[22]),
                      settings=f'metrics = "127.0.0.1:{METRICS_PORT}"\n{settings}')
    return text.replace("wan1", "isp1").replace("wan2", "isp2")


def query(lab: Lab, expr: str) -> list[dict[str, Any]]:
    out = json.loads(lab.sh("host", PYTHON, "-c", QUERY, expr))
    if out.get("status") != "success":
        return []
    result: list[dict[str, Any]] = out["data"]["result"]
    return result


def value(lab: Lab, expr: str) -> float | None:
    result = query(lab, expr)
    return float(result[0]["value"][1]) if result else None


def until(what: str, cond: Callable[[], bool], deadline: float = WAIT) -> None:
    end = time.monotonic() + deadline
    while not cond():
        assert time.monotonic() < end, f"not within {deadline}s: {what}"
        time.sleep(0.2)


@pytest.fixture
def prometheus(lab: Lab) -> Any:
    binary = shutil.which("prometheus")
    if binary is None:
        missing("needs prometheus (Debian package prometheus; scripts/install-deps --test)")
    workdir = tempfile.mkdtemp(prefix="mrprom-")
    with open(os.path.join(workdir, "prometheus.yml"), "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                "scrape_configs:\n  - job_name: markrouted\n"
                f"    static_configs:\n      - targets: ['127.0.0.1:{METRICS_PORT}']\n")
    proc = lab.popen("host", str(binary), f"--config.file={workdir}/prometheus.yml",
                     f"--storage.tsdb.path={workdir}/data", f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lab.wait_listening("host", PROMETHEUS_PORT, deadline=WAIT)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def test_prometheus_sees_the_uplink_fail_and_the_policy_count(
        lab: Lab, daemon: Callable[[str], Running], prometheus: Any) -> None:
    d = daemon(config())
    d.wait_state("isp2", "up")
    until("Prometheus to store markrouted_uplink_up{uplink=\"isp2\"} 1",
          lambda: value(lab, 'markrouted_uplink_up{uplink="isp2"}') == 1)
    until("a first ssh count", lambda: value(lab, 'markrouted_policy_packets_total{policy="ssh"}') is not None)
    start = value(lab, 'markrouted_policy_packets_total{policy="ssh"}')
    assert start is not None
    peers = lab.connect_many("host", SERVER4, 22, 5)
    assert all(peers), peers
    until("the ssh count to grow by the 5 connections",
          lambda: (value(lab, 'markrouted_policy_packets_total{policy="ssh"}') or 0) >= start + 5)

    lab.cut_line("isp2")
    d.wait_state("isp2", "down")
    until("Prometheus to store markrouted_uplink_up{uplink=\"isp2\"} 0",
          lambda: value(lab, 'markrouted_uplink_up{uplink="isp2"}') == 0)
    until("the transition to be counted",
          lambda: value(lab, 'markrouted_uplink_transitions_total{uplink="isp2",to="down"}') == 1)
    assert value(lab, 'markrouted_policy_uplink{policy="ssh",uplink="isp1"}') == 1
    assert value(lab, "markrouted_in_sync") == 1


RECORD = """#!/usr/bin/python3
import json, os, sys
line = {"stdin": json.load(sys.stdin),
        "env": {k: v for k, v in os.environ.items() if k.startswith("MARKROUTED_")}}
with open(%r, "a") as f:
    f.write(json.dumps(line) + "\\n")
"""


def test_a_hook_records_failover_and_failback_in_order(
        lab: Lab, daemon: Callable[[str], Running], tmp_path: Any) -> None:
    hooks = tmp_path / "hooks.d"
    hooks.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    out = tmp_path / "events"
    hook = hooks / "record"
    hook.write_text(RECORD % str(out))
    hook.chmod(0o755)
    d = daemon(config(f'hooks = "{hooks}"\n'))
    d.wait_state("isp2", "up")
    lab.cut_line("isp2")
    d.wait_state("isp2", "down")
    lab.restore_line("isp2")
    d.wait_state("isp2", "up")

    def uplink_events() -> list[dict[str, Any]]:
        if not out.exists():
            return []
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        return [x for x in lines if x["env"]["MARKROUTED_UPLINK"] == "isp2"]

    until("both transitions to reach the hook", lambda: len(uplink_events()) >= 2)
    got = uplink_events()
    assert [(e["env"]["MARKROUTED_EVENT"], e["env"]["MARKROUTED_STATE"]) for e in got] == [
        ("uplink-down", "down"), ("uplink-up", "up")]
    assert got[0]["env"]["MARKROUTED_REASON"] == got[0]["stdin"]["reason"] != ""
    assert all(e["stdin"]["uplink"] == "isp2" and e["stdin"]["event"] == e["env"]["MARKROUTED_EVENT"] for e in got)
    moves = [json.loads(x) for x in out.read_text().splitlines()]
    moved = [(e["env"]["MARKROUTED_POLICY"], e["env"]["MARKROUTED_FROM"], e["env"]["MARKROUTED_TO"])
             for e in moves if e["env"]["MARKROUTED_EVENT"] == "policy-moved"]
    # away from isp2, then back; a line coming back family by family (IPv4 before its
    # IPv6 address) may pass through a split ("isp2,isp1"): every step follows the last
    assert moved[0] == ("ssh", "isp2", "isp1") and moved[-1][2] == "isp2", moved
    assert all(a[2] == b[1] for a, b in zip(moved, moved[1:])), moved
    assert any("hook done" in line and "hook=record" in line for line in d.lines), d.output()
