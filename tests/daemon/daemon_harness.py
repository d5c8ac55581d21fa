"""A two-uplink namespace and a ``markrouted run`` subprocess inside it.

::

    host                               peer
    eth0 198.51.100.2/24 ── veth ── p0 198.51.100.1/24   (wan1, table 101, mark 1)
         2001:db8:1::2/64               2001:db8:1::1/64
    eth1 203.0.113.2/24  ── veth ── p1 203.0.113.1/24    (wan2, table 102, mark 2)
         2001:db8:2::2/64               2001:db8:2::1/64

The host's main table has a default route via each peer (metric 100 via p0,
200 via p1, v4 and v6), as two DHCP clients would install them. Carrier is
cut from the peer side (``ip link set p1 down``), exactly as a cable pulled at
the modem looks to the host.

The daemon runs as systemd would run it, minus systemd: in the foreground,
with a private run directory (so tests never share ``status.json``) and a
fake ``NOTIFY_SOCKET`` whose datagrams are collected by a thread. The thread
matters: an AF_UNIX datagram queue holds only ``net.unix.max_dgram_qlen``
(10) messages, and sd_notify blocks when it is full — an undrained socket
would stall the daemon's loop on its watchdog pings.

Everything is observed by polling with a deadline (the kernel state through
``ip``/``nft``/``conntrack``, the daemon's view through its status file),
never by sleeping for a guessed time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from lab.topology import PYTHON, ROOT

T = TypeVar("T")

MASK = 0x00FF0000
WAN1_MARK, WAN2_MARK = 0x00010000, 0x00020000
OWN_PROTO = ("109", "markrouted")  # how `ip -j` names proto 109, with or without rt_protos.d
AGENT = os.path.join(ROOT, "lab", "agent.py")

#: How long a change may take to converge. Generous for loaded CI machines
#: (only a failing test waits this long); a healthy daemon converges in
#: milliseconds (carrier events: up to ~1 s of kernel's link-watch rate limit).
CONVERGE = 10.0


class Namespace(Protocol):
    """The top-level conftest's ``NetNS`` (a namespace of the test's own)."""

    name: str

    def nsenter(self) -> list[str]: ...
    def sh(self, *cmd: str, check: bool = True, input: str | None = None) -> str: ...
    def ip(self, *args: str, check: bool = True) -> str: ...
    def markrouted(self, *args: str, config: str | None = None, env: dict[str, str] | None = None,
                   prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]: ...


def wait_until(fn: Callable[[], T], what: str, timeout: float = CONVERGE,
               context: Callable[[], str] | None = None) -> T:
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` and the last value."""
    end = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > end:
            extra = f"\n{context()}" if context else ""
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}; last: {last!r}{extra}")
        time.sleep(0.02)


# ------------------------------------------------------------------ config


SSH_POLICY = """
[[policy]]
name = "ssh"
proto = "tcp"
dport = [22]
uplinks = ["wan2", "wan1"]
"""

WEB_POLICY = """
[[policy]]
name = "web"
proto = "tcp"
dport = [443]
uplinks = ["wan1", "wan2"]
"""


def config_text(*, resync: str = "1h", on_stop: str = "flush", rule_priority: int = 10000, wan2: bool = True,
                wan2_gateway: str = "auto", wan2_gateway6: str = "auto",
                policies: Iterable[str] = (SSH_POLICY,)) -> str:
    """The tests' config. ``resync = 1h``: within a test only events can explain a repair."""
    text = f"""\
[settings]
resync = "{resync}"
on_stop = "{on_stop}"
rule_priority = {rule_priority}

[uplinks.wan1]
interface = "eth0"
table = 101
mark = 1
"""
    if wan2:
        text += f"""
[uplinks.wan2]
interface = "eth1"
table = 102
mark = 2
gateway = "{wan2_gateway}"
gateway6 = "{wan2_gateway6}"
"""
    return text + "".join(policies)


