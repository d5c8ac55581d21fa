"""check --kernel's judgement of systemd-networkd's and NetworkManager's configuration.

The files are given as text, the way ``markrouted.kernel.networkd`` and
``markrouted.kernel.nm`` read them; the order of networkd's files is tested on
a made-up tree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_derive import WAN2, config

from markrouted.collisions import (NETWORKD_DROPIN, NETWORKD_EXAMPLE, Finding, networkd_findings,
                                   networkd_settings, nm_findings)
from markrouted.kernel.networkd import config_files, read_files

CONFIG = config()  # wan1 on eth0 table 101, wan2 on eth1 table 102, gateways auto
ROOT = Path(__file__).resolve().parents[2]
DROPIN = (NETWORKD_DROPIN, (ROOT / "packaging" / "examples" / "networkd-markrouted.conf").read_text())


def keys(findings: list[Finding]) -> list[str]:
    return sorted(k for f in findings for k in ("ManageForeignRoutingPolicyRules", "ManageForeignRoutes")
                  if f"{k}=yes" in f.text)


# ------------------------------------------------------------------ systemd-networkd


def test_defaults_delete_rules_and_routes() -> None:
    found = networkd_findings(True, [])
    assert keys(found) == ["ManageForeignRoutes", "ManageForeignRoutingPolicyRules"]
    assert all(f.severity == "warning" and "(the default)" in f.text for f in found)
    assert all(NETWORKD_EXAMPLE in f.text and NETWORKD_DROPIN in f.text for f in found)  # names the fix


def test_shipped_dropin_silences_both() -> None:
    assert networkd_findings(True, [("/etc/systemd/networkd.conf", "[Network]\n#SpeedMeter=no\n"), DROPIN]) == []


def test_rules_only_dropin_still_loses_routes() -> None:
    found = networkd_findings(True, [("/x.conf", "[Network]\nManageForeignRoutingPolicyRules=no\n")])
    assert keys(found) == ["ManageForeignRoutes"]
    assert "routes" in found[0].text


def test_not_running_is_harmless() -> None:
    assert networkd_findings(False, []) == []


@pytest.mark.parametrize("value", ["no", "false", "0", "off", "No", " n ", "F"])
def test_every_false_spelling(value: str) -> None:
    assert networkd_settings([("/a", f"[Network]\nManageForeignRoutes={value}\n")])["ManageForeignRoutes"] == (
        False, "/a")


def test_later_file_wins_and_names_where() -> None:
    no, yes = ("/10-no.conf", "[Network]\nManageForeignRoutes=no\n"), ("/20-yes.conf", "[Network]\nManageForeignRoutes=yes\n")
    assert networkd_settings([no, yes])["ManageForeignRoutes"] == (True, "/20-yes.conf")
    assert networkd_settings([yes, no])["ManageForeignRoutes"] == (False, "/10-no.conf")
    assert "(set in /20-yes.conf)" in networkd_findings(True, [DROPIN, yes])[0].text


@pytest.mark.parametrize("text", [
    "[DHCPv4]\nManageForeignRoutes=no\n",       # another section
    "ManageForeignRoutes=no\n",                 # no section at all
    "[Network]\nManageForeignRoutes=maybe\n",   # invalid: networkd ignores it
    "[Network]\n# ManageForeignRoutes=no\n",    # commented out
    "[Network]\n; ManageForeignRoutes=no\n",
])
def test_what_does_not_count(text: str) -> None:
    assert networkd_settings([("/a", text)])["ManageForeignRoutes"] == (True, None)


def test_changed_after_start_asks_for_restart() -> None:
    assert networkd_findings(True, [DROPIN], started=100.0, changed=50.0) == []
    assert networkd_findings(True, [DROPIN], started=100.0, changed=100.9) == []  # within the clock's resolution
    [stale] = networkd_findings(True, [DROPIN], started=100.0, changed=150.0)
    assert "systemctl restart systemd-networkd" in stale.text


def test_file_order_and_masking(tmp_path: Path) -> None:
    """Drop-ins apply by name across directories; /etc masks /run masks /usr/lib of the same name."""
    dirs = [tmp_path / d for d in ("usr", "local", "run", "etc")]
    for d in dirs:
        d.mkdir()
    (dirs[0] / "50-x.conf").write_text("usr")
    (dirs[3] / "50-x.conf").write_text("etc")
    (dirs[2] / "10-a.conf").write_text("run")
    (dirs[0] / "90-z.conf").write_text("usr")
    (dirs[1] / "ignored.txt").write_text("not a .conf")
    main = tmp_path / "networkd.conf"
    main.write_text("[Network]\n")
    files = config_files([str(main), str(tmp_path / "absent.conf")], [str(d) for d in dirs])
    assert files == [str(main), str(tmp_path / "absent.conf"), str(dirs[2] / "10-a.conf"),
                     str(dirs[3] / "50-x.conf"), str(dirs[0] / "90-z.conf")]
    os.mkfifo(dirs[3] / "60-fifo.conf")  # not read: it would block
    files = config_files([str(main), str(tmp_path / "absent.conf")], [str(d) for d in dirs])
    texts, newest = read_files(files)
    assert [t for _, t in texts] == ["[Network]\n", "run", "etc", "usr"]  # the absent one skipped
    assert newest == max(os.stat(p).st_mtime for p, _ in texts)


# ------------------------------------------------------------------ NetworkManager


def profile(iface: str, ipv4: str = "", ipv6: str = "") -> tuple[str, str]:
    return (f"/etc/NetworkManager/system-connections/{iface}.nmconnection",
            f"[connection]\nid={iface}-up\ntype=ethernet\ninterface-name={iface}\n\n"
            f"[ipv4]\nmethod=auto\n{ipv4}\n[ipv6]\nmethod=auto\n{ipv6}\n")


def test_plain_profiles_are_harmless() -> None:
    assert nm_findings(CONFIG, True, [profile("eth0"), profile("eth1", "route-table=0\nroute-metric=200\n")]) == []


def test_not_running_is_harmless() -> None:
    assert nm_findings(CONFIG, False, [profile("eth0", "route-table=101\n")]) == []


def test_route_table_of_an_uplink_is_an_error() -> None:
    """Any profile, even of another interface: its routes would mix with markrouted's."""
    [found] = nm_findings(CONFIG, True, [profile("lan0", ipv6="route-table=102\n")])
    assert found.severity == "error"
    assert "table 102, markrouted's table of uplinks.wan2" in found.text and "IPv6" in found.text


def test_route_table_elsewhere_hides_the_auto_gateway() -> None:
    [found] = nm_findings(CONFIG, True, [profile("eth0", "route-table=300\n")])
    assert found.severity == "warning"
    assert "table 300" in found.text and 'uplinks.wan1.gateway = "auto"' in found.text
    # an explicit gateway does not look in the main table: nothing to say
    wan1 = '[uplinks.wan1]\ninterface = "eth0"\ntable = 101\nmark = 1\ngateway = "198.51.100.1"\n'
    fixed = config(uplinks=wan1 + WAN2)
    assert nm_findings(fixed, True, [profile("eth0", "route-table=300\n")]) == []


@pytest.mark.parametrize("value", ["true", "yes", "1"])
def test_never_default_leaves_auto_nothing_to_follow(value: str) -> None:
    [found] = nm_findings(CONFIG, True, [profile("eth1", ipv6=f"never-default={value}\n")])
    assert "ipv6.never-default" in found.text and "uplinks.wan2.gateway6" in found.text


def test_other_interfaces_route_table_is_their_business() -> None:
    assert nm_findings(CONFIG, True, [profile("lan0", "route-table=300\nnever-default=true\n")]) == []
