"""One reconcile pass: read actual -> derive -> diff -> apply -> report.

Level-triggered: the pass reads the kernel afresh and enforces the whole
desired state; it never asks what woke it. Applying follows the plan's safe
order (sysctls, routes, new rules, nft, stale rules, stale routes), so at every
instant a marked packet has a table to go to. Each kernel write is one log
event naming the object and why it was written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import Config
from .derive import Deriver, derive, needs
from .diff import diff
from .kernel import KernelAPI
from .kernel.errors import KernelError, PermissionDenied, Unsupported
from .model import Actual, DesiredState, Health, NftUpdate, Observed, Plan


class NullLog:
    """A logger that drops everything, for callers that want no output."""

    def info(self, *args: Any, **kwargs: Any) -> None:
        pass

    warning = error = debug = info

    def bind(self, **kwargs: Any) -> "NullLog":
        return self


@dataclass(frozen=True)
class Result:
    observed: Observed
    desired: DesiredState
    actual: Actual
    plan: Plan
    writes: int = 0


def compute(
    config: Config,
    kernel: KernelAPI,
    health: Mapping[str, Health] | None = None,
    extra_ranges: Iterable[int] = (),
    deriver: Deriver | None = None,
) -> Result:
    """Everything up to the plan; writes nothing.

    ``extra_ranges``: earlier rule_priority values whose rules are still
    markrouted's (the nft table's own record of them is added by the kernel).
    """
    observed = kernel.observe(needs(config))
    desired = derive(config, observed, health, deriver)
    actual = kernel.actual({config.settings.rule_priority, *extra_ranges})
    return Result(observed, desired, actual, diff(desired, actual))


def apply_plan(plan: Plan, kernel: KernelAPI, log: Any) -> int:
    """Carry out a plan in its safe order; returns the number of kernel writes.

    A failing write does not stop the others (the next pass retries it); the
    first failure is raised at the end. Missing permission stops at once.
    """
    writes = 0
    errors: list[KernelError] = []

    def attempt(fn: Any, *args: Any) -> Any:
        nonlocal writes
        try:
            result = fn(*args)
        except (PermissionDenied, Unsupported):
            raise
        except KernelError as exc:
            errors.append(exc)
            log.warning("kernel write failed", error=str(exc))
            return None
        writes += 1
        return result if result is not None else True

    for s in plan.sysctls:
        if attempt(kernel.write_sysctl, s.path, s.value):
            log.info("sysctl changed", object=str(s), reason=s.reason, kind="sysctl")
    for new, old in plan.routes_set:
        if attempt(kernel.set_route, new):
            if old is None:
                log.info("route added", object=str(new), reason="missing", kind="route")
            else:
                log.info("route changed", object=str(new), was=str(old), reason="differs", kind="route")
    for rule in plan.rules_add:
        if attempt(kernel.add_rule, rule):
            log.info("rule added", object=str(rule), reason="missing", kind="rule")
    if not plan.nft.empty:
        if attempt(kernel.nft_apply, plan.nft, plan.nft_desired):
            if plan.nft.remove:
                log.info("nft table removed", object="table inet markrouted", reason="not desired", kind="nft")
            elif plan.nft.replace:
                log.info("nft table replaced", object="table inet markrouted",
                         reason="missing or its structure differs", kind="nft")
            else:
                for change in plan.nft.elements:
                    log.info("nft set elements changed", object=change.name, added=len(change.add),
                             deleted=len(change.delete), reason="the set's addresses differ", kind="nft")
                if plan.nft.chains:
                    log.info("nft chains refilled", object=", ".join(plan.nft.chains),
                             reason="rules differ", kind="nft")
    for rule in plan.rules_remove:
        if attempt(kernel.del_rule, rule):
            log.info("rule removed", object=str(rule), reason="not desired", kind="rule")
    for route in plan.routes_remove:
        if attempt(kernel.del_route, route):
            log.info("route removed", object=str(route), reason="not desired", kind="route")
    if errors:
        raise errors[0]
    return writes


def reconcile(
    config: Config,
    kernel: KernelAPI,
    health: Mapping[str, Health] | None = None,
    log: Any = None,
    extra_ranges: Iterable[int] = (),
    deriver: Deriver | None = None,
) -> Result:
    result = compute(config, kernel, health, extra_ranges, deriver)
    writes = apply_plan(result.plan, kernel, log or NullLog()) if not result.plan.empty else 0
    return Result(result.observed, result.desired, result.actual, result.plan, writes)


def flush_plan(actual: Actual) -> Plan:
    """Remove everything markrouted owns, nft first so no new flow is marked."""
    return Plan(
        rules_remove=tuple(sorted(actual.rules)),
        routes_remove=tuple(sorted(actual.routes)),
        nft=NftUpdate(remove=actual.nft is not None),
    )


def flush(config: Config, kernel: KernelAPI, log: Any = None) -> int:
    return apply_plan(flush_plan(kernel.actual({config.settings.rule_priority})), kernel, log or NullLog())
