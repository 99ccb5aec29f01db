"""Count (p4src/include/count.p4): counters only, so no entries.

Its counters are read, not written: the southbound reads them (docs/dataplane.md,
"Counters"). The stage is listed so that the pipeline names every P4 control.
"""

from __future__ import annotations

from controller.compile.common import ClassPlan
from controller.entries import Entity
from controller.model import Model, Switch


def shared(model: Model, classes: ClassPlan) -> list[Entity]:
    return []


def local(model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
    return []
