"""Benchmark: prefix-cache-aware steering (issue 15) against the L7 cache-aware routers,
every figure against baselines measured in the same run.

On 127.0.0.1 (no Mininet): a real controller (prefix index, policy with the tenants'
`prefix_affinity` opt-in), four emulated vLLMs (speeds 1, 1, 0.5, 0.5; 4 slots; the lab's
step model; an evicting KV cache of --kv-tokens, swept), each with its real host agent
(bridge, KV events, reports, handoff listener on 127.0.0.1..4, LOAD beacons). The switch
is emulated here: power-of-two-choices over the agents' LOAD beacons as the P4 program does
(load + conn_cost per connection since the last beacon); mode `prefix-affinity` adds item
4's bounded-load client affinity from the entries the controller holds for the edge --
the agents' own reports (POST /backends/{name}/affinity), read back every 0.2 s from GET
/api/v1/affinity, with select.p4's rule (the entry's backend while its score <= bound x
the p2c pair's best + one connection's cost; --affinity-bound, policy affinity_bound),
as the lab's BMv2 switch gets them written. Each client's address reaches the bridges in
X-Tokenfabric-Client (trusted with trust_tenant_header), since every connection comes
from 127.0.0.1; the opted-in tenants own the chat's client prefixes in the policy.
(Until session 6 the bench learnt every client's last serving backend itself, which
over-stated what the agents report.) The L7 routers (vllm-router
`cache_aware`, `power_of_two`; sglang-router `cache_aware`) reach the emulators directly.

Workloads at 85% of capacity: the chat generator (per-device tenant and app-server
tenant; a conversation's next turn waits for the previous answer, loadgen.TurnOrder), the
same chat with overlapping turns as replayed until session 6 (`chat-overlap`), the sample
Mooncake trace, and a prefix-free workload (p2c vs prefix only).

Per mode: hit rate (the emulators' counters) with a 90% bootstrap interval of the
requests' own cached/prompt tokens, TTFT p50/p99 (p99 with a 90% bootstrap interval),
goodput, handoff share and added latency, per tenant, the handoff decisions, the switch's
steering, the load average; each L7 baseline's evidence (vllm-router cache_aware: its
cache decisions and /render calls, no render_unavailable); per tenant, the hits that
could have been (no eviction) and the lost ones by cause -- evicted, or served away and
why (the bridge's X-Tokenfabric-Handoff-Decision; tokenfabric/lab/prefix_misses.py);
the TTFT tail (the requests at or above the 98th percentile) by path, generating backend
and the requests in flight there when they arrived (tokenfabric/lab/prefix_tail.py);
the chat's system prompts computed again beyond each app's first (copies, one-time per app
and backend: prefix_misses.system_copies); the holders' refusals at receipt by reason
(admit_check variants).

Targets (printed as ratios, PASS/FAIL):
- hit rate of prefix modes >= the best L7 cache-aware router's;
- TTFT p99 <= 0.8 x the best L7 router's (90% bootstrap interval shown);
- per-device clients: <= 25% of requests handed off (prefix-affinity);
- the app-server tenant reaches that hit rate through handoffs;
- prefix-free workload: prefix modes' p99 within 1.05 x p2c's.

With --misses, each mode's uncached prompt tokens by path (miss_breakdown): did a later
turn reach the backend that served its conversation's previous turn, and if not, why
(the switch had no entry, its entry named another backend, the entry's backend was over
the bound -- with the median excess of its score -- or the previous turn still ran).

    python bench/bench_prefix_handoff.py [--duration 40] [--kv-tokens 4096 16384]
        [--modes ...] [--workloads chat chat-overlap trace free] [--trace-kv 4096 16384]
        [--out results/prefix-bench]
        [--affinity-bound 1.25] [--handoff KEY=VALUE ...]   (e.g. home_weight=0)
        [--variant NAME:K=V,...]  (agent handoff settings, or the emulated switch's
                                   affinity_bound / affinity_slack)  [--misses]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402

from tokenfabric import beacon, yamlio  # noqa: E402
from tokenfabric.hostagent.config import (  # noqa: E402
    check_handoff_overrides,
    handoff_overrides,
    parse_assignments,
)
from tokenfabric.hostagent.handoff import DECISION_HEADER  # noqa: E402
from tokenfabric.lab import prefix, prefix_lab, prefix_misses, prefix_tail  # noqa: E402
from tokenfabric.lab.experiments import (  # noqa: E402
    EMULATOR_DECODE_BASE_MS,
    EMULATOR_MAX_NUM_SEQS,
    EMULATOR_PREFILL_MS_PER_TOKEN,
)
from tokenfabric.lab.loadgen import (  # noqa: E402
    PlannedRequest,
    TenantSpec,
    TurnOrder,
    Workload,
    _send,
)
from tokenfabric.lab.results import p99_ratio_interval  # noqa: E402
from tokenfabric.lab.workloads import Planned  # noqa: E402
from tokenfabric.tools import free_port  # noqa: E402

SPEEDS = [1.0, 1.0, 0.5, 0.5]
CLI = [sys.executable, "-m", "tokenfabric.cli"]
ADMIN, AGENT, VIEWER = "bench-admin-token-0123456789", "bench-agent-token-0123456789", \
    "bench-viewer-token-0123456789"
SECRET = "bench-handoff-secret-0123456789"
CONN_COST = 1000 // EMULATOR_MAX_NUM_SEQS
# variant settings for the emulated switch, not the agents (EmulatedSwitch)
SWITCH_KEYS = ("affinity_bound", "affinity_slack")
TAIL_QUANTILE = 0.98  # the TTFT tail whose paths each mode prints (prefix_tail)
FABRIC = """
switches:
  s1: {address: "127.0.0.1:1", device_id: 1, ports: [1, 2, 3, 4, 5, 6]}
