"""Shared fixtures: prerequisites, network namespaces, the lab.

Under CI=true a missing prerequisite (root, a tool, a kernel feature) fails the
test: CI must never go green by skipping what it was meant to prove. Outside
CI such tests skip with the reason, so the unit tier runs anywhere.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lab.topology import PYTHON, Lab, require_tools  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """A prerequisite is missing: fail under CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"prerequisite missing (CI must run this): {reason}")
    pytest.skip(reason)


def need_root() -> None:
    if os.geteuid() != 0:
        missing("needs root for network namespaces")
    absent = require_tools()
    if absent:
        missing(f"needs {', '.join(absent)}")
    try:
        import nftables  # noqa: F401
    except ImportError:
        missing("needs the nftables Python binding (python3-nftables)")


class NetNS:
    """One empty network namespace of a test's own (lo up)."""

    def __init__(self) -> None:
        self.name = "mrt" + secrets.token_hex(4)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.ip("link", "set", "lo", "up")

    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.name}"]

    def sh(self, *cmd: str, check: bool = True, input: str | None = None) -> str:
        proc = subprocess.run([*self.nsenter(), *cmd], capture_output=True, text=True, input=input)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def ip(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def markrouted(self, *args: str, config: str | None = None, env: dict[str, str] | None = None,
                   prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [*self.nsenter(), *(prefix or []), PYTHON, "-m", "markrouted"]
        if config:
            cmd += ["-c", config]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})

    def delete(self) -> None:
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def netns() -> Iterator[NetNS]:
    need_root()
    ns = NetNS()
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def lab() -> Iterator[Lab]:
    need_root()
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture
def write_config(tmp_path: Any) -> Any:
    def write(text: str, name: str = "markrouted.toml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def pytest_report_header(config: Any) -> str:
    return f"CI={IN_CI} python={sys.executable} root={os.geteuid() == 0} which-nft={shutil.which('nft')}"
