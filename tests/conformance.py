"""Conformance scenarios: the same checks against the fake kernel and the real one.

``tests/fakekernel.py`` stands in for the kernel wherever root is not at hand,
so it must answer exactly as the real adapter (``markrouted.kernel.Kernel``)
does. Each scenario here takes a ``World`` (a kernel under test plus the means
to change things behind its back, as other software or a cable would) and
asserts what markrouted relies on: EEXIST/ENOENT reported as False, only
tagged rules in owned ranges are markrouted's, foreign objects are never
touched, routes replace in place, the nft table's three write paths...

* unit tier (``tests/unit/test_conformance_fake.py``): every scenario against
  a ``FakeWorld``;
* kernel tier (``tests/kernel/test_conformance_kernel.py``): every scenario
  against a ``RealWorld`` inside a network namespace of the test's own, by
  running this file as a script there (``python3 tests/conformance.py NAME``).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Protocol

if __name__ == "__main__":  # run as a script inside a namespace: find the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from markrouted.kernel import KernelAPI, KernelError
from markrouted.model import (
    AF_INET,
    AF_INET6,
    RANGE_CHAIN,
    RT_SCOPE_LINK,
    RTN_UNREACHABLE,
    BaseHook,
    Link,
    Needs,
    NftChain,
    NftRule,
    NftTable,
    NftUpdate,
    Observed,
    Route,
    Rule,
)

V4, V6 = AF_INET, AF_INET6
LINK = "mrc0"  # the link the scenarios route over (a veth in the real world)
ADDR, GW, NET = "198.51.100.2", "198.51.100.1", "198.51.100.0/24"
ADDR6 = "2001:db8:1::2"
TABLE, FOREIGN_TABLE = 101, 200
MASK = 0x00FF0000
RP_FILTER = f"net/ipv4/conf/{LINK}/rp_filter"
ALL_RP_FILTER = "net/ipv4/conf/all/rp_filter"

FWMARK = Rule(V4, 10100, TABLE, fwmark=0x10000, fwmask=MASK)
FWMARK6 = Rule(V6, 10100, TABLE, fwmark=0x10000, fwmask=MASK)
SUPPRESS = Rule(V4, 10000, 254, suppress_prefixlength=0)
SOURCE6 = Rule(V6, 10200, TABLE, src=ADDR6, src_len=128)


# ------------------------------------------------------------------ the tables


def _rule(expr: list[Any], text: str, comment: str) -> NftRule:
    return NftRule(json.dumps(expr, sort_keys=True, separators=(",", ":")), text, comment)


def _goto(chain: str, comment: str, nfproto: str | None = None) -> NftRule:
    expr: list[Any] = [{"goto": {"target": chain}}]
    text = f"goto {chain}"
    if nfproto:
        expr.insert(0, {"match": {"left": {"meta": {"key": "nfproto"}}, "op": "==", "right": nfproto}})
        text = f"meta nfproto {nfproto} {text}"
    return _rule(expr, text, comment)


def table(pick: NftRule, priority: int = 10000, post: tuple[NftRule, ...] = ()) -> NftTable:
    """A small table shaped like derive's: mark chains, a pick chain, a hook, the range record."""
    return NftTable((
        NftChain("set_a", None, (_rule([{"accept": None}], "accept", "mark a #0000000001"),)),
        NftChain("set_b", None, (_rule([{"accept": None}], "accept", "mark b #0000000002"),)),
        NftChain(f"{RANGE_CHAIN}{priority}", None, ()),
        NftChain("pick_0", None, (pick,)),
        NftChain("output", BaseHook("route", "output", -150), (_goto("pick_0", "policy p #0000000003"),)),
        NftChain("postrouting", BaseHook("nat", "postrouting", 100), post),
    ))


TO_A = table(_goto("set_a", "pick a #000000000a"))
TO_B = table(_goto("set_b", "pick b #000000000b", nfproto="ipv4"))
MASQUERADE = _rule([{"masquerade": None}], "masquerade", "masquerade #000000000c")


