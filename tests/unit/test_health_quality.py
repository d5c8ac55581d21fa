"""Quality over a window, flap damping, the web and DNS probes' parsing, and their config keys."""

from __future__ import annotations

import datetime
import ipaddress
import random
import struct

import pytest

from markrouted.config import Check, ConfigError, parse
from markrouted.health import HOLD_MAX, TargetResult, TargetWindow, UplinkHealth, duration_text
from markrouted.kernel.probe_dns import answer_problem, query
from markrouted.kernel.probe_http import request, status_problem
from markrouted.status import render

T1, T2, T3 = "192.0.2.1", "192.0.2.2", "2001:db8::1"


def quality(targets: tuple[str, ...] = (T1,), **fields: object) -> Check:
    defaults: dict[str, object] = {"interval": 1.0, "timeout": 1.0, "damp_flaps": 0}
    defaults.update(fields)
    return Check(targets=tuple(ipaddress.ip_address(t) for t in targets), **defaults)  # type: ignore[arg-type]


def probe(target: str, rtt: float | None) -> TargetResult:
    """An answer after ``rtt`` seconds, or a loss (None)."""
    if rtt is None:
        return TargetResult(target, False, error="no answer in 1s")
    return TargetResult(target, True, rtt=rtt)


def run(m: UplinkHealth, pattern: str, rtt: float = 0.02, start: float = 0.0) -> list[tuple[float, bool]]:
    """Rounds of one target, '+' answered and '-' lost; the transitions as (time, up)."""
    out = []
    for i, c in enumerate(pattern):
        now = start + i
        if m.round((probe(T1, rtt if c == "+" else None),), now):
            out.append((now, m.up))
    return out


# ------------------------------------------------------------------ loss


def test_loss_above_max_goes_down_before_the_window_is_full() -> None:
    """3 lost of a window of 10 is 30 % > 20 % whatever the 7 rounds still missing say."""
    m = UplinkHealth(quality(window=10, max_loss=0.2, down_after=100))
    assert run(m, "+-+-+-") == [(0.0, True), (5.0, False)]
    assert m.reason == f"health check: {T1}: loss 50 % > 20 %"


def test_evenly_spread_loss_under_max_never_goes_down() -> None:
    m = UplinkHealth(quality(window=20, max_loss=0.2))
    assert run(m, ("+" * 6 + "-" + "+" * 6 + "-" + "+" * 5 + "-") * 30) == [(0.0, True)]  # 15 %
    assert m.document()["targets"][T1]["loss"] == 0.15  # type: ignore[index]


def test_recovery_waits_for_the_recovery_threshold() -> None:
    """Down at 25 % (max 20 %): back only at or below recover_loss, 10 % by default."""
    m = UplinkHealth(quality(window=20, max_loss=0.2, up_after=1, down_after=100))
    run(m, "+" * 20)
    changes = run(m, "---+--", start=20)  # 4 lost in 20 = 20 %: not yet; the fifth: 25 %
    assert changes == [(25.0, False)]
    assert m.reason == f"health check: {T1}: loss 25 % > 20 %"
    # good rounds push the losses out: at 3/20 = 15 % it is still down, at 2/20 = 10 % it comes back
    changes = run(m, "+" * 30, start=26)
    assert changes == [(42.0, True)]  # the window 23..42 holds the losses of rounds 24 and 25 only
    assert m.targets[T1].loss <= 0.1


def test_status_says_why_a_down_uplink_is_not_back() -> None:
    m = UplinkHealth(quality(window=10, max_loss=0.4, up_after=1))
    run(m, "+" * 10 + "-----")
    run(m, "+", start=20)
    assert m.reason == f"health check: not recovered: {T1}: loss 50 % > 20 %"


def test_random_five_percent_loss_with_two_targets_does_not_flap() -> None:
    rng = random.Random(12)
    m = UplinkHealth(quality((T1, T2), window=10, max_loss=0.3, max_rtt=0.3))
    flips = 0
    for i in range(3000):
        rounds = tuple(probe(t, None if rng.random() < 0.05 else 0.02 + rng.uniform(-0.02, 0.02)) for t in (T1, T2))
        flips += m.round(rounds, float(i))
    assert flips == 1  # the first verdict


# ------------------------------------------------------------------ RTT


