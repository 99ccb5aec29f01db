"""Reconcile a P4Runtime switch: normalize the desired state, read what the switch
holds, diff (controller/southbound/plan.py) and count what the written phases did.

The pieces are functions of their inputs; controller/southbound/switch.py runs
them under the switch's lock with its session's Rpc.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from p4.v1 import p4runtime_pb2

from tokenfabric.controller.entries import DesiredState, Entity
from tokenfabric.controller.gctools import gc_paused
from tokenfabric.controller.southbound import weights
from tokenfabric.controller.southbound.codec import Codec
from tokenfabric.controller.southbound.p4info import P4InfoIndex
from tokenfabric.controller.southbound.plan import DELETE, INSERT, RESET, Update, plan


@dataclass
class Normalizer:
    """Entities in the switch's canonical form, each object normalized once.

    The compiler hands the same entity objects again while the policy is the same
    (thousands of tenant entries): normalize each object once, not at every push.
    """

    expand_weights: bool = False
    _codec: Codec | None = None
    _memo: dict[int, tuple[Entity, Entity]] = field(default_factory=dict)

    def __call__(self, codec: Codec, desired: DesiredState) -> DesiredState:
        entities: Iterable[Entity] = desired.entities.values()
        if self.expand_weights:
            entities = weights.expand(entities)
        memo = self._memo if self._codec is codec else {}
        seen: dict[int, tuple[Entity, Entity]] = {}
        out = DesiredState()
        for entity in entities:
            hit = memo.get(id(entity))
            normal = hit[1] if hit is not None and hit[0] is entity else codec.normalize(entity)
            seen[id(entity)] = (entity, normal)  # holds entity: its id stays its own
            out.add(normal)
        self._codec, self._memo = codec, seen
        return out

    def paused(self, codec: Codec, desired: DesiredState) -> DesiredState:
        """The same with the GC paused (tens of thousands of new objects: gctools.py)."""
        with gc_paused():
            return self(codec, desired)


def wildcard(kind: str, id_field: str, id_value: int) -> p4runtime_pb2.Entity:
    """An entity that reads every entry of one table, profile, meter or counter, e.g.
    wildcard("table_entry", "table_id", 33554433)."""
    pb = p4runtime_pb2.Entity()
    setattr(getattr(pb, kind), id_field, id_value)
    return pb


def read_all_request(index: P4InfoIndex) -> list[p4runtime_pb2.Entity]:
    """Wildcard reads of every non-const table, every profile's members and groups,
    every meter's cells and every multicast group."""
    entities = [wildcard("table_entry", "table_id", table.id)
                for table in index.tables() if not table.is_const]
    for profile in index.profiles():
        entities.append(wildcard("action_profile_member", "action_profile_id", profile.id))
        if profile.with_selector:
            entities.append(wildcard("action_profile_group", "action_profile_id", profile.id))
    entities += [wildcard("meter_entry", "meter_id", meter.id) for meter in index.meters()]
    # Group id 0: every multicast group (the beacon plane's relays).
    pre = p4runtime_pb2.Entity()
    pre.packet_replication_engine_entry.multicast_group_entry.multicast_group_id = 0
    entities.append(pre)
    return entities


def decode_all(codec: Codec, pbs: list[p4runtime_pb2.Entity]) -> DesiredState:
    """Read entities as a DesiredState (default actions left out)."""
    held = DesiredState()
    for pb in pbs:
        if pb.HasField("table_entry") and pb.table_entry.is_default_action:
            continue
        entity = codec.decode(pb)
        if entity is not None:
            held.entities[entity.key()] = entity
    return held


def count_phase(phase: list[Update], held: DesiredState) -> tuple[int, int, int]:
    """(inserted, modified, deleted) entities of one written phase."""
    inserted = modified = deleted = 0
    for update in phase:
        if update.type == INSERT:
            inserted += 1
        elif update.type in (DELETE, RESET):
            deleted += 1
        elif update.entity.key() in held.entities:
            modified += 1
        else:  # a meter cell set for the first time counts as an insert
            inserted += 1
    return inserted, modified, deleted


__all__ = ["Normalizer", "count_phase", "decode_all", "plan", "read_all_request", "wildcard"]
