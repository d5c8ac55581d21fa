"""The Prometheus endpoint: ``[settings] metrics = "ADDR:PORT"`` serves ``GET /metrics``.

Plain text exposition format 0.0.4, written here rather than with
python3-prometheus-client: that library serves from a thread of its own
(``http.server``), keeps a registry of objects per label set and renders them
through generic collectors; markrouted's figures already live in the daemon
(the last pass, the health monitor), and a scrape with 1,000 policies and 16
uplinks must answer within 10 ms from the daemon's own asyncio loop without
a second copy of the state. The format is a few lines of text; the help and
type lines and the label escaping are all it asks for (``bench/metrics.py``,
``tests/unit/test_metrics.py``).

What is read where:

* ``Metrics`` (the state the daemon feeds: transitions, reconcile durations,
  drift repairs, conntrack clears, reloads, probe rounds) is updated by the
  daemon's observer (``daemon/observer.py``) as things happen;
* the kernel's counters (policies', uplinks') are read on a scrape, in a
  thread, at most once per ``COUNTERS_MAX_AGE``: concurrent scrapes share one
  read (``CounterCache``); a failed read leaves those series out, never the
  scrape.

The server never blocks the loop: each connection is a task with a deadline
on its request, and an error in one (a client gone, garbage) ends that
connection only.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .config import Config
from .model import counter_name
from .model import DesiredState

__all__ = ["COUNTERS_MAX_AGE", "CounterCache", "Metrics", "MetricsServer", "render"]

#: seconds a counter reading serves further scrapes (one read per scrape interval at most)
COUNTERS_MAX_AGE = 5.0
#: the reconcile-duration histogram's upper bounds, seconds
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: probe rounds a per-target loss ratio is computed over
LOSS_WINDOW = 20
REQUEST_TIMEOUT = 5.0
REQUEST_MAX = 8192
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: name -> (type, help): every metric this endpoint can serve (contrib/ is checked against it)
METRICS: Mapping[str, tuple[str, str]] = {
    "markrouted_uplink_up": ("gauge", "1 while the uplink carries new flows, else 0."),
    "markrouted_uplink_transitions_total": ("counter", "Uplink state changes since the daemon started, by new state."),
    "markrouted_probe_rtt_seconds": ("gauge", "Round-trip time of the last health probe to a target (absent: no answer)."),
    "markrouted_probe_loss_ratio": ("gauge", "Share of the last health probes to a target that failed."),
    "markrouted_policy_uplink": ("gauge", "1 for each uplink carrying the policy's new flows now, 0 for its others."),
    "markrouted_policy_packets_total": ("counter", "Packets classified by the policy's rules (first packets of new flows)."),
    "markrouted_policy_bytes_total": ("counter", "Bytes classified by the policy's rules (first packets of new flows)."),
    "markrouted_uplink_packets_total": ("counter", "Packets of the flows markrouted sends through the uplink, both directions."),
    "markrouted_uplink_bytes_total": ("counter", "Bytes of the flows markrouted sends through the uplink, both directions."),
    "markrouted_uplink_flows": ("gauge", "Conntrack entries carrying the uplink's mark."),
    "markrouted_reconcile_seconds": ("histogram", "Duration of the reconcile passes."),
    "markrouted_drift_repairs_total": ("counter", "Passes that repaired state changed behind markrouted's back."),
    "markrouted_conntrack_cleared_total": ("counter", "Conntrack clears of an uplink that went down."),
    "markrouted_config_reload_success": ("gauge", "1 if the last config reload succeeded, 0 if it was refused."),
    "markrouted_config_reload_timestamp_seconds": ("gauge", "Unix time of the last successful config load."),
    "markrouted_in_sync": ("gauge", "1 when the last pass converged: the kernel holds the desired state."),
    "markrouted_counters_read_errors_total": ("counter", "Scrapes whose kernel counter reading failed."),
}


def label(value: str) -> str:
    """A label value escaped for the exposition format."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


