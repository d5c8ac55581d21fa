"""Other software's fwmark bits survive markrouted's marking.

Another nftables table on the host, ``inet other`` (think Kubernetes'
0x4000), sets bit 0x4000 on the SSH traffic before markrouted's chains run
(priority -200, markrouted's are at -150): in output for what the host
sends, in prerouting for what the LAN client sends and for the replies
coming back. Its own counters, at the end of the path (postrouting, input,
priority 300), count those packets with and without the bit still set, and
with markrouted's uplink-2 value in the mark. Every packet must still carry
0x4000, and markrouted's routing must hold (port 22 by isp2).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lab.topology import SERVERS, Lab, customer, policy

pytestmark = pytest.mark.e2e

OTHER = """
table inet other {
  counter out_all {}
  counter out_bit {}
  counter out_wan2 {}
  counter in_all {}
  counter in_bit {}
  chain out {
    type route hook output priority -200; policy accept;
    tcp dport 22 meta mark set meta mark | 0x00004000
  }
  chain pre {
    type filter hook prerouting priority -200; policy accept;
    tcp sport 22 meta mark set meta mark | 0x00004000
    iifname "lan0" tcp dport 22 meta mark set meta mark | 0x00004000
  }
  chain post {
    type filter hook postrouting priority 300; policy accept;
    tcp dport 22 counter name out_all
    tcp dport 22 meta mark & 0x00004000 == 0x00004000 counter name out_bit
    tcp dport 22 meta mark & 0x00ff0000 == 0x00020000 counter name out_wan2
    tcp sport 22 counter name in_all
    tcp sport 22 meta mark & 0x00004000 == 0x00004000 counter name in_bit
  }
  chain inp {
    type filter hook input priority 300; policy accept;
    tcp sport 22 counter name in_all
    tcp sport 22 meta mark & 0x00004000 == 0x00004000 counter name in_bit
  }
}
"""


def test_foreign_mark_bits_survive_and_routing_holds(lab: Lab, apply: Callable[..., str]) -> None:
    """Every SSH packet, out and back, local and forwarded, keeps 0x4000; port 22 still goes by isp2."""
    lab.nft("host", OTHER)
    apply(policy("ssh", ["wan2", "wan1"], proto="tcp", dport=[22]))
    for role in ("host", "client"):
        for server in SERVERS:
            assert lab.connect(role, server, 22) == customer("isp2", server), f"{role} -> {server}"

    # every packet of the four connections has crossed the host; then one reading of all counters
    lab.wait_closed(("host", "client"), 22)
    count = lab.counters("host", "other")
    # 4 connections, each at least SYN, ACK, FIN out and SYN-ACK, data, FIN back,
    # however TCP merges its ACKs: the floor shows the counters see the traffic
    assert count["out_all"] >= 12 and count["in_all"] >= 12, count
    assert count["out_bit"] == count["out_all"], f"markrouted cleared another table's mark bit on the way out: {count}"
    assert count["in_bit"] == count["in_all"], f"markrouted cleared another table's mark bit on the replies: {count}"
    assert count["out_wan2"] == count["out_all"], f"markrouted's own mark is missing beside the foreign bit: {count}"
