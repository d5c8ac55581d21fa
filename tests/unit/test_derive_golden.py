"""derive() renders exactly what it rendered before: byte for byte, large configs included.

Derivation is tuned for speed (a no-op ``markrouted plan`` with a thousand
policies, see ``bench/startup.py``), and a tuning must never change a byte of
its output: a changed expression or comment means every installed table looks
drifted and is replaced on upgrade. Two configs are derived here, each in a
world where some uplinks are down, single-stack or failed by health:

* the benchmark's own: 16 uplinks and 1,000 policies (``bench/daemon.py``),
* a small one using every matcher, every target kind, cgroups (present and
  absent), gateways of each kind and a masquerade-less uplink.

Each section of the result (rules, routes, sysctls, statuses, each group of nft
chains with their JSON, text and comments, the table's text) is compared by
its SHA-256 to the value recorded below. A failing section is the part that
changed. When a change of the rendering is intended, record the new digests
(``python3 tests/unit/test_derive_golden.py`` prints them) and say why in the
commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping

import pytest

from markrouted.config import Config, parse
from markrouted.derive import Deriver, derive
from markrouted.model import AF_INET, AF_INET6, Address, DesiredState, Health, Link, MainDefault, Observed

V4, V6 = AF_INET, AF_INET6
UPLINKS, POLICIES = 16, 1000


def bench_config() -> Config:
    """The 1,000-policy config ``bench/daemon.py`` and ``bench/startup.py`` run (same text)."""
    out = ['[settings]\nresync = "30s"\n']
    for i in range(UPLINKS):
        out.append(f'[uplinks.u{i}]\ninterface = "u{i}"\ntable = {101 + i}\nmark = {i + 1}\n')
    for j in range(POLICIES):
        if j % 10 == 9:
            a, b = j % UPLINKS, (j + 5) % UPLINKS
            target = f"balance = {{ u{a} = 3, u{b} = 1 }}"
        else:
            target = "uplinks = [" + ", ".join(f'"u{(j + k) % UPLINKS}"' for k in range(3)) + "]"
        proto = ("tcp", "udp")[j % 2]
        out.append(f'[[policy]]\nname = "p{j}"\nproto = "{proto}"\ndport = [{1024 + j}, "{20000 + j}-{20010 + j}"]\n'
                   f'daddr = ["198.51.100.{j % 250}/32", "2001:db8:ffff::{j:x}/128"]\n{target}\n')
    return parse("\n".join(out))


def bench_world() -> Observed:
    """The benchmark's namespace, with u3 out of carrier, u5 without an IPv6 default, u7 down."""
    links = [Link(1, "lo", True, True)]
    addresses = []
    defaults = []
    for i in range(UPLINKS):
        index = 2 + i
        links.append(Link(index, f"u{i}", i != 7, i != 3))
        addresses += [Address(index, V4, f"198.18.{i}.2", 24),
                      Address(index, V6, f"2001:db8:{0x100 + i:x}::2", 64),
                      Address(index, V6, f"fe80::{i + 1:x}", 64, link_local=True)]
        defaults.append(MainDefault(V4, index, f"198.18.{i}.1", 100 + i))
        if i != 5:
            defaults.append(MainDefault(V6, index, f"2001:db8:{0x100 + i:x}::1", 100 + i))
    sysctls = {"net/ipv4/conf/all/src_valid_mark": "1", "net/ipv4/conf/all/rp_filter": "0",
               "net/ipv4/conf/u0/rp_filter": "1", "net/ipv4/conf/u1/rp_filter": "2"}
    return Observed(tuple(links), tuple(addresses), tuple(defaults), sysctls)


BENCH_HEALTH = {"u1": Health(False, "3 probes lost"), "u2": Health(True, "probes answered")}

