"""The nftables table ``inet markrouted``: its writes, its reading, and the one cache of it.

markrouted owns exactly one table and touches nothing else, never the ruleset
as a whole. Each kind of change has one write path, and every write is one
transaction that happens entirely or not at all:

* replace (``NftUpdate.replace``): ``add table; delete table; table { chains
  and rules }`` as one nft script through libnftables. nft's text syntax is
  the one that nftables 1.0.6 (Debian 12) accepts ``socket cgroupv2`` in, so it
  is the only syntax used; the script is ``NftTable.text()``, in which every
  string that comes from the config (interface names, comments) went through
  ``nftexpr.string`` when it was derived. There is no ``destroy`` in 1.0.6, and
  add-then-delete makes the delete succeed whether or not the table existed;
* refill (``NftUpdate.chains``): the rules of a few pick chains replaced in
  one raw nf_tables batch (``nftraw``): a failover rewrites a one-rule chain,
  not the table, and skips libnftables' fetch of the whole table. The diff
  asks for a refill only when every changed chain is in the raw vocabulary
  (``NftChain.raw_refillable``), otherwise for a replace;
* set elements (``NftUpdate.elements``): the elements of a few static named
  sets changed, in one transaction, every delete before every add: a raw
  nf_tables batch (``nftraw``; libnftables would first fetch every element
  of the set, 1.3 s for 100,000 prefixes), or for more than
  ``RAW_ELEMENTS_MAX`` changed intervals one libnftables script. No chain,
  counter or other set is touched, so a set file's edit is a handful of
  element messages in ``nft monitor``. The element diff is
  ``diff.diff_elements`` on merged intervals;
  The named counters are re-declared in that script with the values they
  had just before (``counters.read_counters``), so a replace does not zero them;
* remove (``NftUpdate.remove``): ``add table; delete table`` through libnftables.

The dynamic sets dnsmasq fills (``NftSet.dynamic``) are declared by
markrouted but their elements are never written nor removed by it: a replace
lists them just before (``NftDumper.timed``) and adds them back, each with
the time it had left, in the same transaction. An element dnsmasq adds
between that listing and the commit is lost until its next answer.

Reading is done by ``nftdump`` (two kernel-filtered nfnetlink dumps decoded
with struct): libnftables lists a table only by fetching and decoding all of
it, set elements included — hundreds of milliseconds for 2,500 rules. Drift
detection compares chains by their hook and the comments of their rules; each
comment carries a digest of the rule (see ``model.NftRule``).

Set elements have a cache of their own: a static set of 100,000 prefixes is
200,000 kernel elements, far too many to dump on every pass, and dnsmasq's
additions move the generation id all day. The elements of a static set are
dumped only when the set's handle is new to the cache (it was created or
re-created by someone), otherwise taken from the cache, which each of our own
successful writes updates when the generation id proves that no one else
committed in between (and empties otherwise, or when a write fails). An
element added or removed by hand inside a static set is therefore put right
when that set's desired elements next change, or by ``markrouted apply``
(which starts with an empty cache), not by every pass.

The one cache, and why the kernel proves it valid: the kernel counts
nf_tables transactions in a per-namespace generation id, bumped by exactly
one by every commit of anyone. ``read`` asks for the id (one round-trip) and
reuses the last listing while the id has not moved. After one of our own
writes succeeds, if the id is exactly the listing's id + 1, no one else
committed between that listing and our write's end, so the table now is the
listing with our change applied: it is remembered as the listing of the new
generation. Any other id (someone else's commit slipped in, or the id is
unreadable) drops the listing, and the next ``read`` dumps the table again.
Nothing else is assumed: the kernel stays the only source of truth.

Which nf_tables notifications concern the table is decided here too
(``concerns``, used by ``events.NftWatch``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..model import NFT_FAMILY, NFT_TABLE, Interval, NftChain, NftSet, NftTable, NftUpdate, SetElements
from .errors import KernelError, Unsupported, denied
from .nl import NFPROTO_INET
from .counters import read_counters
from .nftdump import NftDumper
from .nftraw import RawRefill

_TABLE = f"{NFT_FAMILY} {NFT_TABLE}"
#: the add before the delete makes the delete succeed whether or not the table exists
_DELETE = f"add table {_TABLE}\ndelete table {_TABLE}\n"
_GEN_MOD = 1 << 32
#: up to this many changed intervals, the raw batch; more (a set rewritten), one libnftables script
RAW_ELEMENTS_MAX = 20_000


def _load_binding() -> Any:
    try:
        import nftables
    except ImportError as exc:
        raise Unsupported(
            "the nftables Python binding is missing (install python3-nftables)"
        ) from exc
    try:
        return nftables.Nftables()
    except OSError as exc:
        raise Unsupported(f"libnftables cannot be loaded: {exc}") from exc


CAP_NET_ADMIN = 12


def lacks_net_admin(status: str = "/proc/self/status") -> bool:
    """True when this process surely does not hold CAP_NET_ADMIN.

    libnftables reports a refused netlink request by printing "Operation not
    permitted (you must be root)" straight to stderr, around its error buffer;
    checking first keeps the user's error to the one line markrouted prints.
    """
    try:
        with open(status, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return not (int(line.split()[1], 16) >> CAP_NET_ADMIN) & 1
    except (OSError, ValueError, IndexError):
        pass
    return False  # cannot tell: let the kernel decide


def concerns(family: int, table: bytes) -> bool:
    """Whether an nf_tables object message (its family, its table's name attribute) is about our table.

    The event filter of ``events.NftWatch``: markrouted owns ``inet markrouted`` only.
    """
    return family == NFPROTO_INET and table.rstrip(b"\0") == NFT_TABLE.encode()


def next_generation(gen: int) -> int:
    """The generation id after one commit (the kernel skips 0 when it wraps)."""
    return (gen + 1) % _GEN_MOD or 1


def replace_script(table: NftTable, counts: Mapping[str, tuple[int, int]] | None = None) -> str:
    """The replace transaction as one nft script; ``counts`` carry the named counters over."""
    return _DELETE + table.text(counts) + "\n"


def carried_counts(table: NftTable) -> dict[str, tuple[int, int]]:
    """The current values of the table's named counters, for the replace to start from.

    Read just before the replace: what is counted in between (microseconds) is
    lost, nothing more. Unreadable (no table yet, an old kernel): start at zero.
    """
    if not table.counters:
        return {}
    try:
        return read_counters()
    except (KernelError, OSError):
        return {}


def elements_script(changes: tuple[SetElements, ...]) -> str:
    """The "set elements" transaction: every delete, then every add."""
    lines = []
    for change in changes:
        if change.delete:
            texts = NftSet(change.name, change.version).element_texts(change.delete)
            lines.append(f"delete element {_TABLE} {change.name} {{ {', '.join(texts)} }}")
    for change in changes:
        if change.add:
            texts = NftSet(change.name, change.version).element_texts(change.add)
            lines.append(f"add element {_TABLE} {change.name} {{ {', '.join(texts)} }}")
    return "\n".join(lines) + "\n"


def carried_script(name: str, version: int, timed: list[tuple[int, int, int]]) -> str:
    """``add element`` of a dynamic set's elements, each with the time it had left."""
    if not timed:
        return ""
    shown = NftSet(name, version)
    texts = []
    for value, _width, left_ms in timed:
        text = shown.element_texts([(value, value)])[0]
        texts.append(f"{text} timeout {max(1, -(-left_ms // 1000))}s" if left_ms else text)
    return f"add element {_TABLE} {name} {{ {', '.join(texts)} }}\n"


def refilled(table: NftTable | None, desired: NftTable, names: tuple[str, ...]) -> NftTable | None:
    """``table`` with the rules of chains ``names`` taken from ``desired`` (None if any is missing)."""
    if table is None:
        return None
    have = {c.name for c in table.chains}
    chains: list[NftChain] = []
    for chain in table.chains:
        want = desired.chain(chain.name) if chain.name in names else None
        chains.append(NftChain(chain.name, chain.base, want.rules) if want else chain)
    return NftTable(tuple(chains), table.sets, table.counters) if all(n in have for n in names) else None


class Nft:
    """The table ``inet markrouted``: its reading, its three kinds of write, its removal.

    Longer than the other kernel classes on purpose (size: the generation-proven
    cache of the listing and of static set elements is only sound if the reads
    and every write that updates it stay in one place; see the module doc).
    """

    def __init__(self) -> None:
        if lacks_net_admin():
            raise denied("nftables")
        self.nft = _load_binding()
        self.nft.set_json_output(True)  # for ``ruleset`` (check --kernel); writes are text
        self.nft.set_handle_output(False)
        self._dumper: NftDumper | None = None
        self._raw: RawRefill | None = None
        #: (generation id, the table as it is in that generation); see the module doc
        self._listing: tuple[int, NftTable | None] | None = None
        #: static set name -> (its handle, its elements); see the module doc
        self._elements: dict[str, tuple[int, tuple[Interval, ...]]] = {}

    def close(self) -> None:
        if self._dumper is not None:
            self._dumper.close()
            self._dumper = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def generation(self) -> int | None:
        """The namespace's nf_tables generation id (None: unreadable)."""
        if self._dumper is None:
            self._dumper = NftDumper()
        return self._dumper.generation()

    def read(self) -> NftTable | None:
        """The table as the kernel holds it now (None: absent); see the module doc."""
        gen = self.generation()
        if gen is not None and self._listing is not None and self._listing[0] == gen:
            return self._listing[1]
        assert self._dumper is not None  # opened by generation()
        table = self._dumper.read(NFT_TABLE)
        if table is not None and table.sets:
            table = NftTable(table.chains, tuple(self._with_elements(s) for s in table.sets))
        # remembered only when no transaction slipped in while listing
        stable = gen is not None and self.generation() == gen
        self._listing = (gen, table) if stable and gen is not None else None
        return table

    def _with_elements(self, item: NftSet) -> NftSet:
        """A static set with its elements: from the cache while its handle is the same, else dumped."""
        assert self._dumper is not None
        if item.dynamic:
            return item
        handle = self._dumper.handles.get(item.name, 0)
        cached = self._elements.get(item.name)
        if cached is None or cached[0] != handle:
            elements, _count = self._dumper.elements(item.name)
            cached = (handle, tuple(elements))
            self._elements[item.name] = cached
        return NftSet(item.name, item.version, cached[1], item.dynamic, item.timeout)

    def set_sizes(self) -> dict[str, int]:
        """Each named set's element count as the kernel holds it (intervals of a static set)."""
        if self._dumper is None:
            self._dumper = NftDumper()
        out: dict[str, int] = {}
        try:
            found = self._dumper.sets(NFT_TABLE)
        except KernelError:
            return out
        for item, _handle in found:
            elements, count = self._dumper.elements(item.name, not item.dynamic)
            out[item.name] = count if item.dynamic else len(elements)
        return out

    def ruleset(self) -> dict[str, Any]:
        """The whole ruleset as libnftables' JSON (for the collision checks)."""
        rc, out, err = self.nft.cmd("list ruleset")
        if rc != 0:
            raise _error("list ruleset", str(err))
        result: dict[str, Any] = json.loads(out) if out else {"nftables": []}
        return result

    def probe(self) -> None:
        """Fail clearly when nf_tables is unusable (a dry-run transaction)."""
        self.nft.set_dry_run(True)
        try:
            self._script(f"add table {_TABLE}\n", "nf_tables")
        finally:
            self.nft.set_dry_run(False)

    def apply(self, update: NftUpdate, desired: NftTable | None) -> None:
        """Carry out one update in one transaction, by its kind's one write path."""
        if update.empty:
            return
        before = self._listing
        self._listing = None  # whatever happens next, unproven until the kernel says so
        start = self.generation()
        try:
            after, commits = self._write(update, desired, before)
        except BaseException:
            self._elements.clear()
            raise
        gen = self.generation()
        expected = start
        for _ in range(commits):
            expected = next_generation(expected) if expected is not None else None
        proven = start is not None and gen is not None and gen == expected
        self._remember_elements(update, desired, proven)
        if after is None and not (update.remove or desired is None):
            return
        if proven and before is not None and before[0] == start and gen is not None:
            self._listing = (gen, after)

    def _write(
        self, update: NftUpdate, desired: NftTable | None, before: tuple[int, NftTable | None] | None
    ) -> tuple[NftTable | None, int]:
        """Carry out the update; (the table after it, as far as known; how many commits it made)."""
        if update.remove or desired is None:
            self._script(_DELETE, f"delete table {_TABLE}")
            return None, 1
        if update.replace:
            self._script(replace_script(desired, carried_counts(desired)) + self._carried(desired),
                         f"replace table {_TABLE}")
            return desired, 1
        commits = 0
        known = before[1] if before is not None else None
        if update.elements:
            if sum(len(c.add) + len(c.delete) for c in update.elements) <= RAW_ELEMENTS_MAX:
                if self._raw is None:
                    self._raw = RawRefill()
                self._raw.set_elements(update.elements)
            else:
                self._script(elements_script(update.elements), "set elements")
            commits += 1
            known = NftTable(known.chains, desired.sets) if known is not None else None
        if update.chains:
            chains = [c for c in (desired.chain(name) for name in update.chains) if c is not None]
            if self._raw is None:
                self._raw = RawRefill()
            self._raw.refill(chains)
            commits += 1
            known = refilled(known, desired, update.chains)
        return known, commits

    def _carried(self, desired: NftTable) -> str:
        """The dynamic sets' elements now in the kernel, to add back in a replace (see the module doc)."""
        wanted = [s for s in desired.sets if s.dynamic]
        if not wanted:
            return ""
        if self._dumper is None:
            self._dumper = NftDumper()
        try:
            have = {s.name: s for s, _handle in self._dumper.sets(NFT_TABLE)}
        except KernelError:
            return ""  # no table yet
        script = ""
        for item in wanted:
            old = have.get(item.name)
            if old is not None and old.dynamic and old.version == item.version:
                script += carried_script(item.name, item.version, self._dumper.timed(item.name))
        return script

    def _remember_elements(self, update: NftUpdate, desired: NftTable | None, proven: bool) -> None:
        """After a write: the static sets' elements are the desired ones (when proven), see the module doc."""
        if not proven or desired is None or update.remove:
            self._elements.clear()
            return
        if update.replace:
            if not any(not s.dynamic for s in desired.sets):
                self._elements.clear()
                return
            assert self._dumper is not None  # opened by generation()
            handles = {s.name: h for s, h in self._dumper.sets(NFT_TABLE)}
            self._elements = {s.name: (handles[s.name], s.elements)
                              for s in desired.sets if not s.dynamic and s.name in handles}
            return
        for change in update.elements:
            item = desired.set(change.name)
            cached = self._elements.get(change.name)
            if item is None or cached is None:
                self._elements.pop(change.name, None)
            else:
                self._elements[change.name] = (cached[0], item.elements)

    def _script(self, script: str, what: str) -> None:
        """One transaction in nft's own syntax."""
        rc, _out, err = self.nft.cmd(script)
        if rc != 0:
            raise _error(what, str(err))


def _error(what: str, text: str) -> KernelError:
    text = text.strip()
    if "Operation not permitted" in text or "Permission denied" in text:
        return denied(what)
    if "Protocol not supported" in text or "not supported" in text.lower():
        return Unsupported(f"{what}: this kernel has no usable nf_tables ({text.splitlines()[0] if text else ''})")
    first = text.splitlines()[0] if text else "failed"
    return KernelError(f"{what}: {first}")
