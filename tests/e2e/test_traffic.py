"""Where packets go: every routing promise markrouted makes, proven with real connections.

Each test opens TCP connections in the lab (IPv4 and IPv6) and asks the far
end which address it saw: the host's address at isp1 or at isp2 names the ISP
that carried the connection, and the ISPs' anti-spoofing filters (BCP 38) make
sure that a packet with the wrong source for its path never arrives at all.
Each test first shows the behaviour is markrouted's doing (before ``apply``,
or with the feature switched off in the config, the traffic goes elsewhere or
dies), then shows it with markrouted.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lab.topology import CLIENT4, CLIENT6, CONNECT_TIMEOUT, LAN4, LAN6, SERVERS, Lab, customer, policy, which_isp

pytestmark = pytest.mark.e2e

#: a connection expected to fail is given this long: the lab's RTT is well
#: under a millisecond, so a SYN that got no answer in 1.5 s was dropped
FAIL_FAST = 1.5

SSH = policy("ssh", ["wan2", "wan1"], proto="tcp", dport=[22])
WEB = policy("web", ["wan1", "wan2"], proto="tcp", dport=[80, 443])


def seen(lab: Lab, role: str, port: int, timeout: float = CONNECT_TIMEOUT) -> dict[str, str | None]:
    """Which address the server saw for one connection per family, by server address."""
    return dict(zip(SERVERS, lab.connect_all([(role, server, port) for server in SERVERS], timeout=timeout)))


def by(isp: str) -> dict[str, str | None]:
    """What :func:`seen` returns when ``isp`` carried both families."""
    return {server: customer(isp, server) for server in SERVERS}


def test_classic_ssh_by_uplink2_the_rest_by_uplink1(lab: Lab, apply: Callable[..., str]) -> None:
    """TCP 22 leaves by uplink 2, web by uplink 1, unmatched traffic follows the main table.

    Without markrouted everything leaves by the main table's default route
    (isp1). With it, port 22 moves to isp2 with isp2's source address. Then the
    main table is made to prefer isp2: web stays on isp1 (its policy, not the
    main table, decides) and unmatched traffic (8080) follows the main table
    to isp2, exactly as it would without markrouted.
    """
    assert seen(lab, "host", 22) == by("isp1")

    path = apply(SSH, WEB)
    assert seen(lab, "host", 22) == by("isp2")
    assert seen(lab, "host", 80) == by("isp1")
    assert seen(lab, "host", 443) == by("isp1")
    assert seen(lab, "host", 8080) == by("isp1")

    lab.prefer_main("isp2")
    apply(path=path)
    assert seen(lab, "host", 22) == by("isp2")
    assert seen(lab, "host", 80) == by("isp1")
    assert seen(lab, "host", 8080) == by("isp2")


def test_forwarded_lan_traffic_follows_the_policies(lab: Lab, apply: Callable[..., str]) -> None:
    """The LAN client's connections follow the policies, with ``iif`` given and without.

    ``lan-ssh`` (iif = "lan0") moves the client's port 22 to isp2 but not the
    host's own; ``web`` (no iif) moves both to isp2; unmatched traffic (443)
    keeps the main table's isp1. Every LAN connection leaves with the
    uplink's address (masquerade): before markrouted, with no NAT at all, the
    ISPs drop the client's packets and nothing connects.
    """
    lan_ssh = policy("lan-ssh", ["wan2"], iif="lan0", proto="tcp", dport=[22])
    web = policy("web", ["wan2"], proto="tcp", dport=[80])
    assert seen(lab, "client", 22, timeout=FAIL_FAST) == {s: None for s in SERVERS}

    apply(lan_ssh, web)
    assert seen(lab, "client", 22) == by("isp2")
    assert seen(lab, "client", 80) == by("isp2")
    assert seen(lab, "client", 443) == by("isp1")
    assert seen(lab, "host", 22) == by("isp1"), "an iif policy must not match locally generated traffic"
    assert seen(lab, "host", 80) == by("isp2")


PORT_FORWARD = """
table inet portfwd {
  chain pre { type nat hook prerouting priority -100; policy accept;
    iifname "eth1" meta nfproto ipv4 tcp dport 8023 dnat ip to 192.0.2.10:8022
    iifname "eth1" meta nfproto ipv6 tcp dport 8023 dnat ip6 to [2001:db8:c::10]:8022
  }
}
"""


def test_replies_leave_by_the_uplink_the_connection_came_in_on(lab: Lab, apply: Callable[..., str]) -> None:
    """Connections coming in on uplink 2 are answered through uplink 2, v4 and v6.

    The main table's default route points at isp1, so without markrouted the
    host's answers to a connection that arrived through isp2 leave by isp1
    with isp2's address, and isp1's anti-spoofing filter drops them: the
    connection fails and isp1's ``spoofed`` counter rises. This holds for a
    service on the host itself and for a port forwarded (DNAT) to the LAN
    client, whose replies are routed before their source is rewritten, so
    only the connection's mark (not a source rule) can send them back by
    isp2. With markrouted both work and isp1 drops nothing.
    """
    lab.serve("host", 8022)
    lab.serve("client", 8022)
    lab.nft("host", PORT_FORWARD)
    targets = {"203.0.113.2": "198.18.2.2", "2001:db8:2::2": "2001:db8:f2::2"}
    # The failed attempts leave half-open connections behind, whose SYN-ACKs
    # the host and the client would retransmit for a minute (at 1, 3, 7 s...),
    # each dying at isp1's filter: one landing after apply would count against
    # markrouted. Without retransmissions the last of them is sent while the
    # failing attempts are still waiting.
    for role in ("host", "client"):
        lab.sh(role, "sysctl", "-qw", "net.ipv4.tcp_synack_retries=0")

    dropped = lab.spoofed_drops("isp1")
    attempts = [("server", addr, port) for addr in targets for port in (8022, 8023)]
    assert lab.connect_all(attempts, timeout=FAIL_FAST) == [None] * len(attempts)
    assert lab.spoofed_drops("isp1") > dropped, "the replies should have died at isp1's filter"

    apply()
    dropped = lab.spoofed_drops("isp1")
    for addr, server_side in targets.items():
        assert lab.connect("server", addr, 8022) == server_side, f"host service via {addr}"
        assert lab.connect("server", addr, 8023) == server_side, f"port forward via {addr}"
    assert lab.spoofed_drops("isp1") == dropped
    # and what came in on uplink 1 is still answered there
    assert lab.connect("server", "198.51.100.2", 8022) == "198.18.1.2"
    assert lab.connect("server", "2001:db8:1::2", 8022) == "2001:db8:f1::2"


@pytest.mark.parametrize("masquerade", [True, False])
def test_masquerade_gives_rerouted_traffic_the_uplinks_address(
    lab: Lab, apply: Callable[..., str], masquerade: bool
) -> None:
    """Local traffic re-routed to uplink 2 leaves with 203.0.113.2 only with ``masquerade = true``.

    The socket's source is chosen by the main table (isp1's address); the
    mark only re-routes the packet. With masquerade the server sees isp2's
    address; without it isp2's anti-spoofing filter drops the packets (its
    ``spoofed`` counter rises, the server sees no connection attempt), while
    a socket bound to isp2's own address still gets through.
    """
    apply(SSH, wan2=f"masquerade = {'true' if masquerade else 'false'}")
    dropped = lab.spoofed_drops("isp2")
    syns = lab.syns("isp2", 22)
    if masquerade:
        assert seen(lab, "host", 22) == by("isp2")
        assert lab.spoofed_drops("isp2") == dropped
        return
    assert seen(lab, "host", 22, timeout=FAIL_FAST) == {s: None for s in SERVERS}
    assert lab.spoofed_drops("isp2") >= dropped + 2
    assert lab.syns("isp2", 22) == syns
    for server in SERVERS:
        own = customer("isp2", server)
        assert lab.connect("host", server, 22, source=own) == own


@pytest.mark.parametrize("keep_main_routes", [True, False])
def test_keep_main_routes_keeps_the_lan_reachable(
    lab: Lab, apply: Callable[..., str], keep_main_routes: bool
) -> None:
    """A policy matching every destination must not steal the LAN's traffic (keep_main_routes).

    The policy sends TCP 2222 to any address (0.0.0.0/0, ::/0) by uplink 2.
    With ``keep_main_routes = true`` (the default) the main table's LAN route
    still wins for the LAN client (192.0.2.10, 2001:db8:c::10): the client
    sees the host's LAN address. With ``false`` the expected effect is that the
    LAN becomes unreachable for that traffic: it is sent to isp2, which has
    no route to the LAN. Traffic to the internet follows the policy either way.
    """
    lab.serve("client", 2222)
    ssh_anywhere = policy("ssh-anywhere", ["wan2"], proto="tcp", dport=[2222], daddr=["0.0.0.0/0", "::/0"])
    apply(ssh_anywhere, settings=f"keep_main_routes = {'true' if keep_main_routes else 'false'}")

    assert seen(lab, "host", 2222) == by("isp2")
    lan = lab.connect_all([("host", CLIENT4, 2222), ("host", CLIENT6, 2222)],
                          timeout=CONNECT_TIMEOUT if keep_main_routes else FAIL_FAST)
    if keep_main_routes:
        assert lan == [LAN4, LAN6]
    else:
        assert lan == [None, None]
        assert which_isp(lab.connect("host", SERVERS[0], 2222)) == "isp2"
