"""Daemon benchmark: failover convergence, idle cost, and a flap storm.

Run as root: ``/usr/bin/python3 bench/daemon.py [--samples 40] [--idle 60]``.

In a namespace of its own it builds 16 uplinks (veth pairs whose peers live in
a second namespace, v4 and v6, main-table default routes) and runs
``markrouted run`` with 1,000 policies over them. Then:

* **carrier loss -> converged**: the peer side of one uplink is set down (the
  uplink loses carrier) and back up, ``--samples`` times each way. A watcher in
  the daemon's namespace timestamps the kernel's own RTM_NEWLINK event (carrier
  lost / back) and the end of markrouted's nf_tables transaction (NEWGEN from
  the daemon's pid) that moves the policies. The difference is markrouted's
  reaction; the kernel's linkwatch delay before its event is not counted.
* **idle**: nothing changes for ``--idle`` seconds (resync 30 s): CPU time of
  the daemon over that minute and its RSS.
* **flap storm**: 1,000 admin up/down flaps of an unrelated veth in 10 s: how
  many reconcile passes they caused, and that the state is in sync afterwards.
* **where the memory goes**: the daemon's RSS (anonymous and file-backed, from
  /proc/PID/status) next to reference processes in the same namespace: Python
  with every markrouted module, the nftables binding, structlog and systemd
  loaded; the same plus pyroute2 (what the daemon would cost if its writes
  still loaded it; only explain's route lookup does); the rest is the config,
  the derived state and the heap.
  ``--rss-only`` measures just this (about 10 s) and prints it.

Results go to stdout and bench/results-daemon.md. Nothing outside the two
namespaces is touched; they are removed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = "/usr/bin/python3"
UPLINKS = 16
POLICIES = 1000

WATCHER = r"""
import os, socket, struct, sys, time
def open_(proto, groups):
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
    s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
    s.bind((0, 0))
    for g in groups:
        s.setsockopt(270, 1, g)
    return s
import selectors
rt = open_(0, [1]); nf = open_(12, [7])
sel = selectors.DefaultSelector(); sel.register(rt, 1); sel.register(nf, 1)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        data = key.fileobj.recv(1 << 16)
        t = time.monotonic()
        off = 0
        while off + 16 <= len(data):
            length, mtype = struct.unpack_from("=IH", data, off)
            body = off + 16
            if key.fileobj is rt and mtype == 16:
                index, flags = struct.unpack_from("=iI", data, body + 4)
                a = body + 16
                name = ""
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", data, a)
                    if alen < 4: break
                    if atype == 3:
                        name = data[a + 4:a + alen].rstrip(b"\0").decode()
                    a += (alen + 3) & ~3
                print(f"link {name} {int(bool(flags & 0x10000))} {t:.6f}", flush=True)
            elif key.fileobj is nf and mtype == (10 << 8 | 15):
                a = body + 4
                pid = -1
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("=HH", data, a)
                    if alen < 4: break
                    if atype & 0x3fff == 2:
                        pid = struct.unpack(">I", data[a + 4:a + 8])[0]
                    a += (alen + 3) & ~3
                print(f"gen {pid} {t:.6f}", flush=True)
            off += (length + 3) & ~3
