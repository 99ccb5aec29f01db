"""Reload: validate, compile, apply; a failure part-way rolls every switch back.

`reload_policy(model, path_or_text, switches, installed)` is the operator's
action: parse and validate the new file against the model (a bad file changes
nothing), compile, give every switch its new state through the one write path
(controller/applier.py: a failure on any switch gives every switch touched so far
its installed state back), and only on success make the new policy the model's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenfabric.controller.applier import ApplyReport, apply_states
from tokenfabric.controller.compile import CompileError, compile_model
from tokenfabric.controller.drivers import StateTaker
from tokenfabric.controller.entries import DesiredState
from tokenfabric.controller.gctools import gc_paused
from tokenfabric.controller.model import Model, Policy
from tokenfabric.controller.policy.offload import run_here
from tokenfabric.controller.policy.schema import load_policy, parse_policy
from tokenfabric.controller.policy.source import SpecError

Runner = Callable[..., Awaitable[Any]]  # run(fn, *args) -> fn(*args), here or elsewhere


@dataclass
class ReloadReport:
    ok: bool
    errors: list[str] = field(default_factory=list)  # file:line: path: message, or apply errors
    apply: ApplyReport | None = None
    states: dict[str, DesiredState] | None = None  # what the switches hold afterwards

    def summary(self) -> dict[str, Any]:
        """JSON-ready, for the REST API."""
        out: dict[str, Any] = {"ok": self.ok, "errors": self.errors}
        if self.apply is not None:
            out.update(self.apply.summary())
        return out


def validate_policy(model: Model, source: str | Path, *, text: str | None = None,
                    file: str = "policy.yaml") -> tuple[Policy | None, list[str]]:
    """Parse and check a policy against the model; compile it to catch what only the
    switches limit. Returns (policy, []) or (None, errors). Changes nothing."""
    try:
        with gc_paused():  # every object made here stays alive until the end: nothing to collect
            if text is not None:
                policy = parse_policy(text, file, model=model, previous=model.policy)
            else:
                policy = load_policy(source, model=model, previous=model.policy)
            compile_model(dataclasses.replace(model, policy=policy))
    except SpecError as exc:
        return None, exc.errors
    except CompileError as exc:
        return None, [f"{source if text is None else file}: {exc}"]
    return policy, []


def check_policy_text(model: Model, text: str, file: str) -> list[str]:
    """validate_policy's errors for a text (a module-level function: it runs in a worker)."""
    return validate_policy(model, file, text=text, file=file)[1]


def validate_policy_of(model: Model, source: str | Path, text: str | None,
                       file: str) -> tuple[Policy | None, list[str]]:
    """validate_policy with positional arguments, for a worker process."""
    return validate_policy(model, source, text=text, file=file)


def _compile_old_and_new(model: Model, policy: Policy) \
        -> tuple[dict[str, DesiredState], dict[str, DesiredState]]:
    with gc_paused():
        return compile_model(model), compile_model(dataclasses.replace(model, policy=policy))


async def reload_policy(model: Model, source: str | Path,
                        switches: Mapping[str, StateTaker],
                        installed: Mapping[str, DesiredState] | None = None, *,
                        text: str | None = None, file: str = "policy.yaml",
                        run: Runner = run_here) -> ReloadReport:
    """Validate, compile, apply. On any failure the model keeps its policy and every
    switch touched is given its installed state back. `installed` is what the
    switches were last given (a switch missing from it: the current model's state).
    `run(fn, *args)` runs the parse and validation (e.g. PolicyProcess().run: in a
    worker process, off the loop); the compile runs in a thread, which leaves the new
    policy's entries compiled in this process (compile_model keeps them) for the
    reconciler's next pass."""
    policy, errors = await run(validate_policy_of, model, source, text, file)
    if policy is None:
        return ReloadReport(ok=False, errors=errors)
    old, new = await asyncio.to_thread(_compile_old_and_new, model, policy)
    base = {**old, **(installed or {})}
    report = await apply_states(switches, base, new)
    if not report.ok:
        return ReloadReport(ok=False, errors=[report.error or "apply failed"], apply=report,
                            states=base)
    model.policy = policy
    return ReloadReport(ok=True, apply=report, states=new)
