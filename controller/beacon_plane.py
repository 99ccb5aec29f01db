"""The beacon plane: which switch hears which backend's LOAD and USAGE beacons.

A backend beacons to its own switch, which checks the port and address (as a
single switch does) and relays the beacon down a tree of fabric links to every
switch that needs it: the edges of the services the backend is in (a
service's `edges` in the fabric file; by default every edge switch, one with a
host that is not a backend's). Every switch on the tree stores the beacon in
its own registers with its own receive time, so that:

- the backend's own switch and every edge of its services hold its load,
  pending-connection count, flags and beacon time (P2C and the beacon-age
  check read them there);
- those edges debit a tenant's token bucket by the backend's USAGE beacons
  (each edge keeps its own bucket per tenant and hears all of the tenant's
  usage on these backends);
- a spine in the middle of a tree stores them too, unread (it selects for no
  client).

The tree is a breadth-first shortest-path tree from the backend's switch over
the fabric's links, ties broken by switch name and port (stable across
recompiles), pruned to the branches that lead to a switch that needs the
backend. compile/beacon.py turns it into beacon_source entries and, per switch,
one multicast group per distinct set of the trees' ports down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenfabric.controller.model import Backend, Model


@dataclass(frozen=True)
class RelayHop:
    """One switch of a backend's tree: where the beacon comes in, where it goes on."""

    switch: str
    in_port: int  # the backend's own port at the root; else the port facing the parent
    out_ports: tuple[int, ...]  # the tree's ports down (empty: a leaf of the tree)


@dataclass
class RelayTree:
    backend: str
    root: str
    hops: dict[str, RelayHop] = field(default_factory=dict)  # switch -> hop, root included


def edge_switches(model: Model) -> list[str]:
    """Switches a client may enter: those with a host that is no backend's host."""
    backend_hosts = {(b.switch, b.port) for b in model.backends.values()}
    return sorted({h.switch for h in model.fabric.hosts.values()
                   if (h.switch, h.port) not in backend_hosts})


def listeners(model: Model, backend: Backend, edges: list[str] | None = None) -> list[str]:
    """Switches other than the backend's own that need its beacons: the edges of the
    services whose pool holds it."""
    every_edge = edge_switches(model) if edges is None else edges
    wanted: set[str] = set()
    for service in model.services.values():
        if backend.name in service.pool:
            wanted.update(service.edges or every_edge)
    wanted.discard(backend.switch)
    return sorted(wanted)


def holders(model: Model, backend: Backend) -> set[str]:
    """Switches whose registers hold this backend's beacon state (own switch included)."""
    return {backend.switch, *relay_tree(model, backend).hops}


def relay_tree(model: Model, backend: Backend) -> RelayTree:
    """The backend's relay tree; only its root when no other switch needs it or the
    fabric cannot reach one (no links, or no fabric_ip to source the relays from)."""
    tree = relay_trees(model).get(backend.name)
    return tree if tree is not None else _relay_tree(model, backend, edge_switches(model), {})


# The trees of the last model seen, by a key of what they depend on: the compiler asks
# for them once per switch and service at every compile (at least once a second).
_trees_cache: tuple[tuple, dict[str, RelayTree]] | None = None


def relay_trees(model: Model) -> dict[str, RelayTree]:
    """Every backend's relay tree, by backend name."""
    global _trees_cache
    fabric = model.fabric
    key = (tuple((lk.a, lk.b) for lk in fabric.links),
           tuple(sorted((h.name, h.switch, h.port) for h in fabric.hosts.values())),
           tuple(sorted((s.name, s.fabric_ip) for s in fabric.switches.values())),
           tuple(sorted((b.name, b.switch, b.port) for b in model.backends.values())),
           tuple(sorted((s.name, tuple(s.pool), tuple(s.edges))
                        for s in model.services.values())))
    cached = _trees_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    edges = edge_switches(model)
    parents: dict[str, dict[str, tuple[str, int, int]]] = {}
    trees = {b.name: _relay_tree(model, b, edges, parents) for b in model.backends.values()}
    _trees_cache = (key, trees)
    return trees


def _bfs_parents(model: Model, root: str) -> dict[str, tuple[str, int, int]]:
    """child -> (parent, parent's port, child's port) of the BFS tree from `root`."""
    fabric = model.fabric
    parent: dict[str, tuple[str, int, int]] = {}
    frontier, seen = [root], {root}
    while frontier:
        nxt: list[str] = []
        for sw in frontier:
            for link in sorted(fabric.links_of(sw), key=lambda lk: (lk.a.switch, lk.a.port,
                                                                   lk.b.switch, lk.b.port)):
                here = link.a if link.a.switch == sw else link.b
                there = link.other(sw)
                if there.switch in seen:
                    continue
                seen.add(there.switch)
                parent[there.switch] = (sw, here.port, there.port)
                nxt.append(there.switch)
        frontier = nxt
    return parent


def _relay_tree(model: Model, backend: Backend, edges: list[str],
                parents: dict[str, dict[str, tuple[str, int, int]]]) -> RelayTree:
    tree = RelayTree(backend.name, backend.switch)
    root_switch = model.fabric.switches.get(backend.switch)
    targets = listeners(model, backend, edges)
    if root_switch is None or root_switch.fabric_ip is None or not targets:
        return tree
    if backend.switch not in parents:  # one BFS per switch with backends
        parents[backend.switch] = _bfs_parents(model, backend.switch)
    parent = parents[backend.switch]
    down: dict[str, set[int]] = {backend.switch: set()}
    in_port: dict[str, int] = {backend.switch: backend.port}
    for target in targets:
        sw = target
        while sw != backend.switch and sw in parent:
            up, up_port, my_port = parent[sw]
            down.setdefault(sw, set())
            in_port[sw] = my_port
            down.setdefault(up, set()).add(up_port)
            sw = up
    for sw, ports in down.items():
        tree.hops[sw] = RelayHop(sw, in_port[sw], tuple(sorted(ports)))
    return tree


def heard_everywhere(model: Model, switch: str, pool: list[Backend]) -> bool:
    """Does `switch` hear the beacons of every backend in `pool` (so that it may
    check their beacon age)?"""
    trees = relay_trees(model)
    return all(b.switch == switch or (b.name in trees and switch in trees[b.name].hops)
               for b in pool)
