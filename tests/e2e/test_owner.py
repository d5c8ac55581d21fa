"""``uid`` and ``cgroup`` policies: the same destination, two local owners, two uplinks.

Who opened a socket (its user, or the cgroup v2 of its process) picks the
uplink, for local traffic only. Both families; the process that connects is
a fresh one per connection (setpriv to change the user; a shell that writes
its own pid to the cgroup's ``cgroup.procs`` and then execs the client).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from lab.topology import SERVERS, Lab, customer, policy

pytestmark = pytest.mark.e2e


def test_uid_policies_send_two_users_by_two_uplinks(lab: Lab, apply: Callable[..., str]) -> None:
    """uid 1001 leaves by isp2, uid 1000 by isp1, root (no policy) by the main table (isp1).

    Before markrouted both users leave by isp1; the uid 1001 policy is what
    moves that user, and only that user, to isp2.
    """
    for server in SERVERS:
        assert lab.connect("host", server, 80, uid=1001) == customer("isp1", server)
    apply(
        policy("user-1001", ["wan2"], proto="tcp", dport=[80], uid=[1001]),
        policy("user-1000", ["wan1"], proto="tcp", dport=[80], uid=[1000]),
    )
    for server in SERVERS:
        assert lab.connect("host", server, 80, uid=1001) == customer("isp2", server)
        assert lab.connect("host", server, 80, uid=1000) == customer("isp1", server)
        assert lab.connect("host", server, 80) == customer("isp1", server)


def test_cgroup_policies_send_two_cgroups_by_two_uplinks(
    lab: Lab, apply: Callable[..., str], cgroups: tuple[str, str, str]
) -> None:
    """A process in cgroup b leaves by isp2, one in cgroup a by isp1, to the same destination."""
    a, b, base = cgroups
    apply(
        policy("backup", ["wan2"], proto="tcp", dport=[80], cgroup=b),
        policy("interactive", ["wan1"], proto="tcp", dport=[80], cgroup=a),
    )
    for server in SERVERS:
        assert lab.connect_in_cgroup("host", os.path.join(base, b), server, 80) == customer("isp2", server)
        assert lab.connect_in_cgroup("host", os.path.join(base, a), server, 80) == customer("isp1", server)
        assert lab.connect("host", server, 80) == customer("isp1", server)
