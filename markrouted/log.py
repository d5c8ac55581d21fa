"""structlog set-up: journald fields under systemd, readable lines on a terminal.

Events are named by what happened ("route added", "uplink down"); their
key/values become journal fields with a ``MARKROUTED_`` prefix
(``MARKROUTED_UPLINK=wan1``, ``MARKROUTED_EVENT=uplink down``), so
``journalctl -u markrouted MARKROUTED_UPLINK=wan1`` finds an uplink's story.

Values can carry text from the config file or the kernel (interface names, error
lines). Both renderers escape every value (markrouted.text.escape), so no newline,
terminal escape sequence or other control character reaches the terminal or the
journal raw, and a log line cannot be forged.

In the journal the MESSAGE is a sentence that stands alone (``journalctl -u
markrouted`` shows nothing else): the caller may compose it and pass it as
``message=`` (not a field), else it is made here from the event's name and
fields. The priority and the catalog's MESSAGE_ID follow the event's name,
whoever logs it: err for refusals and failed writes, warning for what needs
attention, notice for failover, failback and reloads, info for kernel writes.
The catalog (packaging/catalog/markrouted.catalog) explains each MESSAGE_ID
with ``journalctl -x``. On a terminal the line stays ``event  key=value ...``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from .text import escape

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def _field(key: str) -> str:
    return "MARKROUTED_" + "".join(c if c.isalnum() else "_" for c in key).upper()


#: journal priority by event name, whatever level the caller used (syslog numbers)
PRIORITY_OF: dict[str, int] = {
    "config reload refused": 3, "invalid config": 3, "kernel write failed": 3, "reconcile failed, retrying": 3,
    "conntrack clear failed": 3, "flush on stop failed": 3, "cannot start": 3,
    "uplink down": 4, "drift repaired": 4, "uplink held down": 4,
    "uplink up": 5, "policy moved": 5, "config reloaded": 5, "started": 5, "stopped": 5,
    "health check down": 5, "health check up": 5,
    "sysctl changed": 6, "route added": 6, "route changed": 6, "route removed": 6, "rule added": 6,
    "rule removed": 6, "nft table replaced": 6, "nft table removed": 6, "nft chains refilled": 6,
    "conntrack cleared": 6,
}

#: the journal catalog's entries (packaging/catalog/markrouted.catalog), by event name
MESSAGE_IDS: dict[str, str] = {
    "uplink down": "bf3be53eb56f4bcfb6cea681d8c2d527",
    "uplink up": "051333e7e1464145921cbcab86702023",
    "policy moved": "05973fd206be41b7a3acf49503e4afc8",
    "config reload refused": "827ff6f867414ab2910c6217f31550f5",
    "drift repaired": "e43a2eb4f24349e2bd6680b8579a1516",
    "uplink held down": "07cc43c55a7d4de5a08b45fd2c3a996f",
}


def _said(kv: Mapping[str, Any], key: str) -> str:
    value = kv.get(key)
    return "" if value is None else str(value)


def _kernel_write(event: str, kv: Mapping[str, Any]) -> str:
    obj = _said(kv, "object")
    if event == "sysctl changed" and obj.startswith("sysctl "):
        obj = obj[len("sysctl "):]
    text = f"{event}: {obj}"
    if _said(kv, "was"):
        text += f" (was {_said(kv, 'was')})"
    return text + (f" ({_said(kv, 'reason')})" if _said(kv, "reason") else "")


def _uplink(state: str) -> Callable[[str, Mapping[str, Any]], str]:
    def say(event: str, kv: Mapping[str, Any]) -> str:
        name = _said(kv, "uplink")
        dev = f" ({_said(kv, 'interface')})" if _said(kv, "interface") else ""
        reason = _said(kv, "reason")
        return f"uplink {name}{dev} {state}" + (f": {reason}" if reason and reason != "ok" else "")
    return say


def _held(event: str, kv: Mapping[str, Any]) -> str:
    text = f"uplink {_said(kv, 'uplink')} held down"
    if _said(kv, "until"):
        text += f" until {_said(kv, 'until')}"
    if _said(kv, "flaps"):
        text += f": {_said(kv, 'flaps')} flaps" + (f" within {_said(kv, 'within')}" if _said(kv, "within") else "")
    elif _said(kv, "reason"):
        text += f": {_said(kv, 'reason')}"
    return text


def _health(event: str, kv: Mapping[str, Any]) -> str:
    verdict = event.rsplit(" ", 1)[-1]
    text = f"health check of uplink {_said(kv, 'uplink')}: {verdict}"
    reason = _said(kv, "reason")
    return text + (f" ({reason})" if reason else "")


def _conntrack(event: str, kv: Mapping[str, Any]) -> str:
    return (f"conntrack entries of uplink {_said(kv, 'uplink')} deleted ({_said(kv, 'object')}): "
            f"{_said(kv, 'reason') or 'uplink down'}, so its flows take another uplink")


def _stopped(event: str, kv: Mapping[str, Any]) -> str:
    if _said(kv, "on_stop") == "keep":
        return "stopped; the routing stays installed (on_stop = keep)"
    return f"stopped; {_said(kv, 'removed') or 'its'} kernel objects removed (on_stop = flush)"


#: MESSAGE texts of events whose callers do not compose one
FORMATS: dict[str, Callable[[str, Mapping[str, Any]], str]] = {
    **{e: _kernel_write for e in ("sysctl changed", "route added", "route changed", "route removed",
                                  "rule added", "rule removed", "nft table replaced", "nft table removed",
                                  "nft chains refilled")},
    "uplink down": _uplink("down"),
    "uplink up": _uplink("up"),
    "uplink held down": _held,
    "health check down": _health,
    "health check up": _health,
    "conntrack cleared": _conntrack,
    "config reload refused": lambda e, kv: f"config reload refused (the running config stays): {_said(kv, 'error')}",
    "kernel write failed": lambda e, kv: f"kernel write failed (retried with the next pass): {_said(kv, 'error')}",
    "invalid config": lambda e, kv: f"invalid config {_said(kv, 'object')}: {_said(kv, 'error')}",
    "config warning": lambda e, kv: f"config warning: {_said(kv, 'error')}",
    "cannot start": lambda e, kv: f"cannot start: {_said(kv, 'error')}",
    "stopped": _stopped,
    "reconcile failed, retrying": lambda e, kv: (f"reconcile failed, retrying in {_said(kv, 'retry_in')}: "
                                                 f"{_said(kv, 'error')}"),
}


def _generic(event: str, kv: Mapping[str, Any]) -> str:
    parts = [event]
    for key in ("uplink", "policy", "object", "reason", "error"):
        if key in kv and kv[key] not in (None, ""):
            parts.append(f"{key}={kv[key]}")
    return " ".join(parts) if len(parts) == 1 else parts[0] + ": " + " ".join(parts[1:])


def message(event: str, kv: Mapping[str, Any]) -> str:
    """The journal's MESSAGE of an event: the caller's ``message``, or one made from its fields.

    Returned unescaped; the renderer escapes it.
    """
    given = kv.get("message")
    if given:
        return str(given)
    return FORMATS.get(event, _generic)(event, kv)


def priority(event: str, level: str) -> int:
    """The journal priority of an event: by its name when known, else by the level it was logged at."""
    return PRIORITY_OF.get(event, _PRIORITY.get(level, 6))


class JournalRenderer:
    """Sends each event to journald with structured fields; drops it afterwards."""

    def __init__(self) -> None:
        from systemd import journal  # type: ignore[attr-defined]  # no type information

        self.send = journal.send

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        kv = dict(event_dict)
        raw_event = str(kv.pop("event", ""))
        event = escape(raw_event)
        kv.pop("timestamp", None)
        level = kv.pop("level", method)
        text = escape(message(raw_event, kv))
        kv.pop("message", None)
        fields = {_field(k): escape(str(v)) for k, v in kv.items() if v is not None}
        fields["MARKROUTED_EVENT"] = event
        if raw_event in MESSAGE_IDS:
            fields["MESSAGE_ID"] = MESSAGE_IDS[raw_event]
        self.send(text, PRIORITY=str(priority(raw_event, level)), SYSLOG_IDENTIFIER="markrouted", **fields)
        raise structlog.DropEvent


def _plain_renderer(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
    kv = dict(event_dict)
    event = escape(str(kv.pop("event", "")))
    level = kv.pop("level", method)
    ts = kv.pop("timestamp", None)
    kv.pop("message", None)  # the journal's sentence; the terminal shows the fields
    rest = " ".join(f"{escape(str(k))}={escape(str(v))}" for k, v in kv.items() if v not in (None, ""))
    prefix = f"{ts} " if ts else ""
    tag = "" if level == "info" else f"{level}: "
    return f"{prefix}{tag}{event}" + (f"  {rest}" if rest else "")


def _drop_all(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    raise structlog.DropEvent


def setup(mode: str = "auto", level: str = "info", stream: TextIO | None = None) -> Any:
    """Configure structlog; returns a logger. mode: auto | journal | console | quiet."""
    if mode == "auto":
        mode = "journal" if under_journald() else "console"
    processors: list[Any] = [structlog.processors.add_log_level]
    if mode == "journal":
        try:
            processors.append(JournalRenderer())
        except ImportError:
            mode = "console"
    if mode != "journal":
        processors.append(structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False))
        processors.append(_plain_renderer)
    # structlog 22.3 only knows the standard levels (CRITICAL + 1 is a KeyError):
    # quiet mode drops every event in a processor instead
    threshold = logging.CRITICAL if mode == "quiet" else _LEVELS.get(level, logging.INFO)
    if mode == "quiet":
        processors.insert(0, _drop_all)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger()
