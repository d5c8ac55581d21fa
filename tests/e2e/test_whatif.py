"""``plan --down``: the what-if says what the daemon then does on the real failover.

The daemon runs with a health check on wan1; a third policy is on wan2 only,
so not every policy moves. ``plan --down wan1`` (run next to the daemon)
prints its transitions in the daemon's own vocabulary. Then isp1 stops
forwarding, the daemon's check takes wan1 down, and its log of that failover
(``uplink down``, ``policy moved``, ``nft chains refilled``, ``conntrack
cleared``) must say the same, line for line; the what-if changed nothing
(``plan`` still finds the kernel in sync before the cut), and the number of
conntrack entries it announced is the number of entries of wan1 there were.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from lab.topology import SERVER4, Lab, lab_config, policy
from tests.e2e.conftest import start_daemon
from tests.health.conftest import check, cut

pytestmark = pytest.mark.e2e

EVENTS = ("uplink down", "policy moved", "nft chains refilled", "conntrack cleared")


def from_log(line: str) -> tuple[str, dict[str, str]]:
    """(event, fields) of one console log line: ``TIME [level: ]EVENT  key=value ...``."""
    head, _, rest = line.partition("  ")
    event = head.split(" ", 1)[1]
    event = event.split(": ", 1)[-1]
    fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S+)", rest))
    return event.strip(), fields


def normalise_log(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        event, f = from_log(line)
        if event == "uplink down":
            out.append(f"uplink down: {f['uplink']}")
        elif event == "policy moved":
            out.append(f"policy moved: {f['policy']} was={f['was']} now={f['now']}")
        elif event == "nft chains refilled":
            out.append(f"nft chains refilled: {f['object']}")
        elif event == "conntrack cleared":
            mark = re.search(r"object=ct mark (\S+)", line)
            out.append(f"conntrack cleared: {f['uplink']} ct mark {mark[1] if mark else '?'}")
    return out


def normalise_plan(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.startswith("conntrack cleared:"):
            line = line.split(" (")[0]
            head, _, mark = line.rpartition(" ct mark ")
            out.append(f"{head} ct mark {mark}")
        elif any(line.startswith(e + ":") for e in EVENTS):
            out.append(line)
    return out


def test_plan_down_matches_the_real_failover(lab: Lab, write_config: Callable[..., str]) -> None:
    config = lab_config(
        policy("web", ["wan1", "wan2"], proto="tcp", dport=[443]),
        policy("ssh", ["wan1", "wan2"], proto="tcp", dport=[22]),
        policy("mail", ["wan2"], proto="tcp", dport=[2222]),
        wan1=check([SERVER4], down_after=2, up_after=1))
    daemon = start_daemon(lab, write_config(config))
    daemon.wait_verdict("wan1")
    held = lab.hold("host", SERVER4, 443)  # one entry of wan1 for the count

    proc = daemon.cli("plan", "--down", "wan1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert daemon.cli("plan").returncode == 0, "the what-if changed something"
    predicted = normalise_plan(lines)
    assert "policy moved: web was=wan1 now=wan2" in predicted, proc.stdout
    assert not any("mail" in line for line in predicted), proc.stdout
    counted = [line for line in lines if line.startswith("conntrack cleared: wan1")]
    assert len(counted) == 1 and "(1 entries now)" in counted[0], proc.stdout

    before = len(daemon.lines)
    cut(lab, "isp1")
    daemon.wait_state("wan1", "down")
    daemon.wait("the conntrack clear", lambda d: any("conntrack cleared" in x for x in daemon.lines[before:]))
    done = normalise_log([line for line in daemon.lines[before:] if any(f"{e}  " in line for e in EVENTS)])
    assert sorted(done) == sorted(predicted), f"what-if:\n{proc.stdout}\nlog:\n" + "\n".join(daemon.lines[before:])
    held.close()
    assert daemon.stop() == 0
