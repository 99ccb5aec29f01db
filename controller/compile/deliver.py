"""Deliver (p4src/include/deliver.p4): backends by L2 or IP-in-IP, tunnel ends, routes."""

from __future__ import annotations

import ipaddress

from tokenfabric.controller.compile.common import ClassPlan, CompileError, ip, mac
from tokenfabric.controller.entries import Action, Entity, Exact, Lpm, TableEntry
from tokenfabric.controller.model import Model, Switch
from tokenfabric.p4names import Actions, Tables


def shared(model: Model, classes: ClassPlan) -> list[Entity]:
    return []


def local(model: Model, classes: ClassPlan, switch: Switch) -> list[Entity]:
    return [*_backend_entries(model, switch), *_route_entries(model, switch)]


def _backend_entries(model: Model, switch: Switch) -> list[Entity]:
    """Every backend and overflow responder: local ones by L2 rewrite (and the end of
    tunnels to them), remote ones by IP-in-IP from this switch's fabric_ip."""
    targets: list[tuple[int, str, str, int, str]] = []  # (id, address, mac, port, switch)
    for b in model.backends.values():
        targets.append((b.backend_id, b.address, b.mac, b.port, b.switch))
    seen_responders: set[int] = set()
    for s in model.services.values():
        ep = s.overflow
        if ep is not None and ep.backend_id not in seen_responders:
            seen_responders.add(ep.backend_id)
            targets.append((ep.backend_id, ep.address, ep.mac, ep.port, ep.switch))
    tunnelled = len(model.fabric.switches) > 1  # other switches reach local backends by IP-in-IP
    out: list[Entity] = []
    terminated: set[str] = set()
    for bid, address, dmac, port, where in sorted(targets):
        if where == switch.name:
            action = Action.of(Actions.DELIVER_LOCAL, port=port, smac=_own_mac(switch),
                               dmac=mac(dmac))
            if tunnelled and address not in terminated:
                # IP-in-IP from other switches to this backend's address ends here. The
                # tunnel names an address, not a backend: backends sharing a host share
                # one entry, to the lowest id (delivered alike: same port, same MAC).
                terminated.add(address)
                out.append(TableEntry.of(Tables.TUNNEL_TERM, {"dst_addr": Exact(ip(address))},
                                         Action.of(Actions.DECAP_TO_BACKEND, backend_id=bid)))
        else:
            if switch.fabric_ip is None:
                raise CompileError(f"switch '{switch.name}' needs a fabric_ip to tunnel to "
                                   f"backend {bid} on '{where}'")
            action = Action.of(Actions.DELIVER_IPIP, tunnel_src=ip(switch.fabric_ip),
                               tunnel_dst=ip(address))
        out.append(TableEntry.of(Tables.BACKEND, {"backend_id": Exact(bid)}, action))
    return out


def _route_entries(model: Model, switch: Switch) -> list[Entity]:
    """Every host's prefix and every backend's address, to the host or the next switch."""
    fabric = model.fabric
    routes: dict[tuple[int, int], tuple[str, int, str]] = {}  # (net, len) -> (switch, port, mac)
    for h in fabric.hosts.values():
        network = ipaddress.IPv4Network(f"{h.address}/{h.prefix_len}", strict=False)
        routes.setdefault((int(network.network_address), network.prefixlen),
                          (h.switch, h.port, h.mac))
    for b in model.backends.values():
        routes.setdefault((ip(b.address), 32), (b.switch, b.port, b.mac))
    out: list[Entity] = []
    for (net, plen), (where, port, dmac) in sorted(routes.items()):
        if where == switch.name:
            action = Action.of(Actions.ROUTE, port=port, smac=_own_mac(switch), dmac=mac(dmac))
        else:
            out_port = fabric.next_hop_port(switch.name, where)
            if out_port is None:
                continue  # not connected: nothing to route by
            peer = _peer(model, switch.name, out_port)
            action = Action.of(Actions.ROUTE, port=out_port, smac=_own_mac(switch),
                               dmac=_own_mac(fabric.switches[peer]))
        out.append(TableEntry.of(Tables.IPV4_ROUTE, {"dst_addr": Lpm(net, plen)}, action))
    return out


def _peer(model: Model, switch: str, port: int) -> str:
    for link in model.fabric.links_of(switch):
        here = link.a if link.a.switch == switch else link.b
        if here.port == port:
            return link.other(switch).switch
    raise CompileError(f"no link on {switch} port {port}")


def _own_mac(switch: Switch) -> int:
    """The source MAC of frames the switch rewrites (the fabric file gives every switch one)."""
    if switch.mac is None:
        raise CompileError(f"switch '{switch.name}' has no mac")
    return mac(switch.mac)