hosts:
  clients: {switch: s1, port: 1, address: 10.0.1.0, prefix_len: 24, mac: "02:00:00:00:01:01"}
services:
  tiny: {id: 1, model: tiny, vip: 10.0.100.1, port: 8000}
"""


# The opted-in tenants own the chat's real client addresses (prefix.chat_spec), so the
# controller takes the agents' affinity reports for them as the lab's does; the plain
# twins (p2c and the L7 modes) are told apart by the tenant header and need none.
CLIENT_PREFIXES = {prefix.DEVICES: "10.0.1.0/25", prefix.APP_SERVER: "10.0.1.200/32"}


def policy_text(bound: float | None = None) -> str:
    tenants = []
    for i, (base, opted) in enumerate(prefix.OPTED_IN.items()):
        tenants.append({"name": base, "id": 10 + 2 * i, "prefixes": [f"10.0.{10 + 2 * i}.0/24"],
                        "contract": "std"})
        tenants.append({"name": opted, "id": 11 + 2 * i,
                        "prefixes": [CLIENT_PREFIXES.get(base, f"10.0.{11 + 2 * i}.0/24")],
                        "contract": "std", "prefix_affinity": True,
                        **({"affinity_bound": bound} if bound is not None else {})})
    return yamlio.dump({"contracts": {"std": {
        "class": {"service_class": "standard", "dscp": 0, "queue": 1, "priority_level": 9},
        "tpm": 60_000_000, "burst": 5_000_000}}, "tenants": tenants})


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait(check: Any, what: str, timeout: float = 90.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            value = check()
            if value:
                return value
        time.sleep(0.3)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


class Cluster:
    """Controller, four emulators and their agents, the L7 routers; on 127.0.0.x."""

    def __init__(self, folder: Path, kv_tokens: int, modes: list[str],
                 lookup_timeout: float = 0.05, bound: float = 1.25,
                 handoff: dict[str, Any] | None = None) -> None:
        self.folder, self.kv_tokens, self.modes = folder, kv_tokens, modes
        self.lookup_timeout, self.bound = lookup_timeout, bound
        self.handoff = handoff or {}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.emulators: dict[str, str] = {}
        self.bridges: dict[str, str] = {}
        self.routers: dict[str, str] = {}
        self.router_logs: dict[str, Path] = {}
        self.ids: dict[int, str] = {}
        self.agent_metrics: dict[str, str] = {}
        self.agent_configs: dict[str, dict[str, Any]] = {}
        self.agents: dict[str, subprocess.Popen] = {}
        self.variant: dict[str, Any] = {}
        self.beacons = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.beacons.bind(("127.0.0.1", 0))

    def _popen(self, argv: list[str], log: str) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=open(self.folder / f"{log}.log", "wb"),  # noqa: SIM115
                                stderr=subprocess.STDOUT, env={**os.environ,
                                                               "PYTHONHASHSEED": "0"})
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        cfg = self.folder / "config"
        cfg.mkdir(exist_ok=True)
        (cfg / "fabric.yaml").write_text(FABRIC)
        (cfg / "policy.yaml").write_text(policy_text(self.bound))
        (cfg / "tokens.yaml").write_text(yamlio.dump({
            ADMIN: {"name": "ops", "role": "admin"},
            AGENT: {"name": "agents", "role": "agent", "backends": ["*"]},
            VIEWER: {"name": "bench", "role": "viewer"}}))
        api = free_port()
        self._popen([*CLI, "controller", "run", "--fabric", str(cfg / "fabric.yaml"),
                     "--policy", str(cfg / "policy.yaml"), "--tokens", str(cfg / "tokens.yaml"),
                     "--ledger", str(cfg / "ledger.db"), "--listen", f"127.0.0.1:{api}"],
                    "controller")
        self.api_url = f"http://127.0.0.1:{api}"
        self.api = httpx.Client(base_url=self.api_url, timeout=10,
                                headers={"Authorization": f"Bearer {VIEWER}"})
        handoff_port = free_port()
        for i, speed in enumerate(SPEEDS):
            name = f"b{i + 1}"
            port = free_port()
            endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
            self._popen([*CLI, "vllm-emulator", "--host", "127.0.0.1", "--port", str(port),
                         "--model", "tiny", "--speed", str(speed), "--max-num-seqs",
                         str(EMULATOR_MAX_NUM_SEQS), "--backend-name", name,
                         "--decode-base-ms", str(EMULATOR_DECODE_BASE_MS),
                         "--prefill-ms-per-token", str(EMULATOR_PREFILL_MS_PER_TOKEN),
                         "--kv-cache-tokens", str(self.kv_tokens), "--max-model-len", "8192",
                         "--kv-events-config", json.dumps({
                             "enable_kv_cache_events": True, "endpoint": endpoint,
                             "replay_endpoint": replay})], f"emulator-{name}")
            self.emulators[name] = f"http://127.0.0.1:{port}"
            listen, metrics = free_port(), free_port()
            self.bridges[name] = f"http://127.0.0.1:{listen}"
            self.agent_metrics[name] = f"http://127.0.0.1:{metrics}/metrics"
            self.agent_configs[name] = {
                "name": name, "address": f"127.0.0.{i + 1}", "mac": f"02:00:00:00:00:1{i}",
                "switch": "s1", "port": 3 + i, "vip": "10.0.100.1", "vip_port": 8000,
                "capacity": EMULATOR_MAX_NUM_SEQS, "models": ["tiny"],
                "vllm_url": self.emulators[name], "controller_url": f"http://127.0.0.1:{api}",
                "token": AGENT, "listen_address": "127.0.0.1", "listen_port": listen,
                "trust_tenant_header": True, "metrics_listen": f"127.0.0.1:{metrics}",
                "beacon_target": f"127.0.0.1:{self.beacons.getsockname()[1]}",
                "report_interval": 0.25, "kv_events_endpoint": endpoint,
                "kv_events_replay_endpoint": replay, "kv_report_interval": 0.25,
                "handoff": {"secret": SECRET, "port": handoff_port,
                            "lookup_timeout": self.lookup_timeout, "decision_header": True,
                            "prefill_ms_per_token": EMULATOR_PREFILL_MS_PER_TOKEN}}
            self._start_agent(name, {})
        for name in self.emulators:
            wait(lambda n=name: self.api.get(f"/api/v1/backends/{n}").json()["load"]
                 ["reports"] > 0, f"{name}'s registration")
        self.ids = {b["backend_id"]: b["name"] for b in self.api.get("/api/v1/backends").json()}
        for mode in self.modes:
            if mode in prefix.L7_MODES:
                self._start_router(mode)
        for mode, url in self.routers.items():
            wait(lambda u=url: httpx.get(u + "/health", timeout=2).status_code == 200,
                 f"{mode}'s router", timeout=150)

    def _start_agent(self, name: str, overrides: dict[str, Any]) -> None:
        config = dict(self.agent_configs[name])
        config["handoff"] = {**config["handoff"], **self.handoff, **overrides}
        path = self.folder / "config" / f"agent-{name}.yaml"
        path.write_text(yamlio.dump({"agent": config}))
        self.agents[name] = self._popen([*CLI, "agent", "run", "--config", str(path)],
                                        f"agent-{name}-{len(self.procs)}")

    def use_variant(self, overrides: dict[str, Any]) -> None:
        """The agents restarted with these handoff settings over the run's (a variant mode
        against the same emulators, controller and L7 routers); {} restores them. Before
        every handoff mode, so that each starts alike: the first handoff mode after the
        cluster's start lost far more index lookups than those after a restart."""
        agent = {k: v for k, v in overrides.items() if k not in SWITCH_KEYS}
        for name, proc in self.agents.items():
            stop(proc)
            self._start_agent(name, agent)
        for name, url in self.agent_metrics.items():
            wait(lambda u=url: httpx.get(u, timeout=2).status_code == 200,
                 f"{name}'s restarted agent")
        time.sleep(2.0)  # registered again, load and KV reports flowing
        self.ids = {b["backend_id"]: b["name"] for b in self.api.get("/api/v1/backends").json()}
        self.variant = overrides

    def switch_rule(self) -> tuple[float, float]:
        """The emulated switch's affinity bound and additive slack (load units): the
        run's, or the variant's `affinity_bound` / `affinity_slack`."""
        return (float(self.variant.get("affinity_bound", self.bound)),
                float(self.variant.get("affinity_slack", 0.0)))

    def _start_router(self, mode: str) -> None:
        name, _ = prefix.L7_MODES[mode]
        binary = str(Path(sys.executable).parent / name)
        if not Path(binary).exists():
            print(f"  {mode}: {name} is not installed (the lab extra); mode skipped")
            return
        port = free_port()
        self.router_logs[mode] = self.folder / f"router-{mode}.log"
        self._popen(prefix.router_command(mode, binary, "127.0.0.1", port,
                                          list(self.emulators.values()), free_port()),
                    f"router-{mode}")
        self.routers[mode] = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.beacons.close()

    def metrics(self) -> dict[str, str]:
        return {n: httpx.get(u + "/metrics", timeout=10).text for n, u in self.emulators.items()}

    def agent_counters(self) -> dict[str, dict[str, float]]:
        """The agents' handoff decisions ("decisions", by decision) and the holders'
        refusals at receipt ("refused", admit_check, by reason) so far, summed over the
        backends: one /metrics read per agent for both."""
        texts = [httpx.get(url, timeout=10).text for url in self.agent_metrics.values()]
        return {"decisions": prefix.metric_sums(texts, "tokenfabric_handoff_decisions_total",
                                                "decision"),
                "refused": prefix.metric_sums(texts, "tokenfabric_handoffs_refused_total",
                                              "reason")}

    def claims(self) -> dict[str, float]:
        """The index's claim counters so far, summed over the backends (a restarted agent's
        backend starts at 0: take them after use_variant)."""
        views = self.api.get("/api/v1/prefix-index").json()["backends"].values()
        return {k: float(sum(v.get(k, 0) for v in views))
                for k in ("claims", "claims_confirmed", "claims_dropped")}

    def reset_caches(self) -> None:
        """Every emulator's prefix cache emptied (vLLM's /reset_prefix_cache; 409 while
        requests still hold blocks), then time for the index to hear of it; the switch's
        affinity entries of the previous mode withdrawn (they point at emptied caches)."""
        with httpx.Client(base_url=f"{self.api_url}/api/v1", timeout=10,
                          headers={"Authorization": f"Bearer {VIEWER}"}) as api:
            prefix_lab.withdraw_affinity(api, AGENT)
        for url in self.emulators.values():
            wait(lambda u=url: httpx.post(u + "/reset_prefix_cache", timeout=10
                                          ).status_code == 200, "an idle backend to reset", 60)
        time.sleep(1.0)


