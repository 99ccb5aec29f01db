"""The vLLM emulator as a client sees it: the official openai client, raw HTTP, /metrics."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families


def client(emulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{emulator.url}/v1", api_key="unused", max_retries=0)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_models_and_completion_through_openai_client(emulator):
    api = client(emulator)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    answer = api.completions.create(model="tiny", prompt="Hello there, fabric!", max_tokens=5)
    assert answer.usage.prompt_tokens == 5          # Hello , there , fabric ! -> 5 tokens
    assert answer.usage.completion_tokens == 5
    assert answer.choices[0].finish_reason == "length"
    assert len(answer.choices[0].text.split()) == 5


def test_chat_streaming_through_openai_client_with_usage(emulator):
    api = client(emulator)
    stream = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "route my tokens"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices
               and c.choices[0].delta.content]
    assert len(content) == 6
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens > 0


def test_chat_non_streaming(emulator):
    answer = client(emulator).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens == 3


def test_raw_http_sse_framing_ends_with_done(emulator):
    conn = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)
    body = json.dumps({"model": "tiny", "prompt": "a b c", "max_tokens": 4, "stream": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200
    assert reply.getheader("Content-Type").startswith("text/event-stream")
    assert reply.getheader("Transfer-Encoding") == "chunked"
    events = reply.read().decode().split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    data = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert len(data) == 4  # no usage chunk: the client did not ask for it
    assert all(d["object"] == "text_completion" for d in data)
    assert data[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"model": "other", "prompt": "x"}', 404, "does not exist"),
    (b'{"model": "tiny", "prompt": 5}', 400, "prompt"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 100000}', 400, "context length"),
])
def test_bad_requests_get_4xx_json(emulator, body, status, fragment):
    request = urllib.request.Request(f"{emulator.url}/v1/completions", body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == status
    payload = json.loads(err.value.read())
    assert fragment in payload["message"] and payload["code"] == status


def test_metrics_have_vllm_names_types_and_labels(emulator):
    client(emulator).completions.create(model="tiny", prompt="one two three", max_tokens=4)
    parsed = families(emulator.metrics())
    expected = {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge", "vllm:num_preemptions": "counter",
        "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter", "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert parsed[name].type == kind, name
        for sample in parsed[name].samples:
            assert sample.labels["model_name"] == "tiny"
    samples = {(s.name, s.labels.get("finished_reason")): s.value
               for f in parsed.values() for s in f.samples}
    assert samples[("vllm:generation_tokens_total", None)] == 4
    assert samples[("vllm:prompt_tokens_total", None)] == 3
    assert samples[("vllm:request_success_total", "length")] == 1
    assert samples[("vllm:time_to_first_token_seconds_count", None)] == 1
    assert samples[("vllm:inter_token_latency_seconds_count", None)] == 3
    assert "vllm:gpu_cache_usage_perc" not in parsed


def test_legacy_metric_names(emulator_factory):
    legacy = emulator_factory("--legacy-metrics", "--speed", "10")
    parsed = families(legacy.metrics())
    assert parsed["vllm:gpu_cache_usage_perc"].type == "gauge"
    assert "vllm:kv_cache_usage_perc" not in parsed
    assert "vllm:time_per_output_token_seconds" in parsed


def test_fault_503_then_recovery(emulator):
    emulator.fault("503")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{emulator.url}/health", timeout=5)
    assert err.value.code == 503
    with pytest.raises(openai.InternalServerError):
        client(emulator).completions.create(model="tiny", prompt="x", max_tokens=1)
    emulator.fault("none")
    with urllib.request.urlopen(f"{emulator.url}/health", timeout=5) as reply:
        assert reply.status == 200


def test_fault_hang_stalls_health_and_requests(emulator):
    emulator.fault("hang")
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(f"{emulator.url}/health", timeout=0.5)
    emulator.fault("none")
    with urllib.request.urlopen(f"{emulator.url}/health", timeout=5) as reply:
        assert reply.status == 200


def test_fault_slow_makes_requests_slower(emulator):
    api = client(emulator)

    def duration() -> float:
        started = time.perf_counter()
        api.completions.create(model="tiny", prompt="x", max_tokens=20)
        return time.perf_counter() - started

    normal = min(duration() for _ in range(2))
    emulator.fault("slow", 20)
    slowed = duration()
    assert slowed > 5 * normal  # 20x the step time, with room for a busy machine


def test_fault_crash_ends_the_process(emulator):
    emulator.fault("crash")
    assert emulator.proc.wait(timeout=5) == 70


def test_unknown_fault_is_a_400(emulator):
    request = urllib.request.Request(f"{emulator.url}/admin/fault", b'{"fault": "melt"}',
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 400


def test_fault_flag_at_start(emulator_factory):
    started = emulator_factory("--fault", "503", "--fault-after", "0.3")
    with urllib.request.urlopen(f"{started.url}/health", timeout=5) as reply:
        assert reply.status == 200
    time.sleep(0.6)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{started.url}/health", timeout=5)
    assert err.value.code == 503


def test_full_kv_cache_shows_waiting_requests_and_preemptions(emulator_factory):
    small = emulator_factory("--kv-cache-tokens", "160", "--decode-base-ms", "2",
                             "--no-prefix-caching", "--model", "tiny")
    api = openai.AsyncOpenAI(base_url=f"{small.url}/v1", api_key="unused", max_retries=0)
    seen_waiting = []

    async def scenario() -> None:
        calls = [asyncio.ensure_future(api.completions.create(
            model="tiny", prompt=" ".join(f"w{i}" for i in range(50)), max_tokens=60))
            for _ in range(4)]
        for _ in range(40):  # while they run, /metrics shows the queue
            await asyncio.sleep(0.02)
            parsed = families(await asyncio.to_thread(small.metrics))
            seen_waiting.append(parsed["vllm:num_requests_waiting"].samples[0].value)
        answers = await asyncio.gather(*calls)
        assert all(a.usage.completion_tokens == 60 for a in answers)

    asyncio.run(scenario())
    parsed = families(small.metrics())
    assert max(seen_waiting) >= 1
    assert parsed["vllm:num_preemptions"].samples[0].value >= 1
    queue = {s.name: s.value for s in parsed["vllm:request_queue_time_seconds"].samples}
    assert queue["vllm:request_queue_time_seconds_sum"] > 0


def test_emulator_names_itself_in_every_response(emulator_factory):
    named = emulator_factory("--speed", "10", "--model", "tiny", "--backend-name", "tflb9")
    with httpx.Client(timeout=10) as client:
        stream = client.post(f"http://127.0.0.1:{named.port}/v1/completions",
                             json={"model": "tiny", "prompt": "x", "max_tokens": 2,
                                   "stream": True})
        missing = client.post(f"http://127.0.0.1:{named.port}/v1/completions",
                              json={"model": "nope", "prompt": "x"})
        health = client.get(f"http://127.0.0.1:{named.port}/health")
    for reply in (stream, missing, health):
        assert reply.headers["x-tokenfabric-backend"] == "tflb9"
    assert (stream.status_code, missing.status_code) == (200, 404)
