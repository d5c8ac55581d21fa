"""Fixtures of the health-check suite: a running daemon in the lab's host, and upstream cuts.

The ISP outage these tests simulate is the one no netlink event reports: the
host's link to the ISP stays up with carrier, the ISP's routes stay in place,
but nothing gets through the ISP any more. It is made by a drop-everything
forward chain in the ISP's namespace (``cut``), removed again by ``restore``.
Setting interfaces down in the ISP would not do: admin-down flushes the ISP's
own routes, which a real outage does not.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from lab.topology import PYTHON, ROOT, Lab, toml_value

POLL = 0.01  # status file polling period: small against every bound asserted


def check(targets: list[str], method: str = "icmp", interval: str = "200ms", timeout: str = "200ms",
          down_after: int = 3, up_after: int = 3, success: str | None = None, uplink: str = "wan1",
          **more: object) -> str:
    """A ``[uplinks.NAME.check]`` table, to pass as ``wan1=``/``wan2=`` of ``lab_config``.

    ``more`` are further keys (``max_loss="20%"``, ``window=10``), written as TOML.
    """
    text = (f"[uplinks.{uplink}.check]\ntargets = {json.dumps(targets)}\nmethod = \"{method}\"\n"
            f"interval = \"{interval}\"\ntimeout = \"{timeout}\"\ndown_after = {down_after}\nup_after = {up_after}\n")
    if success:
        text += f'success = "{success}"\n'
    text += "".join(f"{key} = {toml_value(value)}\n" for key, value in more.items())
    return text


def cut(lab: Lab, isp: str, match: str = "") -> None:
    """The ISP stops forwarding (``match``: only what matches it), its link to the host untouched."""
    rule = f"{match} drop;" if match else ""
    policy = "accept" if match else "drop"
    lab.nft(isp, f"table inet cut {{ chain f {{ type filter hook forward priority -10; policy {policy}; {rule} }}; }}")


def restore(lab: Lab, isp: str) -> None:
    lab.sh(isp, "nft", "delete", "table", "inet", "cut")


def stamped(action: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock times just before and just after ``action`` (a cut, a restore): it took effect in between.

    Detection delays are measured from these to the verdict's own timestamp
    (the health document's ``since``, stamped by the daemon when it decided),
    so neither the test's command nor the reconcile pass, the status write
    or the test's polling, all of which slow down with the machine, count
    against a bound. The bound is checked from the end of the action (a
    slow command cannot make the product look late), a minimum from its
    start (a slow command cannot make it look early).
    """
    before = time.time()
    action()
    return before, time.time()


@dataclass
class Running:
    """``markrouted run`` in the lab's host, its output collected line by line as it comes."""

    lab: Lab
    proc: subprocess.Popen[str]
    config: str
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def status(self) -> dict[str, Any] | None:
        """The daemon's published document, or None before its first one."""
        try:
            with open(os.path.join(self.lab.run_dir, "status.json")) as f:
                doc: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            return None
        return doc

    def wait(self, what: str, predicate: Callable[[dict[str, Any]], bool], deadline: float = 10.0,
             ) -> tuple[dict[str, Any], float]:
        """Poll the status file until ``predicate`` holds; the document and the seconds it took."""
        start = time.monotonic()
        end = start + deadline
        doc = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"markrouted exited ({self.proc.returncode}) waiting for {what}:\n"
                                     + self.output())
            doc = self.status()
            if doc is not None and predicate(doc):
                return doc, time.monotonic() - start
            time.sleep(POLL)
        raise AssertionError(f"not within {deadline}s: {what}; last status: {json.dumps(doc, indent=1)}\n"
                             + self.output())

    def wait_state(self, uplink: str, state: str, deadline: float = 10.0) -> tuple[dict[str, Any], float]:
        return self.wait(f"{uplink} {state}", lambda d: d["uplinks"][uplink]["state"] == state, deadline)

    def wait_verdict(self, uplink: str, deadline: float = 10.0) -> dict[str, Any]:
        """The document once the uplink's first health verdict has been applied.

        The health figures are live while the uplink's state is the last
        reconcile's: a document may show the verdict a moment before the pass
        it triggered has applied it. Wait for both to agree.
        """
        def applied(d: dict[str, Any]) -> bool:
            health = d.get("health", {}).get(uplink)
            if health is None or health["pending"]:
                return False
            return (d["uplinks"][uplink]["state"] == "up") is bool(health["up"])

        doc, _ = self.wait(f"a health verdict on {uplink}", applied, deadline)
        return doc

    def hold_state(self, uplink: str, state: str, seconds: float) -> None:
        """Assert the uplink stays in ``state`` for ``seconds`` (polled, every document checked)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            doc = self.status()
            assert doc is not None
            assert doc["uplinks"][uplink]["state"] == state, (
                f"{uplink} left {state}: {json.dumps(doc['uplinks'][uplink])}\n" + self.output())
            time.sleep(POLL)

    def events(self, name: str, uplink: str | None = None) -> list[str]:
        """Output lines of one event (``health check down``), for one uplink if given."""
        pattern = re.compile(rf"^\S+ (?:\w+: )?{re.escape(name)}  ")
        return [line for line in self.lines
                if pattern.match(line) and (uplink is None or f" uplink={uplink} " in line + " ")]

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A markrouted command next to the daemon (same namespace, same run directory)."""
        return self.lab.markrouted(*args, config=self.config)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.reader is not None:
            self.reader.join(timeout=5)
        return rc


@pytest.fixture
def daemon(lab: Lab, write_config: Callable[..., str]) -> Iterator[Callable[[str], Running]]:
    """Start ``markrouted run`` on a config text in the lab's host; stopped (exit 0 checked) at the end."""
    started: list[Running] = []

    def start(text: str) -> Running:
        path = write_config(text)
        proc = lab.popen("host", PYTHON, "-m", "markrouted", "-c", path, "run", "--log", "console",
                         env=lab.markrouted_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        running = Running(lab, proc, path)
        running.reader = threading.Thread(target=running._read, daemon=True)
        running.reader.start()
        started.append(running)
        running.wait("the first status document", lambda d: True)
        return running

    yield start
    for running in started:
        rc = running.stop()
        assert rc == 0, f"markrouted exited {rc} on SIGTERM:\n{running.output()}"
