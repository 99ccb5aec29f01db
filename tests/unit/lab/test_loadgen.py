import asyncio
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenfabric.lab import loadgen
from tokenfabric.lab.loadgen import LengthDist, TenantSpec, Workload, plan

sys.path.insert(0, str(Path(__file__).parent))
from sse_server import TinySSE  # noqa: E402


def _gaps(schedule):
    return np.diff([r.offset for r in schedule])


def test_poisson_plan_has_the_offered_rate_and_cv_one():
    schedule = plan(Workload(url="http://x", rate=50, duration=100, seed=3))
    assert 4500 < len(schedule) < 5500
    gaps = _gaps(schedule)
    assert 0.9 < gaps.std() / gaps.mean() < 1.1
    assert all(0 <= r.offset < 100 for r in schedule)


def test_bursty_plan_keeps_the_rate_but_is_burstier():
    schedule = plan(Workload(url="http://x", rate=50, duration=200, arrival="bursty",
                             burst_cv=3.0, seed=3))
    assert 7000 < len(schedule) < 13000
    gaps = _gaps(schedule)
    assert gaps.std() / gaps.mean() > 2.0


def test_plan_is_reproducible_from_the_seed():
    w = Workload(url="http://x", rate=10, duration=10, seed=7)
    assert plan(w) == plan(w)
    assert plan(w) != plan(Workload(url="http://x", rate=10, duration=10, seed=8))


def test_lengths_follow_the_sharegpt_means_and_clip():
    rng = np.random.default_rng(1)
    prompts, outputs = LengthDist(maximum=10**9, minimum=1).sample(rng, 200_000)
    assert abs(prompts.mean() - loadgen.SHAREGPT_PROMPT_MEAN) / loadgen.SHAREGPT_PROMPT_MEAN < 0.03
    assert abs(outputs.mean() - loadgen.SHAREGPT_OUTPUT_MEAN) / loadgen.SHAREGPT_OUTPUT_MEAN < 0.03
    prompts, outputs = LengthDist(minimum=4, maximum=64, scale=0.1).sample(rng, 10_000)
    assert prompts.min() >= 4 and outputs.max() <= 64
    assert outputs.mean() < 40  # scaled down from ~338


def test_tenant_mix_follows_the_weights():
    tenants = [TenantSpec("gold", "premium", weight=1), TenantSpec("bulk", weight=3)]
    schedule = plan(Workload(url="http://x", rate=100, duration=50, tenants=tenants))
    share = sum(r.tenant.name == "gold" for r in schedule) / len(schedule)
    assert 0.22 < share < 0.28


@pytest.mark.parametrize("bad", [dict(rate=0), dict(arrival="uniform"), dict(endpoint="x"),
                                 dict(tenants=[])])
def test_bad_workloads_are_refused(bad):
    with pytest.raises(ValueError):
        Workload(**{"url": "http://x", "rate": 1, "duration": 1, **bad})


async def _with_server(server, coro_factory):
    url = await server.start()
    try:
        return await coro_factory(url)
    finally:
        await server.stop()


async def _load(url, **kw):
    sink = io.StringIO()
    w = Workload(url=url, **{"rate": 20, "duration": 1.0, "seed": 2,
                             "lengths": LengthDist(scale=0.03, minimum=4, maximum=12), **kw})
    return await loadgen.run(w, sink), sink.getvalue()


async def test_records_measure_ttft_tpot_and_name_the_backend():
    server = TinySSE(first_delay=0.08, token_delay=0.02, backend="emu-3")
    records, text = await _with_server(server, _load)
    assert len(records) >= 8
    assert len(text.splitlines()) == len(records)
    for r in records:
        assert r["ok"] and r["status"] == 200 and r["error"] is None
        assert r["backend"] == "emu-3"
        assert r["output_tokens"] == r["max_tokens"]
        assert 0.07 < r["ttft"] < 0.5
        assert 0.015 < r["tpot"] < 0.2
        assert r["e2e"] >= r["ttft"] + (r["max_tokens"] - 1) * 0.015
    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_arrivals_are_open_loop_not_waiting_for_replies():
    # Each reply takes ~1 s; 20 arrivals in 0.5 s must all be sent before the first ends.
    server = TinySSE(first_delay=1.0, token_delay=0.0)
    records, _ = await _with_server(server, lambda url: _load(url, rate=40, duration=0.5))
    starts = sorted(r["start"] for r in records)
    assert len(records) >= 10
    assert starts[-1] - starts[0] < 0.7
    assert all(r["ok"] for r in records)


