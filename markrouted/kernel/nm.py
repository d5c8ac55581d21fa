"""What NetworkManager will do to markrouted's uplinks: is it running here, and its connection keyfiles.

This module only reads: the judgement is ``markrouted.collisions.nm_findings``.
Profiles NetworkManager keeps in other formats (ifupdown, generated in memory)
leave route-table and never-default at their defaults, which are harmless.
"""

from __future__ import annotations

import glob
import os

from .networkd import find_process, read_files

KEYFILE_DIRS = ["/usr/lib/NetworkManager/system-connections", "/run/NetworkManager/system-connections",
                "/etc/NetworkManager/system-connections"]


def nm_state(proc: str = "/proc") -> tuple[bool, list[tuple[str, str]]]:
    """(running here, its connection keyfiles as (path, text)): the arguments of ``collisions.nm_findings``."""
    paths = [p for d in KEYFILE_DIRS for p in sorted(glob.glob(os.path.join(glob.escape(d), "*.nmconnection")))]
    files, _ = read_files(paths)
    return find_process("NetworkManager", proc) is not None, files
