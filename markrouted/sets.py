"""Destination sets (``[sets.NAME]``): parsing set files, merging prefixes, checking domains.

Pure: the text of a set file comes in, intervals and error lines go out
(``config`` reads the files). A set's addresses become, per family, sorted
disjoint inclusive intervals of integers (``model.Interval``): overlapping and
adjacent prefixes are merged, so the nft set holds the fewest elements and two
configurations that cover the same addresses compare equal. The "set elements"
update (``diff.diff_elements``) works on these intervals.
"""

from __future__ import annotations

import re
from socket import AF_INET, AF_INET6, inet_pton  # the C address parser: pure, no socket is opened
from collections.abc import Iterable, Sequence
from typing import Final, TypeAlias

#: inclusive bounds, as ``model.Interval`` (this module imports nothing of markrouted)
Interval: TypeAlias = tuple[int, int]

#: The most entries (addresses or CIDRs, inline and from files) one set may have.
MAX_ENTRIES: Final = 1_000_000
#: The most bytes read from one set file (a longer file is refused, not cut).
MAX_FILE_SIZE: Final = 32 * 1024 * 1024
#: How many bad lines of one file are listed before the rest are counted.
MAX_LISTED: Final = 20

NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_LABEL_RE: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_BITS: Final = {4: 32, 6: 128}


def parse_entry(text: str) -> tuple[int, Interval] | str:
    """One address or CIDR as (version, interval), or why it is not one (to follow the quoted text)."""
    addr, slash, length_text = text.partition("/")
    if "%" in addr:  # a zone index: nothing a set can match
        return "is not an IP address or CIDR"
    version = 6 if ":" in addr else 4
    try:
        # ten times ipaddress's speed, which matters for a file of 100,000 lines
        value = int.from_bytes(inet_pton(AF_INET6 if version == 6 else AF_INET, addr), "big")
    except (OSError, ValueError):
        return "is not an IP address or CIDR"
    bits = _BITS[version]
    if slash:
        if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 3 or int(length_text) > bits:
            return "is not an IP address or CIDR"
        length = int(length_text)
    else:
        length = bits
    host = (1 << (bits - length)) - 1
    if value & host:
        return "has host bits set"
    return version, (value, value | host)


def parse_lines(text: str) -> tuple[dict[int, list[Interval]], list[tuple[int, str, str]], int, int]:
    """A set file's text: (intervals by version, bad lines, how many bad, entries).

    One address or CIDR per line; ``#`` starts a comment; blank lines are
    skipped. The bad lines (at most ``MAX_LISTED``) are (line number, entry,
    problem).
    """
    out: dict[int, list[Interval]] = {4: [], 6: []}
    errors: list[tuple[int, str, str]] = []
    bad = 0
    entries = 0
    v4, v6 = out[4].append, out[6].append
    for number, line in enumerate(text.split("\n"), 1):
        if "#" in line:
            line = line[:line.index("#")]
        entry = line.strip()
        if not entry:
            continue
        entries += 1
        addr, slash, length = entry.partition("/")
        if "%" not in addr and (not slash or length.isdigit() and len(length) < 4):
            # the common case, inline (a function call per line costs as much as the parsing)
            try:
                if ":" in addr:
                    value, bits, add = int.from_bytes(inet_pton(AF_INET6, addr), "big"), 128, v6
                else:
                    value, bits, add = int.from_bytes(inet_pton(AF_INET, addr), "big"), 32, v4
                size = bits - int(length) if length else 0
                if 0 <= size <= bits and not value & ((1 << size) - 1):
                    add((value, value | ((1 << size) - 1)))
                    continue
            except (OSError, ValueError):
                pass
        parsed = parse_entry(entry)
        if isinstance(parsed, str):
            bad += 1
            if bad <= MAX_LISTED:
                errors.append((number, entry, parsed))
            continue
        (v4 if parsed[0] == 4 else v6)(parsed[1])
    return out, errors, bad, entries


def merge(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    """Sorted, disjoint intervals covering the same addresses (overlapping and adjacent ones merged)."""
    ordered = sorted(intervals)
    if not ordered:
        return ()
    out: list[Interval] = []
    lo, hi = ordered[0]
    for next_lo, next_hi in ordered:
        if next_lo <= hi + 1:
            if next_hi > hi:
                hi = next_hi
        else:
            out.append((lo, hi))
            lo, hi = next_lo, next_hi
    out.append((lo, hi))
    return tuple(out)


def contains(intervals: Sequence[Interval], value: int) -> bool:
    """Whether ``value`` is in the sorted disjoint ``intervals`` (a binary search)."""
    lo, hi = 0, len(intervals)
    while lo < hi:
        mid = (lo + hi) // 2
        if intervals[mid][1] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo < len(intervals) and intervals[lo][0] <= value


def domain_problem(name: str) -> str | None:
    """Why ``name`` cannot be a domain in a dnsmasq ``nftset=`` line (None: it can)."""
    text = name.lower().rstrip(".")
    if not text or len(text) > 253:
        return "is not a valid domain name (1-253 characters)"
    labels = text.split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        return "is not a valid domain name (letters, digits and '-' in dot-separated labels)"
    return None


def normal_domain(name: str) -> str:
    return name.lower().rstrip(".")


def nft_names(name: str) -> dict[str, str]:
    """The nft sets of ``[sets.NAME]``: static ``NAME_v4``/``NAME_v6``, dnsmasq's ``NAME_dns_v4``/``_v6``."""
    return {"v4": f"{name}_v4", "v6": f"{name}_v6", "dns_v4": f"{name}_dns_v4", "dns_v6": f"{name}_dns_v6"}
