"""failback = "migrate" in the daemon's loop: which conntrack entries a failback clears.

The fake kernel records every clear. When the better tier of a migrating
policy comes back, that policy's flows on the worse uplink are cleared by
its label bit, and only those: a "new-flows" policy on the same uplink
clears nothing, and an uplink that merely went down is cleared whole as
before (no label).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_daemon_loop import MASK, Harness, config_text, drive

from markrouted.daemon.reporter import migrations
from markrouted.model import DesiredState, PolicyStatus, UplinkStatus

POLICIES = """\
[[policy]]
name = "web"
dport = [443]
uplinks = ["wan1", "wan2"]
failback = "migrate"

[[policy]]
name = "rest"
uplinks = ["wan1", "wan2"]
"""


def test_migrate_clears_only_the_migrating_policy_on_the_backup(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.kernel.set_link("eth0", carrier=False)
        await h.pass_for("link 2 changed")
        assert h.kernel.conntrack_cleared == [(0x10000, MASK)]  # wan1 down: everything on it
        h.kernel.set_link("eth0", carrier=True)
        await h.pass_for("link 2 changed")
        # wan1 back: web's flows on wan2 (label 127) go; rest's flows on wan2 stay
        assert h.kernel.conntrack_cleared == [(0x10000, MASK), (0x20000, MASK, 127)]
        assert h.log.named("conntrack cleared")[-1] == {
            "uplink": "wan2", "policy": "web", "object": "ct mark 0x20000/0xff0000 ct label 127",
            "reason": "failback"}

    drive(tmp_path, body, config_text(policies=POLICIES))


def test_new_flows_clears_nothing_on_failback(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.kernel.set_link("eth0", carrier=False)
        await h.pass_for("link 2 changed")
        h.kernel.set_link("eth0", carrier=True)
        await h.pass_for("link 2 changed")
        assert h.kernel.conntrack_cleared == [(0x10000, MASK)]

    drive(tmp_path, body, config_text(policies=POLICIES.replace('failback = "migrate"', "")))


def _state(policies: tuple[PolicyStatus, ...], down: tuple[str, ...] = ()) -> DesiredState:
    uplinks = tuple(UplinkStatus(name=n, interface=n, state="down" if n in down else "up", reason="", gateway=None,
                                 gateway6=None, table=100 + i, mark=(i + 1) << 16, families=(2,))
                    for i, n in enumerate(("a", "b", "c")))
    return DesiredState(frozenset(), frozenset(), None, (), uplinks, policies)


def _policy(active: tuple[str, ...], tier: int | None, failback: str = "migrate") -> PolicyStatus:
    return PolicyStatus("p", active, "main", (2,), tiers=(("a", "b"), ("c",)), tier=tier,
                        failback=failback, label=127 if failback == "migrate" else None)  # type: ignore[arg-type]


def test_migrations_by_tier() -> None:
    cases = [
        # (before, after, cleared uplinks)
        (_policy(("c",), 1), _policy(("a", "b"), 0), ["c"]),  # the balanced tier is back: c's flows go
        (_policy(("b",), 0), _policy(("a", "b"), 0), []),  # a member of the same tier came back: nothing
        (_policy(("a", "b"), 0), _policy(("c",), 1), []),  # a failover, not a failback
        (_policy(("c",), 1), _policy((), None), []),  # nothing usable: nothing to move to
        (_policy(("c",), 1), _policy(("a",), 0, "new-flows"), []),
    ]
    for before, after, cleared in cases:
        got = migrations(_state((before,)), _state((after,)))
        assert [u.name for _, u in got] == cleared, (before, after)
    assert migrations(None, _state((_policy(("a",), 0),))) == []
    # an uplink that went down is cleared whole elsewhere, not per policy
    assert migrations(_state((_policy(("c",), 1),)), _state((_policy(("a",), 0),), down=("c",))) == []


@pytest.mark.parametrize("failback", ["migrate", "new-flows"])
def test_a_reload_reordering_tiers_keeps_flows_unless_migrate(tmp_path: Path, failback: str) -> None:
    before = POLICIES.replace('"migrate"', f'"{failback}"')
    after = before.replace('uplinks = ["wan1", "wan2"]\nfailback', 'uplinks = ["wan2", "wan1"]\nfailback')

    async def body(h: Harness) -> None:
        h.path.write_text(config_text(policies=after))
        h.daemon.reload("SIGHUP")
        await h.settled()
        web = next(p for p in h.daemon.reporter.desired.policies if p.name == "web")  # type: ignore[union-attr]
        assert web.active == ("wan2",)
        # web's flows on wan1, now its worse tier, go only if it migrates; rest's flows stay where they are
        assert h.kernel.conntrack_cleared == ([(0x10000, MASK, 127)] if failback == "migrate" else [])

    drive(tmp_path, body, config_text(policies=before))
