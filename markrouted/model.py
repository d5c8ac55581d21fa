"""Frozen value types shared by the pure core and the kernel adapters.

Every kernel object markrouted owns has exactly one identity, normalised to the
form the kernel echoes back, so that "desired" and "actual" compare equal when
(and only when) nothing needs to be written. Rules, for instance, are identified
by family, priority, selector, fwmark/mask, suppress_prefixlength and table: the
set of attributes whose difference makes two rules different for the kernel.
Two rules equal under this identity are the same rule; that is what stops the
duplicate rules other tools accumulate across restarts.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import socket
from collections.abc import Mapping
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
FAMILIES: tuple[int, ...] = (AF_INET, AF_INET6)

# The domain's constants, defined here once; the kernel package keeps only the
# netlink wire numbers (message types, attribute types, groups).

#: The routing protocol number markrouted tags its rules and routes with.
#: 109 is unassigned in the kernel's rtnetlink.h and in iproute2's rt_protos
#: (reserved values: 0-4, 8-18, 42, 99, 186-192), and no routing daemon we
#: know of uses it. Shipped as a name in /etc/iproute2/rt_protos.d/markrouted.conf.
RTPROT_MARKROUTED = 109

#: Suppress-prefixlength value the kernel reports for "not set".
SUPPRESS_UNSET = 0xFFFFFFFF

#: Routing tables nobody may claim for an uplink, and which never hold markrouted's
#: routes: unspec, default, main, local.
MAIN_TABLE = 254
RESERVED_TABLES: Mapping[int, str] = MappingProxyType({0: "unspec", 253: "default", 254: "main", 255: "local"})

#: Route types and scopes markrouted writes (rtnetlink's RTN_* and RT_SCOPE_*).
RTN_UNICAST = 1
RTN_UNREACHABLE = 7
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253

#: IP protocol numbers by the names the config accepts; those that have ports;
#: and the names nft prints in ``meta l4proto`` sets (icmpv6 is "ipv6-icmp").
IP_PROTOCOLS: Mapping[str, int] = MappingProxyType(
    {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "udplite": 136, "gre": 47, "esp": 50, "ah": 51})
PORT_PROTOCOLS: tuple[int, ...] = (6, 17, 132, 136)  # tcp udp sctp udplite
NFT_PROTOCOL_NAMES: Mapping[int, str] = MappingProxyType(
    {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp", 136: "udplite"})

#: markrouted's ip rules live in [P, P + PRIORITY_SPAN - 1] of ``settings.rule_priority`` P.
PRIORITY_SPAN = 1000

NFT_TABLE = "markrouted"
NFT_FAMILY = "inet"

#: An empty chain named after the rule_priority in force records, in the
#: kernel, which priority range markrouted's rules occupy: after the setting
#: changes, the rules of the old range are still recognised as markrouted's
#: (tag AND recorded range) and removed, by ``apply`` as by the daemon.
RANGE_CHAIN = "rule_priority_"


def priority_range(start: int) -> tuple[int, int]:
    """The rule priorities [lo, hi] markrouted owns for ``rule_priority = start``."""
    return start, start + PRIORITY_SPAN - 1


def in_ranges(priority: int, starts: Iterable[int]) -> bool:
    """Whether a rule priority lies in the range of any of those rule_priority values."""
    return any(lo <= priority <= lo + PRIORITY_SPAN - 1 for lo in starts)


def recorded_ranges(table: NftTable | None) -> set[int]:
    """The rule_priority values an installed nft table records (see ``RANGE_CHAIN``)."""
    out = set()
    for chain in table.chains if table else ():
        rest = chain.name[len(RANGE_CHAIN):]
        if chain.name.startswith(RANGE_CHAIN) and rest.isdigit():
            out.add(int(rest))
    return out


def counter_name(kind: str, name: str) -> str:
    """The named nft counter of a policy (``kind`` "policy") or an uplink ("uplink").

    An nft identifier: letters, digits and ``_.-/`` only. Policy names may hold
    ``:``, which nft refuses there; such a name is spelt in hex under another
    prefix, so two policies never share a counter.
    """
    if ":" in name:
        return f"{kind}x_{name.encode().hex()}"
    return f"{kind}_{name}"


def family_name(family: int) -> str:
    return "ipv4" if family == AF_INET else "ipv6"


def ip_cmd(family: int) -> str:
    return "ip" if family == AF_INET else "ip -6"


# --------------------------------------------------------------------- observed


@dataclass(frozen=True)
class Needs:
    """What of the kernel's state derivation depends on, beyond links, addresses and defaults.

    Computed from the config by the pure core (``derive.needs``) and handed to
    ``KernelAPI.observe``, so the adapter only reads what it is told to.
    """

    #: /proc/sys relative paths; one that does not exist is simply not reported
    sysctls: tuple[str, ...] = ()
    #: cgroup v2 paths (as written in the config) whose ids nft matches on
    cgroups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Link:
    """A network interface as the kernel reports it."""

    index: int
    name: str
    up: bool  # IFF_UP: administratively up
    carrier: bool  # IFF_LOWER_UP: the lower layer has a carrier


@dataclass(frozen=True)
class Address:
    index: int  # ifindex
    family: int
    address: str
    prefixlen: int
    link_local: bool = False
    tentative: bool = False


@dataclass(frozen=True)
class MainDefault:
    """A default route of the main table: where "gateway = auto" learns from."""

    family: int
    index: int  # oif
    gateway: str | None
    metric: int = 0


@dataclass(frozen=True)
class Observed:
    """Everything of the kernel's state the derivation depends on.

    Only what affects the desired state is here; what markrouted owns is read
    separately (see ``Actual``). ``sysctls`` maps a /proc/sys relative path
    (``net/ipv4/conf/eth0/rp_filter``) to its current value.
    """

    links: tuple[Link, ...] = ()
    addresses: tuple[Address, ...] = ()
    defaults: tuple[MainDefault, ...] = ()
    sysctls: Mapping[str, str] = field(default_factory=dict)
    #: where nft finds the cgroup v2 tree below /sys/fs/cgroup: "" on a pure v2
    #: host, "unified" on a hybrid one
    cgroup_prefix: str = ""
    #: cgroup v2 path (as written in the config) -> its id, for those that exist
    cgroup_ids: Mapping[str, int] = field(default_factory=dict)

    def link(self, name: str) -> Link | None:
        for link in self.links:
            if link.name == name:
                return link
        return None

    def addresses_of(self, index: int, family: int) -> tuple[Address, ...]:
        return tuple(a for a in self.addresses if a.index == index and a.family == family)


@dataclass(frozen=True)
class TargetResult:
    """One probe of one health-check target."""

    target: str
    ok: bool
    rtt: float | None = None  # seconds
    error: str | None = None


@dataclass(frozen=True)
class Health:
    """A health checker's verdict on one uplink (absent: no check configured or not run)."""

    up: bool
    reason: str


