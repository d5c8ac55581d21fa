#!/usr/bin/python3
"""markrouted's demo: a small internet in network namespaces, and markrouted at work in it.

Run as root (``scripts/demo`` installs what it needs first, then runs this)::

    lab/demo.py                  build the lab, show every step, tear it all down
    lab/demo.py --keep           the same, then leave the lab up to explore
    lab/demo.py --destroy PREFIX tear down a lab that --keep left up
    lab/demo.py --apply          no daemon: run ``markrouted apply`` after each change
    lab/demo.py --step           wait for Enter between the steps (for presenting)

The lab (see ``lab/topology.py``): a host with two ISPs, a server behind both
ISPs, a LAN client behind the host. Each ISP drops packets whose source is not
its customer's address, as real ISPs do, so a connection that arrives at the
server came the way its source address says. markrouted runs on the host with
``lab/demo.toml``: SSH by ISP 2, web by ISP 1, each failing over to the other.

Everything lives in network namespaces named after a random prefix; nothing
of the machine's own network is touched, and everything is removed on exit,
Ctrl-C and SIGTERM included (unless --keep).

Exit status: 0 when every promised behaviour was seen, 1 when one was not,
2 when a prerequisite is missing, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from lab.topology import (  # noqa: E402
    CLIENT4,
    PYTHON,
    ROLES,
    ROOT,
    SERVER4,
    SERVER6,
    Lab,
    require_tools,
    run,
    which_isp,
)

CONFIG = os.path.join(HERE, "demo.toml")
#: how long a failover may take before the demo calls it a failure
MOVE_DEADLINE = 20.0
#: a poll's connection timeout: a packet that got no answer in this time was lost
POLL_TIMEOUT = 0.5

EXIT_OK, EXIT_FAILED, EXIT_PREREQ, EXIT_INTERRUPTED = 0, 1, 2, 130

NAMES = {"isp1": "ISP 1", "isp2": "ISP 2"}


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: stop the steps, clean up, exit 130."""


# ------------------------------------------------------------------ markrouted


@dataclass
class Markrouted:
    """markrouted on the lab's host: the daemon when it runs, else ``apply`` after every change."""

    lab: Lab
    config: str
    daemon: subprocess.Popen[str] | None = None
    log_path: str = ""
    _log_seen: int = 0

    @property
    def how(self) -> str:
        if self.daemon is not None:
            return f"the markrouted daemon (pid {self.daemon.pid}) reacts to every change by itself"
        return "no daemon: `markrouted apply` is run after every change"

    def changed(self) -> list[str]:
        """The network changed. The daemon notices by itself; without it, apply once.

        Without the daemon, ``apply`` first waits for the links to settle, as
        the daemon would wait for the kernel's carrier event; the time of a
        move includes that wait either way.
        """
        if self.daemon is not None:
            return []
        self.lab.wait_links_ready()
        proc = self.lab.markrouted("apply", config=self.config)
        return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]

    def new_log(self) -> list[str]:
        """The daemon's log lines since the last call (what it changed, and why)."""
        if not self.log_path:
            return []
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        fresh, self._log_seen = lines[self._log_seen:], len(lines)
        return [line for line in fresh if line.strip()]

    def stop(self) -> None:
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()


def start_markrouted(lab: Lab, config: str, want_daemon: bool = True) -> Markrouted:
    """The one switch between the daemon and ``apply``.

    The daemon (``markrouted run``) is used when it starts and publishes its
    status within a few seconds; otherwise the demo falls back to ``apply``
    after every change. To require the daemon, raise instead of falling back.
    """
    if want_daemon and os.path.exists(os.path.join(ROOT, "markrouted", "daemon", "__init__.py")):
        log_path = os.path.join(lab.run_dir, "markrouted.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [*lab.nsenter("host"), PYTHON, "-m", "markrouted", "-c", config, "run", "--log", "console"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                env=lab.markrouted_env(), start_new_session=True,  # Ctrl-C is ours to handle, then we stop it
            )
        mr = Markrouted(lab, config, proc, log_path)
        if _daemon_ready(lab, proc):
            return mr
        mr.stop()
        say("  (the daemon did not come up; falling back to `apply`. Its log:)")
        for line in mr.new_log()[-10:]:
            say(f"    {line}")
    lab.markrouted("apply", "-q", config=config)
    return Markrouted(lab, config)


