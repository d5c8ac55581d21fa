"""The health state machine (markrouted.health), the monitor's rounds, the check's config errors.

Rounds are written as strings, one character per round: ``+`` a good round,
``-`` a failed one. Expected verdicts are strings too, one character per round:
``P`` pending (no verdict yet, the uplink does not carry traffic), ``U`` up,
``D`` down. No sockets and no clock: time is the round's index. The
monitor's tests run its rounds on a real event loop with a fake prober in
place of the raw sockets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from markrouted.config import Check, ConfigError, parse
from markrouted.health import TargetResult, UplinkHealth
from markrouted.model import AF_INET, UplinkStatus
from markrouted.monitor import Monitor

ROOT = Path(__file__).resolve().parents[2]
T1, T2 = "192.0.2.1", "2001:db8::1"
HISTORY = Check(targets=()).window  # rounds kept for the figures


def check(down_after: int = 3, up_after: int = 3, success: str = "any", targets: tuple[str, ...] = (T1,)) -> Check:
    return Check(
        targets=tuple(ipaddress.ip_address(t) for t in targets),
        interval=0.2,
        timeout=0.2,
        down_after=down_after,
        up_after=up_after,
        success=success,
        damp_flaps=0,  # these tests are about the counts; test_health_quality.py covers damping
    )


def result(ok: bool, target: str = T1) -> tuple[TargetResult, ...]:
    """One round of one target."""
    if ok:
        return (TargetResult(target, True, rtt=0.0015),)
    return (TargetResult(target, False, error="no answer in 0.2s"),)


def verdict(m: UplinkHealth) -> str:
    return "P" if m.pending else "U" if m.up else "D"


def feed(m: UplinkHealth, rounds: str, start: int = 0) -> tuple[str, list[int]]:
    """Feed ``rounds``; the verdict after each, and the indexes where round() said "changed"."""
    seen, changed = "", []
    for i, c in enumerate(rounds, start):
        if m.round(result(c == "+"), float(i)):
            changed.append(i)
        seen += verdict(m)
    return seen, changed


# ------------------------------------------------------------------ consecutive rounds


ROUND_CASES = [
    # rounds, down_after, up_after, verdicts
    pytest.param("+", 3, 3, "U", id="first-good-round-brings-it-up"),
    pytest.param("-+", 3, 3, "PU", id="pending-one-failure-then-good"),
    pytest.param("---", 3, 3, "PPD", id="unreachable-from-start-down-after-down_after"),
    pytest.param("-" * 12, 3, 3, "PPD" + "D" * 9, id="unreachable-stays-down"),
    pytest.param("+--", 3, 3, "UUU", id="two-failures-are-not-enough"),
    pytest.param("+---", 3, 3, "UUUD", id="down_after-failures-take-it-down"),
    pytest.param("+--+--+--+", 3, 3, "U" * 10, id="failures-must-be-consecutive"),
    pytest.param("+---++", 3, 3, "UUUDDD", id="two-good-rounds-are-not-enough"),
    pytest.param("+---+++", 3, 3, "UUUDDDU", id="up_after-good-rounds-bring-it-up"),
    pytest.param("+---++-+++", 3, 3, "UUUDDDDDDU", id="good-rounds-must-be-consecutive"),
    pytest.param("+-", 1, 1, "UD", id="down_after-1"),
    pytest.param("+-+-+", 1, 1, "UDUDU", id="both-1-follow-every-round"),
    pytest.param("+-----", 5, 2, "UUUUUD", id="down_after-5"),
    pytest.param("+-++", 1, 2, "UDDU", id="asymmetric"),
    pytest.param("---+", 3, 3, "PPDD", id="after-a-start-verdict-of-down-up_after-applies"),
    pytest.param("---+++", 3, 3, "PPDDDU", id="unreachable-then-reachable"),
]


@pytest.mark.parametrize(("rounds", "down_after", "up_after", "expected"), ROUND_CASES)
def test_rounds(rounds: str, down_after: int, up_after: int, expected: str) -> None:
    m = UplinkHealth(check(down_after, up_after))
    seen, _ = feed(m, rounds)
    assert seen == expected


@pytest.mark.parametrize(("rounds", "down_after", "up_after", "expected"), ROUND_CASES)
def test_changed_is_reported_exactly_at_transitions(rounds: str, down_after: int, up_after: int,
                                                    expected: str) -> None:
    """round() says True on the first verdict and on every change, never otherwise."""
    m = UplinkHealth(check(down_after, up_after))
    _, changed = feed(m, rounds)
    states = "P" + expected
    assert changed == [i for i in range(len(expected)) if states[i + 1] != states[i]]


def test_since_moves_only_on_transitions() -> None:
    m = UplinkHealth(check(), since=-1.0)
    feed(m, "+--")
    assert m.since == 0.0  # pending -> up at round 0
    feed(m, "-++", start=3)
    assert m.since == 3.0  # down at round 3, the later good rounds change nothing
    feed(m, "+", start=6)
    assert m.since == 6.0


def test_unreachable_from_start_says_why() -> None:
    m = UplinkHealth(check(targets=(T1, T2)))
    failed = (TargetResult(T1, False, error="no answer in 0.2s"), TargetResult(T2, False, error="Network is unreachable"))
    assert not m.round(failed, 1.0)
    assert not m.round(failed, 2.0)
    assert m.reason == "health check: waiting for the first probe round"
    assert m.round(failed, 3.0)  # the first verdict: down
    assert (m.up, m.pending) == (False, False)
    assert m.reason == (
        "health check: 3 failed rounds (192.0.2.1: no answer in 0.2s; 2001:db8::1: Network is unreachable)")
    for t in range(4, 50):
        assert not m.round(failed, float(t))
    assert not m.up
    assert m.reason.startswith("health check: 49 failed rounds (192.0.2.1: no answer in 0.2s;")


def test_failure_reason_names_at_most_three_targets() -> None:
    targets = tuple(f"192.0.2.{i}" for i in range(1, 6))
    m = UplinkHealth(check(down_after=1, targets=targets))
    m.round(tuple(TargetResult(t, False) for t in targets), 0.0)
    assert m.reason == "health check: 1 failed rounds (192.0.2.1: no answer; 192.0.2.2: no answer; 192.0.2.3: no answer)"


def test_up_reason_counts_answering_targets() -> None:
    m = UplinkHealth(check(targets=(T1, T2)))
    m.round((TargetResult(T1, True, rtt=0.001), TargetResult(T2, False)), 0.0)
    assert m.reason == "health check: 1/2 targets answer"


# ------------------------------------------------------------------ hysteresis


@pytest.mark.parametrize(("down_after", "up_after"), [(1, 1), (2, 2), (3, 3), (3, 1), (1, 4), (5, 2)])
def test_alternating_line_does_not_flap(down_after: int, up_after: int) -> None:
    """Every other probe lost: the verdict never changes once given (unless a count is 1)."""
    m = UplinkHealth(check(down_after, up_after))
    seen, changed = feed(m, "+-" * 30)
    if down_after > 1 and up_after > 1:
        assert changed == [0] and set(seen) == {"U"}
    elif down_after == 1 and up_after == 1:
        assert len(changed) == 60  # the configuration asked for it: it follows every round
    elif down_after == 1:
        assert seen[1:] == "D" * 59  # down at once, never up_after good rounds in a row again
    else:
        assert set(seen) == {"U"}


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize(("down_after", "up_after"), [(1, 1), (2, 3), (3, 3), (4, 2)])
def test_hysteresis_invariants_on_random_lines(seed: int, down_after: int, up_after: int) -> None:
    """On any line: a change needs its full run of rounds behind it, and no full run is missed.

    * a transition to down happens only after ``down_after`` failed rounds in a row,
      one to up (after the first verdict) only after ``up_after`` good rounds in a row;
    * conversely, ``down_after`` failures in a row always leave the uplink down and
      ``up_after`` good rounds in a row always leave it up.
    Together: no flapping faster than the counts allow, and no outage unnoticed.
    """
    rng = random.Random(seed * 1000 + down_after * 10 + up_after)
    p_good = rng.choice([0.3, 0.5, 0.7, 0.9])
    rounds = "".join("+" if rng.random() < p_good else "-" for _ in range(300))
    m = UplinkHealth(check(down_after, up_after))
    seen, changed = feed(m, rounds)
    first = changed[0] if changed else None
    for i in changed:
        if seen[i] == "D":
            assert i + 1 >= down_after and rounds[i + 1 - down_after : i + 1] == "-" * down_after, (rounds, i)
        elif i != first:
            assert rounds[i + 1 - up_after : i + 1] == "+" * up_after, (rounds, i)
    for i in range(len(rounds)):
        if i + 1 >= down_after and rounds[i + 1 - down_after : i + 1] == "-" * down_after:
            assert seen[i] == "D", (rounds, i)
        if i + 1 >= up_after and rounds[i + 1 - up_after : i + 1] == "+" * up_after:
            assert seen[i] == "U", (rounds, i)
    # a state between two changes lasts at least as many rounds as the next change needs
    for a, b in zip(changed[1:], changed[2:]):
        assert b - a >= (down_after if seen[b] == "D" else up_after)


# ------------------------------------------------------------------ any / all


def two(a: bool, b: bool) -> tuple[TargetResult, ...]:
    return (
        TargetResult(T1, a, rtt=0.001 if a else None, error=None if a else "no answer in 0.2s"),
        TargetResult(T2, b, rtt=0.002 if b else None, error=None if b else "no answer in 0.2s"),
    )


@pytest.mark.parametrize(
    ("success", "results", "good"),
    [
        ("any", (True, True), True),
        ("any", (True, False), True),
        ("any", (False, True), True),
        ("any", (False, False), False),
        ("all", (True, True), True),
        ("all", (True, False), False),
        ("all", (False, True), False),
        ("all", (False, False), False),
    ],
)
def test_success_any_or_all(success: str, results: tuple[bool, bool], good: bool) -> None:
    m = UplinkHealth(check(down_after=1, up_after=1, success=success, targets=(T1, T2)))
    m.round(two(*results), 0.0)
    assert m.up is good
    assert list(m.history) == [good]


def test_success_all_goes_down_when_one_target_keeps_failing() -> None:
    m_any = UplinkHealth(check(success="any", targets=(T1, T2)))
    m_all = UplinkHealth(check(success="all", targets=(T1, T2)))
    for m in (m_any, m_all):
        m.round(two(True, True), 0.0)
        for t in range(1, 4):
            m.round(two(True, False), float(t))
    assert m_any.up and m_any.reason == "health check: 2/2 targets answer"
    assert not m_all.up
    assert m_all.reason == "health check: 3 failed rounds (2001:db8::1: no answer in 0.2s)"


def test_default_success_is_any() -> None:
    assert Check(targets=()).success == "any"
    config = parse('[uplinks.w]\ninterface = "eth0"\ntable = 101\nmark = 1\n'
                   '[uplinks.w.check]\ntargets = ["192.0.2.1"]\n')
    assert config.uplinks[0].check is not None and config.uplinks[0].check.success == "any"


# ------------------------------------------------------------------ the link


def test_link_lost_takes_it_down_at_once_and_it_must_earn_its_way_back() -> None:
    m = UplinkHealth(check(down_after=3, up_after=3))
    feed(m, "++")
    assert m.up
    assert m.link_lost(10.0, "no carrier") is True
    assert (m.up, m.pending, m.since) == (False, False, 10.0)
    assert m.reason == "health check: suspended (no carrier)"
    m.link_back()
    assert m.link_ok
    seen, changed = feed(m, "++-+++", start=11)
    assert seen == "DDDDDU"  # a failure in between restarts the count
    assert changed == [16]
    assert m.since == 16.0


def test_link_lost_while_pending_needs_up_after_rounds_too() -> None:
    """A link lost before the first verdict: when it returns, the first good round is not enough."""
    m = UplinkHealth(check(up_after=2))
    assert m.link_lost(1.0, "no carrier") is False  # it was not carrying traffic: no transition
    assert not m.pending and not m.up
    m.link_back()
    seen, _ = feed(m, "++")
    assert seen == "DU"


def test_link_lost_when_already_down_is_no_transition() -> None:
    m = UplinkHealth(check(down_after=1))
    feed(m, "+-")
    since = m.since
    assert m.link_lost(5.0, "link is administratively down") is False
    assert m.since == since
    assert m.reason == "health check: suspended (link is administratively down)"


def test_link_lost_resets_a_recovery_in_progress() -> None:
    m = UplinkHealth(check(down_after=1, up_after=3))
    feed(m, "+-++")  # down, then two of the three good rounds
    m.link_lost(5.0, "no carrier")
    m.link_back()
    seen, _ = feed(m, "+++", start=6)
    assert seen == "DDU"


def test_link_back_forgets_failures_from_before() -> None:
    m = UplinkHealth(check(down_after=3))
    feed(m, "+--")  # two failures: still up
    m.link_lost(3.0, "no carrier")
    m.link_back()
    assert m.bad == 0


# ------------------------------------------------------------------ loss and the document


def test_loss_over_recent_rounds() -> None:
    m = UplinkHealth(check(down_after=100))
    assert m.loss == 0.0
    feed(m, "+-+-")
    assert m.loss == 0.5
    feed(m, "+" * HISTORY)  # the old rounds fall out of the window
    assert m.loss == 0.0
    assert len(m.history) == HISTORY
    feed(m, "-" * 5)
    assert m.loss == pytest.approx(5 / HISTORY)
    assert m.document()["loss"] == round(5 / HISTORY, 3)
    assert m.document()["rounds"] == HISTORY


def test_document() -> None:
    m = UplinkHealth(check(targets=(T1, T2)), since=100.0)
    doc = m.document()
    assert doc == {
        "up": False,
        "pending": True,
        "reason": "health check: waiting for the first probe round",
        "since": 100.0,
        "loss": 0.0,
        "rounds": 0,
        "window": 10,
        "flaps": 0,
        "held_until": None,
        "targets": {},
    }
    m.round((TargetResult(T1, True, rtt=0.012345), TargetResult(T2, False, error="no answer in 0.2s")), 101.0)
    assert m.document() == {
        "up": True,
        "pending": False,
        "reason": "health check: 1/2 targets answer",
        "since": 101.0,
        "loss": 0.0,
        "rounds": 1,
        "window": 10,
        "flaps": 0,
        "held_until": None,
        "targets": {
            T1: {"ok": True, "rtt_ms": 12.35, "error": None, "probes": 1, "loss": 0.0, "rtt_mean_ms": 12.35,
                 "rtt_min_ms": 12.35, "rtt_max_ms": 12.35, "jitter_ms": None},
            T2: {"ok": False, "rtt_ms": None, "error": "no answer in 0.2s", "probes": 1, "loss": 1.0,
                 "rtt_mean_ms": None, "rtt_min_ms": None, "rtt_max_ms": None, "jitter_ms": None},
        },
    }


# ------------------------------------------------------------------ the monitor's rounds


class FakeProber:
    """Stands in for an IcmpProber: answers after ``rtt`` while ``answering``, records everything."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.answering = True
        self.rtt = 0.002
        self.error: OSError | None = None
        self.sent: list[tuple[float, str]] = []
        self.forgotten: list[int] = []
        self.seq = 0
        self.closed = False

    def send(self, target: str, on_reply: Callable[[float], None]) -> int | TargetResult:
        if self.error is not None:
            raise self.error
        self.seq += 1
        self.sent.append((self.loop.time(), target))
        if self.answering:
            self.loop.call_later(self.rtt, lambda: on_reply(time.perf_counter()))
        return self.seq

    def forget(self, seq: int) -> None:
        self.forgotten.append(seq)

    def close(self) -> None:
        self.closed = True


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, object]]] = []

    def _log(self, event: str, **kw: object) -> None:
        self.lines.append((event, kw))

    info = warning = error = debug = _log


