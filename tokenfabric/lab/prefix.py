"""Experiment `prefix` (issue 15 item 7): prefix-cache-aware steering against L7 routers.

Shared by the Mininet lab (experiment `prefix`) and bench/bench_prefix_handoff.py
(the same modes on 127.0.0.1 with an emulated switch):

- modes: `p2c` (today: the switch's power-of-two-choices on the agents' LOAD beacons),
  `prefix` (p2c plus the bridges' prefix handoff, hostagent/handoff.py), `prefix-affinity`
  (plus the switch's bounded-load client affinity, issue 15 item 4 -- pluggable: the
  lab's switch gets it from the affinity branch; the bench emulates it), and the L7
  baselines `vllm-cache_aware`, `vllm-power_of_two` (vllm-router) and `sglang-cache_aware`
  (sglang-router);
- workloads: the multi-turn chat generator with a per-device tenant (one address per
  conversation) and an app-server tenant (one address for all), the Mooncake-format sample
  trace, and a prefix-free one (unique prompts), each scaled to a share of the backends'
  capacity;
- evidence that each baseline did what it claims (`baseline_evidence`): a run whose
  router fell back (vllm-router's `render_unavailable`, no `/render` calls) is invalid;
- the figures per mode (`mode_figures`): prefix-cache hit rate from the emulators'
  vLLM counters, TTFT p50/p99, goodput, handoff share and the handoff's added latency.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tokenfabric.lab.experiments import (
    EMULATOR_DECODE_BASE_MS,
    EMULATOR_MAX_NUM_SEQS,
    EMULATOR_PREFILL_MS_PER_TOKEN,
)
from tokenfabric.lab.results import summarize
from tokenfabric.lab.workloads import (
    ChatApp,
    ChatSpec,
    ChatTenant,
    Planned,
    TraceSpec,
    plan_chat,
    plan_trace,
)

MODES = ("p2c", "prefix", "prefix-affinity", "vllm-cache_aware", "vllm-power_of_two",
         "sglang-cache_aware")
HANDOFF_MODES = ("prefix", "prefix-affinity")
L7_MODES: dict[str, tuple[str, str]] = {   # mode -> (router binary, its policy)
    "vllm-cache_aware": ("vllm-router", "cache_aware"),
    "vllm-power_of_two": ("vllm-router", "power_of_two"),
    "sglang-cache_aware": ("sglang-router", "cache_aware"),
}
CACHE_AWARE_L7 = ("vllm-cache_aware", "sglang-cache_aware")
DEVICES, APP_SERVER = "devices", "appserver"
# the handoff opt-in is the tenant's (policy `prefix_affinity`): the same clients are
# sent as these tenants in the handoff modes and as the plain ones otherwise
OPTED_IN = {DEVICES: "devices-aff", APP_SERVER: "appserver-aff", "trace": "trace-aff",
            "plain": "plain-aff"}
SAMPLE_TRACE = Path(__file__).resolve().parents[2] / "examples" / "traces" / \
    "sample-mooncake.jsonl"
SLO_TTFT_MS = 1000.0
SLO_TPOT_MS = 200.0


def router_command(mode: str, binary: str, host: str, port: int, workers: Sequence[str],
                   metrics_port: int) -> list[str]:
    """The L7 router of `mode`, over `workers` (the emulators' URLs), logging enough to
    show what it did (vllm-router's debug log names each cache decision). Both routers
    export Prometheus metrics on 29000 by default: each gets its own port."""
    name, policy = L7_MODES[mode]
    metrics = ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    if name == "vllm-router":
        return [binary, "--host", host, "--port", str(port), "--policy", policy,
                "--worker-urls", *workers, "--log-level", "debug", "--disable-retries",
                *metrics]
    return [binary, "launch", "--host", host, "--port", str(port), "--policy", policy,
            "--worker-urls", *workers, "--log-level", "debug", *metrics]


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# sglang-router names its policy once, at start-up ("Assigning policy cache_aware to new
# model ..."); not its periodic tree-eviction line, whose source path reads cache_aware.rs
SGLANG_POLICY = re.compile(r"\bpolicy[ :=]+(?:cache[_-]?aware|CacheAware)\b|"
                           r"cache-aware policy with \d+ workers")
SGLANG_ROUTED = re.compile(r"Sending request url=")


def baseline_evidence(mode: str, router_log: str, render_calls: float,
                      requests: int, startup_log: str | None = None) -> tuple[bool, str]:
    """Did the L7 baseline do what it claims? (valid, what shows it). `router_log`: the
    router's log written during the run; `startup_log`: its log from its start, when the
    run's part leaves out the start-up (the lab's repeated rounds share one router)."""
    text = _strip_ansi(router_log)
    name, policy = L7_MODES[mode]
    if name == "vllm-router" and policy == "cache_aware":
        if "render_unavailable" in text:
            return False, "vllm-router logged render_unavailable: it routed without prefixes"
        # it asks every worker for token ids per request; it logs a cache decision when
        # the load is balanced enough to route by prefix (else it balances by load)
        decisions = len(re.findall(r"Cache prefix decision", text))
        if render_calls < requests or decisions == 0:
            return False, (f"vllm-router cache_aware: {render_calls:.0f} /render calls and "
                           f"{decisions} cache decisions for {requests} requests")
        return True, (f"{decisions} cache-prefix decisions in its log, {render_calls:.0f} "
                      "/render calls at the emulators, no render_unavailable")
    if name == "vllm-router":
        return True, f"vllm-router policy {policy}; no token calls needed"
    # sglang-router's cache_aware is a radix tree over the request text: no token calls;
    # its start-up names the policy, and its debug log names each routed request's worker
    started = _strip_ansi(startup_log) if startup_log is not None else text
    if SGLANG_POLICY.search(started) is None:
        return False, "sglang-router's log does not name the cache_aware policy"
    routed = len(SGLANG_ROUTED.findall(text))
    if routed < requests:
        return False, (f"sglang-router logged {routed} routed requests for {requests}: "
                       "the run did not go through it")
    return True, (f"sglang-router started with the cache_aware policy (text radix tree), "
                  f"{routed} requests routed by it")


# -- workloads ----------------------------------------------------------------------------
def chat_spec(duration: float, seed: int = 1, apps: int = 6, system_tokens: int = 480,
              user_tokens: int = 40, output_tokens: int = 16,
              conversations_per_s: float = 1.0) -> ChatSpec:
    """Chat with shared system prompts, many turns; per-device clients and an app server
    (half the conversations each)."""
    return ChatSpec(apps=[ChatApp(f"app{i}", system_tokens) for i in range(apps)],
                    tenants=[ChatTenant(DEVICES, clients="10.0.1.0/25"),
                             ChatTenant(APP_SERVER, app_server="10.0.1.200")],
                    conversations_per_s=conversations_per_s, duration=duration,
                    turns_min=3, turns_max=8, think_s=3.0, user_tokens=user_tokens,
                    output_tokens=output_tokens, seed=seed)


def capacity_rps(planned: Sequence[Planned], speeds: Sequence[float]) -> float:
    """Requests per second the emulators serve at saturation without prefix hits, from
    their step model: a step's prefill stalls the whole batch, a decode step is shared by
    the `max_num_seqs` running requests. (The lab's ShareGPT-like prompts are so short
    that experiments.capacity_rps ignores the first; these prompts are not.)"""
    prompt = np.mean([len(p.prompt.split()) for p in planned])
    output = np.mean([p.output_tokens for p in planned])
    per_request = (prompt * EMULATOR_PREFILL_MS_PER_TOKEN
                   + output * EMULATOR_DECODE_BASE_MS / EMULATOR_MAX_NUM_SEQS) / 1000
    return float(sum(speeds) / per_request)


def at_load(planned: list[Planned], speeds: Sequence[float], load: float) -> list[Planned]:
    """The same requests with their times scaled so that they offer `load` x the backends'
    capacity (`capacity_rps`)."""
    if len(planned) < 2:
        return planned
    capacity = capacity_rps(planned, speeds)
    span = max(p.offset for p in planned) - min(p.offset for p in planned)
    rate = len(planned) / max(span, 1e-9)
    factor = rate / (load * capacity)
    return [dataclasses.replace(p, offset=p.offset * factor) for p in planned]


def chat_workload(duration: float, speeds: Sequence[float], load: float,
                  seed: int = 1) -> list[Planned]:
    planned = plan_chat(chat_spec(duration * 3, seed))
    return [p for p in at_load(planned, speeds, load) if p.offset < duration]


def trace_workload(duration: float, speeds: Sequence[float], load: float,
                   path: str | Path = SAMPLE_TRACE, length_scale: float = 0.25,
                   block_tokens: int = 512) -> list[Planned]:
    """The Mooncake-format trace, lengths scaled (0.25: a 512-token block becomes 128
    words), time scaled to the load; one tenant `trace`."""
    planned = plan_trace(TraceSpec(str(path), block_tokens=block_tokens,
                                   length_scale=length_scale))
    planned = [dataclasses.replace(p, tenant="trace",
                                   output_tokens=max(1, min(p.output_tokens, 32)))
               for p in planned]
    return [p for p in at_load(planned, speeds, load) if p.offset < duration]


def prefix_free_workload(duration: float, speeds: Sequence[float], load: float,
                         seed: int = 3) -> list[Planned]:
    """Unique prompts (nothing shared beyond chance), ShareGPT-like lab lengths."""
    from tokenfabric.lab.experiments import LAB_LENGTHS
    rng = np.random.default_rng(seed)
    count = 4096
    prompts, outputs = LAB_LENGTHS.sample(rng, count)
    planned = [Planned(float(i), " ".join(f"n{i}w{j}" for j in range(int(prompts[i]))),
                       int(outputs[i]), "plain") for i in range(count)]
    scaled = at_load(planned, speeds, load)
    # Poisson arrivals at the scaled mean gap
    gap = scaled[1].offset - scaled[0].offset
    times = np.cumsum(rng.exponential(gap, count))
    return [dataclasses.replace(p, offset=float(t)) for p, t in zip(scaled, times, strict=True)
            if t < duration]


# -- figures ------------------------------------------------------------------------------
def hit_rate(before: dict[str, tuple[float, float]],
             after: dict[str, tuple[float, float]]) -> float | None:
    """vLLM's prefix-cache hit rate over a run: sum of hits / sum of queries (tokens),
    from each emulator's `vllm:prefix_cache_hits`/`queries` counters before and after."""
    hits = sum(after[n][0] - before.get(n, (0.0, 0.0))[0] for n in after)
    queries = sum(after[n][1] - before.get(n, (0.0, 0.0))[1] for n in after)
    return hits / queries if queries > 0 else None


def metric_sums(texts: Sequence[str], sample: str, label: str | None = None
                ) -> dict[str, float]:
    """The samples named `sample` in these /metrics texts, summed by the value of `label`
    (None: all under ""), with prometheus_client's parser."""
    out: dict[str, float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == sample:
                    key = s.labels.get(label, "") if label else ""
                    out[key] = out.get(key, 0.0) + s.value
    return out


def prefix_counters(metrics_text: str) -> tuple[float, float]:
    """(hits, queries) of one emulator's /metrics."""
    def total(name: str) -> float:
        return metric_sums([metrics_text], name).get("", 0.0)
    return total("vllm:prefix_cache_hits_total"), total("vllm:prefix_cache_queries_total")


def token_calls(metrics_text: str, endpoint: str) -> float:
    found = re.search(r'tokenfabric_emulator_token_requests_total\{endpoint="'
                      + re.escape(endpoint) + r'"\} ([0-9.e+]+)', metrics_text)
    return float(found.group(1)) if found else 0.0


def base_tenant(name: str) -> str:
    for base, opted in OPTED_IN.items():
        if name == opted:
            return base
    return name


def mode_figures(records: Sequence[dict[str, Any]], hits: float | None,
                 duration: float) -> dict[str, Any]:
    """One mode's figures (all tenants, and per tenant)."""
    def figures(group: Sequence[dict[str, Any]]) -> dict[str, Any]:
        s = summarize(group, duration=duration)
        ok = [r for r in group if r.get("ok")]
        handed = [r for r in ok if r.get("handoff_from")]
        added = [r["handoff_ms"] for r in handed if r.get("handoff_ms") is not None]
        prompt = sum(r.get("prompt_tokens") or 0 for r in ok)
        cached = sum(r.get("cached_tokens") or 0 for r in ok)
        return {"requests": len(group), "ok": len(ok),
                "ttft_p50_ms": s.ttft_p50_ms, "ttft_p99_ms": s.ttft_p99_ms,
                "goodput_rps": s.goodput_rps, "slo_attainment": s.slo_attainment,
                "handoff_share": len(handed) / len(ok) if ok else None,
                "handoff_added_ms_p50": float(np.percentile(added, 50)) if added else None,
                "handoff_added_ms_p99": float(np.percentile(added, 99)) if added else None,
                "hit_rate_usage": cached / prompt if prompt else None}
    out = figures(records)
    out["hit_rate"] = hits
    tenants = sorted({base_tenant(str(r.get("tenant"))) for r in records})
    out["tenants"] = {t: figures([r for r in records if base_tenant(str(r.get("tenant"))) == t])
                      for t in tenants}
    return out


def _error_bars(values: list[float], figures: list[dict[str, Any]], key: str
                ) -> np.ndarray | None:
    """matplotlib's yerr (2 x n: below, above) from each figure's (low, high) interval."""
    if not any(f.get(key) for f in figures):
        return None
    below = [max(0.0, v - f[key][0]) if f.get(key) else 0.0 for v, f in zip(values, figures,
                                                                           strict=True)]
    above = [max(0.0, f[key][1] - v) if f.get(key) else 0.0 for v, f in zip(values, figures,
                                                                           strict=True)]
    return np.array([below, above])


def plot_modes(results: dict[str, dict[str, dict[str, Any]]], path: str | Path,
               title: str) -> None:
    """Bars per mode: hit rate and TTFT p99, one group per workload/KV size; where a
    mode's figures carry a bootstrap interval (`hit_rate_usage_ci`, `ttft_p99_ci`, the
    lab's repeated runs), the hit rate bar is the usage's and both get error bars."""
    from tokenfabric.lab.results import _pyplot
    plt = _pyplot()
    groups = list(results)
    modes = [m for m in MODES if any(m in results[g] for g in groups)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(modes))
    for k, mode in enumerate(modes):
        xs = [i + k * width for i in range(len(groups))]
        figures = [results[g].get(mode) or {} for g in groups]
        hit_key = "hit_rate_usage" if any(f.get("hit_rate_usage_ci") for f in figures) \
            else "hit_rate"
        hit = [f.get(hit_key) or 0 for f in figures]
        p99 = [f.get("ttft_p99_ms") or 0 for f in figures]
        axes[0].bar(xs, hit, width, label=mode, yerr=_error_bars(hit, figures,
                                                                  "hit_rate_usage_ci"))
        axes[1].bar(xs, p99, width, label=mode, yerr=_error_bars(p99, figures, "ttft_p99_ci"))
    for ax, label in ((axes[0], "prefix-cache hit rate"), (axes[1], "TTFT p99 (ms)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, fontsize=8)
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