def _daemon_ready(lab: Lab, proc: subprocess.Popen[str], deadline: float = 15.0) -> bool:
    """The daemon published a status, in sync, from its own pid (the run dir is the lab's own)."""
    path = os.path.join(lab.run_dir, "status.json")
    end = time.monotonic() + deadline
    while time.monotonic() < end and proc.poll() is None:
        try:
            with open(path) as f:
                doc = json.load(f)
            if doc.get("pid") == proc.pid and doc.get("in_sync"):
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------ output


def say(text: str = "") -> None:
    print(text, flush=True)


def table(rows: Sequence[Sequence[str]], indent: str = "  ") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        say(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def block(title: str, lines: Sequence[str], limit: int = 30) -> None:
    if not lines:
        return
    say(f"  {title}")
    shown = list(lines)
    if len(shown) > limit:
        shown = shown[:limit] + [f"... ({len(lines) - limit} more lines)"]
    for line in shown:
        say(f"    | {line}")


# ------------------------------------------------------------------ the demo


@dataclass
class Demo:
    lab: Lab
    mr: Markrouted
    pause: Callable[[], None]
    failures: list[str] = field(default_factory=list)
    moves: list[list[str]] = field(default_factory=list)

    def step(self, number: int, title: str, *explanation: str) -> None:
        self.pause()
        say()
        say(f"== Step {number}: {title}")
        for line in explanation:
            say(f"   {line}")
        say()

    def expect(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            say(f"  !! NOT AS PROMISED: {what}")
        return ok

    def traffic(self, role: str, expected: dict[int, str]) -> None:
        """Connections from ``role`` to the server per port and family, and who carried them."""
        rows = [["TRAFFIC", "FROM", "IP", "THE SERVER SAW", "SO IT CAME BY", "PROMISED", ""]]
        attempts = [(role, server, port) for port in expected for server in (SERVER4, SERVER6)]
        peers = self.lab.connect_all(attempts)  # every one is expected to connect
        verdicts = []
        for (_, server, port), peer in zip(attempts, peers):
            isp = which_isp(peer)
            want = expected[port]
            ok = isp == want
            label = {22: "ssh  (tcp 22)", 80: "web  (tcp 80)", 443: "web  (tcp 443)"}.get(port, f"tcp {port}")
            family = "IPv6" if ":" in server else "IPv4"
            came = NAMES.get(isp, isp) if isp else "(nowhere)"
            rows.append([label, role, family, peer or "(no connection)", came, NAMES[want], "ok" if ok else "WRONG"])
            verdicts.append((ok, f"{label.replace('  ', ' ')} from {role} over {family} should leave by "
                                 f"{NAMES[want]}, came by {came}"))
        table(rows)
        for ok, what in verdicts:
            self.expect(ok, what)

    def show_markrouted(self, explain: Sequence[Sequence[str]], changes: Sequence[str] = ()) -> None:
        """``markrouted status`` and ``explain``, and what markrouted changed in this step."""
        log = list(changes) + self.mr.new_log()
        say()
        if log:
            block("what markrouted did (its log):", log)
        else:
            say("  what markrouted did: nothing, the network did not change")
        status = self.lab.markrouted("status", config=self.mr.config, check=False)
        say()
        block("$ markrouted status", (status.stdout + status.stderr).splitlines())
        for args in explain:
            out = self.lab.markrouted("explain", *args, config=self.mr.config, check=False)
            say()
            block("$ markrouted explain " + " ".join(args), (out.stdout + out.stderr).splitlines())

    def status_says(self, ssh: str, isp2: str, deadline: float = 10.0) -> None:
        """``status --json`` agrees with the traffic (the daemon publishes after its pass)."""
        end = time.monotonic() + deadline
        doc: dict[str, Any] = {}
        while True:
            proc = self.lab.markrouted("status", "--json", config=self.mr.config, check=False)
            try:
                doc = json.loads(proc.stdout)
            except ValueError:
                doc = {}
            active = doc.get("policies", {}).get("ssh", {}).get("active", [])
            state = doc.get("uplinks", {}).get("isp2", {}).get("state")
            if (active[:1] == [ssh] and state == isp2) or time.monotonic() > end:
                break
            time.sleep(0.1)
        self.expect(active[:1] == [ssh], f"status should show ssh carried by {ssh}, shows {active}")
        self.expect(state == isp2, f"status should show isp2 {isp2}, shows {state}")

    def time_move(self, start: float, port: int, want: str, what: str) -> None:
        """Poll new connections (v4 and v6 at once) until ``want`` carries them; record how long it took."""

        def poll(server: str) -> float | None:
            while time.monotonic() - start < MOVE_DEADLINE:
                if which_isp(self.lab.connect("host", server, port, timeout=POLL_TIMEOUT)) == want:
                    return time.monotonic() - start
            return None

        with ThreadPoolExecutor(max_workers=2) as pool:
            took = dict(zip(("IPv4", "IPv6"), pool.map(poll, (SERVER4, SERVER6))))
        shown = {family: f"{s * 1000:.0f} ms" if s is not None else f"not within {MOVE_DEADLINE:.0f} s"
                 for family, s in took.items()}
        say("  " + ", ".join(
            f"{family} ssh moved to {NAMES[want]} after {shown[family]}" if s is not None
            else f"{family} ssh did NOT move to {NAMES[want]} within {MOVE_DEADLINE:.0f} s"
            for family, s in took.items()))
        for family, seconds in took.items():
            self.moves.append([what, family, NAMES[want], shown[family]])
            self.expect(seconds is not None, f"{what}: {family} ssh did not move to {NAMES[want]}")
        say()

    def run(self) -> None:
        lab = self.lab
        say(f"   markrouted: {self.mr.how}.")
        self.step(1, "the host's own traffic",
                  "lab/demo.toml sends SSH (TCP 22) by ISP 2 and web (TCP 80, 443) by ISP 1.",
                  "The host's main routing table would send everything by ISP 1. Each connection",
                  "goes to the server; the address it saw tells which ISP carried it.")
        self.traffic("host", {22: "isp2", 443: "isp1"})
        self.status_says("isp2", "up")
        self.show_markrouted([["--proto", "tcp", "--dport", "22", "--daddr", SERVER4],
                              ["--proto", "tcp", "--dport", "443", "--daddr", SERVER6]])

        self.step(2, "the LAN client's traffic follows the same policies",
                  f"The client ({CLIENT4}) is behind the host; its connections are forwarded, and",
                  "leave with the address of the ISP that carries them (masquerade).")
        self.traffic("client", {22: "isp2", 80: "isp1"})
        self.show_markrouted([["--proto", "tcp", "--dport", "22", "--daddr", SERVER4,
                               "--iif", "lan0", "--saddr", CLIENT4]])

        self.step(3, "ISP 2's line is cut",
                  "`ip link set eth1 down` on the host. SSH must move to ISP 1 (its second choice);",
                  "new connections are polled until the server sees them arrive through ISP 1.")
        start = time.monotonic()
        lab.cut_line("isp2")
        changes = self.mr.changed()
        self.time_move(start, 22, "isp1", "line cut")
        self.traffic("host", {22: "isp1", 443: "isp1"})
        self.status_says("isp1", "down")
        self.show_markrouted([["--proto", "tcp", "--dport", "22", "--daddr", SERVER4]], changes)

        self.step(4, "ISP 2's line is back",
                  "Link up, and its addresses and default routes back, as a DHCP client would put",
                  "them. SSH must return to ISP 2.")
        start = time.monotonic()
        lab.restore_line("isp2")
        changes = self.mr.changed()
        self.time_move(start, 22, "isp2", "line restored")
        self.traffic("host", {22: "isp2", 443: "isp1"})
        self.status_says("isp2", "up")
        self.show_markrouted([["--proto", "tcp", "--dport", "22", "--daddr", SERVER4]], changes)

        self.pause()
        say()
        say("== Summary")
        say()
        table([["WHAT", "IP", "SSH MOVED TO", "AFTER"], *self.moves])
        say()
        if self.failures:
            say(f"{len(self.failures)} promised behaviours were NOT seen:")
            for f in self.failures:
                say(f"  - {f}")
        else:
            say("Every promised behaviour was seen.")


# ------------------------------------------------------------------ life


def keep_message(lab: Lab, mr: Markrouted | None) -> None:
    host = f"nsenter --net=/run/netns/{lab.ns('host')}"
    say()
    say(f"The lab is still up (prefix {lab.prefix}). Enter its namespaces with:")
    for role in ROLES:
        say(f"  nsenter --net=/run/netns/{lab.ns(role)} bash".ljust(56) + f"# {role}")
    if mr is not None and mr.daemon is not None:
        say(f"markrouted keeps running in the host (pid {mr.daemon.pid}); its log: {mr.log_path}")
    say("On the host, for example:")
    say(f"  export MARKROUTED_RUN_DIR={lab.run_dir} PYTHONPATH={ROOT}")
    say(f"  {host} {PYTHON} -m markrouted -c {CONFIG} status")
    say(f"  {host} nft list table inet markrouted")
    say(f"  {host} {PYTHON} {os.path.join(HERE, 'agent.py')} connect {SERVER4} 22 2")
    say("     (prints the address the server saw: 203.0.113.2 is ISP 2, 198.51.100.2 ISP 1)")
    say("Tear it down with:")
    say(f"  {PYTHON} {os.path.join(HERE, 'demo.py')} --destroy {lab.prefix}")
    say("or by hand (its processes first, or they keep the namespaces alive):")
    names = " ".join(lab.ns(role) for role in ROLES)
    say(f"  for n in {names}; do ip netns pids $n | xargs -r kill; ip netns del $n; done; rm -rf {lab.run_dir}")


def destroy(prefix: str) -> int:
    lab = Lab.adopt(prefix)
    found = list(lab.made)
    lab.destroy()
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"markrouted-{prefix}-*")):
        shutil.rmtree(path, ignore_errors=True)
    say(f"removed {len(found)} namespaces: {' '.join(found)}" if found else f"no namespace of {prefix} found")
    return EXIT_OK


