"""Shared-prefix workloads: Mooncake-format trace replay and the multi-turn chat generator."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
from pathlib import Path

import pytest

from tokenfabric.blockhash import BlockHasher
from tokenfabric.hostagent.wordtok import WordTokenizer
from tokenfabric.lab import loadgen
from tokenfabric.lab.loadgen import TenantSpec, Workload
from tokenfabric.lab.workloads import (
    ChatSpec,
    ChatTenant,
    TraceSpec,
    WorkloadError,
    block_words,
    plan_chat,
    plan_trace,
    read_trace,
    trace_prompt,
)

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "examples" / "traces" / "sample-mooncake.jsonl"


def write(tmp_path, rows: list) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_equal_block_ids_give_equal_text_and_the_blocks_hash_alike():
    a = trace_prompt([7, 8, 9], 48, 16)
    b = trace_prompt([7, 8, 3], 48, 16)
    assert len(a.split()) == 48 and a.split()[:32] == b.split()[:32] and a != b
    assert block_words(7, 16) == block_words(7, 16) and block_words(7, 16)[0] == "k7"
    # through the emulator's tokenizer a word is a token: the 2 shared blocks of 16 tokens
    # are the same 2 vLLM blocks, the third differs
    tok, hasher = WordTokenizer(), BlockHasher(16)
    ha, hb = hasher.hashes(tok.encode(a)), hasher.hashes(tok.encode(b))
    assert ha[:2] == hb[:2] and ha[2] != hb[2]


def test_trace_replay_scales_time_and_lengths(tmp_path):
    path = write(tmp_path, [
        {"timestamp": 1000, "input_length": 1000, "output_length": 10, "hash_ids": [1, 2]},
        {"timestamp": 3000, "input_length": 600, "output_length": 3, "hash_ids": [1]}])
    full = plan_trace(TraceSpec(str(path), block_tokens=512))
    assert [p.offset for p in full] == [0.0, 2.0]
    assert len(full[0].prompt.split()) == 1000 and full[0].output_tokens == 10
    # the second prompt is longer than its one block: padded with unshared text
    assert full[1].prompt.split()[:512] == full[0].prompt.split()[:512]
    small = plan_trace(TraceSpec(str(path), block_tokens=512, time_scale=0.5,
                                 length_scale=0.1))
    assert [p.offset for p in small] == [0.0, 1.0]
    assert len(small[0].prompt.split()) == 100
    assert small[1].output_tokens == 1           # 0.3 rounds to 0: at least one token
    assert small[0].prompt.split()[:51] == small[1].prompt.split()[:51]


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ("[1]", "JSON object"),
    ('{"timestamp": -1, "input_length": 1, "output_length": 1, "hash_ids": []}', "timestamp"),
    ('{"timestamp": 1, "input_length": 0, "output_length": 1, "hash_ids": []}', "input_length"),
    ('{"timestamp": 1, "input_length": 1, "output_length": true, "hash_ids": []}',
     "output_length"),
    ('{"timestamp": 1, "input_length": 1, "output_length": 1, "hash_ids": [-2]}', "hash_ids"),
])
def test_bad_trace_lines_are_refused_with_their_line_number(tmp_path, line, message):
    good = {"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [0]}
    path = write(tmp_path, [good, line])
    with pytest.raises(WorkloadError, match=f"trace.jsonl:2: .*{message}"):
        read_trace(path)
    with pytest.raises(WorkloadError, match="no requests"):
        read_trace(write(tmp_path, [""]))


def test_the_shipped_sample_trace_is_what_its_script_makes_and_shares_prefixes():
    spec = importlib.util.spec_from_file_location("make_sample_trace",
                                                  ROOT / "scripts" / "make_sample_trace.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert [json.loads(line) for line in SAMPLE.read_text().splitlines()] == module.make()
    records = read_trace(SAMPLE)
    assert len(records) == 200
    firsts = {tuple(r.hash_ids[:2]) for r in records}
    assert len(firsts) <= 4                       # four applications' system prompts
    assert all(r.input_length <= len(r.hash_ids) * 512 for r in records)


def spec(**kw) -> ChatSpec:
    base = dict(apps=[{"name": "support", "system_tokens": 64},
                      {"name": "code", "system_tokens": 128, "weight": 2}],
                tenants=[{"name": "devices", "clients": "10.0.1.0/26"},
                         {"name": "bff", "app_server": "10.0.2.7"}],
                conversations_per_s=4, duration=10, turns_min=2, turns_max=5, think_s=1.0,
                user_tokens=10, output_tokens=8, seed=3)
    return ChatSpec.from_dict({**base, **kw})


def test_chat_turns_extend_their_conversation_and_share_system_prompts():
    planned = plan_chat(spec())
    by_conv: dict[int, list] = {}
    for p in planned:
        by_conv.setdefault(p.conversation, []).append(p)
    assert len(by_conv) > 20 and all(2 <= len(t) <= 5 for t in by_conv.values())
    for turns in by_conv.values():
        turns.sort(key=lambda p: p.turn)
        for before, after in zip(turns, turns[1:], strict=False):
            assert after.prompt.startswith(before.prompt)   # whole history, then more
            assert after.offset >= before.offset
            assert after.messages[:len(before.messages)] == before.messages
            assert after.source_ip == before.source_ip
    systems = {p.messages[0]["content"] for p in planned}
    assert len(systems) == 2                      # one system prompt per application
    assert planned == plan_chat(spec())           # reproducible from the seed


def test_chat_clients_spread_over_a_prefix_or_come_from_one_app_server():
    planned = plan_chat(spec())
    devices = {p.conversation: p.source_ip for p in planned if p.tenant == "devices"}
    bff = {p.source_ip for p in planned if p.tenant == "bff"}
    assert bff == {"10.0.2.7"}
    assert len(set(devices.values())) == min(len(devices), 62)  # one address per conversation
    assert all(ip.startswith("10.0.1.") for ip in devices.values())
    with pytest.raises(WorkloadError, match="not both"):
        ChatTenant("x", clients="10.0.0.0/24", app_server="10.0.0.1").addresses()
    with pytest.raises(WorkloadError):
        ChatTenant("x", clients="300.0.0.0/24").addresses()
    with pytest.raises(WorkloadError):
        spec(turns_min=0)
    with pytest.raises(WorkloadError):
        ChatSpec.from_dict({"apps": [{"nom": "x"}]})


def test_the_load_generator_sends_chat_from_each_conversations_address(tmp_path):
    """Against the emulator over real HTTP: the later turns hit the prefix cache."""
    from tests.integration.hostagent.conftest import start_emulator, stop_process
    emulator = start_emulator("--speed", "20", "--model", "tiny")
    try:
        workload = Workload(url=emulator.url, rate=1, duration=4.0, model="tiny",
                            endpoint="chat", tenants=[TenantSpec("devices"), TenantSpec("bff")],
                            chat={"apps": [{"name": "a", "system_tokens": 100}],
                                  "tenants": [{"name": "devices", "clients": "127.0.1.0/29"},
                                              {"name": "bff", "app_server": "127.0.2.1"}],
                                  "conversations_per_s": 3, "duration": 2, "turns_min": 2,
                                  "turns_max": 3, "think_s": 0.3, "user_tokens": 20,
                                  "output_tokens": 4, "seed": 2})
        planned = loadgen.plan(workload)
        assert planned and all(p.messages for p in planned)
        records = asyncio.run(loadgen.run(workload, io.StringIO()))
        assert records and all(r["ok"] for r in records), [r["error"] for r in records]
        assert {r["source_ip"] for r in records if r["tenant"] == "bff"} <= {"127.0.2.1"}
        assert {r["turn"] for r in records} >= {0, 1}
        metrics = emulator.metrics()
        hits = float(metrics.split("vllm:prefix_cache_hits_total{")[1].split("} ")[1].split()[0])
        queries = float(metrics.split("vllm:prefix_cache_queries_total{")[1].split("} ")[1]
                        .split()[0])
        assert hits / queries > 0.5               # shared system prompt and histories
    finally:
        stop_process(emulator.proc)
