"""diff(): desired against actual, compared on the model's identities, and the plan's text.

An in-sync state must give an empty plan (an empty plan writes nothing), a
route whose attributes differ is replaced in its slot rather than added beside
it, and the nft table is rebuilt only when its structure differs: a failover
refills the few chains that changed.
"""

from __future__ import annotations

import dataclasses

import pytest

from markrouted.diff import diff, diff_nft, diff_routes
from markrouted.model import (
    AF_INET,
    AF_INET6,
    Actual,
    BaseHook,
    DesiredState,
    NftChain,
    NftRule,
    NftTable,
    NftUpdate,
    Plan,
    Route,
    Rule,
    Sysctl,
)

V4, V6 = AF_INET, AF_INET6
MASK = 0x00FF0000

FWMARK_V4 = Rule(V4, 10100, 101, fwmark=0x10000, fwmask=MASK)
FWMARK_V6 = Rule(V6, 10100, 101, fwmark=0x10000, fwmask=MASK)
SUPPRESS_V4 = Rule(V4, 10000, 254, suppress_prefixlength=0)
SOURCE_V6 = Rule(V6, 10200, 101, src="2001:db8:1::10", src_len=128)

DEFAULT_V4 = Route(V4, 101, "0.0.0.0/0", 0, 2, gateway="198.51.100.1", ifname="eth0")
CONNECTED_V4 = Route(V4, 101, "198.51.100.0/24", 0, 2, prefsrc="198.51.100.10", scope=253, ifname="eth0")
UNREACHABLE_V6 = Route(V6, 101, "::/0", 0xFFFFFFFE, 0, type=7)


def rule(text: str, comment: str) -> NftRule:
    return NftRule('[{"accept":null}]', text, comment)


def table(*chains: NftChain) -> NftTable:
    return NftTable(chains)


PICK = NftChain("pick_0", None, (rule("goto set_wan1", "pick #aaaaaaaaaa"),))
PICK_FAILED_OVER = NftChain("pick_0", None, (rule("goto set_wan2", "pick #bbbbbbbbbb"),))
OUTPUT = NftChain("output", BaseHook("route", "output", -150), (rule("goto pick_0", "policy web #cccccccccc"),))
POST = NftChain("postrouting", BaseHook("nat", "postrouting", 100), ())
TABLE = table(PICK, OUTPUT, POST)
#: a rule the raw refill cannot encode
MASQUERADE = NftRule('[{"masquerade":null}]', "masquerade", "masquerade #dddddddddd")


def state(rules: frozenset[Rule] = frozenset(), routes: frozenset[Route] = frozenset(),
          nft: NftTable | None = TABLE, sysctls: tuple[Sysctl, ...] = ()) -> DesiredState:
    return DesiredState(rules, routes, nft, sysctls, (), ())


def actual(rules: frozenset[Rule] = frozenset(), routes: frozenset[Route] = frozenset(),
           nft: NftTable | None = TABLE) -> Actual:
    return Actual(rules, routes, nft)


# ---------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("desired", "have", "add", "remove"),
    [
        pytest.param({FWMARK_V4, FWMARK_V6}, set(), [FWMARK_V4, FWMARK_V6], [], id="add"),
        pytest.param(set(), {FWMARK_V4, SOURCE_V6}, [], [FWMARK_V4, SOURCE_V6], id="remove"),
        pytest.param({FWMARK_V4, FWMARK_V6}, {FWMARK_V4, FWMARK_V6}, [], [], id="in-sync"),
        pytest.param({FWMARK_V4}, {FWMARK_V6}, [FWMARK_V4], [FWMARK_V6], id="family-is-identity"),
        pytest.param({FWMARK_V4}, {dataclasses.replace(FWMARK_V4, fwmask=0xFFFFFFFF)},
                     [FWMARK_V4], [dataclasses.replace(FWMARK_V4, fwmask=0xFFFFFFFF)], id="mask-is-identity"),
        pytest.param({FWMARK_V4}, {dataclasses.replace(FWMARK_V4, table=102)},
                     [FWMARK_V4], [dataclasses.replace(FWMARK_V4, table=102)], id="table-is-identity"),
        pytest.param({FWMARK_V4}, {dataclasses.replace(FWMARK_V4, priority=10101)},
                     [FWMARK_V4], [dataclasses.replace(FWMARK_V4, priority=10101)], id="priority-is-identity"),
        pytest.param({SUPPRESS_V4}, {dataclasses.replace(SUPPRESS_V4, suppress_prefixlength=0xFFFFFFFF)},
                     [SUPPRESS_V4], [dataclasses.replace(SUPPRESS_V4, suppress_prefixlength=0xFFFFFFFF)],
                     id="suppress-is-identity"),
    ],
)
def test_rules(desired: set[Rule], have: set[Rule], add: list[Rule], remove: list[Rule]) -> None:
    plan = diff(state(rules=frozenset(desired)), actual(rules=frozenset(have)))
    assert list(plan.rules_add) == sorted(add)
    assert list(plan.rules_remove) == sorted(remove)
    assert plan.empty is (not add and not remove)


