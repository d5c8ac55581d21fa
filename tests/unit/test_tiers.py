"""Failover tiers, bypass actions, failback and sticky sources: config, derivation, what-if.

The keys' validation (every bad input named by its key path), the chains
derive renders for them, that a failover of a tiered or sticky policy stays a
raw refill of small chains (the fast path), and ``plan --down``'s lines.
"""

from __future__ import annotations

import re

import pytest
from test_derive import SETTINGS, WAN1, WAN2, WORLD, set_link

from markrouted.config import ConfigError, parse
from markrouted.derive import derive
from markrouted.diff import diff
from markrouted.explain import what_if
from markrouted.model import Actual, DesiredState, Health

WAN3 = '[uplinks.wan3]\ninterface = "lan0"\ntable = 103\nmark = 3\n'
UPLINKS = SETTINGS + WAN1 + WAN2 + WAN3


def errors_of(body: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(UPLINKS + '[[policy]]\nname = "x"\n' + body + "\n")
    return list(info.value.errors)


# ------------------------------------------------------------------ config


def test_tiers_parse() -> None:
    p = parse(UPLINKS + '[[policy]]\nname = "x"\nuplinks = [{ wan1 = 3, wan2 = 1 }, "wan3"]\n').policies[0]
    assert p.tier_list == ((("wan1", 3), ("wan2", 1)), (("wan3", 1),))
    assert p.members == ("wan1", "wan2", "wan3")
    assert (p.failback, p.sticky, p.sticky_timeout, p.action, p.label) == ("new-flows", "flow", 600.0, None, None)


def test_plain_lists_and_balance_are_tiers_too() -> None:
    text = UPLINKS + ('[[policy]]\nname = "a"\nuplinks = ["wan2", "wan1"]\n'
                      '[[policy]]\nname = "b"\nbalance = { wan1 = 3, wan2 = 1 }\n')
    a, b = parse(text).policies
    assert a.tier_list == ((("wan2", 1),), (("wan1", 1),))
    assert b.tier_list == ((("wan1", 3), ("wan2", 1)),)
    assert a.tiers == () and b.tiers == ()  # the old forms keep their old values


def test_failback_sticky_action_parse() -> None:
    text = UPLINKS + ('[[policy]]\nname = "m1"\nuplinks = ["wan1"]\nfailback = "migrate"\n'
                      '[[policy]]\nname = "bypass"\naction = "main"\n'
                      '[[policy]]\nname = "m2"\nuplinks = [{ wan1 = 1, wan2 = 1 }]\nfailback = "migrate"\n'
                      'sticky = "source"\nsticky_timeout = "90s"\n'
                      '[[policy]]\nname = "no"\naction = "drop"\n')
    m1, bypass, m2, no = parse(text).policies
    assert (m1.label, m2.label) == (127, 126)  # one label bit each, from the top
    assert (bypass.action, no.action, bypass.tier_list) == ("main", "drop", ())
    assert (m2.sticky, m2.sticky_timeout) == ("source", 90.0)


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param('uplinks = [{ wan1 = 1, wan9 = 1 }, "wan3"]',
                 ['policy[0] (x).uplinks[0].wan9: unknown uplink "wan9"'], id="unknown-in-tier"),
    pytest.param('uplinks = ["wan8", { wan1 = 1 }]', ['policy[0] (x).uplinks[0]: unknown uplink "wan8"'],
                 id="unknown-single"),
    pytest.param('uplinks = [{ wan1 = 1, wan2 = 1 }, "wan1"]',
                 ['policy[0] (x).uplinks[1]: "wan1" is already listed at uplinks[0]'], id="twice-across-tiers"),
    pytest.param('uplinks = ["wan2", { wan1 = 1, wan2 = 1 }]',
                 ['policy[0] (x).uplinks[1].wan2: "wan2" is already listed at uplinks[0]'], id="twice-in-table"),
    pytest.param('uplinks = [{}, "wan1"]',
                 ["policy[0] (x).uplinks[0]: an empty tier: give at least one uplink with its weight"],
                 id="empty-tier"),
    pytest.param("uplinks = []", ["policy[0] (x).uplinks: must not be empty"], id="no-tier"),
    pytest.param("uplinks = [{ wan1 = 0, wan2 = 1001 }]",
                 ["policy[0] (x).uplinks[0].wan1: 0 is out of range 1-1000",
                  "policy[0] (x).uplinks[0].wan2: 1001 is out of range 1-1000"], id="weights"),
    pytest.param('uplinks = [{ wan1 = "3" }]',
                 ["policy[0] (x).uplinks[0].wan1: expected an integer, got string"], id="weight-type"),
    pytest.param('uplinks = [["wan1"]]',
                 ["policy[0] (x).uplinks[0]: expected an uplink name or a table of weights, got array"],
                 id="tier-type"),
    pytest.param('action = "main"\nuplinks = ["wan1"]',
                 ["policy[0] (x): give one of uplinks, balance or action, not uplinks and action"],
                 id="action-with-uplinks"),
    pytest.param('action = "drop"\nbalance = { wan1 = 1 }',
                 ["policy[0] (x): give one of uplinks, balance or action, not balance and action"],
                 id="action-with-balance"),
    pytest.param('action = "reject"', ['policy[0] (x).action: expected "main" or "drop", got "reject"'],
                 id="action-value"),
    pytest.param('action = "main"\nfailback = "migrate"',
                 ["policy[0] (x).failback: has no meaning with action: the traffic uses no uplink"],
                 id="failback-on-action"),
    pytest.param('action = "main"\nsticky = "source"\nsticky_timeout = "1m"',
                 ["policy[0] (x).sticky: has no meaning with action: the traffic uses no uplink",
                  "policy[0] (x).sticky_timeout: has no meaning with action: the traffic uses no uplink"],
                 id="sticky-on-action"),
    pytest.param('action = "drop"\nfallback = "drop"',
                 ["policy[0] (x).fallback: has no meaning with action: the traffic uses no uplink"],
                 id="fallback-on-action"),
    pytest.param('uplinks = ["wan1"]\nsticky_timeout = "500ms"',
                 ["policy[0] (x).sticky_timeout: 500ms is shorter than 1s, the minimum"], id="sticky-timeout-short"),
    pytest.param('uplinks = ["wan1"]\nsticky_timeout = "200h"',
                 ["policy[0] (x).sticky_timeout: 200h is longer than 168h, the maximum"], id="sticky-timeout-long"),
    pytest.param('uplinks = ["wan1"]\nsticky_timeout = 30',
                 ['policy[0] (x).sticky_timeout: expected a duration with a unit such as "2s", got 30'],
                 id="sticky-timeout-type"),
    pytest.param('uplinks = ["wan1"]\nfailback = "now"',
                 ['policy[0] (x).failback: expected "new-flows" or "migrate", got "now"'], id="failback-value"),
    pytest.param('uplinks = ["wan1"]\nsticky = "host"',
                 ['policy[0] (x).sticky: expected "flow" or "source", got "host"'], id="sticky-value"),
])
def test_bad_input_names_the_key(body: str, expected: list[str]) -> None:
    assert errors_of(body) == expected