def status(link_ok: bool = True, reason: str = "ok") -> SimpleNamespace:
    """The part of a DesiredState the monitor reads: its uplinks' link-level state."""
    uplink = UplinkStatus("wan1", "eth0", "up" if link_ok else "down", reason, "198.51.100.1", None, 101,
                          0x10000, (AF_INET,), link_ok=link_ok, link_reason=reason, addresses=("198.51.100.2",))
    return SimpleNamespace(uplinks=(uplink,))


#: These tests run on the real clock: the fake answers in 2 ms, and the timeout
#: leaves a loaded machine well over 100 ms of stalls before an answer is late.
INTERVAL, TIMEOUT = 0.2, 0.15
MONITOR_CONFIG = parse(
    '[uplinks.wan1]\ninterface = "eth0"\ntable = 101\nmark = 1\n[uplinks.wan1.check]\n'
    'targets = ["198.18.0.10", "198.18.0.11"]\ninterval = "200ms"\ntimeout = "150ms"\ndown_after = 2\nup_after = 2\n')


async def start_monitor() -> tuple[Monitor, FakeProber, list[tuple[str, bool, str]], Log]:
    changes: list[tuple[str, bool, str]] = []
    log = Log()
    monitor = Monitor(log, lambda name, h: changes.append((name, h.up, h.reason)))
    monitor.configure(MONITOR_CONFIG)
    monitor.update(status(), MONITOR_CONFIG)  # type: ignore[arg-type]
    prober = FakeProber(asyncio.get_running_loop())
    monitor.checked["wan1"].probers[AF_INET] = prober  # type: ignore[assignment]  # before the first round
    return monitor, prober, changes, log


