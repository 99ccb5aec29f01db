"""Pin (p4src/include/pin.p4): the vip table, what every packet to a service needs."""

from __future__ import annotations

from tokenfabric.controller.compile.common import ClassPlan, ip
from tokenfabric.controller.entries import Action, Entity, Exact, MatchValue, TableEntry
from tokenfabric.controller.model import Model, Service, Switch
from tokenfabric.p4names import PROTO_TCP, Actions, Tables


def service_key(service: Service) -> dict[str, MatchValue]:
    """The key of vip and of Select's service table: VIP, protocol, port."""
    return {"vip": Exact(ip(service.vip)), "protocol": Exact(PROTO_TCP),
            "port": Exact(service.port)}


def shared(model: Model, classes: ClassPlan) -> list[Entity]:
    return [TableEntry.of(Tables.VIP, service_key(s),
                          Action.of(Actions.SET_VIP,
                                    idle_timeout_us=int(s.idle_timeout_s * 1_000_000)))
            for s in sorted(model.services.values(), key=lambda s: s.service_id)]


def local(model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
    return []
