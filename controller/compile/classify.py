"""Classify (p4src/include/classify.p4): tenant prefixes, trusted DSCP, RoCE's classes."""

from __future__ import annotations

from tokenfabric.controller.compile.common import ClassPlan
from tokenfabric.controller.entries import Action, Entity, Exact, Lpm, TableEntry
from tokenfabric.controller.model import Model, Policy, Switch
from tokenfabric.p4names import Actions, Tables

# RoCEv2's DSCP 26 and the rest of AF3x: remapped when the policy says so.
AF3X_DSCPS = (26, 28, 30)


def shared(model: Model, classes: ClassPlan) -> list[Entity]:
    policy = model.policy
    out: list[Entity] = []
    if classes.roce is not None and classes.cnp is not None:  # set together
        out.append(TableEntry.of(Tables.ROCE_CLASS, {"is_cnp": Exact(0)},
                                 Action.of(Actions.SET_CLASS, tclass=classes.roce)))
        out.append(TableEntry.of(Tables.ROCE_CLASS, {"is_cnp": Exact(1)},
                                 Action.of(Actions.SET_CLASS, tclass=classes.cnp)))
    if any(t.trust_dscp for t in policy.tenants.values()):
        out.extend(_dscp_class_entries(policy, classes))
    for tenant in sorted(policy.tenants.values(), key=lambda t: t.tenant_id):
        contract = policy.contracts[tenant.contract]
        tclass = classes.of(contract.traffic_class)
        name = Actions.SET_TENANT_TRUSTING_DSCP if tenant.trust_dscp else Actions.SET_TENANT
        action = Action.of(name, tenant_id=tenant.tenant_id, tclass=tclass)
        for net in tenant.networks():
            lpm = Lpm(int(net.network_address), net.prefixlen)
            out.append(TableEntry.of(Tables.TENANT_BY_SRC, {"src_addr": lpm}, action))
            out.append(TableEntry.of(Tables.TENANT_BY_DST, {"dst_addr": lpm}, action))
    return out


def local(model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
    return []


def _dscp_class_entries(policy: Policy, classes: ClassPlan) -> list[Entity]:
    """For trusted tenants: a packet's DSCP picks the class that writes that DSCP.

    AF3x (which RoCEv2's DSCP 26 belongs to) goes to the class of remap_af3x_to when
    there is one; otherwise such a packet keeps its contract's class. RoCE's DSCPs
    never select RoCE's classes here: only the BTH does (roce_class).
    """
    roce_rows = {r for r in (classes.roce, classes.cnp) if r is not None}
    first_by_dscp: dict[int, int] = {}
    for tclass, (dscp, _queue) in sorted(classes.rows.items()):
        if tclass not in roce_rows:
            first_by_dscp.setdefault(dscp, tclass)
    out: list[Entity] = []
    for dscp, tclass in sorted(first_by_dscp.items()):
        out.append(TableEntry.of(Tables.DSCP_CLASS, {"dscp": Exact(dscp)},
                                 Action.of(Actions.SET_CLASS, tclass=tclass)))
    if policy.roce.enabled and policy.roce.remap_af3x_to in first_by_dscp:
        target = first_by_dscp[policy.roce.remap_af3x_to]
        for dscp in AF3X_DSCPS:
            if dscp not in first_by_dscp:
                out.append(TableEntry.of(Tables.DSCP_CLASS, {"dscp": Exact(dscp)},
                                         Action.of(Actions.SET_CLASS, tclass=target)))
    return out