class EmulatedSwitch(asyncio.DatagramProtocol):
    """The P4 switch's choice, in Python: p2c over LOAD beacons plus conn_cost per new
    connection since the backend's last beacon; with affinity, select.p4's bounded-load
    rule over the entries the controller holds for the edge -- the agents' own reports
    (POST /backends/{name}/affinity), read back from GET /api/v1/affinity, as the lab's
    BMv2 switch gets them written."""

    def __init__(self, ids: dict[int, str], affinity: bool, bound: float = 1.25,
                 seed: int = 7, slack: float = 0.0) -> None:
        self.ids, self.affinity, self.bound, self.slack = ids, affinity, bound, slack
        self.load: dict[str, float] = {n: 0.0 for n in ids.values()}
        self.since: dict[str, int] = {n: 0 for n in ids.values()}
        self.table: dict[str, str] = {}
        self.rng = random.Random(seed)
        self.affinity_hits = 0
        self.over_bound = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        with contextlib.suppress(beacon.BeaconError):
            b = beacon.unpack(data)
            if isinstance(b, beacon.LoadBeacon) and b.backend_id in self.ids:
                name = self.ids[b.backend_id]
                self.load[name], self.since[name] = float(b.load), 0

    def cost(self, name: str) -> float:
        return self.load[name] + CONN_COST * self.since[name]

    def choose(self, client: str | None) -> tuple[str, dict[str, Any]]:
        """The backend for a new connection of `client`, and why (for miss_breakdown)."""
        a, b = self.rng.sample(list(self.load), 2)
        choice = a if self.cost(a) <= self.cost(b) else b
        why: dict[str, Any] = {"p2c": choice, "best": self.cost(choice)}
        pinned = self.table.get(client or "") if self.affinity else None
        if pinned in self.load:
            why["entry"], why["entry_cost"] = pinned, self.cost(pinned)
            # select.p4: score <= bound x the pair's best + one connection's cost
            if self.cost(pinned) <= self.bound * self.cost(choice) + CONN_COST + self.slack:
                choice = pinned
                self.affinity_hits += 1
                why["verdict"] = "steered"
            else:
                self.over_bound += 1
                why["verdict"] = "over_bound"
        else:
            why["verdict"] = "no_entry"
        self.since[choice] += 1
        return choice, why

    async def follow(self, api: str, stop: asyncio.Event) -> None:
        """The controller's affinity entries for the edge, read every 0.2 s (the lab's
        reconcile pass writes them to BMv2 within milliseconds of a report)."""
        async with httpx.AsyncClient(base_url=api, timeout=2,
                                     headers={"Authorization": f"Bearer {VIEWER}"}) as http:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    view = (await http.get("/api/v1/affinity")).json()
                    self.table = {e["client"]: e["backend"]
                                  for entries in view["switches"].values() for e in entries}
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)


