"""A sick line, not a dead one: loss, latency, a failing web server, a silent resolver, a flapping line.

This kernel has no netem. Loss is an nft ``numgen`` rule in isp1 on the
probes' path; latency comes from ``lab/responder.py``, a userspace target in
isp1's namespace that answers ICMP echo, HTTP(S) and DNS after the delay its
control file says (isp1's own echo replies switched off by the
``icmp_echo_ignore_all`` sysctls of that namespace only). Every test checks
the verdict, the reason in numbers and, where it matters, where traffic goes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from lab.topology import PYTHON, ROOT, SERVER4, SERVER6, Lab, lab_config, policy, which_isp

from .conftest import Running, check, cut, restore

pytestmark = pytest.mark.e2e

#: how long a test waits for a state it expects: only reached when it fails
WAIT = 15
WEB = policy("web", ["wan1", "wan2"], proto="tcp", dport=[80])
#: the responder's addresses, on isp1's loopback: reached through wan1 only
TARGET4, TARGET6 = "198.18.11.1", "2001:db8:f11::1"
NAME = "probe.example"


@dataclass
class Responder:
    lab: Lab
    control: str
    ca: str  # the PEM of the CA that signed the responder's certificate (for NAME)

    def set(self, **values: Any) -> None:
        """Change the responder's behaviour (delay_ms, http_status, dns), atomically."""
        tmp = self.control + ".tmp"
        with open(tmp, "w") as f:
            json.dump(values, f)
        os.replace(tmp, self.control)


def _certificates(directory: str) -> tuple[str, str, str]:
    """A throw-away CA and a certificate for NAME signed by it: (ca.pem, cert.pem, key.pem)."""
    ca, ca_key = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    cert, key, csr = (os.path.join(directory, n) for n in ("cert.pem", "cert.key", "cert.csr"))
    ext = os.path.join(directory, "ext.cnf")
    with open(ext, "w") as f:
        f.write(f"subjectAltName=DNS:{NAME}\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=markrouted test CA"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={NAME}"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", ext],
    ):
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    return ca, cert, key


