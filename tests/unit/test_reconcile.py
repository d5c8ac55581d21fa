"""reconcile() against the in-memory kernel: order of writes, idempotence, repair, flush, errors.

The fake keeps state the way the kernel does (``tests/fakekernel.py``), so
these tests watch the level-triggered loop converge: the first pass writes
everything in a safe order, the next writes nothing, and drift is put back.
"""

from __future__ import annotations

import dataclasses
import errno

import pytest
from test_derive import DOWN, ETH0, WORLD, config, set_link, with_addresses

from markrouted.derive import derive
from markrouted.kernel import KernelError, PermissionDenied
from fakekernel import FakeKernel
from markrouted.model import (
    AF_INET,
    AF_INET6,
    Address,
    Health,
    NftChain,
    NftTable,
    NftUpdate,
    Route,
    Rule,
)
from markrouted.reconcile import flush, reconcile

V4, V6 = AF_INET, AF_INET6
ORDER = ["write_sysctl", "set_route", "add_rule", "nft_apply", "del_rule", "del_route"]

#: what an earlier config (a third uplink, since removed) left behind
STALE_RULE = Rule(V4, 10100, 103, fwmark=0x30000, fwmask=0x00FF0000)
STALE_ROUTE = Route(V4, 103, "0.0.0.0/0", 0xFFFFFFFE, 0, type=7)


class Recorder:
    """A structlog-shaped logger that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, object]]] = []

    def _log(self, level: str, event: str, **kw: object) -> None:
        self.events.append((level, event, kw))

    def info(self, event: str, **kw: object) -> None:
        self._log("info", event, **kw)

    def warning(self, event: str, **kw: object) -> None:
        self._log("warning", event, **kw)

    def bind(self, **kw: object) -> Recorder:
        return self


def in_order(ops: list[str]) -> bool:
    """The operations form contiguous runs in the safe order (no interleaving)."""
    ranks = [ORDER.index(op) for op in ops]
    return ranks == sorted(ranks)


def converged(kernel: FakeKernel) -> None:
    """One more pass writes nothing at all."""
    kernel.clear_writes()
    result = reconcile(config(), kernel)
    assert kernel.writes == [], kernel.text()
    assert result.plan.empty and result.writes == 0


def test_first_pass_writes_everything_in_safe_order() -> None:
    kernel = FakeKernel(WORLD)
    kernel.rules.add(STALE_RULE)
    kernel.routes[STALE_ROUTE.key] = STALE_ROUTE
    desired = derive(config(), WORLD)
    result = reconcile(config(), kernel)

    ops = kernel.ops()
    assert in_order(ops), ops
    assert [op for i, op in enumerate(ops) if i == 0 or ops[i - 1] != op] == ORDER
    assert ops.count("set_route") == len(desired.routes)
    assert ops.count("add_rule") == len(desired.rules)
    assert ops.count("nft_apply") == 1
    assert kernel.writes[ops.index("nft_apply")] == ("nft_apply", NftUpdate(replace=True))
    assert kernel.writes[-2:] == [("del_rule", STALE_RULE), ("del_route", STALE_ROUTE)]
    assert result.writes == len(ops)

    assert kernel.rules == set(desired.rules)
    assert set(kernel.routes.values()) == set(desired.routes)
    assert kernel.nft == desired.nft
    assert kernel.sysctls["net/ipv4/conf/all/src_valid_mark"] == "1"
    assert kernel.sysctls["net/ipv4/conf/eth0/rp_filter"] == "2"
    assert kernel.sysctls["net/ipv4/conf/eth1/rp_filter"] == "2"  # was loose already: untouched
    assert ("write_sysctl", ("net/ipv4/conf/eth1/rp_filter", "2")) not in kernel.writes


def test_routes_are_set_before_the_rules_that_point_to_them() -> None:
    """A rule added before its table is filled sends marked packets into an empty table."""
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    ops = kernel.ops()
    last_route = max(i for i, op in enumerate(ops) if op == "set_route")
    first_rule = min(i for i, op in enumerate(ops) if op == "add_rule")
    assert last_route < first_rule < ops.index("nft_apply")


def test_second_pass_writes_nothing() -> None:
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    converged(kernel)


def test_second_pass_writes_nothing_with_secondary_addresses() -> None:
    obs = with_addresses(WORLD, Address(ETH0, V4, "198.51.100.11", 24), Address(ETH0, V6, "2001:db8:1::11", 64))
    kernel = FakeKernel(obs)
    reconcile(config(), kernel)
    converged(kernel)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda k: k.rules.discard(Rule(V4, 10100, 101, fwmark=0x10000, fwmask=0x00FF0000)),
                     id="fwmark-rule-deleted"),
        pytest.param(lambda k: k.rules.discard(Rule(V6, 10000, 254, suppress_prefixlength=0)),
                     id="v6-suppress-rule-deleted"),
    ],
)
def test_deleted_rule_comes_back(tamper: object) -> None:
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    before = set(kernel.rules)
    tamper(kernel)  # type: ignore[operator]
    (missing,) = before - kernel.rules
    kernel.clear_writes()
    reconcile(config(), kernel)
    assert kernel.writes == [("add_rule", missing)]
    assert kernel.rules == before
    converged(kernel)


def test_changed_route_is_replaced_in_place() -> None:
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    good = kernel.routes[(V4, 101, "0.0.0.0/0", 0)]
    kernel.routes[good.key] = dataclasses.replace(good, gateway="198.51.100.99")
    kernel.clear_writes()
    reconcile(config(), kernel)
    assert kernel.writes == [("set_route", good)]
    converged(kernel)


def test_deleted_nft_table_is_replaced() -> None:
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    kernel.nft = None
    kernel.clear_writes()
    reconcile(config(), kernel)
    assert kernel.writes == [("nft_apply", NftUpdate(replace=True))]
    converged(kernel)


def test_flushed_hook_chain_replaces_the_table() -> None:
    """A hook chain's rules are outside the raw refill's vocabulary: the table is replaced whole."""
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    assert kernel.nft is not None
    kernel.nft = NftTable(tuple(NftChain(c.name, c.base, ()) if c.name == "output" else c for c in kernel.nft.chains))
    kernel.clear_writes()
    reconcile(config(), kernel)
    assert kernel.writes == [("nft_apply", NftUpdate(replace=True))]
    converged(kernel)


def test_flushed_pick_chain_is_refilled() -> None:
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    assert kernel.nft is not None
    kernel.nft = NftTable(tuple(NftChain(c.name, c.base, ()) if c.name == "pick_0" else c for c in kernel.nft.chains))
    kernel.clear_writes()
    reconcile(config(), kernel)
    assert kernel.writes == [("nft_apply", NftUpdate(chains=("pick_0",)))]
    converged(kernel)


def test_health_failover_refills_one_chain() -> None:
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    kernel.clear_writes()
    result = reconcile(config(), kernel, {"wan1": DOWN})
    assert kernel.writes == [("nft_apply", NftUpdate(chains=("pick_0",)))]
    assert kernel.nft == result.desired.nft
    kernel.clear_writes()
    reconcile(config(), kernel, {"wan1": Health(True, "probes answered")})
    assert kernel.writes == [("nft_apply", NftUpdate(chains=("pick_0",)))]
    converged(kernel)


def test_admin_down_and_up_restores_the_uplinks_routes() -> None:
    """Admin down flushes the link's IPv4 routes silently; the next pass after up puts them back."""
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    table_101 = {r for r in kernel.routes.values() if r.table == 101}

    kernel.set_link("eth0", up=False)
    assert not any(r.oif == ETH0 and r.family == V4 for r in kernel.routes.values())
    kernel.clear_writes()
    reconcile(config(), kernel)
    # nothing to route over a down link: only the safety net stays in table 101
    assert {str(r) for r in kernel.routes.values() if r.table == 101} == {
        "ip route unreachable default table 101 proto markrouted metric 4294967294",
        "ip -6 route unreachable default table 101 proto markrouted metric 4294967294",
    }
    assert set(kernel.ops()) <= {"nft_apply", "del_route"}
    kernel.clear_writes()
    reconcile(config(), kernel)
    assert kernel.writes == []

    kernel.set_link("eth0", up=True)
    kernel.clear_writes()
    reconcile(config(), kernel)
    assert {r for r in kernel.routes.values() if r.table == 101} == table_101
    converged(kernel)


