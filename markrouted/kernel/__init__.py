"""The only code that talks to the kernel.

``Kernel`` gathers the adapters behind the few operations reconcile needs:
observe the facts derivation depends on (what to read is decided by the pure
core: ``model.Needs``), read what markrouted owns, and write single objects.
This package imports nothing of markrouted but ``model`` and its own modules.

Who does what:

* ``rules``, ``routes``: an ip rule's and a route's wire form (decoding,
  the message that writes one, whose it is, which events concern it);
* ``netlink``: their I/O, plus links, addresses and route lookups: reads are
  struct-decoded dumps (``rtdump``), writes one request each on the same
  socket; only explain's route lookup loads pyroute2;
* ``nft``: the nft table: replaced and removed through libnftables (nft's
  text syntax), pick chains refilled with a raw nf_tables batch (``nftraw``),
  read back over nfnetlink (``nftdump``), and the one cache of it;
* ``events``: the rtnetlink and nf_tables notifications the daemon listens to;
* ``sysctl``, ``conntrack``, ``probe``, ``networkd``: the rest of the host.

The test suite's ``FakeKernel`` (``tests/fakekernel.py``) implements
``KernelAPI`` in memory; the scenarios of ``tests/conformance.py`` run against
both, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any, Protocol

from ..model import Actual, Needs, NftTable, NftUpdate, Observed, Route, Rule, recorded_ranges
from .errors import KernelError, PermissionDenied, Unsupported

__all__ = ["CGROUP_ROOT", "Kernel", "KernelAPI", "KernelError", "PermissionDenied", "Unsupported",
           "cgroup_layout"]

CGROUP_ROOT = "/sys/fs/cgroup"


class KernelAPI(Protocol):
    """What reconcile, flush and the daemon need of a kernel."""

    def observe(self, needs: Needs) -> Observed:
        """Links, addresses, main-table defaults, and the sysctls and cgroups ``needs`` names."""
        ...

    def actual(self, rule_priorities: Iterable[int]) -> Actual:
        """What markrouted owns: rules tagged as its own in the ranges of ``rule_priorities``
        or of those the nft table records, tagged routes outside the reserved tables, the table."""
        ...

    def write_sysctl(self, path: str, value: str) -> None: ...

    def set_route(self, route: Route) -> None:
        """``ip route replace``: the route takes its slot (``Route.key``) in place."""
        ...

    def del_route(self, route: Route) -> bool:
        """False when there was no such route."""
        ...

    def add_rule(self, rule: Rule) -> bool:
        """False when the rule was there already."""
        ...

    def del_rule(self, rule: Rule) -> bool:
        """False when there was no such rule."""
        ...

    def nft_apply(self, update: NftUpdate, desired: NftTable | None) -> None:
        """One transaction: replace the table, refill raw-refillable chains, or remove it."""
        ...

    def clear_conntrack(self, mark: int, mask: int, label: int | None = None) -> None:
        """Delete the entries with ``mark`` under ``mask`` (and, if given, that ct label bit)."""
        ...

    def close(self) -> None: ...


def cgroup_layout(root: str = CGROUP_ROOT) -> str | None:
    """Where the cgroup v2 tree is, relative to /sys/fs/cgroup; None if nowhere."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return ""
    if os.path.exists(os.path.join(root, "unified", "cgroup.controllers")):
        return "unified"
    return None


def cgroup_ids(paths: Iterable[str], root: str = CGROUP_ROOT) -> tuple[str, dict[str, int]]:
    """(the cgroup v2 tree's prefix, the id of each of ``paths`` that exists)."""
    prefix = cgroup_layout(root)
    ids: dict[str, int] = {}
    if prefix is not None:
        base = os.path.join(root, prefix) if prefix else root
        for path in paths:
            try:
                ids[path] = os.stat(os.path.join(base, path)).st_ino
            except OSError:
                pass
    return prefix or "", ids


class Kernel:
    """The real kernel, in the network namespace of the calling process."""

    def __init__(self, need_nft: bool = True) -> None:
        from .netlink import Netlink
        from .sysctl import Sysctls

        self.netlink = Netlink()
        self.sysctls = Sysctls()
        self._nft: Any = None
        if need_nft:
            self._nft = self.nft
        self._names: dict[int, str] | None = None

    @property
    def nft(self) -> Any:
        if self._nft is None:
            from .nft import Nft

            self._nft = Nft()
        return self._nft

    def close(self) -> None:
        self.netlink.close()
        if self._nft is not None:
            self._nft.close()

    def observe(self, needs: Needs) -> Observed:
        links = self.netlink.links()
        # actual() names the routes' interfaces from this reading: a pass reads links once
        self._names = {link.index: link.name for link in links}
        prefix, ids = cgroup_ids(needs.cgroups)
        return Observed(
            links=tuple(links),
            addresses=tuple(self.netlink.addresses()),
            defaults=tuple(self.netlink.main_defaults()),
            sysctls=self.sysctls.read(needs.sysctls),
            cgroup_prefix=prefix,
            cgroup_ids=ids,
        )

    def actual(self, rule_priorities: Iterable[int]) -> Actual:
        nft: NftTable | None = self.nft.read()
        rules = self.netlink.rules({*rule_priorities, *recorded_ranges(nft)})
        names = self._names if self._names is not None else {
            link.index: link.name for link in self.netlink.links()}
        routes = frozenset(
            dataclasses.replace(r, ifname=names.get(r.oif, "")) if r.oif else r for r in self.netlink.routes()
        )
        return Actual(rules=frozenset(rules), routes=routes, nft=nft)

    def write_sysctl(self, path: str, value: str) -> None:
        self.sysctls.write(path, value)

    def set_route(self, route: Route) -> None:
        self.netlink.set_route(route)

    def del_route(self, route: Route) -> bool:
        return self.netlink.del_route(route)

    def add_rule(self, rule: Rule) -> bool:
        return self.netlink.add_rule(rule)

    def del_rule(self, rule: Rule) -> bool:
        return self.netlink.del_rule(rule)

    def nft_apply(self, update: NftUpdate, desired: NftTable | None) -> None:
        self.nft.apply(update, desired)

    def clear_conntrack(self, mark: int, mask: int, label: int | None = None) -> None:
        """Delete the conntrack entries whose ct mark is ``mark`` under ``mask`` (all families);
        with ``label``, only those that also carry that ct label bit."""
        from .conntrack import clear_labelled, clear_mark

        if label is None:
            clear_mark(mark, mask)
        else:
            clear_labelled(mark, mask, label)
