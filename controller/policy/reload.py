"""Reload: validate, diff, apply; a failure part-way rolls every switch back.

`apply_states(old, new, write)` takes two {switch: DesiredState} and a writer, the
small Protocol below: `await write(switch, insert, modify, delete)`. Switches are
written one after another in name order; when one raises, every switch written so
far (the failing one included: it may hold part of its batch) gets the reverse
diff, in reverse order, and the result says what failed.

`reload_policy(model, path_or_text, write)` is the operator's action: parse and
validate the new file against the model (a bad file changes nothing), compile,
apply, and only on success make the new policy the model's.

`SouthboundWriter` adapts controller/southbound (whose switches take a whole
desired state and write the difference to what they hold) to the writer Protocol.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from controller import log
from controller.compile import CompileError, compile_model
from controller.entries import DesiredState, Entity
from controller.gctools import gc_paused
from controller.model import Model, Policy
from controller.policy.offload import run_here
from controller.policy.schema import load_policy, parse_policy
from controller.policy.source import SpecError

Runner = Callable[..., Awaitable[Any]]  # run(fn, *args) -> fn(*args), here or elsewhere


class DiffWriter(Protocol):
    def __call__(self, switch: str, insert: list[Entity], modify: list[Entity],
                 delete: list[Entity]) -> Awaitable[Any]: ...


@dataclass
class ApplyReport:
    ok: bool
    changes: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # ins, mod, del
    failed_switch: str | None = None
    error: str | None = None
    rolled_back: list[str] = field(default_factory=list)
    rollback_errors: dict[str, str] = field(default_factory=dict)


@dataclass
class ReloadReport:
    ok: bool
    errors: list[str] = field(default_factory=list)  # file:line: path: message, or apply errors
    apply: ApplyReport | None = None
    states: dict[str, DesiredState] | None = None  # what the switches hold afterwards

    def summary(self) -> dict:
        """JSON-ready, for the REST API."""
        out: dict[str, Any] = {"ok": self.ok, "errors": self.errors}
        if self.apply is not None:
            out["changes"] = {s: dict(zip(("insert", "modify", "delete"), c, strict=True))
                              for s, c in self.apply.changes.items()}
            out["failed_switch"] = self.apply.failed_switch
            out["rolled_back"] = self.apply.rolled_back
            out["rollback_errors"] = self.apply.rollback_errors
        return out


def diff_states(old: dict[str, DesiredState], new: dict[str, DesiredState]) \
        -> dict[str, tuple[list[Entity], list[Entity], list[Entity]]]:
    """(insert, modify, delete) per switch, for switches with any change."""
    out = {}
    for name in sorted(set(old) | set(new)):
        ins, mod, dele = new.get(name, DesiredState()).diff(old.get(name, DesiredState()))
        if ins or mod or dele:
            out[name] = (ins, mod, dele)
    return out


async def apply_states(old: dict[str, DesiredState], new: dict[str, DesiredState],
                       write: DiffWriter) -> ApplyReport:
    plan = diff_states(old, new)
    report = ApplyReport(ok=True, changes={s: (len(i), len(m), len(d))
                                           for s, (i, m, d) in plan.items()})
    touched: list[str] = []
    for name, (ins, mod, dele) in plan.items():
        touched.append(name)
        try:
            await write(name, ins, mod, dele)
        except Exception as exc:  # any failure of a switch triggers the rollback
            log.warning("apply failed on %s: %s; rolling back %s", name, exc, touched)
            report.ok = False
            report.failed_switch = name
            report.error = f"{name}: {exc}"
            await _roll_back(old, new, touched, write, report)
            return report
    return report


async def _roll_back(old: dict[str, DesiredState], new: dict[str, DesiredState],
                     touched: list[str], write: DiffWriter, report: ApplyReport) -> None:
    for name in reversed(touched):
        ins, mod, dele = old.get(name, DesiredState()).diff(new.get(name, DesiredState()))
        try:
            await write(name, ins, mod, dele)
            report.rolled_back.append(name)
        except Exception as exc:
            # The southbound's reconcile (which reads the switch) repairs what is left.
            log.error("rollback of %s failed: %s", name, exc)
            report.rollback_errors[name] = str(exc)


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


async def reload_policy(model: Model, source: str | Path, write: DiffWriter, *,
                        text: str | None = None, file: str = "policy.yaml",
                        run: Runner = run_here) -> ReloadReport:
    """Validate, diff, apply. On any failure the model keeps its policy and every
    switch is rolled back to the previous entries. `run(fn, *args)` runs the parse and
    validation (e.g. PolicyProcess().run: in a worker process, off the loop); the
    compile runs in a thread, which leaves the new policy's entries compiled in this
    process (compile_model keeps them) for the reconciler's next pass."""
    policy, errors = await run(validate_policy_of, model, source, text, file)
    if policy is None:
        return ReloadReport(ok=False, errors=errors)
    old, new = await asyncio.to_thread(_compile_old_and_new, model, policy)
    report = await apply_states(old, new, write)
    if not report.ok:
        return ReloadReport(ok=False, errors=[report.error or "apply failed"], apply=report,
                            states=old)
    model.policy = policy
    return ReloadReport(ok=True, apply=report, states=new)


async def sync_model(model: Model, current: dict[str, DesiredState], write: DiffWriter) \
        -> tuple[ApplyReport, dict[str, DesiredState]]:
    """After the router changed the model (weights, drain, down, mode, a new backend):
    compile, write the difference, and return what the switches now hold (the new
    states, or `current` again when a switch failed and everything was rolled back)."""
    new = compile_model(model)
    report = await apply_states(current, new, write)
    return report, (new if report.ok else current)


class SouthboundWriter:
    """The writer Protocol over controller/southbound: each switch takes a whole state.

    It remembers the state it last gave each switch (start it with what the switches
    were given), adds the diff, and hands the result to `set_state(switch, state)`,
    e.g. `lambda name, state: southbound[name].apply(state)`.
    """

    def __init__(self, set_state: Callable[[str, DesiredState], Awaitable[Any]],
                 current: dict[str, DesiredState]) -> None:
        self.set_state = set_state
        self.current = {k: DesiredState(dict(v.entities)) for k, v in current.items()}

    async def __call__(self, switch: str, insert: list[Entity], modify: list[Entity],
                       delete: list[Entity]) -> None:
        def build() -> DesiredState:
            with gc_paused():
                target = DesiredState(dict(self.current.get(switch, DesiredState()).entities))
                for entity in (*insert, *modify):
                    target.entities[entity.key()] = entity
                for entity in delete:
                    target.entities.pop(entity.key(), None)
                return target

        # (a policy of thousands of tenants is tens of thousands of keys: not on the loop)
        target = await asyncio.to_thread(build) if len(insert) + len(modify) + len(delete) \
            > 1000 else build()
        # Remember the target before writing: on failure the rollback's reverse diff
        # is taken against it, which brings the switch back to the old state.
        self.current[switch] = target
        await self.set_state(switch, target)
