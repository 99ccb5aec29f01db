"""Scraping vLLM's /metrics (both metric-name sets) and the load function."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from tokenfabric.beacon import LOAD_FULL
from tokenfabric.hostagent.emulator import Emulator, EmulatorConfig
from tokenfabric.hostagent.engine import EngineParams
from tokenfabric.hostagent.load import compute_load
from tokenfabric.hostagent.metrics import ScrapeError, healthy, parse, scrape

# What vLLM 0.6-era servers exported (names before the V1 engine), trimmed.
LEGACY_VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{model_name="m"} 4.0
# HELP vllm:time_per_output_token_seconds Histogram of time per output token in seconds.
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="m"} 10.0
vllm:time_per_output_token_seconds_count{model_name="m"} 10.0
vllm:time_per_output_token_seconds_sum{model_name="m"} 0.5
"""

# Current names with two engines (data parallel): gauges add up, KV use is their mean.
CURRENT_TWO_ENGINES = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 5.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
vllm:num_requests_waiting{engine="1",model_name="m"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.1
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 32.0
"""


def test_parse_legacy_names():
    snap = parse(LEGACY_VLLM_TEXT)
    assert (snap.running, snap.waiting, snap.kv_cache_usage) == (3, 2, 0.25)
    assert snap.preemptions == 4 and snap.names == "legacy"
    assert (snap.itl_count, snap.itl_sum) == (10, 0.5)


def test_parse_current_names_over_engines():
    snap = parse(CURRENT_TWO_ENGINES)
    assert (snap.running, snap.waiting) == (6, 7)
    assert snap.kv_cache_usage == pytest.approx(0.3)
    assert snap.prefix_cache_hits == 32 and snap.names == "current"


@pytest.mark.parametrize("text", ["", "garbage{{{ 1 2 3", "# TYPE x gauge\nx 1\n"])
def test_not_vllm_metrics_is_a_scrape_error(text):
    with pytest.raises(ScrapeError):
        parse(text)


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
async def test_scrape_the_emulator_over_http(legacy, unused_tcp_port):
    emulator = Emulator(EmulatorConfig(model="m", legacy_metrics=legacy,
                                       engine=EngineParams(decode_base_s=0.05)))
    runner = web.AppRunner(emulator.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    url = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        for i in range(3):  # three requests running, while the scrape happens
            emulator.engine.submit([f"t{j}" for j in range(100)], 50 + i)
        emulator.engine.step()
        async with aiohttp.ClientSession() as session:
            snap = await scrape(session, url)
            assert await healthy(session, url)
            with pytest.raises(ScrapeError, match="404"):
                await scrape(session, url + "/nothing")
    finally:
        await runner.cleanup()
    assert snap.running == 3 and snap.waiting == 0
    assert snap.kv_cache_usage == pytest.approx(300 / 430_000, rel=0.01)
    assert snap.names == ("legacy" if legacy else "current")
    assert snap.prompt_tokens == 300


async def test_scrape_of_nothing_fails_cleanly(unused_tcp_port):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ScrapeError):
            await scrape(session, f"http://127.0.0.1:{unused_tcp_port}", timeout=0.5)
        assert not await healthy(session, f"http://127.0.0.1:{unused_tcp_port}")


def test_load_idle_full_and_queueing():
    assert compute_load(0, 0, 0.0, capacity=8).load == 0
    assert compute_load(8, 0, 0.2, capacity=8).load == LOAD_FULL
    assert compute_load(2, 0, 1.0, capacity=8).load == LOAD_FULL  # the KV cache binds first
    over = compute_load(8, 4, 0.5, capacity=8)
    assert over.load == LOAD_FULL + LOAD_FULL // 2 and (over.running, over.waiting) == (8, 4)
    assert compute_load(4, 0, 0.1, capacity=8).load == 500


def test_load_counts_the_bridges_requests_between_scrapes():
    fig = compute_load(1, 0, 0.0, capacity=4, in_flight=6)
    assert (fig.running, fig.waiting, fig.load) == (4, 2, 1500)
    assert compute_load(3, 2, 0.0, capacity=4, in_flight=1).waiting == 2


def test_load_is_clamped_and_capacity_checked():
    assert compute_load(1e12, 1e12, 0, capacity=1).load == 0xFFFFFFFF
    with pytest.raises(ValueError):
        compute_load(0, 0, 0, capacity=0)