def replace_file(path: Path, text: str) -> None:
    """Write the way editors do: a temporary file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------ the network


class TwoUplinks:
    """The host namespace with eth0/eth1 and the peer namespace behind them."""

    def __init__(self, host: Namespace, peer: Namespace) -> None:
        self.host = host
        self.peer = peer
        for ns in (host, peer):
            # before any link exists: addresses are usable at once, no DAD delay
            ns.sh("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")

    # ---------------------------------------------------------- building

    def add_uplink(self, n: int, *, defaults: bool = True) -> None:
        """eth{n} <-> p{n} with their addresses, up, and (``defaults``) the main default routes."""
        v4, v6 = self.prefixes(n)
        subprocess.run(["ip", "link", "add", f"eth{n}", "netns", self.host.name, "type", "veth",
                        "peer", "name", f"p{n}", "netns", self.peer.name], check=True)
        self.peer.ip("addr", "add", f"{v4}.1/24", "dev", f"p{n}")
        self.peer.ip("addr", "add", f"{v6}1/64", "dev", f"p{n}", "nodad")
        self.peer.ip("link", "set", f"p{n}", "up")
        self.host.ip("addr", "add", f"{v4}.2/24", "dev", f"eth{n}")
        self.host.ip("addr", "add", f"{v6}2/64", "dev", f"eth{n}", "nodad")
        self.host.ip("link", "set", f"eth{n}", "up")
        if defaults:
            self.add_defaults(n)

    def add_defaults(self, n: int) -> None:
        """What a DHCP client (v4) and router advertisements (v6) would install."""
        v4, v6 = self.prefixes(n)
        metric = str(100 * (n + 1))
        self.host.ip("route", "replace", "default", "via", f"{v4}.1", "dev", f"eth{n}", "metric", metric)
        self.host.ip("-6", "route", "replace", "default", "via", f"{v6}1", "dev", f"eth{n}", "metric", metric)

    @staticmethod
    def prefixes(n: int) -> tuple[str, str]:
        return (("198.51.100", "2001:db8:1::"), ("203.0.113", "2001:db8:2::"))[n]

    # ---------------------------------------------------------- reading the kernel

    def _ip_json(self, *args: str) -> list[dict[str, Any]]:
        out = self.host.ip("-j", *args)
        return json.loads(out) if out.strip() else []

    def rules(self) -> list[dict[str, Any]]:
        """markrouted's rules (proto 109), v4 and v6, each with its "family"."""
        out = []
        for family, flag in (("inet", "-4"), ("inet6", "-6")):
            for r in self._ip_json(flag, "rule"):
                if str(r.get("protocol")) in OWN_PROTO:
                    out.append({**r, "family": family})
        return out

    @staticmethod
    def rule_key(r: dict[str, Any]) -> tuple[str, ...]:
        """A rule's identity as ``ip`` shows it."""
        return tuple(str(r.get(k, "")) for k in ("family", "priority", "src", "srclen", "fwmark", "fwmask",
                                                "table", "suppress_prefixlen"))

    def rule_keys(self) -> set[tuple[str, ...]]:
        return {self.rule_key(r) for r in self.rules()}

    def source_rules(self, table: str) -> set[str]:
        """The addresses of the ``from ADDR lookup TABLE`` rules."""
        return {r["src"] for r in self.rules() if r.get("table") == table and r.get("src") not in (None, "all")}

    def routes(self, table: int) -> list[dict[str, Any]]:
        out = []
        for family, flag in (("inet", "-4"), ("inet6", "-6")):
            for r in self._ip_json(flag, "route", "show", "table", str(table)):
                out.append({**r, "family": family})
        return out

    def default_via(self, table: int, family: str = "inet") -> dict[str, Any] | None:
        """The unicast default route of a table (not the unreachable safety net)."""
        for r in self.routes(table):
            if r["family"] == family and r["dst"] == "default" and r.get("type", "unicast") == "unicast":
                return r
        return None

    def ifindex(self, dev: str) -> int:
        return int(self._ip_json("link", "show", dev)[0]["ifindex"])

    def nft(self, *what: str) -> str:
        """``nft list ...`` inside the host; "" when the object does not exist."""
        proc = subprocess.run([*self.host.nsenter(), "nft", "list", *what], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else ""

    def pick(self, chain: str = "pick_0") -> str:
        """Which ``set_UPLINK`` chain a policy's pick chain jumps to now ("" if none)."""
        m = re.search(r"goto (set_\w+)", self.nft("chain", "inet", "markrouted", chain))
        return m.group(1) if m else ""

    def masquerade(self, iface: str) -> str:
        """The postrouting rules for one interface, as nft prints them."""
        text = self.nft("chain", "inet", "markrouted", "postrouting")
        return "\n".join(line for line in text.splitlines() if f'oifname "{iface}"' in line)

    def conntrack(self) -> list[dict[str, Any]]:
        """The host's conntrack entries, IPv4 and IPv6: proto, first src/dst/ports, mark."""
        text = ""
        for family in ("ipv4", "ipv6"):
            text += subprocess.run([*self.host.nsenter(), "conntrack", "-L", "-f", family],
                                   capture_output=True, text=True).stdout
        out = []
        for line in text.splitlines():
            fields = line.split()
            if not fields:
                continue
            entry: dict[str, Any] = {"proto": fields[0]}
            for f in fields:
                key, _, value = f.partition("=")
                if value and key not in entry:
                    entry[key] = value
            entry["mark"] = int(entry.get("mark", "0"))
            out.append(entry)
        return out

    def owned_snapshot(self) -> tuple[set[tuple[str, ...]], str, str]:
        """Rules, tables 101/102 and the nft table: what a refused change must leave intact."""
        routes = json.dumps(sorted((r["family"], json.dumps(r, sort_keys=True))
                                   for t in (101, 102) for r in self.routes(t)))
        return self.rule_keys(), routes, self.nft("table", "inet", "markrouted")


# ------------------------------------------------------------------ the daemon


class Notifications:
    """A fake NOTIFY_SOCKET: collects every sd_notify datagram, in order."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mrn-", dir="/tmp")  # AF_UNIX paths are short
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.partition("=")[::2] for line in data.decode(errors="replace").splitlines() if line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def all(self) -> list[dict[str, str]]:
        with self._lock:
            return [m for _, m in self.messages]

    def count(self, key: str, value: str | None = None) -> int:
        return sum(1 for m in self.all() if key in m and (value is None or m[key] == value))

    def values(self, key: str) -> list[str]:
        return [m[key] for m in self.all() if key in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Daemon:
    """``markrouted run`` inside the host namespace, with its output in a file."""

    def __init__(self, net: TwoUplinks, config: Path, workdir: Path, *, watchdog_usec: int | None = None,
                 name: str = "daemon", run_dir: Path | None = None) -> None:
        self.net = net
        self.config = config
        self.run_dir = run_dir or workdir / f"{name}-run"
        self.log_path = workdir / f"{name}.log"
        self.notes = Notifications()
        env = {**os.environ, "PYTHONPATH": ROOT, "MARKROUTED_RUN_DIR": str(self.run_dir),
               "NOTIFY_SOCKET": self.notes.path}
        for key in ("WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "LISTEN_FDS"):
            env.pop(key, None)
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*net.host.nsenter(), PYTHON, "-m", "markrouted", "-c", str(config), "run", "--log", "console"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, text=True,
        )

    # ---------------------------------------------------------- observing

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log().splitlines() if text in line]

    def writes(self) -> int:
        """Kernel writes so far: every one is a log line with its ``kind=``."""
        return len(self.lines(" kind="))

    def context(self) -> str:
        tail = "\n".join(self.log().splitlines()[-40:])
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        status = json.dumps(self.status(), indent=1)
        return f"--- daemon ({state}), last log lines ---\n{tail}\n--- status ---\n{status}"

    def status(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads((self.run_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return doc

    def wait(self, fn: Callable[[], T], what: str, timeout: float = CONVERGE) -> T:
        """``wait_until`` that also fails at once when the daemon died."""
        def probe() -> T:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}) while waiting for {what}\n"
                                     + self.context())
            return fn()

        return wait_until(probe, what, timeout, self.context)

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        self.wait(lambda: self.notes.count("READY", "1"), "READY=1", timeout)
        doc = self.status()
        assert doc is not None and doc["pid"] == self.proc.pid, self.context()
        return doc

    def uplink(self, name: str) -> dict[str, Any]:
        doc = self.status() or {}
        result: dict[str, Any] = doc.get("uplinks", {}).get(name, {})
        return result

    def wait_uplink(self, name: str, state: str, reason: str = "", timeout: float = CONVERGE) -> dict[str, Any]:
        """Until the daemon says ``name`` is ``state`` (reason containing ``reason``) and in sync."""
        def probe() -> dict[str, Any] | None:
            doc = self.status()
            if not doc or not doc.get("in_sync"):
                return None
            u = doc["uplinks"].get(name, {})
            if u.get("state") == state and reason in str(u.get("reason")):
                return doc
            return None

        return self.wait(probe, f"{name} {state} ({reason or 'any reason'}) and in sync", timeout)

    # ---------------------------------------------------------- acting

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not exit within {timeout}s of signal {sig}\n{self.context()}")

    def close(self) -> None:
        """Teardown: whatever state the test left, nothing outlives it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self.notes.close()
