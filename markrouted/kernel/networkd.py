"""systemd-networkd deletes routing policy rules it did not create, unless told not to.

``ManageForeignRoutingPolicyRules=`` defaults to yes (systemd issues #19106,
#22077): a running networkd with that default removes markrouted's rules on
every reconfiguration. ``check --kernel`` warns about it.
"""

from __future__ import annotations

import configparser
import glob
import os

CONF_FILES = ["/usr/lib/systemd/networkd.conf", "/etc/systemd/networkd.conf"]
DROPIN_DIRS = ["/usr/lib/systemd/networkd.conf.d", "/run/systemd/networkd.conf.d", "/etc/systemd/networkd.conf.d"]


def networkd_running(proc: str = "/proc") -> bool:
    """A systemd-networkd in our network namespace (one elsewhere, say a container's, cannot touch our rules)."""
    try:
        ours = os.stat(os.path.join(proc, "self", "ns", "net"))
    except OSError:
        ours = None
    for comm in glob.glob(os.path.join(proc, "[0-9]*", "comm")):
        try:
            with open(comm) as f:
                if f.read().strip() != "systemd-network":
                    continue
        except OSError:
            continue
        if ours is not None:
            try:
                theirs = os.stat(os.path.join(os.path.dirname(comm), "ns", "net"))
            except OSError:
                return True  # cannot tell (not ours to inspect): assume the worst
            if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
                continue
        return True
    return False


def manages_foreign_rules(files: list[str] | None = None) -> bool:
    """The effective ManageForeignRoutingPolicyRules= (later files override earlier)."""
    if files is None:
        files = list(CONF_FILES)
        dropins: dict[str, str] = {}
        for d in DROPIN_DIRS:
            for path in sorted(glob.glob(os.path.join(d, "*.conf"))):
                dropins[os.path.basename(path)] = path
        files += [dropins[k] for k in sorted(dropins)]
    value = True
    for path in files:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        try:
            parser.read(path)
        except (OSError, configparser.Error):
            continue
        if parser.has_option("Network", "ManageForeignRoutingPolicyRules"):
            raw = parser.get("Network", "ManageForeignRoutingPolicyRules").strip().lower()
            value = raw not in ("no", "false", "0", "off")
    return value


def networkd_warnings() -> list[str]:
    """What ``check --kernel`` warns about systemd-networkd (nothing when it is harmless)."""
    if networkd_running() and manages_foreign_rules():
        return ["systemd-networkd runs with ManageForeignRoutingPolicyRules=yes (the default) "
                "and will delete markrouted's ip rules; set it to no in "
                "/etc/systemd/networkd.conf.d/markrouted.conf (see README)"]
    return []
