"""``fallback``: what a policy's traffic does when none of its uplinks is usable.

``fallback = "drop"`` is a kill switch: traffic that must only ever leave by
uplink 2 (say, to a partner who only accepts isp2's address range) is
dropped while uplink 2 is down, and never leaks out of the main table's
default route through isp1. ``fallback = "main"`` lets it flow normally.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lab.topology import SERVERS, Lab, customer, policy

pytestmark = pytest.mark.e2e

FAIL_FAST = 1.5


def test_fallback_drop_is_a_kill_switch_and_main_flows_normally(lab: Lab, apply: Callable[..., str]) -> None:
    """Uplink 2 cut: port 2222 (drop) dies without reaching the server, 8080 (main) leaves by isp1.

    Both policies list only wan2. While it is up, both leave by isp2. With the
    host's eth1 down (then ``apply``, as the daemon does on the link event),
    the kill-switch policy's connections fail and the server saw no
    connection attempt on port 2222 through either ISP; the other policy's
    connections arrive through isp1. With the line back, both return to isp2.
    """
    path = apply(
        policy("partner-only", ["wan2"], proto="tcp", dport=[2222], fallback="drop"),
        policy("prefer-isp2", ["wan2"], proto="tcp", dport=[8080], fallback="main"),
    )
    for server in SERVERS:
        assert lab.connect("host", server, 2222) == customer("isp2", server)
        assert lab.connect("host", server, 8080) == customer("isp2", server)

    lab.cut_line("isp2")
    apply(path=path)
    syns = {isp: lab.syns(isp, 2222) for isp in ("isp1", "isp2")}
    attempts = [("host", server, port) for port in (2222, 8080) for server in SERVERS]
    seen = dict(zip(((a[1], a[2]) for a in attempts), lab.connect_all(attempts, timeout=FAIL_FAST)))
    for server in SERVERS:
        assert seen[(server, 2222)] is None, "the kill switch leaked"
        assert seen[(server, 8080)] == customer("isp1", server)
    assert {isp: lab.syns(isp, 2222) for isp in ("isp1", "isp2")} == syns, "a kill-switched SYN reached the server"

    lab.restore_line("isp2")
    lab.wait_links_ready()
    apply(path=path)
    for server in SERVERS:
        assert lab.connect("host", server, 2222) == customer("isp2", server)
        assert lab.connect("host", server, 8080) == customer("isp2", server)
