"""QoS (p4src/include/qos.p4): each class's DSCP and queue, tenant meters, ECN marking."""

from __future__ import annotations

from tokenfabric.controller.compile.common import ClassPlan, CompileError
from tokenfabric.controller.entries import Action, Entity, Exact, MeterConfig, TableEntry
from tokenfabric.controller.model import BeyondAction, Model, Switch
from tokenfabric.p4names import Actions, Color, Meters, Tables


def shared(model: Model, classes: ClassPlan) -> list[Entity]:
    policy = model.policy
    out: list[Entity] = []
    for tclass, (dscp, queue) in sorted(classes.rows.items()):
        out.append(TableEntry.of(Tables.CLASS_QOS, {"tclass": Exact(tclass)},
                                 Action.of(Actions.SET_CLASS_QOS, dscp=dscp, priority=queue)))
    if classes.roce is not None:
        out.append(TableEntry.of(Tables.ECN_POLICY, {"tclass": Exact(classes.roce)},
                                 Action.of(Actions.SET_ECN_THRESHOLD,
                                           qdepth=policy.roce.ecn_threshold)))
    for tenant in sorted(policy.tenants.values(), key=lambda t: t.tenant_id):
        bw = policy.contracts[tenant.contract].bandwidth
        if bw is None:
            continue
        out.append(MeterConfig(Meters.TENANT_METER, tenant.tenant_id, cir=bw.cir,
                               cburst=bw.cbs, pir=bw.pir, pburst=bw.pbs))
        bands: tuple[tuple[int, BeyondAction, int | None], ...] = (
            (int(Color.YELLOW), bw.exceed, bw.exceed_dscp),
            (int(Color.RED), bw.violate, bw.violate_dscp))
        for color, what, remark_dscp in bands:
            match = {"tenant_id": Exact(tenant.tenant_id), "color": Exact(color)}
            if what == BeyondAction.REMARK:
                if remark_dscp is None:  # the policy schema requires it with remark
                    raise CompileError(f"tenant {tenant.name}: remark without a DSCP")
                out.append(TableEntry.of(Tables.METER_POLICY, match,
                                         Action.of(Actions.COLOR_REMARK, dscp=remark_dscp)))
            elif what == BeyondAction.DROP:
                out.append(TableEntry.of(Tables.METER_POLICY, match,
                                         Action.of(Actions.COLOR_DROP)))
    return out


def local(model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
    return []
