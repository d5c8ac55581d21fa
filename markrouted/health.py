"""The per-uplink health state machine (pure: no sockets, no clock).

A link can be up with carrier while the ISP behind it is dead; only probes
see that. Rounds of probes feed this machine:

* ``down_after`` consecutive failed rounds take an up uplink down;
* ``up_after`` consecutive good rounds bring a down uplink back up — the
  hysteresis that keeps a flapping line from flapping the routing;
* a round fails when fewer than ``min_targets`` targets answer it (``success
  = "all"`` means every target, the old spelling of ``min_targets`` = all);
* losing the link (carrier, address, gateway) takes the uplink down at once,
  without waiting for probes, and a returning link must pass ``up_after``
  good rounds before it carries traffic again;
* at start there is no history to protect against: the first good round
  brings the uplink up, so a restart does not hold traffic back for seconds.

Quality (a sick line, not a dead one) is judged per target over the last
``window`` rounds, when ``max_loss`` or ``max_rtt`` is set:

* a target is unhealthy when its lost probes, counted against the whole
  window, exceed ``max_loss`` — a verdict that more answers cannot change, so
  it may come before the window is full — or when the mean RTT of its
  answered probes exceeds ``max_rtt`` (judged once half the window answered);
* an up uplink goes down when fewer than ``min_targets`` targets are healthy;
* a down uplink comes back only when ``min_targets`` targets are at or below
  the recovery thresholds (``recover_loss``, ``recover_rtt``; half the
  maximum by default), besides ``up_after`` good rounds: an uplink that went
  down at 25 % loss does not come back at 19 %.

Flap damping: an uplink that went down ``damp_flaps`` times within
``damp_within`` is held down for ``damp_hold``, twice as long at each further
flap (up to an hour), whatever the probes say meanwhile; a calm
``damp_within`` without that many downs starts the doubling again.
"""

from __future__ import annotations

import datetime
import math
from collections import deque
from dataclasses import dataclass, field

from .config import Check
from .model import TargetResult as TargetResult  # defined with the other value types

HOLD_MAX = 3600.0  # a doubled hold stops growing here


def duration_text(seconds: float) -> str:
    """``600`` -> ``"10m"``: the shortest exact spelling of a duration."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds * 1000:g}ms"


def percent_text(fraction: float) -> str:
    return f"{round(fraction * 100, 1):g} %"


def ms_text(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def clock_text(timestamp: float, hold: float) -> str:
    """When a hold ends, as a wall clock reads it (seconds only when they matter)."""
    return datetime.datetime.fromtimestamp(timestamp).strftime("%H:%M:%S" if hold < 600 else "%H:%M")


@dataclass
class TargetWindow:
    """One target's last ``window`` probes: the RTT in seconds, or None when lost.

    The counts the verdicts need each round (lost probes, the RTTs' sum) are
    kept as probes come and go, so a round costs the same with a window of
    1000 as with one of 10.
    """

    window: int
    samples: deque[float | None] = field(default_factory=deque)
    lost: int = 0
    rtt_sum: float = 0.0
    adds: int = 0

    def add(self, rtt: float | None) -> None:
        self.samples.append(rtt)
        self._count(rtt, 1)
        if len(self.samples) > self.window:
            self._count(self.samples.popleft(), -1)
        self.adds += 1
        if self.adds % self.window == 0:  # once a window: no rounding error piles up in the running sum
            self.rtt_sum = sum(s for s in self.samples if s is not None)

    def _count(self, rtt: float | None, sign: int) -> None:
        if rtt is None:
            self.lost += sign
        else:
            self.rtt_sum += sign * rtt

    @property
    def loss(self) -> float:
        return self.lost / len(self.samples) if self.samples else 0.0

    @property
    def answered(self) -> int:
        return len(self.samples) - self.lost

    @property
    def mean(self) -> float | None:
        """The answered probes' mean RTT (None when none answered)."""
        answered = self.answered
        return max(0.0, self.rtt_sum / answered) if answered else None

    def rtts(self) -> list[float]:
        return [s for s in self.samples if s is not None]

    def figures(self) -> dict[str, object]:
        rtts = self.rtts()
        jitter = (sum(abs(b - a) for a, b in zip(rtts, rtts[1:])) / (len(rtts) - 1)) if len(rtts) > 1 else None

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 2)

        return {
            "probes": len(self.samples),
            "loss": round(self.loss, 3),
            "rtt_mean_ms": ms(sum(rtts) / len(rtts)) if rtts else None,
            "rtt_min_ms": ms(min(rtts)) if rtts else None,
            "rtt_max_ms": ms(max(rtts)) if rtts else None,
            "jitter_ms": ms(jitter),
        }


