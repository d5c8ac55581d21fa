"""kernel/conntrack.py's label-filtered count and clear (``failback = "migrate"``).

In a namespace of the test's own, UDP datagrams over lo make conntrack entries
whose ct mark (under the mask) and ct label bit an nft rule sets by source port,
as markrouted's policy rules would: the mark of one uplink, with and without a
migrating policy's label bit, plus a foreign bit outside the mask. ``count``
must see exactly the labelled entries of that mark; ``clear_labelled`` must
delete exactly those and leave every other entry (another policy's flow on the
same uplink, the same policy's flow on another uplink) in place.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from tests.conftest import ROOT

MASK = 0x00FF0000
UPLINK, OTHER = 0x00020000, 0x00010000
LABEL = 127
FOREIGN = 0x00000004  # outside the mask: someone else's bit, must not matter

#: source port -> (ct mark, label bit set)
FLOWS = {
    40001: (UPLINK | FOREIGN, True),  # the migrating policy on the uplink: cleared
    40002: (UPLINK, True),            # the same: cleared
    40003: (UPLINK, False),           # another policy's flow on the same uplink: kept
    40004: (OTHER, True),             # the migrating policy on another uplink: kept
    40005: (UPLINK | FOREIGN, False),  # kept
}

RULES = "\n".join(
    f"udp sport {sport} ct mark set {mark:#x}" + (f" ct label set {LABEL}" if label else "")
    for sport, (mark, label) in FLOWS.items()
)

PROGRAM = """
import json, socket, sys
from markrouted.kernel import conntrack
mode = sys.argv[1]
if mode == "send":
    for sport in json.loads(sys.argv[2]):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", sport))
        s.sendto(b"x", ("127.0.0.1", 9))
        s.close()
elif mode == "count":
    print(conntrack.count(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
else:
    print(conntrack.clear_labelled(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""


def run(netns: Any, *args: str) -> str:
    env = f"PYTHONPATH={ROOT}"
    return netns.sh("env", env, os.environ.get("PYTHON", "/usr/bin/python3"), "-c", PROGRAM, *args).strip()


def sports(netns: Any) -> set[int]:
    out = netns.sh("conntrack", "-L", "-p", "udp", check=False)
    found = set()
    for line in out.splitlines():
        for word in line.split():
            if word.startswith("sport=") and int(word[6:]) in FLOWS:
                found.add(int(word[6:]))
                break
    return found


def test_count_and_clear_by_label(netns: Any) -> None:
    netns.sh("nft", "-f", "-", input=(
        "table inet labeltest { chain out { type filter hook output priority 0; policy accept;\n"
        + RULES + "\n}\n}\n"))
    run(netns, "send", json.dumps(list(FLOWS)))
    assert sports(netns) == set(FLOWS)
    assert run(netns, "count", str(UPLINK), str(MASK), str(LABEL)) == "2"
    assert run(netns, "count", str(OTHER), str(MASK), str(LABEL)) == "1"
    assert run(netns, "clear", str(UPLINK), str(MASK), str(LABEL)) == "2"
    assert sports(netns) == {40003, 40004, 40005}
    assert run(netns, "count", str(UPLINK), str(MASK), str(LABEL)) == "0"
    assert run(netns, "clear", str(UPLINK), str(MASK), str(LABEL)) == "0"


def test_label_bitmap() -> None:
    from markrouted.kernel.conntrack import has_label

    labels = bytearray(16)
    labels[127 // 8] |= 1 << (127 % 8)  # little-endian words: bit n in byte n // 8 (as on x86-64, arm64)
    if socket.htonl(1) == 1:
        labels = bytearray(b"".join(bytes(labels[i:i + 4])[::-1] for i in range(0, 16, 4)))
    assert has_label(bytes(labels), 127)
    assert not has_label(bytes(labels), 126)
    assert not has_label(None, 127)
