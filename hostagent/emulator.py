"""An OpenAI-compatible vLLM emulator for labs and tests (`tokenfabric vllm-emulator`).

Serves /v1/models, /v1/completions, /v1/chat/completions (SSE ending in `data: [DONE]`,
`stream_options.include_usage`), /health and /metrics with vLLM's metric names, types and
labels; the token endpoints the L7 routers call, in vLLM's formats: /tokenize,
/detokenize, /v1/completions/render, /v1/chat/completions/render; /reset_prefix_cache.
With --kv-events-config it publishes vLLM's KV-cache events (hostagent/kv_events.py).
Its timing comes from hostagent.engine. Faults on demand through POST /admin/fault
{"fault": "crash"|"hang"|"slow"|"503"|"none", "factor": 4} or the --fault flag.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tokenfabric.hostagent.engine import Engine, EngineParams, Request
from tokenfabric.hostagent.kv_events import KvEventPublisher, KvEventsConfig
from tokenfabric.hostagent.wordtok import chat_words, split

log = logging.getLogger(__name__)


FAULTS = ("none", "crash", "hang", "slow", "503")
CRASH_EXIT_CODE = 70
_WORDS = ("the", "fabric", "routes", "tokens", "to", "a", "backend", "with", "room",
          "and", "every", "switch", "keeps", "its", "promise", "of", "low", "latency")


def tokenize(text: str) -> list[str]:
    """The emulator's tokenizer: words and punctuation marks (hostagent/wordtok.py)."""
    return split(text)


def chat_tokens(messages: object, add_generation_prompt: bool = True) -> list[str]:
    """The emulator's chat template (hostagent/wordtok.py, shared with the bridge)."""
    try:
        return chat_words(messages, add_generation_prompt)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


@dataclass
class EmulatorConfig:
    model: str = "emulated-llama"
    max_model_len: int = 8192
    default_max_tokens: int = 64
    legacy_metrics: bool = False
    backend_name: str = ""  # X-Tokenfabric-Backend of every response, as the bridge sets it
    engine: EngineParams = None  # type: ignore[assignment]
    kv_events: KvEventsConfig | None = None  # vLLM's --kv-events-config

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = EngineParams()


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def response(self) -> web.Response:
        return web.json_response({"object": "error", "message": self.message, "type": self.kind,
                                  "param": None, "code": self.status}, status=self.status)


class _Collector:
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        em = self.emulator
        engine, labels = em.engine, [em.config.model, "0"]
        names = ["model_name", "engine"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(labels, value)
            return family

        cache_name = "vllm:gpu_cache_usage_perc" if em.config.legacy_metrics \
            else "vllm:kv_cache_usage_perc"
        stats = engine.stats
        families = [
            gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                  len(engine.running)),
            gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                  len(engine.waiting)),
            gauge(cache_name, "KV-cache usage. 1 means 100 percent usage.", engine.kv_usage),
            counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                    stats.preemptions),
            counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                    stats.prompt_tokens),
            counter("vllm:generation_tokens", "Number of generation tokens processed.",
                    stats.generation_tokens),
            counter("vllm:prefix_cache_queries",
                    "Prefix cache queries, in terms of number of queried tokens.",
                    stats.prefix_cache_queries),
            counter("vllm:prefix_cache_hits",
                    "Prefix cache hits, in terms of number of cached tokens.",
                    stats.prefix_cache_hits),
        ]
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed "
                                      "requests.", labels=[*names, "finished_reason"])
        for reason in ("stop", "length", "abort"):
            success.add_metric([*labels, reason], stats.finished[reason])
        families.append(success)
        return families


