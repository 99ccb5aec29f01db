"""P4Info lookups by name, and the pipeline (P4Info + BMv2 JSON + cookie) to push.

Names may be given fully qualified (`TokenIngress.classify.tenant`) or by
the alias p4c gives them (`tenant`); the index answers with the full name so
that entries read back from a switch compare equal to what the policy asked for.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from google.protobuf import text_format
from google.protobuf.message import DecodeError
from p4.config.v1 import p4info_pb2

from tokenfabric.controller.southbound.errors import PipelineError, TranslationError

MatchType = p4info_pb2.MatchField.MatchType


@dataclass(frozen=True)
class MatchFieldInfo:
    id: int
    name: str
    bitwidth: int
    match_type: int  # p4info_pb2.MatchField.MatchType


@dataclass(frozen=True)
class ParamInfo:
    id: int
    name: str
    bitwidth: int


@dataclass(frozen=True)
class Named:
    """What every P4Info object's preamble gives: its id and full name."""

    id: int
    name: str


@dataclass(frozen=True)
class ActionInfo(Named):
    params: dict[str, ParamInfo]
    params_by_id: dict[int, ParamInfo]


@dataclass(frozen=True)
class TableInfo(Named):
    match_fields: dict[str, MatchFieldInfo]
    fields_by_id: dict[int, MatchFieldInfo]
    action_ids: frozenset[int]
    implementation_id: int  # action profile id, 0 for direct tables
    is_const: bool
    direct_counter_ids: tuple[int, ...]

    @property
    def needs_priority(self) -> bool:
        kinds = {f.match_type for f in self.match_fields.values()}
        return bool(kinds & {MatchType.TERNARY, MatchType.RANGE, MatchType.OPTIONAL})


@dataclass(frozen=True)
class ProfileInfo(Named):
    with_selector: bool
    size: int
    max_group_size: int


@dataclass(frozen=True)
class IndexedInfo(Named):
    """A counter or meter array."""

    size: int


Info = TypeVar("Info")


@dataclass
class _Names(Generic[Info]):
    """One kind of P4 object: by full name, by alias, by id."""

    kind: str
    by_name: dict[str, Info] = field(default_factory=dict)
    by_alias: dict[str, Info] = field(default_factory=dict)
    by_id: dict[int, Info] = field(default_factory=dict)

    def add(self, preamble: p4info_pb2.Preamble, info: Info) -> None:
        self.by_name[preamble.name] = info
        if preamble.alias:
            self.by_alias.setdefault(preamble.alias, info)
        self.by_id[preamble.id] = info

    def __call__(self, name_or_id: str | int) -> Info:
        """By id (an int) or by full name or alias."""
        if isinstance(name_or_id, int):
            return self.get_id(name_or_id)
        return self.get(name_or_id)

    def get(self, name: str) -> Info:
        found = self.by_name.get(name) or self.by_alias.get(name)
        if found is None:
            known = ", ".join(sorted(self.by_name)) or "none"
            raise TranslationError(f"unknown {self.kind} {name!r} (the P4 program has: {known})")
        return found

    def get_id(self, p4_id: int) -> Info:
        found = self.by_id.get(p4_id)
        if found is None:
            raise TranslationError(f"unknown {self.kind} id {p4_id}")
        return found