def test_too_many_migrating_policies() -> None:
    body = "".join(f'[[policy]]\nname = "p{i}"\nuplinks = ["wan1"]\nfailback = "migrate"\n' for i in range(129))
    with pytest.raises(ConfigError) as info:
        parse(UPLINKS + body)
    assert info.value.errors == ('policy: 129 policies with failback = "migrate", more than 128, the maximum '
                                 "(one conntrack label bit each)",)


# ------------------------------------------------------------------ derive

TIERED = UPLINKS + """
[[policy]]
name = "vpn"
daddr = ["10.0.0.0/8"]
action = "main"

[[policy]]
name = "smtp"
dport = [25]
action = "drop"

[[policy]]
name = "web"
dport = [443]
uplinks = [{ wan1 = 1, wan2 = 3 }, "wan3"]
failback = "migrate"
sticky = "source"
sticky_timeout = "30s"
"""
#: wan3 (lan0) usable: a default route on it
WORLD3 = WORLD.__class__(**{**WORLD.__dict__, "defaults": (*WORLD.defaults, WORLD.defaults[0].__class__(
    2, 4, "192.0.2.254", 300))})


def chain(state: DesiredState, name: str) -> list[str]:
    assert state.nft is not None
    found = state.nft.chain(name)
    assert found is not None, name
    # the policies' named counters are the counters' business (tests/unit/test_derive.py)
    return [re.sub(r"counter name \S+ ", "", r.text) for r in found.rules]


