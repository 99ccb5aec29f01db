"""The one write path to the switches: desired states in, rollback on failure.

`apply_states(switches, installed, desired)` compares, per switch, the state it
was last given (`installed`) with the new one; switches whose state changed are
given theirs one after another in name order (each driver then writes only the
difference to what the switch holds, in dependency order: controller/southbound/
plan.py, controller/openflow/switch.py). When one raises, every switch given a
new state so far — the failing one too: it may hold part of its batch — is given
its installed state back, last first, and the report says what failed. The
reconcile loop (Controller.push), the policy reload and the tests all use it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenfabric.controller.drivers import ReconcileResult, StateTaker
from tokenfabric.controller.entries import DesiredState

log = logging.getLogger(__name__)


Changes = tuple[int, int, int]  # inserted, modified, deleted entities of a state


@dataclass
class ApplyReport:
    ok: bool
    changes: dict[str, Changes] = field(default_factory=dict)  # per switch that changed
    results: dict[str, ReconcileResult] = field(default_factory=dict)
    failed_switch: str | None = None
    error: str | None = None
    rolled_back: list[str] = field(default_factory=list)  # last first
    rollback_errors: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready, for the REST API."""
        return {"changes": {s: dict(zip(("insert", "modify", "delete"), c, strict=True))
                            for s, c in self.changes.items()},
                "failed_switch": self.failed_switch, "rolled_back": self.rolled_back,
                "rollback_errors": self.rollback_errors}


def changes_of(installed: Mapping[str, DesiredState],
               desired: Mapping[str, DesiredState]) -> dict[str, Changes]:
    """(inserted, modified, deleted) per switch whose desired state changed, in name order."""
    out: dict[str, Changes] = {}
    empty = DesiredState()
    for name in sorted(set(installed) | set(desired)):
        old, new = installed.get(name, empty), desired.get(name, empty)
        if old is new or old.entities == new.entities:
            continue
        ins, mod, dele = new.diff(old)
        if ins or mod or dele:
            out[name] = (len(ins), len(mod), len(dele))
    return out


async def apply_states(switches: Mapping[str, StateTaker],
                       installed: Mapping[str, DesiredState],
                       desired: Mapping[str, DesiredState]) -> ApplyReport:
    """Give every switch whose state changed its desired state; on a failure give every
    switch touched so far its installed state back. A name without a switch (the
    controller runs without that switch's driver) counts as given."""
    report = ApplyReport(ok=True, changes=changes_of(installed, desired))
    touched: list[str] = []
    for name in report.changes:
        touched.append(name)
        switch = switches.get(name)
        if switch is None:
            continue
        try:
            report.results[name] = await switch.apply(desired.get(name, DesiredState()))
        except Exception as exc:  # any failure of a switch triggers the rollback
            log.warning("apply failed on %s: %s; rolling back %s", name, exc, touched)
            report.ok = False
            report.failed_switch = name
            report.error = f"{name}: {exc}"
            await _roll_back(switches, installed, touched, report)
            return report
    return report


async def _roll_back(switches: Mapping[str, StateTaker], installed: Mapping[str, DesiredState],
                     touched: list[str], report: ApplyReport) -> None:
    for name in reversed(touched):
        switch = switches.get(name)
        if switch is None:
            continue
        try:
            await switch.apply(installed.get(name, DesiredState()))
            report.rolled_back.append(name)
        except Exception as exc:
            # The driver's next reconcile (which reads the switch) repairs what is left.
            log.error("rollback of %s failed: %s", name, exc)
            report.rollback_errors[name] = str(exc)
