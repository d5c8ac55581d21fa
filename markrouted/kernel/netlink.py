"""Rules, routes, links and addresses over rtnetlink (pyroute2's sync IPRoute).

The same calls work on Debian 12's pyroute2 0.7.2 and on the 0.9 series: only
the request API shared by both is used, and attributes whose keyword form is
unreliable are given by their netlink names (``FRA_SUPPRESS_PREFIXLEN=0`` is
dropped as "unset" when passed as ``suppress_prefixlength=0``).

Everything read back is normalised into the model's identities: a rule or route
compares equal to the desired one exactly when the kernel holds that object.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..model import (
    MAIN_TABLE,
    AF_INET,
    AF_INET6,
    FAMILIES,
    RTPROT_MARKROUTED,
    SUPPRESS_UNSET,
    Address,
    Link,
    MainDefault,
    Route,
    Rule,
)
from .errors import KernelError, PermissionDenied
from .rtdump import Dumper, RawRoute

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
RTNH_F_ONLINK = 0x4
RTM_F_LOOKUP_TABLE = 0x1000
RESERVED_TABLES = (0, 253, 254, 255)


@contextmanager
def _translate(what: str) -> Iterator[None]:
    from pyroute2.netlink.exceptions import NetlinkError  # the call it wraps needs pyroute2 anyway

    try:
        yield
    except NetlinkError as exc:
        if exc.code in (errno.EPERM, errno.EACCES):
            raise PermissionDenied(f"{what}: permission denied (markrouted needs CAP_NET_ADMIN)") from exc
        raise KernelError(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}", exc.code) from exc


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    value = msg.get_attr(name)
    return default if value is None else value


class Netlink:
    """A thin, typed face over rtnetlink in the current namespace.

    ``ipr`` (pyroute2) carries every write and the route lookups of explain.
    Reads are the hot path of every reconcile and go through ``rtdump``: only
    the fields markrouted uses are decoded, and with strict checking the kernel
    itself sends only the routes of one protocol or one table.
    """

    def __init__(self) -> None:
        self.dumper = Dumper()
        self._ipr: Any = None

    @property
    def ipr(self) -> Any:
        """pyroute2's socket, opened (and pyroute2 imported) at the first write or lookup.

        The read-only commands never need it: importing pyroute2 alone would
        double the start-up time of ``plan`` (see bench/startup.py).
        """
        if self._ipr is None:
            from pyroute2 import IPRoute

            try:
                self._ipr = IPRoute()
            except OSError as exc:
                raise KernelError(f"cannot open a netlink socket: {exc}") from exc
        return self._ipr

    def close(self) -> None:
        self.dumper.close()
        if self._ipr is not None:
            self._ipr.close()

    # ---------------------------------------------------------------- reading

    def links(self) -> list[Link]:
        return [
            Link(index=index, name=name, up=bool(flags & IFF_UP), carrier=bool(flags & IFF_LOWER_UP))
            for index, name, flags in self.dumper.links()
        ]

    def addresses(self) -> list[Address]:
        out = []
        for family in FAMILIES:
            for index, address, prefixlen, flags in self.dumper.addresses(family):
                ip = ipaddress.ip_address(address)
                out.append(
                    Address(
                        index=index,
                        family=family,
                        address=str(ip),
                        prefixlen=prefixlen,
                        link_local=ip.is_link_local or ip.is_loopback,
                        tentative=bool(flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)),
                    )
                )
        return out

    def main_defaults(self) -> list[MainDefault]:
        out: list[MainDefault] = []
        for family in FAMILIES:
            for r in self.dumper.routes(family, table=MAIN_TABLE):
                if r.dst_len != 0 or r.type != 1:
                    continue
                if r.nexthops:
                    out.extend(MainDefault(family, oif, gw, r.priority) for oif, gw in r.nexthops)
                elif r.oif is not None:
                    out.append(MainDefault(family, r.oif, r.gateway, r.priority))
        return out

    def rules(self, lo: int | None = None, hi: int | None = None, owned: bool = True) -> list[Rule]:
        """markrouted's rules: its proto tag AND a priority in [lo, hi]."""
        out = []
        for family in FAMILIES:
            for r in self.dumper.rules(family):
                if owned and r.protocol != RTPROT_MARKROUTED:
                    continue
                if lo is not None and hi is not None and not lo <= r.priority <= hi:
                    continue
                out.append(
                    Rule(
                        family=family,
                        priority=r.priority,
                        table=r.table,
                        fwmark=r.fwmark or 0,
                        fwmask=(r.fwmask or 0) if r.fwmark is not None else 0,
                        src=r.src,
                        src_len=r.src_len,
                        suppress_prefixlength=r.suppress_prefixlength,
                    )
                )
        return out

    def foreign_rules(self) -> list[tuple[int, int, int, int, int]]:
        """Every rule not tagged as markrouted's: (family, priority, table, fwmark, fwmask)."""
        return [
            (family, r.priority, r.table, r.fwmark or 0, r.fwmask or 0)
            for family in FAMILIES
            for r in self.dumper.rules(family)
            if r.protocol != RTPROT_MARKROUTED
        ]

    def routes(self, owned: bool = True) -> list[Route]:
        """Routes tagged with markrouted's proto (or, owned=False, everyone else's),
        in any table but local/main/default."""
        out = []
        for family in FAMILIES:
            for r in self.dumper.routes(family, protocol=RTPROT_MARKROUTED if owned else 0):
                if r.table in RESERVED_TABLES:
                    continue
                if owned != (r.protocol == RTPROT_MARKROUTED):
                    continue
                out.append(route_from_raw(r))
        return out

    # ---------------------------------------------------------------- writing

    def add_rule(self, rule: Rule) -> bool:
        """Add a rule; False when it was there already (EEXIST is success)."""
        try:
            with _translate(f"add {rule}"):
                self.ipr.rule("add", **_rule_args(rule))
        except KernelError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise
        return True

    def del_rule(self, rule: Rule) -> bool:
        try:
            with _translate(f"delete {rule}"):
                self.ipr.rule("del", **_rule_args(rule))
        except KernelError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH):
                return False
            raise
        return True

    def set_route(self, route: Route) -> None:
        with _translate(f"replace {route}"):
            self.ipr.route("replace", **_route_args(route))

    def del_route(self, route: Route) -> bool:
        try:
            with _translate(f"delete {route}"):
                self.ipr.route("del", **_route_args(route))
        except KernelError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH):
                return False
            raise
        return True

    def route_get(
        self,
        dst: str,
        mark: int = 0,
        src: str | None = None,
        iif: int | None = None,
        uid: int | None = None,
    ) -> dict[str, Any]:
        """The kernel's own route lookup (``ip route get``), reporting the table used."""
        family = AF_INET6 if ":" in dst else AF_INET
        args: dict[str, Any] = {"dst": dst, "family": family, "flags": RTM_F_LOOKUP_TABLE}
        if mark:
            args["mark"] = mark
        if src:
            args["src"] = src
        if iif:
            args["iif"] = iif
        if uid is not None:
            args["uid"] = uid
        with _translate(f"route get {dst}"):
            msgs = list(self.ipr.route("get", **args))
        msg = msgs[0]
        return {
            "table": _attr(msg, "RTA_TABLE", msg["table"]),
            "type": msg["type"],
            "gateway": _attr(msg, "RTA_GATEWAY"),
            "oif": _attr(msg, "RTA_OIF"),
            "prefsrc": _attr(msg, "RTA_PREFSRC"),
        }