# The client's address for the bridge (X-Tokenfabric-Client, trusted with
# trust_tenant_header): all the bench's connections come from 127.0.0.1, and the agents
# report affinity for the address the bridge saw. loadgen._send sets only the tenant
# header, so a trace hook adds this one from the sending task's context.
CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("client", default=None)
# the first bridge's handoff decision (X-Tokenfabric-Handoff-Decision) of the sending
# task's request, for the miss analysis (tokenfabric/lab/prefix_misses.py)
ANSWER: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "answer", default=None)


async def _client_header(session: aiohttp.ClientSession, ctx: Any,
                         params: aiohttp.TraceRequestStartParams) -> None:
    client = CLIENT.get()
    if client:
        params.headers["X-Tokenfabric-Client"] = client


async def _decision_header(session: aiohttp.ClientSession, ctx: Any,
                           params: aiohttp.TraceRequestEndParams) -> None:
    answer = ANSWER.get()
    value = params.response.headers.get(DECISION_HEADER)
    if answer is not None and value:
        answer["decision"] = value


def client_tracing() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(_client_header)
    trace.on_request_end.append(_decision_header)
    return trace


async def run_mode(cluster: Cluster, mode: str, planned: list[Planned], endpoint: str,
                   duration: float, turn_order: bool = True
                   ) -> tuple[list[dict[str, Any]], dict[str, int] | None]:
    loop = asyncio.get_running_loop()
    base = base_mode(mode)
    bound, slack = cluster.switch_rule()
    switch = EmulatedSwitch(cluster.ids, affinity=base == "prefix-affinity",
                            bound=bound, slack=slack)
    transport = None
    stop_follow = asyncio.Event()
    follower = asyncio.create_task(switch.follow(cluster.api_url, stop_follow)) \
        if switch.affinity else None
    if mode not in prefix.L7_MODES:
        transport, _ = await loop.create_datagram_endpoint(lambda: switch,
                                                           sock=cluster.beacons.dup())
        await asyncio.sleep(0.3)  # a round of beacons
    opted = base in prefix.HANDOFF_MODES
    workload = Workload(url="http://127.0.0.1:1", rate=1.0, duration=duration,
                        endpoint=endpoint, tenant_header=True, timeout=120.0)
    timeout = aiohttp.ClientTimeout(total=120)
    records: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0),
                                     timeout=timeout, trace_configs=[client_tracing()]
                                     ) as session:
        # the backend that served each conversation's latest turn: where its history is
        served: dict[int, str] = {}

        async def fire(i: int, p: Planned) -> None:
            tenant = str(p.tenant or "plain")
            name = prefix.OPTED_IN.get(tenant, tenant) if opted else tenant
            req = PlannedRequest(i, p.offset, TenantSpec(name, slo_ttft_ms=prefix.SLO_TTFT_MS,
                                                         slo_tpot_ms=prefix.SLO_TPOT_MS),
                                 len(p.prompt.split()), p.output_tokens, p.prompt, p.messages,
                                 p.source_ip, p.conversation, p.turn)
            why: dict[str, Any] | None = None
            if turn_order:  # chat-overlap: the session-6 replay, turns not waiting
                await turns.wait(req, workload.timeout)  # then the switch chooses
            if mode in prefix.L7_MODES:
                url = cluster.routers[mode]
            else:
                backend, why = switch.choose(p.source_ip)
                url = cluster.bridges[backend]
            history = served.get(p.conversation) if p.conversation is not None else None
            CLIENT.set(p.source_ip)
            answer: dict[str, str] = {}
            ANSWER.set(answer)
            try:
                record = await _send(session, dataclasses.replace(workload, url=url), req,
                                     epoch, t0)
            finally:
                turns.finished(req)
            record["decision"] = answer.get("decision")
            record["switch"], record["history"] = why, history
            if p.conversation is not None and record.get("ok") and record.get("backend"):
                served[p.conversation] = record["backend"]
            records.append(record)

        tasks = []
        turns = TurnOrder()
        epoch, t0 = time.time(), time.perf_counter()
        for i, p in enumerate(planned):
            delay = p.offset - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(fire(i, p)))
        await asyncio.wait(tasks, timeout=150)
    stop_follow.set()
    if follower is not None:
        await follower
    if transport is not None:
        transport.close()
    steered = {"hits": switch.affinity_hits, "over_bound": switch.over_bound,
               "entries": len(switch.table)} if switch.affinity else None
    return records, steered


