"""Runs the health checks of the uplinks that have one, on the daemon's loop.

One task per checked uplink probes its targets every ``interval`` while the
uplink is usable at the link level, feeds the rounds to its state machine
(``health.UplinkHealth``) and reports each verdict change to the daemon, for
which a transition is one more reason to reconcile.

TCP, HTTP(S) and DNS rounds run as the uplink's task: every target probed at
once, each probe a coroutine with its own timeout. ICMP rounds run on loop
callbacks (:class:`_IcmpRounds`): a timer starts a round, the replies and one
timeout end it. That is the cheap path the many-uplink case needs; the task
only owns the rounds' life (cancel, errors).

A transition is logged with the numbers behind it (the reason, and every
target's loss, RTT and jitter over the window); a transition that starts a
flap-damping hold is followed by "uplink held down".
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from .config import Check, Config, Uplink
from .health import TargetResult, UplinkHealth, duration_text, percent_text
from .kernel.errors import PermissionDenied
from .kernel.probe import IcmpProber, tcp_probe
from .kernel.probe_dns import dns_probe
from .kernel.probe_http import http_probe, tls_context
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
        self.rounds: _IcmpRounds | None = None  # stopped with the task, at once (its callbacks are queued)
        self.probers: dict[int, IcmpProber] = {}
        self.key: tuple[object, ...] = ()
        self.sources: dict[int, str] = {}
        self.tls: ssl.SSLContext | None = None  # https: made once, loading a CA store is slow
        self.tls_error: str | None = None

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
        if c.rounds is not None:
            # now, not when the task handles its cancellation: a round already
            # due in this loop iteration would probe with the old probers
            c.rounds.cancel()
            c.rounds = None
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
            event, uplink=c.uplink.name, reason=m.reason, loss=f"{m.loss:.0%}", **_figures(m))
        if not m.up and m.hold_started:
            m.hold_started = False
            self.log.warning("uplink held down", uplink=c.uplink.name, flaps=len(m.downs),
                             within=duration_text(c.check.damp_within),
                             until=time.strftime("%H:%M:%S", time.localtime(m.held_until)))
        self.on_change(c.uplink.name, Health(m.up, m.reason))

    def _after_round(self, c: _Checked, results: tuple[TargetResult, ...]) -> None:
        if c.machine.round(results, time.time()):
            self._report(c)
        elif self.on_round is not None:
            self.on_round()

    async def _tcp_probe(self, c: _Checked, status: UplinkStatus, target: str) -> TargetResult:
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        source = c.sources.get(family)
        if source is None:
            return TargetResult(target, False, error=f"no {_family_name(family)} address")
        check = c.check
        assert check.port is not None
        if check.method == "tcp":
            return await tcp_probe(status.interface, status.mark, source, target, check.port, check.timeout)
        if check.method == "dns":
            assert check.url_host is not None
            return await dns_probe(status.interface, status.mark, source, target, check.url_host, check.timeout)
        assert check.url_host is not None
        tls = None
        if check.method == "https":
            if c.tls is None and c.tls_error is None:
                try:
                    c.tls = tls_context(check.tls_verify, check.tls_ca)
                except (OSError, ssl.SSLError) as exc:
                    c.tls_error = f"TLS CA file {check.tls_ca}: {getattr(exc, 'strerror', None) or exc}"
            if c.tls is None:
                return TargetResult(target, False, error=c.tls_error)
            tls = c.tls
        return await http_probe(status.interface, status.mark, source, target, check.port, check.url_host,
                                check.url_path, check.timeout, tls)

    async def _tcp_rounds(self, c: _Checked, status: UplinkStatus) -> None:
        loop = asyncio.get_running_loop()
        targets = [str(t) for t in c.check.targets]
        next_at = loop.time()
        while True:
            results = await asyncio.gather(*(self._tcp_probe(c, status, t) for t in targets))
            self._after_round(c, tuple(results))
            next_at += c.check.interval
            now = loop.time()
            if next_at < now:  # fell behind (suspended?): do not burst to catch up
                next_at = now
            await asyncio.sleep(next_at - now)

    async def _icmp_rounds(self, c: _Checked, status: UplinkStatus) -> None:
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        c.rounds = rounds = _IcmpRounds(self, c, status, failed)
        try:
            await failed  # runs until cancelled, or raises what stopped the rounds
        finally:
            rounds.cancel()
            if c.rounds is rounds:
                c.rounds = None

    async def _rounds(self, c: _Checked, status: UplinkStatus) -> None:
        try:
            if c.check.method == "icmp":
                await self._icmp_rounds(c, status)
            else:
                await self._tcp_rounds(c, status)
        except asyncio.CancelledError:
            raise
        except PermissionDenied as exc:
            self.log.error("health check cannot run", uplink=c.uplink.name, error=str(exc))
        except Exception as exc:  # a socket error, or a bug: said, not a silent "waiting" forever
            self.log.error("health check failed", uplink=c.uplink.name, error=str(exc) or repr(exc))
            c.close_probers()
            c.task = None


class _IcmpRounds:
    """One uplink's ICMP rounds, on loop callbacks.

    A round sends an echo request to every target at once and ends when every
    reply is in or ``timeout`` has passed, whichever comes first; the next
    round starts ``interval`` after this one started (later if it fell
    behind, never in a burst). Whatever stops the rounds (no permission, a
    socket error) is set on ``failed``, which the uplink's task awaits.
    """

    def __init__(self, monitor: Monitor, c: _Checked, status: UplinkStatus, failed: asyncio.Future[None]) -> None:
        self.monitor, self.c, self.status, self.failed = monitor, c, status, failed
        self.loop = asyncio.get_running_loop()
        self.targets = [str(t) for t in c.check.targets]
        self.families = [socket.AF_INET6 if ":" in t else socket.AF_INET for t in self.targets]
        self.results: list[TargetResult | None] = []
        self.seqs: list[int | None] = []
        self.pending = 0
        self.next_at = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.tick: asyncio.Handle | None = self.loop.call_soon(self._start)

    def cancel(self) -> None:
        for handle in (self.tick, self.timer):
            if handle is not None:
                handle.cancel()
        self.tick = self.timer = None
        self._forget()

    def _forget(self) -> None:
        for family, seq in zip(self.families, self.seqs):
            prober = self.c.probers.get(family)
            if seq is not None and prober is not None:
                prober.forget(seq)

    def _start(self) -> None:
        self.tick = None
        try:
            c, n = self.c, len(self.targets)
            self.results, self.seqs, self.pending = [None] * n, [None] * n, 0
            for i, (target, family) in enumerate(zip(self.targets, self.families)):
                source = c.sources.get(family)
                if source is None:
                    self.results[i] = TargetResult(target, False, error=f"no {_family_name(family)} address")
                    continue
                prober = c.probers.get(family)
                if prober is None:
                    prober = c.probers[family] = IcmpProber(self.status.interface, self.status.mark, source, family)
                sent = prober.send(target, functools.partial(self._reply, i, time.perf_counter()))
                if isinstance(sent, TargetResult):
                    self.results[i] = sent
                else:
                    self.seqs[i] = sent
                    self.pending += 1
            if self.pending:
                self.timer = self.loop.call_later(c.check.timeout, self._end)
            else:
                self._end()
        except Exception as exc:  # handed to the task, which logs it as the old loop did
            self._fail(exc)

    def _reply(self, i: int, sent_at: float, arrival: float) -> None:
        self.results[i] = TargetResult(self.targets[i], True, rtt=arrival - sent_at)
        self.seqs[i] = None
        self.pending -= 1
        if self.pending == 0 and self.timer is not None:
            self.timer.cancel()
            self._end()

    def _end(self) -> None:
        self.timer = None
        self._forget()
        timeout = self.c.check.timeout
        results = tuple(r if r is not None else TargetResult(t, False, error=f"no answer in {timeout:g}s")
                        for r, t in zip(self.results, self.targets))
        self.seqs = [None] * len(self.targets)
        try:
            self.monitor._after_round(self.c, results)
        except Exception as exc:
            self._fail(exc)
            return
        self.next_at += self.c.check.interval
        now = self.loop.time()
        if self.next_at < now:  # fell behind (suspended?): do not burst to catch up
            self.next_at = now
        self.tick = self.loop.call_at(self.next_at, self._start)

    def _fail(self, exc: Exception) -> None:
        self.cancel()
        if not self.failed.done():
            self.failed.set_exception(exc)


def _figures(m: UplinkHealth) -> dict[str, str]:
    """Every target's figures over the window, for the journal line of a transition."""
    parts = []
    for target, w in m.targets.items():
        f = w.figures()
        text = f"{target} loss {percent_text(w.loss)}"
        if f["rtt_mean_ms"] is not None:
            text += f" rtt {f['rtt_mean_ms']} ms jitter {f['jitter_ms'] or 0} ms"
        parts.append(text)
    return {"figures": "; ".join(parts)} if parts else {}


def _family_name(family: int) -> str:
    return "ipv6" if family == socket.AF_INET6 else "ipv4"


def _sources(status: UplinkStatus) -> dict[int, str]:
    out: dict[int, str] = {}
    for addr in status.addresses:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        out.setdefault(family, addr)
    return out
