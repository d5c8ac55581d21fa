"""Network sysctls through /proc/sys (CAP_NET_ADMIN suffices, no root needed)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .errors import KernelError, PermissionDenied


class Sysctls:
    def __init__(self, root: str = "/proc/sys") -> None:
        self.root = root

    def read(self, paths: Iterable[str]) -> dict[str, str]:
        """Current values of those that exist; a missing one is simply absent."""
        out = {}
        for path in paths:
            try:
                with open(os.path.join(self.root, path), encoding="ascii") as f:
                    out[path] = f.read().strip()
            except OSError:
                continue
        return out

    def write(self, path: str, value: str) -> None:
        try:
            with open(os.path.join(self.root, path), "w", encoding="ascii") as f:
                f.write(value)
        except PermissionError as exc:
            raise PermissionDenied(f"sysctl {path.replace('/', '.')}: permission denied") from exc
        except OSError as exc:
            raise KernelError(f"sysctl {path.replace('/', '.')}: {exc.strerror}", exc.errno) from exc
