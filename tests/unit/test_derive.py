"""derive(): config + observed kernel facts + health -> the exact desired state.

A hand-built world of two uplinks (eth0: wan1, eth1: wan2) and a LAN, changed
one fact at a time. Rules and routes are compared as ``ip`` would print them,
nft chains as ``nft`` would, and the mark arithmetic on the JSON that is sent.
The other unit test modules build on the world defined here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from markrouted import diff
from markrouted.config import Config, parse
from markrouted.derive import derive
from markrouted.model import (
    AF_INET,
    AF_INET6,
    Address,
    DesiredState,
    Health,
    Link,
    MainDefault,
    NftRule,
    NftTable,
    NftUpdate,
    Observed,
    Route,
    Rule,
)

V4, V6 = AF_INET, AF_INET6
MASK = 0x00FF0000
FULL = 0xFFFFFFFF
ETH0, ETH1, LAN0 = 2, 3, 4

SETTINGS = """\
[settings]
mark_mask = 0x00ff0000
rule_priority = 10000
"""

WAN1 = """\
[uplinks.wan1]
interface = "eth0"
table = 101
mark = 1
"""

WAN2 = """\
[uplinks.wan2]
interface = "eth1"
table = 102
mark = 2
"""

FAILOVER = """\
[[policy]]
name = "web"
dport = [80, 443]
uplinks = ["wan1", "wan2"]
"""


def config(policies: str = FAILOVER, uplinks: str = WAN1 + WAN2, settings: str = SETTINGS) -> Config:
    """A parsed config: settings, uplinks and policies given as TOML text."""
    return parse(settings + uplinks + policies)


def policy(body: str, name: str = "p", targets: str = 'uplinks = ["wan1", "wan2"]') -> Config:
    """The two-uplink config with one policy of ``body``."""
    return config(f'[[policy]]\nname = "{name}"\n{targets}\n{body}\n')


#: Both uplinks up, dual stack; wan1 learns an IPv6 link-local router (RA), wan2 a global one.
WORLD = Observed(
    links=(
        Link(1, "lo", True, True),
        Link(ETH0, "eth0", True, True),
        Link(ETH1, "eth1", True, True),
        Link(LAN0, "lan0", True, True),
    ),
    addresses=(
        Address(ETH0, V4, "198.51.100.10", 24),
        Address(ETH0, V6, "2001:db8:1::10", 64),
        Address(ETH0, V6, "fe80::10", 64, link_local=True),
        Address(ETH1, V4, "203.0.113.10", 24),
        Address(ETH1, V6, "2001:db8:2::10", 64),
        Address(ETH1, V6, "fe80::20", 64, link_local=True),
        Address(LAN0, V4, "192.0.2.1", 24),
    ),
    defaults=(
        MainDefault(V4, ETH0, "198.51.100.1", 100),
        MainDefault(V6, ETH0, "fe80::1", 1024),
        MainDefault(V4, ETH1, "203.0.113.1", 200),
        MainDefault(V6, ETH1, "2001:db8:2::1", 1024),
    ),
    sysctls={
        "net/ipv4/conf/all/src_valid_mark": "0",
        "net/ipv4/conf/all/rp_filter": "0",
        "net/ipv4/conf/eth0/rp_filter": "1",
        "net/ipv4/conf/eth1/rp_filter": "2",
    },
)


# --------------------------------------------------------------- world editing


def set_link(obs: Observed, name: str, **changes: bool) -> Observed:
    links = tuple(dataclasses.replace(ln, **changes) if ln.name == name else ln for ln in obs.links)
    return dataclasses.replace(obs, links=links)


def without_link(obs: Observed, name: str) -> Observed:
    return dataclasses.replace(obs, links=tuple(ln for ln in obs.links if ln.name != name))


def without_addresses(obs: Observed, index: int, family: int | None = None) -> Observed:
    keep = tuple(a for a in obs.addresses if not (a.index == index and family in (None, a.family)))
    return dataclasses.replace(obs, addresses=keep)


def with_addresses(obs: Observed, *addresses: Address) -> Observed:
    return dataclasses.replace(obs, addresses=obs.addresses + addresses)


def without_defaults(obs: Observed, index: int, family: int | None = None) -> Observed:
    keep = tuple(d for d in obs.defaults if not (d.index == index and family in (None, d.family)))
    return dataclasses.replace(obs, defaults=keep)


def with_sysctls(obs: Observed, **values: str) -> Observed:
    """Sysctls given as keyword arguments: ``all_rp_filter``, ``eth0_rp_filter``, ``src_valid_mark``."""
    sysctls = dict(obs.sysctls)
    for key, value in values.items():
        if key == "src_valid_mark":
            path = "net/ipv4/conf/all/src_valid_mark"
        else:
            iface, _, _ = key.partition("_")
            path = f"net/ipv4/conf/{iface}/rp_filter"
        if value == "absent":
            sysctls.pop(path, None)
        else:
            sysctls[path] = value
    return dataclasses.replace(obs, sysctls=sysctls)


# --------------------------------------------------------------- reading results


def texts(rules_or_routes: Any) -> set[str]:
    return {str(x) for x in rules_or_routes}


def chain(state: DesiredState, name: str) -> list[str]:
    """The rules of one chain, as nft shows them."""
    assert state.nft is not None
    found = state.nft.chain(name)
    assert found is not None, f"no chain {name}"
    return [r.text for r in found.rules]


def policy_rules(state: DesiredState, hook: str) -> list[str]:
    """The policy rules of a hook chain (without the fixed head of the chain), counters aside.

    Every policy rule counts into its policy's named counter just before its
    goto (``test_named_counters`` checks that); left out here for brevity.
    """
    return [re.sub(r"counter name \S+ ", "", r.text) for r in policy_rule_objects(state, hook)]


def policy_rule_objects(state: DesiredState, hook: str) -> list[NftRule]:
    assert state.nft is not None
    found = state.nft.chain(hook)
    assert found is not None
    return [r for r in found.rules if r.comment.startswith("policy ")]


def uplink(state: DesiredState, name: str) -> Any:
    return next(u for u in state.uplinks if u.name == name)


def active(state: DesiredState, name: str) -> tuple[str, ...]:
    return next(p.active for p in state.policies if p.name == name)


def walk(obj: Any) -> Iterator[Any]:
    yield obj
    if isinstance(obj, dict):
        for value in obj.values():
            yield from walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from walk(value)


def table_json(table: NftTable, prefix: str = "") -> list[Any]:
    return [r.expr for c in table.chains if c.name.startswith(prefix) for r in c.rules]


DOWN = Health(False, "3 probes to 192.0.2.53 failed")


# =============================================================== rules


TWO_UPLINK_RULES = {
    "ip rule 10000: from all lookup main suppress_prefixlength 0 proto markrouted",
    "ip -6 rule 10000: from all lookup main suppress_prefixlength 0 proto markrouted",
    "ip rule 10100: from all fwmark 0x10000/0xff0000 lookup 101 proto markrouted",
    "ip -6 rule 10100: from all fwmark 0x10000/0xff0000 lookup 101 proto markrouted",
    "ip rule 10100: from all fwmark 0x20000/0xff0000 lookup 102 proto markrouted",
    "ip -6 rule 10100: from all fwmark 0x20000/0xff0000 lookup 102 proto markrouted",
    "ip rule 10200: from 198.51.100.10 lookup 101 proto markrouted",
    "ip -6 rule 10200: from 2001:db8:1::10 lookup 101 proto markrouted",
    "ip rule 10200: from 203.0.113.10 lookup 102 proto markrouted",
    "ip -6 rule 10200: from 2001:db8:2::10 lookup 102 proto markrouted",
}


def test_rules_exact() -> None:
    state = derive(config(), WORLD)
    assert texts(state.rules) == TWO_UPLINK_RULES
    # the identities behind the text: these are what the kernel echoes back
    assert Rule(V4, 10000, 254, suppress_prefixlength=0) in state.rules
    assert Rule(V6, 10100, 102, fwmark=0x20000, fwmask=MASK) in state.rules
    assert Rule(V6, 10200, 101, src="2001:db8:1::10", src_len=128) in state.rules


def test_rules_of_spec_example() -> None:
    from test_config import DOC_EXAMPLE

    state = derive(parse(DOC_EXAMPLE), WORLD)
    assert texts(state.rules) == TWO_UPLINK_RULES


def test_rules_follow_rule_priority_and_mask() -> None:
    settings = "[settings]\nmark_mask = 0x0000f000\nrule_priority = 20000\nkeep_main_routes = false\n"
    state = derive(config(settings=settings), WORLD)
    assert texts(state.rules) == {
        "ip rule 20100: from all fwmark 0x1000/0xf000 lookup 101 proto markrouted",
        "ip -6 rule 20100: from all fwmark 0x1000/0xf000 lookup 101 proto markrouted",
        "ip rule 20100: from all fwmark 0x2000/0xf000 lookup 102 proto markrouted",
        "ip -6 rule 20100: from all fwmark 0x2000/0xf000 lookup 102 proto markrouted",
        "ip rule 20200: from 198.51.100.10 lookup 101 proto markrouted",
        "ip -6 rule 20200: from 2001:db8:1::10 lookup 101 proto markrouted",
        "ip rule 20200: from 203.0.113.10 lookup 102 proto markrouted",
        "ip -6 rule 20200: from 2001:db8:2::10 lookup 102 proto markrouted",
    }


def test_rules_stay_while_an_uplink_is_down() -> None:
    """Failover is decided in nftables: the fwmark rules do not flap with the uplink."""
    down = derive(config(), set_link(WORLD, "eth0", up=False))
    sick = derive(config(), WORLD, {"wan1": DOWN})
    assert texts(down.rules) == texts(sick.rules) == TWO_UPLINK_RULES


def test_source_rules_skip_link_local_and_tentative_addresses() -> None:
    obs = with_addresses(WORLD, Address(ETH1, V6, "2001:db8:2::99", 64, tentative=True))
    state = derive(config(), obs)
    assert texts(state.rules) == TWO_UPLINK_RULES


def test_source_rule_per_address() -> None:
    obs = with_addresses(WORLD, Address(ETH0, V4, "198.51.100.11", 24))
    state = derive(config(), obs)
    assert texts(state.rules) - TWO_UPLINK_RULES == {"ip rule 10200: from 198.51.100.11 lookup 101 proto markrouted"}


def test_missing_interface_keeps_fwmark_rules_only() -> None:
    state = derive(config(), without_link(WORLD, "eth0"))
    assert {r for r in texts(state.rules) if "lookup 101" in r} == {
        "ip rule 10100: from all fwmark 0x10000/0xff0000 lookup 101 proto markrouted",
        "ip -6 rule 10100: from all fwmark 0x10000/0xff0000 lookup 101 proto markrouted",
    }


# =============================================================== routes


UNREACHABLE_101 = {
    "ip route unreachable default table 101 proto markrouted metric 4294967294",
    "ip -6 route unreachable default table 101 proto markrouted metric 4294967294",
}
TABLE_101 = UNREACHABLE_101 | {
    "ip route default via 198.51.100.1 dev eth0 table 101 proto markrouted",
    "ip route 198.51.100.0/24 dev eth0 table 101 proto markrouted scope link src 198.51.100.10",
    "ip -6 route default via fe80::1 dev eth0 table 101 proto markrouted metric 1024",
    "ip -6 route 2001:db8:1::/64 dev eth0 table 101 proto markrouted src 2001:db8:1::10 metric 1024",
}
TABLE_102 = {
    "ip route unreachable default table 102 proto markrouted metric 4294967294",
    "ip -6 route unreachable default table 102 proto markrouted metric 4294967294",
    "ip route default via 203.0.113.1 dev eth1 table 102 proto markrouted",
    "ip route 203.0.113.0/24 dev eth1 table 102 proto markrouted scope link src 203.0.113.10",
    "ip -6 route default via 2001:db8:2::1 dev eth1 table 102 proto markrouted metric 1024",
    "ip -6 route 2001:db8:2::/64 dev eth1 table 102 proto markrouted src 2001:db8:2::10 metric 1024",
}


def test_routes_exact() -> None:
    state = derive(config(), WORLD)
    assert texts(state.routes) == TABLE_101 | TABLE_102
    assert Route(V4, 101, "0.0.0.0/0", 0, ETH0, gateway="198.51.100.1") in state.routes
    assert Route(V6, 102, "::/0", 0xFFFFFFFE, 0, type=7) in state.routes
    assert Route(V4, 101, "198.51.100.0/24", 0, ETH0, prefsrc="198.51.100.10", scope=253) in state.routes


def tables_101(state: DesiredState) -> set[str]:
    return {t for t in texts(state.routes) if "table 101" in t}


@pytest.mark.parametrize(
    ("wan1", "obs", "expected"),
    [
        pytest.param(WAN1, set_link(WORLD, "eth0", up=False), UNREACHABLE_101, id="admin-down-only-safety-net"),
        pytest.param(WAN1, without_link(WORLD, "eth0"), UNREACHABLE_101, id="missing-interface-only-safety-net"),
        pytest.param(WAN1, set_link(WORLD, "eth0", carrier=False), TABLE_101, id="no-carrier-keeps-routes"),
        pytest.param(
            WAN1 + 'gateway = "192.0.2.254"\n',
            WORLD,
            TABLE_101 - {"ip route default via 198.51.100.1 dev eth0 table 101 proto markrouted"}
            | {"ip route default via 192.0.2.254 dev eth0 table 101 proto markrouted onlink"},
            id="gateway-outside-prefix-is-onlink",
        ),
        pytest.param(
            WAN1 + 'gateway = "198.51.100.254"\ngateway6 = "2001:db8:1::1"\n',
            without_defaults(WORLD, ETH0),
            {t.replace("via 198.51.100.1 ", "via 198.51.100.254 ").replace("via fe80::1 ", "via 2001:db8:1::1 ")
             for t in TABLE_101},
            id="explicit-gateways-need-no-main-default",
        ),
        pytest.param(
            WAN1,
            with_addresses(without_addresses(WORLD, ETH0, V4), Address(ETH0, V4, "198.51.100.10", 32)),
            {t for t in TABLE_101 if "198.51.100.0/24" not in t and "default via 198" not in t}
            | {"ip route 198.51.100.10/32 dev eth0 table 101 proto markrouted scope link src 198.51.100.10",
               "ip route default via 198.51.100.1 dev eth0 table 101 proto markrouted onlink"},
            id="dhcp-gateway-outside-a-host-prefix-is-onlink",
        ),
        pytest.param(
            WAN1 + 'gateway = "none"\n',
            WORLD,
            TABLE_101 - {"ip route default via 198.51.100.1 dev eth0 table 101 proto markrouted"}
            | {"ip route default dev eth0 table 101 proto markrouted scope link"},
            id="gateway-none-is-a-device-route",
        ),
        pytest.param(
            WAN1 + 'gateway6 = "none"\n',
            WORLD,
            TABLE_101 - {"ip -6 route default via fe80::1 dev eth0 table 101 proto markrouted metric 1024"},
            id="gateway6-none-no-v6-default",
        ),
        pytest.param(
            WAN1,
            without_defaults(WORLD, ETH0, V6),
            TABLE_101 - {"ip -6 route default via fe80::1 dev eth0 table 101 proto markrouted metric 1024"},
            id="no-router-advertisement-no-v6-default",
        ),
        pytest.param(
            WAN1,
            without_addresses(WORLD, ETH0, V6),
            {t for t in TABLE_101 if not t.startswith("ip -6") or "unreachable" in t},
            id="no-v6-address-no-v6-routes",
        ),
        pytest.param(
            WAN1,
            with_addresses(WORLD, Address(ETH0, V4, "198.51.100.11", 24)),
            TABLE_101,
            id="secondary-address-in-same-prefix-one-connected-route",
        ),
        pytest.param(
            WAN1,
            with_addresses(WORLD, Address(ETH0, V4, "192.0.2.200", 28)),
            TABLE_101 | {"ip route 192.0.2.192/28 dev eth0 table 101 proto markrouted scope link src 192.0.2.200"},
            id="second-prefix-second-connected-route",
        ),
    ],
)
def test_routes_of_one_uplink(wan1: str, obs: Observed, expected: set[str]) -> None:
    state = derive(config(uplinks=wan1 + WAN2), obs)
    assert tables_101(state) == expected


def test_routes_have_one_slot_each() -> None:
    """Two desired routes with one key would replace each other on every pass, forever."""
    obs = with_addresses(WORLD, Address(ETH0, V4, "198.51.100.11", 24), Address(ETH0, V6, "2001:db8:1::11", 64))
    state = derive(config(), obs)
    keys = [r.key for r in state.routes]
    assert len(keys) == len(set(keys))


def test_lowest_metric_main_default_is_learnt() -> None:
    obs = dataclasses.replace(WORLD, defaults=(MainDefault(V4, ETH0, "198.51.100.2", 50), *WORLD.defaults))
    state = derive(config(), obs)
    assert "ip route default via 198.51.100.2 dev eth0 table 101 proto markrouted" in texts(state.routes)
    assert uplink(state, "wan1").gateway == "198.51.100.2"


def test_another_interfaces_default_is_not_learnt() -> None:
    obs = dataclasses.replace(WORLD, defaults=(MainDefault(V4, LAN0, "192.0.2.254"), *without_defaults(WORLD, ETH0).defaults))
    state = derive(config(), obs)
    assert not any("192.0.2.254" in t for t in texts(state.routes))
    assert uplink(state, "wan1").state == "down"


# =============================================================== sysctls


SVM = ("net/ipv4/conf/all/src_valid_mark", "1")
ETH0_LOOSE = ("net/ipv4/conf/eth0/rp_filter", "2")
ETH1_LOOSE = ("net/ipv4/conf/eth1/rp_filter", "2")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param({}, {SVM, ETH0_LOOSE}, id="world-eth0-strict-eth1-loose"),
        pytest.param({"src_valid_mark": "1"}, {ETH0_LOOSE}, id="src-valid-mark-already-set"),
        pytest.param({"src_valid_mark": "absent"}, {SVM, ETH0_LOOSE}, id="src-valid-mark-unread-is-written"),
        pytest.param({"src_valid_mark": "1", "eth0_rp_filter": "0"}, set(), id="rp-filter-off-untouched"),
        pytest.param({"src_valid_mark": "1", "eth0_rp_filter": "2"}, set(), id="rp-filter-loose-untouched"),
        pytest.param({"src_valid_mark": "1", "eth0_rp_filter": "0", "all_rp_filter": "1"},
                     {ETH0_LOOSE}, id="all-strict-makes-eth0-strict"),
        pytest.param({"src_valid_mark": "1", "eth0_rp_filter": "0", "eth1_rp_filter": "0", "all_rp_filter": "1"},
                     {ETH0_LOOSE, ETH1_LOOSE}, id="all-strict-loosens-every-uplink"),
        pytest.param({"src_valid_mark": "1", "eth0_rp_filter": "1", "all_rp_filter": "2"},
                     set(), id="all-loose-wins-over-strict"),
        pytest.param({"src_valid_mark": "1", "eth0_rp_filter": "absent"}, set(), id="interface-sysctl-missing"),
    ],
)
def test_sysctls(values: dict[str, str], expected: set[tuple[str, str]]) -> None:
    state = derive(config(), with_sysctls(WORLD, **values))
    assert {(s.path, s.value) for s in state.sysctls} == expected
    assert all(s.reason for s in state.sysctls), "every sysctl change says why"
    # never the 'all' rp_filter, and never a LAN interface
    assert not any("lan0" in s.path or s.path.endswith("all/rp_filter") for s in state.sysctls)


def test_rp_filter_of_a_missing_uplink_interface_is_left_alone() -> None:
    state = derive(config(), without_link(WORLD, "eth0"))
    assert {(s.path, s.value) for s in state.sysctls} == {SVM}


# =============================================================== uplink status


@pytest.mark.parametrize(
    ("wan1", "obs", "health", "state", "reason", "families"),
    [
        pytest.param(WAN1, WORLD, None, "up", "ok", (V4, V6), id="ok"),
        pytest.param(WAN1, without_link(WORLD, "eth0"), None, "down", "interface eth0 does not exist", (),
                     id="interface-missing"),
        pytest.param(WAN1, set_link(WORLD, "eth0", up=False), None, "down", "link is administratively down", (),
                     id="admin-down"),
        pytest.param(WAN1, set_link(WORLD, "eth0", up=False), DOWN, "down", "link is administratively down", (),
                     id="admin-down-before-health"),
        pytest.param(WAN1, set_link(WORLD, "eth0", carrier=False), None, "down", "no carrier", (), id="no-carrier"),
        pytest.param(WAN1, without_addresses(WORLD, ETH0), None, "down", "no ipv4 address; no ipv6 address", (),
                     id="no-address"),
        pytest.param(WAN1, without_defaults(WORLD, ETH0), None, "down",
                     "no ipv4 default route on eth0 in the main table; no ipv6 default route on eth0 in the main table",
                     (), id="no-gateway"),
        pytest.param(WAN1, WORLD, DOWN, "down", DOWN.reason, (), id="health-down"),
        pytest.param(WAN1, WORLD, Health(True, "probes answered"), "up", "probes answered", (V4, V6),
                     id="health-up"),
        pytest.param(WAN1, without_defaults(WORLD, ETH0, V6), None, "up",
                     "ipv4 only: no ipv6 default route on eth0 in the main table", (V4,), id="v4-only-no-v6-gateway"),
        pytest.param(WAN1, without_addresses(WORLD, ETH0, V6), None, "up", "ipv4 only: no ipv6 address", (V4,),
                     id="v4-only-no-v6-address"),
        pytest.param(WAN1, without_defaults(WORLD, ETH0, V4), None, "up",
                     "ipv6 only: no ipv4 default route on eth0 in the main table", (V6,), id="v6-only"),
        pytest.param(WAN1, with_addresses(without_addresses(WORLD, ETH0, V6),
                                          Address(ETH0, V6, "2001:db8:1::10", 64, tentative=True)),
                     None, "up", "ipv4 only: no ipv6 address", (V4,), id="tentative-address-is-no-address"),
        pytest.param(WAN1 + 'gateway6 = "none"\n', WORLD, None, "up", "ok", (V4,), id="gateway6-none-is-ok"),
        pytest.param(WAN1 + 'gateway6 = "none"\n', without_addresses(WORLD, ETH0, V6), None, "up", "ok", (V4,),
                     id="gateway6-none-without-v6-address-is-ok"),
        pytest.param(WAN1 + 'gateway = "none"\n', without_defaults(WORLD, ETH0, V4), None, "up", "ok", (V4, V6),
                     id="gateway-none-needs-no-default"),
        pytest.param(WAN1 + 'gateway = "198.51.100.254"\n', without_defaults(WORLD, ETH0, V4), None, "up", "ok",
                     (V4, V6), id="explicit-gateway-needs-no-default"),
    ],
)
def test_uplink_status(wan1: str, obs: Observed, health: Health | None, state: str, reason: str,
                       families: tuple[int, ...]) -> None:
    health_map = {"wan1": health} if health else None
    result = derive(config(uplinks=wan1 + WAN2), obs, health_map)
    status = uplink(result, "wan1")
    assert (status.state, status.reason, status.families) == (state, reason, families)
    other = uplink(result, "wan2")
    assert (other.state, other.reason, other.families) == ("up", "ok", (V4, V6))


def test_uplink_status_fields() -> None:
    state = derive(config(), WORLD)
    wan1, wan2 = state.uplinks
    assert (wan1.name, wan1.interface, wan1.table, wan1.mark, wan1.gateway, wan1.gateway6) == (
        "wan1", "eth0", 101, 0x10000, "198.51.100.1", "fe80::1")
    assert (wan2.name, wan2.interface, wan2.table, wan2.mark, wan2.gateway, wan2.gateway6) == (
        "wan2", "eth1", 102, 0x20000, "203.0.113.1", "2001:db8:2::1")


def test_uplink_status_without_gateways() -> None:
    state = derive(config(uplinks=WAN1 + 'gateway = "none"\ngateway6 = "none"\n' + WAN2), without_link(WORLD, "eth1"))
    wan1, wan2 = state.uplinks
    assert (wan1.gateway, wan1.gateway6) == (None, None)
    assert (wan2.state, wan2.gateway, wan2.gateway6) == ("down", None, None)


# =============================================================== policies: failover, balance


@pytest.mark.parametrize(
    ("obs", "health", "fallback", "expected_active", "pick"),
    [
        pytest.param(WORLD, {}, "main", ("wan1",), ["goto set_wan1"], id="first-listed"),
        pytest.param(WORLD, {"wan1": DOWN}, "main", ("wan2",), ["goto set_wan2"], id="health-failover"),
        pytest.param(set_link(WORLD, "eth0", carrier=False), {}, "main", ("wan2",), ["goto set_wan2"],
                     id="carrier-failover"),
        pytest.param(without_link(WORLD, "eth0"), {}, "main", ("wan2",), ["goto set_wan2"], id="missing-failover"),
        pytest.param(WORLD, {"wan1": DOWN, "wan2": DOWN}, "main", (), [], id="none-usable-main"),
        pytest.param(WORLD, {"wan1": DOWN, "wan2": DOWN}, "drop", (), ["drop"], id="none-usable-drop"),
        pytest.param(without_defaults(WORLD, ETH0, V6), {}, "main", ("wan1", "wan2"),
                     ["meta nfproto ipv4 goto set_wan1", "meta nfproto ipv6 goto set_wan2"],
                     id="v4-only-uplink-v6-fails-over"),
        pytest.param(without_defaults(WORLD, ETH0, V6), {"wan2": DOWN}, "main", ("wan1",),
                     ["meta nfproto ipv4 goto set_wan1"], id="v6-falls-back-to-main"),
        pytest.param(without_defaults(WORLD, ETH0, V6), {"wan2": DOWN}, "drop", ("wan1",),
                     ["meta nfproto ipv4 goto set_wan1", "meta nfproto ipv6 drop"], id="v6-dropped"),
    ],
)
def test_failover(obs: Observed, health: Mapping[str, Health], fallback: str,
                  expected_active: tuple[str, ...], pick: list[str]) -> None:
    cfg = policy("", name="web", targets=f'uplinks = ["wan1", "wan2"]\nfallback = "{fallback}"')
    state = derive(cfg, obs, health)
    assert active(state, "web") == expected_active
    assert chain(state, "pick_0") == pick
    # the policy rules themselves never change with the uplinks' state
    assert policy_rules(state, "output") == ["goto pick_0"]


WAN3 = '[uplinks.wan3]\ninterface = "eth2"\ntable = 103\nmark = 3\n'
ETH2 = 5
THREE = dataclasses.replace(
    WORLD,
    links=(*WORLD.links, Link(ETH2, "eth2", True, True)),
    addresses=(*WORLD.addresses, Address(ETH2, V4, "198.18.0.10", 24), Address(ETH2, V6, "2001:db8:3::10", 64)),
    defaults=(*WORLD.defaults, MainDefault(V4, ETH2, "198.18.0.1"), MainDefault(V6, ETH2, "2001:db8:3::1")),
)


@pytest.mark.parametrize(
    ("health", "fallback", "expected_active", "pick"),
    [
        pytest.param({}, "main", ("wan1", "wan2", "wan3"),
                     ["numgen random mod 6 < 3 goto set_wan1", "numgen random mod 3 < 1 goto set_wan2",
                      "goto set_wan3"],
                     id="all-usable"),
        pytest.param({"wan2": DOWN}, "main", ("wan1", "wan3"),
                     ["numgen random mod 5 < 3 goto set_wan1", "goto set_wan3"],
                     id="weights-re-spread"),
        pytest.param({"wan1": DOWN}, "main", ("wan2", "wan3"),
                     ["numgen random mod 3 < 1 goto set_wan2", "goto set_wan3"],
                     id="first-down"),
        pytest.param({"wan1": DOWN, "wan3": DOWN}, "main", ("wan2",), ["goto set_wan2"], id="one-left"),
        pytest.param({"wan1": DOWN, "wan2": DOWN, "wan3": DOWN}, "main", (), [], id="none-main"),
        pytest.param({"wan1": DOWN, "wan2": DOWN, "wan3": DOWN}, "drop", (), ["drop"], id="none-drop"),
    ],
)
def test_balance(health: Mapping[str, Health], fallback: str, expected_active: tuple[str, ...],
                 pick: list[str]) -> None:
    cfg = config(
        f'[[policy]]\nname = "dl"\ndport = [443]\nbalance = {{ wan1 = 3, wan2 = 1, wan3 = 2 }}\nfallback = "{fallback}"\n',
        uplinks=WAN1 + WAN2 + WAN3,
    )
    state = derive(cfg, THREE, health)
    assert active(state, "dl") == expected_active
    assert chain(state, "pick_0") == pick


def test_balance_cascade_json() -> None:
    """A weighted split is a cascade of numgen comparisons (no anonymous map)."""
    cfg = config('[[policy]]\nname = "dl"\nbalance = { wan1 = 3, wan2 = 1 }\n')
    state = derive(cfg, WORLD)
    assert state.nft is not None
    pick = state.nft.chain("pick_0")
    assert pick is not None
    assert [r.expr for r in pick.rules] == [
        [{"match": {"op": "<", "left": {"numgen": {"mode": "random", "mod": 4, "offset": 0}}, "right": 3}},
         {"goto": {"target": "set_wan1"}}],
        [{"goto": {"target": "set_wan2"}}],
    ]


@pytest.mark.parametrize("weights", [(3, 1), (1, 1, 1), (5, 2, 3), (1, 1000)])
def test_balance_cascade_probabilities(weights: tuple[int, ...]) -> None:
    """Each uplink's share of the cascade is exactly its weight over the total."""
    from fractions import Fraction

    names = [f"wan{i + 1}" for i in range(len(weights))]
    body = ", ".join(f"{n} = {w}" for n, w in zip(names, weights))
    ups = WAN1 + WAN2 + WAN3
    cfg = config(f'[[policy]]\nname = "dl"\nbalance = {{ {body} }}\n', uplinks=ups)
    state = derive(cfg, THREE)
    assert state.nft is not None
    pick = state.nft.chain("pick_0")
    assert pick is not None
    left, share = Fraction(1), {}
    for rule in pick.rules:
        target = rule.expr[-1]["goto"]["target"].removeprefix("set_")
        if len(rule.expr) == 1:
            share[target] = left
            break
        ng = rule.expr[0]["match"]
        p = Fraction(ng["right"], ng["left"]["numgen"]["mod"])
        share[target] = left * p
        left *= 1 - p
    total = sum(weights)
    assert share == {n: Fraction(w, total) for n, w in zip(names, weights)}


