"""What the command line loads: ``check`` the config and nothing else, ``status`` next
to a running daemon only its status file.

Each case runs in a fresh interpreter, so what an earlier test imported does
not hide what the command imports (``bench/startup.py`` measures the time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("pyroute2", "nftables", "structlog", "systemd", "asyncio", "markrouted.kernel", "markrouted.derive")

CONFIG = """\
[uplinks.wan1]
interface = "eth0"
table = 101
mark = 1

[[policy]]
name = "ssh"
proto = "tcp"
dport = [22]
uplinks = ["wan1"]
"""

PROBE = """\
import contextlib, io, json, sys
from markrouted import cli
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        rc = cli.main(sys.argv[1:])
except SystemExit as exc:  # an invalid config ends the command here
    rc = exc.code
print(json.dumps({"rc": rc, "out": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def run(*argv: str, env: dict[str, str] | None = None) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def heavy(modules: object) -> list[str]:
    assert isinstance(modules, list)
    return sorted({h for h in HEAVY for m in modules if m == h or m.startswith(h + ".")})


def test_check_loads_no_kernel_adapter_and_no_library(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "markrouted.toml")
    with open(path, "w") as f:
        f.write(CONFIG)
    result = run("-c", path, "check")
    assert result["rc"] == 0 and "valid" in str(result["out"])
    assert heavy(result["modules"]) == []


def test_an_invalid_config_is_reported_without_the_kernel_package(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "markrouted.toml")
    with open(path, "w") as f:
        f.write(CONFIG.replace("mark = 1", "mark = 0"))
    result = run("-c", path, "check")
    assert result["rc"] == 1
    assert heavy(result["modules"]) == []


def test_status_next_to_a_daemon_reads_its_file_and_nothing_else(tmp_path: object) -> None:
    """A running daemon's view is one JSON file and the counters: no config, no derivation."""
    doc = {"pid": os.getpid(), "in_sync": True, "uplinks": {}, "policies": {}}  # a live pid, our netns
    with open(os.path.join(str(tmp_path), "status.json"), "w") as f:
        json.dump(doc, f)
    result = run("-c", "/nonexistent.toml", "status", env={"MARKROUTED_RUN_DIR": str(tmp_path)})
    assert result["rc"] == 0 and "in sync; daemon" in str(result["out"])
    modules = result["modules"]
    assert isinstance(modules, list)
    # and the kernel's counters: two small netlink dumps, their own socket, nothing else of the kernel
    assert heavy(modules) == ["markrouted.kernel"] and "markrouted.config" not in modules
    assert {m for m in modules if m.startswith("markrouted.kernel.")} <= {
        "markrouted.kernel.counters", "markrouted.kernel.nl", "markrouted.kernel.errors"}


def test_the_version_loads_only_the_parser() -> None:
    proc = subprocess.run([sys.executable, "-c", "import sys\nfrom markrouted import cli\n"
                           "print('\\n'.join(sys.modules))"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    loaded = proc.stdout.split()
    # the parser and the quoting of what it prints (a few lines of pure code)
    assert sorted(m for m in loaded if m.startswith("markrouted.")) == ["markrouted.cli", "markrouted.text"]
