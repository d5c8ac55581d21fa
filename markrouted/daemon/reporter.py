"""What the daemon tells the world after each pass, reload and stop.

Three audiences, one source of truth (the last pass): the status file that
``markrouted status`` reads, systemd (sd_notify READY/STATUS/RELOADING/
STOPPING/WATCHDOG) and the journal, which gets one line per transition (an
uplink going up or down, a policy moving, drift repaired) rather than one per
pass. Each line is a sentence that stands alone in ``journalctl -u
markrouted`` (which shows nothing but the MESSAGE): where a policy moved from
and to and why, what drifted and what was done about it, who changed the nft
table. The sentences are made by the small pure functions below, so the tests
pin their text. Clearing the conntrack entries of an uplink that just went
down is a consequence of the same transition, so it is decided here; the
clear itself runs in the kernel thread (docs/design.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..config import Config, ConfigError
from ..kernel.errors import KernelError
from ..model import AF_INET, AF_INET6, NFT_FAMILY, NFT_TABLE, DesiredState, Plan, PolicyStatus, UplinkStatus
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


FAMILY_NAMES: dict[int, str] = {AF_INET: "ipv4", AF_INET6: "ipv6"}
#: a drift line names at most this many objects
DRIFT_SHOWN = 3
#: how the nf_tables source names who changed the table (kernel/events.py)
_CHANGED_BY = re.compile(rf"table {NFT_FAMILY} {NFT_TABLE} changed by (pid \d+(?: \([^)]*\))?)")


def _target(names: tuple[str, ...], fallback: str) -> str:
    if names:
        return ", ".join(names)
    return "the main table (no uplink usable)" if fallback == "main" else "drop (no uplink usable)"


def _by_family(p: PolicyStatus) -> dict[int, tuple[str, ...]]:
    return dict(p.by_family) if p.by_family else {0: p.active}


def moved_line(policy: str, before: Mapping[int, tuple[str, ...]], after: Mapping[int, tuple[str, ...]],
               fallback: str, cause: str) -> str | None:
    """``policy ssh moved from wan2 to wan1 (wan2 down: ...)``; None when it did not move.

    ``before``/``after``: the uplinks carrying the policy's new flows, per
    family. When every family moved the same way the line says it once;
    otherwise it names each family that moved.
    """
    families = list(dict.fromkeys([*before, *after]))
    moved = [f for f in families if before.get(f, ()) != after.get(f, ())]
    if not moved:
        return None
    moves = {(before.get(f, ()), after.get(f, ())) for f in moved}
    if len(moves) == 1 and len(moved) == len(families):
        old, new = next(iter(moves))
        text = f"policy {policy} moved from {_target(old, fallback)} to {_target(new, fallback)}"
    else:
        text = f"policy {policy} moved " + " and ".join(
            f"from {_target(before.get(f, ()), fallback)} to {_target(after.get(f, ()), fallback)}"
            f" for {FAMILY_NAMES.get(f, str(f))}" for f in moved)
    return text + (f" ({cause})" if cause else "")


def _cause(old_names: set[str], new_names: set[str], previous: Mapping[str, UplinkStatus],
           now: Mapping[str, UplinkStatus], trigger: str) -> str:
    """Why a policy moved: the uplinks it left or joined that changed, else what woke the pass."""
    said = []
    for name in [*sorted(old_names - new_names), *sorted(new_names - old_names)]:
        was, is_ = previous.get(name), now.get(name)
        if is_ is None:
            said.append(f"{name} removed from the config")
        elif was is not None and was.state != is_.state:
            said.append(f"{name} {is_.state}" + (f": {is_.reason}" if is_.state == "down" and is_.reason else ""))
        elif was is not None and was.families != is_.families:
            carries = " and ".join(FAMILY_NAMES.get(f, str(f)) for f in is_.families)
            if set(is_.families) > set(was.families):
                said.append(f"{name} now carries {carries}")
            else:  # the reason says what it lacks
                said.append(f"{name}: {is_.reason}" if is_.reason else f"{name} carries {carries} only")
    return "; ".join(said) or trigger


def drift_repairs(plan: Plan, trigger: str) -> list[str]:
    """What a pass that wrote with nothing desired changing put back, in an administrator's words."""
    said = [f"{rule} was deleted by someone else; put back" for rule in plan.rules_add]
    for new, old in plan.routes_set:
        said.append(f"{new} was deleted by someone else; put back" if old is None
                    else f"{old} was changed by someone else; set back to {new}")
    said += [f"{s} was changed by someone else; set back" for s in plan.sysctls]
    said += [f"{rule} was added by someone else with markrouted's tag; removed" for rule in plan.rules_remove]
    said += [f"{route} was added by someone else with markrouted's tag; removed" for route in plan.routes_remove]
    if not plan.nft.empty and not plan.nft.remove:
        found = _CHANGED_BY.search(trigger)
        who = found.group(1) if found else "someone else"
        if plan.nft.replace:
            said.append(f"nft table {NFT_FAMILY} {NFT_TABLE} changed by {who}: replaced")
        else:
            said.append(f"nft chains {', '.join(plan.nft.chains)} of table {NFT_FAMILY} {NFT_TABLE}"
                        f" changed by {who}: refilled")
    return said


