"""Pure derivation: (config, observed kernel facts, health) -> DesiredState.

Nothing here does I/O, reads the clock or logs; the same inputs always give the
same output, which is what makes reconcile level-triggered and the whole
routing design testable by tables of cases.

The design, per family (IPv4 and IPv6 alike):

* rules, inside [P, P+999] of ``settings.rule_priority``::

      P      lookup main suppress_prefixlength 0   (keep_main_routes: specific
                                                    main routes - LAN, VPN - win)
      P+100  fwmark V/MASK lookup T                (one per uplink)
      P+200  from <uplink address> lookup T        (one per uplink address)

  The fwmark rules come before the source rules: a re-routed local packet keeps
  the source the main table chose, and must still follow its mark.

* one table per uplink: the default route via the gateway, the uplink's
  connected prefixes, and an ``unreachable default`` at the highest metric, so
  a marked packet never falls through to the main table's default route when
  the uplink's routes are gone (link down): failover is decided in nftables,
  never by the accident of an empty table.

* the nft table ``inet markrouted``: connmark restore, classification of new
  flows by the policies in file order, the per-uplink mark-and-save chains and
  masquerade. Which uplink a policy uses right now lives in one small ``pick_N``
  chain per distinct target, so a failover rewrites a few one-rule chains,
  not the table.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import nftexpr as nx
from .config import AddressSet, Config, Gateway, IPNetwork, Policy, SetRef, Uplink
from .sets import nft_names
from .model import (
    NftSet,
    AF_INET,
    AF_INET6,
    FAMILIES,
    MAIN_TABLE,
    NFT_PROTOCOL_NAMES,
    PORT_PROTOCOLS,
    RANGE_CHAIN,
    RT_SCOPE_LINK,
    RTN_UNREACHABLE,
    counter_name,
    Address,
    BaseHook,
    DesiredState,
    Health,
    Link,
    Needs,
    NftChain,
    NftRule,
    NftSet,
    NftTable,
    Observed,
    PolicyStatus,
    Route,
    Rule,
    Sysctl,
    UplinkStatus,
    family_name,
)

#: The metric of the safety-net ``unreachable default`` in every uplink table.
UNREACHABLE_METRIC = 0xFFFFFFFF - 1
V6_DEFAULT_METRIC = 1024

PRIO_SUPPRESS = 0
PRIO_FWMARK = 100
PRIO_SOURCE = 200

L4_WITH_PORTS = PORT_PROTOCOLS
PROTO_NAMES = NFT_PROTOCOL_NAMES


@dataclass(frozen=True)
class UplinkView:
    """An uplink as it is now: its link, addresses, gateways and usability."""

    uplink: Uplink
    link: Link | None
    addresses: dict[int, tuple[Address, ...]]  # family -> usable addresses
    gateways: dict[int, str | None]  # family -> gateway (None: device route)
    usable: tuple[int, ...]  # families it can carry new flows for right now
    reason: str
    link_usable: tuple[int, ...] = ()  # usable at the link level, health aside


def _net(addr: Address) -> str:
    iface = ipaddress.ip_interface(f"{addr.address}/{addr.prefixlen}")
    return str(iface.network)


def _gateway(
    spec: Gateway, family: int, link: Link, observed: Observed
) -> tuple[bool, str | None, str]:
    """(known, gateway, why-not). ``known`` with gateway None means a device route."""
    if spec.kind == "none":
        return (family == AF_INET, None, "gateway6 = none")
    if spec.kind == "address":
        return (True, str(spec.address), "")
    candidates = sorted(
        (d for d in observed.defaults if d.family == family and d.index == link.index),
        key=lambda d: d.metric,
    )
    if not candidates:
        return (False, None, f"no {family_name(family)} default route on {link.name} in the main table")
    return (True, candidates[0].gateway, "")


def view_uplink(uplink: Uplink, observed: Observed, health: Health | None) -> UplinkView:
    link = observed.link(uplink.interface)
    if link is None:
        return UplinkView(uplink, None, {}, {}, (), f"interface {uplink.interface} does not exist")
    addresses: dict[int, tuple[Address, ...]] = {}
    for family in FAMILIES:
        addresses[family] = tuple(
            a
            for a in observed.addresses_of(link.index, family)
            if not a.link_local and not a.tentative
        )
    gateways: dict[int, str | None] = {}
    usable: list[int] = []
    why: dict[int, str] = {}
    for family in FAMILIES:
        spec = uplink.gateway if family == AF_INET else uplink.gateway6
        known, gw, reason = _gateway(spec, family, link, observed)
        if known:
            gateways[family] = gw
        if not known and spec.kind == "none":
            why[family] = reason  # disabled in the config: not a fault, whatever the addresses
        elif not addresses[family]:
            why[family] = f"no {family_name(family)} address"
        elif not known:
            why[family] = reason
        else:
            usable.append(family)
    if not link.up:
        return UplinkView(uplink, link, addresses, gateways, (), "link is administratively down")
    if not link.carrier:
        return UplinkView(uplink, link, addresses, gateways, (), "no carrier")
    if not usable:
        return UplinkView(uplink, link, addresses, gateways, (), "; ".join(why.values()))
    if health is not None and not health.up:
        return UplinkView(uplink, link, addresses, gateways, (), health.reason, tuple(usable))
    reason = "ok"
    missing = [why[f] for f in FAMILIES if f not in usable and f in why]
    if missing and not (len(missing) == 1 and missing[0] == "gateway6 = none"):
        reason = f"{family_name(usable[0])} only: " + "; ".join(missing)
    elif health is not None:
        reason = health.reason
    return UplinkView(uplink, link, addresses, gateways, tuple(usable), reason, tuple(usable))


# ------------------------------------------------------------------ rules, routes


def derive_rules(config: Config, views: Sequence[UplinkView]) -> frozenset[Rule]:
    s = config.settings
    p = s.rule_priority
    rules: set[Rule] = set()
    if config.uplinks and s.keep_main_routes:
        for family in FAMILIES:
            rules.add(Rule(family, p + PRIO_SUPPRESS, MAIN_TABLE, suppress_prefixlength=0))
    for view in views:
        u = view.uplink
        for family in FAMILIES:
            rules.add(
                Rule(family, p + PRIO_FWMARK, u.table, fwmark=s.mark_value(u.mark), fwmask=s.mark_mask)
            )
        for family, addrs in view.addresses.items():
            for a in addrs:
                full = 32 if family == AF_INET else 128
                rules.add(Rule(family, p + PRIO_SOURCE, u.table, src=a.address, src_len=full))
    return frozenset(rules)


def derive_routes(views: Sequence[UplinkView]) -> frozenset[Route]:
    routes: set[Route] = set()
    for view in views:
        u = view.uplink
        for family in FAMILIES:
            any_dst = "0.0.0.0/0" if family == AF_INET else "::/0"
            # the safety net: see the module docstring
            routes.add(Route(family, u.table, any_dst, UNREACHABLE_METRIC, 0, type=RTN_UNREACHABLE))
        link = view.link
        if link is None or not link.up:
            continue  # the kernel refuses routes over a down link; re-added on link up
        for family, addrs in view.addresses.items():
            metric = 0 if family == AF_INET else V6_DEFAULT_METRIC
            nets = []
            for a in addrs:
                net = _net(a)
                if ipaddress.ip_network(net) in nets:
                    continue  # a secondary address: one route per prefix, or two would share one slot
                nets.append(ipaddress.ip_network(net))
                routes.add(
                    Route(family, u.table, net, metric, link.index, prefsrc=a.address,
                          scope=RT_SCOPE_LINK if family == AF_INET else 0, ifname=link.name)
                )
            if not addrs or family not in view.gateways:
                continue
            gw = view.gateways[family]
            any_dst = "0.0.0.0/0" if family == AF_INET else "::/0"
            if gw is None:
                routes.add(Route(family, u.table, any_dst, metric, link.index,
                                 scope=RT_SCOPE_LINK if family == AF_INET else 0, ifname=link.name))
                continue
            gwa = ipaddress.ip_address(gw)
            onlink = not gwa.is_link_local and not any(gwa in n for n in nets)
            routes.add(Route(family, u.table, any_dst, metric, link.index, gateway=gw,
                             onlink=onlink, ifname=link.name))
    return frozenset(routes)


SRC_VALID_MARK = "net/ipv4/conf/all/src_valid_mark"
ALL_RP_FILTER = "net/ipv4/conf/all/rp_filter"


def rp_filter(interface: str) -> str:
    return f"net/ipv4/conf/{interface}/rp_filter"


def needs(config: Config) -> Needs:
    """What ``observe`` must read for this config, beyond links, addresses and defaults.

    The sysctls ``derive_sysctls`` looks at (an uplink's own rp_filter is read
    only while its interface exists) and the cgroups the policies match on.
    """
    sysctls = [SRC_VALID_MARK, ALL_RP_FILTER] + [rp_filter(u.interface) for u in config.uplinks]
    cgroups = [p.cgroup.strip("/") for p in config.policies if p.cgroup]
    return Needs(tuple(dict.fromkeys(sysctls)), tuple(dict.fromkeys(cgroups)))


def derive_sysctls(config: Config, views: Sequence[UplinkView], observed: Observed) -> tuple[Sysctl, ...]:
    """The sysctls policy routing needs (rp_filter, src_valid_mark; see docs/design.md).

    Only changes are returned: a loosened rp_filter stays loosened, and a value
    that is already acceptable is left exactly as the administrator set it.
    """
    if not config.uplinks:
        return ()
    out = []
    if observed.sysctls.get(SRC_VALID_MARK, "0") != "1":
        out.append(Sysctl(SRC_VALID_MARK, "1", "the rp_filter check must honour the fwmark"))
    all_rp = int(observed.sysctls.get(ALL_RP_FILTER, "0") or 0)
    for view in views:
        if view.link is None:
            continue
        path = rp_filter(view.link.name)
        if path not in observed.sysctls:
            continue
        own = int(observed.sysctls[path] or 0)
        if max(all_rp, own) == 1:
            out.append(Sysctl(path, "2", f"strict reverse-path filtering drops replies on uplink {view.uplink.name}"))
    return tuple(out)


# ------------------------------------------------------------------ nftables


def _rule(label: str, parts: Sequence[nx.X], salt: object = None) -> NftRule:
    expr_json = nx.expression(parts)  # == json.dumps([p.json ...], sort_keys=True, separators=(",", ":"))
    text = " ".join(p.text for p in parts)
    digest = hashlib.sha256(f"{expr_json}|{salt}".encode()).hexdigest()[:10]
    # the comment is quoted nft text (with no escape for '"') and is shown in plan:
    # printable ASCII only, whatever a name holds; 92 bytes fit nft's 128
    safe = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in label[:80])
    comment = f"{safe} #{digest}"
    return NftRule(expr_json, text, comment, nx.string(comment).text)


def _ports(ranges: Sequence[tuple[int, int]]) -> nx.X:
    return nx.anon_set([nx.value_range(lo, hi) for lo, hi in ranges])


def _proto(number: int) -> nx.X:
    name = PROTO_NAMES.get(number)
    return nx.word(name) if name else nx.num(number)


HOOKS = ("prerouting", "output")


# ------------------------------------------------------------------ named counters


def _count(kind: str, name: str) -> nx.X:
    counter = counter_name(kind, name)
    return nx.X({"counter": counter}, f"counter name {counter}", '{"counter":' + nx.canonical(nx.word(counter)) + "}")


def counters(config: Config) -> tuple[str, ...]:
    """Every named counter of the table: one per policy, one per uplink."""
    return tuple([counter_name("policy", p.name) for p in config.policies]
                 + [counter_name("uplink", u.name) for u in config.uplinks])


# Expressions many policies share, built once (an X is immutable).
_L4PROTO = {number: nx.match(nx.meta("l4proto"), _proto(number)) for number in PROTO_NAMES}
_L4_WITH_PORTS = nx.match(nx.meta("l4proto"), nx.anon_set([_proto(n) for n in L4_WITH_PORTS]))
_TH = {name: nx.payload("th", name) for name in ("sport", "dport")}
_ADDRESS = {(family, name): nx.payload("ip" if family == AF_INET else "ip6", name)
            for family in FAMILIES for name in ("saddr", "daddr")}
_NFPROTO: dict[int, nx.X] = {family: nx.match(nx.meta("nfproto"), nx.word(family_name(family))) for family in FAMILIES}


def _policy_matches(
    policy: Policy, cgroup_prefix: str, cgroup_ids: Mapping[str, int],
    sets_by_name: Mapping[str, AddressSet] | None = None,
) -> tuple[tuple[str, ...], list[tuple[list[nx.X], object]]]:
    """The hooks one policy can match in, and its match expressions: one list per family split.

    The expressions are the same in every hook, so they are built once. No
    hook when the policy can match in neither (iif: forwarded only, in
    prerouting; uid/gid/cgroup: local sockets only, in output) or its cgroup
    does not exist now.
    """
    sets_by_name = sets_by_name or {}
    local_only = bool(policy.uid or policy.gid or policy.cgroup)
    if policy.iif:
        hooks: tuple[str, ...] = () if local_only else ("prerouting",)
    else:
        hooks = ("output",) if local_only else HOOKS
    if not hooks:
        return (), []
    common: list[nx.X] = []
    salt: object = None
    if policy.iif:
        common.append(nx.match(nx.meta("iifname"), nx.string(policy.iif)))
    if policy.proto is not None:
        common.append(_L4PROTO.get(policy.proto) or nx.match(nx.meta("l4proto"), _proto(policy.proto)))
    elif policy.dport or policy.sport:
        common.append(_L4_WITH_PORTS)
    if policy.sport:
        common.append(nx.match(_TH["sport"], _ports(policy.sport)))
    if policy.dport:
        common.append(nx.match(_TH["dport"], _ports(policy.dport)))
    if policy.uid:
        common.append(nx.match(nx.meta("skuid"), _ports(policy.uid)))
    if policy.gid:
        common.append(nx.match(nx.meta("skgid"), _ports(policy.gid)))
    if policy.cgroup:
        path = policy.cgroup.strip("/")
        if path not in cgroup_ids:
            return (), []
        level = len(path.split("/"))
        full = f"{cgroup_prefix}/{path}" if cgroup_prefix else path
        common.append(nx.match(nx.socket_cgroupv2(level), nx.string(full)))
        # nft resolves the path to the cgroup's id when the rule is loaded: a
        # re-created cgroup needs the rule reloaded, so its id is in the digest
        salt = cgroup_ids[path]

    families = policy.families
    addressed = bool(policy.daddr or policy.saddr or policy.daddr_sets or policy.saddr_sets)
    split = addressed or len(families) == 1
    if not split:
        return hooks, [(common, salt)]
    out = []
    for family in families:
        version = 4 if family == AF_INET else 6
        # each address field is a choice among its literal networks and its sets:
        # one rule per combination (all of them go to the same pick chain)
        combos: list[list[nx.X]] = [list(common)]
        for field_name, nets, refs in (("saddr", policy.saddr, policy.saddr_sets),
                                       ("daddr", policy.daddr, policy.daddr_sets)):
            if not (nets or refs):
                continue
            options = _address_options(_ADDRESS[family, field_name], nets, refs, sets_by_name, version)
            combos = [[*parts, option] for parts in combos for option in options]
        for parts in combos:
            if not addressed:
                parts.insert(0, _NFPROTO[family])
            out.append((parts, salt))
    return hooks, out


@functools.lru_cache(maxsize=65536)
def _prefix(net: IPNetwork) -> nx.X:
    """A CIDR as an nft prefix; the same few networks recur in many policies (cached)."""
    return nx.prefix(str(net.network_address), net.prefixlen)


def _address_options(
    field: nx.X, nets: Sequence[IPNetwork], refs: Sequence[SetRef],
    sets_by_name: Mapping[str, AddressSet], version: int,
) -> list[nx.X]:
    """The matches of one address field for one IP version: literals as one anonymous set, then each set."""
    options = []
    mine = [_prefix(n) for n in nets if n.version == version]
    if mine:
        options.append(nx.match(field, nx.anon_set(mine)))
    for ref in refs:
        found = sets_by_name.get(ref.name)
        if found is None:
            continue
        for name in set_names(found, version):
            options.append(nx.match(field, nx.word("@" + name)))
    return options


def set_names(address_set: AddressSet, version: int) -> list[str]:
    """The nft sets that hold ``address_set``'s addresses of one IP version (static, then dnsmasq's)."""
    names = nft_names(address_set.name)
    key = f"v{version}"
    out = []
    if address_set.files or address_set.intervals(version):
        out.append(names[key])
    if address_set.domains:
        out.append(names["dns_" + key])
    return out


def derive_sets(config: Config) -> tuple[NftSet, ...]:
    """The named sets of ``[sets.NAME]``: static ones with their merged elements, dnsmasq's empty."""
    out: list[NftSet] = []
    for item in config.sets:
        for version in (4, 6):
            for name in set_names(item, version):
                dynamic = "_dns_" in name[len(item.name):]
                out.append(NftSet(name, version, () if dynamic else item.intervals(version), dynamic,
                                  item.dns_timeout if dynamic else 0))
    return tuple(out)


