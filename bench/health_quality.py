#!/usr/bin/python3
"""Benchmark: does quality judging stay calm on a normal line, catch a brown-out in time, and cost little?

``/usr/bin/python3 bench/health_quality.py`` (``--write`` updates the Quality
section of ``bench/results-health.md``; ``--no-cpu`` skips the part that needs root).

1. Calm: simulated rounds (the real state machine, ``markrouted.health``, fed
   made-up probe results; no network) of a line with 5 % random loss and RTT
   30 ms ± 20 ms, for 10 minutes at interval 1s, over many seeds: how many
   transitions the defaults and the documented example thresholds cause.
2. Brown-out: the same line turning to 40 % loss; how many rounds until the
   uplink is down, against the bound ``window`` rounds + one (window ×
   interval + one interval). Random loss makes that a distribution; the
   evenly spread 40 % (2 of every 5 probes lost) is the deterministic case.
3. CPU: ``markrouted run`` with 64 uplinks × 2 HTTP targets at interval 1s, in
   the namespaces of ``bench/health_cpu.py``, an HTTP server (``lab/responder.py``)
   answering in the responder namespace. Target: under 5 % of one core.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.health_cpu import PYTHON, TARGET4, TARGET6, Bed, measure  # noqa: E402
from bench.health_results import replace_section  # noqa: E402
from markrouted.config import Check  # noqa: E402
from markrouted.health import TargetResult, UplinkHealth  # noqa: E402

TARGETS = ("192.0.2.1", "192.0.2.2")
ROUNDS = 600  # 10 minutes at 1s
SEEDS = 200
CPU_TARGET = 5.0


def configs() -> dict[str, Check]:
    base = Check(targets=tuple(ipaddress.ip_address(t) for t in TARGETS), interval=1.0, timeout=1.0)
    example = replace(base, max_loss=0.2, max_rtt=0.3)
    return {
        "defaults (2 targets; loss and RTT shown, not judged)": base,
        'max_loss "20%", max_rtt "300ms" (2 targets)': example,
        'max_loss "30%", max_rtt "300ms" (2 targets)': replace(example, max_loss=0.3),
        'max_loss "20%", max_rtt "300ms" (1 target)': replace(example, targets=example.targets[:1]),
        'max_loss "30%", max_rtt "300ms" (1 target)': replace(example, targets=example.targets[:1], max_loss=0.3),
    }


def line(rng: random.Random, loss: float, targets: tuple[str, ...]) -> tuple[TargetResult, ...]:
    return tuple(TargetResult(t, True, rtt=0.030 + rng.uniform(-0.020, 0.020)) if rng.random() >= loss
                 else TargetResult(t, False, error="no answer in 1s") for t in targets)


def calm(check: Check, seed: int) -> int:
    """Transitions after the first verdict in 10 minutes of a 5 % loss, ±20 ms line."""
    rng = random.Random(seed)
    m = UplinkHealth(check)
    targets = tuple(str(t) for t in check.targets)
    changes = sum(m.round(line(rng, 0.05, targets), float(i)) for i in range(ROUNDS))
    return changes - 1


def brownout(check: Check, seed: int | None) -> int:
    """Rounds from the start of 40 % loss to the down verdict (seed None: 2 of every 5 lost, evenly)."""
    rng = random.Random(seed)
    m = UplinkHealth(check)
    targets = tuple(str(t) for t in check.targets)
    i = 0
    while i < 120 or not m.up:  # a normal line (5 % loss) for 2 minutes first, and up
        m.round(line(rng, 0.05, targets), float(i))
        i += 1
    for n in range(1, 1000):
        if seed is None:
            lost = n % 5 in (1, 3)
            results = tuple(TargetResult(t, False, error="x") if lost else TargetResult(t, True, rtt=0.03)
                            for t in targets)
        else:
            results = line(rng, 0.4, targets)
        m.round(results, float(i + n))
        if not m.up:
            return n
    return 10**6


def simulate() -> tuple[list[str], bool]:
    out = [f"| config | transitions in 10 min, 5 % loss ±20 ms (over {SEEDS} seeds) | seeds with any |",
           "| --- | --- | --- |"]
    calm_ok = True
    for name, check in configs().items():
        counts = [calm(check, s) for s in range(SEEDS)]
        if name.startswith("defaults"):
            calm_ok &= max(counts) == 0
        out.append(f"| {name} | total {sum(counts)}, max {max(counts)} | {sum(1 for c in counts if c)} |")
    out += ["", "| config | brown-out (40 % loss) detected after, rounds: even 2-of-5 | random: median | p90 | "
            "max | within window + 1 |", "| --- | --- | --- | --- | --- | --- |"]
    brown_ok = True
    for name, check in configs().items():
        if check.max_loss is None:
            continue
        bound = check.window + 1
        even = brownout(check, None)
        rounds = sorted(brownout(check, s) for s in range(SEEDS))
        within = sum(1 for r in rounds if r <= bound) / len(rounds)
        brown_ok &= even <= bound
        out.append(f"| {name} | {even} | {statistics.median(rounds):g} | {rounds[int(0.9 * len(rounds))]} | "
                   f"{rounds[-1]} | even: {'yes' if even <= bound else 'NO'}; random: {within:.0%} of seeds |")
    return out, calm_ok and brown_ok


class HttpBed(Bed):
    """health_cpu's bed, every uplink probing both targets by HTTP."""

    def config(self, interval: str, checks: bool) -> str:
        text = super().config(interval, checks)
        return text.replace('\ndown_after = 3\n', '\nmethod = "http://probe.example/"\ndown_after = 3\n')


def cpu(seconds: float, tmp: str) -> dict[str, Any]:
    with HttpBed(64) as bed:
        control = os.path.join(tmp, "control.json")
        with open(control, "w") as f:
            f.write('{"delay_ms": 0}')
        server = subprocess.Popen([*bed.nsenter(bed.responder), PYTHON, os.path.join(ROOT, "lab", "responder.py"),
                                   control, TARGET4, TARGET6, "--http", "80"], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            return measure(bed, True, "1s", seconds, 4, tmp)
        finally:
            server.terminate()
            server.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True, help="the CPU part (root)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    lines, ok = simulate()
    print("\n".join(lines))
    cpu_lines: list[str] = []
    if args.cpu:
        if os.geteuid() != 0:
            print("the CPU part needs root (network namespaces); --no-cpu skips it", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="markrouted-bench-") as tmp:
            r = cpu(args.seconds, tmp)
        met = r["percent"] < CPU_TARGET
        ok &= met
        cpu_lines = [
            "", f"CPU, 64 uplinks x 2 HTTP targets (IPv4 and IPv6) at interval 1s (128 GETs/s): "
            f"**{r['percent']:.2f} %** of one core over {r['seconds']:.0f} s (windows "
            f"{min(r['windows']):.2f}–{max(r['windows']):.2f} %; user {r['user_s']:.2f} s, system "
            f"{r['system_s']:.2f} s est.), RSS {r['rss_mb']:.0f} MB, {r['up']}/64 up. "
            f"Target under {CPU_TARGET:.0f} %: **{'met' if met else 'MISSED'}**.",
        ]
        print(cpu_lines[-1])
    if args.write:
        replace_section("\n".join([
            "## Quality: calm on a normal line, quick on a brown-out",
            "",
            f"`/usr/bin/python3 bench/health_quality.py --write` — {datetime.date.today().isoformat()}, "
            f"Linux {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
            "",
            "Simulated rounds through the real state machine (window 10, down_after 3, up_after 3, "
            "recovery at half the maximum, interval 1s).",
            "",
            *lines,
            *cpu_lines,
            "",
        ]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
