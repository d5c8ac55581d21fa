"""kernel/nftraw.py against libnftables: the kernel must hold byte for byte the same rules.

The failover fast path writes the ``pick_N`` chains as nf_tables bytecode
assembled by hand, and drift detection reads back only rule comments, so a
wrong encoding (a verdict code, a byte order, a register, a missing
attribute) would route traffic wrongly without anything noticing. Here every
rule shape that path can write is installed three times in one network
namespace of the test's own: through libnftables' JSON, through nft's text syntax (the
form markrouted's replace sends), and through ``RawRefill``.
Then the chains are dumped over nfnetlink and each rule's attributes as the
kernel serialises them back (expressions and userdata; handles, positions and
chain names left out) must be identical; so must ``nft -j``'s decoding of them.

The raw chains are written in two batches of some five hundred chains each,
far beyond a netlink socket's default buffers (the refill must grow them, or
the kernel refuses the batch or drops its acknowledgements), and each raw
chain starts with a rule of another shape, which the refill must replace.

The shapes are (a) every ``pick`` chain form derive produces, enumerated over
failover and weighted policies of one to four uplinks, each uplink usable in
no family, IPv4, IPv6 or both, with either fallback, and weights from 1 to
the maximum; and (b) the rest of the raw vocabulary (``accept``,
``return``, numgen bounds past one and two bytes) alone and combined.

This module is also the program run inside the namespace (``write`` below):
the nftables binding and the raw socket act on the namespace of the process.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from markrouted import nftexpr as nx  # noqa: E402
from markrouted.config import Policy  # noqa: E402
from markrouted.derive import _alive_rules, _pick_rules, _rule  # noqa: E402
from markrouted.model import NftChain, NftRule  # noqa: E402

TABLE = "markrouted"
AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
WEIGHT_MAX = 1000

# ------------------------------------------------------------------ the shapes


def derived_shapes() -> dict[str, tuple[NftRule, ...]]:
    """Every distinct pick chain derive makes, over a systematic space of policies and link states.

    Keyed by the rules' text, so a new form derive learns shows up as a new case.
    """
    names = ("a", "b", "c", "d")
    policies: list[Policy] = []
    for k in range(1, 5):
        for fallback in ("main", "drop"):
            policies.append(Policy(0, "failover", uplinks=names[:k], fallback=fallback))
            for weights in {(3, 1, 2, 5)[:k], (1,) * k, (WEIGHT_MAX,) * k, (WEIGHT_MAX, 1, 999, 7)[:k]}:
                policies.append(Policy(0, "balance", balance=tuple(zip(names, weights)), fallback=fallback))
    # tiers: a balanced tier before single ones, and the sticky sources' alive_ chains
    policies.append(Policy(0, "tiers", uplinks=names, tiers=(((names[0], 3), (names[1], 1)), ((names[2], 1),),
                                                             ((names[3], 1),))))
    states = ((), (AF_INET,), (AF_INET6,), (AF_INET, AF_INET6))
    shapes: dict[str, tuple[NftRule, ...]] = {}
    for policy in policies:
        uplinks = list(policy.members)
        for usable in itertools.product(states, repeat=len(uplinks)):
            now = dict(zip(uplinks, usable))
            rules = tuple(_pick_rules(policy, now))
            shapes.setdefault(" / ".join(r.text for r in rules) or "(empty)", rules)
            for name in uplinks:
                alive = tuple(_alive_rules(policy, name, now))
                shapes.setdefault(" / ".join(r.text for r in alive) or "(empty)", alive)
    return shapes


def vocabulary_shapes() -> dict[str, tuple[NftRule, ...]]:
    """What the raw vocabulary accepts beyond derive's current use, alone and combined."""
    v4 = nx.match(nx.meta("nfproto"), nx.word("ipv4"))
    v6 = nx.match(nx.meta("nfproto"), nx.word("ipv6"))

    def ng(mod: int, below: int) -> nx.X:
        return nx.match(nx.numgen_random(mod), nx.num(below), "<")

    bodies: list[list[nx.X]] = []
    for verdict in ("accept", "drop", "return"):
        bodies += [[nx.verdict(verdict)], [v4, nx.verdict(verdict)], [v6, nx.verdict(verdict)],
                   [ng(2, 1), nx.verdict(verdict)]]
    for mod, below in ((1, 1), (255, 254), (256, 255), (257, 256), (65535, 300), (65536, 65535),
                       (70000, 65537), (1 << 24, (1 << 24) - 1), (0x7FFFFFFF, 0x01020304), (0xFFFFFFFF, 0xFFFFFFFE)):
        bodies.append([ng(mod, below), nx.goto("set_b")])
    bodies.append([v6, ng(3000, 2999), nx.goto("set_a")])
    bodies.append([v4, v4, nx.goto("set_a")])
    bodies.append([ng(4, 3), ng(2, 1), nx.verdict("drop")])
    return {" ".join(p.text for p in body): (_rule("raw vocabulary", body),) for body in bodies}