def fingerprints(t: NftTable | None) -> dict[str, object] | None:
    """What drift detection compares, by chain name (the order of chains does not matter)."""
    return None if t is None else {c.name: c.fingerprint for c in t.chains}


# ------------------------------------------------------------------ worlds


class World(Protocol):
    """A kernel under test, and what other software can do behind its back."""

    kernel: KernelAPI

    def index(self) -> int:
        """The ifindex of ``LINK``."""
        ...

    def set_link(self, up: bool) -> None: ...

    def add_foreign_rule(self, rule: Rule) -> None:
        """The same rule without markrouted's proto tag."""
        ...

    def add_foreign_route(self, route: Route) -> None:
        """The same route without markrouted's proto tag."""
        ...

    def add_foreign_nft_table(self) -> None:
        """A table ``inet other`` of someone else's."""
        ...

    def edit_pick_chain(self) -> None:
        """Someone appends a rule to markrouted's ``pick_0`` chain."""
        ...

    def foreign_state(self) -> str:
        """Every foreign rule, route (in the scenario's tables) and nft table, as text."""
        ...


class FakeWorld:
    def __init__(self) -> None:
        from fakekernel import FakeKernel

        self.fake = FakeKernel(Observed(
            links=(Link(7, LINK, True, True),),
            sysctls={ALL_RP_FILTER: "0", RP_FILTER: "0"},
        ))
        self.kernel: KernelAPI = self.fake

    def index(self) -> int:
        return 7

    def set_link(self, up: bool) -> None:
        self.fake.set_link(LINK, up=up)

    def add_foreign_rule(self, rule: Rule) -> None:
        self.fake.foreign_rules.add(rule)

    def add_foreign_route(self, route: Route) -> None:
        self.fake.foreign_routes.add(route)

    def add_foreign_nft_table(self) -> None:
        self.fake.foreign_nft["inet other"] = "chain pre"

    def edit_pick_chain(self) -> None:
        assert self.fake.nft is not None
        self.fake.nft = NftTable(tuple(
            NftChain(c.name, c.base, c.rules + (NftRule("", "counter", ""),)) if c.name == "pick_0" else c
            for c in self.fake.nft.chains))

    def foreign_state(self) -> str:
        return "\n".join([*sorted(map(str, self.fake.foreign_rules)), *sorted(map(str, self.fake.foreign_routes)),
                          *sorted(self.fake.foreign_nft)])


def _run(*cmd: str, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr}")
    return proc.stdout


def _fam(family: int) -> str:
    return "-6" if family == V6 else "-4"