def test_balance_of_spec_example() -> None:
    from test_config import DOC_EXAMPLE

    state = derive(parse(DOC_EXAMPLE), WORLD)
    assert chain(state, "pick_1") == ["numgen random mod 4 < 3 goto set_wan1", "goto set_wan2"]
    assert active(state, "balanced-downloads") == ("wan1", "wan2")
    assert active(state, "ssh") == ("wan2",)


def test_policies_with_one_target_share_a_pick_chain() -> None:
    cfg = config(
        '[[policy]]\nname = "a"\ndport = [22]\nuplinks = ["wan2", "wan1"]\n'
        '[[policy]]\nname = "b"\ndport = [25]\nuplinks = ["wan1"]\n'
        '[[policy]]\nname = "c"\ndport = [53]\nuplinks = ["wan2", "wan1"]\n'
        '[[policy]]\nname = "d"\ndport = [80]\nuplinks = ["wan2", "wan1"]\nfallback = "drop"\n'
    )
    state = derive(cfg, WORLD)
    assert policy_rules(state, "output") == [
        "meta l4proto { tcp, udp, sctp, udplite } th dport 22 goto pick_0",
        "meta l4proto { tcp, udp, sctp, udplite } th dport 25 goto pick_1",
        "meta l4proto { tcp, udp, sctp, udplite } th dport 53 goto pick_0",
        "meta l4proto { tcp, udp, sctp, udplite } th dport 80 goto pick_2",
    ]
    assert [chain(state, f"pick_{i}") for i in range(3)] == [["goto set_wan2"], ["goto set_wan1"], ["goto set_wan2"]]