async def test_a_conversations_next_turn_waits_for_the_previous_answer():
    # Replies take ~0.4 s. Conversation 0's turn 1 is planned 0.05 s after turn 0, but a
    # chat client sends it only once turn 0's answer is in; conversation 1, planned at
    # the same moment, goes at once (open loop between conversations).
    server = TinySSE(first_delay=0.4, token_delay=0.0)
    rows = [{"offset": offset, "prompt": f"q{conv}.{turn} hello", "output_tokens": 2,
             "conversation": conv, "turn": turn}
            for offset, conv, turn in ((0.0, 0, 0), (0.05, 0, 1), (0.05, 1, 0))]

    async def go(url):
        sink = io.StringIO()
        w = Workload(url=url, rate=1, duration=5.0, requests=rows)
        return await loadgen.run(w, sink)
    records = await _with_server(server, go)
    by = {(r["conversation"], r["turn"]): r for r in records}
    assert all(r["ok"] for r in records) and len(by) == 3
    first, second, other = by[0, 0], by[0, 1], by[1, 0]
    assert second["start"] >= first["start"] + first["e2e"] - 0.01
    assert other["start"] - first["start"] < 0.2
    # the wait is not counted in the next turn's TTFT
    assert second["ttft"] < 0.4 + 0.3


async def test_records_keep_the_bridges_handoff_decision_when_it_sends_one():
    # the lab's agents answer with X-Tokenfabric-Handoff-Decision (decision_header): the
    # miss analysis reads each request's cause from it (prefix_misses)
    said = "no_gain; blocks=12; here=3; longest=tflb2:12; gain=-4.1"
    server = TinySSE(backend="tflb1")
    server.headers = {"X-Tokenfabric-Handoff-Decision": said}
    records, _ = await _with_server(server, _load)
    assert records and all(r["ok"] and r["decision"] == said for r in records)
    records, _ = await _with_server(TinySSE(), _load)
    assert records and all(r["ok"] and r["decision"] is None for r in records)


async def test_shed_requests_record_429_and_retry_after():
    server = TinySSE(mode="429")
    records, _ = await _with_server(server, _load)
    assert records and all(r["status"] == 429 and not r["ok"] for r in records)
    assert {r["error"] for r in records} == {"http_429"}
    assert {r["retry_after"] for r in records} == {"2"}


async def test_a_stream_cut_mid_way_is_a_failure():
    server = TinySSE(mode="drop", token_delay=0.01)
    records, _ = await _with_server(server, _load)
    assert records and not any(r["ok"] for r in records)
    assert all(r["error"] and (r["error"].startswith("reset") or r["error"] ==
                               "incomplete_stream") for r in records)


async def test_nothing_listening_is_a_connect_error():
    records, _ = await _load("http://127.0.0.1:9", duration=0.3)
    assert records and {r["error"] for r in records} == {"connect"}


async def test_tenants_send_from_their_own_source_address():
    server = TinySSE()
    tenants = [TenantSpec("gold", "premium", source_ip="127.0.0.2"),
               TenantSpec("bulk", source_ip="127.0.0.3")]
    records, _ = await _with_server(server, lambda url: _load(url, tenants=tenants))
    peers = set(server.peers)
    assert peers <= {"127.0.0.2", "127.0.0.3"} and len(peers) == 2
    assert {r["tenant"] for r in records} == {"gold", "bulk"}


def test_main_reads_a_workload_file_and_writes_json_lines(tmp_path):
    async def go():
        server = TinySSE()
        url = await server.start()
        try:
            wl = tmp_path / "w.json"
            w = Workload(url=url, rate=10, duration=0.5,
                         lengths=LengthDist(scale=0.02, maximum=8))
            wl.write_text(json.dumps(w.to_dict()))
            out = tmp_path / "r.jsonl"
            code = await asyncio.to_thread(loadgen.main, [str(wl), str(out)])
            return code, out
        finally:
            await server.stop()

    code, out = asyncio.run(go())
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["ok"] for r in rows)


def test_main_refuses_a_bad_workload_file(tmp_path, capsys):
    wl = tmp_path / "w.json"
    wl.write_text(json.dumps({"url": "http://x", "rate": -1, "duration": 1}))
    assert loadgen.main([str(wl), str(tmp_path / "r.jsonl")]) == 4
    assert "bad workload" in capsys.readouterr().err


async def test_an_error_event_inside_a_200_stream_is_a_failure():
    # what the bridge sends when vLLM dies mid-stream: an error event, then [DONE]
    server = TinySSE(mode="error_event")
    records, _ = await _with_server(server, _load)
    assert records and not any(r["ok"] for r in records)
    assert all(r["status"] == 200 and r["done"] for r in records)
    assert {r["error"] for r in records} == {"stream_error: vLLM failed mid-stream"}