@pytest.mark.parametrize("window", [1, 3, 10, 1000])
def test_running_counts_match_the_window(window: int) -> None:
    rng = random.Random(window)
    w = TargetWindow(window)
    for _ in range(5000):
        w.add(None if rng.random() < 0.3 else rng.uniform(0.001, 2.0))
        kept = list(w.samples)[-window:]
        answered = [s for s in kept if s is not None]
        assert len(w.samples) == len(kept) and w.lost == kept.count(None)
        if answered:
            assert w.mean == pytest.approx(sum(answered) / len(answered), rel=1e-9)
        else:
            assert w.mean is None


def test_mean_rtt_above_max_goes_down_and_below_recovery_comes_back() -> None:
    m = UplinkHealth(quality(window=6, max_rtt=0.3, up_after=1))
    assert run(m, "+" * 6, rtt=0.02) == [(0.0, True)]
    changes = run(m, "+" * 3, rtt=0.6, start=6)
    assert changes == [(8.0, False)]  # (3 x 20 + 3 x 600) / 6 = 310 ms
    assert m.reason == f"health check: {T1}: rtt 310 ms > 300 ms"
    run(m, "+" * 3, rtt=0.6, start=9)
    assert m.reason == f"health check: not recovered: {T1}: rtt 600 ms > 150 ms"
    changes = run(m, "+" * 6, rtt=0.02, start=12)
    assert changes == [(16.0, True)]  # (1 x 600 + 5 x 20) / 6 = 117 ms <= 150 ms; at 16 it is 213 ms
    assert m.reason == "health check: 1/1 targets answer; loss 0 %, rtt 117 ms"


def test_rtt_is_judged_once_half_the_window_answered() -> None:
    m = UplinkHealth(quality(window=10, max_rtt=0.3))
    assert run(m, "+", rtt=0.9) == [(0.0, True)]  # one slow answer is not a verdict
    assert run(m, "++++", rtt=0.9, start=1) == [(4.0, False)]


def test_min_targets_counts_healthy_targets() -> None:
    m = UplinkHealth(quality((T1, T2, T3), min_targets=2, window=4, max_loss=0.25))
    ok = lambda: probe(T1, 0.01)  # noqa: E731
    assert m.round((ok(), probe(T2, 0.01), probe(T3, 0.01)), 0.0)
    for i in range(1, 4):  # T3 goes bad: 2 of 3 still healthy
        assert not m.round((ok(), probe(T2, 0.01), probe(T3, None)), float(i))
    assert m.up
    assert m.round((ok(), probe(T2, None), probe(T3, None)), 4.0) is False  # T2: 1/4 = 25 %, not above
    assert m.round((ok(), probe(T2, None), probe(T3, None)), 5.0) is True  # T2: 2/4
    assert not m.up and m.reason == f"health check: {T2}: loss 50 % > 25 %; {T3}: loss 100 % > 25 %"


def test_success_all_is_min_targets_all() -> None:
    c = quality((T1, T2), success="all")
    assert c.needed == 2
    assert quality((T1, T2)).needed == 1


def test_figures_in_the_document() -> None:
    m = UplinkHealth(quality(window=4))
    for i, rtt in enumerate((0.010, 0.030, None, 0.020)):
        m.round((probe(T1, rtt),), float(i))
    t = m.document()["targets"][T1]  # type: ignore[index]
    assert t == {"ok": True, "rtt_ms": 20.0, "error": None, "probes": 4, "loss": 0.25, "rtt_mean_ms": 20.0,
                 "rtt_min_ms": 10.0, "rtt_max_ms": 30.0, "jitter_ms": 15.0}
    text = render({"uplinks": {}, "health": {"wan1": {**m.document(), "since": 0}}})
    assert (f"    {T1}: 20.0 ms; over 4 probes: loss 25 %, rtt 20.0 ms (min 10.0, max 30.0), jitter 15.0 ms"
            in text.splitlines()), text


# ------------------------------------------------------------------ damping


def damped(**fields: object) -> UplinkHealth:
    return UplinkHealth(quality(down_after=1, up_after=1, damp_flaps=3, damp_within=600.0, damp_hold=300.0,
                                **fields))


def flap(m: UplinkHealth, at: float) -> None:
    m.round((probe(T1, 0.01),), at)
    m.round((probe(T1, None),), at + 1)


