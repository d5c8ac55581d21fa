"""Positive ownership: markrouted writes and removes only what it owns.

Foreign rules (even inside markrouted's priority range), foreign route tables,
foreign routes in the main table and in an uplink's table, and a foreign nft
table that uses other bits of the same mark must survive ``apply`` and
``flush`` byte for byte; ``flush`` must leave the kernel exactly as it was
before the first ``apply``; config changes must leave nothing stale behind.
"""

from __future__ import annotations

from collections import Counter

import pytest

from .kernelhost import (
    CONFIG,
    WAN1_GW,
    WAN1_GW6,
    WAN2_GW,
    WAN2_GW6,
    Host,
    canon,
    expected_routes,
    expected_rules,
    nft_chains,
)

pytestmark = pytest.mark.kernel

FOREIGN_NFT = """\
table inet other {
    chain pre {
        type filter hook prerouting priority -100; policy accept;
        tcp dport 8080 meta mark set meta mark | 0x4000
    }
}
"""


def add_foreign_state(host: Host) -> None:
    """What other software on a real host would have installed."""
    for args in (
        # inside markrouted's range [10000, 10999] but without its proto tag
        ["rule", "add", "priority", "10050", "from", "192.0.2.0/24", "lookup", "200"],
        ["-6", "rule", "add", "priority", "10050", "from", "2001:db8:c::/64", "lookup", "200"],
        # a Kubernetes-style fwmark rule on other bits of the mark
        ["rule", "add", "priority", "500", "fwmark", "0x4000/0x4000", "lookup", "200"],
        ["-6", "rule", "add", "priority", "500", "fwmark", "0x4000/0x4000", "lookup", "200"],
        # a route table of someone else's
        ["route", "add", "default", "via", WAN2_GW, "table", "200"],
        ["route", "add", "192.0.2.0/24", "via", WAN1_GW, "table", "200"],
        ["-6", "route", "add", "default", "via", WAN2_GW6, "table", "200"],
        # a foreign route in the main table, and one in an uplink's own table
        ["route", "add", "192.0.2.128/25", "via", WAN2_GW],
        ["-6", "route", "add", "2001:db8:c::/64", "via", WAN1_GW6],
        ["route", "add", "192.0.2.0/25", "via", WAN1_GW, "table", "101"],
    ):
        host.ip(*args)
    host.nft_script(FOREIGN_NFT)


def test_foreign_state_survives_apply_and_flush(host: Host) -> None:
    add_foreign_state(host)
    pristine = host.text_state()
    foreign = host.foreign_text()
    assert "10050:\tfrom 192.0.2.0/24 lookup 200" in foreign and "table inet other" in foreign
    other = host.sh("nft", "-a", "list", "table", "inet", "other")

    host.apply()
    assert host.owned_rules(4), "apply installed nothing"
    assert host.foreign_text() == foreign
    assert host.sh("nft", "-a", "list", "table", "inet", "other") == other

    flush = host.mr("flush")
    assert flush.returncode == 0, flush.stderr
    # byte for byte, handles included, as before markrouted ever ran
    assert host.text_state() == pristine


def test_flush_removes_exactly_what_markrouted_owns(host: Host) -> None:
    pristine = host.text_state()
    host.apply()
    assert host.has_nft_table()

    proc = host.mr("flush")
    assert proc.returncode == 0, proc.stderr
    for family in (4, 6):
        assert host.owned_rules(family) == []
        assert host.owned_routes(family) == []
    assert not host.has_nft_table()
    assert host.text_state() == pristine

    again = host.mr("flush")
    assert again.returncode == 0, again.stderr
    assert "nothing" in again.stdout
    assert host.text_state() == pristine


def test_flush_with_quiet_prints_nothing(host: Host) -> None:
    host.apply()
    proc = host.mr("flush", "-q")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert not host.has_nft_table()
    assert host.owned_rules(4) == [] and host.owned_rules(6) == []


# ------------------------------------------------------------------ config changes


def owned_counts(host: Host) -> Counter[str]:
    """Every owned rule and route, counted: a duplicate shows as a 2."""
    out: Counter[str] = Counter()
    for family in (4, 6):
        out.update(f"rule{family} {x}" for x in canon(host.owned_rules(family)))
        out.update(f"route{family} {x}" for x in canon(host.owned_routes(family)))
    return out


def test_removing_an_uplink_leaves_nothing_of_it(host: Host) -> None:
    host.apply()
    smaller = host.write(CONFIG.split("[uplinks.wan2]")[0] + """
[[policy]]
name = "ssh"
proto = "tcp"
dport = [22]
uplinks = ["wan1"]
""", "one-uplink.toml")
    host.apply(smaller)

    for family in (4, 6):
        want = [r for r in expected_rules(family) if r["table"] in ("main", "101")]
        assert canon(host.owned_rules(family)) == canon(want)
        assert host.routes(102, family) == []
        assert canon(host.routes(101, family)) == canon(expected_routes(1, family))
    data = host.nft()
    assert data is not None
    assert not [name for name in nft_chains(data) if "wan2" in name]
    assert "wan2" not in host.sh("nft", "list", "table", "inet", "markrouted")
    assert max(owned_counts(host).values()) == 1
    assert host.mr("plan", config=smaller).returncode == 0


def test_changing_a_table_id_moves_the_routes(host: Host) -> None:
    host.apply()
    moved = host.write(CONFIG.replace("table = 102", "table = 112"), "moved.toml")
    host.apply(moved)

    for family in (4, 6):
        assert canon(host.owned_rules(family)) == canon(expected_rules(family, tables=(101, 112)))
        assert host.routes(102, family) == []
        assert canon(host.routes(112, family)) == canon(expected_routes(2, family))
        assert canon(host.routes(101, family)) == canon(expected_routes(1, family))
    assert max(owned_counts(host).values()) == 1
    assert host.mr("plan", config=moved).returncode == 0


def test_changing_rule_priority_moves_the_rules(host: Host) -> None:
    """The nft table records the range in force, so the old range's rules are still ours."""
    host.apply()
    moved = host.write(CONFIG.replace("rule_priority = 10000", "rule_priority = 20000"), "moved.toml")
    host.apply(moved)

    for family in (4, 6):
        assert canon(host.owned_rules(family)) == canon(expected_rules(family, prio=20000))
    assert max(owned_counts(host).values()) == 1


def test_reapplying_after_changes_converges_without_duplicates(host: Host) -> None:
    """apply, change, apply, change back, apply: the same objects as the first time, once each."""
    host.apply()
    first = owned_counts(host)
    moved = host.write(CONFIG.replace("table = 102", "table = 112").replace("mark = 2", "mark = 7"), "moved.toml")
    host.apply(moved)
    host.apply(moved)
    host.apply()
    assert owned_counts(host) == first
    assert max(first.values()) == 1
