"""Sticky sources with real traffic: ``sticky = "source"`` on a balanced tier.

Forty LAN addresses of the client (192.0.2.100-139) open ten connections
each to the server, one source after another, through the host's policy
``uplinks = [{ wan1 = 1, wan2 = 1 }]`` with ``sticky = "source"``:

* every address is seen by the server under one uplink address only (with
  ``sticky = "flow"`` each of its ten flows would pick anew: an address on
  one uplink only would then have probability 2 / 2^10);
* the addresses split between the uplinks by the weights: over 40 addresses
  each on isp1 with p = 1/2 the count is binomial, mean 20, sigma ~ 3.16;
  the test accepts 20 +/- 4 sigma, [8, 32];
* isp1 then stops forwarding (its line stays up) and the daemon's health
  check takes wan1 down: a failover that refills the small chains only, so
  the sets keep their entries, and the test checks that those pointing at
  wan1 are still there. Every address now leaves by isp2: an entry naming a
  dead uplink is not obeyed.

The sets are filled by the packet path: the 400 connections cause no pass
of the daemon (nf_tables bumps its generation, which the daemon watches, only
for transactions, never for elements a rule adds).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

import pytest

from lab.topology import PYTHON, SERVER4, Lab, lab_config, policy, which_isp
from tests.e2e.conftest import start_daemon
from tests.health.conftest import check, cut

pytestmark = pytest.mark.e2e

SOURCES = [f"192.0.2.{100 + i}" for i in range(40)]
PER_SOURCE = 10
SIGMA = math.sqrt(len(SOURCES) * 0.25)
LOW, HIGH = math.ceil(20 - 4 * SIGMA), math.floor(20 + 4 * SIGMA)

#: run in the client: PER_SOURCE connections from each source, one JSON map source -> peers
CLIENT = """
import json, socket, sys
sources, server, count = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out, failures = {}, 0
for src in sources:
    peers = []
    for _ in range(count):
        if failures >= 3:  # a broken path fails the test in seconds
            peers.append("-")
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.bind((src, 0))
            s.connect((server, 443))
            peers.append(s.makefile().readline().strip() or "-")
        except OSError:
            peers.append("-")
        finally:
            s.close()
        failures += peers[-1] == "-"
    out[src] = peers
print(json.dumps(out))
"""


def seen(lab: Lab) -> dict[str, set[str | None]]:
    out = lab.sh("client", PYTHON, "-c", CLIENT, json.dumps(SOURCES), SERVER4, str(PER_SOURCE), timeout=300)
    peers: dict[str, list[str]] = json.loads(out)
    assert all("-" not in p for p in peers.values()), f"failed connections: {peers}"
    return {src: {which_isp(p) for p in ps} for src, ps in peers.items()}


def sticky_entries(lab: Lab, name: str) -> set[str]:
    data = json.loads(lab.sh("host", "nft", "-j", "list", "set", "inet", "markrouted", name))
    for item in data["nftables"]:
        if "set" in item:
            return {e["elem"]["val"] if isinstance(e, dict) else e for e in item["set"].get("elem", [])}
    return set()


def test_each_source_keeps_one_uplink_and_a_failover_moves_them_all(lab: Lab, write_config: Callable[..., str]) -> None:
    assert (LOW, HIGH) == (8, 32)
    for src in SOURCES:
        lab.ip("client", "addr", "add", f"{src}/24", "dev", "eth0")
    config = lab_config(policy("web", proto="tcp", dport=[443], uplinks=[{"wan1": 1, "wan2": 1}], sticky="source"),
                        wan1=check([SERVER4], down_after=2, up_after=1))
    daemon = start_daemon(lab, write_config(config))
    daemon.wait_verdict("wan1")

    passes = daemon.status()["passes"]
    first = seen(lab)
    # the packet path filled the sets: 400 new flows, no pass of the daemon
    assert daemon.status()["passes"] == passes
    mixed = {src: isps for src, isps in first.items() if len(isps) != 1}
    assert not mixed, f"sources seen under more than one uplink: {mixed}"
    on_isp1 = sum(1 for isps in first.values() if isps == {"isp1"})
    assert all(isps <= {"isp1", "isp2"} for isps in first.values())
    assert LOW <= on_isp1 <= HIGH, f"{on_isp1} of {len(SOURCES)} sources on isp1: not 1:1 within 4 sigma"

    on_wan1 = {src for src, isps in first.items() if isps == {"isp1"}}
    assert sticky_entries(lab, "sticky_0_wan1_4") == on_wan1

    cut(lab, "isp1")
    daemon.wait_state("wan1", "down")
    assert sticky_entries(lab, "sticky_0_wan1_4") == on_wan1, "the failover forgot the sources"
    after = seen(lab)
    assert all(isps == {"isp2"} for isps in after.values()), after
    assert daemon.stop() == 0


def test_a_silent_source_is_forgotten_after_sticky_timeout(lab: Lab, apply: Callable[..., str]) -> None:
    """After ``sticky_timeout`` without a new connection an address's entry is gone: it may move.

    Polled with a deadline: the kernel's set garbage collector removes an
    expired element some time after it expired (it is not obeyed from then on).
    """
    sources = SOURCES[:5]
    for src in sources:
        lab.ip("client", "addr", "add", f"{src}/24", "dev", "eth0")
    apply(policy("web", proto="tcp", dport=[443], uplinks=[{"wan1": 1, "wan2": 1}], sticky="source",
                 sticky_timeout="1s"))
    out = lab.sh("client", PYTHON, "-c", CLIENT, json.dumps(sources), SERVER4, "2", timeout=120)
    assert all("-" not in p for p in json.loads(out).values())
    remembered = sticky_entries(lab, "sticky_0_wan1_4") | sticky_entries(lab, "sticky_0_wan2_4")
    assert remembered == set(sources)
    end = time.monotonic() + 15
    while remembered and time.monotonic() < end:
        time.sleep(0.2)
        remembered = sticky_entries(lab, "sticky_0_wan1_4") | sticky_entries(lab, "sticky_0_wan2_4")
    assert not remembered, f"still remembered after the timeout: {remembered}"
