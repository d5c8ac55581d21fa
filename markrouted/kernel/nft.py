"""The nftables table ``inet markrouted`` through libnftables' JSON API.

markrouted owns exactly one table and touches nothing else, never the ruleset
as a whole. Every write is one transaction that happens entirely or not at all:

* replace: ``add table; delete table; add table; chains; rules`` — there is no
  ``destroy`` in nftables 1.0.6, and add-then-delete makes the delete succeed
  whether or not the table existed;
* refill: ``flush chain; add rule...`` for the few chains that changed (a
  failover rewrites a one-rule chain, not the table).

Reading back compares chains by their hook and by the comments of their rules;
each comment carries a digest of the rule (see ``model.NftRule``).

Reading is done by ``nftdump`` (two kernel-filtered nfnetlink dumps decoded
with struct): libnftables lists a table only by fetching and decoding all of
it, set elements included — hundreds of milliseconds for 2,500 rules. The
kernel also counts nftables transactions in a per-namespace generation id,
bumped by every commit of anyone; a reading is reused for as long as that id,
read afresh on every ``read`` (one netlink round-trip), has not moved. The
kernel stays the only source of truth: nothing written by markrouted is
assumed, and any change by anyone makes the next read dump the table again.
"""

from __future__ import annotations

import json
from typing import Any


from ..model import NFT_FAMILY, NFT_TABLE, NftChain, NftTable, NftUpdate
from .errors import KernelError, PermissionDenied, Unsupported
from .nftdump import NftDumper
from .nftraw import RawRefill, encodable

_T = {"family": NFT_FAMILY, "name": NFT_TABLE}


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


class Nft:
    def __init__(self) -> None:
        if lacks_net_admin():
            raise PermissionDenied("nftables: permission denied (markrouted needs CAP_NET_ADMIN)")
        self.nft = _load_binding()
        self.nft.set_json_output(True)
        self.nft.set_handle_output(False)
        self._dumper: NftDumper | None = None
        self._raw: RawRefill | None = None
        #: (generation id, the table as listed in that generation)
        self._listing: tuple[int, NftTable | None] | None = None

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

    def forget(self) -> None:
        """Drop the remembered listing: the next ``read`` lists the table."""
        self._listing = None

    def _cmd(self, cmds: list[dict[str, Any]], what: str) -> Any:
        rc, out, err = self.nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise _error(what, str(err))
        return out

    def list_json(self, what: str) -> dict[str, Any] | None:
        rc, out, err = self.nft.cmd(f"list {what}")
        if rc != 0:
            text = str(err)
            if "No such file or directory" in text:
                return None
            raise _error(f"list {what}", text)
        result: dict[str, Any] = json.loads(out) if out else {"nftables": []}
        return result

    def read(self) -> NftTable | None:
        """The table as the kernel holds it now (None: absent); see the module doc."""
        gen = self.generation()
        if gen is not None and self._listing is not None and self._listing[0] == gen:
            return self._listing[1]
        assert self._dumper is not None  # opened by generation()
        table = self._dumper.read(NFT_TABLE)
        # remembered only when no transaction slipped in while listing
        stable = gen is not None and self.generation() == gen
        self._listing = (gen, table) if stable and gen is not None else None
        return table

    def ruleset(self) -> dict[str, Any]:
        data = self.list_json("ruleset")
        return data or {"nftables": []}

    def probe(self) -> None:
        """Fail clearly when nf_tables is unusable (a dry-run transaction)."""
        self.nft.set_dry_run(True)
        try:
            self._cmd([{"add": {"table": dict(_T)}}], "nf_tables")
        finally:
            self.nft.set_dry_run(False)

    def apply(self, update: NftUpdate, desired: NftTable | None) -> None:
        if update.empty:
            return
        if update.remove or desired is None:
            self._cmd(
                [{"add": {"table": dict(_T)}}, {"delete": {"table": dict(_T)}}],
                f"delete table {NFT_FAMILY} {NFT_TABLE}",
            )
            return
        if update.replace:
            what = f"replace table {NFT_FAMILY} {NFT_TABLE}"
            if _needs_text(desired.chains):
                self._script(replace_script(desired), what)
                return
            self._cmd(replace_commands(desired), what)
            return
        chains = [c for c in (desired.chain(name) for name in update.chains) if c is not None]
        what = f"refill chains {', '.join(update.chains)}"
        if encodable(chains):
            # the failover path: no libnftables cache fetch of the whole table
            if self._raw is None:
                self._raw = RawRefill()
            self._raw.refill(chains)
            return
        if _needs_text(chains):
            self._script("".join(f"flush chain {NFT_FAMILY} {NFT_TABLE} {c.name}\n" + _rule_lines(c)
                                 for c in chains), what)
            return
        cmds: list[dict[str, Any]] = []
        for chain in chains:
            cmds.append({"flush": {"chain": {**_chain_id(chain.name)}}})
            cmds.extend(_rule_cmds(chain))
        self._cmd(cmds, what)

    def _script(self, script: str, what: str) -> None:
        """One transaction in nft's own syntax (see :func:`_needs_text`)."""
        rc, _out, err = self.nft.cmd(script)
        if rc != 0:
            raise _error(what, str(err))


