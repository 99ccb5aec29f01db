"""Weighted selector groups for targets that only take weight 1.

Current BMv2 (PI) accepts member weights and emulates them itself by
installing copies of the member. A target without that support gets
`weights="expand"`: the southbound installs the copies as members of their
own (copy k of member m gets id m | k << COPY_SHIFT) and lists each copy once
in the group, and folds them back into a weight when showing what a switch
holds. Diffs are taken on the expanded form, so nothing is rewritten needlessly.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenfabric.controller.entries import Entity, ProfileGroup, ProfileMember
from tokenfabric.controller.southbound.errors import TranslationError

COPY_SHIFT = 20
MAX_BASE_ID = 1 << COPY_SHIFT  # member ids below this may carry weights
MAX_WEIGHT = (1 << (32 - COPY_SHIFT)) - 1


def copy_id(member_id: int, copy: int) -> int:
    return member_id | (copy << COPY_SHIFT)


def base_of(member_id: int) -> tuple[int, int]:
    """(base member id, copy number) of a member id; copy 0 is the member itself."""
    return member_id & (MAX_BASE_ID - 1), member_id >> COPY_SHIFT


def expand(entities: Iterable[Entity]) -> list[Entity]:
    """Weights > 1 become copies of the member, each listed once in the group."""
    entities = list(entities)
    members = {(e.profile, e.member_id): e for e in entities if isinstance(e, ProfileMember)}
    out: list[Entity] = []
    copies: dict[tuple[str, int], ProfileMember] = {}
    for entity in entities:
        if isinstance(entity, ProfileMember) and entity.member_id >= MAX_BASE_ID:
            raise TranslationError(f"member id {entity.member_id} >= {MAX_BASE_ID}: ids at or "
                                   f"above that are reserved for weight copies")
        if not isinstance(entity, ProfileGroup):
            out.append(entity)
            continue
        listed: list[tuple[int, int]] = []
        for member_id, weight in entity.members:
            if not 1 <= weight <= MAX_WEIGHT:
                raise TranslationError(f"group {entity.group_id}: member {member_id} weight "
                                       f"{weight} not in 1..{MAX_WEIGHT}")
            listed.append((member_id, 1))
            if weight == 1:
                continue
            base = members.get((entity.profile, member_id))
            if base is None:
                raise TranslationError(f"group {entity.group_id} weights member {member_id}, "
                                       f"which is not in the desired state")
            for k in range(1, weight):
                cid = copy_id(member_id, k)
                copies[(entity.profile, cid)] = ProfileMember(entity.profile, cid, base.action)
                listed.append((cid, 1))
        out.append(ProfileGroup(entity.profile, entity.group_id, tuple(sorted(listed)),
                                entity.max_size))
    return list(copies.values()) + out


def collapse(entities: Iterable[Entity]) -> list[Entity]:
    """The inverse of expand, for showing what a switch holds."""
    entities = list(entities)
    out: list[Entity] = []
    for entity in entities:
        if isinstance(entity, ProfileMember) and base_of(entity.member_id)[1]:
            continue
        if isinstance(entity, ProfileGroup):
            weights: dict[int, int] = {}
            for member_id, weight in entity.members:
                base, _ = base_of(member_id)
                weights[base] = weights.get(base, 0) + weight
            entity = ProfileGroup(entity.profile, entity.group_id,
                                  tuple(sorted(weights.items())), entity.max_size)
        out.append(entity)
    return out
