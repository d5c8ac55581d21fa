"""markrouted as users meet it: `apt install`, `systemctl enable --now`, `/etc/markrouted.toml`,
`systemctl reload`, `journalctl -u markrouted` — on a real systemd booted in a container.

::

    container (systemd, markrouted)                      server  198.18.0.10 / 2001:db8:ff::10
      wan1 198.51.100.2  2001:db8:1::2 ── isp1 ──┐       (tells the peer address it sees)
      wan2 203.0.113.2   2001:db8:2::2 ── isp2 ──┴── server

The container's main table has a default route via each ISP (metric 100 via isp1,
200 via isp2), as two DHCP clients would install them; the server answers each ISP's
customers through that ISP, so the address it sees tells which uplink a connection
took. Policy "web" sends port 80 by wan2 first; everything else follows the main table
(isp1). Foreign state (an ip rule inside markrouted's priority range without its
protocol tag, a route in an uplink's table, an nftables table) is there from the start
and must survive everything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import ROOT  # the suite's root conftest
from .nspawn import Container, poll, run, without_counts

pytestmark = pytest.mark.system

PYTHON = "/usr/bin/python3"
AGENT = os.path.join(ROOT, "lab", "agent.py")
SERVER4, SERVER6 = "198.18.0.10", "2001:db8:ff::10"
ISP_OF = {"198.51.100.2": "isp1", "2001:db8:1::2": "isp1", "203.0.113.2": "isp2", "2001:db8:2::2": "isp2"}
PROTO = "109"  # markrouted's routing protocol number
#: a connection expected to succeed gets this long (a loaded machine can starve the
#: processes at both ends); one polled until it succeeds gets a short timeout and a
#: longer deadline for the retries
CONNECT_TIMEOUT, POLL_TIMEOUT, POLL_DEADLINE = 10.0, 1.0, 20.0

TWO_UPLINKS = """\
[settings]
resync = "5s"

[uplinks.wan1]
interface = "wan1"
table = 101
mark = 1

[uplinks.wan2]
interface = "wan2"
table = 102
mark = 2

[[policy]]
name = "web"
proto = "tcp"
dport = [80]
uplinks = ["wan2", "wan1"]