def all_shapes() -> dict[str, tuple[NftRule, ...]]:
    shapes = {f"derive: {k}": v for k, v in derived_shapes().items()}
    shapes.update({f"vocabulary: {k}": v for k, v in vocabulary_shapes().items()})
    # several rules of mixed forms in one chain
    mixed = [r for rules in list(shapes.values())[:40] for r in rules][:12]
    shapes["mixed: twelve rules of different forms"] = tuple(mixed)
    return shapes


# ------------------------------------------------------------------ inside the namespace

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETRULE = 7
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_POSITION = 1, 2, 3, 6
#: what differs between two copies of the same rule in two chains
IDENTITY = {NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_POSITION}


def dump_rules(table: str) -> dict[str, list[dict[str, str]]]:
    """Every rule of ``inet table`` as the kernel serialises it: chain -> [{attribute type: hex}].

    Decoded here with the standard library alone, so the check does not rest
    on the product's own netlink code.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.settimeout(10)
    sock.bind((0, 0))
    name = table.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(name), NFTA_RULE_TABLE) + name + b"\0" * (-len(name) % 4)
    body = struct.pack("=BBH", 1, 0, 0) + attr  # NFPROTO_INET
    sock.send(struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
                          NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
    chains: dict[str, list[dict[str, str]]] = {}
    while True:
        data = sock.recv(1 << 20)
        offset = 0
        while offset + 16 <= len(data):
            length, mtype, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
            if mtype == NLMSG_DONE:
                sock.close()
                return chains
            if mtype == NLMSG_ERROR:
                raise OSError(-struct.unpack_from("=i", data, offset + 16)[0], "rule dump failed")
            attrs: dict[int, bytes] = {}
            pos = offset + 20
            while pos + 4 <= offset + length:
                alen, atype = struct.unpack_from("=HH", data, pos)
                attrs[atype & 0x3FFF] = data[pos + 4 : pos + alen]
                pos += (alen + 3) & ~3
            chain = attrs[NFTA_RULE_CHAIN].split(b"\0")[0].decode()
            chains.setdefault(chain, []).append(
                {str(t): v.hex() for t, v in sorted(attrs.items()) if t not in IDENTITY})
            offset += (length + 3) & ~3


def write(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Install every case three ways (libnftables JSON, nft text, RawRefill); the kernel's dump."""
    import nftables

    from markrouted.kernel.nftraw import RawRefill

    nft = nftables.Nftables()
    nft.set_json_output(True)

    def run_json(cmds: list[dict[str, Any]]) -> None:
        rc, _out, err = nft.json_cmd({"nftables": cmds})
        assert rc == 0, err

    table = {"family": "inet", "name": TABLE}
    targets = sorted({f"set_{n}" for n in "abcd"})
    cmds: list[dict[str, Any]] = [{"add": {"table": table}}]
    for name in targets:
        cmds.append({"add": {"chain": {"family": "inet", "table": TABLE, "name": name}}})
    for i, _case in enumerate(cases):
        for kind in ("json", "text", "raw"):
            cmds.append({"add": {"chain": {"family": "inet", "table": TABLE, "name": f"{kind}_{i}"}}})
    run_json(cmds)

    chains = [NftChain(f"raw_{i}", None, tuple(NftRule(r["expr_json"], r["text"], r["comment"]) for r in c["rules"]))
              for i, c in enumerate(cases)]
    # a refill replaces what a chain held: start the raw chains with a rule of another shape
    run_json([{"add": {"rule": {"family": "inet", "table": TABLE, "chain": c.name,
                                "expr": [{"counter": None}, {"accept": None}]}}} for c in chains])
    # through libnftables' JSON input: flush chain, then add rule with expr and comment
    cmds = []
    for i, case in enumerate(cases):
        cmds.append({"flush": {"chain": {"family": "inet", "table": TABLE, "name": f"json_{i}"}}})
        cmds += [{"add": {"rule": {"family": "inet", "table": TABLE, "chain": f"json_{i}",
                                   "expr": json.loads(r["expr_json"]), "comment": r["comment"]}}}
                 for r in case["rules"]]
    run_json(cmds)
    script = "".join(f'add rule inet {TABLE} text_{i} {r["text"]} comment "{r["comment"]}"\n'
                     for i, case in enumerate(cases) for r in case["rules"])
    if script:
        rc, _out, err = nft.cmd(script)
        assert rc == 0, err
    raw = RawRefill()
    try:
        assert all(c.raw_refillable for c in chains), "a case is outside the raw vocabulary"
        raw.refill(chains[: len(chains) // 2], table=TABLE)  # several chains in one batch
        raw.refill(chains[len(chains) // 2 :], table=TABLE)
    finally:
        raw.close()
    return dump_rules(TABLE)


if __name__ == "__main__":
    json.dump(write(json.load(sys.stdin)), sys.stdout)
    sys.exit(0)

# ------------------------------------------------------------------ the tests

import pytest  # noqa: E402

from conftest import PYTHON, NetNS, need_root  # noqa: E402  the suite's root conftest


pytestmark = pytest.mark.kernel

SHAPES = all_shapes()
CASES = list(SHAPES)
GROUPS = ("derive", "vocabulary", "mixed")


@pytest.fixture(scope="module")
def installed() -> Iterator[dict[str, dict[str, Any]]]:
    """One namespace holding every case three ways; per chain, the kernel's view of its rules.

    Three views of each chain: the attributes of the kernel's rule dump, the
    bytecode as ``nft --debug=netlink`` prints it, and ``nft -j``'s decoding.
    """
    need_root()
    ns = NetNS()
    try:
        payload = [{"rules": [{"expr_json": r.expr_json, "text": r.text, "comment": r.comment}
                              for r in SHAPES[case]]} for case in CASES]
        proc = subprocess.run([*ns.nsenter(), PYTHON, os.path.abspath(__file__)], input=json.dumps(payload),
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 0, proc.stderr
        yield {"dump": json.loads(proc.stdout),
               "bytecode": netlink_listing(ns.sh("nft", "--debug=netlink", "list", "table", "inet", TABLE)),
               "json": json_listing(json.loads(ns.sh("nft", "-j", "list", "table", "inet", TABLE)))}
    finally:
        ns.delete()


def netlink_listing(out: str) -> dict[str, list[str]]:
    """``nft --debug=netlink`` output: chain -> its rules' bytecode lines, handles left out."""
    chains: dict[str, list[str]] = {}
    lines: list[str] | None = None
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 4 and words[:2] == ["inet", TABLE] and words[3].isdigit():
            lines = chains.setdefault(words[2], [])
            lines.append("rule")
        elif lines is not None and (line.startswith("  [") or line.strip().startswith("userdata")):
            lines.append(line.strip())
        elif not line.strip():
            lines = None
    return chains


def json_listing(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """``nft -j`` output: chain -> its rules as nft decodes them, handles and chain names left out."""
    chains: dict[str, list[dict[str, Any]]] = {}
    for item in data["nftables"]:
        if "rule" in item:
            rule = item["rule"]
            chains.setdefault(rule["chain"], []).append(
                {k: v for k, v in rule.items() if k not in ("handle", "chain")})
    return chains


def test_derive_covers_every_cascade_form() -> None:
    """The enumeration reaches every form: failover, weighted cascades of 2-4 steps, per family, drop."""
    texts = "\n".join(SHAPES)
    assert "derive: (empty)" in SHAPES  # fallback main with nothing usable
    assert "derive: drop" in SHAPES
    assert "derive: meta nfproto ipv4 goto set_a / meta nfproto ipv6 drop" in SHAPES
    assert ("derive: numgen random mod 3000 < 1000 goto set_a / numgen random mod 2000 < 1000 goto set_b / "
            "goto set_c") in SHAPES
    assert ("numgen random mod 11 < 3 goto set_a / numgen random mod 8 < 1 goto set_b / "
            "numgen random mod 7 < 2 goto set_c / goto set_d") in texts
    assert "meta nfproto ipv6 numgen random mod 3 < 1 goto set_b / meta nfproto ipv6 goto set_c" in texts
    assert sum(case.startswith("derive: ") for case in CASES) > 500


def test_every_pick_chain_derive_makes_takes_the_raw_path() -> None:
    """Otherwise a failover silently falls back to libnftables and this module proves nothing about it."""
    outside = [case for case in CASES if not NftChain("pick_0", None, SHAPES[case]).raw_refillable]
    assert outside == []


@pytest.mark.parametrize("group", GROUPS)
def test_raw_rules_are_what_libnftables_writes(installed: dict[str, dict[str, Any]], group: str) -> None:
    """Per case: the raw chain's rules equal the libnftables chain's, in all three views."""
    cases = [(i, case) for i, case in enumerate(CASES) if case.startswith(f"{group}: ")]
    assert cases
    wrong: list[str] = []
    for i, case in cases:
        expected = len(SHAPES[case])
        views = {kind: {view: installed[view].get(f"{kind}_{i}", []) for view in ("dump", "bytecode", "json")}
                 for kind in ("raw", "json", "text")}
        assert len(views["json"]["dump"]) == len(views["text"]["dump"]) == expected, f"{case}: not installed"
        assert views["text"] == views["json"], f"{case}: nft's text and JSON syntax disagree (a wrong case)"
        if len(views["raw"]["dump"]) != expected:
            wrong.append(f"{case}: the raw refill left {len(views['raw']['dump'])} rules, {expected} wanted")
        elif views["raw"] != views["json"]:
            wrong.append(f"{case}:\n  raw:  " + "\n        ".join(views["raw"]["bytecode"])
                         + "\n  json: " + "\n        ".join(views["json"]["bytecode"])
                         + f"\n  raw attributes:  {views['raw']['dump']}\n  json attributes: {views['json']['dump']}")
    assert not wrong, f"{len(wrong)} of {len(cases)} cases differ; the first:\n" + "\n".join(wrong[:3])
