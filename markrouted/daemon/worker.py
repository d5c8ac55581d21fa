"""The kernel thread: where a pass, a conntrack clear and the flush on stop run.

All kernel I/O of the daemon runs in one worker thread: netlink requests and
libnftables transactions are blocking calls, and the event loop must keep
reading events, probing and answering the watchdog while a large transaction
runs. One thread also means the kernel adapter is opened, used and closed by
the same thread, and kernel work never overlaps.

A pass is ``reconcile()`` and nothing else: it re-reads the kernel whatever
woke it (docs/design.md). Its outcome says whether it converged; a failed
write is transient and retried with a capped exponential backoff (``Backoff``),
while missing permission or support is terminal and raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..config import Config
from ..derive import Deriver
from ..kernel import KernelAPI
from ..kernel.errors import KernelError, PermissionDenied, Unsupported
from ..model import Health
from ..reconcile import Result, flush, reconcile

BACKOFF_MIN, BACKOFF_MAX = 0.1, 30.0

T = TypeVar("T")


@dataclass
class PassOutcome:
    """One pass: its result when it converged, else the (transient) error."""

    result: Result | None
    error: KernelError | None
    seconds: float


class Backoff:
    """Capped exponential delays between retries of a failing pass."""

    def __init__(self, low: float = BACKOFF_MIN, high: float = BACKOFF_MAX) -> None:
        self.low, self.high = low, high
        self.failures = 0

    def failed(self) -> float:
        """One more failure in a row: the delay before the next attempt."""
        self.failures += 1
        return float(min(self.high, self.low * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0


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


class Worker:
    """Owns the kernel adapter and the one thread that touches it."""

    def __init__(self, factory: Callable[[], KernelAPI]) -> None:
        self.factory = factory
        self.kernel: KernelAPI | None = None
        self.deriver: Deriver | None = None  # reused while the config is the same object
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kernel")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------ from the loop

    async def run_pass(self, config: Config, health: Mapping[str, Health], extra: set[int],
                       log: Any) -> PassOutcome:
        return await self._call(self._pass, config, dict(health), extra, log)

    async def thread_id(self) -> int:
        """The worker thread's id (nf_tables names it as the writer of our transactions)."""
        return await self._call(threading.get_native_id)

    async def clear_conntrack(self, mark: int, mask: int, label: int | None = None) -> None:
        if label is None:
            await self._call(lambda: self._open().clear_conntrack(mark, mask))
        else:
            await self._call(lambda: self._open().clear_conntrack(mark, mask, label))

    async def flush(self, config: Config, old_ranges: Iterable[int], log: Any) -> int:
        """Remove everything markrouted owns, in the current and remembered priority ranges."""
        return await self._call(self._flush, config, set(old_ranges), log)

    async def close(self) -> None:
        """Close the kernel adapter in its own thread, then end the thread."""
        await self._call(self._discard)
        self.executor.shutdown(wait=True)

    # ------------------------------------------------------------ in the thread

    def _open(self) -> KernelAPI:
        if self.kernel is None:
            self.kernel = self.factory()
        return self.kernel

    def _discard(self) -> None:
        if self.kernel is not None:
            try:
                self.kernel.close()
            except Exception:  # closing a broken socket may fail in any way
                pass
            self.kernel = None

    def _pass(self, config: Config, health: dict[str, Health], extra: set[int], log: Any) -> PassOutcome:
        start = time.perf_counter()
        try:
            kernel = self._open()
            if self.deriver is None or self.deriver.config is not config:
                self.deriver = Deriver(config)
            result = reconcile(config, kernel, health, log=log, extra_ranges=extra, deriver=self.deriver)
            seconds = time.perf_counter() - start
            if result.writes and not result.plan.nft.empty:
                release_memory()
            return PassOutcome(result, None, seconds)
        except (PermissionDenied, Unsupported):
            raise
        except KernelError as exc:
            return PassOutcome(None, exc, time.perf_counter() - start)
        except OSError as exc:
            # a netlink socket in a bad state: start over with fresh ones
            self._discard()
            return PassOutcome(None, KernelError(f"netlink: {exc}"), time.perf_counter() - start)

    def _flush(self, config: Config, old_ranges: set[int], log: Any) -> int:
        kernel = self._open()
        n = flush(config, kernel, log=log)
        for lo in old_ranges:
            old = dataclasses.replace(config, settings=dataclasses.replace(config.settings, rule_priority=lo))
            n += flush(old, kernel, log=log)
        return n
