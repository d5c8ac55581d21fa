"""An in-memory kernel for the pure-core tests: ``KernelAPI`` without netlink or nftables.

It keeps what the real kernel would keep and answers the way the real adapters
do, so reconcile can be tested for what matters without root: which writes it
makes, in which order, and that a second pass in a converged state makes none.

Semantics copied from the kernel (and from ``netlink``/``nft`` on top of it):

* rules: ``rules`` holds the rules carrying markrouted's proto tag,
  ``foreign_rules`` everyone else's (the kernel keeps an untagged twin of a
  tagged rule apart, and a tagged delete never removes it). Adding a tagged
  rule that is there is EEXIST, reported as ``False``; deleting a missing one
  is ENOENT, also ``False``. ``actual`` returns the tagged rules inside the
  ranges of the rule_priority values asked for AND of those the nft table
  records (its ``RANGE_CHAIN`` chains), exactly like the real adapter.
* routes: ``set_route`` is ``ip route replace``, one route per ``Route.key``;
  a route over a link that is missing or administratively down is refused
  (ENODEV; ENETUNREACH for a gateway that is not onlink, else ENETDOWN), as
  the kernel does. ``actual`` returns the tagged
  routes outside the reserved tables; ``foreign_routes`` are never touched.
* nftables: the table is stored as the ``NftTable`` it was last made; a
  replace installs the desired table whole, a refill swaps the rules of the
  named chains (which must exist, and must be raw-refillable, as the raw
  batch requires), a remove deletes it whether or not it exists.
* sysctls and cgroups: ``observe`` reports only those ``Needs`` names, as
  the real adapter reads only those; written sysctls are read back.

The scenarios of ``tests/conformance.py`` run against this fake and against
the real ``Kernel`` in a network namespace, so the two answer alike. It
deliberately imports neither pyroute2 nor nftables. It lives with the tests:
it is a test double, not part of the installed package.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from markrouted.kernel import KernelAPI
from markrouted.kernel.errors import KernelError
from markrouted.model import (
    RESERVED_TABLES,
    RTN_UNICAST,
    Actual,
    Link,
    Needs,
    NftChain,
    NftTable,
    NftUpdate,
    Observed,
    Route,
    Rule,
    in_ranges,
    recorded_ranges,
)

#: One write as the log records it: (operation, the object written).
Write = tuple[str, object]


@dataclass
class Fault:
    """A failure to inject: the next ``times`` writes of ``op`` matching ``when`` raise ``error``."""

    op: str
    error: KernelError
    when: Callable[[object], bool] | None = None
    times: int = 1


class FakeKernel:
    """In-memory ``KernelAPI``.

    ``observed`` is a plain attribute: a test changes links, addresses or
    default routes by assigning a new ``Observed``. Sysctls are the exception:
    they are state the fake owns (``sysctls``), seeded from the first
    ``Observed``, because markrouted writes them and must read its writes back.

    ``writes`` logs every write call in order, including those the kernel
    answers with "already there" (a converged pass must make none at all).
    """

    def __init__(self, observed: Observed | None = None) -> None:
        self.observed = observed if observed is not None else Observed()
        self.sysctls: dict[str, str] = dict(self.observed.sysctls)
        self.rules: set[Rule] = set()
        self.routes: dict[tuple[int, int, str, int], Route] = {}
        self.nft: NftTable | None = None
        self.foreign_rules: set[Rule] = set()
        self.foreign_routes: set[Route] = set()
        #: other nftables tables, "family name" -> anything; never touched
        self.foreign_nft: dict[str, object] = {}
        self.writes: list[Write] = []
        self.faults: list[Fault] = []
        #: (mark, mask) of every conntrack clear, in order
        self.conntrack_cleared: list[tuple[int, ...]] = []
        self.closed = False

    # ------------------------------------------------------------ test helpers

    def fail(self, op: str, error: KernelError | None = None,
             when: Callable[[object], bool] | None = None, times: int = 1) -> None:
        """Make the next ``times`` writes of ``op`` (matching ``when``) raise ``error``."""
        self.faults.append(Fault(op, error or KernelError(f"{op}: injected failure", errno.EIO), when, times))

    def set_link(self, name: str, *, up: bool | None = None, carrier: bool | None = None) -> None:
        """Change a link as ``ip link set`` or a cable would.

        Admin down flushes the IPv4 routes over that link in every table
        without telling anyone; carrier loss keeps them.
        """
        links = []
        for link in self.observed.links:
            if link.name == name:
                new = Link(link.index, link.name,
                           link.up if up is None else up,
                           link.carrier if carrier is None else carrier)
                if link.up and not new.up:
                    self.routes = {k: r for k, r in self.routes.items() if r.oif != link.index}
                    self.foreign_routes = {r for r in self.foreign_routes if r.oif != link.index}
                link = new
            links.append(link)
        self.observed = dataclasses.replace(self.observed, links=tuple(links))

    def clear_writes(self) -> list[Write]:
        """The write log so far, emptied (to look at one pass at a time)."""
        done, self.writes = self.writes, []
        return done

    def ops(self) -> list[str]:
        """The operations of the write log, in order."""
        return [op for op, _ in self.writes]

    def text(self) -> str:
        """Everything the fake holds, as ip and nft would list it (for failing asserts)."""
        lines = [f"sysctl {p.replace('/', '.')}={v}" for p, v in sorted(self.sysctls.items())]
        lines += [str(r) for r in sorted(self.rules)]
        lines += [str(r) for r in sorted(self.routes.values())]
        if self.nft is not None:
            lines += self.nft.text().splitlines()
        return "\n".join(lines)

    # ------------------------------------------------------------ KernelAPI

    def observe(self, needs: Needs) -> Observed:
        return dataclasses.replace(
            self.observed,
            sysctls={p: self.sysctls[p] for p in needs.sysctls if p in self.sysctls},
            cgroup_ids={p: i for p, i in self.observed.cgroup_ids.items() if p in needs.cgroups},
        )

    def actual(self, rule_priorities: Iterable[int]) -> Actual:
        starts = {*rule_priorities, *recorded_ranges(self.nft)}
        return Actual(
            rules=frozenset(r for r in self.rules if in_ranges(r.priority, starts)),
            routes=frozenset(r for r in self.routes.values() if r.table not in RESERVED_TABLES),
            nft=self.nft,
        )

    def write_sysctl(self, path: str, value: str) -> None:
        self._write("write_sysctl", (path, value))
        if path not in self.sysctls:
            raise KernelError(f"sysctl {path.replace('/', '.')}: No such file or directory", errno.ENOENT)
        self.sysctls[path] = value

    def set_route(self, route: Route) -> None:
        self._write("set_route", route)
        if route.type == RTN_UNICAST and route.oif:
            link = next((ln for ln in self.observed.links if ln.index == route.oif), None)
            if link is None:
                raise KernelError(f"{route}: No such device", errno.ENODEV)
            if not link.up and route.gateway and not route.onlink:
                # the gateway is looked up over the link's connected route, flushed at admin down
                raise KernelError(f"{route}: Network is unreachable", errno.ENETUNREACH)
            if not link.up:
                raise KernelError(f"{route}: Network is down", errno.ENETDOWN)
        self.routes[route.key] = route

    def del_route(self, route: Route) -> bool:
        self._write("del_route", route)
        if self.routes.get(route.key) != route:
            return False
        del self.routes[route.key]
        return True

    def add_rule(self, rule: Rule) -> bool:
        self._write("add_rule", rule)
        if rule in self.rules:
            return False
        self.rules.add(rule)
        return True

    def del_rule(self, rule: Rule) -> bool:
        self._write("del_rule", rule)
        if rule not in self.rules:
            return False
        self.rules.remove(rule)
        return True

    def nft_apply(self, update: NftUpdate, desired: NftTable | None) -> None:
        if update.empty:
            return
        self._write("nft_apply", update)
        if update.remove or desired is None:
            self.nft = None
            return
        if update.replace:
            self.nft = desired
            return
        if self.nft is None:
            raise KernelError("refill chains: No such file or directory (no table)", errno.ENOENT)
        sets = self.nft.sets
        for change in update.elements:
            old = self.nft.set(change.name)
            if old is None or not set(change.delete) <= set(old.elements):
                raise KernelError(f"set elements {change.name}: No such file or directory", errno.ENOENT)
            kept = set(old.elements) - set(change.delete) | set(change.add)
            sets = tuple(dataclasses.replace(s, elements=tuple(sorted(kept))) if s.name == change.name else s
                         for s in sets)
        have = {c.name: c for c in self.nft.chains}
        for name in update.chains:
            want = desired.chain(name)
            if want is not None and not want.raw_refillable:
                raise ValueError(f"chain {name}: a rule outside the raw vocabulary")
            if name not in have:
                raise KernelError(f"refill chains {name}: No such file or directory", errno.ENOENT)
        chains: list[NftChain] = []
        for chain in self.nft.chains:
            want = desired.chain(chain.name) if chain.name in update.chains else None
            chains.append(dataclasses.replace(chain, rules=want.rules) if want else chain)
        self.nft = NftTable(tuple(chains), sets)

    def clear_conntrack(self, mark: int, mask: int, label: int | None = None) -> None:
        self._write("clear_conntrack", (mark, mask) if label is None else (mark, mask, label))
        self.conntrack_cleared.append((mark, mask) if label is None else (mark, mask, label))

    def close(self) -> None:
        self.closed = True

    # ------------------------------------------------------------ internals

    def _write(self, op: str, obj: object) -> None:
        """Log one write, then raise an injected fault if one applies."""
        self.writes.append((op, obj))
        for fault in self.faults:
            if fault.op == op and fault.times > 0 and (fault.when is None or fault.when(obj)):
                fault.times -= 1
                raise fault.error


#: mypy checks that the fake implements every method of ``KernelAPI``.
_: KernelAPI = FakeKernel()
