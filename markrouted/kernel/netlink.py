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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..model import (
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

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
RTNH_F_ONLINK = 0x4
RTM_F_LOOKUP_TABLE = 0x1000
RESERVED_TABLES = (0, 253, 254, 255)


@contextmanager
def _translate(what: str) -> Iterator[None]:
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
    """A thin, typed face over rtnetlink sockets in the current namespace.

    ``ipr`` carries every request. ``dumps`` serves the route dumps that can be
    filtered by table or protocol: with strict checking the kernel itself sends
    only the matching routes, and decoding the messages is most of what a dump
    costs in pyroute2 (a reconcile with 16 uplinks spent more time decoding the
    local table's routes than anything else it read). It is a socket of its own
    so that strict checking changes no other request; where it cannot be had,
    ``ipr`` serves, unfiltered. Every caller still checks every message, so the
    kernel's filter only ever saves work.
    """

    def __init__(self) -> None:
        try:
            self.ipr = IPRoute()
        except OSError as exc:
            raise KernelError(f"cannot open a netlink socket: {exc}") from exc
        self.dumps: Any = self.ipr
        try:
            self.dumps = IPRoute(strict_check=True)
        except (OSError, NetlinkError):
            pass

    def close(self) -> None:
        if self.dumps is not self.ipr:
            self.dumps.close()
        self.ipr.close()

    # ---------------------------------------------------------------- reading

    def links(self) -> list[Link]:
        out = []
        with _translate("dump links"):
            for msg in self.ipr.get_links():
                flags = msg["flags"]
                out.append(
                    Link(
                        index=msg["index"],
                        name=_attr(msg, "IFLA_IFNAME", ""),
                        up=bool(flags & IFF_UP),
                        carrier=bool(flags & IFF_LOWER_UP),
                    )
                )
        return out

    def addresses(self) -> list[Address]:
        out = []
        with _translate("dump addresses"):
            for family in FAMILIES:
                for msg in self.ipr.get_addr(family=family):
                    addr = _attr(msg, "IFA_LOCAL") or _attr(msg, "IFA_ADDRESS")
                    if addr is None:
                        continue
                    flags = _attr(msg, "IFA_FLAGS", msg["flags"])
                    ip = ipaddress.ip_address(addr)
                    out.append(
                        Address(
                            index=msg["index"],
                            family=family,
                            address=str(ip),
                            prefixlen=msg["prefixlen"],
                            link_local=ip.is_link_local or ip.is_loopback,
                            tentative=bool(flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)),
                        )
                    )
        return out

    def main_defaults(self) -> list[MainDefault]:
        out = []
        with _translate("dump main table"):
            for family in FAMILIES:
                for msg in self.dumps.get_routes(family=family, table=254):
                    if msg["dst_len"] != 0 or msg["type"] != 1:
                        continue
                    if _attr(msg, "RTA_TABLE", msg["table"]) != 254:
                        continue
                    metric = _attr(msg, "RTA_PRIORITY", 0)
                    mp = _attr(msg, "RTA_MULTIPATH")
                    if mp:
                        for hop in mp:
                            gw = hop.get_attr("RTA_GATEWAY")
                            out.append(MainDefault(family, hop["oif"], gw, metric))
                        continue
                    oif = _attr(msg, "RTA_OIF")
                    if oif is None:
                        continue
                    out.append(MainDefault(family, oif, _attr(msg, "RTA_GATEWAY"), metric))
        return out

    def rules(self, lo: int | None = None, hi: int | None = None, owned: bool = True) -> list[Rule]:
        """markrouted's rules: its proto tag AND a priority in [lo, hi]."""
        out = []
        with _translate("dump rules"):
            for family in FAMILIES:
                for msg in self.ipr.get_rules(family=family):
                    if owned and _attr(msg, "FRA_PROTOCOL", 0) != RTPROT_MARKROUTED:
                        continue
                    prio = _attr(msg, "FRA_PRIORITY", 0)
                    if lo is not None and hi is not None and not lo <= prio <= hi:
                        continue
                    out.append(
                        Rule(
                            family=family,
                            priority=prio,
                            table=_attr(msg, "FRA_TABLE", msg["table"]),
                            fwmark=_attr(msg, "FRA_FWMARK", 0),
                            fwmask=_attr(msg, "FRA_FWMASK", 0) if _attr(msg, "FRA_FWMARK") is not None else 0,
                            src=_attr(msg, "FRA_SRC"),
                            src_len=msg["src_len"],
                            suppress_prefixlength=_attr(msg, "FRA_SUPPRESS_PREFIXLEN", SUPPRESS_UNSET),
                        )
                    )
        return out

    def foreign_rules(self) -> list[tuple[int, int, int, int, int]]:
        """Every rule not tagged as markrouted's: (family, priority, table, fwmark, fwmask)."""
        out = []
        with _translate("dump rules"):
            for family in FAMILIES:
                for msg in self.ipr.get_rules(family=family):
                    if _attr(msg, "FRA_PROTOCOL", 0) == RTPROT_MARKROUTED:
                        continue
                    out.append(
                        (
                            family,
                            _attr(msg, "FRA_PRIORITY", 0),
                            _attr(msg, "FRA_TABLE", msg["table"]),
                            _attr(msg, "FRA_FWMARK", 0),
                            _attr(msg, "FRA_FWMASK", 0),
                        )
                    )
        return out

    def routes(self, owned: bool = True) -> list[Route]:
        """Routes tagged with markrouted's proto, in any table but local/main/default."""
        out = []
        with _translate("dump routes"):
            for family in FAMILIES:
                dump = (self.dumps.route("dump", family=family, proto=RTPROT_MARKROUTED) if owned
                        else self.ipr.get_routes(family=family))
                for msg in dump:
                    table = _attr(msg, "RTA_TABLE", msg["table"])
                    if table in RESERVED_TABLES:
                        continue
                    if owned != (msg["proto"] == RTPROT_MARKROUTED):
                        continue
                    out.append(route_from_msg(family, table, msg))
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


def route_from_msg(family: int, table: int, msg: Any) -> Route:
    dst = _attr(msg, "RTA_DST")
    if dst is None:
        dst = "0.0.0.0" if family == AF_INET else "::"
    net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
    rtype = msg["type"]
    unicast = rtype == 1
    return Route(
        family=family,
        table=table,
        dst=str(net),
        metric=_attr(msg, "RTA_PRIORITY", 0),
        # the kernel echoes IPv6 unreachable routes with "dev lo"
        oif=_attr(msg, "RTA_OIF", 0) if unicast else 0,
        gateway=_attr(msg, "RTA_GATEWAY"),
        prefsrc=_attr(msg, "RTA_PREFSRC"),
        scope=msg["scope"],
        onlink=bool(msg["flags"] & RTNH_F_ONLINK),
        type=rtype,
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


def ifindex_map(links: Iterable[Link]) -> dict[str, int]:
    return {link.name: link.index for link in links}
