"""Pure analysis for ``check --kernel``: who else uses markrouted's marks, tables, priorities.

Mark collisions are the first support issue of every tool in this field; they
are found by reading the live ruleset, not by documenting them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .config import Config
from .model import NFT_FAMILY, NFT_TABLE, family_name, priority_range

FULL = 0xFFFFFFFF


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    text: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.text}"


def _is_mark(expr: Any) -> str | None:
    if isinstance(expr, dict):
        for key in ("meta", "ct"):
            inner = expr.get(key)
            if isinstance(inner, dict) and inner.get("key") == "mark":
                return f"{key} mark"
    return None


def _bits_of_value(value: Any, key: str | None = None) -> int:
    """Bits a mangle of the mark ``key`` ("meta mark", "ct mark") writes.

    A constant or another source writes the whole mark; ``key & K`` clears the
    bits outside K, ``key | C`` and ``key ^ C`` write only C, and
    ``(key & K) | C`` (how nft echoes a masked set) writes ~K and C.
    """
    if isinstance(value, int):
        return FULL  # "mark set 0x10" writes the whole mark
    if isinstance(value, dict):
        for op in ("|", "^"):
            if op in value:
                left, right = value[op]
                if not isinstance(right, int):
                    return FULL
                if key is not None and _is_mark(left) == key:
                    return right & FULL
                if isinstance(left, dict) and "&" in left:
                    inner, keep = left["&"]
                    if key is not None and _is_mark(inner) == key and isinstance(keep, int):
                        return (FULL & ~keep) | (right & FULL)
                return FULL
        if "&" in value:
            left, right = value["&"]
            if key is not None and _is_mark(left) == key and isinstance(right, int):
                return FULL & ~right
    return FULL


def _walk(obj: Any) -> Iterator[Any]:
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def mark_users(ruleset: dict[str, Any]) -> Iterator[tuple[str, str, int]]:
    """(where, what, bits) for every expression of a foreign rule that touches a mark."""
    for item in ruleset.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not rule:
            continue
        if rule.get("family") == NFT_FAMILY and rule.get("table") == NFT_TABLE:
            continue
        where = f"table {rule.get('family')} {rule.get('table')} chain {rule.get('chain')}"
        if "handle" in rule:
            where += f" handle {rule['handle']}"
        for expr in _walk(rule.get("expr", [])):
            if not isinstance(expr, dict):
                continue
            if "mangle" in expr:
                what = _is_mark(expr["mangle"].get("key"))
                if what:
                    yield where, f"sets {what}", _bits_of_value(expr["mangle"].get("value"), what)
            elif "match" in expr or "vmap" in expr or "map" in expr:
                # a verdict map or map keyed on the mark reads it as much as a match does
                left = expr["match"].get("left") if "match" in expr else (expr.get("vmap") or expr["map"]).get("key")
                what = _is_mark(left)
                if what:
                    yield where, f"reads {what}", FULL
                elif isinstance(left, dict) and "&" in left:
                    a, m = left["&"]
                    what = _is_mark(a)
                    if what and isinstance(m, int):
                        yield where, f"reads {what}", m


def analyse(
    config: Config,
    ruleset: dict[str, Any],
    foreign_rules: Iterable[tuple[int, int, int, int, int]],
    foreign_route_tables: Iterable[int],
) -> list[Finding]:
    """Collisions with markrouted's marks, priority range and tables.

    ``foreign_rules``: (family, priority, table, fwmark, fwmask) of every rule
    without markrouted's tag; ``foreign_route_tables``: the tables holding
    routes of someone else (both as ``kernel.netlink`` reads them).
    """
    s = config.settings
    mask = s.mark_mask
    out: list[Finding] = []
    for where, what, bits in mark_users(ruleset):
        if bits & mask:
            severity = "error" if what.startswith("sets") else "warning"
            out.append(Finding(severity, f"{where} {what} bits {bits:#010x}, overlapping mark_mask {mask:#010x}"))
    lo, hi = priority_range(s.rule_priority)
    tables = {u.table: u.name for u in config.uplinks}
    seen_tables: set[tuple[int, int]] = set()
    for family, prio, table, fwmark, fwmask in foreign_rules:
        if lo <= prio <= hi:
            out.append(Finding("warning", f"a {family_name(family)} rule of someone else has priority {prio}, "
                                          f"inside markrouted's range {lo}-{hi}"))
        if table in tables and (family, table) not in seen_tables:
            seen_tables.add((family, table))
            out.append(Finding("error", f"table {table} (uplinks.{tables[table]}.table) is used by a "
                                        f"{family_name(family)} rule of someone else (priority {prio})"))
        if (fwmark or fwmask) and (fwmask & mask):
            out.append(Finding("warning", f"a {family_name(family)} rule at priority {prio} matches fwmark "
                                          f"{fwmark:#x}/{fwmask:#x}, overlapping mark_mask {mask:#010x}"))
    for table in sorted(set(foreign_route_tables)):
        if table in tables:
            out.append(Finding("error", f"table {table} (uplinks.{tables[table]}.table) holds routes of someone else"))
    return out
