"""Watching the config file, so that saving it reloads the daemon.

The directory is watched, not the file: editors and configuration managers
replace a file by writing a new one and renaming it over the old, which a
watch on the old inode would miss. inotify is reached through libc with
ctypes: the standard library has no binding and no package is worth adding
for two calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct


class ConfigWatch:
    """inotify on the config's directory: editors replace files by rename."""

    IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
    IN_MOVED_TO, IN_CREATE, IN_DELETE, IN_MOVED_FROM = 0x80, 0x100, 0x200, 0x40
    IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000

    def __init__(self, path: str) -> None:
        self.dir = os.path.dirname(os.path.abspath(path)) or "/"
        self.name = os.fsencode(os.path.basename(path))  # the bytes of the name, UTF-8 or not
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = self.IN_CLOSE_WRITE | self.IN_MOVED_TO | self.IN_CREATE | self.IN_DELETE | self.IN_MOVED_FROM
        if libc.inotify_add_watch(self.fd, os.fsencode(self.dir), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {self.dir}")

    def changed(self) -> bool:
        """Drain the queue; True if our file was among the names."""
        hit = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            offset = 0
            while offset + 16 <= len(data):
                _wd, _mask, _cookie, length = struct.unpack_from("=iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
                if name == self.name:
                    hit = True
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)