def test_third_flap_within_holds_it_down() -> None:
    m = damped()
    flap(m, 0)
    flap(m, 10)
    assert not m.held_until
    m.round((probe(T1, 0.01),), 20)
    assert m.up
    assert m.round((probe(T1, None),), 21)
    assert m.hold_started and m.held_until == 321
    until = datetime.datetime.fromtimestamp(321).strftime("%H:%M:%S")
    assert m.reason == (f"health check: held down: 3 flaps in 10m, until {until} "
                        f"(1 failed rounds ({T1}: no answer in 1s))")
    for t in range(22, 321):  # the probes answer again: held all the same
        assert not m.round((probe(T1, 0.01),), float(t))
    assert m.reason.startswith("health check: held down")
    assert m.round((probe(T1, 0.01),), 321.0) and m.up
    assert m.document()["held_until"] is None


def test_each_further_flap_doubles_the_hold_up_to_an_hour() -> None:
    m = damped()
    flap(m, 0)
    flap(m, 1)
    holds = []
    t = 2.0
    for _ in range(6):
        m.round((probe(T1, 0.01),), t)
        m.round((probe(T1, None),), t + 1)
        holds.append(m.held_until - (t + 1))
        t = m.held_until
        m.round((probe(T1, 0.01),), t)
        assert m.up
        t += 1
    # the first hold at flap 3; the downs stay within damp_within only while holds are short
    assert holds[:2] == [300.0, 600.0]
    assert max(holds) <= HOLD_MAX


def test_calm_within_resets_the_doubling() -> None:
    m = damped()
    for t in (0.0, 5.0):
        flap(m, t)
    m.round((probe(T1, 0.01),), 10.0)
    m.round((probe(T1, None),), 11.0)
    assert m.held_until == 311.0 and m.holds == 1
    m.round((probe(T1, 0.01),), 311.0)
    flap(m, 5000.0)  # long after: the first down of a new count
    assert m.holds == 0 and not m.held_until


def test_damp_flaps_zero_turns_it_off() -> None:
    m = UplinkHealth(quality(down_after=1, up_after=1))
    for t in range(0, 40, 2):
        flap(m, float(t))
    assert not m.held_until and len(m.downs) == 0


def test_link_loss_counts_as_a_flap() -> None:
    m = damped()
    for t in (0.0, 10.0, 20.0):
        m.round((probe(T1, 0.01),), t)
        m.link_lost(t + 1, "carrier lost")
        m.link_back()
    assert m.held_until == 321.0 and m.reason.startswith("health check: held down: 3 flaps in 10m")


def test_duration_text() -> None:
    assert [duration_text(s) for s in (600, 300, 3600, 90, 3, 0.5)] == ["10m", "5m", "1h", "90s", "3s", "500ms"]


# ------------------------------------------------------------------ probes' wire formats


def test_dns_query_and_answers() -> None:
    q = query("probe.example", 0x1234)
    assert q[:12] == struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    assert q[12:] == b"\x05probe\x07example\x00\x00\x01\x00\x01"
    answer = struct.pack("!HHHHHH", 0x1234, 0x8180, 1, 1, 0, 0)
    assert answer_problem(answer, 0x1234) is None
    assert answer_problem(answer, 0x4321) == ""  # not ours: wait on
    assert answer_problem(q, 0x1234) == ""  # a query, not an answer
    assert answer_problem(struct.pack("!HHHHHH", 7, 0x8183, 1, 0, 0, 0), 7) == "DNS NXDOMAIN"
    assert answer_problem(struct.pack("!HHHHHH", 7, 0x8182, 1, 0, 0, 0), 7) == "DNS SERVFAIL"
    assert answer_problem(struct.pack("!HHHHHH", 7, 0x818B, 1, 0, 0, 0), 7) == "DNS rcode 11"
    assert answer_problem(b"\x00", 7) == ""


