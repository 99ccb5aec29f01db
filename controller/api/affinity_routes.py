"""REST routes of prefix affinity (controller/affinity.py, docs/prefix-cache.md).

POST   /api/v1/backends/{name}/affinity  {"service", "client"}: the agent of `name` says the
                                         client's prompts are cached on `name` (role agent,
                                         bound to the backend like /kv)
DELETE /api/v1/backends/{name}/affinity  the same body: withdraw it (role agent)
GET    /api/v1/affinity                  the learned entries per switch, counters (viewer)
"""

# No `from __future__ import annotations`: FastAPI must see the role dependencies passed in.
import ipaddress
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from tokenfabric.controller.affinity import edge_switches, resolve, tenant_lookup
from tokenfabric.controller.api.errors import Conflict, Invalid, NotFound
from tokenfabric.controller.model import BackendState

if TYPE_CHECKING:
    from tokenfabric.controller.app import Controller


class AffinityBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    service: str = Field(min_length=1, max_length=64, description="the service (fabric file)")
    client: ipaddress.IPv4Address = Field(description="the client's address as the switch "
                                          "sees it (the connection's source)")


def affinity_routes(ctl: "Controller", viewer: Any, agent: Any, errors: dict,
                    mutation_errors: dict) -> APIRouter:
    """`viewer`, `agent`: the API's role dependencies; `errors`: its documented errors."""
    r = APIRouter(tags=["prefix index"])

    def checked(name: str, body: AffinityBody, who: Any, action: str) -> str:
        """404/403/409/422 before anything changes; the client's address as text."""
        if name not in ctl.model.backends:
            raise NotFound(f"no backend '{name}'")
        # an agent speaks only for its own backends (the tokens file's binding)
        ctl.authorize(who, action, name, ctl.model.backends[name].host)
        service = ctl.model.services.get(body.service)
        if service is None:
            raise NotFound(f"no service '{body.service}'")
        client = body.client
        if (client.is_unspecified or client.is_multicast or client.is_loopback
                or client == ipaddress.IPv4Address("255.255.255.255")):
            raise Invalid(f"{client} is not a client's unicast address")
        if name not in service.pool:
            raise Conflict(f"backend '{name}' is not in service '{service.name}''s pool")
        return str(client)

    @r.post("/backends/{name}/affinity", responses=mutation_errors)
    async def learn(name: Annotated[str, Path(max_length=64)], body: AffinityBody,
                    who: agent) -> dict[str, Any]:
        client = checked(name, body, who, "report the prefix affinity of")
        if ctl.model.backends[name].state != BackendState.ACTIVE:
            raise Conflict(f"backend '{name}' takes no new connections "
                           f"({ctl.model.backends[name].state})")
        tenant = tenant_lookup(ctl.model.policy).find(body.client)
        settings = resolve(ctl.model.policy, body.service, tenant)
        if settings is None:
            ctl.model.affinity.stats["refused-no-opt-in"] += 1
            whose = f"tenant '{tenant.name}'" if tenant else "clients of no tenant"
            raise Conflict(f"prefix affinity is off for service '{body.service}' and {whose} "
                           f"(policy: prefix_affinity)")
        switches = edge_switches(ctl.model.fabric, body.client)
        if not switches:
            ctl.model.affinity.stats["refused-no-edge"] += 1
            raise Conflict(f"no fabric host's prefix holds {client}: its edge switch is "
                           "unknown")
        now = ctl.clock()
        table = ctl.model.affinity
        new = any(table.backend_of(sw, body.service, client) != name for sw in switches)
        evicted = sum(table.learn(sw, body.service, client, name, now, settings.ttl_s)
                      for sw in switches)
        if new or evicted:  # a refresh alone changes nothing on the switch: no push
            ctl.mark_dirty()  # pushed by the next reconcile pass, at once
        return {"service": body.service, "client": client, "backend": name,
                "switches": switches, "ttl_s": settings.ttl_s, "bound": settings.bound,
                "evicted": evicted}

    @r.delete("/backends/{name}/affinity", responses=mutation_errors)
    async def withdraw(name: Annotated[str, Path(max_length=64)], body: AffinityBody,
                       who: agent) -> dict[str, Any]:
        client = checked(name, body, who, "withdraw the prefix affinity of")
        gone = ctl.model.affinity.withdraw(body.service, client, name)
        if gone:
            ctl.mark_dirty()
        return {"withdrawn": gone}

    @r.get("/affinity", responses=errors)
    async def view(who: viewer) -> dict[str, Any]:
        return ctl.model.affinity.view(ctl.clock())

    return r