# ----------------------------------------------------------------- owned objects


@dataclass(frozen=True, order=True)
class Rule:
    """An ip rule owned by markrouted (proto RTPROT_MARKROUTED is implied).

    Its wire form, its ownership filter and the events that concern it live in
    ``kernel/rules.py``, whose docstring lists every place a rule is handled.
    """

    family: int
    priority: int
    table: int
    fwmark: int = 0
    fwmask: int = 0
    src: str | None = None
    src_len: int = 0
    suppress_prefixlength: int = SUPPRESS_UNSET

    def __str__(self) -> str:
        sel = "from all" if self.src is None else f"from {self.src}" + (
            "" if self.src_len == (32 if self.family == AF_INET else 128) else f"/{self.src_len}"
        )
        if self.fwmask:
            sel += f" fwmark {self.fwmark:#x}/{self.fwmask:#x}"
        table = "main" if self.table == MAIN_TABLE else str(self.table)
        text = f"{ip_cmd(self.family)} rule {self.priority}: {sel} lookup {table}"
        if self.suppress_prefixlength != SUPPRESS_UNSET:
            text += f" suppress_prefixlength {self.suppress_prefixlength}"
        return text + " proto markrouted"


@dataclass(frozen=True, order=True)
class Route:
    """A route owned by markrouted in an uplink's table.

    ``key`` is what the kernel considers the route's slot (a replace with the
    same key changes it in place, without a gap); the rest are its attributes.
    Its wire form and ownership filter live in ``kernel/routes.py``.
    """

    family: int
    table: int
    dst: str  # "0.0.0.0/0", "198.51.100.0/24"
    metric: int
    oif: int
    gateway: str | None = None
    prefsrc: str | None = None
    scope: int = RT_SCOPE_UNIVERSE  # or RT_SCOPE_LINK
    onlink: bool = False
    type: int = RTN_UNICAST  # or RTN_UNREACHABLE
    ifname: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[int, int, str, int]:
        return (self.family, self.table, self.dst, self.metric)

    def __str__(self) -> str:
        dst = "default" if self.dst.endswith("/0") else self.dst
        if self.type == RTN_UNREACHABLE:
            return (f"{ip_cmd(self.family)} route unreachable {dst} table {self.table}"
                    f" proto markrouted metric {self.metric}")
        text = f"{ip_cmd(self.family)} route {dst}"
        if self.gateway:
            text += f" via {self.gateway}"
        text += f" dev {self.ifname or self.oif} table {self.table} proto markrouted"
        if self.scope == RT_SCOPE_LINK:
            text += " scope link"
        if self.prefsrc:
            text += f" src {self.prefsrc}"
        if self.metric:
            text += f" metric {self.metric}"
        if self.onlink:
            text += " onlink"
        return text