# =============================================================== policies: matches, hooks, families


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param("", ["goto pick_0"], id="match-all"),
        pytest.param('family = "ipv4"\nproto = "udp"\ndport = [53]',
                     ["meta nfproto ipv4 meta l4proto udp th dport 53 goto pick_0"], id="v4-only-policy"),
        pytest.param('family = "ipv6"', ["meta nfproto ipv6 goto pick_0"], id="v6-only-policy"),
        pytest.param('proto = "icmp"', ["meta nfproto ipv4 meta l4proto icmp goto pick_0"], id="icmp-is-v4"),
        pytest.param('proto = "icmpv6"', ["meta nfproto ipv6 meta l4proto ipv6-icmp goto pick_0"], id="icmpv6-is-v6"),
        pytest.param('daddr = ["198.51.100.0/24", "2001:db8:5::/48"]',
                     ["ip daddr 198.51.100.0/24 goto pick_0", "ip6 daddr 2001:db8:5::/48 goto pick_0"],
                     id="mixed-daddr-splits"),
        pytest.param('daddr = ["198.51.100.0/24", "203.0.113.0/25"]',
                     ["ip daddr { 198.51.100.0/24, 203.0.113.0/25 } goto pick_0"], id="v4-daddr-set"),
        pytest.param('saddr = ["2001:db8:9::/64"]', ["ip6 saddr 2001:db8:9::/64 goto pick_0"], id="v6-saddr"),
        pytest.param('saddr = ["192.0.2.0/24", "2001:db8:9::/64"]\ndaddr = ["198.51.100.0/24"]',
                     ["ip saddr 192.0.2.0/24 ip daddr 198.51.100.0/24 goto pick_0"],
                     id="v4-daddr-narrows-mixed-saddr"),
        pytest.param('proto = "tcp"\ndport = [22, "2200-2299"]',
                     ["meta l4proto tcp th dport { 22, 2200-2299 } goto pick_0"], id="ports-and-range"),
        pytest.param('sport = [123]', ["meta l4proto { tcp, udp, sctp, udplite } th sport 123 goto pick_0"],
                     id="sport-without-proto"),
        pytest.param('proto = 47', ["meta l4proto 47 goto pick_0"], id="proto-number"),
        pytest.param('uid = [1000, "2000-2999"]\ngid = [100]',
                     ["meta skuid { 1000, 2000-2999 } meta skgid 100 goto pick_0"], id="uid-gid"),
    ],
)
def test_policy_match_rendering(body: str, expected: list[str]) -> None:
    state = derive(policy(body), WORLD)
    assert policy_rules(state, "output") == expected


