"""The emulator's engine: a continuous-batching scheduler that runs in real time.

It imitates what vLLM's scheduler does with time, not with tensors:

- each engine step first admits waiting requests (at most `max_num_seqs` run at once,
  and only while the KV cache has room for their prompt), prefills them, then decodes
  one token for every running request;
- a step lasts  prefill_s_per_token * uncached prompt tokens admitted
              + decode_base_s + decode_s_per_seq * batch + decode_s_per_ctx_token * context
  divided by `speed` (speed 2 is twice as fast a GPU, 0.5 half as fast);
- every token a request holds (prompt and output) takes a slot of the KV cache; when a
  decode step finds the cache full, the newest running request is preempted (its KV is
  freed, it goes back to the front of the queue and is prefilled again later), as vLLM's
  recompute preemption does;
- scheduling_policy "priority" (vLLM's `--scheduling-policy priority`): each request has an
  integer priority, lower is served first, ties by arrival. The waiting request with the
  best (priority, arrival) is admitted first; when it finds the batch full (or the KV cache
  without room) and a running request has a worse priority, the worst running one, by
  (priority, arrival), is preempted to make room, as vLLM's priority scheduler does. The
  KV-full preemption of a decode step also picks the worst, not the newest. Under "fcfs"
  every priority is 0 and the order is arrival;
- a prefix cache (KvBlockCache) over the same KV pool, as vLLM's: the full blocks of
  `block_size` prompt tokens are named by vLLM's chained block hash; a running request pins
  its blocks, a finished one leaves them cached until the room is needed (LRU). A request
  whose leading blocks are cached prefills only the rest, so TTFT depends on cache hits.
  Every change becomes one of vLLM's KV events (hostagent/kv_events.py), handed to
  `on_kv_events` once per step, as vLLM publishes one batch per engine step. Only prompt
  blocks are cached (vLLM also caches the blocks its output fills).

Default calibration (see docs/agent.md): a roofline estimate for Llama-3-8B in bf16 on one
A100-80GB SXM (2.04 TB/s HBM, 312 TFLOPS bf16) at the utilisations that vLLM typically
reaches: 16 GB of weights read per decode step at ~75% of peak bandwidth -> ~10 ms; a KV
cache of 128 KiB per token (32 layers x 8 KV heads x 128 dims x K,V x 2 bytes) read per
context token -> ~0.086 us per token; prefill at 2 x 8e9 FLOP per token at ~50% MFU ->
~0.1 ms per token; 0.9 x 80 GB minus weights leaves ~56 GB -> ~430k tokens of KV cache.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenfabric.blockhash import HASH_ALGOS, BlockHasher, key64
from tokenfabric.hostagent.kv_events import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
)
from tokenfabric.hostagent.metrics import VllmCounters
from tokenfabric.hostagent.wordtok import WordTokenizer

log = logging.getLogger(__name__)


@dataclass
class EngineParams:
    max_num_seqs: int = 256
    kv_cache_tokens: int = 430_000
    block_size: int = 16
    prefill_s_per_token: float = 0.0001
    decode_base_s: float = 0.010
    decode_s_per_seq: float = 0.00005
    decode_s_per_ctx_token: float = 0.000000086
    prefix_caching: bool = True
    speed: float = 1.0
    scheduling_policy: str = "fcfs"  # or "priority"
    hash_algo: str = "sha256"  # vLLM's --prefix-caching-hash-algo

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError("scheduling_policy must be fcfs or priority")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError("kv_cache_tokens must hold at least one block")
        if self.speed <= 0:
            raise ValueError("speed must be positive")
        if self.hash_algo not in HASH_ALGOS:
            raise ValueError(f"hash_algo must be one of {', '.join(HASH_ALGOS)}")

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size


class RequestAborted(Exception):
    """The request was aborted (client gone) before it finished."""


@dataclass(eq=False)  # identity: a request is itself, whatever its fields
class Request:
    request_id: str
    prompt_tokens: list[str] | list[int]
    max_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    output_tokens: int = 0
    cached_tokens: int = 0
    first_scheduled: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_reason: str | None = None
    # Tokens are pushed here as they are generated; None marks the end.
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    prefilled: bool = False
    priority: int = 0  # lower is served first (scheduling_policy "priority")
    token_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full prompt blocks

    @property
    def rank(self) -> tuple[int, float]:
        return (self.priority, self.arrival)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_tokens)

    @property
    def kv_tokens(self) -> int:
        """KV slots this request holds while running."""
        return self.num_prompt_tokens + self.output_tokens


@dataclass
class EngineStats(VllmCounters):
    """The counters the emulator's /metrics exports, and the finished requests by reason."""

    finished: collections.Counter = field(default_factory=collections.Counter)


