"""Hooks and metrics under the packaged unit: a hook in /etc/markrouted/hooks.d runs inside the
service's sandbox on a failover and a failback, and the metrics endpoint answers.

The hook writes its records where the sandbox lets it (the service's runtime
directory, /run/markrouted) and its output reaches the journal with its exit
status. It runs as the unit's user (the transient DynamicUser), not root.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from .nspawn import Container, poll, run
from .test_systemd import POLL_DEADLINE, TWO_UPLINKS, Net, net, wait_event, wait_status  # noqa: F401

pytestmark = pytest.mark.system

HOOK = """#!/usr/bin/python3
import json, os, sys
event = json.load(sys.stdin)
with open("/run/markrouted/hook-events.jsonl", "a") as f:
    f.write(json.dumps({"stdin": event, "uid": os.getuid(),
                        "env": {k: v for k, v in os.environ.items() if k.startswith("MARKROUTED_")}}) + "\\n")
print("recorded", event["event"], event["uplink"])
"""

WITH_HOOKS = TWO_UPLINKS.replace('resync = "5s"\n', 'resync = "5s"\nhooks = "/etc/markrouted/hooks.d"\n'
                                 'metrics = "127.0.0.1:9826"\n')


def records(ct: Container) -> list[dict[str, Any]]:
    out = ct.sh("cat", "/run/markrouted/hook-events.jsonl", check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_hook_runs_under_systemd_on_failover_and_failback(container: Container, net: Net) -> None:  # noqa: F811
    ct = container
    ct.sh("mkdir", "-p", "/etc/markrouted/hooks.d")
    ct.write("/etc/markrouted/hooks.d/10-record", HOOK)
    ct.sh("chmod", "0755", "/etc/markrouted/hooks.d/10-record")
    ct.write("/etc/markrouted.toml", WITH_HOOKS)
    ct.sh("systemctl", "restart", "markrouted")
    wait_status(ct, r"^2/2 uplinks up, \d+ policies, in sync$")
    # the example hook is shipped
    files = ct.sh("dpkg", "-L", "markrouted").stdout.split()
    assert any(f.endswith("/examples/hooks.d/50-wireguard-restart") for f in files)

    isp2 = f"{ct.name}-isp2"
    since = time.time()
    run(["ip", "-n", isp2, "link", "set", "cust", "down"])
    try:
        wait_event(ct, since, MARKROUTED_EVENT="uplink down", MARKROUTED_UPLINK="wan2")
    finally:
        run(["ip", "-n", isp2, "link", "set", "cust", "up"])
    wait_event(ct, since, MARKROUTED_EVENT="uplink up", MARKROUTED_UPLINK="wan2")
    got = poll("both transitions recorded by the hook",
               lambda: (r := [x for x in records(ct) if x["stdin"]["uplink"] == "wan2"]) and len(r) >= 2 and r,
               deadline=POLL_DEADLINE)
    assert [(r["stdin"]["event"], r["env"]["MARKROUTED_STATE"]) for r in got] == [
        ("uplink-down", "down"), ("uplink-up", "up")]
    assert all(r["uid"] != 0 for r in got)  # the unit's own user, not root
    done = wait_event(ct, since, MARKROUTED_EVENT="hook done", MARKROUTED_HOOK="10-record")
    # the first hook to finish may be the uplink's or a moved policy's: both run the recorder
    assert done["MARKROUTED_OUTPUT"].startswith("recorded ") and done["MARKROUTED_STATUS"] == "0"
    metrics = ct.sh("python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                    "'http://127.0.0.1:9826/metrics', timeout=5).read().decode())").stdout
    assert 'markrouted_uplink_up{uplink="wan2"} 1' in metrics
    assert 'markrouted_uplink_transitions_total{uplink="wan2",to="down"} 1' in metrics