@pytest.mark.parametrize(
    ("body", "prerouting", "output"),
    [
        pytest.param("", True, True, id="plain-both"),
        pytest.param('iif = "lan0"', True, False, id="iif-forwarded-only"),
        pytest.param("uid = [1000]", False, True, id="uid-local-only"),
        pytest.param("gid = [100]", False, True, id="gid-local-only"),
        pytest.param('cgroup = "system.slice/backup.service"', False, True, id="cgroup-local-only"),
        pytest.param('cgroup = "system.slice/gone.service"', False, False, id="cgroup-missing-omitted"),
    ],
)
def test_policy_hooks(body: str, prerouting: bool, output: bool) -> None:
    obs = dataclasses.replace(WORLD, cgroup_ids={"system.slice/backup.service": 4242})
    state = derive(policy(body), obs)
    assert bool(policy_rules(state, "prerouting")) is prerouting
    assert bool(policy_rules(state, "output")) is output


def test_iif_renders_iifname() -> None:
    state = derive(policy('iif = "lan0"\nproto = "tcp"'), WORLD)
    assert policy_rules(state, "prerouting") == ['meta iifname "lan0" meta l4proto tcp goto pick_0']


def test_spec_example_ssh_policy_cannot_match_anywhere() -> None:
    """iif (forwarded only) ANDed with uid/cgroup (local only) matches nothing: config warns, derive omits it."""
    from test_config import DOC_EXAMPLE

    obs = dataclasses.replace(WORLD, cgroup_ids={"system.slice/backup.service": 4242})
    state = derive(parse(DOC_EXAMPLE), obs)
    assert not any("ssh" in t for t in policy_rules(state, "prerouting") + policy_rules(state, "output"))
    assert policy_rules(state, "output") == ["meta l4proto { tcp, udp, sctp, udplite } th dport 443 goto pick_1"]


