"""The only code that talks to the kernel.

``Kernel`` gathers the adapters (rtnetlink, nftables, sysctls, cgroups) behind
the few operations reconcile needs: observe the facts derivation depends on,
read what markrouted owns, and write single objects. The test suite's
``FakeKernel`` (``tests/fakekernel.py``) implements the same surface in memory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any, Protocol

from ..config import Config
from ..derive import RANGE_CHAIN
from ..model import Actual, NftTable, NftUpdate, Observed, Route, Rule
from .errors import KernelError, PermissionDenied, Unsupported

__all__ = ["Kernel", "KernelAPI", "KernelError", "PermissionDenied", "Unsupported", "cgroup_layout"]

CGROUP_ROOT = "/sys/fs/cgroup"


class KernelAPI(Protocol):
    def observe(self, config: Config) -> Observed: ...
    def actual(self, config: Config, extra_ranges: Iterable[int] = ()) -> Actual: ...
    def write_sysctl(self, path: str, value: str) -> None: ...
    def set_route(self, route: Route) -> None: ...
    def del_route(self, route: Route) -> bool: ...
    def add_rule(self, rule: Rule) -> bool: ...
    def del_rule(self, rule: Rule) -> bool: ...
    def nft_apply(self, update: NftUpdate, desired: NftTable | None) -> None: ...
    def clear_conntrack(self, mark: int, mask: int) -> None: ...
    def close(self) -> None: ...


def recorded_ranges(table: NftTable | None) -> set[int]:
    """The rule_priority values the installed nft table records (see derive.RANGE_CHAIN)."""
    out = set()
    for chain in table.chains if table else ():
        if chain.name.startswith(RANGE_CHAIN) and chain.name[len(RANGE_CHAIN):].isdigit():
            out.add(int(chain.name[len(RANGE_CHAIN):]))
    return out


def cgroup_layout(root: str = CGROUP_ROOT) -> str | None:
    """Where the cgroup v2 tree is, relative to /sys/fs/cgroup; None if nowhere."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return ""
    if os.path.exists(os.path.join(root, "unified", "cgroup.controllers")):
        return "unified"
    return None


def _sysctl_paths(config: Config, names: Iterable[str]) -> list[str]:
    paths = ["net/ipv4/conf/all/src_valid_mark", "net/ipv4/conf/all/rp_filter"]
    present = set(names)
    for u in config.uplinks:
        if u.interface in present:
            paths.append(f"net/ipv4/conf/{u.interface}/rp_filter")
    return paths


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
        # The table as last written by us. The daemon trusts it until nf_tables
        # reports a transaction on the table by someone else (or a resync), so a
        # failover does not re-read a thousand-rule table; one-shot commands
        # never set it and always read.
        self.nft_cached = False
        self._nft_cache: NftTable | None = None
        self._names: dict[int, str] | None = None
        self.cache_nft = False

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

    def observe(self, config: Config) -> Observed:
        links = self.netlink.links()
        # actual() names the routes' interfaces from this reading: a pass reads links once
        self._names = {link.index: link.name for link in links}
        prefix = cgroup_layout()
        ids: dict[str, int] = {}
        if prefix is not None:
            base = os.path.join(CGROUP_ROOT, prefix) if prefix else CGROUP_ROOT
            for p in config.policies:
                if p.cgroup:
                    path = p.cgroup.strip("/")
                    try:
                        ids[path] = os.stat(os.path.join(base, path)).st_ino
                    except OSError:
                        pass
        return Observed(
            links=tuple(links),
            addresses=tuple(self.netlink.addresses()),
            defaults=tuple(self.netlink.main_defaults()),
            sysctls=self.sysctls.read(_sysctl_paths(config, (link.name for link in links))),
            cgroup_prefix=prefix or "",
            cgroup_ids=ids,
        )

    def actual(self, config: Config, extra_ranges: Iterable[int] = ()) -> Actual:
        """What markrouted owns; ``extra_ranges``: previous rule_priority values still owned."""
        if self.nft_cached:
            nft = self._nft_cache
        else:
            nft = self.nft.read()
        rules: set[Rule] = set()
        for lo in {config.settings.rule_priority, *extra_ranges, *recorded_ranges(nft)}:
            rules.update(self.netlink.rules(lo, lo + 999))
        names = self._names if self._names is not None else {
            link.index: link.name for link in self.netlink.links()}
        routes = frozenset(
            dataclasses.replace(r, ifname=names.get(r.oif, "")) if r.oif else r for r in self.netlink.routes()
        )
        return Actual(rules=frozenset(rules), routes=routes, nft=nft)

    def invalidate_nft(self) -> None:
        self.nft_cached = False

    def nft_generation(self) -> int | None:
        """The namespace's nf_tables generation id (one round-trip); None if unreadable."""
        gen: int | None = self.nft.generation()
        return gen

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
        self.nft_cached = False
        self.nft.apply(update, desired)
        if self.cache_nft:
            self._nft_cache = None if update.remove else desired
            self.nft_cached = True

    def clear_conntrack(self, mark: int, mask: int) -> None:
        """Delete the conntrack entries whose ct mark is ``mark`` under ``mask`` (all families)."""
        from .conntrack import clear_mark

        clear_mark(mark, mask)
