"""``markrouted check`` against generated configs: never a traceback, never a hang.

Hypothesis generates whole configs (plausible values mixed with hostile ones) and
mutations of the documented example, with a fixed seed and a fixed number of
examples so that the run is the same every time and fits in CI. For each one:

* ``check`` (the CLI's main, in this process) exits 0 or 1, with every line it
  prints one printable line, and no exception escapes;
* it finishes within HANG_SECONDS (an alarm interrupts a hang);
* a config it accepts derives (``markrouted.derive.derive`` with a world in
  which every named interface and cgroup exists) and renders (the nft table's
  text and the JSON sent to the kernel) without error.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import tempfile
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from conftest import missing  # the suite's root conftest
from markrouted.config import Config, load
from markrouted.derive import derive
from markrouted.model import AF_INET, AF_INET6, Address, Health, Link, MainDefault, Observed

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    HAVE_HYPOTHESIS = False
else:
    HAVE_HYPOTHESIS = True

HANG_SECONDS = 10
EXAMPLES = 250


def plausible_world(config: Config) -> Observed:
    """A kernel in which every interface and cgroup the config names exists and is up."""
    names: list[str] = [u.interface for u in config.uplinks]
    names += [p.iif for p in config.policies if p.iif and p.iif not in names]
    links = [Link(1, "lo", True, True)] + [Link(10 + i, name, True, True) for i, name in enumerate(names)]
    addresses: list[Address] = []
    defaults: list[MainDefault] = []
    for i, uplink in enumerate(config.uplinks):
        index = 10 + i
        addresses.append(Address(index, AF_INET, f"198.18.{i}.2", 24))
        addresses.append(Address(index, AF_INET6, f"2001:db8:{i:x}::2", 64))
        addresses.append(Address(index, AF_INET6, f"fe80::{i:x}:2", 64, link_local=True))
        defaults.append(MainDefault(AF_INET, index, f"198.18.{i}.1", 100 + i))
        defaults.append(MainDefault(AF_INET6, index, f"fe80::{i:x}:1", 1024))
    cgroups = {p.cgroup: 100 + p.index for p in config.policies if p.cgroup}
    sysctls = {"net/ipv4/conf/all/src_valid_mark": "0", "net/ipv4/conf/all/rp_filter": "1"}
    sysctls.update({f"net/ipv4/conf/{u.interface}/rp_filter": "1" for u in config.uplinks})
    return Observed(links=tuple(links), addresses=tuple(addresses), defaults=tuple(defaults), sysctls=sysctls,
                    cgroup_ids=cgroups)


class Hang(Exception):
    pass


@contextlib.contextmanager
def hang_guard(seconds: int = HANG_SECONDS) -> Iterator[None]:
    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_config(config_text: str, directory: str) -> None:
    """Run ``check`` on the text, then derive and render whatever it accepts."""
    from markrouted.cli import main

    path = os.path.join(directory, "markrouted.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(config_text)
    out, err = io.StringIO(), io.StringIO()
    with hang_guard(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["-c", path, "check"])
        except SystemExit as exc:
            rc = exc.code  # type: ignore[assignment]
    assert rc in (0, 1), (rc, err.getvalue())
    printed = out.getvalue().splitlines() + err.getvalue().splitlines()
    assert printed
    for line in printed:
        assert line.isprintable() and len(line) < 400, line
    if rc == 1:
        assert out.getvalue() == ""
        return
    assert re.fullmatch(rf"{re.escape(path)}: valid \(\d+ uplinks, \d+ policies\)\n", out.getvalue())
    with hang_guard():
        config = load(path)
        world = plausible_world(config)
        for health in ({}, {u.name: Health(False, "check failed") for u in config.uplinks}):
            state = derive(config, world, health)
            if state.nft is None:  # nothing to install without uplinks
                assert not config.uplinks
                continue
            state.nft.text()
            for chain in state.nft.chains:
                for rule in chain.rules:
                    json.dumps(rule.expr)
                    assert len(rule.comment.encode()) <= 128 and '"' not in rule.comment


# ------------------------------------------------------------------ a tiny TOML writer


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**4000 else hex(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def toml_string(text: str) -> str:
    """A TOML basic string; anything not plainly printable as a \\U escape."""
    body = "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in text)
    return f'"{body}"'


def toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in data.items())


#: A valid config in which every key is used, and every policy is installed.
FULL: dict[str, Any] = {
    "settings": {"mark_mask": 0x00FF0000, "rule_priority": 10000, "resync": "30s", "keep_main_routes": True,
                 "on_stop": "flush"},
    "uplinks": {
        "wan1": {"interface": "eth0", "table": 101, "mark": 1, "gateway": "auto", "gateway6": "auto",
                 "masquerade": True,
                 "check": {"targets": ["192.0.2.1", "2001:db8::1"], "method": "icmp", "interval": "1s",
                           "timeout": "500ms", "down_after": 3, "up_after": 2, "success": "any"}},
        "wan2": {"interface": "eth1", "table": 102, "mark": 2, "gateway": "203.0.113.1",
                 "gateway6": "2001:db8:2::1", "check": {"targets": ["198.18.0.10"], "method": "tcp:443"}},
    },
    "policy": [
        {"name": "ssh", "proto": "tcp", "dport": [22, "2200-2299"], "sport": ["1024-65535"],
         "daddr": ["0.0.0.0/0", "::/0"], "saddr": ["192.0.2.0/24"], "iif": "lan0", "family": "any",
         "uplinks": ["wan2", "wan1"], "fallback": "main"},
        {"name": "backup", "uid": [1000, "2000-2999"], "gid": 100, "cgroup": "system.slice/backup.service",
         "uplinks": ["wan2"], "fallback": "drop"},
        {"name": "downloads", "proto": "udp", "dport": 443, "balance": {"wan1": 3, "wan2": 1}},
    ],
}


def leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The paths to every scalar in ``value``."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in leaves(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in leaves(v, (*path, i))]
    return [path]


def replaced(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """FULL with the scalar at ``path`` replaced by ``value``."""
    data: dict[str, Any] = json.loads(json.dumps(FULL))
    parent: Any = data
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return data


def at(path: tuple[Any, ...]) -> Any:
    value: Any = FULL
    for step in path:
        value = value[step]
    return value


FULL_LEAVES = leaves(FULL)
STRING_LEAVES = [p for p in FULL_LEAVES if isinstance(at(p), str)]
#: Characters with a meaning to nft, the kernel, TOML, a shell or a terminal.
NASTY = ['"', "'", "\\", "\n", "\r", "\x00", "\x1b", "\x7f", "\x9b", "\u202e", "\u2028", "\u00a0", "*", "%",
         "/", ":", " ", "\t", "{", "#", ";", "$", "é", "\U0001f600"]


def path_id(path: tuple[Any, ...]) -> str:
    return ".".join(str(step) for step in path)


def test_the_full_config_is_valid(workdir: str) -> None:
    from markrouted.config import parse

    config = parse(toml_document(FULL))
    assert not config.warnings
    state = derive(config, plausible_world(config))
    assert state.nft is not None
    rendered = state.nft.text()
    for name in ("ssh", "backup", "downloads"):
        assert f'comment "policy {name} #' in rendered
    assert 'iifname "lan0"' in rendered and '"system.slice/backup.service"' in rendered


@pytest.mark.parametrize("path", STRING_LEAVES, ids=path_id)
def test_a_nasty_character_in_any_string(path: tuple[Any, ...], workdir: str) -> None:
    """Each character that means something somewhere, at the start, middle and end of every string."""
    old = at(path)
    for char in NASTY:
        for i in sorted({0, len(old) // 2, len(old)}):
            check_config(toml_document(replaced(path, old[:i] + char + old[i:])), workdir)


if not HAVE_HYPOTHESIS:

    def test_hypothesis_is_installed() -> None:
        missing("needs python3-hypothesis (scripts/install-deps --test installs it)")

else:
    FUZZ = settings(
        derandomize=True,
        database=None,
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )

    EVIL_TEXT = [
        "", " ", "x\ny", "\u001b[31m", "\u009b", "\u202e", "a\u0000b", '"', "\\", "'", "*", "%d", "eth*", "eth%d",
        "x" * 300, "..", ".", "a/b", "all", "default", "é", "\u00a0", "\U0001f600",
    ]
    weird_text = st.one_of(st.sampled_from(EVIL_TEXT), st.text(max_size=24))
    big_ints = st.sampled_from([0, -1, 1, 255, 256, 999, 1000, 1001, 65535, 65536, 2**31, 2**32 - 2, 2**32 - 1,
                                2**32, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, 2**1000])
    # integers of thousands of digits: printing one in full is an error in Python (and
    # in Hypothesis's report of a failing example, which then fails differently, but fails)
    huge_ints = st.integers(14000, 15000).map(lambda bits: 2**bits - 1)
    any_int = st.one_of(st.integers(-3, 300), big_ints, st.integers(), huge_ints)
    scalar = st.one_of(st.booleans(), any_int, st.floats(allow_nan=True), weird_text)
    anything = st.recursive(
        scalar,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(weird_text, inner, max_size=3)),
        max_leaves=6,
    )

    #: How often, in percent, a value is bad: one rate per example, shared by every draw in it,
    #: so that some examples are entirely plausible (and must be accepted, derived and rendered)
    #: and others broken in one place or in many.
    badness = st.shared(st.sampled_from([0, 0, 0, 2, 5, 20, 60]), key="badness")

    def mostly(good: Any, bad: Any = anything) -> Any:
        """A value of the good kind, or (at the example's bad rate) a bad one: by default anything at all."""
        return st.tuples(badness, st.integers(0, 99)).flatmap(lambda rate: bad if rate[1] < rate[0] else good)

    bad_ifnames = st.one_of(weird_text, st.sampled_from(["a" * 16, "eth 0", "eth:0", "eth/0", "eth*", "all"]))
    good_addresses = ["192.0.2.1", "198.18.0.10", "203.0.113.5", "2001:db8::1", "2001:db8::53"]
    # an IPv6 zone is any text after '%', and the address parser accepts it
    zoned = st.builds(lambda zone, tail: f"fe80::1%{zone}{tail}", weird_text, st.sampled_from(["", "/64"]))
    bad_addresses = st.one_of(weird_text, zoned, st.sampled_from([
        "0.0.0.0", "0.1.2.3", "::", "127.0.0.1", "::1", "224.0.0.1", "ff02::1", "255.255.255.255", "169.254.1.1",
        "fe80::1", "::ffff:192.0.2.1", "fe80::1%eth0", "192.0.2.300", "router",
    ]))
    networks = mostly(
        st.sampled_from(["0.0.0.0/0", "::/0", "10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]),
        st.one_of(weird_text, zoned,
                  st.sampled_from(["10.0.0.1/8", "192.0.2.0/33", "fe80::1%eth0/64", "1.2.3.4/" + "9" * 30])),
    )

    def durations(good: list[str]) -> Any:
        return mostly(st.sampled_from(good), st.one_of(
            anything,
            st.sampled_from(["49ms", "9ms", "0s", "-1s", "25h", "61m", "1e3s", "2", "soon", "9" * 40 + "s"]),
            st.from_regex(r"[0-9]{1,6}(\.[0-9]{0,3})?(ms|s|m|h)", fullmatch=True),
        ))

    ports = mostly(
        st.one_of(st.integers(1, 65535), st.builds(lambda a, b: f"{min(a, b)}-{max(a, b)}",
                                                   st.integers(1, 65535), st.integers(1, 65535))),
        st.one_of(anything, st.sampled_from(["0", "65536", "9" * 40, "1-" + "9" * 40, "5-4", "-1", "1-2-3"])),
    )
    ids = mostly(st.one_of(st.integers(0, 2**32 - 2), st.sampled_from(["1000-1999", "0"])),
                 st.one_of(any_int, st.sampled_from(["4294967295", "9" * 30, "2-1"])))
    cgroups = mostly(
        st.sampled_from(["system.slice/backup.service", "user.slice", "a/b/c", "/x/", "sys\\x2dtem.slice",
                         "app name.scope", "système.slice"]),
        st.one_of(weird_text, st.sampled_from(["a//b", "../x", "/".join(["a"] * 256), "b" * 256, 'a"b'])),
    )
    uplink_names = mostly(st.sampled_from(["wan1", "wan2", "wan3", "lte", "w_4-x"]),
                          st.one_of(weird_text, st.sampled_from(["bad name", "x" * 40])))

    @st.composite
    def optional_keys(draw: Any, keys: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {}
        rate = draw(badness)
        for key, strategy in keys.items():
            if key in required and draw(st.integers(0, 199)) >= rate or draw(st.integers(0, 3)) == 0:
                out[key] = draw(strategy)
        if draw(st.integers(0, 199)) < rate:
            out[draw(weird_text)] = draw(anything)
        return out

    CHECK_KEYS = {
        "targets": mostly(st.lists(st.sampled_from(good_addresses), min_size=1, max_size=4, unique=True),
                          st.one_of(anything, st.lists(st.one_of(bad_addresses, st.sampled_from(good_addresses)),
                                                       max_size=20))),
        "method": mostly(st.sampled_from(["icmp", "tcp:443", "tcp:1", "tcp:65535"]),
                         st.one_of(anything, st.sampled_from(["tcp:0", "tcp:65536", "tcp:" + "9" * 30, "udp"]))),
        "interval": durations(["1s", "2s", "1h", "1m"]),
        "timeout": durations(["10ms", "50ms", "250ms", ".5s", "1s"]),
        "down_after": mostly(st.integers(1, 1000), st.one_of(st.sampled_from([0, -1, 1001]), any_int)),
        "up_after": mostly(st.integers(1, 1000), st.one_of(st.sampled_from([0, -1, 1001]), any_int)),
        "success": mostly(st.sampled_from(["any", "all"]), st.one_of(anything, st.just("some"))),
    }

    @st.composite
    def uplinks(draw: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, name in enumerate(draw(st.lists(uplink_names, min_size=1, max_size=4, unique=True))):
            keys = {
                "interface": mostly(st.sampled_from([f"eth{i}", f"wan{i}.100", f"ppp{i}", f"w-{i}_x"]), bad_ifnames),
                "table": mostly(st.sampled_from([100 + i, 2**32 - 1 - i]), st.one_of(any_int, st.just(254))),
                "mark": mostly(st.just(1 + i), any_int),
                "gateway": mostly(st.sampled_from(["auto", "none", "192.0.2.1", "203.0.113.1"]),
                                  st.one_of(bad_addresses, st.just("2001:db8::1"))),
                "gateway6": mostly(st.sampled_from(["auto", "none", "fe80::1", "2001:db8::1"]),
                                   st.one_of(bad_addresses, st.just("192.0.2.1"))),
                "masquerade": mostly(st.booleans()),
                "check": mostly(optional_keys(CHECK_KEYS, ("targets",))),
            }
            out[name] = draw(optional_keys(keys, ("interface", "table", "mark")))
        return out

    @st.composite
    def configs(draw: Any) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if draw(st.booleans()):
            data["settings"] = draw(optional_keys({
                "mark_mask": mostly(st.sampled_from([0x00FF0000, 0xFF00, 0xFFFFFFFF, 0xF0]),
                                    st.one_of(any_int, st.sampled_from([0, 0x0F0F]))),
                "rule_priority": mostly(st.sampled_from([10000, 1, 33000, 2**32 - 1000]), any_int),
                "resync": durations(["1s", "30s", "5m", "24h"]),
                "keep_main_routes": mostly(st.booleans()),
                "on_stop": mostly(st.sampled_from(["flush", "keep"]), st.one_of(anything, st.just("halt"))),
            }))
        data["uplinks"] = draw(mostly(uplinks()))
        names = list(data["uplinks"]) if isinstance(data["uplinks"], dict) else []
        targets = mostly(st.sampled_from(names), st.one_of(weird_text, st.just("wan9"))) if names else weird_text
        policy_keys = {
            "name": mostly(st.sampled_from(["ssh", "web", "a.b:c-d_e", "x" * 64]), weird_text),  # see below
            "proto": mostly(st.sampled_from(["tcp", "udp", "sctp", "udplite", 6, 17]),
                            st.one_of(anything, st.sampled_from(["icmp", "icmpv6", "gre", 0, 255, 256, "tpc"]))),
            "dport": mostly(st.one_of(ports, st.lists(ports, min_size=1, max_size=3))),
            "sport": mostly(st.lists(ports, min_size=1, max_size=2)),
            "daddr": mostly(st.one_of(networks, st.lists(networks, min_size=1, max_size=3))),
            "saddr": mostly(st.lists(networks, min_size=1, max_size=2)),
            "iif": mostly(st.sampled_from(["lan0", "br-lan", "eth9.20"]), bad_ifnames),
            "uid": mostly(st.lists(ids, min_size=1, max_size=2)),
            "gid": ids,
            "cgroup": cgroups,
            "family": mostly(st.sampled_from(["ipv4", "ipv6", "any"])),
            "uplinks": mostly(st.lists(targets, min_size=1, max_size=3, unique=True)),
            "balance": mostly(st.dictionaries(targets, mostly(st.integers(1, 1000), any_int), min_size=1,
                                              max_size=3)),
            "fallback": mostly(st.sampled_from(["main", "drop"])),
        }
        policies = draw(mostly(st.lists(optional_keys(policy_keys, ("name", "uplinks")), max_size=4)))
        if isinstance(policies, list):
            for i, body in enumerate(policies):
                if isinstance(body, dict) and draw(mostly(st.just(True), st.just(False))):
                    # unique names, and either uplinks or balance, most of the time
                    if body.get("name") in ("ssh", "web", "a.b:c-d_e", "x" * 64):
                        body["name"] = f"{body['name'][:60]}{i}"
                    if "uplinks" in body and "balance" in body:
                        del body[draw(st.sampled_from(["uplinks", "balance"]))]
        data["policy"] = policies
        return data

    @FUZZ
    @given(data=configs())
    def test_check_generated_configs(data: dict[str, Any], workdir: str) -> None:
        check_config(toml_document(data), workdir)

    @st.composite
    def mutated_example(draw: Any) -> str:
        from test_config import DOC_EXAMPLE

        lines = DOC_EXAMPLE.splitlines(keepends=True)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["value", "value", "value", "drop", "copy", "insert", "cut", "swap"]))
            i = draw(st.integers(0, len(lines) - 1))
            if op == "value" and "=" in lines[i]:
                key = lines[i].split("=", 1)[0]
                lines[i] = f"{key}= {toml_value(draw(anything))}\n"
            elif op == "drop" and len(lines) > 1:
                del lines[i]
            elif op == "copy":
                lines.insert(i, lines[i])
            elif op == "insert":
                lines.insert(i, draw(st.one_of(st.sampled_from(["[settings]\n", "[[policy]]\n", "[uplinks.x]\n",
                                                                 "[uplinks.wan1.check]\n", "x = 1\n", "[\n", "=\n",
                                                                 "mark = " + "9" * 5000 + "\n",
                                                                 "x = " + "[" * 2000 + "\n"]),
                                               weird_text)))
            elif op == "cut":
                j = draw(st.integers(0, len(lines[i])))
                lines[i] = lines[i][:j] + lines[i][j + draw(st.integers(1, 8)):]
            elif op == "swap":
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
        return "".join(lines)

    @FUZZ
    @given(config_text=mutated_example())
    def test_check_mutations_of_the_documented_example(config_text: str, workdir: str) -> None:
        check_config(config_text, workdir)

    @pytest.mark.parametrize("path", FULL_LEAVES, ids=path_id)
    @settings(FUZZ, max_examples=12)
    @given(value=st.one_of(anything, big_ints, huge_ints, st.integers(-2, 2**32 + 2)))
    def test_any_value_anywhere_in_a_full_config(path: tuple[Any, ...], value: Any, workdir: str) -> None:
        check_config(toml_document(replaced(path, value)), workdir)

    def test_the_documented_example_derives_and_renders(workdir: str) -> None:
        from test_config import DOC_EXAMPLE

        check_config(DOC_EXAMPLE, workdir)


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="markrouted-fuzz-") as directory:
        yield directory
