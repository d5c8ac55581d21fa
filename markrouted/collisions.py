"""Pure analysis for ``check --kernel``: who else uses markrouted's marks, tables, priorities,
and what systemd-networkd and NetworkManager, as configured, will do to its objects.

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


# ------------------------------------------------------------------ network managers
#
# What systemd-networkd and NetworkManager do to markrouted's objects, judged
# from their configuration files as ``markrouted.kernel.networkd`` and
# ``markrouted.kernel.nm`` read them: (path, text) pairs in the order the
# program reads them. docs/design.md and the README's "Living with other
# software" say what each setting was seen to do.

#: the complete drop-in the package ships, and where it goes
NETWORKD_EXAMPLE = "/usr/share/doc/markrouted/examples/networkd-markrouted.conf"
NETWORKD_DROPIN = "/etc/systemd/networkd.conf.d/markrouted.conf"

#: networkd.conf [Network] settings that delete markrouted's objects, what they
#: delete, and their default (systemd 252 and 257 alike). ManageForeignNextHops=
#: (257) is not here: markrouted's routes name their gateway, they use no
#: nexthop objects, so it has nothing of markrouted's to delete.
NETWORKD_HARMFUL = (
    ("ManageForeignRoutingPolicyRules", "ip rules", True),
    ("ManageForeignRoutes", "routes (the unreachable defaults of the kill switch among them)", True),
)

_TRUE = ("1", "yes", "y", "true", "t", "on")
_FALSE = ("0", "no", "n", "false", "f", "off")


def ini(text: str) -> Iterator[tuple[str, str, str]]:
    """(section, key, value) of an INI-style file as systemd and GLib's keyfiles write them."""
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif "=" in line:
            key, value = line.split("=", 1)
            yield section, key.strip(), value.strip()


def boolean(value: str) -> bool | None:
    """A systemd or GLib boolean; None for anything else (the setting is then ignored)."""
    v = value.strip().lower()
    return True if v in _TRUE else False if v in _FALSE else None


def networkd_settings(files: Iterable[tuple[str, str]]) -> dict[str, tuple[bool, str | None]]:
    """The effective value of each harmful setting and the file that set it (None: the default).

    ``files`` in the order networkd reads them: networkd.conf, then the
    drop-ins sorted by name; a later assignment wins, an invalid one is ignored.
    """
    out: dict[str, tuple[bool, str | None]] = {key: (default, None) for key, _, default in NETWORKD_HARMFUL}
    for path, text in files:
        for section, key, value in ini(text):
            if section == "Network" and key in out:
                b = boolean(value)
                if b is not None:
                    out[key] = (b, path)
    return out


def networkd_findings(running: bool, files: Iterable[tuple[str, str]],
                      started: float | None = None, changed: float | None = None) -> list[Finding]:
    """What a systemd-networkd running in markrouted's network namespace will delete.

    ``started``: when the running networkd started, ``changed``: the newest
    modification of its configuration files (both epoch seconds, None:
    unknown). networkd reads networkd.conf only when it starts.
    """
    if not running:
        return []
    out: list[Finding] = []
    settings = networkd_settings(files)
    for key, what, _ in NETWORKD_HARMFUL:
        value, where = settings[key]
        if value:
            source = "the default" if where is None else f"set in {where}"
            out.append(Finding("warning", f"systemd-networkd runs with {key}=yes ({source}) and deletes "
                                          f"markrouted's {what} whenever it configures a link; install "
                                          f"{NETWORKD_EXAMPLE} as {NETWORKD_DROPIN} and restart systemd-networkd"))
    # start times are known to the clock tick, the boot time only to the second
    if started is not None and changed is not None and changed > started + 1.0:
        out.append(Finding("warning", "a networkd.conf file changed after systemd-networkd started, and it "
                                      "reads them only when it starts: systemctl restart systemd-networkd"))
    return out


def nm_findings(config: Config, running: bool, files: Iterable[tuple[str, str]]) -> list[Finding]:
    """NetworkManager connection profiles (keyfiles) that break markrouted's uplinks.

    NetworkManager (1.42, 1.52) was seen to leave rules and routes it did not
    add alone, even in a table a profile's ``route-table`` names. But a
    ``route-table`` equal to an uplink's table mixes NetworkManager's routes
    into markrouted's, and one elsewhere, like ``never-default``, keeps the
    link's default route out of the main table, where ``gateway = "auto"``
    looks for it: the uplink goes down.
    """
    if not running:
        return []
    out: list[Finding] = []
    tables = {u.table: u.name for u in config.uplinks}
    by_interface = {u.interface: u for u in config.uplinks}
    for path, text in files:
        values = {(section, key): value for section, key, value in ini(text)}
        name = values.get(("connection", "id")) or path
        uplink = by_interface.get(values.get(("connection", "interface-name"), ""))
        for section, family, field in (("ipv4", "IPv4", "gateway"), ("ipv6", "IPv6", "gateway6")):
            gateway = None if uplink is None else uplink.gateway if section == "ipv4" else uplink.gateway6
            raw = values.get((section, "route-table"), "0")
            table = int(raw) if raw.isdigit() else 0
            if table in tables:
                out.append(Finding("error", f"NetworkManager profile {name} ({path}) puts its {family} routes in "
                                            f"table {table}, markrouted's table of uplinks.{tables[table]}, "
                                            f"where the two mix: give {section}.route-table another number"))
            if uplink is None or gateway is None or gateway.kind != "auto":
                continue
            if table not in (0, 254) and table not in tables:
                out.append(Finding("warning", f"NetworkManager profile {name} ({path}) puts {uplink.interface}'s "
                                              f"{family} default route in table {table}, where "
                                              f"uplinks.{uplink.name}.{field} = \"auto\" does not look (it "
                                              f"reads the main table): set {section}.route-table=0 or give "
                                              f"uplinks.{uplink.name}.{field} an address"))
            if boolean(values.get((section, "never-default"), "no")):
                out.append(Finding("warning", f"NetworkManager profile {name} ({path}) has {section}."
                                              f"never-default=yes: {uplink.interface} gets no {family} default "
                                              f"route for uplinks.{uplink.name}.{field} = \"auto\" to follow; "
                                              f"give it an address"))
    return out
