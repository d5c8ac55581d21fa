"""check --kernel's analysis: other users of the mark bits, tables and priorities.

The rulesets are written the way ``nft -j list ruleset`` (nftables 1.0.6)
prints them; each expression below was checked against its output for the
rule quoted next to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from test_derive import config

from markrouted.collisions import Finding, analyse, mark_users
from markrouted.model import AF_INET, AF_INET6

V4, V6 = AF_INET, AF_INET6
META = {"meta": {"key": "mark"}}
CT = {"ct": {"key": "mark"}}
FULL = 0xFFFFFFFF

CONFIG = config()  # mark_mask 0x00ff0000, rule_priority 10000, tables 101/102


def mangle(key: dict[str, Any], value: Any) -> dict[str, Any]:
    return {"mangle": {"key": key, "value": value}}


def read(left: Any, right: int) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def ruleset(*exprs: list[Any], family: str = "inet", table: str = "foreign") -> dict[str, Any]:
    """A ruleset of one table, one chain and one rule per expression list."""
    items: list[dict[str, Any]] = [
        {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"table": {"family": family, "name": table, "handle": 1}},
        {"chain": {"family": family, "table": table, "name": "pre", "handle": 1, "type": "filter",
                   "hook": "prerouting", "prio": -150, "policy": "accept"}},
    ]
    for handle, expr in enumerate(exprs, start=2):
        items.append({"rule": {"family": family, "table": table, "chain": "pre", "handle": handle, "expr": expr}})
    return {"nftables": items}


def findings(rs: dict[str, Any], mask: int = 0x00FF0000) -> list[tuple[str, str]]:
    cfg = config(settings=f"[settings]\nmark_mask = {mask:#x}\n")
    return [(f.severity, f.text) for f in analyse(cfg, rs, [], [])]


def severities(rs: dict[str, Any], mask: int = 0x00FF0000) -> list[str]:
    return [s for s, _ in findings(rs, mask)]


# ------------------------------------------------------------------ mark writers


@pytest.mark.parametrize(
    ("expr", "mask", "expected"),
    [
        # meta mark set 0x10
        pytest.param([mangle(META, 16)], 0x00FF0000, ["error"], id="whole-mark-constant"),
        # meta mark set 0x1337 (Istio): whole value, whatever the mask
        pytest.param([mangle(META, 0x1337)], 0x0000000F, ["error"], id="istio-whole-value"),
        # ct mark set meta mark (a whole-mark save)
        pytest.param([mangle(CT, META)], 0x00FF0000, ["error"], id="whole-ct-save"),
        # meta mark set ct mark (a whole-mark restore)
        pytest.param([mangle(META, CT)], 0x00FF0000, ["error"], id="whole-restore"),
        # meta mark set meta mark & 0xffff00ff | 0x100
        pytest.param([mangle(META, {"|": [{"&": [META, 0xFFFF00FF]}, 0x100]})], 0x00FF0000, [],
                     id="masked-other-bits"),
        pytest.param([mangle(META, {"|": [{"&": [META, 0xFFFF00FF]}, 0x100]})], 0x0000FF00, ["error"],
                     id="masked-our-bits"),
        # meta mark set meta mark | 0x4000 (Kubernetes)
        pytest.param([mangle(META, {"|": [META, 0x4000]})], 0x00FF0000, [], id="or-other-bit"),
        pytest.param([mangle(META, {"|": [META, 0x4000]})], 0x0000F000, ["error"], id="or-our-bit"),
        # meta mark set meta mark & 0xffffbfff (clears one bit)
        pytest.param([mangle(META, {"&": [META, 0xFFFFBFFF]})], 0x00FF0000, [], id="and-clears-other-bit"),
        pytest.param([mangle(META, {"&": [META, 0xFF00FFFF]})], 0x00FF0000, ["error"], id="and-clears-our-bits"),
        # meta mark set ct mark & 0xff: copies from another source, so every bit is written
        pytest.param([mangle(META, {"&": [CT, 0xFF]})], 0x0000FF00, ["error"], id="and-of-other-source"),
        pytest.param([mangle(META, {"|": [{"&": [CT, 0xFFFF00FF]}, 0x100]})], 0x00FF0000, ["error"],
                     id="masked-other-source"),
        # ct mark set ct mark & 0xffff00ff | 0x100 (Cilium-style, other bits)
        pytest.param([mangle(CT, {"|": [{"&": [CT, 0xFFFF00FF]}, 0x100]})], 0x00FF0000, [], id="ct-masked-other-bits"),
    ],
)
def test_mark_writers(expr: list[Any], mask: int, expected: list[str]) -> None:
    assert severities(ruleset(expr), mask) == expected


# ------------------------------------------------------------------ mark readers


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        # meta mark & 0x00ff0000 == 0x10000 accept
        pytest.param([read({"&": [META, 0x00FF0000]}, 0x10000), {"accept": None}], ["warning"], id="masked-read-ours"),
        # meta mark & 0x0000ff00 == 0x100
        pytest.param([read({"&": [META, 0x0000FF00]}, 0x100), {"accept": None}], [], id="masked-read-other"),
        # meta mark 0x1337 accept (a whole-mark read)
        pytest.param([read(META, 0x1337), {"accept": None}], ["warning"], id="whole-read"),
        # ct mark 0x1 drop
        pytest.param([read(CT, 1), {"drop": None}], ["warning"], id="whole-ct-read"),
        # ct mark & 0xff0000 vmap { 0x10000 : accept }
        pytest.param([{"vmap": {"key": {"&": [CT, 0xFF0000]}, "data": {"set": [[0x10000, {"accept": None}]]}}}],
                     ["warning"], id="vmap-read-ours"),
        # meta mark & 0x3f00 vmap { 0x100 : accept } (mwan3-style, other bits)
        pytest.param([{"vmap": {"key": {"&": [META, 0x3F00]}, "data": {"set": [[0x100, {"accept": None}]]}}}],
                     [], id="vmap-read-other"),
        # meta priority set meta mark map { 0x10000 : 1:1 }: a whole-mark read through a map
        pytest.param([{"mangle": {"key": {"meta": {"key": "priority"}},
                                  "value": {"map": {"key": META, "data": {"set": [[0x10000, "1:1"]]}}}}}],
                     ["warning"], id="map-read-whole"),
    ],
)
def test_mark_readers(expr: list[Any], expected: list[str]) -> None:
    assert severities(ruleset(expr)) == expected


def test_finding_text_names_the_rule() -> None:
    rs = ruleset([mangle(META, 16)], family="ip", table="mangle")
    assert findings(rs) == [(
        "error",
        "table ip mangle chain pre handle 2 sets meta mark bits 0xffffffff, overlapping mark_mask 0x00ff0000",
    )]
    assert str(Finding("error", "x")) == "error: x"


def test_own_table_is_ignored() -> None:
    rs = ruleset([mangle(META, {"|": [{"&": [META, 0xFF00FFFF]}, 0x10000]})],
                 [read({"&": [CT, 0x00FF0000]}, 0x10000)],
                 family="inet", table="markrouted")
    assert list(mark_users(rs)) == []
    assert findings(rs) == []


def test_same_name_in_another_family_is_foreign() -> None:
    rs = ruleset([mangle(META, 16)], family="ip", table="markrouted")
    assert severities(rs) == ["error"]


def test_mark_users_lists_every_user() -> None:
    rs = ruleset(
        [mangle(META, {"|": [META, 0x4000]})],
        [read({"&": [META, 0x4000]}, 0x4000), {"accept": None}],
        [{"accept": None}],
    )
    assert list(mark_users(rs)) == [
        ("table inet foreign chain pre handle 2", "sets meta mark", 0x4000),
        ("table inet foreign chain pre handle 3", "reads meta mark", 0x4000),
    ]


def test_empty_and_unrelated_rulesets() -> None:
    assert findings({"nftables": []}) == []
    assert findings({}) == []
    assert findings(ruleset([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}},
                             {"accept": None}])) == []


# ------------------------------------------------------------------ rules and routes of others


def rule_findings(rules: Sequence[tuple[int, int, int, int, int]],
                  route_tables: Sequence[int] = ()) -> list[tuple[str, str]]:
    return [(f.severity, f.text) for f in analyse(CONFIG, {"nftables": []}, rules, route_tables)]


@pytest.mark.parametrize(
    ("rules", "routes", "expected"),
    [
        pytest.param([(V4, 9999, 200, 0, 0), (V4, 11000, 200, 0, 0), (V4, 32766, 254, 0, 0)], [], [],
                     id="outside-range-other-tables"),
        pytest.param([(V4, 10000, 200, 0, 0)], [], [
            ("warning", "a ipv4 rule of someone else has priority 10000, inside markrouted's range 10000-10999")],
            id="in-range-low-edge"),
        pytest.param([(V6, 10999, 200, 0, 0)], [], [
            ("warning", "a ipv6 rule of someone else has priority 10999, inside markrouted's range 10000-10999")],
            id="in-range-high-edge"),
        pytest.param([(V4, 5000, 101, 0, 0)], [], [
            ("error", "table 101 (uplinks.wan1.table) is used by a ipv4 rule of someone else (priority 5000)")],
            id="our-table-used"),
        pytest.param([(V4, 5000, 102, 0, 0), (V4, 5001, 102, 0, 0), (V6, 5000, 102, 0, 0)], [], [
            ("error", "table 102 (uplinks.wan2.table) is used by a ipv4 rule of someone else (priority 5000)"),
            ("error", "table 102 (uplinks.wan2.table) is used by a ipv6 rule of someone else (priority 5000)")],
            id="our-table-once-per-family"),
        pytest.param([(V4, 5000, 200, 0x10000, 0x00FF0000)], [], [
            ("warning", "a ipv4 rule at priority 5000 matches fwmark 0x10000/0xff0000, overlapping mark_mask 0x00ff0000")],
            id="fwmark-rule-on-our-bits"),
        pytest.param([(V4, 5000, 200, 0x4000, 0x4000)], [], [], id="fwmark-rule-on-other-bits"),
        pytest.param([], [101], [("error", "table 101 (uplinks.wan1.table) holds routes of someone else")],
                     id="foreign-routes-in-our-table"),
        pytest.param([], [102, 102, 200, 254], [("error", "table 102 (uplinks.wan2.table) holds routes of someone else")],
                     id="foreign-routes-once-per-table"),
    ],
)
def test_rules_and_routes(rules: list[tuple[int, int, int, int, int]], routes: list[int],
                          expected: list[tuple[str, str]]) -> None:
    assert rule_findings(rules, routes) == expected


