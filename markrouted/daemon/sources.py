"""Everything that can wake the daemon, each turned into a request or a reload.

rtnetlink and nf_tables multicast sockets, inotify on the config file,
signals, the resync and watchdog timers, and the health monitor's callbacks.
None of them does work: they call the daemon's ``request`` (a pass is due, and
why), ``reload`` or ``stop`` (docs/design.md). Each is a ``Source`` the daemon
starts and closes, so the tests run the daemon with none of them and drive
those calls themselves.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from typing import Any, Protocol

from ..config import Config
from ..kernel import events
from ..model import Health, priority_range
from .clock import Clock, Timer
from .inotify import ConfigWatch

#: health figures in the status file (last round, RTT, loss) are at most this
#: old; verdict changes are published at once by the pass they trigger
STATUS_REFRESH = 1.0
#: editors write a file in several steps; reload once they are done
RELOAD_DEBOUNCE = 0.2
#: set files are mostly written by programs in one go: a short debounce keeps an edit's delay low
SET_DEBOUNCE = 0.02


class Sink(Protocol):
    """The daemon as its event sources see it."""

    config: Config
    log: Any

    def request(self, reason: str, full: bool = False) -> None: ...
    def reload(self, why: str) -> None: ...
    def stop(self) -> None: ...
    def watchdog(self, interval: float) -> None: ...
    async def kernel_thread(self) -> int: ...


class Source:
    """One kind of event; started once, told the config after every pass, closed at stop."""

    async def start(self, sink: Sink) -> None:
        pass

    def follow(self, config: Config) -> None:
        pass

    def close(self) -> None:
        pass


class Signals(Source):
    """SIGTERM and SIGINT stop; SIGHUP (``systemctl reload``) reloads."""

    async def start(self, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sink.stop)
        loop.add_signal_handler(signal.SIGHUP, sink.reload, "SIGHUP")


class Netlink(Source):
    """rtnetlink and nf_tables events, filtered early to what can matter to us.

    The nf_tables events of our own transactions are recognised by the thread
    that made them (the kernel worker) and dropped.
    """

    def __init__(self) -> None:
        self.interest = events.Interest()
        self.nft_watch = events.NftWatch()
        self.sockets: dict[str, socket.socket] = {}
        self.sink: Sink | None = None

    async def start(self, sink: Sink) -> None:
        self.sink = sink
        for name in ("rtnl", "nft"):
            self._open(name)
        self.nft_watch.also_own.add(await sink.kernel_thread())

    def _open(self, name: str) -> None:
        sock = events.open_rtnl() if name == "rtnl" else events.open_nft()
        self.sockets[name] = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, name)

    def _close(self, name: str) -> None:
        sock = self.sockets.pop(name)
        asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()

    def _readable(self, name: str) -> None:
        assert self.sink is not None
        try:
            for data in events.drain(self.sockets[name]):
                if name == "rtnl":
                    found = events.parse_rtnl(data, self.interest)
                else:
                    found = self.nft_watch.feed(data)
                for ev in found:
                    self.sink.request(ev.text, full=ev.kind == "nft")
        except events.Overflow:
            self.sink.log.warning("netlink overflow: events were lost, re-reading everything", socket=name)
            self._close(name)
            self._open(name)
            self.sink.request("netlink overflow", full=True)

    def follow(self, config: Config) -> None:
        s = config.settings
        self.interest.tables = frozenset(u.table for u in config.uplinks)
        self.interest.prio_lo, self.interest.prio_hi = priority_range(s.rule_priority)

    def close(self) -> None:
        for name in list(self.sockets):
            self._close(name)


class ConfigFile(Source):
    """inotify on the config file: a saved change reloads, once the writing is done."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.watch: ConfigWatch | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.sink: Sink | None = None

    async def start(self, sink: Sink) -> None:
        self.sink = sink
        try:
            self.watch = ConfigWatch(self.path)
        except OSError as exc:
            sink.log.warning("config file not watched; reload with SIGHUP", error=str(exc))
            return
        asyncio.get_running_loop().add_reader(self.watch.fd, self._readable)

    def _readable(self) -> None:
        assert self.watch is not None and self.sink is not None
        if not self.watch.changed():
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(RELOAD_DEBOUNCE, self.sink.reload, "config file changed")

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watch is not None:
            asyncio.get_running_loop().remove_reader(self.watch.fd)
            self.watch.close()
            self.watch = None


