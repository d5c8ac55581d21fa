"""Pure packet classification: which policy a described packet matches.

Mirrors the nft rules derive renders (same fields, same first-match order), so
``markrouted explain`` answers with the policy the kernel would pick.

And what a failover would change, said before it happens (``plan --down``):
``what_if`` compares the state derived now with the state derived as if some
uplinks were down, and the plan between them, in the daemon's own vocabulary
(the events it logs on a real failover: ``uplink down``, ``policy moved``,
``nft chains refilled``, ``conntrack cleared``), so the two read side by side.
The counts of conntrack entries come from the caller.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import AddressSet, Config, IPNetwork, Policy, SetRef
from .model import IP_PROTOCOLS, PORT_PROTOCOLS, DesiredState, Plan
from .sets import contains, nft_names

#: addresses dnsmasq holds now, by nft set name (``NAME_dns_v4``...); read from the kernel by the caller
DnsHeld = Mapping[str, frozenset[int]]

PROTOS = {**IP_PROTOCOLS, "ipv6-icmp": 58}  # and the name nft prints for icmpv6
WITH_PORTS = PORT_PROTOCOLS


@dataclass(frozen=True)
class Packet:
    daddr: ipaddress.IPv4Address | ipaddress.IPv6Address
    proto: int | None = None
    dport: int | None = None
    sport: int | None = None
    saddr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    iif: str | None = None  # None: generated on this host
    uid: int | None = None
    gid: int | None = None
    cgroup: str | None = None

    @property
    def family(self) -> int:
        return socket.AF_INET if self.daddr.version == 4 else socket.AF_INET6


def proto_number(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return PROTOS[text.lower()]
    except KeyError:
        raise ValueError(f"unknown protocol {text!r}") from None


def _in_ranges(value: int | None, ranges: tuple[tuple[int, int], ...]) -> bool:
    return value is not None and any(lo <= value <= hi for lo, hi in ranges)


def address_match(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    nets: Sequence[IPNetwork], refs: Sequence[SetRef],
    sets: Mapping[str, AddressSet], dns: DnsHeld,
) -> str | None:
    """What of a daddr/saddr list ``address`` is in: ``"listed"``, ``"set NAME"``, ``"set NAME (dnsmasq)"``, or None."""
    if any(address in n for n in nets if n.version == address.version):
        return "listed"
    value = int(address)
    for ref in refs:
        found = sets.get(ref.name)
        if found is None:
            continue
        if contains(found.intervals(address.version), value):
            return f"set {ref.name}"
        if value in dns.get(nft_names(ref.name)[f"dns_v{address.version}"], frozenset()):
            return f"set {ref.name} (added by dnsmasq)"
    return None


def matches(
    policy: Policy, pkt: Packet, uplink_interfaces: frozenset[str] = frozenset(),
    sets: Mapping[str, AddressSet] | None = None, dns: DnsHeld | None = None,
) -> bool:
    if pkt.iif is not None and pkt.iif in uplink_interfaces:
        return False  # inbound on an uplink: it keeps that uplink (see derive)
    if pkt.family not in policy.families:
        return False
    if policy.iif is not None and policy.iif != pkt.iif:
        return False
    local = pkt.iif is None
    if (policy.uid or policy.gid or policy.cgroup) and not local:
        return False
    if policy.proto is not None and pkt.proto != policy.proto:
        return False
    if (policy.dport or policy.sport) and pkt.proto not in WITH_PORTS:
        return False
    if policy.dport and not _in_ranges(pkt.dport, policy.dport):
        return False
    if policy.sport and not _in_ranges(pkt.sport, policy.sport):
        return False
    sets, dns = sets or {}, dns or {}
    if (policy.daddr or policy.daddr_sets) and address_match(
            pkt.daddr, policy.daddr, policy.daddr_sets, sets, dns) is None:
        return False
    if policy.saddr or policy.saddr_sets:
        if pkt.saddr is None or address_match(pkt.saddr, policy.saddr, policy.saddr_sets, sets, dns) is None:
            return False
    if policy.uid and not _in_ranges(pkt.uid, policy.uid):
        return False
    if policy.gid and not _in_ranges(pkt.gid, policy.gid):
        return False
    if policy.cgroup and (pkt.cgroup or "").strip("/") != policy.cgroup.strip("/"):
        return False
    return True


def classify(
    config: Config, pkt: Packet, cgroups: frozenset[str] | None = None, dns: DnsHeld | None = None
) -> Policy | None:
    """The first policy matching ``pkt``.

    ``cgroups``: the cgroup paths that exist now (None: assume all do); a
    policy naming one that does not has no rule in the kernel (see derive).
    """
    uplink_ifs = frozenset(u.interface for u in config.uplinks)
    sets = {s.name: s for s in config.sets}
    for policy in config.policies:
        if cgroups is not None and policy.cgroup and policy.cgroup.strip("/") not in cgroups:
            continue
        if matches(policy, pkt, uplink_ifs, sets, dns):
            return policy
    return None


# ------------------------------------------------------------------ what if


def _uplinks(names: tuple[str, ...], fallback: str) -> str:
    return ",".join(names) or fallback


def writes(plan: Plan) -> int:
    """How many kernel writes applying the plan takes (an nft update is one transaction)."""
    return (len(plan.rules_add) + len(plan.rules_remove) + len(plan.routes_set) + len(plan.routes_remove)
            + len(plan.sysctls) + (0 if plan.nft.empty else 1))


def what_if(now: DesiredState, then: DesiredState, plan: Plan, mask: int,
            conntrack: Mapping[str, int]) -> list[str]:
    """The lines of the what-if: transitions, kernel writes, conntrack entries that would go.

    Sysctl changes pending now are not the failover's: left out.
    """
    plan = dataclasses.replace(plan, sysctls=tuple(s for s in plan.sysctls if s not in now.sysctls))
    lines: list[str] = []
    before = {u.name: u for u in now.uplinks}
    went = []
    for u in then.uplinks:
        old = before.get(u.name)
        if old is not None and old.state == "up" and u.state == "down":
            went.append(u)
            lines.append(f"uplink down: {u.name}")
    pbefore = {p.name: p for p in now.policies}
    moved = 0
    for p in then.policies:
        old_p = pbefore.get(p.name)
        if old_p is not None and old_p.active != p.active:
            moved += 1
            lines.append(f"policy moved: {p.name} was={_uplinks(old_p.active, old_p.fallback)} "
                         f"now={_uplinks(p.active, p.fallback)}")
    if plan.nft.chains:
        lines.append(f"nft chains refilled: {', '.join(plan.nft.chains)}")
    elif plan.nft.replace:
        lines.append("nft table replaced")
    lines.extend(plan.lines())
    for u in went:
        count = conntrack.get(u.name)
        shown = "" if count is None else f" ({count} entries now)"
        lines.append(f"conntrack cleared: {u.name} ct mark {u.mark:#x}/{mask:#x}{shown}")
    lines.append(f"{len(went)} uplinks down, {moved} policies moved, {writes(plan)} kernel writes, "
                 f"{sum(conntrack.get(u.name, 0) for u in went)} conntrack entries cleared")
    return lines
