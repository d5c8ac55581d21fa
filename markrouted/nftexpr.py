"""A tiny builder for nftables expressions that yields both forms at once.

Each builder returns an ``X``: the libnftables JSON object (the canonical form a
rule's digest and the raw refill are computed from) and the nft text that is
sent to the kernel and a human reads in ``markrouted plan``. Keeping them side
by side is what keeps the two from drifting apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


class X(NamedTuple):
    json: Any
    text: str


def _hex(value: int) -> str:
    return f"0x{value:08x}"


def meta(key: str) -> X:
    return X({"meta": {"key": key}}, f"meta {key}")


def ct(key: str) -> X:
    return X({"ct": {"key": key}}, f"ct {key}")


def payload(protocol: str, fld: str) -> X:
    return X({"payload": {"protocol": protocol, "field": fld}}, f"{protocol} {fld}")


def fib_daddr_type() -> X:
    return X({"fib": {"result": "type", "flags": ["daddr"]}}, "fib daddr type")


def socket_cgroupv2(level: int) -> X:
    return X({"socket": {"key": "cgroupv2", "level": level}}, f"socket cgroupv2 level {level}")


def numgen_random(mod: int) -> X:
    return X({"numgen": {"mode": "random", "mod": mod, "offset": 0}}, f"numgen random mod {mod}")


def num(value: int, hexa: bool = False) -> X:
    return X(value, _hex(value) if hexa else str(value))


def string(value: str) -> X:
    """A quoted string (an interface name, a cgroup path).

    nft's quoted strings have no escape for '"', so a value holding one could end
    its quotes early and go on as nft syntax; a control character (a newline above
    all) would end the rule. Validation never lets either through to here; should
    one arrive anyway, it is refused rather than rendered.
    """
    bad = next((c for c in value if c == '"' or not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"refusing to put {bad!r} inside an nft string")
    return X(value, f'"{value}"')


def word(value: str) -> X:
    """A symbolic constant nft knows by name (tcp, new, local...)."""
    return X(value, value)


def value_range(lo: int, hi: int) -> X:
    if lo == hi:
        return num(lo)
    return X({"range": [lo, hi]}, f"{lo}-{hi}")


def prefix(addr: str, length: int) -> X:
    return X({"prefix": {"addr": addr, "len": length}}, f"{addr}/{length}")


def anon_set(items: Sequence[X]) -> X:
    if len(items) == 1:
        return items[0]
    return X({"set": [i.json for i in items]}, "{ " + ", ".join(i.text for i in items) + " }")


def band(left: X, mask: int) -> X:
    return X({"&": [left.json, mask]}, f"{left.text} & {_hex(mask)}")


def bor(left: X, value: int) -> X:
    return X({"|": [left.json, value]}, f"{left.text} | {_hex(value)}")


def match(left: X, right: X, op: str = "==") -> X:
    text = f"{left.text} {right.text}" if op == "==" else f"{left.text} {op} {right.text}"
    return X({"match": {"op": op, "left": left.json, "right": right.json}}, text)


def mangle(key: X, value: X) -> X:
    return X({"mangle": {"key": key.json, "value": value.json}}, f"{key.text} set {value.text}")


def goto(chain: str) -> X:
    return X({"goto": {"target": chain}}, f"goto {chain}")


def verdict(name: str) -> X:
    """accept | drop | return"""
    return X({name: None}, name)


def masquerade() -> X:
    return X({"masquerade": None}, "masquerade")


def vmap(key: X, entries: Iterable[tuple[X, X]]) -> X:
    pairs = list(entries)
    return X(
        {"vmap": {"key": key.json, "data": {"set": [[k.json, v.json] for k, v in pairs]}}},
        f"{key.text} vmap {{ " + ", ".join(f"{k.text} : {v.text}" for k, v in pairs) + " }",
    )
