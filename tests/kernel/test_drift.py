"""Drift: an owned object removed or altered by hand is shown by ``plan`` and put back by ``apply``.

``plan`` exits 3 and names exactly the missing object with a ``+`` line (or the
chain to refill with a ``~`` line); ``apply`` repairs it, and afterwards the
kernel holds exactly the expected objects again (``plan`` exits 0).
"""

from __future__ import annotations

import pytest

from .kernelhost import (
    WAN1_GW,
    WAN1_GW6,
    Host,
    Monitor,
    canon,
    expected_routes,
    expected_rules,
    nft_chains,
    nft_rules,
    plan_lines,
)

pytestmark = pytest.mark.kernel


def assert_plan(host: Host, want: list[str]) -> str:
    proc = host.mr("plan")
    assert proc.returncode == 3, f"plan exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert plan_lines(proc.stdout) == want, proc.stdout
    return proc.stdout


def assert_in_sync(host: Host) -> None:
    proc = host.mr("plan")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for family in (4, 6):
        assert canon(host.owned_rules(family)) == canon(expected_rules(family))
        for uplink, table in ((1, 101), (2, 102)):
            assert canon(host.routes(table, family)) == canon(expected_routes(uplink, family))


@pytest.mark.parametrize("family,cmd", [(4, "ip"), (6, "ip -6")], ids=["ipv4", "ipv6"])
def test_deleted_rule_is_planned_and_restored(host: Host, family: int, cmd: str) -> None:
    host.apply()
    host.ip(f"-{family}", "rule", "del", "priority", "10100", "fwmark", "0x20000/0xff0000", "lookup", "102",
            "proto", "109")
    assert len(host.owned_rules(family)) == 4

    assert_plan(host, [f"+ {cmd} rule 10100: from all fwmark 0x20000/0xff0000 lookup 102 proto markrouted"])
    host.apply()
    assert_in_sync(host)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_deleted_route_is_planned_and_restored(host: Host, family: int) -> None:
    host.apply()
    if family == 4:
        host.ip("-4", "route", "del", "default", "via", WAN1_GW, "table", "101")
        want = f"+ ip route default via {WAN1_GW} dev wan1 table 101 proto markrouted"
    else:
        host.ip("-6", "route", "del", "default", "via", WAN1_GW6, "table", "101", "metric", "1024")
        want = f"+ ip -6 route default via {WAN1_GW6} dev wan1 table 101 proto markrouted metric 1024"

    assert_plan(host, [want])
    host.apply()
    assert_in_sync(host)


def test_deleted_safety_net_is_restored(host: Host) -> None:
    host.apply()
    host.ip("-6", "route", "del", "unreachable", "default", "table", "102", "metric", "4294967294")
    assert_plan(host, ["+ ip -6 route unreachable default table 102 proto markrouted metric 4294967294"])
    host.apply()
    assert_in_sync(host)


def test_deleted_nft_table_is_planned_and_rebuilt(host: Host) -> None:
    host.apply()
    before = host.nft()
    assert before is not None
    host.sh("nft", "delete", "table", "inet", "markrouted")

    out = assert_plan(host, ["+ nft table inet markrouted (replaced in one transaction):"])
    assert "chain pick_0" in out and "goto set_wan2" in out
    host.apply()
    after = host.nft()
    assert after is not None
    assert {n: (c.get("hook"), c.get("prio")) for n, c in nft_chains(after).items()} == \
        {n: (c.get("hook"), c.get("prio")) for n, c in nft_chains(before).items()}
    assert [(r["chain"], r.get("comment")) for r in nft_rules(after)] == \
        [(r["chain"], r.get("comment")) for r in nft_rules(before)]
    assert_in_sync(host)


def _rule_handles(host: Host) -> dict[str, list[int]]:
    data = host.nft()
    assert data is not None
    out: dict[str, list[int]] = {}
    for r in nft_rules(data):
        out.setdefault(r["chain"], []).append(r["handle"])
    return out


def test_flushed_chain_is_refilled_alone(host: Host, monitor: Monitor) -> None:
    host.apply()
    handles = _rule_handles(host)
    host.sh("nft", "flush", "chain", "inet", "markrouted", "pick_0")

    out = assert_plan(host, ["~ nft chain inet markrouted pick_0 (refilled):"])
    assert "    goto set_wan2" in out.splitlines()
    events = monitor.events_during(lambda: host.apply())
    assert events and all(e.startswith("nft: ") and "pick_0" in e for e in events), events

    data = host.nft()
    assert data is not None
    assert [r["expr"] for r in nft_rules(data, "pick_0")] == [[{"goto": {"target": "set_wan2"}}]]
    after = _rule_handles(host)
    # every other chain kept its rules (same handles): only pick_0 was rewritten
    assert {c: h for c, h in after.items() if c != "pick_0"} == {c: h for c, h in handles.items() if c != "pick_0"}
    assert_in_sync(host)


def test_altered_rule_is_detected_and_repaired(host: Host) -> None:
    """Someone rewrites ssh's pick to wan1: the chain no longer says what markrouted wrote."""
    host.apply()
    data = host.nft()
    assert data is not None
    (pick,) = nft_rules(data, "pick_0")
    host.sh("nft", "replace", "rule", "inet", "markrouted", "pick_0", "handle", str(pick["handle"]),
            "goto", "set_wan1")

    assert_plan(host, ["~ nft chain inet markrouted pick_0 (refilled):"])
    host.apply()
    data = host.nft()
    assert data is not None
    assert [r["expr"] for r in nft_rules(data, "pick_0")] == [[{"goto": {"target": "set_wan2"}}]]
    assert_in_sync(host)


def test_extra_rule_in_our_table_is_removed(host: Host) -> None:
    """A rule added by hand to markrouted's own table is not markrouted's intent: it goes.

    The output chain is outside the raw refill's vocabulary, so the table is
    replaced in one transaction.
    """
    host.apply()
    host.sh("nft", "add", "rule", "inet", "markrouted", "output", "tcp", "dport", "25", "goto", "set_wan1")

    assert_plan(host, ["+ nft table inet markrouted (replaced in one transaction):"])
    host.apply()
    assert "dport 25" not in host.sh("nft", "list", "table", "inet", "markrouted")
    assert_in_sync(host)


def test_stale_owned_rule_and_route_are_removed(host: Host) -> None:
    """Objects carrying markrouted's tag in its range that the config does not want are removed."""
    host.apply()
    host.ip("-4", "rule", "add", "priority", "10300", "from", "192.0.2.5", "lookup", "101", "proto", "109")
    host.ip("-6", "route", "add", "2001:db8:9::/64", "via", WAN1_GW6, "table", "101", "proto", "109")

    assert_plan(host, [
        "- ip rule 10300: from 192.0.2.5 lookup 101 proto markrouted",
        f"- ip -6 route 2001:db8:9::/64 via {WAN1_GW6} dev wan1 table 101 proto markrouted metric 1024",
    ])
    host.apply()
    assert_in_sync(host)