def _target_key(policy: Policy) -> tuple[object, ...]:
    return ("tiers", policy.tier_list, policy.fallback)


def _carrying(policy: Policy, usable: Mapping[str, tuple[int, ...]], family: int) -> int | None:
    """The index of the first tier with a member usable for the family; None: no tier is."""
    for index, tier in enumerate(policy.tier_list):
        if any(family in usable.get(name, ()) for name, _ in tier):
            return index
    return None


def _choose(policy: Policy, usable: Mapping[str, tuple[int, ...]], family: int) -> list[tuple[str, int]]:
    """The uplinks (with weights) that carry new flows of this policy for a family:
    the usable members of the first tier that has any."""
    index = _carrying(policy, usable, family)
    if index is None:
        return []
    return [(name, w) for name, w in policy.tier_list[index] if family in usable.get(name, ())]


def _pick_rules(policy: Policy, usable: Mapping[str, tuple[int, ...]]) -> list[NftRule]:
    """The current choice of one policy target: one tiny chain, rewritten on failover.

    A weighted split is a cascade, each step taking its share of what is
    left: ``numgen random mod 4 < 3 goto set_a``, then ``goto set_b`` (3:1).
    The same probabilities as one verdict map, but no anonymous set, so a
    failover can rewrite the chain with one small raw batch (kernel/nftraw).
    """
    per_family = {f: _choose(policy, usable, f) for f in FAMILIES}

    def actions(choice: list[tuple[str, int]]) -> list[list[nx.X]]:
        if not choice:
            return [[nx.verdict("drop")]] if policy.fallback == "drop" else []
        out = []
        left = sum(w for _, w in choice)
        for name, w in choice[:-1]:
            out.append([nx.match(nx.numgen_random(left), nx.num(w), "<"), nx.goto(f"set_{name}")])
            left -= w
        out.append([nx.goto(f"set_{choice[-1][0]}")])
        return out

    if per_family[AF_INET] == per_family[AF_INET6]:
        return [_rule("pick", parts) for parts in actions(per_family[AF_INET])]
    rules = []
    for family in FAMILIES:
        only = nx.match(nx.meta("nfproto"), nx.word(family_name(family)))
        rules += [_rule("pick " + family_name(family), [only, *parts]) for parts in actions(per_family[family])]
    return rules