def test_carrier_loss_touches_no_route() -> None:
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    kernel.set_link("eth0", carrier=False)
    kernel.clear_writes()
    reconcile(config(), kernel)
    assert kernel.ops() == ["nft_apply"]


def test_flush_removes_only_owned_objects() -> None:
    kernel = FakeKernel(WORLD)
    foreign_rule = Rule(V4, 10050, 200, fwmark=0x4000, fwmask=0x4000)  # inside our range, not ours
    foreign_route = Route(V4, 200, "0.0.0.0/0", 0, ETH0, gateway="198.51.100.1")
    ours_elsewhere = Rule(V4, 9000, 101)  # our tag, outside the configured range: not provably ours now
    kernel.foreign_rules.add(foreign_rule)
    kernel.foreign_routes.add(foreign_route)
    kernel.foreign_nft["inet filter"] = {"chains": ["input"]}
    reconcile(config(), kernel)
    kernel.rules.add(ours_elsewhere)

    kernel.clear_writes()
    writes = flush(config(), kernel)
    assert writes == len(kernel.writes) > 0
    assert kernel.ops()[0] == "nft_apply" and in_order(kernel.ops())  # no new flow is marked mid-flush
    assert kernel.rules == {ours_elsewhere}
    assert kernel.routes == {}
    assert kernel.nft is None
    assert kernel.foreign_rules == {foreign_rule}
    assert kernel.foreign_routes == {foreign_route}
    assert kernel.foreign_nft == {"inet filter": {"chains": ["input"]}}
    assert not any(obj in (foreign_rule, foreign_route, ours_elsewhere) for _, obj in kernel.writes)

    kernel.clear_writes()
    assert flush(config(), kernel) == 0
    assert kernel.writes == []


