#!/usr/bin/python3
"""Benchmark of ``apply``: markrouted against the shell ways of installing the same state.

Run as root: ``/usr/bin/python3 bench/apply.py`` (``--help`` for the knobs). It prints a
results table and writes ``bench/results-apply.md``; ``bench/README.md`` says how to read it.

What is measured, on 16 uplinks and 1,000 policies, in a network namespace of its own:

1. cold apply: an empty kernel to the full state, in-process (``reconcile`` with a fresh
   ``Deriver``), as the daemon does it on start: the process is warm, the kernel empty;
2. no-op apply: the same reconcile once everything is in sync, with the ``Deriver``
   the daemon keeps across passes; it must write nothing;
3. one command per object: what a hand-written script does, one ``ip rule add``,
   ``ip route add``, ``nft add table/chain/rule`` per object, run by ``sh``;
4. the floor: one ``ip -batch`` per address family plus one ``nft -f`` of the table text;

and, to show where a no-op's time goes: a no-op without a Deriver (the one-shot CLI
path), one that must list the nft table again (the first pass after any nftables
transaction), the part of a no-op that is not derivation (observe, actual, diff), and
a drift repair (a rule added by hand is noticed by the next pass of the same process).

Everything is generated from one ``DesiredState``, and after every run of 3 and 4 a
``compute`` must plan nothing: the four ways install the very same objects, or the
comparison would mean nothing.

The parent process builds the namespaces and runs itself again inside the main one
(``nsenter --net``), where the child does the timing with ``time.perf_counter``. The
namespaces are removed whatever happens.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import resource
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from markrouted.model import (  # noqa: E402
    AF_INET,
    AF_INET6,
    NFT_FAMILY,
    NFT_TABLE,
    RTPROT_MARKROUTED,
    SUPPRESS_UNSET,
    DesiredState,
    NftTable,
    Route,
    Rule,
)

PYTHON = "/usr/bin/python3"
RESULTS = os.path.join(ROOT, "bench", "results-apply.md")
UPLINKS = 16
POLICIES = 1000
TABLE_BASE = 101
METRIC_BASE = 100
RTPROT = RTPROT_MARKROUTED  # numeric in ip commands: the name may not be installed

TARGET_COLD_VS_FLOOR = 3.0
TARGET_SCRIPT_VS_COLD = 10.0
TARGET_NOOP_S = 0.050


# =================================================================== the setup (parent)


def run(cmd: Sequence[str], input: str | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def v4_net(i: int) -> str:
    """Uplink i's IPv4 /24 (198.18.0.0/15 is the benchmarking range, RFC 2544)."""
    return f"198.18.{i + 1}"


def v6_net(i: int) -> str:
    return f"2001:db8:{i + 1:x}"


class Namespaces:
    """Two namespaces: ``host`` (markrouted's) and ``peer`` (the gateways).

    Each uplink is a veth pair created straight into those namespaces, so nothing of
    the root namespace is touched; names carry a random prefix so runs never collide.
    """

    def __init__(self) -> None:
        prefix = "mrapply" + secrets.token_hex(3)
        self.host = f"{prefix}-host"
        self.peer = f"{prefix}-peer"
        self.made: list[str] = []

    def __enter__(self) -> "Namespaces":
        try:
            for ns in (self.host, self.peer):
                run(["ip", "netns", "add", ns])
                self.made.append(ns)
            self._build()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def delete(self) -> None:
        for ns in reversed(self.made):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()

    def _build(self) -> None:
        host: list[str] = ["link set lo up"]
        peer: list[str] = ["link set lo up"]
        for i in range(UPLINKS):
            host.append(f"link add up{i} type veth peer name pe{i} netns {self.peer}")
        run(["ip", "-n", self.host, "-batch", "-"], input="\n".join(host) + "\n")
        host = []
        for i in range(UPLINKS):
            a4, a6 = v4_net(i), v6_net(i)
            host += [
                f"address add {a4}.2/24 dev up{i}",
                f"address add {a6}::2/64 dev up{i} nodad",
                f"link set up{i} up",
            ]
            peer += [
                f"address add {a4}.1/24 dev pe{i}",
                f"address add {a6}::1/64 dev pe{i} nodad",
                f"link set pe{i} up",
            ]
        run(["ip", "-n", self.peer, "-batch", "-"], input="\n".join(peer) + "\n")
        run(["ip", "-n", self.host, "-batch", "-"], input="\n".join(host) + "\n")
        # main-table default routes, as a DHCP client / RA would install them
        routes = [f"route add default via {v4_net(i)}.1 dev up{i} metric {METRIC_BASE + i}" for i in range(UPLINKS)]
        run(["ip", "-n", self.host, "-batch", "-"], input="\n".join(routes) + "\n")
        routes6 = [f"route add default via {v6_net(i)}::1 dev up{i} metric {METRIC_BASE + i}" for i in range(UPLINKS)]
        run(["ip", "-6", "-n", self.host, "-batch", "-"], input="\n".join(routes6) + "\n")
        self._wait_carrier()

    def _wait_carrier(self, deadline_s: float = 10.0) -> None:
        """Poll until every uplink is up with a carrier (veth carrier is asynchronous)."""
        deadline = time.monotonic() + deadline_s
        while True:
            links = json.loads(run(["ip", "-j", "-n", self.host, "link", "show"]))
            ready = sum(1 for link in links if link["ifname"].startswith("up") and "LOWER_UP" in link["flags"])
            if ready == UPLINKS:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {ready}/{UPLINKS} uplinks got a carrier")
            time.sleep(0.02)


