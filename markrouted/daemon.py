"""The daemon: one asyncio loop that keeps the routing true while the network changes.

Events (rtnetlink, nf_tables, the config file, signals, timers) only mark a
reconcile as due and say why; bursts collapse into one pass, at most one pass
runs at a time, and a pass re-reads the kernel and enforces the whole desired
state whatever woke it (level-triggered; docs/design.md). Kernel I/O runs in one
worker thread: pyroute2's synchronous API is the one shared by Debian 12's
0.7.2 and the 0.9 series, and 0.9's refuses to run inside an event loop.

Errors: a failed kernel write is transient — retried with capped backoff, and
the periodic resync repairs whatever is left; an invalid new config is refused
and the running one kept; missing permission at start is fatal (exit 1).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ctypes
import ctypes.util
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Config, ConfigError, load
from .derive import Deriver
from .kernel.errors import KernelError, PermissionDenied, Unsupported
from .model import DesiredState, Health
from .reconcile import Result, flush, reconcile
from .status import Publisher, run_dir
from .text import path as shown_path

BACKOFF_MIN, BACKOFF_MAX = 0.1, 30.0
SETTLE = 0.0005  # let the rest of a burst of events land before a pass starts
#: health figures in the status file (last round, RTT, loss) are at most this
#: old; verdict changes are published at once by the pass they trigger
STATUS_REFRESH = 1.0


# ------------------------------------------------------------------ systemd


class Notifier:
    """sd_notify through systemd-python; silent when not run by systemd."""

    def __init__(self) -> None:
        self.socket = os.environ.get("NOTIFY_SOCKET")
        self._notify: Callable[[str], Any] | None = None
        if not self.socket:
            return
        try:
            from systemd import daemon  # type: ignore[attr-defined]  # no type information

            self._notify = daemon.notify
        except ImportError:
            self._notify = self._stdlib

    def _stdlib(self, text: str) -> None:
        # the documented protocol, for hosts without systemd-python
        assert self.socket
        addr = "\0" + self.socket[1:] if self.socket.startswith("@") else self.socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(text.encode())

    def __call__(self, **fields: str) -> None:
        if self._notify is None:
            return
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            self._notify(text)
        except OSError:
            pass


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None


# ------------------------------------------------------------------ inotify


class ConfigWatch:
    """inotify on the config's directory: editors replace files by rename."""

    IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
    IN_MOVED_TO, IN_CREATE, IN_DELETE, IN_MOVED_FROM = 0x80, 0x100, 0x200, 0x40
    IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000

    def __init__(self, path: str) -> None:
        self.dir = os.path.dirname(os.path.abspath(path)) or "/"
        self.name = os.fsencode(os.path.basename(path))  # the bytes of the name, UTF-8 or not
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = self.IN_CLOSE_WRITE | self.IN_MOVED_TO | self.IN_CREATE | self.IN_DELETE | self.IN_MOVED_FROM
        if libc.inotify_add_watch(self.fd, os.fsencode(self.dir), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {self.dir}")

    def changed(self) -> bool:
        """Drain the queue; True if our file was among the names."""
        hit = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            offset = 0
            while offset + 16 <= len(data):
                _wd, _mask, _cookie, length = struct.unpack_from("=iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
                if name == self.name:
                    hit = True
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def release_memory() -> None:
    """Hand freed heap back to the system after a large nft transaction.

    Building and sending a table of thousands of rules allocates tens of MB
    that glibc keeps in its arenas once freed; a long-running daemon should
    not sit on them (measured: 107 MB -> 49 MB for 1,000 policies).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------ daemon


@dataclass
class PassOutcome:
    result: Result | None
    error: KernelError | None
    seconds: float


def status_line(desired: DesiredState | None, config: Config, in_sync: bool, error: str | None,
                config_error: str | None) -> str:
    if config_error:
        return f"config reload refused ({config_error.splitlines()[0]}); running the previous config"
    if not config.uplinks:
        return "no uplinks configured: nothing installed"
    if desired is None:
        return "starting"
    up = sum(1 for u in desired.uplinks if u.state == "up")
    text = f"{up}/{len(desired.uplinks)} uplinks up, {len(config.policies)} policies, "
    text += "in sync" if in_sync else "NOT in sync"
    if error:
        text += f"; last error: {error}"
    return text


class Daemon:
    def __init__(self, config_path: str, config: Config, log: Any, notify: Notifier) -> None:
        self.config_path = config_path
        self.config = config
        self.log = log
        self.notify = notify
        self.run_dir = run_dir()
        self._publisher: Publisher | None = None
        self.kernel: Any = None
        self.deriver: Deriver | None = None  # used by the worker thread only
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kernel")
        self.due = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.reasons: list[str] = []
        self.full = True
        self.resync_due = False
        self.old_ranges: set[int] = set()
        self.desired: DesiredState | None = None
        self.in_sync = False
        self.last_error: str | None = None
        self.config_error: str | None = None
        self.last_pass: float | None = None
        self.busy_since: float | None = None
        self.reload_pending = False
        self.ready = False
        self.health: dict[str, Health] = {}
        self.failures = 0
        self.passes = 0
        self.last_seconds = 0.0
        self._retry: asyncio.TimerHandle | None = None
        self._sockets: dict[str, socket.socket] = {}
        self._watch: ConfigWatch | None = None
        self._reload_timer: asyncio.TimerHandle | None = None
        self._refresh: asyncio.TimerHandle | None = None
        self.interest: Any = None
        from .monitor import Monitor

        self.monitor = Monitor(log, self._on_health, self._on_round)
        self.monitor.configure(config)

    # ------------------------------------------------------------ requests

    def request(self, reason: str, full: bool = False) -> None:
        """Mark a reconcile as due; never does any work itself."""
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.full = self.full or full
        self.due.set()

    def _on_health(self, name: str, health: Health) -> None:
        self.health[name] = health
        self.request(f"health check: {name} {'up' if health.up else 'down'}")

    def _on_round(self) -> None:
        """A probe round ended: refresh the published figures, at most once per STATUS_REFRESH."""
        if self._refresh is None:
            self._refresh = asyncio.get_running_loop().call_later(STATUS_REFRESH, self._refreshed)

    def _refreshed(self) -> None:
        self._refresh = None
        self._publish()

    # ------------------------------------------------------------ event sources

    def _open_sockets(self, loop: asyncio.AbstractEventLoop) -> None:
        from .kernel import events

        self.interest = events.Interest()
        self._nft_watch = events.NftWatch()
        for name, opener in (("rtnl", events.open_rtnl), ("nft", events.open_nft)):
            sock = opener()
            self._sockets[name] = sock
            loop.add_reader(sock.fileno(), self._on_socket, name)

    def _reopen(self, name: str) -> None:
        from .kernel import events

        loop = asyncio.get_running_loop()
        old = self._sockets.pop(name)
        loop.remove_reader(old.fileno())
        old.close()
        sock = events.open_rtnl() if name == "rtnl" else events.open_nft()
        self._sockets[name] = sock
        loop.add_reader(sock.fileno(), self._on_socket, name)

    def _on_socket(self, name: str) -> None:
        from .kernel import events

        sock = self._sockets[name]
        try:
            for data in events.drain(sock):
                if name == "rtnl":
                    found = events.parse_rtnl(data, self.interest)
                else:
                    found = self._nft_watch.feed(data)
                for ev in found:
                    self.request(ev.text, full=ev.kind == "nft")
        except events.Overflow:
            self.log.warning("netlink overflow: events were lost, re-reading everything", socket=name)
            self._reopen(name)
            self.request("netlink overflow", full=True)

    def _on_config_file(self) -> None:
        assert self._watch is not None
        if not self._watch.changed():
            return
        loop = asyncio.get_running_loop()
        if self._reload_timer is not None:
            self._reload_timer.cancel()
        # editors write in several steps; reload once they are done
        self._reload_timer = loop.call_later(0.2, self.reload, "config file changed")

    # ------------------------------------------------------------ reload

    def reload(self, why: str) -> None:
        self.notify(RELOADING="1", MONOTONIC_USEC=str(int(time.monotonic() * 1e6)))
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            self.config_error = str(exc)
            for line in exc.errors:
                self.log.error("config reload refused", error=line, trigger=why)
            self._publish()
            self.notify(READY="1", STATUS=self._status_line())
            return
        for line in new.warnings:
            self.log.warning("config warning", error=line)
        self.config_error = None
        if new == self.config:
            self.log.debug("config unchanged", trigger=why)
            self._publish()
            self.notify(READY="1", STATUS=self._status_line())
            return
        if new.settings.rule_priority != self.config.settings.rule_priority:
            self.old_ranges.add(self.config.settings.rule_priority)
        self.config = new
        self.monitor.configure(new)
        self.log.info("config reloaded", trigger=why, uplinks=len(new.uplinks), policies=len(new.policies))
        self.reload_pending = True
        self.request("config reloaded", full=True)

    # ------------------------------------------------------------ passes

    def _kernel_pass(self, config: Config, health: dict[str, Health], extra: set[int], full: bool,
                     log: Any, seen_gen: int | None = None) -> PassOutcome:
        """Runs in the worker thread: the only place the kernel is touched.

        ``seen_gen``: on a resync, the last nf_tables generation the event
        socket reported; the table is re-read if the kernel is past it.
        """
        start = time.perf_counter()
        try:
            if self.kernel is None:
                from .kernel import Kernel

                self.kernel = Kernel()
                self.kernel.cache_nft = True
            if full or (seen_gen is not None and self.kernel.nft_generation() != seen_gen):
                self.kernel.invalidate_nft()
            if self.deriver is None or self.deriver.config is not config:
                self.deriver = Deriver(config)
            result = reconcile(config, self.kernel, health, log=log, extra_ranges=extra, deriver=self.deriver)
            seconds = time.perf_counter() - start
            if result.writes and not result.plan.nft.empty:
                release_memory()
            return PassOutcome(result, None, seconds)
        except (PermissionDenied, Unsupported):
            raise
        except KernelError as exc:
            if self.kernel is not None:
                self.kernel.invalidate_nft()
            return PassOutcome(None, exc, time.perf_counter() - start)
        except OSError as exc:
            # a netlink socket in a bad state: start over with fresh ones
            if self.kernel is not None:
                try:
                    self.kernel.close()
                except Exception:  # closing a broken socket may fail in any way
                    pass
                self.kernel = None
            return PassOutcome(None, KernelError(f"netlink: {exc}"), time.perf_counter() - start)

    async def _run_pass(self) -> None:
        loop = asyncio.get_running_loop()
        reasons, self.reasons = self.reasons, []
        full, self.full = self.full, False
        resync, self.resync_due = self.resync_due, False
        seen_gen = None
        if resync and not full:
            seen_gen = self._nft_watch.last_gen if self._nft_watch.last_gen is not None else -1
        trigger = ", ".join(reasons) or "resync"
        log = self.log.bind(trigger=trigger)
        self.busy_since = time.monotonic()
        old_ranges = set(self.old_ranges)
        try:
            self.health = self.monitor.verdicts()
            outcome = await loop.run_in_executor(
                self.executor, self._kernel_pass, self.config, dict(self.health), old_ranges, full, log,
                seen_gen,
            )
        finally:
            self.busy_since = None
        if outcome.error is not None:
            self.failures += 1
            self.last_error = str(outcome.error)
            self.in_sync = False
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (self.failures - 1))
            self.log.error("reconcile failed, retrying", error=str(outcome.error), retry_in=f"{delay:.1f}s",
                           trigger=trigger)
            if self._retry is not None:
                self._retry.cancel()
            self._retry = loop.call_later(delay, self.request, "retry after error", True)
            self._publish()
            self.notify(STATUS=self._status_line())
            return
        assert outcome.result is not None
        result = outcome.result
        self.passes += 1
        self.last_seconds = outcome.seconds
        self.failures = 0
        self.last_error = None
        self.in_sync = True
        # only the ranges this pass cleared: a reload during the pass may have added one
        self.old_ranges -= old_ranges
        previous = self.desired
        self.desired = result.desired
        self.last_pass = time.time()
        self._log_transitions(previous, result, trigger)
        await self._clear_dead(previous, result.desired)
        self.monitor.update(result.desired, self.config)
        self._update_interest()
        if result.writes:
            self.log.debug("reconciled", writes=result.writes, seconds=f"{outcome.seconds:.4f}")
        self._publish()
        fields = {"STATUS": self._status_line()}
        if not self.ready:
            self.ready = True
            fields["READY"] = "1"
            self.log.info("started", status=fields["STATUS"])
        elif self.reload_pending:
            fields["READY"] = "1"
        self.reload_pending = False
        self.notify(**fields)

    def _log_transitions(self, previous: DesiredState | None, result: Result, trigger: str) -> None:
        now = result.desired
        before = {u.name: u for u in previous.uplinks} if previous else {}
        for u in now.uplinks:
            old = before.get(u.name)
            if old is None and previous is not None:
                continue
            if old is None or old.state != u.state:
                if previous is None and (u.state == "up" or self._pending(u.name)):
                    continue
                event = "uplink up" if u.state == "up" else "uplink down"
                logger = self.log.info if u.state == "up" else self.log.warning
                logger(event, uplink=u.name, interface=u.interface, reason=u.reason, trigger=trigger)
        pbefore = {p.name: p for p in previous.policies} if previous else {}
        for p in now.policies:
            old_p = pbefore.get(p.name)
            if old_p is not None and old_p.active != p.active:
                self.log.info("policy moved", policy=p.name, was=",".join(old_p.active) or p.fallback,
                              now=",".join(p.active) or p.fallback)
        if (previous is not None and result.writes
                and (previous.rules, previous.routes, previous.nft) == (now.rules, now.routes, now.nft)):
            self.log.warning("drift repaired", writes=result.writes, trigger=trigger)

    def _pending(self, name: str) -> bool:
        checked = self.monitor.checked.get(name)
        return checked is not None and checked.machine.pending

    async def _clear_dead(self, previous: DesiredState | None, now: DesiredState) -> None:
        """Flows pinned to an uplink that just became unusable must re-route."""
        from .kernel.conntrack import clear_mark

        if previous is None:
            return  # at start nothing was pinned by this process
        before = {u.name: u.state for u in previous.uplinks} if previous else {}
        mask = self.config.settings.mark_mask
        loop = asyncio.get_running_loop()
        for u in now.uplinks:
            if u.state == "down" and before.get(u.name, "up") == "up":
                try:
                    await loop.run_in_executor(self.executor, clear_mark, u.mark, mask)
                    self.log.info("conntrack cleared", uplink=u.name, object=f"ct mark {u.mark:#x}/{mask:#x}",
                                  reason="uplink down")
                except KernelError as exc:
                    self.log.warning("conntrack clear failed", uplink=u.name, error=str(exc))

    def _update_interest(self) -> None:
        if self.interest is None:
            return
        s = self.config.settings
        self.interest.tables = frozenset(u.table for u in self.config.uplinks)
        self.interest.prio_lo = s.rule_priority
        self.interest.prio_hi = s.rule_priority + 999

    def _status_line(self) -> str:
        return status_line(self.desired, self.config, self.in_sync, self.last_error, self.config_error)

    def _publish(self) -> None:
        if self.desired is None:
            return
        if self._publisher is None:
            self._publisher = Publisher(self.run_dir)
        fields = dict(
            pid=os.getpid(),
            config=self.config_path,
            last_reconcile=self.last_pass,
            last_error=self.last_error,
            config_error=self.config_error,
            status=self._status_line(),
            health=self.monitor.documents(),
            passes=self.passes,
            last_pass_seconds=round(self.last_seconds, 6),
        )
        try:
            self._publisher.write(self.desired, self.in_sync, **fields)
        except OSError as exc:
            self.log.warning("cannot write the status file", error=str(exc), object=self.run_dir)

    # ------------------------------------------------------------ loops

    async def _reconcile_loop(self) -> None:
        while not self.stop_event.is_set():
            await self.due.wait()
            if self.stop_event.is_set():
                return
            await asyncio.sleep(SETTLE)
            self.due.clear()
            await self._run_pass()

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.settings.resync)
            # rtnetlink state is re-read by every pass anyway; the nft table is
            # re-read only if a transaction happened that no event reported
            self.resync_due = True
            self.request("resync")

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval / 2)
            stuck = self.busy_since is not None and time.monotonic() - self.busy_since > interval
            if not stuck:
                self.notify(WATCHDOG="1")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
        self._open_sockets(loop)
        try:
            self._watch = ConfigWatch(self.config_path)
            loop.add_reader(self._watch.fd, self._on_config_file)
        except OSError as exc:
            self.log.warning("config file not watched; reload with SIGHUP", error=str(exc))
        # nf_tables names the thread that wrote; ours writes from the worker
        worker = await loop.run_in_executor(self.executor, threading.get_native_id)
        self._nft_watch.also_own.add(worker)
        self._update_interest()
        self.request("start", full=True)
        tasks = [asyncio.create_task(self._reconcile_loop()), asyncio.create_task(self._resync_loop())]
        wd = watchdog_interval()
        if wd:
            tasks.append(asyncio.create_task(self._watchdog_loop(wd)))
        stop = asyncio.create_task(self.stop_event.wait())
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return await self._stop()

    async def _stop(self) -> int:
        self.notify(STOPPING="1", STATUS="stopping")
        await self.monitor.close()
        if self._refresh is not None:  # or it would write the status file again after it is removed
            self._refresh.cancel()
            self._refresh = None
        loop = asyncio.get_running_loop()
        if self.config.settings.on_stop == "flush":
            try:
                n = await loop.run_in_executor(self.executor, self._flush)
                self.log.info("stopped", on_stop="flush", removed=n)
            except KernelError as exc:
                self.log.error("flush on stop failed", error=str(exc))
        else:
            self.log.info("stopped", on_stop="keep")
        try:
            os.unlink(os.path.join(self.run_dir, "status.json"))
        except OSError:
            pass
        # closed by the thread that opened them (pyroute2 0.9 keeps a loop per socket)
        await loop.run_in_executor(self.executor, self._close_kernel)
        self.executor.shutdown(wait=True)
        for sock in self._sockets.values():
            loop.remove_reader(sock.fileno())
            sock.close()
        if self._watch is not None:
            loop.remove_reader(self._watch.fd)
            self._watch.close()
        return 0

    def _close_kernel(self) -> None:
        if self.kernel is not None:
            try:
                self.kernel.close()
            except OSError:
                pass
            self.kernel = None

    def _flush(self) -> int:
        from .kernel import Kernel

        kernel = self.kernel = self.kernel or Kernel()
        kernel.invalidate_nft()
        n = flush(self.config, kernel, log=self.log.bind(trigger="stop"))
        for lo in self.old_ranges:
            old = dataclasses.replace(self.config, settings=dataclasses.replace(self.config.settings, rule_priority=lo))
            n += flush(old, kernel, log=self.log.bind(trigger="stop"))
        return n


async def _main(config_path: str, config: Config, log: Any) -> int:
    daemon = Daemon(config_path, config, log, Notifier())
    return await daemon.run()


def run(config_path: str, log_mode: str = "auto") -> int:
    from .log import setup

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
        from .monitor import preflight

        preflight(config)
        return asyncio.run(_main(config_path, config, log))
    except (PermissionDenied, Unsupported) as exc:
        print(f"markrouted: {exc}", file=sys.stderr)
        if log_mode != "console":  # on the console the line above is the message; once is enough
            log.error("cannot start", error=str(exc))
        return 1