async def until(predicate: Callable[[], bool], deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.005)


def test_monitor_rounds_send_to_every_target_and_keep_the_interval() -> None:
    async def go() -> None:
        monitor, prober, changes, _ = await start_monitor()
        await until(lambda: len(changes) == 1)
        assert changes == [("wan1", True, "health check: 2/2 targets answer")]
        await until(lambda: len(prober.sent) >= 10)
        await monitor.close()
        assert [target for _, target in prober.sent[:4]] == ["198.18.0.10", "198.18.0.11"] * 2
        assert all(prober.sent[i + 1][0] - prober.sent[i][0] < 0.001 for i in range(0, 10, 2))  # both at once
        starts = [t for t, _ in prober.sent[::2]]
        # a fixed rate: every interval on average whatever the replies take, and a
        # late round is not followed by a burst
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert 0.9 * INTERVAL <= (starts[-1] - starts[0]) / len(gaps) <= 1.4 * INTERVAL, gaps
        assert min(gaps) > 0.4 * INTERVAL, gaps
        doc = monitor.documents()["wan1"]
        assert all(r["ok"] and 0 < r["rtt_ms"] < TIMEOUT * 1000
                   for r in doc["targets"].values())  # type: ignore[index, union-attr]

    asyncio.run(go())


def test_monitor_silence_means_down_after_the_count_of_timeouts() -> None:
    async def go() -> None:
        monitor, prober, changes, log = await start_monitor()
        await until(lambda: len(changes) == 1)
        prober.answering = False
        began = asyncio.get_running_loop().time()
        await until(lambda: len(changes) == 2)
        took = asyncio.get_running_loop().time() - began
        assert changes[1] == ("wan1", False, "health check: 2 failed rounds "
                              "(198.18.0.10: no answer in 0.15s; 198.18.0.11: no answer in 0.15s)")
        assert took <= INTERVAL * 2 + TIMEOUT + 0.3  # interval x down_after + timeout (+ slack for a busy machine)
        assert prober.forgotten  # the unanswered probes were given up
        [(_, fields)] = [line for line in log.lines if line[0] == "health check down"]
        assert fields["uplink"] == "wan1" and fields["reason"] == changes[1][2]
        prober.answering = True
        await until(lambda: len(changes) == 3)
        assert changes[2][1] is True
        await monitor.close()

    asyncio.run(go())