def summary_line(head: str, desired: DesiredState, policies: int, writes: int, seconds: float) -> str:
    """``started: 2/2 uplinks up, 3 policies, 24 kernel objects installed in 41 ms``."""
    up = sum(1 for u in desired.uplinks if u.state == "up")
    # the nft table is one object (one transaction writes it); sysctls are not
    # counted: they are written once and left alone
    objects = len(desired.rules) + len(desired.routes) + (desired.nft is not None)
    text = f"{head}: {up}/{len(desired.uplinks)} uplinks up, {policies} policies, {objects} kernel objects installed"
    if writes < objects:
        text += f" ({writes} written)"
    return text + f" in {seconds * 1000:.0f} ms"


def migrations(previous: DesiredState | None, now: DesiredState) -> list[tuple[PolicyStatus, UplinkStatus]]:
    """The flows to clear for ``failback = "migrate"``: (policy, uplink) pairs.

    When a migrating policy moved to a better tier (an uplink came back, or a
    reload reordered its tiers), its flows still on an uplink it left that is
    now worse than the carrying tier, or no longer one of its uplinks, must
    re-route: they are told from other policies' flows by the policy's
    conntrack label bit. An uplink that went down is not here: all its flows
    are cleared anyway (``went_down``).
    """
    if previous is None:
        return []
    before = {p.name: p for p in previous.policies}
    uplinks = {u.name: u for u in now.uplinks}
    out = []
    for p in now.policies:
        old = before.get(p.name)
        if p.failback != "migrate" or p.label is None or p.tier is None or old is None or old.active == p.active:
            continue
        rank = {name: i for i, tier in enumerate(p.tiers) for name in tier}
        for name in old.active:
            u = uplinks.get(name)
            if name in p.active or u is None or u.state != "up":
                continue
            if rank.get(name, len(p.tiers)) > p.tier:
                out.append((p, u))
    return out


def log_transitions(log: Any, previous: DesiredState | None, now: DesiredState, writes: int, trigger: str,
                    pending: Callable[[str], bool], plan: Plan | None = None) -> None:
    """One journal line per change a pass made visible: uplinks, policies, repaired drift.

    At start only what is wrong is said (an uplink down, unless its health
    check has not decided yet: ``pending``); a pass that wrote although the
    desired state did not change repaired drift.
    """
    before = {u.name: u for u in previous.uplinks} if previous else {}
    after = {u.name: u for u in now.uplinks}
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
        if old_p is None:
            continue
        was, is_ = _by_family(old_p), _by_family(p)
        moved = [f for f in {**was, **is_} if was.get(f, ()) != is_.get(f, ())]
        cause = _cause({n for f in moved for n in was.get(f, ())}, {n for f in moved for n in is_.get(f, ())},
                       before, after, trigger)
        line = moved_line(p.name, was, is_, p.fallback, cause)
        if line is not None:
            log.info("policy moved", policy=p.name, was=",".join(old_p.active) or p.fallback,
                     now=",".join(p.active) or p.fallback, message=line)
    if (previous is not None and writes
            and (previous.rules, previous.routes, previous.nft) == (now.rules, now.routes, now.nft)):
        repairs = drift_repairs(plan, trigger) if plan is not None else []
        if len(repairs) > DRIFT_SHOWN:  # `ip rule flush`: the first few, and how many
            repairs = [*repairs[:DRIFT_SHOWN], f"and {len(repairs) - DRIFT_SHOWN} more ({writes} kernel writes)"]
        text = "drift repaired: " + ("; ".join(repairs) if repairs else f"{writes} kernel writes")
        log.warning("drift repaired", writes=writes, trigger=trigger, message=text)