def base_mode(mode: str) -> str:
    """A variant `prefix-affinity@old` runs as prefix-affinity with other agent settings."""
    return mode.split("@", 1)[0]


def one_run(cluster: Cluster, mode: str, workload: str, planned: list[Planned],
            duration: float, out: Path, variants: dict[str, dict[str, Any]] | None = None
            ) -> dict[str, Any]:
    if base_mode(mode) in prefix.HANDOFF_MODES:
        cluster.use_variant((variants or {}).get(mode, {}))
    cluster.reset_caches()
    before = cluster.metrics()
    counted = cluster.agent_counters()
    claimed = cluster.claims()
    endpoint = "chat" if workload.startswith("chat") else "completions"
    started = time.time()
    records, steered = asyncio.run(run_mode(cluster, mode, planned, endpoint, duration,
                                            turn_order=workload != "chat-overlap"))
    after = cluster.metrics()
    hits = prefix.hit_rate({n: prefix.prefix_counters(t) for n, t in before.items()},
                           {n: prefix.prefix_counters(t) for n, t in after.items()})
    with (out / f"requests-{workload}-{mode}.jsonl").open("w") as sink:
        for r in records:
            sink.write(json.dumps(r) + "\n")
    figures = prefix.mode_figures(records, hits, time.time() - started)
    figures["valid"], figures["evidence"] = True, "the fabric's own mode"
    for kind, now in cluster.agent_counters().items():  # decisions, refused: the run's
        figures[kind] = {k: v - counted[kind].get(k, 0.0) for k, v in now.items()
                         if v - counted[kind].get(k, 0.0) > 0}
    if mode in prefix.L7_MODES:
        renders = sum(prefix.token_calls(after[n], e) - prefix.token_calls(before[n], e)
                      for n in after for e in ("/v1/completions/render",
                                               "/v1/chat/completions/render"))
        log_text = cluster.router_logs[mode].read_text(errors="replace")
        figures["valid"], figures["evidence"] = prefix.baseline_evidence(
            mode, log_text, renders, len(records))
    if base_mode(mode) in prefix.HANDOFF_MODES:
        figures["claims"] = {k: v - claimed.get(k, 0.0) for k, v in cluster.claims().items()}
    figures["queue"] = queue_times(before, after)
    figures["ttft_s"] = [r["ttft"] for r in records if r.get("ok") and r.get("ttft") is not None]
    figures["switch_affinity"] = steered
    figures["loadavg"] = os.getloadavg()
    figures["hit_interval"] = hit_interval(records)
    figures["p99_interval"] = p99_interval(figures["ttft_s"])
    figures["turn_paths"] = miss_breakdown(records)
    # the slowest ~10 of the chat's 521: the p99 is made of them
    figures["tail"] = prefix_tail.tail_paths(records, TAIL_QUANTILE)
    keys = prefix_misses.request_keys(planned, endpoint)
    figures["misses"] = prefix_misses.miss_causes(records, keys)
    figures["copies"] = prefix_misses.system_copies(records, planned, keys)
    return figures


def queue_times(before: dict[str, str], after: dict[str, str]) -> dict[str, float] | None:
    """The emulators' time in the waiting queue during a run (vLLM's
    request_queue_time_seconds histogram, summed over backends): the requests, and the
    share that waited at most 0.5, 1, 2 and 5 s -- how long a claim must last for the
    requests it stands for to be admitted (the KV report follows within its interval)."""
    def buckets(texts: dict[str, str]) -> dict[float, float]:
        by_le = prefix.metric_sums(list(texts.values()),
                                   "vllm:request_queue_time_seconds_bucket", "le")
        return {float(le): n for le, n in by_le.items()}
    old, new = buckets(before), buckets(after)
    count = new.get(float("inf"), 0.0) - old.get(float("inf"), 0.0)
    if count <= 0:
        return None
    return {"requests": count, **{f"le_{b:g}": (new.get(b, 0.0) - old.get(b, 0.0)) / count
                                  for b in (0.5, 1.0, 2.0, 5.0)}}


