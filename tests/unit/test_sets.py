"""Named address sets: set files, merging, the config's errors, the rules, the element diff, explain."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from markrouted import sets
from markrouted.config import Config, ConfigError, from_dict, load
from markrouted.derive import derive_nft, static_chains
from markrouted.diff import diff_elements, diff_nft
from markrouted.explain import Packet, classify
from markrouted.model import NftSet, NftTable, NftUpdate, Plan, SetElements, interval_text

UPLINKS = {"isp1": {"interface": "eth0", "table": 101, "mark": 1},
           "isp2": {"interface": "eth1", "table": 102, "mark": 2}}


def _ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def config(set_body: dict[str, object], daddr: list[str] | None = None, files: dict[str, str] | None = None,
           **policy: object) -> Config:
    def read(path: str) -> str:
        if files is None or path not in files:
            raise ValueError("No such file or directory")
        return files[path]

    data = {"uplinks": UPLINKS, "sets": {"video": set_body},
            "policy": [{"name": "v", "daddr": daddr or ["@video"], "uplinks": ["isp2"], **policy}]}
    return from_dict(data, read)


def errors(*args: object, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(*args, **kwargs)  # type: ignore[arg-type]
    return list(info.value.errors)


# ------------------------------------------------------------------ parsing and merging


@pytest.mark.parametrize("text, want", [
    ("192.0.2.0/24", (4, (_ip("192.0.2.0"), _ip("192.0.2.255")))),
    ("192.0.2.7", (4, (_ip("192.0.2.7"), _ip("192.0.2.7")))),
    ("2001:db8::/32", (6, (_ip("2001:db8::"), _ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")))),
    ("0.0.0.0/0", (4, (0, 2**32 - 1))),
    ("192.0.2.1/24", "has host bits set"),
    ("192.0.2.0/33", "is not an IP address or CIDR"),
    ("192.0.2.0/+8", "is not an IP address or CIDR"),
    ("example.com", "is not an IP address or CIDR"),
    ("fe80::1%eth0", "is not an IP address or CIDR"),
])
def test_parse_entry(text: str, want: object) -> None:
    assert sets.parse_entry(text) == want


def test_parse_lines_comments_blanks_and_bad_lines() -> None:
    got, bad, nbad, entries = sets.parse_lines("# head\n\n192.0.2.0/25  # note\n  198.51.100.1\nnope\n2001:db8::/48\n")
    assert entries == 4 and nbad == 1
    assert bad == [(5, "nope", "is not an IP address or CIDR")]
    assert len(got[4]) == 2 and len(got[6]) == 1


def test_parse_lines_lists_a_bounded_number_of_bad_lines() -> None:
    _got, bad, nbad, _entries = sets.parse_lines("x\n" * 1000)
    assert nbad == 1000 and len(bad) == sets.MAX_LISTED


def test_merge_joins_overlapping_and_adjacent_prefixes() -> None:
    parsed = [sets.parse_entry(t) for t in ("192.0.2.0/25", "192.0.2.128/25", "192.0.2.5", "198.51.100.0/24",
                                               "198.51.100.64/26")]
    merged = sets.merge(p[1] for p in parsed if not isinstance(p, str))
    assert [interval_text(lo, hi, 4) for lo, hi in merged] == ["192.0.2.0/24", "198.51.100.0/24"]
    assert sets.contains(merged, _ip("198.51.100.77")) and not sets.contains(merged, _ip("198.51.101.0"))


def test_interval_text_ranges_that_are_not_prefixes() -> None:
    assert interval_text(_ip("192.0.2.1"), _ip("192.0.2.2"), 4) == "192.0.2.1-192.0.2.2"
    assert interval_text(_ip("2001:db8::"), _ip("2001:db8::ff"), 6) == "2001:db8::/120"


@pytest.mark.parametrize("name, ok", [("video.example", True), ("Video.Example.", True), ("a-b.c", True),
                                      ("-a.example", False), ("a..b", False), ("a b", False),
                                      ("x" * 64 + ".example", False), ("", False), ("*.example", False)])
def test_domain_names(name: str, ok: bool) -> None:
    assert (sets.domain_problem(name) is None) == ok


# ------------------------------------------------------------------ the config


def test_a_set_from_elements_files_and_domains() -> None:
    cfg = config({"elements": ["192.0.2.0/25", "2001:db8::/32"], "files": ["/f"], "domains": ["Video.Example."]},
                 files={"/f": "192.0.2.128/25\n"})
    (item,) = cfg.sets
    assert [interval_text(lo, hi, 4) for lo, hi in item.v4] == ["192.0.2.0/24"]
    assert item.domains == ("video.example",) and item.entries == 3
    assert cfg.policies[0].daddr_sets[0].name == "video"


def test_unknown_set() -> None:
    assert errors({"elements": ["192.0.2.0/24"]}, daddr=["@video", "@nope"]) == [
        'policy[0] (v).daddr[1]: unknown set "@nope" (sets: video)']


def test_a_set_used_with_the_wrong_family() -> None:
    assert errors({"elements": ["192.0.2.0/24"]}, family="ipv6") == [
        "policy[0] (v): family is ipv6 but daddr has only IPv4 networks and sets"]


def test_a_set_and_literals_of_both_families_split_the_policy() -> None:
    cfg = config({"elements": ["192.0.2.0/24"]}, daddr=["@video", "2001:db8::1"])
    assert len(cfg.policies[0].families) == 2


def test_malformed_file_lines_are_reported_with_file_and_line() -> None:
    assert errors({"files": ["/etc/markrouted/sets.d/v.txt"]},
                  files={"/etc/markrouted/sets.d/v.txt": "192.0.2.0/24\n# c\n192.0.2.1/24\nbad\n"}) == [
        '/etc/markrouted/sets.d/v.txt:3: "192.0.2.1/24" has host bits set',
        '/etc/markrouted/sets.d/v.txt:4: "bad" is not an IP address or CIDR',
    ]


def test_a_missing_file() -> None:
    assert errors({"files": ["/nowhere"]}) == ['sets.video.files[0]: /nowhere: No such file or directory']


def test_an_invalid_domain_and_an_empty_set() -> None:
    assert errors({"domains": ["ok.example", "bad..example"]}) == [
        "sets.video.domains[1]: \"bad..example\" is not a valid domain name "
        "(letters, digits and '-' in dot-separated labels)"]
    assert errors({}) == ["sets.video: give at least one of elements, files or domains"]
    cfg = config({"files": ["/f"]}, files={"/f": "# nothing yet\n"}, family="ipv4")
    assert cfg.warnings == ("sets.video: the set is empty: it matches nothing",)


def test_bad_set_names_and_keys() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"uplinks": UPLINKS, "sets": {"1x": {"elements": []}, "ok": {"element": []}}})
    assert info.value.errors == (
        "sets.1x: \"1x\" is not a valid set name (a letter, then up to 31 letters, digits or '_')",
        "sets.ok.element: unknown key",
        "sets.ok: give at least one of elements, files or domains",
    )


def test_a_set_name_may_not_end_in_dns() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"uplinks": UPLINKS, "sets": {"video_dns": {"elements": ["192.0.2.0/24"]}}})
    assert info.value.errors == ('sets.video_dns: "video_dns": a set name may not end in _dns',)


def test_dnsmasq_element_messages_do_not_ask_for_a_pass() -> None:
    from markrouted.kernel.events import dnsmasq_elements

    assert dnsmasq_elements(12, {2: b"video_dns_v4\0"}) and dnsmasq_elements(14, {2: b"video_dns_v6\0"})
    assert not dnsmasq_elements(12, {2: b"video_v4\0"}) and not dnsmasq_elements(10, {2: b"video_dns_v4\0"})


def test_too_many_entries() -> None:
    text = "".join(f"198.18.{i >> 8 & 1}.{i & 255}\n" for i in range(512)) * (sets.MAX_ENTRIES // 512 + 1)
    assert errors({"files": ["/f"]}, files={"/f": text}) == [
        f"sets.video: more than {sets.MAX_ENTRIES} addresses and CIDRs, the most a set may have"]


def test_a_set_file_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(sets.MAX_FILE_SIZE + 1)
    toml = tmp_path / "m.toml"
    toml.write_text(f'[sets.big]\nfiles = ["{big}"]\n')
    with pytest.raises(ConfigError) as info:
        load(toml)
    assert info.value.errors == (
        f"sets.big.files[0]: {big}: larger than {sets.MAX_FILE_SIZE} bytes (32 MiB), the most a set file may have",)


def test_a_5_million_line_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    with open(path, "w") as f:
        line = "198.18.0.1\n" * 10_000
        for _ in range(500):
            f.write(line)
    assert os.path.getsize(path) > sets.MAX_FILE_SIZE
    toml = tmp_path / "m.toml"
    toml.write_text(f'[sets.big]\nfiles = ["{path}"]\n')
    with pytest.raises(ConfigError) as info:
        load(toml)
    assert "the most a set file may have" in info.value.errors[0]


# ------------------------------------------------------------------ derive


def test_rules_refer_to_the_sets_per_family() -> None:
    cfg = config({"elements": ["192.0.2.0/24"], "files": ["/f"], "domains": ["video.example"]},
                 daddr=["@video", "198.51.100.9"], files={"/f": "2001:db8::/48\n"})
    table = derive_nft(cfg, [])
    assert [(s.name, s.dynamic) for s in table.sets] == [
        ("video_v4", False), ("video_dns_v4", True), ("video_v6", False), ("video_dns_v6", True)]
    output = table.chain("output")
    assert output is not None
    texts = [re.sub(r"counter name \S+ ", "", r.text) for r in output.rules if r.comment.startswith("policy v")]
    assert texts == ["ip daddr 198.51.100.9/32 goto pick_0", "ip daddr @video_v4 goto pick_0",
                     "ip daddr @video_dns_v4 goto pick_0", "ip6 daddr @video_v6 goto pick_0",
                     "ip6 daddr @video_dns_v6 goto pick_0"]
    text = table.text()
    assert "set video_v4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\tauto-merge\n" in text
    assert "elements = { 192.0.2.0/24 }" in text
    assert "set video_dns_v4 {\n\t\ttype ipv4_addr\n\t\tflags timeout\n\t\ttimeout 3600s\n\t}" in text


def test_a_static_only_set_declares_only_its_families() -> None:
    cfg = config({"elements": ["192.0.2.0/24"]})
    assert [s.name for s in static_chains(cfg).sets] == ["video_v4"]


# ------------------------------------------------------------------ the element diff


def _table(elements: tuple[tuple[int, int], ...], dynamic: bool = False) -> NftTable:
    return NftTable((), (NftSet("video_v4", 4, elements), NftSet("video_dns_v4", 4, (), True, 3600)))


def test_diff_elements_is_exactly_the_changed_intervals() -> None:
    have = tuple((i * 4, i * 4 + 1) for i in range(100_000))
    want = have[:50_000] + have[50_005:] + tuple((i * 4 + 2, i * 4 + 2) for i in range(5))
    delete, add = diff_elements(sorted(want), have)
    assert len(delete) == 5 and len(add) == 5


def test_only_elements_differ_the_update_is_set_elements() -> None:
    update = diff_nft(_table(((1, 2), (8, 9))), _table(((1, 2), (5, 5))))
    assert update == NftUpdate(elements=(SetElements("video_v4", 4, delete=((5, 5),), add=((8, 9),)),))
    assert not update.replace and not update.empty


def test_a_changed_declaration_is_a_replace() -> None:
    want = NftTable((), (NftSet("video_v4", 4), NftSet("video_dns_v4", 4, (), True, 60)))
    assert diff_nft(want, _table(())).replace
    assert diff_nft(NftTable((), (NftSet("video_v4", 4),)), _table(())).replace


def test_dnsmasq_elements_are_never_diffed() -> None:
    have = NftTable((), (NftSet("video_v4", 4), NftSet("video_dns_v4", 4, ((7, 7),), True, 3600)))
    assert diff_nft(_table(()), have).empty


def test_plan_lines_show_elements() -> None:
    plan = Plan(nft=NftUpdate(elements=(SetElements("video_v4", 4, ((_ip("192.0.2.0"), _ip("192.0.2.255")),),
                                                    ((_ip("198.51.100.7"), _ip("198.51.100.7")),)),)))
    assert plan.lines() == ["+ nft element inet markrouted video_v4 { 198.51.100.7 }",
                            "- nft element inet markrouted video_v4 { 192.0.2.0/24 }"]


# ------------------------------------------------------------------ explain


def test_explain_matches_through_sets_and_dnsmasq_elements() -> None:
    cfg = config({"elements": ["192.0.2.0/24"], "domains": ["video.example"]})
    inside = Packet(daddr=ipaddress.ip_address("192.0.2.9"))
    outside = Packet(daddr=ipaddress.ip_address("198.51.100.9"))
    assert classify(cfg, inside) is cfg.policies[0]
    assert classify(cfg, outside) is None
    assert classify(cfg, outside, dns={"video_dns_v4": frozenset({_ip("198.51.100.9")})}) is cfg.policies[0]


# ------------------------------------------------------------------ the command line


def test_dnsmasq_config_prints_nftset_lines(tmp_path: Path) -> None:
    toml = tmp_path / "m.toml"
    toml.write_text('[sets.video]\ndomains = ["video.example", "cdn.video.example"]\n'
                    '[sets.plain]\nelements = ["192.0.2.0/24"]\n')
    proc = subprocess.run([sys.executable, "-m", "markrouted", "-c", str(toml), "dnsmasq-config"],
                          capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert lines == ["nftset=/video.example/cdn.video.example/"
                     "4#inet#markrouted#video_dns_v4,6#inet#markrouted#video_dns_v6"]


def test_status_document_has_set_sizes() -> None:
    from markrouted.model import DesiredState
    from markrouted.status import document, render, with_dnsmasq_counts

    cfg = config({"elements": ["192.0.2.0/24", "198.51.100.0/24"], "domains": ["video.example"]})
    desired = DesiredState(frozenset(), frozenset(), derive_nft(cfg, []), (), (), ())
    doc = document(desired, True)
    with_dnsmasq_counts(doc, {"video_dns_v4": 3})
    assert doc["sets"]["video_v4"] == {"family": "ipv4", "dnsmasq": False, "elements": 2}
    assert doc["sets"]["video_dns_v4"]["elements"] == 3
    assert doc["sets"]["video_dns_v6"]["elements"] is None
    json.dumps(doc)
    assert "video_dns_v4  ipv4    3" in render(doc)


TRICKY = ["192.0.2.0/24", "192.0.2.1/24", "192.0.2.0/033", "192.0.2.0/32", "192.0.2.0/0", "0.0.0.0/0",
          "192.0.2.256", "2001:db8::/32", "2001:db8::1/32", "2001:db8::/129", "::/0", "::", "fe80::1%lo",
          "192.0.2.0/", "/24", "192.0.2.0/24/1", "1.2.3", "2001:db8::/-1", "192.0.2.0/ 24", "::ffff:192.0.2.1",
          "192.0.2.0/²"]


@pytest.mark.parametrize("entry", TRICKY)
def test_a_file_line_parses_as_the_same_entry_alone(entry: str) -> None:
    """parse_lines' inline fast path agrees with parse_entry on every line."""
    got, bad, _nbad, _entries = sets.parse_lines(entry + "\n")
    alone = sets.parse_entry(entry)
    if isinstance(alone, str):
        assert bad == [(1, entry, alone)]
    else:
        assert got[alone[0]] == [alone[1]] and not bad


@pytest.mark.parametrize("lo, hi, version", [
    (_ip("2001:db8::"), _ip("2001:db8::ffff:ffff:ffff:ffff"), 6), (_ip("::"), _ip("::"), 6),
    (_ip("2001:db8:0:1::5"), _ip("2001:db8:0:1::9"), 6), (_ip("192.0.2.0"), _ip("192.0.2.127"), 4),
    (0, 2**128 - 1, 6), (_ip("198.51.100.3"), _ip("198.51.100.3"), 4)])
def test_the_fast_form_of_an_interval_is_the_same_interval(lo: int, hi: int, version: int) -> None:
    fast, slow = interval_text(lo, hi, version, fast=True), interval_text(lo, hi, version)

    def bounds(text: str) -> tuple[int, int]:
        if "-" in text:
            a, b = text.split("-")
            return _ip(a), _ip(b)
        net = ipaddress.ip_network(text)
        return int(net.network_address), int(net.broadcast_address)

    assert bounds(fast) == bounds(slow) == (lo, hi)
