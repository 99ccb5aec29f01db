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
import functools
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenfabric.bucket import Contract
from tokenfabric.controller import affinity, gctools, identity
from tokenfabric.controller import fabric as fabric_file
from tokenfabric.controller.api.errors import (
    ApiError,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    SwitchFailed,
    Unavailable,
)
from tokenfabric.controller.applier import ApplyReport, apply_states
from tokenfabric.controller.auth import Principal, Role, TokenStore
from tokenfabric.controller.compile import CompileError, compile_model, state_to_list
from tokenfabric.controller.crosscheck import BackendCheck, CheckSettings, check_ports
from tokenfabric.controller.drivers import (
    Fleet,
    Southbound,
    StateTaker,
    SwitchDriver,
    features_of,
    openflow_context,
)
from tokenfabric.controller.entries import DesiredState
from tokenfabric.controller.ledger import Ledger, SignedOutcome, Usage, UsageRefused
from tokenfabric.controller.model import Backend, BackendState, Model, Tenant
from tokenfabric.controller.openflow.budget import TenantBuckets
from tokenfabric.controller.policy import reload
from tokenfabric.controller.policy.offload import PolicyProcess
from tokenfabric.controller.policy.schema import load_policy
from tokenfabric.controller.prefix_index import PrefixIndex
from tokenfabric.controller.routing import Router
from tokenfabric.wire import BackendRegistration, BackendReport

log = logging.getLogger(__name__)


REPORT_TIMEOUT_S = 3.0  # a backend whose reports stop for this long is marked down
RECONCILE_INTERVAL_S = 1.0  # a pass at least this often, even when nothing changed
COUNTER_INTERVAL_S = 10.0  # how often switch counters are sampled into the ledger
MAX_BACKEND_ID = fabric_file.MAX_BACKEND_ID
TENANT_BYTES_COUNTER = "tenant_traffic"  # per tenant: packets and bytes (p4src count.p4)
TENANT_CONNS_COUNTER = "tenant_admitted"  # per tenant: connections admitted
CONTROLLER = Principal("controller", Role.ADMIN)  # who the audit names for its own findings


class PushFailed(RuntimeError):
    """A reconcile pass's write failed on a switch; every switch was given its previous
    state back (or the report names the ones whose rollback failed)."""

    def __init__(self, report: ApplyReport) -> None:
        self.report = report
        rolled = ", ".join(report.rolled_back) or "none"
        super().__init__(f"{report.error}; rolled back: {rolled}"
                         + (f"; rollback failed on {', '.join(report.rollback_errors)}"
                            if report.rollback_errors else ""))


@dataclass
class AuditEntry:
    ts: float
    who: str
    role: str
    action: str
    target: str
    detail: str = ""


@dataclass
class ReportResult:
    """What a report did: usage recorded (False: a retry of a recorded report)."""

    recorded: bool
    usage: list[Usage] = field(default_factory=list)  # what this report added
    signed: SignedOutcome | None = None


@dataclass
class BackendExtras:
    """What the controller keeps about a backend beyond the shared model."""

    registered: bool = False  # by an agent (True) or from the fabric file (False)
    drained: bool = False  # by an operator; survives health changes
    healthy: bool | None = None  # last report's health flag
    metrics: dict[str, Any] = field(default_factory=dict)
    rdma: Any = None