@pytest.mark.parametrize(
    ("prefix", "path", "text"),
    [
        ("", "system.slice/backup.service", 'socket cgroupv2 level 2 "system.slice/backup.service"'),
        ("unified", "system.slice/backup.service", 'socket cgroupv2 level 2 "unified/system.slice/backup.service"'),
        ("", "mrtest.slice", 'socket cgroupv2 level 1 "mrtest.slice"'),
    ],
)
def test_cgroup_rendering(prefix: str, path: str, text: str) -> None:
    obs = dataclasses.replace(WORLD, cgroup_prefix=prefix, cgroup_ids={path: 77})
    state = derive(policy(f'cgroup = "{path}"'), obs)
    assert policy_rules(state, "output") == [f"{text} goto pick_0"]


def test_cgroup_level_ignores_the_hybrid_mount() -> None:
    """The level counts inside the cgroup v2 tree: on a hybrid host "unified/mrtest.slice" is level 1."""
    obs = dataclasses.replace(WORLD, cgroup_prefix="unified", cgroup_ids={"mrtest.slice": 77})
    state = derive(policy('cgroup = "mrtest.slice"'), obs)
    assert state.nft is not None
    out = state.nft.chain("output")
    assert out is not None
    rule = next(r for r in out.rules if r.comment.startswith("policy "))
    assert rule.expr[0]["match"]["left"] == {"socket": {"key": "cgroupv2", "level": 1}}
    assert rule.expr[0]["match"]["right"] == "unified/mrtest.slice"


