"""``balance``: new flows split by weight, every flow stays on its uplink.

The policy ``balance = { wan1 = 3, wan2 = 1 }`` on TCP 443. Over N = 300 new
connections per family, each independently carried by isp1 with p = 3/4, the
isp1 count is binomial: mean 225, sigma = sqrt(N p (1-p)) = 7.5. The test
accepts 225 +/- 4 sigma, i.e. [195, 255]; a correct implementation fails it
with probability about 6e-5 per family, while an unbalanced one (all on one
uplink, or 1:1 with mean 150) is far outside.

Stickiness is shown twice. Every one of the 300 connections must complete
its handshake and get the server's answer: a flow whose packets were spread
over both uplinks would reach the server under two source addresses and be
reset. And a long-lived connection opened before the burst keeps echoing
between the batches; the server counts its packets per ISP, and not one of
them arrives through the ISP other than the one whose address the server saw
when it was opened.

How many packets the flow sends is TCP's business (delayed and piggybacked
ACKs vary with the machine's speed), so the test asserts no count of them
beyond the one the echo itself implies: each line is sent only after the
previous echo came back, so each is at least one segment of its own through
the carrier. That floor proves the counters see the flow at all, so the
zero on the other ISP means something.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from lab.topology import SERVERS, Lab, customer, policy, which_isp

pytestmark = pytest.mark.e2e

N = 300
P_WAN1 = 3 / 4
SIGMA = math.sqrt(N * P_WAN1 * (1 - P_WAN1))
LOW, HIGH = math.ceil(N * P_WAN1 - 4 * SIGMA), math.floor(N * P_WAN1 + 4 * SIGMA)
BATCHES = 6


def watch_flow(lab: Lab, port: int) -> None:
    """Count, on the server, the packets of the connection from local ``port`` per ISP."""
    lab.nft("server", (
        "table inet held {\n  counter isp1 {}\n  counter isp2 {}\n"
        "  chain input { type filter hook input priority 0; policy accept;\n"
        f'    iifname "isp1" tcp dport 443 tcp sport {port} counter name isp1\n'
        f'    iifname "isp2" tcp dport 443 tcp sport {port} counter name isp2\n'
        "  }\n}\n"))


@pytest.mark.parametrize("server", SERVERS, ids=["ipv4", "ipv6"])
def test_balance_splits_new_flows_by_weight_and_never_moves_a_flow(
    lab: Lab, apply: Callable[..., str], server: str
) -> None:
    """300 new connections split 3:1 within 4 sigma; a long-lived one keeps its uplink."""
    assert (LOW, HIGH) == (195, 255)
    apply(policy("web", proto="tcp", dport=[443], balance={"wan1": 3, "wan2": 1}))

    held = lab.hold("host", server, 443)
    watch_flow(lab, held.port)
    peers: list[str | None] = []
    for batch in range(BATCHES):
        new = lab.connect_many("host", server, 443, N // BATCHES)
        assert None not in new, f"{new.count(None)} of {len(new)} connections failed in batch {batch}"
        peers += new
        assert held.echo(f"still here {batch}") == f"still here {batch}", f"the long-lived flow broke in batch {batch}"
    held.close()

    assert len(peers) == N
    counts = {isp: peers.count(customer(isp, server)) for isp in ("isp1", "isp2")}
    assert counts["isp1"] + counts["isp2"] == N, f"unexpected peers: {set(peers)}"
    assert LOW <= counts["isp1"] <= HIGH, f"split {counts} is not 3:1 within 4 sigma"

    carrier = which_isp(held.peer)
    other = "isp2" if carrier == "isp1" else "isp1"
    assert carrier in ("isp1", "isp2")
    assert lab.counter("server", "held", carrier) >= BATCHES, "the counters do not see the long-lived flow"
    assert lab.counter("server", "held", other) == 0, "the long-lived flow changed uplink mid-stream"
