"""Hooks: the administrator's programs, run on every transition, never in the way of routing.

``[settings] hooks = DIR``: on an uplink going up or down, policies moving, a
reload done or refused and drift repaired, every executable of DIR runs, in
name order, one after the other, with the event in its environment
(``MARKROUTED_EVENT``, ``_UPLINK``, ``_STATE``, ``_REASON``, ``_POLICY``,
``_FROM``, ``_TO``; ``_COALESCED``: how many earlier events this one stands for)
and the same as one JSON object on its standard input.

How they stay out of the way (docs/design.md, "Hooks"):

* asynchronous: ``Hooks.emit`` only queues; the runs are tasks on the daemon's
  loop (asyncio subprocesses), so a pass, a failover or a conntrack clear
  never waits for a hook;
* ordered per key: the events of one uplink (of the policies, of the daemon)
  run in the order they happened, one run at a time; different keys run side
  by side, at most ``PARALLEL`` hook processes at once;
* coalesced: while a key's run is going, newer events of that key replace
  each other in a one-event queue: a storm of 1,000 flaps runs the hooks
  twice (the event running, then the latest), not 1,000 times;
* bounded: ``hook_timeout`` (10 s) then SIGKILL to the hook's whole process
  group (each hook starts a session of its own, so what it forked dies with
  it); whatever it left behind is killed when it exits too. The first
  ``OUTPUT_MAX`` bytes of its output (stdout and stderr) go to the journal with
  its exit status; the rest is read and discarded;
* StrictModes: a hook file (and the directory) must be owned by root (or the
  user the daemon runs as) and writable by no one else, or it is refused,
  logged and skipped: whoever can write it could otherwise run code as the
  daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeAlias

from .text import escape

__all__ = ["Event", "Hooks", "hook_problem", "listing"]

EventName: TypeAlias = Literal["uplink-up", "uplink-down", "policy-moved", "reload-done", "reload-refused",
                               "drift-repaired"]

OUTPUT_MAX = 64 * 1024
"""Bytes of a hook's output kept for the journal."""
PARALLEL = 4
"""Hook processes at most at once (each key runs one at a time anyway)."""
GRACE = 1.0
"""Seconds the output of an exited hook is still read (a forked child may hold it)."""
_SKIPPED_SUFFIXES = ("~", ".dpkg-old", ".dpkg-dist", ".dpkg-new", ".dpkg-tmp", ".ucf-old", ".ucf-dist",
                     ".ucf-new", ".disabled")


@dataclass(frozen=True)
class Event:
    """One transition, as hooks see it."""

    event: EventName
    uplink: str = ""
    state: str = ""
    reason: str = ""
    policy: str = ""  # for policy-moved: the names, comma-separated (one event per from/to pair)
    from_: str = ""
    to: str = ""

    @property
    def key(self) -> str:
        """Events of one key run in order, one at a time, and coalesce."""
        if self.uplink:
            return f"uplink {self.uplink}"
        return "policies" if self.event == "policy-moved" else "daemon"

    def document(self, coalesced: int = 0) -> dict[str, Any]:
        doc = {("from" if k == "from_" else k): v for k, v in asdict(self).items()}
        doc["coalesced"] = coalesced
        return doc

    def environment(self, coalesced: int = 0) -> dict[str, str]:
        return {f"MARKROUTED_{k.upper()}": str(v) for k, v in self.document(coalesced).items()}