class RealWorld:
    """The real adapter in the current network namespace (one of the test's own)."""

    def __init__(self) -> None:
        from markrouted.kernel import Kernel

        _run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        _run("ip", "link", "add", LINK, "type", "veth", "peer", "name", "mrc1")
        for cmd in (["addr", "add", f"{ADDR}/24", "dev", LINK], ["-6", "addr", "add", f"{ADDR6}/64", "dev", LINK,
                                                                   "nodad"],
                    ["link", "set", "mrc1", "up"], ["link", "set", LINK, "up"]):
            _run("ip", *cmd)
        self.kernel: KernelAPI = Kernel()

    def index(self) -> int:
        index: int = json.loads(_run("ip", "-j", "link", "show", LINK))[0]["ifindex"]
        return index

    def set_link(self, up: bool) -> None:
        _run("ip", "link", "set", LINK, "up" if up else "down")

    def add_foreign_rule(self, rule: Rule) -> None:
        cmd = ["ip", _fam(rule.family), "rule", "add", "priority", str(rule.priority)]
        if rule.src is not None:
            cmd += ["from", f"{rule.src}/{rule.src_len}"]
        if rule.fwmask:
            cmd += ["fwmark", f"{rule.fwmark:#x}/{rule.fwmask:#x}"]
        cmd += ["lookup", str(rule.table)]
        _run(*cmd)

    def add_foreign_route(self, route: Route) -> None:
        cmd = ["ip", _fam(route.family), "route", "add", route.dst, "table", str(route.table),
               "metric", str(route.metric)]
        if route.gateway:
            cmd += ["via", route.gateway]
        if route.oif:
            cmd += ["dev", LINK]
        _run(*cmd)

    def add_foreign_nft_table(self) -> None:
        _run("nft", "-f", "-", input="table inet other {\n chain pre {\n"
                                     "  type filter hook prerouting priority -100; policy accept;\n"
                                     "  meta mark set meta mark | 0x4000\n }\n}\n")

    def edit_pick_chain(self) -> None:
        _run("nft", "add", "rule", "inet", "markrouted", "pick_0", "counter")

    def foreign_state(self) -> str:
        out = []
        for family in (V4, V6):
            out += [line for line in _run("ip", _fam(family), "rule", "show").splitlines()
                    if "proto 109" not in line and "markrouted" not in line]
            for t in (TABLE, FOREIGN_TABLE):
                # (a table that does not exist yet is an error for ip: nothing in it)
                shown = _run("ip", _fam(family), "route", "show", "table", str(t), check=False)
                out += [line for line in shown.splitlines()
                        if "proto 109" not in line and "markrouted" not in line]
        tables = _run("nft", "list", "tables").split()
        if "other" in tables:
            out += _run("nft", "list", "table", "inet", "other").splitlines()
        return "\n".join(out)


# ------------------------------------------------------------------ scenarios

