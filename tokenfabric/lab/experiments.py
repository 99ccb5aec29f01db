"""The lab's experiments as data: tenants, backends, runs (mode x offered load) and events.

Offered load is a fraction of the emulated backends' total capacity, computed
from the emulator's step model (hostagent/engine.py): a request holds one of a
backend's `max_num_seqs` slots for about prompt * prefill + output * decode_step,
divided by the backend's speed. docs/lab.md shows the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenfabric.lab.loadgen import LengthDist
from tokenfabric.lab.results import DEFAULT_MIN_OK

# Emulator settings of the lab (flags of `tokenfabric vllm-emulator`): few slots and a
# slower step than an A100, so that a 2-core machine running BMv2 can saturate them.
EMULATOR_MAX_NUM_SEQS = 4
EMULATOR_DECODE_BASE_MS = 20.0
EMULATOR_PREFILL_MS_PER_TOKEN = 0.1
# ShareGPT-like lengths scaled down 10x: an emulated request lasts ~0.7 s at speed 1.
LAB_LENGTHS = LengthDist(scale=0.1, minimum=4, maximum=256)


def mean_service_seconds(lengths: LengthDist = LAB_LENGTHS, samples: int = 50_000) -> float:
    """Mean time one request holds an emulator slot at speed 1 (clipping included)."""
    prompts, outputs = lengths.sample(np.random.default_rng(0), samples)
    return float(np.mean(prompts * EMULATOR_PREFILL_MS_PER_TOKEN
                         + outputs * EMULATOR_DECODE_BASE_MS) / 1000)


def capacity_rps(speeds: list[float], lengths: LengthDist = LAB_LENGTHS) -> float:
    """Requests per second the backends serve at saturation."""
    return sum(speeds) * EMULATOR_MAX_NUM_SEQS / mean_service_seconds(lengths)


MODES = ("ecmp", "weights", "p2c", "l7-router")
# experiment `prefix`'s modes in the lab (tokenfabric/lab/prefix.py has them all; `prefix`,
# the handoff without the switch's affinity, needs a knob the policy does not have yet)
PREFIX_MODES = ("p2c", "prefix-affinity", "vllm-cache_aware", "vllm-power_of_two",
                "sglang-cache_aware")
# experiment `prefix`'s workloads (tokenfabric/lab/prefix.py): the multi-turn chat, a
# replayed Mooncake-format trace, unique prompts (prefix-free: what affinity costs)
PREFIX_WORKLOADS = ("chat", "trace", "free")


@dataclass(frozen=True)
class LabTenant:
    name: str
    traffic_class: str
    weight: float  # share of the offered load
    slo_ttft_ms: float
    slo_tpot_ms: float
    tokens_per_s: float | None = None  # the contract's token limit (None: unlimited)
    # The contract's request_priority (Gateway API Inference Extension: higher is more
    # important); the bridge turns it into vLLM's `priority` (lower is served first).
    request_priority: int = 0


@dataclass(frozen=True)
class Event:
    at: float  # seconds after the load starts
    kind: str  # kill_backend | reload_policy
    target: str | None = None


@dataclass(frozen=True)
class Run:
    mode: str  # ecmp | weights | p2c | l7-router
    load: float  # fraction of capacity
    events: tuple[Event, ...] = ()
    repeat: int = 0  # which repetition of (mode, load) this is (--repeat; experiment prefix)

    @property
    def key(self) -> str:
        """The run's folder name under runs/: one per mode, load and repetition."""
        return f"{self.mode}-{self.load:g}" + (f"-r{self.repeat}" if self.repeat else "")


@dataclass
class Experiment:
    name: str
    title: str
    speeds: list[float]
    tenants: list[LabTenant]
    runs: list[Run]
    duration: float  # seconds of arrivals per run
    arrival: str = "poisson"
    needs_router: bool = False
    needs_vllm: bool = False
    lengths: LengthDist = field(default_factory=lambda: LAB_LENGTHS)
    # The share of the requests not shed by the policy (429) that must succeed; an
    # experiment that expects failures states its own, and why.
    min_ok: float = DEFAULT_MIN_OK
    min_ok_why: str = ""
    # FAULT INJECTION: this backend's agent bills `bill_factor` x the completion tokens it
    # served (hostagent config bill_factor): the controller's cross-check must flag it.
    liar: str | None = None
    bill_factor: float = 3.0
    # controller replicas on a PostgreSQL ledger (experiment `ha`; docs/replicas.md)
    replicas: int = 1
    # experiment `prefix` (tokenfabric/lab/prefix_lab.py): the emulators' KV cache in
    # tokens (evicting, with KV events), the agents' handoff, the chat workload
    kv_cache_tokens: int | None = None
    # experiment `prefix`: what the clients send (PREFIX_WORKLOADS) and, for `trace`, the
    # Mooncake-format file (default: prefix.SAMPLE_TRACE)
    workload: str = "chat"
    trace_path: str | None = None
    # experiment `prefix`: handoff settings over the agents' defaults and the lab's own
    # (`--handoff KEY=VALUE`, hostagent.config.handoff_overrides), e.g. lookup_timeout
    handoff: dict[str, Any] = field(default_factory=dict)

    @property
    def lookup_timeout(self) -> float | None:
        """The agents' prefix-index lookup budget in s (None: the agent's default, 50 ms)."""
        value = self.handoff.get("lookup_timeout")
        return None if value is None else float(value)

    def capacity(self) -> float:
        return capacity_rps(self.speeds, self.lengths)


