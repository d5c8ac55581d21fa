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

The container boots a cached variant of the release's root file system with
NetworkManager and firewalld installed by apt (``nspawn.rootfs_variant``); both are
disabled at boot, and each test starts the manager it is about. A DHCP server, where
one is needed, is the host's dnsmasq run in an ISP's namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import missing  # the suite's root conftest
from .nspawn import SUITES, Container, deb_relations, poll, rootfs_variant, run, without_counts
from .test_systemd import (AGENT, ISP_OF, POLL_DEADLINE, POLL_TIMEOUT, PROTO, PYTHON, SERVER4, SERVER6,
                           TWO_UPLINKS, build_upstream, events, wait_event, wait_status)

pytestmark = pytest.mark.system

EXTRA = ("network-manager", "firewalld", "netbase")  # firewalld needs /etc/protocols
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
        build_upstream(isp1, isp2, server)
        self.server = subprocess.Popen(["nsenter", f"--net=/run/netns/{server}", PYTHON, AGENT, "serve", "22", "80"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        poll("the server to listen", lambda: run(["nsenter", f"--net=/run/netns/{server}", "ss", "-Htln",
                                                  "sport = :80"]).stdout.strip())

    def veth(self, name: str, peer_ns: str, peer: str = "cust") -> None:
        """A link ``name`` in the container whose peer ``peer`` is up in ``peer_ns``."""
        run(["ip", "link", "add", name, "netns", self.ct.ns, "type", "veth", "peer", "name", peer,
             "netns", peer_ns])
        self.ip(peer_ns, "link", "set", peer, "up")

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
    """``ip monitor rule route`` on the container's namespace: every deletion of markrouted's objects.

    Ready once it has seen a route the test adds and removes in a table nobody uses.
    """

    MARKER = ("unreachable", "198.18.250.0/24", "table", "250")

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.lines: list[str] = []
        self.proc = subprocess.Popen(["ip", "-n", ns, "monitor", "rule", "route"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            def seen() -> bool:
                # added and removed each time: replacing a route by an identical one is not announced
                run(["ip", "-n", ns, "route", "replace", *self.MARKER])
                run(["ip", "-n", ns, "route", "del", *self.MARKER])
                return any("198.18.250.0/24" in line for line in self.lines)
            poll("ip monitor to listen", seen)
        except BaseException:
            self.deleted()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def deleted(self) -> list[str]:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=10)
        return [line for line in self.lines
                if line.startswith("Deleted") and (f"proto {PROTO}" in line or "proto markrouted" in line)]


@pytest.fixture(scope="module")
def net(container: Container) -> Iterator[Net]:
    n = Net(container)
    try:
        n.build()
        yield n
    finally:
        n.stop()


def markrouted_events(ct: Container, since: float, event: str) -> list[dict[str, Any]]:
    return [e for e in events(ct, since) if e.get("MARKROUTED_EVENT") == event]


def check_kernel(ct: Container) -> tuple[int, list[str]]:
    """``markrouted check --kernel``: exit status and its lines."""
    proc = ct.sh("markrouted", "check", "--kernel", check=False)
    return proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()


def running_markrouted(ct: Container, net: Net, config: str = TWO_UPLINKS) -> None:
    """markrouted running ``config``, in sync, the policies followed."""
    if ct.sh("cat", "/etc/markrouted.toml").stdout != config:
        ct.write("/etc/markrouted.toml", config)
        ct.sh("systemctl", "restart", "markrouted")
    ct.sh("systemctl", "start", "markrouted")
    wait_status(ct, IN_SYNC)
    poll("the policies to be followed", net.follows_policies, POLL_DEADLINE)


def network_file(name: str, a4: str, a6: str | None = None, g4: str | None = None, g6: str | None = None,
                 metric: int = 0) -> str:
    text = f"[Match]\nName={name}\n\n[Network]\nIPv6AcceptRA=no\nAddress={a4}\n"
    text += f"Address={a6}\n" if a6 else ""
    for gw in (g4, g6):
        text += f"\n[Route]\nGateway={gw}\nMetric={metric}\n" if gw else ""
    return text


def configured(ct: Container, *links: str) -> bool:
    out = ct.sh("networkctl", "list", "--no-legend", "--no-pager", *links, check=False).stdout
    return len(out.splitlines()) == len(links) and all(line.split()[-1] == "configured"
                                                       for line in out.splitlines())


def use_networkd(ct: Container, net: Net, dropin: bool) -> None:
    """systemd-networkd configures both uplinks, with or without the shipped drop-in, restarted
    so that it reads its networkd.conf; NetworkManager stopped."""
    if ct.show("NetworkManager", "ActiveState") != "inactive":
        ct.sh("systemctl", "stop", "NetworkManager")
        for name in UPLINKS:  # what it configured stays behind: the uplinks start out bare
            ct.sh("ip", "addr", "flush", "dev", name)
    for name, (a4, a6, g4, g6, metric) in UPLINKS.items():
        ct.write(f"/etc/systemd/network/{name}.network", network_file(name, a4, a6, g4, g6, metric))
    if dropin:
        ct.sh("mkdir", "-p", "/etc/systemd/networkd.conf.d")
        ct.sh("cp", EXAMPLE, DROPIN)
    else:
        ct.sh("rm", "-f", DROPIN)
    ct.sh("systemctl", "restart", "systemd-networkd")
    try:
        poll("networkd to configure the uplinks", lambda: configured(ct, *UPLINKS), 30)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: {ct.sh('networkctl', 'list', '--no-pager', check=False).stdout}") from None
    running_markrouted(ct, net)


def new_link(ct: Container, net: Net, name: str, address: str) -> None:
    """A link ``name`` appears, which networkd is told to configure; returns once it is configured."""
    ct.write(f"/etc/systemd/network/{name}.network", network_file(name, address))
    ct.sh("networkctl", "reload")
    net.veth(name, f"{ct.name}-isp1", f"to-{name}")
    poll(f"networkd to configure {name}", lambda: configured(ct, name), 30)


def not_of(uplink: str, deleted: list[str]) -> list[str]:
    """The deleted objects of markrouted's that did not hang on ``uplink``'s addresses: the
    other uplink's, and those of no uplink (fwmark rules, the suppressing rule, the kill switch)."""
    other = {"wan1": "101", "wan2": "102"}[{"wan1": "wan2", "wan2": "wan1"}[uplink]]
    return [line for line in deleted if any(s in line for s in ("fwmark", "suppress_prefixlength", "unreachable",
                                                                 f"table {other}", f"lookup {other}"))]


# ------------------------------------------------------------------ systemd-networkd


def test_networkd_defaults_are_warned_about_and_delete_everything(container: Container, net: Net) -> None:
    """With networkd's defaults, a link it configures costs markrouted all its rules and the kill
    switch; check --kernel names both settings and the drop-in; markrouted repairs, and the two
    do not fight afterwards."""
    ct = container
    use_networkd(ct, net, dropin=False)
    status, lines = check_kernel(ct)
    assert status == 0, lines
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 2, lines
    assert any("ManageForeignRoutingPolicyRules=yes (the default)" in w for w in warnings), lines
    assert any("ManageForeignRoutes=yes (the default)" in w for w in warnings), lines
    assert all(EXAMPLE in w and DROPIN in w for w in warnings), lines

    before = net.owned()
    since = time.time()
    monitor = Monitor(ct.ns)
    try:
        new_link(ct, net, "lan3", "192.0.2.1/26")
        wait_event(ct, since, MARKROUTED_EVENT="drift repaired")
    finally:
        deleted = monitor.deleted()
    for what in ("fwmark 0x10000/0xff0000 lookup 101", "fwmark 0x20000/0xff0000 lookup 102",
                 "suppress_prefixlength 0", "unreachable default table 101", "unreachable default table 102"):
        assert any(what in line for line in deleted), (what, deleted)
    poll("markrouted to restore everything", lambda: net.owned() == before)
    wait_status(ct, IN_SYNC)
    assert net.follows_policies()
    quiet = time.time()
    time.sleep(3)  # an observation window: networkd and markrouted taking turns would show in it
    assert events(ct, quiet) == []
    assert net.owned() == before


def test_networkd_with_the_shipped_dropin_deletes_nothing(container: Container, net: Net) -> None:
    """With the drop-in: a new link, `networkctl reconfigure` and `networkctl reload` after a file
    change delete none of markrouted's objects; check --kernel is silent."""
    ct = container
    use_networkd(ct, net, dropin=True)
    status, lines = check_kernel(ct)
    assert (status, lines) == (0, ["/etc/markrouted.toml: valid; kernel: 0 errors, 0 warnings"])

    before = net.owned()
    since = time.time()
    monitor = Monitor(ct.ns)
    try:
        new_link(ct, net, "lan4", "192.0.2.65/26")
        ct.sh("networkctl", "reconfigure", "lan4")
        ct.write("/etc/systemd/network/lan4.network", network_file("lan4", "192.0.2.66/26"))
        ct.sh("networkctl", "reload")
        poll("networkd to apply the changed file",
             lambda: "192.0.2.66/26" in net.ip(ct.ns, "-4", "addr", "show", "dev", "lan4") and configured(ct, "lan4"),
             deadline=30.0)  # networkd re-reads and reconfigures; a loaded machine is slow at it
        assert net.follows_policies()
    finally:
        deleted = monitor.deleted()
    assert deleted == []
    assert net.owned() == before
    assert markrouted_events(ct, since, "drift repaired") == []

    # an uplink itself reconfigured: networkd takes its addresses away and back, so markrouted
    # takes down, then restores, what hangs on them; nothing else of markrouted's goes
    since = time.time()
    monitor = Monitor(ct.ns)
    try:
        ct.sh("networkctl", "reconfigure", "wan2")
        a4, a6, g4, g6, _ = UPLINKS["wan2"]
        ct.write("/etc/systemd/network/wan2.network", network_file("wan2", a4, a6, g4, g6, 210))
        ct.sh("networkctl", "reload")
        poll("networkd to apply wan2's new metric",
             lambda: "metric 210" in net.ip(ct.ns, "-4", "route", "show", "default", "dev", "wan2"), 30)
        wait_status(ct, IN_SYNC)
    finally:
        deleted = monitor.deleted()
    assert not_of("wan2", deleted) == [], deleted
    assert markrouted_events(ct, since, "drift repaired") == []
    poll("wan2's objects to be back", lambda: net.owned() == before)
    poll("the policies to be followed", net.follows_policies, POLL_DEADLINE)
    status, lines = check_kernel(ct)
    assert (status, lines) == (0, ["/etc/markrouted.toml: valid; kernel: 0 errors, 0 warnings"])


# ------------------------------------------------------------------ NetworkManager


def keyfile(name: str, extra: str = "", dhcp: bool = False) -> str:
    """A connection profile for uplink ``name``, IPv4 static or by DHCP; ``extra`` goes into its
    [ipv4] and [ipv6] sections."""
    a4, a6, g4, g6, metric = UPLINKS[name]
    ipv4 = "method=auto" if dhcp else f"method=manual\naddress1={a4},{g4}"
    return (f"[connection]\nid={name}\ntype=ethernet\ninterface-name={name}\n\n"
            f"[ipv4]\n{ipv4}\nroute-metric={metric}\n{extra}\n"
            f"[ipv6]\nmethod=manual\naddress1={a6},{g6}\nroute-metric={metric}\naddr-gen-mode=eui64\n{extra}")


def use_networkmanager(ct: Container, net: Net, extra: dict[str, str] | None = None,
                       dhcp: tuple[str, ...] = ()) -> None:
    """NetworkManager configures both uplinks from keyfiles (static addresses and gateways,
    metric 100 and 200; ``dhcp``: these learn their IPv4 address and gateway by DHCP instead);
    systemd-networkd stopped, and what it configured flushed."""
    if ct.show("systemd-networkd", "ActiveState") != "inactive":
        ct.sh("systemctl", "stop", "systemd-networkd.socket", "systemd-networkd")
        for name in UPLINKS:
            ct.sh("ip", "addr", "flush", "dev", name)
        ct.sh("rm", "-f", *(f"/etc/systemd/network/{n}.network" for n in UPLINKS))
    for name in UPLINKS:
        path = f"/etc/NetworkManager/system-connections/{name}.nmconnection"
        ct.write(path, keyfile(name, (extra or {}).get(name, ""), name in dhcp))
        ct.sh("chmod", "600", path)
    ct.sh("systemctl", "start", "NetworkManager")
    poll("NetworkManager to answer on D-Bus",
         lambda: ct.sh("nmcli", "connection", "reload", check=False).returncode == 0, 30)
    for name in UPLINKS:
        ct.sh("nmcli", "--wait", "20", "connection", "up", name, timeout=60)


def test_networkmanager_failover_and_back(container: Container, net: Net) -> None:
    """NetworkManager's routes in the main table are what gateway = "auto" follows: a connection
    taken down and brought back moves the policy and back; NetworkManager removes nothing of
    markrouted's on its own, and neither fights the other afterwards."""
    ct = container
    use_networkmanager(ct, net)
    running_markrouted(ct, net)
    assert check_kernel(ct) == (0, ["/etc/markrouted.toml: valid; kernel: 0 errors, 0 warnings"])
    routes = net.ip(ct.ns, "-4", "route", "show", "default")
    assert "via 198.51.100.1 dev wan1 proto static metric 100" in routes, routes  # NetworkManager's own

    before = net.owned()
    since = time.time()
    monitor = Monitor(ct.ns)
    try:
        ct.sh("nmcli", "connection", "down", "wan2")
        wait_event(ct, since, MARKROUTED_EVENT="uplink down", MARKROUTED_UPLINK="wan2")
        for addr in (SERVER4, SERVER6):
            poll("web to fail over to wan1", lambda a=addr: net.connect(a, 80) == "isp1", POLL_DEADLINE)
        ct.sh("nmcli", "--wait", "20", "connection", "up", "wan2", timeout=60)
        wait_status(ct, IN_SYNC)
        poll("web to return to wan2", net.follows_policies, POLL_DEADLINE)
        ct.sh("nmcli", "device", "reapply", "wan1")
        assert net.follows_policies()
    finally:
        deleted = monitor.deleted()
    # what went, went with wan2's addresses (markrouted's own doing); the rest stayed
    assert not_of("wan2", deleted) == [], deleted
    assert markrouted_events(ct, since, "drift repaired") == []
    assert net.owned() == before

    quiet = time.time()
    time.sleep(3)  # an observation window: a fight would show as writes in it
    assert events(ct, quiet) == []


@pytest.fixture
def dhcp_on_isp2(container: Container) -> Iterator[None]:
    """A DHCP server (dnsmasq) on isp2's side of wan2 that leases 203.0.113.2 with router 203.0.113.1."""
    if shutil.which("dnsmasq") is None:
        missing("needs dnsmasq (scripts/install-deps --test installs dnsmasq-base)")
    ns = f"{container.name}-isp2"
    leases = tempfile.NamedTemporaryFile(prefix="markrouted-leases-", delete=False)
    leases.close()
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "dnsmasq", "--keep-in-foreground",
                             "--port=0", "--interface=cust", "--bind-interfaces", "--no-resolv", "--no-hosts",
                             "--dhcp-range=203.0.113.2,203.0.113.2,255.255.255.0,10m",
                             "--dhcp-option=option:router,203.0.113.1", f"--dhcp-leasefile={leases.name}",
                             "--pid-file=", "--log-facility=-", "--conf-file=/dev/null"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        poll("dnsmasq to listen", lambda: run(["nsenter", f"--net=/run/netns/{ns}", "ss", "-Hluan",
                                               "sport = :67"]).stdout.strip() or proc.poll() is not None)
        assert proc.poll() is None, "dnsmasq exited"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.unlink(leases.name)


def test_networkmanager_dhcp_gateway_is_followed(container: Container, net: Net, dhcp_on_isp2: None) -> None:
    """wan2's IPv4 address and gateway learnt by NetworkManager's DHCP client: gateway = "auto"
    follows the route it installs (proto dhcp, metric 200), away and back."""
    ct = container
    use_networkmanager(ct, net, dhcp=("wan2",))
    try:
        running_markrouted(ct, net)
        routes = net.ip(ct.ns, "-4", "route", "show", "default", "dev", "wan2")
        assert "via 203.0.113.1 proto dhcp" in routes and "metric 200" in routes, routes
        assert "default via 203.0.113.1 dev wan2" in net.ip(ct.ns, "-4", "route", "show", "table", "102")
        since = time.time()
        ct.sh("nmcli", "connection", "down", "wan2")
        wait_event(ct, since, MARKROUTED_EVENT="uplink down", MARKROUTED_UPLINK="wan2")
        poll("web to fail over to wan1", lambda: net.connect(SERVER4, 80) == "isp1", POLL_DEADLINE)
        ct.sh("nmcli", "--wait", "30", "connection", "up", "wan2", timeout=60)
        wait_status(ct, IN_SYNC)
        poll("web to return to wan2", net.follows_policies, POLL_DEADLINE)
        assert markrouted_events(ct, since, "drift repaired") == []
    finally:
        use_networkmanager(ct, net)


def test_networkmanager_networking_off_keeps_the_kill_switch(container: Container, net: Net) -> None:
    """`nmcli networking off` takes both uplinks' addresses and, with the loopback it manages,
    markrouted's IPv6 unreachable defaults (they hang on lo): markrouted puts them back at once."""
    ct = container
    use_networkmanager(ct, net)
    running_markrouted(ct, net)
    since = time.time()
    ct.sh("nmcli", "networking", "off")
    try:
        wait_status(ct, r"^0/2 uplinks up, 2 policies, in sync$")
        for fam in ("-4", "-6"):
            for table in ("101", "102"):
                assert "unreachable default" in net.ip(ct.ns, fam, "route", "show", "table", table)
        assert net.connect(SERVER4, 80) is None and net.connect(SERVER6, 80) is None
    finally:
        ct.sh("nmcli", "networking", "on")
    wait_status(ct, IN_SYNC)
    poll("the policies to be followed again", net.follows_policies, POLL_DEADLINE)
    assert events(ct, since, MARKROUTED_EVENT="uplink down")


def test_networkmanager_route_table_is_warned_about(container: Container, net: Net) -> None:
    """A profile with route-table keeps its default routes out of the main table: the uplink goes
    down (gateway = "auto" finds nothing) and check --kernel says why and what to do."""
    ct = container
    use_networkmanager(ct, net)
    running_markrouted(ct, net)
    use_networkmanager(ct, net, {"wan1": "route-table=300\n"})
    try:
        wait_status(ct, r"^1/2 uplinks up, 2 policies, in sync$")
        assert "default via 198.51.100.1" in net.ip(ct.ns, "-4", "route", "show", "table", "300")
        status, lines = check_kernel(ct)
        assert status == 0, lines
        warn4, warn6 = [line for line in lines if line.startswith("warning:")]
        assert "table 300" in warn4 and 'uplinks.wan1.gateway = "auto"' in warn4 and "ipv4.route-table=0" in warn4
        assert "table 300" in warn6 and 'uplinks.wan1.gateway6 = "auto"' in warn6 and "ipv6.route-table=0" in warn6
    finally:
        use_networkmanager(ct, net)
    running_markrouted(ct, net)


# ------------------------------------------------------------------ firewalld


def test_firewalld_reload_and_restart_leave_markrouted_alone(container: Container, net: Net) -> None:
    """firewalld (nftables backend) replaces only its own tables: on `firewall-cmd --reload` and a
    restart markrouted's table stays as it is and the policies keep being followed; its IPv6
    reverse-path filter reads the mark after markrouted restored it. check --kernel finds no
    mark bits of firewalld's until a rule of it sets some."""
    ct = container
    use_networkd(ct, net, dropin=True)
    ct.sh("systemctl", "start", "firewalld", timeout=120)
    try:
        poll("firewalld to run", lambda: ct.sh("firewall-cmd", "--state", check=False).returncode == 0, 60)
        assert "table inet firewalld" in ct.sh("nft", "list", "tables").stdout
        assert "fib saddr . mark . iif oif missing drop" in ct.sh("nft", "list", "table", "inet", "firewalld").stdout
        assert net.follows_policies()
        assert check_kernel(ct) == (0, ["/etc/markrouted.toml: valid; kernel: 0 errors, 0 warnings"])

        table = without_counts(ct.sh("nft", "list", "table", "inet", "markrouted").stdout)
        since = time.time()
        ct.sh("firewall-cmd", "--reload", timeout=120)
        assert net.follows_policies()
        ct.sh("systemctl", "restart", "firewalld", timeout=120)
        poll("firewalld to run", lambda: ct.sh("firewall-cmd", "--state", check=False).returncode == 0, 60)
        assert net.follows_policies()
        assert without_counts(ct.sh("nft", "list", "table", "inet", "markrouted").stdout) == table
        assert events(ct, since) == []  # nothing to repair, nothing said

        # a firewalld rule that sets the mark, with a mask outside mark_mask: firewalld writes
        # "meta mark & 0xff ^ 0x7", which clears every bit outside the mask, markrouted's too
        ct.sh("firewall-cmd", "--add-rich-rule",
              'rule family="ipv4" source address="192.0.2.0/24" mark set="0x7/0xff"')
        status, lines = check_kernel(ct)
        assert status == 1, lines
        assert any(line.startswith("error: table inet firewalld chain ") and "sets meta mark bits 0xffffff07" in line
                   for line in lines), lines
        ct.sh("firewall-cmd", "--reload", timeout=120)  # runtime rules go
        assert check_kernel(ct)[0] == 0
    finally:
        ct.sh("systemctl", "stop", "firewalld", timeout=120)


def test_a_firewall_flushing_the_ruleset_is_repaired_at_once(container: Container, net: Net) -> None:
    """What older firewall scripts do on reload, `nft flush ruleset`: markrouted hears of it
    (nf_tables notifications) and its table is back at once: about 10 ms here, asserted as less
    than half the resync period (5 s), which a repair by the periodic resync alone would miss."""
    ct = container
    use_networkd(ct, net, dropin=True)
    since = time.time()
    proc = ct.sh("sh", "-c", "nft flush ruleset; t0=$(date +%s%N); "
                 "until nft list table inet markrouted >/dev/null 2>&1; do sleep 0.002; done; "
                 "echo $(( ($(date +%s%N) - t0) / 1000000 ))", timeout=30)
    wait_event(ct, since, MARKROUTED_EVENT="drift repaired")
    assert int(proc.stdout.strip()) < 2500, proc.stdout
    assert net.follows_policies()
