"""structlog set-up: journald fields under systemd, readable lines on a terminal.

Events are named by what happened ("route added", "uplink down"); their
key/values become journal fields with a ``MARKROUTED_`` prefix
(``MARKROUTED_UPLINK=wan1``, ``MARKROUTED_EVENT=uplink down``), so
``journalctl -u markrouted MARKROUTED_UPLINK=wan1`` finds an uplink's story.

Values can carry text from the config file or the kernel (interface names, error
lines). Both renderers escape every value (markrouted.text.escape), so no newline,
terminal escape sequence or other control character reaches the terminal or the
journal raw, and a log line cannot be forged.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
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


def _message(event: str, kv: dict[str, Any]) -> str:
    parts = [event]
    for key in ("uplink", "policy", "object", "reason", "error"):
        if key in kv and kv[key] not in (None, ""):
            parts.append(f"{key}={escape(str(kv[key]))}")
    return " ".join(parts) if len(parts) == 1 else parts[0] + ": " + " ".join(parts[1:])


class JournalRenderer:
    """Sends each event to journald with structured fields; drops it afterwards."""

    def __init__(self) -> None:
        from systemd import journal  # type: ignore[attr-defined]  # no type information

        self.send = journal.send

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        kv = dict(event_dict)
        event = escape(str(kv.pop("event", "")))
        kv.pop("timestamp", None)
        level = kv.pop("level", method)
        fields = {_field(k): escape(str(v)) for k, v in kv.items() if v is not None}
        fields["MARKROUTED_EVENT"] = event
        self.send(_message(event, kv), PRIORITY=str(_PRIORITY.get(level, 6)),
                  SYSLOG_IDENTIFIER="markrouted", **fields)
        raise structlog.DropEvent


def _plain_renderer(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
    kv = dict(event_dict)
    event = escape(str(kv.pop("event", "")))
    level = kv.pop("level", method)
    ts = kv.pop("timestamp", None)
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