def test_monitor_link_loss_stops_the_rounds_at_once() -> None:
    """No probe after the link is lost, not even one already due: the old probers are closed."""
    async def go() -> None:
        monitor, prober, changes, _ = await start_monitor()
        await until(lambda: len(changes) == 1)
        monitor.update(status(False, "no carrier"), MONITOR_CONFIG)  # type: ignore[arg-type]
        assert changes[-1] == ("wan1", False, "health check: suspended (no carrier)")
        assert prober.closed
        sent = len(prober.sent)
        await asyncio.sleep(2 * INTERVAL)  # two rounds would have been due
        assert len(prober.sent) == sent
        assert monitor.checked["wan1"].task is None and monitor.checked["wan1"].rounds is None
        # the link returns: new rounds (new probers), up only after up_after good rounds
        monitor.update(status(), MONITOR_CONFIG)  # type: ignore[arg-type]
        fresh = FakeProber(asyncio.get_running_loop())
        monitor.checked["wan1"].probers[AF_INET] = fresh  # type: ignore[assignment]
        await until(lambda: len(changes) == 3)
        assert changes[2][1] is True
        assert len(fresh.sent) >= 4  # two rounds of two targets at least, not the first round alone
        await monitor.close()

    asyncio.run(go())


def test_monitor_socket_error_is_logged_and_probing_restarts_on_the_next_update() -> None:
    async def go() -> None:
        monitor, prober, changes, log = await start_monitor()
        prober.error = OSError(19, "No such device")
        await until(lambda: any(e == "health check failed" for e, _ in log.lines))
        assert monitor.checked["wan1"].task is None
        assert changes == []  # no verdict invented from an error
        monitor.update(status(), MONITOR_CONFIG)  # type: ignore[arg-type]
        monitor.checked["wan1"].probers[AF_INET] = FakeProber(asyncio.get_running_loop())  # type: ignore[assignment]
        await until(lambda: len(changes) == 1)
        await monitor.close()

    asyncio.run(go())


