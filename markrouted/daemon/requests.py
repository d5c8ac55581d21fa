"""The one queue every event source feeds: requests to reconcile, coalesced.

An event never does work itself; it marks a pass as due and says why
(level-triggered, docs/design.md). Requests made while no pass runs, and all
those made while one runs, collapse into the next single pass: a burst of a
thousand route events costs one pass, and at most one pass runs at a time
because one task takes batches and awaits each pass before taking the next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

#: let the rest of a burst of events land before a pass starts
SETTLE = 0.0005


@dataclass(frozen=True)
class Batch:
    """What one pass was asked for: every reason given since the last pass."""

    reasons: tuple[str, ...]
    #: something the routing events do not describe changed (a start, a reload,
    #: an nft transaction by someone else, lost events); a pass re-reads the
    #: whole kernel either way, so this only tells why
    full: bool

    @property
    def trigger(self) -> str:
        """The reasons as the journal shows them (a pass nobody asked for is a resync)."""
        return ", ".join(self.reasons) or "resync"


class Requests:
    """Reasons collected, a "full" flag, and the due flag one serving task waits on."""

    def __init__(self, settle: float = SETTLE) -> None:
        self.settle = settle
        self._reasons: list[str] = []
        self._full = False
        self._due = asyncio.Event()
        self._running = False

    @property
    def due(self) -> bool:
        """A pass has been asked for and not yet started."""
        return self._due.is_set()

    @property
    def running(self) -> bool:
        """A pass is running now."""
        return self._running

    def request(self, reason: str, full: bool = False) -> None:
        """Mark a pass as due; never does any work itself."""
        if reason not in self._reasons:
            self._reasons.append(reason)
        self._full = self._full or full
        self._due.set()

    def take(self) -> Batch:
        """Everything asked for so far, as one batch; the queue is empty after."""
        batch = Batch(tuple(self._reasons), self._full)
        self._reasons, self._full = [], False
        self._due.clear()
        return batch

    async def serve(self, run: Callable[[Batch], Awaitable[None]]) -> None:
        """Run one pass per batch, one at a time, until cancelled."""
        while True:
            await self._due.wait()
            await asyncio.sleep(self.settle)
            self._running = True
            try:
                await run(self.take())
            finally:
                self._running = False