def config_text() -> str:
    """16 uplinks and 1,000 policies that exercise every kind of match and target.

    Deterministic, so successive runs (and results files) are comparable.
    """
    out = ["[settings]", "mark_mask = 0x00ff0000", "rule_priority = 10000", ""]
    for i in range(UPLINKS):
        out += [
            f"[uplinks.u{i}]",
            f'interface = "up{i}"',
            f"table = {TABLE_BASE + i}",
            f"mark = {i + 1}",
            "",
        ]
    for i in range(POLICIES):
        lines = [f'name = "p{i:04d}"']
        kind = i % 5
        port = 1000 + i
        if kind == 0:
            lines += ['proto = "tcp"', f'dport = [{port}, "{20000 + i}-{20000 + i + 9}"]']
        elif kind == 1:
            lines += ['proto = "udp"', f"dport = [{port}]", f'sport = ["{30000 + i}-{30010 + i}"]']
        elif kind == 2:
            lines += ['proto = "tcp"', f"dport = [{port}, {port + 1000}]",
                      f'daddr = ["198.19.{i // 256}.{i % 256}/32", "2001:db8:ff{i // 256:02x}:{i % 256:x}::/64"]']
        elif kind == 3:
            lines += ['family = "ipv4"', f'daddr = ["198.19.{i // 256}.{i % 256}/32", "203.0.113.{i % 256}/32"]']
        else:
            lines += ['proto = "icmp"', f'daddr = ["198.19.{128 + i // 256}.0/24"]']
        if i % 20 == 7:
            lines.append('iif = "lan0"')
        elif i % 25 == 3:
            lines.append(f"uid = [{1000 + i}]")
        if i % 10 == 9:
            a, b = i % UPLINKS, (i + 3) % UPLINKS
            lines.append(f"balance = {{ u{a} = 3, u{b} = 1 }}")
        else:
            chain = [(i + k * 5) % UPLINKS for k in range(1 + i % 3)]
            lines.append("uplinks = [" + ", ".join(f'"u{c}"' for c in chain) + "]")
        if i % 7 == 0:
            lines.append('fallback = "drop"')
        out += ["[[policy]]", *lines, ""]
    return "\n".join(out)


# =================================================================== shell forms


def rule_args(rule: Rule) -> str:
    """An ``ip rule add`` argument list for a model.Rule (without ``ip``/``-6``)."""
    sel = f"from {rule.src}/{rule.src_len}" if rule.src is not None else "from all"
    text = f"rule add priority {rule.priority} {sel}"
    if rule.fwmask:
        text += f" fwmark {rule.fwmark:#x}/{rule.fwmask:#x}"
    text += f" lookup {rule.table}"
    if rule.suppress_prefixlength != SUPPRESS_UNSET:
        text += f" suppress_prefixlength {rule.suppress_prefixlength}"
    return text + f" proto {RTPROT}"


