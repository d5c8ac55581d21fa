"""``failback``: what happens to flows on the backup when the primary returns, with real traffic.

Two policies over the same tiers ``["wan1", "wan2"]``: ``web`` (TCP 443,
``failback`` under test) and ``ssh`` (TCP 22, the default "new-flows"). The
daemon's health check on wan1 takes it down when isp1 stops forwarding (its
line stays up), and up again when isp1 forwards again.

While wan1 is down, one long-lived connection of each policy opens on the
backup (isp2). When wan1 comes back:

* ``migrate``: web's connection is cleared from conntrack (the daemon logs it
  with the policy's name) and re-routes to isp1, which breaks it (the server
  sees the next segment from another address); the next web connection goes
  by isp1; ssh's connection on the same backup is not touched and still echoes;
* ``new-flows``: nothing is cleared, both connections keep echoing by isp2.

The echo shows the path, not a timing: a cleared flow's next segment leaves
by another uplink, the server answers it with a reset.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lab.topology import SERVER4, Lab, lab_config, policy, which_isp
from tests.e2e.conftest import start_daemon
from tests.health.conftest import check, cut, restore

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("failback", ["migrate", "new-flows"])
def test_failback_moves_only_the_migrating_policy(lab: Lab, write_config: Callable[..., str], failback: str) -> None:
    config = lab_config(
        policy("web", ["wan1", "wan2"], proto="tcp", dport=[443], failback=failback),
        policy("ssh", ["wan1", "wan2"], proto="tcp", dport=[22]),
        wan1=check([SERVER4], down_after=2, up_after=2))
    daemon = start_daemon(lab, write_config(config))
    daemon.wait_verdict("wan1")
    assert which_isp(lab.connect("host", SERVER4, 443)) == "isp1"

    cut(lab, "isp1")
    daemon.wait_state("wan1", "down")
    web = lab.hold("host", SERVER4, 443)
    ssh = lab.hold("host", SERVER4, 22)
    assert (which_isp(web.peer), which_isp(ssh.peer)) == ("isp2", "isp2")
    assert web.echo("on the backup") == "on the backup"

    restore(lab, "isp1")
    daemon.wait_state("wan1", "up")
    daemon.wait("the pass after wan1 came back",
                lambda d: d["policies"]["web"]["active"] == ["wan1"], deadline=10)
    cleared = [line for line in daemon.events("conntrack cleared") if "reason=failback" in line]
    if failback == "migrate":
        assert cleared and all("policy=web" in line and "uplink=wan2" in line for line in cleared), cleared
        assert web.echo("after failback") is None, "the migrating policy's flow stayed on the backup"
        assert which_isp(lab.connect("host", SERVER4, 443)) == "isp1"
    else:
        assert cleared == []
        assert web.echo("after failback") == "after failback"
    assert ssh.echo("after failback") == "after failback", "another policy's flow on the backup was cut"
    web.close()
    ssh.close()
    assert daemon.stop() == 0
