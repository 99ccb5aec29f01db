"""Beacon (p4src/include/beacon.p4): where each backend's beacons may come from."""

from __future__ import annotations

from controller.compile.common import ClassPlan, ip
from controller.entries import Action, Entity, Exact, TableEntry
from controller.model import Model, Switch
from tokenfabric.p4names import Actions, Tables


def shared(model: Model, classes: ClassPlan) -> list[Entity]:
    return []


def local(model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
    """A beacon counts only from the port and address of a backend on this switch."""
    return [TableEntry.of(Tables.BEACON_SOURCE,
                          {"backend_id": Exact(b.backend_id), "ingress_port": Exact(b.port),
                           "src_addr": Exact(ip(b.address))},
                          Action.of(Actions.ACCEPT_BEACON))
            for b in model.backends.values() if b.switch == switch.name]
