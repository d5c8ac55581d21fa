"""Named address sets against the real kernel: a large set loads, an edit writes only elements.

``[sets.big]`` is read from a file of 100,000 IPv6 prefixes (2001:db8::/32 has
room for them; no two are adjacent, so none merge) and a few IPv4 ones. What
an apply writes is read from ``nft monitor`` between two markers: an edit of
ten lines of the file is exactly ten element messages, no table, chain, rule
or set message.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from .kernelhost import CONFIG, Host, Monitor

pytestmark = pytest.mark.kernel

BIG = 100_000


def _prefix(i: int) -> str:
    """The i-th /64 of the file: every other one, so no two are adjacent."""
    n = 2 * i
    return f"2001:db8:{n >> 16:x}:{n & 0xFFFF:x}::/64"


def _config(host: Host, set_file: str, extra: str = "") -> str:
    return host.write(CONFIG + f"""
[sets.big]
files = ["{set_file}"]
domains = ["video.example"]

[[policy]]
name = "big"
daddr = ["@big", "192.0.2.77"]
uplinks = ["wan2"]
{extra}""")


def _write_set(host: Host, lines: list[str]) -> str:
    path = os.path.join(host.confdir, "big.txt")
    with open(path + ".tmp", "w") as f:
        f.write("# test prefixes\n" + "\n".join(lines) + "\n")
    os.chmod(path + ".tmp", 0o644)
    os.replace(path + ".tmp", path)
    return path


def _elements(host: Host, name: str) -> list[Any]:
    data = json.loads(host.sh("nft", "-j", "list", "set", "inet", "markrouted", name))
    for item in data["nftables"]:
        if "set" in item:
            return list(item["set"].get("elem", []))
    raise AssertionError(f"set {name} not listed")


def _lines() -> list[str]:
    return [_prefix(i) for i in range(BIG)] + ["198.18.0.0/24", "198.18.2.0/24", "203.0.113.128/25"]


def test_a_set_of_100000_prefixes_loads_and_is_in_sync(host: Host) -> None:
    config = _config(host, _write_set(host, _lines()))
    host.apply(config)
    assert len(_elements(host, "big_v6")) == BIG
    assert len(_elements(host, "big_v4")) == 3
    # in sync: a second plan writes nothing, whatever the set's size
    proc = host.mr("plan", config=config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = host.sh("nft", "list", "chain", "inet", "markrouted", "output")
    assert "ip6 daddr @big_v6" in rules and "ip daddr @big_dns_v4" in rules and "ip daddr 192.0.2.77" in rules


def _handles(host: Host) -> list[str]:
    """The table, its chains, rules and sets with their handles.

    A replace re-creates the table: its handle comes from a per-namespace
    counter and changes (those of its objects count from 1 again and may not).
    """
    out = host.sh("nft", "-a", "-j", "list", "table", "inet", "markrouted")
    items = json.loads(out)["nftables"]
    return sorted(f"{k} {v.get('name', v.get('chain', ''))} {v['handle']}"
                  for item in items for k, v in item.items() if k in ("table", "chain", "rule", "set"))


def _edit(lines: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Five prefixes removed, five new ones added (odd /64s: never adjacent to the others)."""
    removed = lines[10:15]
    added = [f"2001:db8:ffff:{2 * i + 1:x}::/64" for i in range(5)]
    return [line for line in lines if line not in removed] + added, removed, added


def test_an_edit_of_ten_lines_changes_exactly_ten_elements(host: Host) -> None:
    """Read from nft monitor; 20,000 prefixes, as nft monitor itself starts slowly with 100,000."""
    lines = _lines()[BIG - 20_000:]
    path = _write_set(host, lines)
    config = _config(host, path)
    host.apply(config)
    monitor = Monitor(host)  # subscribed after the load, not to print its elements first
    try:
        edited, removed, added = _edit(lines)
        _write_set(host, edited)
        events = monitor.events_during(lambda: host.apply(config))
    finally:
        monitor.close()
    assert len(events) == 10, "\n".join(events)
    assert all(" element inet markrouted big_v6 " in e for e in events), "\n".join(events)
    assert sum(e.startswith("nft: delete element") for e in events) == 5
    assert sum(e.startswith("nft: add element") for e in events) == 5
    for prefix in removed:
        assert any(f"{{ {prefix} }}" in e and "delete" in e for e in events), (prefix, events)
    for prefix in added:
        assert any(f"{{ {prefix} }}" in e and "add" in e for e in events), (prefix, events)
    assert host.mr("plan", config=config).returncode == 0


