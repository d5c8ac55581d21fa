#!/usr/bin/python3
"""Start-up cost of the one-shot commands: each as a whole process, as a user runs it.

Run as root: ``/usr/bin/python3 bench/startup.py [--runs 20]``. It prints a table and
writes ``bench/results-startup.md``.

In a network namespace of its own (uplinks are veth pairs whose peers sit in a
second namespace, v4 and v6, with main-table default routes as DHCP installs
them) it applies a config once, then times ``markrouted plan`` (a no-op: exit 0),
``status`` (no daemon: computed), ``check``, ``check --kernel`` and ``explain``,
each ``--runs`` times as a fresh ``python3 -m markrouted`` process entered with
``nsenter``; ``python3 -c pass`` entered the same way is the floor. Two configs:
2 uplinks and 2 policies, and 16 uplinks and 1,000 policies (``bench/daemon.py``'s).

Bytecode is compiled once beforehand (into a temporary ``PYTHONPYCACHEPREFIX``),
as an installed package has it; without that every run would compile the
modules again. One more run of each command under ``python3 -X importtime``
tells which of the heavy libraries it loaded and how many modules in all.

For the 1,000-policy config, where a no-op ``plan``'s time goes: the same
steps as ``markrouted plan``, timed inside one fresh process each run (imports,
config load and validation, opening the kernel adapters, observe, derive, the
nft table read back, owned rules and routes, diff).

The target: a no-op ``plan`` in at most 150 ms. The namespaces are removed
whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import daemon as daemon_bench  # noqa: E402  (bench/daemon.py: its namespaces and its 1,000-policy config)

PY = "/usr/bin/python3"
RESULTS = os.path.join(ROOT, "bench", "results-startup.md")
TARGET_PLAN_S = 0.150
HEAVY = ("pyroute2", "nftables", "structlog", "systemd", "asyncio", "ssl")

SMALL = """\
[uplinks.wan1]
interface = "u0"
table = 101
mark = 1

[uplinks.wan2]
interface = "u1"
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

#: One no-op plan, step by step, in one process (what ``cli.cmd_plan`` and
#: ``reconcile.compute`` do); prints one JSON object of milliseconds per step.
PHASES = r"""
import json, sys, time
t = [time.perf_counter()]
from markrouted.config import load
from markrouted.derive import derive, needs
from markrouted.diff import diff
from markrouted.kernel import Kernel
t.append(time.perf_counter())
config = load(sys.argv[1]); t.append(time.perf_counter())
kernel = Kernel(need_nft=True); t.append(time.perf_counter())
observed = kernel.observe(needs(config)); t.append(time.perf_counter())
desired = derive(config, observed); t.append(time.perf_counter())
kernel.nft.read(); t.append(time.perf_counter())
actual = kernel.actual({config.settings.rule_priority}); t.append(time.perf_counter())  # the nft read is cached
plan = diff(desired, actual); t.append(time.perf_counter())
kernel.close()
assert plan.empty, plan.lines()[:5]
names = ["imports", "config load", "kernel adapters", "observe", "derive", "nft table read",
         "rules and routes read", "diff"]
print(json.dumps({n: (b - a) * 1000 for n, a, b in zip(names, t, t[1:])}))
"""

COMMANDS: list[tuple[str, list[str]]] = [
    ("plan (no-op)", ["plan"]),
    ("status (no daemon)", ["status"]),
    ("check", ["check"]),
    ("check --kernel", ["check", "--kernel"]),
    ("explain", ["explain", "--proto", "tcp", "--dport", "22", "--daddr", "203.0.113.5"]),
]


def timed(cmd: list[str], env: dict[str, str], runs: int, ok: tuple[int, ...] = (0,)) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        out.append(time.perf_counter() - t0)
        if proc.returncode not in ok:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return out