def route_args(route: Route) -> str:
    """An ``ip route add`` argument list for a model.Route."""
    if route.type == 7:
        return f"route add unreachable {route.dst} table {route.table} proto {RTPROT} metric {route.metric}"
    text = f"route add {route.dst}"
    if route.gateway:
        text += f" via {route.gateway}"
    text += f" dev {route.ifname} table {route.table} proto {RTPROT}"
    if route.scope == 253:
        text += " scope link"
    if route.prefsrc:
        text += f" src {route.prefsrc}"
    text += f" metric {route.metric}"
    if route.onlink:
        text += " onlink"
    return text


def family_flag(family: int) -> str:
    return "-4" if family == AF_INET else "-6"


def table_of(desired: DesiredState) -> NftTable:
    if desired.nft is None:
        raise RuntimeError("nothing to install: the config has no uplinks")
    return desired.nft


def ordered_routes(desired: DesiredState) -> list[Route]:
    """Routes in an order the kernel accepts (connected before the defaults via them)."""
    return sorted(desired.routes, key=lambda r: (r.family, r.table, r.gateway is not None, r.type, r.dst))


def per_object_script(desired: DesiredState) -> str:
    """The hand-written way: one ``ip``/``nft`` process per object, in markrouted's order.

    Chains come before rules, since a rule's ``goto`` needs its target to exist.
    """
    nft = table_of(desired)
    lines = ["#!/bin/sh", "set -e"]
    for route in ordered_routes(desired):
        lines.append(f"ip {family_flag(route.family)} {route_args(route)}")
    for rule in sorted(desired.rules):
        lines.append(f"ip {family_flag(rule.family)} {rule_args(rule)}")
    table = f"{NFT_FAMILY} {NFT_TABLE}"
    lines.append(f"nft add table {table}")
    for chain in nft.chains:
        spec = ""
        if chain.base:
            b = chain.base
            spec = f" {{ type {b.type} hook {b.hook} priority {b.prio}; policy {b.policy}; }}"
        lines.append("nft " + shlex.quote(f"add chain {table} {chain.name}{spec}"))
    for chain in nft.chains:
        for rule in chain.rules:
            lines.append("nft " + shlex.quote(f'add rule {table} {chain.name} {rule.text} comment "{rule.comment}"'))
    return "\n".join(lines) + "\n"


def batch_files(desired: DesiredState) -> dict[str, str]:
    """The floor: one ``ip -batch`` per family (a batch line cannot carry ``-6``) and one nft file."""
    out: dict[str, str] = {}
    for family, flag in ((AF_INET, "-4"), (AF_INET6, "-6")):
        lines = [route_args(r) for r in ordered_routes(desired) if r.family == family]
        lines += [rule_args(r) for r in sorted(desired.rules) if r.family == family]
        out[flag] = "\n".join(lines) + "\n"
    out["nft"] = table_of(desired).text() + "\n"
    return out


# =================================================================== the measuring (child)


class Stopwatch:
    """Wall-clock and CPU time (this process and its children) of one measured span.

    Other work on the machine stretches wall time; CPU time shows how much of it
    was the measured code's own, so a loaded run can still be judged.
    """

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = self._cpu()

    @staticmethod
    def _cpu() -> float:
        own = time.process_time()
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own + kids.ru_utime + kids.ru_stime

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, self._cpu() - self.cpu


class TimedKernel:
    """Wraps a Kernel and adds up the time spent in each of its methods.

    Gives the cold apply's breakdown (reading, netlink writes, the nft transaction)
    without touching reconcile; the overhead is one call per kernel operation.
    """

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel
        self.spent: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        self.spent.clear()
        self.calls.clear()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._kernel, name)
        if not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed


