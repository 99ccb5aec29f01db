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

from controller.compile import admit, beacon, classify, count, deliver, pin, qos, select
from controller.compile.common import (
    DEFAULT_CLASS,
    ClassPlan,
    CompileError,
    plan_classes,
)
from controller.compile.show import entity_to_dict, state_to_list
from controller.entries import DesiredState, Entity, TableEntry
from controller.model import Model, Switch
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


def compile_model(model: Model) -> dict[str, DesiredState]:
    classes = plan_classes(model.policy)
    shared: list[Entity] = [e for stage in STAGES for e in stage.shared(model, classes)]
    states: dict[str, DesiredState] = {}
    for switch in model.fabric.switches.values():
        state = DesiredState()
        for entity in shared:
            state.add(entity)
        for stage in STAGES:
            for entity in stage.local(model, classes, switch):
                state.add(entity)
        check_sizes(switch.name, state)
        states[switch.name] = state
    return states


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