def test_one_failed_write_does_not_stop_the_others() -> None:
    kernel = FakeKernel(WORLD)
    kernel.fail("set_route", KernelError("no route to gateway", errno.ENETUNREACH),
                when=lambda r: isinstance(r, Route) and r.table == 101 and r.gateway is not None and r.family == V4)
    log = Recorder()
    with pytest.raises(KernelError, match="no route to gateway"):
        reconcile(config(), kernel, log=log)
    desired = derive(config(), WORLD)
    failed = next(r for r in desired.routes if r.table == 101 and r.gateway and r.family == V4)
    # everything else was written, in order, after the failure
    assert in_order(kernel.ops())
    assert kernel.rules == set(desired.rules)
    assert kernel.nft == desired.nft
    assert set(kernel.routes.values()) == set(desired.routes) - {failed}
    assert [e for e in log.events if e[0] == "warning"] == [
        ("warning", "kernel write failed", {"error": "no route to gateway"})]
    # the next pass retries exactly what failed
    kernel.clear_writes()
    reconcile(config(), kernel)
    assert kernel.writes == [("set_route", failed)]
    converged(kernel)


def test_first_of_several_errors_is_raised() -> None:
    kernel = FakeKernel(WORLD)
    kernel.fail("add_rule", KernelError("first"))
    kernel.fail("nft_apply", KernelError("second"))
    with pytest.raises(KernelError, match="^first$"):
        reconcile(config(), kernel)
    assert "nft_apply" in kernel.ops() and "del_rule" not in kernel.ops()


def test_permission_denied_stops_at_once() -> None:
    kernel = FakeKernel(WORLD)
    kernel.fail("write_sysctl", PermissionDenied("sysctl: permission denied"))
    with pytest.raises(PermissionDenied):
        reconcile(config(), kernel)
    assert kernel.ops() == ["write_sysctl"]


def test_every_write_is_logged_with_what_and_why() -> None:
    kernel = FakeKernel(WORLD)
    log = Recorder()
    result = reconcile(config(), kernel, log=log)
    infos = [e for e in log.events if e[0] == "info"]
    assert len(infos) == result.writes
    assert all(kw.get("object") and kw.get("reason") and kw.get("kind") for _, _, kw in infos)


def test_no_uplinks_removes_what_an_earlier_config_installed() -> None:
    kernel = FakeKernel(WORLD)
    reconcile(config(), kernel)
    empty = config("", uplinks="")
    kernel.clear_writes()
    reconcile(empty, kernel)
    assert kernel.rules == set() and kernel.routes == {} and kernel.nft is None
    assert in_order(kernel.ops())
    kernel.clear_writes()
    reconcile(empty, kernel)
    assert kernel.writes == []


def test_fake_refuses_a_route_over_a_down_link() -> None:
    """The fake is only worth its tests if it refuses what the kernel refuses."""
    kernel = FakeKernel(set_link(WORLD, "eth0", up=False))
    route = Route(V4, 101, "0.0.0.0/0", 0, ETH0, gateway="198.51.100.1")
    with pytest.raises(KernelError) as info:
        kernel.set_route(route)
    assert info.value.code == errno.ENETUNREACH  # the gateway's connected route went with the link
    with pytest.raises(KernelError) as info:
        kernel.set_route(dataclasses.replace(route, onlink=True))
    assert info.value.code == errno.ENETDOWN
    with pytest.raises(KernelError) as info:
        kernel.set_route(dataclasses.replace(route, oif=99))
    assert info.value.code == errno.ENODEV
    assert kernel.routes == {}


def test_fake_rule_semantics() -> None:
    kernel = FakeKernel(WORLD)
    rule = Rule(V6, 10100, 101, fwmark=0x10000, fwmask=0x00FF0000)
    assert kernel.add_rule(rule) is True
    assert kernel.add_rule(rule) is False  # EEXIST
    assert kernel.del_rule(rule) is True
    assert kernel.del_rule(rule) is False  # ENOENT
    assert len(kernel.writes) == 4


def test_fake_refill_of_a_missing_chain_fails() -> None:
    kernel = FakeKernel(WORLD)
    desired = derive(config(), WORLD).nft
    with pytest.raises(KernelError):
        kernel.nft_apply(NftUpdate(chains=("pick_0",)), desired)
    kernel.nft_apply(NftUpdate(replace=True), desired)
    assert kernel.nft is not None
    with pytest.raises(KernelError):
        kernel.nft_apply(NftUpdate(chains=("nope",)), desired)
    kernel.nft_apply(NftUpdate(remove=True), None)
    kernel.nft_apply(NftUpdate(remove=True), None)  # add+delete: removing a missing table succeeds
    assert kernel.nft is None


def test_rules_of_a_previous_priority_range_are_removed() -> None:
    """After rule_priority changes, the old range is still markrouted's until emptied."""
    kernel = FakeKernel(WORLD)
    old = Rule(V4, 20100, 101, fwmark=0x10000, fwmask=0x00FF0000)
    kernel.rules.add(old)
    reconcile(config(), kernel)
    assert old in kernel.rules  # not provably ours without the old range
    kernel.clear_writes()
    reconcile(config(), kernel, extra_ranges=(20000,))
    assert kernel.writes == [("del_rule", old)]
