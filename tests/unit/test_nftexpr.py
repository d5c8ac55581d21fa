"""nftexpr: the serialised JSON an expression carries is exactly what json.dumps would give.

A rule's expression JSON and its digest (in the rule's comment) are joined from
the parts' serialisations rather than encoded again (see ``nftexpr``). If one
builder serialised differently from ``json.dumps(..., sort_keys=True,
separators=(",", ":"))`` - a key out of order, a space, an unescaped
character - every rule using it would get another digest, and every installed
table would look drifted after an upgrade.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from markrouted import nftexpr as nx


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


ODD = ['plain', 'with "quotes" and \\', "tab\there", "naïve ünïcode", "emoji \U0001F600", "\x00nul", ""]
#: what nftexpr.string accepts (it refuses '"' and control characters: nft strings cannot escape them)
QUOTABLE = [s for s in ODD if '"' not in s and s.isprintable()]

LEAVES = [
    nx.meta("mark"), nx.meta("l4proto"), nx.ct("state"), nx.payload("ip6", "daddr"), nx.payload("th", "sport"),
    nx.fib_daddr_type(), nx.socket_cgroupv2(3), nx.numgen_random(7),
    nx.num(0), nx.num(65535), nx.num(0xFFFFFFFF, hexa=True), nx.num(-1),
    nx.word("tcp"), nx.word("ipv6-icmp"),
    nx.value_range(22, 22), nx.value_range(1024, 2047),
    nx.prefix("198.51.100.0", 24), nx.prefix("2001:db8::", 32),
    nx.goto("pick_0"), nx.verdict("drop"), nx.verdict("return"), nx.masquerade(),
    *[nx.string(s) for s in QUOTABLE], *[nx.word(s) for s in ODD], *[nx.goto(s) for s in ODD],
]


def composites(leaves: list[nx.X]) -> list[nx.X]:
    a, b = leaves[0], leaves[-1]
    return [
        nx.anon_set(leaves[:1]), nx.anon_set(leaves), nx.anon_set([nx.word("local"), nx.word("broadcast")]),
        nx.band(nx.meta("mark"), 0xFF00), nx.bor(nx.band(nx.ct("mark"), 0xFF00FFFF), 0x10000),
        nx.match(a, b), nx.match(a, b, "!="), nx.match(nx.numgen_random(4), nx.num(3), "<"),
        nx.match(nx.payload("ip", "saddr"), nx.anon_set([nx.prefix("192.0.2.0", 24), nx.prefix("203.0.113.7", 32)])),
        nx.mangle(nx.meta("mark"), nx.bor(nx.band(nx.meta("mark"), 0xFF00FFFF), 0x20000)),
        nx.vmap(nx.band(nx.ct("mark"), 0xFF0000), [(nx.num(0x10000, hexa=True), nx.goto("restore_a")),
                                                   (nx.num(0x20000, hexa=True), nx.goto("restore_b"))]),
        nx.vmap(nx.meta("l4proto"), []),
        nx.match(nx.meta("iifname"), nx.string("eth\\0 naïve")),
    ]


ALL = LEAVES + composites(LEAVES)


@pytest.mark.parametrize("x", ALL, ids=[x.text[:40] or "empty" for x in ALL])
def test_canonical_is_json_dumps(x: nx.X) -> None:
    assert nx.canonical(x) == dumps(x.json)
    assert not x.canon or x.canon == dumps(x.json)


def test_nested_composites() -> None:
    inner = composites(LEAVES)
    for x in composites(inner) + [nx.match(nx.band(nx.meta("mark"), 0xFF), nx.anon_set(inner), "!=")]:
        assert nx.canonical(x) == dumps(x.json)


@pytest.mark.parametrize("parts", [[], ALL[:1], ALL, composites(ALL)])
def test_expression_is_json_dumps_of_the_list(parts: list[nx.X]) -> None:
    assert nx.expression(parts) == dumps([p.json for p in parts])


@pytest.mark.parametrize("value", [s for s in ODD if s not in QUOTABLE])
def test_string_refuses_what_nft_cannot_quote(value: str) -> None:
    with pytest.raises(ValueError):
        nx.string(value)
