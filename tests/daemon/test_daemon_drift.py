"""Someone else removes or alters what markrouted owns: the daemon puts it back at once.

``resync = 1h``: the repair must come from the rtnetlink or nf_tables event,
well before any periodic resync could explain it. Each repair is logged as
"drift repaired". The overflow test loses the events on purpose and checks
that the daemon notices the loss and re-reads everything.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable

import pytest
from .daemon_harness import CONVERGE, Daemon, TwoUplinks, config_text

Start = Callable[..., Daemon]

#: A repair comes from the event within milliseconds; the resync interval is an hour.
REPAIR = CONVERGE

WAN2_FWMARK = ("priority", "10100", "fwmark", "0x20000/0xff0000", "lookup", "102")

DRIFTS: dict[str, Callable[[TwoUplinks], None]] = {
    "ip rule del": lambda net: net.host.ip("rule", "del", *WAN2_FWMARK),
    "ip -6 rule del": lambda net: net.host.ip("-6", "rule", "del", *WAN2_FWMARK),
    "ip rule del source rule": lambda net: net.host.ip("rule", "del", "priority", "10200", "from", "203.0.113.2",
                                                      "lookup", "102"),
    "ip route flush table": lambda net: net.host.ip("route", "flush", "table", "102"),
    "ip -6 route flush table": lambda net: net.host.ip("-6", "route", "flush", "table", "102"),
    "nft flush ruleset": lambda net: net.host.sh("nft", "flush", "ruleset"),
    # a firewall reload: its script starts with "flush ruleset" and loads its own table
    "firewall reload": lambda net: net.host.sh("nft", "-f", "-", input="flush ruleset\ntable inet other {}\n"),
    "nft delete table": lambda net: net.host.sh("nft", "delete", "table", "inet", "markrouted"),
    "nft flush chain": lambda net: net.host.sh("nft", "flush", "chain", "inet", "markrouted", "pick_0"),
    "nft rule added": lambda net: net.host.sh("nft", "insert", "rule", "inet", "markrouted", "output", "accept"),
}


def test_every_kind_of_drift_is_repaired_from_its_event(net: TwoUplinks, start: Start) -> None:
    d = start(net, config_text())
    # a foreign nft table and a foreign rule must survive every repair
    net.host.ip("rule", "add", "priority", "500", "fwmark", "0x4000/0x4000", "lookup", "200")
    expected = net.owned_snapshot()
    for name, drift in DRIFTS.items():
        before = len(d.lines("drift repaired"))
        drift(net)  # fails if there was nothing to remove; the repair is often done before we could look
        d.wait(lambda: net.owned_snapshot() == expected, f"{name}: owned state put back", REPAIR)
        d.wait(lambda: len(d.lines("drift repaired")) > before, f"{name}: a 'drift repaired' log line", REPAIR)
        assert d.status()["in_sync"], d.context()  # type: ignore[index]
    assert "table inet other" in net.host.sh("nft", "list", "tables")  # from the firewall reload
    assert "lookup 200" in net.host.ip("rule", "show", "priority", "500")
    assert d.proc.poll() is None


def test_netlink_overflow_reopens_the_socket_and_resyncs(net: TwoUplinks, start: Start) -> None:
    """ENOBUFS: the lost events are made up for by re-reading everything.

    The daemon is stopped while a flood of route events (in a table it does not
    care about: the socket overflows whatever the filter) fills its queue, and
    an owned rule is deleted after the queue is full, so that rule's event is
    among the lost ones: only the overflow's resync can put it back.
    """
    d = start(net, config_text())
    expected = net.owned_snapshot()
    batch = "".join(f"route add blackhole 198.18.{i // 256}.{i % 256}/32 table 5000\n" for i in range(20000))
    d.send(signal.SIGSTOP)
    try:
        subprocess.run([*net.host.nsenter(), "ip", "-batch", "-"], input=batch, text=True, check=True)
        net.host.ip("route", "flush", "table", "5000")
        net.host.ip("rule", "del", *WAN2_FWMARK)
    finally:
        d.send(signal.SIGCONT)
    d.wait(lambda: net.owned_snapshot() == expected, "the lost rule to be put back by the resync", REPAIR)
    assert d.lines("netlink overflow"), d.context()
    # the reopened socket hears the next event
    before = len(d.lines("drift repaired"))
    net.host.ip("-6", "rule", "del", *WAN2_FWMARK)
    d.wait(lambda: net.owned_snapshot() == expected and len(d.lines("drift repaired")) > before,
           "a repair after the overflow", REPAIR)


@pytest.mark.parametrize("what", ["rule", "route"])
def test_foreign_objects_in_the_owned_ranges_are_left_alone(net: TwoUplinks, start: Start, what: str) -> None:
    """Ownership is positive: an untagged rule in the priority range, or an
    untagged route in an uplink table, wakes the daemon but is never removed."""
    d = start(net, config_text())
    if what == "rule":
        net.host.ip("rule", "add", "priority", "10150", "fwmark", "0x4000/0x4000", "lookup", "300")
    else:
        net.host.ip("route", "add", "198.18.5.0/24", "via", "203.0.113.1", "dev", "eth1", "table", "102")
    before = len(d.lines("drift repaired"))
    net.host.ip("rule", "del", *WAN2_FWMARK)  # an owned one goes too: a pass must run
    d.wait(lambda: len(d.lines("drift repaired")) > before, "the repair pass")
    d.wait(lambda: d.status()["in_sync"], "in sync")  # type: ignore[index]
    if what == "rule":
        assert "lookup 300" in net.host.ip("rule", "show", "priority", "10150")
    else:
        assert "198.18.5.0/24" in net.host.ip("route", "show", "table", "102")