def loaded(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """How many modules the command imports, and which of HEAVY among them."""
    i = cmd.index(PY)
    proc = subprocess.run([*cmd[:i + 1], "-X", "importtime", *cmd[i + 1:]], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", proc.stderr, re.M)
    tops = {n.split(".")[0] for n in names}
    return len(names), [h for h in HEAVY if h in tops]


def row(what: str, values: list[float], heavy: list[str] | None = None, count: int | None = None) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    mods = "" if count is None else f"{count} ({', '.join(heavy or []) or 'none of them'})"
    return f"| {what} | {statistics.median(ms):.0f} ms | {p90:.0f} ms | {ms[0]:.0f} ms | {mods} |"


def phases(cmd: list[str], env: dict[str, str], runs: int) -> list[str]:
    """Table rows: the median of each step of a no-op plan over ``runs`` fresh processes."""
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        for name, ms in json.loads(proc.stdout).items():
            samples.setdefault(name, []).append(ms)
    rows = ["| step | median | min |", "| --- | --- | --- |"]
    for name, values in samples.items():
        rows.append(f"| {name} | {statistics.median(values):.1f} ms | {min(values):.1f} ms |")
    total = [sum(v[i] for v in samples.values()) for i in range(runs)]
    rows.append(f"| all steps (the interpreter's start and exit aside) | {statistics.median(total):.1f} ms "
                f"| {min(total):.1f} ms |")
    return rows


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="runs of each command (default 20)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/startup.py needs root (network namespaces)", file=sys.stderr)
        return 1
    tag = secrets.token_hex(3)
    ns, peer = f"mrsu{tag}", f"mrsp{tag}"
    tmp = tempfile.mkdtemp(prefix="mrstartup-")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=ROOT, PYTHONPYCACHEPREFIX=os.path.join(tmp, "pyc"),
               MARKROUTED_RUN_DIR=os.path.join(tmp, "run"))  # no daemon's status file
    enter = ["nsenter", f"--net=/run/netns/{ns}"]
    try:
        daemon_bench.build(ns, peer)
        subprocess.run([PY, "-m", "compileall", "-q", os.path.join(ROOT, "markrouted")], env=env, check=True)
        configs = {"2 uplinks, 2 policies": SMALL, "16 uplinks, 1,000 policies": daemon_bench.config_text()}
        floor = timed([*enter, PY, "-c", "pass"], env, args.runs)
        lines = [
            "# markrouted start-up benchmark",
            "",
            f"`{' '.join(['bench/startup.py', *sys.argv[1:]])}`; {args.runs} runs of each command as a whole "
            f"process (`nsenter` + `python3 -m markrouted`), bytecode compiled; kernel {os.uname().release}, "
            f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f} at the start.",
            "",
            "| command | median | p90 | min | modules imported (heavy ones among them) |",
            "| --- | --- | --- | --- | --- |",
        ]
        count, heavy = loaded([*enter, PY, "-c", "pass"], env)
        lines.append(row("floor: `python3 -c pass`", floor, heavy, count))
        plan_medians = []
        breakdown: list[str] = []
        for label, text in configs.items():
            cfg = os.path.join(tmp, "markrouted.toml")
            with open(cfg, "w") as f:
                f.write(text)
            mr = [*enter, PY, "-m", "markrouted", "-c", cfg]
            subprocess.run([*mr, "apply", "-q"], env=env, cwd=ROOT, check=True, capture_output=True)
            lines.append(f"| **{label}** | | | | |")
            for what, argv in COMMANDS:
                values = timed([*mr, *argv], env, args.runs)
                count, heavy = loaded([*mr, *argv], env)
                lines.append(row(what, values, heavy, count))
                if argv == ["plan"]:
                    plan_medians.append((label, statistics.median(values)))
            if label.startswith("16 uplinks"):
                breakdown = phases([*enter, PY, "-c", PHASES, cfg], env, args.runs)
            subprocess.run([*mr, "flush", "-q"], env=env, cwd=ROOT, capture_output=True)
        verdicts = [f"no-op plan, {label}: {m * 1000:.0f} ms ({'met' if m <= TARGET_PLAN_S else 'MISSED'})"
                    for label, m in plan_medians]
        lines += ["", f"Target: a no-op `plan` in at most {TARGET_PLAN_S * 1000:.0f} ms. " + "; ".join(verdicts) + "."]
        lines += ["", "Where a no-op `plan` with 16 uplinks and 1,000 policies spends its time, step by step "
                  f"in one process ({args.runs} processes):", "", *breakdown]
        print("\n".join(lines))
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        return 0 if all(m <= TARGET_PLAN_S for _, m in plan_medians[:1]) else 1
    finally:
        for n in (ns, peer):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
