"""The daemon: one asyncio loop that keeps the routing true while the network changes.

Small parts with one job each, wired here (docs/design.md):

* ``sources``: netlink, nf_tables, inotify, signals, timers and the health
  monitor turn events into requests (or a reload, or a stop);
* ``requests``: one queue coalesces them; one pass at a time takes them all;
* ``worker``: runs the pass in the kernel thread and returns an outcome;
  failures are retried with capped backoff;
* ``reporter``: the status file, sd_notify, journal transitions and the
  conntrack clearing of uplinks that went down.

``Daemon`` is given a kernel factory, its sources, clock, notifier and status
directory, so its logic runs in-process against the fake kernel in the tests.

Errors: a failed kernel write is transient — retried with capped backoff, and
the periodic resync repairs whatever is left; an invalid new config is refused
and the running one kept; missing permission at start is fatal (exit 1).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..config import Config, ConfigError, load
from ..kernel import Kernel, KernelAPI
from ..kernel.errors import KernelError, PermissionDenied, Unsupported
from ..monitor import Monitor
from ..status import run_dir as default_run_dir
from ..text import path as shown_path
from .clock import Clock, Timer
from .observer import Observer
from .reporter import Reporter
from .requests import SETTLE, Batch, Requests
from .sources import HealthFeed, Source, default_sources
from .systemd import Notifier, Notify, watchdog_interval
from .worker import Backoff, Worker

__all__ = ["Daemon", "run"]


class Daemon:
    """Wires the parts; owns the running config and the priority ranges still to clear."""

    def __init__(self, config_path: str, config: Config, log: Any, notify: Notify | None = None, *,
                 kernel: Callable[[], KernelAPI] = Kernel, sources: Sequence[Source] | None = None,
                 clock: Clock | None = None, run_dir: str | None = None, backoff: Backoff | None = None,
                 settle: float = SETTLE) -> None:
        self.config_path, self.config, self.log = config_path, config, log
        self.notify: Notify = notify if notify is not None else Notifier()
        self.clock = clock or Clock()
        self.sources = list(sources) if sources is not None else default_sources(config_path, watchdog_interval())
        self.requests = Requests(settle)
        self.requests.request("start", full=True)
        self.worker = Worker(kernel)
        self.backoff = backoff or Backoff()
        #: rule_priority values of earlier configs, until a pass has cleared them
        self.old_ranges: set[int] = set()
        self.busy_since: float | None = None  # a pass runs since then (the watchdog's "stuck")
        self._retry: Timer | None = None
        self._stopping = asyncio.Event()
        self.feed = HealthFeed(self.request, lambda: self.reporter.publish(self.config), self.clock)
        # hooks and metrics: told the same moments as the reporter, never in the way
        self.observer = Observer(log, config)
        self.monitor = Monitor(log, self.feed.changed, self._probe_round)
        self.monitor.configure(config)
        self.reporter = Reporter(config_path, log, self.notify, run_dir or default_run_dir(), self.monitor,
                                 self.worker.clear_conntrack, self.clock)

    # ------------------------------------------------------------ what sources call

    def request(self, reason: str, full: bool = False) -> None:
        self.requests.request(reason, full)

    def stop(self) -> None:
        self._stopping.set()

    def _probe_round(self) -> None:
        self.feed.round()
        self.observer.probe_round(self.monitor)

    def watchdog(self, interval: float) -> None:
        stuck = self.busy_since is not None and self.clock.monotonic() - self.busy_since > interval
        if not stuck:
            self.notify(WATCHDOG="1")

    async def kernel_thread(self) -> int:
        return await self.worker.thread_id()

    def reload(self, why: str) -> None:
        self.reporter.reloading()
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            self.reporter.refused(self.config, exc, why)
            self.observer.refused(exc)
            return
        for line in new.warnings:
            self.log.warning("config warning", error=line)
        if new == self.config:
            self.reporter.unchanged(self.config, why)
            return
        if new.settings.rule_priority != self.config.settings.rule_priority:
            self.old_ranges.add(self.config.settings.rule_priority)
        self.config = new
        self.monitor.configure(new)
        self.reporter.reloaded(new, why)
        self.observer.reloaded(new)
        self.request("config reloaded", full=True)

    # ------------------------------------------------------------ one pass

    async def _pass(self, batch: Batch) -> None:
        config, trigger = self.config, batch.trigger
        cleared = set(self.old_ranges)
        self.busy_since = self.clock.monotonic()
        try:
            outcome = await self.worker.run_pass(config, self.monitor.verdicts(), cleared,
                                                 self.log.bind(trigger=trigger))
        finally:
            self.busy_since = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if outcome.error is not None:
            delay = self.backoff.failed()
            self.reporter.failed(self.config, outcome.error, delay, trigger)
            self.observer.failed()
            self._retry = self.clock.call_later(delay, self.request, "retry after error", True)
            return
        self.backoff.reset()
        # only the ranges this pass cleared: a reload during the pass may have added one
        self.old_ranges -= cleared
        previous = self.reporter.desired
        await self.reporter.passed(self.config, outcome, trigger)
        assert outcome.result is not None
        self.observer.passed(previous, outcome.result.desired, outcome.result.writes, outcome.seconds)
        self.monitor.update(outcome.result.desired, self.config)
        for source in self.sources:
            source.follow(self.config)
        self.reporter.announce(self.config, outcome)

    # ------------------------------------------------------------ life

    async def run(self) -> int:
        """Serve until stopped; 0 after a clean stop. Missing permission is raised."""
        serving: asyncio.Task[None] | None = None
        try:
            for source in self.sources:
                await source.start(self)
                source.follow(self.config)
            self.observer.configure(self.config)
            serving = asyncio.create_task(self.requests.serve(self._pass))
            stopping = asyncio.create_task(self._stopping.wait())
            await asyncio.wait([stopping, serving], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if serving.done():
                serving.result()  # the error that ended the loop (no permission, no support)
        except BaseException:
            await self._close(serving)
            raise
        await self._close(serving, stop=True)
        return 0

    async def _close(self, serving: asyncio.Task[None] | None, stop: bool = False) -> None:
        """Stop the loop, then (on a clean stop) flush or keep, then close everything."""
        if serving is not None:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        if self._retry is not None:
            self._retry.cancel()
        if stop:
            self.reporter.stopping()
        await self.monitor.close()
        self.feed.close()
        await self.observer.close()
        if stop:
            await flush_or_keep(self.worker, self.config, self.old_ranges, self.log)
            self.reporter.remove()
        # closed by the thread that used it, after its last pass
        await self.worker.close()
        for source in self.sources:
            source.close()


async def flush_or_keep(worker: Worker, config: Config, old_ranges: set[int], log: Any) -> None:
    """A clean stop applies ``on_stop``: remove everything owned (old priority ranges too), or leave it."""
    if config.settings.on_stop != "flush":
        log.info("stopped", on_stop="keep")
        return
    try:
        n = await worker.flush(config, old_ranges, log.bind(trigger="stop"))
        log.info("stopped", on_stop="flush", removed=n)
    except KernelError as exc:
        log.error("flush on stop failed", error=str(exc))


def run(config_path: str, log_mode: str = "auto") -> int:
    """``markrouted run``: load the config, start, serve until SIGTERM; the exit status."""
    from ..log import setup

    log = setup(log_mode)
    try:
        config = load(config_path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{shown_path(config_path)}: {line}", file=sys.stderr)
            if log_mode != "console":
                log.error("invalid config", error=line, object=config_path)
        return 1
    for line in config.warnings:
        log.warning("config warning", error=line)
    try:
        from ..monitor import preflight

        preflight(config)
        return asyncio.run(_main(config_path, config, log))
    except (PermissionDenied, Unsupported) as exc:
        print(f"markrouted: {exc}", file=sys.stderr)
        if log_mode != "console":  # on the console the line above is the message; once is enough
            log.error("cannot start", error=str(exc))
        return 1


async def _main(config_path: str, config: Config, log: Any) -> int:
    # the Daemon makes asyncio objects: it is built inside the running loop
    return await Daemon(config_path, config, log).run()