# ---------------------------------------------------------------- routes


VIA_OTHER = dataclasses.replace(DEFAULT_V4, gateway="198.51.100.2")


@pytest.mark.parametrize(
    ("desired", "have", "to_set", "remove"),
    [
        pytest.param({DEFAULT_V4, CONNECTED_V4}, set(), [(DEFAULT_V4, None), (CONNECTED_V4, None)], [], id="add"),
        pytest.param(set(), {DEFAULT_V4, UNREACHABLE_V6}, [], [DEFAULT_V4, UNREACHABLE_V6], id="remove"),
        pytest.param({DEFAULT_V4, UNREACHABLE_V6}, {DEFAULT_V4, UNREACHABLE_V6}, [], [], id="in-sync"),
        pytest.param({VIA_OTHER}, {DEFAULT_V4}, [(VIA_OTHER, DEFAULT_V4)], [], id="gateway-change-replaces"),
        pytest.param({dataclasses.replace(DEFAULT_V4, onlink=True)}, {DEFAULT_V4},
                     [(dataclasses.replace(DEFAULT_V4, onlink=True), DEFAULT_V4)], [], id="onlink-change-replaces"),
        pytest.param({dataclasses.replace(DEFAULT_V4, oif=3, ifname="eth1")}, {DEFAULT_V4},
                     [(dataclasses.replace(DEFAULT_V4, oif=3, ifname="eth1"), DEFAULT_V4)], [],
                     id="device-change-replaces"),
        pytest.param({dataclasses.replace(DEFAULT_V4, metric=5)}, {DEFAULT_V4},
                     [(dataclasses.replace(DEFAULT_V4, metric=5), None)], [DEFAULT_V4], id="metric-is-another-slot"),
        pytest.param({dataclasses.replace(DEFAULT_V4, table=102)}, {DEFAULT_V4},
                     [(dataclasses.replace(DEFAULT_V4, table=102), None)], [DEFAULT_V4], id="table-is-another-slot"),
        pytest.param({DEFAULT_V4}, {dataclasses.replace(DEFAULT_V4, ifname="")}, [], [],
                     id="ifname-is-only-for-display"),
    ],
)
def test_routes(desired: set[Route], have: set[Route], to_set: list[tuple[Route, Route | None]],
                remove: list[Route]) -> None:
    got_set, got_remove = diff_routes(frozenset(desired), frozenset(have))
    assert list(got_set) == to_set
    assert list(got_remove) == remove
    plan = diff(state(routes=frozenset(desired)), actual(routes=frozenset(have)))
    assert (plan.routes_set, plan.routes_remove) == (got_set, got_remove)


def test_replaced_route_is_not_also_removed() -> None:
    """The replace takes the old route's slot: deleting it afterwards would delete the new one."""
    plan = diff(state(routes=frozenset({VIA_OTHER})), actual(routes=frozenset({DEFAULT_V4})))
    assert plan.routes_set == ((VIA_OTHER, DEFAULT_V4),)
    assert plan.routes_remove == ()


# ---------------------------------------------------------------- nft