@dataclass
class UplinkHealth:
    check: Check
    up: bool = False
    pending: bool = True  # no verdict yet since start
    reason: str = "health check: waiting for the first probe round"
    since: float = 0.0
    good: int = 0  # consecutive good rounds
    bad: int = 0  # consecutive failed rounds
    history: deque[bool] = field(default_factory=deque)  # good rounds, the last ``window``
    targets: dict[str, TargetWindow] = field(default_factory=dict)
    last: tuple[TargetResult, ...] = ()
    link_ok: bool = True
    downs: deque[float] = field(default_factory=deque)  # when it went down, within damp_within
    holds: int = 0  # holds since the last calm damp_within: the next one lasts 2**holds times longer
    held_until: float = 0.0
    hold_started: bool = False  # the last transition began a hold (the monitor says so in the journal)

    # ------------------------------------------------------------ rounds

    def round(self, results: tuple[TargetResult, ...], now: float) -> bool:
        """Feed one round; True when the verdict changed (or was first given)."""
        check = self.check
        self.last = results
        answered = sum(1 for r in results if r.ok)
        good = answered >= check.needed
        self.history.append(good)
        if len(self.history) > check.window:
            self.history.popleft()
        for r in results:
            w = self.targets.get(r.target)
            if w is None:
                w = self.targets[r.target] = TargetWindow(check.window)
            w.add(r.rtt if r.ok and r.rtt is not None else (0.0 if r.ok else None))
        if good:
            self.good, self.bad = self.good + 1, 0
        else:
            self.good, self.bad = 0, self.bad + 1
        sick = self._sick()
        up_reason = f"health check: {answered}/{len(results)} targets answer" + self._figures()
        if self.pending:
            if good and not sick:
                return self._set(True, up_reason, now)
            if self.bad >= check.down_after:
                return self._down(self._failure(results), now)
            if sick:
                return self._down("health check: " + sick, now)
            return False
        if self.up:
            if self.bad >= check.down_after:
                return self._down(self._failure(results), now)
            if sick:
                return self._down("health check: " + sick, now)
            return False
        if now < self.held_until:
            return False  # held: the reason keeps saying why, and until when
        if self.held_until:
            self.held_until = 0.0
            self.reason = "health check: hold over, waiting for good rounds"
        if not good:
            self.reason = self._failure(results)
            return False
        unrecovered = self._unrecovered()
        if unrecovered:
            self.reason = "health check: not recovered: " + unrecovered
            return False
        if self.good >= check.up_after:
            return self._set(True, up_reason, now)
        return False

    def _set(self, up: bool, reason: str, now: float) -> bool:
        changed = up != self.up or self.pending
        if up != self.up:
            self.since = now
        self.up, self.reason, self.pending = up, reason, False
        return changed

    def _down(self, reason: str, now: float) -> bool:
        was_up = self.up
        changed = self._set(False, reason, now)
        if was_up:
            self._flap(now)
        return changed

    def _flap(self, now: float) -> None:
        """One more down: hold it down when it has flapped too often."""
        check = self.check
        self.hold_started = False
        if check.damp_flaps == 0:
            return
        while self.downs and self.downs[0] <= now - check.damp_within:
            self.downs.popleft()
        self.downs.append(now)
        if len(self.downs) < check.damp_flaps:
            self.holds = 0  # calm enough: the next hold starts short again
            return
        hold = min(max(HOLD_MAX, check.damp_hold), check.damp_hold * 2 ** min(self.holds, 16))
        self.holds += 1
        self.held_until = now + hold
        self.hold_started = True
        self.reason = (f"health check: held down: {len(self.downs)} flaps in {duration_text(check.damp_within)}, "
                       f"until {clock_text(self.held_until, hold)} ({self.reason.removeprefix('health check: ')})")

    # ------------------------------------------------------------ quality

    def _sick(self) -> str:
        """Why fewer than ``min_targets`` targets are healthy over the window, or ''."""
        check = self.check
        if check.max_loss is None and check.max_rtt is None:
            return ""
        problems: list[str] = []
        healthy = 0
        for target in (str(t) for t in check.targets):
            w = self.targets.get(target)
            problem = self._target_sick(w) if w is not None else ""
            if problem:
                problems.append(f"{target}: {problem}")
            else:
                healthy += 1
        if healthy >= check.needed:
            return ""
        return "; ".join(problems[:3])

    def _target_sick(self, w: TargetWindow) -> str:
        check = self.check
        if check.max_loss is not None and w.lost / check.window > check.max_loss:
            return f"loss {percent_text(w.loss)} > {percent_text(check.max_loss)}"
        mean = w.mean
        if check.max_rtt is not None and mean is not None and w.answered >= math.ceil(check.window / 2):
            if mean > check.max_rtt:
                return f"rtt {ms_text(mean)} > {ms_text(check.max_rtt)}"
        return ""

    def _unrecovered(self) -> str:
        """Why fewer than ``min_targets`` targets are back under the recovery thresholds, or ''."""
        check = self.check
        recover_loss, recover_rtt = check.recover_loss_or_default, check.recover_rtt_or_default
        if recover_loss is None and recover_rtt is None:
            return ""
        problems: list[str] = []
        recovered = 0
        for target in (str(t) for t in check.targets):
            w = self.targets.get(target)
            problem = "no probes yet"
            if w is not None and w.samples:
                problem = ""
                mean = w.mean
                if recover_loss is not None and w.loss > recover_loss:
                    problem = f"loss {percent_text(w.loss)} > {percent_text(recover_loss)}"
                elif recover_rtt is not None and mean is not None and mean > recover_rtt:
                    problem = f"rtt {ms_text(mean)} > {ms_text(recover_rtt)}"
            if problem:
                problems.append(f"{target}: {problem}")
            else:
                recovered += 1
        if recovered >= check.needed:
            return ""
        return "; ".join(problems[:3])

    def _figures(self) -> str:
        """The worst loss and mean RTT over the window, when quality is judged."""
        check = self.check
        if check.max_loss is None and check.max_rtt is None:
            return ""
        windows = [w for w in self.targets.values() if w.samples]
        if not windows:
            return ""
        means = [m for m in (w.mean for w in windows) if m is not None]
        text = f"; loss {percent_text(max(w.loss for w in windows))}"
        if means:
            text += f", rtt {ms_text(max(means))}"
        return text

    def _failure(self, results: tuple[TargetResult, ...]) -> str:
        failed = [r for r in results if not r.ok]
        detail = "; ".join(f"{r.target}: {r.error or 'no answer'}" for r in failed[:3])
        return f"health check: {self.bad} failed rounds ({detail})"

    # ------------------------------------------------------------ the link

    def link_lost(self, now: float, reason: str) -> bool:
        """The link went away: down at once; it must earn its way back."""
        self.link_ok = False
        self.good = 0
        changed = self.up
        if self.up:
            self.since = now
        was_up = self.up
        self.up, self.pending = False, False
        self.reason = f"health check: suspended ({reason})"
        if was_up:
            self._flap(now)
        return changed

    def link_back(self) -> None:
        self.link_ok = True
        self.bad = 0
        # what was measured before the link went away says nothing about it now
        self.history.clear()
        self.targets.clear()

    # ------------------------------------------------------------ figures

    @property
    def loss(self) -> float:
        """Failed rounds over the window."""
        if not self.history:
            return 0.0
        return 1.0 - sum(self.history) / len(self.history)

    def document(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "up": self.up,
            "pending": self.pending,
            "reason": self.reason,
            "since": self.since,
            "loss": round(self.loss, 3),
            "rounds": len(self.history),
            "window": self.check.window,
            "flaps": len(self.downs),
            "held_until": self.held_until or None,
            "targets": {},
        }
        targets: dict[str, object] = {}
        for r in self.last:
            entry: dict[str, object] = {"ok": r.ok, "rtt_ms": None if r.rtt is None else round(r.rtt * 1000, 2),
                                        "error": r.error}
            w = self.targets.get(r.target)
            if w is not None:
                entry.update(w.figures())
            targets[r.target] = entry
        doc["targets"] = targets
        return doc
