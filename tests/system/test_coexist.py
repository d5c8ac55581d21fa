"""markrouted next to the software that usually manages a Debian machine's network:
systemd-networkd, NetworkManager and firewalld, each the real daemon, on a real systemd
booted in a container (the packaged .deb installed by apt).

::

    container (systemd, markrouted, networkd or NetworkManager, firewalld)
      wan1 198.51.100.2  2001:db8:1::2 ── isp1 ──┐       server 198.18.0.10 / 2001:db8:ff::10
      wan2 203.0.113.2   2001:db8:2::2 ── isp2 ──┴──     (tells the peer address it sees)

The ISPs, the server and the veth pairs are made by the test; the container's side
of each uplink (its addresses and default routes, metric 100 via isp1 and 200 via
isp2) is configured by the network manager under test, never by the test itself.
Policy "web" sends port 80 by wan2 first; everything else follows the main table.

What markrouted's objects went through is watched with ``ip monitor`` on the
container's namespace and with markrouted's own journal ("drift repaired": someone
else removed or changed an object of markrouted's).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .nspawn import SUITES, Container, deb_relations, poll, rootfs_variant, run
from .test_systemd import (AGENT, ISP_OF, POLL_DEADLINE, POLL_TIMEOUT, PROTO, PYTHON, SERVER4, SERVER6,
                           TWO_UPLINKS, events, wait_event, wait_status)

pytestmark = pytest.mark.system

EXTRA = ("network-manager", "firewalld")
EXAMPLE = "/usr/share/doc/markrouted/examples/networkd-markrouted.conf"
DROPIN = "/etc/systemd/networkd.conf.d/markrouted.conf"
IN_SYNC = r"^2/2 uplinks up, 2 policies, in sync$"
#: what each uplink gets from the network manager: addresses, gateways, metric
UPLINKS = {
    "wan1": ("198.51.100.2/24", "2001:db8:1::2/64", "198.51.100.1", "2001:db8:1::1", 100),
    "wan2": ("203.0.113.2/24", "2001:db8:2::2/64", "203.0.113.1", "2001:db8:2::1", 200),
}
MANAGERS = ("systemd-networkd", "NetworkManager")


# ------------------------------------------------------------------ the container and the network


@pytest.fixture(scope="module", params=SUITES)
def container(deb: str, request: pytest.FixtureRequest) -> Iterator[Container]:
    """A booted container with NetworkManager and firewalld installed (stopped and disabled:
    each test starts what it needs) and the .deb installed by apt."""
    suite: str = request.param
    root = rootfs_variant(deb_relations(deb, "Depends", "Recommends"), EXTRA, suite, "coexist")
    with Container(root, suite) as ct:
        ct.sh("systemctl", "disable", "--now", "NetworkManager", "firewalld", timeout=120)
        ct.write("/tmp/markrouted.deb", open(deb, "rb").read())
        ct.sh("apt-get", "install", "-y", "-q", "--no-install-recommends", "/tmp/markrouted.deb", timeout=300)
        yield ct


class Net:
    """The ISPs and the server around the container; the container's side is left to others."""

    def __init__(self, ct: Container) -> None:
        self.ct = ct
        self.server: subprocess.Popen[str] | None = None

    def ip(self, ns: str, *args: str) -> str:
        return run(["ip", "-n", ns, *args]).stdout

    def build(self) -> None:
        ct = self.ct
        isp1, isp2, server = ct.add_netns("isp1"), ct.add_netns("isp2"), ct.add_netns("server")
        for ns in (ct.ns, isp1, isp2, server):
            run(["nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0",
                 "net.ipv6.conf.all.accept_dad=0"])
        self.veth("wan1", isp1)
        self.veth("wan2", isp2)
        run(["ip", "link", "add", "core", "netns", isp1, "type", "veth", "peer", "name", "isp1", "netns", server])
        run(["ip", "link", "add", "core", "netns", isp2, "type", "veth", "peer", "name", "isp2", "netns", server])
        for ns, dev, addrs in (
            (isp1, "cust", ("198.51.100.1/24", "2001:db8:1::1/64")),
            (isp2, "cust", ("203.0.113.1/24", "2001:db8:2::1/64")),
            (isp1, "core", ("198.18.1.1/24", "2001:db8:f1::1/64")),
            (isp2, "core", ("198.18.2.1/24", "2001:db8:f2::1/64")),
            (server, "isp1", ("198.18.1.2/24", "2001:db8:f1::2/64")),
            (server, "isp2", ("198.18.2.2/24", "2001:db8:f2::2/64")),
            (server, "lo", (f"{SERVER4}/32", f"{SERVER6}/128")),
        ):
            for cidr in addrs:
                self.ip(ns, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else []))
            self.ip(ns, "link", "set", dev, "up")
        for ns in (isp1, isp2):
            run(["nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw", "net.ipv4.ip_forward=1",
                 "net.ipv6.conf.all.forwarding=1"])
        for ns, up4, up6 in ((isp1, "198.18.1.2", "2001:db8:f1::2"), (isp2, "198.18.2.2", "2001:db8:f2::2")):
            self.ip(ns, "route", "add", "default", "via", up4)
            self.ip(ns, "-6", "route", "add", "default", "via", up6)
        for prefix, via in (("198.51.100.0/24", "198.18.1.1"), ("203.0.113.0/24", "198.18.2.1"),
                            ("2001:db8:1::/64", "2001:db8:f1::1"), ("2001:db8:2::/64", "2001:db8:f2::1")):
            self.ip(server, "route", "add", prefix, "via", via)
        self.server = subprocess.Popen(["nsenter", f"--net=/run/netns/{server}", PYTHON, AGENT, "serve", "22", "80"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        poll("the server to listen", lambda: run(["nsenter", f"--net=/run/netns/{server}", "ss", "-Htln",
                                                  "sport = :80"]).stdout.strip())

    def veth(self, name: str, peer_ns: str) -> None:
        """A link ``name`` in the container whose peer ``cust`` is up in ``peer_ns``."""
        run(["ip", "link", "add", name, "netns", self.ct.ns, "type", "veth", "peer", "name", "cust",
             "netns", peer_ns])
        self.ip(peer_ns, "link", "set", "cust", "up")

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=10)

    def connect(self, addr: str, port: int, timeout: float = POLL_TIMEOUT) -> str | None:
        """Which ISP carried a TCP connection from the container to the server (None: failed)."""
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{self.ct.ns}", PYTHON, AGENT, "connect", addr,
                               str(port), str(timeout)], capture_output=True, text=True, timeout=timeout + 15)
        peer = proc.stdout.strip()
        return ISP_OF.get(peer, f"other ({peer})") if peer else None

    def follows_policies(self) -> bool:
        """web (port 80) by wan2, anything else by the main table's first choice (isp1), v4 and v6."""
        return all(self.connect(addr, port) == isp for addr in (SERVER4, SERVER6)
                   for port, isp in ((80, "isp2"), (22, "isp1")))

    def owned(self) -> dict[str, list[str]]:
        """markrouted's rules and routes, as the kernel lists them."""
        ns = self.ct.ns
        rules = sorted(line for fam in ("-4", "-6") for line in self.ip(ns, fam, "rule", "show").splitlines()
                       if f"proto {PROTO}" in line or "proto markrouted" in line)
        routes = sorted(line for fam in ("-4", "-6")
                        for line in self.ip(ns, fam, "route", "show", "table", "all", "proto", PROTO).splitlines())
        return {"rules": rules, "routes": routes}


class Monitor:
    """``ip monitor rule route`` on the container's namespace: every deletion of markrouted's objects."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(["ip", "-n", ns, "monitor", "rule", "route"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        time.sleep(0.2)  # ip monitor has no "listening" signal; events before it are not the test's

    def deleted(self) -> list[str]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        return [line for line in out.splitlines()
                if line.startswith("Deleted") and (f"proto {PROTO}" in line or "proto markrouted" in line)]


@pytest.fixture(scope="module")
def net(container: Container) -> Iterator[Net]:
    n = Net(container)
    try:
        n.build()
        yield n
    finally:
        n.stop()