def test_cgroup_id_is_in_the_digest() -> None:
    """A re-created cgroup has a new id; nft resolved the old one, so the rule must be reloaded."""
    cfg = policy('cgroup = "system.slice/backup.service"')
    one = derive(cfg, dataclasses.replace(WORLD, cgroup_ids={"system.slice/backup.service": 100}))
    two = derive(cfg, dataclasses.replace(WORLD, cgroup_ids={"system.slice/backup.service": 101}))
    r1, r2 = (policy_rule_objects(state, "output") for state in (one, two))
    assert [r.expr_json for r in r1] == [r.expr_json for r in r2]
    assert [r.comment for r in r1] != [r.comment for r in r2]
    # the output chain is outside the raw refill's vocabulary: the table is replaced
    assert diff.diff_nft(two.nft, one.nft) == NftUpdate(replace=True)


def test_policies_keep_file_order() -> None:
    cfg = config(
        '[[policy]]\nname = "first"\ndport = [22]\nuplinks = ["wan1"]\n'
        '[[policy]]\nname = "second"\nuplinks = ["wan2"]\n'
    )
    state = derive(cfg, WORLD)
    assert state.nft is not None
    for hook in ("prerouting", "output"):
        found = state.nft.chain(hook)
        assert found is not None
        assert [r.comment.split(" #")[0] for r in found.rules if r.comment.startswith("policy ")] == [
            "policy first", "policy second"]


# =============================================================== the fixed frame of the table


