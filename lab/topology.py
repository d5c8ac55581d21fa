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
  prefix (BCP 38), as real ISPs do: a wrongly routed or un-NATed packet dies,
  and the ISP's ``spoofed`` counter says so.
* ``server`` is reachable through both ISPs; from the source address of a
  connection it tells which ISP carried it. It also counts, per ISP and port,
  the connection attempts (TCP SYNs) that reached it, so a test can prove that
  nothing at all arrived by a path.
* ``client`` is a LAN host behind ``host`` (192.0.2.0/24, 2001:db8:c::/64).
* with ``Lab(third=True)``, a third ISP: ``host ──eth2── isp3 ── server``, the
  host at 198.19.3.2/24 and 2001:db8:3::2/64, its main-table default route at
  metric 300 (the failover tests' last resort, an LTE line).

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
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(ROOT, "lab", "agent.py")
# the interpreter running the tests: Debian's, or the PyPI-compat venv's in the second pass
PYTHON = sys.executable

SERVER4 = "198.18.0.10"
SERVER6 = "2001:db8:ff::10"
SERVERS = (SERVER4, SERVER6)
ISP1_CUSTOMER4, ISP1_CUSTOMER6 = "198.51.100.2", "2001:db8:1::2"
ISP2_CUSTOMER4, ISP2_CUSTOMER6 = "203.0.113.2", "2001:db8:2::2"
ISP3_CUSTOMER4, ISP3_CUSTOMER6 = "198.19.3.2", "2001:db8:3::2"
CLIENT4, CLIENT6 = "192.0.2.10", "2001:db8:c::10"
LAN4, LAN6 = "192.0.2.1", "2001:db8:c::1"
SERVER_PORTS = (22, 80, 443, 2222, 8080)
#: how long a connection expected to succeed is given. The lab's round trip is
#: well under a millisecond, but a loaded machine can starve the processes at
#: both ends for seconds; waiting longer costs nothing when the connection
#: succeeds, and a test that expects a failure passes a short timeout of its own.
CONNECT_TIMEOUT = 10.0
ROLES = ("host", "isp1", "isp2", "server", "client")


@dataclass(frozen=True)
class Line:
    """One of the host's uplinks as the lab wires it (what a DHCP client would set up)."""

    isp: str
    interface: str
    address4: str
    address6: str
    gateway4: str
    gateway6: str
    metric: int


LINES = {
    "isp1": Line("isp1", "eth0", "198.51.100.2/24", "2001:db8:1::2/64", "198.51.100.1", "2001:db8:1::1", 100),
    "isp2": Line("isp2", "eth1", "203.0.113.2/24", "2001:db8:2::2/64", "203.0.113.1", "2001:db8:2::1", 200),
}


#: the third line, built only by ``Lab(third=True)``
LINE3 = Line("isp3", "eth2", "198.19.3.2/24", "2001:db8:3::2/64", "198.19.3.1", "2001:db8:3::1", 300)


def run(cmd: Sequence[str], check: bool = True, input: str | None = None, timeout: float = 30) -> str:
    """A command's stdout; with ``check``, a failure raises with its stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def lab_config(*policies: str, settings: str = "", wan1: str = "", wan2: str = "", wan3: str | None = None) -> str:
    """A markrouted config for the lab's host: wan1 = eth0 (isp1), wan2 = eth1 (isp2).

    ``policies`` are ``[[policy]]`` bodies (without the header); ``settings``,
    ``wan1`` and ``wan2`` are extra lines for those tables. Gateways are
    learnt from the main table, as on a DHCP host.
    """
    text = f"[settings]\nmark_mask = 0x00ff0000\n{settings}\n"
    text += f'[uplinks.wan1]\ninterface = "eth0"\ntable = 101\nmark = 1\n{wan1}\n'
    text += f'[uplinks.wan2]\ninterface = "eth1"\ntable = 102\nmark = 2\n{wan2}\n'
    if wan3 is not None:  # the third line (``Lab(third=True)``): wan3 = eth2 (isp3)
        text += f'[uplinks.wan3]\ninterface = "eth2"\ntable = 103\nmark = 3\n{wan3}\n'
    for body in policies:
        text += f"[[policy]]\n{body.strip()}\n\n"
    return text


def policy(name: str, uplinks: Sequence[str] | None = None, **fields: Any) -> str:
    """One ``[[policy]]`` body for :func:`lab_config`: ``policy("ssh", ["wan2"], proto="tcp", dport=[22])``."""
    lines = [f'name = "{name}"']
    lines += [f"{key} = {toml_value(value)}" for key, value in fields.items()]
    if uplinks is not None:
        lines.append(f"uplinks = {toml_value(list(uplinks))}")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """The TOML spelling of a small Python value (bool, int, str, list, dict)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


@dataclass
class Lab:
    """The lab: ``build`` it (or use it as a context manager), drive traffic, ``destroy`` it.

    Every process it starts is remembered and stopped on ``destroy``, which
    also kills whatever is left inside its namespaces before deleting them,
    so a failing test leaves nothing behind.
    """

    prefix: str = field(default_factory=lambda: "mr" + secrets.token_hex(3))
    procs: list[subprocess.Popen[str]] = field(default_factory=list, repr=False)
    made: list[str] = field(default_factory=list, repr=False)
    #: a private directory for the daemon's status file: /run is shared by
    #: every namespace, and several labs (or a real markrouted) may run at once
    run_dir: str = ""
    #: build the third ISP too (isp3, the host's eth2)
    third: bool = False

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
        self.run_dir = tempfile.mkdtemp(prefix=f"markrouted-{self.prefix}-")
        for role in ROLES:
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

        for line in LINES.values():
            self._addr("host", line.interface, line.address4, line.address6)
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
        for line in LINES.values():
            self._default_routes(line, "add")
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
            self.nft(isp, (
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
        self.nft("server", self._syn_counters())
        if self.third:
            self._build_third()
        self.serve("server", *SERVER_PORTS)
        self.wait_links_ready()

    def _build_third(self) -> None:
        """isp3 between the host's eth2 and the server, wired like the other two."""
        run(["ip", "netns", "add", self.ns("isp3")])
        self.made.append(self.ns("isp3"))
        self.sh("isp3", "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0",
                "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        self.ip("isp3", "link", "set", "lo", "up")
        self._veth("host", LINE3.interface, "isp3", "cust")
        self._veth("isp3", "core", "server", "isp3")
        self._addr("host", LINE3.interface, LINE3.address4, LINE3.address6)
        self._addr("isp3", "cust", "198.19.3.1/24", "2001:db8:3::1/64")
        self._addr("isp3", "core", "198.18.3.1/24", "2001:db8:f3::1/64")
        self._addr("server", "isp3", "198.18.3.2/24", "2001:db8:f3::2/64")
        self._default_routes(LINE3, "add")
        self.ip("isp3", "route", "add", "default", "via", "198.18.3.2")
        self.ip("isp3", "-6", "route", "add", "default", "via", "2001:db8:f3::2")
        self.nft("isp3", (
            "table inet bcp38 {\n  counter spoofed {}\n"
            "  chain forward { type filter hook forward priority 0; policy accept;\n"
            '    iifname "cust" meta nfproto ipv4 ip saddr != 198.19.3.0/24 counter name spoofed drop\n'
            '    iifname "cust" meta nfproto ipv6 ip6 saddr != 2001:db8:3::/64 counter name spoofed drop\n'
            "  }\n}\n"))
        self.ip("server", "route", "add", "198.19.3.0/24", "via", "198.18.3.1")
        self.ip("server", "-6", "route", "add", "2001:db8:3::/64", "via", "2001:db8:f3::1")

    def line(self, isp: str) -> Line:
        return LINE3 if isp == "isp3" else LINES[isp]

    def _syn_counters(self) -> str:
        """The server's record of which connection attempts reached it, by ISP and port."""
        counters = "".join(f"  counter syn_{isp}_{port} {{}}\n" for isp in LINES for port in SERVER_PORTS)
        rules = "".join(
            f'    iifname "{isp}" tcp dport {port} tcp flags & (syn | ack) == syn counter name syn_{isp}_{port}\n'
            for isp in LINES for port in SERVER_PORTS
        )
        return ("table inet seen {\n" + counters +
                "  chain input { type filter hook input priority 0; policy accept;\n" + rules + "  }\n}\n")

    def wait_links_ready(self, deadline: float = 10.0) -> None:
        """Wait until every link of the lab with a carrier is up with a usable IPv6 link-local address.

        A veth's carrier reaches IPv6 through the kernel's rate-limited link
        watch, up to a second after ``ip link set up``; until then neighbour
        discovery on it fails and the first IPv6 connection through it times
        out. Traffic must not start before that.
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
                    if link.get("ifname") != "lo" and {"UP", "LOWER_UP"} <= set(link.get("flags", []))
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
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = ""

    @classmethod
    def adopt(cls, prefix: str) -> "Lab":
        """The lab with this prefix as it exists now (left by ``--keep``), to destroy it."""
        existing = set(run(["ip", "netns", "list"]).split())
        lab = cls(prefix=prefix)
        lab.made = [lab.ns(role) for role in (*ROLES, "isp3") if lab.ns(role) in existing]
        return lab

    # ------------------------------------------------------------ processes

    def start_agent(self, role: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*self.nsenter(role), PYTHON, AGENT, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def serve(self, role: str, *ports: int) -> subprocess.Popen[str]:
        """A TCP server in ``role`` answering each connection with the peer address it saw."""
        proc = self.start_agent(role, "serve", *map(str, ports))
        for port in ports:
            self.wait_listening(role, port)
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
                uid: int | None = None, timeout: float = CONNECT_TIMEOUT) -> str | None:
        """Open a TCP connection from ``role``; the server's view of our address, or None.

        With ``uid``, the client runs as that user (and group); it reads the
        agent from stdin, so the checkout need not be readable by that user.
        """
        args = [PYTHON, AGENT, "connect", addr, str(port), str(timeout)]
        if source:
            args.append(source)
        cmd = [*self.nsenter(role)]
        script = None
        if uid is not None:
            cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            args[:2] = [PYTHON, "-I", "-"]
            with open(AGENT) as f:
                script = f.read()
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, input=script, timeout=timeout + 10)
        out = proc.stdout.strip()
        return out or None

    def connect_all(self, attempts: Sequence[tuple[str, str, int]],
                    timeout: float = CONNECT_TIMEOUT) -> list[str | None]:
        """Several :meth:`connect` (role, address, port) at once: failures cost one timeout, not one each."""
        with ThreadPoolExecutor(max_workers=max(1, len(attempts))) as pool:
            return list(pool.map(lambda a: self.connect(a[0], a[1], a[2], timeout=timeout), attempts))

    def connect_in_cgroup(self, role: str, cgroup_dir: str, addr: str, port: int,
                          timeout: float = CONNECT_TIMEOUT) -> str | None:
        """Like :meth:`connect`, from a process moved into ``cgroup_dir`` before it connects."""
        script = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'
        cmd = [*self.nsenter(role), "sh", "-c", script, "sh", cgroup_dir,
               PYTHON, AGENT, "connect", addr, str(port), str(timeout)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
        if proc.returncode != 0 and "cgroup.procs" in proc.stderr:
            raise RuntimeError(f"could not enter {cgroup_dir}: {proc.stderr.strip()}")
        return proc.stdout.strip() or None

    def connect_many(self, role: str, addr: str, port: int, count: int, timeout: float = CONNECT_TIMEOUT,
                     max_failures: int = 5) -> list[str | None]:
        """``count`` connections one after the other (one process); each the server's view, or None.

        After ``max_failures`` failures the rest are not tried and count as
        failed: a broken path should fail a test in seconds, not in minutes.
        """
        out = self.sh(role, PYTHON, AGENT, "connect-many", addr, str(port), str(count), str(timeout),
                      str(max_failures), timeout=count * (timeout + 1) + 10)
        peers: list[str | None] = [None if line == "-" else line for line in out.split()]
        return peers + [None] * (count - len(peers))

    def hold(self, role: str, addr: str, port: int, timeout: float = CONNECT_TIMEOUT) -> "Held":
        """A long-lived echo connection, to prove a flow survives what happens around it."""
        proc = subprocess.Popen([*self.nsenter(role), PYTHON, AGENT, "hold", addr, str(port), str(timeout)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, bufsize=1)
        self.procs.append(proc)
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        if len(first) != 2 or first[0] == "error:":
            raise RuntimeError(f"the long-lived connection failed: {' '.join(first)}")
        return Held(proc, first[0], int(first[1]))

    def markrouted(self, *args: str, config: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.nsenter("host"), PYTHON, "-m", "markrouted"]
        if config:
            cmd += ["-c", config]
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                              env=self.markrouted_env())
        if check and proc.returncode not in (0, 3):
            raise RuntimeError(f"markrouted {' '.join(args)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def markrouted_env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": ROOT}
        if self.run_dir:
            env["MARKROUTED_RUN_DIR"] = self.run_dir
        return env

    # ------------------------------------------------------------ changes

    def nft(self, role: str, script: str) -> None:
        """Load an nft script in ``role`` (foreign tables, filters of the lab)."""
        self.sh(role, "nft", "-f", "-", input=script)

    def counter(self, role: str, table: str, name: str) -> int:
        """Packets counted by the named counter ``name`` of ``table`` (family inet) in ``role``."""
        data = json.loads(self.sh(role, "nft", "-j", "list", "counter", "inet", table, name))
        for item in data["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        return 0

    def counters(self, role: str, table: str) -> dict[str, int]:
        """Packets counted by every named counter of ``table`` (family inet) in ``role``, read at once."""
        data = json.loads(self.sh(role, "nft", "-j", "list", "counters", "table", "inet", table))
        return {item["counter"]["name"]: int(item["counter"]["packets"])
                for item in data["nftables"] if "counter" in item}

    def wait_closed(self, roles: Sequence[str], port: int, deadline: float = 10.0) -> None:
        """Wait until every TCP connection from ``roles`` to the server's ``port`` is closed on both sides.

        A client's ``close`` returns before the server's FIN and the last ACK
        have crossed the lab. Once the clients' sockets are in TIME-WAIT (or
        gone) and the server holds nothing but its listener, the last ACK has
        arrived too, so counters read afterwards hold every packet.
        """
        end = time.monotonic() + deadline
        while True:
            lines = [line for role in roles for line in self.sh(role, "ss", "-Htan", f"dport = :{port}").splitlines()]
            lines += self.sh("server", "ss", "-Htan", f"sport = :{port}").splitlines()
            busy = [line for line in lines if line.split() and line.split()[0] not in ("TIME-WAIT", "LISTEN")]
            if not busy:
                return
            if time.monotonic() > end:
                raise TimeoutError(f"connections to port {port} still open: {busy}")
            time.sleep(0.02)

    def spoofed_drops(self, isp: str) -> int:
        """Packets the ISP dropped because their source was not its customer's (BCP 38)."""
        return self.counter(isp, "bcp38", "spoofed")

    def syns(self, isp: str, port: int) -> int:
        """Connection attempts to ``port`` that reached the server through ``isp``."""
        return self.counter("server", "seen", f"syn_{isp}_{port}")

    def cut_line(self, isp: str) -> None:
        """The host's line to ``isp`` goes down (``ip link set ethN down`` on the host).

        The kernel flushes the link's IPv4 routes and its static IPv6 addresses
        with it; :meth:`restore_line` brings them back as a DHCP client would.
        """
        self.ip("host", "link", "set", self.line(isp).interface, "down")

    def restore_line(self, isp: str) -> None:
        """Undo :meth:`cut_line`: link up, then the addresses and default routes the line had."""
        line = self.line(isp)
        self.ip("host", "link", "set", line.interface, "up")
        self.ip("host", "addr", "replace", line.address4, "dev", line.interface)
        self.ip("host", "addr", "replace", line.address6, "dev", line.interface, "nodad")
        self._default_routes(line, "replace")

    def _default_routes(self, line: Line, verb: str) -> None:
        self.ip("host", "route", verb, "default", "via", line.gateway4, "dev", line.interface,
                "metric", str(line.metric))
        self.ip("host", "-6", "route", verb, "default", "via", line.gateway6, "dev", line.interface,
                "metric", str(line.metric))

    def prefer_main(self, isp: str) -> None:
        """Make the main table's default route point at ``isp`` (lower metric), the other kept."""
        for other in LINES.values():
            metric = 50 if other.isp == isp else 300
            for fam, gw in (("-4", other.gateway4), ("-6", other.gateway6)):
                for _ in range(4):  # whatever metric it has now
                    try:
                        self.ip("host", fam, "route", "del", "default", "via", gw, "dev", other.interface)
                    except RuntimeError:
                        break
                self.ip("host", fam, "route", "add", "default", "via", gw, "dev", other.interface,
                        "metric", str(metric))


@dataclass
class Held:
    """A long-lived connection opened by :meth:`Lab.hold`: echo lines through it."""

    proc: subprocess.Popen[str]
    peer: str  # the address the server saw when it was opened
    port: int  # its local port

    def echo(self, text: str) -> str | None:
        """Send one line; the server's echo, or None when the connection is broken."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        reply = self.proc.stdout.readline().strip()
        return None if not reply or reply.startswith("error:") else reply

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def which_isp(peer: str | None) -> str | None:
    """Which ISP carried a connection, from the address the server saw."""
    if peer is None:
        return None
    if peer in (ISP1_CUSTOMER4, ISP1_CUSTOMER6):
        return "isp1"
    if peer in (ISP2_CUSTOMER4, ISP2_CUSTOMER6):
        return "isp2"
    if peer in (ISP3_CUSTOMER4, ISP3_CUSTOMER6):
        return "isp3"
    return f"other ({peer})"


def customer(isp: str, server: str) -> str:
    """The host's address at ``isp`` in the family of ``server``: what the server sees."""
    if isp == "isp3":
        return ISP3_CUSTOMER6 if ":" in server else ISP3_CUSTOMER4
    if ":" in server:
        return ISP1_CUSTOMER6 if isp == "isp1" else ISP2_CUSTOMER6
    return ISP1_CUSTOMER4 if isp == "isp1" else ISP2_CUSTOMER4


def require_tools() -> list[str]:
    return [t for t in ("ip", "nft", "nsenter", "ss", "setpriv") if shutil.which(t) is None]