@dataclass(frozen=True)
class Sysctl:
    path: str  # relative to /proc/sys, e.g. "net/ipv4/conf/eth0/rp_filter"
    value: str
    reason: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"sysctl {self.path.replace('/', '.')}={self.value}"


# ------------------------------------------------------------------- nftables


@dataclass(frozen=True)
class NftRule:
    """One rule: its JSON expression list (as canonical text) and its comment.

    The comment carries a digest of the expression, so a rule changed behind
    markrouted's back is noticed by comparing comments alone: nft's JSON echo of
    an expression differs from the input in many small ways, a comment does not.
    """

    expr_json: str
    text: str
    comment: str
    #: the comment as an nft string literal, quoted by ``nftexpr.string`` when
    #: derived (empty: a rule read back or built by hand, quoted plainly)
    comment_text: str = field(default="", compare=False)

    @property
    def expr(self) -> list[Any]:
        result: list[Any] = json.loads(self.expr_json)
        return result

    @functools.cached_property
    def raw(self) -> tuple[RawStatement, ...] | None:
        """The rule in the raw refill's vocabulary (``kernel/nftraw``), or None if outside it."""
        return raw_statements(self.expr_json)


@dataclass(frozen=True)
class RawStatement:
    """One statement of the small vocabulary the ``pick_N`` chains use.

    The kernel adapter encodes these into nf_tables messages itself, without
    libnftables: ``goto`` (``name``: the chain), ``verdict`` (``name``: drop,
    accept or return), ``nfproto`` (``name``: ipv4 or ipv6) and ``numgen_lt``
    (``numgen random mod <mod> < <bound>``).
    """

    kind: str
    name: str = ""
    mod: int = 0
    bound: int = 0


