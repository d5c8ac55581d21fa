"""The kernel tier's helpers: the host, reading the kernel back, monitors, expectations.

The fixtures that build the namespaces are in ``conftest``; what the tests
share besides fixtures (constants, read-back helpers, the exact objects the
standard config must produce) lives here, importable as ``.kernelhost``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from typing import Any

#: markrouted's routing protocol number, and the name iproute2 prints for it
#: once /etc/iproute2/rt_protos.d/markrouted.conf is installed
PROTO = "109"
PROTO_NAMES = (PROTO, "markrouted")

WAN1_ADDR, WAN1_GW, WAN1_ADDR6, WAN1_GW6 = "198.51.100.2", "198.51.100.1", "2001:db8:1::2", "2001:db8:1::1"
WAN2_ADDR, WAN2_GW, WAN2_ADDR6, WAN2_GW6 = "203.0.113.2", "203.0.113.1", "2001:db8:2::2", "2001:db8:2::1"

#: The config most tests apply: two uplinks, a failover policy preferring
#: wan2 and a weighted one over both.
CONFIG = """\
[settings]
mark_mask = 0x00ff0000
rule_priority = 10000

[uplinks.wan1]
interface = "wan1"
table = 101
mark = 1

[uplinks.wan2]
interface = "wan2"
table = 102
mark = 2

[[policy]]
name = "ssh"
proto = "tcp"
dport = [22]
uplinks = ["wan2", "wan1"]

