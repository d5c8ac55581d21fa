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
            "tiers": [list(t) for t in p.tiers],
            "tier": p.tier,
            "action": p.action,
            "failback": p.failback,
        }
        for p in desired.policies
    }


def sets_document(desired: DesiredState) -> dict[str, Any]:
    """Each named nft set: its family, and its element count (static) or null (dnsmasq's, read live).

    The sticky-source sets (filled by the packet path) are the policies' business,
    not sets of the config: they are not listed.
    """
    assert desired.nft is not None
    return {
        s.name: {"family": f"ipv{s.version}", "dnsmasq": s.dynamic,
                 "elements": None if s.dynamic else len(s.elements)}
        for s in desired.nft.sets if not s.learns
    }


def with_dnsmasq_counts(doc: dict[str, Any], held: Mapping[str, int]) -> None:
    """Fill in how many addresses dnsmasq holds now in each domain set (read from the kernel)."""
    for name, item in (doc.get("sets") or {}).items():
        if item.get("dnsmasq") and name in held:
            item["elements"] = held[name]


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
    if desired.nft is not None and desired.nft.sets:
        doc["sets"] = sets_document(desired)
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


def _target_figures(t: Mapping[str, Any]) -> str:
    """A target's figures over the window: loss, mean/min/max RTT, jitter."""
    probes = t.get("probes")
    if not isinstance(probes, int) or probes == 0:
        return ""
    text = f"; over {probes} probes: loss {float(t.get('loss') or 0) * 100:.0f} %"
    if t.get("rtt_mean_ms") is not None:
        text += (f", rtt {t['rtt_mean_ms']:.1f} ms (min {t['rtt_min_ms']:.1f}, max {t['rtt_max_ms']:.1f})"
                 f", jitter {float(t.get('jitter_ms') or 0):.1f} ms")
    return text


def tiers_text(tiers: list[list[str]], carrying: int | None) -> str:
    """``[a+b] > c``: tiers in order, members of a balanced tier joined by '+', the carrying one bracketed."""
    parts = ["+".join(tier) for tier in tiers]
    if carrying is not None and 0 <= carrying < len(parts) and len(parts) > 1:
        parts[carrying] = f"[{parts[carrying]}]"
    return " > ".join(parts) or "-"


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
                lines.append(f"    {target}: {result}{_target_figures(t)}")
    sets = doc.get("sets") or {}
    if sets:
        rows = [["SET", "FAMILY", "ELEMENTS", "FILLED BY"]]
        for name, item in sets.items():
            count = item.get("elements")
            rows.append([name, str(item.get("family", "")), "?" if count is None else str(count),
                         "dnsmasq (domains)" if item.get("dnsmasq") else "addresses and files (merged intervals)"])
        lines.append("")
        lines.extend(_table(rows))
    policies = doc.get("policies", {})
    if policies:
        counted = any("flows" in p for p in policies.values())
        rows = [["POLICY", "CARRIED BY", "TIERS", "FALLBACK"] + (["FLOWS", "PACKETS", "BYTES"] if counted else [])]
        for name, p in policies.items():
            if p.get("action"):
                rows.append([name, f"bypass ({p['action']})", "-", "-"])
                continue
            active = ", ".join(p["active"]) if p["active"] else f"none ({p['fallback']})"
            rows.append([name, active, tiers_text(p.get("tiers") or [], p.get("tier")), p["fallback"]]
                        + ([_amount(p.get(k)) for k in ("flows", "packets", "bytes")] if counted else []))
        lines.append("")
        lines.extend(_table(rows))
    return "\n".join(lines)