def prerequisites() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("run it as root: it creates network namespaces (sudo scripts/demo)")
    absent = require_tools()
    if absent:
        problems.append(f"missing tools: {', '.join(absent)} (scripts/install-deps installs them)")
    try:
        import nftables  # noqa: F401
        import pyroute2  # noqa: F401
    except ImportError as exc:
        problems.append(f"missing Python package: {exc.name} (scripts/install-deps installs it)")
    return problems


def wait_for_enter() -> None:
    try:
        input("   (Enter for the next step) ")
    except EOFError:
        pass


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description="markrouted at work in a small internet of namespaces")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards, and say how to enter it")
    p.add_argument("--destroy", metavar="PREFIX", help="tear down a lab left up by --keep")
    p.add_argument("--apply", action="store_true", help="no daemon: run `markrouted apply` after each change")
    p.add_argument("--step", action="store_true", help="wait for Enter between the steps")
    args = p.parse_args(argv)

    problems = prerequisites()
    if problems:
        for problem in problems:
            print(f"demo: {problem}", file=sys.stderr)
        return EXIT_PREREQ
    if args.destroy:
        return destroy(args.destroy)

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    lab = Lab()
    mr: Markrouted | None = None
    keep = False
    try:
        say(f"Building the lab (namespaces {lab.prefix}-*): host, isp1, isp2, server, client ...")
        lab.build()
        mr = start_markrouted(lab, CONFIG, want_daemon=not args.apply)
        demo = Demo(lab, mr, wait_for_enter if args.step else (lambda: None))
        demo.run()
        keep = args.keep
        return EXIT_FAILED if demo.failures else EXIT_OK
    except Interrupted as exc:
        say()
        say(f"Interrupted ({exc}): cleaning up.")
        return EXIT_INTERRUPTED
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        # the lab itself broke (a command failed): say what, then clean up
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        # nothing may interrupt the cleanup itself
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if keep:
            keep_message(lab, mr)
        else:
            if mr is not None:
                mr.stop()
            prefix = lab.prefix
            lab.destroy()
            left = [n for n in run(["ip", "netns", "list"], check=False).split() if n.startswith(prefix + "-")]
            if left:
                say(f"Could not remove every namespace of the lab: {' '.join(left)}")
            else:
                say(f"Removed the lab ({prefix}): nothing of it is left.")


if __name__ == "__main__":
    sys.exit(main())
