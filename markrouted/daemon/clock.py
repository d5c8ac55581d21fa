"""The daemon's view of time, injectable so its logic is tested without waiting.

Retry backoff, the status refresh and the watchdog's "stuck" test read the
clock and set timers through this one object; the tests substitute one that
records the delays asked for and fires at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock:
    """Real time: the monotonic and wall clocks, and the running loop's timers."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[..., object], *args: object) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback, *args)
