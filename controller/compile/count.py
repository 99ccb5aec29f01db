"""Count (p4src/include/count.p4): counters, and the ports backends reply from.

The counters are read, not written: the southbound reads them (docs/dataplane.md,
"Counters"). `reply_source` names each port of this switch that a backend sits on,
so that what arrives there is counted in `reply_bytes` (the billing cross-check,
docs/ledger.md); backends sharing a port share the lowest one's cell.
"""

from __future__ import annotations

from tokenfabric.controller.compile.common import ClassPlan
from tokenfabric.controller.entries import Action, Entity, Exact, TableEntry
from tokenfabric.controller.model import Model, Switch
from tokenfabric.p4names import Actions, Tables


def shared(model: Model, classes: ClassPlan) -> list[Entity]:
    return []


def reply_ports(model: Model, switch: str) -> dict[int, int]:
    """port -> the backend id whose reply_bytes cell counts it, on `switch`."""
    out: dict[int, int] = {}
    for b in model.backends.values():
        if b.switch == switch:
            out[b.port] = min(out.get(b.port, b.backend_id), b.backend_id)
    return out


def local(model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
    return [TableEntry.of(Tables.REPLY_SOURCE, {"ingress_port": Exact(port)},
                          Action.of(Actions.COUNT_REPLY, backend_id=bid))
            for port, bid in sorted(reply_ports(model, switch.name).items())]