@pytest.mark.parametrize(("line", "problem"), [
    (b"HTTP/1.1 200 OK\r", None),
    (b"HTTP/1.0 204 No Content\r", None),
    (b"HTTP/1.1 302 Found\r", None),
    (b"HTTP/1.1 404 Not Found\r", "HTTP 404"),
    (b"HTTP/1.1 500 Internal Server Error\r", "HTTP 500"),
    (b"HTTP/1.1 503\r", "HTTP 503"),
    (b"SSH-2.0-OpenSSH_9.2\r", "not an HTTP answer"),
    (b"", "connection closed without an answer"),
])
def test_http_status_line(line: bytes, problem: str | None) -> None:
    assert status_problem(line) == problem


def test_http_request() -> None:
    assert request("probe.example", 80, "/health?x=1", False).startswith(
        b"GET /health?x=1 HTTP/1.1\r\nHost: probe.example\r\n")
    assert b"\r\nHost: [2001:db8::1]:8443\r\n" in request("[2001:db8::1]", 8443, "/", True)
    assert request("a", 443, "/", True).endswith(b"Connection: close\r\n\r\n")


# ------------------------------------------------------------------ config

BASE = '[uplinks.wan1]\ninterface = "eth0"\ntable = 101\nmark = 1\n[uplinks.wan1.check]\n'
TARGETS = 'targets = ["192.0.2.1", "192.0.2.2"]\n'


def parsed(extra: str) -> Check:
    config = parse(BASE + TARGETS + extra)
    check = config.uplinks[0].check
    assert check is not None
    return check


def test_old_config_keeps_its_meaning() -> None:
    c = parsed("")
    assert (c.window, c.max_loss, c.max_rtt, c.min_targets, c.needed) == (10, None, None, 1, 1)
    assert (c.damp_flaps, c.damp_within, c.damp_hold) == (3, 600.0, 300.0)
    assert parsed('success = "all"\n').needed == 2


def test_quality_keys() -> None:
    c = parsed('window = 20\nmax_loss = "25%"\nmax_rtt = "300ms"\nrecover_loss = "5%"\nmin_targets = 2\n'
               'damp_flaps = 4\ndamp_within = "1m"\ndamp_hold = "3s"\n')
    assert (c.window, c.max_loss, c.max_rtt, c.recover_loss, c.min_targets) == (20, 0.25, 0.3, 0.05, 2)
    assert (c.recover_loss_or_default, c.recover_rtt_or_default) == (0.05, 0.15)
    assert (c.damp_flaps, c.damp_within, c.damp_hold) == (4, 60.0, 3.0)
    assert parsed('damp_flaps = 0\n').damp_flaps == 0
    assert parsed('max_loss = "100%"\n').max_loss == 1.0
    assert parsed('max_loss = "0%"\n').max_loss == 0.0
    assert parsed('max_loss = "2.5 %"\n').max_loss == 0.025


@pytest.mark.parametrize(("method", "want"), [
    ("http://probe.example/health", ("http", 80, "probe.example", "/health")),
    ("https://probe.example", ("https", 443, "probe.example", "/")),
    ("http://probe.example:8080/a?b=c", ("http", 8080, "probe.example", "/a?b=c")),
    ("https://[2001:db8::1]:8443/", ("https", 8443, "[2001:db8::1]", "/")),
    ("dns:example.com", ("dns", 53, "example.com", "/")),
    ("dns:example.com.", ("dns", 53, "example.com", "/")),
])
def test_methods(method: str, want: tuple[object, ...]) -> None:
    c = parsed(f'method = "{method}"\n')
    assert (c.method, c.port, c.url_host, c.url_path) == want


def test_tls_keys_elsewhere_are_warned_about() -> None:
    config = parse(BASE + TARGETS + 'tls_verify = false\n')
    assert config.warnings == (f'{P}.tls_verify: has no effect: only an "https://" method uses it',)
    config = parse(BASE + TARGETS + 'method = "https://a.example/"\ntls_verify = false\ntls_ca = "/ca.pem"\n')
    assert config.warnings == (f"{P}.tls_ca: has no effect with tls_verify = false",)
    assert parsed('min_targets = 2\nsuccess = "any"\n').needed == 2  # "any" is the default: no conflict


def test_tls_keys() -> None:
    c = parsed('method = "https://a.example/"\ntls_verify = false\n')
    assert c.tls_verify is False
    c = parsed('method = "https://a.example/"\ntls_ca = "/etc/markrouted/ca.pem"\n')
    assert (c.tls_verify, c.tls_ca) == (True, "/etc/markrouted/ca.pem")


P = "uplinks.wan1.check"


