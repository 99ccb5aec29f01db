"""Admit (p4src/include/admit.p4): each tenant's token-bucket contract."""

from __future__ import annotations

from tokenfabric.bucket import refill_per_second
from tokenfabric.controller.compile.common import ClassPlan
from tokenfabric.controller.entries import Action, Entity, Exact, TableEntry
from tokenfabric.controller.model import Model, Switch
from tokenfabric.p4names import Actions, Tables


def shared(model: Model, classes: ClassPlan) -> list[Entity]:
    policy = model.policy
    out: list[Entity] = []
    for tenant in sorted(policy.tenants.values(), key=lambda t: t.tenant_id):
        limits = policy.contracts[tenant.contract].limits
        out.append(TableEntry.of(Tables.TENANT_CONTRACT, {"tenant_id": Exact(tenant.tenant_id)},
                                 Action.of(Actions.SET_CONTRACT,
                                           tokens_per_s=refill_per_second(limits.tpm),
                                           burst_tokens=limits.burst)))
    return out


def local(model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
    return []