def _alive_rules(policy: Policy, uplink: str, usable: Mapping[str, tuple[int, ...]]) -> list[NftRule]:
    """``alive_<pick>_<uplink>``: mark the flow for the uplink while it is among the policy's
    current choices (per family), else nothing. Refilled raw on failover, like ``pick_N``."""
    families = [f for f in FAMILIES if any(name == uplink for name, _ in _choose(policy, usable, f))]
    if not families:
        return []
    if len(families) == len(FAMILIES):
        return [_rule("alive", [nx.goto(f"set_{uplink}")])]
    return [_rule("alive " + family_name(f), [_NFPROTO[f], nx.goto(f"set_{uplink}")]) for f in families]


@dataclass(frozen=True)
class StaticChains:
    """The chains that depend on the config alone (and on which cgroups exist).

    With a thousand policies they are most of the table and most of the cost
    of a derivation; a failover changes none of them, so the daemon computes
    them once per config (see ``Deriver``).
    """

    head: tuple[NftChain, ...]  # set_/restore_/in_ chains
    hooks: tuple[NftChain, ...]  # prerouting, output
    targets: Mapping[tuple[object, ...], str]  # policy target -> pick chain name
    first_policy: Mapping[str, Policy]  # pick chain name -> a policy with that target
    alive: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # alive_ chain -> (pick chain, uplink)
    sets: tuple[NftSet, ...] = ()  # the named sets of [sets.NAME], then the sticky sources' dynamic sets


