"""Stopping: SIGTERM/SIGINT apply ``on_stop``; ``kill -9`` and a restart leave no duplicates."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable

import pytest
from .daemon_harness import Daemon, TwoUplinks, config_text

Start = Callable[..., Daemon]


def _owned_routes(net: TwoUplinks) -> list[dict[str, object]]:
    return [{**r, "table": t} for t in (101, 102) for r in net.routes(t)
            if str(r.get("protocol")) in ("109", "markrouted")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_with_on_stop_flush_removes_everything_owned(net: TwoUplinks, start: Start, sig: int) -> None:
    d = start(net, config_text(on_stop="flush"))
    net.host.ip("rule", "add", "priority", "10150", "lookup", "300")  # foreign, inside the range
    net.host.sh("nft", "add", "table", "inet", "other")
    assert net.rules() and _owned_routes(net) and net.nft("table", "inet", "markrouted")

    assert d.stop(sig) == 0, d.context()
    assert any(m.get("STOPPING") == "1" for m in d.notes.all()), d.notes.all()
    assert net.rules() == []
    assert _owned_routes(net) == []
    assert net.nft("table", "inet", "markrouted") == ""
    assert "lookup 300" in net.host.ip("rule", "show", "priority", "10150")
    assert "table inet other" in net.host.sh("nft", "list", "tables")
    assert not (d.run_dir / "status.json").exists()
    assert d.lines("stopped")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_with_on_stop_keep_leaves_everything(net: TwoUplinks, start: Start, sig: int) -> None:
    d = start(net, config_text(on_stop="keep"))
    before = net.owned_snapshot()
    assert d.stop(sig) == 0, d.context()
    assert any(m.get("STOPPING") == "1" for m in d.notes.all())
    assert net.owned_snapshot() == before


def test_kill_9_then_restart_converges_without_duplicates(net: TwoUplinks, start: Start) -> None:
    first = start(net, config_text())
    before = net.owned_snapshot()
    first.send(signal.SIGKILL)
    first.proc.wait(timeout=10)
    assert net.owned_snapshot() == before  # nothing cleaned up: it was killed

    assert (first.run_dir / "status.json").exists()
    second = start(net, run_dir=first.run_dir)  # same config, the dead daemon's status.json still there
    assert second.status()["pid"] == second.proc.pid  # type: ignore[index]
    assert second.status()["in_sync"]  # type: ignore[index]
    assert net.owned_snapshot() == before
    counts = Counter(net.rule_key(r) for r in net.rules())
    assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n > 1]
    routes = Counter((r["table"], r["family"], r["dst"], r.get("metric"), r.get("type")) for r in _owned_routes(net))
    assert all(n == 1 for n in routes.values()), routes
    assert not second.lines("rule added") and not second.lines("route added"), second.log()
    plan = net.host.markrouted("plan", config=str(second.config),
                               env={"MARKROUTED_RUN_DIR": str(second.run_dir)})
    assert plan.returncode == 0, plan.stdout + plan.stderr
