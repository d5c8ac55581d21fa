"""What systemd-networkd will do to markrouted's objects: is it running here, and its networkd.conf.

networkd deletes routing policy rules and routes it did not create unless
``ManageForeignRoutingPolicyRules=no`` and ``ManageForeignRoutes=no`` (both
default to yes in systemd 252 and 257). This module only reads: the judgement
is ``markrouted.collisions.networkd_findings``.
"""

from __future__ import annotations

import glob
import os
import stat
import time

#: the main file: only the first that exists is read (systemd 257; 252 knows only /etc's)
CONF_FILES = ["/etc/systemd/networkd.conf", "/run/systemd/networkd.conf", "/usr/local/lib/systemd/networkd.conf",
              "/usr/lib/systemd/networkd.conf"]
#: the drop-ins of every directory, applied by name (lowest priority first: a drop-in of the
#: same name in a later directory masks the earlier one)
DROPIN_DIRS = ["/usr/lib/systemd/networkd.conf.d", "/usr/local/lib/systemd/networkd.conf.d",
               "/run/systemd/networkd.conf.d", "/etc/systemd/networkd.conf.d"]
MAX_BYTES = 1 << 20


def _same_netns(proc: str, pid_dir: str) -> bool:
    try:
        ours = os.stat(os.path.join(proc, "self", "ns", "net"))
    except OSError:
        return True
    try:
        theirs = os.stat(os.path.join(pid_dir, "ns", "net"))
    except OSError:
        return True  # cannot tell (not ours to inspect): assume the worst
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def find_process(comm: str, proc: str = "/proc") -> str | None:
    """/proc/PID of a process named ``comm`` in our network namespace (one elsewhere,
    say a container's, cannot touch our objects)."""
    for path in glob.glob(os.path.join(proc, "[0-9]*", "comm")):
        try:
            with open(path) as f:
                if f.read().strip() != comm:
                    continue
        except OSError:
            continue
        pid_dir = os.path.dirname(path)
        if _same_netns(proc, pid_dir):
            return pid_dir
    return None


def started_at(pid_dir: str) -> float | None:
    """When the process started, in epoch seconds (None: cannot tell).

    /proc/PID/stat gives the start in clock ticks of CLOCK_BOOTTIME; it is
    turned into wall-clock time through the clocks' offset now (not the boot
    time of /proc/stat, which is whole seconds and drifts with the wall clock).
    """
    try:
        with open(os.path.join(pid_dir, "stat")) as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))


def networkd_running(proc: str = "/proc") -> bool:
    """A systemd-networkd in our network namespace."""
    return find_process("systemd-network", proc) is not None


def config_files(conf_files: list[str] | None = None, dropin_dirs: list[str] | None = None) -> list[str]:
    """networkd.conf and its drop-ins, in the order networkd applies them."""
    files = [p for p in CONF_FILES if os.path.exists(p)][:1] if conf_files is None else list(conf_files)
    dropins: dict[str, str] = {}
    for d in DROPIN_DIRS if dropin_dirs is None else dropin_dirs:
        for path in sorted(glob.glob(os.path.join(glob.escape(d), "*.conf"))):
            dropins[os.path.basename(path)] = path
    return files + [dropins[k] for k in sorted(dropins)]


def read_files(paths: list[str]) -> tuple[list[tuple[str, str]], float | None]:
    """(path, text) of each readable regular file (its first MAX_BYTES), and the newest
    modification time among them. Opened without blocking: a FIFO in its place is skipped."""
    out: list[tuple[str, str]] = []
    newest: float | None = None
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                data = f.read(MAX_BYTES)
            except OSError:
                continue
        out.append((path, data.decode("utf-8", errors="replace")))
        newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
    return out, newest


def networkd_state(proc: str = "/proc") -> tuple[bool, list[tuple[str, str]], float | None, float | None]:
    """(running here, its configuration files as (path, text), when it started, when they last changed):
    the arguments of ``collisions.networkd_findings``."""
    pid_dir = find_process("systemd-network", proc)
    files, changed = read_files(config_files())
    return pid_dir is not None, files, None if pid_dir is None else started_at(pid_dir), changed
