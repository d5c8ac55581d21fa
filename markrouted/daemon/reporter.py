"""What the daemon tells the world after each pass, reload and stop.

Three audiences, one source of truth (the last pass): the status file that
``markrouted status`` reads, systemd (sd_notify READY/STATUS/RELOADING/
STOPPING/WATCHDOG) and the journal, which gets one line per transition (an
uplink going up or down, a policy moving, drift repaired) rather than one per
pass. Clearing the conntrack entries of an uplink that just went down is a
consequence of the same transition, so it is decided here; the clear itself
runs in the kernel thread (docs/design.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import Config, ConfigError
from ..kernel.errors import KernelError
from ..model import DesiredState, UplinkStatus
from ..monitor import Monitor
from ..status import STATUS_FILE, Publisher
from .clock import Clock
from .systemd import Notify
from .worker import PassOutcome


def status_line(desired: DesiredState | None, config: Config, in_sync: bool, error: str | None,
                config_error: str | None) -> str:
    """The one line of ``STATUS=`` and of the status file's ``status``."""
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


def went_down(previous: DesiredState | None, now: DesiredState) -> list[UplinkStatus]:
    """The uplinks that were up after the previous pass and are down now.

    None at start: no flow was pinned by this process yet. An uplink that
    stays down, or is new, is not among them.
    """
    if previous is None:
        return []
    before = {u.name: u.state for u in previous.uplinks}
    return [u for u in now.uplinks if u.state == "down" and before.get(u.name, "up") == "up"]


def log_transitions(log: Any, previous: DesiredState | None, now: DesiredState, writes: int, trigger: str,
                    pending: Callable[[str], bool]) -> None:
    """One journal line per change a pass made visible: uplinks, policies, repaired drift.

    At start only what is wrong is said (an uplink down, unless its health
    check has not decided yet: ``pending``); a pass that wrote although the
    desired state did not change repaired drift.
    """
    before = {u.name: u for u in previous.uplinks} if previous else {}
    for u in now.uplinks:
        old = before.get(u.name)
        if old is None and previous is not None:
            continue
        if old is None or old.state != u.state:
            if previous is None and (u.state == "up" or pending(u.name)):
                continue
            event = "uplink up" if u.state == "up" else "uplink down"
            logger = log.info if u.state == "up" else log.warning
            logger(event, uplink=u.name, interface=u.interface, reason=u.reason, trigger=trigger)
    pbefore = {p.name: p for p in previous.policies} if previous else {}
    for p in now.policies:
        old_p = pbefore.get(p.name)
        if old_p is not None and old_p.active != p.active:
            log.info("policy moved", policy=p.name, was=",".join(old_p.active) or p.fallback,
                     now=",".join(p.active) or p.fallback)
    if (previous is not None and writes
            and (previous.rules, previous.routes, previous.nft) == (now.rules, now.routes, now.nft)):
        log.warning("drift repaired", writes=writes, trigger=trigger)


