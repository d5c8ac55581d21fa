"""Pure diff: (desired, actual) -> Plan.

Compares on the normalised identities of the model (see ``model``), so a state
in sync yields an empty plan and an empty plan writes nothing to the kernel.
The plan's order of application (reconcile) is add-before-delete: routes are
set, then new rules added, then the nft table updated, and only then stale
rules and routes removed, so no packet falls through mid-change.
"""

from __future__ import annotations

from collections.abc import Sequence

from .model import Actual, DesiredState, Interval, NftTable, NftUpdate, Plan, Route, SetElements


def diff_elements(
    desired: Sequence[Interval], actual: Sequence[Interval]
) -> tuple[tuple[Interval, ...], tuple[Interval, ...]]:
    """(intervals to delete, intervals to add) to make a static set's ``actual`` elements ``desired``.

    Both sides are merged, sorted and disjoint (``sets.merge``; the kernel's
    listing decodes to the same form), so an interval is in both exactly when
    it needs no write: an edit of ten lines of a set file is ten element
    changes, whatever the set's size.
    """
    want, have = set(desired), set(actual)
    return tuple(sorted(have - want)), tuple(sorted(want - have))


def diff_sets(desired: NftTable, actual: NftTable) -> tuple[SetElements, ...] | None:
    """The "set elements" updates, or None when a set's declaration differs (a replace)."""
    want = {s.name: s for s in desired.sets}
    have = {s.name: s for s in actual.sets}
    if set(want) != set(have) or any(want[n].shape != have[n].shape for n in want):
        return None
    out = []
    for item in desired.sets:
        if item.dynamic:
            continue  # dnsmasq's elements: never written nor removed by markrouted
        delete, add = diff_elements(item.elements, have[item.name].elements)
        if delete or add:
            out.append(SetElements(item.name, item.version, delete, add))
    return tuple(out)


def diff_nft(desired: NftTable | None, actual: NftTable | None) -> NftUpdate:
    if desired is None:
        return NftUpdate(remove=actual is not None)
    if actual is None:
        return NftUpdate(replace=True)
    want = {c.name: c for c in desired.chains}
    have = {c.name: c for c in actual.chains}
    if set(want) != set(have) or any(want[n].base != have[n].base for n in want):
        return NftUpdate(replace=True)
    elements = diff_sets(desired, actual)
    if elements is None:
        return NftUpdate(replace=True)
    changed = [c for c in desired.chains if c.fingerprint != have[c.name].fingerprint]
    if not all(c.raw_refillable for c in changed):
        # a refill is one raw nf_tables batch, for the small pick_N vocabulary
        # only; any other changed chain is written by replacing the table
        return NftUpdate(replace=True)
    return NftUpdate(chains=tuple(c.name for c in changed), elements=elements)


def diff_routes(
    desired: frozenset[Route], actual: frozenset[Route]
) -> tuple[tuple[tuple[Route, Route | None], ...], tuple[Route, ...]]:
    """(routes to set with the one they replace, routes to remove)."""
    by_key: dict[tuple[int, int, str, int], list[Route]] = {}
    for route in actual:
        by_key.setdefault(route.key, []).append(route)
    to_set: list[tuple[Route, Route | None]] = []
    replaced: set[Route] = set()
    for route in sorted(desired):
        if route in actual:
            continue
        olds = by_key.get(route.key, [])
        old = sorted(olds)[0] if olds else None
        if old is not None:
            replaced.add(old)
        to_set.append((route, old))
    remove = tuple(sorted(r for r in actual if r not in desired and r not in replaced))
    return tuple(to_set), remove


def diff(desired: DesiredState, actual: Actual) -> Plan:
    routes_set, routes_remove = diff_routes(desired.routes, actual.routes)
    # derive returns only the sysctls whose observed value needs changing
    sysctls = desired.sysctls
    return Plan(
        rules_add=tuple(sorted(desired.rules - actual.rules)),
        rules_remove=tuple(sorted(actual.rules - desired.rules)),
        routes_set=routes_set,
        routes_remove=routes_remove,
        nft=diff_nft(desired.nft, actual.nft),
        sysctls=sysctls,
        nft_desired=desired.nft,
    )
