"""The daemon never imports pyroute2: its memory is its own (bench/daemon.py measures it).

pyroute2's package loads hundreds of modules whatever one imports from it
(about 11 MB of a daemon's RSS). The daemon reads, writes and clears
conntrack with markrouted's own netlink messages; this test runs it through
every kind of kernel write it makes (the first pass's rule adds and route
replaces, a drift repair, a failover's route changes and conntrack clear,
the flush on stop) with Python's own import log switched on
(PYTHONPROFILEIMPORTTIME, written to the daemon's output as each module
loads, lazily imported ones included) and reads the log afterwards.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable

import pytest
from .daemon_harness import MASK, WAN2_MARK, Daemon, TwoUplinks, config_text

Start = Callable[..., Daemon]

IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.M)


def test_daemon_writes_without_pyroute2(net: TwoUplinks, start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    d = start(net, config_text())  # the first pass: every rule added, every route replaced
    assert d.writes() > 0, d.context()

    # a drift repair: a rule deleted by hand is added back
    before = len(d.lines("drift repaired"))
    net.host.ip("rule", "del", "priority", "10100", "fwmark", "0x20000/0xff0000", "lookup", "102")
    d.wait(lambda: len(d.lines("drift repaired")) > before, "the rule put back")

    # a failover: wan2's routes change and its conntrack entries are cleared
    net.host.sh("conntrack", "-I", "-p", "udp", "-s", "192.0.2.50", "-d", "192.0.2.60", "--sport", "1001",
                "--dport", "2000", "-t", "300", "-m", str(WAN2_MARK))
    net.peer.ip("link", "set", "p1", "down")
    d.wait_uplink("wan2", "down", "no carrier")
    d.wait(lambda: d.lines("conntrack cleared"), "the conntrack clear")
    assert not any(e["mark"] & MASK == WAN2_MARK for e in net.conntrack()), "wan2's entry must be gone"

    assert d.stop(signal.SIGTERM) == 0, d.context()  # on_stop = flush: every rule and route deleted
    assert net.rule_keys() == set(), "the flush on stop left rules behind"

    modules = IMPORT_LINE.findall(d.log())
    # the log covers the lazily imported writers, or it would prove nothing
    assert "markrouted.kernel.conntrack" in modules and "markrouted.kernel.netlink" in modules, modules[-20:]
    assert [m for m in modules if m.split(".")[0] == "pyroute2"] == []
