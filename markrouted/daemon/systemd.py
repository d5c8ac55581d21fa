"""systemd's service protocol: sd_notify messages and the watchdog interval.

The daemon is ``Type=notify``: systemd learns from these messages when it is
ready (after the first pass), reloading, stopping, and what its one-line
status is. Outside systemd every call is a no-op, so the same code runs in a
terminal and in the tests (which pass a recording notifier instead).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, Protocol


class Notify(Protocol):
    """What the daemon needs of a notifier: ``notify(READY="1", STATUS="...")``."""

    def __call__(self, **fields: str) -> None: ...


class Notifier:
    """sd_notify through systemd-python; silent when not run by systemd."""

    def __init__(self) -> None:
        self.socket = os.environ.get("NOTIFY_SOCKET")
        self._notify: Callable[[str], Any] | None = None
        if not self.socket:
            return
        try:
            from systemd import daemon  # type: ignore[attr-defined]  # no type information

            self._notify = daemon.notify
        except ImportError:
            self._notify = self._stdlib

    def _stdlib(self, text: str) -> None:
        # the documented protocol, for hosts without systemd-python
        assert self.socket
        addr = "\0" + self.socket[1:] if self.socket.startswith("@") else self.socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(text.encode())

    def __call__(self, **fields: str) -> None:
        if self._notify is None:
            return
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            self._notify(text)
        except OSError:
            pass


def watchdog_interval() -> float | None:
    """``WatchdogSec=`` in seconds when it is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None