def raw_statements(expr_json: str) -> tuple[RawStatement, ...] | None:
    """The statements of a rule's expression JSON, or None if any is outside the vocabulary."""
    try:
        expr = json.loads(expr_json)
    except ValueError:
        return None
    out: list[RawStatement] = []
    for item in expr if isinstance(expr, list) else [None]:
        if not isinstance(item, dict) or len(item) != 1:
            return None
        (key, value), = item.items()
        if key == "goto" and isinstance(value, dict) and isinstance(value.get("target"), str):
            out.append(RawStatement("goto", value["target"]))
            continue
        if key in ("drop", "accept", "return") and value is None:
            out.append(RawStatement("verdict", key))
            continue
        if key != "match" or not isinstance(value, dict):
            return None
        left, right, op = value.get("left"), value.get("right"), value.get("op")
        if left == {"meta": {"key": "nfproto"}} and op == "==" and right in ("ipv4", "ipv6"):
            out.append(RawStatement("nfproto", right))
            continue
        ng = left.get("numgen") if isinstance(left, dict) else None
        if (isinstance(ng, dict) and ng.get("mode") == "random" and not ng.get("offset")
                and isinstance(ng.get("mod"), int) and op == "<" and isinstance(right, int)):
            out.append(RawStatement("numgen_lt", mod=ng["mod"], bound=right))
            continue
        return None
    return tuple(out)


@dataclass(frozen=True)
class BaseHook:
    type: str  # filter | route | nat
    hook: str
    prio: int
    policy: str = "accept"


@dataclass(frozen=True)
class NftChain:
    name: str
    base: BaseHook | None
    rules: tuple[NftRule, ...] = ()

    @property
    def raw_refillable(self) -> bool:
        """Every rule is in the raw refill's vocabulary (see ``NftRule.raw``)."""
        return all(rule.raw is not None for rule in self.rules)

    @functools.cached_property
    def fingerprint(self) -> tuple[BaseHook | None, tuple[str, ...]]:
        """What drift detection compares: the hook and the rules' comments (with their digests)."""
        return (self.base, tuple(r.comment for r in self.rules))


#: A set element as an inclusive range of addresses (integers of the set's family).
Interval: TypeAlias = tuple[int, int]


def _address_text(value: int, version: int) -> str:
    """An address as ipaddress prints it (IPv6 compressed): for people."""
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def _address_raw(value: int, version: int) -> str:
    """An address in a form nft reads (IPv6 uncompressed): five times faster, for 100,000 elements."""
    if version == 4:
        return f"{value >> 24}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"
    return ":".join([f"{value >> shift & 0xFFFF:x}" for shift in (112, 96, 80, 64, 48, 32, 16, 0)])


def interval_text(lo: int, hi: int, version: int, fast: bool = False) -> str:
    """One interval in nft's syntax: an address, a prefix, or ``a-b`` (``fast``: IPv6 uncompressed)."""
    show = _address_raw if fast else _address_text
    size = hi - lo + 1
    if lo == hi:
        return show(lo, version)
    if size & (size - 1) == 0 and lo & (size - 1) == 0:
        bits = 32 if version == 4 else 128
        return f"{show(lo, version)}/{bits - size.bit_length() + 1}"
    return f"{show(lo, version)}-{show(hi, version)}"


@dataclass(frozen=True)
class NftSet:
    """A named set of addresses in the table (``[sets.NAME]``, one per family).

    A static set (``flags interval``) holds merged, sorted, disjoint
    ``elements``; its elements are written by the "set elements" update
    without touching anything else. A dynamic set (``dynamic``: filled by
    dnsmasq, ``flags timeout``) is declared by markrouted but its elements are
    never written nor removed by it: ``elements`` is always empty there. The
    sticky-source sets are dynamic too, filled by the packet path (``learns``).
    """

    name: str
    version: int  # 4 or 6
    elements: tuple[Interval, ...] = ()
    dynamic: bool = False
    timeout: int = 0  # seconds, dynamic sets only
    #: filled by the packet path (``update @set``: sticky sources), which needs nft's
    #: ``dynamic`` flag; a set's role never changes under one name, so not in ``shape``
    learns: bool = field(default=False, compare=False)
    #: the most elements it holds (0: the kernel's default); bounds a learning set
    size: int = field(default=0, compare=False)

    @property
    def shape(self) -> tuple[str, int, bool, int]:
        """What only a replace can change: the set's declaration."""
        return (self.name, self.version, self.dynamic, self.timeout)

    @property
    def type(self) -> str:
        return "ipv4_addr" if self.version == 4 else "ipv6_addr"

    def element_texts(self, elements: Iterable[Interval] | None = None, fast: bool = False) -> list[str]:
        version = self.version
        return [interval_text(lo, hi, version, fast) for lo, hi in (self.elements if elements is None else elements)]

    def text(self) -> list[str]:
        lines = [f"\tset {self.name} {{", f"\t\ttype {self.type}"]
        if self.dynamic:
            flags = "dynamic,timeout" if self.learns else "timeout"
            lines.append(f"\t\tflags {flags}\n\t\ttimeout {self.timeout}s")
            if self.size:
                lines.append(f"\t\tsize {self.size}")
        else:
            lines.append("\t\tflags interval\n\t\tauto-merge")
            if self.elements:
                lines.append("\t\telements = { " + ", ".join(self.element_texts(fast=True)) + " }")
        lines.append("\t}")
        return lines


