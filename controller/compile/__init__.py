"""Compile the model (fabric, services, backends, policy) into what each switch holds.

One module per stage of token_router.p4's ingress, named as its P4 control and
its p4src/include/<stage>.p4 file; `STAGES` lists them in the program's order.
Each stage is two small functions of the model: `shared` (entities every switch
holds) and `local` (entities of one switch). `compile_model(model)` returns
{switch name: DesiredState}; it is a pure function of the model: the router
changes backends' weights and states, the policy reload changes the policy, and
both recompile and diff. P4 names come from tokenfabric.p4names (generated).
"""

from __future__ import annotations

from typing import Protocol

from tokenfabric.controller.compile import admit, beacon, classify, count, deliver, pin, qos, select
from tokenfabric.controller.compile.common import (
    DEFAULT_CLASS,
    ClassPlan,
    CompileError,
    plan_classes,
)
from tokenfabric.controller.compile.show import entity_to_dict, state_to_list
from tokenfabric.controller.entries import DesiredState, Entity, TableEntry
from tokenfabric.controller.model import Model, Switch
from tokenfabric.p4names import NUM_CLASSES, TABLE_SIZES


class Stage(Protocol):
    """A stage module: the entities of its P4 control's tables and meters."""

    def shared(self, model: Model, classes: ClassPlan) -> list[Entity]:
        """Entities every switch holds."""
        ...

    def local(self, model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
        """Entities of this switch only."""
        ...


# token_router.p4's ingress order (egress ECN marking is qos's).
STAGES: tuple[Stage, ...] = (beacon, classify, pin, admit, select, qos, deliver, count)

__all__ = ["DEFAULT_CLASS", "NUM_CLASSES", "STAGES", "ClassPlan", "CompileError", "Stage",
           "check_sizes", "compile_model", "entity_to_dict", "plan_classes", "state_to_list"]


# Stages whose shared entities are a function of the policy alone: most of a large
# policy's entries. They are compiled once per Policy object and reused by every later
# call (the reconciler compiles at least once a second): a Policy is a value — replace
# it, or an attribute of it, rather than change a tenant or contract in place.
POLICY_STAGES: tuple[Stage, ...] = (classify, admit, qos)


def compile_model(model: Model) -> dict[str, DesiredState]:
    classes, policy_part = _compiled_policy(model)
    shared: list[Entity] = [e for stage in STAGES if stage not in POLICY_STAGES
                            for e in stage.shared(model, classes)]
    states: dict[str, DesiredState] = {}
    for switch in model.fabric.switches.values():
        state = DesiredState(dict(policy_part.entities))
        for entity in shared:
            state.add(entity)
        for stage in STAGES:
            for entity in stage.local(model, classes, switch):
                state.add(entity)
        check_sizes(switch.name, state)
        states[switch.name] = state
    return states


# The last policy compiled: (its objects, its values, its classes, its entities).
_policy_cache: tuple[tuple[object, ...], tuple[object, ...], ClassPlan, DesiredState] | None = None


def _compiled_policy(model: Model) -> tuple[ClassPlan, DesiredState]:
    global _policy_cache
    policy = model.policy
    # The same objects (held here, so never another object at a reused address) and
    # the same values: an attribute replaced makes it another policy.
    objects = (policy, policy.tenants, policy.contracts, policy.roce)
    values = (len(policy.tenants), len(policy.contracts), policy.default_contract,
              tuple(sorted(policy.class_ids.items())))
    cached = _policy_cache
    if cached is not None and values == cached[1] and all(
            a is b for a, b in zip(objects, cached[0], strict=True)):
        return cached[2], cached[3]
    classes = plan_classes(policy)
    part = DesiredState()
    for stage in POLICY_STAGES:
        for entity in stage.shared(model, classes):
            part.add(entity)
    _policy_cache = (objects, values, classes, part)
    return classes, part


def check_sizes(switch: str, state: DesiredState) -> None:
    """A model needing more entries than a table holds is refused before any write."""
    counts: dict[str, int] = {}
    for entity in state.entities.values():
        if isinstance(entity, TableEntry):
            counts[entity.table] = counts.get(entity.table, 0) + 1
    over = [f"{t} needs {n} entries, the switch holds {TABLE_SIZES[t]}"
            for t, n in sorted(counts.items()) if n > TABLE_SIZES.get(t, n)]
    if over:
        raise CompileError(f"switch {switch}: " + "; ".join(over))
