"""kernel/nl.py's request socket: a wait for the kernel always ends.

The daemon's reads of the kernel and the failover's raw batch wait on this
socket for answers. An answer that never comes (lost to a full receive
buffer, or a request the kernel silently ignores) must end in a KernelError
that says what was awaited, so the daemon can retry or resync; a hang would
freeze routing repairs for good. A netlink socket needs no privilege, so
this runs anywhere: the kernel itself is the silent peer.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Callable

import pytest

from markrouted.kernel import nl
from markrouted.kernel.errors import KernelError

RTM_GETLINK = 18
IFINFOMSG = struct.Struct("=BxHiII")


def outcome_within(seconds: float, wait: Callable[[], object]) -> BaseException | None:
    """What ``wait`` raised, run in a thread; fails the test if it is still waiting after ``seconds``.

    A hang must fail this test rather than hang the suite.
    """
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(exc)
        else:
            result.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting for the kernel after {seconds} s: the wait has no deadline")
    return result[0]


def test_the_default_wait_is_bounded() -> None:
    sock = nl.Socket(socket.NETLINK_ROUTE)
    try:
        assert 0 < sock.timeout <= 30
        assert sock.sock.gettimeout() == sock.timeout
    finally:
        sock.close()


def test_a_request_the_kernel_never_answers_ends_in_kernel_error() -> None:
    """Without NLM_F_REQUEST (and without NLM_F_ACK) the kernel drops a message without a word."""
    sock = nl.Socket(socket.NETLINK_ROUTE, timeout=0.3)
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 1, 0, 0)
    try:
        exc = outcome_within(10, lambda: list(sock.request(RTM_GETLINK, 0, body, "link lookup")))
    finally:
        sock.close()
    assert isinstance(exc, KernelError), exc
    assert str(exc) == "link lookup: no answer from the kernel within 0.3 s"
    assert exc.code == errno.ETIMEDOUT


def test_waiting_for_acks_that_never_come_ends_in_kernel_error() -> None:
    sock = nl.Socket(socket.NETLINK_ROUTE, timeout=0.3)
    try:
        exc = outcome_within(10, lambda: sock.acks({41, 42}, "refill chains pick_1"))
    finally:
        sock.close()
    assert isinstance(exc, KernelError), exc
    assert str(exc) == "refill chains pick_1: no answer from the kernel within 0.3 s"


def test_an_answered_request_is_unaffected() -> None:
    """The deadline bounds silence only: a real dump still completes."""
    sock = nl.Socket(socket.NETLINK_ROUTE, timeout=5)
    try:
        links = list(sock.request(RTM_GETLINK, nl.NLM_F_REQUEST | nl.NLM_F_DUMP,
                                  IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), "link dump"))
    finally:
        sock.close()
    assert links, "every namespace has at least lo"
