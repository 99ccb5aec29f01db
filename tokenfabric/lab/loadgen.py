"""Open-loop load generator for OpenAI-compatible servers (raw HTTP + SSE, no SDK).

Arrivals are planned up front from a seed (Poisson, or bursty: Gamma
inter-arrival times with a coefficient of variation above 1) and fired at
their time whether or not earlier requests have finished -- except a conversation's
next turn, which waits for its previous turn's answer (`TurnOrder`). Prompt and output
lengths follow a ShareGPT-like log-normal distribution (docs/lab.md gives the
source of the parameters). Or, with shared prefixes (tokenfabric/lab/workloads.py):
`trace` replays a Mooncake-format JSONL trace, `chat` generates multi-turn
conversations with shared system prompts from many client addresses, `requests` lists
requests a caller planned (the lab's experiment `prefix`).
Every finished request becomes one JSON line:

    {"id", "tenant", "class", "offset", "start", "status", "ok", "error",
     "ttft", "tpot", "e2e", "prompt_tokens", "output_tokens", "backend",
     "slo_ttft_ms", "slo_tpot_ms", ...}

Times are seconds; `ttft`/`tpot` are null where the request produced no token.
Run it as a process (the lab does, inside a Mininet host):

    python -m tokenfabric.lab.loadgen workload.json requests.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import numpy as np

from tokenfabric.hostagent.handoff import DECISION_HEADER
from tokenfabric.lab.workloads import ChatSpec, Planned, TraceSpec, plan_chat, plan_trace
from tokenfabric.sse import is_token_chunk

log = logging.getLogger(__name__)


# The header a backend's bridge (or emulator) sets to name itself; see docs/lab.md.
DEFAULT_BACKEND_HEADER = "X-Tokenfabric-Backend"

# Mean prompt and output lengths (tokens) of ShareGPT as measured by Kwon et al.,
# "Efficient Memory Management for Large Language Model Serving with PagedAttention"
# (SOSP 2023), Fig. 11. The log-normal shape (sigma) is our choice, see docs/lab.md.
SHAREGPT_PROMPT_MEAN = 161.31
SHAREGPT_OUTPUT_MEAN = 337.99

_VOCABULARY = ("the quick brown fox jumps over a lazy dog while network switches route "
               "tokens to servers that answer every question").split()


@dataclass(frozen=True)
class LengthDist:
    """Log-normal token lengths with the given means, clipped to [minimum, maximum].

    `scale` multiplies both means: the lab shrinks requests so that an emulated
    run finishes in seconds while keeping the shape of the distribution.
    """

    prompt_mean: float = SHAREGPT_PROMPT_MEAN
    prompt_sigma: float = 1.0
    output_mean: float = SHAREGPT_OUTPUT_MEAN
    output_sigma: float = 0.8
    minimum: int = 4
    maximum: int = 1024
    scale: float = 1.0

    def sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        return (self._draw(rng, count, self.prompt_mean * self.scale, self.prompt_sigma),
                self._draw(rng, count, self.output_mean * self.scale, self.output_sigma))

    def _draw(self, rng: np.random.Generator, count: int, mean: float,
              sigma: float) -> np.ndarray:
        # A log-normal's mean is exp(mu + sigma^2 / 2): pick mu so the mean is `mean`.
        mu = math.log(max(mean, 1e-9)) - sigma * sigma / 2
        values = np.rint(rng.lognormal(mu, sigma, count)).astype(int)
        return np.clip(values, self.minimum, max(self.minimum, self.maximum))


@dataclass(frozen=True)
class TenantSpec:
    """A share of the load: who sends it, its class, its SLO and where it comes from."""

    name: str
    traffic_class: str = "best-effort"
    weight: float = 1.0
    source_ip: str | None = None  # bind the client socket here (tenants are source prefixes)
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 200.0


@dataclass
class Workload:
    url: str  # base URL, e.g. http://10.0.0.100:8000
    rate: float  # offered load, requests per second
    duration: float  # seconds of arrivals
    model: str = "tiny"
    endpoint: str = "completions"  # or "chat"
    arrival: str = "poisson"  # or "bursty"
    burst_cv: float = 3.0  # coefficient of variation of bursty inter-arrival times
    lengths: LengthDist = field(default_factory=LengthDist)
    tenants: list[TenantSpec] = field(default_factory=lambda: [TenantSpec("default")])
    seed: int = 1
    timeout: float = 60.0  # per request, connect to last byte
    backend_header: str = DEFAULT_BACKEND_HEADER
    max_inflight: int = 2048  # a safety bound; arrivals beyond it are recorded, not sent
    trace: dict[str, Any] | None = None  # TraceSpec fields: replay a JSONL trace
    chat: dict[str, Any] | None = None   # ChatSpec fields: multi-turn chat
    # or the requests themselves (workloads.Planned fields): a workload planned by the
    # caller, e.g. the lab's trace or prefix-free load split over its client hosts
    requests: list[dict[str, Any]] | None = None
    # send X-Tokenfabric-Tenant (the agents' trust_tenant_header: benches where every
    # client shares 127.0.0.1); the lab's tenants are their source addresses instead
    tenant_header: bool = False

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.trace, self.chat, self.requests)) > 1:
            raise ValueError("a workload replays a trace, generates chat or lists its "
                             "requests: one of them")
        if self.requests is not None:
            planned_requests(self.requests)  # checks every field now
        if self.trace is not None:
            TraceSpec(**self.trace)  # checks the fields now, reads the file at plan time
        if self.chat is not None:
            ChatSpec.from_dict(self.chat)
        if self.rate <= 0 or self.duration <= 0:
            raise ValueError("rate and duration must be positive")
        if self.arrival not in ("poisson", "bursty"):
            raise ValueError(f"arrival must be poisson or bursty, not {self.arrival!r}")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be completions or chat, not {self.endpoint!r}")
        if not self.tenants or any(t.weight <= 0 for t in self.tenants):
            raise ValueError("at least one tenant, every weight positive")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        data = dict(data)
        data["lengths"] = LengthDist(**data.get("lengths", {}))
        data["tenants"] = [TenantSpec(**t) for t in data.get("tenants", [{"name": "default"}])]
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    offset: float  # seconds after the start of the run
    tenant: TenantSpec
    prompt_tokens: int
    max_tokens: int
    prompt: str | None = None            # shared-prefix workloads give the text
    messages: list[dict[str, str]] | None = None
    source_ip: str | None = None         # overrides the tenant's
    conversation: int | None = None
    turn: int | None = None


class TurnOrder:
    """A conversation's turn goes out only after its previous turn has finished (a chat
    client sends the next message once it has read the answer; the planned offset is the
    earliest time). Without it the chat, scaled to a load, overlaps a conversation's
    turns, which no chat user does: the next turn would be routed while the backend that
    holds its history is still prefilling the previous one."""

    def __init__(self) -> None:
        self._done: dict[tuple[int, int], asyncio.Event] = {}

    def _event(self, conversation: int, turn: int) -> asyncio.Event:
        return self._done.setdefault((conversation, turn), asyncio.Event())

    async def wait(self, req: PlannedRequest, timeout: float) -> None:
        """Until the previous turn of req's conversation is finished, at most `timeout` s
        (a request that never comes back, or a turn cut by the duration, holds no one up
        for longer)."""
        if req.conversation is None or not req.turn:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event(req.conversation, req.turn - 1).wait(),
                                   timeout)

    def finished(self, req: PlannedRequest) -> None:
        if req.conversation is not None and req.turn is not None:
            self._event(req.conversation, req.turn).set()


def plan(workload: Workload) -> list[PlannedRequest]:
    """The whole arrival schedule, reproducible from the workload's seed."""
    if workload.trace is not None or workload.chat is not None or \
            workload.requests is not None:
        return _plan_shared(workload)
    rng = np.random.default_rng(workload.seed)
    mean_gap = 1.0 / workload.rate
    # Draw more gaps than needed, in one go, then cut at the duration.
    count = max(16, int(workload.rate * workload.duration * 1.5) + 16)
    offsets: np.ndarray = np.empty(0)
    while offsets.size == 0 or offsets[-1] < workload.duration:
        if workload.arrival == "poisson":
            gaps = rng.exponential(mean_gap, count)
        else:
            # Gamma with shape k has CV 1/sqrt(k); scale keeps the mean gap.
            shape = 1.0 / (workload.burst_cv ** 2)
            gaps = rng.gamma(shape, mean_gap / shape, count)
        start = offsets[-1] if offsets.size else 0.0
        offsets = np.concatenate([offsets, start + np.cumsum(gaps)])
    offsets = offsets[offsets < workload.duration]
    weights = np.array([t.weight for t in workload.tenants], dtype=float)
    who = rng.choice(len(workload.tenants), size=offsets.size, p=weights / weights.sum())
    prompts, outputs = workload.lengths.sample(rng, offsets.size)
    return [PlannedRequest(i, float(offsets[i]), workload.tenants[who[i]], int(prompts[i]),
                           int(outputs[i])) for i in range(offsets.size)]