class Reporter:
    """Holds the daemon's published view and says it to the file, systemd and the journal."""

    def __init__(self, config_path: str, log: Any, notify: Notify, run_dir: str, monitor: Monitor,
                 clear: Callable[[int, int], Awaitable[None]], clock: Clock) -> None:
        self.config_path, self.log, self.notify, self.run_dir = config_path, log, notify, run_dir
        self.monitor, self.clear, self.clock = monitor, clear, clock
        self._publisher: Publisher | None = None
        self.desired: DesiredState | None = None
        self.in_sync = False
        self.last_error: str | None = None
        self.config_error: str | None = None
        self.last_pass: float | None = None
        self.passes = 0
        self.last_seconds = 0.0
        self.ready = False  # READY=1 was sent (after the first pass)
        self.reload_pending = False  # a reload waits for its pass to send READY=1 again

    def line(self, config: Config) -> str:
        return status_line(self.desired, config, self.in_sync, self.last_error, self.config_error)

    # ------------------------------------------------------------ passes

    def failed(self, config: Config, error: KernelError, delay: float, trigger: str) -> None:
        self.last_error = str(error)
        self.in_sync = False
        self.log.error("reconcile failed, retrying", error=str(error), retry_in=f"{delay:.1f}s", trigger=trigger)
        self.publish(config)
        self.notify(STATUS=self.line(config))

    async def passed(self, config: Config, outcome: PassOutcome, trigger: str) -> None:
        """Record a converged pass, log its transitions, clear conntrack of dead uplinks."""
        assert outcome.result is not None
        result = outcome.result
        self.passes += 1
        self.last_seconds = outcome.seconds
        self.last_error = None
        self.in_sync = True
        previous, self.desired = self.desired, result.desired
        self.last_pass = self.clock.time()
        log_transitions(self.log, previous, result.desired, result.writes, trigger, self._pending)
        mask = config.settings.mark_mask
        for u in went_down(previous, result.desired):
            # flows pinned to an uplink that just became unusable must re-route
            try:
                await self.clear(u.mark, mask)
                self.log.info("conntrack cleared", uplink=u.name, object=f"ct mark {u.mark:#x}/{mask:#x}",
                              reason="uplink down")
            except KernelError as exc:
                self.log.warning("conntrack clear failed", uplink=u.name, error=str(exc))

    def announce(self, config: Config, outcome: PassOutcome) -> None:
        """After a converged pass: status file, STATUS=, and READY=1 on start or after a reload."""
        assert outcome.result is not None
        if outcome.result.writes:
            self.log.debug("reconciled", writes=outcome.result.writes, seconds=f"{outcome.seconds:.4f}")
        self.publish(config)
        fields = {"STATUS": self.line(config)}
        if not self.ready:
            self.ready = True
            fields["READY"] = "1"
            self.log.info("started", status=fields["STATUS"])
        elif self.reload_pending:
            fields["READY"] = "1"
        self.reload_pending = False
        self.notify(**fields)

    def _pending(self, name: str) -> bool:
        checked = self.monitor.checked.get(name)
        return checked is not None and checked.machine.pending

    # ------------------------------------------------------------ reloads

    def reloading(self) -> None:
        # systemd compares it with CLOCK_MONOTONIC: the real clock, whatever the tests inject
        self.notify(RELOADING="1", MONOTONIC_USEC=str(int(time.monotonic() * 1e6)))

    def refused(self, config: Config, exc: ConfigError, why: str) -> None:
        """An invalid new config: the running one stays; the error is shown until a valid one."""
        self.config_error = str(exc)
        for line in exc.errors:
            self.log.error("config reload refused", error=line, trigger=why)
        self.publish(config)
        self.notify(READY="1", STATUS=self.line(config))

    def unchanged(self, config: Config, why: str) -> None:
        self.config_error = None
        self.log.debug("config unchanged", trigger=why)
        self.publish(config)
        self.notify(READY="1", STATUS=self.line(config))

    def reloaded(self, config: Config, why: str) -> None:
        self.config_error = None
        self.log.info("config reloaded", trigger=why, uplinks=len(config.uplinks), policies=len(config.policies))
        self.reload_pending = True

    # ------------------------------------------------------------ status file, stop

    def publish(self, config: Config) -> None:
        """Write the status file (nothing before the first pass: there is no view yet)."""
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
            status=self.line(config),
            health=self.monitor.documents(),
            passes=self.passes,
            last_pass_seconds=round(self.last_seconds, 6),
            mark_mask=f"{config.settings.mark_mask:#010x}",
        )
        try:
            self._publisher.write(self.desired, self.in_sync, **fields)
        except OSError as exc:
            self.log.warning("cannot write the status file", error=str(exc), object=self.run_dir)

    def stopping(self) -> None:
        self.notify(STOPPING="1", STATUS="stopping")

    def remove(self) -> None:
        """A stopped daemon leaves no status file: ``status`` then computes its own view."""
        try:
            os.unlink(os.path.join(self.run_dir, STATUS_FILE))
        except OSError:
            pass
