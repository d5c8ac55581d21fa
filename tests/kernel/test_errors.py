"""Bad input against the real kernel: refused cleanly, and the kernel left untouched.

An invalid config exits 1 with every error on stderr prefixed by the file's
path and writes nothing; an uplink whose interface does not exist is reported
down, not a failure; a user without CAP_NET_ADMIN gets one line saying so, not
a traceback, and the kernel keeps whatever it had.
"""

from __future__ import annotations

import json

import pytest

from .kernelhost import CONFIG, Host

pytestmark = pytest.mark.kernel

INVALID = """\
[settings]
mark_mask = 0x00ff0000
colour = "blue"

[uplinks.wan1]
interface = "wan1"
table = 254
mark = 1

[uplinks.wan2]
interface = "wan2"
table = 102
mark = 300

[[policy]]
name = "ssh"
dport = [70000]
uplinks = ["wan3"]
"""

#: one fragment per problem of INVALID: each must be reported, each on a line of its own
INVALID_PROBLEMS = ("settings.colour", "uplinks.wan1.table", "uplinks.wan2.mark", "dport", "wan3")

#: the CLI run as nobody, with no capabilities at all
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


@pytest.mark.parametrize("command", ["apply", "plan", "flush", "check", "status"])
def test_invalid_config_is_refused_and_writes_nothing(host: Host, command: str) -> None:
    bad = host.write(INVALID, "invalid.toml")
    pristine = host.text_state()

    proc = host.mr(command, config=bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines, "no error printed"
    for line in lines:
        assert line.startswith(f"{bad}: "), f"error line without the config's path: {line!r}"
    for problem in INVALID_PROBLEMS:
        assert sum(problem in line for line in lines) == 1, f"{problem!r} not reported once:\n{proc.stderr}"
    # the kernel is exactly as it was: no rule, route or nft table appeared
    assert host.text_state() == pristine
    assert not host.has_nft_table()


def test_invalid_config_leaves_the_installed_state_alone(host: Host) -> None:
    host.apply()
    installed = host.text_state()
    bad = host.write(INVALID, "invalid.toml")
    for command in ("apply", "flush"):
        proc = host.mr(command, config=bad)
        assert proc.returncode == 1, proc.stdout + proc.stderr
    assert host.text_state() == installed


def test_missing_interface_is_an_uplink_down_not_a_failure(host: Host) -> None:
    ghost = host.write(CONFIG + """
[uplinks.wan3]
interface = "nosuch0"
table = 103
mark = 3
""", "ghost.toml")
    proc = host.mr("apply", config=ghost)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr

    status = host.mr("status", "--json", config=ghost)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    wan3 = doc["uplinks"]["wan3"]
    assert wan3["state"] == "down"
    assert "nosuch0" in wan3["reason"]
    assert wan3["interface"] == "nosuch0"
    assert doc["uplinks"]["wan1"]["state"] == doc["uplinks"]["wan2"]["state"] == "up"
    assert doc["in_sync"] is True
    # the others are installed as usual, and a second pass finds nothing to do
    assert host.has_nft_table()
    assert host.mr("plan", config=ghost).returncode == 0


@pytest.mark.parametrize("command", ["apply", "plan", "flush", "status"])
def test_without_cap_net_admin_one_clear_line(host: Host, command: str) -> None:
    pristine = host.text_state()
    proc = host.mr(command, prefix=NOBODY)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr:\n{proc.stderr}"
    assert "permission" in lines[0].lower()
    assert host.text_state() == pristine


def test_without_cap_net_admin_flush_keeps_the_installed_state(host: Host) -> None:
    host.apply()
    installed = host.text_state()
    proc = host.mr("flush", prefix=NOBODY)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1 and "permission" in proc.stderr.lower(), proc.stderr
    assert host.text_state() == installed


def test_cap_net_admin_alone_suffices(host: Host) -> None:
    """Least privilege: nobody holding only CAP_NET_ADMIN can apply."""
    caps = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=-all,+net_admin", "--ambient-caps=+net_admin"]
    proc = host.mr("apply", prefix=caps)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert host.has_nft_table()
    assert host.mr("plan").returncode == 0
