"""Bypass policies with real traffic: ``action = "main"`` and ``action = "drop"``.

The host's main table sends the server's traffic by isp1 (metric 100). A
catch-all policy, last in the file, puts everything on wan2 (isp2). Before
it, ``vpn`` (``action = "main"``, the server's port 8080: traffic that must
never be policy-routed, as to a VPN concentrator) and ``blocked``
(``action = "drop"``, port 2222). From the host and from the LAN client:

* port 8080 leaves by isp1, the main table's choice: the catch-all never saw
  it (with the bypass removed, the same connection goes by isp2); its
  replies come back, so the connection completes;
* port 80 is the catch-all's: isp2;
* port 2222 never reaches the server by any ISP (its SYN counters stay 0).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lab.topology import SERVER4, SERVER6, Lab, policy, which_isp

pytestmark = pytest.mark.e2e

CATCH_ALL = policy("everything", ["wan2"])


@pytest.mark.parametrize("server", (SERVER4, SERVER6), ids=["ipv4", "ipv6"])
def test_an_earlier_bypass_is_not_caught_by_a_later_catch_all(lab: Lab, apply: Callable[..., str],
                                                              server: str) -> None:
    apply(policy("vpn", proto="tcp", dport=[8080], action="main"),
          policy("blocked", proto="tcp", dport=[2222], action="drop"),
          CATCH_ALL)
    for role in ("host", "client"):
        assert which_isp(lab.connect(role, server, 8080)) == "isp1", role
        assert which_isp(lab.connect(role, server, 80)) == "isp2", role
        assert lab.connect(role, server, 2222, timeout=1.0) is None, role
    assert lab.syns("isp1", 2222) == 0 and lab.syns("isp2", 2222) == 0

    # the same traffic without the bypass: the catch-all takes it
    apply(CATCH_ALL)
    assert which_isp(lab.connect("client", server, 8080)) == "isp2"
