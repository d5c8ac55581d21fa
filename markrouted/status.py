"""The status document (``markrouted status --json``) and its human rendering.

The daemon writes the same document atomically to ``/run/markrouted/status.json``
after every reconcile; without a daemon, ``status`` computes it from what
``apply`` would install now. One shape for both, so scripts need not care.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from .model import DesiredState, family_name

RUN_DIR = "/run/markrouted"
STATUS_FILE = "status.json"


def run_dir() -> str:
    """Where the daemon publishes its view (MARKROUTED_RUN_DIR overrides, for tests and labs)."""
    return os.environ.get("MARKROUTED_RUN_DIR", RUN_DIR)


def _policies(desired: DesiredState) -> dict[str, Any]:
    return {
        p.name: {
            "active": list(p.active),
            "fallback": p.fallback,
            "families": [family_name(f) for f in p.families],
        }
        for p in desired.policies
    }


def document(desired: DesiredState, in_sync: bool, with_policies: bool = True, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "in_sync": in_sync,
        "uplinks": {
            u.name: {
                "interface": u.interface,
                "state": u.state,
                "reason": u.reason,
                "gateway": u.gateway,
                "gateway6": u.gateway6,
                "table": u.table,
                "mark": f"{u.mark:#010x}",
                "families": [family_name(f) for f in u.families],
            }
            for u in desired.uplinks
        },
    }
    if with_policies:
        doc["policies"] = _policies(desired)
    doc.update(extra)
    return doc


class Publisher:
    """Writes the daemon's document after each pass, cheaply.

    With a thousand policies their part of the document is most of its cost,
    and it changes only when a policy moves: it is serialised again only then.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._policies: object = None
        self._policies_json = "{}"

    def write(self, desired: DesiredState, in_sync: bool, **extra: Any) -> None:
        if desired.policies != self._policies:
            self._policies = desired.policies
            self._policies_json = json.dumps(_policies(desired), separators=(",", ":"))
        head = json.dumps(document(desired, in_sync, with_policies=False, **extra), separators=(",", ":"))
        write_text_atomic(head[:-1] + ',"policies":' + self._policies_json + "}", self.directory)


def write_text_atomic(text: str, directory: str | None = None) -> None:
    """Replace the status file in one rename: a reader never sees half a document."""
    import tempfile  # the daemon's only: status, plan and the rest never write

    directory = directory or run_dir()
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".status.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(directory, STATUS_FILE))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_live(directory: str | None = None) -> dict[str, Any] | None:
    """The running daemon's document, or None when no daemon runs."""
    try:
        with open(os.path.join(directory or run_dir(), STATUS_FILE)) as f:
            doc: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    pid = doc.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    if not _same_netns(pid):
        return None  # a daemon in another network namespace (a container, a test) is not ours
    return doc


def _same_netns(pid: int) -> bool:
    """Whether ``pid`` shares our network namespace (True when that cannot be told)."""
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
        ours = os.stat("/proc/self/ns/net")
    except OSError:
        return True
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def with_counters(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with what the kernel counted: per policy packets, bytes and flows; per uplink the same.

    A policy's packets and bytes are those of the new flows its rules
    classified (its named counter); its flows, the conntrack entries carrying
    the marks of the uplinks it uses now. An uplink's packets and bytes are
    every packet of the flows markrouted sent through it, both directions
    (its ``set_`` and ``restore_`` chains). Reading them needs CAP_NET_ADMIN:
    without it (or without a table) the document says why and has no counts.
    """
    from .model import counter_name
    from .kernel.counters import count_flows, read_counters
    from .kernel.errors import KernelError

    uplinks: dict[str, Any] = doc.get("uplinks") or {}
    policies: dict[str, Any] = doc.get("policies") or {}
    try:
        counts = read_counters()
        marks = {name: int(str(u.get("mark", "0")), 16) for name, u in uplinks.items()}
        mask = int(str(doc.get("mark_mask") or "0x00ff0000"), 16)
        flows = count_flows(sorted(set(marks.values())), mask)
    except (KernelError, OSError, ValueError) as exc:
        doc["counters_error"] = str(exc)
        return doc
    by_uplink = {name: flows.get(mark, 0) for name, mark in marks.items()}
    for name, u in uplinks.items():
        packets, nbytes = counts.get(counter_name("uplink", name), (0, 0))
        u.update(packets=packets, bytes=nbytes, flows=by_uplink[name])
    for name, p in policies.items():
        packets, nbytes = counts.get(counter_name("policy", name), (0, 0))
        p.update(packets=packets, bytes=nbytes, flows=sum(by_uplink.get(a, 0) for a in p.get("active", ())))
    return doc


def _amount(value: object) -> str:
    """A count for the table: 1234567 -> 1.2M."""
    if not isinstance(value, int):
        return "-"
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def render(doc: Mapping[str, Any]) -> str:
    lines = []
    source = "daemon (pid %s)" % doc["pid"] if doc.get("pid") else "computed (no daemon running)"
    sync = "in sync" if doc.get("in_sync") else "NOT in sync"
    lines.append(f"markrouted: {sync}; {source}")
    if doc.get("config_error"):
        lines.append("config reload refused, still running the previous config:")
        lines.extend("  " + e for e in str(doc["config_error"]).splitlines())
    if doc.get("last_error"):
        lines.append(f"last error: {doc['last_error']}")
    if doc.get("counters_error"):
        lines.append(f"counters not read: {doc['counters_error']}")
    uplinks = doc.get("uplinks", {})
    if uplinks:
        counted = any("flows" in u for u in uplinks.values())
        rows = [["UPLINK", "STATE", "INTERFACE", "GATEWAY", "GATEWAY6", "TABLE", "MARK"]
                + (["FLOWS", "PACKETS", "BYTES"] if counted else []) + ["WHY"]]
        for name, u in uplinks.items():
            rows.append([name, u["state"], u["interface"], str(u.get("gateway") or "-"),
                         str(u.get("gateway6") or "-"), str(u["table"]), str(u["mark"])]
                        + ([_amount(u.get(k)) for k in ("flows", "packets", "bytes")] if counted else [])
                        + [u.get("reason", "")])
        lines.append("")
        lines.extend(_table(rows))
    else:
        lines.append("no uplinks configured: nothing installed")
    health = doc.get("health") or {}
    if health:
        lines.append("")
        lines.append("health checks:")
        now = time.time()
        for name, h in health.items():
            state = "pending" if h.get("pending") else ("up" if h.get("up") else "down")
            since = h.get("since")
            ago = f" for {_ago(now - since)}" if isinstance(since, (int, float)) and since > 0 else ""
            lines.append(f"  {name}: {state}{ago}, loss {float(h.get('loss', 0)):.0%} over the last "
                         f"{h.get('rounds', 0)} rounds; {h.get('reason', '')}")
            for target, t in (h.get("targets") or {}).items():
                result = f"{t['rtt_ms']} ms" if t.get("ok") else f"failed: {t.get('error') or 'no answer'}"
                lines.append(f"    {target}: {result}")
    policies = doc.get("policies", {})
    if policies:
        counted = any("flows" in p for p in policies.values())
        rows = [["POLICY", "CARRIED BY", "FALLBACK"] + (["FLOWS", "PACKETS", "BYTES"] if counted else [])]
        for name, p in policies.items():
            active = ", ".join(p["active"]) if p["active"] else f"none ({p['fallback']})"
            rows.append([name, active, p["fallback"]]
                        + ([_amount(p.get(k)) for k in ("flows", "packets", "bytes")] if counted else []))
        lines.append("")
        lines.extend(_table(rows))
    return "\n".join(lines)
