"""A Debian 12 or 13 with its own systemd as PID 1, booted in a container and driven from outside.

The root file system is made once per release by ``debootstrap --variant=minbase``
from the host's Debian mirror and cached under ``/var/cache/markrouted-test/`` keyed
by its release and package list; every boot runs
on a throw-away overlay of it (``--volatile=overlay``), so the cache stays pristine
and a test may install, break and reconfigure anything inside.

``systemd-nspawn`` is started without machined (``--register=no``) in a cgroup of
its own, so it also works where PID 1 of the host is not systemd and the cgroup
hierarchy is hybrid (the container's systemd gets that cgroup as its root). The
container has a private network namespace: the test builds uplinks into it from
veth pairs whose peers live in namespaces of its own. Commands run inside with
``nsenter -t <container PID 1> -a`` and a clean environment. The journal directory
is bind-mounted from the host, so the journal can still be read after teardown.

Teardown powers the container off, kills whatever is left in its cgroup, removes
the cgroups, the namespaces and the journal directory; it verifies that nothing
remains and raises if something does.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

CACHE = "/var/cache/markrouted-test"
#: the releases the package is installed and exercised on: Debian 12 and 13
SUITES = ("bookworm", "trixie")
# what the container needs to be a booted systemd system besides the package's own dependencies
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus")
CLEAN_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "TERM=dumb"]
HARNESS_VERSION = "1"  # bump to invalidate every cached root file system


def run(cmd: Sequence[str], check: bool = True, input: str | bytes | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    text = not isinstance(input, bytes)
    proc = subprocess.run(list(cmd), capture_output=True, text=text, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {str(err).strip()}")
    return proc  # type: ignore[return-value]


def poll(what: str, probe: Any, deadline: float = 10.0, interval: float = 0.05) -> Any:
    """Call ``probe`` until it returns something truthy; raise with ``what`` at the deadline."""
    end = time.monotonic() + deadline
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {deadline}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ the root file system


def deb_relations(deb: str, *fields: str) -> list[str]:
    """Package names a .deb's relation fields name (first alternative, no versions)."""
    names: list[str] = []
    for fld in fields:
        value = run(["dpkg-deb", "-f", deb, fld]).stdout.strip()
        for rel in filter(None, (r.strip() for r in value.split(","))):
            name = rel.split("|")[0].strip().split()[0].split(":")[0]
            if name not in names:
                names.append(name)
    return names


def host_mirror() -> str | None:
    """The Debian mirror this host's apt uses, so the containers come from the same place.

    The archive serving the host's own release serves the others too (one
    mirror holds every suite), so any enabled ``.../debian`` entry will do.
    """
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            for stanza in f.read().split("\n\n"):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and "Enabled: no" not in stanza:
                    for uri in fields.get("URIs", "").split():
                        if uri.rstrip("/").endswith("/debian"):
                            return uri
    with contextlib.suppress(OSError), open("/etc/apt/sources.list") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[1].rstrip("/").endswith("/debian"):
                return parts[1]
    return None  # debootstrap's own default


def release_of(root: str) -> str | None:
    """The codename of the Debian tree at ``root`` (its os-release)."""
    with contextlib.suppress(OSError), open(os.path.join(root, "etc", "os-release")) as f:
        fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        return fields.get("VERSION_CODENAME", "").strip('"') or None
    return None