PREMIUM_PRIORITY = 10
PREMIUM = LabTenant("gold", "premium", 1.0, slo_ttft_ms=500, slo_tpot_ms=60,
                    request_priority=PREMIUM_PRIORITY)
STANDARD = LabTenant("bulk", "best-effort", 1.0, slo_ttft_ms=2000, slo_tpot_ms=120)
HETERO = [1.0, 1.0, 0.5, 0.5]


def experiment(name: str, duration: float | None = None) -> Experiment:
    """The named experiment; `duration` overrides its seconds of load per run."""
    if name == "quick":
        exp = Experiment("quick", "quick check: two tenants, two backends, p2c at 50%",
                         [1.0, 1.0], [PREMIUM, STANDARD], [Run("p2c", 0.5)], 10.0)
    elif name == "modes":
        loads = (0.5, 0.7, 0.85, 1.0)
        exp = Experiment("modes", "routing modes on heterogeneous backends (1, 1, 0.5, 0.5)",
                         HETERO, [STANDARD],
                         [Run(m, f) for m in MODES for f in loads], 30.0,
                         needs_router=True)
    elif name == "overload":
        # Premium offers 40% of capacity; best-effort 160% on its own, and its contract
        # (100 tokens/s, ~2 requests/s of the lab's lengths) admits a fraction of that.
        premium = LabTenant("gold", "premium", 1.0, 500, 60,
                            request_priority=PREMIUM_PRIORITY)
        bulk = LabTenant("bulk", "best-effort", 4.0, 2000, 120, tokens_per_s=100.0)
        exp = Experiment("overload", "premium vs best-effort under overload", HETERO,
                         [premium, bulk], [Run("p2c", 2.0)], 30.0)
    elif name == "failover":
        exp = Experiment("failover", "a backend killed mid-run", [1.0, 1.0, 1.0, 1.0],
                         [STANDARD], [Run("p2c", 0.6, (Event(10.0, "kill_backend",
                                                              "tflb2"),))], 25.0,
                         min_ok=0.9, min_ok_why="a backend is SIGKILLed mid-run: the "
                         "requests in flight on it, and new ones before the switch "
                         "learns of it, fail; docs/lab.md has 3 of 365 on BMv2")
    elif name == "reload":
        exp = Experiment("reload", "a policy reload under load", [1.0, 1.0],
                         [PREMIUM, STANDARD], [Run("p2c", 0.6, (Event(8.0, "reload_policy"),))],
                         20.0)
    elif name == "billing":
        exp = Experiment("billing", "one agent bills 3x what it streams (cross-check)",
                         [1.0, 1.0, 1.0], [PREMIUM, STANDARD], [Run("p2c", 0.6)], 90.0,
                         liar="tflb2")
    elif name == "ha":
        exp = Experiment("ha", "controller replicas: the leader SIGKILLed under load, then "
                         "restarted", [1.0, 1.0, 1.0], [PREMIUM, STANDARD],
                         [Run("p2c", 0.5, (Event(10.0, "kill_controller"),
                                           Event(20.0, "restart_controller")))], 30.0,
                         replicas=2)
    elif name == "prefix":
        # issue 15 item 7: per-device clients (one address per conversation) and an app
        # server; modes from tokenfabric/lab/prefix.py; 85% of the chat's capacity
        devices = LabTenant("devices", "best-effort", 1.0, slo_ttft_ms=1000, slo_tpot_ms=200)
        appserver = LabTenant("appserver", "best-effort", 1.0, slo_ttft_ms=1000,
                              slo_tpot_ms=200)
        exp = Experiment("prefix", "prefix-cache-aware steering against L7 cache-aware "
                         "routers (chat, KV 4096 tokens)", HETERO, [devices, appserver],
                         [Run(m, 0.85) for m in PREFIX_MODES], 30.0, kv_cache_tokens=4096)
    elif name == "realvllm":
        exp = Experiment("realvllm", "a real vLLM backend beside emulated ones", [1.0, 1.0],
                         [STANDARD], [Run("p2c", 0.3)], 20.0, needs_vllm=True)
    else:
        raise ValueError(f"unknown experiment {name!r}")
    if duration is not None:
        exp.duration = duration
        exp.runs = [Run(r.mode, r.load, tuple(Event(min(e.at, duration / 2), e.kind, e.target)
                                              for e in r.events), r.repeat)
                    for r in exp.runs]
    return exp


EXPERIMENTS = ("quick", "modes", "overload", "failover", "reload", "realvllm", "billing",
               "ha", "prefix")