def static_chains(config: Config, cgroup_prefix: str = "", cgroup_ids: Mapping[str, int] | None = None) -> StaticChains:
    s = config.settings
    mask = s.mark_mask
    keep = 0xFFFFFFFF & ~mask
    cgroup_ids = cgroup_ids or {}
    chains: list[NftChain] = []

    for u in config.uplinks:
        v = s.mark_value(u.mark)
        meta_set = nx.mangle(nx.meta("mark"), nx.bor(nx.band(nx.meta("mark"), keep), v))
        ct_set = nx.mangle(nx.ct("mark"), nx.bor(nx.band(nx.ct("mark"), keep), v))
        # the uplink's counter: a new flow's first packet (set_), every later one (restore_)
        count = _count("uplink", u.name)
        chains.append(NftChain(f"set_{u.name}", None, (_rule(f"mark {u.name}", [meta_set, ct_set, count]),)))
        chains.append(NftChain(f"restore_{u.name}", None, (_rule(f"restore {u.name}", [meta_set, count]),)))
        chains.append(NftChain(f"in_{u.name}", None, (_rule(f"inbound {u.name}", [ct_set]),)))

    chains.append(NftChain(f"{RANGE_CHAIN}{s.rule_priority}", None, ()))
    targets: dict[tuple[object, ...], str] = {}
    first: dict[str, Policy] = {}
    for policy in config.policies:
        if policy.action is not None:
            continue  # a bypass: a verdict in the hook chains, no pick chain
        key = _target_key(policy)
        if key not in targets:
            name = f"pick_{len(targets)}"
            targets[key] = name
            first[name] = policy

    restore = nx.vmap(
        nx.band(nx.ct("mark"), mask),
        [(nx.num(s.mark_value(u.mark), hexa=True), nx.goto(f"restore_{u.name}")) for u in config.uplinks],
    )
    head: list[NftRule] = []
    if config.uplinks:
        head = [
            _rule("restore the flow's uplink", [restore]),
            _rule("marked already", [nx.match(nx.band(nx.meta("mark"), mask), nx.num(0), "!="), nx.verdict("return")]),
            _rule("only new flows are classified", [nx.match(nx.ct("state"), nx.word("new"), "!="), nx.verdict("return")]),
        ]
    local = _rule(
        "not for this host",
        [nx.match(nx.fib_daddr_type(), nx.anon_set([nx.word("local"), nx.word("broadcast"), nx.word("multicast")])),
         nx.verdict("return")],
    )

    # a policy's rules are the same objects in both hooks: rendered once
    by_hook: dict[str, list[NftRule]] = {hook: [] for hook in HOOKS}
    gotos = {name: nx.goto(name) for name in first}
    sets_by_name = {item.name: item for item in config.sets}
    alive: dict[str, tuple[str, str]] = {}
    sets: list[NftSet] = []
    values = {u.name: s.mark_value(u.mark) for u in config.uplinks}
    for policy in config.policies:
        in_hooks, splits = _policy_matches(policy, cgroup_prefix, cgroup_ids, sets_by_name)
        if not in_hooks:
            continue
        tail = _policy_tail(policy, s.mark_mask, values, targets, gotos, chains, alive, sets)
        count = _count("policy", policy.name)
        rendered = [_rule(f"policy {policy.name}", [*parts, count, *tail], salt) for parts, salt in splits]
        for hook in in_hooks:
            by_hook[hook] += rendered

    def hook_chain(hook: str) -> NftChain:
        rules = list(head)
        if config.uplinks and hook == "prerouting":
            for u in config.uplinks:
                rules.append(_rule(f"inbound on {u.name}",
                                   [nx.match(nx.meta("iifname"), nx.string(u.interface)), nx.goto(f"in_{u.name}")]))
        if config.policies:
            rules.append(local)
        rules += by_hook[hook]
        if hook == "prerouting":
            base = BaseHook("filter", "prerouting", -150)
        else:
            base = BaseHook("route", "output", -150)
        return NftChain(hook, base, tuple(rules))

    hooks = (hook_chain("prerouting"), hook_chain("output"))
    return StaticChains(tuple(chains), hooks, targets, first, alive, (*derive_sets(config), *sets))