class P4InfoIndex:
    """Everything the translation needs from a P4Info, looked up by name or id."""

    def __init__(self, p4info: p4info_pb2.P4Info) -> None:
        self.p4info = p4info
        self._tables = _Names[TableInfo]("table")
        self._actions = _Names[ActionInfo]("action")
        self._profiles = _Names[ProfileInfo]("action profile")
        self._counters = _Names[IndexedInfo]("counter")
        self._direct_counters = _Names[IndexedInfo]("direct counter")
        self._meters = _Names[IndexedInfo]("meter")
        for action in p4info.actions:
            params = {p.name: ParamInfo(p.id, p.name, p.bitwidth) for p in action.params}
            self._actions.add(action.preamble, ActionInfo(
                action.preamble.id, action.preamble.name, params,
                {p.id: p for p in params.values()}))
        for table in p4info.tables:
            fields = {m.name: MatchFieldInfo(m.id, m.name, m.bitwidth, m.match_type)
                      for m in table.match_fields}
            self._tables.add(table.preamble, TableInfo(
                table.preamble.id, table.preamble.name, fields,
                {f.id: f for f in fields.values()},
                frozenset(ref.id for ref in table.action_refs), table.implementation_id,
                table.is_const_table,
                tuple(i for i in table.direct_resource_ids
                      if any(c.preamble.id == i for c in p4info.direct_counters))))
        for prof in p4info.action_profiles:
            self._profiles.add(prof.preamble, ProfileInfo(
                prof.preamble.id, prof.preamble.name, prof.with_selector, prof.size,
                prof.max_group_size))
        for counter in p4info.counters:
            self._counters.add(counter.preamble, IndexedInfo(
                counter.preamble.id, counter.preamble.name, counter.size))
        for counter in p4info.direct_counters:
            self._direct_counters.add(counter.preamble, IndexedInfo(
                counter.preamble.id, counter.preamble.name, 0))
        for meter in p4info.meters:
            self._meters.add(meter.preamble, IndexedInfo(
                meter.preamble.id, meter.preamble.name, meter.size))

    def table(self, name_or_id: str | int) -> TableInfo:
        return self._tables(name_or_id)

    def action(self, name_or_id: str | int) -> ActionInfo:
        return self._actions(name_or_id)

    def profile(self, name_or_id: str | int) -> ProfileInfo:
        return self._profiles(name_or_id)

    def counter(self, name_or_id: str | int) -> IndexedInfo:
        return self._counters(name_or_id)

    def meter(self, name_or_id: str | int) -> IndexedInfo:
        return self._meters(name_or_id)

    def tables(self) -> list[TableInfo]:
        return list(self._tables.by_id.values())

    def profiles(self) -> list[ProfileInfo]:
        return list(self._profiles.by_id.values())

    def meters(self) -> list[IndexedInfo]:
        return list(self._meters.by_id.values())

    def counters(self) -> list[IndexedInfo]:
        return list(self._counters.by_id.values())


def load_p4info(path: str | Path) -> p4info_pb2.P4Info:
    """Read a P4Info in text format (.txt/.txtpb/.pb.txt) or binary (.bin/.pb)."""
    path = Path(path)
    data = path.read_bytes()
    p4info = p4info_pb2.P4Info()
    try:
        if path.suffix in (".bin", ".pb"):
            p4info.ParseFromString(data)
        else:
            text_format.Parse(data.decode(), p4info, allow_unknown_field=True)
    except (text_format.ParseError, DecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a P4Info: {exc}") from None
    return p4info


def pipeline_cookie(device_config: bytes, p4info: p4info_pb2.P4Info) -> int:
    """A 64-bit cookie that changes whenever the program (JSON or P4Info) changes."""
    digest = hashlib.sha256()
    digest.update(device_config)
    digest.update(p4info.SerializeToString(deterministic=True))
    return int.from_bytes(digest.digest()[:8], "big")


@dataclass(frozen=True, eq=False)
class Pipeline:
    """A P4 program as pushed with SetForwardingPipelineConfig."""

    p4info: p4info_pb2.P4Info = field(repr=False)
    device_config: bytes = field(repr=False)  # BMv2: the JSON written by p4c-bm2-ss
    cookie: int = 0

    @classmethod
    def from_files(cls, p4info_path: str | Path, device_config_path: str | Path) -> Pipeline:
        p4info = load_p4info(p4info_path)
        device_config = Path(device_config_path).read_bytes()
        return cls(p4info, device_config, pipeline_cookie(device_config, p4info))

    @functools.cached_property
    def index(self) -> P4InfoIndex:
        return P4InfoIndex(self.p4info)