def _plan_shared(workload: Workload) -> list[PlannedRequest]:
    """A trace's or a chat generator's requests, cut at the workload's duration."""
    if workload.trace is not None:
        planned = plan_trace(TraceSpec(**workload.trace))
    elif workload.requests is not None:
        planned = planned_requests(workload.requests)
    else:
        planned = plan_chat(ChatSpec.from_dict(workload.chat or {}))
    tenants = {t.name: t for t in workload.tenants}
    out: list[PlannedRequest] = []
    for p in planned:
        if p.offset >= workload.duration:
            break
        tenant = tenants.get(p.tenant or "") or (TenantSpec(p.tenant) if p.tenant
                                                 else workload.tenants[0])
        out.append(PlannedRequest(len(out), p.offset, tenant, len(p.prompt.split()),
                                  p.output_tokens, p.prompt, p.messages, p.source_ip,
                                  p.conversation, p.turn))
    return out


def planned_requests(rows: list[dict[str, Any]]) -> list[Planned]:
    """A workload's listed requests as Planned, in time order; ValueError naming the first
    row that is not one."""
    out = []
    for number, row in enumerate(rows):
        try:
            planned = Planned(**row)
        except TypeError as exc:
            raise ValueError(f"requests[{number}]: {exc}") from None
        if not isinstance(planned.prompt, str) or not isinstance(planned.output_tokens, int) \
                or planned.output_tokens < 1 or not isinstance(planned.offset, int | float) \
                or not 0 <= planned.offset < float("inf"):
            raise ValueError(f"requests[{number}]: needs a text prompt, output_tokens >= 1 "
                             "and an offset >= 0 (seconds)")
        out.append(planned)
    return sorted(out, key=lambda p: p.offset)


