"""The daemon's loop in-process: the real ``Daemon`` against the in-memory kernel.

No root, no sockets, no real waiting: the daemon runs with no event sources
(each test makes the calls a source would: ``request``, ``reload``, ``stop``),
a recording notifier instead of sd_notify, a status directory of the test's
own, and a clock whose timers fire at once and record the delay asked for.
The kernel thread is real, so a pass runs where it runs in production.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from test_derive import WAN1, WAN2, WORLD, set_link

from fakekernel import FakeKernel
from markrouted.config import load
from markrouted.daemon import Daemon
from markrouted.daemon.clock import Clock, Timer
from markrouted.daemon.requests import Requests
from markrouted.kernel import KernelError, PermissionDenied
from markrouted.model import Observed

MASK = 0x00FF0000
WEB = """\
[[policy]]
name = "web"
dport = [80, 443]
uplinks = ["wan1", "wan2"]
"""
SSH = """\
[[policy]]
name = "ssh"
dport = [22]
uplinks = ["wan2", "wan1"]
"""


def config_text(on_stop: str = "flush", rule_priority: int = 10000, policies: str = WEB) -> str:
    return (f'[settings]\nmark_mask = {MASK:#010x}\nrule_priority = {rule_priority}\non_stop = "{on_stop}"\n'
            + WAN1 + WAN2 + policies)


# ------------------------------------------------------------------ test doubles


class Kernel(FakeKernel):
    """The fake kernel, counting passes and noting which thread does what.

    ``hold()`` makes the next pass stop in ``observe`` until ``release()``,
    so a test can act while a pass runs.
    """

    def __init__(self, observed: Observed) -> None:
        super().__init__(observed)
        self.passes = 0
        self.threads: dict[str, set[int]] = {}
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.os_errors = 0

    def _note(self, what: str) -> None:
        self.threads.setdefault(what, set()).add(threading.get_native_id())

    def hold(self) -> None:
        self.entered.clear()
        self.gate = threading.Event()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()

    def observe(self, config: Any) -> Observed:
        self._note("observe")
        self.passes += 1
        if self.gate is not None:
            self.entered.set()
            assert self.gate.wait(10), "the test never released the pass"
            self.gate = None
        if self.os_errors:
            self.os_errors -= 1
            raise OSError(9, "Bad file descriptor")
        return super().observe(config)

    def clear_conntrack(self, mark: int, mask: int, label: int | None = None) -> None:
        self._note("clear_conntrack")
        super().clear_conntrack(mark, mask, label)

    def close(self) -> None:
        self._note("close")
        super().close()


class Log:
    """A structlog-shaped logger keeping (level, event, fields), bound fields included."""

    def __init__(self, events: list[tuple[str, str, dict[str, Any]]] | None = None,
                 bound: dict[str, Any] | None = None) -> None:
        self.events = events if events is not None else []
        self.bound = bound or {}

    def bind(self, **kw: Any) -> Log:
        return Log(self.events, {**self.bound, **kw})

    def _log(self, level: str, event: str, **kw: Any) -> None:
        self.events.append((level, event, {**self.bound, **kw}))

    def debug(self, event: str, **kw: Any) -> None:
        self._log("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, **kw)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for _level, e, kw in self.events if e == event]


class Notes:
    """sd_notify, recorded."""

    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []

    def __call__(self, **fields: str) -> None:
        self.sent.append(fields)

    def with_key(self, key: str) -> list[dict[str, str]]:
        return [n for n in self.sent if key in n]

    @property
    def status(self) -> str:
        return self.with_key("STATUS")[-1]["STATUS"]


class InstantClock(Clock):
    """Timers fire on the next loop turn, or when the test says (``fire = False``).

    The delays asked for are kept; monotonic time is set by hand.
    """

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.now = 1000.0
        self.fire = True
        self.held: list[tuple[asyncio.Handle, Callable[..., object], tuple[object, ...]]] = []
        self.soon: list[tuple[asyncio.Handle, list[bool]]] = []

    def monotonic(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., object], *args: object) -> Timer:
        self.delays.append(delay)
        loop = asyncio.get_running_loop()
        if not self.fire:
            held = asyncio.Handle(lambda: None, (), loop)  # only its cancel() is used
            self.held.append((held, callback, args))
            return held
        ran: list[bool] = []

        def run() -> None:
            ran.append(True)
            callback(*args)

        handle = loop.call_soon(run)
        self.soon.append((handle, ran))
        return handle

    def quiet(self) -> bool:
        """No timer is about to fire."""
        return all(ran or handle.cancelled() for handle, ran in self.soon)

    def fire_held(self) -> None:
        held, self.held = self.held, []
        for handle, callback, args in held:
            if not handle.cancelled():
                callback(*args)


# ------------------------------------------------------------------ the harness


class Harness:
    def __init__(self, tmp_path: Path, text: str, world: Observed) -> None:
        self.path = tmp_path / "markrouted.toml"
        self.path.write_text(text)
        self.run_dir = tmp_path / "run"
        self.run_dir.mkdir()
        self.kernel = Kernel(world)
        self.builds = 0
        self.log = Log()
        self.notes = Notes()
        self.clock = InstantClock()
        self.daemon: Daemon
        self.task: asyncio.Task[int] | None = None

    def _factory(self) -> Kernel:
        self.builds += 1
        return self.kernel

    async def start(self, ready: bool = True) -> None:
        self.daemon = Daemon(str(self.path), load(str(self.path)), self.log, self.notes, kernel=self._factory,
                             sources=[], clock=self.clock, run_dir=str(self.run_dir), settle=0)
        self.task = asyncio.create_task(self.daemon.run())
        if ready:
            await self.until(lambda: self.notes.with_key("READY"), "READY=1")

    async def until(self, cond: Callable[[], object], what: str, timeout: float = 10) -> None:
        """Poll ``cond`` on the loop until it holds; fail with ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not cond():
            if self.task is not None and self.task.done():
                self.task.result()  # the daemon ended: show why
                raise AssertionError(f"the daemon stopped while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.kernel.text()}")
            await asyncio.sleep(0.001)

    def idle(self) -> bool:
        """No pass running, none asked for, no timer about to ask: no pass can start unasked."""
        return not self.daemon.requests.due and not self.daemon.requests.running and self.clock.quiet()

    async def settled(self) -> None:
        await self.until(self.idle, "the daemon to be idle")

    async def pass_for(self, reason: str) -> None:
        """Ask for a pass and wait until it (and anything it caused) is done."""
        self.daemon.request(reason)
        await self.settled()

    def triggers(self) -> list[str]:
        """The trigger of every pass, in order (each pass binds its log to it)."""
        return [kw["trigger"] for _l, e, kw in self.log.events if e == "pass"]

    async def stop(self) -> int:
        assert self.task is not None
        self.daemon.stop()
        task, self.task = self.task, None
        return await asyncio.wait_for(task, 10)

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.run_dir / "status.json").read_text())
        return doc