def test_an_edit_of_a_100000_prefix_set_is_one_element_transaction(host: Host) -> None:
    lines = _lines()
    path = _write_set(host, lines)
    config = _config(host, path)
    host.apply(config)
    handles = _handles(host)
    edited, removed, added = _edit(lines)
    _write_set(host, edited)
    host.apply(config)
    assert _handles(host) == handles, "a chain, rule or set was re-created: the table was replaced"
    values = {e if isinstance(e, str) else f"{e['prefix']['addr']}/{e['prefix']['len']}"
              for e in _elements(host, "big_v6")}
    assert len(values) == BIG
    assert not values & set(removed) and set(added) <= values


def test_a_replace_keeps_the_elements_dnsmasq_added(host: Host) -> None:
    path = _write_set(host, ["198.18.0.0/24"])
    config = _config(host, path)
    host.apply(config)
    # what dnsmasq does on an answer for video.example
    host.sh("nft", "add", "element", "inet", "markrouted", "big_dns_v4", "{ 198.18.1.9 }")
    host.sh("nft", "add", "element", "inet", "markrouted", "big_dns_v6", "{ 2001:db8:9::9 }")
    # a structural change (a new policy) replaces the table
    changed = _config(host, path, extra='\n[[policy]]\nname = "more"\ndport = [8443]\nuplinks = ["wan1"]\n')
    host.apply(changed)
    assert host.sh("nft", "list", "chain", "inet", "markrouted", "output").count("policy more") == 1
    v4 = _elements(host, "big_dns_v4")
    v6 = _elements(host, "big_dns_v6")
    assert [e["elem"]["val"] for e in v4] == ["198.18.1.9"], v4
    assert [e["elem"]["val"] for e in v6] == ["2001:db8:9::9"], v6
    assert all(0 < e["elem"]["expires"] <= 3600 for e in v4 + v6)
    # and a set-elements update of the static set leaves them alone too
    _write_set(host, ["198.18.0.0/24", "198.18.2.0/24"])
    host.apply(changed)
    assert [e["elem"]["val"] for e in _elements(host, "big_dns_v4")] == ["198.18.1.9"]


def test_a_bad_set_file_changes_nothing(host: Host) -> None:
    path = _write_set(host, ["198.18.0.0/24"])
    config = _config(host, path)
    host.apply(config)
    before = host.sh("nft", "list", "table", "inet", "markrouted")
    _write_set(host, ["198.18.0.0/24", "not-an-address", "198.18.3.1/24"])
    proc = host.mr("apply", config=config)
    assert proc.returncode == 1
    assert f"{path}:3: \"not-an-address\" is not an IP address or CIDR" in proc.stderr, proc.stderr
    assert f"{path}:4: \"198.18.3.1/24\" has host bits set" in proc.stderr, proc.stderr
    assert host.sh("nft", "list", "table", "inet", "markrouted") == before


def test_a_replace_keeps_the_sticky_sources_the_packets_taught(host: Host) -> None:
    """The sticky-source sets are dynamic sets of the table like dnsmasq's: a structural
    change replaces the table, and the addresses learnt by the packet path stay."""
    sticky = '\n[[policy]]\nname = "shop"\ndport = [4443]\nuplinks = [{ wan1 = 1, wan2 = 1 }]\nsticky = "source"\n'
    path = _write_set(host, ["198.18.0.0/24"])
    host.apply(_config(host, path, extra=sticky))
    names = [n for n in host.sh("nft", "list", "sets", "table", "inet", "markrouted").split()
             if n.startswith("sticky_")]
    v4 = next(n for n in names if n.endswith("_wan1_4"))
    assert "flags dynamic,timeout" in host.sh("nft", "list", "set", "inet", "markrouted", v4)
    host.sh("nft", "add", "element", "inet", "markrouted", v4, "{ 192.0.2.99 }")  # as `update @set` would
    changed = _config(host, path, extra=sticky + '\n[[policy]]\nname = "more"\ndport = [8443]\nuplinks = ["wan1"]\n')
    host.apply(changed)
    assert host.sh("nft", "list", "chain", "inet", "markrouted", "output").count("policy more") == 1
    kept = _elements(host, v4)
    assert [e["elem"]["val"] for e in kept] == ["192.0.2.99"], kept
    assert all(0 < e["elem"]["expires"] <= 600 for e in kept)  # sticky_timeout's default, 10m
    assert host.mr("plan", config=changed).returncode == 0  # and in sync: the set's shape reads back equal
