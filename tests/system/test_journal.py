"""The journal as an administrator reads it: `journalctl -u markrouted`, `-p warning`, `-x`.

`journalctl -u markrouted` prints MESSAGE only, so after a failover, a failback,
a refused reload and two drifts (an ip rule deleted, the nft table deleted by
`nft`) each of those must be there as a sentence that stands alone, once; `-p
warning` must be exactly the short list of what needed attention; and `-x`
must explain an uplink going down from the catalog the package installed.
The network around the container is test_systemd's (two uplinks, two ISPs, a
server); the service's state is put in place first, so this module runs alone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from .nspawn import Container, poll, run
from .test_systemd import INVALID, TWO_UPLINKS, WITH_SSH, Net, events, wait_event, wait_status

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def net(container: Container) -> Iterator[Net]:
    n = Net(container)
    try:
        n.build()
        yield n
    finally:
        n.stop()


def journal(ct: Container, since: float, *args: str) -> list[str]:
    """``journalctl -u markrouted -o cat ARGS`` since ``since`` (epoch seconds), as lines."""
    out = ct.sh("journalctl", "-u", "markrouted", "--no-pager", "-q", "-o", "cat", f"--since=@{since:.6f}",
                *args).stdout
    return out.splitlines()


def once(lines: list[str], pattern: str) -> str:
    found = [line for line in lines if re.fullmatch(pattern, line)]
    assert len(found) == 1, f"{pattern!r} found {len(found)} times in:\n" + "\n".join(lines)
    return found[0]


def count(ct: Container, since: float, event: str) -> int:
    return len(events(ct, since, MARKROUTED_EVENT=event))


def test_the_story_of_a_failover_a_refusal_and_drift(container: Container, net: Net) -> None:
    ct = container
    ct.sh("systemctl", "stop", "markrouted")
    ct.write("/etc/markrouted.toml", WITH_SSH)
    # the story starts now (not after a cursor: journalctl 252 with -p and --after-cursor
    # skips the first entry that matches when the cursor's own entry does not)
    since = time.time()
    ct.sh("systemctl", "start", "markrouted")
    wait_status(ct, r"^2/2 uplinks up, 3 policies, in sync$")

    # failover: wan2 loses its carrier; web (wan2 first) and ssh (wan2 only) move
    isp2 = f"{ct.name}-isp2"
    run(["ip", "-n", isp2, "link", "set", "cust", "down"])
    try:
        wait_event(ct, since, MARKROUTED_EVENT="uplink down", MARKROUTED_UPLINK="wan2")
        wait_status(ct, r"^1/2 uplinks up, 3 policies, in sync$")
        poll("both policies to move", lambda: count(ct, since, "policy moved") >= 2, deadline=30)
    finally:
        run(["ip", "-n", isp2, "link", "set", "cust", "up"])
    # failback
    wait_event(ct, since, MARKROUTED_EVENT="uplink up", MARKROUTED_UPLINK="wan2")
    wait_status(ct, r"^2/2 uplinks up, 3 policies, in sync$")
    poll("both policies to return", lambda: {e["MARKROUTED_NOW"] for e in events(
        ct, since, MARKROUTED_EVENT="policy moved", MARKROUTED_POLICY="ssh")} >= {"wan2"}, deadline=30)

    # a refused reload: the SIGHUP, the file's change and a second SIGHUP of the same content
    ct.write("/etc/markrouted.toml", INVALID)
    ct.sh("systemctl", "reload", "markrouted")
    wait_status(ct, r"^config reload refused")
    ct.sh("systemctl", "reload", "markrouted")

    # drift: an ip rule deleted from outside, then the nft table deleted with nft
    net.ip(ct.ns, "rule", "del", "priority", "10100", "fwmark", "0x20000/0xff0000", "lookup", "102")
    poll("the rule put back", lambda: count(ct, since, "drift repaired") == 1, deadline=30)
    ct.sh("nft", "delete", "table", "inet", "markrouted")
    poll("the table put back", lambda: count(ct, since, "drift repaired") == 2, deadline=30)
    ct.write("/etc/markrouted.toml", TWO_UPLINKS)  # a valid change: said with its summary
    ct.sh("systemctl", "reload", "markrouted")
    wait_status(ct, r"^2/2 uplinks up, 2 policies, in sync$")

    lines = journal(ct, since)
    once(lines, r"started: 2/2 uplinks up, 3 policies, \d+ kernel objects installed in \d+ ms")
    once(lines, r"uplink wan2 \(wan2\) down: no carrier")
    once(lines, r"policy web moved from wan2 to wan1 \(wan2 down: no carrier\)")
    once(lines, r"policy ssh moved from wan2 to the main table \(no uplink usable\) \(wan2 down: no carrier\)")
    once(lines, r"uplink wan2 \(wan2\) up")
    # back on wan2: in one line, or one per family when IPv6 came back later than IPv4
    for policy, was in (("web", "wan1"), ("ssh", r"the main table \(no uplink usable\)")):
        back = [line for line in lines if line.startswith(f"policy {policy} moved from {was.split(' ')[0]}")]
        assert back in ([f"policy {policy} moved from {was.replace(chr(92), '')} to wan2 (wan2 up)"],) or (
            len(back) == 2 and all(re.search(r"to wan2 for ipv[46] ", line) for line in back)), back
    refused = once(lines, r"config reload refused \(the running config stays\): uplinks\.wan2\.mark: .*")
    rule = once(lines, r"drift repaired: ip rule 10100: from all fwmark 0x20000/0xff0000 lookup 102 proto markrouted"
                       r" was deleted by someone else; put back")
    table = once(lines, r"drift repaired: nft table inet markrouted changed by pid \d+ \(nft\): replaced")
    once(lines, r"config reloaded \((SIGHUP|config file changed)\): 2/2 uplinks up, 2 policies, "
                r"\d+ kernel objects installed( \(\d+ written\))? in \d+ ms")

    # -p warning: exactly what needed attention
    down = "uplink wan2 (wan2) down: no carrier"
    assert journal(ct, since, "-p", "warning") == [down, refused, rule, table]

    # -x: the catalog explains an uplink going down
    explained = ct.sh("journalctl", "-xu", "markrouted", "--no-pager", f"--since=@{since:.6f}").stdout
    assert "Subject: Uplink wan2 is down" in explained, explained
    text = " ".join(explained.replace("\u2591\u2591", " ").split())  # the catalog's lines, unwrapped
    assert "The uplink wan2 (interface wan2) can no longer carry traffic: no carrier." in text, explained
    assert "What markrouted did" in text and "markrouted status" in text
