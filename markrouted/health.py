"""The per-uplink health state machine (pure: no sockets, no clock).

A link can be up with carrier while the ISP behind it is dead; only probes
see that. Rounds of probes feed this machine:

* ``down_after`` consecutive failed rounds take an up uplink down;
* ``up_after`` consecutive good rounds bring a down uplink back up — the
  hysteresis that keeps a flapping line from flapping the routing;
* a round fails when every target fails (``success = "any"``, the default) or
  when any target fails (``success = "all"``);
* losing the link (carrier, address, gateway) takes the uplink down at once,
  without waiting for probes, and a returning link must pass ``up_after``
  good rounds before it carries traffic again;
* at start there is no history to protect against: the first good round
  brings the uplink up, so a restart does not hold traffic back for seconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .config import Check
from .model import TargetResult as TargetResult  # defined with the other value types

HISTORY = 20  # rounds kept for the loss figure


@dataclass
class UplinkHealth:
    check: Check
    up: bool = False
    pending: bool = True  # no verdict yet since start
    reason: str = "health check: waiting for the first probe round"
    since: float = 0.0
    good: int = 0  # consecutive good rounds
    bad: int = 0  # consecutive failed rounds
    history: deque[bool] = field(default_factory=lambda: deque(maxlen=HISTORY))
    last: tuple[TargetResult, ...] = ()
    link_ok: bool = True

    def _set(self, up: bool, reason: str, now: float) -> bool:
        changed = up != self.up or self.pending
        if up != self.up:
            self.since = now
        self.up, self.reason, self.pending = up, reason, False
        return changed

    def round(self, results: tuple[TargetResult, ...], now: float) -> bool:
        """Feed one round; True when the verdict changed (or was first given)."""
        self.last = results
        oks = [r.ok for r in results]
        good = all(oks) if self.check.success == "all" else any(oks)
        self.history.append(good)
        if good:
            self.good, self.bad = self.good + 1, 0
        else:
            self.good, self.bad = 0, self.bad + 1
        answered = sum(oks)
        if self.pending:
            if good:
                return self._set(True, f"health check: {answered}/{len(oks)} targets answer", now)
            if self.bad >= self.check.down_after:
                return self._set(False, self._failure(results), now)
            return False
        if self.up and self.bad >= self.check.down_after:
            return self._set(False, self._failure(results), now)
        if not self.up and self.good >= self.check.up_after:
            return self._set(True, f"health check: {answered}/{len(oks)} targets answer", now)
        if not self.up and not good:
            self.reason = self._failure(results)
        return False

    def _failure(self, results: tuple[TargetResult, ...]) -> str:
        failed = [r for r in results if not r.ok]
        detail = "; ".join(f"{r.target}: {r.error or 'no answer'}" for r in failed[:3])
        return f"health check: {self.bad} failed rounds ({detail})"

    def link_lost(self, now: float, reason: str) -> bool:
        """The link went away: down at once; it must earn its way back."""
        self.link_ok = False
        self.good = 0
        changed = self.up
        if self.up:
            self.since = now
        self.up, self.pending = False, False
        self.reason = f"health check: suspended ({reason})"
        return changed

    def link_back(self) -> None:
        self.link_ok = True
        self.bad = 0

    @property
    def loss(self) -> float:
        if not self.history:
            return 0.0
        return 1.0 - sum(self.history) / len(self.history)

    def document(self) -> dict[str, object]:
        return {
            "up": self.up,
            "pending": self.pending,
            "reason": self.reason,
            "since": self.since,
            "loss": round(self.loss, 3),
            "rounds": len(self.history),
            "targets": {
                r.target: {"ok": r.ok, "rtt_ms": None if r.rtt is None else round(r.rtt * 1000, 2),
                           "error": r.error}
                for r in self.last
            },
        }