"""


def sh(*cmd: str, check: bool = True, input: str | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr}")
    return p.stdout


def tiered_target(j: int) -> str:
    """``--tiers``: every policy in failover tiers; one in twenty sticky by source, one in ten migrating."""
    a, b, c, d = (j % UPLINKS, (j + 5) % UPLINKS, (j + 9) % UPLINKS, (j + 13) % UPLINKS)
    target = f'uplinks = [{{ u{a} = 3, u{b} = 1 }}, "u{c}", "u{d}"]'
    if j % 20 == 0:
        target += '\nsticky = "source"'
    elif j % 10 == 1:
        target += '\nfailback = "migrate"'
    return target


def config_text(tiers: bool = False) -> str:
    out = ['[settings]\nresync = "30s"\n']
    for i in range(UPLINKS):
        out.append(f'[uplinks.u{i}]\ninterface = "u{i}"\ntable = {101 + i}\nmark = {i + 1}\n')
    for j in range(POLICIES):
        if tiers:
            target = tiered_target(j)
        elif j % 10 == 9:
            a, b = j % UPLINKS, (j + 5) % UPLINKS
            target = f"balance = {{ u{a} = 3, u{b} = 1 }}"
        else:
            target = "uplinks = [" + ", ".join(f'"u{(j + k) % UPLINKS}"' for k in range(3)) + "]"
        proto = ("tcp", "udp")[j % 2]
        out.append(f'[[policy]]\nname = "p{j}"\nproto = "{proto}"\ndport = [{1024 + j}, "{20000 + j}-{20010 + j}"]\n'
                   f'daddr = ["198.51.100.{j % 250}/32", "2001:db8:ffff::{j:x}/128"]\n{target}\n')
    return "\n".join(out)


def build(ns: str, peer: str) -> None:
    for n in (ns, peer):
        sh("ip", "netns", "add", n)
        sh("ip", "-n", n, "link", "set", "lo", "up")
    batch_ns, batch_peer = [], []
    for i in range(UPLINKS):
        sh("ip", "link", "add", f"u{i}", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", peer)
        batch_ns += [f"addr add 198.18.{i}.2/24 dev u{i}", f"addr add 2001:db8:{0x100 + i:x}::2/64 dev u{i} nodad",
                     f"link set u{i} up"]
        batch_peer += [f"addr add 198.18.{i}.1/24 dev p{i}", f"addr add 2001:db8:{0x100 + i:x}::1/64 dev p{i} nodad",
                       f"link set p{i} up"]
    sh("ip", "-n", ns, "-batch", "-", input="\n".join(batch_ns) + "\n")
    sh("ip", "-n", peer, "-batch", "-", input="\n".join(batch_peer) + "\n")
    routes = []
    for i in range(UPLINKS):
        routes.append(f"route add default via 198.18.{i}.1 dev u{i} metric {100 + i}")
        routes.append(f"route add default via 2001:db8:{0x100 + i:x}::1 dev u{i} metric {100 + i}")
    sh("ip", "-n", ns, "-batch", "-", input="\n".join(routes) + "\n")
    sh("ip", "link", "add", "x0", "netns", ns, "type", "veth", "peer", "name", "x1", "netns", ns)


def status(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "status.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def wait(pred, deadline: float, what: str):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise TimeoutError(what)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: A process loading what the daemon loads, pyroute2 aside (every markrouted module).
REFERENCE = r"""
import importlib, pkgutil, sys
import markrouted
for m in pkgutil.walk_packages(markrouted.__path__, "markrouted."):
    if m.name not in ("markrouted.__main__",):
        importlib.import_module(m.name)
import nftables, structlog
nftables.Nftables()
try:
    import systemd.daemon, systemd.journal
except ImportError:
    pass
if sys.argv[1] == "pyroute2":
    from pyroute2 import IPRoute
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket
    IPRoute().close()