class KvBlockCache:
    """vLLM's prefix cache over a pool of `num_blocks` KV blocks of `block_size` tokens.

    A block is named by its chained hash (tokenfabric.blockhash, as vLLM computes it).
    Blocks a running request holds are pinned; a finished (or preempted) request's blocks
    stay cached but become free, least recently used first out, and a request's tail
    blocks go out before its head blocks (vLLM frees them in reverse order). Free cached
    blocks live in the room the running requests leave: `trim(room)` evicts down to it.
    Changes are queued as vLLM's KV events (BlockStored, BlockRemoved, AllBlocksCleared)
    until `take_events()`.
    """

    def __init__(self, block_size: int, num_blocks: int) -> None:
        self.block_size = block_size
        self.num_blocks = max(num_blocks, 0)
        self.pins: dict[bytes, int] = {}
        self.free: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.events: list[KvEvent] = []
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.pins) + len(self.free)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self.pins or block_hash in self.free

    def match(self, hashes: list[bytes]) -> int:
        """How many leading blocks are cached."""
        hit = 0
        for block_hash in hashes:
            if block_hash not in self:
                break
            hit += 1
        return hit

    def acquire(self, hashes: list[bytes], token_ids: list[int]) -> None:
        """Pin a running request's full blocks; the new ones are stored (one event per run
        of consecutive new blocks, with its parent's hash, as vLLM publishes them)."""
        run: list[int] = []
        for i, block_hash in enumerate(hashes):
            if block_hash in self.free:
                del self.free[block_hash]
                self.pins[block_hash] = 1
            elif block_hash in self.pins:
                self.pins[block_hash] += 1
            else:
                self.pins[block_hash] = 1
                run.append(i)
                continue
            self._store(run, hashes, token_ids)
            run = []
        self._store(run, hashes, token_ids)

    def _store(self, run: list[int], hashes: list[bytes], token_ids: list[int]) -> None:
        if not run:
            return
        size = self.block_size
        first, last = run[0], run[-1]
        self.events.append(BlockStored(
            block_hashes=[key64(hashes[i]) for i in run],
            parent_block_hash=key64(hashes[first - 1]) if first else None,
            token_ids=list(token_ids[first * size:(last + 1) * size]), block_size=size,
            lora_id=None, medium=MEDIUM_GPU, lora_name=None, extra_keys=[None] * len(run),
            group_idx=0, kv_cache_spec_kind="full_attention"))

    def release(self, hashes: list[bytes]) -> None:
        for block_hash in reversed(hashes):  # the head blocks end most recently used
            count = self.pins.get(block_hash)
            if count is None:
                continue
            if count > 1:
                self.pins[block_hash] = count - 1
            else:
                del self.pins[block_hash]
                self.free[block_hash] = None

    def trim(self, room_blocks: int) -> None:
        """Evict free cached blocks, least recently used first, until they fit the room."""
        removed: list[int | bytes] = []
        while self.free and len(self.free) > max(room_blocks, 0):
            block_hash, _ = self.free.popitem(last=False)
            removed.append(key64(block_hash))
        if removed:
            self.evictions += len(removed)
            self.events.append(BlockRemoved(block_hashes=removed, medium=MEDIUM_GPU))

    def clear(self) -> bool:
        """vLLM's reset_prefix_cache: only when no running request holds a block."""
        if self.pins:
            return False
        self.free.clear()
        self.events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KvEvent]:
        events, self.events = self.events, []
        return events


