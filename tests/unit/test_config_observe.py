"""[settings] metrics, hooks and hook_timeout: accepted values and the error of each bad one."""

from __future__ import annotations

import pytest
from test_config import errors_of

from markrouted.config import parse


def test_off_by_default() -> None:
    s = parse("").settings
    assert (s.metrics, s.hooks, s.hook_timeout) == (None, None, 10.0)


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9826", ("127.0.0.1", 9826)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:9826", ("::1", 9826)),
    ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
])
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse(f'[settings]\nmetrics = "{text}"\n').settings.metrics == expected


@pytest.mark.parametrize(("value", "error"), [
    ('"localhost:9826"', 'settings.metrics: "localhost" is not an IP address'),
    ('"127.0.0.1"', 'settings.metrics: "127.0.0.1" is not ADDRESS:PORT (for example 127.0.0.1:9826)'),
    ('"127.0.0.1:0"', 'settings.metrics: port "0" is not a number in 1-65535'),
    ('"127.0.0.1:70000"', 'settings.metrics: port "70000" is not a number in 1-65535'),
    ('"127.0.0.1:http"', 'settings.metrics: port "http" is not a number in 1-65535'),
    ('"::1:9826"', 'settings.metrics: "::1:9826": write an IPv6 address in brackets, as [::1]:9826'),
    ("9826", "settings.metrics: expected a string, got integer"),
])
def test_metrics_errors(value: str, error: str) -> None:
    errors = errors_of(f"[settings]\nmetrics = {value}\n")
    assert errors == [error]


def test_hooks() -> None:
    s = parse('[settings]\nhooks = "/etc/markrouted/hooks.d"\nhook_timeout = "2s"\n').settings
    assert (s.hooks, s.hook_timeout) == ("/etc/markrouted/hooks.d", 2.0)
    assert errors_of('[settings]\nhooks = "hooks.d"\n') == ['settings.hooks: "hooks.d" is not an absolute path']
    assert errors_of('[settings]\nhook_timeout = "2h"\n') == ["settings.hook_timeout: 2h is longer than 1h, the maximum"]