def rootfs(packages: Sequence[str], suite: str) -> str:
    """The cached minbase tree of ``suite`` with ``packages`` (made on first use; about a minute).

    One tree per release is kept: a stale tree of the same release is removed
    when its package list changes, the other releases' trees stay (and so do
    the variants of ``rootfs_variant``).
    """
    wanted = sorted(set(BASE_PACKAGES) | set(packages))
    key = hashlib.sha256("\n".join([HARNESS_VERSION, suite, *wanted]).encode()).hexdigest()[:16]
    path = os.path.join(CACHE, f"rootfs-{key}")
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one debootstrap at a time, others wait and reuse it
        if os.path.exists(os.path.join(path, ".complete")):
            return path
        for stale in glob.glob(os.path.join(CACHE, "rootfs-*")):
            if "-" not in os.path.basename(stale)[len("rootfs-"):] and release_of(stale) in (suite, None):
                shutil.rmtree(stale, ignore_errors=True)
        for partial in glob.glob(os.path.join(CACHE, "building-*")):
            shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run (we hold the lock)
        tmp = tempfile.mkdtemp(prefix="building-", dir=CACHE)
        try:
            # the archive keyring verifies the release; Debian 12's keyring package
            # carries the keys of Debian 13 too (scripts/install-deps makes sure)
            cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(wanted)}", suite, tmp]
            mirror = host_mirror()
            if mirror:
                cmd.append(mirror)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"debootstrap {suite} failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
            with open(os.path.join(tmp, ".complete"), "w") as f:
                f.write("\n".join(wanted) + "\n")
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def rootfs_variant(packages: Sequence[str], extra: Sequence[str], suite: str, variant: str) -> str:
    """``rootfs(packages, suite)`` plus ``extra``, installed by apt from the host's mirror, cached as
    ``variant`` (one tree per release and variant).

    For packages debootstrap cannot configure on its own (polkitd, pulled in
    by NetworkManager and firewalld): apt installs them in a copy of the base
    tree, in a chroot with its own mount namespace, with services kept from
    starting (policy-rc.d).
    """
    base = rootfs(packages, suite)
    wanted = sorted(set(extra))
    key = hashlib.sha256("\n".join([os.path.basename(base), variant, *wanted]).encode()).hexdigest()[:16]
    prefix = f"rootfs-{variant}-"
    path = os.path.join(CACHE, f"{prefix}{key}")
    with open(os.path.join(CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(path, ".complete")):
            return path
        for stale in glob.glob(os.path.join(CACHE, f"{prefix}*")):
            if release_of(stale) in (suite, None):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix="building-", dir=CACHE)
        try:
            run(["cp", "-a", f"{base}/.", tmp], timeout=600)
            os.unlink(os.path.join(tmp, ".complete"))
            shutil.copyfile("/etc/resolv.conf", os.path.join(tmp, "etc", "resolv.conf"))
            with open(os.path.join(tmp, "usr", "sbin", "policy-rc.d"), "w") as f:
                f.write("#!/bin/sh\nexit 101\n")
            os.chmod(os.path.join(tmp, "usr", "sbin", "policy-rc.d"), 0o755)
            script = ("mount -t proc proc \"$1/proc\" && chroot \"$1\" sh -c 'apt-get update -q && "
                      f"apt-get install -y -q --no-install-recommends {' '.join(wanted)} && apt-get clean'")
            proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", tmp],
                                  capture_output=True, text=True, timeout=900,
                                  env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                                       "DEBIAN_FRONTEND": "noninteractive"})
            if proc.returncode != 0:
                raise RuntimeError(f"apt-get install {' '.join(wanted)} in {suite} failed:\n"
                                   f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
            os.unlink(os.path.join(tmp, "usr", "sbin", "policy-rc.d"))
            with open(os.path.join(tmp, ".complete"), "w") as f:
                f.write("\n".join(wanted) + "\n")
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


# ------------------------------------------------------------------ cgroups


def cgroup_roots() -> list[str]:
    """The hierarchies a container's cgroup must be made in: v2, plus systemd's v1 one if hybrid."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return ["/sys/fs/cgroup"]
    roots = []
    for sub in ("unified", "systemd"):
        if os.path.isdir(f"/sys/fs/cgroup/{sub}"):
            roots.append(f"/sys/fs/cgroup/{sub}")
    return roots


def cgroup_pids(path: str) -> set[int]:
    pids: set[int] = set()
    for procs in glob.glob(os.path.join(glob.escape(path), "**", "cgroup.procs"), recursive=True):
        with contextlib.suppress(OSError), open(procs) as f:
            pids.update(int(x) for x in f.read().split())
    return pids


def remove_cgroup(path: str) -> None:
    for dirpath, _, _ in sorted(os.walk(path), key=lambda w: -w[0].count("/")):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(dirpath)


# ------------------------------------------------------------------ the container


class Container:
    """One booted container; use as a context manager."""

    def __init__(self, root: str, suite: str) -> None:
        self.root = root
        self.suite = suite
        self.name = "mrsys" + secrets.token_hex(4)
        self.cgroups = [os.path.join(r, self.name) for r in cgroup_roots()]
        self.journal = tempfile.mkdtemp(prefix="markrouted-journal-")
        self.console = os.path.join(self.journal, "console.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.netns: list[str] = []
        self.ns = f"{self.name}-ct"
        self.boot_seconds = 0.0

    # ------------------------------------------------------------ life

    def __enter__(self) -> "Container":
        try:
            self.boot()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def boot(self) -> None:
        if not self.cgroups:
            raise RuntimeError("no cgroup hierarchy found under /sys/fs/cgroup")
        for cg in self.cgroups:
            os.makedirs(cg)
        # the shell moves itself into the new cgroups, then becomes systemd-nspawn
        join = "; ".join(f'echo $$ > "{cg}/cgroup.procs"' for cg in self.cgroups)
        cmd = [
            "systemd-nspawn", "--quiet", "-D", self.root, "--volatile=overlay", "--private-network",
            "--register=no", "--keep-unit", f"--machine={self.name}", "--console=read-only",
            f"--bind={self.journal}:/var/log/journal", "--boot",
        ]
        start = time.monotonic()
        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(["sh", "-c", f'{join}; exec "$@"', "sh", *cmd],
                                         stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        self.pid = poll("the container's PID 1", self._find_init, deadline=20)
        state = poll("the container's systemd to answer", self._system_running, deadline=60)
        self.boot_seconds = time.monotonic() - start
        # the container's network namespace, under /run/netns for `ip -n` and veth placement
        run(["ip", "netns", "attach", self.ns, str(self.pid)])
        self.netns.append(self.ns)
        if state != "running":
            failed = self.sh("systemctl", "--failed", "--no-legend", check=False).stdout
            raise RuntimeError(f"container ({self.suite}) booted {state}: {failed}")
        booted = self.sh("sh", "-c", ". /etc/os-release && echo $VERSION_CODENAME").stdout.strip()
        if booted != self.suite:
            raise RuntimeError(f"the container runs {booted!r}, not {self.suite}")

    def _find_init(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            with open(self.console, errors="replace") as f:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}: {f.read()[-2000:]}")
        for children in glob.glob(f"/proc/{self.proc.pid}/task/*/children"):
            with contextlib.suppress(OSError), open(children) as f:
                for pid in f.read().split():
                    with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as c:
                        if c.read().strip() == "systemd":
                            return int(pid)
        return None

    def _system_running(self) -> str | None:
        proc = self.sh("systemctl", "is-system-running", "--wait", check=False, timeout=60)
        state = proc.stdout.strip()
        return state if state in ("running", "degraded") else None

    def destroy(self) -> None:
        """Power off, then remove every process, cgroup, namespace and directory made."""
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                problems.append("the container did not power off within 15 s")
                self.proc.kill()
                self.proc.wait()
        for cg in self.cgroups:
            for pid in cgroup_pids(cg):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for cg in self.cgroups:
            with contextlib.suppress(TimeoutError):
                poll(f"{cg} to empty", lambda cg=cg: not cgroup_pids(cg), deadline=5)
            remove_cgroup(cg)
            if os.path.exists(cg):
                problems.append(f"cgroup {cg} could not be removed")
        for ns in reversed(self.netns):
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns], check=False)
        self.netns.clear()
        with open("/proc/self/mountinfo") as f:
            leaked = [line for line in f if self.root in line or self.name in line]
        if leaked:
            problems.append(f"mounts left behind: {leaked}")
        shutil.rmtree(self.journal, ignore_errors=True)
        if problems:
            raise RuntimeError("; ".join(problems))

    # ------------------------------------------------------------ inside

    def sh(self, *cmd: str, check: bool = True, input: str | bytes | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces, a clean environment)."""
        return run(["nsenter", "-t", str(self.pid), "-a", *CLEAN_ENV, *cmd], check=check, input=input,
                   timeout=timeout)

    def write(self, path: str, data: str | bytes) -> None:
        self.sh("sh", "-c", 'cat > "$1"', "sh", path, input=data)

    def show(self, unit: str, prop: str) -> str:
        return self.sh("systemctl", "show", "-P", prop, unit).stdout.strip()

    def journal_json(self, unit: str) -> list[dict[str, Any]]:
        import json

        out = self.sh("journalctl", "-u", unit, "-o", "json", "--no-pager", "-q").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    # ------------------------------------------------------------ network

    def add_netns(self, role: str) -> str:
        name = f"{self.name}-{role}"
        run(["ip", "netns", "add", name])
        self.netns.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name


def without_counts(nft_text: str) -> str:
    """An nft listing with the named counters' values blanked: traffic moves them, nothing else does."""
    import re

    return re.sub(r"packets \d+ bytes \d+", "packets - bytes -", nft_text)