_SADDR: dict[int, nx.X] = {AF_INET: nx.payload("ip", "saddr"), AF_INET6: nx.payload("ip6", "saddr")}
#: the most sources one sticky set remembers (per policy, uplink and family)
STICKY_SET_SIZE = 65535


def sticky_set_name(policy: Policy, uplink: str, family: int) -> str:
    return f"sticky_{policy.index}_{uplink}_{4 if family == AF_INET else 6}"


def _policy_tail(
    policy: Policy,
    mask: int,
    values: Mapping[str, int],
    targets: Mapping[tuple[object, ...], str],
    gotos: Mapping[str, nx.X],
    chains: list[NftChain],
    alive: dict[str, tuple[str, str]],
    sets: list[NftSet],
) -> list[nx.X]:
    """What a policy's rule does once it matched: a bypass verdict, or on to its uplinks.

    ``action = "main"`` returns from the hook chain (the packet stays unmarked,
    the main table routes it, no later policy sees it); ``"drop"`` drops it.
    A migrating policy first sets its conntrack label bit, so its flows can be
    told from other policies' flows on the same uplink. A sticky-source policy
    goes through its own ``sticky_N`` chain (built here, once per config).
    """
    if policy.action is not None:
        return [nx.verdict("return" if policy.action == "main" else "drop")]
    tail: list[nx.X] = []
    if policy.label is not None:
        tail.append(nx.mangle(nx.ct("label"), nx.num(policy.label)))
    pick = targets[_target_key(policy)]
    if policy.sticky != "source":
        return [*tail, gotos[pick]]
    chains.append(_sticky_chain(policy, mask, values, pick, alive, sets))
    return [*tail, nx.goto(f"sticky_{policy.index}")]


