"""The hook runner: real hook programs in a directory of the test's own, on a real loop.

What is proved: the event reaches every hook in name order, in its
environment and as JSON on stdin; events of one key run in order and coalesce
while a run is going (a storm of 1,000 does not fork 1,000 hooks); a hook
that hangs (and forks), prints 100 MB or fails is bounded, logged, and never
holds up the loop; files anyone but root (or the daemon's user) may write are
refused. No sleeps decide anything: hooks wait on files the test creates.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from test_daemon_loop import Log

from markrouted.hooks import OUTPUT_MAX, Event, Hooks, hook_problem, listing

RECORD = """#!/usr/bin/python3
# records its environment and stdin, one JSON line per run; then waits for a file, if given
import json, os, sys, time
line = {{"hook": os.path.basename(sys.argv[0]), "stdin": json.load(sys.stdin),
         "env": {{k: v for k, v in os.environ.items() if k.startswith("MARKROUTED_")}}}}
with open({out!r}, "a") as f:
    f.write(json.dumps(line) + "\\n")
gate = {wait!r}
while gate and not os.path.exists(gate):
    time.sleep(0.01)
"""


def write_hook(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    path = directory / name
    path.write_text(body)
    path.chmod(mode)
    return path


def records(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


async def until(cond: Callable[[], object], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for init to reap does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


@pytest.fixture
def hookdir(tmp_path: Path) -> Path:
    d = tmp_path / "hooks.d"
    d.mkdir()
    d.chmod(0o755)
    return d


def test_environment_and_stdin_in_name_order(hookdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_hook(hookdir, "20-second", RECORD.format(out=str(out), wait=""))
    write_hook(hookdir, "10-first", RECORD.format(out=str(out), wait=""))
    write_hook(hookdir, "15-not-executable", RECORD.format(out=str(out), wait=""), mode=0o644)
    write_hook(hookdir, ".hidden", RECORD.format(out=str(out), wait=""))
    write_hook(hookdir, "30-old.dpkg-old", RECORD.format(out=str(out), wait=""))
    log = Log()

    async def body() -> None:
        hooks = Hooks(str(hookdir), 10, log)
        hooks.emit(Event("uplink-down", uplink="isp2", state="down", reason="no carrier"))
        await hooks.idle()

    run(body)
    got = records(out)
    assert [r["hook"] for r in got] == ["10-first", "20-second"]
    env = got[0]["env"]
    assert env["MARKROUTED_EVENT"] == "uplink-down" and env["MARKROUTED_UPLINK"] == "isp2"
    assert env["MARKROUTED_STATE"] == "down" and env["MARKROUTED_REASON"] == "no carrier"
    assert env["MARKROUTED_POLICY"] == "" and env["MARKROUTED_FROM"] == "" and env["MARKROUTED_TO"] == ""
    assert got[0]["stdin"] == {"event": "uplink-down", "uplink": "isp2", "state": "down", "reason": "no carrier",
                               "policy": "", "from": "", "to": "", "coalesced": 0}
    assert [kw["hook"] for kw in log.named("hook done")] == ["10-first", "20-second"]


def test_a_storm_coalesces_per_key_and_keeps_order(hookdir: Path, tmp_path: Path) -> None:
    out, gate = tmp_path / "out", tmp_path / "gate"
    write_hook(hookdir, "record", RECORD.format(out=str(out), wait=str(gate)))

    async def body() -> None:
        hooks = Hooks(str(hookdir), 30, Log())
        for i in range(1000):
            state = "down" if i % 2 == 0 else "up"
            hooks.emit(Event(f"uplink-{state}", uplink="isp2", state=state, reason=f"flap {i}"))  # type: ignore[arg-type]
        hooks.emit(Event("reload-done"))  # another key: not held up by isp2's queue
        await until(lambda: len(records(out)) == 2, "the first isp2 run and the reload's")
        gate.touch()
        await hooks.idle()
        assert hooks.runs == 3

    run(body)
    got = records(out)
    isp2 = [r["stdin"] for r in got if r["stdin"]["uplink"] == "isp2"]
    # the first event, then the latest one standing for the 998 in between
    assert [(e["reason"], e["coalesced"]) for e in isp2] == [("flap 0", 0), ("flap 999", 998)]
    assert isp2[1]["state"] == "up"


def test_hanging_forking_flooding_failing_hooks_are_bounded(hookdir: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    write_hook(hookdir, "10-hang", f"#!/bin/sh\nsleep 1000 &\necho $! > {pids}\nsleep 1000\n")
    escaped = tmp_path / "escaped"
    # leaves a child in a session of its own, holding the output pipe open
    write_hook(hookdir, "15-escape", f"#!/bin/sh\nsetsid sh -c 'echo $$ > {escaped}; exec sleep 1000' &\n"
               f"while [ ! -s {escaped} ]; do sleep 0.01; done\n")
    write_hook(hookdir, "20-flood", "#!/bin/sh\nhead -c 100000000 /dev/zero | tr '\\0' x\n")
    write_hook(hookdir, "30-fail", "#!/bin/sh\necho broken >&2\nexit 1\n")
    log = Log()
    ticks: list[float] = []

    async def body() -> None:
        hooks = Hooks(str(hookdir), 0.5, log)
        hooks.emit(Event("uplink-down", uplink="isp1", state="down"))

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        await until(lambda: pids.exists() and pids.read_text().strip(), "the hanging hook to fork")
        before = len(ticks)
        # the loop keeps running while the hook hangs
        await until(lambda: len(ticks) > before + 5, "the loop to tick while a hook hangs")
        await hooks.idle()
        t.cancel()

    try:
        run(body)
    finally:
        if escaped.exists():
            os.kill(int(escaped.read_text()), 9)
    killed = log.named("hook killed after timeout")
    assert [k["hook"] for k in killed] == ["10-hang"]
    child = int(pids.read_text())
    assert not alive(child)  # its forked child died with it (killed with the hook's process group)
    done = log.named("hook done")
    assert [f["hook"] for f in done] == ["15-escape", "20-flood"] and len(done[1]["output"]) == OUTPUT_MAX
    failed = log.named("hook failed")
    assert failed == [{"hook": "30-fail", "hook_event": "uplink-down", "uplink": "isp1", "status": 1,
                       "output": "broken"}]


def test_strict_modes(hookdir: Path, tmp_path: Path) -> None:
    write_hook(hookdir, "ok", "#!/bin/sh\n")
    write_hook(hookdir, "group-writable", "#!/bin/sh\n", mode=0o775)
    write_hook(hookdir, "world-writable", "#!/bin/sh\n", mode=0o757)
    run_, refused = listing(str(hookdir))
    assert run_ == [str(hookdir / "ok")]
    assert refused == [("group-writable", "the file is writable by its group"),
                       ("world-writable", "the file is writable by others")]
    st = os.stat(hookdir / "ok")
    foreign = os.stat_result((st.st_mode, 0, 0, 1, 12345, 0, 0, 0, 0, 0))
    assert hook_problem(foreign) == "the file is owned by uid 12345, not root"
    hookdir.chmod(0o777)
    try:
        assert listing(str(hookdir)) == ([], [(str(hookdir), "the directory is writable by others")])
    finally:
        hookdir.chmod(0o755)


def test_refused_hooks_are_logged_and_skipped(hookdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_hook(hookdir, "a-writable", RECORD.format(out=str(out), wait=""), mode=0o777)
    write_hook(hookdir, "b-fine", RECORD.format(out=str(out), wait=""))
    log = Log()

    async def body() -> None:
        hooks = Hooks(str(hookdir), 10, log)
        hooks.emit(Event("drift-repaired", reason="2 writes"))
        await hooks.idle()

    run(body)
    assert [r["hook"] for r in records(out)] == ["b-fine"]
    assert [(k["hook"], k["error"]) for k in log.named("hook refused")] == [
        ("a-writable", "the file is writable by others")]
    assert stat.S_IMODE(os.stat(hookdir / "a-writable").st_mode) == 0o777