def test_bypass_and_label_in_the_hook_chains() -> None:
    state = derive(parse(TIERED), WORLD3)
    rules = [t for t in chain(state, "prerouting") if "policy" not in t and ("10.0.0.0" in t or "dport" in t)]
    assert rules == [
        "ip daddr 10.0.0.0/8 return",
        "meta l4proto { tcp, udp, sctp, udplite } th dport 25 drop",
        "meta l4proto { tcp, udp, sctp, udplite } th dport 443 ct label set 127 goto sticky_2",
    ]
    assert chain(state, "output")[-3:] == rules


def test_tier_choice_and_sticky_chains() -> None:
    state = derive(parse(TIERED), WORLD3)
    assert chain(state, "pick_0") == ["numgen random mod 4 < 1 goto set_wan1", "goto set_wan2"]
    assert chain(state, "alive_pick_0_wan1") == ["goto set_wan1"]
    assert chain(state, "alive_pick_0_wan3") == []  # not in the carrying tier: its entries are not obeyed
    sticky = chain(state, "sticky_2")
    assert sticky[0] == "meta mark & 0x00ff0000 0 ip saddr @sticky_2_wan1_4 jump alive_pick_0_wan1"
    assert "meta mark & 0x00ff0000 0 jump pick_0" in sticky
    assert sticky[-1] == "meta nfproto ipv6 meta mark & 0x00ff0000 0x00030000 update @sticky_2_wan3_6 { ip6 saddr }"
    assert state.nft is not None
    assert {s.name for s in state.nft.sets} == {f"sticky_2_wan{i}_{f}" for i in (1, 2, 3) for f in (4, 6)}
    first = state.nft.sets[0]
    assert (first.dynamic, first.learns, first.timeout, first.version) == (True, True, 30, 4)
    assert "\tset sticky_2_wan1_4 {\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 30s" in state.nft.text()
    web = next(p for p in state.policies if p.name == "web")
    assert (web.active, web.tier, web.tiers, web.label) == (("wan1", "wan2"), 0, (("wan1", "wan2"), ("wan3",)), 127)
    vpn = next(p for p in state.policies if p.name == "vpn")
    assert (vpn.action, vpn.active) == ("main", ())


@pytest.mark.parametrize(("down", "active", "alive3"), [
    (("eth0",), ("wan2",), []),
    (("eth0", "eth1"), ("wan3",), ["meta nfproto ipv4 goto set_wan3"]),  # wan3 has no IPv6
])
def test_failover_between_tiers_is_a_raw_refill(down: tuple[str, ...], active: tuple[str, ...],
                                                alive3: list[str]) -> None:
    config = parse(TIERED)
    before = derive(config, WORLD3)
    world = WORLD3
    for name in down:
        world = set_link(world, name, carrier=False)
    after = derive(config, world)
    assert next(p for p in after.policies if p.name == "web").active == active
    assert chain(after, "alive_pick_0_wan3") == alive3
    assert before.nft is not None
    plan = diff(after, Actual(before.rules, before.routes, before.nft))
    assert not plan.nft.replace and plan.nft.chains  # the fast path: small chains, one raw batch
    assert set(plan.nft.chains) <= {"pick_0", "alive_pick_0_wan1", "alive_pick_0_wan2", "alive_pick_0_wan3"}


def test_health_down_moves_the_policy_to_the_next_tier() -> None:
    config = parse(TIERED)
    state = derive(config, WORLD3, {"wan1": Health(False, "x"), "wan2": Health(False, "x")})
    web = next(p for p in state.policies if p.name == "web")
    assert (web.active, web.tier) == (("wan3",), 1)


# ------------------------------------------------------------------ what-if


def test_what_if_lines() -> None:
    config = parse(TIERED)
    now = derive(config, WORLD3)
    then = derive(config, WORLD3, {"wan1": Health(False, "what-if: --down")})
    assert now.nft is not None
    plan = diff(then, Actual(now.rules, now.routes, now.nft))
    lines = what_if(now, then, plan, 0x00FF0000, {"wan1": 7})
    assert lines[:3] == ["uplink down: wan1", "policy moved: web was=wan1,wan2 now=wan2",
                         "nft chains refilled: pick_0, alive_pick_0_wan1"]
    assert "conntrack cleared: wan1 ct mark 0x10000/0xff0000 (7 entries now)" in lines
    assert lines[-1] == "1 uplinks down, 1 policies moved, 1 kernel writes, 7 conntrack entries cleared"
    nothing = what_if(now, now, diff(now, Actual(now.rules, now.routes, now.nft)), 0x00FF0000, {})
    assert nothing == ["0 uplinks down, 0 policies moved, 0 kernel writes, 0 conntrack entries cleared"]
