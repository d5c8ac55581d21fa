"""Run inside a test's network namespace: markrouted's own writes, and what they read back.

``test_rtnl_write.py`` sends a list of operations as JSON on stdin; each runs
through the product's adapters (``Netlink`` for rules and routes,
``conntrack.clear_mark``) and its result goes back as JSON on stdout:

* ``["add_rule", rule]``, ``["del_rule", rule]``, ``["del_route", route]``: the bool;
* ``["set_route", route]``: null;
* ``["rules", [start, ...]]``, ``["routes"]``: the owned objects read back (dumps);
* ``["clear", mark, mask]``: null.

A KernelError becomes ``{"error": message, "code": errno}``. The last line
also says whether anything of pyroute2 was imported on the way.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from markrouted.kernel import conntrack
from markrouted.kernel.errors import KernelError
from markrouted.kernel.netlink import Netlink
from markrouted.model import Route, Rule


def run(nlk: Netlink, op: list[Any]) -> Any:
    name, *args = op
    if name == "add_rule":
        return nlk.add_rule(Rule(**args[0]))
    if name == "del_rule":
        return nlk.del_rule(Rule(**args[0]))
    if name == "set_route":
        nlk.set_route(Route(**args[0]))
        return None
    if name == "del_route":
        return nlk.del_route(Route(**args[0]))
    if name == "rules":
        return [dataclasses.asdict(r) for r in nlk.rules(args[0])]
    if name == "routes":
        return [dataclasses.asdict(r) for r in nlk.routes()]
    if name == "clear":
        conntrack.clear_mark(args[0], args[1])
        return None
    raise ValueError(f"unknown operation {name}")


def main() -> None:
    nlk = Netlink()
    out: list[Any] = []
    try:
        for op in json.load(sys.stdin):
            try:
                out.append(run(nlk, op))
            except KernelError as exc:
                out.append({"error": str(exc), "code": exc.code})
    finally:
        nlk.close()
    json.dump({"results": out, "pyroute2": sorted(m for m in sys.modules if m.split(".")[0] == "pyroute2")},
              sys.stdout)


if __name__ == "__main__":
    main()
