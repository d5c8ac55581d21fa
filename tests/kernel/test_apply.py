"""``markrouted apply`` against the real kernel: exactly the expected objects, once.

Each test applies the two-uplink config of ``kernelhost.CONFIG`` in namespaces of
its own and reads the result back with ``ip -j`` and ``nft -j``. Expected sets
are exact: a missing object, an extra one or a duplicate fails.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from .kernelhost import (
    PROTO_NAMES,
    WAN1_GW,
    WAN1_GW6,
    WAN2_GW,
    WAN2_GW6,
    Host,
    Monitor,
    canon,
    expected_routes,
    expected_rules,
    nft_chains,
    nft_rules,
)

pytestmark = pytest.mark.kernel

MASK = 0x00FF0000
FULL = 0xFFFFFFFF

#: chain -> (base chain type, hook, priority) or None for a regular chain
EXPECTED_CHAINS: dict[str, tuple[str, str, int] | None] = {
    "set_wan1": None, "restore_wan1": None, "in_wan1": None,
    "set_wan2": None, "restore_wan2": None, "in_wan2": None,
    "rule_priority_10000": None,  # records the priority range in force
    "pick_0": None, "pick_1": None,
    "prerouting": ("filter", "prerouting", -150),
    "output": ("route", "output", -150),
    "postrouting": ("nat", "postrouting", 100),
}

#: chain -> the labels of its rules' comments, in order (the " #digest" left out)
HEAD = ["restore the flow's uplink", "marked already", "only new flows are classified"]
EXPECTED_LABELS: dict[str, list[str]] = {
    "set_wan1": ["mark wan1"], "restore_wan1": ["restore wan1"], "in_wan1": ["inbound wan1"],
    "set_wan2": ["mark wan2"], "restore_wan2": ["restore wan2"], "in_wan2": ["inbound wan2"],
    "rule_priority_10000": [],
    "pick_0": ["pick"], "pick_1": ["pick", "pick"],  # 3:1 cascade
    "prerouting": [*HEAD, "inbound on wan1", "inbound on wan2", "not for this host", "policy ssh", "policy web"],
    "output": [*HEAD, "not for this host", "policy ssh", "policy web"],
    "postrouting": ["masquerade wan1 ipv4", "masquerade wan1 ipv6", "masquerade wan2 ipv4", "masquerade wan2 ipv6"],
}


def _label(comment: str) -> str:
    m = re.fullmatch(r"(.+) #[0-9a-f]{10}", comment)
    assert m, f"comment without a digest: {comment!r}"
    return m.group(1)


def _mark_bits_written(mangle: dict[str, Any]) -> int:
    """Which bits of the mark a ``meta/ct mark set`` expression can change."""
    key = mangle["key"]
    value = mangle["value"]
    if isinstance(value, dict) and "|" in value:
        left, right = value["|"]
        if isinstance(left, dict) and "&" in left and left["&"][0] == key and isinstance(right, int):
            return (FULL & ~left["&"][1]) | right
        if left == key and isinstance(right, int):
            return right
    return FULL


# ------------------------------------------------------------------ rules


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_apply_installs_exactly_the_rules(host: Host, family: int) -> None:
    defaults_before = host.rules(family)
    host.apply()
    assert canon(host.owned_rules(family)) == canon(expected_rules(family))
    # nothing else appeared: every rule is either ours or one that was there before
    others = [r for r in host.rules(family) if r.get("protocol") not in PROTO_NAMES]
    assert others == defaults_before


# ------------------------------------------------------------------ routes


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_apply_installs_exactly_the_routes(host: Host, family: int) -> None:
    main_before = host.routes("main", family)
    host.apply()
    assert canon(host.routes(101, family)) == canon(expected_routes(1, family))
    assert canon(host.routes(102, family)) == canon(expected_routes(2, family))
    # no route of ours anywhere else, none duplicated, the main table untouched
    assert len(host.owned_routes(family)) == 6
    assert host.routes("main", family) == main_before


# ------------------------------------------------------------------ nftables


def test_apply_installs_the_nft_table(host: Host) -> None:
    host.apply()
    data = host.nft()
    assert data is not None, "no table inet markrouted"
    chains = nft_chains(data)
    assert set(chains) == set(EXPECTED_CHAINS)
    for name, base in EXPECTED_CHAINS.items():
        c = chains[name]
        if base is None:
            assert "hook" not in c, f"{name} must be a regular chain: {c}"
        else:
            assert (c.get("type"), c.get("hook"), c.get("prio"), c.get("policy")) == (*base, "accept"), c
    labels = {name: [_label(r.get("comment", "")) for r in nft_rules(data, name)] for name in chains}
    assert labels == EXPECTED_LABELS

    # the fwmark and the conntrack mark are only ever written inside mark_mask
    writes = []
    for rule in nft_rules(data):
        for expr in rule["expr"]:
            if "mangle" in expr:
                writes.append((rule["chain"], expr["mangle"]["key"], _mark_bits_written(expr["mangle"])))
    assert writes, "no rule sets a mark"
    for chain, key, bits in writes:
        assert bits & ~MASK == 0, f"{chain} writes {key} bits {bits:#x} outside mark_mask"
    assert {(c, json.dumps(k, sort_keys=True)) for c, k, _ in writes} == {
        ("set_wan1", '{"meta": {"key": "mark"}}'), ("set_wan1", '{"ct": {"key": "mark"}}'),
        ("set_wan2", '{"meta": {"key": "mark"}}'), ("set_wan2", '{"ct": {"key": "mark"}}'),
        ("restore_wan1", '{"meta": {"key": "mark"}}'), ("restore_wan2", '{"meta": {"key": "mark"}}'),
        ("in_wan1", '{"ct": {"key": "mark"}}'), ("in_wan2", '{"ct": {"key": "mark"}}'),
    }
    # ssh prefers wan2 while both are up
    assert [r["expr"] for r in nft_rules(data, "pick_0")] == [[{"goto": {"target": "set_wan2"}}]]
    # and the text nft prints carries both the masked set and the saved connmark
    text = host.sh("nft", "list", "chain", "inet", "markrouted", "set_wan2")
    assert "meta mark set meta mark & 0xff02ffff | 0x00020000" in text
    assert "ct mark set ct mark & 0xff02ffff | 0x00020000" in text


# ------------------------------------------------------------------ idempotence


def test_second_apply_writes_nothing(host: Host, monitor: Monitor) -> None:
    host.apply()
    before = host.text_state()
    nft_before = host.sh("nft", "-j", "list", "table", "inet", "markrouted")

    plan = host.mr("plan")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "in sync" in plan.stdout

    results = []
    events = monitor.events_during(lambda: results.append(host.mr("apply")))
    again = results[0]
    assert again.returncode == 0, again.stderr
    assert "already in sync, nothing written" in again.stdout
    assert events == [], "the second apply wrote to the kernel:\n" + "\n".join(events)

    # handles included: a table or rule deleted and re-created would differ
    assert host.sh("nft", "-j", "list", "table", "inet", "markrouted") == nft_before
    assert host.text_state() == before


def test_first_apply_is_seen_by_the_monitor(host: Host, monitor: Monitor) -> None:
    """The check above is only worth something if the monitors do see markrouted's writes."""
    events = monitor.events_during(lambda: host.apply())
    assert any(e.startswith("ip: ") and "table 101" in e for e in events), events
    assert any(e.startswith("nft: ") and "markrouted" in e for e in events), events


