"""A small internet in network namespaces: the lab of the demo and the traffic tests.

::

    client ──lan0── host ──eth0── isp1 ──┐
    192.0.2.10      │                    ├── server 198.18.0.10 / 2001:db8:ff::10
                    └──eth1── isp2 ──────┘

* ``host`` runs markrouted. Uplink 1 (eth0) is 198.51.100.2/24 and
  2001:db8:1::2/64 behind isp1; uplink 2 (eth1) 203.0.113.2/24 and
  2001:db8:2::2/64 behind isp2. Its main table has a default route via each
  ISP (metric 100 via isp1, 200 via isp2), as DHCP clients install them.
* each ISP drops packets from its customer whose source is not the customer's
  prefix (BCP 38), as real ISPs do: a wrongly routed or un-NATed packet dies.
* ``server`` is reachable through both ISPs; from the source address of a
  connection it tells which ISP carried it.
* ``client`` is a LAN host behind ``host`` (192.0.2.0/24, 2001:db8:c::/64).

Nothing outside the lab's own namespaces is touched: every link is created
directly inside its namespaces, and every name carries a unique prefix.
Addresses come from documentation ranges only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "lab", "agent.py")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

SERVER4 = "198.18.0.10"
SERVER6 = "2001:db8:ff::10"
ISP1_CUSTOMER4, ISP1_CUSTOMER6 = "198.51.100.2", "2001:db8:1::2"
ISP2_CUSTOMER4, ISP2_CUSTOMER6 = "203.0.113.2", "2001:db8:2::2"
CLIENT4, CLIENT6 = "192.0.2.10", "2001:db8:c::10"
LAN4, LAN6 = "192.0.2.1", "2001:db8:c::1"
SERVER_PORTS = (22, 80, 443, 2222, 8080)


def run(cmd: Sequence[str], check: bool = True, input: str | None = None, timeout: float = 30) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Lab:
    prefix: str = field(default_factory=lambda: "mr" + secrets.token_hex(3))
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    made: list[str] = field(default_factory=list)

    # ------------------------------------------------------------ naming

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def nsenter(self, role: str) -> list[str]:
        # not "ip netns exec": it remounts /sys and hides the cgroup tree
        return ["nsenter", f"--net=/run/netns/{self.ns(role)}"]

    def sh(self, role: str, *cmd: str, check: bool = True, input: str | None = None, timeout: float = 30) -> str:
        return run([*self.nsenter(role), *cmd], check=check, input=input, timeout=timeout)

    def ip(self, role: str, *args: str, check: bool = True) -> str:
        return run(["ip", "-n", self.ns(role), *args], check=check)

    def ip_json(self, role: str, *args: str) -> Any:
        out = run(["ip", "-j", "-n", self.ns(role), *args])
        return json.loads(out) if out.strip() else []

    # ------------------------------------------------------------ life

    def __enter__(self) -> "Lab":
        try:
            self.build()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        run(["ip", "link", "add", a_if, "netns", self.ns(a), "type", "veth", "peer", "name", b_if,
             "netns", self.ns(b)])

    def _addr(self, role: str, dev: str, *cidrs: str) -> None:
        for cidr in cidrs:
            extra = ["nodad"] if ":" in cidr else []
            self.ip(role, "addr", "add", cidr, "dev", dev, *extra)
        self.ip(role, "link", "set", dev, "up")

    def build(self) -> None:
        for role in ("host", "isp1", "isp2", "server", "client"):
            run(["ip", "netns", "add", self.ns(role)])
            self.made.append(self.ns(role))
            # before any link exists, so every link (link-local address included)
            # is usable at once: no 1-2 s of duplicate address detection
            self.sh(role, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")
            self.ip(role, "link", "set", "lo", "up")
        self._veth("host", "eth0", "isp1", "cust")
        self._veth("host", "eth1", "isp2", "cust")
        self._veth("host", "lan0", "client", "eth0")
        self._veth("isp1", "core", "server", "isp1")
        self._veth("isp2", "core", "server", "isp2")

        self._addr("host", "eth0", "198.51.100.2/24", "2001:db8:1::2/64")
        self._addr("host", "eth1", "203.0.113.2/24", "2001:db8:2::2/64")
        self._addr("host", "lan0", "192.0.2.1/24", "2001:db8:c::1/64")
        self._addr("isp1", "cust", "198.51.100.1/24", "2001:db8:1::1/64")
        self._addr("isp2", "cust", "203.0.113.1/24", "2001:db8:2::1/64")
        self._addr("isp1", "core", "198.18.1.1/24", "2001:db8:f1::1/64")
        self._addr("isp2", "core", "198.18.2.1/24", "2001:db8:f2::1/64")
        self._addr("server", "isp1", "198.18.1.2/24", "2001:db8:f1::2/64")
        self._addr("server", "isp2", "198.18.2.2/24", "2001:db8:f2::2/64")
        self._addr("server", "lo", f"{SERVER4}/32", f"{SERVER6}/128")
        self._addr("client", "eth0", f"{CLIENT4}/24", f"{CLIENT6}/64")

        for role in ("host", "isp1", "isp2", "server"):
            self.sh(role, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # the host: a default route via each ISP, as two DHCP clients would install
        self.ip("host", "route", "add", "default", "via", "198.51.100.1", "dev", "eth0", "metric", "100")
        self.ip("host", "route", "add", "default", "via", "203.0.113.1", "dev", "eth1", "metric", "200")
        self.ip("host", "-6", "route", "add", "default", "via", "2001:db8:1::1", "dev", "eth0", "metric", "100")
        self.ip("host", "-6", "route", "add", "default", "via", "2001:db8:2::1", "dev", "eth1", "metric", "200")
        self.ip("client", "route", "add", "default", "via", LAN4)
        self.ip("client", "-6", "route", "add", "default", "via", LAN6)
        # the ISPs: customer prefix down to the customer, the rest up to the server side
        for isp, cust4, cust6, up4, up6 in (
            ("isp1", "198.51.100.0/24", "2001:db8:1::/64", "198.18.1.2", "2001:db8:f1::2"),
            ("isp2", "203.0.113.0/24", "2001:db8:2::/64", "198.18.2.2", "2001:db8:f2::2"),
        ):
            self.ip(isp, "route", "add", "default", "via", up4)
            self.ip(isp, "-6", "route", "add", "default", "via", up6)
            # BCP 38: only the customer's own prefix may come from the customer
            self.sh(isp, "nft", "-f", "-", input=(
                "table inet bcp38 {\n"
                "  counter spoofed {}\n"
                "  chain forward { type filter hook forward priority 0; policy accept;\n"
                f'    iifname "cust" meta nfproto ipv4 ip saddr != {cust4} counter name spoofed drop\n'
                f'    iifname "cust" meta nfproto ipv6 ip6 saddr != {cust6} counter name spoofed drop\n'
                "  }\n}\n"))
        # the server: each ISP's customers are answered through that ISP
        self.ip("server", "route", "add", "198.51.100.0/24", "via", "198.18.1.1")
        self.ip("server", "route", "add", "203.0.113.0/24", "via", "198.18.2.1")
        self.ip("server", "-6", "route", "add", "2001:db8:1::/64", "via", "2001:db8:f1::1")
        self.ip("server", "-6", "route", "add", "2001:db8:2::/64", "via", "2001:db8:f2::1")
        # anything else (un-NATed LAN sources) has no way back: the ISPs drop it anyway
        self.start_agent("server", "serve", *map(str, SERVER_PORTS))
        self.wait_listening("server", SERVER_PORTS[0])
        self.wait_links_ready()

    def wait_links_ready(self, deadline: float = 10.0) -> None:
        """Wait until every link of the lab is up with a usable IPv6 link-local address.

        A veth's carrier reaches IPv6 through the kernel's rate-limited link
        watch, up to a second after ``ip link set up``; until then neighbour
        discovery on it fails and the first IPv6 connection through it times
        out. Tests must not start before that.
        """
        end = time.monotonic() + deadline
        pending = list(self.made)
        while pending and time.monotonic() < end:
            for name in list(pending):
                links = json.loads(run(["ip", "-j", "-n", name, "addr", "show"]) or "[]")
                ready = all(
                    link.get("operstate") in ("UP", "UNKNOWN")
                    and any(a.get("family") == "inet6" and a.get("scope") == "link" and not a.get("tentative")
                            for a in link.get("addr_info", []))
                    for link in links
                    if link.get("ifname") != "lo" and "UP" in link.get("flags", [])
                )
                if ready:
                    pending.remove(name)
            if pending:
                time.sleep(0.05)
        if pending:
            raise TimeoutError(f"links not ready in {', '.join(pending)}")

    def destroy(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for name in reversed(self.made):
            # killing what is left in the namespace, then deleting it
            pids = run(["ip", "netns", "pids", name], check=False).split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", name], check=False)
        self.made.clear()

    # ------------------------------------------------------------ processes

    def start_agent(self, role: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*self.nsenter(role), PYTHON, AGENT, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def popen(self, role: str, *cmd: str, **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*self.nsenter(role), *cmd], text=True, **kwargs)
        self.procs.append(proc)
        return proc

    def wait_listening(self, role: str, port: int, deadline: float = 10.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            out = self.sh(role, "ss", "-Htln", f"sport = :{port}", check=False)
            if out.strip():
                return
            time.sleep(0.02)
        raise TimeoutError(f"nothing listens on {role}:{port}")

    # ------------------------------------------------------------ traffic

    def connect(self, role: str, addr: str, port: int, *, source: str | None = None,
                uid: int | None = None, timeout: float = 3.0) -> str | None:
        """Open a TCP connection from ``role``; the server's view of our address, or None."""
        args = [PYTHON, AGENT, "connect", addr, str(port), str(timeout)]
        if source:
            args.append(source)
        cmd = [*self.nsenter(role)]
        if uid is not None:
            cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout + 10)
        out = proc.stdout.strip()
        return out or None

    def markrouted(self, *args: str, config: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.nsenter("host"), PYTHON, "-m", "markrouted"]
        if config:
            cmd += ["-c", config]
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                              env={**os.environ, "PYTHONPATH": ROOT})
        if check and proc.returncode not in (0, 3):
            raise RuntimeError(f"markrouted {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def spoofed_drops(self, isp: str) -> int:
        data = json.loads(self.sh(isp, "nft", "-j", "list", "counter", "inet", "bcp38", "spoofed"))
        for item in data["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        return 0


def which_isp(peer: str | None) -> str | None:
    """Which ISP carried a connection, from the address the server saw."""
    if peer is None:
        return None
    if peer in (ISP1_CUSTOMER4, ISP1_CUSTOMER6):
        return "isp1"
    if peer in (ISP2_CUSTOMER4, ISP2_CUSTOMER6):
        return "isp2"
    return f"other ({peer})"


def require_tools() -> list[str]:
    return [t for t in ("ip", "nft", "nsenter", "ss", "setpriv") if shutil.which(t) is None]
