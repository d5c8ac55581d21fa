"""The demo, as the README runs it: it succeeds, and it leaves nothing behind.

``scripts/demo`` exits 0 only when every behaviour it promises was seen with
real traffic (see ``lab/demo.py``); these tests hold it to that, and to its
cleanup: after a normal run, after Ctrl-C or SIGTERM, and after ``--keep``
followed by ``--destroy``.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import tempfile
import time

import pytest
from conftest import need_root  # the suite's root conftest

from lab.topology import PYTHON, ROLES, ROOT

pytestmark = pytest.mark.e2e

DEMO = os.path.join(ROOT, "lab", "demo.py")


def prefix_of(first_line: str) -> str:
    match = re.search(r"namespaces (mr[0-9a-f]+)-\*", first_line)
    assert match, f"the demo did not say which namespaces it builds: {first_line!r}"
    return match.group(1)


def leftovers(prefix: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    spaces = [n for n in names if n.startswith(prefix + "-")]
    dirs = glob.glob(os.path.join(tempfile.gettempdir(), f"markrouted-{prefix}-*"))
    return spaces + dirs


def destroy(prefix: str) -> None:
    subprocess.run([PYTHON, DEMO, "--destroy", prefix], capture_output=True, timeout=60)


def test_the_readme_command_runs_the_demo_to_success_and_cleans_up() -> None:
    """``scripts/demo`` exits 0, reports every promise kept, and removes its lab."""
    need_root()
    started = time.monotonic()
    proc = subprocess.run([os.path.join(ROOT, "scripts", "demo")], capture_output=True, text=True, timeout=180)
    took = time.monotonic() - started
    prefix = prefix_of(proc.stdout.splitlines()[0] if proc.stdout else "")
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Every promised behaviour was seen." in proc.stdout
        for step in ("Step 1", "Step 2", "Step 3", "Step 4", "$ markrouted status", "$ markrouted explain"):
            assert step in proc.stdout
        assert "NOT AS PROMISED" not in proc.stdout
        assert took < 60, f"the demo took {took:.0f} s"
        assert leftovers(prefix) == []
    finally:
        destroy(prefix)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_demo_removes_everything(sig: signal.Signals) -> None:
    """Stopped in the middle of its steps, the demo exits 130 and leaves no namespace behind."""
    need_root()
    proc = subprocess.Popen([PYTHON, DEMO], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    prefix = prefix_of(proc.stdout.readline())
    try:
        for line in proc.stdout:
            if line.startswith("== Step 2"):
                break
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, rest
        assert "Interrupted" in rest
        assert leftovers(prefix) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        destroy(prefix)


def test_keep_leaves_the_lab_up_and_destroy_removes_it() -> None:
    """``--keep`` leaves every namespace (markrouted's table in the host) and says how to enter and remove them."""
    need_root()
    proc = subprocess.run([PYTHON, DEMO, "--keep"], capture_output=True, text=True, timeout=180)
    prefix = prefix_of(proc.stdout.splitlines()[0] if proc.stdout else "")
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert sorted(n for n in leftovers(prefix) if "/" not in n) == sorted(f"{prefix}-{r}" for r in ROLES)
        assert f"nsenter --net=/run/netns/{prefix}-host" in proc.stdout
        assert f"--destroy {prefix}" in proc.stdout
        table = subprocess.run(["nsenter", f"--net=/run/netns/{prefix}-host", "nft", "list", "table", "inet",
                                "markrouted"], capture_output=True, text=True)
        assert table.returncode == 0, "markrouted's table should still be installed in the kept lab"

        gone = subprocess.run([PYTHON, DEMO, "--destroy", prefix], capture_output=True, text=True, timeout=60)
        assert gone.returncode == 0, gone.stderr
        assert leftovers(prefix) == []
    finally:
        destroy(prefix)
