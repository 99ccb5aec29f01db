"""What the controller wants a switch to hold, independent of protobuf.

The policy compiler and the router produce these; the southbound turns them
into P4Runtime entities with the switch's P4Info and diffs them against what
the switch holds. Every value is a plain int (addresses converted by the
caller), so entries hash, compare and sort, and golden files stay readable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, order=True)
class Exact:
    value: int


@dataclass(frozen=True, order=True)
class Lpm:
    value: int
    prefix_len: int


@dataclass(frozen=True, order=True)
class Ternary:
    value: int
    mask: int


@dataclass(frozen=True, order=True)
class Range:
    low: int
    high: int


MatchValue = Exact | Lpm | Ternary | Range


@dataclass(frozen=True, order=True)
class Action:
    name: str
    params: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, name: str, **params: int) -> Action:
        return cls(name, tuple(sorted(params.items())))


@dataclass(frozen=True, order=True)
class GroupRef:
    """The entry's action comes from an action-profile group (a selector)."""

    group_id: int


@dataclass(frozen=True, order=True)
class MemberRef:
    member_id: int


EntityKey = tuple[Any, ...]  # (kind, where, identity...): one per entity a switch holds


@dataclass(frozen=True, order=True)
class TableEntry:
    table: str
    match: tuple[tuple[str, MatchValue], ...]
    action: Action | GroupRef | MemberRef
    priority: int = 0  # ternary/range/optional tables only

    @classmethod
    def of(cls, table: str, match: Mapping[str, MatchValue],
           action: Action | GroupRef | MemberRef, priority: int = 0) -> TableEntry:
        return cls(table, tuple(sorted(match.items())), action, priority)

    def key(self) -> EntityKey:
        """Identity on the switch: two entries with the same key cannot coexist."""
        return ("table", self.table, self.match, self.priority)


@dataclass(frozen=True, order=True)
class ProfileMember:
    profile: str
    member_id: int
    action: Action

    def key(self) -> EntityKey:
        return ("member", self.profile, self.member_id)


@dataclass(frozen=True, order=True)
class ProfileGroup:
    profile: str
    group_id: int
    members: tuple[tuple[int, int], ...]  # (member_id, weight)
    max_size: int = 0

    def key(self) -> EntityKey:
        return ("group", self.profile, self.group_id)


@dataclass(frozen=True, order=True)
class MeterConfig:
    """An indexed meter cell: RFC 2698 rates (units per second) and bursts."""

    meter: str
    index: int
    cir: int
    cburst: int
    pir: int
    pburst: int

    def key(self) -> EntityKey:
        return ("meter", self.meter, self.index)


@dataclass(frozen=True, order=True)
class MulticastGroup:
    """A packet replication engine group: a packet sent to it is copied to each
    (egress port, instance) replica. The beacon plane's relays (compile/beacon.py)."""

    group_id: int
    replicas: tuple[tuple[int, int], ...]  # (egress port, instance), sorted

    def key(self) -> EntityKey:
        return ("mcast", self.group_id)


Entity = TableEntry | ProfileMember | ProfileGroup | MeterConfig | MulticastGroup


@dataclass
class DesiredState:
    """Everything one switch should hold; keyed so that a diff is a dict comparison."""

    entities: dict[EntityKey, Entity] = field(default_factory=dict)

    def add(self, entity: Entity) -> None:
        key = entity.key()
        if key in self.entities and self.entities[key] != entity:
            raise ValueError(f"two different entities for {key}")
        self.entities[key] = entity

    def diff(self, held: DesiredState) -> tuple[list[Entity], list[Entity], list[Entity]]:
        """(insert, modify, delete) that turn `held` into self."""
        insert = [e for k, e in self.entities.items() if k not in held.entities]
        modify = [e for k, e in self.entities.items()
                  if k in held.entities and held.entities[k] != e]
        delete = [e for k, e in held.entities.items() if k not in self.entities]
        return insert, modify, delete