def _summary(head: str, config: Config, outcome: PassOutcome) -> str:
    assert outcome.result is not None
    if not config.uplinks:
        return f"{head}: no uplinks configured, nothing installed"
    return summary_line(head, outcome.result.desired, len(config.policies), outcome.result.writes,
                        outcome.seconds)


def file_digest(path: str) -> str:
    """A file's content, hashed (empty when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(1 << 22)).hexdigest()
    except OSError:
        return ""


async def clear_dead(log: Any, clear: Callable[..., Awaitable[None]], previous: DesiredState | None,
                     now: DesiredState, mask: int) -> None:
    """Flows that must re-route now lose their conntrack entries.

    Those pinned to an uplink that just became unusable (its ct mark), and, for
    ``failback = "migrate"``, a policy's flows still on a worse uplink (its ct
    mark and the policy's ct label bit: other policies' flows there stay).
    """
    for u in went_down(previous, now):
        try:
            await clear(u.mark, mask)
            log.info("conntrack cleared", uplink=u.name, object=f"ct mark {u.mark:#x}/{mask:#x}",
                     reason="uplink down")
        except KernelError as exc:
            log.error("conntrack clear failed", uplink=u.name, error=str(exc))
    for p, u in migrations(previous, now):
        try:
            await clear(u.mark, mask, p.label)
            log.info("conntrack cleared", uplink=u.name, policy=p.name,
                     object=f"ct mark {u.mark:#x}/{mask:#x} ct label {p.label}", reason="failback")
        except KernelError as exc:
            log.error("conntrack clear failed", uplink=u.name, policy=p.name, error=str(exc))


class Reporter:
    """Holds the daemon's published view and says it to the file, systemd and the journal."""

    def __init__(self, config_path: str, log: Any, notify: Notify, run_dir: str, monitor: Monitor,
                 clear: Callable[..., Awaitable[None]], clock: Clock) -> None:
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
        self.reload_why: str | None = None  # a reload whose first pass has not been summed up yet
        self.pass_trigger = ""  # the last converged pass's
        self.refused_key: tuple[str, ...] | None = None  # the refusal last logged

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
        self.pass_trigger = trigger
        log_transitions(self.log, previous, result.desired, result.writes, trigger, self._pending, result.plan)
        await clear_dead(self.log, self.clear, previous, result.desired, config.settings.mark_mask)

    def announce(self, config: Config, outcome: PassOutcome) -> None:
        """After a converged pass: status file, STATUS=, and READY=1 on start or after a reload."""
        assert outcome.result is not None
        if outcome.result.writes:
            self.log.debug("reconciled", writes=outcome.result.writes, seconds=f"{outcome.seconds:.4f}")
        self.publish(config)
        fields = {"STATUS": self.line(config)}
        result, seconds = outcome.result, outcome.seconds
        if not self.ready:
            self.ready = True
            fields["READY"] = "1"
            self.log.info("started", status=fields["STATUS"], writes=result.writes,
                          message=_summary("started", config, outcome))
        reasons = set(self.pass_trigger.split(", "))
        if self.reload_why is not None and reasons & {"config reloaded", "retry after error"}:
            self.log.info("config reloaded", trigger=self.reload_why, uplinks=len(config.uplinks),
                          policies=len(config.policies), writes=result.writes, seconds=f"{seconds:.4f}",
                          message=_summary(f"config reloaded ({self.reload_why})", config, outcome))
            self.reload_why = None
        if self.reload_pending:
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
        """An invalid new config: the running one stays; the error is shown until a valid one.

        One line per refusal of one file content: the SIGHUP and the inotify
        event of one edit both reload, and the second refusal is not news.
        """
        self.config_error = str(exc)
        key = (file_digest(self.config_path), *exc.errors)
        error = "; ".join(exc.errors)
        if key != self.refused_key:
            self.refused_key = key
            self.log.error("config reload refused", error=error, trigger=why)
        else:
            self.log.debug("config reload refused again", error=error, trigger=why)
        self.publish(config)
        self.notify(READY="1", STATUS=self.line(config))

    def unchanged(self, config: Config, why: str) -> None:
        self.config_error = None
        self.refused_key = None
        self.log.debug("config unchanged", trigger=why)
        self.publish(config)
        self.notify(READY="1", STATUS=self.line(config))

    def reloaded(self, config: Config, why: str) -> None:
        """A valid new config: said with its summary once its first pass converged."""
        self.config_error = None
        self.refused_key = None
        self.reload_why = why
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
