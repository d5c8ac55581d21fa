"""Typed kernel errors: what the caller can do about a failure depends on its kind."""

from __future__ import annotations


class KernelError(Exception):
    """A kernel operation failed; usually transient (retry, resync later)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class PermissionDenied(KernelError):
    """Not allowed: markrouted lacks CAP_NET_ADMIN. Terminal until restarted."""


class Unsupported(KernelError):
    """The kernel or a library lacks something markrouted needs (nf_tables, the binding)."""


#: What every refused netlink or nftables request says.
NEEDS_NET_ADMIN = "permission denied (markrouted needs CAP_NET_ADMIN)"


def denied(what: str) -> PermissionDenied:
    """The error for a request the kernel refused for lack of CAP_NET_ADMIN."""
    return PermissionDenied(f"{what}: {NEEDS_NET_ADMIN}")