def _sticky_chain(
    policy: Policy, mask: int, values: Mapping[str, int], pick: str,
    alive: dict[str, tuple[str, str]], sets: list[NftSet],
) -> NftChain:
    """``sticky_N``: a source seen lately leaves by the same uplink, while that uplink carries the policy.

    Per member uplink and family, a dynamic set of sources with the policy's
    timeout. An unmarked source found in one jumps to ``alive_<pick>_<uplink>``, which
    marks the flow only while that uplink is among the policy's current
    choices (a one-rule chain refilled on failover, in the raw vocabulary), so
    an entry pointing at a dead uplink is not obeyed. An unmarked flow then
    picks by weight, and the chosen uplink's set learns (or refreshes) the
    source: the packet path fills the sets, never the daemon.
    """
    timeout = max(1, int(round(policy.sticky_timeout)))
    lookups: list[NftRule] = []
    updates: list[NftRule] = []
    mark = nx.band(nx.meta("mark"), mask)
    for name in policy.members:
        chain = f"alive_{pick}_{name}"
        alive[chain] = (pick, name)
        for family in policy.families:
            set_name = sticky_set_name(policy, name, family)
            declared = NftSet(set_name, 4 if family == AF_INET else 6, dynamic=True, timeout=timeout, learns=True,
                              size=STICKY_SET_SIZE)
            sets.append(declared)
            # the rules that use a set carry its declaration in their digest: a changed
            # timeout changes the chain, and the table is replaced
            body = "\n".join(declared.text())
            # the first live entry wins: an address can be in two sets after a failover
            lookups.append(_rule(f"sticky {policy.name} {name}",
                                 [nx.match(mark, nx.num(0)), nx.match(_SADDR[family], nx.set_ref(set_name)),
                                  nx.jump(chain)], body))
            updates.append(_rule(f"sticky {policy.name} learns {name}",
                                 [_NFPROTO[family], nx.match(mark, nx.num(values[name], hexa=True)),
                                  nx.set_update(set_name, _SADDR[family])], body))
    choose = _rule(f"sticky {policy.name} new source", [nx.match(mark, nx.num(0)), nx.jump(pick)])
    return NftChain(f"sticky_{policy.index}", None, (*lookups, choose, *updates))


