"""The switch-driver interface and the fleet that holds switches of either kind.

The rest of the controller talks to a switch only through this interface, so it
never needs to know whether P4Runtime (controller/southbound/) or OpenFlow
(controller/openflow/) drives it:

    await switch.apply(desired_state)   # remember it; write the difference when connected
    switch.status() -> dict             # role, last_reconcile, ...; "driver", "features"
    await switch.read_counters(name)    # {tenant_id: CounterValue(packets, bytes)}
    await switch.read_port_bytes()      # {port: bytes a backend's port sent} (cross-check)
    switch.role.value                   # "disconnected" | "primary" | "backup"
    await switch.start() / stop()

OpenFlow switches also take `set_over_budget(tenants)`: what a P4 switch's token
buckets decide in the dataplane, the controller decides for them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from controller.model import Model

P4RUNTIME_FEATURES = ["weighted_hash", "pinning", "dsr", "ipip", "dscp", "priority_queues",
                      "meters", "p2c_in_switch", "beacons", "token_buckets_in_switch",
                      "counters"]


def features_of(driver: str) -> list[str]:
    """What a switch of this driver can do (before it connected, too)."""
    if driver == "openflow":
        from controller.openflow.flows import FEATURES

        return list(FEATURES)
    return list(P4RUNTIME_FEATURES)


class Fleet:
    """Several southbounds (one per driver kind) seen as one: name -> switch."""

    def __init__(self, *parts: Any) -> None:
        self.parts = [p for p in parts if p is not None]

    @property
    def switches(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.parts:
            out.update(part.switches)
        return out

    def __getitem__(self, name: str) -> Any:
        for part in self.parts:
            if name in part.switches:
                return part.switches[name]
        raise KeyError(name)

    async def start(self) -> None:
        for part in self.parts:
            await part.start()

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.parts), return_exceptions=True)

    def status(self) -> list[dict]:
        return [s.status() for s in self.switches.values()]


def openflow_context(model: Model, switch: str) -> Any:
    """Backend and responder MACs, and the port toward each backend of another switch."""
    from controller.openflow.flows import Context

    macs: dict[int, str] = {}
    where: dict[int, str] = {}
    for b in model.backends.values():
        macs[b.backend_id] = b.mac.lower()
        where[b.backend_id] = b.switch
    for s in model.services.values():
        if s.overflow is not None:
            macs[s.overflow.backend_id] = s.overflow.mac.lower()
            where[s.overflow.backend_id] = s.overflow.switch
    transit: dict[int, int] = {}
    for bid, sw in where.items():
        if sw != switch:
            port = model.fabric.next_hop_port(switch, sw)
            if port is not None:
                transit[bid] = port
    return Context(macs=macs, transit=transit)