# ------------------------------------------------------------------ config errors

BASE = '[uplinks.wan1]\ninterface = "eth0"\ntable = 101\nmark = 1\n[uplinks.wan1.check]\ntargets = ["192.0.2.1"]\n'


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param('interval = "200ms"\ntimeout = "300ms"\n',
                     ["uplinks.wan1.check.timeout: 300ms is longer than interval 200ms"], id="interval-under-timeout"),
        pytest.param('interval = "100ms"\n', ["uplinks.wan1.check.timeout: 1s is longer than interval 100ms"],
                     id="interval-under-default-timeout"),
        pytest.param('interval = "-1s"\n', ["uplinks.wan1.check.interval: -1s must be greater than 0"],
                     id="interval-negative"),
        pytest.param('interval = "0s"\n', ["uplinks.wan1.check.interval: 0s must be greater than 0"],
                     id="interval-zero"),
        pytest.param('timeout = "0ms"\n', ["uplinks.wan1.check.timeout: 0ms must be greater than 0"],
                     id="timeout-zero"),
        pytest.param("down_after = -1\n", ["uplinks.wan1.check.down_after: -1 is less than 1"],
                     id="down_after-negative"),
        pytest.param("up_after = 0\n", ["uplinks.wan1.check.up_after: 0 is less than 1"], id="up_after-zero"),
        pytest.param("up_after = -3\n", ["uplinks.wan1.check.up_after: -3 is less than 1"], id="up_after-negative"),
        pytest.param("down_after = 0\nup_after = 0\n",
                     ["uplinks.wan1.check.down_after: 0 is less than 1",
                      "uplinks.wan1.check.up_after: 0 is less than 1"], id="both-zero"),
        pytest.param("down_after = 2.5\n", ["uplinks.wan1.check.down_after: expected an integer, got float"],
                     id="down_after-float"),
        pytest.param("up_after = true\n", ["uplinks.wan1.check.up_after: expected an integer, got boolean"],
                     id="up_after-bool"),
        pytest.param('method = "tcp"\n', ['uplinks.wan1.check.method: expected "icmp", "tcp:PORT", "http://HOST/PATH", "https://HOST/PATH" or "dns:NAME", got "tcp"'],
                     id="method-tcp-without-port"),
        pytest.param('method = "tcp:ssh"\n',
                     ['uplinks.wan1.check.method: expected "icmp", "tcp:PORT", "http://HOST/PATH", "https://HOST/PATH" or "dns:NAME", got "tcp:ssh"'],
                     id="method-port-name"),
        pytest.param('method = "ICMP"\n', ['uplinks.wan1.check.method: expected "icmp", "tcp:PORT", "http://HOST/PATH", "https://HOST/PATH" or "dns:NAME", got "ICMP"'],
                     id="method-case"),
        pytest.param("method = 22\n", ["uplinks.wan1.check.method: expected a string, got integer"],
                     id="method-integer"),
        pytest.param('success = "most"\n', ['uplinks.wan1.check.success: expected "any" or "all", got "most"'],
                     id="success-unknown"),
        pytest.param('interval = "2s"\ntimeout = "3s"\nup_after = 0\n',
                     ["uplinks.wan1.check.up_after: 0 is less than 1",
                      "uplinks.wan1.check.timeout: 3s is longer than interval 2s"], id="several-at-once"),
    ],
)
def test_check_config_errors(extra: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse(BASE + extra)
    assert list(info.value.errors) == expected


@pytest.mark.parametrize(
    ("extra", "want"),
    [
        ('interval = "1s"\ntimeout = "1s"\n', {"interval": 1.0, "timeout": 1.0}),  # equal is fine
        ('interval = "200ms"\ntimeout = "200ms"\ndown_after = 3\nup_after = 2\nsuccess = "all"\n',
         {"interval": 0.2, "timeout": 0.2, "down_after": 3, "up_after": 2, "success": "all"}),
        ('method = "tcp:443"\n', {"method": "tcp", "port": 443}),
        ('method = "icmp"\n', {"method": "icmp", "port": None}),
    ],
)
def test_check_config_accepted(extra: str, want: dict[str, object]) -> None:
    c = parse(BASE + extra).uplinks[0].check
    assert c is not None
    assert {k: getattr(c, k) for k in want} == want


def test_check_command_prints_the_key_path(tmp_path: Path) -> None:
    """``markrouted check`` rejects a bad check with one line per error naming the key path, exit 1."""
    path = tmp_path / "markrouted.toml"
    path.write_text(BASE + 'interval = "200ms"\ntimeout = "1s"\ndown_after = 0\nmethod = "tcp:0"\n')
    proc = subprocess.run([sys.executable, "-m", "markrouted", "-c", str(path), "check"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"{path}: uplinks.wan1.check.down_after: 0 is less than 1",
        f"{path}: uplinks.wan1.check.method: port 0 is out of range 1-65535",
        f"{path}: uplinks.wan1.check.timeout: 1s is longer than interval 200ms",
    ]