def derive_nft(
    config: Config,
    views: Sequence[UplinkView],
    cgroup_prefix: str = "",
    cgroup_ids: Mapping[str, int] | None = None,
    static: StaticChains | None = None,
) -> NftTable:
    if static is None:
        static = static_chains(config, cgroup_prefix, cgroup_ids)
    usable = {v.uplink.name: v.usable for v in views}
    chains: list[NftChain] = list(static.head)
    for name, policy in static.first_policy.items():
        chains.append(NftChain(name, None, tuple(_pick_rules(policy, usable))))
    for name, (pick, uplink) in static.alive.items():
        chains.append(NftChain(name, None, tuple(_alive_rules(static.first_policy[pick], uplink, usable))))
    chains.extend(static.hooks)

    nat: list[NftRule] = []
    for view in views:
        u = view.uplink
        if not u.masquerade or view.link is None:
            continue
        for family, addrs in view.addresses.items():
            if not addrs:
                continue
            proto = "ip" if family == AF_INET else "ip6"
            own = nx.anon_set([nx.word(a.address) for a in addrs])
            nat.append(_rule(
                f"masquerade {u.name} {family_name(family)}",
                [nx.match(nx.meta("oifname"), nx.string(u.interface)),
                 nx.match(nx.payload(proto, "saddr"), own, "!="),
                 nx.masquerade()],
            ))
    chains.append(NftChain("postrouting", BaseHook("nat", "postrouting", 100), tuple(nat)))
    return NftTable(tuple(chains), static.sets, counters(config))