VARIED = """\
[settings]
mark_mask = 0x0000ff00
rule_priority = 20000

[uplinks.wan1]
interface = "eth0"
table = 101
mark = 1

[uplinks.wan2]
interface = "eth1"
table = 102
mark = 2
gateway = "203.0.113.1"
gateway6 = "none"
masquerade = false

[uplinks.lte]
interface = "wwan0"
table = 103
mark = 3
gateway = "none"

[[policy]]
name = "ssh"
proto = "tcp"
dport = [22, "2200-2299"]
daddr = ["0.0.0.0/0", "::/0"]
iif = "lan0"
uplinks = ["wan2", "wan1"]

[[policy]]
name = "backup"
cgroup = "system.slice/backup.service"
uid = [1000, "2000-2999"]
gid = [100]
uplinks = ["lte", "wan1"]
fallback = "drop"

[[policy]]
name = "gone"
cgroup = "/system.slice/gone.service/"
uplinks = ["wan1"]

[[policy]]
name = "dns"
proto = "udp"
sport = [53]
saddr = ["192.0.2.0/24"]
daddr = ["198.51.100.0/24", "2001:db8:5::/48"]
uplinks = ["wan1", "wan2"]

[[policy]]
name = "ping6"
proto = "icmpv6"
uplinks = ["wan2", "wan1"]

[[policy]]
name = "ping"
proto = "icmp"
uplinks = ["wan2", "wan1"]

[[policy]]
name = "gre"
proto = 47
family = "ipv6"
uplinks = ["wan2"]
fallback = "drop"

[[policy]]
name = "ports"
dport = [443, 8443]
balance = { wan1 = 3, wan2 = 1, lte = 2 }

[[policy]]
name = "ports-too"
sport = ["1024-2047"]
balance = { wan1 = 3, wan2 = 1, lte = 2 }

[[policy]]
name = "v4"
family = "ipv4"
balance = { wan2 = 1, wan1 = 1 }
fallback = "drop"

[[policy]]
name = "rest"
uplinks = ["wan1", "wan2", "lte"]
"""


def varied_world() -> Observed:
    eth0, eth1, wwan0, lan0 = 2, 3, 4, 5
    return Observed(
        links=(Link(1, "lo", True, True), Link(eth0, "eth0", True, True), Link(eth1, "eth1", True, True),
               Link(wwan0, "wwan0", True, True), Link(lan0, "lan0", True, True)),
        addresses=(
            Address(eth0, V4, "198.51.100.10", 24), Address(eth0, V4, "198.51.100.11", 24),
            Address(eth0, V6, "2001:db8:1::10", 64), Address(eth0, V6, "fe80::10", 64, link_local=True),
            Address(eth1, V4, "203.0.113.10", 24), Address(eth1, V6, "2001:db8:2::10", 64),
            Address(wwan0, V4, "198.18.7.9", 32), Address(wwan0, V6, "2001:db8:3::9", 64),
            Address(wwan0, V6, "2001:db8:3::a", 64, tentative=True),
            Address(lan0, V4, "192.0.2.1", 24),
        ),
        defaults=(MainDefault(V4, eth0, "198.51.100.1", 100), MainDefault(V6, eth0, "fe80::1", 1024),
                  MainDefault(V6, wwan0, "2001:db8:3::1", 1024)),
        sysctls={"net/ipv4/conf/all/src_valid_mark": "0", "net/ipv4/conf/all/rp_filter": "1",
                 "net/ipv4/conf/eth0/rp_filter": "0"},
        cgroup_prefix="unified",
        cgroup_ids={"system.slice/backup.service": 4242},
    )


VARIED_HEALTH = {"wan1": Health(True, "ok"), "lte": Health(True, "probes answered")}


def sections(state: DesiredState) -> dict[str, str]:
    """The parts of a derived state as text: every field of every object, in a fixed order."""
    assert state.nft is not None
    groups: dict[str, list[str]] = {}
    for c in state.nft.chains:
        group = c.name if c.base else c.name.split("_")[0] + "_*"
        groups.setdefault(f"nft {group}", []).append(repr(c))
    out = {
        "rules": repr(sorted(state.rules)),
        "routes": repr(sorted(state.routes)),
        "sysctls": repr(state.sysctls),
        "uplinks": repr(state.uplinks),
        "policies": repr(state.policies),
        "nft text": state.nft.text(),
    }
    out.update({k: "\n".join(v) for k, v in groups.items()})
    return out


def digests(state: DesiredState) -> dict[str, str]:
    return {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in sections(state).items()}


