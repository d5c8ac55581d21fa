"""1,000 link flaps in a few seconds: responsive, coalesced, and right at the end.

The flapped link is the uplink eth1 itself, administratively (no kernel
rate limiting, unlike carrier changes): every flap flushes table
102, so every reconcile that sees it up writes. The flaps come
in bursts of 20 every 0.1 s, as a misbehaving driver or a script in a loop
would produce them. A daemon that ran one pass per event would write
thousands of times; a coalescing one writes a few times per burst.

While the flaps go on, a SIGHUP reload must be answered and the published
``last_reconcile`` keep advancing; afterwards the kernel must be exactly what
``plan`` derives (exit 0).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable

from .daemon_harness import SSH_POLICY, WEB_POLICY, Daemon, TwoUplinks, config_text

Start = Callable[..., Daemon]

FLAPS = 1000
BURST = 20
INTERVAL = 0.1


def _flap(net: TwoUplinks, done: threading.Event) -> None:
    batch = subprocess.Popen([*net.host.nsenter(), "ip", "-batch", "-"], stdin=subprocess.PIPE, text=True)
    assert batch.stdin is not None
    try:
        start = time.monotonic()
        for i in range(FLAPS // BURST):
            batch.stdin.write("link set eth1 down\nlink set eth1 up\n" * BURST)
            batch.stdin.flush()
            delay = start + (i + 1) * INTERVAL - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    finally:
        batch.stdin.close()
        batch.wait(timeout=30)
        done.set()


def test_a_thousand_link_flaps(net: TwoUplinks, start: Start) -> None:
    # a fixed gateway and no IPv6 on the link: after the storm the uplink must
    # come back by itself (admin down drops DHCP routes and static v6 addresses)
    net.host.sh("sysctl", "-qw", "net.ipv6.conf.eth1.disable_ipv6=1")
    d = start(net, config_text(wan2_gateway="203.0.113.1", wan2_gateway6="none"))
    writes_before = d.writes()
    done = threading.Event()
    flapper = threading.Thread(target=_flap, args=(net, done), daemon=True)
    began = time.monotonic()
    flapper.start()

    seen: set[float] = set()

    def sampling(condition: Callable[[], bool]) -> Callable[[], bool]:
        """``condition``, recording the published last_reconcile at every poll."""
        def probe() -> bool:
            doc = d.status()
            if doc and doc.get("last_reconcile"):
                seen.add(doc["last_reconcile"])
            return condition()

        return probe

    d.wait(sampling(lambda: time.monotonic() - began > 1.0), "the storm to be under way")
    # a reload in the middle of the storm is answered promptly
    with open(d.config, "r+") as f:
        f.seek(0)
        f.write(config_text(wan2_gateway="203.0.113.1", wan2_gateway6="none", policies=(SSH_POLICY, WEB_POLICY)))
        f.truncate()
        f.flush()
        asked = time.monotonic()
        d.send(signal.SIGHUP)
        d.wait(sampling(lambda: "web" in (d.status() or {}).get("policies", {})),
               "the SIGHUP reload to be answered during the storm", 3.0)
        answered = time.monotonic() - asked
    assert not done.is_set(), "the storm ended before the reload could be tested"
    d.wait(sampling(done.is_set), "the storm to end", 30.0)
    storm = time.monotonic() - began
    flapper.join()

    assert len(seen) >= 3, f"last_reconcile advanced only {len(seen)} times during a {storm:.1f}s storm"
    # coalesced: no backlog of passes is left to work off once the storm is over
    ended = time.monotonic()
    last, changed = None, ended
    while time.monotonic() - changed < 0.5:
        now = (d.status() or {}).get("last_reconcile")
        if now != last:
            last, changed = now, time.monotonic()
        assert time.monotonic() - ended < 10, f"still reconciling {time.monotonic() - ended:.1f}s after the storm"
        time.sleep(0.02)
    settled = changed - ended
    assert settled < 1.5, f"passes went on for {settled:.1f}s after the storm: a backlog, not coalesced"
    d.wait_uplink("wan2", "up")
    d.wait(lambda: net.pick() == "set_wan2", "policy ssh back on wan2")
    route = net.default_via(102)
    assert route and route["gateway"] == "203.0.113.1" and route["dev"] == "eth1", net.routes(102)
    plan = net.host.markrouted("plan", config=str(d.config), env={"MARKROUTED_RUN_DIR": str(d.run_dir)})
    assert plan.returncode == 0, plan.stdout + plan.stderr
    writes = d.writes() - writes_before
    assert writes < FLAPS, f"{writes} kernel writes for {FLAPS} flaps: reconciles are not coalesced"
    assert d.proc.poll() is None
    print(f"{FLAPS} flaps in {storm:.1f}s: {writes} kernel writes, {len(seen)} status updates seen, "
          f"reload answered in {answered:.2f}s, quiet {settled:.2f}s after the storm")