with open("/proc/self/status") as f:
    print("".join(line for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile"))))
"""


def memory(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in
                (line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile")))}


def reference(enter: list[str], env: dict[str, str], what: str) -> dict[str, float]:
    out = sh(*enter, "env", *(f"{k}={v}" for k, v in env.items() if k == "PYTHONPATH"), PY, "-c", REFERENCE, what)
    return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def memory_rows(pid: int, enter: list[str], env: dict[str, str]) -> list[str]:
    mine = memory(pid)
    base = reference(enter, env, "base")
    pyr = reference(enter, env, "pyroute2")

    def cells(m: dict[str, float]) -> str:
        return f"{m['VmRSS']:.1f} MB (anon {m['RssAnon']:.1f}, file {m['RssFile']:.1f})"

    rest = mine["VmRSS"] - base["VmRSS"]  # the daemon does not load pyroute2
    return [
        f"| RSS: Python + every markrouted module + nftables, structlog, systemd | {cells(base)} | | |",
        f"| RSS: the same + pyroute2 (not loaded by the daemon) | {cells(pyr)} (pyroute2 +{pyr['VmRSS'] - base['VmRSS']:.1f})"
        " | | |",
        f"| RSS: the daemon, 1,000 policies | {cells(mine)}: config, derived state and heap +{rest:.1f} | <= 45 MB | |",
    ]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    # a timeout or Ctrl-C still removes the namespaces (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--rss-only", action="store_true", help="measure where the memory goes, nothing else")
    ap.add_argument("--tiers", action="store_true",
                    help="policies in failover tiers (some sticky by source, some migrating); "
                         "results to bench/results-daemon-tiers.md")
    args = ap.parse_args()
    tag = secrets.token_hex(3)
    ns, peer = f"mrbd{tag}", f"mrbp{tag}"
    tmp = tempfile.mkdtemp(prefix="mrbench-")
    cfg = os.path.join(tmp, "markrouted.toml")
    with open(cfg, "w") as f:
        f.write(config_text(args.tiers))
    run_dir = os.path.join(tmp, "run")
    env = {**os.environ, "PYTHONPATH": ROOT, "MARKROUTED_RUN_DIR": run_dir}
    enter = ["nsenter", f"--net=/run/netns/{ns}"]
    daemon = watcher = None
    lines: list[str] = []
    try:
        build(ns, peer)
        log = open(os.path.join(tmp, "daemon.log"), "w")
        t0 = time.monotonic()
        daemon = subprocess.Popen([*enter, PY, "-m", "markrouted", "-c", cfg, "run", "--log", "console"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait(lambda: status(run_dir).get("in_sync") and all(
            u["state"] == "up" for u in status(run_dir)["uplinks"].values()), 60, "daemon ready")
        start_s = time.monotonic() - t0
        pid = status(run_dir)["pid"]
        if args.rss_only:
            time.sleep(3)  # the first pass's transient buffers are returned to the system
            print("\n".join(["| measure | result | target | floor |", "| --- | --- | --- | --- |",
                             *memory_rows(pid, enter, env)]))
            return 0
        tids = {int(t) for t in os.listdir(f"/proc/{daemon.pid}/task")}  # nf_tables names the writing thread
        watcher = subprocess.Popen([*enter, PY, "-c", WATCHER], stdout=subprocess.PIPE, text=True)
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "ready"

        import selectors

        sel = selectors.DefaultSelector()
        sel.register(watcher.stdout, selectors.EVENT_READ)
        missed = 0

        def measure(up: bool) -> float | None:
            nonlocal missed
            sh("ip", "-n", peer, "link", "set", "p3", "up" if up else "down")
            t_link = t_gen = None
            end = time.monotonic() + 5
            while True:
                if not sel.select(timeout=max(0.0, end - time.monotonic())):
                    missed += 1  # no transaction followed: counted, not waited for forever
                    return None
                line = watcher.stdout.readline().split()
                if not line:
                    raise RuntimeError("watcher died")
                if line[0] == "link" and line[1] == "u3" and line[2] == ("1" if up else "0") and t_link is None:
                    t_link = float(line[3])
                    if t_gen is not None:
                        # the daemon's transaction was read first (two sockets, no common order)
                        return max(0.0, t_gen - t_link)
                elif line[0] == "gen" and (int(line[1]) == pid or int(line[1]) in tids):
                    if t_link is not None:
                        return float(line[2]) - t_link
                    t_gen = float(line[2])

        down, back = [], []
        for _ in range(args.samples):
            for up, into in ((False, down), (True, back)):
                value = measure(up)
                if value is not None:
                    into.append(value)
                time.sleep(0.3)
        both = down + back
        wait(lambda: status(run_dir).get("in_sync"), 10, "in sync after failovers")

        # idle
        time.sleep(2)
        c0, w0 = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(args.idle)
        idle_pct = (cpu_seconds(daemon.pid) - c0) / (time.monotonic() - w0) * 100
        rss_rows = memory_rows(pid, enter, env)

        # flap storm on an unrelated veth
        passes0 = status(run_dir).get("passes", 0)
        batch = "".join(f"link set x0 {'up' if i % 2 == 0 else 'down'}\n" for i in range(100))
        t_storm = time.monotonic()
        for chunk in range(10):  # 100 flaps per 1 s slot: 1,000 in ~10 s
            sh(*enter, "ip", "-batch", "-", input=batch)
            time.sleep(max(0.0, t_storm + chunk + 1 - time.monotonic()))
        time.sleep(1)
        passes = status(run_dir).get("passes", 0) - passes0
        plan = subprocess.run([*enter, PY, "-m", "markrouted", "-c", cfg, "plan"], cwd=ROOT, env=env,
                              capture_output=True, text=True)

        lines = [
            "# markrouted daemon benchmark",
            "",
            f"16 uplinks, {POLICIES} policies{' in tiers' if args.tiers else ''}; "
            f"{args.samples} carrier losses and {args.samples} returns "
            f"of one uplink; kernel {os.uname().release}; `{' '.join(sys.argv)}`",
            "",
            "| measure | result | target | floor |",
            "| --- | --- | --- | --- |",
            f"| carrier event -> converged, median | {statistics.median(both) * 1000:.1f} ms | <= 20 ms | "
            "kernel event ~2 ms |",
            f"| carrier event -> converged, p99 | {pct(both, 0.99) * 1000:.1f} ms | <= 100 ms | |",
            f"| loss only: median / p99 | {statistics.median(down) * 1000:.1f} / {pct(down, 0.99) * 1000:.1f} ms | | |",
            f"| return only: median / p99 | {statistics.median(back) * 1000:.1f} / {pct(back, 0.99) * 1000:.1f} ms"
            " | | |",
            f"| idle CPU over {args.idle:.0f} s (resync 30 s) | {idle_pct:.3f} % of a core | < 0.1 % | 0 |",
            *rss_rows,
            f"| start to first in-sync | {start_s:.2f} s | | |",
            f"| carrier changes with no transaction within 5 s | {missed} of {2 * args.samples} | 0 | |",
            f"| 1,000 flaps of an unrelated link in 10 s | {passes} reconcile passes; plan afterwards exit "
            f"{plan.returncode} ({'in sync' if plan.returncode == 0 else 'NOT in sync'}) | coalesced, in sync | |",
        ]
        print("\n".join(lines))
        name = "results-daemon-tiers.md" if args.tiers else "results-daemon.md"
        with open(os.path.join(ROOT, "bench", name), "w") as f:
            f.write("\n".join(lines) + "\n")
        return 0
    finally:
        for p in (watcher, daemon):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        for n in (ns, peer):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