def prompt_text(tokens: int, index: int) -> str:
    """About `tokens` tokens of text (one common word each), different per request."""
    words = [_VOCABULARY[(index + i) % len(_VOCABULARY)] for i in range(max(tokens - 1, 0))]
    return " ".join([f"q{index}", *words])


def _body(workload: Workload, req: PlannedRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": workload.model, "max_tokens": req.max_tokens, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0.0,
        "ignore_eos": True,  # vLLM's extension: generate exactly max_tokens
        "user": req.tenant.name,
    }
    text = req.prompt if req.prompt is not None else prompt_text(req.prompt_tokens, req.index)
    if workload.endpoint == "chat":
        body["messages"] = req.messages or [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


async def _stream(resp: aiohttp.ClientResponse, started: float,
                  record: dict[str, Any]) -> None:
    """Read the SSE stream: first-token time, token count, usage, [DONE]."""
    chunks = 0
    first: float | None = None
    buffer = b""
    async for raw in resp.content:
        buffer += raw
        if not buffer.endswith(b"\n"):
            continue
        line, buffer = buffer.strip(), b""
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            record["done"] = True
            break
        try:
            event = json.loads(data)
        except ValueError:
            record["error"] = "bad_sse_json"
            continue
        if isinstance(event, dict) and event.get("error"):
            # an error event inside a 200 stream (e.g. the bridge: "vLLM failed mid-stream")
            err = event["error"]
            record["error"] = "stream_error: " + str(err.get("message") if isinstance(
                err, dict) else err)[:200]
            continue
        if is_token_chunk(event):  # the bridge's rule: the same tokens it bills
            chunks += 1
            if first is None:
                first = time.perf_counter()
        usage = event.get("usage")
        if usage:
            record["output_tokens"] = usage.get("completion_tokens")
            record["prompt_tokens"] = usage.get("prompt_tokens", record["prompt_tokens"])
            details = usage.get("prompt_tokens_details")  # vLLM's, when it reports them
            if isinstance(details, dict):
                record["cached_tokens"] = details.get("cached_tokens")
    record["chunks"] = chunks
    if record.get("output_tokens") is None:
        record["output_tokens"] = chunks
    if first is not None:
        record["ttft"] = first - started


def _new_record(req: PlannedRequest, start_epoch: float) -> dict[str, Any]:
    return {
        "id": req.index, "tenant": req.tenant.name, "class": req.tenant.traffic_class,
        "offset": req.offset, "start": start_epoch,
        "status": None, "ok": False, "error": None, "ttft": None, "tpot": None, "e2e": None,
        "prompt_tokens": req.prompt_tokens, "max_tokens": req.max_tokens,
        "output_tokens": None, "backend": None, "retry_after": None, "done": False,
        "slo_ttft_ms": req.tenant.slo_ttft_ms, "slo_tpot_ms": req.tenant.slo_tpot_ms,
        "source_ip": _source(req), "conversation": req.conversation, "turn": req.turn,
        "cached_tokens": None, "handoff_from": None, "handoff_ms": None, "decision": None,
    }


def _source(req: PlannedRequest) -> str | None:
    return req.source_ip or req.tenant.source_ip


async def _send(session: aiohttp.ClientSession, workload: Workload, req: PlannedRequest,
                run_start_epoch: float, run_start: float) -> dict[str, Any]:
    record = _new_record(req, run_start_epoch + (time.perf_counter() - run_start))
    path = "/v1/chat/completions" if workload.endpoint == "chat" else "/v1/completions"
    started = time.perf_counter()
    try:
        headers = {"X-Tokenfabric-Tenant": req.tenant.name} if workload.tenant_header else None
        async with session.post(workload.url.rstrip("/") + path, headers=headers,
                                json=_body(workload, req)) as resp:
            record["status"] = resp.status
            record["backend"] = resp.headers.get(workload.backend_header)
            # a bridge that handed the request to the peer holding its prefix says so
            # (hostagent/handoff.py): who relayed it, and the time the handoff added
            record["handoff_from"] = resp.headers.get("X-Tokenfabric-Handoff-From")
            with contextlib.suppress(KeyError, ValueError):
                record["handoff_ms"] = float(resp.headers["X-Tokenfabric-Handoff-Ms"])
            # and, with the agents' decision_header (the lab's), what it decided and on
            # what: the miss analysis's cause (tokenfabric/lab/prefix_misses.py)
            record["decision"] = resp.headers.get(DECISION_HEADER)
            record["retry_after"] = resp.headers.get("Retry-After")
            if resp.status == 200:
                await _stream(resp, started, record)
                if not record["done"]:
                    record["error"] = record["error"] or "incomplete_stream"
            else:
                await resp.read()
                record["error"] = f"http_{resp.status}"
    except TimeoutError:
        record["error"] = "timeout"
    except aiohttp.ClientConnectorError:
        record["error"] = "connect"
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError) as exc:
        record["error"] = f"reset: {type(exc).__name__}"
    except aiohttp.ClientError as exc:
        record["error"] = f"client: {type(exc).__name__}: {exc}"
    record["e2e"] = time.perf_counter() - started
    tokens = record["output_tokens"] or 0
    if record["ttft"] is not None and tokens > 1:
        record["tpot"] = (record["e2e"] - record["ttft"]) / (tokens - 1)
    record["ok"] = record["status"] == 200 and record["done"] and record["error"] is None
    return record