@pytest.fixture
def responder(lab: Lab, tmp_path: Any) -> Iterator[Responder]:
    lab.ip("isp1", "addr", "add", f"{TARGET4}/32", "dev", "lo")
    lab.ip("isp1", "addr", "add", f"{TARGET6}/128", "dev", "lo")
    # in isp1's namespace only: the responder answers echo requests, the kernel must not
    lab.sh("isp1", "sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1", "net.ipv6.icmp.echo_ignore_all=1")
    os.chmod(tmp_path, 0o755)
    ca, cert, key = _certificates(str(tmp_path))
    r = Responder(lab, str(tmp_path / "control.json"), ca)
    r.set(delay_ms=20, http_status=200, dns="answer")
    proc = lab.popen("isp1", PYTHON, os.path.join(ROOT, "lab", "responder.py"), r.control, TARGET4, TARGET6,
                     "--http", "80", "--https", "443", cert, key, "--dns", "53",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "ready", f"responder: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
    yield r


def _loss(lab: Lab, target: str, expr: str) -> None:
    """isp1 drops the echo requests to ``target`` that ``expr`` (a numgen match) selects."""
    l3 = "ip6 daddr" if ":" in target else "ip daddr"
    icmp = "icmpv6" if ":" in target else "icmp"
    lab.nft("isp1", "table inet loss { chain f { type filter hook forward priority -10; policy accept;\n"
                    f"  {l3} {target} {icmp} type echo-request {expr} drop\n}}\n}}\n")


def _transitions(d: Running) -> list[str]:
    return d.events("health check down", "wan1") + d.events("health check up", "wan1")


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_loss_above_max_takes_it_down_and_below_recovery_brings_it_back(
        lab: Lab, daemon: Callable[[str], Running], family: str) -> None:
    """40 % random loss with max_loss = 20 %: down within the window, traffic moves; loss gone: back.

    down_after is out of reach (20 failed rounds in a row), so only the loss
    figure can take the uplink down; the reason carries it.
    """
    target = SERVER4 if family == "ipv4" else SERVER6
    d = daemon(lab_config(WEB, wan1=check([target], interval="100ms", timeout="100ms", down_after=20,
                                          up_after=2, window=10, max_loss="20%")))
    assert d.wait_verdict("wan1")["uplinks"]["wan1"]["state"] == "up"
    _loss(lab, target, "numgen random mod 100 < 40")
    doc, _ = d.wait_state("wan1", "down", deadline=WAIT)
    # the status says why it is down now (the next rounds say why it is not back yet) ...
    assert re.search(rf"{target}: loss [0-9.]+ % > (20|10) %$", doc["uplinks"]["wan1"]["reason"]), doc
    assert doc["policies"]["web"]["active"] == ["wan2"]
    assert which_isp(lab.connect("host", target, 80)) == "isp2"
    # ... the journal line of the transition what took it down, with every target's figures
    down = d.events("health check down", "wan1")
    assert len(down) == 1, d.output()
    found = re.search(rf"reason=health check: {target}: loss ([0-9.]+) % > 20 % ", down[0])
    assert found and float(found[1]) > 20 and f"figures={target} loss " in down[0], down[0]

    lab.sh("isp1", "nft", "delete", "table", "inet", "loss")
    doc, _ = d.wait_state("wan1", "up", deadline=WAIT)
    assert doc["health"]["wan1"]["targets"][target]["loss"] <= 0.1  # recover_loss: half of max_loss
    assert doc["policies"]["web"]["active"] == ["wan1"]
    assert which_isp(lab.connect("host", target, 80)) == "isp1"


def test_loss_below_max_never_takes_it_down(lab: Lab, daemon: Callable[[str], Running]) -> None:
    """15 % loss with max_loss = 20 %: up all along, the figure shown.

    The drops are spread evenly (``numgen inc``: probes 0, 7 and 14 of every
    20), not random: random loss of 15 % exceeds 20 % in some window of 20
    now and then, which is the point of the threshold but not of this test.
    """
    d = daemon(lab_config(WEB, wan1=check([SERVER4], interval="100ms", timeout="100ms", window=20,
                                          max_loss="20%")))
    assert d.wait_verdict("wan1")["uplinks"]["wan1"]["state"] == "up"
    _loss(lab, SERVER4, "numgen inc mod 20 { 0, 7, 14 }")
    d.wait("a full window of lossy probes",
           lambda doc: doc["health"]["wan1"]["targets"][SERVER4]["probes"] == 20
           and doc["health"]["wan1"]["targets"][SERVER4]["loss"] >= 0.1, deadline=WAIT)
    d.hold_state("wan1", "up", 4.0)  # 40 rounds, two windows
    doc = d.status()
    assert doc is not None and doc["health"]["wan1"]["targets"][SERVER4]["loss"] == pytest.approx(0.15, abs=0.051)
    assert len(_transitions(d)) == 1, d.output()  # the first verdict only


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_rtt_above_max_takes_it_down_and_back(lab: Lab, daemon: Callable[[str], Running], responder: Responder,
                                              family: str) -> None:
    """RTT 20 ms -> 600 ms with max_rtt = 300 ms: down, the mean in the reason; back to 20 ms: up."""
    target = TARGET4 if family == "ipv4" else TARGET6
    d = daemon(lab_config(WEB, wan1=check([target], interval="700ms", timeout="700ms", window=6,
                                          max_rtt="300ms")))
    doc = d.wait_verdict("wan1")
    assert doc["uplinks"]["wan1"]["state"] == "up"
    d.wait("RTT figures", lambda doc: (doc["health"]["wan1"]["targets"][target]["probes"] or 0) >= 2)
    doc = d.status()
    assert doc is not None
    figures = doc["health"]["wan1"]["targets"][target]
    assert 15 <= figures["rtt_mean_ms"] < 300 and figures["rtt_min_ms"] <= figures["rtt_max_ms"], figures

    responder.set(delay_ms=600)
    doc, _ = d.wait_state("wan1", "down", deadline=WAIT)
    assert re.search(rf"{target}: rtt [0-9]+ ms > (300|150) ms$", doc["uplinks"]["wan1"]["reason"]), doc
    down = d.events("health check down", "wan1")
    found = re.search(rf"reason=health check: {target}: rtt ([0-9]+) ms > 300 ms ", down[0])
    assert len(down) == 1 and found and int(found[1]) > 300, d.output()
    assert doc["policies"]["web"]["active"] == ["wan2"]
    figures = doc["health"]["wan1"]["targets"][target]
    assert figures["rtt_max_ms"] >= 600 and figures["jitter_ms"] is not None, figures

    responder.set(delay_ms=20)
    doc, _ = d.wait_state("wan1", "up", deadline=WAIT)
    assert doc["health"]["wan1"]["targets"][target]["rtt_mean_ms"] <= 150  # recover_rtt: half of max_rtt
    assert doc["policies"]["web"]["active"] == ["wan1"]


def test_http_503_takes_it_down(lab: Lab, daemon: Callable[[str], Running], responder: Responder) -> None:
    d = daemon(lab_config(WEB, wan1=check([TARGET4], method=f"http://{NAME}/health")))
    assert d.wait_verdict("wan1")["uplinks"]["wan1"]["state"] == "up"
    responder.set(http_status=503)
    doc, _ = d.wait_state("wan1", "down", deadline=WAIT)
    assert doc["uplinks"]["wan1"]["reason"] == f"health check: 3 failed rounds ({TARGET4}: HTTP 503)"
    assert doc["policies"]["web"]["active"] == ["wan2"]
    responder.set(http_status=302)  # a redirect is an answer
    d.wait_state("wan1", "up", deadline=WAIT)


def test_https_verifies_the_certificate(lab: Lab, daemon: Callable[[str], Running], responder: Responder) -> None:
    """Against the test CA (tls_ca): up. Against the system store: down, the certificate problem named."""
    d = daemon(lab_config(WEB, wan1=check([TARGET4], method=f"https://{NAME}/", tls_ca=responder.ca)))
    assert d.wait_verdict("wan1")["uplinks"]["wan1"]["state"] == "up", d.output()
    assert d.stop() == 0

    d = daemon(lab_config(WEB, wan1=check([TARGET4], method=f"https://{NAME}/")))
    doc = d.wait_verdict("wan1")
    assert doc["uplinks"]["wan1"]["state"] == "down"
    error = doc["health"]["wan1"]["targets"][TARGET4]["error"]
    assert error.startswith("TLS certificate: ") and "issuer" in error, error
    assert d.stop() == 0

    d = daemon(lab_config(WEB, wan1=check([TARGET4], method="https://other.example/", tls_verify=False)))
    assert d.wait_verdict("wan1")["uplinks"]["wan1"]["state"] == "up", d.output()


def test_silent_resolver_takes_it_down_while_ping_answers(
        lab: Lab, daemon: Callable[[str], Running], responder: Responder) -> None:
    d = daemon(lab_config(WEB, wan1=check([TARGET4], method=f"dns:{NAME}")))
    assert d.wait_verdict("wan1")["uplinks"]["wan1"]["state"] == "up"
    responder.set(dns="silent")
    doc, _ = d.wait_state("wan1", "down", deadline=WAIT)
    assert doc["uplinks"]["wan1"]["reason"] == f"health check: 3 failed rounds ({TARGET4}: no answer in 0.2s)"
    assert doc["policies"]["web"]["active"] == ["wan2"]
    lab.sh("host", "ping", "-c", "1", "-W", "5", "-I", "eth0", TARGET4)  # ICMP still answers, by wan1
    responder.set(dns="servfail")
    d.wait("the resolver's own error", lambda doc: doc["health"]["wan1"]["targets"][TARGET4]["error"]
           == "DNS SERVFAIL", deadline=WAIT)
    responder.set(dns="answer")
    d.wait_state("wan1", "up", deadline=WAIT)


def test_four_flaps_hold_it_down_until_the_hold_ends(lab: Lab, daemon: Callable[[str], Running]) -> None:
    """damp_flaps = 4: the fourth forced down holds wan1 down for damp_hold, whatever the probes say."""
    d = daemon(lab_config(WEB, wan1=check([SERVER4], interval="100ms", timeout="100ms", down_after=1,
                                          up_after=1, damp_flaps=4, damp_within="1m", damp_hold="3s")))
    assert d.wait_verdict("wan1")["uplinks"]["wan1"]["state"] == "up"
    for flap in range(1, 5):
        cut(lab, "isp1")
        d.wait(f"down #{flap}", lambda doc: len(d.events("health check down", "wan1")) == flap, deadline=WAIT)
        restore(lab, "isp1")
        if flap < 4:  # counted by events: the published state may lag behind the verdict
            d.wait(f"up #{flap + 1}", lambda doc: len(d.events("health check up", "wan1")) == flap + 1,
                   deadline=WAIT)
    doc, _ = d.wait("the hold", lambda doc: doc["health"]["wan1"]["held_until"] is not None)
    health = doc["health"]["wan1"]
    assert health["reason"].startswith("health check: held down: 4 flaps in 1m, until "), health
    assert health["flaps"] == 4
    until = health["held_until"]
    assert until - health["since"] == pytest.approx(3.0, abs=0.01)
    held = d.events("uplink held down", "wan1")
    assert len(held) == 1 and " flaps=4 " in held[0] + " " and " within=1m " in held[0] + " ", d.output()
    # the probes answer again at once (up_after = 1), yet it stays down until the hold ends
    if time.time() < until - 0.5:
        d.hold_state("wan1", "down", until - 0.5 - time.time())
    doc, _ = d.wait_state("wan1", "up", deadline=WAIT)
    assert doc["health"]["wan1"]["since"] >= until
    assert doc["policies"]["web"]["active"] == ["wan1"]


def test_http_and_dns_probes_leave_by_their_uplink(lab: Lab, daemon: Callable[[str], Running],
                                                   responder: Responder) -> None:
    """The responder is reachable through isp1 only; the host's main table reaches it (via isp1).

    wan2's HTTP and DNS probes of it must fail (bound to eth1, from its
    address, with its mark), while wan1's succeed: a probe that followed the
    main table would make wan2 look healthy.
    """
    lab.sh("host", "ping", "-c", "1", "-W", "5", TARGET4)  # unbound, by the main table: answered
    d = daemon(lab_config(WEB, wan1=check([TARGET4], method=f"http://{NAME}/"),
                          wan2=check([TARGET4], method=f"dns:{NAME}", uplink="wan2")))
    doc = d.wait_verdict("wan1")
    doc = d.wait_verdict("wan2")
    assert doc["uplinks"]["wan1"]["state"] == "up"
    assert doc["uplinks"]["wan2"]["state"] == "down"
    assert doc["health"]["wan2"]["targets"][TARGET4]["ok"] is False
    assert doc["policies"]["web"]["active"] == ["wan1"]
    assert d.stop() == 0
    d = daemon(lab_config(WEB, wan2=check([TARGET4], method=f"http://{NAME}/", uplink="wan2")))
    doc = d.wait_verdict("wan2")
    assert doc["uplinks"]["wan2"]["state"] == "down" and not doc["health"]["wan2"]["targets"][TARGET4]["ok"]
