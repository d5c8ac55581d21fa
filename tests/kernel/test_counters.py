"""Counters in the kernel: named nft counters per policy and uplink, conntrack flows per mark,
kept across a replace of the table; what ``status`` and ``check --kernel`` make of them.

Traffic: TCP connection attempts from the host to port 22 (the ssh policy,
carried by wan2), which leave towards the ISP namespace and are never
answered: each is one classified packet and one conntrack entry, whatever the
machine's speed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from .kernelhost import CONFIG, Host

pytestmark = pytest.mark.kernel

CONNECT = """\
import socket, sys
socks = []
for i in range(int(sys.argv[1])):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("192.0.2.80", 22))
    socks.append(s)
"""


def connect(host: Host, n: int) -> None:
    host.sh("python3", "-c", CONNECT, str(n))


def status(host: Host) -> dict[str, Any]:
    proc = host.mr("status", "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    assert "counters_error" not in doc, doc["counters_error"]
    return doc


def test_policy_and_uplink_counters_and_flows(host: Host) -> None:
    host.apply()
    connect(host, 3)
    doc = status(host)
    ssh, wan2 = doc["policies"]["ssh"], doc["uplinks"]["wan2"]
    assert ssh["packets"] == 3 and ssh["bytes"] >= 3 * 40
    assert ssh["flows"] == 3 and wan2["flows"] == 3 and doc["uplinks"]["wan1"]["flows"] == 0
    assert wan2["packets"] >= 3  # the first packets, and any retransmission restored from the ct mark
    assert doc["policies"]["web"]["packets"] == 0
    text = host.mr("status").stdout
    assert "FLOWS" in text and "PACKETS" in text


def test_a_replace_of_the_table_keeps_the_counts(host: Host) -> None:
    host.apply()
    connect(host, 2)
    assert status(host)["policies"]["ssh"]["packets"] == 2
    # a new policy changes the hook chains: the table is replaced in one transaction
    host.write(CONFIG + '\n[[policy]]\nname = "dns"\ndport = [53]\nuplinks = ["wan1"]\n')
    before = host.sh("nft", "-a", "list", "chain", "inet", "markrouted", "output")
    host.apply()
    after = host.sh("nft", "-a", "list", "chain", "inet", "markrouted", "output")
    assert before != after and "policy_dns" in after
    doc = status(host)
    assert doc["policies"]["ssh"]["packets"] == 2, "the replace zeroed the policy's counter"
    assert doc["policies"]["dns"]["packets"] == 0
    connect(host, 1)
    assert status(host)["policies"]["ssh"]["packets"] == 3


def test_check_kernel_says_when_the_metrics_address_cannot_be_used(host: Host) -> None:
    host.write(CONFIG.replace("rule_priority = 10000\n", 'rule_priority = 10000\nmetrics = "192.0.2.99:9826"\n'))
    proc = host.mr("check", "--kernel")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: metrics: cannot listen on 192.0.2.99:9826: no interface of this host has that address" in proc.stdout


def test_status_without_the_capability_says_why_it_has_no_counts(host: Host) -> None:
    """Next to a daemon (its document), as nobody: the document, and why there are no counts."""
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    host.apply()
    run_dir = Path(tempfile.mkdtemp(prefix="mrcounters-"))  # readable by nobody, unlike tmp_path
    os.chmod(run_dir, 0o755)
    sleeper = subprocess.Popen([*host.ns.nsenter(), "sleep", "60"])  # a live pid in the namespace
    try:
        doc = {"pid": sleeper.pid, "in_sync": True, "mark_mask": "0x00ff0000",
               "uplinks": {"wan2": {"state": "up", "interface": "wan2", "table": 102, "mark": "0x00020000"}},
               "policies": {"ssh": {"active": ["wan2"], "fallback": "main", "families": ["ipv4"]}}}
        (run_dir / "status.json").write_text(json.dumps(doc))
        os.chmod(run_dir / "status.json", 0o644)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
        proc = host.ns.markrouted("status", "--json", prefix=nobody, env={"MARKROUTED_RUN_DIR": str(run_dir)})
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        got = json.loads(proc.stdout)
        assert "CAP_NET_ADMIN" in got["counters_error"] or "permission" in got["counters_error"].lower()
        assert "packets" not in got["policies"]["ssh"]
        text = host.ns.markrouted("status", prefix=nobody, env={"MARKROUTED_RUN_DIR": str(run_dir)}).stdout
        assert "counters not read: " in text
    finally:
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


READ = """\
import json, sys
sys.path.insert(0, sys.argv[1])
from markrouted.kernel.counters import count_flows, read_counters
print(json.dumps({"counters": read_counters(), "flows": count_flows([0x10000, 0x20000], 0xff0000)}))
"""


def test_the_hand_written_dumps_read_what_nft_and_conntrack_show(host: Host) -> None:
    """kernel/counters.py decodes nfnetlink itself: it must agree with nft's and conntrack's own tools."""
    import shutil
    import sys

    from conftest import ROOT, missing

    if shutil.which("conntrack") is None:
        missing("needs conntrack (Debian package conntrack)")
    host.apply()
    connect(host, 4)
    ours = json.loads(host.sh(sys.executable, "-c", READ, ROOT))
    listed = json.loads(host.sh("nft", "-j", "list", "counters", "table", "inet", "markrouted"))
    theirs = {c["counter"]["name"]: [c["counter"]["packets"], c["counter"]["bytes"]]
              for c in listed["nftables"] if "counter" in c}
    assert ours["counters"] == theirs and theirs["policy_ssh"][0] == 4
    for mark, n in ((0x10000, 0), (0x20000, 4)):
        out = host.sh("conntrack", "-L", "--mark", f"{mark:#x}/0xff0000", check=False)
        assert ours["flows"][str(mark)] == n == len([line for line in out.splitlines() if line.strip()])
