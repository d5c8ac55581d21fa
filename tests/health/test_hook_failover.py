"""A hook that hangs, forks, floods its output and fails never holds up a failover.

The same cut of isp2's line is made twice in the lab, once with no hook and
once with such a hook installed: both times the daemon takes wan2 down,
clears its flows and new ssh connections reach the server through isp1 —
and the second time all of that is done while the hook (and the child it
forked) still runs, since its first event. What is compared is the path the
packets took and the order of things, never a duration.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from lab.topology import SERVER4, Lab, lab_config, policy, which_isp

from .conftest import Running

pytestmark = pytest.mark.e2e

HANG = """#!/bin/sh
echo $$ >> {pids}
sleep 1000 &
echo $! >> {pids}
head -c 100000000 /dev/zero
sleep 1000
exit 1
"""
SSH = policy("ssh", ["wan2", "wan1"], proto="tcp", dport=[22])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def until(what: str, cond: Callable[[], bool], deadline: float = 20.0,
          what_else: Callable[[], str] = str) -> None:
    end = time.monotonic() + deadline
    while not cond():
        assert time.monotonic() < end, f"not within {deadline}s: {what}\n{what_else()}"
        time.sleep(0.02)


def cut_and_restore(lab: Lab, d: Running, between: Callable[[], None]) -> list[str | None]:
    """Where ssh goes before the cut of isp2's line, after it, and after the line is back."""
    d.wait_state("wan2", "up")
    paths = [which_isp(lab.connect("host", SERVER4, 22))]
    lab.cut_line("isp2")
    d.wait_state("wan2", "down")
    paths.append(which_isp(lab.connect("host", SERVER4, 22)))
    between()
    lab.restore_line("isp2")
    d.wait_state("wan2", "up")
    paths.append(which_isp(lab.connect("host", SERVER4, 22)))
    return paths


@pytest.mark.parametrize("with_hook", [False, True], ids=["no-hook", "hanging-hook"])
def test_failover_is_the_same_with_a_hanging_hook(lab: Lab, daemon: Callable[[str], Running], tmp_path: Any,
                                                   with_hook: bool) -> None:
    settings = ""
    pids = tmp_path / "pids"
    if with_hook:
        hooks = tmp_path / "hooks.d"
        hooks.mkdir(mode=0o755)
        os.chmod(tmp_path, 0o755)
        hook = hooks / "hang"
        hook.write_text(HANG.format(pids=pids))
        hook.chmod(0o755)
        settings = f'hooks = "{hooks}"\nhook_timeout = "1h"\n'
    d = daemon(lab_config(SSH, settings=settings))

    def hook_hangs() -> None:
        if with_hook:  # the failover's hooks run (wan2 down, ssh moved), and hang with their children
            until("the hook to start and fork", lambda: pids.exists() and len(pids.read_text().split()) >= 2,
                  what_else=d.output)

    assert cut_and_restore(lab, d, hook_hangs) == ["isp2", "isp1", "isp2"]
    assert any("conntrack cleared" in line and "uplink=wan2" in line for line in d.lines), d.output()
    if with_hook:
        # the failback happened, and traffic went back, while wan2's first hook still hangs
        # (wan2's up event waits behind it, in order)
        started = [int(p) for p in pids.read_text().split()]
        assert all(alive(p) for p in started), "the hook was supposed to be still running"
        assert not any("hook done" in line or "hook failed" in line for line in d.lines)
