"""The config contract (markrouted.toml(5)): exact error lines, defaults and parsed values."""

from __future__ import annotations

import ipaddress
import pickle
import re
import socket
import tomllib
from pathlib import Path

import pytest

from markrouted.config import (
    Check,
    Config,
    ConfigError,
    Gateway,
    Policy,
    Settings,
    Uplink,
    from_dict,
    load,
    parse,
    parse_duration,
)

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "markrouted.toml"

# The documented example (markrouted.toml(5)), every key in one place.
DOC_EXAMPLE = """\
[settings]
mark_mask      = 0x00ff0000   # the fwmark bits markrouted owns (required to be contiguous)
rule_priority  = 10000        # markrouted's ip rules use [rule_priority, rule_priority + 999]
resync         = "30s"        # full re-read of the kernel and repair of any drift
keep_main_routes = true       # 'lookup main suppress_prefixlength 0' ahead of the mark rules,
                              # so more specific routes of the main table (LAN, VPN) still win
on_stop        = "flush"      # "flush": remove all owned state on stop; "keep": leave it

[uplinks.wan1]
interface  = "eth0"
table      = 101              # routing table id; must not be a reserved table (253-255, 0)
mark       = 1                # the uplink's value inside mark_mask (1 .. mask>>shift)
gateway    = "auto"           # "auto": learn from the main table's default route on this
                              # interface (DHCP); or an address; or "none" (point-to-point)
gateway6   = "auto"           # likewise for IPv6 (router advertisements); "none" disables v6
masquerade = true             # SNAT to this uplink's address whatever leaves by it with a source
                              # that is not this uplink's (re-routed local traffic, LAN clients)

[uplinks.wan1.check]          # optional health check; without it "up" means link up,
targets  = ["192.0.2.1"]      #   carrier present, an address and a gateway are known
method   = "icmp"             # "icmp" or "tcp:PORT"
interval = "1s"
timeout  = "1s"
down_after = 3                # consecutive failures before the uplink is declared down
up_after   = 3                # consecutive successes before it is declared up again

[uplinks.wan2]
interface = "eth1"
table = 102
mark = 2

[[policy]]                    # policies match in file order; the first match wins
name    = "ssh"
proto   = "tcp"               # tcp | udp | icmp | icmpv6 | sctp | any number
dport   = [22, "2200-2299"]   # ports and ranges; sport likewise
daddr   = ["0.0.0.0/0", "::/0"]  # CIDRs (v4 and/or v6); saddr likewise
iif     = "lan0"              # match forwarded traffic entering here (omit: local + forwarded)
uid     = [1000]              # local sockets' owner (uid/gid); optional
cgroup  = "system.slice/backup.service"  # local sockets' cgroup v2 path; optional
family  = "any"               # "ipv4" | "ipv6" | "any"
uplinks = ["wan2", "wan1"]    # failover order: the first usable uplink carries the traffic
fallback = "main"             # no listed uplink usable: "main" (normal routing) or "drop"

[[policy]]
name    = "balanced-downloads"
dport   = [443]
balance = { wan1 = 3, wan2 = 1 }   # instead of 'uplinks': new flows split by weight, each
                                   # flow sticky; weights re-spread over the usable uplinks
"""

DOC_IIF_LINE = (
    'iif     = "lan0"              # match forwarded traffic entering here (omit: local + forwarded)\n'
)

WAN1 = '[uplinks.wan1]\ninterface = "eth0"\ntable = 101\nmark = 1\n'
WAN2 = '[uplinks.wan2]\ninterface = "eth1"\ntable = 102\nmark = 2\n'
UPLINKS = WAN1 + WAN2
CHECK = WAN1 + '[uplinks.wan1.check]\ntargets = ["192.0.2.1"]\n'


def policy(body: str, name: str = "x") -> str:
    """A [[policy]] called ``name`` with ``body``, after two valid uplinks."""
    return f'{UPLINKS}[[policy]]\nname = "{name}"\n{body}\n'


def failover(body: str) -> str:
    """A policy with a valid target, so only ``body`` can be wrong."""
    return policy(f'uplinks = ["wan1"]\n{body}')


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value) == "\n".join(info.value.errors)
    return list(info.value.errors)


# --------------------------------------------------------------------------- error lines

