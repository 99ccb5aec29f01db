"""Scrape a vLLM server's /metrics into a small snapshot the agent reasons with.

Understands the current metric names and the older ones (vllm:gpu_cache_usage_perc before
vllm:kv_cache_usage_perc; vllm:time_per_output_token_seconds before
vllm:inter_token_latency_seconds). Values of several engines (label `engine`) or models
are summed, except the KV-cache use, which is their mean.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

KV_USAGE_NAMES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
ITL_NAMES = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")


class ScrapeError(Exception):
    """/metrics could not be fetched or parsed."""


@dataclass
class VllmCounters:
    """vLLM's cumulative counters under one set of names: as the emulator keeps them
    (engine.EngineStats) and as the agent scrapes them (VllmSnapshot)."""

    preemptions: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    prefix_cache_queries: float = 0.0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: float = 0.0  # of those, the tokens found cached


@dataclass
class VllmSnapshot(VllmCounters):
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    requests_finished: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    itl_sum: float = 0.0
    itl_count: float = 0.0
    queue_time_sum: float = 0.0
    queue_time_count: float = 0.0
    names: str = "current"          # which metric-name set the server spoke
    taken_at: float = field(default_factory=time.monotonic)

    def as_report(self) -> dict:
        body = asdict(self)
        body.pop("taken_at")
        return body


def parse(text: str) -> VllmSnapshot:
    """Parse Prometheus text exposition into a snapshot; ScrapeError if it is not that."""
    samples: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(float(sample.value))
    except (ValueError, TypeError, IndexError) as exc:
        raise ScrapeError(f"not Prometheus text: {exc}") from exc
    if not any(name.startswith("vllm:") for name in samples):
        raise ScrapeError("no vllm:* metrics in the exposition")

    def total(*names: str) -> float:
        for name in names:
            if name in samples:
                return sum(samples[name])
        return 0.0

    snap = VllmSnapshot()
    snap.running = total("vllm:num_requests_running")
    snap.waiting = total("vllm:num_requests_waiting")
    for name in KV_USAGE_NAMES:
        if name in samples:
            values = samples[name]
            snap.kv_cache_usage = sum(values) / len(values)
            snap.names = "current" if name == KV_USAGE_NAMES[0] else "legacy"
            break
    snap.preemptions = total("vllm:num_preemptions_total", "vllm:num_preemptions")
    snap.prompt_tokens = total("vllm:prompt_tokens_total")
    snap.generation_tokens = total("vllm:generation_tokens_total")
    snap.requests_finished = total("vllm:request_success_total")
    snap.prefix_cache_queries = total("vllm:prefix_cache_queries_total",
                                      "vllm:gpu_prefix_cache_queries_total")
    snap.prefix_cache_hits = total("vllm:prefix_cache_hits_total",
                                   "vllm:gpu_prefix_cache_hits_total")
    snap.ttft_sum = total("vllm:time_to_first_token_seconds_sum")
    snap.ttft_count = total("vllm:time_to_first_token_seconds_count")
    snap.itl_sum = total(*(n + "_sum" for n in ITL_NAMES))
    snap.itl_count = total(*(n + "_count" for n in ITL_NAMES))
    snap.queue_time_sum = total("vllm:request_queue_time_seconds_sum")
    snap.queue_time_count = total("vllm:request_queue_time_seconds_count")
    return snap


async def scrape(session: aiohttp.ClientSession, base_url: str,
                 timeout: float = 1.0) -> VllmSnapshot:
    url = base_url.rstrip("/") + "/metrics"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
            if reply.status != 200:
                raise ScrapeError(f"{url}: HTTP {reply.status}")
            text = await reply.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ScrapeError(f"{url}: {exc.__class__.__name__}: {exc}") from exc
    return parse(text)


async def healthy(session: aiohttp.ClientSession, base_url: str, timeout: float = 1.0) -> bool:
    """vLLM's /health answers 200 when the engine is alive."""
    try:
        async with session.get(base_url.rstrip("/") + "/health",
                               timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
            return reply.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