def test_chains_and_hooks() -> None:
    state = derive(config(), WORLD)
    assert state.nft is not None
    assert [(c.name, c.base and (c.base.type, c.base.hook, c.base.prio)) for c in state.nft.chains] == [
        ("set_wan1", None), ("restore_wan1", None), ("in_wan1", None),
        ("set_wan2", None), ("restore_wan2", None), ("in_wan2", None),
        ("rule_priority_10000", None), ("pick_0", None),
        ("prerouting", ("filter", "prerouting", -150)),
        ("output", ("route", "output", -150)),
        ("postrouting", ("nat", "postrouting", 100)),
    ]


def test_hook_chain_heads() -> None:
    state = derive(config(), WORLD)
    head = [
        "ct mark & 0x00ff0000 vmap { 0x00010000 : goto restore_wan1, 0x00020000 : goto restore_wan2 }",
        "meta mark & 0x00ff0000 != 0 return",
        "ct state != new return",
    ]
    assert chain(state, "prerouting") == head + [
        'meta iifname "eth0" goto in_wan1',
        'meta iifname "eth1" goto in_wan2',
        "fib daddr type { local, broadcast, multicast } return",
        "meta l4proto { tcp, udp, sctp, udplite } th dport { 80, 443 } counter name policy_web goto pick_0",
    ]
    assert chain(state, "output") == head + [
        "fib daddr type { local, broadcast, multicast } return",
        "meta l4proto { tcp, udp, sctp, udplite } th dport { 80, 443 } counter name policy_web goto pick_0",
    ]


def test_every_rule_has_a_unique_digest_comment() -> None:
    state = derive(config(), WORLD)
    assert state.nft is not None
    for c in state.nft.chains:
        comments = [r.comment for r in c.rules]
        assert all(" #" in x and len(x.rsplit("#", 1)[1]) == 10 for x in comments)
        assert len(comments) == len(set(comments)), c.name


def test_derive_is_deterministic() -> None:
    assert derive(config(), WORLD) == derive(config(), WORLD)


# =============================================================== masked marks


MASKS = [
    pytest.param(0x00FF0000, (1, 2, 255), id="0x00ff0000"),
    pytest.param(0x0000FF00, (1, 0x80, 0xFF), id="0x0000ff00"),
    pytest.param(0xF0000000, (1, 8, 15), id="0xf0000000-top-bits"),
    pytest.param(0x00000003, (1, 2, 3), id="0x00000003-low-bits"),
    pytest.param(0x0FFFFFF0, (1, 0xFFFFFF, 0x123456), id="0x0ffffff0-wide"),
]


def three_uplinks(mask: int, marks: tuple[int, int, int]) -> Config:
    return config(
        '[[policy]]\nname = "b"\nbalance = { wan1 = 1, wan2 = 1, wan3 = 1 }\n',
        uplinks=(WAN1.replace("mark = 1", f"mark = {marks[0]}") + WAN2.replace("mark = 2", f"mark = {marks[1]}")
                 + WAN3.replace("mark = 3", f"mark = {marks[2]}")),
        settings=f"[settings]\nmark_mask = {mask:#x}\n",
    )


@pytest.mark.parametrize(("mask", "marks"), MASKS)
def test_mark_writes_stay_inside_the_mask(mask: int, marks: tuple[int, int, int]) -> None:
    state = derive(three_uplinks(mask, marks), THREE)
    assert state.nft is not None
    keep = FULL & ~mask
    shift = (mask & -mask).bit_length() - 1
    seen = {"set_": 0, "restore_": 0, "in_": 0}
    for prefix in seen:
        for expr in walk(table_json(state.nft, prefix)):
            if not (isinstance(expr, dict) and "mangle" in expr):
                continue
            seen[prefix] += 1
            key = expr["mangle"]["key"]
            assert key in ({"meta": {"key": "mark"}}, {"ct": {"key": "mark"}})
            # (key & ~mask) | value: every bit outside the mask is kept as it was
            inner, value = expr["mangle"]["value"]["|"]
            assert inner == {"&": [key, keep]}
            assert isinstance(value, int) and value != 0 and value & ~mask == 0
            assert value >> shift in marks
    # set_ writes meta and ct mark, restore_ the meta mark, in_ the ct mark: one each per uplink
    assert seen == {"set_": 6, "restore_": 3, "in_": 3}


@pytest.mark.parametrize(("mask", "marks"), MASKS)
def test_no_mark_write_anywhere_else(mask: int, marks: tuple[int, int, int]) -> None:
    state = derive(three_uplinks(mask, marks), THREE)
    assert state.nft is not None
    for c in state.nft.chains:
        for rule in c.rules:
            for expr in walk(rule.expr):
                if isinstance(expr, dict) and "mangle" in expr:
                    assert c.name.startswith(("set_", "restore_", "in_")), (c.name, rule.text)
                # every read of a mark is masked to markrouted's bits
                if isinstance(expr, dict) and "&" in expr and expr["&"][0] in (
                        {"meta": {"key": "mark"}}, {"ct": {"key": "mark"}}):
                    assert expr["&"][1] in (mask, FULL & ~mask)


@pytest.mark.parametrize(("mask", "marks"), MASKS)
def test_restore_map_keys_are_the_uplink_marks(mask: int, marks: tuple[int, int, int]) -> None:
    state = derive(three_uplinks(mask, marks), THREE)
    assert state.nft is not None
    pre = state.nft.chain("prerouting")
    assert pre is not None
    vmap = pre.rules[0].expr[0]["vmap"]
    assert vmap["key"] == {"&": [{"ct": {"key": "mark"}}, mask]}
    shift = (mask & -mask).bit_length() - 1
    assert [k for k, _ in vmap["data"]["set"]] == [m << shift for m in marks]


def test_mark_chain_text() -> None:
    state = derive(config(), WORLD)
    assert chain(state, "set_wan2") == [
        "meta mark set meta mark & 0xff00ffff | 0x00020000 ct mark set ct mark & 0xff00ffff | 0x00020000"
        " counter name uplink_wan2"]
    assert chain(state, "restore_wan2") == ["meta mark set meta mark & 0xff00ffff | 0x00020000"
                                            " counter name uplink_wan2"]
    assert chain(state, "in_wan2") == ["ct mark set ct mark & 0xff00ffff | 0x00020000"]


# =============================================================== masquerade


