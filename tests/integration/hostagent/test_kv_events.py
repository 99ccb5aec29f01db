"""vLLM's KV-cache events over real ZMQ sockets on 127.0.0.1: the publisher the emulator
uses, the agent's subscriber, gaps (replayed or resynced), and the emulator's events
checked against block hashes computed from its own /tokenize."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import zmq

from tests.integration.hostagent.conftest import free_port
from tokenfabric.blockhash import BlockHasher
from tokenfabric.hostagent.kv_blocks import KvBlockSet
from tokenfabric.hostagent.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventPublisher,
    KvEventSubscriber,
)


def stored(*keys: int) -> list:
    return [BlockStored(block_hashes=list(keys), parent_block_hash=None,
                        token_ids=[0] * 16 * len(keys), block_size=16)]


async def until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Pair:
    """A publisher and a subscriber feeding a block set, joined (past ZMQ's slow join)."""

    def __init__(self, replay: bool) -> None:
        # "*" port: the publisher binds (vLLM's rule), the subscriber connects
        self.pub = KvEventPublisher("tcp://127.0.0.1:*",
                                    "tcp://127.0.0.1:*" if replay else None, topic="kv")
        self.blocks = KvBlockSet()
        self.sub = KvEventSubscriber(self.pub.endpoint, self.pub.replay_endpoint, "kv",
                                     self.blocks.on_stored, self.blocks.on_removed,
                                     self.blocks.on_cleared, replay_timeout=1.0)
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Pair:
        self.pub.start()
        self.task = asyncio.create_task(self.sub.run())
        await self.sub.connected.wait()
        # a SUB socket receives only once its subscription reached the PUB: probe until then
        deadline = time.monotonic() + 5
        while self.sub.stats.batches == 0:
            assert time.monotonic() < deadline, "the subscriber never joined"
            self.pub.publish([])
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.pub.close()


async def test_events_arrive_in_order_and_removals_and_clears_apply():
    async with Pair(replay=True) as p:
        p.pub.publish(stored(1, 2, 3))
        p.pub.publish([BlockRemoved(block_hashes=[2])])
        await until(lambda: p.sub.expected == p.pub.seq, 5, "two batches")
        assert set(p.blocks.current) == {1, 3}
        p.pub.publish([AllBlocksCleared()])
        p.pub.publish(stored(7))
        await until(lambda: p.sub.expected == p.pub.seq, 5, "two more batches")
        assert set(p.blocks.current) == {7}
        assert p.sub.stats.block_size == 16


async def test_a_gap_is_filled_from_the_replay_socket():
    async with Pair(replay=True) as p:
        resyncs, replayed = p.sub.stats.resyncs, p.sub.stats.replayed
        p.pub.publish(stored(1))
        p.pub.skip_next = 2                       # lost on PUB (kept in the replay buffer)
        p.pub.publish(stored(2))
        p.pub.publish([BlockRemoved(block_hashes=[1])])
        p.pub.publish(stored(3))                  # arrives: seq jumps by 3
        await until(lambda: p.sub.expected == p.pub.seq, 5, "the replay")
        assert set(p.blocks.current) == {2, 3}    # block 1's removal was replayed too
        assert p.sub.stats.replayed == replayed + 2 and p.sub.stats.resyncs == resyncs
        assert p.sub.stats.gaps >= 1


async def test_without_replay_a_gap_resyncs_to_a_subset_of_the_truth():
    async with Pair(replay=False) as p:
        p.pub.publish(stored(1, 2))
        await until(lambda: p.sub.expected == p.pub.seq, 5, "a batch")
        resyncs = p.sub.stats.resyncs
        p.pub.skip_next = 1
        p.pub.publish([BlockRemoved(block_hashes=[1])])   # lost: 1 is gone on the server
        p.pub.publish(stored(5))
        await until(lambda: p.sub.expected == p.pub.seq, 5, "the batch after the gap")
        # the server holds {2, 5}; the agent forgot everything at the gap, then learnt 5
        assert set(p.blocks.current) == {5} and p.sub.stats.resyncs == resyncs + 1
        assert p.blocks.need_full                 # its next report is a snapshot


async def test_a_sequence_going_back_is_a_restarted_server_and_bad_frames_are_counted():
    async with Pair(replay=False) as p:
        p.pub.publish(stored(1))
        await until(lambda: p.sub.expected == p.pub.seq, 5, "a batch")
        resyncs = p.sub.stats.resyncs
        p.pub.seq = 0                             # the server restarted
        p.pub.publish(stored(9))
        await until(lambda: p.sub.expected == 1, 5, "the restarted sequence")
        assert set(p.blocks.current) == {9} and p.sub.stats.resyncs == resyncs + 1
        p.pub.pub.send_multipart((b"kv", (1).to_bytes(8, "big"), b"\xc1 not msgpack"))
        p.pub.pub.send_multipart((b"kv", b"short"))
        await until(lambda: p.sub.stats.bad == 2, 5, "two bad messages")
        assert len(p.blocks) == 0                 # an unreadable batch forgets all


async def test_the_emulator_publishes_vllms_events_for_its_prompts(emulator_factory):
    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint,
              "replay_endpoint": replay, "topic": "kv"}
    # 32 blocks of 16 tokens: a few prompts evict earlier ones
    emulator = emulator_factory("--speed", "10", "--model", "tiny", "--kv-cache-tokens", "512",
                                "--kv-events-config", json.dumps(config))
    blocks = KvBlockSet()
    # a concrete endpoint: the emulator's PUB connects to it, as vLLM's does; the SUB binds
    sub = KvEventSubscriber(endpoint, replay, "kv", blocks.on_stored, blocks.on_removed,
                            blocks.on_cleared, bind=True)
    task = asyncio.create_task(sub.run())
    hasher = BlockHasher(16)
    try:
        async with httpx.AsyncClient(base_url=emulator.url, timeout=20) as client:
            # the emulator's PUB connects to the SUB once it is bound (ZMQ retries every
            # 0.1 s): warm up with small distinct prompts until the first batch arrives
            for n in range(100):
                await client.post("/v1/completions", json={
                    "model": "tiny", "prompt": " ".join(f"w{n}x{i}" for i in range(40)),
                    "max_tokens": 1})
                if sub.stats.batches:
                    break
                await asyncio.sleep(0.05)
            assert sub.stats.batches, "no KV event batch arrived"
            # nothing evicted yet: no eviction pressure (the handoff's weights, by eviction)
            assert blocks.eviction_pressure() == 0.0
            prompts = [" ".join(f"{tag}{i}" for i in range(150)) for tag in "abcd"]
            keys = []
            for prompt in prompts:
                ids = (await client.post("/tokenize", json={"prompt": prompt})).json()["tokens"]
                keys.append(hasher.keys(ids))
                reply = await client.post("/v1/completions", json={
                    "model": "tiny", "prompt": prompt, "max_tokens": 2})
                assert reply.status_code == 200
            await until(lambda: set(keys[3]) <= set(blocks.current), 10, "the events")
            assert set(keys[3]) <= set(blocks.current)    # the last prompt: all 9 blocks
            # the first prompt lost blocks to the later ones, its tail first: what is left of
            # it is a head, still a cached prefix
            left = [k in blocks.current for k in keys[0]]
            assert not left[-1] and left == sorted(left, reverse=True)
            assert len(blocks) <= 32 and sub.stats.resyncs == 0
            # 36 new blocks into 32: the BlockRemoved events show as pressure
            assert 0.0 < blocks.eviction_pressure() < 1.0
            # the same prompt again hits the cache: vLLM's counters say so
            await client.post("/v1/completions", json={"model": "tiny", "prompt": prompts[3],
                                                       "max_tokens": 2})
            metrics = (await client.get("/metrics")).text
            assert 'vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 144.0' in metrics
            assert (await client.post("/reset_prefix_cache")).status_code == 200
            await until(lambda: len(blocks) == 0, 5, "AllBlocksCleared")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_bad_kv_events_config_is_refused_with_a_clear_message(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "vllm-emulator",
                             "--kv-events-config", '{"endpoint": 5}'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "endpoint must be a str" in result.stderr


@pytest.fixture(autouse=True)
def _no_leaked_contexts():
    yield
    zmq.Context.instance()  # the default context stays usable: no test terminated it


def test_an_emulator_whose_kv_events_address_is_taken_says_so(tmp_path):
    import subprocess
    import sys
    ctx = zmq.Context()
    taken = ctx.socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        config = {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:*",
                  "replay_endpoint": f"tcp://127.0.0.1:{port}"}
        result = subprocess.run([sys.executable, "-m", "tokenfabric.cli", "vllm-emulator",
                                 "--port", "0", "--kv-events-config", json.dumps(config)],
                                capture_output=True, text=True, timeout=60)
    finally:
        taken.close(linger=0)
        ctx.term()
    assert result.returncode == 1
    assert "KV events: cannot use" in result.stderr and "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_subscriber_whose_address_is_taken_retries_until_it_is_free():
    ctx = zmq.Context()
    taken = ctx.socket(zmq.PUB)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    blocks = KvBlockSet()
    sub = KvEventSubscriber(f"tcp://127.0.0.1:{port}", None, "", blocks.on_stored,
                            blocks.on_removed, blocks.on_cleared, bind=True)
    task = asyncio.create_task(sub.run(retry_s=0.05))
    try:
        await asyncio.sleep(0.3)
        assert not sub.connected.is_set() and not task.done()
        taken.close(linger=0)
        await asyncio.wait_for(sub.connected.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        taken.close(linger=0)
        ctx.term()
