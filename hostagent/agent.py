"""The host agent: beside one vLLM server, between it and the fabric.

Loops, all in one asyncio event loop:
- scrape vLLM's /metrics every scrape_interval, and its /health every health_interval;
- register with the controller (retrying until it answers), then report every
  report_interval (re-registering when the controller has forgotten the backend);
- send a LOAD beacon every beacon_interval once registered (DOWN flag when /health fails
  or the metrics are older than stale_after), and a USAGE beacon per finished request;
- run the bridge on VIP:port;
- with kv_events_endpoint set, follow vLLM's KV-cache events (hostagent/kv_events.py)
  and send the block set's deltas to the controller's prefix index every
  kv_report_interval (hostagent/kv_blocks.py);
- with handoff set, send the affinity reports the bridge files (a client served here for
  its cached prefix: hostagent/affinity_reports.py) to the controller, for the switch.
On exit (SIGTERM included) it deregisters, stops the bridge and undoes the host set-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokenfabric import usage_signing
from tokenfabric.hostagent import roce
from tokenfabric.hostagent.affinity_reports import AffinityReporter
from tokenfabric.hostagent.beacons import BeaconSender
from tokenfabric.hostagent.bridge import Bridge, BridgeSettings
from tokenfabric.hostagent.config import AgentConfig
from tokenfabric.hostagent.controller_api import ControllerClient, ControllerError, Replicated
from tokenfabric.hostagent.delay import DelayEstimator
from tokenfabric.hostagent.handoff import Handoff, HandoffSettings, LocalLoad
from tokenfabric.hostagent.hostsetup import HostSetup
from tokenfabric.hostagent.kv_blocks import KvBlockSet
from tokenfabric.hostagent.kv_events import KvEventSubscriber, local, subscriber_side
from tokenfabric.hostagent.load import LoadFigures, compute_load, delay_load
from tokenfabric.hostagent.metrics import ScrapeError, VllmSnapshot, healthy, scrape
from tokenfabric.hostagent.prefix_claims import PrefixClaimer
from tokenfabric.hostagent.tenants import UNKNOWN_TENANT_ID, Tenant, TenantTable, TenantUsage
from tokenfabric.hostagent.usage_records import UsageSigner
from tokenfabric.wire import MAX_SERVICE_S, BackendRegistration

log = logging.getLogger(__name__)


KV_KEEPALIVE_S = 1.0  # an unchanged block set is re-confirmed to the index this often


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.backend_id: int | None = None
        self.tenants = TenantTable()
        self.snapshot: VllmSnapshot | None = None
        self.vllm_healthy = False
        self.usage_total: dict[str, TenantUsage] = {}
        self.usage_unreported: dict[str, TenantUsage] = {}
        self.tenant_ids: dict[str, int] = {}
        self.rdma_status: dict = {}
        self.host_status: dict = {}
        self.reports_sent = 0
        self.report_bodies = 0  # report bodies built: their ids' counter
        # This run's epoch: the controller refuses totals that go down within one, and
        # takes a new one as an (audited) restart from zero.
        self.epoch = usage_signing.new_epoch()
        self.models: list[str] = list(config.models)
        self.signer = UsageSigner(usage_signing.load_key_file(config.signing_key),
                                  config.name) if config.signing_key else None
        if self.signer is not None:
            self.epoch = self.signer.epoch
        self.draining = False       # set by the controller's report answer {"draining": true}
        self.registered = asyncio.Event()
        self.host_setup: HostSetup | None = None
        self.beacons = BeaconSender(config.beacon_addr, config.beacon_source)
        self.delay = DelayEstimator(config.capacity) if config.load_metric == "delay" else None
        self.bridge = Bridge(BridgeSettings(
            upstream_host=_url_host(config.vllm_url), upstream_port=_url_port(config.vllm_url),
            mode=config.mode, upstream_timeout=config.upstream_timeout,
            request_timeout=config.request_timeout, head_timeout=config.head_timeout,
            max_connections=config.max_connections, max_body_bytes=config.max_body_bytes,
            max_buffered_bytes=config.max_buffered_bytes,
            max_header_bytes=config.max_header_bytes, max_headers=config.max_headers,
            trust_tenant_header=config.trust_tenant_header,
            overflow_request_tokens=config.overflow_request_tokens,
            backend_name=config.name, priority_scheduling=config.priority_scheduling,
            charge_step=config.charge_step, delivery_wait=config.delivery_wait),
            self.tenants, on_finish=self._on_request_finished, on_charge=self._on_charge,
            delay=self.delay)
        self.session: aiohttp.ClientSession | None = None
        self.controller: Replicated | None = None
        self.kv_blocks = KvBlockSet(config.kv_index_max_blocks)
        self.kv_subscriber: KvEventSubscriber | None = None
        if config.kv_events_endpoint:
            # vLLM's own endpoint values: a wildcard one vLLM binds (the agent connects),
            # a concrete one vLLM connects to (the agent binds); the replay one vLLM binds
            address, bind = subscriber_side(config.kv_events_endpoint)
            replay = config.kv_events_replay_endpoint
            self.kv_subscriber = KvEventSubscriber(
                address, local(replay) if replay else None, config.kv_events_topic,
                self._kv_stored, self.kv_blocks.on_removed, self.kv_blocks.on_cleared,
                bind=bind)
        self.kv_reports_sent = 0
        self.handoff: Handoff | None = None  # made in run(), with the HTTP session
        self.affinity: AffinityReporter | None = None  # with the handoff
        self.claims: PrefixClaimer | None = None  # with the handoff's claim and KV events
        self.metrics_runner: web.AppRunner | None = None

    # -- state ---------------------------------------------------------------------------
    @property
    def down(self) -> bool:
        snap = self.snapshot
        stale = snap is None or time.monotonic() - snap.taken_at > self.config.stale_after
        return not self.vllm_healthy or stale

    def figures(self) -> LoadFigures:
        snap = self.snapshot or VllmSnapshot()
        fig = compute_load(snap.running, snap.waiting, snap.kv_cache_usage,
                           self.config.capacity, self.bridge.in_flight)
        if self.delay is None:
            return fig
        ttft = self.delay.expected_ttft(snap.running + snap.waiting,
                                        snap.kv_cache_usage >= 1.0)
        return dataclasses.replace(fig, load=delay_load(ttft))

    def _on_request_finished(self, tenant: Tenant, usage: TenantUsage) -> None:
        self.tenant_ids[tenant.name] = tenant.tenant_id
        if self.config.bill_factor != 1:  # FAULT INJECTION (labs): a lying agent
            usage = dataclasses.replace(usage, completion_tokens=round(
                usage.completion_tokens * self.config.bill_factor))
        self.usage_total.setdefault(tenant.name, TenantUsage()).add(usage)
        self.usage_unreported.setdefault(tenant.name, TenantUsage()).add(usage)

    def _on_charge(self, tenant: Tenant, prompt_tokens: int, completion_tokens: int) -> None:
        """A USAGE beacon per charge: at the start of a request, while it streams, at its end."""
        if self.backend_id is not None and tenant.tenant_id != UNKNOWN_TENANT_ID:
            self.beacons.usage(self.backend_id, tenant.tenant_id, prompt_tokens,
                               completion_tokens)

    # -- run -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        if cfg.host_setup:
            self.host_setup = HostSetup(cfg.vip, cfg.address, cfg.decap_interface)
            self.host_status = await asyncio.to_thread(self.host_setup.apply)
        tasks: list[asyncio.Task] = []
        try:
            self.session = aiohttp.ClientSession()
            self.controller = Replicated([ControllerClient(self.session, url, cfg.auth_token())
                                          for url in cfg.controller_urls])
            self.rdma_status = await asyncio.to_thread(self._roce)
            if cfg.handoff:
                self.handoff = self._make_handoff(self.session)
                self.bridge.handoff = self.handoff
                self.affinity = AffinityReporter(
                    cfg.name, self.handoff.metrics, self.handoff.settings.affinity_window_s,
                    self.handoff.settings.affinity_queue,
                    shared_clients=self.handoff.shared_clients)
                self.bridge.on_affinity = self.affinity.note
                if self.handoff.settings.shared_client_s > 0:
                    self.bridge.on_shared = self.affinity.shared
                # claims only where the index follows this backend's blocks: its KV
                # reports confirm them, and without reports it is never trusted anyway
                if self.handoff.settings.claim and self.kv_subscriber is not None:
                    settings = self.handoff.settings
                    self.claims = PrefixClaimer(
                        cfg.name, self.handoff.metrics, self.handoff.keys,
                        settings.min_blocks, settings.claim_ttl_s, settings.claim_queue,
                        known=lambda: self.kv_blocks.acked)
                    self.bridge.on_claim = self.claims.note
                    self.bridge.on_claim_body = self.claims.note_body
            if cfg.metrics_listen:
                await self._start_metrics(cfg.metrics_listen)
            if cfg.bridge:
                await self.bridge.start(cfg.listen_address, cfg.listen_port)
                log.info("bridge (%s) on %s:%d -> %s", cfg.mode, cfg.listen_address,
                         self.bridge.port, cfg.vllm_url)
                if self.handoff is not None:
                    await self.bridge.start_handoff(cfg.address, self.handoff.settings.port)
                    log.info("handoff listener on %s:%d", cfg.address,
                             self.handoff.settings.port)
            loops = [self._scrape_loop(), self._health_loop(), self._controller_loop(),
                     self._beacon_loop()]
            if self.kv_subscriber is not None:
                loops += [self.kv_subscriber.run(), self._kv_report_loop()]
            if self.affinity is not None:
                assert self.controller is not None
                loops.append(self.affinity.run(self.controller, self.registered))
            if self.claims is not None:
                assert self.controller is not None
                loops.append(self.claims.run(self.controller, self.registered))
            for coro in loops:
                tasks.append(asyncio.create_task(coro))
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and task.exception():
                    raise task.exception()  # type: ignore[misc]
            waiter.cancel()
        finally:
            log.info("agent stopping")
            # the agent's own count of what the controller acknowledged (the lab's `ha`
            # experiment checks the ledger against it: nothing lost, nothing twice)
            log.info("usage acknowledged at exit: %s", json.dumps(self.acknowledged_usage(),
                                                                 sort_keys=True))
            # Tell the switch first (DRAINING: no new connections here), then let the
            # requests in flight finish while the beacons keep flowing.
            self.draining = True
            self._send_load()
            await self.bridge.stop(grace=cfg.shutdown_grace)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._deregister()
            if self.metrics_runner is not None:
                await self.metrics_runner.cleanup()
            if self.session:
                await self.session.close()
            self.beacons.close()
            if self.host_setup:
                await asyncio.to_thread(self.host_setup.undo)

    def _make_handoff(self, session: aiohttp.ClientSession) -> Handoff:
        cfg = self.config
        return Handoff(HandoffSettings(**cfg.handoff), cfg.name, session, cfg.controller_url,
                       cfg.auth_token(), cfg.vllm_url, self.local_load,
                       block_size=lambda: self.kv_subscriber.stats.block_size
                       if self.kv_subscriber is not None else None,
                       local_keys=lambda: self.kv_blocks.current
                       if self.kv_subscriber is not None else None,
                       eviction_pressure=lambda: self.kv_blocks.eviction_pressure()
                       if self.kv_subscriber is not None else None)

    def local_load(self) -> LocalLoad:
        """This backend's load, for the handoff's cost model."""
        fig = self.figures()
        wait = None
        service = 0.7
        if self.delay is not None:
            snap = self.snapshot or VllmSnapshot()
            # the delay model's time to a first token, less the prefill it includes
            wait = max(0.0, self.delay.expected_ttft(snap.running + snap.waiting,
                                                     snap.kv_cache_usage >= 1.0)
                       - self.delay.prefill)
            service = self.delay.typical_s()
        return LocalLoad(fig.running, fig.waiting, self.config.capacity, wait, service,
                         service_measured=self.reported_service_s() is not None)

    def reported_service_s(self) -> float | None:
        """This backend's service time for the load report (`service_s`): the delay
        model's measured typical request, or None -- not measured yet, no delay model
        (load_metric occupancy), or outside what the controller accepts (a report the
        controller refused would lose its load and usage)."""
        service = None if self.delay is None else self.delay.measured_typical_s()
        if service is None or not 0 < service <= MAX_SERVICE_S:
            return None
        return service

    async def _start_metrics(self, listen: str) -> None:
        """GET /metrics: the agent's Prometheus counters (the bridge's, the handoffs')."""
        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(self.bridge.registry)
            if self.handoff is not None:
                body += generate_latest(self.handoff.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self.metrics_runner = web.AppRunner(app, access_log=None)
        await self.metrics_runner.setup()
        host, _, port = listen.rpartition(":")
        await web.TCPSite(self.metrics_runner, host, int(port), reuse_address=True).start()
        log.info("metrics on http://%s/metrics", listen)

    def _roce(self, overrides: dict | None = None) -> dict:
        try:
            qos = roce.RoceQos.from_dict({**self.config.roce, **(overrides or {})})
        except (TypeError, ValueError) as exc:
            return {"present": None, "message": f"bad RoCE settings: {exc}"}
        return roce.apply(qos)

    async def _deregister(self) -> None:
        if self.controller is None or self.backend_id is None:
            return
        try:
            await self.controller.deregister(self.config.name)
            log.info("deregistered %s", self.config.name)
        except ControllerError as exc:
            log.warning("deregistration failed: %s", exc)

    def _kv_stored(self, keys: list[int]) -> None:
        assert self.kv_subscriber is not None
        self.kv_blocks.block_size = self.kv_subscriber.stats.block_size
        self.kv_blocks.on_stored(keys)

    async def _kv_report_loop(self) -> None:
        """The block set's changes to the controller's prefix index, once registered."""
        assert self.controller is not None
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        while True:
            await asyncio.sleep(self.config.kv_report_interval)
            if not self.registered.is_set():
                self.kv_blocks.need_full = True  # a new registration starts a new index entry
                continue
            # an idle cache still holds its blocks: an empty delta at least every second
            # keeps the index trusting them (its stale_after_s is 3 s)
            pending = self.kv_blocks.report(keepalive=loop.time() - last_sent >= KV_KEEPALIVE_S)
            if pending is None:
                continue
            try:
                answer = await self.controller.kv_report(self.config.name, pending.body)
            except ControllerError as exc:
                if exc.status in (404, 409):
                    self.kv_blocks.need_full = True
                log.warning("KV report failed: %s", exc)
                continue
            self.kv_blocks.acknowledge(pending, answer)
            self.kv_reports_sent += 1
            last_sent = loop.time()

    # -- loops ---------------------------------------------------------------------------
    async def _scrape_loop(self) -> None:
        assert self.session is not None
        failures = 0
        while True:
            try:
                self.snapshot = await scrape(self.session, self.config.vllm_url,
                                             timeout=max(self.config.stale_after, 0.5))
                failures = 0
            except ScrapeError as exc:
                failures += 1
                if failures in (1, 100) or failures % 1000 == 0:
                    log.warning("scrape failed (%d in a row): %s", failures, exc)
            await asyncio.sleep(self.config.scrape_interval)

    async def _health_loop(self) -> None:
        assert self.session is not None
        while True:
            ok = await healthy(self.session, self.config.vllm_url,
                               timeout=self.config.health_interval * 2)
            if ok != self.vllm_healthy:
                log.log(20 if ok else 30, "vLLM at %s is %s", self.config.vllm_url,
                        "healthy" if ok else "DOWN (health check failed)")
                self.vllm_healthy = ok
                self._send_load()  # tell the switch now, not at the next tick
            await asyncio.sleep(self.config.health_interval)

    async def _beacon_loop(self) -> None:
        await self.registered.wait()
        interval = self.config.beacon_interval
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self._send_load()
            next_at += interval
            delay = next_at - loop.time()
            if delay < -interval:  # fell behind (a stalled loop): do not burst to catch up
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(max(0.0, delay))

    def _send_load(self) -> None:
        if self.backend_id is None:
            return
        fig = self.figures()
        self.beacons.load(self.backend_id, fig.load, fig.running, fig.waiting, self.down,
                          self.draining)

    async def _models(self) -> list[str]:
        if self.config.models:
            return list(self.config.models)
        assert self.session is not None
        url = self.config.vllm_url.rstrip("/") + "/v1/models"
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as reply:
                data = await reply.json(content_type=None)
            return [str(m["id"]) for m in data.get("data", [])]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, AttributeError,
                TypeError):
            return []

    def registration_body(self, models: list[str]) -> BackendRegistration:
        # Not validated here: the controller judges it (an agent whose vLLM lists no model
        # yet still asks, and retries on the 422).
        c = self.config
        return BackendRegistration.model_construct(
            name=c.name, host=c.host, address=c.address, mac=c.mac, switch=c.switch,
            port=c.port, capacity=c.capacity, models=models, vip=c.vip, vip_port=c.vip_port)

    async def _register(self) -> None:
        assert self.controller is not None
        delay = 0.5
        while True:
            models = await self._models()
            try:
                reg = await self.controller.register(self.registration_body(models))
                self._apply_tenants([t.model_dump(exclude_unset=True) for t in reg.tenants])
                if reg.roce:
                    self.rdma_status = await asyncio.to_thread(self._roce, reg.roce)
                self.backend_id = reg.backend_id
                self.models = models or self.models
                self.registered.set()
                log.info("registered %s as backend %d (%d tenants, models %s)",
                         self.config.name, reg.backend_id, len(reg.tenants), models)
                return
            except ControllerError as exc:
                log.warning("registration failed, retrying in %.1f s: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _apply_tenants(self, items: list) -> None:
        try:
            tenants = TenantTable.from_json(items).tenants
            known = self.config.tenant_priorities
            opted_in = any(t.prefix_affinity for t in self.tenants.tenants)
            self.tenants.replace([t if t.request_priority is not None or t.name not in known
                                  else dataclasses.replace(t, request_priority=known[t.name])
                                  for t in tenants])
            if opted_in and self.handoff is not None \
                    and not any(t.prefix_affinity for t in self.tenants.tenants):
                # the last opt-in ended: the shared addresses learnt under it go with it,
                # so a later opt-in starts as the first did (the lab's rounds alike)
                forgotten = self.handoff.shared_clients.clear()
                if forgotten:
                    log.info("prefix affinity off: %d shared client addresses forgotten",
                             forgotten)
        except ValueError as exc:
            log.error("controller sent bad tenants, keeping the previous ones: %s", exc)

    def report_body(self) -> dict:
        snap = self.snapshot or VllmSnapshot()
        fig = self.figures()

        known = self.known_tenant_ids()

        def usage_view(table: dict[str, TenantUsage]) -> dict:
            # the controller refuses tenants its policy does not name (one removed by a
            # policy reload): those stay out of the report instead of blocking it
            return {name: {"tenant_id": self.tenant_ids.get(name, 0), **vars(u)}
                    for name, u in table.items() if self.tenant_ids.get(name, 0) in known}

        usage: dict = {"usage": usage_view(self.usage_unreported),
                       "usage_total": usage_view(self.usage_total), "epoch": self.epoch}
        if self.signer is not None:
            # signed records bill; the plain counters are left out (the controller
            # refuses unsigned usage from an agent whose token has a key)
            self.signer.take(self.usage_unreported, self.tenant_ids, known,
                             self.models[0] if self.models else "unknown")
            usage = {"usage": {}, "records": self.signer.body(), "epoch": self.epoch}
        return {"running": snap.running, "waiting": snap.waiting,
                "kv_cache_usage": snap.kv_cache_usage, "healthy": not self.down,
                "service_s": self.reported_service_s(), "load": fig.load, **usage,
                "metrics": snap.as_report() if self.snapshot else None,
                "rdma": self.rdma_status, "host": self.host_status,
                "bridge": {"mode": self.config.mode, "in_flight": self.bridge.in_flight},
                "beacons": {"sent": self.beacons.sent, "errors": self.beacons.errors},
                "kv_events": None if self.kv_subscriber is None else {
                    **vars(self.kv_subscriber.stats), "blocks": len(self.kv_blocks),
                    "reports_sent": self.kv_reports_sent},
                "seq": self.reports_sent, "report_id": self._next_report_id()}

    def _next_report_id(self) -> str:
        """An idempotency key per report body: this run's epoch and a counter. Replicas
        that get the same report write it once (the ledger's reports table)."""
        self.report_bodies += 1
        return f"{self.epoch}-{self.report_bodies}"

    def acknowledged_usage(self) -> dict[str, dict[str, int]]:
        """tenant id -> the tokens and requests of this run that a controller acknowledged:
        all counted so far, less what waits unreported or in unacknowledged records."""
        out: dict[str, dict[str, int]] = {}
        waiting: dict[str, TenantUsage] = {n: TenantUsage(**vars(u))
                                           for n, u in self.usage_unreported.items()}
        for pending in (self.signer.pending if self.signer is not None else []):
            waiting.setdefault(pending.tenant, TenantUsage()).add(TenantUsage(
                requests=pending.record.requests, prompt_tokens=pending.record.prompt_tokens,
                completion_tokens=pending.record.completion_tokens))
        for name, total in self.usage_total.items():
            left = waiting.get(name, TenantUsage())
            out[str(self.tenant_ids.get(name, 0))] = {
                k: getattr(total, k) - getattr(left, k)
                for k in ("prompt_tokens", "completion_tokens", "requests")}
        return out

    def known_tenant_ids(self) -> set[int]:
        return {t.tenant_id for t in self.tenants.tenants} | {UNKNOWN_TENANT_ID}

    async def _controller_loop(self) -> None:
        assert self.controller is not None
        await self._register()
        while True:
            await asyncio.sleep(self.config.report_interval)
            body = self.report_body()
            sent = {name: TenantUsage(**vars(u)) for name, u in self.usage_unreported.items()}
            try:
                answer = await self.controller.report(self.config.name, body)
            except ControllerError as exc:
                if exc.status == 409 and self.signer is not None:
                    log.error("the controller refused the usage records (%s); signing them "
                              "again in a new epoch", exc)
                    self.signer.restart(self.usage_unreported)
                    self.epoch = self.signer.epoch
                elif exc.status == 404:
                    log.warning("the controller forgot %s; registering again", self.config.name)
                    self.registered.clear()
                    self.backend_id = None  # no beacons under a stale id
                    if self.affinity is not None:
                        self.affinity.forget_services()
                    await self._register()
                else:
                    log.warning("report failed: %s", exc)
                continue
            self.reports_sent += 1
            if self.signer is not None:
                self.signer.acknowledged(len(body.get("records", [])))
            # What was reported is acknowledged; what arrived meanwhile stays for the next.
            for name, usage in sent.items():
                left = self.usage_unreported.get(name)
                if left is not None:
                    for field_name in vars(usage):
                        setattr(left, field_name,
                                getattr(left, field_name) - getattr(usage, field_name))
                    if not any(vars(left).values()):
                        del self.usage_unreported[name]
            if isinstance(answer.get("draining"), bool) and answer["draining"] != self.draining:
                self.draining = answer["draining"]
                log.info("controller: draining %s", "on" if self.draining else "off")
            if isinstance(answer.get("tenants"), list):
                self._apply_tenants(answer["tenants"])


def _url_host(url: str) -> str:
    return urlsplit(url).hostname or "127.0.0.1"


def _url_port(url: str) -> int:
    return urlsplit(url).port or 80


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    agent = Agent(config)
    with contextlib.suppress(asyncio.CancelledError):
        await agent.run(stop)
