"""Several switches driven from one controller process."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from tokenfabric.controller.applier import apply_states
from tokenfabric.controller.drivers import ReconcileResult
from tokenfabric.controller.entries import DesiredState
from tokenfabric.controller.southbound.errors import SouthboundError
from tokenfabric.controller.southbound.p4info import Pipeline
from tokenfabric.controller.southbound.switch import Switch, SwitchConfig


class ApplyError(SouthboundError):
    """Some switches failed to take a new desired state (the others took it)."""

    def __init__(self, errors: dict[str, BaseException], results: dict[str, ReconcileResult],
                 rolled_back: bool) -> None:
        self.errors = errors
        self.results = results
        self.rolled_back = rolled_back
        lines = [f"{len(errors)} switch(es) failed"
                 + ("; every switch was rolled back to the previous state" if rolled_back
                    else "")]
        lines += [f"- {name}: {error}" for name, error in sorted(errors.items())]
        super().__init__("\n".join(lines))


class Southbound:
    """The switches of one controller; all share one election id.

    Run the primary controller with a higher election id than its backups
    (e.g. 20 and 10): every switch makes the highest connected id primary and
    promotes the next one when the primary's stream ends.
    """

    def __init__(self, election_id: int = 1) -> None:
        if not 0 < election_id < 2**128:
            raise ValueError(f"election id must be in 1..2^128-1, got {election_id}")
        self.election_id = election_id
        self.switches: dict[str, Switch] = {}
        self._started = False

    def add_switch(self, name: str, address: str, device_id: int = 0,
                   pipeline: Pipeline | None = None, **options: object) -> Switch:
        """Register a switch; it connects on start() (or now, if already started)."""
        if name in self.switches:
            raise ValueError(f"switch {name!r} is already registered")
        config = SwitchConfig(name=name, address=address, device_id=device_id,
                              election_id=self.election_id, pipeline=pipeline,
                              **options)  # type: ignore[arg-type]
        switch = Switch(config)
        self.switches[name] = switch
        if self._started:
            switch.launch()
        return switch

    async def remove_switch(self, name: str) -> None:
        switch = self.switches.pop(name)
        await switch.stop()

    def __getitem__(self, name: str) -> Switch:
        return self.switches[name]

    async def start(self) -> None:
        self._started = True
        for switch in self.switches.values():
            await switch.start()

    async def stop(self) -> None:
        self._started = False
        await asyncio.gather(*(s.stop() for s in self.switches.values()))

    async def set_election_id(self, election_id: int) -> None:
        """Arbitrate every switch again with another election id on its open stream (a
        replica taking over or stepping down); switches added later use it too."""
        if not 0 < election_id < 2**128:
            raise ValueError(f"election id must be in 1..2^128-1, got {election_id}")
        self.election_id = election_id
        await asyncio.gather(*(s.set_election_id(election_id)
                               for s in self.switches.values()))

    async def wait_settled(self, timeout: float = 10.0) -> None:
        await asyncio.gather(*(s.wait_settled(timeout) for s in self.switches.values()))

    async def apply(self, desired: Mapping[str, DesiredState]) -> dict[str, ReconcileResult]:
        """Give each named switch its desired state through the one write path
        (controller/applier.py): switches whose state changed, in name order; a
        failure gives every switch touched so far its previous state back and raises
        ApplyError naming the failed switch."""
        unknown = set(desired) - set(self.switches)
        if unknown:
            raise SouthboundError(f"no such switch(es): {', '.join(sorted(unknown))}")
        installed = {name: self.switches[name].desired or DesiredState() for name in desired}
        report = await apply_states(self.switches, installed, desired)
        if report.ok:
            return report.results
        failed = report.failed_switch or "?"
        raise ApplyError({failed: SouthboundError(report.error or "apply failed")},
                         report.results, rolled_back=not report.rollback_errors)

    def status(self) -> list[dict[str, Any]]:
        return [switch.status() for switch in self.switches.values()]