class Metrics:
    """What the daemon counted since it started (fed by the observer)."""

    def __init__(self) -> None:
        self.transitions: dict[tuple[str, str], int] = {}
        self.buckets = [0] * len(BUCKETS)
        self.reconcile_count = 0
        self.reconcile_sum = 0.0
        self.drift_repairs = 0
        self.conntrack_cleared: dict[str, int] = {}
        self.reload_success = 1
        self.reload_time = time.time()
        self.in_sync = False
        self.counter_errors = 0
        #: uplink -> target -> recent probe results (True: answered) and the last RTT
        self.probes: dict[str, dict[str, tuple[deque[bool], float | None]]] = {}
        self._seen: dict[str, object] = {}

    def transition(self, uplink: str, to: str) -> None:
        self.transitions[uplink, to] = self.transitions.get((uplink, to), 0) + 1

    def reconciled(self, seconds: float) -> None:
        self.reconcile_count += 1
        self.reconcile_sum += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1

    def probe_round(self, uplink: str, last: Iterable[Any]) -> None:
        """A health machine's last round (``health.TargetResult``s), counted once per round."""
        last = tuple(last)
        if self._seen.get(uplink) is last:
            return
        self._seen[uplink] = last
        targets = self.probes.setdefault(uplink, {})
        for r in last:
            window, _rtt = targets.get(r.target, (deque(maxlen=LOSS_WINDOW), None))
            window.append(bool(r.ok))
            targets[r.target] = (window, r.rtt if r.ok else None)


def render(metrics: Metrics, config: Config, desired: DesiredState | None,
           counts: Mapping[str, tuple[int, int]] | None, flows: Mapping[int, int] | None) -> str:
    """The exposition text of one scrape."""
    out: list[str] = []
    add = out.append

    def head(name: str) -> None:
        kind, text = METRICS[name]
        add(f"# HELP {name} {text}\n# TYPE {name} {kind}")

    uplinks = desired.uplinks if desired is not None else ()
    head("markrouted_uplink_up")
    for u in uplinks:
        add(f'markrouted_uplink_up{{uplink="{label(u.name)}"}} {1 if u.state == "up" else 0}')
    head("markrouted_uplink_transitions_total")
    for (name, to), n in sorted(metrics.transitions.items()):
        add(f'markrouted_uplink_transitions_total{{uplink="{label(name)}",to="{to}"}} {n}')
    head("markrouted_probe_rtt_seconds")
    for name, targets in metrics.probes.items():
        for target, (_window, rtt) in targets.items():
            if rtt is not None:
                add(f'markrouted_probe_rtt_seconds{{uplink="{label(name)}",target="{label(target)}"}} {rtt:.6f}')
    head("markrouted_probe_loss_ratio")
    for name, targets in metrics.probes.items():
        for target, (window, _rtt) in targets.items():
            loss = 1 - sum(window) / len(window) if window else 0.0
            add(f'markrouted_probe_loss_ratio{{uplink="{label(name)}",target="{label(target)}"}} {loss:.4g}')
    head("markrouted_policy_uplink")
    if desired is not None:
        carriers = {p.name: p.active for p in desired.policies}
        for p in config.policies:
            active = carriers.get(p.name, ())
            quoted = label(p.name)
            for name in (p.uplinks or tuple(n for n, _ in p.balance)):
                add(f'markrouted_policy_uplink{{policy="{quoted}",uplink="{label(name)}"}} '
                    f'{1 if name in active else 0}')
    if counts is not None:
        for kind, index in (("packets", 0), ("bytes", 1)):
            head(f"markrouted_policy_{kind}_total")
            for p in config.policies:
                value = counts.get(counter_name("policy", p.name))
                if value is not None:
                    add(f'markrouted_policy_{kind}_total{{policy="{label(p.name)}"}} {value[index]}')
        for kind, index in (("packets", 0), ("bytes", 1)):
            head(f"markrouted_uplink_{kind}_total")
            for cu in config.uplinks:
                value = counts.get(counter_name("uplink", cu.name))
                if value is not None:
                    add(f'markrouted_uplink_{kind}_total{{uplink="{label(cu.name)}"}} {value[index]}')
    if flows is not None:
        head("markrouted_uplink_flows")
        for u in uplinks:
            add(f'markrouted_uplink_flows{{uplink="{label(u.name)}"}} {flows.get(u.mark, 0)}')
    head("markrouted_reconcile_seconds")
    for bound, n in zip(BUCKETS, metrics.buckets):
        add(f'markrouted_reconcile_seconds_bucket{{le="{bound}"}} {n}')
    add(f'markrouted_reconcile_seconds_bucket{{le="+Inf"}} {metrics.reconcile_count}')
    add(f"markrouted_reconcile_seconds_sum {metrics.reconcile_sum:.6f}")
    add(f"markrouted_reconcile_seconds_count {metrics.reconcile_count}")
    head("markrouted_drift_repairs_total")
    add(f"markrouted_drift_repairs_total {metrics.drift_repairs}")
    head("markrouted_conntrack_cleared_total")
    for cu in config.uplinks:
        add(f'markrouted_conntrack_cleared_total{{uplink="{label(cu.name)}"}} '
            f'{metrics.conntrack_cleared.get(cu.name, 0)}')
    head("markrouted_config_reload_success")
    add(f"markrouted_config_reload_success {metrics.reload_success}")
    head("markrouted_config_reload_timestamp_seconds")
    add(f"markrouted_config_reload_timestamp_seconds {metrics.reload_time:.3f}")
    head("markrouted_in_sync")
    add(f"markrouted_in_sync {1 if metrics.in_sync else 0}")
    head("markrouted_counters_read_errors_total")
    add(f"markrouted_counters_read_errors_total {metrics.counter_errors}")
    return "\n".join(out) + "\n"


