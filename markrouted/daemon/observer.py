"""Hooks and metrics: what the daemon tells programs rather than people.

The reporter speaks to the journal, systemd and the status file; this
observer is told the same moments (a pass, a failed pass, a reload done or
refused, a probe round) and turns them into the Prometheus figures
(``markrouted.metrics``) and hook events (``markrouted.hooks``). Neither ever
delays routing: hooks are queued tasks, a scrape reads the kernel's counters
in a thread, and a metrics endpoint that cannot listen (or dies) is logged
while the daemon goes on routing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..config import Config, ConfigError
from ..hooks import Event, Hooks
from ..metrics import CounterCache, Metrics, MetricsServer, bind_error, kernel_reader, render, shown_address
from ..model import DesiredState
from ..monitor import Monitor
from .reporter import went_down


class Observer:
    def __init__(self, log: Any, config: Config) -> None:
        self.log, self.config = log, config
        self.metrics = Metrics()
        self.desired: DesiredState | None = None
        self.hooks: Hooks | None = None
        self.server = MetricsServer(self.scrape, log)
        self.counters = CounterCache(kernel_reader(self._marks))
        self._serving: asyncio.Task[None] | None = None

    def _marks(self) -> tuple[list[int], int]:
        uplinks = self.desired.uplinks if self.desired is not None else ()
        return sorted({u.mark for u in uplinks}), self.config.settings.mark_mask

    # ------------------------------------------------------------ configuration

    def configure(self, config: Config) -> None:
        """At start and after a reload: the hook directory and the endpoint's address."""
        self.config = config
        s = config.settings
        if s.hooks is None:
            self.hooks = None  # running hooks finish on their own
        elif self.hooks is None or (self.hooks.directory, self.hooks.timeout) != (s.hooks, s.hook_timeout):
            self.hooks = Hooks(s.hooks, s.hook_timeout, self.log)
        if s.metrics != self.server.address:
            previous = self._serving
            self._serving = asyncio.get_running_loop().create_task(self._listen(s.metrics, previous))

    async def _listen(self, address: tuple[str, int] | None, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        await self.server.close()
        if address is None:
            return
        shown = shown_address(address)
        try:
            await self.server.start(address)
        except OSError as exc:
            self.log.error("metrics endpoint not served, routing goes on", object=shown,
                           error=bind_error(address, exc))
            return
        self.log.info("metrics endpoint listening", object=shown)

    async def started(self) -> None:
        """Wait for the endpoint's (re)start to settle (tests)."""
        if self._serving is not None:
            await asyncio.gather(self._serving, return_exceptions=True)

    async def close(self) -> None:
        await self.started()
        await self.server.close()
        self.counters.close()
        if self.hooks is not None:
            await self.hooks.close()

    # ------------------------------------------------------------ what happened

    def _emit(self, event: Event) -> None:
        if self.hooks is not None:
            self.hooks.emit(event)

    def passed(self, previous: DesiredState | None, now: DesiredState, writes: int, seconds: float) -> None:
        m = self.metrics
        m.reconciled(seconds)
        m.in_sync = True
        self.desired = now
        if previous is None:
            return
        before = {u.name: u for u in previous.uplinks}
        for u in now.uplinks:
            old = before.get(u.name)
            if old is not None and old.state != u.state:
                m.transition(u.name, u.state)
                self._emit(Event("uplink-up" if u.state == "up" else "uplink-down", uplink=u.name,
                                 state=u.state, reason=u.reason))
        for u in went_down(previous, now):
            m.conntrack_cleared[u.name] = m.conntrack_cleared.get(u.name, 0) + 1
        moved: dict[tuple[str, str], list[str]] = {}
        pbefore = {p.name: p for p in previous.policies}
        for p in now.policies:
            old_p = pbefore.get(p.name)
            if old_p is not None and old_p.active != p.active:
                key = (",".join(old_p.active) or p.fallback, ",".join(p.active) or p.fallback)
                moved.setdefault(key, []).append(p.name)
        for (src, dst), names in moved.items():
            self._emit(Event("policy-moved", policy=",".join(names), from_=src, to=dst))
        if writes and (previous.rules, previous.routes, previous.nft) == (now.rules, now.routes, now.nft):
            m.drift_repairs += 1
            self._emit(Event("drift-repaired", reason=f"{writes} writes"))

    def failed(self) -> None:
        self.metrics.in_sync = False

    def reloaded(self, config: Config) -> None:
        self.metrics.reload_success = 1
        self.metrics.reload_time = time.time()
        self.configure(config)
        self._emit(Event("reload-done"))

    def refused(self, exc: ConfigError) -> None:
        self.metrics.reload_success = 0
        self._emit(Event("reload-refused", reason=exc.errors[0] if exc.errors else str(exc)))

    def probe_round(self, monitor: Monitor) -> None:
        for name, checked in monitor.checked.items():
            self.metrics.probe_round(name, checked.machine.last)

    # ------------------------------------------------------------ a scrape

    async def scrape(self) -> str:
        counts = flows = None
        if self.desired is not None and self.config.uplinks:
            try:
                counts, flows = await self.counters.get()
            except Exception as exc:  # a scrape without counters, never none at all
                self.metrics.counter_errors += 1
                self.log.warning("metrics: counters not read", error=str(exc))
        return render(self.metrics, self.config, self.desired, counts, flows)
