"""The conformance scenarios against the real kernel, each in a network namespace of its own.

The unit tier runs the same scenarios against the fake kernel
(``tests/unit/test_conformance_fake.py``); a scenario that passes there and
fails here means the fake has drifted from the kernel.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from conformance import SCENARIOS
from conftest import PYTHON, ROOT

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_kernel_conforms(netns: Any, name: str) -> None:
    proc = subprocess.run(
        [*netns.nsenter(), PYTHON, os.path.join(ROOT, "tests", "conformance.py"), name],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, f"{name} failed against the real kernel:\n{proc.stdout}{proc.stderr}"