@dataclass(frozen=True)
class SetElements:
    """The "set elements" update of one static set: intervals to delete, then to add."""

    name: str
    version: int
    delete: tuple[Interval, ...] = ()
    add: tuple[Interval, ...] = ()


@dataclass(frozen=True)
class NftTable:
    chains: tuple[NftChain, ...]
    #: named sets, declared before the chains that refer to them
    sets: tuple[NftSet, ...] = ()

    def set(self, name: str) -> NftSet | None:
        for item in self.sets:
            if item.name == name:
                return item
        return None
    #: the named counters its rules count into (``derive.counter_name``); not
    #: compared: the rules naming them are, and a replace re-declares them
    counters: tuple[str, ...] = field(default=(), compare=False)

    def chain(self, name: str) -> NftChain | None:
        for chain in self.chains:
            if chain.name == name:
                return chain
        return None

    def text(self, counts: Mapping[str, tuple[int, int]] | None = None) -> str:
        """The table in nft's own syntax, as ``nft list table`` would show it.

        ``counts`` (name -> packets, bytes) starts the named counters where the
        table being replaced left them, so a replace does not zero them.
        """
        lines = [f"table {NFT_FAMILY} {NFT_TABLE} {{"]
        for item in self.sets:
            lines.extend(item.text())
        for name in self.counters:
            packets, nbytes = (counts or {}).get(name, (0, 0))
            lines.append(f"\tcounter {name} {{ packets {packets} bytes {nbytes} }}")
        for chain in self.chains:
            lines.append(f"\tchain {chain.name} {{")
            if chain.base:
                b = chain.base
                lines.append(
                    f"\t\ttype {b.type} hook {b.hook} priority {b.prio}; policy {b.policy};"
                )
            for rule in chain.rules:
                quoted = rule.comment_text or f'"{rule.comment}"'
                lines.append(f"\t\t{rule.text} comment {quoted}")
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines)


# ------------------------------------------------------------------- desired


UplinkState: TypeAlias = Literal["up", "down"]


@dataclass(frozen=True)
class UplinkStatus:
    name: str
    interface: str
    state: UplinkState
    reason: str
    gateway: str | None
    gateway6: str | None
    table: int
    mark: int  # the fwmark bits (already shifted)
    families: tuple[int, ...]  # the families it can carry now
    #: usable at the link level (interface, carrier, address, gateway), whatever
    #: a health check says: health probes run only then
    link_ok: bool = False
    link_reason: str = ""
    addresses: tuple[str, ...] = ()  # its usable addresses, probes' sources


@dataclass(frozen=True)
class PolicyStatus:
    name: str
    active: tuple[str, ...]  # uplinks carrying new flows now; empty: fallback applies
    fallback: Literal["main", "drop"]  # the policy's (config.Fallback)
    families: tuple[int, ...]
    #: the uplinks carrying new flows, per family: ((AF_INET, ("wan1",)), ...)
    by_family: tuple[tuple[int, tuple[str, ...]], ...] = ()
    tiers: tuple[tuple[str, ...], ...] = ()  # the members of each tier, in order
    tier: int | None = None  # the index of the tier carrying it now; None: none usable
    action: Literal["main", "drop"] | None = None  # a bypass policy (no tiers)
    failback: Literal["new-flows", "migrate"] = "new-flows"
    label: int | None = None  # the ct label bit of its flows (failback = "migrate")