[[policy]]
name = "dns"
proto = "udp"
dport = [53]
uplinks = ["wan1"]
"""

WITH_SSH = TWO_UPLINKS + """
[[policy]]
name = "ssh"
proto = "tcp"
dport = [22]
uplinks = ["wan2"]
"""

INVALID = WITH_SSH.replace("mark = 2", "mark = 300")


# ------------------------------------------------------------------ the network around it


def build_upstream(isp1: str, isp2: str, server: str) -> None:
    """The two ISPs (each forwarding, its customer side on ``cust``) and the server behind both.

    The customer links themselves (``cust`` in each ISP) are the caller's: how the container
    gets its addresses on them is what the tests differ in.
    """
    def ip(ns: str, *args: str) -> None:
        run(["ip", "-n", ns, *args])

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
            ip(ns, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else []))
        ip(ns, "link", "set", dev, "up")
    for ns in (isp1, isp2):
        run(["nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw", "net.ipv4.ip_forward=1",
             "net.ipv6.conf.all.forwarding=1"])
    for ns, up4, up6 in ((isp1, "198.18.1.2", "2001:db8:f1::2"), (isp2, "198.18.2.2", "2001:db8:f2::2")):
        ip(ns, "route", "add", "default", "via", up4)
        ip(ns, "-6", "route", "add", "default", "via", up6)
    for prefix, via in (("198.51.100.0/24", "198.18.1.1"), ("203.0.113.0/24", "198.18.2.1"),
                        ("2001:db8:1::/64", "2001:db8:f1::1"), ("2001:db8:2::/64", "2001:db8:f2::1")):
        ip(server, "route", "add", prefix, "via", via)


class Net:
    """The uplinks, ISPs and server around the container, and the foreign state in it."""

    def __init__(self, ct: Container) -> None:
        self.ct = ct
        self.server: subprocess.Popen[str] | None = None
        self.foreign_at_start: dict[str, Any] = {}

    def ip(self, ns: str, *args: str) -> str:
        return run(["ip", "-n", ns, *args]).stdout

    def build(self) -> None:
        ct = self.ct
        isp1, isp2, server = ct.add_netns("isp1"), ct.add_netns("isp2"), ct.add_netns("server")
        for ns in (ct.ns, isp1, isp2, server):
            # before any link exists, so every address (link-local ones too) is there at once
            run(["nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0",
                 "net.ipv6.conf.all.accept_dad=0"])
        run(["ip", "link", "add", "wan1", "netns", ct.ns, "type", "veth", "peer", "name", "cust", "netns", isp1])
        run(["ip", "link", "add", "wan2", "netns", ct.ns, "type", "veth", "peer", "name", "cust", "netns", isp2])
        for dev, addrs in (("wan1", ("198.51.100.2/24", "2001:db8:1::2/64")),
                           ("wan2", ("203.0.113.2/24", "2001:db8:2::2/64"))):
            for cidr in addrs:
                self.ip(ct.ns, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else []))
            self.ip(ct.ns, "link", "set", dev, "up")
        build_upstream(isp1, isp2, server)
        # the container: a default route via each ISP, as two DHCP clients would install them
        self.ip(ct.ns, "route", "add", "default", "via", "198.51.100.1", "dev", "wan1", "metric", "100")
        self.ip(ct.ns, "route", "add", "default", "via", "203.0.113.1", "dev", "wan2", "metric", "200")
        self.ip(ct.ns, "-6", "route", "add", "default", "via", "2001:db8:1::1", "dev", "wan1", "metric", "100")
        self.ip(ct.ns, "-6", "route", "add", "default", "via", "2001:db8:2::1", "dev", "wan2", "metric", "200")
        # foreign state markrouted must never touch
        self.ip(ct.ns, "rule", "add", "priority", "10500", "fwmark", "0x1/0x1", "lookup", "200")
        self.ip(ct.ns, "route", "add", "198.18.99.0/24", "via", "198.51.100.1", "dev", "wan1", "table", "101")
        run(["nsenter", f"--net=/run/netns/{ct.ns}", "nft", "-f", "-"], input=(
            "table inet foreign {\n"
            "  chain out { type filter hook output priority 0; policy accept; meta mark 0x1 accept; }\n"
            "}\n"))
        self.server = subprocess.Popen(["nsenter", f"--net=/run/netns/{server}", PYTHON, AGENT, "serve", "22", "80"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        poll("the server to listen", lambda: run(["nsenter", f"--net=/run/netns/{server}", "ss", "-Htln",
                                                  "sport = :80"]).stdout.strip())

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=10)

    def connect(self, addr: str, port: int, timeout: float = CONNECT_TIMEOUT) -> str | None:
        """Which ISP carried a TCP connection from the container to the server (None: failed)."""
        proc = subprocess.run(["nsenter", f"--net=/run/netns/{self.ct.ns}", PYTHON, AGENT, "connect", addr,
                               str(port), str(timeout)], capture_output=True, text=True, timeout=timeout + 15)
        peer = proc.stdout.strip()
        return ISP_OF.get(peer, f"other ({peer})") if peer else None

    # ------------------------------------------------------------ kernel state

    # Routing state is read from outside with the host's iproute2; the nftables
    # table with the container's own nft, the version that wrote it: an older
    # nft may fail to decode what a newer libnftables wrote (bookworm's 1.0.6
    # dies of SIGSEGV listing any chain of the table trixie's 1.1.3 writes).

    def owned(self) -> dict[str, Any]:
        """Everything carrying markrouted's tag: rules, routes, its nft table."""
        ns = self.ct.ns
        rules = sorted(line for fam in ("-4", "-6") for line in self.ip(ns, fam, "rule", "show").splitlines()
                       if f"proto {PROTO}" in line or "proto markrouted" in line)
        routes = sorted(line for fam in ("-4", "-6")
                        for line in self.ip(ns, fam, "route", "show", "table", "all", "proto", PROTO).splitlines())
        proc = self.ct.sh("nft", "list", "table", "inet", "markrouted", check=False)
        if proc.returncode != 0 and "No such file or directory" not in proc.stderr:
            raise RuntimeError(f"nft list table inet markrouted: exit {proc.returncode}: {proc.stderr}")
        nft = without_counts(proc.stdout)  # a restart's counters start again where traffic took them
        return {"rules": rules, "routes": routes, "nft": nft}

    def foreign(self) -> dict[str, Any]:
        """Everything else: rules, routes and nftables tables that are not markrouted's."""
        ns = self.ct.ns
        rules = [line for fam in ("-4", "-6") for line in self.ip(ns, fam, "rule", "show").splitlines()
                 if f"proto {PROTO}" not in line]
        routes = [re.sub(r" linkdown", "", line) for fam in ("-4", "-6")
                  for line in self.ip(ns, fam, "route", "show", "table", "all").splitlines()
                  if f"proto {PROTO}" not in line]
        ruleset = json.loads(self.ct.sh("nft", "-j", "list", "ruleset").stdout)
        nft = []
        for item in ruleset["nftables"]:
            kind, value = next(iter(item.items()))
            table = value.get("name") if kind == "table" else value.get("table")
            if kind != "metainfo" and (value.get("family"), table) != ("inet", "markrouted"):
                nft.append(item)
        return {"rules": sorted(rules), "routes": sorted(routes), "nft": nft}


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def net(container: Container) -> Iterator[Net]:
    n = Net(container)
    try:
        n.build()
        n.foreign_at_start = n.foreign()
        yield n
    finally:
        n.stop()


