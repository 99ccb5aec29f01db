"""The controller process: a desired-state reconciler behind a REST API.

In: the fabric file, the policy file, the agents' registrations and reports, the
operator's REST calls. Out: P4Runtime state on every switch (through the
southbound), ledger rows, REST views and Prometheus metrics.

Every input only changes the model and marks it dirty; one reconcile task turns
the model into entries (policy compiler + router) and hands them to the
southbound, which writes only the difference. So a burst of reports costs one
write, and a failed write is retried by the next pass instead of by the caller.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller import fabric as fabric_file
from controller import log
from controller.api.errors import Conflict, Invalid, NotFound, Unavailable
from controller.api.schemas import BackendRegistration, BackendReport
from controller.auth import Principal, TokenStore
from controller.ledger import Ledger, Usage
from controller.model import Backend, BackendState, Model, Policy, SelectionMode
from controller.policy.schema import load_policy, parse_policy
from controller.policy.source import SpecError

REPORT_TIMEOUT_S = 3.0  # a backend whose reports stop for this long is marked down
RECONCILE_INTERVAL_S = 1.0  # a pass at least this often, even when nothing changed
COUNTER_INTERVAL_S = 10.0  # how often switch counters are sampled into the ledger


@dataclass
class AuditEntry:
    ts: float
    who: str
    role: str
    action: str
    target: str
    detail: str = ""


@dataclass
class BackendExtras:
    """What the controller keeps about a backend beyond the shared model."""

    registered: bool = False  # by an agent (True) or from the fabric file (False)
    drained: bool = False  # by an operator; survives health changes
    healthy: bool | None = None  # last report's health flag
    metrics: dict[str, Any] = field(default_factory=dict)
    rdma: dict[str, Any] | None = None


class Controller:
    """The model plus everything that changes it; the REST API calls these methods."""

    def __init__(self, model: Model, ledger: Ledger, tokens: TokenStore | None = None,
                 policy_path: str | Path | None = None, southbound: Any = None,
                 report_timeout_s: float = REPORT_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.ledger = ledger
        self.tokens = tokens or TokenStore.disabled()
        self.policy_path = Path(policy_path) if policy_path else None
        self.southbound = southbound
        self.report_timeout_s = report_timeout_s
        self.clock = clock
        self.started = clock()
        self.extras: dict[str, BackendExtras] = {n: BackendExtras() for n in model.backends}
        self.audit_log: collections.deque[AuditEntry] = collections.deque(maxlen=1000)
        self.reconciles = 0
        self.last_reconcile_error: str | None = None
        self.policy_applies = collections.Counter[str]()
        self._dirty: asyncio.Event | None = None
        self._lock = asyncio.Lock()  # one mutation at a time: policy applies are multi-step

    # ------------------------------------------------------------ audit

    def audit(self, who: Principal, action: str, target: str, detail: str = "") -> None:
        entry = AuditEntry(time.time(), who.name, who.role.label, action, target, detail)
        self.audit_log.append(entry)
        log.info("audit: %s (%s) %s %s%s", who.name, who.role.label, action, target,
                 f": {detail}" if detail else "")

    def mark_dirty(self) -> None:
        if self._dirty is not None:
            self._dirty.set()

    # ------------------------------------------------------------ backends

    def backend(self, name: str) -> Backend:
        try:
            return self.model.backends[name]
        except KeyError:
            raise NotFound(f"no backend '{name}'") from None

    def service_at(self, vip: str, port: int) -> str | None:
        for s in self.model.services.values():
            if s.vip == vip and s.port == port:
                return s.name
        return None

    def register_backend(self, reg: BackendRegistration, who: Principal) -> Backend:
        """Add (or, for the same name and attachment, refresh) an agent's backend."""
        service = self.service_at(reg.vip, reg.vip_port)
        if service is None:
            raise Invalid(f"no service has the VIP {reg.vip}:{reg.vip_port}")
        served = self.model.services[service].model
        if served not in reg.models:
            raise Invalid(f"service '{service}' at {reg.vip}:{reg.vip_port} serves "
                          f"'{served}', which is not among the backend's models")
        switch = self.model.fabric.switches.get(reg.switch)
        if switch is None:
            raise Invalid(f"no switch '{reg.switch}' in the fabric")
        if switch.ports and reg.port not in switch.ports:
            raise Invalid(f"switch '{reg.switch}' has no port {reg.port}")
        # Several backends may share a server (one per model), but an address and a MAC
        # always go together, and a switch port belongs to one fabric host.
        for other in self.model.backends.values():
            if other.name == reg.name:
                continue
            same_ip, same_mac = other.address == reg.address, other.mac.lower() == reg.mac.lower()
            if same_ip != same_mac:
                raise Conflict(f"address {reg.address} / mac {reg.mac} disagree with backend "
                               f"'{other.name}' ({other.address} / {other.mac})")
        for host in self.model.fabric.hosts.values():
            if (host.switch, host.port) == (reg.switch, reg.port) and host.address != reg.address:
                raise Conflict(f"{reg.switch} port {reg.port} belongs to host '{host.name}' "
                               f"({host.address})")
        old = self.model.backends.get(reg.name)
        extras = self.extras.get(reg.name)
        if old is not None and extras is not None and not extras.registered:
            raise Conflict(f"backend '{reg.name}' is defined in the fabric file")
        backend_id = old.backend_id if old else fabric_file.next_backend_id(self.model)
        if old is not None:
            fabric_file.remove_backend(self.model, reg.name)
        backend = Backend(name=reg.name, backend_id=backend_id, host=reg.host,
                          address=reg.address, mac=reg.mac.lower(), switch=reg.switch,
                          port=reg.port, capacity=reg.capacity, models=list(reg.models))
        if old is not None:
            backend.load = old.load
            backend.weight = old.weight
        fabric_file.add_backend(self.model, backend)
        kept = extras if extras is not None else BackendExtras()
        kept.registered = True
        self.extras[reg.name] = kept
        self._refresh_state(backend)
        self.audit(who, "register" if old is None else "re-register", f"backend {reg.name}",
                   f"id {backend_id}, {reg.address} on {reg.switch}:{reg.port}, "
                   f"capacity {reg.capacity}, service {service}")
        self.mark_dirty()
        return backend

    def deregister_backend(self, name: str, who: Principal) -> None:
        self.backend(name)
        if not self.extras[name].registered:
            raise Conflict(f"backend '{name}' is defined in the fabric file; drain it instead")
        fabric_file.remove_backend(self.model, name)
        del self.extras[name]
        self.audit(who, "deregister", f"backend {name}")
        self.mark_dirty()

    async def report(self, name: str, rep: BackendReport,
                     idempotency_key: str | None = None) -> bool:
        """Take an agent's report: usage into the ledger (durably, first), load into the model."""
        backend = self.backend(name)
        report_id = rep.report_id or idempotency_key
        usage = [Usage(u.tenant_id, u.model, u.prompt_tokens, u.completion_tokens,
                       1 if u.requests is None else u.requests) for u in rep.usage]
        try:
            recorded = await asyncio.to_thread(
                self.ledger.record, f"{name}/{report_id}" if report_id else None, name, usage)
        except Exception as exc:  # sqlite3 errors: disk full, I/O error
            log.error("ledger: cannot record a report of %s: %s", name, exc)
            raise Unavailable(f"ledger cannot record the report ({exc}); retry") from exc
        if self.model.backends.get(name) is not backend:
            return recorded  # deregistered while the ledger wrote: the usage still counts
        load = backend.load
        load.running, load.waiting = rep.running, rep.waiting
        load.kv_cache_usage = rep.kv_cache_usage
        load.last_report = self.clock()
        load.reports += 1
        extras = self.extras[name]
        extras.healthy = rep.healthy
        extras.metrics = rep.metrics
        extras.rdma = rep.rdma
        self._refresh_state(backend)
        self.mark_dirty()
        return recorded

    def set_drained(self, name: str, drained: bool, who: Principal) -> Backend:
        backend = self.backend(name)
        self.extras[name].drained = drained
        self._refresh_state(backend)
        self.audit(who, "drain" if drained else "undrain", f"backend {name}")
        self.mark_dirty()
        return backend

    def _refresh_state(self, backend: Backend) -> None:
        """State from the operator's drain, the agent's health and the age of its reports."""
        extras = self.extras.setdefault(backend.name, BackendExtras())
        before = backend.state
        if extras.drained:
            backend.state = BackendState.DRAINING
        elif not extras.registered:
            # a fabric-file backend without an agent keeps its configured state unless reported
            if extras.healthy is False or self._stale(backend):
                backend.state = BackendState.DOWN
            elif extras.healthy and before != BackendState.ACTIVE:
                backend.state = BackendState.ACTIVE
        elif extras.healthy is False or self._stale(backend):
            backend.state = BackendState.DOWN
        else:
            backend.state = BackendState.ACTIVE
        if backend.state != before:
            log.info("backend %s: %s -> %s", backend.name, before, backend.state)

    def _stale(self, backend: Backend) -> bool:
        last = backend.load.last_report
        if last is None:
            return False  # never reported: registered just now, or a static backend
        return self.clock() - last > self.report_timeout_s

    def refresh_states(self) -> None:
        for backend in list(self.model.backends.values()):
            self._refresh_state(backend)

    # ------------------------------------------------------------ services

    def set_mode(self, service: str, mode: str, who: Principal) -> None:
        s = self.model.services.get(service)
        if s is None:
            raise NotFound(f"no service '{service}'")
        before = s.mode
        s.mode = SelectionMode(mode)
        self.audit(who, "set-mode", f"service {service}", f"{before} -> {s.mode}")
        self.mark_dirty()

    # ------------------------------------------------------------ policy

    def parse_policy(self, text: str, filename: str) -> Policy:
        """Validate a policy file's text against the model; SpecError lists every problem."""
        # the previous policy keeps tenant ids stable across reloads
        return parse_policy(text, filename, model=self.model, previous=self.model.policy)

    def validate_policy(self, text: str, filename: str) -> list[str]:
        try:
            self.parse_policy(text, filename)
        except SpecError as exc:
            return list(exc.errors)
        return []

    async def apply_policy(self, text: str, filename: str, who: Principal) -> dict[str, Any]:
        """Validate, then swap the policy in and push it; a bad file changes nothing."""
        try:
            policy = self.parse_policy(text, filename)
        except SpecError as exc:
            self.policy_applies["invalid"] += 1
            raise Invalid(f"{filename}: {len(exc.errors)} error(s); the running policy is "
                          "unchanged", list(exc.errors)) from None
        async with self._lock:
            previous = self.model.policy
            self.model.policy = policy
            try:
                result = await self.push(rollback_to=previous)
            except Exception:
                self.model.policy = previous
                self.policy_applies["failed"] += 1
                raise
        self.policy_applies["applied"] += 1
        self.audit(who, "apply-policy", filename,
                   f"{len(policy.tenants)} tenants, {len(policy.contracts)} contracts")
        return {"applied": True, "tenants": len(policy.tenants),
                "contracts": len(policy.contracts), **result}

    async def reload_policy(self, who: Principal) -> dict[str, Any]:
        if self.policy_path is None:
            raise Invalid("the controller was started without a policy file")
        try:
            text = self.policy_path.read_text()
        except OSError as exc:
            raise Invalid(f"{self.policy_path}: cannot read: {exc.strerror}") from exc
        return await self.apply_policy(text, self.policy_path.name, who)

    def grants(self) -> list[dict[str, Any]]:
        """The tenants an agent needs to attribute usage: id, prefixes, tokens/s."""
        out = []
        for t in sorted(self.model.policy.tenants.values(), key=lambda t: t.tenant_id):
            contract = self.model.policy.contracts.get(t.contract)
            tps = contract.limits.tpm / 60.0 if contract else 0.0
            out.append({"tenant_id": t.tenant_id, "name": t.name, "prefixes": list(t.prefixes),
                        "tokens_per_s": round(tps, 6)})
        return out

    # ------------------------------------------------------------ switches

    def switch_views(self) -> list[dict[str, Any]]:
        out = []
        for sw in self.model.fabric.switches.values():
            status: dict[str, Any] = {}
            if self.southbound is not None:
                status = dict(self.southbound.status(sw.name))
            connected = bool(status.get("connected", False))
            out.append({"name": sw.name, "address": sw.address, "device_id": sw.device_id,
                        "connected": connected,
                        "status": status.get("status", "connected" if connected
                                             else "not connected"),
                        "primary": status.get("primary"),
                        "details": {k: v for k, v in status.items()
                                    if k not in ("connected", "status", "primary")}})
        return out

    async def read_counters(self) -> dict[str, dict[str, Any]]:
        """Per switch: {"connected", "error", "tenants": {tenant_id: (bytes, packets)}}."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.model.fabric.switches:
            entry: dict[str, Any] = {"connected": False, "error": None, "tenants": {}}
            if self.southbound is None:
                entry["error"] = "not connected: no southbound in this controller"
            else:
                try:
                    entry["tenants"] = await self.southbound.read_tenant_counters(name)
                    entry["connected"] = True
                except Exception as exc:
                    entry["error"] = f"{type(exc).__name__}: {exc}"
            out[name] = entry
        return out

    async def sample_counters(self) -> None:
        for name, entry in (await self.read_counters()).items():
            if entry["connected"] and entry["tenants"]:
                await asyncio.to_thread(self.ledger.record_counters, name, entry["tenants"])

    # ------------------------------------------------------------ reconcile

    async def push(self, rollback_to: Policy | None = None) -> dict[str, Any]:
        """Hand the model to the southbound; without one, nothing to write."""
        if self.southbound is None:
            return {"changed": {}, "switches": {s: "not connected"
                                                for s in self.model.fabric.switches}}
        return await self.southbound.apply_model(self.model, rollback_to=rollback_to)

    async def reconcile_once(self) -> None:
        self.refresh_states()
        try:
            await self.push()
            self.last_reconcile_error = None
        except Exception as exc:  # the next pass retries; the API shows the error
            self.last_reconcile_error = f"{type(exc).__name__}: {exc}"
            log.warning("reconcile failed: %s", self.last_reconcile_error)
        self.reconciles += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile on every change and at least every RECONCILE_INTERVAL_S until `stop`."""
        self._dirty = asyncio.Event()
        next_counters = self.clock()
        while not stop.is_set():
            self._dirty.clear()
            async with self._lock:
                await self.reconcile_once()
            if self.clock() >= next_counters:
                next_counters = self.clock() + COUNTER_INTERVAL_S
                try:
                    await self.sample_counters()
                except Exception as exc:
                    log.warning("counter sampling failed: %s", exc)
            waiters = [asyncio.ensure_future(self._dirty.wait()),
                       asyncio.ensure_future(stop.wait())]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait(waiters, timeout=RECONCILE_INTERVAL_S,
                                   return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()


# ---------------------------------------------------------------- process


def build_controller(fabric: str | Path, policy: str | Path | None = None,
                     tokens: str | Path | None = None, ledger: str | Path = "ledger.db",
                     election_id: int = 1, report_timeout_s: float = REPORT_TIMEOUT_S,
                     ) -> Controller:
    """Load every input file (SpecError/TokenFileError name file and line) and wire the parts."""
    model = fabric_file.load_fabric(fabric)
    if policy is not None:
        model.policy = load_policy(policy, model=model)
    store = TokenStore.from_file(tokens) if tokens else TokenStore.disabled()
    if not store.enabled:
        log.warning("no token file: the REST API accepts every request as admin")
    southbound = make_southbound(model, election_id)
    return Controller(model, Ledger(ledger), store, policy_path=policy, southbound=southbound,
                      report_timeout_s=report_timeout_s)


def make_southbound(model: Model, election_id: int) -> Any:
    """The P4Runtime southbound, or None (switches shown "not connected") where it is absent."""
    try:
        from controller import southbound  # noqa: F401
    except ImportError as exc:
        log.warning("no P4Runtime southbound (%s): switches are reported as not connected", exc)
        return None
    return None


async def serve(ctl: Controller, host: str, port: int) -> None:
    """The REST API and the reconciler in one event loop, until SIGINT/SIGTERM."""
    import uvicorn

    from controller.api.server import create_app

    app = create_app(ctl)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="off")
    server = uvicorn.Server(config)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so that the previous
    # handler runs; make that a no-op, so that the ledger and southbound close below.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    stop = asyncio.Event()
    reconciler = asyncio.create_task(ctl.run(stop))
    try:
        await server.serve()
    finally:
        stop.set()
        await reconciler
        if ctl.southbound is not None and hasattr(ctl.southbound, "close"):
            await ctl.southbound.close()
        ctl.ledger.close()
    if not server.started:
        raise OSError(f"cannot listen on {host}:{port}")