@dataclass(frozen=True)
class DesiredState:
    rules: frozenset[Rule]
    routes: frozenset[Route]
    nft: NftTable | None  # None: markrouted has nothing to install (no uplinks)
    sysctls: tuple[Sysctl, ...]
    uplinks: tuple[UplinkStatus, ...]
    policies: tuple[PolicyStatus, ...]


@dataclass(frozen=True)
class Actual:
    """What markrouted owns in the kernel right now."""

    rules: frozenset[Rule]
    routes: frozenset[Route]
    nft: NftTable | None  # None: the table does not exist


# ------------------------------------------------------------------- plans


@dataclass(frozen=True)
class NftUpdate:
    """How to bring the nft table to the desired one.

    ``replace``: rebuild the whole table in one transaction (table missing,
    structure changed, or a changed chain outside the raw refill's vocabulary).
    Otherwise ``chains`` names the chains, all ``raw_refillable``, whose rules
    are flushed and refilled in one transaction. ``remove``: delete the table.
    The kernel adapter has one write path for each (``kernel/nft.py``).
    """

    replace: bool = False
    chains: tuple[str, ...] = ()
    remove: bool = False
    #: static sets whose elements change, in one transaction of their own
    elements: tuple[SetElements, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.replace or self.chains or self.remove or self.elements)


@dataclass(frozen=True)
class Plan:
    rules_add: tuple[Rule, ...] = ()
    rules_remove: tuple[Rule, ...] = ()
    routes_set: tuple[tuple[Route, Route | None], ...] = ()  # (new, old-or-None)
    routes_remove: tuple[Route, ...] = ()
    nft: NftUpdate = NftUpdate()
    sysctls: tuple[Sysctl, ...] = ()
    nft_desired: NftTable | None = None

    @property
    def empty(self) -> bool:
        return not (
            self.rules_add
            or self.rules_remove
            or self.routes_set
            or self.routes_remove
            or self.sysctls
            or not self.nft.empty
        )

    def lines(self) -> list[str]:
        """The plan as ``+``/``-``/``~`` lines, objects as ip/nft show them."""
        out: list[str] = []
        for s in self.sysctls:
            out.append(f"~ {s}  ({s.reason})" if s.reason else f"~ {s}")
        for new, old in self.routes_set:
            if old is None:
                out.append(f"+ {new}")
            else:
                out.append(f"~ {new}  (was: {old})")
        for r in self.rules_add:
            out.append(f"+ {r}")
        if self.nft.remove:
            out.append(f"- nft table {NFT_FAMILY} {NFT_TABLE}")
        elif self.nft.replace and self.nft_desired is not None:
            out.append(f"+ nft table {NFT_FAMILY} {NFT_TABLE} (replaced in one transaction):")
            out.extend("    " + line for line in self.nft_desired.text().splitlines())
        else:
            for change in self.nft.elements:
                shown = NftSet(change.name, change.version)
                for text in shown.element_texts(change.add):
                    out.append(f"+ nft element {NFT_FAMILY} {NFT_TABLE} {change.name} {{ {text} }}")
                for text in shown.element_texts(change.delete):
                    out.append(f"- nft element {NFT_FAMILY} {NFT_TABLE} {change.name} {{ {text} }}")
        if self.nft.chains and not (self.nft.replace or self.nft.remove) and self.nft_desired is not None:
            for name in self.nft.chains:
                chain = self.nft_desired.chain(name)
                out.append(f"~ nft chain {NFT_FAMILY} {NFT_TABLE} {name} (refilled):")
                for rule in chain.rules if chain else ():
                    out.append(f"    {rule.text}")
        for r in self.rules_remove:
            out.append(f"- {r}")
        for route in self.routes_remove:
            out.append(f"- {route}")
        return out
