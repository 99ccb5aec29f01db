"""Workloads with shared prefixes for the load generator: trace replay and multi-turn chat.

Trace replay (`TraceSpec`): a JSONL file, one request a line,
    {"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [int...]}
`hash_ids` name the prompt's consecutive blocks of `block_tokens` tokens; equal ids mean
equal text, and since the ids are listed from the start of the prompt, two requests whose
lists share a head share that prompt prefix. This is the format of the Mooncake traces
(Qin et al., "Mooncake: A KVCache-centric Architecture for LLM Serving", FAST 2025;
github.com/kvcache-ai/Mooncake, FAST25-release/traces: conversation, tool&agent,
synthetic traces; block size 512 tokens), which NVIDIA Dynamo's benchmarks (its
"mooncake" trace format, block size 512) and SGLang's bench_serving replay too. Their
`timestamp` is milliseconds from the trace's start.

Block id -> text (stated, deterministic, identical on every machine): block `b` is the
word `k<b>` followed by block_tokens - 1 words drawn from WORDS by BLAKE2b of (b, i).
A prompt is its blocks' texts joined by spaces, cut to `input_length` words (its last
block may be partial). Under the emulator's word tokenizer a word is one token, so the
lengths and block boundaries are exact; with a real BPE tokenizer a word is one to two
tokens, so prompts come out longer, with the same sharing.

Scaling: `length_scale` multiplies block_tokens, input and output lengths (0.1: ten
times shorter prompts, same sharing); `time_scale` multiplies the timestamps (0.5: twice
the rate). Outputs are at least one token.

Multi-turn chat (`ChatSpec`): conversations arrive as a Poisson process; each picks an
application (weighted), whose system prompt of `system_tokens` words all its
conversations share, and a tenant; it runs `turns` turns (uniform in [turns_min,
turns_max]) separated by think times (exponential, mean think_s). Turn k's prompt is the
whole conversation so far -- system prompt, earlier user messages and the answers -- plus
the new user message. The earlier answers are planned text of the planned output length
(an open-loop client cannot wait for the real one; the emulator caches prompt blocks
only, so this changes no hit). Client addresses: a tenant either spreads its
conversations over the addresses of a prefix (`clients: "10.0.1.0/26"`, one address per
conversation, round robin: per-device clients) or sends everything from one
`app_server` address (a backend-for-frontend that proxies its users).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
         "zulu network switch token cache prefix block route model server client").split()
MAX_TRACE_LINES = 1_000_000


class WorkloadError(ValueError):
    """A trace or chat spec that cannot be used, with where and why."""


# -- text ---------------------------------------------------------------------------------
def block_words(block_id: int, tokens: int) -> list[str]:
    """The text of block `block_id`: `tokens` words, the same everywhere."""
    words = [f"k{block_id}"]
    for i in range(1, tokens):
        digest = hashlib.blake2b(f"{block_id}:{i}".encode(), digest_size=4).digest()
        words.append(WORDS[int.from_bytes(digest, "big") % len(WORDS)])
    return words


def trace_prompt(hash_ids: list[int], input_length: int, block_tokens: int) -> str:
    words: list[str] = []
    for block_id in hash_ids:
        if len(words) >= input_length:
            break
        words += block_words(block_id, block_tokens)
    if len(words) < input_length:  # a trace line longer than its blocks: pad, unshared
        words += block_words(-1 - len(hash_ids), input_length - len(words))
    return " ".join(words[:input_length])


# -- trace replay -------------------------------------------------------------------------
@dataclass(frozen=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: list[int]


def read_trace(path: str | Path, limit: int = MAX_TRACE_LINES) -> list[TraceRecord]:
    records: list[TraceRecord] = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"cannot read the trace {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(records) >= limit:
            raise WorkloadError(f"{path}: more than {limit} requests")
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise WorkloadError(f"{where}: a line must be a JSON object")
        ts, inp, out, ids = (row.get(k) for k in ("timestamp", "input_length",
                                                   "output_length", "hash_ids"))
        if not isinstance(ts, int | float) or not _number(ts) or ts < 0:
            raise WorkloadError(f"{where}: timestamp must be milliseconds, 0 or more")
        for name, value in (("input_length", inp), ("output_length", out)):
            if not isinstance(value, int) or not _int(value) or value < 1:
                raise WorkloadError(f"{where}: {name} must be a positive integer")
        if not isinstance(ids, list) or not all(_int(i) and i >= 0 for i in ids):
            raise WorkloadError(f"{where}: hash_ids must be a list of non-negative integers")
        assert isinstance(ts, int | float) and isinstance(inp, int) and isinstance(out, int)
        records.append(TraceRecord(float(ts), inp, out, ids))
    if not records:
        raise WorkloadError(f"{path}: no requests")
    return records


@dataclass(frozen=True)
class TraceSpec:
    path: str
    block_tokens: int = 512          # Mooncake's block size
    time_scale: float = 1.0
    length_scale: float = 1.0
    max_requests: int | None = None

    def __post_init__(self) -> None:
        if self.block_tokens < 1 or self.time_scale <= 0 or self.length_scale <= 0:
            raise WorkloadError("block_tokens, time_scale and length_scale must be positive")


@dataclass(frozen=True)
class Planned:
    """One request of a shared-prefix workload, before the load generator sends it."""

    offset: float                    # seconds after the run's start
    prompt: str
    output_tokens: int
    tenant: str | None = None
    source_ip: str | None = None
    messages: list[dict[str, str]] | None = None
    conversation: int | None = None
    turn: int | None = None


def plan_trace(spec: TraceSpec) -> list[Planned]:
    records = read_trace(spec.path)
    if spec.max_requests is not None:
        records = records[:spec.max_requests]
    start = min(r.timestamp_ms for r in records)
    block = max(1, round(spec.block_tokens * spec.length_scale))
    out = []
    for r in sorted(records, key=lambda r: r.timestamp_ms):
        length = max(1, round(r.input_length * spec.length_scale))
        out.append(Planned((r.timestamp_ms - start) / 1000 * spec.time_scale,
                           trace_prompt(r.hash_ids, length, block),
                           max(1, round(r.output_length * spec.length_scale))))
    return out


# -- multi-turn chat ----------------------------------------------------------------------
@dataclass(frozen=True)
class ChatApp:
    name: str
    system_tokens: int = 400
    weight: float = 1.0


@dataclass(frozen=True)
class ChatTenant:
    name: str
    clients: str | None = None       # a prefix: one address per conversation
    app_server: str | None = None    # or one address for all of it
    weight: float = 1.0

    def addresses(self) -> list[str]:
        if (self.clients is None) == (self.app_server is None):
            raise WorkloadError(f"chat tenant {self.name}: give clients (a prefix) or "
                                "app_server (an address), not both")
        try:
            if self.app_server is not None:
                return [str(ipaddress.ip_address(self.app_server))]
            net = ipaddress.ip_network(str(self.clients), strict=False)
        except ValueError as exc:
            raise WorkloadError(f"chat tenant {self.name}: {exc}") from exc
        hosts = [str(a) for _, a in zip(range(65_536), net.hosts(), strict=False)]
        if not hosts:
            raise WorkloadError(f"chat tenant {self.name}: {net} has no host address")
        return hosts


@dataclass(frozen=True)
class ChatSpec:
    apps: list[ChatApp] = field(default_factory=lambda: [ChatApp("assistant")])
    tenants: list[ChatTenant] = field(default_factory=list)
    conversations_per_s: float = 1.0
    duration: float = 60.0           # seconds of conversation starts
    turns_min: int = 2
    turns_max: int = 6
    think_s: float = 5.0             # mean pause between a conversation's turns
    user_tokens: int = 60            # mean words of a user message (exponential)
    output_tokens: int = 120         # mean answer length (exponential)
    seed: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatSpec:
        data = dict(data)
        try:
            data["apps"] = [ChatApp(**a) for a in data.get("apps", [{"name": "assistant"}])]
            data["tenants"] = [ChatTenant(**t) for t in data.get("tenants", [])]
            return cls(**data)
        except TypeError as exc:
            raise WorkloadError(f"bad chat spec: {exc}") from exc

    def __post_init__(self) -> None:
        if not self.apps or any(a.weight <= 0 or a.system_tokens < 0 for a in self.apps):
            raise WorkloadError("chat apps: at least one, weights positive")
        if any(t.weight <= 0 for t in self.tenants):
            raise WorkloadError("chat tenants: weights positive")
        if not 1 <= self.turns_min <= self.turns_max:
            raise WorkloadError("chat: 1 <= turns_min <= turns_max")
        if self.conversations_per_s <= 0 or self.duration <= 0 or self.think_s < 0:
            raise WorkloadError("chat: conversations_per_s and duration positive, "
                                "think_s not negative")
        if self.user_tokens < 1 or self.output_tokens < 1:
            raise WorkloadError("chat: user_tokens and output_tokens at least 1")


def _words(rng: np.random.Generator, count: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), count))


def plan_chat(spec: ChatSpec) -> list[Planned]:
    rng = np.random.default_rng(spec.seed)
    tenants = spec.tenants or [ChatTenant("default", app_server="127.0.0.1")]
    pools = [t.addresses() for t in tenants]
    used = [0] * len(tenants)
    app_weights = np.array([a.weight for a in spec.apps], dtype=float)
    tenant_weights = np.array([t.weight for t in tenants], dtype=float)
    # every application's system prompt: fixed text, the shared prefix of its conversations
    systems = [" ".join(block_words(10_000_000 + i, a.system_tokens)) if a.system_tokens
               else "" for i, a in enumerate(spec.apps)]
    out: list[Planned] = []
    start, conversation = 0.0, 0
    while True:
        start += rng.exponential(1 / spec.conversations_per_s)
        if start >= spec.duration:
            break
        app = int(rng.choice(len(spec.apps), p=app_weights / app_weights.sum()))
        who = int(rng.choice(len(tenants), p=tenant_weights / tenant_weights.sum()))
        address = pools[who][used[who] % len(pools[who])]
        used[who] += 1
        messages = [{"role": "system", "content": systems[app]}] if systems[app] else []
        at = start
        for turn in range(int(rng.integers(spec.turns_min, spec.turns_max + 1))):
            user = f"u{conversation}.{turn} " + _words(
                rng, max(1, math.ceil(rng.exponential(spec.user_tokens))))
            messages = [*messages, {"role": "user", "content": user}]
            answer = max(1, math.ceil(rng.exponential(spec.output_tokens)))
            out.append(Planned(at, " ".join(m["content"] for m in messages), answer,
                               tenants[who].name, address, messages, conversation, turn))
            messages = [*messages, {"role": "assistant", "content": _words(rng, answer)}]
            at += rng.exponential(spec.think_s) if spec.think_s else 0.0
        conversation += 1
    out.sort(key=lambda p: p.offset)
    return out


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
