"""The REST API: views of the controller's model and its admin actions (docs/rest.md).

Reads need a viewer token, agents' calls an agent token, everything else an admin
token (controller/auth.py). /metrics, /healthz and /openapi.json are open.
"""

# No `from __future__ import annotations`: FastAPI must see the Annotated aliases that
# create_app defines locally as objects, not as names it cannot resolve.

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from types import GenericAlias
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tokenfabric import wire as s
from tokenfabric.controller import statement
from tokenfabric.controller.api.affinity_routes import affinity_routes
from tokenfabric.controller.api.errors import (
    Forbidden,
    NotFound,
    Unauthorized,
    install_error_handlers,
)
from tokenfabric.controller.api.limits import LimitedJsonRoute, RequestLimits
from tokenfabric.controller.api.metrics import ApiMetrics
from tokenfabric.controller.api.prefix_routes import prefix_index_routes
from tokenfabric.controller.auth import ANONYMOUS_ADMIN, Principal, Role
from tokenfabric.controller.gctools import gc_paused
from tokenfabric.controller.ledger import UsageRow
from tokenfabric.controller.replica import install_backup_guard

if TYPE_CHECKING:
    from tokenfabric.controller.app import Controller

API = "/api/v1"
_bearer = HTTPBearer(auto_error=False, description="a token from the controller's token file")

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": s.ErrorBody, "description": text} for code, text in {
        400: "the body is not JSON, or beyond the JSON limits", 401: "no token, or an "
        "unknown one", 403: "the token's role may not do this",
        404: "no such object", 413: "the body is larger than the limit",
        422: "the request is invalid"}.items()}
MUTATION_ERRORS = {**ERRORS, 409: {"model": s.ErrorBody, "description": "conflicts with state"},
                   502: {"model": s.ErrorBody, "description": "a switch refused the change; "
                                                               "every switch was rolled back"},
                   503: {"model": s.ErrorBody, "description": "temporarily unavailable"}}

PathName = Annotated[str, Path(max_length=64)]


