"""Compiled entities in a readable, JSON-ready form (golden files, REST views)."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from tokenfabric.controller import entries as en

_IP_FIELDS = {"vip", "src_addr", "dst_addr", "tunnel_src", "tunnel_dst"}
_MAC_FIELDS = {"smac", "dmac"}


def _show(name: str, value: int) -> int | str:
    """Addresses as text in golden files and REST views; everything else as ints."""
    if name in _IP_FIELDS:
        return str(ipaddress.IPv4Address(value))
    if name in _MAC_FIELDS:
        return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))
    return value


def entity_to_dict(entity: en.Entity) -> dict[str, Any]:
    """A readable, JSON-ready form (golden files, REST views)."""
    def match_value(name: str, v: object) -> object:
        if isinstance(v, en.Exact):
            return _show(name, v.value)
        if isinstance(v, en.Lpm):
            return f"{_show(name, v.value)}/{v.prefix_len}"
        if isinstance(v, en.Ternary):
            return f"{v.value:#x}&&&{v.mask:#x}"
        if isinstance(v, en.Range):
            return f"{v.low}..{v.high}"
        raise TypeError(v)

    def action(a: en.Action | en.GroupRef | en.MemberRef) -> dict[str, Any]:
        if isinstance(a, en.Action):
            return {"action": a.name, "params": {k: _show(k, v) for k, v in a.params}}
        if isinstance(a, en.GroupRef):
            return {"group": a.group_id}
        return {"member": a.member_id}

    if isinstance(entity, en.TableEntry):
        d: dict[str, Any] = {"table": entity.table,
             "match": {k: match_value(k, v) for k, v in entity.match}}
        d.update(action(entity.action))
        if entity.priority:
            d["priority"] = entity.priority
        return d
    if isinstance(entity, en.ProfileMember):
        return {"profile": entity.profile, "member": entity.member_id,
                **action(entity.action)}
    if isinstance(entity, en.ProfileGroup):
        return {"profile": entity.profile, "group": entity.group_id,
                "members": [list(m) for m in entity.members], "max_size": entity.max_size}
    if isinstance(entity, en.MulticastGroup):
        return {"multicast_group": entity.group_id,
                "replicas": [list(r) for r in entity.replicas]}
    return {"meter": entity.meter, "index": entity.index, "cir": entity.cir,
            "cburst": entity.cburst, "pir": entity.pir, "pburst": entity.pburst}


def _sort_key(entity: en.Entity) -> tuple[Any, ...]:
    """Numeric order within a table (slot 2 before slot 10)."""
    if isinstance(entity, en.TableEntry):
        fields = tuple((k, type(v).__name__, dataclasses.astuple(v)) for k, v in entity.match)
        return ("table", entity.table, fields, entity.priority)
    return entity.key()


def state_to_list(state: en.DesiredState) -> list[dict[str, Any]]:
    return [entity_to_dict(e) for e in sorted(state.entities.values(), key=_sort_key)]
