"""A dead ISP behind a live link is detected by the probes, and traffic moves.

The daemon runs in the lab's host; an ISP's upstream is cut in the ISP's
namespace (the host's link keeps its carrier, no netlink event says anything).
Every test reads the daemon's live status document and opens real connections
to the server, whose view of the source address names the ISP that carried
them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from lab.topology import (ISP1_CUSTOMER4, ISP2_CUSTOMER4, ISP2_CUSTOMER6, SERVER4, SERVER6, SERVERS, Lab, lab_config,
                          policy, which_isp)

from .conftest import Running, check, cut, restore, stamped

pytestmark = pytest.mark.e2e

INTERVAL, TIMEOUT, DOWN_AFTER, UP_AFTER = 0.2, 0.2, 3, 3
#: the daemon's own timer and scheduling jitter: delays are measured from the
#: end of the command that makes the cut to the verdict's timestamp in the
#: status document (see ``stamped``), so nothing of the test's own speed counts
SLACK = 0.3
#: how long a test waits for a state it expects: only reached when it fails
WAIT = 10
DOWN_BOUND = INTERVAL * DOWN_AFTER + TIMEOUT + SLACK
#: coming back needs UP_AFTER good rounds: the first may start just as the cut
#: is lifted, so at least (UP_AFTER - 1) intervals pass; a probe still waiting
#: for its timeout when the cut is lifted adds at most one TIMEOUT
UP_MIN = INTERVAL * (UP_AFTER - 1) - 0.05
UP_BOUND = INTERVAL * UP_AFTER + TIMEOUT + SLACK

WEB = policy("web", ["wan1", "wan2"], proto="tcp", dport=[80])


def carriers(lab: Lab, port: int) -> dict[str, str | None]:
    """Which ISP carried one new connection per family, by server address."""
    peers = lab.connect_all([("host", server, port) for server in SERVERS])
    return {server: which_isp(peer) for server, peer in zip(SERVERS, peers)}


def both(isp: str) -> dict[str, str | None]:
    return {server: isp for server in SERVERS}


def wait_counters(lab: Lab, role: str, table: str, names: tuple[str, ...], least: int,
                  deadline: float = WAIT) -> list[int]:
    """Poll nft counters until each has counted ``least`` packets; their values."""
    end = time.monotonic() + deadline
    while True:
        values = [lab.counter(role, table, name) for name in names]
        if min(values) >= least:
            return values
        assert time.monotonic() < end, f"counters {names} in {role}: {values}, expected {least} each"
        time.sleep(0.05)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_dead_upstream_detected_in_bound_traffic_moves_and_comes_back(
        lab: Lab, daemon: Callable[[str], Running], family: str) -> None:
    """Cut isp1's upstream: wan1 down within interval x down_after + timeout (+ SLACK); back after up_after rounds.

    The check probes a single target of one family, so that family's probes
    alone decide (the v4 run proves ICMP echo, the v6 run ICMPv6 echo).
    Traffic of both families follows the verdict.
    """
    target = SERVER4 if family == "ipv4" else SERVER6
    d = daemon(lab_config(WEB, wan1=check([target])))
    doc = d.wait_verdict("wan1")
    assert doc["uplinks"]["wan1"]["state"] == "up"
    assert carriers(lab, 80) == both("isp1")

    wall_cut, cut_done = stamped(lambda: cut(lab, "isp1"))
    doc, _ = d.wait_state("wan1", "down", deadline=WAIT)
    health = doc["health"]["wan1"]
    took = health["since"] - cut_done
    print(f"{family}: wan1 down {took:.3f}s after the cut (bound {DOWN_BOUND:.2f}s)")
    assert took <= DOWN_BOUND, f"wan1 down after {took:.3f}s, bound {DOWN_BOUND:.3f}s"
    assert doc["uplinks"]["wan1"]["reason"] == (
        f"health check: {DOWN_AFTER} failed rounds ({target}: no answer in 0.2s)")
    assert health["up"] is False and health["pending"] is False
    assert wall_cut <= health["since"] <= time.time()
    assert {k: health["targets"][target][k] for k in ("ok", "rtt_ms", "error")} == {
        "ok": False, "rtt_ms": None, "error": "no answer in 0.2s"}
    assert health["targets"][target]["loss"] > 0
    assert health["loss"] > 0
    assert doc["policies"]["web"]["active"] == ["wan2"]
    assert carriers(lab, 80) == both("isp2")
    # wan2 has no check: it is up by its link alone, and unaffected
    assert doc["uplinks"]["wan2"]["state"] == "up"

    restore_start, restore_done = stamped(lambda: restore(lab, "isp1"))
    doc, _ = d.wait_state("wan1", "up", deadline=WAIT)
    health = doc["health"]["wan1"]
    earliest, latest = health["since"] - restore_done, health["since"] - restore_start
    print(f"{family}: wan1 up {earliest:.3f}..{latest:.3f}s after the restore "
          f"(expected {UP_MIN:.2f}..{UP_BOUND:.2f}s)")
    assert latest >= UP_MIN, f"wan1 up {latest:.3f}s after the restore began, expected at least {UP_MIN:.2f}s"
    assert earliest <= UP_BOUND, f"wan1 up {earliest:.3f}s after the restore, bound {UP_BOUND:.2f}s"
    assert health["up"] is True
    assert health["targets"][target]["ok"] is True
    assert isinstance(health["targets"][target]["rtt_ms"], float) and 0 < health["targets"][target]["rtt_ms"] < 200
    assert doc["policies"]["web"]["active"] == ["wan1"]
    assert carriers(lab, 80) == both("isp1")

    # one event line per transition, each naming the uplink and the reason
    downs, ups = d.events("health check down", "wan1"), d.events("health check up", "wan1")
    assert len(downs) == 1 and len(ups) == 2, d.output()  # up at start, down, up again
    assert f"reason=health check: {DOWN_AFTER} failed rounds ({target}: no answer in 0.2s)" in downs[0]
    assert "reason=health check: 1/1 targets answer" in ups[1]
    assert len(d.events("uplink down", "wan1")) == 1


def test_probe_of_the_backup_leaves_by_the_backup(lab: Lab, daemon: Callable[[str], Running]) -> None:
    """wan2 is checked while isp1 is the main table's default route: its probes go by isp2 only.

    Counters in both ISPs count echo requests to the targets before any
    filter: every probe of wan2 arrives at isp2 with wan2's source addresses,
    none arrives at isp1. Cutting isp1 leaves wan2 up; cutting isp2 takes it
    down although isp1 still carries traffic to the very same targets (a probe
    that sneaked out by isp1 would keep it up).
    """
    lab.nft("isp2", (
        "table inet probes {\n  counter v4 {}\n  counter v6 {}\n"
        "  chain f { type filter hook forward priority -20; policy accept;\n"
        f"    ip saddr {ISP2_CUSTOMER4} ip daddr {SERVER4} icmp type echo-request counter name v4\n"
        f"    ip6 saddr {ISP2_CUSTOMER6} ip6 daddr {SERVER6} icmpv6 type echo-request counter name v6\n"
        "  }\n}\n"))
    lab.nft("isp1", (
        "table inet probes {\n  counter any {}\n"
        "  chain f { type filter hook forward priority -20; policy accept;\n"
        f"    ip daddr {SERVER4} icmp type echo-request counter name any\n"
        f"    ip6 daddr {SERVER6} icmpv6 type echo-request counter name any\n"
        "  }\n}\n"))
    # both targets must answer, so both families' probes are shown to take isp2
    d = daemon(lab_config(policy("ssh", ["wan2", "wan1"], proto="tcp", dport=[22]),
                          wan2=check([SERVER4, SERVER6], success="all", uplink="wan2")))
    doc = d.wait_verdict("wan2")
    assert doc["uplinks"]["wan2"]["state"] == "up"
    # the main table's default route is isp1's: unmarked traffic takes isp1
    assert lab.ip_json("host", "route", "show", "default")[0]["dev"] == "eth0"
    assert which_isp(lab.connect("host", SERVER4, 8080)) == "isp1"

    v4, v6 = wait_counters(lab, "isp2", "probes", ("v4", "v6"), 5)
    assert lab.counter("isp1", "probes", "any") == 0

    cut(lab, "isp1")
    d.hold_state("wan2", "up", INTERVAL * DOWN_AFTER + TIMEOUT + SLACK + 0.5)
    assert lab.counter("isp1", "probes", "any") == 0
    restore(lab, "isp1")

    _, cut_done = stamped(lambda: cut(lab, "isp2"))
    doc, _ = d.wait_state("wan2", "down", deadline=WAIT)
    assert doc["health"]["wan2"]["since"] - cut_done <= DOWN_BOUND
    assert doc["uplinks"]["wan2"]["reason"].startswith(f"health check: {DOWN_AFTER} failed rounds (")
    # isp1 is fine and reaches the very targets wan2's probes are sent to
    assert carriers(lab, 8080) == both("isp1")
    assert doc["policies"]["ssh"]["active"] == ["wan1"]
    assert carriers(lab, 22) == both("isp1")
    # the probes kept going to isp2 (and died there), never to isp1
    assert lab.counter("isp2", "probes", "v4") > v4
    assert lab.counter("isp1", "probes", "any") == 0

    restore(lab, "isp2")
    d.wait_state("wan2", "up", deadline=WAIT)
    assert carriers(lab, 22) == both("isp2")


def test_tcp_method(lab: Lab, daemon: Callable[[str], Running]) -> None:
    """``method = "tcp:2222"``: a completed connect is a good probe; ICMP has nothing to do with it.

    The server counts the probes' SYNs on port 2222 from isp1. Dropping only
    TCP port 2222 in isp1 (pings still pass) takes wan1 down; lifting it
    brings wan1 back.
    """
    d = daemon(lab_config(WEB, wan1=check([SERVER4, SERVER6], method="tcp:2222")))
    doc = d.wait_verdict("wan1")
    assert doc["uplinks"]["wan1"]["state"] == "up"
    health = doc["health"]["wan1"]
    assert {t: r["ok"] for t, r in health["targets"].items()} == {SERVER4: True, SERVER6: True}
    assert all(r["rtt_ms"] is not None for r in health["targets"].values())
    # the status file's figures are refreshed while nothing changes
    doc, _ = d.wait("five rounds", lambda doc: doc["health"]["wan1"]["rounds"] >= 5)
    assert lab.syns("isp1", 2222) >= 10  # 2 targets x 5 rounds, all by isp1
    assert lab.syns("isp2", 2222) == 0

    _, cut_done = stamped(lambda: cut(lab, "isp1", "tcp dport 2222"))
    doc, _ = d.wait_state("wan1", "down", deadline=WAIT)
    assert doc["health"]["wan1"]["since"] - cut_done <= DOWN_BOUND
    lab.sh("host", "ping", "-c1", "-W10", "-I", ISP1_CUSTOMER4, SERVER4)  # ICMP still passes isp1
    assert carriers(lab, 80) == both("isp2")
    restore(lab, "isp1")
    d.wait_state("wan1", "up", deadline=WAIT)
    assert carriers(lab, 80) == both("isp1")


def test_policy_with_both_down_uses_its_fallback(lab: Lab, daemon: Callable[[str], Running]) -> None:
    """Both ISPs' upstreams cut: every listed uplink is down, ``fallback = "drop"`` decides."""
    d = daemon(lab_config(
        policy("web", ["wan1", "wan2"], proto="tcp", dport=[80], fallback="drop"),
        wan1=check([SERVER4]), wan2=check([SERVER4], uplink="wan2")))
    d.wait("both verdicts", lambda doc: all(doc["uplinks"][u]["state"] == "up" for u in ("wan1", "wan2")))
    cut(lab, "isp1")
    cut(lab, "isp2")
    doc, _ = d.wait("both down", lambda doc: all(doc["uplinks"][u]["state"] == "down" for u in ("wan1", "wan2")),
                    deadline=WAIT)
    assert doc["policies"]["web"]["active"] == []
    assert doc["status"].startswith("0/2 uplinks up")
    restore(lab, "isp2")
    doc, _ = d.wait_state("wan2", "up", deadline=WAIT)
    assert doc["policies"]["web"]["active"] == ["wan2"]
    assert carriers(lab, 80) == both("isp2")
