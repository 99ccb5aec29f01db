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
- an optional prefix cache remembers prompt blocks of `block_size` tokens, so a request
  that shares a prefix with an earlier one prefills only the rest.

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
import hashlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hostagent import log


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

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError("kv_cache_tokens must hold at least one block")
        if self.speed <= 0:
            raise ValueError("speed must be positive")


class RequestAborted(Exception):
    """The request was aborted (client gone) before it finished."""


@dataclass(eq=False)  # identity: a request is itself, whatever its fields
class Request:
    request_id: str
    prompt_tokens: list[str]
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

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_tokens)

    @property
    def kv_tokens(self) -> int:
        """KV slots this request holds while running."""
        return self.num_prompt_tokens + self.output_tokens


@dataclass
class EngineStats:
    """Counters and histogram samples the emulator's /metrics exports."""
    preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    finished: collections.Counter = field(default_factory=collections.Counter)


class PrefixCache:
    """Block hashes of earlier prompts, least recently used first out."""

    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        self.block_size = block_size
        self.capacity = max(capacity_blocks, 0)
        self.blocks: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def _hashes(self, tokens: list[str]) -> list[bytes]:
        hashes, running = [], hashlib.blake2b(digest_size=12)
        full = len(tokens) // self.block_size
        for i in range(full):
            block = tokens[i * self.block_size:(i + 1) * self.block_size]
            running.update("\x00".join(block).encode() + b"\x01")
            hashes.append(running.copy().digest())
        return hashes

    def lookup(self, tokens: list[str]) -> int:
        """Number of prompt tokens already cached (whole blocks of the prefix)."""
        hit = 0
        for digest in self._hashes(tokens):
            if digest not in self.blocks:
                break
            self.blocks.move_to_end(digest)
            hit += self.block_size
        return hit

    def insert(self, tokens: list[str]) -> None:
        for digest in self._hashes(tokens):
            self.blocks[digest] = None
            self.blocks.move_to_end(digest)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


class Engine:
    """Runs the scheduling loop as an asyncio task; requests await their tokens."""

    def __init__(self, params: EngineParams, on_finish: Callable[[Request], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_token_gap: Callable[[float], None] | None = None) -> None:
        self.params = params
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.stats = EngineStats()
        self.prefix_cache = PrefixCache(params.block_size,
                                        params.kv_cache_tokens // params.block_size // 2)
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

    def submit(self, prompt_tokens: list[str], max_tokens: int) -> Request:
        request = Request(f"req-{next(self._ids)}", prompt_tokens, max(1, max_tokens),
                          arrival=self.clock())
        if request.num_prompt_tokens + request.max_tokens > self.params.kv_cache_tokens:
            raise ValueError(f"prompt ({request.num_prompt_tokens}) plus max_tokens "
                             f"({request.max_tokens}) exceed the KV cache "
                             f"({self.params.kv_cache_tokens} tokens)")
        self.waiting.append(request)
        self._wakeup.set()
        return request

    def abort(self, request: Request) -> None:
        """Drop a request wherever it is (the client went away)."""
        if request.finished_reason:
            return
        if request in self.running:
            self.running.remove(request)
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
            self._emit_tokens()

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
        return self.step_duration(prefill_tokens)

    def _admit(self) -> int:
        p = self.params
        prefill_tokens = 0
        free = p.kv_cache_tokens - self.kv_used
        while self.waiting and len(self.running) < p.max_num_seqs:
            request = self.waiting[0]
            need = request.kv_tokens + 1
            if need > free:
                break  # head-of-line waits for room, as vLLM's FCFS scheduler does
            self.waiting.popleft()
            cached = 0
            if p.prefix_caching:
                cached = min(self.prefix_cache.lookup(request.prompt_tokens),
                             request.num_prompt_tokens - 1)
                self.stats.prefix_queries += request.num_prompt_tokens
                self.stats.prefix_hits += cached
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
            victim = self.running.pop()
            victim.prefilled = False
            self.waiting.appendleft(victim)
            self.stats.preemptions += 1
            log.debug("preempted %s (KV cache full)", victim.request_id)

    def _emit_tokens(self) -> None:
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
                if self.params.prefix_caching:
                    self.prefix_cache.insert(request.prompt_tokens)
                self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        request.finished_reason = reason
        self.stats.finished[reason] += 1
        request.queue.put_nowait(None)
        if self.on_finish:
            self.on_finish(request)
