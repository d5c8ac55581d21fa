"""What ``journalctl -u markrouted`` says: each line's text, priority and catalog id.

The journal shows the MESSAGE only, so each one is pinned here as the
administrator reads it. The daemon runs in-process against the fake kernel
(the harness of test_daemon_loop) and the recorded events are rendered with
``markrouted.log.message``, as the journal renderer does; the renderer's own
choices (priority and MESSAGE_ID by event name) are checked on it directly,
and the catalog the package installs is checked against the ids.
"""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any

import pytest
import structlog
from test_daemon_loop import SSH, WEB, Harness, config_text, drive
from test_events import NFT_MSG_DELTABLE, nft, transaction

from markrouted.daemon.reporter import drift_repairs, moved_line, summary_line
from markrouted.derive import derive
from markrouted.kernel.events import NftWatch
from markrouted.log import MESSAGE_IDS, JournalRenderer, message, priority, setup
from markrouted.model import AF_INET, AF_INET6, NftUpdate, Plan, Rule

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "packaging" / "catalog" / "markrouted.catalog"
V4, V6 = AF_INET, AF_INET6
BAD_MARK = 'uplinks.wan2.mark: 300 does not fit in mark_mask 0x00ff0000 (max 255)'


def journal(h: Harness) -> list[tuple[int, str]]:
    """(priority, MESSAGE) of every event the journal would keep (info and above), in order."""
    return [(priority(e, level), message(e, kw)) for level, e, kw in h.log.events if level != "debug"]


def said(h: Harness, event: str) -> list[str]:
    return [message(e, kw) for level, e, kw in h.log.events if e == event and level != "debug"]


def since(h: Harness, mark: int) -> list[str]:
    return [text for _p, text in journal(h)[mark:]]


# ------------------------------------------------------------------ failover and failback