class SetFiles(Source):
    """inotify on the set files of ``[sets.NAME]``: a saved change reloads the config.

    A reload whose only change is a set's addresses writes only that set's
    elements (the "set elements" update). The debounce is shorter than the
    config file's: a set file is usually written by a program, in one go.
    A file that became unreadable or malformed makes the reload refused, so
    the running config, and with it the set's last good elements, is kept.
    """

    def __init__(self) -> None:
        self.watches: dict[str, ConfigWatch] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.sink: Sink | None = None
        self.pending: set[str] = set()

    async def start(self, sink: Sink) -> None:
        self.sink = sink

    def follow(self, config: Config) -> None:
        wanted = {path for item in config.sets for path in item.files}
        for path in set(self.watches) - wanted:
            self._unwatch(path)
        for path in wanted - set(self.watches):
            try:
                watch = ConfigWatch(path)
            except OSError as exc:
                if self.sink is not None:
                    self.sink.log.warning("set file not watched; reload with SIGHUP", file=path, error=str(exc))
                continue
            self.watches[path] = watch
            asyncio.get_running_loop().add_reader(watch.fd, self._readable, path)

    def _readable(self, path: str) -> None:
        assert self.sink is not None
        if not self.watches[path].changed():
            return
        self.pending.add(path)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(SET_DEBOUNCE, self._fire)

    def _fire(self) -> None:
        assert self.sink is not None
        self.timer = None
        names = ", ".join(sorted(self.pending))
        self.pending.clear()
        self.sink.reload(f"set file changed: {names}")

    def _unwatch(self, path: str) -> None:
        watch = self.watches.pop(path)
        asyncio.get_running_loop().remove_reader(watch.fd)
        watch.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for path in list(self.watches):
            self._unwatch(path)


class _Periodic(Source):
    """A task that calls ``tick`` every ``period()`` seconds until closed."""

    task: asyncio.Task[None] | None = None

    async def start(self, sink: Sink) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(sink))

    async def _run(self, sink: Sink) -> None:
        while True:
            await asyncio.sleep(self.period(sink))
            self.tick(sink)

    def period(self, sink: Sink) -> float:
        raise NotImplementedError

    def tick(self, sink: Sink) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None


class Resync(_Periodic):
    """A pass every ``resync`` seconds: repairs what no event reported."""

    def period(self, sink: Sink) -> float:
        return sink.config.settings.resync

    def tick(self, sink: Sink) -> None:
        sink.request("resync")


class Watchdog(_Periodic):
    """``WATCHDOG=1`` twice per ``WatchdogSec=``; the daemon withholds it while stuck."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def period(self, sink: Sink) -> float:
        return self.interval / 2

    def tick(self, sink: Sink) -> None:
        sink.watchdog(self.interval)


class HealthFeed:
    """The health monitor's callbacks.

    A verdict change is one more reason to reconcile; the end of a probe round
    only refreshes the published figures, at most once per STATUS_REFRESH.
    """

    def __init__(self, request: Callable[[str], None], publish: Callable[[], None], clock: Clock) -> None:
        self.request, self.publish, self.clock = request, publish, clock
        self.timer: Timer | None = None

    def changed(self, name: str, health: Health) -> None:
        self.request(f"health check: {name} {'up' if health.up else 'down'}")

    def round(self) -> None:
        if self.timer is None:
            self.timer = self.clock.call_later(STATUS_REFRESH, self._refresh)

    def _refresh(self) -> None:
        self.timer = None
        self.publish()

    def close(self) -> None:
        """Stop refreshing (or it would write the status file again after it is removed)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def default_sources(config_path: str, watchdog: float | None) -> list[Source]:
    """The sources of a real daemon, in the order they are started."""
    sources: list[Source] = [Signals(), Netlink(), ConfigFile(config_path), SetFiles(), Resync()]
    if watchdog:
        sources.append(Watchdog(watchdog))
    return sources
