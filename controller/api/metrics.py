"""The controller's own Prometheus metrics, served at /metrics.

Counters of what happened (HTTP requests, reports, tokens) are updated as it
happens; gauges of the model (backend load, state, weights, switch connections)
are computed at scrape time from the model, so they can never disagree with it.
One registry per app, so that several controllers in one test process don't clash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from tokenfabric.controller.app import Controller
    from tokenfabric.controller.ledger import Usage
    from tokenfabric.wire import BackendReport

NS = "tokenfabric_controller"
OTHER = "other"  # the one label value for everything outside the policy and the fabric
MAX_LABEL_VALUES = 1024  # per label, even of known values: a scrape stays small and fast
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class LabelSet:
    """A label's values: those `known()` allows, at most MAX_LABEL_VALUES of them;
    anything else is OTHER. A client never adds a label value of its own choosing."""

    def __init__(self, known: Callable[[str], bool]) -> None:
        self.known = known
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= MAX_LABEL_VALUES or not self.known(value):
            return OTHER
        self.seen.add(value)
        return value


class ModelCollector:
    """Gauges read from the model at scrape time."""

    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl

    def collect(self) -> Iterator[Metric]:
        ctl = self.ctl
        running = GaugeMetricFamily(f"{NS}_backend_running", "Requests running (last report)",
                                    labels=["backend"])
        waiting = GaugeMetricFamily(f"{NS}_backend_waiting", "Requests waiting (last report)",
                                    labels=["backend"])
        kv = GaugeMetricFamily(f"{NS}_backend_kv_cache_usage", "KV-cache use 0..1",
                               labels=["backend"])
        weight = GaugeMetricFamily(f"{NS}_backend_weight", "Selector weight last written",
                                   labels=["backend"])
        state = GaugeMetricFamily(f"{NS}_backend_state", "1 for the backend's current state",
                                  labels=["backend", "state"])
        for b in list(ctl.model.backends.values()):
            running.add_metric([b.name], b.load.running)
            waiting.add_metric([b.name], b.load.waiting)
            kv.add_metric([b.name], b.load.kv_cache_usage)
            weight.add_metric([b.name], b.weight)
            state.add_metric([b.name, str(b.state)], 1)
        connected = GaugeMetricFamily(f"{NS}_switch_connected", "1 when the switch is connected",
                                      labels=["switch"])
        for view in ctl.switch_views():
            connected.add_metric([view["name"]], 1 if view["connected"] else 0)
        tenants = GaugeMetricFamily(f"{NS}_policy_tenants", "Tenants in the running policy")
        tenants.add_metric([], len(ctl.model.policy.tenants))
        reconciles = GaugeMetricFamily(f"{NS}_reconcile_passes", "Reconcile passes so far")
        reconciles.add_metric([], ctl.reconciles)
        applies = GaugeMetricFamily(f"{NS}_policy_applies", "Policy applies by result",
                                    labels=["result"])
        for result in ("applied", "invalid", "failed"):
            applies.add_metric([result], ctl.policy_applies[result])
        refused = CounterMetricFamily(f"{NS}_usage_refused", "Reports refused (identity, "
                                      "signature, tenant, bound, backwards, replay, fork) and "
                                      "replayed records ignored, by kind", labels=["kind"])
        for kind, n in sorted(ctl.refusals.items()):
            refused.add_metric([kind], n)
        gaps = CounterMetricFamily(f"{NS}_usage_gaps", "Holes in agents' record sequences")
        gaps.add_metric([], ctl.usage_gaps)
        suspect = GaugeMetricFamily(
            f"{NS}_billing_suspect", "1: the backend's billed tokens did not fit in the "
            "bytes its port sent in the last cross-check window", labels=["backend"])
        for check in ctl.billing_checks:
            for name in check.backends:
                if check.fits is not None:
                    suspect.add_metric([name], 0 if check.fits else 1)
        flagged = CounterMetricFamily(f"{NS}_billing_flagged_windows",
                                      "Cross-check windows that flagged the backend",
                                      labels=["backend"])
        for name, n in sorted(ctl.crosscheck.flags.items()):
            flagged.add_metric([name], n)
        yield refused
        yield gaps
        yield suspect
        yield flagged
        yield from (running, waiting, kv, weight, state, connected, tenants, reconciles,
                    applies)


class ApiMetrics:
    def __init__(self, ctl: Controller) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{NS}_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(f"{NS}_http_request_seconds", "HTTP request latency",
                                 ["route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                          0.5, 1, 2.5))
        self.reports = Counter(f"{NS}_reports", "Agent reports received",
                               ["backend", "outcome"], registry=self.registry)
        self.tokens = Counter(f"{NS}_tokens", "Tokens recorded in the ledger",
                              ["tenant_id", "model", "kind"], registry=self.registry)
        self.registry.register(ModelCollector(ctl))
        # Label values come from the model (fabric backends and services, policy tenants),
        # never from what a report says: 2,000 made-up model names are one `other`.
        self.ctl = ctl
        self._tenant_ids: tuple[object, frozenset[str]] = (None, frozenset())
        self.backend_label = LabelSet(lambda name: name in ctl.model.backends)
        self.tenant_label = LabelSet(lambda tenant_id: tenant_id in self._policy_tenant_ids())
        self.model_label = LabelSet(lambda model: model == "" or any(
            s.model == model for s in ctl.model.services.values()))

    def _policy_tenant_ids(self) -> frozenset[str]:
        """The running policy's tenant ids, worked out once per policy (applies replace it)."""
        policy = self.ctl.model.policy
        if self._tenant_ids[0] is not policy:
            self._tenant_ids = (policy, frozenset(str(t.tenant_id)
                                                  for t in policy.tenants.values()))
        return self._tenant_ids[1]

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else OTHER
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def report(self, backend: str, rep: BackendReport, recorded: bool,
               signed: list[Usage] | None = None) -> None:
        """Count a report; `signed`: the usage its signed records added (else `usage`)."""
        self.reports.labels(self.backend_label(backend),
                            "recorded" if recorded else "duplicate").inc()
        if not recorded:
            return
        items = [(u.tenant_id, u.model or "", u.prompt_tokens, u.completion_tokens)
                 for u in (signed if signed is not None else rep.usage_items())]
        for tenant_id, model, prompt, completion in items:
            tenant = self.tenant_label(str(tenant_id))
            label = self.model_label(model)
            self.tokens.labels(tenant, label, "prompt").inc(prompt)
            self.tokens.labels(tenant, label, "completion").inc(completion)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
