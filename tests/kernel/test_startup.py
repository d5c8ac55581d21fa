"""What the one-shot commands load: read-only ones never import the write-side libraries.

pyroute2 (with asyncio and OpenSSL under it) is about 90 ms and 15 MB of a
command's start-up; markrouted reads and writes the kernel with its own
netlink messages and needs pyroute2 only for explain's route lookup.
structlog and systemd belong to the commands that log (apply, flush, run).
Each command runs as a whole process in the test's namespace, with Python's
own import log (PYTHONPROFILEIMPORTTIME) telling what it imported.
"""

from __future__ import annotations

import re

import pytest

from .kernelhost import Host

pytestmark = pytest.mark.kernel

WRITE_SIDE = ("pyroute2", "structlog", "systemd", "asyncio")


def imported(host: Host, *args: str) -> set[str]:
    proc = host.ns.markrouted(*args, config=host.config, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", proc.stderr, re.M)
    assert "markrouted.cli" in names, "the import log is missing"
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("args", [("plan",), ("status",), ("check", "--kernel")])
def test_read_only_commands_skip_the_write_side(host: Host, args: tuple[str, ...]) -> None:
    host.apply()
    tops = imported(host, *args)
    assert [lib for lib in WRITE_SIDE if lib in tops] == []


def test_writing_skips_pyroute2(host: Host) -> None:
    """apply writes every rule and route with markrouted's own netlink messages."""
    assert host.owned_rules(4) == [] and host.owned_routes(6) == []  # a fresh namespace: all to write
    tops = imported(host, "apply", "--quiet")
    assert "pyroute2" not in tops
    assert host.owned_rules(4) and host.owned_rules(6) and host.owned_routes(4) and host.owned_routes(6)


def test_explain_loads_pyroute2(host: Host) -> None:
    """The counter-check: the import log does see pyroute2 where it is used."""
    host.apply()
    assert "pyroute2" in imported(host, "explain", "--proto", "tcp", "--dport", "22", "--daddr", "192.0.2.77")