class Controller:
    """The model plus everything that changes it; the REST API calls these methods.

    Routing decisions (weights, drain, staleness, mode) are the Router's
    (controller/routing.py); entries are compile_model's (controller/compile/);
    writing them is the southbound's (controller/southbound/), which is None when the
    controller runs without switches: they are then shown as "not connected".
    """

    def __init__(self, model: Model, ledger: Ledger, tokens: TokenStore | None = None,
                 policy_path: str | Path | None = None,
                 southbound: Southbound | None = None,
                 report_timeout_s: float = REPORT_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic,
                 counters: tuple[str, str] = (TENANT_BYTES_COUNTER, TENANT_CONNS_COUNTER),
                 startup_grace_s: float = 0.0,
                 max_tokens_per_s: int = identity.MAX_TOKENS_PER_S) -> None:
        self.model = model
        self.max_tokens_per_s = max_tokens_per_s  # bounds what one report may bill
        self.counter_names = counters  # P4 counters: per-tenant traffic, per-tenant conns
        self.ledger = ledger
        self.tokens = tokens or TokenStore.disabled()
        self.policy_path = Path(policy_path) if policy_path else None
        self.southbound = southbound
        self.clock = clock
        # stale after 3 missed reports, at whatever interval gives the requested timeout
        self.router = Router(model, report_interval=report_timeout_s / 3, stale_after=3,
                             clock=clock)
        self.extras: dict[str, BackendExtras] = {
            n: BackendExtras(drained=b.state == BackendState.DRAINING)
            for n, b in model.backends.items()}
        self.audit_log: collections.deque[AuditEntry] = collections.deque(maxlen=1000)
        self.reconciles = 0
        self.last_reconcile_error: str | None = None
        self.policy_applies = collections.Counter[str]()
        self.pushed: dict[str, DesiredState] = {}  # what the switches were last given
        # After a restart the switches keep what they hold until the agents had time to
        # register and report again: pushing the fresh model at once would flap backends.
        self.hold_until = clock() + startup_grace_s
        # Token buckets for switches that cannot keep them (OpenFlow): fed by reports.
        self.buckets = TenantBuckets(clock)
        self.prefix_index = PrefixIndex(clock=clock)  # fed by the agents' KV events
        self._usage_totals: dict[tuple[str, int, str], int] = {}
        self._last_usage_at: dict[str, float] = {}  # backend -> clock() of its last report
        self.refusals = collections.Counter[str]()  # usage/identity refusals by kind
        self.usage_gaps = 0  # holes in agents' record sequences (accepted, flagged)
        self.crosscheck = CheckSettings()  # billed tokens against the bytes backends sent
        self.counter_interval_s = COUNTER_INTERVAL_S
        self.billing_checks: list[BackendCheck] = []  # the last periodic check's verdicts
        self._dirty: asyncio.Event | None = None
        self._lock = asyncio.Lock()  # one push at a time: a policy apply is multi-step
        self.replica: Any = None  # controller/replica.py: None is the only controller
        # drains an earlier leader kept for backends this replica does not know yet
        self._restored_drains: dict[str, bool] = {}
        self.policy_process = PolicyProcess()  # parses policies off the event loop

    @property
    def leads(self) -> bool:
        """This replica does the fabric-wide work (pushes, counters, cross-check)."""
        return self.replica is None or self.replica.is_primary

    @property
    def report_timeout_s(self) -> float:
        return self.router.stale_seconds

    @report_timeout_s.setter
    def report_timeout_s(self, seconds: float) -> None:
        self.router.report_interval = seconds / self.router.stale_after

    # ------------------------------------------------------------ audit

    def audit(self, who: Principal, action: str, target: str, detail: str = "") -> None:
        entry = AuditEntry(time.time(), who.name, who.role.label, action, target, detail)
        self.audit_log.append(entry)
        log.info("audit: %s (%s) %s %s%s", who.name, who.role.label, action, target,
                 f": {detail}" if detail else "")

    def refuse(self, who: Principal, kind: str, target: str, error: ApiError) -> ApiError:
        """Audit a refused request (identity or usage) and hand back the error to raise."""
        self.refusals[kind] += 1
        self.audit(who, f"refused-{kind}", target, error.message)
        return error

    def authorize(self, who: Principal, action: str, backend: str, *hosts: str | None) -> None:
        """403 (audited) unless `who` may speak for `backend` on every one of `hosts`."""
        for host in hosts or (None,):
            if not identity.may_speak_for(who, backend, host):
                raise self.refuse(who, "identity", f"backend {backend}", Forbidden(
                    f"'{who.name}' may not {action} backend '{backend}'"
                    + (f" on host '{host}'" if host else "")
                    + " (the tokens file binds its token to other backends)"))

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
        """Add (or, for the same name, refresh) an agent's backend; it keeps its id."""
        old = self.model.backends.get(reg.name)
        self.authorize(who, "register", reg.name, reg.host, *([old.host] if old else []))
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
        backend_id = old.backend_id if old else self._allocate_backend_id(reg.name)
        if old is not None:
            fabric_file.remove_backend(self.model, reg.name)
        backend = Backend(name=reg.name, backend_id=backend_id, host=reg.host,
                          address=reg.address, mac=reg.mac.lower(), switch=reg.switch,
                          port=reg.port, capacity=reg.capacity, models=list(reg.models))
        if old is not None:
            backend.load, backend.weight, backend.state = old.load, old.weight, old.state
        fabric_file.add_backend(self.model, backend)
        kept = extras if extras is not None else BackendExtras()
        kept.registered = True
        self.extras[reg.name] = kept
        self._last_usage_at.setdefault(reg.name, self.clock())
        if old is None and self._restored_drains.pop(reg.name, False):
            self._drain(reg.name, True)  # drained at an earlier leader, new here
        self.router.tick()
        self.audit(who, "register" if old is None else "re-register", f"backend {reg.name}",
                   f"id {backend_id}, {reg.address} on {reg.switch}:{reg.port}, "
                   f"capacity {reg.capacity}, service {service}")
        self.mark_dirty()
        return backend

    def _allocate_backend_id(self, name: str) -> int:
        """The id this name had before (also before a restart, or on another replica),
        else the lowest id no backend and no other remembered name holds: chosen in the
        ledger's database, so that replicas on one PostgreSQL agree (docs/replicas.md)."""
        taken = {b.backend_id for b in self.model.backends.values()}
        taken |= {s.overflow.backend_id for s in self.model.services.values()
                  if s.overflow is not None}
        backend_id = self.ledger.allocate_backend_id(name, taken, MAX_BACKEND_ID)
        if backend_id is None:
            raise Conflict(f"no free backend id (all of 1..{MAX_BACKEND_ID} are taken)")
        return backend_id

    def deregister_backend(self, name: str, who: Principal) -> None:
        self.authorize(who, "deregister", name, self.backend(name).host)
        if not self.extras[name].registered:
            raise Conflict(f"backend '{name}' is defined in the fabric file; drain it instead")
        fabric_file.remove_backend(self.model, name)
        self.router.forget(name)
        self.prefix_index.forget(name)
        self.model.affinity.forget_backend(name)
        del self.extras[name]
        self.audit(who, "deregister", f"backend {name}")
        self.mark_dirty()

    async def report(self, name: str, rep: BackendReport, idempotency_key: str | None = None,
                     *, who: Principal) -> ReportResult:
        """Take an agent's report: usage into the ledger (durably, first), load into the model.

        Refused (audited, nothing recorded): a backend `who` may not speak for (403),
        unsigned usage from an agent that has a key (403), a bad signature (403), a
        tenant the policy does not name (422), more tokens than fit in the time since
        the backend's last report (422), totals that go backwards or a replayed or
        forked record (409)."""
        backend = self.backend(name)
        self.authorize(who, "report for", name, backend.host)
        target = f"backend {name}"
        report_id = rep.report_id or idempotency_key
        default_model = backend.models[0] if backend.models else ""
        totals = rep.total_items()
        items = rep.usage_items() if totals is None else totals
        usage = [Usage(u.tenant_id, u.model or default_model, u.prompt_tokens,
                       u.completion_tokens, 1 if u.requests is None else u.requests)
                 for u in items if u.prompt_tokens or u.completion_tokens or u.requests]
        signed_items = rep.records or []
        known = [t.tenant_id for t in self.model.policy.tenants.values()]
        unknown = identity.unknown_tenants(
            [u.tenant_id for u in usage] + [r.tenant_id for r in signed_items], known)
        if unknown:
            raise self.refuse(who, "unknown-tenant", target, Invalid(
                f"tenant id(s) {', '.join(map(str, unknown))} are not in the running policy"))
        if who.public_key is not None and usage:
            raise self.refuse(who, "unsigned", target, Forbidden(
                f"'{who.name}' has a public key: its usage must come as signed `records`"))
        last = self._last_usage_at.get(name)
        bound = identity.report_bound(self.max_tokens_per_s,
                                      None if last is None else self.clock() - last)
        signed = None
        try:
            if rep.records is not None:
                try:
                    records = identity.verified_records(who, name, signed_items)
                except ApiError as exc:
                    raise self.refuse(who, "signature", target, exc) from None
                signed = await asyncio.to_thread(self.ledger.record_signed, name, who.name,
                                                 records, max_tokens=bound)
                recorded = signed.added > 0 or not signed.duplicates
                usage = signed.usage
            else:
                events: list[str] = []
                # cumulative totals are idempotent by themselves; plain usage needs the id
                rid = f"{name}/{report_id}" if report_id else None
                if totals is None:
                    recorded = await asyncio.to_thread(
                        self.ledger.record, rid, name, usage, agent=who.name, max_tokens=bound)
                else:
                    recorded = await asyncio.to_thread(
                        self.ledger.record_totals, rid, name, usage, agent=who.name,
                        epoch=rep.epoch, max_tokens=bound, events=events)
                for event in events:
                    self.audit(who, "usage-reset", target, event)
        except ApiError:
            raise
        except UsageRefused as exc:
            error = Invalid(exc.message) if exc.kind == "too_large" else Conflict(exc.message)
            raise self.refuse(who, exc.kind, target, error) from None
        except Exception as exc:  # sqlite3 errors: disk full, I/O error
            log.error("ledger: cannot record a report of %s: %s", name, exc)
            raise Unavailable(f"ledger cannot record the report ({exc}); retry") from exc
        self._last_usage_at[name] = self.clock()
        if signed is not None:
            self._audit_signed(who, target, signed)
        if recorded:
            self._debit_buckets(name, usage, cumulative=totals is not None and signed is None)
        result = ReportResult(recorded, usage if recorded else [], signed)
        if self.model.backends.get(name) is not backend:
            return result  # deregistered while the ledger wrote: the usage still counts
        extras = self.extras[name]
        extras.healthy = rep.healthy
        extras.metrics = rep.metrics or {}
        extras.rdma = rep.rdma
        if self.router.on_report(name, running=rep.running, waiting=rep.waiting,
                                 kv_cache_usage=rep.kv_cache_usage, healthy=rep.healthy,
                                 service_s=rep.service_s):
            self.mark_dirty()
        return result

    def _audit_signed(self, who: Principal, target: str, outcome: SignedOutcome) -> None:
        if outcome.new_epoch is not None and outcome.previous_epoch is not None:
            self.audit(who, "usage-reset", target, f"new epoch {outcome.new_epoch} after "
                       f"{outcome.previous_epoch}: its sequence restarts")
        if outcome.gaps:
            self.usage_gaps += len(outcome.gaps)
            self.audit(who, "usage-gap", target, f"records {', '.join(outcome.gaps)} never "
                       "arrived; the records after them were recorded and flagged")
        if outcome.duplicates:
            self.refusals["replay-ignored"] += outcome.duplicates
            self.audit(who, "replay-ignored", target, f"{outcome.duplicates} record(s) "
                       "recorded before (same signature) were not counted again")

    def _debit_buckets(self, backend: str, usage: list[Usage], cumulative: bool) -> None:
        """A report's tokens out of the tenants' buckets (cumulative reports: the growth)."""
        for u in usage:
            tokens = u.prompt_tokens + u.completion_tokens
            if cumulative:
                key = (backend, u.tenant_id, u.model)
                before = self._usage_totals.get(key, 0)
                self._usage_totals[key] = max(before, tokens)
                tokens = max(0, tokens - before)
            self.buckets.debit(u.tenant_id, tokens)

    async def enforce_budgets(self) -> set[int]:
        """Tell switches without in-switch token buckets which tenants are over budget."""
        takers = [sw for sw in (self.southbound.switches.values() if self.southbound else ())
                  if not sw.keeps_token_buckets]
        if not takers:
            return set()
        contracts = {}
        for t in self.model.policy.tenants.values():
            c = self.model.policy.contracts.get(t.contract)
            if c is not None:
                contracts[t.tenant_id] = Contract.of_tpm(c.limits.tpm, c.limits.burst)
        self.buckets.configure(contracts)
        over = self.buckets.over_budget()
        for sw in takers:
            await sw.set_over_budget(frozenset(over))
        return over

    async def set_drained(self, name: str, drained: bool, who: Principal) -> Backend:
        backend = self.backend(name)
        self._drain(name, drained)
        self.audit(who, "drain" if drained else "undrain", f"backend {name}")
        self.mark_dirty()
        await asyncio.to_thread(self._share, "drain", name, "1" if drained else "0", who.name)
        return backend

    def _drain(self, name: str, drained: bool) -> None:
        self.extras[name].drained = drained
        if drained:
            self.router.drain(name)
        else:
            self.router.undrain(name)

    def _share(self, kind: str, target: str, value: str, detail: str) -> None:
        """Keep an operator's change in the ledger's database, for the replica that
        leads next (docs/replicas.md); a single controller (replica None) keeps none."""
        if self.replica is None:
            return
        try:
            self.ledger.keep_operator_state(kind, target, value, detail)
        except Exception as exc:  # database down: applied here, not shared; say so
            log.error("operator state %s %s not shared with the replicas: %s", kind, target,
                      exc)
            raise Unavailable(f"applied on this replica but not kept for the others "
                              f"({exc}); retry") from exc

    async def restore_operator_state(self) -> None:
        """Apply what operators changed at earlier leaders (kept by _share): the policy
        applied over REST, services' modes, drains. A replica taking the lead calls this
        before it says it leads, so before its first push (controller/replica.py)."""
        rows = await asyncio.to_thread(self.ledger.operator_state)
        for kind, _target, value, detail in rows:
            if kind == "policy":
                await self._restore_policy(value, detail or "policy.yaml")
        for kind, target, value, _ in rows:
            try:
                if kind == "mode" and target in self.model.services:
                    self.router.set_mode(target, value)
                elif kind == "drain" and target in self.model.backends:
                    self._drain(target, value == "1")
                elif kind == "drain":  # applied when it registers here
                    self._restored_drains[target] = value == "1"
                elif kind != "policy":
                    log.warning("operator state: %s of %s: not in this model; skipped",
                                kind, target)
                    continue
            except (KeyError, ValueError) as exc:  # a mode this version does not know
                log.warning("operator state: %s of %s = %r not applied: %s", kind, target,
                            value, exc)
                continue
            log.info("operator state: %s %s = %s (from the previous leader)", kind, target,
                     value if kind != "policy" else detail)
        self.mark_dirty()

    async def _restore_policy(self, text: str, filename: str) -> None:
        """The policy an earlier leader applied, into the model only: this replica's
        first push gives it to the switches (by difference)."""
        result = await reload.reload_policy(self.model, filename, {}, text=text,
                                            file=filename, run=self._run_policy_work)
        if not result.ok:  # e.g. the fabric file changed since: keep the file's policy
            log.error("operator state: the policy %s applied at an earlier leader does not "
                      "apply here; keeping the policy file's: %s", filename,
                      "; ".join(result.errors))
            return
        gctools.keep()

    def refresh_states(self) -> None:
        """Mark down the backends whose reports stopped (the reconciler calls this)."""
        if self.router.tick():
            self.mark_dirty()

    # ------------------------------------------------------------ services

    async def set_mode(self, service: str, mode: str, who: Principal) -> None:
        s = self.model.services.get(service)
        if s is None:
            raise NotFound(f"no service '{service}'")
        before = s.mode
        self.router.set_mode(service, mode)
        self.audit(who, "set-mode", f"service {service}", f"{before} -> {s.mode}")
        self.mark_dirty()
        await asyncio.to_thread(self._share, "mode", service, str(s.mode), who.name)

    # ------------------------------------------------------------ policy

    async def validate_policy(self, text: str, filename: str) -> list[str]:
        """Every problem of a policy text (parsed, checked against the model, compiled),
        worked out in the policy process."""
        return await self._run_policy_work(reload.check_policy_text, self.model, text,
                                           filename)

    async def _run_policy_work(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self.policy_process.run(fn, *args)
        except BrokenProcessPool as exc:
            raise Unavailable("the policy worker process died; retry") from exc

    async def apply_policy(self, text: str, filename: str, who: Principal) -> dict[str, Any]:
        """Validate, diff, apply to every switch; a bad file or a failed apply changes nothing."""
        async with self._lock:
            result = await reload.reload_policy(self.model, filename, self._switches(),
                                                self.pushed, text=text, file=filename,
                                                run=self._run_policy_work)
            if result.ok:
                self.pushed = {k: DesiredState(dict(v.entities))
                               for k, v in (result.states or {}).items()}
        if not result.ok:
            if result.apply is None:
                self.policy_applies["invalid"] += 1
                raise Invalid(f"{filename}: {len(result.errors)} error(s); the running policy "
                              "is unchanged", list(result.errors))
            self.policy_applies["failed"] += 1
            self.audit(who, "apply-policy-failed", filename, "; ".join(result.errors))
            raise SwitchFailed("applying the policy failed on "
                              f"{result.apply.failed_switch}; every switch was rolled back "
                              "and the running policy is unchanged", [result.summary()])
        policy = self.model.policy
        gctools.keep()  # the new policy and its entries: out of every later GC pass
        self.policy_applies["applied"] += 1
        await asyncio.to_thread(self._share, "policy", "", text, filename)
        changes = result.apply.changes if result.apply else {}
        self.audit(who, "apply-policy", filename,
                   f"{len(policy.tenants)} tenants, {len(policy.contracts)} contracts, "
                   f"changes {changes}")
        return {"applied": True, "tenants": len(policy.tenants),
                "contracts": len(policy.contracts),
                "changed": {k: sum(v) for k, v in changes.items()},
                "switches": {v["name"]: v["status"] for v in self.switch_views()}}

    async def reload_policy(self, who: Principal) -> dict[str, Any]:
        if self.policy_path is None:
            raise Invalid("the controller was started without a policy file")
        try:
            text = self.policy_path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise Invalid(f"{self.policy_path}: cannot read: "
                          f"{getattr(exc, 'strerror', None) or exc}") from exc
        return await self.apply_policy(text, self.policy_path.name, who)

    def grants(self) -> list[dict[str, Any]]:
        """The tenants an agent needs: id, prefixes, tokens/s and request priority."""
        out = []
        for t in sorted(self.model.policy.tenants.values(), key=lambda t: t.tenant_id):
            contract = self.model.policy.contracts.get(t.contract)
            tps = contract.limits.tpm / 60.0 if contract else 0.0
            out.append({"tenant_id": t.tenant_id, "name": t.name, "prefixes": list(t.prefixes),
                        "tokens_per_s": round(tps, 6),
                        "request_priority": contract.request_priority if contract else 0,
                        "prefix_affinity": self._handoff_opt_in(t)})
        return out

    def _handoff_opt_in(self, tenant: Tenant) -> bool:
        """Whether the bridges may hand this tenant's requests to a peer holding their
        prefix: the same opt-in as the switch's affinity, for any service."""
        policy = self.model.policy
        return any(affinity.resolve(policy, service, tenant) is not None
                   for service in self.model.services)

    def roce_for_agents(self) -> dict[str, Any]:
        """The host side of the fabric's RoCE class (the agent configures its NIC with it)."""
        r = self.model.policy.roce
        if not r.enabled:
            return {}
        return {"dscp": r.dscp, "priority": r.priority, "cnp_dscp": r.cnp_dscp,
                "cnp_priority": r.cnp_priority, "ecn": True, "pfc": r.pfc}

    # ------------------------------------------------------------ switches

    def switch_views(self) -> list[dict[str, Any]]:
        out = []
        for sw in self.model.fabric.switches.values():
            status: dict[str, Any] = {}
            if self.southbound is not None and sw.name in self.southbound.switches:
                status = dict(self.southbound[sw.name].status())
            role = status.get("role", "disconnected")
            connected = role in ("primary", "backup")
            text = {"primary": "connected (primary)",
                    "backup": "connected (backup: another controller is primary)"}.get(
                        role, "not connected")
            details = {k: v for k, v in status.items()
                       if k not in ("name", "address", "device_id", "role")}
            details.pop("driver", None)
            features = details.pop("features", None) or features_of(sw.driver)
            out.append({"name": sw.name, "address": sw.address, "device_id": sw.device_id,
                        "driver": sw.driver, "features": features,
                        "connected": connected, "status": text,
                        "primary": None if not connected else role == "primary",
                        "details": details})
        return out

    def entries_of(self, switch: str) -> list[dict[str, Any]]:
        state = self.pushed.get(switch)
        if state is None:
            try:
                state = compile_model(self.model).get(switch, DesiredState())
            except CompileError as exc:
                raise Conflict(f"the model does not compile: {exc}") from None
        return state_to_list(state)

    async def read_counters(self) -> dict[str, dict[str, Any]]:
        """Per switch: {"connected", "error", "tenants": {tenant_id: (bytes, packets, conns)}}."""
        out: dict[str, dict[str, Any]] = {}
        tenant_ids = sorted(t.tenant_id for t in self.model.policy.tenants.values())
        for name in self.model.fabric.switches:
            entry: dict[str, Any] = {"connected": False, "error": None, "tenants": {}}
            out[name] = entry
            switch = None
            if self.southbound is not None and name in self.southbound.switches:
                switch = self.southbound[name]
            if switch is None or switch.role.value == "disconnected":
                entry["error"] = "not connected"
                continue
            entry["connected"] = True
            try:
                # only the policy's tenants' cells: a whole array is 4096 entities that
                # the pure-Python protobuf decodes on this loop, which also serves the
                # REST API (the bridges' 50 ms prefix lookups timed out behind it)
                traffic = await switch.read_counters(self.counter_names[0], cells=tenant_ids)
                admitted = await switch.read_counters(self.counter_names[1], cells=tenant_ids)
            except Exception as exc:  # a read can fail mid-session; say so, don't raise
                entry["error"] = f"{type(exc).__name__}: {exc}"
                continue
            for t in tenant_ids:
                tv, av = traffic.get(t), admitted.get(t)
                entry["tenants"][t] = (tv.bytes if tv else 0, tv.packets if tv else 0,
                                       av.packets if av else 0)
        return out

    async def sample_counters(self) -> None:
        for name, entry in (await self.read_counters()).items():
            if entry["connected"] and entry["tenants"]:
                await asyncio.to_thread(self.ledger.record_counters, name, entry["tenants"])
        for name, switch in (self.southbound.switches.items() if self.southbound else ()):
            if switch.role.value == "disconnected":  # both drivers count a backend's bytes
                continue
            try:
                ports = await switch.read_port_bytes()
            except Exception as exc:  # a read can fail mid-session; the next one retries
                log.warning("port counters of %s: %s", name, exc)
                continue
            await asyncio.to_thread(self.ledger.record_port_bytes, name, ports)

    def port_checked_backends(self) -> dict[str, tuple[str, int]]:
        """backend -> (switch, port), for backends on a switch of the fabric: both drivers
        count the bytes a backend's port sent (OpenFlow port statistics; the P4
        program's reply_bytes), each switch's read_port_bytes()."""
        return {b.name: (b.switch, b.port) for b in self.model.backends.values()
                if b.switch in self.model.fabric.switches}

    async def check_billing(self, since: float | None = None,
                            until: float | None = None) -> list[BackendCheck]:
        """Billed completion tokens per backend port against the bytes the port received
        (controller/crosscheck.py). The default window is the window_s that ended a
        settle time ago: the port samples that counted its bytes have come in by now.
        Bytes count from lag_s before the window to settle after it."""
        settle = self.crosscheck.settle_s(self.counter_interval_s)
        until = time.time() - settle if until is None else until
        since = until - self.crosscheck.window_s if since is None else since
        billed = await asyncio.to_thread(self.ledger.billed_by_backend, since, until)
        growth = await asyncio.to_thread(self.ledger.port_growth,
                                         since - self.crosscheck.lag_s, until + settle)
        return check_ports(billed, self.port_checked_backends(), growth, since, until,
                           self.crosscheck.min_bytes_per_token)

    async def periodic_billing_check(self) -> list[BackendCheck]:
        """The check the run loop makes every interval: flags logged, audited, counted."""
        checks = await self.check_billing()
        self.billing_checks = checks
        self.crosscheck.checks += 1
        for c in checks:
            if c.fits is not None and c.completion_tokens:  # a verdict on some billing
                for b in c.backends:
                    self.crosscheck.verdicts[b] = self.crosscheck.verdicts.get(b, 0) + 1
            if c.fits is False:
                for b in c.backends:
                    self.crosscheck.flags[b] = self.crosscheck.flags.get(b, 0) + 1
                    self.crosscheck.first_flagged.setdefault(b, time.time())
                log.warning("crosscheck: billing does not fit the bytes sent: %s", c.detail)
                self.audit(CONTROLLER, "billing-flagged", f"port {c.switch}:{c.port}", c.detail)
        return checks

    # ------------------------------------------------------------ reconcile

    def _switches(self) -> dict[str, StateTaker]:
        """The switches the controller writes to (none without a southbound)."""
        return dict(self.southbound.switches) if self.southbound is not None else {}

    def _southbound_switches(self) -> list[SwitchDriver]:
        return list(self.southbound.switches.values()) if self.southbound is not None else []

    async def push(self) -> dict[str, int]:
        """Compile the model and give each switch its state when it changed.

        The one write path (controller/applier.py): a switch that fails makes every
        switch given a new state in this pass get its previous one back, and the next
        pass retries. The southbound remembers the state per switch and re-pushes it
        after a reconnect or a change of primary by itself; here only changes are
        handed over.
        """
        desired = compile_model(self.model)
        report = await apply_states(self._switches(), self.pushed, desired)
        if not report.ok:
            raise PushFailed(report)
        for name in report.changes:
            self.pushed[name] = desired[name]
        return {name: sum(c) for name, c in report.changes.items()}

    async def reconcile_once(self) -> None:
        self.refresh_states()
        self.model.affinity.sweep(self.clock())  # expired affinity entries leave the switches
        if self.clock() < self.hold_until or not self.leads:
            return
        try:
            changed = await self.push()
            if changed:
                log.debug("reconcile: %s", changed)
            await self.enforce_budgets()
            for sw in self._southbound_switches():  # affinity's bound where no registers hold load
                await sw.recheck_load_bound()
            self.last_reconcile_error = None
        except Exception as exc:  # the next pass retries; the API shows the error
            self.last_reconcile_error = f"{type(exc).__name__}: {exc}"
            log.warning("reconcile failed: %s", self.last_reconcile_error)
        self.reconciles += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile on every change and at least every RECONCILE_INTERVAL_S until `stop`."""
        self._dirty = asyncio.Event()
        next_counters = self.clock()
        next_check = self.clock() + self.crosscheck.interval_s
        while not stop.is_set():
            self._dirty.clear()
            async with self._lock:
                await self.reconcile_once()
            if self.leads and self.clock() >= next_counters:
                next_counters = self.clock() + self.counter_interval_s
                try:
                    await self.sample_counters()
                except Exception as exc:
                    log.warning("counter sampling failed: %s", exc)
            if self.leads and self.clock() >= next_check:
                next_check = self.clock() + self.crosscheck.interval_s
                try:
                    await self.periodic_billing_check()
                except Exception as exc:
                    log.warning("billing cross-check failed: %s", exc)
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
                     openflow_listen: str = "127.0.0.1:6653") -> Controller:
    """Load every input file (SpecError/TokenFileError name file and line) and wire the parts."""
    model = fabric_file.load_fabric(fabric)
    if policy is not None:
        model.policy = load_policy(policy, model=model)
    store = TokenStore.from_file(tokens) if tokens else TokenStore.disabled()
    if not store.enabled:
        log.warning("no token file: the REST API accepts every request as admin")
    southbound = make_southbound(model, election_id, openflow_listen)
    return Controller(model, Ledger(ledger), store, policy_path=policy, southbound=southbound,
                      report_timeout_s=report_timeout_s, startup_grace_s=report_timeout_s)


def make_southbound(model: Model, election_id: int,
                    openflow_listen: str = "127.0.0.1:6653") -> Southbound | None:
    """Every fabric switch behind its driver (controller/drivers.py): P4Runtime clients
    for `driver: p4runtime`, the OpenFlow listener for `driver: openflow`."""
    p4 = [sw for sw in model.fabric.switches.values() if sw.driver != "openflow"]
    of = [sw for sw in model.fabric.switches.values() if sw.driver == "openflow"]
    parts: list[Southbound | None] = []
    if p4:
        parts.append(make_p4runtime_southbound(model, election_id))
    if of:
        parts.append(make_openflow_southbound(model, openflow_listen))
    present = [p for p in parts if p is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else Fleet(*present)


def make_openflow_southbound(model: Model, listen: str) -> Southbound | None:
    """The OpenFlow 1.3 listener (os-ken's message classes) and the fabric's OVS switches."""
    try:
        from tokenfabric.controller.openflow.server import OpenFlowSouthbound
    except ImportError as exc:
        log.warning("no OpenFlow southbound (%s): install tokenfabric[controller]", exc)
        return None
    southbound = OpenFlowSouthbound(listen)
    for sw in model.fabric.switches.values():
        if sw.driver == "openflow" and sw.datapath_id is not None:
            southbound.add_switch(sw.name, sw.datapath_id, device_id=sw.device_id,
                                  context=functools.partial(openflow_context, model, sw.name))
    return southbound


def make_p4runtime_southbound(model: Model, election_id: int) -> Southbound | None:
    """One P4Runtime client per P4 switch, or None where the P4Runtime stack is absent.

    With the compiled program present (p4src/build), a switch that runs another
    program (or none) gets ours; without it, the controller adopts what the switch runs.
    """
    try:
        from tokenfabric.controller.southbound import Pipeline, Southbound
        from tokenfabric.dataplane import TOKEN_ROUTER_JSON, TOKEN_ROUTER_P4INFO
    except ImportError as exc:
        log.warning("no P4Runtime southbound (%s): switches are reported as not connected", exc)
        return None
    pipeline = None
    if TOKEN_ROUTER_P4INFO.is_file() and TOKEN_ROUTER_JSON.is_file():
        pipeline = Pipeline.from_files(TOKEN_ROUTER_P4INFO, TOKEN_ROUTER_JSON)
    else:
        log.warning("no compiled P4 program at %s: adopting what each switch runs",
                    TOKEN_ROUTER_JSON.parent)
    southbound = Southbound(election_id=election_id)
    for sw in model.fabric.switches.values():
        if sw.driver != "openflow":
            southbound.add_switch(sw.name, sw.address, device_id=sw.device_id,
                                  pipeline=pipeline)
    return southbound


def build_server(ctl: Controller, host: str, port: int) -> Any:
    """The uvicorn server of the REST API (not started)."""
    import uvicorn

    from tokenfabric.controller.api.server import create_app

    config = uvicorn.Config(create_app(ctl), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="off", **SERVER_LIMITS)
    return uvicorn.Server(config)


# The HTTP server's own limits (docs/rest.md, "Limits"). h11, not httptools: a strict
# pure-Python parser is fast enough for an admin API of ~1 report per backend per second.
SERVER_LIMITS: dict[str, Any] = {
    "http": "h11",
    "limit_concurrency": 1024,  # connections (agents keep theirs open) or requests: then 503
    "backlog": 256,
    "timeout_keep_alive": 15,  # an idle keep-alive connection closes after this (agents: 1 s)
    "h11_max_incomplete_event_size": 64 * 1024,  # request line and headers: then 400
    "timeout_graceful_shutdown": 5,
}


async def serve(ctl: Controller, host: str, port: int) -> None:
    """The REST API, the reconciler and the southbound in one event loop, until SIGTERM/SIGINT."""
    server = build_server(ctl, host, port)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so that the previous
    # handler runs; make that a no-op, so that the ledger and southbound close below.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    stop = asyncio.Event()
    if ctl.replica is not None:
        await ctl.replica.first_try()  # a leader from the start arbitrates as one at once
    if ctl.southbound is not None:
        await ctl.southbound.start()  # connects in the background, retrying with backoff
    reconciler = asyncio.create_task(ctl.run(stop))
    elector = asyncio.create_task(ctl.replica.run(stop)) if ctl.replica is not None else None
    ctl.policy_process.start()
    gctools.keep()  # modules, fabric, policy: long-lived (controller/gctools.py)
    try:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            raise OSError(f"cannot listen on {host}:{port} (see the error above)") from exc
    finally:
        stop.set()
        await reconciler
        if elector is not None:
            await elector
        if ctl.southbound is not None:
            await ctl.southbound.stop()
        ctl.policy_process.close()
        ctl.ledger.close()