def drive(tmp_path: Path, body: Callable[[Harness], Awaitable[None]], text: str | None = None,
          world: Observed = WORLD, prepare: Callable[[Harness], None] | None = None) -> Harness:
    """Run ``body`` against a started daemon; the daemon is stopped whatever happens.

    ``prepare`` runs before the daemon starts (to inject faults into its first
    pass); then the daemon is not waited for: ``body`` waits for what it expects.
    """
    h = Harness(tmp_path, text or config_text(), world)
    if prepare is not None:
        prepare(h)
    ready = prepare is None

    async def main() -> None:
        await h.start(ready)
        try:
            await body(h)
        finally:
            if h.task is not None:
                h.daemon.stop()
                await asyncio.gather(h.task, return_exceptions=True)

    asyncio.run(main())
    return h


@pytest.fixture(autouse=True)
def trace_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pass logs one "pass" event with its trigger, so tests can count passes and read why."""
    from markrouted.daemon import worker

    real = worker.reconcile

    def traced(config: Any, kernel: Any, health: Any, log: Any, **kw: Any) -> Any:
        log.debug("pass")
        return real(config, kernel, health, log=log, **kw)

    monkeypatch.setattr(worker, "reconcile", traced)


# ------------------------------------------------------------------ coalescing


def test_requests_collapse_into_one_batch() -> None:
    async def main() -> None:
        q = Requests()
        for i in range(5):
            q.request(f"route added in table {100 + i % 3}")
        q.request("table inet markrouted changed by pid 7", full=True)
        assert q.due
        batch = q.take()
        assert batch.reasons == ("route added in table 100", "route added in table 101",
                                 "route added in table 102", "table inet markrouted changed by pid 7")
        assert batch.full and not q.due
        assert q.take().trigger == "resync" and not q.take().full

    asyncio.run(main())


def test_a_burst_of_requests_is_one_pass(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        assert h.kernel.passes == 1
        for i in range(100):
            h.daemon.request(f"route added in table {i}")
        await h.settled()
        assert h.kernel.passes == 2
        assert h.triggers() == ["start", ", ".join(f"route added in table {i}" for i in range(100))]

    drive(tmp_path, body)


def test_requests_during_a_pass_make_exactly_one_more_pass(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.kernel.hold()
        h.daemon.request("link 2 changed")
        await h.until(h.kernel.entered.is_set, "the pass to start")
        for i in range(10):
            h.daemon.request(f"address added on link {i}")
        assert h.daemon.requests.running and h.kernel.passes == 2  # no second pass beside the first
        h.kernel.release()
        await h.settled()
        assert h.kernel.passes == 3
        assert h.triggers()[1:] == ["link 2 changed", ", ".join(f"address added on link {i}" for i in range(10))]

    drive(tmp_path, body)


# ------------------------------------------------------------------ errors and backoff


def test_failing_writes_are_retried_with_doubling_capped_delays(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.until(lambda: h.notes.with_key("READY"), "READY=1 once a pass succeeds")
        delays = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0]
        assert h.clock.delays == pytest.approx(delays)
        failed = h.log.named("reconcile failed, retrying")
        assert [kw["retry_in"] for kw in failed] == [f"{d:.1f}s" for d in delays]
        assert [kw["trigger"] for kw in failed] == ["start"] + ["retry after error"] * 11
        # READY=1 only with the pass that converged
        statuses = [n["STATUS"] for n in h.notes.with_key("STATUS")]
        assert statuses == ["starting"] * 12 + ["2/2 uplinks up, 1 policies, in sync"]
        assert h.notes.sent[-1] == {"STATUS": statuses[-1], "READY": "1"}
        assert h.kernel.nft is not None and h.status()["in_sync"] and h.status()["last_error"] is None
        # a later failure starts again from the shortest delay, and is shown until repaired
        h.clock.fire = False
        h.kernel.fail("nft_apply", times=2)
        h.kernel.nft = None  # someone deleted the table
        await h.pass_for("table inet markrouted changed by pid 7")
        line = "2/2 uplinks up, 1 policies, NOT in sync; last error: nft_apply: injected failure"
        assert h.notes.status == line
        doc = h.status()
        assert not doc["in_sync"] and doc["status"] == line and doc["last_error"] == "nft_apply: injected failure"
        h.clock.fire = True
        h.clock.fire_held()
        await h.until(lambda: h.notes.status.endswith(", in sync"), "in sync again")
        assert h.clock.delays[len(delays):] == [0.1, 0.2]
        assert h.kernel.nft is not None and h.status()["in_sync"]

    drive(tmp_path, body, prepare=lambda h: h.kernel.fail("nft_apply", times=12))


def test_a_broken_netlink_socket_means_a_fresh_kernel(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.kernel.os_errors = 1
        await h.pass_for("link 2 changed")
        assert h.log.named("reconcile failed, retrying")[0]["error"] == "netlink: [Errno 9] Bad file descriptor"
        assert h.kernel.closed and h.builds == 2  # closed, then built again by the retry
        assert h.notes.status.endswith("in sync")

    drive(tmp_path, body)


def test_missing_permission_ends_the_daemon(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        assert h.task is not None
        task, h.task = h.task, None
        with pytest.raises(PermissionDenied):
            await asyncio.wait_for(task, 10)
        assert h.kernel.closed and not h.notes.with_key("READY")
        assert not h.log.named("reconcile failed, retrying")

    drive(tmp_path, body, prepare=lambda h: h.kernel.fail("add_rule", PermissionDenied("Operation not permitted")))


# ------------------------------------------------------------------ status


def test_in_sync_status_line_and_file(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        line = "2/2 uplinks up, 1 policies, in sync"
        assert h.notes.sent[-1] == {"STATUS": line, "READY": "1"}
        assert [kw["status"] for kw in h.log.named("started")] == [line]
        doc = h.status()
        assert doc["in_sync"] is True and doc["status"] == line and doc["passes"] == 1
        assert doc["config"] == str(h.path) and doc["config_error"] is None
        assert doc["uplinks"]["wan1"]["state"] == "up" and doc["policies"]["web"]["active"] == ["wan1"]
        # one uplink down: said in the line, and the file follows
        h.kernel.set_link("eth0", carrier=False)
        await h.pass_for("link 2 changed")
        assert h.notes.status == "1/2 uplinks up, 1 policies, in sync"
        assert h.status()["uplinks"]["wan1"]["state"] == "down" and h.status()["passes"] == 2
        assert len(h.notes.with_key("READY")) == 1  # READY=1 once, after the first pass

    drive(tmp_path, body)


# ------------------------------------------------------------------ reload


def test_invalid_reload_is_refused_and_the_running_config_kept(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        running, before, passes = h.daemon.config, h.kernel.text(), h.kernel.passes
        h.path.write_text(config_text() + '[uplinks.wan3]\ninterface = "eth2"\ntable = 101\nmark = 3\n')
        h.daemon.reload("SIGHUP")
        await h.settled()
        assert h.daemon.config is running and h.kernel.text() == before and h.kernel.passes == passes
        refused = h.log.named("config reload refused")
        assert refused and all(kw["trigger"] == "SIGHUP" for kw in refused)
        assert "table" in refused[0]["error"]
        assert "RELOADING" in h.notes.sent[-2]
        last = h.notes.sent[-1]
        assert last["READY"] == "1"
        assert last["STATUS"].startswith("config reload refused (") and "running the previous config" in last["STATUS"]
        doc = h.status()
        assert doc["status"] == last["STATUS"] and "table" in doc["config_error"] and doc["in_sync"]
        # a valid config afterwards: applied, error gone, READY=1 again after its pass
        h.path.write_text(config_text(policies=WEB + SSH))
        h.daemon.reload("config file changed")
        await h.settled()
        assert h.daemon.config.policies[-1].name == "ssh" and h.kernel.passes == passes + 1
        assert h.notes.sent[-1] == {"STATUS": "2/2 uplinks up, 2 policies, in sync", "READY": "1"}
        assert h.status()["config_error"] is None and "ssh" in h.status()["policies"]

    drive(tmp_path, body)


def test_unchanged_reload_sends_ready_without_a_pass(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        passes = h.kernel.passes
        h.daemon.reload("SIGHUP")
        await h.settled()
        assert h.kernel.passes == passes
        assert h.notes.sent[-1] == {"READY": "1", "STATUS": "2/2 uplinks up, 1 policies, in sync"}

    drive(tmp_path, body)


def test_old_priority_range_is_cleared_by_the_next_pass(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        assert {r.priority // 1000 for r in h.kernel.rules} == {10}
        h.path.write_text(config_text(rule_priority=20000))
        h.daemon.reload("SIGHUP")
        assert h.daemon.old_ranges == {10000}
        await h.settled()
        assert {r.priority // 1000 for r in h.kernel.rules} == {20}
        assert h.daemon.old_ranges == set()

    drive(tmp_path, body)


# ------------------------------------------------------------------ conntrack


def test_conntrack_cleared_for_the_uplink_that_went_down_only(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        assert h.kernel.conntrack_cleared == []  # not at start
        h.kernel.set_link("eth0", carrier=False)
        await h.pass_for("link 2 changed")
        wan1 = next(u for u in h.daemon.reporter.desired.uplinks if u.name == "wan1")  # type: ignore[union-attr]
        assert wan1.state == "down" and wan1.mark == 0x10000
        assert h.kernel.conntrack_cleared == [(0x10000, MASK)]
        assert h.log.named("conntrack cleared") == [
            {"uplink": "wan1", "object": "ct mark 0x10000/0xff0000", "reason": "uplink down"}]
        # in the kernel thread, as every kernel call
        assert h.kernel.threads["clear_conntrack"] == h.kernel.threads["observe"]
        assert threading.get_native_id() not in h.kernel.threads["clear_conntrack"]
        await h.pass_for("resync")  # still down: nothing more to clear
        assert h.kernel.conntrack_cleared == [(0x10000, MASK)]
        h.kernel.set_link("eth0", carrier=True)
        await h.pass_for("link 2 changed")
        h.kernel.set_link("eth1", carrier=False)
        await h.pass_for("link 3 changed")
        assert h.kernel.conntrack_cleared == [(0x10000, MASK), (0x20000, MASK)]

    drive(tmp_path, body)


def test_no_conntrack_clear_for_an_uplink_down_from_the_start(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        assert h.daemon.reporter.desired is not None
        assert [u.state for u in h.daemon.reporter.desired.uplinks] == ["down", "up"]
        await h.pass_for("resync")
        assert h.kernel.conntrack_cleared == []

    drive(tmp_path, body, world=set_link(WORLD, "eth0", carrier=False))


# ------------------------------------------------------------------ stop, watchdog


@pytest.mark.parametrize("on_stop", ["flush", "keep"])
def test_stop_flushes_or_keeps(tmp_path: Path, on_stop: str) -> None:
    async def body(h: Harness) -> None:
        installed = h.kernel.text()
        assert h.kernel.rules and h.kernel.routes and h.kernel.nft is not None
        assert await h.stop() == 0
        assert h.notes.with_key("STOPPING") == [{"STOPPING": "1", "STATUS": "stopping"}]
        assert not (h.run_dir / "status.json").exists()
        stopped = h.log.named("stopped")
        if on_stop == "flush":
            assert not h.kernel.rules and not h.kernel.routes and h.kernel.nft is None
            assert stopped[0]["on_stop"] == "flush" and stopped[0]["removed"] > 0
        else:
            assert h.kernel.text() == installed and stopped == [{"on_stop": "keep"}]
        # closed by the thread that opened and used it
        assert h.kernel.closed and h.kernel.threads["close"] == h.kernel.threads["observe"]

    drive(tmp_path, body, text=config_text(on_stop=on_stop))


def test_watchdog_is_withheld_while_a_pass_is_stuck(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.daemon.watchdog(10.0)
        assert h.notes.sent[-1] == {"WATCHDOG": "1"}
        h.kernel.hold()
        h.daemon.request("link 2 changed")
        await h.until(h.kernel.entered.is_set, "the pass to start")
        h.clock.now += 5
        h.daemon.watchdog(10.0)  # busy, not yet stuck
        assert len(h.notes.with_key("WATCHDOG")) == 2
        h.clock.now += 6
        h.daemon.watchdog(10.0)  # stuck for more than the interval
        assert len(h.notes.with_key("WATCHDOG")) == 2
        h.kernel.release()
        await h.settled()
        h.daemon.watchdog(10.0)
        assert len(h.notes.with_key("WATCHDOG")) == 3

    drive(tmp_path, body)


def test_kernel_errors_do_not_reach_the_loop_thread(tmp_path: Path) -> None:
    """A write error in a pass is an outcome, not an exception: the daemon keeps serving."""
    async def body(h: Harness) -> None:
        h.kernel.fail("add_rule", KernelError("rule: injected", 5))
        h.kernel.rules.clear()
        await h.pass_for("rule removed at priority 10000")
        assert h.task is not None and not h.task.done()
        assert h.notes.status.endswith("in sync")

    drive(tmp_path, body)


def test_health_feed_requests_on_verdicts_and_throttles_refreshes() -> None:
    from markrouted.daemon.sources import STATUS_REFRESH, HealthFeed
    from markrouted.model import Health

    async def main() -> None:
        clock = InstantClock()
        clock.fire = False
        asked: list[str] = []
        published: list[None] = []
        feed = HealthFeed(asked.append, lambda: published.append(None), clock)
        feed.changed("wan1", Health(False, "3 of 3 probes lost"))
        assert asked == ["health check: wan1 down"]
        for _ in range(5):
            feed.round()  # five rounds end within one refresh period: one refresh
        assert clock.delays == [STATUS_REFRESH] and not published
        clock.fire_held()
        assert len(published) == 1
        feed.round()
        assert clock.delays == [STATUS_REFRESH] * 2
        feed.close()  # at stop: the pending refresh must not write the file again
        clock.fire_held()
        assert len(published) == 1

    asyncio.run(main())
