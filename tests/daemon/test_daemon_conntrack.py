"""Failover clears the conntrack entries pinned to the dead uplink, and only those.

Real flows carry the marks markrouted's own nft rules gave them (an outgoing
ssh connection classified onto wan2, an incoming connection on wan1); crafted
entries carry marks that a sloppy implementation would get wrong: wan2's value
with foreign bits beside it (must go), wan2's value *outside* the mask or
another uplink's value with foreign bits (must stay), and IPv6 alike.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest
from .daemon_harness import AGENT, MASK, WAN1_MARK, WAN2_MARK, Daemon, TwoUplinks, config_text
from lab.topology import PYTHON

Start = Callable[..., Daemon]

# sport -> ct mark of the crafted UDP entries (192.0.2.50 -> 192.0.2.60:2000, or v6)
CRAFTED4 = {1001: 0x01020000, 1002: 0x00020001, 1003: 0x00000002, 1004: 0x02010000, 1005: 0}
CRAFTED6 = {1101: WAN2_MARK, 1102: WAN1_MARK}


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _agent(procs: list[subprocess.Popen[str]], nsenter: list[str], *args: str) -> subprocess.Popen[str]:
    """lab/agent.py in a namespace; killed at the end of the test."""
    proc = subprocess.Popen([*nsenter, PYTHON, AGENT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    return proc


def _listening(net: TwoUplinks, where: str, port: int) -> bool:
    ns = net.peer if where == "peer" else net.host
    return bool(ns.sh("ss", "-Htln", f"sport = :{port}").strip())


def test_uplink_down_clears_only_its_conntrack_entries(net: TwoUplinks, start: Start,
                                                       agents: list[subprocess.Popen[str]]) -> None:
    d = start(net, config_text())
    _agent(agents, net.peer.nsenter(), "serve", "22")
    _agent(agents, net.host.nsenter(), "serve", "2222")
    d.wait(lambda: _listening(net, "peer", 22) and _listening(net, "host", 2222), "the listeners")

    # an ssh connection from the host: policy ssh puts it on wan2
    out = _agent(agents, net.host.nsenter(), "hold", "203.0.113.1", "22", "3")
    assert out.stdout is not None and out.stdout.readline().split()[0] == "203.0.113.2"
    # a connection coming in on wan1 is pinned to wan1
    inbound = _agent(agents, net.peer.nsenter(), "hold", "198.51.100.2", "2222", "3")
    assert inbound.stdout is not None and inbound.stdout.readline().split()[0] == "198.51.100.1"
    for sport, mark in CRAFTED4.items():
        net.host.sh("conntrack", "-I", "-p", "udp", "-s", "192.0.2.50", "-d", "192.0.2.60", "--sport", str(sport),
                    "--dport", "2000", "-t", "300", "-m", str(mark))
    for sport, mark in CRAFTED6.items():
        net.host.sh("conntrack", "-I", "-p", "udp", "-s", "2001:db8:c::50", "-d", "2001:db8:c::60",
                    "--sport", str(sport), "--dport", "2000", "-t", "300", "-m", str(mark))

    def entries() -> dict[str, int]:
        """flow name -> ct mark"""
        out = {}
        for e in net.conntrack():
            if e["proto"] == "tcp" and e.get("dport") == "22":
                out["ssh via wan2"] = e["mark"]
            elif e["proto"] == "tcp" and e.get("dport") == "2222":
                out["inbound on wan1"] = e["mark"]
            elif e["proto"] == "udp" and e.get("dport") == "2000":
                out[f"crafted {e['sport']}"] = e["mark"]
        return out

    before = entries()
    assert before.get("ssh via wan2") == WAN2_MARK, before
    assert before.get("inbound on wan1") == WAN1_MARK, before
    assert len(before) == 2 + len(CRAFTED4) + len(CRAFTED6), before
    doomed = {name for name, mark in before.items() if mark & MASK == WAN2_MARK}
    assert doomed == {"ssh via wan2", "crafted 1001", "crafted 1002", "crafted 1101"}

    net.peer.ip("link", "set", "p1", "down")
    d.wait_uplink("wan2", "down", "no carrier")
    d.wait(lambda: not any(m & MASK == WAN2_MARK for m in entries().values()),
           "every entry with wan2's mark to be deleted")
    after = entries()
    assert after == {name: mark for name, mark in before.items() if name not in doomed}, after
    assert d.lines("conntrack cleared")
