"""Beacon (p4src/include/beacon.p4): where each backend's beacons may come from, and
the beacon plane's relays (controller/beacon_plane.py)."""

from __future__ import annotations

from tokenfabric.controller.beacon_plane import relay_trees
from tokenfabric.controller.compile.common import ClassPlan, ip
from tokenfabric.controller.entries import (
    Action,
    Entity,
    Exact,
    MatchValue,
    MulticastGroup,
    TableEntry,
)
from tokenfabric.controller.model import Model, Switch
from tokenfabric.p4names import Actions, Tables


def shared(model: Model, classes: ClassPlan) -> list[Entity]:
    return []


def local(model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
    """A beacon counts only from the port and address of a backend on this switch, or,
    relayed, from the fabric port facing that backend's switch with that switch's
    fabric_ip as its source. Where the backend's tree goes on, the entry relays to a
    multicast group of the tree's ports down: one group per distinct set of ports, so
    a switch holds as many groups as its trees have shapes (a handful in a leaf-spine),
    not one per backend; numbered 1.. in the order of their port sets."""
    trees = relay_trees(model)
    hops = {b.name: trees[b.name].hops.get(switch.name) for b in model.backends.values()}
    port_sets = sorted({h.out_ports for h in hops.values() if h is not None and h.out_ports})
    group_of = {ports: i for i, ports in enumerate(port_sets, start=1)}
    out: list[Entity] = [MulticastGroup(gid, tuple((port, 0) for port in ports))
                         for ports, gid in group_of.items()]
    for b in sorted(model.backends.values(), key=lambda b: b.backend_id):
        hop = hops[b.name]
        if b.switch == switch.name:
            source = b.address
        elif hop is not None:
            source = model.fabric.switches[b.switch].fabric_ip or ""
        else:
            continue
        key: dict[str, MatchValue] = {
            "backend_id": Exact(b.backend_id),
            "ingress_port": Exact(hop.in_port if hop else b.port),
            "src_addr": Exact(ip(source))}
        if hop is None or not hop.out_ports:
            out.append(TableEntry.of(Tables.BEACON_SOURCE, key, Action.of(Actions.ACCEPT_BEACON)))
            continue
        relay_src = model.fabric.switches[b.switch].fabric_ip or ""
        out.append(TableEntry.of(Tables.BEACON_SOURCE, key, Action.of(
            Actions.RELAY_BEACON, group=group_of[hop.out_ports], relay_src=ip(relay_src))))
    return out