def miss_breakdown(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Where the prompt tokens of later turns went uncached, per path: did the turn reach
    the backend that served its conversation's previous turn (its history; the previous
    turn may still have been running, as the chat plan is open-loop), and if not,
    why -- the switch had no entry, its entry named another backend, the history backend
    was over the switch's bound (and the bridge then kept the turn) -- or the first turn.
    Per path: requests, prompt tokens, uncached tokens (their share of all uncached), and
    for over-the-bound turns the median excess of the entry's score over the pair's best."""
    out: dict[str, dict[str, float]] = {}
    total_missed = sum((r.get("prompt_tokens") or 0) - (r.get("cached_tokens") or 0)
                       for r in records if r.get("ok")) or 1
    excess: dict[str, list[float]] = {}
    served = {(r["conversation"], r["turn"]): r.get("backend") for r in records
              if r.get("ok") and r.get("conversation") is not None}
    for r in records:
        if not r.get("ok"):
            continue
        tenant = prefix.base_tenant(str(r.get("tenant")))
        why = r.get("switch") or {}
        history = served.get((r.get("conversation"), (r.get("turn") or 0) - 1))
        if history is None:
            path = "first turn" if not r.get("turn") else "history unknown"
        else:
            home = "on history" if r.get("backend") == history else "elsewhere"
            if r.get("history") is None and why:
                how = "previous turn running"
            elif why.get("verdict") == "steered":
                how = "steered" if why.get("entry") == history else "steered to another"
            elif why.get("verdict") == "over_bound":
                how = "over bound" if why.get("entry") == history else \
                    "other entry over bound"
            elif why:
                how = "no entry"
            else:
                how = "router"
            if r.get("handoff_from"):
                how += ", handed"
            elif why and why.get("p2c") == history and how != "steered":
                how += ", p2c drew it"
            path = f"{home}: {how}"
        key = f"{tenant} {path}"
        row = out.setdefault(key, {"requests": 0, "prompt": 0, "missed": 0})
        row["requests"] += 1
        row["prompt"] += r.get("prompt_tokens") or 0
        row["missed"] += (r.get("prompt_tokens") or 0) - (r.get("cached_tokens") or 0)
        if why.get("verdict") == "over_bound":
            excess.setdefault(key, []).append(why["entry_cost"] - why["best"])
    for key, row in out.items():
        row["missed_share"] = row["missed"] / total_missed
        if key in excess:
            row["over_by_p50"] = float(np.median(excess[key]))
    return dict(sorted(out.items()))


def miss_summary(misses: dict[str, dict[str, float]]) -> list[str]:
    """Per tenant: first turns, later turns on their history backend, later turns
    elsewhere -- requests, hit, and the points of the tenant's hit rate each path loses
    (what separates a mode from a router that keeps every conversation in place)."""
    lines = []
    for tenant in sorted({key.split(" ", 1)[0] for key in misses}):
        rows = {k.split(" ", 1)[1]: v for k, v in misses.items() if k.startswith(tenant + " ")}
        prompt = sum(v["prompt"] for v in rows.values()) or 1
        parts = []
        for label, test in (("first", lambda k: k == "first turn"),
                            ("on history", lambda k: k.startswith("on history")),
                            ("elsewhere", lambda k: k.startswith("elsewhere"))):
            group = [v for k, v in rows.items() if test(k)]
            n, tokens = sum(v["requests"] for v in group), sum(v["prompt"] for v in group)
            missed = sum(v["missed"] for v in group)
            hit = 1 - missed / tokens if tokens else 0.0
            parts.append(f"{label} {n:.0f} ({hit * 100:.0f}% hit, -{missed / prompt * 100:.1f} "
                         "pts)")
        lines.append(f"        {tenant}: " + ", ".join(parts))
    return lines


def hit_interval(records: list[dict[str, Any]], resamples: int = 2000,
                 confidence: float = 0.9) -> tuple[float, float] | None:
    """90% bootstrap interval of the hit rate the requests' usage reports (cached prompt
    tokens / prompt tokens, resampled by request): how much one run's hit rate can move."""
    pairs = np.array([(r.get("cached_tokens") or 0, r.get("prompt_tokens") or 0)
                      for r in records if r.get("ok") and r.get("prompt_tokens")], dtype=float)
    if len(pairs) < 2:
        return None
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(pairs), (resamples, len(pairs)))
    rates = pairs[picks, 0].sum(axis=1) / np.maximum(pairs[picks, 1].sum(axis=1), 1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(rates, [tail, 100 - tail])
    return float(low), float(high)


def p99_interval(ttft_s: list[float], resamples: int = 2000,
                 confidence: float = 0.9) -> tuple[float, float] | None:
    if len(ttft_s) < 2:
        return None
    values = np.asarray(ttft_s) * 1000
    rng = np.random.default_rng(0)
    p99s = np.percentile(rng.choice(values, (resamples, values.size)), 99, axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(p99s, [tail, 100 - tail])
    return float(low), float(high)


def fmt(value: Any, digits: int = 1, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.{digits}f}%" if pct else f"{value:.{digits}f}"


def report_group(label: str, results: dict[str, dict[str, Any]], verbose: bool = False
                 ) -> list[str]:
    lines = [f"\n{label}", "  mode                 valid  ok/req     hit    TTFT p50  TTFT p99  "
             "goodput  handoff  added p50/p99 ms   devices/appserver handoff, hit"]
    for mode, f in results.items():
        t = f["tenants"]
        dev, app = t.get(prefix.DEVICES, {}), t.get(prefix.APP_SERVER, {})
        lines.append(
            f"  {mode:20s} {'yes' if f['valid'] else 'NO':5s}  {f['ok']:4d}/{f['requests']:<4d} "
            f"{fmt(f['hit_rate'], 1, True):>6s}  {fmt(f['ttft_p50_ms']):>8s}  "
            f"{fmt(f['ttft_p99_ms']):>8s}  {fmt(f['goodput_rps'], 2):>7s}  "
            f"{fmt(f['handoff_share'], 1, True):>7s}  "
            f"{fmt(f['handoff_added_ms_p50'], 2)}/{fmt(f['handoff_added_ms_p99'], 2):<8s}   "
            f"{fmt(dev.get('handoff_share'), 0, True)}/{fmt(app.get('handoff_share'), 0, True)}, "
            f"{fmt(dev.get('hit_rate_usage'), 0, True)}/{fmt(app.get('hit_rate_usage'), 0, True)}")
        hi, pi = f.get("hit_interval"), f.get("p99_interval")
        lines.append("      90% bootstrap: hit (usage) "
                     + (f"[{hi[0] * 100:.1f}..{hi[1] * 100:.1f}]%" if hi else "-")
                     + ", TTFT p99 " + (f"[{pi[0]:.0f}..{pi[1]:.0f}] ms" if pi else "-")
                     + ", load avg {:.1f}/{:.1f}".format(*f["loadavg"][:2])
                     + (", switch affinity: {hits} steered, {over_bound} over the bound, "
                        "{entries} entries".format(**f["switch_affinity"])
                        if f.get("switch_affinity") else ""))
        if not f["valid"]:
            lines.append(f"      INVALID: {f['evidence']}")
        elif mode in prefix.L7_MODES:
            lines.append(f"      evidence: {f['evidence']}")
        if f.get("decisions"):
            lines.append("      handoff decisions: " + ", ".join(
                f"{k} {v:.0f}" for k, v in sorted(f["decisions"].items())))
        if f.get("refused"):
            lines.append("      refused at receipt (the holders' admit_check): " + ", ".join(
                f"{k} {v:.0f}" for k, v in sorted(f["refused"].items())))
        if f.get("queue"):
            q = f["queue"]
            lines.append(f"      queue (emulators): {q['requests']:.0f} requests, waited "
                         + ", ".join(f"<= {b} s {q[f'le_{b}'] * 100:.0f}%"
                                     for b in ("0.5", "1", "2", "5")))
        if f.get("claims"):
            c = f["claims"]
            lines.append(f"      claims: {c['claims']:.0f} keys claimed, "
                         f"{c['claims_confirmed']:.0f} confirmed by a KV report, "
                         f"{c['claims_dropped']:.0f} dropped by the bound")
        if f.get("misses"):
            lines += prefix_misses.describe(f["misses"])
        if f.get("copies", {}).get("apps"):
            c = f["copies"]
            lines.append(f"      system prompts computed again beyond each app's first "
                         f"(copies): {c['copies']} over {c['apps']} apps, "
                         f"{c['points']:.2f} points of the hit rate")
        lines += prefix_tail.describe(f.get("tail"))
        if verbose and f.get("turn_paths"):
            lines.append("      turns by path (requests, hit, points of the tenant's hit rate "
                         "lost):")
            lines += miss_summary(f["turn_paths"])
            lines.append("      uncached tokens by path (requests, hit, share of the misses"
                         "[, median score over the pair's best]):")
            for path, row in f["turn_paths"].items():
                hit = 1 - row["missed"] / row["prompt"] if row["prompt"] else 0.0
                lines.append(f"        {path:52s} {row['requests']:4.0f}  {hit * 100:5.1f}%"
                             f"  {row['missed_share'] * 100:5.1f}%"
                             + (f"  +{row['over_by_p50']:.0f}" if "over_by_p50" in row else ""))
    return lines


def targets(label: str, results: dict[str, dict[str, Any]], ours: str) -> list[str]:
    lines: list[str] = []
    if ours not in results:
        return lines
    me = results[ours]
    aware = {m: results[m] for m in prefix.CACHE_AWARE_L7 if m in results and results[m]["valid"]}
    l7 = {m: results[m] for m in prefix.L7_MODES if m in results and results[m]["valid"]}
    if aware:
        best = max(aware, key=lambda m: aware[m]["hit_rate"] or 0)
        ok = (me["hit_rate"] or 0) >= (aware[best]["hit_rate"] or 0)
        lines.append(f"  {label} {ours}: hit rate {fmt(me['hit_rate'], 1, True)} vs best L7 "
                     f"cache-aware ({best}) {fmt(aware[best]['hit_rate'], 1, True)}: "
                     f"{'PASS' if ok else 'FAIL'} (>=)")
        app = me["tenants"].get(prefix.APP_SERVER)
        if app is not None:
            ref = aware[best]["tenants"].get(prefix.APP_SERVER, {}).get("hit_rate_usage") or 0
            got = app.get("hit_rate_usage") or 0
            passed = got >= ref and (app.get("handoff_share") or 0) > 0
            lines.append(f"  {label} {ours}: app-server tenant hit {fmt(got, 1, True)} vs "
                         f"{best}'s {fmt(ref, 1, True)}, handed off "
                         f"{fmt(app.get('handoff_share'), 1, True)}: "
                         f"{'PASS' if passed else 'FAIL'}")
    for kind, group in (("L7 router's", l7), ("L7 cache-aware router's", aware)):
        if not group:
            continue
        best = min(group, key=lambda m: group[m]["ttft_p99_ms"] or float("inf"))
        interval = p99_ratio_interval(me["ttft_s"], group[best]["ttft_s"])
        if interval:
            ratio, low, high = interval
            lines.append(f"  {label} {ours}: TTFT p99 / best {kind} ({best}) = {ratio:.2f}"
                         f" [90% CI {low:.2f}..{high:.2f}]: "
                         f"{'PASS' if ratio <= 0.8 else 'FAIL'} (<= 0.8)")
    dev = me["tenants"].get(prefix.DEVICES)
    if dev is not None and base_mode(ours) == "prefix-affinity":
        share = dev.get("handoff_share") or 0
        lines.append(f"  {label} {ours}: per-device clients handed off {fmt(share, 1, True)}: "
                     f"{'PASS' if share <= 0.25 else 'FAIL'} (<= 25%)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--load", type=float, default=0.85)
    parser.add_argument("--kv-tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--modes", nargs="+", default=list(prefix.MODES))
    parser.add_argument("--workloads", nargs="+", default=["chat", "trace", "free"],
                        choices=["chat", "chat-overlap", "trace", "free"],
                        help="chat-overlap: the chat without the turn order (a "
                             "conversation's turns sent at their planned times even while "
                             "the previous one runs, as until session 6)")
    parser.add_argument("--trace-kv", type=int, nargs="+", default=None,
                        help="run the trace and prefix-free workloads at these KV sizes "
                             "only (default: the first of --kv-tokens)")
    parser.add_argument("--lookup-timeout", type=float, default=0.05,
                        help="the agents' handoff.lookup_timeout (s)")
    parser.add_argument("--affinity-bound", type=float, default=1.25,
                        help="the tenants' policy affinity_bound (the switch's load bound)")
    parser.add_argument("--handoff", action="append", default=[], metavar="KEY=VALUE",
                        help="an agent handoff setting (docs/agent.md), e.g. home_weight=0")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V",
                        help="also run mode prefix-affinity@NAME: the agents restarted with "
                             "these handoff settings (same emulators, controller, routers), "
                             "e.g. old:home_weight=0,report_local=false,min_ratio=1.2; "
                             "affinity_bound=B and affinity_slack=S (load units) set the "
                             "emulated switch's rule instead")
    parser.add_argument("--misses", action="store_true",
                        help="print where each mode's uncached prompt tokens went "
                             "(miss_breakdown: on the conversation's history backend or not, "
                             "and why)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "prefix-bench")
    args = parser.parse_args()
    try:
        handoff = handoff_overrides(args.handoff)
        variants: dict[str, dict[str, Any]] = {}
        for item in args.variant:
            name, _, settings = item.partition(":")
            variant = parse_assignments(s for s in settings.split(",") if s)
            # the agents' keys checked as the lab's --handoff; the rest the switch's
            check_handoff_overrides({k: v for k, v in variant.items()
                                     if k not in SWITCH_KEYS})
            variants[f"prefix-affinity@{name}"] = variant
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    print(f"prefix bench: speeds {SPEEDS}, {EMULATOR_MAX_NUM_SEQS} slots, load "
          f"{args.load:.0%}, {args.duration:g} s a run, KV sizes {args.kv_tokens} tokens; "
          f"uptime: {os.popen('uptime').read().strip()}")
    chat = prefix.chat_workload(args.duration, SPEEDS, args.load)
    plans = {"chat": chat, "chat-overlap": chat,
             "trace": prefix.trace_workload(args.duration, SPEEDS, args.load),
             "free": prefix.prefix_free_workload(args.duration, SPEEDS, args.load)}
    trace_kv = args.trace_kv or [args.kv_tokens[0]]
    everything: dict[str, dict[str, dict[str, Any]]] = {}
    lines: list[str] = []
    printed = 0
    for kv in args.kv_tokens:
        wanted = [w for w in args.workloads if w.startswith("chat") or kv in trace_kv]
        if not wanted:
            continue
        cluster = Cluster(out / f"kv{kv}", kv, args.modes, args.lookup_timeout,
                          args.affinity_bound, handoff)
        try:
            cluster.start()
            if any(base_mode(m) in prefix.HANDOFF_MODES for m in args.modes + list(variants)):
                # the agents' first lookups and relays open their connections: not measured
                print("  warming up the handoff path (4 s, not measured)", flush=True)
                warm = [p for p in plans[wanted[0]] if p.offset < 4.0]
                asyncio.run(run_mode(cluster, "prefix", warm,
                                     "chat" if wanted[0].startswith("chat") else "completions",
                                     4.0))
            for workload in wanted:
                modes = [m for m in args.modes + list(variants)
                         if workload != "free" or base_mode(m) in ("p2c", *prefix.HANDOFF_MODES)]
                label = f"{workload}, KV {kv} tokens, {len(plans[workload])} requests"
                results: dict[str, dict[str, Any]] = {}
                for mode in modes:
                    if mode in prefix.L7_MODES and mode not in cluster.routers:
                        continue
                    print(f"  running {label}: {mode}", flush=True)
                    results[mode] = one_run(cluster, mode, workload, plans[workload],
                                            args.duration, cluster.folder, variants)
                everything[f"{workload} kv{kv}"] = results
                lines += report_group(label, results, args.misses)
                ours_modes = [m for m in results if base_mode(m) in prefix.HANDOFF_MODES]
                for ours in ours_modes:
                    if workload != "free":
                        lines += targets(f"[{workload} kv{kv}]", results, ours)
                for ours in ours_modes:
                    if workload != "free" or "p2c" not in results:
                        continue
                    ratio, low, high = p99_ratio_interval(results[ours]["ttft_s"],
                                                          results["p2c"]["ttft_s"]) or (0, 0, 0)
                    lines.append(f"  [free kv{kv}] {ours} TTFT p99 / p2c's = {ratio:.2f} "
                                 f"[90% CI {low:.2f}..{high:.2f}]: "
                                 f"{'PASS' if ratio <= 1.05 else 'FAIL'} (<= 1.05)")
                print("\n".join(lines[printed:]), flush=True)
                printed = len(lines)
        finally:
            cluster.stop()
    (out / "summary.json").write_text(json.dumps(
        {k: {m: {x: y for x, y in f.items() if x != "ttft_s"} for m, f in v.items()}
         for k, v in everything.items()}, indent=2))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    with contextlib.suppress(Exception):
        prefix.plot_modes({k: v for k, v in everything.items()}, out / "modes.png",
                          "prefix experiment (bench, 127.0.0.1)")
    print("\n".join(lines))
    print(f"\nresults: {out}; uptime: {os.popen('uptime').read().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