def test_failover_and_failback_say_where_from_where_to_and_why(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        mark = len(journal(h))
        h.kernel.set_link("eth1", carrier=False)
        await h.pass_for("link 3 changed")
        lines = since(h, mark)
        assert "uplink wan2 (eth1) down: no carrier" in lines
        assert "policy ssh moved from wan2 to wan1 (wan2 down: no carrier)" in lines
        assert ("conntrack entries of uplink wan2 deleted (ct mark 0x20000/0xff0000): uplink down, "
                "so its flows take another uplink") in lines
        assert not [line for line in lines if line.startswith("policy web")]  # web stays on wan1

        mark = len(journal(h))
        h.kernel.set_link("eth1", carrier=True)
        await h.pass_for("link 3 changed")
        lines = since(h, mark)
        assert "uplink wan2 (eth1) up" in lines
        assert "policy ssh moved from wan1 to wan2 (wan2 up)" in lines
        # each said once
        assert len(said(h, "policy moved")) == 2 and len(said(h, "uplink down")) == 1

    drive(tmp_path, body, config_text(policies=WEB + SSH))


def test_a_policy_with_no_usable_uplink_names_its_fallback(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.kernel.set_link("eth1", carrier=False)
        await h.pass_for("link 3 changed")
        assert said(h, "policy moved") == ["policy ssh moved from wan2 to the main table (no uplink usable) "
                                           "(wan2 down: no carrier)"]

    drive(tmp_path, body, config_text(policies=SSH.replace('"wan2", "wan1"', '"wan2"')))


@pytest.mark.parametrize("before, after, line", [
    # both families moved the same way: said once
    ({V4: ("wan2",), V6: ("wan2",)}, {V4: ("wan1",), V6: ("wan1",)},
     "policy ssh moved from wan2 to wan1 (wan2 down: no carrier)"),
    # IPv4 first (the uplink has no IPv6 default route yet), IPv6 later: each line names its family
    ({V4: ("wan1",), V6: ("wan1",)}, {V4: ("wan2",), V6: ("wan1",)},
     "policy ssh moved from wan1 to wan2 for ipv4 (wan2 down: no carrier)"),
    ({V4: ("wan2",), V6: ("wan1",)}, {V4: ("wan2",), V6: ("wan2",)},
     "policy ssh moved from wan1 to wan2 for ipv6 (wan2 down: no carrier)"),
    # both moved, differently
    ({V4: ("wan1",), V6: ("wan1",)}, {V4: ("wan2",), V6: ()},
     "policy ssh moved from wan1 to wan2 for ipv4 and from wan1 to the main table (no uplink usable) for ipv6"
     " (wan2 down: no carrier)"),
    # a balance
    ({V4: ("wan1", "wan2")}, {V4: ("wan1",)}, "policy ssh moved from wan1, wan2 to wan1 (wan2 down: no carrier)"),
])
def test_moved_line(before: dict[int, tuple[str, ...]], after: dict[int, tuple[str, ...]], line: str) -> None:
    assert moved_line("ssh", before, after, "main", "wan2 down: no carrier") == line


def test_moved_line_none_when_nothing_moved_and_drop_named() -> None:
    assert moved_line("ssh", {V4: ("wan1",)}, {V4: ("wan1",)}, "main", "x") is None
    assert moved_line("ssh", {V4: ("wan1",)}, {V4: ()}, "drop", "") == "policy ssh moved from wan1 to drop " \
                                                                       "(no uplink usable)"


def test_families_moving_apart_are_named(tmp_path: Path) -> None:
    """wan2's IPv6 default route goes and comes back: only ssh's IPv6 flows move, and the line says so."""
    async def body(h: Harness) -> None:
        full = h.kernel.observed
        h.kernel.observed = dataclasses.replace(full, defaults=tuple(
            d for d in full.defaults if not (d.family == V6 and d.gateway == "2001:db8:2::1")))
        await h.pass_for("route deleted")
        desired = h.daemon.reporter.desired
        assert desired is not None
        (reason,) = [u.reason for u in desired.uplinks if u.name == "wan2"]
        assert reason == "ipv4 only: no ipv6 default route on eth1 in the main table"
        assert said(h, "policy moved") == [f"policy ssh moved from wan2 to wan1 for ipv6 (wan2: {reason})"]
        assert not said(h, "uplink down")  # wan2 still carries IPv4
        h.kernel.observed = full
        await h.pass_for("route added")
        assert said(h, "policy moved")[1:] == [
            "policy ssh moved from wan1 to wan2 for ipv6 (wan2 now carries ipv4 and ipv6)"]

    drive(tmp_path, body, config_text(policies=WEB + SSH))


def test_derive_keeps_each_policys_choice_per_family() -> None:
    from test_daemon_loop import WORLD

    from markrouted.config import parse

    desired = derive(parse(config_text(policies=WEB + SSH)), WORLD)
    ssh = {p.name: p for p in desired.policies}["ssh"]
    assert dict(ssh.by_family) == {V4: ("wan2",), V6: ("wan2",)} and ssh.active == ("wan2",)


# ------------------------------------------------------------------ drift


def test_drift_names_the_object_and_what_was_done(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        rule = next(r for r in sorted(h.kernel.rules) if r.fwmask and r.table == 102 and r.family == V4)
        h.kernel.rules.discard(rule)
        await h.pass_for("rule 10100 deleted")
        assert said(h, "drift repaired") == [
            "drift repaired: ip rule 10100: from all fwmark 0x20000/0xff0000 lookup 102 proto markrouted"
            " was deleted by someone else; put back"]
        h.kernel.nft = None  # `nft delete table inet markrouted` by pid 4242
        await h.pass_for("table inet markrouted changed by pid 4242 (nft)")
        assert said(h, "drift repaired")[1] == "drift repaired: nft table inet markrouted changed by pid 4242 (nft):" \
                                               " replaced"

    drive(tmp_path, body)


def test_a_large_drift_is_one_line_naming_a_few(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.kernel.rules.clear()  # `ip rule flush`
        await h.pass_for("rules deleted")
        (line,) = said(h, "drift repaired")
        assert line.startswith("drift repaired: ip rule 10000: from all lookup main suppress_prefixlength 0 "
                               "proto markrouted was deleted by someone else; put back; ")
        assert line.endswith("; and 7 more (10 kernel writes)") and line.count("put back") == 3

    drive(tmp_path, body)


def test_drift_repairs_of_every_kind() -> None:
    rule = Rule(V4, 10100, 101, 0x10000, 0xFF0000)
    plan = Plan(rules_remove=(rule,), nft=NftUpdate(chains=("pick_0",)))
    assert drift_repairs(plan, "resync") == [
        "ip rule 10100: from all fwmark 0x10000/0xff0000 lookup 101 proto markrouted was added by someone else"
        " with markrouted's tag; removed",
        "nft chains pick_0 of table inet markrouted changed by someone else: refilled"]


def test_the_nft_source_names_the_process() -> None:
    """The name comes with the transaction: the process is often gone when the pass runs."""
    (event,) = NftWatch(own_pid=1000).feed(transaction(4242, nft(NFT_MSG_DELTABLE, "markrouted")))
    assert event.text == "table inet markrouted changed by pid 4242 (nft)"


# ------------------------------------------------------------------ reloads


def test_a_refused_file_is_one_line_whatever_triggered_the_reload(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        good = config_text(policies=WEB + SSH)
        h.path.write_text(good.replace("mark = 2", "mark = 300"))
        h.daemon.reload("SIGHUP")
        h.daemon.reload("config file changed")  # the same edit, seen by inotify too
        await h.settled()
        refusal = f"config reload refused (the running config stays): {BAD_MARK}"
        assert said(h, "config reload refused") == [refusal]
        assert [kw["trigger"] for kw in h.log.named("config reload refused again")] == ["config file changed"]
        # another content is news, even with the same error
        h.path.write_text(good.replace("mark = 2", "mark = 300") + "\n# still wrong\n")
        h.daemon.reload("config file changed")
        await h.settled()
        assert said(h, "config reload refused") == [refusal, refusal]
        # after a good reload, the old mistake made again is news again
        h.path.write_text(good)
        h.daemon.reload("SIGHUP")
        await h.settled()
        h.path.write_text(good.replace("mark = 2", "mark = 300"))
        h.daemon.reload("SIGHUP")
        await h.settled()
        assert said(h, "config reload refused") == [refusal] * 3

    drive(tmp_path, body)


def test_several_errors_are_one_line(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.path.write_text(config_text().replace("mark = 2", "mark = 300").replace('"wan2"]', '"wan3"]'))
        h.daemon.reload("SIGHUP")
        await h.settled()
        (line,) = said(h, "config reload refused")
        assert line.startswith("config reload refused (the running config stays): ")
        assert BAD_MARK in line and 'unknown uplink "wan3"' in line and "; " in line

    drive(tmp_path, body)


def test_start_and_reload_end_in_a_summary(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        (started,) = said(h, "started")
        assert re.fullmatch(r"started: 2/2 uplinks up, 1 policies, 23 kernel objects installed in \d+ ms", started)
        h.path.write_text(config_text(policies=WEB + SSH))
        h.daemon.reload("SIGHUP")
        assert said(h, "config reloaded") == []  # said once its pass is done, with what it did
        await h.settled()
        (reloaded,) = said(h, "config reloaded")
        assert re.fullmatch(r"config reloaded \(SIGHUP\): 2/2 uplinks up, 2 policies, "
                            r"23 kernel objects installed \(1 written\) in \d+ ms", reloaded), reloaded

    drive(tmp_path, body)


def test_summary_line() -> None:
    from test_daemon_loop import WORLD

    from markrouted.config import parse

    desired = derive(parse(config_text()), WORLD)
    assert summary_line("started", desired, 3, 25, 0.0412) == \
        "started: 2/2 uplinks up, 3 policies, 23 kernel objects installed in 41 ms"
    assert summary_line("started", desired, 3, 0, 0.002) == \
        "started: 2/2 uplinks up, 3 policies, 23 kernel objects installed (0 written) in 2 ms"


# ------------------------------------------------------------------ priorities


def test_warning_and_above_is_the_short_list(tmp_path: Path) -> None:
    """``journalctl -p warning``: the uplink down, the drift, the refusal; nothing routine."""
    async def body(h: Harness) -> None:
        h.kernel.set_link("eth1", carrier=False)
        await h.pass_for("link 3 changed")
        h.kernel.set_link("eth1", carrier=True)
        await h.pass_for("link 3 changed")
        h.kernel.nft = None
        await h.pass_for("table inet markrouted changed by pid 4242 (nft)")
        h.path.write_text(config_text(policies=WEB + SSH).replace("mark = 2", "mark = 300"))
        h.daemon.reload("SIGHUP")
        h.daemon.reload("config file changed")
        await h.settled()
        h.path.write_text(config_text(policies=WEB))
        h.daemon.reload("SIGHUP")
        await h.settled()
        assert [(p, text) for p, text in journal(h) if p <= 4] == [
            (4, "uplink wan2 (eth1) down: no carrier"),
            (4, "drift repaired: nft table inet markrouted changed by pid 4242 (nft): replaced"),
            (3, f"config reload refused (the running config stays): {BAD_MARK}"),
        ]
        notices = [text for p, text in journal(h) if p == 5]
        assert [t.split(":")[0].split(" (")[0] for t in notices] == [
            "started", "policy ssh moved from wan2 to wan1", "uplink wan2", "policy ssh moved from wan1 to wan2",
            "config reloaded"]
        # every kernel write is info
        assert {p for (p, _t), (_l, e, _kw) in zip(journal(h), [x for x in h.log.events if x[0] != "debug"])
                if e in ("rule added", "route added", "nft table replaced", "nft chains refilled",
                         "conntrack cleared")} == {6}

    drive(tmp_path, body, config_text(policies=WEB + SSH))


def render(event: str, level: str, **kw: Any) -> tuple[str, dict[str, str]]:
    sent: list[tuple[str, dict[str, str]]] = []
    renderer = JournalRenderer.__new__(JournalRenderer)
    renderer.send = lambda text, **fields: sent.append((text, fields))
    with pytest.raises(structlog.DropEvent):
        renderer(None, level, {"event": event, "level": level, **kw})
    ((text, fields),) = sent
    return text, fields


@pytest.mark.parametrize("event, level, prio", [
    ("config reload refused", "error", 3), ("kernel write failed", "warning", 3),
    ("uplink down", "warning", 4), ("drift repaired", "warning", 4),
    # whoever logs it, at whatever level
    ("uplink held down", "warning", 4), ("uplink held down", "info", 4),
    ("uplink up", "info", 5), ("policy moved", "info", 5), ("config reloaded", "info", 5), ("started", "info", 5),
    ("health check down", "warning", 5),
    ("rule added", "info", 6), ("nft table replaced", "info", 6), ("conntrack cleared", "info", 6),
    ("config unchanged", "debug", 7), ("something new", "info", 6), ("something new", "warning", 4),
])
def test_priority_by_event_name(event: str, level: str, prio: int) -> None:
    _text, fields = render(event, level, uplink="wan2")
    assert fields["PRIORITY"] == str(prio)


def test_message_ids_by_event_name_and_the_message_is_not_a_field() -> None:
    text, fields = render("policy moved", "info", policy="ssh", was="wan2", now="wan1",
                          message="policy ssh moved from wan2 to wan1 (wan2 down: no carrier)")
    assert text == "policy ssh moved from wan2 to wan1 (wan2 down: no carrier)"
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["policy moved"]
    assert fields["MARKROUTED_POLICY"] == "ssh" and fields["MARKROUTED_WAS"] == "wan2"
    assert "MARKROUTED_MESSAGE" not in fields
    text, fields = render("uplink held down", "warning", uplink="wan2", flaps=3, within="10m", until="14:05:00")
    assert text == "uplink wan2 held down until 14:05:00: 3 flaps within 10m"
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["uplink held down"]
    assert set(MESSAGE_IDS) == {"uplink down", "uplink up", "policy moved", "config reload refused",
                                "drift repaired", "uplink held down"}
    _text, fields = render("rule added", "info", object="ip rule 10100: ...")
    assert "MESSAGE_ID" not in fields


@pytest.mark.parametrize("event, fields, text", [
    ("invalid config", {"object": "/etc/markrouted.toml", "error": "uplinks.wan2.mark: 300 ..."},
     "invalid config /etc/markrouted.toml: uplinks.wan2.mark: 300 ..."),
    ("stopped", {"on_stop": "keep"}, "stopped; the routing stays installed (on_stop = keep)"),
    ("stopped", {"on_stop": "flush", "removed": 23}, "stopped; 23 kernel objects removed (on_stop = flush)"),
    ("rule added", {"object": "ip rule 10100: from all fwmark 0x10000/0xff0000 lookup 101 proto markrouted",
                    "reason": "missing"},
     "rule added: ip rule 10100: from all fwmark 0x10000/0xff0000 lookup 101 proto markrouted (missing)"),
    ("sysctl changed", {"object": "sysctl net.ipv4.conf.all.src_valid_mark=1", "reason": "fwmark"},
     "sysctl changed: net.ipv4.conf.all.src_valid_mark=1 (fwmark)"),
    ("health check down", {"uplink": "wan1", "reason": "3 of 3 probes lost"},
     "health check of uplink wan1: down (3 of 3 probes lost)"),
    ("uplink up", {"uplink": "wan2", "interface": "eth1", "reason": "ipv4 only: no ipv6 default route"},
     "uplink wan2 (eth1) up: ipv4 only: no ipv6 default route"),
    ("something else", {"uplink": "wan1", "error": "x"}, "something else: uplink=wan1 error=x"),
])
def test_messages_made_from_fields(event: str, fields: dict[str, Any], text: str) -> None:
    assert message(event, fields) == text


def test_the_message_text_is_escaped_too() -> None:
    text, _fields = render("policy moved", "info", message="policy a\nb moved\x1b[2J")
    assert text == "policy a\\nb moved\\x1b[2J"


def test_the_terminal_keeps_event_and_fields() -> None:
    out = io.StringIO()
    log = setup("console", stream=out)
    log.info("policy moved", policy="ssh", was="wan2", now="wan1", message="policy ssh moved from wan2 to wan1")
    line = out.getvalue()
    assert "policy moved  policy=ssh was=wan2 now=wan1" in line and "message=" not in line


# ------------------------------------------------------------------ the catalog


def catalog() -> dict[str, str]:
    entries: dict[str, str] = {}
    current = None
    for line in CATALOG.read_text().splitlines():
        found = re.fullmatch(r"-- ([0-9a-f]{32})", line)
        if found:
            current = found.group(1)
            entries[current] = ""
        elif current is not None:
            entries[current] += line + "\n"
    return entries


def test_the_catalog_explains_every_message_id() -> None:
    entries = catalog()
    assert set(entries) == set(MESSAGE_IDS.values())
    for body in entries.values():
        head, _, text = body.partition("\n\n")
        assert re.search(r"^Subject: .+$", head, re.M) and "Defined-By: markrouted" in head
        assert "Documentation: man:" in head
        assert "What markrouted did" in text and "What you can do" in text
        assert re.search(r"^ {4}(markrouted|journalctl|ip|nft) ", text, re.M), "no command to run"
        # only fields the event always carries are substituted
        assert set(re.findall(r"@([A-Z_]+)@", body)) <= {"MARKROUTED_UPLINK", "MARKROUTED_INTERFACE",
                                                         "MARKROUTED_REASON", "MARKROUTED_POLICY", "MARKROUTED_WAS",
                                                         "MARKROUTED_NOW", "MARKROUTED_ERROR", "MARKROUTED_TRIGGER",
                                                         "MARKROUTED_WRITES"}


def test_the_package_installs_the_catalog_and_updates_the_index() -> None:
    debian = ROOT / "packaging" / "debian"
    installed = (debian / "markrouted.install").read_text()
    assert "packaging/catalog/markrouted.catalog usr/lib/systemd/catalog/" in installed
    for script in ("markrouted.postinst", "markrouted.postrm"):
        text = (debian / script).read_text()
        assert "journalctl --update-catalog" in text and "#DEBHELPER#" in text
