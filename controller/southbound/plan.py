"""Turn (desired, held) into ordered phases of updates.

Members must exist before the groups that list them, and groups before the
table entries that point at them; deletes go the other way. BMv2 executes a
batch in any order (CONTINUE_ON_ERROR only), so every phase is its own Write
RPC(s) and the next phase starts only when the previous one succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenfabric.controller.entries import (
    DesiredState,
    Entity,
    MeterConfig,
    MulticastGroup,
    ProfileGroup,
    ProfileMember,
    TableEntry,
)

INSERT, MODIFY, DELETE = "INSERT", "MODIFY", "DELETE"
RESET = "RESET"  # a meter cell back to its default (a MODIFY without config on the wire)


@dataclass(frozen=True)
class Update:
    type: str  # INSERT, MODIFY, DELETE, RESET
    entity: Entity


@dataclass
class Plan:
    phases: list[list[Update]] = field(default_factory=list)
    inserts: int = 0
    modifies: int = 0
    deletes: int = 0

    @property
    def size(self) -> int:
        return self.inserts + self.modifies + self.deletes


def _rank(entity: Entity) -> int:
    if isinstance(entity, ProfileMember):
        return 0
    if isinstance(entity, ProfileGroup | MulticastGroup):
        return 1  # before the table entries whose actions name them
    return 2  # table entries and meter cells


def meters_match(want: MeterConfig, held: MeterConfig) -> bool:
    """Equal up to the rounding of targets that store rates per microsecond (BMv2)."""
    def close(a: int, b: int) -> bool:
        return abs(a - b) <= max(2, a // 10**6)
    return all(close(getattr(want, f), getattr(held, f))
               for f in ("cir", "cburst", "pir", "pburst"))


def plan(desired: DesiredState, held: DesiredState) -> Plan:
    """The phases that turn `held` into `desired` (both normalized)."""
    held_view = DesiredState(dict(held.entities))
    for key, want in desired.entities.items():
        have = held_view.entities.get(key)
        if isinstance(want, MeterConfig) and isinstance(have, MeterConfig) \
                and meters_match(want, have):
            held_view.entities[key] = want
    insert, modify, delete = desired.diff(held_view)
    result = Plan(inserts=len(insert), modifies=len(modify), deletes=len(delete))
    writes: list[list[Update]] = [[], [], []]
    removes: list[list[Update]] = [[], [], []]
    for entity in insert:
        kind = MODIFY if isinstance(entity, MeterConfig) else INSERT  # meter cells always exist
        writes[_rank(entity)].append(Update(kind, entity))
    for entity in modify:
        writes[_rank(entity)].append(Update(MODIFY, entity))
    for entity in delete:
        kind = RESET if isinstance(entity, MeterConfig) else DELETE
        removes[_rank(entity)].append(Update(kind, entity))
    for phase in writes + removes[::-1]:
        if phase:
            phase.sort(key=_sort_key)
            result.phases.append(phase)
    return result


def _sort_key(update: Update) -> tuple[Any, ...]:
    # deterministic order: the same diff always makes the same batches
    entity = update.entity
    if isinstance(entity, TableEntry):
        return (entity.table, repr(entity.match), entity.priority)
    return (repr(entity.key()),)
