"""Fixtures of the daemon tests: the two-uplink network and daemons started in it.

The host namespace is the top-level ``netns`` fixture (which also enforces the
prerequisites: root and the tools, failing under CI); the peer namespace is a
second one of the same kind. Both are deleted whatever the outcome, and every
daemon a test started is killed first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from .daemon_harness import Daemon, TwoUplinks


def _network(netns: Any, uplinks: int) -> Iterator[TwoUplinks]:
    peer = type(netns)()
    try:
        net = TwoUplinks(netns, peer)
        for n in range(uplinks):
            net.add_uplink(n)
        yield net
    finally:
        peer.delete()


@pytest.fixture
def net(netns: Any) -> Iterator[TwoUplinks]:
    """Both uplinks present, up, with main-table default routes."""
    yield from _network(netns, 2)


@pytest.fixture
def net_wan1_only(netns: Any) -> Iterator[TwoUplinks]:
    """Only eth0 exists: eth1 is created by the test, later."""
    yield from _network(netns, 1)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``start(net, config_text)``: write the config, run a daemon on it, wait for READY=1."""
    daemons: list[Daemon] = []
    config = tmp_path / "markrouted.toml"

    def _start(net: TwoUplinks, text: str | None = None, *, watchdog_usec: int | None = None,
               ready: bool = True, run_dir: Path | None = None) -> Daemon:
        if text is not None:
            config.write_text(text)
        daemon = Daemon(net, config, tmp_path, watchdog_usec=watchdog_usec, name=f"daemon{len(daemons)}",
                        run_dir=run_dir)
        daemons.append(daemon)
        if ready:
            daemon.wait_ready()
        return daemon

    try:
        yield _start
    finally:
        for daemon in daemons:
            daemon.close()