class Engine:
    """Runs the scheduling loop as an asyncio task; requests await their tokens."""

    def __init__(self, params: EngineParams, on_finish: Callable[[Request], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_token_gap: Callable[[float], None] | None = None,
                 on_kv_events: Callable[[list[KvEvent]], None] | None = None) -> None:
        self.params = params
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.stats = EngineStats()
        self.kv_cache = KvBlockCache(params.block_size, params.num_blocks)
        self.hasher = BlockHasher(params.block_size, params.hash_algo)
        self.tokenizer = WordTokenizer()
        self.on_kv_events = on_kv_events  # one call per step with that step's KV events
        self.on_finish = on_finish
        self.on_token_gap = on_token_gap  # seconds between a request's consecutive tokens
        self.clock = clock
        self.slowdown = 1.0        # fault injection: step times multiplied by this
        self.hung = False          # fault injection: no step runs
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ids = itertools.count(1)

    # -- public ------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def submit(self, prompt_tokens: list[str] | list[int], max_tokens: int,
               priority: int = 0) -> Request:
        """Queue a prompt given as token ids, or as the word tokenizer's words."""
        if priority and self.params.scheduling_policy != "priority":
            # vLLM's answer too: priorities need --scheduling-policy priority
            raise ValueError(f"Got priority {priority} but Priority scheduling is not "
                             "enabled.")
        request = Request(f"req-{next(self._ids)}", prompt_tokens, max(1, max_tokens),
                          arrival=self.clock(), priority=priority)
        if request.num_prompt_tokens + request.max_tokens > self.params.kv_cache_tokens:
            raise ValueError(f"prompt ({request.num_prompt_tokens}) plus max_tokens "
                             f"({request.max_tokens}) exceed the KV cache "
                             f"({self.params.kv_cache_tokens} tokens)")
        request.token_ids = [t if isinstance(t, int) else self.tokenizer.token_id(t)
                             for t in prompt_tokens]
        if self.params.prefix_caching:
            request.block_hashes = self.hasher.hashes(request.token_ids)
        self.waiting.append(request)
        self._wakeup.set()
        return request

    def abort(self, request: Request) -> None:
        """Drop a request wherever it is (the client went away)."""
        if request.finished_reason:
            return
        if request in self.running:
            self.running.remove(request)
            self.kv_cache.release(request.block_hashes)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, "abort")

    @property
    def kv_used(self) -> int:
        return sum(r.kv_tokens for r in self.running)

    @property
    def kv_usage(self) -> float:
        return min(1.0, self.kv_used / self.params.kv_cache_tokens)

    # -- the loop --------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if self.hung or not (self.waiting or self.running):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            started = self.clock()
            duration = self.step()
            # Sleep what is left of the step, so that the loop's own cost is part of it.
            await asyncio.sleep(max(0.0, duration - (self.clock() - started)))
            self.emit_tokens()

    def step_duration(self, prefill_tokens: int) -> float:
        p = self.params
        batch = len(self.running)
        context = self.kv_used
        seconds = prefill_tokens * p.prefill_s_per_token
        if batch:
            seconds += (p.decode_base_s + p.decode_s_per_seq * batch
                        + p.decode_s_per_ctx_token * context)
        return seconds * self.slowdown / p.speed

    def step(self) -> float:
        """Schedule one step; returns how long it takes. Tokens appear at its end."""
        prefill_tokens = self._admit()
        self._make_room()
        self.kv_cache.trim(self.params.num_blocks - self.held_blocks)
        events = self.kv_cache.take_events()
        if events and self.on_kv_events is not None:
            self.on_kv_events(events)
        return self.step_duration(prefill_tokens)

    @property
    def held_blocks(self) -> int:
        """KV blocks the running requests hold, with the one each grows into this step."""
        size = self.params.block_size
        return sum(-(-(r.kv_tokens + 1) // size) for r in self.running)

    def reset_prefix_cache(self) -> bool:
        """Drop every free cached block (vLLM refuses while requests hold blocks)."""
        if not self.kv_cache.clear():
            return False
        events = self.kv_cache.take_events()
        if self.on_kv_events is not None:
            self.on_kv_events(events)
        return True

    def _admit(self) -> int:
        p = self.params
        prefill_tokens = 0
        free = p.kv_cache_tokens - self.kv_used
        by_priority = p.scheduling_policy == "priority"
        while self.waiting:
            request = min(self.waiting, key=lambda r: r.rank) if by_priority \
                else self.waiting[0]
            need = request.kv_tokens + 1
            if len(self.running) >= p.max_num_seqs or need > free:
                victim = max(self.running, key=lambda r: r.rank) if by_priority and \
                    self.running else None
                if victim is None or victim.priority <= request.priority:
                    break  # head-of-line waits for room, as vLLM's schedulers do
                self._preempt(victim)
                free += victim.kv_tokens
                continue
            self.waiting.remove(request)
            cached = 0
            if p.prefix_caching:
                # vLLM computes at least the last prompt token: whole blocks short of it
                hit = min(self.kv_cache.match(request.block_hashes),
                          (request.num_prompt_tokens - 1) // p.block_size)
                cached = hit * p.block_size
                self.stats.prefix_cache_queries += request.num_prompt_tokens
                self.stats.prefix_cache_hits += cached
                self.kv_cache.acquire(request.block_hashes, request.token_ids)
            request.cached_tokens = cached
            prefill_tokens += request.kv_tokens - cached
            if request.first_scheduled is None:
                request.first_scheduled = self.clock()
                self.stats.prompt_tokens += request.num_prompt_tokens
            request.prefilled = True
            self.running.append(request)
            free -= need
        return prefill_tokens

    def _make_room(self) -> None:
        """Each running request grows by one token this step; preempt the newest if full."""
        while self.running and self.kv_used + len(self.running) > self.params.kv_cache_tokens:
            victim = max(self.running, key=lambda r: r.rank) \
                if self.params.scheduling_policy == "priority" else self.running[-1]
            self._preempt(victim)

    def _preempt(self, victim: Request) -> None:
        """Free the victim's KV and send it back to the front of the queue (recompute)."""
        self.running.remove(victim)
        self.kv_cache.release(victim.block_hashes)
        victim.prefilled = False
        self.waiting.appendleft(victim)
        self.stats.preemptions += 1
        log.debug("preempted %s (priority %d)", victim.request_id, victim.priority)

    def emit_tokens(self) -> None:
        """The end of a step: each running request gets its next token."""
        now = self.clock()
        for request in list(self.running):
            request.output_tokens += 1
            self.stats.generation_tokens += 1
            if request.first_token_at is None:
                request.first_token_at = now
            elif self.on_token_gap is not None and request.last_token_at is not None:
                self.on_token_gap(now - request.last_token_at)
            request.last_token_at = now
            request.queue.put_nowait(request.output_tokens)
            if request.output_tokens >= request.max_tokens:
                self.running.remove(request)
                self.kv_cache.release(request.block_hashes)
                self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        request.finished_reason = reason
        self.stats.finished[reason] += 1
        request.queue.put_nowait(None)
        if self.on_finish:
            self.on_finish(request)