@pytest.mark.parametrize(("extra", "expected"), [
    pytest.param('max_loss = "120%"\n', [f"{P}.max_loss: 120% is outside 0-100 %"], id="loss-over-100"),
    pytest.param('max_loss = "-5%"\n', [f'{P}.max_loss: expected a percentage such as "20%", got "-5%"'],
                 id="loss-negative"),
    pytest.param("max_loss = 0.2\n", [f"{P}.max_loss: expected a string, got float"], id="loss-number"),
    pytest.param('max_loss = "20%"\nrecover_loss = "30%"\n',
                 [f"{P}.recover_loss: 30 % is worse than max_loss 20 %: an uplink would come back while still "
                  "too bad to stay up"], id="recover-loss-worse"),
    pytest.param('max_rtt = "300ms"\nrecover_rtt = "1s"\n',
                 [f"{P}.recover_rtt: 1000 ms is worse than max_rtt 300 ms: an uplink would come back while still "
                  "too bad to stay up"], id="recover-rtt-worse"),
    pytest.param('recover_rtt = "100ms"\n',
                 [f"{P}.recover_rtt: needs max_rtt (it is the threshold to come back under)"], id="recover-alone"),
    pytest.param("window = 0\n", [f"{P}.window: 0 is less than 1"], id="window-zero"),
    pytest.param("window = 1001\n", [f"{P}.window: 1001 is more than 1000, the maximum"], id="window-big"),
    pytest.param("min_targets = 3\n", [f"{P}.min_targets: 3 is more than the 2 targets listed"],
                 id="min-targets-above"),
    pytest.param('min_targets = 1\nsuccess = "all"\n',
                 [f'{P}.min_targets: give either min_targets or success = "all", not both (success = "all" means '
                  "min_targets = the number of targets)"], id="min-targets-and-success"),
    pytest.param('method = "http://user:pw@probe.example/"\n',
                 [f'{P}.method: "http://user:pw@probe.example/": a URL with a user or password is not supported'],
                 id="url-userinfo"),
    pytest.param('method = "ftp://probe.example/"\n',
                 [f'{P}.method: expected "icmp", "tcp:PORT", "http://HOST/PATH", "https://HOST/PATH" or '
                  '"dns:NAME", got "ftp://probe.example/"'], id="url-scheme"),
    pytest.param('method = "http:///x"\n',
                 [f'{P}.method: "http:///x": expected http://HOST[:PORT]/PATH with a host name or address'],
                 id="url-no-host"),
    pytest.param('method = "http://a.example:0/"\n',
                 [f'{P}.method: "http://a.example:0/": port "0" is out of range 1-65535'], id="url-port"),
    pytest.param('method = "http://a.example/a b"\n',
                 [f'{P}.method: "http://a.example/a b": the path must be printable ASCII without spaces '
                  "(percent-encode the rest)"], id="url-space"),
    pytest.param('method = "dns:"\n', [f'{P}.method: "dns:" needs a name (as in "dns:example.com")'],
                 id="dns-no-name"),
    pytest.param('method = "dns:a..b"\n',
                 [f'{P}.method: "dns:" needs a valid DNS name, got "a..b" (as in "dns:example.com")'],
                 id="dns-bad-name"),
    pytest.param('method = "https://a.example/"\ntls_ca = "ca.pem"\n',
                 [f'{P}.tls_ca: expected an absolute path to a PEM file of CA certificates, got "ca.pem"'],
                 id="tls-ca-relative"),
    pytest.param('damp_hold = "500ms"\n', [f"{P}.damp_hold: 500ms is shorter than 1s, the minimum"],
                 id="damp-hold-short"),
    pytest.param('damp_hold = "2h"\n', [f"{P}.damp_hold: 2h is longer than 1h, the maximum"], id="damp-hold-long"),
    pytest.param("damp_flaps = -1\n", [f"{P}.damp_flaps: -1 is less than 0"], id="damp-flaps-negative"),
    pytest.param('max_rtt = "0.5us"\n', [f'{P}.max_rtt: expected a duration with a unit such as "2s", got "0.5us"'],
                 id="rtt-unit"),
])
def test_bad_input_names_the_key_path(extra: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse(BASE + TARGETS + extra)
    assert list(info.value.errors) == expected