def status_text(ct: Container) -> str:
    return ct.show("markrouted", "StatusText")


def wait_status(ct: Container, pattern: str, deadline: float = 30) -> str:
    return poll(f"StatusText matching {pattern!r} (now {status_text(ct)!r})",
                lambda: (t := status_text(ct)) and re.search(pattern, t) and t, deadline=deadline)


def events(ct: Container, since: float = 0.0, **match: str) -> list[dict[str, Any]]:
    """markrouted's journal entries since ``since`` (epoch seconds) whose fields match."""
    out = []
    for e in ct.journal_json("markrouted"):
        if int(e.get("__REALTIME_TIMESTAMP", "0")) < since * 1e6:
            continue
        if all(e.get(k) == v for k, v in match.items()):
            out.append(e)
    return out


def wait_event(ct: Container, since: float, deadline: float = 30, **match: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = poll(f"a journal entry with {match}", lambda: events(ct, since, **match),
                                       deadline=deadline, interval=0.1)
    return found[0]


def start_with(ct: Container, config: str) -> None:
    """The service running `config`, in sync: restarted only if it runs something else."""
    current = ct.sh("cat", "/etc/markrouted.toml").stdout
    if current != config or ct.show("markrouted", "ActiveState") != "active":
        ct.write("/etc/markrouted.toml", config)
        ct.sh("systemctl", "restart", "markrouted")
    wait_status(ct, r"^2/2 uplinks up, \d+ policies, in sync$")


# ------------------------------------------------------------------ the checks


def test_package_installs_enabled_and_harmless(container: Container) -> None:
    """apt install: enabled and started per Debian policy, running the shipped config, which
    installs nothing; the config is a conffile; the man pages and name file are in place."""
    ct = container
    assert ct.sh("systemctl", "is-enabled", "markrouted").stdout.strip() == "enabled"
    assert ct.show("markrouted", "ActiveState") == "active"
    assert status_text(ct) == "no uplinks configured: nothing installed"
    assert ct.sh("markrouted", "check").stdout.strip() == "/etc/markrouted.toml: valid (0 uplinks, 0 policies)"
    assert "/etc/markrouted.toml" in ct.sh("dpkg-query", "-W", "-f=${Conffiles}", "markrouted").stdout
    files = ct.sh("dpkg", "-L", "markrouted").stdout.split()
    for path in ("/usr/share/man/man8/markrouted.8.gz", "/usr/share/man/man5/markrouted.toml.5.gz",
                 "/etc/iproute2/rt_protos.d/markrouted.conf", "/lib/systemd/system/markrouted.service",
                 "/usr/bin/markrouted"):
        assert path in files
    # a minimal system: no /bin/kill, and yet `systemctl reload` must work (tested below)
    assert ct.sh("test", "-e", "/bin/kill", check=False).returncode != 0
    assert ct.sh("ip", "-4", "rule", "show").stdout.count("\n") == 3  # only the kernel's own rules
    assert ct.sh("nft", "list", "tables").stdout.strip() == ""


def test_1_enable_now_installs_and_routes(container: Container, net: Net) -> None:
    ct = container
    ct.sh("systemctl", "disable", "--now", "markrouted")
    assert net.owned() == {"rules": [], "routes": [], "nft": ""}
    assert net.connect(SERVER4, 80) == "isp1"  # the main table's choice, before markrouted
    ct.write("/etc/markrouted.toml", TWO_UPLINKS)
    ct.sh("systemctl", "enable", "--now", "markrouted")
    assert ct.show("markrouted", "ActiveState") == "active"
    wait_status(ct, r"^2/2 uplinks up, 2 policies, in sync$")

    owned = net.owned()
    rules = "\n".join(owned["rules"])
    for fam_rule in ("fwmark 0x10000/0xff0000 lookup 101", "fwmark 0x20000/0xff0000 lookup 102",
                     "from 198.51.100.2 lookup 101", "from 203.0.113.2 lookup 102",
                     "lookup main suppress_prefixlength 0"):
        assert fam_rule in rules
    assert sum("fwmark" in r for r in owned["rules"]) == 4  # two uplinks, IPv4 and IPv6
    routes = "\n".join(owned["routes"])
    assert "default via 198.51.100.1 dev wan1" in routes and "default via 203.0.113.1 dev wan2" in routes
    assert "default via 2001:db8:1::1 dev wan1" in routes and "default via 2001:db8:2::1 dev wan2" in routes
    assert "table inet markrouted" in owned["nft"]
    # the name file shipped in /etc/iproute2/rt_protos.d makes the tag readable inside
    assert "proto markrouted" in ct.sh("ip", "rule", "show").stdout

    assert net.connect(SERVER4, 80) == "isp2"  # policy "web": wan2 first
    assert net.connect(SERVER6, 80) == "isp2"
    assert net.connect(SERVER4, 22) == "isp1"  # no policy: the main table, untouched


def test_2_journal_carries_structured_fields(container: Container, net: Net) -> None:
    ct = container
    start_with(ct, TWO_UPLINKS)
    entries = events(ct)
    ours = [e for e in entries if "MARKROUTED_EVENT" in e]
    assert ours, "no entry carries MARKROUTED_EVENT"
    for e in ours:
        assert e["SYSLOG_IDENTIFIER"] == "markrouted"
        assert e["MESSAGE"]  # a sentence of its own (tests/system/test_journal.py reads them)
        assert e["_SYSTEMD_UNIT"] == "markrouted.service"
    added = [e for e in ours if e["MARKROUTED_EVENT"] == "rule added"]
    assert any("fwmark 0x20000/0xff0000 lookup 102" in e.get("MARKROUTED_OBJECT", "") for e in added)
    assert all(e.get("MARKROUTED_REASON") for e in added)
    assert any(e["MARKROUTED_EVENT"] == "nft table replaced" for e in ours)
    assert any(e["MARKROUTED_EVENT"] == "started" for e in ours)


def test_3_reload_valid_applies_invalid_refused(container: Container, net: Net) -> None:
    ct = container
    start_with(ct, TWO_UPLINKS)
    pid = ct.show("markrouted", "MainPID")
    assert net.connect(SERVER4, 22) == "isp1"

    ct.write("/etc/markrouted.toml", WITH_SSH)
    assert ct.sh("systemctl", "reload", "markrouted").returncode == 0
    wait_status(ct, r"^2/2 uplinks up, 3 policies, in sync$")
    assert ct.show("markrouted", "MainPID") == pid  # reloaded, not restarted
    poll("ssh to move to wan2", lambda: net.connect(SERVER4, 22, POLL_TIMEOUT) == "isp2", POLL_DEADLINE)
    before = net.owned()

    since = time.time()
    ct.write("/etc/markrouted.toml", INVALID)
    ct.sh("systemctl", "reload", "markrouted")
    # the SIGHUP or the file's change, whichever came first: one refusal of one file content
    refused = wait_event(ct, since, MARKROUTED_EVENT="config reload refused")
    assert "uplinks.wan2.mark" in refused["MARKROUTED_ERROR"]
    assert int(refused["PRIORITY"]) <= 3
    assert ct.show("markrouted", "ActiveState") == "active"
    assert ct.show("markrouted", "MainPID") == pid
    assert "config reload refused" in wait_status(ct, r"config reload refused")
    assert "uplinks.wan2.mark" in status_text(ct)
    live = json.loads(ct.sh("markrouted", "status", "--json").stdout)
    assert "uplinks.wan2.mark" in live["config_error"]
    assert net.owned() == before  # routing unchanged
    assert net.connect(SERVER4, 22) == "isp2"

    ct.write("/etc/markrouted.toml", WITH_SSH)
    ct.sh("systemctl", "reload", "markrouted")
    wait_status(ct, r"^2/2 uplinks up, 3 policies, in sync$")


def test_4_link_cut_fails_over_and_is_logged(container: Container, net: Net) -> None:
    ct = container
    start_with(ct, TWO_UPLINKS)
    isp2 = f"{ct.name}-isp2"
    assert net.connect(SERVER4, 80) == "isp2"
    since = time.time()
    run(["ip", "-n", isp2, "link", "set", "cust", "down"])  # wan2 loses its carrier
    try:
        down = wait_event(ct, since, MARKROUTED_EVENT="uplink down", MARKROUTED_UPLINK="wan2")
        assert down["MARKROUTED_REASON"]
        assert int(down["PRIORITY"]) == 4
        wait_status(ct, r"^1/2 uplinks up, 2 policies, in sync$")
        live = json.loads(ct.sh("markrouted", "status", "--json").stdout)
        assert live["uplinks"]["wan2"]["state"] == "down"
        assert live["policies"]["web"]["active"][0] == "wan1"
        poll("web to fail over to wan1", lambda: net.connect(SERVER4, 80, POLL_TIMEOUT) == "isp1", POLL_DEADLINE)
    finally:
        since = time.time()
        run(["ip", "-n", isp2, "link", "set", "cust", "up"])
    wait_event(ct, since, MARKROUTED_EVENT="uplink up", MARKROUTED_UPLINK="wan2")
    wait_status(ct, r"^2/2 uplinks up, 2 policies, in sync$")
    poll("web to return to wan2", lambda: net.connect(SERVER4, 80, POLL_TIMEOUT) == "isp2", POLL_DEADLINE)


def test_5_stop_removes_owned_only_and_restart_restores(container: Container, net: Net) -> None:
    ct = container
    start_with(ct, TWO_UPLINKS)
    installed = net.owned()
    assert installed["rules"] and installed["routes"] and installed["nft"]
    ct.sh("systemctl", "stop", "markrouted")
    assert ct.show("markrouted", "ActiveState") == "inactive"
    assert ct.show("markrouted", "Result") == "success"
    assert ct.show("markrouted", "ExecMainStatus") == "0"
    assert net.owned() == {"rules": [], "routes": [], "nft": ""}
    assert net.foreign() == net.foreign_at_start
    assert net.connect(SERVER4, 80) == "isp1"  # back to the main table

    ct.sh("systemctl", "restart", "markrouted")
    wait_status(ct, r"^2/2 uplinks up, 2 policies, in sync$")
    assert net.owned() == installed
    assert net.foreign() == net.foreign_at_start
    assert net.connect(SERVER4, 80) == "isp2"


def test_6_least_privilege_and_exposure(container: Container, net: Net) -> None:
    ct = container
    start_with(ct, TWO_UPLINKS)
    # the unit is clean: no unknown settings, no ordering cycle in its start transaction
    verify = ct.sh("systemd-analyze", "verify", "--man=no", "markrouted.service", check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    out = ct.sh("systemd-analyze", "security", "--no-pager", "markrouted.service").stdout
    m = re.search(r"Overall exposure level for markrouted\.service: ([0-9.]+)", out)
    assert m, out
    assert float(m.group(1)) <= 2.5, out
    pid = ct.show("markrouted", "MainPID")
    status = dict(line.split(":\t", 1) for line in ct.sh("cat", f"/proc/{pid}/status").stdout.splitlines()
                  if ":\t" in line)
    assert status["Uid"].split()[0] != "0"  # its own dynamic user, not root
    assert int(status["CapEff"], 16) == (1 << 12) | (1 << 13)  # CAP_NET_ADMIN | CAP_NET_RAW, nothing else
    assert int(status["CapBnd"], 16) == (1 << 12) | (1 << 13)
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    assert ct.show("markrouted", "WatchdogUSec") == "30s"
    # the live status is published for everyone, though the service's umask is 0077
    doc = json.loads(ct.sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "markrouted", "status", "--json").stdout)
    assert doc["pid"] == int(pid) and doc["in_sync"] is True


def test_watchdog_is_petted(container: Container, net: Net) -> None:
    """With a 2 s watchdog the service must ping it, or systemd kills and restarts it.

    (Shorter than the shipped 30 s so that a silent service is caught quickly;
    not so short that a loaded machine's scheduling alone could miss it.)
    """
    ct = container
    dropin = "/run/systemd/system/markrouted.service.d"
    ct.sh("mkdir", "-p", dropin)
    ct.write(f"{dropin}/watchdog.conf", "[Service]\nWatchdogSec=2s\n")
    try:
        ct.write("/etc/markrouted.toml", TWO_UPLINKS)  # this test may run alone
        ct.sh("systemctl", "daemon-reload")
        ct.sh("systemctl", "restart", "markrouted")
        wait_status(ct, r"in sync$")
        pid = ct.show("markrouted", "MainPID")
        first = int(ct.show("markrouted", "WatchdogTimestampMonotonic"))
        poll("a later watchdog ping", lambda: int(ct.show("markrouted", "WatchdogTimestampMonotonic")) > first,
             deadline=10)
        time.sleep(4.5)  # over two watchdog periods: a silent service would have been killed by now
        assert ct.show("markrouted", "MainPID") == pid
        assert ct.show("markrouted", "NRestarts") == "0"
        assert ct.show("markrouted", "ActiveState") == "active"
    finally:
        ct.sh("rm", "-rf", dropin)
        ct.sh("systemctl", "daemon-reload")
        ct.sh("systemctl", "restart", "markrouted")
