"""Pure diff: (desired, actual) -> Plan.

Compares on the normalised identities of the model (see ``model``), so a state
in sync yields an empty plan and an empty plan writes nothing to the kernel.
The plan's order of application (reconcile) is add-before-delete: routes are
set, then new rules added, then the nft table updated, and only then stale
rules and routes removed, so no packet falls through mid-change.
"""

from __future__ import annotations

from .model import Actual, DesiredState, NftTable, NftUpdate, Plan, Route


def diff_nft(desired: NftTable | None, actual: NftTable | None) -> NftUpdate:
    if desired is None:
        return NftUpdate(remove=actual is not None)
    if actual is None:
        return NftUpdate(replace=True)
    want = {c.name: c for c in desired.chains}
    have = {c.name: c for c in actual.chains}
    if set(want) != set(have) or any(want[n].base != have[n].base for n in want):
        return NftUpdate(replace=True)
    changed = [c for c in desired.chains if c.fingerprint != have[c.name].fingerprint]
    if not all(c.raw_refillable for c in changed):
        # a refill is one raw nf_tables batch, for the small pick_N vocabulary
        # only; any other changed chain is written by replacing the table
        return NftUpdate(replace=True)
    return NftUpdate(chains=tuple(c.name for c in changed))


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
