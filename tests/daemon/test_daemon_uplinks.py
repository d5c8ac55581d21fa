"""The daemon follows its uplinks: link, carrier, address, gateway and ifindex changes.

Each test changes one fact of the host's network the way the kernel, a DHCP
client or an administrator would, and then waits (with a deadline) for the
daemon's published view *and* the kernel objects to agree with it. With
``resync = 1h`` nothing but the change's own netlink events can explain a
convergence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .daemon_harness import CONVERGE, Daemon, TwoUplinks, config_text, wait_until

Start = Callable[..., Daemon]


def _default(net: TwoUplinks, table: int, family: str = "inet") -> dict[str, Any]:
    return net.default_via(table, family) or {}


def _wait_default(d: Daemon, net: TwoUplinks, table: int, gateway: str, family: str = "inet") -> dict[str, Any]:
    return d.wait(lambda: (r := _default(net, table, family)).get("gateway") == gateway and r,
                  f"table {table} {family} default via {gateway}")


def _wait_pick(d: Daemon, net: TwoUplinks, target: str) -> None:
    d.wait(lambda: net.pick() == target, f"policy ssh's pick chain to jump to {target}")


def test_admin_down_moves_policy_and_admin_up_reinstalls_the_table(net: TwoUplinks, start: Start) -> None:
    d = start(net, config_text())
    assert net.pick() == "set_wan2"
    assert _default(net, 102)["gateway"] == "203.0.113.1"

    net.host.ip("link", "set", "eth1", "down")
    d.wait_uplink("wan2", "down", "administratively down")
    _wait_pick(d, net, "set_wan1")
    assert d.status()["policies"]["ssh"]["active"] == ["wan1"]  # type: ignore[index]
    assert d.lines("policy moved") and d.lines("uplink down")
    # the kernel flushed table 102 silently: only the safety net is left
    assert not _default(net, 102)
    assert _default(net, 101)["gateway"] == "198.51.100.1"

    net.host.ip("link", "set", "eth1", "up")
    # admin down also dropped the static IPv6 address and the main default
    # routes via eth1; a DHCP client and router advertisements put them back
    net.host.ip("addr", "add", "2001:db8:2::2/64", "dev", "eth1", "nodad")
    net.add_defaults(1)
    d.wait_uplink("wan2", "up", "ok")
    _wait_default(d, net, 102, "203.0.113.1")
    _wait_default(d, net, 102, "2001:db8:2::1", "inet6")
    connected = [r for r in net.routes(102) if r["dst"] == "203.0.113.0/24"]
    assert connected and str(connected[0]["protocol"]) in ("109", "markrouted"), net.routes(102)
    _wait_pick(d, net, "set_wan2")
    assert net.source_rules("102") == {"203.0.113.2", "2001:db8:2::2"}


def test_admin_up_alone_brings_back_an_uplink_with_a_fixed_gateway(net: TwoUplinks, start: Start) -> None:
    """Nothing but the link events can bring it back: no DHCP, no IPv6 on the link."""
    net.host.sh("sysctl", "-qw", "net.ipv6.conf.eth1.disable_ipv6=1")
    d = start(net, config_text(wan2_gateway="203.0.113.1", wan2_gateway6="none"))
    assert d.uplink("wan2")["state"] == "up"
    assert _default(net, 102)["gateway"] == "203.0.113.1"

    net.host.ip("link", "set", "eth1", "down")
    d.wait_uplink("wan2", "down", "administratively down")
    _wait_pick(d, net, "set_wan1")

    net.host.ip("link", "set", "eth1", "up")
    d.wait_uplink("wan2", "up")
    route = _wait_default(d, net, 102, "203.0.113.1")
    assert route["dev"] == "eth1"
    _wait_pick(d, net, "set_wan2")


def test_carrier_loss_fails_over_and_keeps_the_linkdown_routes(net: TwoUplinks, start: Start) -> None:
    d = start(net, config_text())

    net.peer.ip("link", "set", "p1", "down")  # the cable pulled at the far end
    d.wait_uplink("wan2", "down", "no carrier")
    _wait_pick(d, net, "set_wan1")
    # carrier loss keeps the routes, flagged linkdown: the policy
    # moved in nftables, not by the accident of an emptied table
    d.wait(lambda: (r := _default(net, 102)).get("gateway") == "203.0.113.1" and "linkdown" in r.get("flags", []),
           "table 102's default route, flagged linkdown")

    net.peer.ip("link", "set", "p1", "up")
    d.wait_uplink("wan2", "up", "ok")
    _wait_pick(d, net, "set_wan2")
    assert "linkdown" not in _default(net, 102).get("flags", [])


def test_addresses_added_removed_and_changed_are_followed(net: TwoUplinks, start: Start) -> None:
    d = start(net, config_text())
    assert net.source_rules("102") == {"203.0.113.2", "2001:db8:2::2"}

    def wait_addresses(expected: set[str], gone: set[str]) -> None:
        d.wait(lambda: net.source_rules("102") == expected, f"from-rules for {sorted(expected)}")
        d.wait(lambda: all(a in net.masquerade("eth1") for a in expected)
               and not any(a in net.masquerade("eth1") for a in gone),
               f"masquerade sets to hold {sorted(expected)} and not {sorted(gone)}")

    net.host.ip("addr", "add", "203.0.113.3/24", "dev", "eth1")
    net.host.ip("addr", "add", "2001:db8:2::3/64", "dev", "eth1", "nodad")
    wait_addresses({"203.0.113.2", "203.0.113.3", "2001:db8:2::2", "2001:db8:2::3"}, set())

    net.host.ip("addr", "del", "203.0.113.3/24", "dev", "eth1")
    net.host.ip("addr", "del", "2001:db8:2::3/64", "dev", "eth1")
    wait_addresses({"203.0.113.2", "2001:db8:2::2"}, {"203.0.113.3", "2001:db8:2::3"})

    # renumbered: the new address arrives, the old one goes (promoted, so the
    # interface never has no address and the DHCP default route stays)
    net.host.sh("sysctl", "-qw", "net.ipv4.conf.eth1.promote_secondaries=1")
    net.host.ip("addr", "add", "203.0.113.5/24", "dev", "eth1")
    net.host.ip("addr", "add", "2001:db8:2::5/64", "dev", "eth1", "nodad")
    net.host.ip("addr", "del", "203.0.113.2/24", "dev", "eth1")
    net.host.ip("addr", "del", "2001:db8:2::2/64", "dev", "eth1")
    wait_addresses({"203.0.113.5", "2001:db8:2::5"}, {"203.0.113.2", "2001:db8:2::2"})
    d.wait(lambda: any(r["dst"] == "203.0.113.0/24" and r.get("prefsrc") == "203.0.113.5" for r in net.routes(102)),
           "table 102's connected route to use the new source address")
    d.wait_uplink("wan2", "up", "ok")
    # wan1 saw none of it
    assert net.source_rules("101") == {"198.51.100.2", "2001:db8:1::2"}


def test_gateway_change_and_loss_are_followed(net: TwoUplinks, start: Start) -> None:
    d = start(net, config_text())
    net.peer.ip("addr", "add", "203.0.113.254/24", "dev", "p1")
    net.peer.ip("addr", "add", "2001:db8:2::fe/64", "dev", "p1", "nodad")

    # a DHCP client renewing with another router replaces the default route
    net.host.ip("route", "replace", "default", "via", "203.0.113.254", "dev", "eth1", "metric", "200")
    net.host.ip("-6", "route", "replace", "default", "via", "2001:db8:2::fe", "dev", "eth1", "metric", "200")
    _wait_default(d, net, 102, "203.0.113.254")
    _wait_default(d, net, 102, "2001:db8:2::fe", "inet6")
    d.wait(lambda: d.uplink("wan2").get("gateway") == "203.0.113.254", "status to show the new gateway")
    assert _default(net, 101)["gateway"] == "198.51.100.1"

    # the lease is lost: no IPv4 gateway any more, IPv6 still carries
    net.host.ip("route", "del", "default", "dev", "eth1")
    d.wait_uplink("wan2", "up", "no ipv4 default route on eth1")
    d.wait(lambda: not _default(net, 102), "table 102's IPv4 default route to be removed")
    assert _default(net, 102, "inet6")["gateway"] == "2001:db8:2::fe"
    chain = net.nft("chain", "inet", "markrouted", "pick_0")
    assert "ipv4 goto set_wan1" in chain and "ipv6 goto set_wan2" in chain, chain


def test_interface_deleted_and_recreated_with_a_new_ifindex(net: TwoUplinks, start: Start) -> None:
    d = start(net, config_text())
    old = net.ifindex("eth1")

    net.host.ip("link", "del", "eth1")
    d.wait_uplink("wan2", "down", "interface eth1 does not exist")
    _wait_pick(d, net, "set_wan1")
    d.wait(lambda: net.source_rules("102") == set(), "the from-rules of eth1's addresses to go")
    assert not _default(net, 102)

    net.add_uplink(1)
    assert net.ifindex("eth1") != old
    d.wait_uplink("wan2", "up", "ok")
    route = _wait_default(d, net, 102, "203.0.113.1")
    assert route["dev"] == "eth1"
    _wait_default(d, net, 102, "2001:db8:2::1", "inet6")
    _wait_pick(d, net, "set_wan2")
    d.wait(lambda: net.source_rules("102") == {"203.0.113.2", "2001:db8:2::2"}, "from-rules of the new eth1")


def test_interface_that_appears_only_later(net_wan1_only: TwoUplinks, start: Start) -> None:
    net = net_wan1_only
    d = start(net, config_text())
    doc = d.status()
    assert doc and doc["in_sync"], d.context()
    assert doc["uplinks"]["wan2"]["state"] == "down"
    assert "interface eth1 does not exist" in doc["uplinks"]["wan2"]["reason"]
    assert net.pick() == "set_wan1"

    net.add_uplink(1)
    d.wait_uplink("wan2", "up", "ok")
    _wait_pick(d, net, "set_wan2")
    assert _wait_default(d, net, 102, "203.0.113.1")["dev"] == "eth1"
    wait_until(lambda: d.notes.values("STATUS")[-1:] == ["2/2 uplinks up, 1 policies, in sync"],
               "STATUS= to report both uplinks up", CONVERGE, d.context)
