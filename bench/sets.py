#!/usr/bin/python3
"""Benchmark of destination sets: loading 100,000 prefixes, and how soon a set file's edit is in the kernel.

Run as root: ``/usr/bin/python3 bench/sets.py`` (``--help`` for the knobs). It prints a
results table and writes ``bench/results-sets.md``.

In a network namespace of its own (removed whatever happens):

1. ``nft -f`` of a hand-written table holding only the set (100,000 IPv6 /64s, none
   adjacent, ``flags interval; auto-merge``): the floor;
2. markrouted's cold apply of a config whose ``[sets.big]`` reads the same prefixes
   from a file: in-process (load the config and its set file, derive, diff, one
   replace transaction), as the daemon does on start, and ``markrouted apply`` as
   a command (a new process: imports, netlink dumps included);
3. the transaction alone: markrouted's replace script through libnftables;
4. a 10-line edit of the set file (5 prefixes removed, 5 added) while ``markrouted
   run`` serves the namespace: the time from the rename of the new file to the
   commit of the element transaction, seen as the nf_tables generation id moving
   (nothing else commits in the namespace). Both for the 100,000-line file and for
   a 100-line one, so the share of re-reading the file is visible.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONFIG = """\
[uplinks.isp1]
interface = "bench1"
table = 101
mark = 1

[sets.big]
files = ["{path}"]

[[policy]]
name = "big"
daddr = ["@big"]
uplinks = ["isp1"]
"""


def prefixes(count: int, salt: int = 0) -> list[str]:
    """``count`` /64s of 2001:db8::/32, every other one (none adjacent)."""
    out = []
    for i in range(count):
        n = 2 * i + salt
        out.append(f"2001:db8:{n >> 16:x}:{n & 0xFFFF:x}::/64")
    return out


def write_file(path: str, lines: list[str]) -> None:
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def sh(*cmd: str, input: str | None = None) -> None:
    subprocess.run(cmd, check=True, input=input, text=True, capture_output=True)


def timed(action: object, runs: int, before: object = None) -> list[float]:
    out = []
    for _ in range(runs):
        if callable(before):
            before()
        start = time.perf_counter()
        assert callable(action)
        action()
        out.append(time.perf_counter() - start)
    return out


def delete_table(name: str) -> None:
    subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)


def child(args: argparse.Namespace) -> dict[str, object]:
    from markrouted.config import load
    from markrouted.derive import Deriver
    from markrouted.kernel import Kernel
    from markrouted.kernel.nft import Nft, replace_script
    from markrouted.kernel.nftdump import NftDumper
    from markrouted.reconcile import reconcile

    work = tempfile.mkdtemp(prefix="mr-bench-sets-")
    results: dict[str, object] = {"count": args.count}
    try:
        lines = prefixes(args.count)
        path = os.path.join(work, "big.txt")
        write_file(path, lines)
        config_path = os.path.join(work, "markrouted.toml")
        with open(config_path, "w") as f:
            f.write(CONFIG.format(path=path))

        hand = ("table inet handmade {\n\tset big_v6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\tauto-merge\n"
                "\t\telements = { " + ", ".join(lines) + " }\n\t}\n}\n")
        hand_path = os.path.join(work, "hand.nft")
        with open(hand_path, "w") as f:
            f.write(hand)
        results["nft -f (hand-written set)"] = timed(lambda: sh("nft", "-f", hand_path), args.runs,
                                                     lambda: delete_table("handmade"))
        delete_table("handmade")

        def cold() -> None:
            kernel = Kernel()
            try:
                reconcile(load(config_path), kernel)
            finally:
                kernel.close()

        results["markrouted cold apply, in-process"] = timed(cold, args.runs, lambda: delete_table("markrouted"))
        env = {**os.environ, "PYTHONPATH": ROOT}
        results["markrouted apply (command)"] = timed(
            lambda: subprocess.run([sys.executable, "-m", "markrouted", "-c", config_path, "apply", "-q"],
                                   check=True, env=env, capture_output=True),
            args.runs, lambda: delete_table("markrouted"))
        config = load(config_path)
        desired = Deriver(config)
        from markrouted.derive import needs

        kernel = Kernel()
        table = desired(kernel.observe(needs(config))).nft
        kernel.close()
        assert table is not None
        nft = Nft()
        script = replace_script(table)
        results["the replace transaction alone (libnftables)"] = timed(
            lambda: nft._script(script, "bench"), args.runs, lambda: delete_table("markrouted"))
        nft.close()

        # the edit latency, with a daemon serving the namespace
        for size in (args.count, 100):
            delete_table("markrouted")
            base = prefixes(size)
            write_file(path, base)
            run_dir = os.path.join(work, f"run-{size}")
            os.mkdir(run_dir)
            proc = subprocess.Popen([sys.executable, "-m", "markrouted", "-c", config_path, "run", "--log", "console"],
                                    env={**env, "MARKROUTED_RUN_DIR": run_dir}, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                status = os.path.join(run_dir, "status.json")
                end = time.monotonic() + 120
                while time.monotonic() < end:
                    try:
                        with open(status) as f:
                            if json.load(f).get("in_sync"):
                                break
                    except (OSError, ValueError):
                        pass
                    time.sleep(0.05)
                else:
                    raise RuntimeError("the daemon never got in sync")
                dumper = NftDumper()
                latencies = []
                current = list(base)
                for trial in range(args.edits):
                    removed = set(current[10 * trial:10 * trial + 5])
                    added = [f"2001:db8:fff{trial % 10:x}:{2 * i + 1:x}::/64" for i in range(5)]
                    current = [p for p in current if p not in removed] + added
                    time.sleep(0.3)  # let the daemon settle (the previous pass's echoes)
                    gen = dumper.generation()
                    write_file(path, current)
                    start = time.perf_counter()
                    while dumper.generation() == gen:
                        if time.perf_counter() - start > 30:
                            raise RuntimeError("the edit never reached the kernel")
                        time.sleep(0.0005)
                    latencies.append(time.perf_counter() - start)
                dumper.close()
                results[f"10-line edit -> kernel, {size:,}-line file"] = latencies
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        delete_table("markrouted")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def report(results: dict[str, object]) -> str:
    lines = [f"# Destination sets ({datetime.date.today()}, {platform.node()}, "
             f"{os.cpu_count()} CPUs, kernel {platform.release()})", "",
             f"{results['count']:,} IPv6 prefixes; milliseconds (median, min, max).", "",
             "| measurement | median | min | max |", "| --- | ---: | ---: | ---: |"]
    floor = None
    for name, values in results.items():
        if not isinstance(values, list):
            continue
        ms = [v * 1000 for v in values]
        lines.append(f"| {name} | {statistics.median(ms):.1f} | {min(ms):.1f} | {max(ms):.1f} |")
        if name.startswith("nft -f"):
            floor = statistics.median(ms)
    if floor:
        for name in ("markrouted cold apply, in-process", "the replace transaction alone (libnftables)",
                     "markrouted apply (command)"):
            values = results.get(name)
            if isinstance(values, list):
                lines.append(f"\n{name}: {statistics.median(values) * 1000 / floor:.2f}x nft -f")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results-sets.md"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 1
    ns = f"mrbench-sets-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--child",
                               "--count", str(args.count), "--runs", str(args.runs), "--edits", str(args.edits)],
                              check=True, capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    text = report(results)
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