def profile_text(fn: Callable[[], Any], top: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    buf.write("\n")
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue().replace(ROOT + "/", "")


def median_index(values: Sequence[float]) -> int:
    return sorted(range(len(values)), key=lambda k: values[k])[len(values) // 2]


def child(args: argparse.Namespace) -> int:
    from markrouted.config import load
    from markrouted.derive import Deriver, derive, needs
    from markrouted.diff import diff
    from markrouted.kernel import Kernel
    from markrouted.reconcile import compute, flush, reconcile

    config = load(args.config)
    kernel = TimedKernel(Kernel())
    report: dict[str, Any] = {"runs": args.runs, "script_runs": args.script_runs, "load_before": os.getloadavg()}

    def empty_kernel() -> None:
        flush(config, kernel)
        actual = kernel.actual([config.settings.rule_priority])
        if actual.rules or actual.routes or actual.nft is not None:
            raise RuntimeError("flush left owned objects behind")

    def someone_elses_transaction() -> None:
        """An nftables commit by another process: the generation moves, the table is listed again."""
        run(["nft", "add table ip mrbench_other; delete table ip mrbench_other"])

    def in_sync(what: str) -> None:
        plan = compute(config, kernel).plan
        if not plan.empty:
            raise RuntimeError(f"{what} did not install what markrouted derives; plan:\n"
                               + "\n".join(plan.lines()[:40]))

    # the daemon's way: one Deriver per config, held across passes
    deriver = Deriver(config)

    def reconciles(key: str, before: Callable[[], None], expect_noop: bool,
                   pass_deriver: Callable[[], Deriver | None] = lambda: deriver, runs: int = args.runs) -> None:
        """``runs`` timed reconciles; ``before`` (untimed) sets the kernel up for each."""
        times: list[float] = []
        cpus: list[float] = []
        writes: list[int] = []
        parts: list[dict[str, float]] = []
        for _ in range(runs):
            before()
            kernel.reset()
            this = pass_deriver()
            watch = Stopwatch()
            result = reconcile(config, kernel, deriver=this)
            total, cpu = watch.stop()
            cpus.append(cpu)
            if expect_noop and not result.plan.empty:
                raise RuntimeError("an apply in sync planned changes:\n" + "\n".join(result.plan.lines()[:40]))
            times.append(total)
            writes.append(result.writes)
            spent = dict(kernel.spent)
            spent["derive+diff+other"] = total - sum(spent.values())
            parts.append(spent)
        report[f"{key}_s"] = times
        report[f"{key}_cpu"] = cpus
        report[f"{key}_writes"] = writes
        report[f"{key}_breakdown"] = parts[median_index(times)]

    # the first apply of a fresh process: imports, pyroute2 and libnftables warm-up,
    # the sysctls of a new namespace; reported, not part of the medians
    empty_kernel()
    t0 = time.perf_counter()
    first = reconcile(config, kernel, deriver=deriver)
    report["first_apply_s"] = time.perf_counter() - t0
    report["first_writes"] = first.writes
    desired = first.desired
    down = [u.name for u in desired.uplinks if u.state != "up"]
    if down:
        raise RuntimeError(f"uplinks not up: {down}")
    report["objects"] = {
        "rules": len(desired.rules),
        "routes": len(desired.routes),
        "nft_chains": len(table_of(desired).chains),
        "nft_rules": sum(len(c.rules) for c in table_of(desired).chains),
    }

    # a daemon starting on an empty kernel: nothing derived yet either
    reconciles("cold", empty_kernel, expect_noop=False, pass_deriver=lambda: Deriver(config))
    # the pass right after markrouted's own write lists the nft table once (the
    # generation moved): that case is the "listed again" row, not this one
    reconcile(config, kernel, deriver=deriver)
    # no-ops are cheap and the target is tight: more runs for a steadier median
    reconciles("noop", lambda: None, expect_noop=True, runs=3 * args.runs)
    # the one-shot `markrouted apply` path: no Deriver, everything derived afresh
    reconciles("noop_oneshot", lambda: None, expect_noop=True, pass_deriver=lambda: None)
    # what a no-op costs when the nft table must be listed again: the first pass
    # after any nftables transaction on the host, or a process without a listing
    reconciles("noop_relist", someone_elses_transaction, expect_noop=True)

    # a no-op whose derivation is reused because its inputs did not change: the
    # floor of any reconcile that re-reads the kernel (observe, actual, diff)
    observed = kernel.observe(needs(config))
    now = derive(config, observed)
    reused: list[float] = []
    reused_cpu: list[float] = []
    for _ in range(3 * args.runs):
        watch = Stopwatch()
        same = kernel.observe(needs(config)) == observed
        plan = diff(now, kernel.actual([config.settings.rule_priority]))
        wall, cpu = watch.stop()
        reused.append(wall)
        reused_cpu.append(cpu)
        if not same:
            raise RuntimeError("the observed facts changed during the benchmark")
        if not plan.empty:
            raise RuntimeError("the kernel drifted during the benchmark:\n" + "\n".join(plan.lines()[:40]))
    report["noop_reused_s"] = reused
    report["noop_reused_cpu"] = reused_cpu

    # a change behind markrouted's back must still be seen by the very next pass
    # of the same process (the nft listing is reused only while nothing changed)
    run(["nft", "add rule inet markrouted postrouting counter"])
    t0 = time.perf_counter()
    repair = reconcile(config, kernel, deriver=deriver)
    report["drift_s"] = time.perf_counter() - t0
    report["drift_writes"] = repair.writes
    if repair.plan.nft.empty:
        raise RuntimeError("a rule added by hand to the nft table went unnoticed")
    in_sync("the drift repair")

    # a pick chain flushed by hand: only that chain is refilled
    run(["nft", "flush chain inet markrouted pick_0"])
    t0 = time.perf_counter()
    repair = reconcile(config, kernel, deriver=deriver)
    report["drift_pick_s"] = time.perf_counter() - t0
    report["drift_pick_writes"] = repair.writes
    if repair.plan.nft.empty or repair.plan.nft.replace:
        raise RuntimeError(f"a flushed pick chain was not refilled alone: {repair.plan.nft}")
    in_sync("the pick chain's repair")

    # failover: a health check takes the first uplink down, then back up; the
    # pick chains that used it are refilled (what the daemon does on a verdict)
    from markrouted.model import Health

    down = {config.uplinks[0].name: Health(False, "benchmark")}
    failover: list[float] = []
    failover_cpu: list[float] = []
    for _ in range(args.runs):
        for health in (down, {}):
            watch = Stopwatch()
            result = reconcile(config, kernel, health, deriver=deriver)
            wall, cpu_s = watch.stop()
            if result.plan.nft.replace or not result.plan.nft.chains:
                raise RuntimeError(f"a failover did not refill pick chains: {result.plan.nft}")
            failover.append(wall)
            failover_cpu.append(cpu_s)
    report["failover_s"] = failover
    report["failover_cpu"] = failover_cpu
    in_sync("the failovers")

    with tempfile.TemporaryDirectory(prefix="markrouted-bench-") as tmp:
        script = os.path.join(tmp, "per-object.sh")
        text = per_object_script(desired)
        with open(script, "w") as f:
            f.write(text)
        report["script_commands"] = sum(1 for line in text.splitlines() if line.startswith(("ip ", "nft ")))
        per_object: list[float] = []
        per_object_cpu: list[float] = []
        for _ in range(args.script_runs):
            empty_kernel()
            watch = Stopwatch()
            run(["sh", script], timeout=600)
            wall, cpu = watch.stop()
            per_object.append(wall)
            per_object_cpu.append(cpu)
            in_sync("the per-object script")
        report["per_object_s"] = per_object
        report["per_object_cpu"] = per_object_cpu

        paths = {}
        for key, body in batch_files(desired).items():
            paths[key] = os.path.join(tmp, f"floor.{key.strip('-')}")
            with open(paths[key], "w") as f:
                f.write(body)
        floor: list[float] = []
        floor_cpu: list[float] = []
        floor_parts: list[dict[str, float]] = []
        for _ in range(args.runs):
            empty_kernel()
            parts = {}
            watch = Stopwatch()
            for flag in ("-4", "-6"):
                t1 = time.perf_counter()
                run(["ip", flag, "-batch", paths[flag]])
                parts[f"ip {flag} -batch"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            run(["nft", "-f", paths["nft"]])
            parts["nft -f"] = time.perf_counter() - t1
            wall, cpu = watch.stop()
            floor.append(wall)
            floor_cpu.append(cpu)
            floor_parts.append(parts)
            in_sync("the batch floor")
        report["floor_s"] = floor
        report["floor_cpu"] = floor_cpu
        report["floor_breakdown"] = floor_parts[median_index(floor)]

    cold_med = statistics.median(report["cold_s"])
    noop_med = statistics.median(report["noop_s"])
    misses = []
    if cold_med > TARGET_COLD_VS_FLOOR * statistics.median(floor) \
            or statistics.median(per_object) < TARGET_SCRIPT_VS_COLD * cold_med:
        misses.append("cold")
    if noop_med > TARGET_NOOP_S or any(report["noop_writes"]):
        misses.append("noop")
    report["misses"] = misses
    profiles: dict[str, str] = {}
    if args.profile or "noop" in misses:
        empty_kernel()
        reconcile(config, kernel, deriver=deriver)
        reconcile(config, kernel, deriver=deriver)
        profiles["no-op apply"] = profile_text(lambda: reconcile(config, kernel, deriver=deriver))
    if args.profile or "cold" in misses:
        empty_kernel()
        profiles["cold apply"] = profile_text(lambda: reconcile(config, kernel, deriver=Deriver(config)))
    report["profiles"] = profiles
    report["load_after"] = os.getloadavg()
    empty_kernel()
    kernel.close()
    json.dump(report, sys.stdout)
    return 0


# =================================================================== the report (parent)


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            return run(cmd).splitlines()[0].strip()
        except (RuntimeError, OSError, IndexError):
            return "?"

    try:
        import pyroute2

        pr2 = str(getattr(pyroute2, "__version__", "?"))
    except ImportError:
        pr2 = "?"
    if pr2 in ("?", "unknown"):
        pr2 = first_line(["dpkg-query", "-W", "-f", "${Version}", "python3-pyroute2"])
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyroute2": pr2,
        "nftables": first_line(["nft", "--version"]),
        "iproute2": first_line(["ip", "-V"]),
        "cpus": str(os.cpu_count()),
    }


def render(report: dict[str, Any]) -> tuple[str, str]:
    """(terminal table, markdown document)."""
    med = {k[:-2]: statistics.median(v) for k, v in report.items() if k.endswith("_s") and isinstance(v, list)}
    cpu = {k[:-4]: statistics.median(v) for k, v in report.items() if k.endswith("_cpu")}
    cold, noop, script, floor = med["cold"], med["noop"], med["per_object"], med["floor"]
    o = report["objects"]
    noop_writes = max(report["noop_writes"])

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def row(label: str, key: str, remark: str) -> tuple[str, str, str, str, str]:
        runs = len(report[f"{key}_s"])
        return (label, fmt_s(med[key]), fmt_s(cpu[key]) if key in cpu else "",
                f"median of {runs}" if runs > 1 else "1 run", remark)

    rows = [
        row("cold apply (markrouted, in-process)", "cold",
            f"{cold / floor:.2f}x the floor (CPU {cpu['cold'] / cpu['floor']:.2f}x; target <= "
            f"{TARGET_COLD_VS_FLOOR:g}x): {verdict(cold <= TARGET_COLD_VS_FLOOR * floor)}"),
        row("no-op apply (in sync)", "noop",
            f"{noop_writes} kernel writes; target <= {TARGET_NOOP_S * 1000:g} ms and 0 writes: "
            f"{verdict(noop <= TARGET_NOOP_S and noop_writes == 0)}"),
        row(f"one command per object ({report['script_commands']} ip/nft runs)", "per_object",
            f"{script / cold:.1f}x cold apply's time (CPU {cpu['per_object'] / cpu['cold']:.1f}x; target >= "
            f"{TARGET_SCRIPT_VS_COLD:g}x): {verdict(script >= TARGET_SCRIPT_VS_COLD * cold)}"),
        row("floor (ip -4 -batch, ip -6 -batch, nft -f)", "floor", "the reference"),
        row("no-op apply without a Deriver (one-shot CLI path)", "noop_oneshot",
            f"{max(report['noop_oneshot_writes'])} writes; everything derived afresh"),
        row("no-op apply, nft table listed again", "noop_relist",
            f"{max(report['noop_relist_writes'])} writes; the first pass after any nftables transaction"),
        row("no-op, derivation skipped (observe+actual+diff)", "noop_reused",
            "the part of a no-op that is not derivation"),
        ("drift repair (a rule added to the table by hand)", fmt_s(report["drift_s"]), "", "1 run",
         f"{report['drift_writes']} write; seen by the very next pass of the same process"),
        ("drift repair (a pick chain flushed by hand)", fmt_s(report["drift_pick_s"]), "", "1 run",
         f"{report['drift_pick_writes']} write; that chain refilled alone"),
        row("failover or failback (health verdict)", "failover", "pick chains refilled"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    head = (f"markrouted apply benchmark: {UPLINKS} uplinks, {POLICIES} policies -> "
            f"{o['rules']} ip rules, {o['routes']} routes, {o['nft_chains']} nft chains / {o['nft_rules']} nft rules")
    term = [head, "", f"  {'':<{widths[0]}}  {'wall':>{widths[1]}}  {'CPU':>{widths[2]}}"]
    for r in rows:
        term.append(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}")
    load = (f"load average {report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after")
    term.append(f"\n  {load}")

    v = report["versions"]
    md = [
        "# apply benchmark",
        "",
        f"Generated by `bench/apply.py` on {report['date']} "
        f"({v['cpus']} CPUs, Linux {v['kernel']}, Python {v['python']}, pyroute2 {v['pyroute2']}, "
        f"{v['nftables']}, {v['iproute2']}; {load}). How to run it and how to read it: `bench/README.md`.",
        "",
        f"Config: {UPLINKS} uplinks (veth pairs, IPv4 and IPv6, main-table default routes learnt by "
        f"`gateway = \"auto\"`), {POLICIES} policies (tcp/udp/icmp/any, ports and ranges, v4/v6 daddr, "
        "iif, uid, failover lists of 1-3 uplinks, every tenth a `balance`, some `fallback = \"drop\"`). "
        f"Derived state: {o['rules']} ip rules, {o['routes']} routes, {o['nft_chains']} nft chains "
        f"holding {o['nft_rules']} rules.",
        "",
        "| method | wall | CPU | runs | against the target |",
        "| --- | ---: | ---: | --- | --- |",
        *[f"| {' | '.join(r)} |" for r in rows],
        "",
        "Wall time is what the targets are about; CPU time (the process and its children) shows how "
        "much of it was the measured code's own when the machine is busy. Every run of the per-object "
        "script and of the floor is followed by a `compute` that must plan nothing: all of them install "
        "exactly the objects markrouted derives. Between runs the kernel is emptied with markrouted's "
        "flush (not timed).",
        "",
        f"First apply in a fresh process (imports, warm-up, sysctls of a new namespace; not in the "
        f"medians): {fmt_s(report['first_apply_s'])}, {report['first_writes']} writes. "
        f"Cold apply writes: {report['cold_writes'][0]} (each rule and route, one nft transaction).",
        "",
        "All runs, wall (s): "
        + "; ".join(f"{k} {', '.join(f'{x:.4f}' for x in report[k + '_s'])}"
                    for k in ("cold", "noop", "noop_oneshot", "noop_relist", "noop_reused", "per_object", "floor")),
        "",
        "## Where the time goes",
        "",
    ]
    for title, key in (("cold apply", "cold_breakdown"), ("no-op apply", "noop_breakdown"),
                       ("no-op apply without a Deriver", "noop_oneshot_breakdown"),
                       ("no-op apply, table listed again", "noop_relist_breakdown"),
                       ("floor", "floor_breakdown")):
        parts = report[key]
        md.append(f"- {title}: " + ", ".join(f"`{k}` {fmt_s(val)}"
                                               for k, val in sorted(parts.items(), key=lambda kv: -kv[1])))
    md.append("")
    for title, text in report["profiles"].items():
        md += [f"### cProfile: {title}", "", "```", text.strip(), "```", ""]
    return "\n".join(term), "\n".join(md)


def parent(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("bench/apply.py needs root (network namespaces)", file=sys.stderr)
        return 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="markrouted-bench-") as tmp:
        config = os.path.join(tmp, "markrouted.toml")
        with open(config, "w") as f:
            f.write(config_text())
        with Namespaces() as ns:
            cmd = ["nsenter", f"--net=/run/netns/{ns.host}", PYTHON, os.path.abspath(__file__), "--child",
                   "--config", config, "--runs", str(args.runs), "--script-runs", str(args.script_runs)]
            if args.profile:
                cmd.append("--profile")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                                  env={**os.environ, "PYTHONPATH": ROOT})
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            report = json.loads(proc.stdout)
    report["versions"] = versions()
    report["date"] = datetime.date.today().isoformat()
    term, md = render(report)
    print(term)
    with open(args.out, "w") as f:
        f.write(md)
    print(f"\nwritten {os.path.relpath(args.out)} in {time.monotonic() - started:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=7,
                    help="runs of cold apply and of the floor (median); no-ops run 3x as often")
    ap.add_argument("--script-runs", type=int, default=1, help="runs of the one-command-per-object script")
    ap.add_argument("--profile", action="store_true", help="add cProfile reports even when targets are met")
    ap.add_argument("--out", default=RESULTS, help="the markdown results file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
