"""The conformance scenarios against the fake kernel, and the fake's surface against ``KernelAPI``.

The same scenarios run against the real kernel in the kernel tier
(``tests/kernel/test_conformance_kernel.py``): what passes here and there is
what the fake may be trusted for.
"""

from __future__ import annotations

import inspect

import pytest
from conformance import SCENARIOS, FakeWorld
from fakekernel import FakeKernel

from markrouted.kernel import Kernel, KernelAPI


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fake_conforms(name: str) -> None:
    SCENARIOS[name](FakeWorld())


def _methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(getattr(cls, name)) for name in dir(cls)
            if not name.startswith("_") and callable(getattr(cls, name))}


@pytest.mark.parametrize("impl", [FakeKernel, Kernel], ids=["fake", "kernel"])
def test_implements_kernel_api(impl: type) -> None:
    """Every KernelAPI method, with the same parameters (names, kinds, defaults)."""
    api = _methods(KernelAPI)
    have = _methods(impl)
    assert set(api) <= set(have), f"missing: {sorted(set(api) - set(have))}"
    for name, sig in api.items():
        assert list(have[name].parameters.values()) == list(sig.parameters.values()), name