@pytest.mark.parametrize(
    ("desired", "have", "expected"),
    [
        pytest.param(TABLE, TABLE, NftUpdate(), id="in-sync"),
        pytest.param(TABLE, None, NftUpdate(replace=True), id="missing-replace"),
        pytest.param(TABLE, table(PICK, OUTPUT), NftUpdate(replace=True), id="chain-missing-replace"),
        pytest.param(TABLE, table(PICK, OUTPUT, POST, NftChain("extra", None, ())), NftUpdate(replace=True),
                     id="extra-chain-replace"),
        pytest.param(TABLE, table(PICK, dataclasses.replace(OUTPUT, base=BaseHook("filter", "output", -150)), POST),
                     NftUpdate(replace=True), id="hook-type-differs-replace"),
        pytest.param(TABLE, table(PICK, dataclasses.replace(OUTPUT, base=BaseHook("route", "output", 0)), POST),
                     NftUpdate(replace=True), id="hook-priority-differs-replace"),
        pytest.param(TABLE, table(PICK, dataclasses.replace(OUTPUT, base=None), POST),
                     NftUpdate(replace=True), id="hook-lost-replace"),
        pytest.param(table(PICK_FAILED_OVER, OUTPUT, POST), TABLE, NftUpdate(chains=("pick_0",)),
                     id="one-chain-comments-differ-refill"),
        pytest.param(table(PICK_FAILED_OVER, OUTPUT, dataclasses.replace(POST, rules=(rule("masquerade", "m #1"),))),
                     TABLE, NftUpdate(chains=("pick_0", "postrouting")), id="two-chains-refill-in-table-order"),
        pytest.param(TABLE, table(PICK, dataclasses.replace(OUTPUT, rules=()), POST),
                     NftUpdate(chains=("output",)), id="rule-deleted-refill"),
        pytest.param(TABLE, table(PICK, dataclasses.replace(OUTPUT, rules=OUTPUT.rules * 2), POST),
                     NftUpdate(chains=("output",)), id="rule-duplicated-refill"),
        pytest.param(table(PICK_FAILED_OVER, OUTPUT, dataclasses.replace(POST, rules=(MASQUERADE,))), TABLE,
                     NftUpdate(replace=True), id="chain-outside-raw-vocabulary-replace"),
        pytest.param(TABLE, table(POST, OUTPUT, PICK), NftUpdate(), id="chain-order-irrelevant"),
        pytest.param(None, TABLE, NftUpdate(remove=True), id="not-desired-remove"),
        pytest.param(None, None, NftUpdate(), id="neither"),
    ],
)
def test_nft(desired: NftTable | None, have: NftTable | None, expected: NftUpdate) -> None:
    assert diff_nft(desired, have) == expected


def test_nft_compares_comments_not_expression_echo() -> None:
    """nft echoes expressions back in its own form; the comment's digest is the identity."""
    echoed = NftChain("pick_0", None, (NftRule('[{"goto": {"target": "set_wan1"}}]', "", "pick #aaaaaaaaaa"),))
    assert diff_nft(TABLE, table(echoed, OUTPUT, POST)) == NftUpdate()


# ---------------------------------------------------------------- whole plan


def test_in_sync_is_an_empty_plan() -> None:
    rules = frozenset({FWMARK_V4, FWMARK_V6, SUPPRESS_V4, SOURCE_V6})
    routes = frozenset({DEFAULT_V4, CONNECTED_V4, UNREACHABLE_V6})
    plan = diff(state(rules, routes), actual(rules, routes))
    assert plan.empty
    assert plan.lines() == []


def test_sysctls_pass_through() -> None:
    svm = Sysctl("net/ipv4/conf/all/src_valid_mark", "1", "the rp_filter check must honour the fwmark")
    plan = diff(state(sysctls=(svm,)), actual())
    assert plan.sysctls == (svm,)
    assert not plan.empty


def test_plan_lines() -> None:
    svm = Sysctl("net/ipv4/conf/all/src_valid_mark", "1", "the rp_filter check must honour the fwmark")
    plan = diff(
        state(frozenset({FWMARK_V4}), frozenset({VIA_OTHER, CONNECTED_V4}), sysctls=(svm,)),
        actual(frozenset({FWMARK_V6}), frozenset({DEFAULT_V4, UNREACHABLE_V6}), None),
    )
    lines = plan.lines()
    assert lines[:4] == [
        "~ sysctl net.ipv4.conf.all.src_valid_mark=1  (the rp_filter check must honour the fwmark)",
        "~ ip route default via 198.51.100.2 dev eth0 table 101 proto markrouted"
        "  (was: ip route default via 198.51.100.1 dev eth0 table 101 proto markrouted)",
        "+ ip route 198.51.100.0/24 dev eth0 table 101 proto markrouted scope link src 198.51.100.10",
        "+ ip rule 10100: from all fwmark 0x10000/0xff0000 lookup 101 proto markrouted",
    ]
    assert lines[4] == "+ nft table inet markrouted (replaced in one transaction):"
    assert lines[5:-2] == ["    " + line for line in TABLE.text().splitlines()]
    assert '    \t\tgoto pick_0 comment "policy web #cccccccccc"' in lines
    assert lines[-2:] == [
        "- ip -6 rule 10100: from all fwmark 0x10000/0xff0000 lookup 101 proto markrouted",
        "- ip -6 route unreachable default table 101 proto markrouted metric 4294967294",
    ]


def test_plan_lines_refill() -> None:
    plan = diff(state(nft=table(PICK_FAILED_OVER, OUTPUT, POST)), actual())
    assert plan.lines() == ["~ nft chain inet markrouted pick_0 (refilled):", "    goto set_wan2"]


def test_plan_lines_remove_table() -> None:
    plan = diff(state(nft=None), actual())
    assert plan.lines() == ["- nft table inet markrouted"]


def test_empty_plan_is_empty() -> None:
    assert Plan().empty
    assert Plan().lines() == []
