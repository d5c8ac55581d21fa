"""Config changes while running, and the systemd notify protocol around them.

Editors replace a file by rename (inotify must see it), ``systemctl reload``
sends SIGHUP, and an invalid config is refused: the running state stays
byte for byte, the errors show in ``STATUS=`` and ``markrouted status``, and
a fixed config is applied and clears them.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

from .daemon_harness import (CONVERGE, SSH_POLICY, WEB_POLICY, Daemon, TwoUplinks, config_text, replace_file,
                             wait_until)

Start = Callable[..., Daemon]


def _has_policy(net: TwoUplinks, name: str) -> bool:
    return f'comment "policy {name} #' in net.nft("chain", "inet", "markrouted", "output")


def test_config_replaced_by_rename_is_applied(net: TwoUplinks, start: Start) -> None:
    d = start(net, config_text())
    assert not _has_policy(net, "web")
    replace_file(d.config, config_text(policies=(SSH_POLICY, WEB_POLICY)))
    d.wait(lambda: _has_policy(net, "web"), "policy web in the nft table")
    d.wait(lambda: "web" in (d.status() or {}).get("policies", {}), "policy web in the status")
    assert d.status()["policies"]["web"]["active"] == ["wan1"]  # type: ignore[index]
    assert d.lines("config reloaded")
    # RELOADING=1, then READY=1 once the new config is in force (sd_notify(3))
    # the status file is written just before READY=1 is sent: wait for the note, do not race it
    def ready_after_reloading() -> list[dict[str, str]] | None:
        notes = d.notes.all()
        reloading = [i for i, m in enumerate(notes) if m.get("RELOADING") == "1"]
        if reloading and any(m.get("READY") == "1" for m in notes[reloading[-1] + 1:]):
            return notes[reloading[-1]:]
        return None

    after = d.wait(ready_after_reloading, "READY=1 after RELOADING=1")
    assert "MONOTONIC_USEC" in after[0], after[0]


def test_sighup_after_an_in_place_edit_is_applied(net: TwoUplinks, start: Start) -> None:
    d = start(net, config_text())
    # edited in place and kept open: inotify sees no close-after-write, so only
    # the SIGHUP can make the daemon read it
    with open(d.config, "r+") as f:
        f.seek(0)
        f.write(config_text(policies=(SSH_POLICY, WEB_POLICY)))
        f.truncate()
        f.flush()
        d.send(signal.SIGHUP)
        d.wait(lambda: _has_policy(net, "web"), "policy web after SIGHUP")
    assert d.lines("trigger=SIGHUP")


def test_invalid_config_is_refused_and_the_running_state_kept(net: TwoUplinks, start: Start) -> None:
    d = start(net, config_text(), watchdog_usec=200000)
    before = net.owned_snapshot()
    broken = config_text(policies=(SSH_POLICY, WEB_POLICY)).replace("mark = 2", "mark = 300")

    replace_file(d.config, broken)
    doc = d.wait(lambda: (s := d.status()) and s.get("config_error") and s, "config_error in the status file")
    assert "uplinks.wan2.mark" in doc["config_error"], doc["config_error"]
    assert doc["in_sync"] and doc["uplinks"]["wan2"]["state"] == "up"
    assert d.lines("config reload refused")
    status = d.wait(lambda: [s for s in d.notes.values("STATUS") if "refused" in s], "STATUS= saying refused")
    assert "uplinks.wan2.mark" in status[-1], status
    # the old state is kept: nothing written, web not added, still running
    assert net.owned_snapshot() == before
    assert d.proc.poll() is None
    env = {"MARKROUTED_RUN_DIR": str(d.run_dir)}
    shown = net.host.markrouted("status", config=str(d.config), env=env)
    assert shown.returncode == 0 and "config reload refused" in shown.stdout, shown.stdout + shown.stderr
    assert "uplinks.wan2.mark" in shown.stdout
    as_json = json.loads(net.host.markrouted("status", "--json", config=str(d.config), env=env).stdout)
    assert as_json["pid"] == d.proc.pid and "uplinks.wan2.mark" in as_json["config_error"]
    # the daemon keeps its own loop alive meanwhile: watchdog pings go on
    pings = d.notes.count("WATCHDOG", "1")
    wait_until(lambda: d.notes.count("WATCHDOG", "1") >= pings + 2, "WATCHDOG=1 pings", CONVERGE, d.context)
    # a kernel change is still handled under the refused config
    net.host.ip("rule", "del", "priority", "10100", "fwmark", "0x20000/0xff0000", "lookup", "102")
    d.wait(lambda: net.owned_snapshot() == before, "drift repaired under the previous config")

    replace_file(d.config, config_text(policies=(SSH_POLICY, WEB_POLICY)))
    d.wait(lambda: _has_policy(net, "web"), "the fixed config applied")
    d.wait(lambda: (s := d.status()) and s.get("config_error") is None and "web" in s["policies"],
           "config_error cleared")
    d.wait(lambda: d.notes.values("STATUS")[-1] == "2/2 uplinks up, 2 policies, in sync", "STATUS= back to normal")
    shown = net.host.markrouted("status", config=str(d.config), env=env)
    assert "refused" not in shown.stdout, shown.stdout


def test_notify_protocol_ready_status_watchdog_stopping(net: TwoUplinks, start: Start) -> None:
    d = start(net, config_text(), watchdog_usec=200000)
    notes = d.notes.all()
    ready = [m for m in notes if m.get("READY") == "1"]
    assert len(ready) == 1 and ready[0].get("STATUS") == "2/2 uplinks up, 1 policies, in sync", notes
    # WATCHDOG=1 at half of WATCHDOG_USEC: about 10 pings a second
    first = d.notes.count("WATCHDOG", "1")
    wait_until(lambda: d.notes.count("WATCHDOG", "1") >= first + 3, "three more WATCHDOG=1", CONVERGE, d.context)
    assert d.stop(signal.SIGTERM) == 0
    last = d.notes.all()[-3:]
    assert any(m.get("STOPPING") == "1" for m in last), d.notes.all()[-5:]


def test_reload_that_moves_the_rules_and_drops_an_uplink_leaves_nothing_behind(net: TwoUplinks,
                                                                               start: Start) -> None:
    """What the old config installed and the new one does not want is removed, nothing else."""
    d = start(net, config_text())
    web_on_wan1 = WEB_POLICY.replace('["wan1", "wan2"]', '["wan1"]')
    replace_file(d.config, config_text(rule_priority=20000, wan2=False, policies=(web_on_wan1,)))
    d.wait(lambda: _has_policy(net, "web") and not _has_policy(net, "ssh"), "the new policies in nft")
    d.wait(lambda: {r["priority"] for r in net.rules()} == {20000, 20100, 20200}, "the rules moved to 20000")
    d.wait(lambda: not any(r.get("table") == "102" for r in net.rules()), "wan2's rules gone")
    d.wait(lambda: all(str(r.get("protocol")) not in ("109", "markrouted") for r in net.routes(102)),
           "wan2's routes gone")
    doc = d.wait(lambda: (s := d.status()) and list(s["uplinks"]) == ["wan1"] and s, "status without wan2")
    assert doc["in_sync"] and doc["policies"] == {"web": {"active": ["wan1"], "fallback": "main",
                                                          "families": ["ipv4", "ipv6"], "tiers": [["wan1"]],
                                                          "tier": 0, "action": None, "failback": "new-flows"}}
    assert "set_wan2" not in net.nft("table", "inet", "markrouted")
    plan = net.host.markrouted("plan", config=str(d.config), env={"MARKROUTED_RUN_DIR": str(d.run_dir)})
    assert plan.returncode == 0, plan.stdout + plan.stderr
