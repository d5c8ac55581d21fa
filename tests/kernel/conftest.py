"""The kernel tier's host: two uplinks with carrier, in namespaces of the test's own.

::

    host ──wan1── isp   198.51.100.2/24  2001:db8:1::2/64  (gateways .1 / ::1)
         └─wan2── isp   203.0.113.2/24   2001:db8:2::2/64

``host`` is where markrouted runs (the real CLI, ``python3 -m markrouted``,
entered with nsenter); the veth peers sit in a second namespace so both links
have a carrier. The main table holds a default route via each uplink (metric
100 and 200, v4 and v6), as two DHCP clients would install them. Unlike the
lab of the end-to-end tier there is no server and no traffic: everything here
is read back from the kernel with ``ip -j`` and ``nft -j``.

Every test gets fresh namespaces; the fixture removes them (and the config
directory) even when the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from .kernelhost import (
    WAN1_ADDR,
    WAN1_ADDR6,
    WAN1_GW,
    WAN1_GW6,
    WAN2_ADDR,
    WAN2_ADDR6,
    WAN2_GW,
    WAN2_GW6,
    Host,
    Monitor,
    batch,
    wait_carrier,
)


@pytest.fixture
def host(netns: Any) -> Iterator[Host]:
    """A fresh two-uplink host (``netns``) and its ISP side (a second namespace)."""
    isp = type(netns)()  # the same kind of namespace as the shared fixture's
    confdir = tempfile.mkdtemp(prefix="mrkernel-")
    os.chmod(confdir, 0o755)
    try:
        for ns in (netns, isp):
            # no duplicate address detection: addresses are usable at once
            ns.sh("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        for i in (1, 2):
            subprocess.run(["ip", "link", "add", f"wan{i}", "netns", netns.name, "type", "veth", "peer",
                            "name", f"isp{i}", "netns", isp.name], check=True, capture_output=True)
        batch(netns.name, [], [
            f"addr add {WAN1_ADDR}/24 dev wan1",
            f"addr add {WAN1_ADDR6}/64 dev wan1 nodad",
            f"addr add {WAN2_ADDR}/24 dev wan2",
            f"addr add {WAN2_ADDR6}/64 dev wan2 nodad",
            "link set wan1 up",
            "link set wan2 up",
        ])
        batch(isp.name, [], [
            f"addr add {WAN1_GW}/24 dev isp1",
            f"addr add {WAN1_GW6}/64 dev isp1 nodad",
            f"addr add {WAN2_GW}/24 dev isp2",
            f"addr add {WAN2_GW6}/64 dev isp2 nodad",
            "link set isp1 up",
            "link set isp2 up",
        ])
        batch(netns.name, [], [
            f"route add default via {WAN1_GW} dev wan1 metric 100",
            f"route add default via {WAN2_GW} dev wan2 metric 200",
        ])
        batch(netns.name, ["-6"], [
            f"route add default via {WAN1_GW6} dev wan1 metric 100",
            f"route add default via {WAN2_GW6} dev wan2 metric 200",
        ])
        wait_carrier(netns, ("wan1", "wan2"))
        yield Host(netns, isp, confdir)
    finally:
        isp.delete()
        shutil.rmtree(confdir, ignore_errors=True)


@pytest.fixture
def monitor(host: Host) -> Iterator[Monitor]:
    mon = Monitor(host)
    try:
        yield mon
    finally:
        mon.close()
