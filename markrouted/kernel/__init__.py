"""The only code that talks to the kernel.

``Kernel`` gathers the adapters (rtnetlink, nftables, sysctls, cgroups) behind
the few operations reconcile needs: observe the facts derivation depends on,
read what markrouted owns, and write single objects. ``FakeKernel`` (in
``fake``) implements the same surface in memory for the pure-core tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Protocol

from ..config import Config
from ..model import Actual, NftTable, NftUpdate, Observed, Route, Rule
from .errors import KernelError, PermissionDenied, Unsupported

__all__ = ["Kernel", "KernelAPI", "KernelError", "PermissionDenied", "Unsupported", "cgroup_layout"]

CGROUP_ROOT = "/sys/fs/cgroup"


class KernelAPI(Protocol):
    def observe(self, config: Config) -> Observed: ...
    def actual(self, config: Config) -> Actual: ...
    def write_sysctl(self, path: str, value: str) -> None: ...
    def set_route(self, route: Route) -> None: ...
    def del_route(self, route: Route) -> bool: ...
    def add_rule(self, rule: Rule) -> bool: ...
    def del_rule(self, rule: Rule) -> bool: ...
    def nft_apply(self, update: NftUpdate, desired: NftTable | None) -> None: ...
    def close(self) -> None: ...


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

    @property
    def nft(self) -> Any:
        if self._nft is None:
            from .nft import Nft

            self._nft = Nft()
        return self._nft

    def close(self) -> None:
        self.netlink.close()

    def observe(self, config: Config) -> Observed:
        links = self.netlink.links()
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

    def actual(self, config: Config) -> Actual:
        lo = config.settings.rule_priority
        return Actual(
            rules=frozenset(self.netlink.rules(lo, lo + 999)),
            routes=frozenset(self.netlink.routes()),
            nft=self.nft.read(),
        )

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