def route_from_raw(r: RawRoute) -> Route:
    # the kernel keeps route prefixes without host bits, and inet_ntop's text is
    # the canonical form derive writes (ipaddress' str) for unicast prefixes
    dst = r.dst or ("0.0.0.0" if r.family == AF_INET else "::")
    unicast = r.type == 1
    return Route(
        family=r.family,
        table=r.table,
        dst=f"{dst}/{r.dst_len}",
        metric=r.priority,
        # the kernel echoes IPv6 unreachable routes with "dev lo"
        oif=(r.oif or 0) if unicast else 0,
        gateway=r.gateway,
        prefsrc=r.prefsrc,
        scope=r.scope,
        onlink=bool(r.flags & RTNH_F_ONLINK),
        type=r.type,
    )


def _rule_args(rule: Rule) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": rule.family,
        "priority": rule.priority,
        "table": rule.table,
        "action": "to_tbl",
        "FRA_PROTOCOL": RTPROT_MARKROUTED,
    }
    if rule.table > 255:
        args["FRA_TABLE"] = rule.table
    if rule.fwmask:
        args["FRA_FWMARK"] = rule.fwmark
        args["FRA_FWMASK"] = rule.fwmask
    if rule.src is not None:
        args["src"] = rule.src
        args["src_len"] = rule.src_len
    if rule.suppress_prefixlength != SUPPRESS_UNSET:
        args["FRA_SUPPRESS_PREFIXLEN"] = rule.suppress_prefixlength
    return args


def _route_args(route: Route) -> dict[str, Any]:
    net = ipaddress.ip_network(route.dst)
    args: dict[str, Any] = {
        "family": route.family,
        "dst": str(net.network_address),
        "dst_len": net.prefixlen,
        "table": route.table,
        "proto": RTPROT_MARKROUTED,
        "type": route.type,
        "priority": route.metric,
        "scope": route.scope,
    }
    if route.table > 255:
        args["RTA_TABLE"] = route.table
    if route.oif:
        args["oif"] = route.oif
    if route.gateway:
        args["gateway"] = route.gateway
    if route.prefsrc:
        args["prefsrc"] = route.prefsrc
    if route.onlink:
        args["flags"] = RTNH_F_ONLINK
    return args
