"""Failover tiers with real traffic: ``uplinks = [{ wan1 = 1, wan2 = 1 }, "wan3"]``.

New connections from the host and from the LAN client to the server split
between isp1 and isp2 while both live. Over N = 200 connections each carried
by isp1 with p = 1/2 the isp1 count is binomial: mean 100, sigma = sqrt(N p
(1-p)) ~ 7.07; the test accepts 100 +/- 4 sigma, i.e. [72, 128], and nothing
by isp3. Then isp1's line goes down: everything by isp2; both down: everything
by isp3 (the last tier); isp1 back: split again between isp1 and isp2 (isp2
still down), so every flow by isp1, and after isp2 is back the split again.

The suite re-applies after every change (see conftest): the test is about
where packets go for each kernel state; the daemon's speed is bench/'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lab.topology import SERVER4, SERVER6, Lab, policy, which_isp

N = 200
SIGMA = math.sqrt(N * 0.25)
LOW, HIGH = math.ceil(N / 2 - 4 * SIGMA), math.floor(N / 2 + 4 * SIGMA)
TIERS = [{"wan1": 1, "wan2": 1}, "wan3"]


def carriers(lab: Lab, role: str, server: str, count: int) -> dict[str, int]:
    peers = lab.connect_many(role, server, 443, count)
    assert None not in peers, f"{peers.count(None)} of {count} connections failed"
    out: dict[str, int] = {}
    for peer in peers:
        isp = which_isp(peer) or "-"
        out[isp] = out.get(isp, 0) + 1
    return out


def test_tiers_split_then_fail_over_tier_by_tier(lab3: Lab, apply3: Callable[..., str]) -> None:
    assert (LOW, HIGH) == (72, 128)
    path = apply3(policy("web", proto="tcp", dport=[443], uplinks=TIERS))

    for role, server in (("host", SERVER4), ("client", SERVER4), ("host", SERVER6)):
        split = carriers(lab3, role, server, N)
        assert set(split) <= {"isp1", "isp2"}, f"{role} -> {server}: {split}"
        assert LOW <= split.get("isp1", 0) <= HIGH, f"{role} -> {server}: {split} is not 1:1 within 4 sigma"

    lab3.cut_line("isp1")
    apply3(path=path)
    assert carriers(lab3, "client", SERVER4, 20) == {"isp2": 20}
    assert carriers(lab3, "host", SERVER6, 20) == {"isp2": 20}

    lab3.cut_line("isp2")
    apply3(path=path)
    assert carriers(lab3, "client", SERVER4, 20) == {"isp3": 20}
    assert carriers(lab3, "host", SERVER6, 20) == {"isp3": 20}

    lab3.restore_line("isp1")
    apply3(path=path)
    assert carriers(lab3, "client", SERVER4, 20) == {"isp1": 20}

    lab3.restore_line("isp2")
    apply3(path=path)
    split = carriers(lab3, "client", SERVER4, N)
    assert set(split) <= {"isp1", "isp2"} and LOW <= split.get("isp1", 0) <= HIGH, split