CASES: Mapping[str, tuple[Config, Observed, Mapping[str, Health]]] = {
    "bench": (bench_config(), bench_world(), BENCH_HEALTH),
    "varied": (parse(VARIED), varied_world(), VARIED_HEALTH),
}

GOLDEN: Mapping[str, Mapping[str, str]] = {
    "bench": {
        "rules": "46efbb4eb61d1a2c",
        "routes": "3d8ee29f3b165f5a",
        "sysctls": "89b4ce9350f201d0",
        "uplinks": "8257b13fc70228b8",
        "policies": "df54a717ca54dfc2",
        "nft text": "4ab5de6948b22af4",
        "nft set_*": "2a81fda510f8a70a",
        "nft restore_*": "62aefb5c26be627c",
        "nft in_*": "ae93b86c4902c233",
        "nft rule_*": "621c62352567bccd",
        "nft pick_*": "a4ac8406c455eb65",
        "nft prerouting": "0d26f157cc8942f0",
        "nft output": "3871fa09bf8fb1ef",
        "nft postrouting": "96c6e3b0909da4e7",
    },
    "varied": {
        "rules": "1034602178659a9e",
        "routes": "9afb719e0dd904c3",
        "sysctls": "d7ea0d1653aebafc",
        "uplinks": "c6e709b1f9939453",
        "policies": "0af3e6414d9ce573",
        "nft text": "80752a62b00df99a",
        "nft set_*": "01e3a15243d8cf87",
        "nft restore_*": "bb5348cf70245fd3",
        "nft in_*": "03c650ea1d62925b",
        "nft rule_*": "af09ff3135e07bfc",
        "nft pick_*": "578848203ac7bc2a",
        "nft prerouting": "66aa2f74ab37365d",
        "nft output": "366fcad0f6cee85c",
        "nft postrouting": "e8e111b1b1a33280",
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendering_unchanged(case: str) -> None:
    config, observed, health = CASES[case]
    assert digests(derive(config, observed, health)) == GOLDEN[case]


@pytest.mark.parametrize("case", sorted(CASES))
def test_deriver_renders_the_same(case: str) -> None:
    """The daemon's Deriver (static chains kept across passes) gives the same state, pass after pass."""
    config, observed, health = CASES[case]
    want = sections(derive(config, observed, health))
    deriver = Deriver(config)
    assert sections(deriver(observed, health)) == want
    assert sections(deriver(observed, {})) == sections(derive(config, observed, {}))
    assert sections(deriver(observed, health)) == want


@pytest.mark.parametrize("case", sorted(CASES))
def test_expressions_are_canonical_json(case: str) -> None:
    """Each rule's expression is json.dumps' canonical text (sorted keys, no spaces, ASCII)."""
    state = derive(*CASES[case])
    assert state.nft is not None
    for c in state.nft.chains:
        for r in c.rules:
            assert json.dumps(json.loads(r.expr_json), sort_keys=True, separators=(",", ":")) == r.expr_json


def test_the_cases_cover_what_they_claim() -> None:
    """Down, single-stack and unhealthy uplinks, every matcher, a split and an absent cgroup."""
    state = derive(*CASES["bench"])
    assert len(state.policies) == POLICIES
    assert {u.name for u in state.uplinks if u.state == "down"} == {"u1", "u3", "u7"}
    assert next(u for u in state.uplinks if u.name == "u5").families == (V4,)
    state = derive(*CASES["varied"])
    assert state.nft is not None
    text = state.nft.text()
    for needle in ("iifname", "th sport", "th dport", "skuid", "skgid", "socket cgroupv2 level 2",
                   "ip saddr", "ip6 daddr", "meta nfproto ipv6", "numgen random mod 6", "drop"):
        assert needle in text, needle
    assert "gone.service" not in text


if __name__ == "__main__":
    print("GOLDEN: Mapping[str, Mapping[str, str]] = {")
    for name in sorted(CASES):
        print(f'    "{name}": {{')
        for key, value in digests(derive(*CASES[name])).items():
            print(f'        "{key}": "{value}",')
        print("    },")
    print("}")
    sys.exit(0)