def create_app(ctl: "Controller") -> FastAPI:
    app = FastAPI(title="tokenfabric controller", version="1",
                  description="Views and admin actions of the tokenfabric controller. "
                              "Errors are {\"error\": {code, message, details}}.")
    install_error_handlers(app)
    metrics = ApiMetrics(ctl)
    app.state.controller = ctl
    app.state.metrics = metrics

    # A backup replica refuses mutations (controller/replica.py); inside the auth below
    install_backup_guard(app, ctl.replica)
    # Auth and body size before any work (controller/api/limits.py); added first, so that
    # count_requests below is outside it and counts its refusals too.
    app.add_middleware(RequestLimits, tokens=ctl.tokens, api_prefix=API)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe(request.method, getattr(route, "path", "unmatched"),
                        response.status_code, time.perf_counter() - start)
        return response

    async def principal(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if not ctl.tokens.enabled:
            return ANONYMOUS_ADMIN  # auth disabled
        if creds is None or creds.scheme.lower() != "bearer":
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        who = ctl.tokens.lookup(creds.credentials)
        if who is None:
            raise Unauthorized("unknown token")
        return who

    def role(needed: Role) -> Any:
        async def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
            if who.role < needed:
                raise Forbidden(f"'{who.name}' is a {who.role.label}; this needs {needed.label}")
            return who
        return check

    Viewer = Annotated[Principal, Depends(role(Role.VIEWER))]
    Agent = Annotated[Principal, Depends(role(Role.AGENT))]
    Admin = Annotated[Principal, Depends(role(Role.ADMIN))]

    r = APIRouter(prefix=API, route_class=LimitedJsonRoute)  # JSON within limits, else 400

    def list_and_get(path: str, noun: str, model: type, tag: str,
                     names: Callable[[], Iterable[str]],
                     view: Callable[[str], dict[str, Any]]) -> None:
        """GET <path>: every view, by name; GET <path>/{name}: one (view raises NotFound).
        Route names (list_<noun>s, get_<noun>) keep the OpenAPI operation ids."""
        async def list_all(who: Viewer) -> list[dict[str, Any]]:
            return [view(n) for n in sorted(names())]

        async def get_one(name: PathName, who: Viewer) -> dict[str, Any]:
            return view(name)

        r.add_api_route(path, list_all, methods=["GET"], name=f"list_{noun}s",
                        response_model=GenericAlias(list, (model,)), responses=ERRORS,
                        tags=[tag])
        r.add_api_route(f"{path}/{{name}}", get_one, methods=["GET"], name=f"get_{noun}",
                        response_model=model, responses=ERRORS, tags=[tag])

    # ------------------------------------------------------------ switches

    @r.get("/switches", response_model=list[s.SwitchView], responses=ERRORS, tags=["switches"])
    async def list_switches(who: Viewer) -> list[dict[str, Any]]:
        return ctl.switch_views()

    @r.get("/switches/{name}", response_model=s.SwitchView, responses=ERRORS,
           tags=["switches"])
    async def get_switch(name: PathName, who: Viewer) -> dict[str, Any]:
        for view in ctl.switch_views():
            if view["name"] == name:
                return view
        raise NotFound(f"no switch '{name}'")

    @r.get("/switches/{name}/entries", response_model=list[dict[str, Any]], responses=ERRORS,
           tags=["switches"])
    async def switch_entries(name: PathName, who: Viewer) -> list[dict[str, Any]]:
        """What the controller wants the switch to hold: the state last handed to it,
        or, before the first push, what the model compiles to."""
        if name not in ctl.model.fabric.switches:
            raise NotFound(f"no switch '{name}'")
        return await asyncio.to_thread(ctl.entries_of, name)  # ~0.2 s for 4,000 tenants

    @r.get("/counters", response_model=list[s.SwitchCounters], responses=ERRORS,
           tags=["switches"])
    async def counters(who: Viewer) -> list[dict[str, Any]]:
        out = []
        for name, entry in (await ctl.read_counters()).items():
            tenants = [{"tenant_id": t, "bytes": b, "packets": p, "connections": c}
                       for t, (b, p, c) in sorted(entry["tenants"].items())]
            out.append({"switch": name, "connected": entry["connected"],
                        "error": entry["error"], "tenants": tenants})
        return out

    # ------------------------------------------------------------ backends

    def backend_view(name: str) -> dict[str, Any]:
        b = ctl.backend(name)
        extras = ctl.extras[name]
        last = b.load.last_report
        return {
            "name": b.name, "backend_id": b.backend_id, "host": b.host, "address": b.address,
            "mac": b.mac, "switch": b.switch, "port": b.port, "capacity": b.capacity,
            "models": list(b.models), "state": str(b.state), "drained": extras.drained,
            "healthy": extras.healthy, "weight": b.weight, "registered": extras.registered,
            "services": [sv.name for sv in ctl.model.services.values() if name in sv.pool],
            "load": {"running": b.load.running, "waiting": b.load.waiting,
                     "kv_cache_usage": b.load.kv_cache_usage, "service_s": b.load.service_s,
                     "reports": b.load.reports, "last_report_age_s": None if last is None
                     else round(ctl.clock() - last, 3)},
            "rdma": extras.rdma, "metrics": extras.metrics,
        }

    list_and_get("/backends", "backend", s.BackendView, "backends",
                 lambda: ctl.model.backends, backend_view)

    @r.post("/backends", status_code=201, response_model=s.RegistrationReply,
            responses=MUTATION_ERRORS, tags=["agents"])
    async def register_backend(reg: s.BackendRegistration, who: Agent) -> dict[str, Any]:
        backend = ctl.register_backend(reg, who)
        return {"backend_id": backend.backend_id, "tenants": ctl.grants(),
                "roce": ctl.roce_for_agents()}

    @r.delete("/backends/{name}", response_model=s.Done, responses=MUTATION_ERRORS,
              tags=["agents"])
    async def deregister_backend(name: PathName, who: Agent) -> dict[str, Any]:
        ctl.deregister_backend(name, who)
        return {"ok": True, "message": f"backend '{name}' deregistered"}

    @r.post("/backends/{name}/report", response_model=s.ReportReply,
            responses=MUTATION_ERRORS, tags=["agents"])
    async def report(name: PathName, rep: s.BackendReport, who: Agent,
                     idempotency_key: Annotated[str | None, Header(
                         max_length=128, pattern=r"^[!-~]+$",
                         description="same as report_id: visible ASCII")] = None,
                     ) -> dict[str, Any]:
        result = await ctl.report(name, rep, idempotency_key, who=who)
        metrics.report(name, rep, result.recorded,
                       result.usage if result.signed is not None else None)
        backend = ctl.model.backends.get(name)
        signed = result.signed
        return {"recorded": result.recorded,
                "records_added": signed.added if signed else 0,
                "records_duplicate": signed.duplicates if signed else 0,
                "gaps": signed.gaps if signed else [],
                "state": str(backend.state) if backend else "deregistered",
                "weight": backend.weight if backend else 0,
                "draining": bool(backend) and ctl.extras[name].drained,
                "tenants": ctl.grants()}

    @r.post("/backends/{name}/drain", response_model=s.BackendView,
            responses=MUTATION_ERRORS, tags=["backends"])
    async def drain(name: PathName, who: Admin) -> dict[str, Any]:
        await ctl.set_drained(name, True, who)
        return backend_view(name)

    @r.post("/backends/{name}/undrain", response_model=s.BackendView,
            responses=MUTATION_ERRORS, tags=["backends"])
    async def undrain(name: PathName, who: Admin) -> dict[str, Any]:
        await ctl.set_drained(name, False, who)
        return backend_view(name)

    # ------------------------------------------------------------ services

    def service_view(name: str) -> dict[str, Any]:
        sv = ctl.model.services.get(name)
        if sv is None:
            raise NotFound(f"no service '{name}'")
        active = [b for b in ctl.model.pool(name) if str(b.state) == "active"]
        overflow = f"{sv.overflow.address} on {sv.overflow.switch}:{sv.overflow.port}" \
            if sv.overflow else None
        return {"name": sv.name, "service_id": sv.service_id, "model": sv.model, "vip": sv.vip,
                "port": sv.port, "mode": str(sv.mode), "pool": list(sv.pool),
                "active_backends": len(active), "overflow": overflow}

    list_and_get("/services", "service", s.ServiceView, "services",
                 lambda: ctl.model.services, service_view)

    @r.put("/services/{name}/mode", response_model=s.ServiceView, responses=MUTATION_ERRORS,
           tags=["services"])
    async def set_mode(name: PathName, body: s.ModeChange, who: Admin) -> dict[str, Any]:
        await ctl.set_mode(name, body.mode, who)
        return service_view(name)

    # ------------------------------------------------------------ tenants, contracts, policy

    def tenant_view(name: str) -> dict[str, Any]:
        t = ctl.model.policy.tenants.get(name)
        if t is None:
            raise NotFound(f"no tenant '{name}'")
        c = ctl.model.policy.contracts.get(t.contract)
        return {"name": t.name, "tenant_id": t.tenant_id, "prefixes": list(t.prefixes),
                "contract": t.contract, "trust_dscp": t.trust_dscp,
                "tokens_per_s": round(c.limits.tpm / 60.0, 6) if c else None}

    def contract_view(name: str) -> dict[str, Any]:
        c = ctl.model.policy.contracts.get(name)
        if c is None:
            raise NotFound(f"no contract '{name}'")
        tc, lim = c.traffic_class, c.limits
        bw = c.bandwidth
        return {
            "name": c.name, "service_class": tc.service_class, "dscp": tc.dscp,
            "priority_level": tc.priority_level, "queue": tc.queue, "tpm": lim.tpm,
            "burst": lim.burst, "rpm": lim.rpm, "max_parallel": lim.max_parallel,
            "fiveqi": c.fiveqi.value if c.fiveqi else None,
            "bandwidth": None if bw is None else {
                "cir": bw.cir, "cbs": bw.cbs, "pir": bw.pir, "pbs": bw.pbs,
                "exceed": str(bw.exceed), "violate": str(bw.violate),
                "exceed_dscp": bw.exceed_dscp, "violate_dscp": bw.violate_dscp},
            "slo": {"ttft_p99_ms": c.slo.ttft_p99_ms, "tpot_p99_ms": c.slo.tpot_p99_ms},
            "request_priority": c.request_priority, "camara_profile": c.camara_profile,
            "services": list(c.services)}

    list_and_get("/tenants", "tenant", s.TenantView, "policy",
                 lambda: ctl.model.policy.tenants, tenant_view)
    list_and_get("/contracts", "contract", s.ContractView, "policy",
                 lambda: ctl.model.policy.contracts, contract_view)

    @r.post("/policy/validate", response_model=s.PolicyCheck, responses=MUTATION_ERRORS,
            tags=["policy"])
    async def validate_policy(body: s.PolicyText, who: Admin) -> dict[str, Any]:
        errors = await ctl.validate_policy(body.yaml, body.filename)  # in the policy process
        return {"valid": not errors, "errors": errors}

    @r.post("/policy/apply", response_model=s.PolicyApplied, responses=MUTATION_ERRORS,
            tags=["policy"])
    async def apply_policy(body: s.PolicyText, who: Admin) -> dict[str, Any]:
        return await ctl.apply_policy(body.yaml, body.filename, who)

    @r.post("/policy/reload", response_model=s.PolicyApplied, responses=MUTATION_ERRORS,
            tags=["policy"])
    async def reload_policy(who: Admin) -> dict[str, Any]:
        return await ctl.reload_policy(who)

    # ------------------------------------------------------------ ledger

    Since = Annotated[float | None, Query(ge=0, le=1e11, description="unix seconds, inclusive")]
    Until = Annotated[float | None, Query(ge=0, le=1e11, description="unix seconds, exclusive")]
    TenantId = Annotated[int | None, Query(ge=0, le=s.U16)]
    ModelQ = Annotated[str | None, Query(min_length=1, max_length=256)]
    Limit = Annotated[int, Query(ge=1, le=100_000)]

    def row_view(row: UsageRow) -> dict[str, Any]:
        return {"minute": row.minute, "tenant_id": row.tenant_id, "model": row.model,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "total_tokens": row.total_tokens, "requests": row.requests}

    @r.get("/ledger", response_model=list[s.LedgerRowView], responses=ERRORS, tags=["ledger"])
    async def ledger(who: Viewer, tenant_id: TenantId = None, model: ModelQ = None,
                     since: Since = None, until: Until = None,
                     limit: Limit = 10_000) -> Response:
        def export() -> bytes:  # up to 100,000 rows: queried and rendered off the loop
            with gc_paused():
                rows = ctl.ledger.query(tenant_id, model, since, until, limit)
                return json.dumps([row_view(r) for r in rows]).encode()

        return Response(await asyncio.to_thread(export), media_type="application/json")

    csv_response: dict[int | str, dict[str, Any]] = {
        200: {"description": "the ledger rows as CSV, one per tenant, model and minute",
              "content": {"text/csv": {"schema": {"type": "string"}}}}}

    @r.get("/ledger.csv", response_class=Response, responses={**ERRORS, **csv_response},
           tags=["ledger"])
    async def ledger_csv(who: Viewer, tenant_id: TenantId = None, model: ModelQ = None,
                         since: Since = None, until: Until = None,
                         limit: Limit = 100_000) -> Response:
        def export() -> str:
            with gc_paused():
                rows = ctl.ledger.query(tenant_id, model, since, until, limit)
                return ctl.ledger.export_csv(rows)

        return Response(await asyncio.to_thread(export), media_type="text/csv",
                                 headers={"Content-Disposition":
                                          'attachment; filename="ledger.csv"'})

    @r.get("/ledger/crosscheck", response_model=list[s.CrossCheckView], responses=ERRORS,
           tags=["ledger"])
    async def crosscheck(who: Viewer, since: Since = None,
                         until: Until = None) -> list[s.CrossCheckView]:
        names = {t.tenant_id: t.name for t in ctl.model.policy.tenants.values()}
        return [c.model_copy(update={"tenant": names.get(c.tenant_id)})
                for c in await asyncio.to_thread(ctl.ledger.cross_check, since, until)]

    @r.get("/ledger/crosscheck/backends", response_model=list[s.BackendCheckView],
           responses=ERRORS, tags=["ledger"])
    async def crosscheck_backends(who: Viewer, since: Since = None,
                                  until: Until = None) -> list[dict[str, Any]]:
        """Per backend port: the completion tokens billed against the bytes the port sent
        (docs/ledger.md). Without a range: the controller's last periodic check."""
        if since is None and until is None:
            checks = ctl.billing_checks
        else:
            checks = await ctl.check_billing(since, until)
        return [{**vars(c), "flagged_windows": {b: ctl.crosscheck.flags.get(b, 0)
                                                for b in c.backends},
                 "min_bytes_per_token": ctl.crosscheck.min_bytes_per_token} for c in checks]

    @r.get("/ledger/crosscheck/summary", response_model=s.CrossCheckSummary,
           responses=ERRORS, tags=["ledger"])
    async def crosscheck_summary(who: Viewer) -> dict[str, Any]:
        """The periodic billing checks so far: how many, and per backend the windows that
        gave a verdict, the windows that flagged it and when it was first flagged."""
        cc = ctl.crosscheck
        names = sorted(set(cc.verdicts) | set(cc.flags))
        return {"checks": cc.checks, "interval_s": cc.interval_s, "window_s": cc.window_s,
                "lag_s": cc.lag_s, "min_bytes_per_token": cc.min_bytes_per_token,
                "backends": {b: {"verdicts": cc.verdicts.get(b, 0),
                                 "flagged": cc.flags.get(b, 0),
                                 "first_flagged": cc.first_flagged.get(b)} for b in names}}

    @r.get("/ledger/head", response_model=s.LedgerHead, responses=ERRORS, tags=["ledger"])
    async def ledger_head(who: Viewer) -> dict[str, Any]:
        """The journal's last row and hash: recorded elsewhere, it shows rows cut off at
        the end (`tokenfabric ledger verify --expect-head`)."""
        rows, head = await asyncio.to_thread(ctl.ledger.head)
        return {"rows": rows, "head": head}

    statement_csv: dict[int | str, dict[str, Any]] = {
        200: {"description": "the statement as JSON, or CSV with format=csv",
              "content": {"text/csv": {"schema": {"type": "string"}}}}}

    @r.get("/ledger/statement", response_model=s.StatementView,
           responses={**ERRORS, **statement_csv}, tags=["ledger"])
    async def ledger_statement(
            who: Viewer,
            tenant: Annotated[str, Query(min_length=1, max_length=64,
                                         description="tenant name or id")],
            since: Since = None, until: Until = None,
            format: Annotated[str, Query(pattern="^(json|csv)$")] = "json") -> Any:
        """A tenant's tokens per model over [since, until), priced by its contract in the
        running policy (docs/ledger.md)."""
        found = statement.find_tenant(ctl.model.policy, tenant)
        if found is None:
            raise NotFound(f"no tenant '{tenant}' in the running policy")
        usage = await asyncio.to_thread(ctl.ledger.usage_by_model, found.tenant_id, since,
                                        until)
        result = statement.build(found, ctl.model.policy.contracts.get(found.contract), usage,
                                 since, until)
        if format == "csv":
            return Response(statement.to_csv(result), media_type="text/csv", headers={
                "Content-Disposition": f'attachment; filename="statement-{found.name}.csv"'})
        return result

    @r.get("/audit", responses=ERRORS, tags=["admin"])
    async def audit(who: Admin) -> list[dict[str, Any]]:
        return [vars(e) for e in ctl.audit_log]

    r.include_router(prefix_index_routes(ctl, Viewer, Agent, ERRORS, MUTATION_ERRORS))
    r.include_router(affinity_routes(ctl, Viewer, Agent, ERRORS, MUTATION_ERRORS))
    app.include_router(r)

    # ------------------------------------------------------------ open endpoints

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "switches": {v["name"]: v["status"] for v in ctl.switch_views()},
                "backends": len(ctl.model.backends), "reconciles": ctl.reconciles,
                "holding_s": round(max(0.0, ctl.hold_until - ctl.clock()), 3),
                "last_reconcile_error": ctl.last_reconcile_error}

    @app.get("/metrics", response_class=PlainTextResponse, tags=["health"])
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
