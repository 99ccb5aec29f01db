"""The switch-driver interface and the fleet that holds switches of either kind.

The rest of the controller talks to a switch only through `SwitchDriver`, so it
never needs to know whether P4Runtime (controller/southbound/) or OpenFlow
(controller/openflow/) drives it. Both drivers return the same `ReconcileResult`,
`CounterValue`, `Role` and `DriverStats`, defined here. Writing a set of states to a set of
switches, with rollback, is controller/applier.py's.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tokenfabric.controller.entries import DesiredState
from tokenfabric.controller.model import Model

if TYPE_CHECKING:
    from tokenfabric.controller.openflow.flows import Context
    from tokenfabric.controller.openflow.server import OpenFlowSouthbound
    from tokenfabric.controller.openflow.switch import OpenFlowSwitch
    from tokenfabric.controller.southbound.fleet import Southbound as P4RuntimeSouthbound
    from tokenfabric.controller.southbound.switch import Switch as P4RuntimeSwitch

P4RUNTIME_FEATURES = ["weighted_hash", "pinning", "dsr", "ipip", "dscp", "priority_queues",
                      "meters", "p2c_in_switch", "beacons", "token_buckets_in_switch",
                      "counters"]


class Role(enum.Enum):
    """This controller's standing on a switch (an OpenFlow switch: connected is primary)."""

    DISCONNECTED = "disconnected"
    PRIMARY = "primary"
    BACKUP = "backup"


@dataclass(frozen=True)
class CounterValue:
    packets: int
    bytes: int


@dataclass(frozen=True)
class ReconcileResult:
    """What one apply/reconcile of one switch did; `writes` is the number of updates sent."""

    switch: str
    applied: bool
    reason: str = ""  # why not applied: "backup", "disconnected", "superseded", ...
    inserted: int = 0
    modified: int = 0
    deleted: int = 0
    write_rpcs: int = 0  # P4Runtime Write RPCs (OpenFlow: barrier-checked batches)
    pipeline_pushed: bool = False
    read_switch: bool = True  # False: diffed against this session's mirror, no Read
    held: int = 0  # entities the switch held before
    desired: int = 0
    seconds: float = 0.0

    @property
    def writes(self) -> int:
        return self.inserted + self.modified + self.deleted

    def view(self) -> dict[str, Any]:
        """The `last_reconcile` of a switch's status (REST)."""
        return {"applied": self.applied, "reason": self.reason, "inserted": self.inserted,
                "modified": self.modified, "deleted": self.deleted, "seconds": self.seconds}


@dataclass
class DriverStats:
    """Counters since a driver's switch object was made, kept alike by both drivers (each
    adds its own); tests assert on them."""

    sessions: int = 0  # sessions that came up (P4Runtime: got an arbitration answer)
    reconciles: int = 0
    updates_written: int = 0  # entities written (OpenFlow: flow, group and meter mods)
    last: ReconcileResult | None = None
    history: deque[ReconcileResult] = field(default_factory=lambda: deque(maxlen=32))

    def record(self, result: ReconcileResult) -> None:
        """One reconcile's outcome: the last, and the history of the last 32."""
        self.last = result
        self.history.append(result)


class StateTaker(Protocol):
    """What controller/applier.py needs of a switch: take a whole desired state."""

    async def apply(self, desired: DesiredState) -> ReconcileResult: ...


class SwitchDriver(StateTaker, Protocol):
    """One switch, P4Runtime (controller.southbound.Switch) or OpenFlow
    (controller.openflow.switch.OpenFlowSwitch)."""

    @property
    def name(self) -> str: ...

    @property
    def role(self) -> Role: ...

    @property
    def desired(self) -> DesiredState | None: ...

    @property
    def keeps_token_buckets(self) -> bool:
        """True when the switch admits by its own token buckets (P4); False when the
        controller decides (controller/openflow/budget.py) and says so by
        set_over_budget."""
        ...

    async def reconcile(self) -> ReconcileResult:
        """Read what the switch holds and write the difference to the desired state."""
        ...

    async def set_over_budget(self, tenants: frozenset[int]) -> None: ...

    async def recheck_load_bound(self) -> bool:
        """Re-decide what the controller decides from the backends' reported load for a
        switch without load registers (OpenFlow: prefix affinity's bound) and write it
        when it changed; True when it wrote. A P4 switch checks per packet: nothing."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON for REST: name, address, device_id, role, last_reconcile, ..."""
        ...

    async def read_counters(self, name: str, *,
                            cells: Collection[int] | None = None) -> dict[int, CounterValue]:
        """{tenant_id: CounterValue} of a per-tenant counter (tenant_traffic, ...); only
        the tenants in `cells` when given."""
        ...

    async def read_port_bytes(self) -> dict[int, int]:
        """{port: bytes a backend's port sent} (the billing cross-check)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def wait_settled(self, timeout: float = 10.0) -> Role: ...


class Southbound(Protocol):
    """The switches of one driver kind, by name: controller.southbound.Southbound
    (P4Runtime), controller.openflow.server.OpenFlowSouthbound, or a Fleet of both."""

    @property
    def switches(self) -> Mapping[str, SwitchDriver]: ...

    def __getitem__(self, name: str) -> SwitchDriver: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def set_election_id(self, election_id: int) -> None:
        """Take this controller's standing on every switch to `election_id` (a replica
        taking over or stepping down, controller/replica.py), switches added later too.
        P4Runtime: a new arbitration update on each open stream. OpenFlow: nothing (no
        election id; see OpenFlowSouthbound.set_election_id)."""
        ...


def features_of(driver: str) -> list[str]:
    """What a switch of this driver can do (before it connected, too)."""
    if driver == "openflow":
        from tokenfabric.controller.openflow.flows import FEATURES

        return list(FEATURES)
    return list(P4RUNTIME_FEATURES)


class Fleet:
    """Several southbounds (one per driver kind) seen as one: name -> switch."""

    def __init__(self, *parts: Southbound | None) -> None:
        self.parts = [p for p in parts if p is not None]

    @property
    def switches(self) -> dict[str, SwitchDriver]:
        out: dict[str, SwitchDriver] = {}
        for part in self.parts:
            out.update(part.switches)
        return out

    def __getitem__(self, name: str) -> SwitchDriver:
        for part in self.parts:
            if name in part.switches:
                return part.switches[name]
        raise KeyError(name)

    async def start(self) -> None:
        for part in self.parts:
            await part.start()

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.parts), return_exceptions=True)

    async def set_election_id(self, election_id: int) -> None:
        await asyncio.gather(*(p.set_election_id(election_id) for p in self.parts))

    def status(self) -> list[dict[str, Any]]:
        return [s.status() for s in self.switches.values()]


def openflow_context(model: Model, switch: str) -> Context:
    """Backend and responder MACs, the port toward each backend of another switch, and
    each backend's load score from its reports (affinity's bound)."""
    from tokenfabric.controller.openflow.flows import Context
    from tokenfabric.controller.routing import load_score

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
    scores = {b.backend_id: load_score(b) for b in model.backends.values()}
    return Context(macs=macs, transit=transit, scores=scores)


if TYPE_CHECKING:
    # mypy checks here that both drivers implement the Protocols (no runtime cost).
    def _drivers_conform(p4: P4RuntimeSwitch, of: OpenFlowSwitch, p4_sb: P4RuntimeSouthbound,
                         of_sb: OpenFlowSouthbound) -> tuple[list[SwitchDriver],
                                                             list[Southbound]]:
        return [p4, of], [p4_sb, of_sb]
