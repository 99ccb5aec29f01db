"""REST routes of the prefix index (controller/prefix_index.py).

POST /api/v1/backends/{name}/kv     an agent's KV block delta or snapshot (role agent)
POST /api/v1/backends/{name}/claim  {"block_hashes": [...], "ttl_s"}: blocks the backend
                                    will hold once its queued request runs (role agent)
GET  /api/v1/prefix-index           per-backend summary, memory bound (role viewer)
POST /api/v1/prefix-index/lookup    {"block_hashes": [...]}: the longest cached prefix
                                    per backend (role viewer)
"""

# No `from __future__ import annotations`: FastAPI must see the role dependencies passed in.
import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from tokenfabric.controller.api.errors import Conflict, NotFound
from tokenfabric.controller.prefix_index import (
    KEY,
    MAX_CLAIM_KEYS,
    MAX_CLAIM_TTL_S,
    MAX_LOOKUP_BLOCKS,
    KvReport,
    PrefixIndexError,
)

if TYPE_CHECKING:
    from tokenfabric.controller.app import Controller

class LookupBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_hashes: list[KEY] = Field(max_length=MAX_LOOKUP_BLOCKS, description=(
        "a prompt's block keys in order (tokenfabric.blockhash.key64 of vLLM's chained "
        "block hashes)"))


class ClaimBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_hashes: list[KEY] = Field(min_length=1, max_length=MAX_CLAIM_KEYS, description=(
        "block keys of the prompts this backend was chosen to serve (any order; several "
        "prompts may share one call)"))
    ttl_s: float | None = Field(default=None, gt=0, le=MAX_CLAIM_TTL_S, description=(
        "how long the claim lasts unless a KV report confirms it (default: the index's "
        "claim_ttl_s)"))


def prefix_index_routes(ctl: "Controller", viewer: Any, agent: Any, errors: dict,
                        mutation_errors: dict) -> APIRouter:
    """`viewer`, `agent`: the API's role dependencies; `errors`: its documented errors."""
    r = APIRouter(tags=["prefix index"])
    index = ctl.prefix_index

    def own(name: str, who: Any, action: str) -> None:
        """404 for an unknown backend; 403 (audited) unless `who` speaks for it: an agent
        speaks only for its own backends (the tokens file's binding)."""
        if name not in ctl.model.backends:
            raise NotFound(f"no backend '{name}'")
        ctl.authorize(who, action, name, ctl.model.backends[name].host)

    @r.post("/backends/{name}/kv", responses=mutation_errors)
    async def kv_report(name: Annotated[str, Path(max_length=64)], body: KvReport,
                        who: agent) -> dict[str, Any]:
        own(name, who, "report the KV blocks of")
        try:
            return index.apply(name, body)
        except PrefixIndexError as exc:
            raise Conflict(str(exc)) from None

    @r.post("/backends/{name}/claim", responses=mutation_errors)
    async def claim(name: Annotated[str, Path(max_length=64)], body: ClaimBody,
                    who: agent) -> dict[str, Any]:
        own(name, who, "claim KV blocks for")
        try:
            return index.claim(name, body.block_hashes, body.ttl_s)
        except PrefixIndexError as exc:
            raise Conflict(str(exc)) from None

    @r.get("/prefix-index", responses=errors)
    async def summary(who: viewer) -> dict[str, Any]:
        return index.summary()

    @r.post("/prefix-index/lookup", responses=errors)
    async def lookup(body: LookupBody, who: viewer) -> dict[str, Any]:
        answer = index.lookup(body.block_hashes)
        # what a bridge's handoff cost model needs of each holder: where its agent is,
        # and its load and service time as last reported (hostagent/handoff.py)
        now = time.monotonic()
        for match in answer["matches"]:
            backend = ctl.model.backends.get(match["backend"])
            if backend is None:
                continue
            load = backend.load
            match.update(address=backend.address, capacity=backend.capacity,
                         running=load.running, waiting=load.waiting,
                         kv_cache_usage=load.kv_cache_usage, service_s=load.service_s,
                         load_age_s=None if load.last_report is None
                         else round(now - load.last_report, 3))
        return answer

    return r
