"""Destination sets with real traffic: a set file's edit and dnsmasq's answers move connections.

A running daemon (``markrouted run`` in the lab's host) is given a policy
``daddr = ["@video"]`` via wan2 (isp2). The server's address is added to and
removed from the set's file, or put in the set by a real dnsmasq answering
``video.example``; which ISP the server saw names the path each connection
took. The daemon is never restarted: the same process serves every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import missing  # the suite's root conftest

from lab import dnsmasq
from lab.topology import PYTHON, ROOT, SERVER4, SERVER6, SERVERS, Lab, customer, lab_config, policy

pytestmark = pytest.mark.e2e

PORT = 8080
POLL = 0.05


class Daemon:
    """``markrouted run`` in the host, its output kept."""

    def __init__(self, lab: Lab, config: str) -> None:
        self.lab, self.config = lab, config
        self.lines: list[str] = []
        self.proc = lab.popen("host", PYTHON, "-m", "markrouted", "-c", config, "run", "--log", "console",
                              env=lab.markrouted_env(), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def ready(self, deadline: float = 10.0) -> None:
        """Poll until the daemon published its first document, in sync."""
        path = os.path.join(self.lab.run_dir, "status.json")
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            self.alive()
            try:
                with open(path) as f:
                    if json.load(f).get("in_sync"):
                        return
            except (OSError, ValueError):
                pass
            time.sleep(POLL)
        raise AssertionError("the daemon never got in sync:\n" + self.output())

    def alive(self) -> None:
        assert self.proc.poll() is None, "markrouted exited:\n" + self.output()

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def events(self, name: str) -> list[str]:
        return [line for line in self.lines if f" {name}  " in f" {line}"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.reader.join(timeout=5)
        return rc


@pytest.fixture
def daemon(lab: Lab) -> Iterator[Callable[[str], Daemon]]:
    started: list[Daemon] = []

    def start(config: str) -> Daemon:
        started.append(Daemon(lab, config))
        started[-1].ready()
        return started[-1]

    yield start
    for d in started:
        rc = d.stop()
        assert rc == 0, f"markrouted exited {rc} on SIGTERM:\n{d.output()}"


def write_set(path: str, lines: list[str]) -> None:
    """As a program would: a new file renamed over the old."""
    with open(path + ".tmp", "w") as f:
        f.write("# video prefixes\n" + "".join(f"{line}\n" for line in lines))
    os.replace(path + ".tmp", path)


def carried_by(lab: Lab, isp: str, daemon: Daemon, deadline: float = 10.0) -> None:
    """Poll until new connections to the server, v4 and v6, are carried by ``isp``."""
    want = [customer(isp, server) for server in SERVERS]
    end = time.monotonic() + deadline
    got: list[str | None] = []
    while time.monotonic() < end:
        daemon.alive()
        got = lab.connect_all([("host", server, PORT) for server in SERVERS])
        if got == want:
            return
        time.sleep(POLL)
    raise AssertionError(f"not carried by {isp} within {deadline}s: saw {got}\n{daemon.output()}")


def test_a_set_file_edit_moves_the_server_without_a_restart(
        lab: Lab, write_config: Callable[..., str], daemon: Callable[[str], Daemon], tmp_path: Any) -> None:
    set_file = str(tmp_path / "video.txt")
    write_set(set_file, ["192.0.2.128/25", "2001:db8:77::/48"])
    text = lab_config(policy("video", ["wan2"], daddr=["@video"]))
    config = write_config(text + f'[sets.video]\nfiles = ["{set_file}"]\n')
    d = daemon(config)
    carried_by(lab, "isp1", d)  # not listed: the main table's isp1

    write_set(set_file, ["192.0.2.128/25", f"{SERVER4}/32", "2001:db8:77::/48", f"{SERVER6}/128"])
    carried_by(lab, "isp2", d)

    write_set(set_file, ["192.0.2.128/25", "2001:db8:77::/48"])
    carried_by(lab, "isp1", d)

    # one process all along, and each edit was an element change, never a replace
    d.alive()
    assert len(d.events("nft table replaced")) == 1, d.output()
    changed = d.events("nft set elements changed")
    assert len(changed) >= 4 and all("object=video_v" in line for line in changed), d.output()

    # a malformed edit is refused: the daemon keeps the last good elements and says where
    write_set(set_file, ["192.0.2.128/25", f"{SERVER4}/32", "no-such-address"])
    end = time.monotonic() + 10
    while not any(f"{set_file}:4" in line for line in d.lines) and time.monotonic() < end:
        time.sleep(POLL)
    assert any(f'{set_file}:4: "no-such-address" is not an IP address or CIDR' in line for line in d.lines), \
        d.output()
    carried_by(lab, "isp1", d)


@pytest.fixture
def resolvers(lab: Lab) -> Iterator[Callable[[str], None]]:
    """An upstream dnsmasq on the server answering video.example; the host's own, started on demand."""
    why = dnsmasq.available()
    if why:
        missing(why)
    procs: list[subprocess.Popen[str]] = []
    upstream = dnsmasq.upstream_conf(SERVER4, {"video.example": [SERVER4, SERVER6]})
    procs.append(dnsmasq.start(lab, "server", upstream, "upstream"))

    def start_local(nftset_lines: str) -> None:
        procs.append(dnsmasq.start(lab, "host", dnsmasq.local_conf(SERVER4, nftset_lines), "local"))

    try:
        yield start_local
    finally:
        for proc in procs:
            dnsmasq.stop(proc)


def test_dnsmasq_fills_the_set_and_a_reload_keeps_it(
        lab: Lab, write_config: Callable[..., str], daemon: Callable[[str], Daemon],
        resolvers: Callable[[str], None]) -> None:
    sets = '[sets.video]\ndomains = ["video.example"]\n'
    config = write_config(lab_config(policy("video", ["wan2"], daddr=["@video"])) + sets)
    d = daemon(config)
    carried_by(lab, "isp1", d)  # nothing resolved yet: the main table's isp1

    lines = lab.markrouted("dnsmasq-config", config=config).stdout
    assert "nftset=/video.example/4#inet#markrouted#video_dns_v4,6#inet#markrouted#video_dns_v6" in lines
    resolvers(lines)
    assert dnsmasq.resolve(lab, "host", "127.0.0.1", "video.example", "A") == [SERVER4]
    assert dnsmasq.resolve(lab, "host", "127.0.0.1", "video.example", "AAAA") == [SERVER6]
    carried_by(lab, "isp2", d)

    status = lab.markrouted("status", "--json", config=config).stdout
    assert '"video_dns_v4": {\n      "dnsmasq": true,\n      "elements": 1' in status, status
    explained = lab.markrouted("explain", "--daddr", SERVER4, config=config).stdout
    assert f"daddr:   {SERVER4} is in set video (added by dnsmasq)" in explained, explained

    # a reload with a changed policy replaces the table: dnsmasq's elements are carried over
    replaced = len(d.events("nft table replaced"))
    with open(config, "a") as f:
        f.write('\n[[policy]]\nname = "other"\nproto = "tcp"\ndport = [2222]\nuplinks = ["wan1"]\n')
    end = time.monotonic() + 10
    while len(d.events("nft table replaced")) == replaced and time.monotonic() < end:
        d.alive()
        time.sleep(POLL)
    assert len(d.events("nft table replaced")) == replaced + 1, d.output()
    elements = lab.sh("host", "nft", "list", "set", "inet", "markrouted", "video_dns_v4")
    assert SERVER4 in elements, elements
    carried_by(lab, "isp2", d)
