"""Hostile and careless input, by class: every one ends in clear lines and exit 1.

Each class is a table: the file kinds a config path can name (run as the real
command, in a subprocess with a deadline, so a hang fails instead of blocking),
integers too large for 64 bits wherever an integer is read (TOML numbers and
numbers inside strings), nesting past the parser's limit, addresses that cannot
be a gateway or a health-check target, interface names and cgroup paths the
kernel or nft cannot take, durations and counts outside their limits, and user
text built to forge message lines, log lines or nft syntax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from markrouted import nftexpr, text
from markrouted.config import MAX_FILE_SIZE, Config, ConfigError, load, parse
from markrouted.derive import derive
from markrouted.log import JournalRenderer, setup

ROOT = Path(__file__).resolve().parents[2]
WAN1 = '[uplinks.wan1]\ninterface = "eth0"\ntable = 101\nmark = 1\n'
WAN2 = '[uplinks.wan2]\ninterface = "eth1"\ntable = 102\nmark = 2\n'
CHECK = '[uplinks.wan1.check]\ntargets = ["192.0.2.1"]\n'
VALID = WAN1 + WAN2 + '[[policy]]\nname = "p"\nuplinks = ["wan1"]\n'

#: No message line is longer than this, however long the value it echoes.
LINE_MAX = 300


def errors_of(config_text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(config_text)
    return list(info.value.errors)


def assert_clean(lines: list[str]) -> None:
    """Each line: one line, nothing invisible or controlling, short."""
    assert lines
    for line in lines:
        assert line.isprintable(), line
        assert len(line) <= LINE_MAX, line


def policy(body: str, name: str = "p") -> str:
    return f'{WAN1}{WAN2}[[policy]]\nname = "{name}"\nuplinks = ["wan1"]\n{body}\n'


# ------------------------------------------------------------------ file kinds, as commands


def run_cli(*args: str | bytes, timeout: float = 10.0) -> subprocess.CompletedProcess[bytes]:
    """``markrouted ARGS`` as a user runs it; a hang fails the test after ``timeout``.

    The locale is UTF-8 and the standard streams strict, as under a UTF-8 locale
    other than C.UTF-8 (where Python would quietly pass undecodable bytes through):
    a file name with bytes that are not UTF-8 must not break the output.
    """
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8:strict",
        # no running daemon's status may stand in for loading the config
        "MARKROUTED_RUN_DIR": "/nonexistent/markrouted-test",
    }
    return subprocess.run([sys.executable, "-m", "markrouted", *args], capture_output=True, timeout=timeout,
                          cwd=ROOT, env=env, check=False)


def assert_refused(proc: subprocess.CompletedProcess[bytes], reason: str) -> None:
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert_clean(lines)
    assert reason in lines[0]


@pytest.fixture
def fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo.toml"
    os.mkfifo(path)
    return str(path)


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "socket.toml")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        yield path


COMMANDS = [
    ("check",),
    ("plan",),
    ("apply",),
    ("status",),
    ("explain", "--daddr", "192.0.2.1"),
    ("flush",),
    ("run", "--log", "console"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(("kind", "reason"), [("fifo", "(a FIFO)"), ("zero", "(a character device)")])
def test_every_command_refuses_a_file_that_never_ends(command: tuple[str, ...], kind: str, reason: str,
                                                      fifo: str) -> None:
    path = fifo if kind == "fifo" else "/dev/zero"
    proc = run_cli("-c", path, *command)
    assert_refused(proc, f"{path}: not a regular file {reason}")


@pytest.fixture
def odd_files(tmp_path: Path, fifo: str, unix_socket: str) -> dict[str, bytes]:
    """Paths of every kind a config path can name that is not a readable config."""
    os.symlink(fifo, tmp_path / "fifo-link")
    with open(tmp_path / "big", "wb") as f:
        f.truncate(MAX_FILE_SIZE + 1)  # sparse: the size alone is over the limit
    base = bytes(tmp_path)
    return {
        "directory": base,
        "dev-null": b"/dev/null",
        "socket": os.fsencode(unix_socket),
        "symlink-to-fifo": base + b"/fifo-link",
        "over-the-size-limit": base + b"/big",
        "missing": base + b"/missing.toml",
        "control-characters-in-the-name": base + b"/a\nforged: valid\x1b[2J",
        "non-utf8-name": base + b"/caf\xe9-missing.toml",
    }


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("directory", "not a regular file (a directory)"),
        ("dev-null", "not a regular file (a character device)"),
        ("socket", "not a regular file (a socket)"),
        ("symlink-to-fifo", "not a regular file (a FIFO)"),
        ("over-the-size-limit", f"larger than {MAX_FILE_SIZE} bytes"),
        ("missing", "No such file or directory"),
        ("control-characters-in-the-name", '/a\\nforged: valid\\x1b[2J": No such file'),
        ("non-utf8-name", '/caf\\xe9-missing.toml": No such file'),
    ],
)
def test_check_refuses(kind: str, reason: str, odd_files: dict[str, bytes]) -> None:
    assert_refused(run_cli("-c", odd_files[kind], "check"), reason)


def test_one_byte_over_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "over.toml"
    path.write_text(VALID + "#" * (MAX_FILE_SIZE - len(VALID)) + "\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.errors == (f"larger than {MAX_FILE_SIZE} bytes (1 MiB), the most a config may have",)


def test_a_file_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "full.toml"
    path.write_text(VALID + "#" * (MAX_FILE_SIZE - len(VALID) - 1) + "\n")
    assert os.path.getsize(path) == MAX_FILE_SIZE
    assert len(load(path).uplinks) == 2


def test_a_valid_config_at_a_non_utf8_path_checks(tmp_path: Path) -> None:
    path = bytes(tmp_path) + b"/caf\xe9.toml"
    with open(path, "w") as f:
        f.write(VALID)
    proc = run_cli("-c", path, "check")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().endswith('caf\\xe9.toml": valid (2 uplinks, 1 policies)\n')
    assert proc.stderr == b""


def test_the_daemon_watches_a_config_at_a_non_utf8_path(tmp_path: Path) -> None:
    """``run`` follows the file it loaded, whatever bytes its name holds."""
    from markrouted.daemon.inotify import ConfigWatch

    path = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.toml")
    with open(path, "w") as f:
        f.write(VALID)
    watch = ConfigWatch(path)
    try:
        assert not watch.changed()
        with open(path, "a") as f:
            f.write("# edited\n")
        assert watch.changed()  # inotify queues the event before write() returns
    finally:
        watch.close()


# ------------------------------------------------------------------ integers beyond 64 bits

#: Every place an integer is read from a TOML number, with its key path.
INTEGER_SLOTS = {
    "settings.mark_mask": "[settings]\nmark_mask = {v}\n" + WAN1,
    "settings.rule_priority": "[settings]\nrule_priority = {v}\n" + WAN1,
    "settings.resync": "[settings]\nresync = {v}\n",
    "uplinks.wan1.table": '[uplinks.wan1]\ninterface = "eth0"\ntable = {v}\nmark = 1\n',
    "uplinks.wan1.mark": '[uplinks.wan1]\ninterface = "eth0"\ntable = 101\nmark = {v}\n',
    "uplinks.wan1.check.interval": WAN1 + CHECK + "interval = {v}\n",
    "uplinks.wan1.check.timeout": WAN1 + CHECK + "timeout = {v}\n",
    "uplinks.wan1.check.down_after": WAN1 + CHECK + "down_after = {v}\n",
    "uplinks.wan1.check.up_after": WAN1 + CHECK + "up_after = {v}\n",
    "policy[0] (p).proto": policy("proto = {v}"),
    "policy[0] (p).dport": policy('proto = "tcp"\ndport = {v}'),
    "policy[0] (p).sport[0]": policy('proto = "tcp"\nsport = [{v}]'),
    "policy[0] (p).uid": policy("uid = {v}"),
    "policy[0] (p).gid[0]": policy("gid = [{v}]"),
    "policy[0] (p).balance.wan1": f'{WAN1}[[policy]]\nname = "p"\nbalance = {{ wan1 = {{v}} }}\n',
}

HUGE_NUMBERS = {
    "2**64": str(2**64),
    "-2**63-1": str(-(2**63) - 1),
    "4000-digits": "1" + "0" * 3999,
    "negative-4000-digits": "-" + "9" * 4000,
    "hex-20000-bits": "0x" + "f" * 5000,
    "octal": "0o" + "7" * 3000,
    "binary": "0b" + "1" * 3000,
}


@pytest.mark.parametrize("number", HUGE_NUMBERS.values(), ids=HUGE_NUMBERS.keys())
@pytest.mark.parametrize("path", INTEGER_SLOTS)
def test_integers_beyond_64_bits(path: str, number: str) -> None:
    lines = errors_of(INTEGER_SLOTS[path].replace("{v}", number))
    assert_clean(lines)
    assert lines[0].startswith(f"{path}: ")
    assert len(lines) == 1


@pytest.mark.parametrize("path", INTEGER_SLOTS)
def test_decimal_integers_past_the_parsers_limit(path: str) -> None:
    """int() refuses decimal strings of more than 4300 digits inside tomllib."""
    assert errors_of(INTEGER_SLOTS[path].replace("{v}", "9" * 5000)) == ["toml: a number has too many digits"]


#: Every place a number is read out of a string.
STRING_NUMBER_SLOTS = {
    "policy[0] (p).dport": policy('proto = "tcp"\ndport = "{v}"'),
    "policy[0] (p).sport[0]": policy('proto = "tcp"\nsport = ["1-{v}"]'),
    "policy[0] (p).uid[0]": policy('uid = ["{v}-1"]'),
    "policy[0] (p).gid": policy('gid = "{v}"'),
    "uplinks.wan1.check.method": WAN1 + CHECK + 'method = "tcp:{v}"\n',
    "settings.resync": '[settings]\nresync = "{v}s"\n',
    "uplinks.wan1.check.interval": WAN1 + CHECK + 'interval = "{v}ms"\n',
    "uplinks.wan1.check.timeout": WAN1 + CHECK + 'timeout = "{v}.5s"\n',
}


@pytest.mark.parametrize("digits", [str(2**64), "9" * 30, "9" * 5000, "1" + "0" * 100_000])
@pytest.mark.parametrize("path", STRING_NUMBER_SLOTS)
def test_numbers_in_strings_beyond_64_bits(path: str, digits: str) -> None:
    lines = errors_of(STRING_NUMBER_SLOTS[path].replace("{v}", digits))
    assert_clean(lines)
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}: ")


def test_leading_zeros_do_not_make_a_number_large() -> None:
    config = parse(policy('proto = "tcp"\ndport = "' + "0" * 5000 + '22"'))
    assert config.policies[0].dport == ((22, 22),)


# ------------------------------------------------------------------ nesting


@pytest.mark.parametrize("depth", [100, 1000, 100_000])
@pytest.mark.parametrize(
    ("opening", "closing"),
    [("[", "]"), ("{ a = ", " }")],
    ids=["arrays", "inline-tables"],
)
@pytest.mark.parametrize("where", ["top", "dport"])
def test_deep_nesting(depth: int, opening: str, closing: str, where: str) -> None:
    value = opening * depth + "1" + closing * depth
    config_text = f"x = {value}\n" if where == "top" else policy(f"dport = {value}")
    lines = errors_of(config_text)
    assert_clean(lines)
    if depth >= 1000:
        assert lines == ["toml: arrays or tables nested too deeply"]


# ------------------------------------------------------------------ addresses that cannot work

#: (address, what the message says) for addresses no packet can be sent to out of an uplink.
UNROUTABLE = [
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "0.0.0.0/8"),
    ("0.255.255.255", "0.0.0.0/8"),
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("ff02::1", "multicast"),
    ("ff0e::101", "multicast"),
    ("::ffff:192.0.2.1", "IPv4-mapped"),
]
LINK_LOCAL = [("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("febf::1", "link-local")]


@pytest.mark.parametrize(("address", "why"), UNROUTABLE + LINK_LOCAL)
def test_health_check_targets_that_never_test_the_isp(address: str, why: str) -> None:
    lines = errors_of(WAN1 + f'[uplinks.wan1.check]\ntargets = ["203.0.113.7", "{address}"]\n')
    assert len(lines) == 1
    assert lines[0].startswith(f"uplinks.wan1.check.targets[1]: {address} cannot be a health-check target: ")
    assert why in lines[0]


@pytest.mark.parametrize("address", ["192.0.2.1", "198.18.0.10", "203.0.113.255", "2001:db8::1", "1.1.1.1"])
def test_health_check_targets_beyond_the_first_hop(address: str) -> None:
    config = parse(WAN1 + f'[uplinks.wan1.check]\ntargets = ["{address}"]\n')
    assert config.uplinks[0].check is not None
    assert str(config.uplinks[0].check.targets[0]) == address


@pytest.mark.parametrize(("address", "why"), UNROUTABLE)
def test_gateways_no_packet_can_be_sent_to(address: str, why: str) -> None:
    key = "gateway" if ":" not in address else "gateway6"
    lines = errors_of(WAN1 + f'{key} = "{address}"\n')
    assert len(lines) == 1
    assert lines[0].startswith(f"uplinks.wan1.{key}: {address} cannot be a gateway: ")
    assert why in lines[0]


@pytest.mark.parametrize(("key", "address"), [("gateway", "192.0.2.1"), ("gateway", "169.254.0.1"),
                                              ("gateway6", "fe80::1"), ("gateway6", "2001:db8::1")])
def test_gateways_that_work(key: str, address: str) -> None:
    uplink = parse(WAN1 + f'{key} = "{address}"\n').uplinks[0]
    assert str(getattr(uplink, key).address) == address


# ------------------------------------------------------------------ interface names


def ifname_errors(name: str, key: str) -> list[str]:
    if key == "interface":
        return errors_of(f"[uplinks.wan1]\ninterface = {toml_string(name)}\ntable = 101\nmark = 1\n")
    return errors_of(policy(f"iif = {toml_string(name)}"))


IFNAME_KEYS = {"interface": "uplinks.wan1.interface", "iif": "policy[0] (p).iif"}

#: One bad character in the middle of a name, for each reason the kernel or nft has.
BAD_CHARACTERS = (
    [(c, "whitespace") for c in " \t\n\v\f\r"]
    + [(chr(c), "control character") for c in [*range(0, 9), *range(14, 32), 0x7F, 0x85, 0x9B]]
    + [("/", "'/'"), (":", "':'"), ("*", "wildcard"), ("%", "template"), ('"', "quote"), ("'", "quote"),
       ("\\", "backslash")]
    + [(c, "not printable ASCII") for c in "é€\u202e\u2028\U0001f600"]
    + [("\u00a0", "whitespace"), ("\u3000", "whitespace")]
)


@pytest.mark.parametrize("key", IFNAME_KEYS)
@pytest.mark.parametrize(("char", "why"), BAD_CHARACTERS, ids=lambda v: f"U+{ord(v):04X}" if len(v) == 1 else v)
def test_interface_names_with_a_bad_character(key: str, char: str, why: str) -> None:
    for name in (f"eth{char}0", f"eth{char}", char):
        lines = ifname_errors(name, key)
        assert_clean(lines)
        assert len(lines) == 1
        assert lines[0].startswith(f"{IFNAME_KEYS[key]}: {text.quote(name)} is not a valid interface name (")
        assert why in lines[0]


@pytest.mark.parametrize("key", IFNAME_KEYS)
@pytest.mark.parametrize(
    ("name", "why"),
    [("", "empty"), (".", "'.'"), ("..", "'.'"), ("all", "kernel"), ("default", "kernel"),
     ("a" * 16, "longer than 15 bytes"), ("a" * 5000, "longer than 15 bytes")],
)
def test_interface_names_the_kernel_refuses(key: str, name: str, why: str) -> None:
    lines = ifname_errors(name, key)
    assert_clean(lines)
    assert len(lines) == 1 and lines[0].startswith(IFNAME_KEYS[key] + ": ")
    assert why in lines[0]


@pytest.mark.parametrize("name", ["eth0", "enp0s31f6", "eth0.100", "br-lan", "wg_0", "a" * 15, "lan0@x", ".x", "x.."])
def test_interface_names_that_work(name: str) -> None:
    assert parse(f'[uplinks.wan1]\ninterface = "{name}"\ntable = 101\nmark = 1\n').uplinks[0].interface == name
    assert parse(policy(f'iif = "{name}"')).policies[0].iif == name


# ------------------------------------------------------------------ cgroup paths


def cgroup_errors(path: str) -> list[str]:
    return errors_of(policy(f"cgroup = {toml_string(path)}"))


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ('a"b', "a quote"),
        ('system.slice/x" accept', "a quote"),
        ("it's.slice", "a quote"),
        *[(f"system.slice/a{chr(c)}b", "character") for c in [0, 1, 9, 10, 13, 0x1B, 0x7F, 0x85, 0x9B]],
        ("a\u202eb", "character"),
        ("a\u2028b", "character"),
        ("a\u00a0b", "character"),
        ("a/" + "b" * 256, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),
        ("/".join(["a"] * 256), "more than 255"),
        ("/".join(["x" * 250] * 17), "longer than 4000 bytes"),
        ("a//b", "normalized"),
        ("a/../b", "normalized"),
        ("/", "must not be empty"),
    ],
)
def test_cgroup_paths_that_cannot_work(path: str, why: str) -> None:
    lines = cgroup_errors(path)
    assert_clean(lines)
    assert len(lines) == 1 and lines[0].startswith("policy[0] (p).cgroup: ")
    assert why in lines[0]


@pytest.mark.parametrize(
    "path",
    [
        "system.slice/backup.service",
        "system.slice/systemd-fsck@dev-disk-by\\x2duuid-1234.service",  # systemd's escaping
        "user.slice/user-1000.slice/app name.scope",
        "système.slice",
        "/".join(["a"] * 255),
        "b" * 255,
    ],
)
def test_cgroup_paths_that_work(path: str) -> None:
    assert parse(policy(f"cgroup = '{path}'")).policies[0].cgroup == path


# ------------------------------------------------------------------ durations and counts

DURATION_LIMITS = [
    ("settings.resync", "[settings]\nresync = {v}\n", "999ms", "1s", "24h", "1441m"),
    ("uplinks.wan1.check.interval", WAN1 + CHECK + "interval = {v}\ntimeout = '10ms'\n", "49ms", "50ms", "1h",
     "3601s"),
    ("uplinks.wan1.check.timeout", WAN1 + CHECK + "timeout = {v}\ninterval = '1h'\n", "9ms", "10ms", "1h",
     "3600.001s"),
]


@pytest.mark.parametrize(("path", "template", "below", "lowest", "highest", "above"), DURATION_LIMITS,
                         ids=[d[0] for d in DURATION_LIMITS])
def test_duration_limits(path: str, template: str, below: str, lowest: str, highest: str, above: str) -> None:
    parse(template.replace("{v}", f'"{lowest}"'))
    parse(template.replace("{v}", f'"{highest}"'))
    assert errors_of(template.replace("{v}", f'"{below}"')) == [f"{path}: {below} is shorter than {lowest}, the minimum"]
    assert errors_of(template.replace("{v}", f'"{above}"')) == [f"{path}: {above} is longer than {highest}, the maximum"]


def uplinks(n: int) -> str:
    return "[settings]\nmark_mask = 0xffff0000\n" + "".join(
        f'[uplinks.u{i}]\ninterface = "eth{i}"\ntable = {1000 + i}\nmark = {i + 1}\n' for i in range(n))


COUNT_LIMITS = [
    ("uplinks.wan1.check.down_after", lambda n: WAN1 + CHECK + f"down_after = {n}\n", 1000, "1001 is more than 1000"),
    ("uplinks.wan1.check.up_after", lambda n: WAN1 + CHECK + f"up_after = {n}\n", 1000, "1001 is more than 1000"),
    ("uplinks.wan1.check.targets",
     lambda n: WAN1 + "[uplinks.wan1.check]\ntargets = [" + ", ".join(f'"198.18.0.{i + 1}"' for i in range(n)) + "]\n",
     16, "17 targets, more than 16"),
    ("uplinks", uplinks, 256, "257 uplinks, more than 256"),
    ("policy",
     lambda n: WAN1 + "".join(f'[[policy]]\nname = "p{i}"\nuplinks = ["wan1"]\n' for i in range(n)),
     10000, "10001 policies, more than 10000"),
    ("policy[0] (p).balance.wan1", lambda n: WAN1 + f'[[policy]]\nname = "p"\nbalance = {{ wan1 = {n} }}\n',
     1000, "1001 is out of range 1-1000"),
    ("policy[0] (p).proto", lambda n: policy(f"proto = {n - 1000 + 255}"), 1000, "256 is out of range 0-255"),
    ("uplinks.wan1.mark", lambda n: "[settings]\nmark_mask = 0xffffffff\n" + WAN1.replace("mark = 1", f"mark = {n}"),
     2**32 - 1, "4294967296 does not fit in mark_mask"),
    ("uplinks.wan1.table", lambda n: WAN1.replace("101", str(n)), 2**32 - 1, "4294967296 is out of range"),
    ("policy[0] (p).uid[0]", lambda n: policy(f"uid = [{n}]"), 2**32 - 2, "4294967295 is out of range"),
    ("policy[0] (p).gid[0]", lambda n: policy(f'gid = ["0-{n}"]'), 2**32 - 2, "4294967295 is out of range"),
]


@pytest.mark.parametrize(("path", "make", "highest", "message"), COUNT_LIMITS, ids=[c[0] for c in COUNT_LIMITS])
def test_count_limits(path: str, make: Any, highest: int, message: str) -> None:
    parse(make(highest))
    lines = errors_of(make(highest + 1))
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}: {message}")


# ------------------------------------------------------------------ messages cannot be forged

EVIL = {
    "newline": "x\nuplinks.wan1: forged line",
    "carriage-return": "x\rforged",
    "terminal-escape": "\u001b[2J\u001b[31mred",
    "c1-csi": "\u009b31mred",
    "nul": "a\u0000b",
    "bidi-override": "\u202eevil",
    "line-separator": "a\u2028b",
    "long": "x" * 5000,
    "quote-and-backslash": 'a" b\\',
    # what the address parser accepts around user text: an IPv6 zone, a prefix length
    "ipv6-zone": "fe80::1%x\nuplinks.wan1: forged",
    "ipv6-zone-network": "fe80::1%\u001b[2J/64",
    "long-prefix-length": "10.0.0.1/" + "0" * 3000 + "8",
}

#: Every place the config holds a string, as a template with the value quoted for TOML.
STRING_SLOTS = {
    "top-level key": "{k} = 1\n",
    "settings key": "[settings]\n{k} = 1\n",
    "uplink name": "[uplinks.{k}]\ninterface = 'eth0'\ntable = 101\nmark = 1\n",
    "interface": WAN1.replace('"eth0"', "{v}"),
    "gateway": WAN1 + "gateway = {v}\n",
    "gateway6": WAN1 + "gateway6 = {v}\n",
    "target": WAN1 + "[uplinks.wan1.check]\ntargets = [{v}]\n",
    "method": WAN1 + CHECK + "method = {v}\n",
    "interval": WAN1 + CHECK + "interval = {v}\n",
    "success": WAN1 + CHECK + "success = {v}\n",
    "resync": "[settings]\nresync = {v}\n",
    "on_stop": "[settings]\non_stop = {v}\n",
    "policy name": WAN1 + '[[policy]]\nname = {v}\nuplinks = ["wan1"]\n',
    "proto": policy("proto = {v}"),
    "dport": policy("dport = {v}"),
    "daddr": policy("daddr = {v}"),
    "saddr": policy("saddr = [{v}]"),
    "iif": policy("iif = {v}"),
    "uid": policy("uid = {v}"),
    "cgroup": policy("cgroup = {v}"),
    "family": policy("family = {v}"),
    "fallback": policy("fallback = {v}"),
    "policy uplink": WAN1 + '[[policy]]\nname = "p"\nuplinks = [{v}]\n',
    "balance key": WAN1 + '[[policy]]\nname = "p"\nbalance = {{ {k} = 1 }}\n',
    "policy key": policy("{k} = 1"),
}


def toml_string(value: str) -> str:
    """A TOML basic string holding ``value``; everything but letters, digits and a few signs escaped."""
    return '"' + "".join(c if c.isalnum() or c in " _.:-/" else f"\\U{ord(c):08x}" for c in value) + '"'


@pytest.mark.parametrize("evil", EVIL.values(), ids=EVIL.keys())
@pytest.mark.parametrize("slot", STRING_SLOTS)
def test_user_text_in_errors_is_escaped(slot: str, evil: str, capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    value = toml_string(evil)
    config_text = STRING_SLOTS[slot].replace("{v}", value).replace("{k}", value)
    lines = errors_of(config_text)
    assert_clean(lines)
    # and as check prints them
    path = tmp_path / "evil.toml"
    path.write_text(config_text)
    from markrouted.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["-c", str(path), "check"])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"{path}: {line}" for line in lines]


def test_quote_escapes_and_cuts() -> None:
    assert text.quote('a"b\\c\n\x1b\u202e\udce9') == '"a\\"b\\\\c\\n\\x1b\\u202e\\xe9"'
    assert text.quote("é ok") == '"é ok"'
    assert text.quote("x" * 100) == '"' + "x" * 64 + '..." (100 characters)'
    assert text.escape("plain text, kept") == "plain text, kept"
    assert text.escape("a\nb\x1b[0m\u0085\u2029") == "a\\nb\\x1b[0m\\x85\\u2029"
    assert text.path("/etc/markrouted.toml") == "/etc/markrouted.toml"
    assert text.path("/tmp/a b") == '"/tmp/a b"'


@contextlib.contextmanager
def console_log() -> Iterator[tuple[Any, io.StringIO]]:
    stream = io.StringIO()
    try:
        yield setup("console", stream=stream), stream
    finally:
        structlog.reset_defaults()


def test_console_log_lines_cannot_be_forged() -> None:
    with console_log() as (log, stream):
        log.error("config reload refused\x1b[2J", error="x\nmarkrouted: forged\x1b[31m", **{"ob\nject": "\x9b"})
    out = stream.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")
    assert out[:-1].isprintable()
    assert "x\\nmarkrouted: forged\\x1b[31m" in out
    assert "config reload refused\\x1b[2J" in out


def test_journal_fields_cannot_be_forged() -> None:
    sent: list[tuple[str, dict[str, str]]] = []
    renderer = JournalRenderer.__new__(JournalRenderer)
    renderer.send = lambda message, **fields: sent.append((message, fields))
    with pytest.raises(structlog.DropEvent):
        renderer(None, "error", {"event": "uplink down\nforged", "level": "error", "uplink": "wan1\x1b[2J",
                                 "error": "a\nMARKROUTED_EVENT=forged"})
    ((message, fields),) = sent
    assert message == "uplink down\\nforged: uplink=wan1\\x1b[2J error=a\\nMARKROUTED_EVENT=forged"
    assert fields["MARKROUTED_EVENT"] == "uplink down\\nforged"
    assert all(v.isprintable() for v in fields.values())


# ------------------------------------------------------------------ no injection into nft


@pytest.mark.parametrize("value", ['eth0" accept', "a\nb", "a\x00b", "\x1b", "a\u2028b", '"'])
def test_nft_strings_refuse_what_would_leave_their_quotes(value: str) -> None:
    with pytest.raises(ValueError):
        nftexpr.string(value)


@pytest.mark.parametrize("value", ["eth0", "sys tem.slice/a\\x2db.service", "système.slice", "a{b};c#d"])
def test_nft_strings_keep_what_is_safe(value: str) -> None:
    assert nftexpr.string(value) == nftexpr.X(value, f'"{value}"')


def world(config: Config) -> Any:
    from test_fuzz_check import plausible_world

    return plausible_world(config)


def test_forged_names_never_leave_the_rule_comment() -> None:
    """A policy name that got past validation still cannot end the comment's quotes."""
    config = parse(VALID)
    forged = dataclasses.replace(config.policies[0], name='p" ; flush ruleset ; add rule x y "\n\x1b')
    config = dataclasses.replace(config, policies=(forged,))
    state = derive(config, world(config))
    assert state.nft is not None
    comments = [r.comment for c in state.nft.chains for r in c.rules]
    assert any(c.startswith("policy p? ; flush ruleset ; add rule x y ??") for c in comments)
    for comment in comments:
        assert comment.isascii() and comment.isprintable() and '"' not in comment and "\\" not in comment
        assert len(comment.encode()) <= 128  # nft's limit for a comment
    for line in state.nft.text().splitlines():
        assert line.count('"') % 2 == 0, line


@pytest.mark.parametrize("field", ["iif", "cgroup"])
def test_forged_strings_in_matches_are_refused(field: str) -> None:
    config = parse(VALID)
    changes: dict[str, Any] = {field: 'lan0" accept comment "x'}
    forged = dataclasses.replace(config.policies[0], **changes)
    config = dataclasses.replace(config, policies=(forged,))
    observed = dataclasses.replace(world(config), cgroup_ids={'lan0" accept comment "x': 7})
    with pytest.raises(ValueError, match="refusing"):
        derive(config, observed)