def _chain_id(name: str) -> dict[str, Any]:
    return {"family": NFT_FAMILY, "table": NFT_TABLE, "name": name}


def _rule_cmds(chain: NftChain) -> list[dict[str, Any]]:
    return [
        {
            "add": {
                "rule": {
                    "family": NFT_FAMILY,
                    "table": NFT_TABLE,
                    "chain": chain.name,
                    "expr": rule.expr,
                    "comment": rule.comment,
                }
            }
        }
        for rule in chain.rules
    ]


def replace_commands(table: NftTable) -> list[dict[str, Any]]:
    cmds: list[dict[str, Any]] = [
        {"add": {"table": dict(_T)}},
        {"delete": {"table": dict(_T)}},
        {"add": {"table": dict(_T)}},
    ]
    for chain in table.chains:
        spec = _chain_id(chain.name)
        if chain.base:
            # integer priorities: "prio": "mangle" is accepted by nftables 1.0.6
            # and silently yields a chain with no hook
            spec.update(type=chain.base.type, hook=chain.base.hook, prio=chain.base.prio,
                        policy=chain.base.policy)
        cmds.append({"add": {"chain": spec}})
    for chain in table.chains:
        cmds.extend(_rule_cmds(chain))
    return cmds


def _needs_text(chains: Any) -> bool:
    """True when a rule cannot go through libnftables' JSON input.

    The JSON parser of nftables 1.0.6 (Debian 12) rejects ``socket cgroupv2``
    ("Invalid socket key value") although the text parser and the kernel
    support it; a table with a cgroup policy is therefore written as an nft
    script, still one transaction.
    """
    return any('"cgroupv2"' in rule.expr_json for chain in chains for rule in chain.rules)


def _rule_lines(chain: NftChain) -> str:
    return "".join(
        f'add rule {NFT_FAMILY} {NFT_TABLE} {chain.name} {rule.text} comment "{rule.comment}"\n'
        for rule in chain.rules
    )


def replace_script(table: NftTable) -> str:
    """:func:`replace_commands` in nft's text syntax."""
    t = f"{NFT_FAMILY} {NFT_TABLE}"
    lines = [f"add table {t}\n", f"delete table {t}\n", f"add table {t}\n"]
    for chain in table.chains:
        spec = ""
        if chain.base:
            b = chain.base
            spec = f" {{ type {b.type} hook {b.hook} priority {b.prio}; policy {b.policy}; }}"
        lines.append(f"add chain {t} {chain.name}{spec}\n")
    lines += [_rule_lines(chain) for chain in table.chains]
    return "".join(lines)


def _error(what: str, text: str) -> KernelError:
    text = text.strip()
    if "Operation not permitted" in text or "Permission denied" in text:
        return PermissionDenied(f"{what}: permission denied (markrouted needs CAP_NET_ADMIN)")
    if "Protocol not supported" in text or "not supported" in text.lower():
        return Unsupported(f"{what}: this kernel has no usable nf_tables ({text.splitlines()[0] if text else ''})")
    first = text.splitlines()[0] if text else "failed"
    return KernelError(f"{what}: {first}")
