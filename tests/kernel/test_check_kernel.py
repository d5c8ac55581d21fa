"""``markrouted check --kernel``: collisions with other users of marks, tables and priorities.

Each test installs one kind of foreign state by hand, as other software would,
and reads the verdict: exit 1 with an ``error:`` line naming the culprit for
what breaks markrouted, exit 0 with a ``warning:`` line for what merely might.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

import pytest

from .kernelhost import WAN1_GW, Host

pytestmark = pytest.mark.kernel


def check(host: Host) -> tuple[subprocess.CompletedProcess[str], list[str], list[str]]:
    proc = host.mr("check", "--kernel")
    assert "Traceback" not in proc.stderr, proc.stderr
    out = proc.stdout.splitlines()
    errors = [line for line in out if line.startswith("error:")]
    warnings = [line for line in out if line.startswith("warning:")]
    return proc, errors, warnings


def test_clean_kernel_passes(host: Host) -> None:
    proc, errors, warnings = check(host)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert errors == [] and warnings == [], proc.stdout


def test_foreign_table_writing_the_whole_mark_is_an_error(host: Host) -> None:
    host.nft_script("""\
table inet clobber {
    chain pre {
        type filter hook prerouting priority -100; policy accept;
        tcp dport 8080 meta mark set 0x10000
    }
}
""")
    proc, errors, _ = check(host)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(errors) == 1, proc.stdout
    assert "table inet clobber" in errors[0]


def test_foreign_table_writing_other_bits_is_fine(host: Host) -> None:
    """``meta mark set meta mark | 0x4000`` (Kubernetes' bit) leaves mark_mask alone."""
    host.nft_script("""\
table inet kube {
    chain pre {
        type filter hook prerouting priority -100; policy accept;
        tcp dport 8080 meta mark set meta mark | 0x4000
        ct mark set ct mark & 0xffff0000
    }
}
""")
    proc, errors, warnings = check(host)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert errors == [] and warnings == [], proc.stdout


def test_foreign_table_writing_inside_the_mask_is_an_error(host: Host) -> None:
    """A masked write is still a collision when its bits are markrouted's."""
    host.nft_script("""\
table ip vpn {
    chain out {
        type route hook output priority -150; policy accept;
        meta mark set meta mark | 0x00040000
    }
}
""")
    proc, errors, _ = check(host)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(errors) == 1 and "table ip vpn" in errors[0], proc.stdout


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_foreign_rule_using_our_table_is_an_error(host: Host, family: int) -> None:
    host.ip(f"-{family}", "rule", "add", "priority", "20000", "lookup", "101")
    proc, errors, _ = check(host)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any("table 101" in e for e in errors), proc.stdout


def test_foreign_route_in_our_table_is_an_error(host: Host) -> None:
    host.ip("-4", "route", "add", "192.0.2.0/24", "via", WAN1_GW, "table", "102")
    proc, errors, _ = check(host)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any("table 102" in e for e in errors), proc.stdout


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_foreign_rule_in_our_priority_range_is_a_warning(host: Host, family: int) -> None:
    src = "192.0.2.0/24" if family == 4 else "2001:db8:c::/64"
    host.ip(f"-{family}", "rule", "add", "priority", "10050", "from", src, "lookup", "200")
    proc, errors, warnings = check(host)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert errors == [], proc.stdout
    assert len(warnings) == 1 and "10050" in warnings[0], proc.stdout


def test_own_state_is_no_collision(host: Host) -> None:
    """After apply, markrouted's own rules, routes and table are not reported as foreign."""
    host.apply()
    proc, errors, warnings = check(host)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert errors == [] and warnings == [], proc.stdout


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _fake_networkd(ns: Any, tmp: str) -> subprocess.Popen[str]:
    """A process named as systemd-networkd is (comm "systemd-network"), in namespace ``ns``."""
    path = os.path.join(tmp, "systemd-networkd")
    os.symlink(shutil.which("sleep") or "/bin/sleep", path)
    proc = subprocess.Popen([*ns.nsenter(), path, "60"], text=True)
    end = time.monotonic() + 5
    while _comm(proc.pid) != "systemd-network":  # nsenter execs it in place: same pid
        if time.monotonic() > end:
            proc.kill()
            proc.wait()
            raise TimeoutError("the stand-in for systemd-networkd did not start")
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize("where", ["ours", "elsewhere"])
def test_networkd_warning_is_about_our_namespace(host: Host, tmp_path: Any, where: str) -> None:
    """networkd only deletes rules in its own namespace: one elsewhere (a container's) is no threat."""
    from markrouted.collisions import networkd_findings
    from markrouted.kernel.networkd import config_files, read_files

    proc = _fake_networkd(host.ns if where == "ours" else host.peer, str(tmp_path))
    try:
        _, _, warnings = check(host)
    finally:
        proc.kill()
        proc.wait()
    about_networkd = [w for w in warnings if "networkd" in w]
    expect = len(networkd_findings(True, read_files(config_files())[0])) if where == "ours" else 0
    assert len(about_networkd) == expect, warnings