@pytest.mark.parametrize(
    ("uplinks", "obs", "expected"),
    [
        pytest.param(WAN1 + WAN2, WORLD, [
            'meta oifname "eth0" ip saddr != 198.51.100.10 masquerade',
            'meta oifname "eth0" ip6 saddr != 2001:db8:1::10 masquerade',
            'meta oifname "eth1" ip saddr != 203.0.113.10 masquerade',
            'meta oifname "eth1" ip6 saddr != 2001:db8:2::10 masquerade',
        ], id="per-family-own-addresses"),
        pytest.param(WAN1 + "masquerade = false\n" + WAN2, WORLD, [
            'meta oifname "eth1" ip saddr != 203.0.113.10 masquerade',
            'meta oifname "eth1" ip6 saddr != 2001:db8:2::10 masquerade',
        ], id="masquerade-off"),
        pytest.param(WAN1 + WAN2, with_addresses(WORLD, Address(ETH0, V4, "198.51.100.11", 24)), [
            'meta oifname "eth0" ip saddr != { 198.51.100.10, 198.51.100.11 } masquerade',
            'meta oifname "eth0" ip6 saddr != 2001:db8:1::10 masquerade',
            'meta oifname "eth1" ip saddr != 203.0.113.10 masquerade',
            'meta oifname "eth1" ip6 saddr != 2001:db8:2::10 masquerade',
        ], id="all-own-addresses"),
        pytest.param(WAN1 + WAN2, without_addresses(WORLD, ETH1, V6), [
            'meta oifname "eth0" ip saddr != 198.51.100.10 masquerade',
            'meta oifname "eth0" ip6 saddr != 2001:db8:1::10 masquerade',
            'meta oifname "eth1" ip saddr != 203.0.113.10 masquerade',
        ], id="no-v6-address-no-v6-masquerade"),
        pytest.param(WAN1 + WAN2, without_link(WORLD, "eth0"), [
            'meta oifname "eth1" ip saddr != 203.0.113.10 masquerade',
            'meta oifname "eth1" ip6 saddr != 2001:db8:2::10 masquerade',
        ], id="missing-interface"),
    ],
)
def test_masquerade(uplinks: str, obs: Observed, expected: list[str]) -> None:
    state = derive(config(uplinks=uplinks), obs)
    assert chain(state, "postrouting") == expected


def test_masquerade_json() -> None:
    state = derive(config(), WORLD)
    assert state.nft is not None
    post = state.nft.chain("postrouting")
    assert post is not None
    assert post.rules[1].expr == [
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}},
        {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "2001:db8:1::10"}},
        {"masquerade": None},
    ]


# =============================================================== nothing to do


def test_no_uplinks_no_state() -> None:
    state = derive(parse("[settings]\nmark_mask = 0x00ff0000\n"), WORLD)
    assert state == DesiredState(frozenset(), frozenset(), None, (), (), ())


def test_no_policies_still_marks_inbound_and_masquerades() -> None:
    """Without policies the table still pins inbound flows to their uplink (replies leave where they came)."""
    state = derive(config(""), WORLD)
    assert texts(state.rules) == TWO_UPLINK_RULES
    assert policy_rules(state, "prerouting") == []
    assert 'meta iifname "eth0" goto in_wan1' in chain(state, "prerouting")
    assert "fib daddr type { local, broadcast, multicast } return" not in chain(state, "output")
    assert len(chain(state, "postrouting")) == 4


# =============================================================== what a change touches


def changed_parts(before: DesiredState, after: DesiredState) -> NftUpdate:
    assert before.rules == after.rules
    assert before.routes == after.routes
    assert before.sysctls == after.sysctls
    return diff.diff_nft(after.nft, before.nft)


@pytest.mark.parametrize(
    ("obs", "health"),
    [
        pytest.param(WORLD, {"wan1": DOWN}, id="health-down"),
        pytest.param(set_link(WORLD, "eth0", carrier=False), {}, id="carrier-lost"),
    ],
)
def test_failover_is_a_small_refill(obs: Observed, health: Mapping[str, Health]) -> None:
    cfg = config(
        '[[policy]]\nname = "a"\ndport = [22]\nuplinks = ["wan1", "wan2"]\n'
        '[[policy]]\nname = "b"\ndport = [25]\nuplinks = ["wan2", "wan1"]\n'
        '[[policy]]\nname = "c"\nbalance = { wan1 = 2, wan2 = 1 }\n'
    )
    before = derive(cfg, WORLD)
    after = derive(cfg, obs, health)
    update = changed_parts(before, after)
    assert not update.replace and not update.remove
    # pick_1 (wan2 first) does not change: wan2 is up throughout
    assert update.chains == ("pick_0", "pick_2")
    assert before.nft is not None and after.nft is not None
    unchanged = [c for c in after.nft.chains if c.name not in update.chains]
    assert all(before.nft.chain(c.name) == c for c in unchanged)


def test_recovery_is_the_same_small_refill_back() -> None:
    cfg = config()
    before = derive(cfg, WORLD, {"wan1": DOWN})
    after = derive(cfg, WORLD, {"wan1": Health(True, "probes answered")})
    assert changed_parts(before, after) == NftUpdate(chains=("pick_0",))


def test_address_change_touches_rules_routes_and_masquerade() -> None:
    obs = with_addresses(without_addresses(WORLD, ETH1, V4), Address(ETH1, V4, "203.0.113.77", 24))
    before, after = derive(config(), WORLD), derive(config(), obs)
    assert texts(before.rules) ^ texts(after.rules) == {
        "ip rule 10200: from 203.0.113.10 lookup 102 proto markrouted",
        "ip rule 10200: from 203.0.113.77 lookup 102 proto markrouted",
    }
    # masquerade is outside the raw refill's vocabulary: the table is replaced
    assert diff.diff_nft(after.nft, before.nft) == NftUpdate(replace=True)


def test_health_of_unknown_uplink_is_ignored() -> None:
    assert derive(config(), WORLD, {"wan9": DOWN}) == derive(config(), WORLD)


def test_state_json_is_serialisable() -> None:
    """The table goes to libnftables as JSON: every rule's expression must round-trip."""
    state = derive(config(), WORLD)
    assert state.nft is not None
    for c in state.nft.chains:
        for r in c.rules:
            assert json.loads(json.dumps(r.expr)) == r.expr


# =============================================================== named counters


def test_named_counters() -> None:
    """Each policy rule counts into its policy's counter; set_ and restore_ into the uplink's."""
    cfg = parse(WAN1 + WAN2 + """
[[policy]]
name = "a:b"
uplinks = ["wan1"]
[[policy]]
name = "web.x"
proto = "tcp"
uplinks = ["wan2"]
""")
    state = derive(cfg, WORLD)
    assert state.nft is not None
    assert state.nft.counters == ("policyx_613a62", "policy_web.x", "uplink_wan1", "uplink_wan2")
    out = state.nft.chain("output")
    assert out is not None
    texts = [r.text for r in out.rules if r.comment.startswith("policy ")]
    assert texts == ["counter name policyx_613a62 goto pick_0",
                     "meta l4proto tcp counter name policy_web.x goto pick_1"]
    table = state.nft.text({"uplink_wan1": (7, 700)})
    assert "\tcounter uplink_wan1 { packets 7 bytes 700 }" in table
    assert "\tcounter policy_web.x { packets 0 bytes 0 }" in table