Reading = tuple[dict[str, tuple[int, int]], dict[int, int]]


class CounterCache:
    """The kernel's counters, read in a thread at most once per ``max_age``; scrapes share a read."""

    def __init__(self, read: Callable[[], Reading], max_age: float = COUNTERS_MAX_AGE) -> None:
        self.read, self.max_age = read, max_age
        self._value: Reading | None = None
        self._at = -1e18
        self._reading: asyncio.Future[Reading] | None = None
        self.reads = 0
        self._thread: ThreadPoolExecutor | None = None  # its own: never waits behind other work

    async def get(self) -> Reading:
        now = time.monotonic()
        if self._value is not None and now - self._at < self.max_age:
            return self._value
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        reading = self._reading
        return await asyncio.shield(reading)

    async def _read(self) -> Reading:
        try:
            self.reads += 1
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="markrouted-counters")
            value = await asyncio.get_running_loop().run_in_executor(self._thread, self.read)
            self._value, self._at = value, time.monotonic()
            return value
        finally:
            self._reading = None

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None


def kernel_reader(marks: Callable[[], tuple[list[int], int]]) -> Callable[[], Reading]:
    """Reads the table's named counters and the flows per uplink mark (in the calling thread)."""

    def read() -> Reading:
        from .kernel.counters import count_flows, read_counters

        values, mask = marks()
        return read_counters(), count_flows(values, mask)

    return read


class MetricsServer:
    """``GET /metrics`` over HTTP/1.0 on the daemon's loop."""

    def __init__(self, scrape: Callable[[], Awaitable[str]], log: Any) -> None:
        self.scrape, self.log = scrape, log
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, address: tuple[str, int]) -> None:
        """Listen; OSError (address in use, not local) is the caller's to report."""
        host, port = address
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True,
                                                 limit=REQUEST_MAX)
        self.address = address

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
            self.address = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            line = request.split(b"\r\n", 1)[0].split()
            if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
                await self._answer(writer, 405, "method not allowed\n")
            elif line[1].split(b"?", 1)[0] != b"/metrics":
                await self._answer(writer, 404, "markrouted: the metrics are at /metrics\n")
            else:
                body = await self.scrape()
                await self._answer(writer, 200, body, head=line[0] == b"HEAD")
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception as exc:  # one bad scrape never takes the daemon down
            self.log.warning("metrics scrape failed", error=str(exc))
        finally:
            writer.close()

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, body: str, head: bool = False) -> None:
        data = body.encode()
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
        writer.write(f"HTTP/1.0 {status} {reason}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
        if not head:
            writer.write(data)
        await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)


def shown_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_error(address: tuple[str, int], exc: OSError) -> str:
    """What a failed bind of the endpoint means, in words."""
    import errno

    where = f"metrics: cannot listen on {shown_address(address)}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no interface of this host has that address"
    return f"{where}: {exc.strerror or exc}"


def listen_problem(address: tuple[str, int]) -> str | None:
    """Why the endpoint could not listen at ``address`` now (None: it could), by binding a socket."""
    import socket

    host, port = address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        return bind_error(address, exc)
    finally:
        sock.close()
    return None
