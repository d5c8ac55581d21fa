"""A tiny builder for nftables expressions that yields both forms at once.

Each builder returns an ``X``: the libnftables JSON object (the canonical form a
rule's digest and the raw refill are computed from) and the nft text that is
sent to the kernel and a human reads in ``markrouted plan``. Keeping them side
by side is what keeps the two from drifting apart.

An ``X`` also carries its JSON already serialised (``canon``), built from its
parts' serialisations as the expression is built: a rule's expression list is
then joined, not re-encoded. With a thousand policies that encoding was most
of a derivation. ``canon`` is exactly what ``json.dumps(x.json, sort_keys=True,
separators=(",", ":"))`` gives (keys sorted, no spaces, non-ASCII escaped), so
digests do not depend on which path made it; ``tests/unit/test_nftexpr.py``
holds every builder to that.
"""

from __future__ import annotations

import json as _json
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring_ascii as _quote  # the string encoder json.dumps uses
from typing import Any, NamedTuple


class X(NamedTuple):
    json: Any
    text: str
    #: ``json`` serialised canonically (see the module docstring); "" when a
    #: builder left it to ``canonical`` (never valid JSON, so never ambiguous)
    canon: str = ""


def _dump(value: Any) -> str:
    """``value`` as canonical JSON: the common scalars directly, anything else by json.dumps."""
    if type(value) is str:
        return _quote(value)
    if type(value) is int:
        return int.__repr__(value)
    return _json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical(x: X) -> str:
    """The canonical JSON of one expression."""
    return x.canon or _dump(x.json)


def expression(parts: Iterable[X]) -> str:
    """The canonical JSON of a rule's expression list: ``json.dumps`` of ``[p.json ...]``, sorted keys."""
    return "[" + ",".join([p.canon or _dump(p.json) for p in parts]) + "]"


def _hex(value: int) -> str:
    return f"0x{value:08x}"


def meta(key: str) -> X:
    return X({"meta": {"key": key}}, f"meta {key}", '{"meta":{"key":' + _quote(key) + "}}")


def ct(key: str) -> X:
    return X({"ct": {"key": key}}, f"ct {key}", '{"ct":{"key":' + _quote(key) + "}}")


def payload(protocol: str, fld: str) -> X:
    return X({"payload": {"protocol": protocol, "field": fld}}, f"{protocol} {fld}",
             '{"payload":{"field":' + _quote(fld) + ',"protocol":' + _quote(protocol) + "}}")


def fib_daddr_type() -> X:
    return X({"fib": {"result": "type", "flags": ["daddr"]}}, "fib daddr type",
             '{"fib":{"flags":["daddr"],"result":"type"}}')


def socket_cgroupv2(level: int) -> X:
    return X({"socket": {"key": "cgroupv2", "level": level}}, f"socket cgroupv2 level {level}",
             '{"socket":{"key":"cgroupv2","level":' + _dump(level) + "}}")


def numgen_random(mod: int) -> X:
    return X({"numgen": {"mode": "random", "mod": mod, "offset": 0}}, f"numgen random mod {mod}",
             '{"numgen":{"mod":' + _dump(mod) + ',"mode":"random","offset":0}}')


def num(value: int, hexa: bool = False) -> X:
    return X(value, _hex(value) if hexa else str(value), _dump(value))


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
    return X(value, value, _quote(value))


def value_range(lo: int, hi: int) -> X:
    if lo == hi:
        return num(lo)
    return X({"range": [lo, hi]}, f"{lo}-{hi}", '{"range":[' + _dump(lo) + "," + _dump(hi) + "]}")


def prefix(addr: str, length: int) -> X:
    return X({"prefix": {"addr": addr, "len": length}}, f"{addr}/{length}",
             '{"prefix":{"addr":' + _quote(addr) + ',"len":' + _dump(length) + "}}")


def anon_set(items: Sequence[X]) -> X:
    if len(items) == 1:
        return items[0]
    return X({"set": [i.json for i in items]}, "{ " + ", ".join([i.text for i in items]) + " }",
             '{"set":' + expression(items) + "}")


def band(left: X, mask: int) -> X:
    return X({"&": [left.json, mask]}, f"{left.text} & {_hex(mask)}",
             '{"&":[' + canonical(left) + "," + _dump(mask) + "]}")


def bor(left: X, value: int) -> X:
    return X({"|": [left.json, value]}, f"{left.text} | {_hex(value)}",
             '{"|":[' + canonical(left) + "," + _dump(value) + "]}")


def match(left: X, right: X, op: str = "==") -> X:
    text = f"{left.text} {right.text}" if op == "==" else f"{left.text} {op} {right.text}"
    return X({"match": {"op": op, "left": left.json, "right": right.json}}, text,
             '{"match":{"left":' + canonical(left) + ',"op":' + _quote(op) + ',"right":' + canonical(right) + "}}")


def mangle(key: X, value: X) -> X:
    return X({"mangle": {"key": key.json, "value": value.json}}, f"{key.text} set {value.text}",
             '{"mangle":{"key":' + canonical(key) + ',"value":' + canonical(value) + "}}")


def goto(chain: str) -> X:
    return X({"goto": {"target": chain}}, f"goto {chain}", '{"goto":{"target":' + _quote(chain) + "}}")


def verdict(name: str) -> X:
    """accept | drop | return"""
    return X({name: None}, name, "{" + _quote(name) + ":null}")


def masquerade() -> X:
    return X({"masquerade": None}, "masquerade", '{"masquerade":null}')


def vmap(key: X, entries: Iterable[tuple[X, X]]) -> X:
    pairs = list(entries)
    return X(
        {"vmap": {"key": key.json, "data": {"set": [[k.json, v.json] for k, v in pairs]}}},
        f"{key.text} vmap {{ " + ", ".join(f"{k.text} : {v.text}" for k, v in pairs) + " }",
        '{"vmap":{"data":{"set":[' + ",".join("[" + canonical(k) + "," + canonical(v) + "]" for k, v in pairs)
        + ']},"key":' + canonical(key) + "}}",
    )


def jump(chain: str) -> X:
    return X({"jump": {"target": chain}}, f"jump {chain}", '{"jump":{"target":' + _quote(chain) + "}}")


def set_ref(name: str) -> X:
    """A named set of the table, as the right side of a match (``ip saddr @name``)."""
    return X("@" + name, "@" + name, _quote("@" + name))


def set_update(name: str, key: X) -> X:
    """``update @name { key }``: add the key, or restart its timeout (a dynamic set)."""
    return X({"set": {"op": "update", "elem": key.json, "set": "@" + name}}, f"update @{name} {{ {key.text} }}",
             '{"set":{"elem":' + canonical(key) + ',"op":"update","set":' + _quote("@" + name) + "}}")
