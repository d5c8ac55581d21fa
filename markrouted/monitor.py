"""Runs the health checks of the uplinks that have one, on the daemon's loop.

One task per checked uplink probes its targets every ``interval`` while the
uplink is usable at the link level, feeds the rounds to its state machine
(``health.UplinkHealth``) and reports each verdict change to the daemon, for
which a transition is one more reason to reconcile.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

from .config import Check, Config, Uplink
from .health import TargetResult, UplinkHealth
from .kernel.errors import PermissionDenied
from .kernel.probe import IcmpProber, tcp_probe
from .model import DesiredState, Health, UplinkStatus


def preflight(config: Config) -> None:
    """Fail at start, clearly, when ICMP checks cannot work (no CAP_NET_RAW)."""
    if not any(u.check and u.check.method == "icmp" for u in config.uplinks):
        return
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except PermissionError as exc:
        raise PermissionDenied("ICMP health checks need CAP_NET_RAW (raw sockets)") from exc


class _Checked:
    def __init__(self, uplink: Uplink, check: Check) -> None:
        self.uplink = uplink
        self.check = check
        self.machine = UplinkHealth(check, since=time.time())
        self.task: asyncio.Task[None] | None = None
        self.probers: dict[int, IcmpProber] = {}
        self.key: tuple[object, ...] = ()
        self.sources: dict[int, str] = {}

    def close_probers(self) -> None:
        for p in self.probers.values():
            p.close()
        self.probers.clear()


class Monitor:
    def __init__(self, log: Any, on_change: Callable[[str, Health], None],
                 on_round: Callable[[], None] | None = None) -> None:
        self.log = log
        self.on_change = on_change
        self.on_round = on_round  # after every round: the figures (RTT, loss) changed
        self.checked: dict[str, _Checked] = {}
        self.mask = 0

    # ------------------------------------------------------------ configuration

    def configure(self, config: Config) -> None:
        self.mask = config.settings.mark_mask
        wanted = {u.name: u for u in config.uplinks if u.check is not None}
        for name in list(self.checked):
            c = self.checked[name]
            u = wanted.get(name)
            if u is None or u.check != c.check or u.interface != c.uplink.interface or u.mark != c.uplink.mark:
                self._stop(c)
                del self.checked[name]
        for name, u in wanted.items():
            if name not in self.checked:
                assert u.check is not None
                self.checked[name] = _Checked(u, u.check)

    def verdicts(self) -> dict[str, Health]:
        return {n: Health(c.machine.up, c.machine.reason) for n, c in self.checked.items()}

    def documents(self) -> dict[str, dict[str, object]]:
        return {n: c.machine.document() for n, c in self.checked.items()}

    # ------------------------------------------------------------ link state

    def update(self, desired: DesiredState, config: Config) -> None:
        """After each reconcile: start, stop or re-aim probing per uplink."""
        for status in desired.uplinks:
            c = self.checked.get(status.name)
            if c is None:
                continue
            if not status.link_ok:
                if c.task is not None:
                    self._stop(c)
                if c.machine.link_ok or c.machine.up:
                    if c.machine.link_lost(time.time(), status.link_reason):
                        self._report(c)
                continue
            if not c.machine.link_ok:
                c.machine.link_back()
            key = (status.interface, status.mark, status.addresses)
            if c.task is None or key != c.key:
                self._stop(c)
                c.key = key
                c.sources = _sources(status)
                c.task = asyncio.get_running_loop().create_task(self._rounds(c, status))

    def _stop(self, c: _Checked) -> None:
        if c.task is not None:
            c.task.cancel()
            c.task = None
        c.close_probers()

    async def close(self) -> None:
        tasks = [c.task for c in self.checked.values() if c.task is not None]
        for c in self.checked.values():
            self._stop(c)
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------ probing

    def _report(self, c: _Checked) -> None:
        m = c.machine
        event = "health check up" if m.up else "health check down"
        (self.log.info if m.up else self.log.warning)(
            event, uplink=c.uplink.name, reason=m.reason, loss=f"{m.loss:.0%}")
        self.on_change(c.uplink.name, Health(m.up, m.reason))

    async def _probe(self, c: _Checked, status: UplinkStatus, target: str) -> TargetResult:
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        source = c.sources.get(family)
        if source is None:
            return TargetResult(target, False, error=f"no {'ipv6' if family == socket.AF_INET6 else 'ipv4'} address")
        if c.check.method == "tcp":
            assert c.check.port is not None
            return await tcp_probe(status.interface, status.mark, source, target, c.check.port, c.check.timeout)
        prober = c.probers.get(family)
        if prober is None:
            prober = c.probers[family] = IcmpProber(status.interface, status.mark, source, family)
        return await prober.probe(target, c.check.timeout)

    async def _rounds(self, c: _Checked, status: UplinkStatus) -> None:
        loop = asyncio.get_running_loop()
        targets = [str(t) for t in c.check.targets]
        next_at = loop.time()
        try:
            while True:
                results = await asyncio.gather(*(self._probe(c, status, t) for t in targets))
                if c.machine.round(tuple(results), time.time()):
                    self._report(c)
                elif self.on_round is not None:
                    self.on_round()
                next_at += c.check.interval
                now = loop.time()
                if next_at < now:  # fell behind (suspended?): do not burst to catch up
                    next_at = now
                await asyncio.sleep(next_at - now)
        except asyncio.CancelledError:
            raise
        except PermissionDenied as exc:
            self.log.error("health check cannot run", uplink=c.uplink.name, error=str(exc))
        except OSError as exc:
            self.log.error("health check failed", uplink=c.uplink.name, error=str(exc))
            c.close_probers()
            c.task = None


def _sources(status: UplinkStatus) -> dict[int, str]:
    out: dict[int, str] = {}
    for addr in status.addresses:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        out.setdefault(family, addr)
    return out