def hook_problem(st: os.stat_result, what: str = "file") -> str | None:
    """Why a hook file (or the directory) must not be trusted, like sshd's StrictModes; None: fine."""
    if st.st_uid not in (0, os.geteuid()):
        return f"the {what} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"the {what} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def listing(directory: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(the hooks to run in name order, [(name, why refused)]). Skipped silently: hidden,
    backup and package-manager leftovers, non-executables."""
    refused: list[tuple[str, str]] = []
    try:
        dir_stat = os.stat(directory)
    except OSError as exc:
        return [], [(directory, f"cannot read the directory: {exc.strerror or exc}")]
    problem = hook_problem(dir_stat, "directory")
    if problem:
        return [], [(directory, problem)]
    run: list[str] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        return [], [(directory, f"cannot list the directory: {exc.strerror or exc}")]
    for entry in entries:
        if entry.name.startswith(".") or entry.name.endswith(_SKIPPED_SUFFIXES):
            continue
        try:
            st = entry.stat()  # follows a symlink: the target is what runs
        except OSError as exc:
            refused.append((entry.name, f"cannot stat: {exc.strerror or exc}"))
            continue
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            continue
        problem = hook_problem(st)
        if problem:
            refused.append((entry.name, problem))
            continue
        run.append(os.path.join(directory, entry.name))
    return run, refused


Spawn: TypeAlias = Callable[..., Any]


class Hooks:
    """Runs the hooks of one directory; ``emit`` never blocks."""

    def __init__(self, directory: str, timeout: float, log: Any, spawn: Spawn | None = None) -> None:
        self.directory, self.timeout, self.log = directory, timeout, log
        self._spawn = spawn or asyncio.create_subprocess_exec
        self._running: dict[str, asyncio.Task[None]] = {}
        self._pending: dict[str, tuple[Event, int]] = {}  # key -> (latest event, how many it replaced)
        self._slots = asyncio.Semaphore(PARALLEL)
        self.runs = 0  # hook processes started (tests, metrics)

    def emit(self, event: Event) -> None:
        key = event.key
        if key in self._running:
            _old, n = self._pending.get(key, (event, -1))
            self._pending[key] = (event, n + 1)
            return
        self._running[key] = asyncio.get_running_loop().create_task(self._serve(key, event, 0))

    async def _serve(self, key: str, event: Event, coalesced: int) -> None:
        try:
            while True:
                try:
                    await self._run_all(event, coalesced)
                except Exception as exc:  # a bug here must not end the hooks of this key for good
                    self.log.error("hooks not run", hook_event=event.event, error=str(exc))
                if key not in self._pending:
                    return
                event, coalesced = self._pending.pop(key)
        finally:
            self._running.pop(key, None)

    async def idle(self) -> None:
        """Wait until no hook runs and none is queued (tests, stop)."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def close(self) -> None:
        """Stop: queued events are dropped; running hooks are killed (their tasks cancelled)."""
        self._pending.clear()
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def _run_all(self, event: Event, coalesced: int) -> None:
        hooks, refused = listing(self.directory)
        for name, why in refused:
            self.log.warning("hook refused", hook=escape(name), error=why, object=escape(self.directory))
        data = (json.dumps(event.document(coalesced), sort_keys=True) + "\n").encode()
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               **event.environment(coalesced)}
        for path in hooks:
            async with self._slots:
                await self._run(path, event, env, data)

    async def _run(self, path: str, event: Event, env: Mapping[str, str], data: bytes) -> None:
        name = os.path.basename(path)
        self.runs += 1
        # the output pipe is ours, not the subprocess transport's: its wait() would
        # last as long as anything (a forked child) holds the pipe open
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            proc = await self._spawn(path, stdin=asyncio.subprocess.PIPE, stdout=wfd,
                                     stderr=asyncio.subprocess.STDOUT, env=dict(env), cwd="/",
                                     start_new_session=True, close_fds=True)
        except OSError as exc:
            os.close(rfd)
            self.log.warning("hook failed to start", hook=escape(name), hook_event=event.event,
                             error=exc.strerror or str(exc))
            return
        finally:
            os.close(wfd)
        loop = asyncio.get_running_loop()
        stream = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream),
                                                    os.fdopen(rfd, "rb", buffering=0))
        kept = bytearray()
        reader = loop.create_task(self._read(stream, kept))
        timed_out = False
        try:
            try:
                await asyncio.wait_for(self._feed(proc, data), self.timeout)
                await asyncio.wait_for(proc.wait(), self.timeout)
            except asyncio.TimeoutError:
                timed_out = True
            _kill_group(proc.pid)  # on a timeout the hook; after an exit what it left behind
            if timed_out:
                await proc.wait()
            try:
                await asyncio.wait_for(asyncio.shield(reader), GRACE)
            except asyncio.TimeoutError:
                reader.cancel()
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            reader.cancel()
            raise
        finally:
            transport.close()
        output = kept.decode("utf-8", "replace").rstrip("\n")
        fields = dict(hook=escape(name), hook_event=event.event, uplink=event.uplink or None,
                      output=escape(output) if output else None)
        if timed_out:
            self.log.warning("hook killed after timeout", timeout=f"{self.timeout:g}s", **fields)
        elif proc.returncode == 0:
            self.log.info("hook done", status=0, **fields)
        else:
            self.log.warning("hook failed", status=proc.returncode, **fields)

    @staticmethod
    async def _feed(proc: Any, data: bytes) -> None:
        if proc.stdin is None:
            return
        try:
            proc.stdin.write(data)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # a hook need not read its input
        finally:
            proc.stdin.close()

    @staticmethod
    async def _read(stream: asyncio.StreamReader, kept: bytearray) -> None:
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                return
            if len(kept) < OUTPUT_MAX:
                kept += chunk[: OUTPUT_MAX - len(kept)]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