# ------------------------------------------------------------------ status


def test_status_json_has_the_spec_keys(host: Host) -> None:
    before = host.mr("status", "--json")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["in_sync"] is False

    host.apply()
    proc = host.mr("status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["in_sync"] is True
    assert set(doc["uplinks"]) == {"wan1", "wan2"}
    want = {
        "wan1": ("wan1", WAN1_GW, WAN1_GW6, 101, 0x10000),
        "wan2": ("wan2", WAN2_GW, WAN2_GW6, 102, 0x20000),
    }
    for name, (iface, gw, gw6, table, mark) in want.items():
        u = doc["uplinks"][name]
        assert {"interface", "state", "reason", "gateway", "gateway6", "table", "mark"} <= set(u)
        assert (u["interface"], u["state"], u["gateway"], u["gateway6"], u["table"]) == (iface, "up", gw, gw6, table)
        assert isinstance(u["reason"], str)
        assert int(str(u["mark"]), 0) == mark
    assert set(doc["policies"]) == {"ssh", "web"}
    assert doc["policies"]["ssh"]["active"] == ["wan2"]
    assert sorted(doc["policies"]["web"]["active"]) == ["wan1", "wan2"]


# ------------------------------------------------------------------ explain


@pytest.mark.parametrize(
    "daddr,gateway", [("198.18.0.10", WAN2_GW), ("2001:db8:ff::10", WAN2_GW6)], ids=["ipv4", "ipv6"])
def test_explain_policy_packet_takes_the_uplink_route(host: Host, daddr: str, gateway: str) -> None:
    host.apply()
    proc = host.mr("explain", "--proto", "tcp", "--dport", "22", "--daddr", daddr)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^policy:\s+ssh\b", out, re.M), out
    assert re.search(r"^uplink:\s+wan2 \(mark 0x00020000/0x00ff0000, table 102\)", out, re.M), out
    # the kernel's own lookup with the mark: wan2's gateway, from table 102
    assert re.search(rf"^route:\s+{re.escape(daddr)} via {re.escape(gateway)} dev wan2 table 102\b", out, re.M), out


@pytest.mark.parametrize(
    "daddr,gateway", [("198.18.0.10", WAN1_GW), ("2001:db8:ff::10", WAN1_GW6)], ids=["ipv4", "ipv6"])
def test_explain_unmatched_packet_follows_main(host: Host, daddr: str, gateway: str) -> None:
    host.apply()
    proc = host.mr("explain", "--proto", "udp", "--dport", "53", "--daddr", daddr)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^policy:\s+none matches", out, re.M), out
    assert "uplink:" not in out
    # the main table's preferred default route (metric 100, via wan1)
    assert re.search(rf"^route:\s+{re.escape(daddr)} via {re.escape(gateway)} dev wan1 table main\b", out, re.M), out


def test_explain_marked_packet_never_falls_through_to_main(host: Host) -> None:
    """With wan2's default route gone, the mark still selects table 102: its safety net answers."""
    host.apply()
    host.ip("route", "del", "default", "via", WAN2_GW, "table", "102")
    proc = host.mr("explain", "--proto", "tcp", "--dport", "22", "--daddr", "198.18.0.10")
    assert proc.returncode == 0, proc.stderr
    route = next(line for line in proc.stdout.splitlines() if line.startswith("route:"))
    assert "table main" not in route and "via" not in route, route
    assert re.search(r"no route|unreachable", route, re.I), route
