"""vLLM's KV-cache events on the wire: publisher (the emulator) and subscriber (the agent).

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'`,
vllm/distributed/kv_events.py) publishes on a ZMQ PUB socket, one message of three frames
per engine step:  topic (utf-8) | sequence number (8 bytes, big-endian) | payload,
the payload a msgpack EventBatch [ts, [event, ...], data_parallel_rank] whose events are
maps tagged by "type": BlockStored, BlockRemoved, AllBlocksCleared. An optional ROUTER
socket (`replay_endpoint`) answers a DEALER's [b"", start_seq (8 bytes)] with every
buffered batch from start_seq on, as [b"", topic, seq, payload], then [b"", b"", -1, b""].

Who binds (vLLM's rule, ZmqEventPublisher._is_bind_endpoint): the PUB socket binds a
wildcard endpoint ("tcp://*:5557", "::") and ipc/inproc ones, and *connects* to any other
("tcp://127.0.0.1:5557"), where the subscriber must then bind. The replay ROUTER always
binds. `subscriber_side` turns vLLM's endpoint into what the agent does.

The emulator publishes the same frames, with the same rule, so the agent's subscriber
takes one code path for both.

Gaps (a PUB socket drops messages past its high-water mark, and a late subscriber
misses the start): the subscriber asks the replay socket for what it missed; when that is
impossible (no replay socket, no answer within replay_timeout, or the buffer no longer
holds the missed batches) it resyncs: it forgets every block it knew (`on_cleared`) and
learns anew from the next batch. So what the subscriber knows is always a subset of what
the server holds: a missed store only hides a cached block, a missed removal can never
leave a block believed cached. A sequence number going back means the server restarted
(its cache is empty): resync too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from tokenfabric.blockhash import key64

log = logging.getLogger(__name__)


END_SEQ = -1
MEDIUM_GPU = "GPU"


class KvEventsError(Exception):
    """A KV events socket that cannot be set up (address in use, bad endpoint)."""


# -- the wire format (field names and order as vLLM's msgspec structs) -------------------
class KvEvent(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    """Events are msgpack maps with a "type" tag, unknown fields ignored (newer vLLMs)."""


class BlockStored(KvEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class BlockRemoved(KvEvent):
    block_hashes: list[int | bytes]
    medium: str | None = MEDIUM_GPU
    group_idx: int | None = None


class AllBlocksCleared(KvEvent):
    pass


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventBatch)


def encode_batch(events: Sequence[BlockStored | BlockRemoved | AllBlocksCleared]
                 | Sequence[KvEvent], ts: float | None = None, rank: int = 0) -> bytes:
    # every KvEvent is one of the three tagged kinds (msgspec encodes any of them)
    batch = EventBatch(time.time() if ts is None else ts, list(events),  # type: ignore[arg-type]
                       rank)
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> EventBatch:
    """Raises msgspec.DecodeError (a ValueError) on anything that is not an EventBatch."""
    return _decoder.decode(payload)


@dataclass
class KvEventsConfig:
    """vLLM's --kv-events-config (vllm/config/kv_events.py), the same JSON keys."""

    enable_kv_cache_events: bool = False
    publisher: str = "zmq"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def from_json(cls, text: str) -> KvEventsConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the KV events config is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("the KV events config must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ValueError(f"unknown KV events config keys: {', '.join(sorted(unknown))}")
        types = {"bool": bool, "int": int, "str": str}
        for key, value in data.items():
            kind = str(known[key].type).split(" |")[0]
            if value is None and "None" in str(known[key].type):
                continue
            if not isinstance(value, types[kind]) or (kind == "int" and isinstance(value, bool)):
                raise ValueError(f"KV events config {key} must be a {kind}")
        config = cls(**data)
        if config.publisher not in ("zmq", "null"):
            raise ValueError("the emulator publishes with publisher zmq (or null: none)")
        if config.buffer_steps < 1 or config.hwm < 0:
            raise ValueError("buffer_steps must be at least 1 and hwm not negative")
        return config

    @property
    def publishes(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


def publisher_binds(endpoint: str) -> bool:
    """vLLM's rule: bind wildcard and ipc/inproc endpoints, connect to the rest."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def local(endpoint: str) -> str:
    """A bound wildcard endpoint as a process on the same host reaches it."""
    return endpoint.replace("*", "127.0.0.1").replace("[::]", "127.0.0.1")


def subscriber_side(endpoint: str) -> tuple[str, bool]:
    """(address, bind) of the SUB socket that follows a vLLM configured with `endpoint`."""
    if publisher_binds(endpoint):
        return local(endpoint), False
    return endpoint, True


# -- publisher ----------------------------------------------------------------------------
class KvEventPublisher:
    """PUB socket plus a ROUTER replay socket, in the caller's asyncio loop."""

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, topic: str = "",
                 buffer_steps: int = 10_000, hwm: int = 100_000) -> None:
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        try:
            self.pub.set_hwm(hwm)
            if publisher_binds(endpoint):
                self.pub.bind(endpoint)
                self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
            else:  # the subscriber binds there (vLLM's rule)
                self.pub.connect(endpoint)
                self.endpoint = endpoint
            if replay_endpoint:
                self.replay = self.ctx.socket(zmq.ROUTER)
                self.replay.bind(replay_endpoint)
                self.replay_endpoint = self.replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self.pub.close(linger=0)
            if self.replay is not None:
                self.replay.close(linger=0)
            self.ctx.term()
            raise KvEventsError(f"KV events: cannot use {endpoint} / {replay_endpoint}: "
                                f"{exc}") from exc
        self.topic = topic.encode()
        self.buffer: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=buffer_steps)
        self.seq = 0
        self.skip_next = 0  # tests: drop this many batches from PUB (kept for replay)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.replay is not None:
            self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: list[KvEvent]) -> int:
        """Send one batch now (PUB never blocks: past hwm ZMQ drops it); returns its seq."""
        seq, self.seq = self.seq, self.seq + 1
        payload = encode_batch(events)
        self.buffer.append((seq, payload))
        if self.skip_next > 0:
            self.skip_next -= 1
            return seq
        with contextlib.suppress(zmq.Again):
            self.pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload),
                                    flags=zmq.NOBLOCK)
        return seq

    async def _serve_replay(self) -> None:
        assert self.replay is not None
        while True:
            frames = await self.replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("kv events: bad replay request (%d frames)", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self.buffer):
                if seq >= start_seq:
                    await self.replay.send_multipart(
                        (client, b"", self.topic, seq.to_bytes(8, "big"), payload))
            await self.replay.send_multipart(
                (client, b"", b"", END_SEQ.to_bytes(8, "big", signed=True), b""))

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.pub.close(linger=0)
        if self.replay is not None:
            self.replay.close(linger=0)
        self.ctx.term()


