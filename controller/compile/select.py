"""Select (p4src/include/select.p4): each service's mode, weighted hash and P2C pairs,
and the prefix affinity entries learned for the clients of this edge switch."""

from __future__ import annotations

import ipaddress

from tokenfabric.beacon import LOAD_FULL
from tokenfabric.controller.affinity import resolve, tenant_lookup
from tokenfabric.controller.beacon_plane import heard_everywhere
from tokenfabric.controller.compile.common import ClassPlan
from tokenfabric.controller.compile.pin import service_key
from tokenfabric.controller.entries import (
    Action,
    Entity,
    Exact,
    GroupRef,
    ProfileGroup,
    ProfileMember,
    TableEntry,
)
from tokenfabric.controller.model import BackendState, Model, SelectionMode, Service, Switch
from tokenfabric.controller.routing import MAX_GROUP_WEIGHT, group_weights
from tokenfabric.dataplane import MAX_PAIR_SLOTS
from tokenfabric.p4names import NO_BACKEND, Actions, Mode, Profiles, Tables

MODE_VALUE = {SelectionMode.HASH: int(Mode.HASH), SelectionMode.P2C: int(Mode.P2C)}


def eligible_backends(model: Model, service: Service) -> list[str]:
    """Pool members that may take new connections, by backend id."""
    pool = [b for b in model.pool(service.name) if b.state == BackendState.ACTIVE]
    return [b.name for b in sorted(pool, key=lambda b: b.backend_id)]


def shared(model: Model, classes: ClassPlan) -> list[Entity]:
    """Each service's selector group and P2C pairs (the same on every switch)."""
    out: list[Entity] = []
    for service in sorted(model.services.values(), key=lambda s: s.service_id):
        sid = service.service_id
        eligible = eligible_backends(model, service)
        pairs = p2c_pairs([model.backends[n].backend_id for n in eligible], service.p2c_slots)
        weights = group_weights(model, eligible)
        members = tuple((model.backends[n].backend_id, w) for n, w in weights.items() if w > 0)
        if members:
            for bid, _ in members:
                out.append(ProfileMember(Profiles.BACKEND_SELECTOR, bid,
                                         Action.of(Actions.SET_POOL_BACKEND, backend_id=bid)))
            out.append(ProfileGroup(Profiles.BACKEND_SELECTOR, sid, tuple(sorted(members)),
                                    max_size=MAX_GROUP_WEIGHT))
            out.append(TableEntry.of(Tables.SERVICE_POOL, {"service_id": Exact(sid)},
                                     GroupRef(sid)))
        for slot, (first, second) in enumerate(pairs):
            out.append(TableEntry.of(Tables.P2C_PAIRS,
                                     {"service_id": Exact(sid), "slot": Exact(slot)},
                                     Action.of(Actions.SET_CANDIDATES, first_backend=first,
                                               second_backend=second)))
    return out


def local(model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
    """Each service's entry: how a new connection chooses. The mode is action data, so
    a mode switch is one modify."""
    out: list[Entity] = []
    for service in sorted(model.services.values(), key=lambda s: s.service_id):
        eligible = eligible_backends(model, service)
        slots = len(p2c_pairs([model.backends[n].backend_id for n in eligible],
                              service.p2c_slots))
        # The beacon age is checked only where every pool member's beacons arrive (its
        # own switch or the beacon plane's relays), else unheard ones would look stale.
        local_pool = heard_everywhere(model, switch.name, model.pool(service.name))
        out.append(TableEntry.of(Tables.SERVICE, service_key(service), Action.of(
            Actions.SET_SERVICE, service_id=service.service_id, mode=MODE_VALUE[service.mode],
            overflow_backend=service.overflow.backend_id if service.overflow else NO_BACKEND,
            pair_mask=max(slots, 1) - 1,
            beacon_max_age_us=int(service.beacon_max_age_ms * 1000) if local_pool else 0,
            conn_cost=service.conn_cost or _default_conn_cost(model, eligible))))
    out.extend(affinity_entries(model, switch))
    return out


def affinity_entries(model: Model, switch: Switch) -> list[Entity]:
    """The learned (service, client) -> backend facts of this switch that still hold: the
    backend active in the service's pool, and the service or the client's tenant opted
    in (a policy reload that withdraws the opt-in removes them at the next push)."""
    facts = model.affinity.entries(switch.name)
    if not facts:
        return []
    lookup = tenant_lookup(model.policy)
    out: list[Entity] = []
    for service_name, client, fact in facts:
        service = model.services.get(service_name)
        backend = model.backends.get(fact.backend)
        if service is None or backend is None or backend.name not in service.pool \
                or backend.state != BackendState.ACTIVE:
            continue
        address = ipaddress.IPv4Address(client)
        settings = resolve(model.policy, service_name, lookup.find(address))
        if settings is None:
            continue
        out.append(TableEntry.of(
            Tables.AFFINITY, {"service_id": Exact(service.service_id),
                              "client": Exact(int(address))},
            Action.of(Actions.STEER_AFFINITY, backend_id=backend.backend_id,
                      bound_percent=settings.bound_percent)))
    return out


def _default_conn_cost(model: Model, eligible: list[str]) -> int:
    """One connection's share of a backend's load: LOAD_FULL / capacity (smallest in pool)."""
    if not eligible:
        return 1
    smallest = min(model.backends[n].capacity for n in eligible)
    return max(1, min(0xFFFF, LOAD_FULL // max(1, smallest)))


def p2c_pairs(ids: list[int], slots: int) -> list[tuple[int, int]]:
    """Fill the pair slots with pairs of distinct backends, each pair equally often.

    One backend: a single slot whose second choice is NO_BACKEND. Both orders of a
    pair are listed, so that ties (the first wins) favour no backend.
    """
    if not ids:
        return []
    if len(ids) == 1:
        return [(ids[0], NO_BACKEND)]
    n = len(ids)
    while slots < n and slots < MAX_PAIR_SLOTS:  # room for every backend to be a candidate
        slots *= 2
    if n * (n - 1) <= slots and (n * (n - 1)) & (n * (n - 1) - 1) == 0:
        # Every ordered pair exactly once fills a power-of-two number of slots.
        return [(a, b) for a in ids for b in ids if a != b]
    # Otherwise slot k pairs backend k mod n with the one d places further,
    # d = 1, 2, ..., n-1 one round after another: every backend is first and
    # second equally often (within one slot when n does not divide `slots`).
    return [(ids[k % n], ids[(k + 1 + (k // n) % (n - 1)) % n]) for k in range(slots)]
