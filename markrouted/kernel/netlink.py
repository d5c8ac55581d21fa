"""Rules, routes, links and addresses over rtnetlink: the I/O.

Reads are struct-decoded dumps (``rtdump``); writes are one request each,
encoded by ``rules.message`` and ``routes.message`` and sent on the dump's
socket, so the daemon never imports pyroute2 (about 11 MB of its memory).
Only the route lookup of ``explain`` goes through pyroute2's IPRoute,
imported when it is first used. What a rule or a route is on the wire (its
decoding, its message, whose it is) lives in ``rules`` and ``routes``;
everything read back is normalised into the model's identities, so a rule or
route compares equal to the desired one exactly when the kernel holds that
object.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..model import (
    AF_INET,
    AF_INET6,
    FAMILIES,
    MAIN_TABLE,
    RTN_UNICAST,
    RTPROT_MARKROUTED,
    Address,
    Link,
    MainDefault,
    Route,
    Rule,
)
from . import nl, routes, rules
from .errors import KernelError, denied
from .rtdump import Dumper

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
RTM_F_LOOKUP_TABLE = 0x1000
NLM_F_REPLACE, NLM_F_EXCL = 0x100, 0x200

#: ``ip rule add`` / ``ip route replace`` / either delete: acknowledged requests
ADD = nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE | NLM_F_EXCL
REPLACE = nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE | NLM_F_REPLACE
DELETE = nl.NLM_F_REQUEST | nl.NLM_F_ACK


@contextmanager
def _translate(what: str) -> Iterator[None]:
    from pyroute2.netlink.exceptions import NetlinkError  # route_get's call needs pyroute2 anyway

    try:
        yield
    except NetlinkError as exc:
        if exc.code in (errno.EPERM, errno.EACCES):
            raise denied(what) from exc
        raise KernelError(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}", exc.code) from exc


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    value = msg.get_attr(name)
    return default if value is None else value


class Netlink:
    """A thin, typed face over rtnetlink in the current namespace.

    One socket (``dumper.nl``) carries the dumps and the writes. Reads are the
    hot path of every reconcile: only the fields markrouted uses are decoded,
    and with strict checking the kernel itself sends only the routes of one
    protocol or one table. ``ipr`` (pyroute2) serves explain's route lookups
    only.

    Longer than the daemon's other classes on purpose (size: one thin method per
    rtnetlink operation markrouted uses): what a rule or a route is, how it is
    encoded and whose it is live in ``rules.py`` and ``routes.py``; this class
    only sends and receives.
    """

    def __init__(self) -> None:
        self.dumper = Dumper()
        self._ipr: Any = None

    @property
    def ipr(self) -> Any:
        """pyroute2's socket, opened (and pyroute2 imported) at the first route lookup.

        Nothing else needs it: importing pyroute2 alone would double the
        start-up time of ``plan`` (see bench/startup.py) and add about 11 MB to
        the daemon (see bench/daemon.py).
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
                if r.dst_len != 0 or r.type != RTN_UNICAST:
                    continue
                if r.nexthops:
                    out.extend(MainDefault(family, oif, gw, r.priority) for oif, gw in r.nexthops)
                elif r.oif is not None:
                    out.append(MainDefault(family, r.oif, r.gateway, r.priority))
        return out

    def rules(self, starts: Iterable[int]) -> list[Rule]:
        """markrouted's rules: its proto tag AND a priority in the range of one of ``starts``."""
        starts = tuple(starts)
        return [rules.to_rule(r) for family in FAMILIES for r in self.dumper.rules(family)
                if rules.owned(r, starts)]

    def foreign_rules(self) -> list[tuple[int, int, int, int, int]]:
        """Every rule not tagged as markrouted's: (family, priority, table, fwmark, fwmask)."""
        return [
            (family, r.priority, r.table, r.fwmark or 0, r.fwmask or 0)
            for family in FAMILIES
            for r in self.dumper.rules(family)
            if r.protocol != RTPROT_MARKROUTED
        ]

    def routes(self) -> list[Route]:
        """markrouted's routes (its proto tag) in any table but unspec/default/main/local."""
        return [routes.to_route(r) for family in FAMILIES
                for r in self.dumper.routes(family, protocol=RTPROT_MARKROUTED) if routes.owned(r)]

    def foreign_route_tables(self) -> set[int]:
        """The tables, but unspec/default/main/local, that hold routes of someone else."""
        return {r.table for family in FAMILIES for r in self.dumper.routes(family) if routes.foreign(r)}

    # ---------------------------------------------------------------- writing

    def _write(self, mtype: int, flags: int, body: bytes, what: str) -> None:
        """One acknowledged request; the kernel's refusal raises (``nl.raise_for``)."""
        for _answer in self.dumper.nl.request(mtype, flags, body, what):
            pass  # a write is answered by its acknowledgement alone

    def add_rule(self, rule: Rule) -> bool:
        """Add a rule; False when it was there already (EEXIST is success)."""
        try:
            self._write(rules.RTM_NEWRULE, ADD, rules.message(rule), f"add {rule}")
        except KernelError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise
        return True

    def del_rule(self, rule: Rule) -> bool:
        """Delete a rule; False when there was no such rule."""
        try:
            self._write(rules.RTM_DELRULE, DELETE, rules.message(rule), f"delete {rule}")
        except KernelError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH):
                return False
            raise
        return True

    def set_route(self, route: Route) -> None:
        """``ip route replace``: the route takes its slot in place."""
        self._write(routes.RTM_NEWROUTE, REPLACE, routes.message(route), f"replace {route}")

    def del_route(self, route: Route) -> bool:
        """Delete a route; False when there was no such route."""
        try:
            self._write(routes.RTM_DELROUTE, DELETE, routes.message(route), f"delete {route}")
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