# -- subscriber ---------------------------------------------------------------------------
@dataclass
class SubscriberStats:
    batches: int = 0
    events: int = 0
    gaps: int = 0
    replayed: int = 0
    resyncs: int = 0
    bad: int = 0
    last_seq: int | None = None
    block_size: int | None = None


class KvEventSubscriber:
    """Follows one server's events; calls on_stored(keys), on_removed(keys), on_cleared().

    Keys are tokenfabric.blockhash.key64 of vLLM's block hashes. Only the GPU tier
    (medium "GPU" or unset) counts: offloaded CPU/disk copies are not a prefix hit.
    """

    def __init__(self, endpoint: str, replay_endpoint: str | None, topic: str,
                 on_stored: Callable[[list[int]], None],
                 on_removed: Callable[[list[int]], None],
                 on_cleared: Callable[[], None], replay_timeout: float = 1.0,
                 max_replay_batches: int = 100_000, bind: bool = False) -> None:
        """`endpoint` is connected to, or bound when `bind` (see subscriber_side)."""
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self.bind = bind
        self.topic = topic.encode()
        self.on_stored, self.on_removed, self.on_cleared = on_stored, on_removed, on_cleared
        self.replay_timeout = replay_timeout
        self.max_replay_batches = max_replay_batches
        self.stats = SubscriberStats()
        self.expected: int | None = None  # the next sequence number
        self.connected = asyncio.Event()  # set once the SUB socket exists

    async def run(self, retry_s: float = 5.0) -> None:
        """Follow the events until cancelled; a socket that cannot be set up (its address
        in use) is logged and retried every retry_s, the agent's other work going on."""
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        failures = 0
        while True:
            try:
                if self.bind:
                    sub.bind(self.endpoint)
                else:
                    sub.connect(self.endpoint)
                break
            except zmq.ZMQError as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.error("KV events: cannot %s %s (%s); retrying every %g s",
                              "bind" if self.bind else "connect to", self.endpoint, exc,
                              retry_s)
                await asyncio.sleep(retry_s)
        self.connected.set()
        try:
            while True:
                frames = await sub.recv_multipart()
                await self._take(frames)
        finally:
            sub.close(linger=0)
            ctx.term()

    async def _take(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8 or frames[0] != self.topic and self.topic:
            self.stats.bad += 1
            return
        seq = int.from_bytes(frames[1], "big")
        expected = self.expected
        if expected is not None and seq < expected:
            log.warning("kv events: sequence went back %d -> %d (server restarted): resync",
                        expected, seq)
            self._resync()
        elif (expected is None and seq > 0) or (expected is not None and seq > expected):
            self.stats.gaps += 1
            start = expected or 0
            if not await self._replay(start, seq):
                log.warning("kv events: batches %d..%d missed and not replayable: resync",
                            start, seq - 1)
                self._resync()
        self._apply(seq, frames[2])

    async def _replay(self, start: int, stop: int) -> bool:
        """Apply batches start..stop-1 from the replay socket; False if any is missing."""
        if not self.replay_endpoint:
            return False
        ctx = zmq.asyncio.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        got: list[tuple[int, bytes]] = []
        try:
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            deadline = time.monotonic() + self.replay_timeout
            while len(got) <= self.max_replay_batches:
                left = deadline - time.monotonic()
                if left <= 0 or not await dealer.poll(left * 1000):
                    return False
                frames = await dealer.recv_multipart()
                if len(frames) != 4 or len(frames[2]) != 8:
                    return False
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_SEQ:
                    break
                if start <= seq < stop:
                    got.append((seq, frames[3]))
        finally:
            dealer.close(linger=0)
            ctx.term()
        if [s for s, _ in got] != list(range(start, stop)):
            return False
        for seq, payload in got:
            self._apply(seq, payload)
        self.stats.replayed += len(got)
        return True

    def _resync(self) -> None:
        self.stats.resyncs += 1
        self.on_cleared()

    def _apply(self, seq: int, payload: bytes) -> None:
        self.expected = seq + 1
        self.stats.last_seq = seq
        try:
            batch = decode_batch(payload)
        except (msgspec.DecodeError, ValueError) as exc:
            # an unreadable batch may have held removals: forget everything, stay correct
            log.warning("kv events: undecodable batch %d (%s): resync", seq, exc)
            self.stats.bad += 1
            self._resync()
            return
        self.stats.batches += 1
        for event in batch.events:
            self.stats.events += 1
            if isinstance(event, BlockStored):
                if event.medium in (None, MEDIUM_GPU):
                    self.stats.block_size = event.block_size
                    self.on_stored([key64(h) for h in event.block_hashes])
            elif isinstance(event, BlockRemoved):
                if event.medium in (None, MEDIUM_GPU):
                    self.on_removed([key64(h) for h in event.block_hashes])
            else:
                self.on_cleared()