# ------------------------------------------------------------------ all of it


class Deriver:
    """``derive`` for one config, keeping what depends on the config alone.

    Held by the daemon across passes (never module-global): a failover then
    costs the few dynamic chains, not a re-rendering of every policy.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._static: StaticChains | None = None
        self._static_key: tuple[object, ...] = ()

    def static(self, observed: Observed) -> StaticChains:
        key = (observed.cgroup_prefix, tuple(sorted(observed.cgroup_ids.items())))
        if self._static is None or key != self._static_key:
            self._static = static_chains(self.config, observed.cgroup_prefix, observed.cgroup_ids)
            self._static_key = key
        return self._static

    def __call__(self, observed: Observed, health: Mapping[str, Health] | None = None) -> DesiredState:
        return derive(self.config, observed, health, self)


def derive(
    config: Config,
    observed: Observed,
    health: Mapping[str, Health] | None = None,
    deriver: Deriver | None = None,
) -> DesiredState:
    health = health or {}
    views = [view_uplink(u, observed, health.get(u.name)) for u in config.uplinks]
    usable = {v.uplink.name: v.usable for v in views}
    uplinks = tuple(
        UplinkStatus(
            name=v.uplink.name,
            interface=v.uplink.interface,
            state="up" if v.usable else "down",
            reason=v.reason,
            gateway=v.gateways.get(AF_INET) if AF_INET in v.gateways else None,
            gateway6=v.gateways.get(AF_INET6) if AF_INET6 in v.gateways else None,
            table=v.uplink.table,
            mark=config.settings.mark_value(v.uplink.mark),
            families=v.usable,
            link_ok=bool(v.link_usable),
            link_reason=v.reason if not v.link_usable else "ok",
            addresses=tuple(a.address for f in FAMILIES for a in v.addresses.get(f, ())),
        )
        for v in views
    )
    policies = []
    # policies share a few targets
    chosen: dict[tuple[object, ...], tuple[tuple[str, ...], tuple[tuple[int, tuple[str, ...]], ...]]] = {}
    carried: dict[tuple[object, ...], int | None] = {}
    for p in config.policies:
        if p.action is not None:
            policies.append(PolicyStatus(p.name, (), p.fallback, p.families, action=p.action))
            continue
        key = (_target_key(p), p.families)
        if key not in chosen:
            active: list[str] = []
            by_family = []
            for family in p.families:
                picked = tuple(name for name, _ in _choose(p, usable, family))
                by_family.append((family, picked))
                active.extend(name for name in picked if name not in active)
            chosen[key] = (tuple(active), tuple(by_family))
            tiers = [t for t in (_carrying(p, usable, f) for f in p.families) if t is not None]
            carried[key] = min(tiers) if tiers else None
        policies.append(PolicyStatus(p.name, chosen[key][0], p.fallback, p.families, chosen[key][1],
                                     tiers=tuple(tuple(n for n, _ in tier) for tier in p.tier_list),
                                     tier=carried[key], failback=p.failback, label=p.label))
    return DesiredState(
        rules=derive_rules(config, views),
        routes=derive_routes(views),
        nft=derive_nft(config, views, static=(deriver or Deriver(config)).static(observed)) if config.uplinks else None,
        sysctls=derive_sysctls(config, views, observed),
        uplinks=uplinks,
        policies=tuple(policies),
    )
