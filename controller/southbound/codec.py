"""tokenfabric.controller.entries entities <-> P4Runtime protobuf Entities, through the P4Info.

Two steps, both checked against the P4 program:
- `normalize` puts an entity into the one form a switch will give back on a
  Read (P4Runtime 1.4 canonical form): full names, don't-care matches left
  out, LPM/ternary values masked, group members sorted. Desired and held
  entities are compared in this form, so a diff never reports a difference
  that is only spelling.
- `encode` / `decode` translate to and from protobuf; integers travel as
  canonical bytestrings (big-endian, no leading zero bytes, at least one byte).
"""

from __future__ import annotations

from dataclasses import replace

from p4.v1 import p4runtime_pb2

from tokenfabric.controller.entries import (
    Action,
    Entity,
    EntityKey,
    Exact,
    GroupRef,
    Lpm,
    MatchValue,
    MemberRef,
    MeterConfig,
    MulticastGroup,
    ProfileGroup,
    ProfileMember,
    Range,
    TableEntry,
    Ternary,
)
from tokenfabric.controller.southbound.errors import TranslationError
from tokenfabric.controller.southbound.p4info import MatchType, P4InfoIndex, TableInfo


def encode_int(value: int, bitwidth: int, what: str = "value") -> bytes:
    """The canonical bytestring of `value` for a field of `bitwidth` bits."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TranslationError(f"{what}: expected an int, got {value!r}")
    if value < 0 or value.bit_length() > bitwidth:
        raise TranslationError(f"{what}: {value} does not fit in {bitwidth} bits")
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def decode_int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _all_ones(bitwidth: int) -> int:
    return (1 << bitwidth) - 1


class Codec:
    """Translate entities of one P4 program."""

    def __init__(self, index: P4InfoIndex) -> None:
        self.index = index

    # ---- normalize ---------------------------------------------------------------

    def normalize(self, entity: Entity) -> Entity:
        """The canonical form of `entity`; raises TranslationError naming the problem."""
        try:
            if isinstance(entity, TableEntry):
                return self._normalize_table_entry(entity)
            if isinstance(entity, ProfileMember):
                profile = self.index.profile(entity.profile)
                self._check_id(entity.member_id, "member_id")
                return replace(entity, profile=profile.name,
                               action=self._normalize_action(entity.action, None))
            if isinstance(entity, ProfileGroup):
                return self._normalize_group(entity)
            if isinstance(entity, MeterConfig):
                return self._normalize_meter(entity)
            if isinstance(entity, MulticastGroup):
                return self._normalize_multicast(entity)
        except TranslationError as exc:
            raise TranslationError(f"{exc} (in {entity})") from None
        raise TranslationError(f"not an entity: {entity!r}")

    @staticmethod
    def _check_id(value: int, what: str) -> None:
        if not isinstance(value, int) or not 0 < value < 2**32:
            raise TranslationError(f"{what} must be an integer in 1..2^32-1, got {value!r}")

    def _normalize_table_entry(self, entry: TableEntry) -> TableEntry:
        table = self.index.table(entry.table)
        if table.is_const:
            raise TranslationError(f"table {table.name} is const: it takes no entries")
        given = dict(entry.match)
        if len(given) != len(entry.match):
            raise TranslationError("a match field is given twice")
        match: list[tuple[str, MatchValue]] = []
        for name, value in given.items():
            field = table.match_fields.get(name)
            if field is None:
                known = ", ".join(table.match_fields) or "none"
                raise TranslationError(
                    f"table {table.name} has no match field {name!r} (it has: {known})")
            canonical = self._normalize_match(field.name, field.match_type, field.bitwidth, value)
            if canonical is not None:
                match.append((field.name, canonical))
        for field in table.match_fields.values():
            if field.match_type == MatchType.EXACT and field.name not in given:
                raise TranslationError(f"exact match field {field.name} is missing")
        if table.needs_priority and entry.priority <= 0:
            raise TranslationError(f"table {table.name} needs a priority > 0 "
                                   f"(it has ternary, range or optional fields)")
        if not table.needs_priority and entry.priority != 0:
            raise TranslationError(f"table {table.name} takes no priority (got {entry.priority})")
        if not 0 <= entry.priority < 2**31:
            raise TranslationError(f"priority {entry.priority} out of range")
        action = entry.action
        if isinstance(action, Action):
            if table.implementation_id:
                raise TranslationError(f"table {table.name} takes its actions from an action "
                                       f"profile: use GroupRef or MemberRef")
            action = self._normalize_action(action, table)
        else:
            if not table.implementation_id:
                raise TranslationError(f"table {table.name} has no action profile, so "
                                       f"{type(action).__name__} cannot be used")
            ref = action.group_id if isinstance(action, GroupRef) else action.member_id
            self._check_id(ref, type(action).__name__)
            if isinstance(action, GroupRef) and not self.index.profile(
                    table.implementation_id).with_selector:
                raise TranslationError(f"the action profile of {table.name} has no selector: "
                                       f"GroupRef cannot be used")
        return TableEntry(table.name, tuple(sorted(match)), action, entry.priority)

    @staticmethod
    def _normalize_match(name: str, match_type: int, bitwidth: int,
                         value: MatchValue) -> MatchValue | None:
        """The canonical match value, or None for a don't-care (left out on the wire)."""
        def fits(v: int, what: str) -> None:
            encode_int(v, bitwidth, f"{name} {what}")

        if match_type == MatchType.EXACT or match_type == MatchType.OPTIONAL:
            if not isinstance(value, Exact):
                kind = "exact" if match_type == MatchType.EXACT else "optional (use Exact)"
                raise TranslationError(f"match field {name} is {kind}, got {value}")
            fits(value.value, "value")
            return value
        if match_type == MatchType.LPM:
            if not isinstance(value, Lpm):
                raise TranslationError(f"match field {name} is lpm, got {value}")
            if not 0 <= value.prefix_len <= bitwidth:
                raise TranslationError(f"{name}: prefix length {value.prefix_len} not in "
                                       f"0..{bitwidth}")
            fits(value.value, "value")
            if value.prefix_len == 0:
                return None
            mask = _all_ones(bitwidth) ^ _all_ones(bitwidth - value.prefix_len)
            return Lpm(value.value & mask, value.prefix_len)
        if match_type == MatchType.TERNARY:
            if not isinstance(value, Ternary):
                raise TranslationError(f"match field {name} is ternary, got {value}")
            fits(value.value, "value")
            fits(value.mask, "mask")
            if value.mask == 0:
                return None
            return Ternary(value.value & value.mask, value.mask)
        if match_type == MatchType.RANGE:
            if not isinstance(value, Range):
                raise TranslationError(f"match field {name} is range, got {value}")
            fits(value.low, "low")
            fits(value.high, "high")
            if value.low > value.high:
                raise TranslationError(f"{name}: range low {value.low} > high {value.high}")
            if value.low == 0 and value.high == _all_ones(bitwidth):
                return None
            return value
        raise TranslationError(f"match field {name}: unsupported match type {match_type}")

    def _normalize_action(self, action: Action, table: TableInfo | None) -> Action:
        if not isinstance(action, Action):
            raise TranslationError(f"expected an Action, got {action!r}")
        info = self.index.action(action.name)
        if table is not None and info.id not in table.action_ids:
            raise TranslationError(f"action {info.name} is not an action of table {table.name}")
        given = dict(action.params)
        if len(given) != len(action.params):
            raise TranslationError(f"action {info.name}: a parameter is given twice")
        if set(given) != set(info.params):
            raise TranslationError(f"action {info.name} takes parameters "
                                   f"{sorted(info.params)}, got {sorted(given)}")
        for name, value in given.items():
            encode_int(value, info.params[name].bitwidth, f"action {info.name} param {name}")
        return Action(info.name, tuple(sorted(given.items())))

    def _normalize_group(self, group: ProfileGroup) -> ProfileGroup:
        profile = self.index.profile(group.profile)
        if not profile.with_selector:
            raise TranslationError(f"action profile {profile.name} has no selector: no groups")
        self._check_id(group.group_id, "group_id")
        ids = [member_id for member_id, _ in group.members]
        if len(set(ids)) != len(ids):
            raise TranslationError(f"group {group.group_id} lists a member twice: "
                                   f"give it a weight instead")
        for member_id, weight in group.members:
            self._check_id(member_id, "member_id")
            if not isinstance(weight, int) or weight < 1:
                raise TranslationError(f"member {member_id} weight must be >= 1, got {weight!r}")
        if group.max_size < 0:
            raise TranslationError(f"group max_size must be >= 0, got {group.max_size}")
        return ProfileGroup(profile.name, group.group_id, tuple(sorted(group.members)),
                            group.max_size)

    def _normalize_meter(self, meter: MeterConfig) -> MeterConfig:
        info = self.index.meter(meter.meter)
        if not 0 <= meter.index < max(info.size, 1):
            raise TranslationError(f"meter {info.name} index {meter.index} not in "
                                   f"0..{info.size - 1}")
        for what in ("cir", "cburst", "pir", "pburst"):
            value = getattr(meter, what)
            if not isinstance(value, int) or not 0 <= value < 2**63:
                raise TranslationError(f"meter {info.name} {what} must be >= 0, got {value!r}")
        if meter.pir < meter.cir:
            raise TranslationError(f"meter {info.name}: pir {meter.pir} < cir {meter.cir} "
                                   f"(RFC 2698 needs PIR >= CIR)")
        return replace(meter, meter=info.name)

    @staticmethod
    def _normalize_multicast(group: MulticastGroup) -> MulticastGroup:
        # Group 0 means "no multicast" to the dataplane (v1model mcast_grp).
        if not isinstance(group.group_id, int) or not 0 < group.group_id < 2**16:
            raise TranslationError(f"multicast group id must be in 1..65535, "
                                   f"got {group.group_id!r}")
        replicas = tuple(sorted(group.replicas))
        if len(set(replicas)) != len(replicas):
            raise TranslationError(f"multicast group {group.group_id} lists a replica twice")
        for port, instance in replicas:
            if not isinstance(port, int) or not 0 <= port < 2**32:
                raise TranslationError(f"multicast group {group.group_id}: bad port {port!r}")
            if not isinstance(instance, int) or not 0 <= instance < 2**32:
                raise TranslationError(f"multicast group {group.group_id}: bad instance "
                                       f"{instance!r}")
        return MulticastGroup(group.group_id, replicas)

    # ---- encode ------------------------------------------------------------------

    def encode(self, entity: Entity, pb: p4runtime_pb2.Entity | None = None) \
            -> p4runtime_pb2.Entity:
        """Protobuf of a normalized entity, built in `pb` when given (saves a copy)."""
        pb = p4runtime_pb2.Entity() if pb is None else pb
        if isinstance(entity, TableEntry):
            self._encode_table_entry(entity, pb.table_entry)
        elif isinstance(entity, ProfileMember):
            member = pb.action_profile_member
            member.action_profile_id = self.index.profile(entity.profile).id
            member.member_id = entity.member_id
            self._encode_action(entity.action, member.action)
        elif isinstance(entity, ProfileGroup):
            group = pb.action_profile_group
            group.action_profile_id = self.index.profile(entity.profile).id
            group.group_id = entity.group_id
            group.max_size = entity.max_size
            for member_id, weight in entity.members:
                group.members.add(member_id=member_id, weight=weight)
        elif isinstance(entity, MeterConfig):
            entry = pb.meter_entry
            entry.meter_id = self.index.meter(entity.meter).id
            entry.index.index = entity.index
            entry.config.cir = entity.cir
            entry.config.cburst = entity.cburst
            entry.config.pir = entity.pir
            entry.config.pburst = entity.pburst
        elif isinstance(entity, MulticastGroup):
            mcast = pb.packet_replication_engine_entry.multicast_group_entry
            mcast.multicast_group_id = entity.group_id
            for port, instance in entity.replicas:
                mcast.replicas.add(egress_port=port, instance=instance)
        else:
            raise TranslationError(f"not an entity: {entity!r}")
        return pb

    def _encode_table_entry(self, entry: TableEntry, pb: p4runtime_pb2.TableEntry) -> None:
        table = self.index.table(entry.table)
        pb.table_id = table.id
        pb.priority = entry.priority
        for name, value in entry.match:
            field = table.match_fields[name]
            fm = pb.match.add(field_id=field.id)
            width = field.bitwidth
            if field.match_type == MatchType.OPTIONAL and isinstance(value, Exact):
                fm.optional.value = encode_int(value.value, width, name)
            elif isinstance(value, Exact):
                fm.exact.value = encode_int(value.value, width, name)
            elif isinstance(value, Lpm):
                fm.lpm.value = encode_int(value.value, width, name)
                fm.lpm.prefix_len = value.prefix_len
            elif isinstance(value, Ternary):
                fm.ternary.value = encode_int(value.value, width, name)
                fm.ternary.mask = encode_int(value.mask, width, name)
            elif isinstance(value, Range):
                fm.range.low = encode_int(value.low, width, name)
                fm.range.high = encode_int(value.high, width, name)
        if isinstance(entry.action, Action):
            self._encode_action(entry.action, pb.action.action)
        elif isinstance(entry.action, GroupRef):
            pb.action.action_profile_group_id = entry.action.group_id
        else:
            pb.action.action_profile_member_id = entry.action.member_id

    def _encode_action(self, action: Action, pb: p4runtime_pb2.Action) -> None:
        info = self.index.action(action.name)
        pb.action_id = info.id
        for name, value in action.params:
            param = info.params[name]
            pb.params.add(param_id=param.id, value=encode_int(value, param.bitwidth, name))

    # ---- decode ------------------------------------------------------------------

    def decode(self, pb: p4runtime_pb2.Entity) -> Entity | None:
        """The entity of a protobuf read from a switch (None: a meter cell with no config)."""
        kind = pb.WhichOneof("entity")
        if kind == "table_entry":
            return self._decode_table_entry(pb.table_entry)
        if kind == "action_profile_member":
            member = pb.action_profile_member
            return ProfileMember(self.index.profile(member.action_profile_id).name,
                                 member.member_id, self._decode_action(member.action))
        if kind == "action_profile_group":
            group = pb.action_profile_group
            return ProfileGroup(self.index.profile(group.action_profile_id).name, group.group_id,
                                tuple(sorted((m.member_id, m.weight or 1)
                                             for m in group.members)),
                                group.max_size)
        if kind == "meter_entry":
            entry = pb.meter_entry
            config = entry.config
            if not entry.HasField("config") or not (config.cir or config.pir or config.cburst
                                                     or config.pburst):
                return None
            return MeterConfig(self.index.meter(entry.meter_id).name, entry.index.index,
                               config.cir, config.cburst, config.pir, config.pburst)
        if kind == "packet_replication_engine_entry" \
                and pb.packet_replication_engine_entry.HasField("multicast_group_entry"):
            mcast = pb.packet_replication_engine_entry.multicast_group_entry
            return MulticastGroup(mcast.multicast_group_id,
                                  tuple(sorted((r.egress_port, r.instance)
                                               for r in mcast.replicas)))
        raise TranslationError(f"cannot decode entity of kind {kind}")

    def decode_key(self, pb: p4runtime_pb2.TableEntry) -> EntityKey:
        """TableEntry.key() of a protobuf table entry (which may carry no action)."""
        table = self.index.table(pb.table_id)
        return ("table", table.name, self._decode_match(table, pb), pb.priority)

    def _decode_table_entry(self, pb: p4runtime_pb2.TableEntry) -> TableEntry:
        table = self.index.table(pb.table_id)
        match = self._decode_match(table, pb)
        which = pb.action.WhichOneof("type")
        if which == "action":
            action: Action | GroupRef | MemberRef = self._decode_action(pb.action.action)
        elif which == "action_profile_group_id":
            action = GroupRef(pb.action.action_profile_group_id)
        elif which == "action_profile_member_id":
            action = MemberRef(pb.action.action_profile_member_id)
        else:
            raise TranslationError(f"table {table.name}: entry without action ({which})")
        return TableEntry(table.name, match, action, pb.priority)

    def _decode_match(self, table: TableInfo, pb: p4runtime_pb2.TableEntry) \
            -> tuple[tuple[str, MatchValue], ...]:
        match: list[tuple[str, MatchValue]] = []
        for fm in pb.match:
            field = table.fields_by_id.get(fm.field_id)
            if field is None:
                raise TranslationError(f"table {table.name}: unknown field id {fm.field_id}")
            which = fm.WhichOneof("field_match_type")
            if which == "exact":
                value: MatchValue = Exact(decode_int(fm.exact.value))
            elif which == "optional":
                value = Exact(decode_int(fm.optional.value))
            elif which == "lpm":
                value = Lpm(decode_int(fm.lpm.value), fm.lpm.prefix_len)
            elif which == "ternary":
                value = Ternary(decode_int(fm.ternary.value), decode_int(fm.ternary.mask))
            elif which == "range":
                value = Range(decode_int(fm.range.low), decode_int(fm.range.high))
            else:
                raise TranslationError(f"table {table.name}: unsupported match {which}")
            match.append((field.name, value))
        return tuple(sorted(match))

    def _decode_action(self, pb: p4runtime_pb2.Action) -> Action:
        info = self.index.action(pb.action_id)
        params = []
        for param in pb.params:
            spec = info.params_by_id.get(param.param_id)
            if spec is None:
                raise TranslationError(f"action {info.name}: unknown param id {param.param_id}")
            params.append((spec.name, decode_int(param.value)))
        return Action(info.name, tuple(sorted(params)))