ERROR_CASES = [
    # top level
    pytest.param("uplink = {}\n", ["uplink: unknown key"], id="top-unknown-key"),
    pytest.param('"odd key" = 1\n', ['"odd key": unknown key'], id="top-unknown-quoted-key"),
    pytest.param("settings = 1\n", ["settings: expected a table, got integer"], id="settings-not-table"),
    pytest.param("uplinks = []\n", ["uplinks: expected a table, got array"], id="uplinks-not-table"),
    pytest.param(
        '[policy]\nname = "x"\n',
        ["policy: expected an array of tables ([[policy]]), got table"],
        id="policy-not-array",
    ),
    pytest.param("policy = [1]\n", ["policy[0]: expected a table, got integer"], id="policy-item-not-table"),
    # settings
    pytest.param("[settings]\nfoo = 1\n", ["settings.foo: unknown key"], id="settings-unknown-key"),
    pytest.param(
        '[settings]\nrule_priority = "10000"\n',
        ["settings.rule_priority: expected an integer, got string"],
        id="rule-priority-string",
    ),
    pytest.param(
        "[settings]\nrule_priority = true\n",
        ["settings.rule_priority: expected an integer, got boolean"],
        id="rule-priority-bool-is-not-int",
    ),
    pytest.param(
        "[settings]\nrule_priority = 10000.0\n",
        ["settings.rule_priority: expected an integer, got float"],
        id="rule-priority-float",
    ),
    pytest.param(
        "[settings]\nrule_priority = 32000\n",
        ["settings.rule_priority: range 32000-32999 overlaps the kernel's rules at 32766-32767"],
        id="rule-priority-overlaps-main",
    ),
    pytest.param(
        "[settings]\nrule_priority = 31767\n",
        ["settings.rule_priority: range 31767-32766 overlaps the kernel's rules at 32766-32767"],
        id="rule-priority-touches-main",
    ),
    pytest.param(
        "[settings]\nrule_priority = 0\n",
        ["settings.rule_priority: range 0-999 overlaps the kernel's rule at 0"],
        id="rule-priority-zero",
    ),
    pytest.param(
        "[settings]\nrule_priority = -5\n",
        ["settings.rule_priority: -5 is out of range 1-4294966296"],
        id="rule-priority-negative",
    ),
    pytest.param(
        "[settings]\nrule_priority = 4294966297\n",
        ["settings.rule_priority: 4294966297 is out of range 1-4294966296"],
        id="rule-priority-past-u32",
    ),
    pytest.param(
        "[settings]\nmark_mask = 0\n", ["settings.mark_mask: 0x00000000 has no bits set"], id="mark-mask-zero"
    ),
    pytest.param(
        "[settings]\nmark_mask = 0x100000000\n",
        ["settings.mark_mask: 0x100000000 does not fit in 32 bits"],
        id="mark-mask-too-wide",
    ),
    pytest.param(
        "[settings]\nmark_mask = -1\n",
        ["settings.mark_mask: -0x1 does not fit in 32 bits"],
        id="mark-mask-negative",
    ),
    pytest.param(
        "[settings]\nmark_mask = 0x00ff00f0\n",
        ["settings.mark_mask: 0x00ff00f0 is not contiguous"],
        id="mark-mask-not-contiguous",
    ),
    pytest.param(
        "[settings]\nmark_mask = 0.5\n",
        ["settings.mark_mask: expected an integer, got float"],
        id="mark-mask-float",
    ),
    pytest.param(
        "[settings]\nresync = 30\n",
        ['settings.resync: expected a duration with a unit such as "2s", got 30'],
        id="resync-bare-number",
    ),
    pytest.param(
        '[settings]\nresync = "30"\n',
        ['settings.resync: expected a duration with a unit such as "2s", got "30"'],
        id="resync-string-without-unit",
    ),
    pytest.param(
        "[settings]\nresync = true\n",
        ['settings.resync: expected a duration with a unit such as "2s", got boolean'],
        id="resync-bool",
    ),
    pytest.param(
        '[settings]\nresync = "0s"\n', ["settings.resync: 0s must be greater than 0"], id="resync-zero"
    ),
    pytest.param(
        '[settings]\nkeep_main_routes = "yes"\n',
        ["settings.keep_main_routes: expected a boolean, got string"],
        id="keep-main-routes-string",
    ),
    pytest.param(
        '[settings]\non_stop = "stop"\n',
        ['settings.on_stop: expected "flush" or "keep", got "stop"'],
        id="on-stop-unknown",
    ),
    # uplinks
    pytest.param(
        '[uplinks.wan1]\nintreface = "eth0"\ntable = 101\nmark = 1\n',
        ["uplinks.wan1.intreface: unknown key", "uplinks.wan1.interface: required"],
        id="uplink-typo",
    ),
    pytest.param(
        "[uplinks.wan1]\n",
        ["uplinks.wan1.interface: required", "uplinks.wan1.table: required", "uplinks.wan1.mark: required"],
        id="uplink-required",
    ),
    pytest.param(
        "[uplinks]\nwan1 = 5\n", ["uplinks.wan1: expected a table, got integer"], id="uplink-not-table"
    ),
    pytest.param(
        '[uplinks."wan 1"]\ninterface = "eth0"\ntable = 101\nmark = 1\n',
        ["uplinks.\"wan 1\": \"wan 1\" is not a valid uplink name (1-32 letters, digits, '_' or '-')"],
        id="uplink-name-space",
    ),
    pytest.param(
        f'[uplinks.{"w" * 33}]\ninterface = "eth0"\ntable = 101\nmark = 1\n',
        [
            f'uplinks.{"w" * 33}: "{"w" * 33}" is not a valid uplink name (1-32 letters, digits, \'_\' or \'-\')'
        ],
        id="uplink-name-too-long",
    ),
    pytest.param(
        WAN1.replace('"eth0"', '"eth0/1"'),
        ["uplinks.wan1.interface: \"eth0/1\" is not a valid interface name (contains '/')"],
        id="ifname-slash",
    ),
    pytest.param(
        WAN1.replace('"eth0"', '"averyverylongname"'),
        ['uplinks.wan1.interface: "averyverylongname" is not a valid interface name (longer than 15 bytes)'],
        id="ifname-too-long",
    ),
    pytest.param(
        WAN1.replace('"eth0"', '".."'),
        ["uplinks.wan1.interface: \"..\" is not a valid interface name ('.' and '..' are not allowed)"],
        id="ifname-dotdot",
    ),
    pytest.param(
        WAN1.replace('"eth0"', '"eth 0"'),
        ['uplinks.wan1.interface: "eth 0" is not a valid interface name (contains whitespace)'],
        id="ifname-space",
    ),
    pytest.param(
        WAN1.replace('"eth0"', '"eth0:1"'),
        ["uplinks.wan1.interface: \"eth0:1\" is not a valid interface name (contains ':')"],
        id="ifname-colon",
    ),
    pytest.param(
        WAN1.replace('"eth0"', '""'),
        ['uplinks.wan1.interface: "" is not a valid interface name (empty)'],
        id="ifname-empty",
    ),
    pytest.param(
        WAN1.replace('"eth0"', "0"),
        ["uplinks.wan1.interface: expected a string, got integer"],
        id="ifname-int",
    ),
    pytest.param(
        WAN1.replace("101", "254"), ["uplinks.wan1.table: 254 is a reserved table (main)"], id="table-main"
    ),
    pytest.param(
        WAN1.replace("101", "253"),
        ["uplinks.wan1.table: 253 is a reserved table (default)"],
        id="table-default",
    ),
    pytest.param(
        WAN1.replace("101", "255"), ["uplinks.wan1.table: 255 is a reserved table (local)"], id="table-local"
    ),
    pytest.param(
        WAN1.replace("101", "0"), ["uplinks.wan1.table: 0 is a reserved table (unspec)"], id="table-0"
    ),
    pytest.param(
        WAN1.replace("101", "4294967296"),
        ["uplinks.wan1.table: 4294967296 is out of range 1-4294967295"],
        id="table-past-u32",
    ),
    pytest.param(
        WAN1.replace("mark = 1", "mark = 0"), ["uplinks.wan1.mark: mark 0 means unmarked"], id="mark-0"
    ),
    pytest.param(
        WAN1.replace("mark = 1", "mark = -1"), ["uplinks.wan1.mark: -1 is negative"], id="mark-negative"
    ),
    pytest.param(
        WAN1 + WAN2.replace("mark = 2", "mark = 300"),
        ["uplinks.wan2.mark: 300 does not fit in mark_mask 0x00ff0000 (max 255)"],
        id="mark-too-big-spec",
    ),
    pytest.param(
        "[settings]\nmark_mask = 0x3\n" + WAN1.replace("mark = 1", "mark = 4"),
        ["uplinks.wan1.mark: 4 does not fit in mark_mask 0x00000003 (max 3)"],
        id="mark-too-big-small-mask",
    ),
    pytest.param(
        "[settings]\nmark_mask = 0x00ff00f0\n" + WAN1.replace("mark = 1", "mark = 4096"),
        ["settings.mark_mask: 0x00ff00f0 is not contiguous"],
        id="mark-not-checked-against-invalid-mask",
    ),
    pytest.param(
        WAN1 + WAN2.replace("102", "101"),
        ["uplinks.wan2.table: 101 already used by uplinks.wan1"],
        id="duplicate-table",
    ),
    pytest.param(
        WAN1 + WAN2.replace("mark = 2", "mark = 1"),
        ["uplinks.wan2.mark: 1 already used by uplinks.wan1"],
        id="duplicate-mark",
    ),
    pytest.param(
        WAN1 + WAN2.replace('"eth1"', '"eth0"'),
        ['uplinks.wan2.interface: "eth0" already used by uplinks.wan1'],
        id="duplicate-interface",
    ),
    pytest.param(
        WAN1 + 'gateway = "2001:db8::1"\n',
        ["uplinks.wan1.gateway: 2001:db8::1 is an IPv6 address, it belongs in gateway6"],
        id="gateway-v6",
    ),
    pytest.param(
        WAN1 + 'gateway6 = "192.0.2.1"\n',
        ["uplinks.wan1.gateway6: 192.0.2.1 is an IPv4 address, it belongs in gateway"],
        id="gateway6-v4",
    ),
    pytest.param(
        WAN1 + 'gateway = "dhcp"\n',
        ['uplinks.wan1.gateway: expected "auto", "none" or an IPv4 address, got "dhcp"'],
        id="gateway-word",
    ),
    pytest.param(
        WAN1 + 'gateway6 = "fe80::1%eth0"\n',
        [
            'uplinks.wan1.gateway6: "fe80::1%eth0" has a zone index; leave it out, the uplink\'s interface is used'
        ],
        id="gateway6-zone",
    ),
    pytest.param(
        WAN1 + 'gateway = "0.0.0.0"\n',
        ["uplinks.wan1.gateway: 0.0.0.0 cannot be a gateway: it is the unspecified address"],
        id="gateway-unspecified",
    ),
    pytest.param(
        WAN1 + 'masquerade = "yes"\n',
        ["uplinks.wan1.masquerade: expected a boolean, got string"],
        id="masquerade-string",
    ),
    # checks
    pytest.param(
        WAN1 + 'check = "icmp"\n', ["uplinks.wan1.check: expected a table, got string"], id="check-not-table"
    ),
    pytest.param(
        WAN1 + "[uplinks.wan1.check]\n", ["uplinks.wan1.check.targets: required"], id="check-targets-required"
    ),
    pytest.param(
        WAN1 + "[uplinks.wan1.check]\ntargets = []\n",
        ["uplinks.wan1.check.targets: must not be empty"],
        id="check-targets-empty",
    ),
    pytest.param(
        WAN1 + '[uplinks.wan1.check]\ntargets = "192.0.2.1"\n',
        ["uplinks.wan1.check.targets: expected an array, got string"],
        id="check-targets-not-array",
    ),
    pytest.param(
        WAN1 + '[uplinks.wan1.check]\ntargets = ["192.0.2.1", "router"]\n',
        ['uplinks.wan1.check.targets[1]: "router" is not an IP address'],
        id="check-target-not-address",
    ),
    pytest.param(
        WAN1 + '[uplinks.wan1.check]\ntargets = ["192.0.2.1", "192.0.2.1"]\n',
        ["uplinks.wan1.check.targets[1]: 192.0.2.1 is already listed at targets[0]"],
        id="check-target-duplicate",
    ),
    pytest.param(
        WAN1 + 'gateway6 = "none"\n[uplinks.wan1.check]\ntargets = ["192.0.2.1", "2001:db8::1"]\n',
        ['uplinks.wan1.check.targets[1]: 2001:db8::1 is IPv6 but gateway6 is "none"'],
        id="check-v6-target-without-v6",
    ),
    pytest.param(
        CHECK + 'method = "udp"\n',
        ['uplinks.wan1.check.method: expected "icmp", "tcp:PORT", "http://HOST/PATH", "https://HOST/PATH" or "dns:NAME", got "udp"'],
        id="check-method-unknown",
    ),
    pytest.param(
        CHECK + 'method = "tcp:0"\n',
        ["uplinks.wan1.check.method: port 0 is out of range 1-65535"],
        id="check-method-port-0",
    ),
    pytest.param(
        CHECK + 'method = "tcp:70000"\n',
        ["uplinks.wan1.check.method: port 70000 is out of range 1-65535"],
        id="check-method-port-big",
    ),
    pytest.param(
        CHECK + 'interval = "1"\n',
        ['uplinks.wan1.check.interval: expected a duration with a unit such as "2s", got "1"'],
        id="check-interval-no-unit",
    ),
    pytest.param(
        CHECK + 'timeout = "2s"\n',
        ["uplinks.wan1.check.timeout: 2s is longer than interval 1s"],
        id="check-timeout-over-default-interval",
    ),
    pytest.param(
        CHECK + 'interval = "500ms"\ntimeout = "0.75s"\n',
        ["uplinks.wan1.check.timeout: 0.75s is longer than interval 500ms"],
        id="check-timeout-over-interval",
    ),
    pytest.param(
        CHECK + "down_after = 0\n",
        ["uplinks.wan1.check.down_after: 0 is less than 1"],
        id="check-down-after-0",
    ),
    pytest.param(
        CHECK + 'up_after = "3"\n',
        ["uplinks.wan1.check.up_after: expected an integer, got string"],
        id="check-up-after-string",
    ),
    pytest.param(
        CHECK + "retries = 3\n", ["uplinks.wan1.check.retries: unknown key"], id="check-unknown-key"
    ),
    # policy names and targets
    pytest.param(
        UPLINKS + '[[policy]]\nuplinks = ["wan1"]\n', ["policy[0].name: required"], id="policy-name-required"
    ),
    pytest.param(
        UPLINKS + '[[policy]]\nname = 5\nuplinks = ["wan1"]\n',
        ["policy[0].name: expected a string, got integer"],
        id="policy-name-int",
    ),
    pytest.param(
        UPLINKS + '[[policy]]\nname = "a b"\nprot = "tcp"\nuplinks = ["wan1"]\n',
        [
            "policy[0].name: \"a b\" is not a valid policy name (1-64 letters, digits, '_', '.', ':' or '-')",
            "policy[0].prot: unknown key",
        ],
        id="policy-name-invalid",
    ),
    pytest.param(
        policy('uplinks = ["wan1"]', "ssh")
        + policy('uplinks = ["wan1"]', "web")[len(UPLINKS) :]
        + policy('uplinks = ["wan2"]', "ssh")[len(UPLINKS) :],
        ["policy[2] (ssh).name: duplicate of policy[0]"],
        id="policy-name-duplicate",
    ),
    pytest.param(
        policy('prot = "tcp"\nuplinks = ["wan1"]', "ssh"),
        ["policy[0] (ssh).prot: unknown key"],
        id="policy-typo",
    ),
    pytest.param(
        policy('uplinks = ["wan1"]', "web") + policy('uplinks = ["wan3", "wan1"]', "ssh")[len(UPLINKS) :],
        ['policy[1] (ssh).uplinks[0]: unknown uplink "wan3"'],
        id="policy-unknown-uplink-spec",
    ),
    pytest.param(
        policy('uplinks = ["wan1", "wan2", "wan1"]'),
        ['policy[0] (x).uplinks[2]: "wan1" is already listed at uplinks[0]'],
        id="policy-uplinks-duplicate",
    ),
    pytest.param(
        policy("uplinks = []"), ["policy[0] (x).uplinks: must not be empty"], id="policy-uplinks-empty"
    ),
    pytest.param(
        policy('uplinks = "wan1"'),
        ["policy[0] (x).uplinks: expected an array, got string"],
        id="policy-uplinks-str",
    ),
    pytest.param(
        policy("uplinks = [1]"),
        ["policy[0] (x).uplinks[0]: expected an uplink name or a table of weights, got integer"],
        id="policy-uplinks-int",
    ),
    pytest.param(
        policy('uplinks = ["wan1"]\nbalance = { wan1 = 1 }'),
        ["policy[0] (x): give one of uplinks, balance or action, not uplinks and balance"],
        id="policy-uplinks-and-balance",
    ),
    pytest.param(
        policy('fallback = "drop"'),
        ["policy[0] (x): one of uplinks, balance or action is required"],
        id="policy-no-target",
    ),
    pytest.param(
        policy("balance = { wan1 = 0, wan2 = 1001 }"),
        [
            "policy[0] (x).balance.wan1: 0 is out of range 1-1000",
            "policy[0] (x).balance.wan2: 1001 is out of range 1-1000",
        ],
        id="balance-weights",
    ),
    pytest.param(
        policy("balance = { wan1 = 1, wan3 = 1 }"),
        ['policy[0] (x).balance.wan3: unknown uplink "wan3"'],
        id="balance-unknown-uplink",
    ),
    pytest.param(policy("balance = {}"), ["policy[0] (x).balance: must not be empty"], id="balance-empty"),
    pytest.param(
        policy('balance = ["wan1"]'),
        ["policy[0] (x).balance: expected a table, got array"],
        id="balance-array",
    ),
    pytest.param(
        policy('balance = { wan1 = "3" }'),
        ["policy[0] (x).balance.wan1: expected an integer, got string"],
        id="balance-weight-string",
    ),
    # matchers
    pytest.param(
        failover('proto = "tpc"'),
        [
            'policy[0] (x).proto: unknown protocol "tpc" '
            "(known: tcp, udp, icmp, icmpv6, sctp, udplite, gre, esp, ah; or a number 0-255)"
        ],
        id="proto-unknown-name",
    ),
    pytest.param(
        failover("proto = 256"), ["policy[0] (x).proto: 256 is out of range 0-255"], id="proto-too-big"
    ),
    pytest.param(
        failover("proto = true"),
        ["policy[0] (x).proto: expected a protocol name or number, got boolean"],
        id="proto-bool",
    ),
    pytest.param(
        policy('uplinks = ["wan1"]\ndport = [22, "2299-2200"]', "ssh"),
        ["policy[0] (ssh).dport[1]: range 2299-2200 is reversed"],
        id="dport-reversed-spec",
    ),
    pytest.param(
        failover("dport = 0"), ["policy[0] (x).dport: 0 is out of range 1-65535"], id="dport-scalar-0"
    ),
    pytest.param(
        failover('sport = ["1-70000"]'),
        ["policy[0] (x).sport[0]: 70000 is out of range 1-65535"],
        id="sport-range-big",
    ),
    pytest.param(
        failover('dport = ["ssh"]'),
        ['policy[0] (x).dport[0]: "ssh" is not a port or a range "lo-hi"'],
        id="dport-name",
    ),
    pytest.param(
        failover("dport = [true]"),
        ['policy[0] (x).dport[0]: expected an integer or a "lo-hi" string, got boolean'],
        id="dport-bool",
    ),
    pytest.param(failover("dport = []"), ["policy[0] (x).dport: must not be empty"], id="dport-empty"),
    pytest.param(
        failover('proto = "icmp"\ndport = [22]\nsport = [22]'),
        [
            "policy[0] (x).dport: ports need proto tcp, udp, sctp or udplite, not icmp",
            "policy[0] (x).sport: ports need proto tcp, udp, sctp or udplite, not icmp",
        ],
        id="ports-with-icmp",
    ),
    pytest.param(
        failover("proto = 47\ndport = 22"),
        ["policy[0] (x).dport: ports need proto tcp, udp, sctp or udplite, not gre"],
        id="ports-with-proto-number",
    ),
    pytest.param(
        failover('daddr = ["192.0.2.1/24"]'),
        ["policy[0] (x).daddr[0]: 192.0.2.1/24 has host bits set"],
        id="daddr-host-bits",
    ),
    pytest.param(
        failover('saddr = ["10.0.0.0/8", "lan"]'),
        ['policy[0] (x).saddr[1]: "lan" is not an IP address or CIDR'],
        id="saddr-not-cidr",
    ),
    pytest.param(
        failover('daddr = ["fe80::/64%eth0"]'),
        ['policy[0] (x).daddr[0]: "fe80::/64%eth0" is not an IP address or CIDR'],
        id="daddr-garbled-zone",
    ),
    pytest.param(
        failover('daddr = ["fe80::1%eth0"]'),
        ['policy[0] (x).daddr[0]: "fe80::1%eth0" has a zone index, which cannot be matched'],
        id="daddr-zone",
    ),
    pytest.param(
        failover('iif = "lan/0"'),
        ["policy[0] (x).iif: \"lan/0\" is not a valid interface name (contains '/')"],
        id="iif-invalid",
    ),
    pytest.param(
        failover("uid = [-1]"), ["policy[0] (x).uid[0]: -1 is out of range 0-4294967294"], id="uid-negative"
    ),
    pytest.param(
        failover('uid = ["alice"]'),
        ['policy[0] (x).uid[0]: "alice" is not a uid or a range "lo-hi"'],
        id="uid-name",
    ),
    pytest.param(
        failover('gid = ["200-100"]'), ["policy[0] (x).gid[0]: range 200-100 is reversed"], id="gid-reversed"
    ),
    pytest.param(failover('cgroup = "/"'), ["policy[0] (x).cgroup: must not be empty"], id="cgroup-root"),
    pytest.param(
        failover('cgroup = "system.slice/../x"'),
        ['policy[0] (x).cgroup: "system.slice/../x" is not a normalized cgroup path'],
        id="cgroup-dotdot",
    ),
    pytest.param(
        failover("cgroup = 1"), ["policy[0] (x).cgroup: expected a string, got integer"], id="cgroup-int"
    ),
    pytest.param(
        failover('family = "inet"'),
        ['policy[0] (x).family: expected "ipv4", "ipv6" or "any", got "inet"'],
        id="family-unknown",
    ),
    pytest.param(
        failover('fallback = "reject"'),
        ['policy[0] (x).fallback: expected "main" or "drop", got "reject"'],
        id="fallback-unknown",
    ),
    # contradictions
    pytest.param(
        failover('family = "ipv4"\ndaddr = ["2001:db8::/32"]'),
        ["policy[0] (x): family is ipv4 but daddr has only IPv6 networks"],
        id="family-v4-daddr-v6",
    ),
    pytest.param(
        failover('family = "ipv6"\nsaddr = ["10.0.0.0/8"]'),
        ["policy[0] (x): family is ipv6 but saddr has only IPv4 networks"],
        id="family-v6-saddr-v4",
    ),
    pytest.param(
        failover('family = "ipv6"\nproto = "icmp"'),
        ["policy[0] (x): family is ipv6 but proto icmp is IPv4 only"],
        id="icmp-ipv6",
    ),
    pytest.param(
        failover('family = "ipv4"\nproto = "icmpv6"'),
        ["policy[0] (x): family is ipv4 but proto icmpv6 is IPv6 only"],
        id="icmpv6-ipv4",
    ),
    pytest.param(
        failover('proto = "icmp"\ndaddr = ["::/0"]'),
        ["policy[0] (x): proto icmp is IPv4 only but daddr has only IPv6 networks"],
        id="icmp-daddr-v6",
    ),
    pytest.param(
        failover('daddr = ["10.0.0.0/8"]\nsaddr = ["fd00::/8"]'),
        ["policy[0] (x): daddr has only IPv4 networks but saddr has only IPv6 networks"],
        id="daddr-v4-saddr-v6",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES)
def test_error_lines(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_all_errors_reported_in_file_order() -> None:
    # Policies written before uplinks and settings are still reported after them:
    # the order is settings, uplinks in file order, policies in file order.
    text = """\
[[policy]]
name = "first"
proto = "tpc"
uplinks = ["wan9"]

[[policy]]
uplinks = ["wan1"]

[uplinks.wan1]
interface = "eth0"
table = 254
mark = 1

[uplinks.wan2]
mark = 1
interface = "eth0"
table = 102

[settings]
resync = "soon"
on_stop = "halt"
"""
    assert errors_of(text) == [
        'settings.resync: expected a duration with a unit such as "2s", got "soon"',
        'settings.on_stop: expected "flush" or "keep", got "halt"',
        "uplinks.wan1.table: 254 is a reserved table (main)",
        "uplinks.wan2.mark: 1 already used by uplinks.wan1",
        'uplinks.wan2.interface: "eth0" already used by uplinks.wan1',
        'policy[0] (first).proto: unknown protocol "tpc" '
        "(known: tcp, udp, icmp, icmpv6, sctp, udplite, gre, esp, ah; or a number 0-255)",
        'policy[0] (first).uplinks[0]: unknown uplink "wan9"',
        "policy[1].name: required",
    ]


def test_broken_uplink_is_still_known_to_policies() -> None:
    # One error for the uplink, none cascading into the policy that names it.
    assert errors_of(WAN1.replace("101", "254") + '[[policy]]\nname = "x"\nuplinks = ["wan1"]\n') == [
        "uplinks.wan1.table: 254 is a reserved table (main)"
    ]


def test_toml_syntax_error_is_one_line() -> None:
    lines = errors_of("[settings]\nresync = \n")
    assert len(lines) == 1
    assert lines[0].startswith("toml: ")


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("0.1ms", 0.0001),
        ("90s", 90.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2", 'expected a duration with a unit such as "2s", got "2"'),
        ("", 'expected a duration with a unit such as "2s", got ""'),
        ("2 s", 'expected a duration with a unit such as "2s", got "2 s"'),
        ("2sec", 'expected a duration with a unit such as "2s", got "2sec"'),
        ("1d", 'expected a duration with a unit such as "2s", got "1d"'),
        ("s", 'expected a duration with a unit such as "2s", got "s"'),
        ("1e3s", 'expected a duration with a unit such as "2s", got "1e3s"'),
        ("0s", "0s must be greater than 0"),
        ("0ms", "0ms must be greater than 0"),
        ("-1s", "-1s must be greater than 0"),
    ],
)
def test_parse_duration_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == message


# --------------------------------------------------------------------------- values and defaults


def test_empty_file_is_all_defaults() -> None:
    assert parse("") == Config(settings=Settings(), uplinks=(), policies=())
    assert from_dict({}) == parse("")


def test_settings_defaults() -> None:
    assert Settings() == Settings(
        mark_mask=0x00FF0000, rule_priority=10000, resync=30.0, keep_main_routes=True, on_stop="flush"
    )
    assert parse("[settings]\n").settings == Settings()


@pytest.mark.parametrize(
    ("mask", "shift", "mark_max", "mark", "value"),
    [
        (0x00FF0000, 16, 255, 1, 0x10000),
        (0x00FF0000, 16, 255, 255, 0xFF0000),
        (0x0000FF00, 8, 255, 2, 0x200),
        (0x00000001, 0, 1, 1, 1),
        (0xF0000000, 28, 15, 3, 0x30000000),
        (0xFFFFFFFF, 0, 0xFFFFFFFF, 7, 7),
    ],
)
def test_mark_arithmetic(mask: int, shift: int, mark_max: int, mark: int, value: int) -> None:
    settings = parse(f"[settings]\nmark_mask = {mask:#x}\n").settings
    assert (settings.shift, settings.mark_max, settings.mark_value(mark)) == (shift, mark_max, value)


def test_mark_value_outside_mask() -> None:
    with pytest.raises(ValueError):
        Settings().mark_value(256)


def test_settings_values() -> None:
    settings = parse(
        '[settings]\nmark_mask = 0xff00\nrule_priority = 40000\nresync = "1m"\n'
        'keep_main_routes = false\non_stop = "keep"\n'
    ).settings
    assert settings == Settings(
        mark_mask=0xFF00, rule_priority=40000, resync=60.0, keep_main_routes=False, on_stop="keep"
    )


@pytest.mark.parametrize("priority", [1, 30767, 32768, 0xFFFFFFFF - 999])
def test_rule_priority_edges_accepted(priority: int) -> None:
    assert parse(f"[settings]\nrule_priority = {priority}\n").settings.rule_priority == priority


def test_uplink_defaults() -> None:
    config = parse(WAN1)
    assert config.uplinks == (
        Uplink(
            name="wan1",
            interface="eth0",
            table=101,
            mark=1,
            gateway=Gateway("auto"),
            gateway6=Gateway("auto"),
            masquerade=True,
            check=None,
        ),
    )


@pytest.mark.parametrize(
    ("lines", "field", "expected"),
    [
        ('gateway = "192.0.2.1"', "gateway", Gateway("address", ipaddress.IPv4Address("192.0.2.1"))),
        ('gateway = "none"', "gateway", Gateway("none")),
        ('gateway6 = "fe80::1"', "gateway6", Gateway("address", ipaddress.IPv6Address("fe80::1"))),
        ('gateway6 = "none"', "gateway6", Gateway("none")),
        ("masquerade = false", "masquerade", False),
        ('interface = "wg-home.1"', "interface", "wg-home.1"),
        ("table = 4294967295", "table", 0xFFFFFFFF),
        ("mark = 255", "mark", 255),
    ],
)
def test_uplink_values(lines: str, field: str, expected: object) -> None:
    base = '[uplinks.wan_1]\ninterface = "eth0"\ntable = 101\nmark = 1\n'
    key = lines.split(" = ")[0]
    text = "\n".join(line for line in base.splitlines() if not line.startswith(f"{key} ")) + f"\n{lines}\n"
    (uplink,) = parse(text).uplinks
    assert getattr(uplink, field) == expected


def test_check_defaults() -> None:
    assert parse(CHECK).uplink("wan1").check == Check(
        targets=(ipaddress.IPv4Address("192.0.2.1"),),
        method="icmp",
        port=None,
        interval=1.0,
        timeout=1.0,
        down_after=3,
        up_after=3,
    )


def test_check_values() -> None:
    text = WAN1 + (
        "[uplinks.wan1.check]\n"
        'targets = ["192.0.2.1", "2001:db8::53"]\n'
        'method = "tcp:443"\ninterval = "5s"\ntimeout = "5s"\ndown_after = 2\nup_after = 10\n'
    )
    assert parse(text).uplink("wan1").check == Check(
        targets=(ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv6Address("2001:db8::53")),
        method="tcp",
        port=443,
        interval=5.0,
        timeout=5.0,
        down_after=2,
        up_after=10,
    )


def test_uplink_lookup() -> None:
    config = parse(UPLINKS)
    assert config.uplink("wan2").table == 102
    with pytest.raises(KeyError):
        config.uplink("wan3")


def test_policy_defaults() -> None:
    (parsed,) = parse(failover("")).policies
    assert parsed == Policy(
        index=0,
        name="x",
        proto=None,
        dport=(),
        sport=(),
        daddr=(),
        saddr=(),
        iif=None,
        uid=(),
        gid=(),
        cgroup=None,
        family="any",
        uplinks=("wan1",),
        balance=(),
        fallback="main",
    )


@pytest.mark.parametrize(
    ("body", "field", "expected"),
    [
        ('proto = "udp"', "proto", 17),
        ('proto = "sctp"', "proto", 132),
        ('proto = "icmpv6"', "proto", 58),
        ("proto = 47", "proto", 47),
        ("dport = 22", "dport", ((22, 22),)),
        ('dport = "1000-2000"', "dport", ((1000, 2000),)),
        ('sport = [53, "5353", "1-1024"]', "sport", ((53, 53), (5353, 5353), (1, 1024))),
        (
            'daddr = ["192.0.2.7", "2001:db8::/32"]',
            "daddr",
            (ipaddress.IPv4Network("192.0.2.7/32"), ipaddress.IPv6Network("2001:db8::/32")),
        ),
        ('saddr = "fd00::1"', "saddr", (ipaddress.IPv6Network("fd00::1/128"),)),
        ('iif = "lan0"', "iif", "lan0"),
        ('uid = [0, "1000-1999"]', "uid", ((0, 0), (1000, 1999))),
        ("gid = 100", "gid", ((100, 100),)),
        ('cgroup = "/system.slice/backup.service"', "cgroup", "system.slice/backup.service"),
        ('family = "ipv6"', "family", "ipv6"),
        ('fallback = "drop"', "fallback", "drop"),
    ],
)
def test_policy_values(body: str, field: str, expected: object) -> None:
    (parsed,) = parse(failover(body)).policies
    assert getattr(parsed, field) == expected


def test_policy_balance_keeps_written_order() -> None:
    (parsed,) = parse(policy("balance = { wan2 = 1, wan1 = 3 }")).policies
    assert (parsed.uplinks, parsed.balance) == ((), (("wan2", 1), ("wan1", 3)))


V4 = (socket.AF_INET,)
V6 = (socket.AF_INET6,)
BOTH = (socket.AF_INET, socket.AF_INET6)


@pytest.mark.parametrize(
    ("body", "families"),
    [
        ("", BOTH),
        ('family = "ipv4"', V4),
        ('family = "ipv6"', V6),
        ('proto = "icmp"', V4),
        ('proto = "icmpv6"', V6),
        ("proto = 1", V4),
        ('proto = "tcp"', BOTH),
        ('daddr = ["10.0.0.0/8"]', V4),
        ('saddr = ["fd00::/8"]', V6),
        ('daddr = ["10.0.0.0/8", "fd00::/8"]', BOTH),
        ('daddr = ["10.0.0.0/8", "fd00::/8"]\nsaddr = ["fd00::/8"]', V6),
        ('family = "ipv4"\ndaddr = ["10.0.0.0/8", "fd00::/8"]', V4),
    ],
)
def test_policy_families(body: str, families: tuple[int, ...]) -> None:
    (parsed,) = parse(failover(body)).policies
    assert parsed.families == families


# --------------------------------------------------------------------------- documented example


def test_spec_example_verbatim_is_valid_with_a_warning() -> None:
    # The documented example shows every key in one policy; iif (forwarded traffic) together
    # with uid/cgroup (local sockets) can match no packet: valid, but warned about.
    config = parse(DOC_EXAMPLE)
    assert config.warnings == (
        "policy[0] (ssh): iif matches forwarded traffic, uid/gid/cgroup only local sockets; no packet can match both",
    )


@pytest.mark.parametrize("body", ['iif = "lan0"\nuid = [1000]', 'iif = "lan0"\ncgroup = "system.slice"'])
def test_iif_with_local_socket_match_is_a_warning(body: str) -> None:
    assert parse(failover(body)).warnings == (
        "policy[0] (x): iif matches forwarded traffic, uid/gid/cgroup only local sockets; no packet can match both",
    )


def test_spec_example_values() -> None:
    text = DOC_EXAMPLE.replace(DOC_IIF_LINE, "")
    assert text != DOC_EXAMPLE
    config = parse(text)
    assert config.settings == Settings(
        mark_mask=0x00FF0000, rule_priority=10000, resync=30.0, keep_main_routes=True, on_stop="flush"
    )
    assert config.settings.mark_value(config.uplink("wan1").mark) == 0x10000
    assert config.settings.mark_value(config.uplink("wan2").mark) == 0x20000
    assert config.uplinks == (
        Uplink(
            name="wan1",
            interface="eth0",
            table=101,
            mark=1,
            gateway=Gateway("auto"),
            gateway6=Gateway("auto"),
            masquerade=True,
            check=Check(
                targets=(ipaddress.IPv4Address("192.0.2.1"),),
                method="icmp",
                port=None,
                interval=1.0,
                timeout=1.0,
                down_after=3,
                up_after=3,
            ),
        ),
        Uplink(name="wan2", interface="eth1", table=102, mark=2),
    )
    assert config.policies == (
        Policy(
            index=0,
            name="ssh",
            proto=6,
            dport=((22, 22), (2200, 2299)),
            sport=(),
            daddr=(ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")),
            saddr=(),
            iif=None,
            uid=((1000, 1000),),
            gid=(),
            cgroup="system.slice/backup.service",
            family="any",
            uplinks=("wan2", "wan1"),
            balance=(),
            fallback="main",
        ),
        Policy(
            index=1,
            name="balanced-downloads",
            proto=None,
            dport=((443, 443),),
            sport=(),
            daddr=(),
            saddr=(),
            iif=None,
            uid=(),
            gid=(),
            cgroup=None,
            family="any",
            uplinks=(),
            balance=(("wan1", 3), ("wan2", 1)),
            fallback="main",
        ),
    )
    assert [p.families for p in config.policies] == [BOTH, BOTH]


# --------------------------------------------------------------------------- load and the shipped file


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "markrouted.toml"
    path.write_text(UPLINKS)
    assert load(path) == parse(UPLINKS)
    assert load(str(path)) == parse(UPLINKS)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.errors == ("No such file or directory",)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert info.value.errors == ("not a regular file (a directory)",)


def test_load_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.errors == ("toml: invalid UTF-8 at byte 5",)


def test_config_error_is_picklable() -> None:
    error = ConfigError(["a: one", "b: two"])
    copy = pickle.loads(pickle.dumps(error))
    assert copy.errors == ("a: one", "b: two")
    assert str(copy) == "a: one\nb: two"


def test_shipped_config_is_harmless() -> None:
    config = load(SHIPPED)
    assert config == Config(settings=Settings(), uplinks=(), policies=())


def _uncommented(text: str) -> str:
    """The shipped file with its '#key = value' and '#[table]' lines enabled."""
    return re.sub(r"(?m)^#(?=[\[A-Za-z])", "", text)


def test_shipped_config_examples_are_valid() -> None:
    config = parse(_uncommented(SHIPPED.read_text()))
    assert [u.name for u in config.uplinks] == ["wan1", "wan2"]
    assert len(config.policies) >= 2


def test_shipped_config_shows_every_key() -> None:
    data = tomllib.loads(_uncommented(SHIPPED.read_text()))
    assert set(data) == {"settings", "uplinks", "policy", "sets"}
    assert set(data["sets"]["video"]) == {"elements", "domains", "dns_timeout"}  # files: a path must exist
    assert set(data["settings"]) == {"mark_mask", "rule_priority", "resync", "keep_main_routes", "on_stop",
                                    "metrics", "hooks", "hook_timeout"}
    uplink_keys = set().union(*(set(u) for u in data["uplinks"].values()))
    assert uplink_keys == {"interface", "table", "mark", "gateway", "gateway6", "masquerade", "check"}
    assert set(data["uplinks"]["wan1"]["check"]) == {
        "targets",
        "method",
        "interval",
        "timeout",
        "down_after",
        "up_after",
        "success",
        "min_targets",
        "window",
        "max_loss",
        "max_rtt",
        "recover_loss",
        "recover_rtt",
        "tls_verify",
        "tls_ca",
        "damp_flaps",
        "damp_within",
        "damp_hold",
    }
    policy_keys = set().union(*(set(p) for p in data["policy"]))
    assert policy_keys == {
        "name",
        "proto",
        "dport",
        "sport",
        "daddr",
        "saddr",
        "iif",
        "uid",
        "gid",
        "cgroup",
        "family",
        "uplinks",
        "balance",
        "fallback",
        "failback",
        "sticky",
        "sticky_timeout",
        "action",
    }


@pytest.mark.parametrize(("value", "expected"), [('"any"', "any"), ('"all"', "all")])
def test_check_success(value: str, expected: str) -> None:
    text = ('[uplinks.wan1]\ninterface = "eth0"\ntable = 101\nmark = 1\n'
            f'[uplinks.wan1.check]\ntargets = ["192.0.2.1"]\nsuccess = {value}\n')
    check = parse(text).uplinks[0].check
    assert check is not None and check.success == expected


def test_check_success_default_and_error() -> None:
    base = '[uplinks.wan1]\ninterface = "eth0"\ntable = 101\nmark = 1\n[uplinks.wan1.check]\ntargets = ["192.0.2.1"]\n'
    check = parse(base).uplinks[0].check
    assert check is not None and check.success == "any"
    with pytest.raises(ConfigError) as exc:
        parse(base + 'success = "most"\n')
    assert exc.value.errors == ('uplinks.wan1.check.success: expected "any" or "all", got "most"',)
