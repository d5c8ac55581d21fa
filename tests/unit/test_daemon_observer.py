"""Hooks and metrics fed by the real daemon loop, against the fake kernel.

A recording hook sees a failover and a failback in order with the right
fields; a hook that hangs, forks, floods and fails runs through the same
failover without holding it up (the second transition's pass, its conntrack
clear and the hook's next event all happen while the first hook still hangs);
the metrics follow the same transitions. Ordering, never timing.
"""

from __future__ import annotations

from pathlib import Path

from test_daemon_loop import Harness, config_text, drive
from test_hooks import RECORD, records, write_hook

from markrouted.metrics import CounterCache


def with_settings(extra: str) -> str:
    return config_text().replace('on_stop = "flush"\n', f'on_stop = "flush"\n{extra}')


def fake_counters(h: Harness) -> None:
    h.daemon.observer.counters = CounterCache(lambda: ({"policy_web": (9, 540), "uplink_wan1": (20, 2000)},
                                                       {0x10000: 2}))


def test_failover_and_failback_reach_the_hooks_in_order(tmp_path: Path) -> None:
    hooks, out = tmp_path / "hooks.d", tmp_path / "out"
    hooks.mkdir(mode=0o755)
    write_hook(hooks, "record", RECORD.format(out=str(out), wait=""))

    async def body(h: Harness) -> None:
        h.kernel.set_link("eth0", carrier=False)
        await h.pass_for("link 2 changed")
        h.kernel.set_link("eth0", carrier=True)
        await h.pass_for("link 2 changed")
        await h.daemon.observer.hooks.idle()  # type: ignore[union-attr]

    drive(tmp_path, body, text=with_settings(f'hooks = "{hooks}"\n'))
    got = [(r["env"]["MARKROUTED_EVENT"], r["env"]["MARKROUTED_UPLINK"], r["env"]["MARKROUTED_STATE"],
            r["env"]["MARKROUTED_FROM"], r["env"]["MARKROUTED_TO"], r["env"]["MARKROUTED_POLICY"]) for r in records(out)]
    by_key = {"uplink": [g for g in got if g[1]], "policies": [g for g in got if g[0] == "policy-moved"]}
    assert by_key["uplink"] == [("uplink-down", "wan1", "down", "", "", ""), ("uplink-up", "wan1", "up", "", "", "")]
    assert by_key["policies"] == [("policy-moved", "", "", "wan1", "wan2", "web"),
                                  ("policy-moved", "", "", "wan2", "wan1", "web")]
    down = next(r for r in records(out) if r["env"]["MARKROUTED_EVENT"] == "uplink-down")
    assert down["stdin"]["reason"] == down["env"]["MARKROUTED_REASON"] == "no carrier"


def test_a_hanging_hook_never_holds_up_a_failover(tmp_path: Path) -> None:
    hooks, out, gate, flood = tmp_path / "hooks.d", tmp_path / "out", tmp_path / "gate", tmp_path / "flood"
    hooks.mkdir(mode=0o755)
    write_hook(hooks, "10-record-then-hang", RECORD.format(out=str(out), wait=str(gate)))
    write_hook(hooks, "20-fork-flood-fail", f"#!/bin/sh\nsleep 1000 &\nhead -c 100000000 /dev/zero\nexit 1\n")
    events: list[str] = []

    async def body(h: Harness) -> None:
        h.kernel.set_link("eth0", carrier=False)
        await h.pass_for("link 2 changed")
        await h.until(lambda: len([r for r in records(out) if r["env"]["MARKROUTED_UPLINK"] == "wan1"]) == 1,
                      "the hook to start on wan1 down")
        events.append("hook hangs")
        # while it hangs: wan2 fails too, and wan1 comes back
        h.kernel.set_link("eth1", carrier=False)
        await h.pass_for("link 3 changed")
        events.append(f"conntrack cleared {h.kernel.conntrack_cleared}")
        h.kernel.set_link("eth0", carrier=True)
        await h.pass_for("link 2 changed")
        events.append("failback done")
        assert h.daemon.reporter.desired is not None
        events.append(",".join(f"{u.name}={u.state}" for u in h.daemon.reporter.desired.uplinks))
        # the first hook still hangs: wan1's next event waits for it, wan2's runs beside it
        await h.until(lambda: any(r["env"]["MARKROUTED_UPLINK"] == "wan2" for r in records(out)),
                      "wan2's hook to run beside the hanging one")
        assert not any(r["env"]["MARKROUTED_EVENT"] == "uplink-up" for r in records(out))
        events.append("gate opened")
        gate.touch()
        await h.daemon.observer.hooks.idle()  # type: ignore[union-attr]

    drive(tmp_path, body, text=with_settings(f'hooks = "{hooks}"\nhook_timeout = "30s"\n'))
    assert events == ["hook hangs", "conntrack cleared [(65536, 16711680), (131072, 16711680)]", "failback done",
                      "wan1=up,wan2=down", "gate opened"]
    wan1 = [r["env"]["MARKROUTED_EVENT"] for r in records(out) if r["env"]["MARKROUTED_UPLINK"] == "wan1"]
    assert wan1 == ["uplink-down", "uplink-up"]


def test_metrics_follow_the_daemon(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        fake_counters(h)
        h.kernel.set_link("eth0", carrier=False)
        await h.pass_for("link 2 changed")
        text = await h.daemon.observer.scrape()
        assert 'markrouted_uplink_up{uplink="wan1"} 0' in text
        assert 'markrouted_uplink_transitions_total{uplink="wan1",to="down"} 1' in text
        assert 'markrouted_conntrack_cleared_total{uplink="wan1"} 1' in text
        assert 'markrouted_policy_uplink{policy="web",uplink="wan2"} 1' in text
        assert 'markrouted_policy_packets_total{policy="web"} 9' in text
        assert 'markrouted_uplink_flows{uplink="wan1"} 2' in text
        assert "markrouted_in_sync 1" in text
        h.path.write_text("garbage = [")
        h.daemon.reload("SIGHUP")
        text = await h.daemon.observer.scrape()
        assert "markrouted_config_reload_success 0" in text

    drive(tmp_path, body)


def test_a_metrics_port_in_use_is_logged_and_routing_goes_on(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]

    async def body(h: Harness) -> None:
        await h.daemon.observer.started()
        errors = h.log.named("metrics endpoint not served, routing goes on")
        assert errors == [{"object": f"127.0.0.1:{port}",
                           "error": f"metrics: cannot listen on 127.0.0.1:{port}: the port is in use"}]
        h.kernel.set_link("eth0", carrier=False)
        await h.pass_for("link 2 changed")
        assert "1/2 uplinks up" in h.notes.status

    try:
        drive(tmp_path, body, text=with_settings(f'metrics = "127.0.0.1:{port}"\n'))
    finally:
        s.close()