class Emulator:
    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.fault = "none"
        self.not_hung = asyncio.Event()
        self.not_hung.set()
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        labels = ["model_name", "engine"]
        itl_name = "vllm:time_per_output_token_seconds" if config.legacy_metrics \
            else "vllm:inter_token_latency_seconds"
        fast = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
        slow = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", labels,
                              registry=self.registry, buckets=fast)
        self.itl = Histogram(itl_name, "Histogram of inter-token latency in seconds.", labels,
                             registry=self.registry, buckets=fast)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", labels,
                             registry=self.registry, buckets=slow)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    labels, registry=self.registry, buckets=slow)
        # not a vLLM metric: shows that an L7 router asked for token ids (docs/lab.md)
        self.token_calls = Counter("tokenfabric_emulator_token_requests",
                                   "Calls of the token endpoints the L7 routers use.",
                                   ["endpoint"], registry=self.registry)
        self.engine = Engine(config.engine, on_finish=self._observe,
                             on_token_gap=self.itl.labels(config.model, "0").observe,
                             on_kv_events=self._publish)
        self.publisher: KvEventPublisher | None = None

    def _publish(self, events: list) -> None:
        if self.publisher is not None:
            self.publisher.publish(events)

    # -- metrics -------------------------------------------------------------------------
    def _observe(self, request: Request) -> None:
        labels = (self.config.model, "0")
        if request.first_token_at is not None:
            self.ttft.labels(*labels).observe(request.first_token_at - request.arrival)
        if request.first_scheduled is not None:
            self.queue_time.labels(*labels).observe(request.first_scheduled - request.arrival)
        if request.last_token_at is not None:
            self.e2e.labels(*labels).observe(request.last_token_at - request.arrival)

    # -- faults ------------------------------------------------------------------------
    def set_fault(self, fault: str, factor: float = 4.0) -> None:
        if fault not in FAULTS:
            raise ApiError(400, f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
        if factor <= 0:
            raise ApiError(400, "factor must be positive")
        log.warning("emulator fault: %s%s", fault, f" x{factor}" if fault == "slow" else "")
        self.fault = fault
        self.engine.slowdown = factor if fault == "slow" else 1.0
        self.engine.hung = fault == "hang"
        if fault == "hang":
            self.not_hung.clear()
        else:
            self.not_hung.set()
            self.engine._wakeup.set()
        if fault == "crash":
            # Answer the admin call first, then die as a crashed server does: no goodbye.
            asyncio.get_running_loop().call_later(0.05, os._exit, CRASH_EXIT_CODE)

    async def _gate(self) -> None:
        """Apply the hang and 503 faults to an API call."""
        await self.not_hung.wait()
        if self.fault == "503":
            raise ApiError(503, "Service Unavailable (emulated fault)", "ServiceUnavailableError")

    # -- HTTP ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=8 * 1024 * 1024)
        reads = {"/health": self.health, "/metrics": self.metrics, "/v1/models": self.models,
                 "/admin/fault": self.get_fault}
        # vLLM's OpenAI-style POST endpoints, then the emulator's own fault switch
        calls = {"/v1/completions": self.completions, "/v1/chat/completions": self.chat_completions,
                 "/tokenize": self.tokenize, "/detokenize": self.detokenize,
                 "/v1/completions/render": self.render_completion,
                 "/v1/chat/completions/render": self.render_chat,
                 "/reset_prefix_cache": self.reset_prefix_cache, "/admin/fault": self.post_fault}
        app.add_routes([web.get(path, handler) for path, handler in reads.items()]
                       + [web.post(path, handler) for path, handler in calls.items()])
        app.on_response_prepare.append(self._name_backend)
        app.on_startup.append(self._start_engine)
        app.on_cleanup.append(self._stop_engine)
        return app

    async def _name_backend(self, request: web.Request, response: web.StreamResponse) -> None:
        # for clients that reach the emulator without a bridge (the lab's L7 router)
        if self.config.backend_name:
            response.headers["X-Tokenfabric-Backend"] = self.config.backend_name

    async def _start_engine(self, app: web.Application) -> None:
        kv = self.config.kv_events
        if kv is not None and kv.publishes:
            self.publisher = KvEventPublisher(kv.endpoint, kv.replay_endpoint, kv.topic,
                                              kv.buffer_steps, kv.hwm)
            self.publisher.start()
            log.info("KV events on %s (replay %s, topic %r)", self.publisher.endpoint,
                     self.publisher.replay_endpoint, kv.topic)
        self.engine.start()

    async def _stop_engine(self, app: web.Application) -> None:
        await self.engine.stop()
        if self.publisher is not None:
            await self.publisher.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()

    async def health(self, request: web.Request) -> web.Response:
        await self._gate()
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            content_type="text/plain", charset="utf-8")

    async def models(self, request: web.Request) -> web.Response:
        await self._gate()
        model = self.config.model
        return web.json_response({"object": "list", "data": [{
            "id": model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": model, "parent": None, "max_model_len": self.config.max_model_len}]})

    async def get_fault(self, request: web.Request) -> web.Response:
        return web.json_response({"fault": self.fault, "factor": self.engine.slowdown})

    async def post_fault(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        factor = body.get("factor", 4.0)
        if not isinstance(factor, int | float):
            raise ApiError(400, "factor must be a number")
        self.set_fault(str(body.get("fault", "")), float(factor))
        return web.json_response({"fault": self.fault, "factor": float(factor)})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        await self._gate()
        body = await _json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        return await self._generate(request, body, _prompt_tokens(prompt), chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        await self._gate()
        body = await _json_body(request)
        return await self._generate(request, body, chat_tokens(body.get("messages")),
                                    chat=True)

    # -- the token endpoints (vLLM's request and response formats) -----------------------
    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.config.model:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")

    def _ids(self, tokens: list[str] | list[int]) -> list[int]:
        tok = self.engine.tokenizer
        return [t if isinstance(t, int) else tok.token_id(t) for t in tokens]

    async def _token_call(self, request: web.Request, endpoint: str) -> dict:
        """What the tokenizer and render endpoints do first: faults, the per-endpoint
        counter, a JSON object body naming the served model."""
        await self._gate()
        self.token_calls.labels(endpoint).inc()
        body = await _json_body(request)
        self._check_model(body)
        return body

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self._token_call(request, "/tokenize")
        if "messages" in body:
            add = body.get("add_generation_prompt", True)
            if not isinstance(add, bool):
                raise ApiError(400, "add_generation_prompt must be a boolean")
            words = chat_tokens(body["messages"], add)
        elif isinstance(body.get("prompt"), str):
            words = tokenize(body["prompt"])
        else:
            raise ApiError(400, "prompt must be a string (or give messages)")
        ids = self._ids(words)
        strs = words if body.get("return_token_strs") else None
        return web.json_response({"count": len(ids), "max_model_len": self.config.max_model_len,
                                  "tokens": ids, "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._token_call(request, "/detokenize")
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(_is_token_id(t) for t in ids):
            raise ApiError(400, "tokens must be a list of non-negative integers")
        return web.json_response({"prompt": self.engine.tokenizer.decode(ids)})

    def _generate_request(self, body: dict, ids: list[int], request_id: str) -> dict:
        """vLLM's GenerateRequest (entrypoints/scale_out/token_in_token_out), as /render
        returns it: the token ids the engine would run, and the sampling parameters."""
        max_tokens = self._max_tokens(body, len(ids)) if "max_tokens" in body \
            else self.config.max_model_len - len(ids)  # vLLM's default: the room left
        if max_tokens < 1:
            raise ApiError(400, f"This model's maximum context length is "
                           f"{self.config.max_model_len} tokens. However, your request has "
                           f"{len(ids)} input tokens.")
        stream = bool(body.get("stream", False))
        return {"request_id": request_id, "token_ids": ids, "token_offsets": None,
                "features": None, "content_parts": None,
                # vLLM dumps its SamplingParams without their defaults, so these keys
                "sampling_params": {
                    "presence_penalty": body.get("presence_penalty", 0.0),
                    "frequency_penalty": body.get("frequency_penalty", 0.0),
                    "repetition_penalty": body.get("repetition_penalty", 1.0),
                    "temperature": body.get("temperature", 1.0),
                    "top_p": body.get("top_p", 1.0), "min_p": body.get("min_p", 0.0),
                    "stop": [], "stop_token_ids": [], "max_tokens": max_tokens,
                    "output_kind": 1 if stream else 2,  # DELTA, FINAL_ONLY
                    "skip_clone": True, "bad_words": [],
                    "skip_reading_prefix_cache": False},
                "model": body.get("model"), "reasoning_ended": None,
                "reasoning_parser_kwargs": None, "return_token_ids": None,
                "output_mode": "tokens", "stream": stream,
                "stream_options": body.get("stream_options") if stream else None,
                "cache_salt": body.get("cache_salt"), "priority": body.get("priority", 0),
                "kv_transfer_params": None, "ec_transfer_params": None}

    async def render_completion(self, request: web.Request) -> web.Response:
        body = await self._token_call(request, "/v1/completions/render")
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) and prompt and \
            all(isinstance(p, str) for p in prompt) else [prompt]
        base = "cmpl-" + uuid.uuid4().hex
        out = []
        for i, one in enumerate(prompts):
            ids = self._ids(_prompt_tokens(one))
            out.append(self._generate_request(body, ids, base if len(prompts) == 1
                                              else f"{base}-{i}"))
        return web.json_response(out)

    async def render_chat(self, request: web.Request) -> web.Response:
        body = await self._token_call(request, "/v1/chat/completions/render")
        ids = self._ids(chat_tokens(body.get("messages")))
        return web.json_response(self._generate_request(body, ids,
                                                        "chatcmpl-" + uuid.uuid4().hex))

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        if not self.engine.reset_prefix_cache():
            raise ApiError(409, "the prefix cache cannot be reset while requests hold "
                           "blocks", "ConflictError")
        return web.Response(status=200)

    def _max_tokens(self, body: dict, prompt_len: int) -> int:
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        room = self.config.max_model_len - prompt_len
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is "
                           f"{self.config.max_model_len} tokens. However, your request has "
                           f"{prompt_len} input tokens.")
        if limit is None:
            return min(self.config.default_max_tokens, room)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ApiError(400, "max_tokens must be a positive integer")
        if limit > room:
            raise ApiError(400, f"max_tokens ({limit}) plus the prompt ({prompt_len}) exceed "
                           f"the maximum context length {self.config.max_model_len}")
        return limit

    async def _generate(self, http: web.Request, body: dict, tokens: list[str] | list[int],
                        chat: bool) -> web.StreamResponse:
        model = body.get("model", self.config.model)
        if model != self.config.model:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")
        if body.get("n", 1) != 1:
            raise ApiError(400, "the emulator serves n=1 only")
        stream = bool(body.get("stream", False))
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object")
        include_usage = bool(options.get("include_usage", False))
        max_tokens = self._max_tokens(body, len(tokens))
        priority = body.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ApiError(400, "priority must be an integer")
        try:
            req = self.engine.submit(tokens, max_tokens, priority)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        prefix = "chatcmpl-" if chat else "cmpl-"
        meta = {"id": prefix + uuid.uuid4().hex, "created": int(time.time()), "model": model,
                "object": "chat.completion.chunk" if chat else "text_completion"}
        seed = sum(map(ord, req.request_id))
        try:
            if stream:
                return await self._stream(http, req, meta, chat, include_usage, seed)
            return await self._whole(req, meta, chat, seed)
        finally:
            self.engine.abort(req)  # a no-op when it finished; frees it when the client left

    @staticmethod
    def _word(seed: int, index: int) -> str:
        return " " + _WORDS[(seed + index * 7) % len(_WORDS)]

    @staticmethod
    def _usage(req: Request) -> dict:
        return {"prompt_tokens": req.num_prompt_tokens, "completion_tokens": req.output_tokens,
                "total_tokens": req.num_prompt_tokens + req.output_tokens,
                "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}

    async def _whole(self, req: Request, meta: dict, chat: bool, seed: int) -> web.Response:
        words = []
        while (index := await req.queue.get()) is not None:
            words.append(self._word(seed, index))
        text = "".join(words)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": req.finished_reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": req.finished_reason,
                      "logprobs": None, "stop_reason": None}
            obj = "text_completion"
        return web.json_response({**meta, "object": obj, "choices": [choice],
                                  "usage": self._usage(req)})

    async def _stream(self, http: web.Request, req: Request, meta: dict, chat: bool,
                      include_usage: bool, seed: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(http)

        async def send(obj: dict) -> None:
            await response.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        if chat:
            await send({**meta, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                    "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        while (index := await req.queue.get()) is not None:
            word = self._word(seed, index)
            last = index >= req.max_tokens
            reason = req.finished_reason if last else None
            if chat:
                choice = {"index": 0, "delta": {"content": word}, "logprobs": None,
                          "finish_reason": reason}
            else:
                choice = {"index": 0, "text": word, "logprobs": None, "finish_reason": reason,
                          "stop_reason": None}
            await send({**meta, "choices": [choice]})
        if include_usage:
            await send({**meta, "choices": [], "usage": self._usage(req)})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 63


def _prompt_tokens(prompt: object) -> list[str] | list[int]:
    """A completion prompt: a string (the word tokenizer's words) or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt):
        return list(prompt)
    if isinstance(prompt, str):
        return tokenize(prompt)
    raise ApiError(400, "prompt must be a string or a list of token ids")


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


async def serve(config: EmulatorConfig, host: str, port: int, fault: str = "none",
                fault_factor: float = 4.0, fault_after: float = 0.0,
                stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or forever)."""
    emulator = Emulator(config)
    runner = web.AppRunner(emulator.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    log.info("vLLM emulator serving %s on http://%s:%d (speed %.2f, max_num_seqs %d, "
             "KV %d tokens)", config.model, host, port, config.engine.speed,
             config.engine.max_num_seqs, config.engine.kv_cache_tokens)
    if fault != "none":
        asyncio.get_running_loop().call_later(fault_after, emulator.set_fault, fault,
                                              fault_factor)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