async def run(workload: Workload, sink: TextIO,
              on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Fire the planned requests open-loop; write each record to `sink` as it finishes."""
    schedule = plan(workload)
    log.info("load: %d requests over %.1fs at %.2f req/s (%s) to %s", len(schedule),
             workload.duration, workload.rate, workload.arrival, workload.url)
    timeout = aiohttp.ClientTimeout(total=workload.timeout)
    sessions: dict[str | None, aiohttp.ClientSession] = {}

    def session_for(source: str | None) -> aiohttp.ClientSession:
        """One session per client address (chat spreads a tenant over many)."""
        if source not in sessions:
            # force_close: one request per connection, as the bridge answers Connection: close
            connector = aiohttp.TCPConnector(force_close=True, limit=0,
                                             local_addr=(source, 0) if source else None)
            sessions[source] = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return sessions[source]

    records: list[dict[str, Any]] = []
    inflight: set[asyncio.Task] = set()
    turns = TurnOrder()

    def finished(record: dict[str, Any]) -> None:
        records.append(record)
        sink.write(json.dumps(record) + "\n")
        sink.flush()
        if on_record:
            on_record(record)

    async def fire(req: PlannedRequest) -> None:
        await turns.wait(req, workload.timeout)
        try:
            finished(await _send(session_for(_source(req)), workload, req, epoch, t0))
        finally:
            turns.finished(req)

    epoch, t0 = time.time(), time.perf_counter()
    try:
        for req in schedule:
            delay = req.offset - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= workload.max_inflight:
                finished({**_new_record(req, time.time()), "error": "client_overload"})
                turns.finished(req)
                continue
            task = asyncio.create_task(fire(req))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.wait(inflight, timeout=workload.timeout + 5)
    finally:
        for task in list(inflight):
            task.cancel()
        for session in sessions.values():
            await session.close()
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Open-loop OpenAI-compatible load generator.")
    parser.add_argument("workload", type=Path, help="workload JSON (Workload fields)")
    parser.add_argument("out", type=Path, help="JSON lines output, one record per request")
    args = parser.parse_args(argv)
    try:
        workload = Workload.from_dict(json.loads(args.workload.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        print(f"loadgen: bad workload {args.workload}: {exc}", file=sys.stderr)
        return 4
    with args.out.open("w") as sink:
        asyncio.run(run(workload, sink))
    return 0


if __name__ == "__main__":
    sys.exit(main())
