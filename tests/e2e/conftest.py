"""Fixtures of the traffic suite: apply a config to the lab's host.

The suite drives markrouted with ``markrouted apply`` after every change (a
cut line, a new config): each test is then about where packets go for a given
kernel state, independent of how fast a daemon notices the change. The
daemon's own reaction is the daemon tests' business and the demo's.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import missing, need_root  # the suite's root conftest

from lab.topology import PYTHON, ROOT, Lab, lab_config
from markrouted.kernel import CGROUP_ROOT, cgroup_layout


@pytest.fixture
def apply(lab: Lab, write_config: Callable[..., str]) -> Callable[..., str]:
    """Write a config for the lab's host and ``markrouted apply`` it; returns its path.

    Called again with the returned path alone, it re-applies that config
    (after a change of the network, as the daemon would on the event).
    """

    def go(*policies: str, path: str | None = None, **sections: str) -> str:
        if path is None:
            path = write_config(lab_config(*policies, **sections))
        lab.markrouted("apply", "-q", config=path)
        return path

    return go


def start_daemon(lab: Lab, path: str) -> Any:
    """``markrouted run`` on the config at ``path`` in the lab's host (stopped with the lab).

    For what only the daemon does: health verdicts, conntrack clearing.
    """
    from tests.health.conftest import Running

    proc = lab.popen("host", PYTHON, "-m", "markrouted", "-c", path, "run", "--log", "console",
                     env=lab.markrouted_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    running = Running(lab, proc, path)
    running.reader = threading.Thread(target=running._read, daemon=True)
    running.reader.start()
    running.wait("the first status document", lambda d: True)
    return running


@pytest.fixture
def lab3() -> Iterator[Lab]:
    """The lab with its third ISP (isp3 behind the host's eth2)."""
    need_root()
    with Lab(third=True) as the_lab:
        yield the_lab


@pytest.fixture
def apply3(lab3: Lab, write_config: Callable[..., str]) -> Callable[..., str]:
    """``apply`` for ``lab3``: the config has wan3 (eth2, isp3) too."""

    def go(*policies: str, path: str | None = None, **sections: str) -> str:
        if path is None:
            path = write_config(lab_config(*policies, wan3=sections.pop("wan3", ""), **sections))
        lab3.markrouted("apply", "-q", config=path)
        return path

    return go


@pytest.fixture
def cgroups() -> Iterator[tuple[str, str, str]]:
    """Two fresh cgroups v2 (relative paths for the config) and the v2 tree's directory."""
    layout = cgroup_layout()
    if layout is None:
        missing("needs a cgroup v2 hierarchy under /sys/fs/cgroup")
    base = os.path.join(CGROUP_ROOT, layout) if layout else CGROUP_ROOT
    tag = secrets.token_hex(3)
    names = (f"mrtest-{tag}-a.slice", f"mrtest-{tag}-b.slice")
    made = []
    try:
        for name in names:
            os.mkdir(os.path.join(base, name))
            made.append(os.path.join(base, name))
        yield names[0], names[1], base
    finally:
        for path in made:
            try:
                os.rmdir(path)
            except OSError:
                pass  # a process still in it; nothing of ours can be, the test waited for them