[[policy]]
name = "web"
dport = [443]
balance = { wan1 = 3, wan2 = 1 }
"""


def family_flag(family: int) -> list[str]:
    return ["-6"] if family == 6 else ["-4"]


class Host:
    """The namespace markrouted runs in, with helpers that read the kernel back."""

    def __init__(self, ns: Any, peer: Any, confdir: str) -> None:
        self.ns = ns
        self.peer = peer  # the namespace holding the veth peers (the ISPs' side)
        self.name: str = ns.name
        self.confdir = confdir
        self.config = self.write(CONFIG)

    # ---------------------------------------------------------------- config

    def write(self, text: str, name: str = "markrouted.toml") -> str:
        """A config file readable by every user (the permission test runs as nobody)."""
        path = os.path.join(self.confdir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        return path

    # ---------------------------------------------------------------- commands

    def mr(self, *args: str, config: str | None = None,
           prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real CLI inside the namespace."""
        proc: subprocess.CompletedProcess[str] = self.ns.markrouted(
            *args, config=config or self.config, prefix=prefix)
        return proc

    def apply(self, config: str | None = None) -> subprocess.CompletedProcess[str]:
        """``markrouted apply``, which must succeed."""
        proc = self.mr("apply", config=config)
        assert proc.returncode == 0, f"apply failed: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def ip(self, *args: str, check: bool = True) -> str:
        out: str = self.ns.ip(*args, check=check)
        return out

    def sh(self, *cmd: str, check: bool = True, input: str | None = None) -> str:
        out: str = self.ns.sh(*cmd, check=check, input=input)
        return out

    def nft_script(self, script: str) -> None:
        self.sh("nft", "-f", "-", input=script)

    # ---------------------------------------------------------------- reading back

    def rules(self, family: int) -> list[dict[str, Any]]:
        """Every ip rule of a family, as ``ip -j rule`` prints it."""
        out = self.ip("-j", *family_flag(family), "rule", "show")
        data: list[dict[str, Any]] = json.loads(out) if out.strip() else []
        return data

    def owned_rules(self, family: int) -> list[dict[str, Any]]:
        """The rules carrying markrouted's proto tag, the tag itself left out."""
        return [without(r, "protocol") for r in self.rules(family) if r.get("protocol") in PROTO_NAMES]

    def routes(self, table: int | str, family: int) -> list[dict[str, Any]]:
        """The routes of one table (``[]`` for a table that does not exist)."""
        proc = subprocess.run(["ip", "-n", self.name, "-j", *family_flag(family), "route", "show",
                               "table", str(table)], capture_output=True, text=True)
        if proc.returncode != 0:
            if "does not exist" in proc.stderr:
                return []
            raise RuntimeError(f"ip route show table {table}: {proc.stderr}")
        data: list[dict[str, Any]] = json.loads(proc.stdout) if proc.stdout.strip() else []
        for route in data:
            if route.get("protocol") in PROTO_NAMES:
                route["protocol"] = PROTO
            if route.get("flags") == []:
                del route["flags"]
        return data

    def owned_routes(self, family: int) -> list[dict[str, Any]]:
        """Every route in any table carrying markrouted's proto tag."""
        return [r for r in self.routes("all", family) if r.get("protocol") == PROTO]

    def nft(self, table: str = "markrouted") -> dict[str, Any] | None:
        """``nft -j list table inet TABLE``, or None when the table does not exist."""
        proc = subprocess.run([*self.ns.nsenter(), "nft", "-j", "list", "table", "inet", table],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise RuntimeError(f"nft list table inet {table}: {proc.stderr}")
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def has_nft_table(self, table: str = "markrouted") -> bool:
        return self.nft(table) is not None

    def text_state(self) -> str:
        """Everything routing-related, as text: rules, routes of every table, nft ruleset.

        Handles are included, so a table or rule deleted and re-created
        identically still shows as a difference.
        """
        parts = []
        for fam in (["-4"], ["-6"]):
            parts.append(self.ip(*fam, "rule", "show"))
            parts.append(self.ip(*fam, "route", "show", "table", "all"))
        parts.append(self.sh("nft", "-a", "list", "ruleset"))
        return "\n".join(parts)

    def foreign_text(self) -> str:
        """``text_state`` without what carries markrouted's tag or lives in its nft table."""
        lines = []
        skipping = False
        for line in self.text_state().splitlines():
            if line.startswith("table inet markrouted"):
                skipping = True
            if skipping:
                if line == "}":
                    skipping = False
                continue
            if any(f" proto {p} " in line + " " for p in PROTO_NAMES):
                continue
            lines.append(line)
        return "\n".join(lines)


def without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def canon(items: list[dict[str, Any]]) -> list[str]:
    """Order-free, duplicate-preserving form of a list of JSON objects."""
    return sorted(json.dumps(i, sort_keys=True) for i in items)


def plan_lines(out: str) -> list[str]:
    """The ``+``/``-``/``~`` lines of ``markrouted plan`` (nft bodies left out)."""
    return [line for line in out.splitlines() if line[:2] in ("+ ", "- ", "~ ")]


def nft_chains(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["chain"]["name"]: i["chain"] for i in data["nftables"] if "chain" in i}


def nft_rules(data: dict[str, Any], chain: str | None = None) -> list[dict[str, Any]]:
    return [i["rule"] for i in data["nftables"] if "rule" in i and (chain is None or i["rule"]["chain"] == chain)]


def wait_carrier(ns: Any, links: tuple[str, ...], deadline: float = 10.0) -> None:
    """veth carrier reaches the link flags through linkwatch: poll until LOWER_UP."""
    end = time.monotonic() + deadline
    while True:
        data = json.loads(ns.ip("-j", "link", "show"))
        flags = {link["ifname"]: link.get("flags", []) for link in data}
        if all("LOWER_UP" in flags.get(name, []) for name in links):
            return
        if time.monotonic() > end:
            raise TimeoutError(f"no carrier on {links} in {ns.name}: {flags}")
        time.sleep(0.01)


def batch(ns_name: str, family: list[str], commands: list[str]) -> None:
    subprocess.run(["ip", "-n", ns_name, *family, "-batch", "-"], input="\n".join(commands) + "\n",
                   text=True, check=True, capture_output=True)


class Monitor:
    """Netlink and nftables change events in a namespace, between two markers.

    ``ip monitor`` and ``nft monitor`` run in the background; a marker (a route
    added in an unused table, an nft table created) is written before and
    after the action, and what the monitors print between the markers is
    exactly what the action wrote: no sleep decides when to look.
    """

    MARK_TABLE = "250"

    def __init__(self, host: Host) -> None:
        self.host = host
        self.procs: list[subprocess.Popen[str]] = []
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self._start("ip", ["ip", "monitor", "rule", "route"])
        self._start("nft", ["nft", "monitor"])
        self._count = 0
        self._ready()

    def _start(self, tag: str, cmd: list[str]) -> None:
        proc = subprocess.Popen([*self.host.ns.nsenter(), *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.procs.append(proc)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.put((tag, line.rstrip("\n")))

        threading.Thread(target=pump, daemon=True).start()

    def _write_marker(self) -> tuple[str, str]:
        """A fresh marker: a route to a unique address and an nft table of a unique name."""
        self._count += 1
        n = self._count
        dst, name = f"198.18.{200 + n // 250}.{n % 250 + 1}", f"mrkmarker{n}"
        self.host.ip("route", "add", f"{dst}/32", "dev", "lo", "table", self.MARK_TABLE)
        self.host.sh("nft", "add", "table", "inet", name)
        return dst, name

    @staticmethod
    def _is_marker(line: str) -> bool:
        return f"table {Monitor.MARK_TABLE}" in line or "mrkmarker" in line

    def _wait(self, dst: str, name: str, deadline: float) -> list[str] | None:
        """What the monitors printed before this marker; None if not both seen by the deadline."""
        seen = {"ip": False, "nft": False}
        before: list[str] = []
        while not all(seen.values()):
            try:
                tag, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if (tag == "ip" and f"{dst} " in line) or (tag == "nft" and name in line.split()):
                seen[tag] = True
            elif not seen[tag] and line.strip() and not line.startswith("# ") and not self._is_marker(line):
                before.append(f"{tag}: {line}")
        return before

    def _ready(self) -> None:
        """Wait until both monitors are subscribed: a marker written before that is lost.

        Fresh markers are written every 100 ms until one is seen by both; each
        marker is unique, so a late echo of an earlier one is never mistaken
        for a later one.
        """
        end = time.monotonic() + 10
        while time.monotonic() < end:
            dst, name = self._write_marker()
            seen = self._wait(dst, name, min(end, time.monotonic() + 0.1))
            self._remove_marker(dst, name)
            if seen is not None:
                return
        raise TimeoutError("the monitors never subscribed")

    def _remove_marker(self, dst: str, name: str) -> None:
        """Leave the namespace as it was; the removal's echoes are filtered as markers."""
        self.host.ip("route", "del", f"{dst}/32", "dev", "lo", "table", self.MARK_TABLE, check=False)
        self.host.sh("nft", "delete", "table", "inet", name, check=False)

    def _marker(self) -> list[str]:
        """Write a marker and wait until both monitors have seen it (each stream is in order)."""
        dst, name = self._write_marker()
        before = self._wait(dst, name, time.monotonic() + 10)
        self._remove_marker(dst, name)
        if before is None:
            raise TimeoutError(f"monitor marker {dst} / {name} not seen")
        return before

    def events_during(self, action: Any) -> list[str]:
        """Run ``action()``; the rule, route and nftables events it caused."""
        self._marker()
        action()
        return self._marker()

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------ expectations

UNREACHABLE_METRIC = 4294967294


def expected_rules(family: int, prio: int = 10000, tables: tuple[int, int] = (101, 102)) -> list[dict[str, Any]]:
    """markrouted's rules for CONFIG, as ``ip -j rule`` prints them (proto left out)."""
    addr1, addr2 = (WAN1_ADDR, WAN2_ADDR) if family == 4 else (WAN1_ADDR6, WAN2_ADDR6)
    t1, t2 = (str(t) for t in tables)
    return [
        {"priority": prio, "src": "all", "table": "main", "suppress_prefixlen": 0},
        {"priority": prio + 100, "src": "all", "fwmark": "0x10000", "fwmask": "0xff0000", "table": t1},
        {"priority": prio + 100, "src": "all", "fwmark": "0x20000", "fwmask": "0xff0000", "table": t2},
        {"priority": prio + 200, "src": addr1, "table": t1},
        {"priority": prio + 200, "src": addr2, "table": t2},
    ]


def expected_routes(uplink: int, family: int) -> list[dict[str, Any]]:
    """The routes of uplink 1's or 2's table, as ``ip -j route show table N`` prints them."""
    dev = f"wan{uplink}"
    if family == 4:
        addr, gw, net = (WAN1_ADDR, WAN1_GW, "198.51.100.0/24") if uplink == 1 else (WAN2_ADDR, WAN2_GW,
                                                                                        "203.0.113.0/24")
        return [
            {"dst": "default", "gateway": gw, "dev": dev, "protocol": "109"},
            {"dst": net, "dev": dev, "protocol": "109", "scope": "link", "prefsrc": addr},
            {"type": "unreachable", "dst": "default", "protocol": "109", "metric": UNREACHABLE_METRIC},
        ]
    addr, gw, net = (WAN1_ADDR6, WAN1_GW6, "2001:db8:1::/64") if uplink == 1 else (WAN2_ADDR6, WAN2_GW6,
                                                                                    "2001:db8:2::/64")
    return [
        {"dst": "default", "gateway": gw, "dev": dev, "protocol": "109", "metric": 1024, "pref": "medium"},
        {"dst": net, "dev": dev, "protocol": "109", "prefsrc": addr, "metric": 1024, "pref": "medium"},
        # the kernel echoes an IPv6 unreachable route with "dev lo"
        {"type": "unreachable", "dst": "default", "dev": "lo", "protocol": "109", "metric": UNREACHABLE_METRIC,
         "pref": "medium"},
    ]
