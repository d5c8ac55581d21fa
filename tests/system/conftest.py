"""Fixtures of the system tier: the built .deb, and a booted Debian 12 or 13 with it installed.

The package is built once per session with the documented command
(``scripts/build-deb``); the container is booted once per test module and
release, because a test here is a sequence of operations on one running system,
as an administrator would perform them. Every test that uses the container runs
on each release in ``SUITES`` (the same .deb on both: it is architecture- and
release-independent). Each test still puts the service into the state it needs
first, so any one of them can run alone.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from conftest import ROOT, missing  # the suite's root conftest
from .nspawn import SUITES, Container, deb_relations, rootfs

TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "ip", "dpkg-deb", "apt-get")


def need_system_prerequisites() -> None:
    if os.geteuid() != 0:
        missing("needs root to boot a container")
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        missing(f"needs {', '.join(absent)} (scripts/install-deps --test installs them)")
    if not glob.glob("/sys/fs/cgroup/cgroup.controllers") and not os.path.isdir("/sys/fs/cgroup/unified"):
        missing("needs a cgroup v2 hierarchy (pure or hybrid)")


@pytest.fixture(scope="session")
def deb() -> str:
    """dist/markrouted_<version>_all.deb, freshly built by scripts/build-deb."""
    need_system_prerequisites()
    proc = subprocess.run([os.path.join(ROOT, "scripts", "build-deb"), "--no-lintian"], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"scripts/build-deb failed:\n{proc.stdout}{proc.stderr}")
    path = os.path.join(ROOT, proc.stdout.strip().splitlines()[-1])
    assert os.path.exists(path), proc.stdout
    return path


@pytest.fixture(scope="module", params=SUITES)
def container(deb: str, request: pytest.FixtureRequest) -> Iterator[Container]:
    """A booted container of one release whose root file system holds the package's dependencies
    and recommendations (as `apt install` would bring), with the .deb installed by apt."""
    suite: str = request.param
    root = rootfs(deb_relations(deb, "Depends", "Recommends"), suite)
    with Container(root, suite) as ct:
        ct.write("/tmp/markrouted.deb", open(deb, "rb").read())
        ct.sh("apt-get", "install", "-y", "-q", "--no-install-recommends", "/tmp/markrouted.deb", timeout=300)
        yield ct


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test's report carries markrouted's journal from inside the container."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    ct = getattr(item, "funcargs", {}).get("container")
    if report.failed and report.when == "call" and isinstance(ct, Container):
        proc = ct.sh("journalctl", "-u", "markrouted", "--no-pager", "-n", "200", "-o", "short-precise",
                     check=False)
        report.sections.append(("markrouted journal (last 200 lines)", proc.stdout + proc.stderr))