Scenario = Callable[[World], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def _rules(w: World, *starts: int) -> set[Rule]:
    return set(w.kernel.actual(starts or (10000,)).rules)


def _routes(w: World) -> set[Route]:
    return set(w.kernel.actual((10000,)).routes)


@scenario
def rule_added_twice_is_false(w: World) -> None:
    for rule in (FWMARK, FWMARK6, SUPPRESS, SOURCE6):
        assert w.kernel.add_rule(rule) is True
        assert w.kernel.add_rule(rule) is False
    assert _rules(w) == {FWMARK, FWMARK6, SUPPRESS, SOURCE6}


@scenario
def deleting_a_missing_rule_is_false(w: World) -> None:
    assert w.kernel.del_rule(FWMARK) is False
    w.kernel.add_rule(FWMARK)
    assert w.kernel.del_rule(FWMARK) is True
    assert w.kernel.del_rule(FWMARK) is False
    assert _rules(w) == set()


@scenario
def owned_rules_are_tagged_and_in_a_range(w: World) -> None:
    inside = [Rule(V4, p, TABLE, fwmark=0x10000, fwmask=MASK) for p in (10000, 10999)]
    outside = [Rule(V4, p, TABLE, fwmark=0x10000, fwmask=MASK) for p in (9999, 11000, 20500)]
    for rule in inside + outside:
        w.kernel.add_rule(rule)
    w.add_foreign_rule(Rule(V4, 10050, FOREIGN_TABLE, src="192.0.2.0", src_len=24))
    assert _rules(w) == set(inside)
    assert _rules(w, 10000, 20000) == {*inside, outside[2]}
    assert _rules(w, 9000) == {outside[0]}


@scenario
def ranges_the_nft_table_records_are_owned(w: World) -> None:
    old = Rule(V4, 30005, TABLE, fwmark=0x10000, fwmask=MASK)
    w.kernel.add_rule(old)
    assert _rules(w) == set()
    w.kernel.nft_apply(NftUpdate(replace=True), table(TO_A.chains[3].rules[0], priority=30000))
    assert _rules(w) == {old}
    w.kernel.nft_apply(NftUpdate(replace=True), TO_A)
    assert _rules(w) == set()


@scenario
def an_untagged_twin_is_not_markrouted_s(w: World) -> None:
    w.add_foreign_rule(FWMARK)
    before = w.foreign_state()
    assert _rules(w) == set()
    assert w.kernel.del_rule(FWMARK) is False  # the tagged delete never finds the twin
    assert w.kernel.add_rule(FWMARK) is True  # the twin and markrouted's rule live side by side
    assert _rules(w) == {FWMARK}
    assert w.kernel.del_rule(FWMARK) is True
    assert w.foreign_state() == before


@scenario
def a_route_is_replaced_in_place(w: World) -> None:
    idx = w.index()
    first = Route(V4, TABLE, "0.0.0.0/0", 0, idx, gateway=GW)
    second = Route(V4, TABLE, "0.0.0.0/0", 0, idx, gateway="198.51.100.3")
    w.kernel.set_route(first)
    w.kernel.set_route(first)
    assert _routes(w) == {first}
    w.kernel.set_route(second)
    assert _routes(w) == {second}
    assert w.kernel.del_route(first) is False
    assert w.kernel.del_route(second) is True
    assert w.kernel.del_route(second) is False
    assert _routes(w) == set()


@scenario
def routes_read_back_as_written(w: World) -> None:
    idx = w.index()
    routes = {
        Route(V4, TABLE, NET, 0, idx, prefsrc=ADDR, scope=RT_SCOPE_LINK),
        Route(V4, TABLE, "0.0.0.0/0", 0, idx, gateway="192.0.2.1", onlink=True),
        Route(V4, TABLE, "0.0.0.0/0", 0xFFFFFFFE, 0, type=RTN_UNREACHABLE),
        Route(V6, TABLE, "::/0", 0xFFFFFFFE, 0, type=RTN_UNREACHABLE),
        Route(V6, TABLE, "::/0", 1024, idx, gateway="2001:db8:1::1"),
    }
    for route in routes:
        w.kernel.set_route(route)
    assert _routes(w) == routes


@scenario
def a_route_over_a_down_link_is_refused(w: World) -> None:
    w.set_link(False)
    idx = w.index()
    # a gateway is looked up over the link's (flushed) connected route; a
    # device or onlink route needs the link itself up
    for route, code in ((Route(V4, TABLE, "0.0.0.0/0", 0, idx, gateway=GW), errno.ENETUNREACH),
                        (Route(V4, TABLE, "0.0.0.0/0", 0, idx, gateway=GW, onlink=True), errno.ENETDOWN),
                        (Route(V4, TABLE, NET, 0, idx, prefsrc=ADDR, scope=RT_SCOPE_LINK), errno.ENETDOWN)):
        try:
            w.kernel.set_route(route)
        except KernelError as exc:
            assert exc.code == code, (route, exc)
        else:
            raise AssertionError(f"a route over a down link was accepted: {route}")
    # an unreachable route needs no link
    w.kernel.set_route(Route(V4, TABLE, "0.0.0.0/0", 0xFFFFFFFE, 0, type=RTN_UNREACHABLE))


@scenario
def admin_down_flushes_the_link_s_ipv4_routes(w: World) -> None:
    idx = w.index()
    unreachable = Route(V4, TABLE, "0.0.0.0/0", 0xFFFFFFFE, 0, type=RTN_UNREACHABLE)
    w.kernel.set_route(Route(V4, TABLE, "0.0.0.0/0", 0, idx, gateway=GW))
    w.kernel.set_route(unreachable)
    w.set_link(False)
    assert _routes(w) == {unreachable}


@scenario
def foreign_routes_and_reserved_tables_are_not_owned(w: World) -> None:
    idx = w.index()
    w.add_foreign_route(Route(V4, TABLE, "192.0.2.0/25", 0, idx, gateway=GW))
    w.add_foreign_route(Route(V4, FOREIGN_TABLE, "0.0.0.0/0", 0, idx, gateway=GW))
    before = w.foreign_state()
    mine = Route(V4, TABLE, "0.0.0.0/0", 0, idx, gateway=GW)
    w.kernel.set_route(mine)
    assert _routes(w) == {mine}
    assert w.kernel.del_route(mine) is True
    assert w.foreign_state() == before


@scenario
def nft_replace_refill_remove(w: World) -> None:
    w.add_foreign_nft_table()
    before = w.foreign_state()
    w.kernel.nft_apply(NftUpdate(remove=True), None)  # nothing to remove: no error
    w.kernel.nft_apply(NftUpdate(replace=True), TO_A)
    assert fingerprints(w.kernel.actual((10000,)).nft) == fingerprints(TO_A)
    w.kernel.nft_apply(NftUpdate(chains=("pick_0",)), TO_B)
    assert fingerprints(w.kernel.actual((10000,)).nft) == fingerprints(TO_B)
    w.kernel.nft_apply(NftUpdate(replace=True), TO_A)
    w.kernel.nft_apply(NftUpdate(replace=True), TO_A)
    assert fingerprints(w.kernel.actual((10000,)).nft) == fingerprints(TO_A)
    w.kernel.nft_apply(NftUpdate(remove=True), None)
    assert w.kernel.actual((10000,)).nft is None
    assert w.foreign_state() == before


@scenario
def a_change_behind_markrouted_s_back_is_read(w: World) -> None:
    """The one nft cache is valid only while the kernel proves nobody else wrote."""
    w.kernel.nft_apply(NftUpdate(replace=True), TO_A)
    assert fingerprints(w.kernel.actual((10000,)).nft) == fingerprints(TO_A)
    w.kernel.nft_apply(NftUpdate(chains=("pick_0",)), TO_B)
    w.edit_pick_chain()
    seen = w.kernel.actual((10000,)).nft
    assert seen is not None and fingerprints(seen) != fingerprints(TO_B)
    pick = seen.chain("pick_0")
    assert pick is not None and len(pick.rules) == 2


@scenario
def refill_needs_the_chain_and_the_raw_vocabulary(w: World) -> None:
    for update, desired in ((NftUpdate(chains=("pick_0",)), TO_A),):  # no table yet
        try:
            w.kernel.nft_apply(update, desired)
        except KernelError as exc:
            assert exc.code == errno.ENOENT, exc
        else:
            raise AssertionError("a chain of a missing table was refilled")
    w.kernel.nft_apply(NftUpdate(replace=True), TO_A)
    extra = NftTable(TO_A.chains + (NftChain("pick_9", None, TO_A.chains[3].rules),))
    try:
        w.kernel.nft_apply(NftUpdate(chains=("pick_9",)), extra)
    except KernelError as exc:
        assert exc.code == errno.ENOENT, exc
    else:
        raise AssertionError("a missing chain was refilled")
    masq = table(TO_A.chains[3].rules[0], post=(MASQUERADE,))
    try:
        w.kernel.nft_apply(NftUpdate(chains=("postrouting",)), masq)
    except ValueError:
        pass
    else:
        raise AssertionError("a chain outside the raw vocabulary was refilled")
    assert fingerprints(w.kernel.actual((10000,)).nft) == fingerprints(TO_A)


@scenario
def observe_reads_what_it_is_told(w: World) -> None:
    missing = "net/ipv4/conf/nosuchlink0/rp_filter"
    seen = w.kernel.observe(Needs(sysctls=(RP_FILTER, missing))).sysctls
    assert set(seen) == {RP_FILTER}
    w.kernel.write_sysctl(RP_FILTER, "2")
    assert w.kernel.observe(Needs(sysctls=(RP_FILTER,))).sysctls == {RP_FILTER: "2"}
    try:
        w.kernel.write_sysctl(missing, "2")
    except KernelError:
        pass
    else:
        raise AssertionError("a sysctl of a missing link was written")
    link = next(ln for ln in w.kernel.observe(Needs()).links if ln.name == LINK)
    assert (link.index, link.up, link.carrier) == (w.index(), True, True)


def main(argv: list[str]) -> int:
    """Run one scenario against the real kernel of this (fresh) namespace."""
    name, = argv
    world = RealWorld()
    try:
        SCENARIOS[name](world)
    finally:
        world.kernel.close()
    print(f"{name}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
