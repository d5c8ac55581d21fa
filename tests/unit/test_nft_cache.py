"""The one cache of the nft table (kernel/nft.py), against a stand-in for nf_tables' generation id.

A listing is reused while the generation has not moved; after our own write
it is carried over to the new generation only when that is exactly the
listing's + 1, i.e. the kernel proves nobody else committed in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from markrouted.kernel.errors import KernelError
from markrouted.kernel.nft import Nft, next_generation
from markrouted.model import NftChain, NftRule, NftTable, NftUpdate


def _table(pick: str) -> NftTable:
    return NftTable((
        NftChain("set_a", None, (NftRule('[{"accept":null}]', "accept", "a #1"),)),
        NftChain("pick_0", None, (NftRule(f'[{{"goto":{{"target":"{pick}"}}}}]', f"goto {pick}", f"pick {pick} #2"),)),
    ))


A, B = _table("set_a"), _table("set_b")


class Namespace:
    """nf_tables as the adapter sees it: a generation id, a table, commits by anyone."""

    def __init__(self) -> None:
        self.gen = 41
        self.table: NftTable | None = None
        self.dumps = 0
        self.fail_next = False

    def commit(self, table: NftTable | None) -> None:
        self.gen = next_generation(self.gen)
        self.table = table


class Dumper:
    def __init__(self, ns: Namespace) -> None:
        self.ns = ns

    def generation(self) -> int | None:
        return self.ns.gen

    def read(self, name: str) -> NftTable | None:
        self.ns.dumps += 1
        return self.ns.table

    def close(self) -> None:
        pass


class Binding:
    """libnftables: a script is one commit (the table it makes is set by the test)."""

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.next_table: NftTable | None = None

    def cmd(self, script: str) -> tuple[int, str, str]:
        if self.ns.fail_next:
            self.ns.fail_next = False
            return 1, "", "Error: Could not process rule: No such file or directory"
        self.ns.commit(None if script.rstrip().endswith("delete table inet markrouted") else self.next_table)
        return 0, "", ""


class Raw:
    def __init__(self, ns: Namespace) -> None:
        self.ns = ns

    def refill(self, chains: Sequence[NftChain]) -> None:
        assert self.ns.table is not None
        want = {c.name: c for c in chains}
        self.ns.commit(NftTable(tuple(want.get(c.name, c) for c in self.ns.table.chains)))

    def close(self) -> None:
        pass


@pytest.fixture
def world() -> tuple[Namespace, Nft, Binding]:
    ns = Namespace()
    nft: Any = Nft.__new__(Nft)
    binding = Binding(ns)
    nft.nft, nft._dumper, nft._raw, nft._listing, nft._elements = binding, Dumper(ns), Raw(ns), None, {}
    return ns, nft, binding


def replace(nft: Nft, binding: Binding, table: NftTable) -> None:
    binding.next_table = table
    nft.apply(NftUpdate(replace=True), table)


def test_a_listing_is_reused_while_the_generation_stands(world: tuple[Namespace, Nft, Binding]) -> None:
    ns, nft, _ = world
    ns.table = A
    assert nft.read() == A and nft.read() == A
    assert ns.dumps == 1
    ns.commit(B)  # anyone's commit
    assert nft.read() == B
    assert ns.dumps == 2


def test_our_write_right_after_a_listing_is_remembered(world: tuple[Namespace, Nft, Binding]) -> None:
    ns, nft, binding = world
    assert nft.read() is None
    replace(nft, binding, A)
    assert nft.read() == A
    nft.apply(NftUpdate(chains=("pick_0",)), B)
    assert nft.read() == B
    nft.apply(NftUpdate(remove=True), None)
    assert nft.read() is None
    assert ns.dumps == 1, "each write was proven by the generation: no listing needed"


def test_someone_else_s_commit_before_our_write_forces_a_listing(world: tuple[Namespace, Nft, Binding]) -> None:
    ns, nft, binding = world
    assert nft.read() is None
    ns.commit(B)  # someone else, between our listing and our write
    binding.next_table = A
    nft.apply(NftUpdate(replace=True), A)
    assert ns.gen == 43  # listing + 2: not provably ours alone
    assert nft.read() == A
    assert ns.dumps == 2


def test_no_listing_before_the_write_proves_nothing(world: tuple[Namespace, Nft, Binding]) -> None:
    ns, nft, binding = world
    replace(nft, binding, A)
    assert nft.read() == A
    assert ns.dumps == 1


def test_a_failed_write_drops_the_listing(world: tuple[Namespace, Nft, Binding]) -> None:
    ns, nft, binding = world
    ns.table = A
    assert nft.read() == A
    ns.fail_next = True
    with pytest.raises(KernelError):
        replace(nft, binding, B)
    assert nft.read() == A
    assert ns.dumps == 2


def test_the_generation_wraps_past_zero() -> None:
    assert next_generation(0xFFFFFFFF) == 1
    assert next_generation(7) == 8


def test_a_refilled_listing_keeps_the_sets_and_counters() -> None:
    """A failover refills chains only: the remembered table must still hold its sets and counters,
    or the next pass would see them missing and replace the whole table."""
    from markrouted.kernel.nft import refilled
    from markrouted.model import NftSet

    old_rule = NftRule("[]", "goto set_a", "pick #1")
    new_rule = NftRule("[]", "goto set_b", "pick #2")
    sets = (NftSet("sticky_0_a_4", 4, dynamic=True, timeout=30, learns=True),)
    table = NftTable((NftChain("pick_0", None, (old_rule,)),), sets, ("policy_web",))
    desired = NftTable((NftChain("pick_0", None, (new_rule,)),), sets, ("policy_web",))
    after = refilled(table, desired, ("pick_0",))
    assert after is not None
    assert after.chains == desired.chains and after.sets == sets and after.counters == ("policy_web",)
