"""The bridge: listens on VIP:port and relays each request to the local vLLM.

- One request per connection: the answer carries `Connection: close`, so that every request
  is a new TCP connection and therefore a new balancing decision in the switch.
- Unbuffered: every complete HTTP chunk from vLLM is written to the client as soon as it
  is read, as a chunk of the same data (SSE events are never held back).
- Tokens are counted per tenant, from `usage` (the final SSE chunk, or the JSON body), or,
  where the client did not ask for usage, by counting the content chunks of the stream
  (and estimating the prompt at 4 bytes a token); such requests are marked estimated.
- The tenant is the longest tenant prefix holding the client's source address; with
  `trust_tenant_header` (labs and tests only) an X-Tokenfabric-Tenant header may name it,
  and an X-Tokenfabric-Client header may stand for the source address.
- Prefix affinity: a request of an opted-in tenant served here because this backend holds
  its prefix, or handed here by a peer, is passed to `on_affinity` with its client's
  address (hostagent/affinity_reports.py: the agent tells the switch, off the request path).
  Any request of an opted-in tenant served here (a long prompt's keys from the handoff's
  decision, or a handed request's body) is passed to `on_claim` / `on_claim_body`: the
  agent claims its blocks in the controller's prefix index (hostagent/prefix_claims.py).
- Every response names the backend in `X-Tokenfabric-Backend` (the agent's name), so a
  client (the lab's load generator) knows who served it or answered the error.
- Charged early: the prompt (estimated, 4 bytes a token) is charged through `on_charge`
  when the request is sent to vLLM, the completion every `charge_step` streamed tokens,
  and the rest (usage's exact figures minus what was charged) at the end; so a tenant's
  token bucket in the switch empties while its requests run, not only when they end.
- With `priority_scheduling` (vLLM runs with `--scheduling-policy priority`) the request
  body gets `priority` = - the tenant's contract `request_priority`: the contract follows
  the Gateway API Inference Extension (higher is more important), vLLM serves lower values
  first. A client's own `priority` is overwritten, so a tenant cannot promote itself.
- Overflow mode answers every request 429 with Retry-After from the tenant's refill rate.
- vLLM unreachable: 502; no response head within the timeout: 504; both JSON errors.
  A stream that breaks or stalls after its head was sent ends with an SSE error event
  and `data: [DONE]`, then a well-formed end of the chunked body; another body ends
  with the close short of its end (a body the close delimits: with a reset), which the
  client's HTTP framing reports. A handed request whose relay ends abnormally -- the
  peer's head missing, its answer cut, stalled or garbled, the client gone -- is logged
  and counted by reason (handoff.RELAY_FAILURES), never silent.
- An answer written whole (served here or relayed from a peer) is checked for delivery:
  its end not acknowledged by the client's TCP `delivery_wait` later -- a stream cut in
  the network after the bridge's last write -- is logged and counted by path
  (tokenfabric_bridge_unacked_answers_total{path=local|relayed}).
- A client that goes away aborts the upstream connection, which makes vLLM abort the
  request; no half-open connection is left on either side.
- Requests are read strictly (RFC 9112) by hostagent/http1.py on llhttp, within limits
  (head size, header count, body size, bytes held across connections, time), and
  forwarded re-serialised from their parsed fields. At most `max_connections` are served
  at once; more get a quick 503.

Plain asyncio streams with llhttp (httptools) for the framing of both sides, requests and
vLLM's answers: the relay only needs the message framing, and skipping a general HTTP
stack keeps the added latency low (bench/bench_bridge.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import ipaddress
import json
import logging
import re
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass

import httptools
from prometheus_client import CollectorRegistry, Counter

from tokenfabric.hostagent.delay import DelayEstimator
from tokenfabric.hostagent.handoff import (
    DECISION_HEADER,
    HANDOFF_FROM_HEADER,
    HANDOFF_HEADER,
    HANDOFF_MS_HEADER,
    LOCAL_AFTER_LOOKUP,
    LOOKUP_MS_HEADER,
    REFUSED_HEADER,
    Decision,
    Handoff,
    LocalLoad,
    admit,
    verify,
)
from tokenfabric.hostagent.http1 import (
    KIB,
    MIB,
    BufferBudget,
    HttpError,
    Request,
    RequestLimits,
    error_body,
    read_request,
    response_head,
)
from tokenfabric.hostagent.tenants import (
    UNKNOWN,
    Tenant,
    TenantTable,
    TenantUsage,
    retry_after_seconds,
)
from tokenfabric.sse import is_token_payload

log = logging.getLogger(__name__)


TENANT_HEADER = "x-tokenfabric-tenant"
CLIENT_HEADER = "x-tokenfabric-client"  # trusted with trust_tenant_header only
BACKEND_HEADER = "X-Tokenfabric-Backend"
MAX_KEPT_RESPONSE = 8 * MIB   # non-streaming bodies kept to read `usage` from
MAX_RESPONSE_HEAD = 64 * KIB  # vLLM's response head
OFF_LOOP_JSON = 256 * KIB     # request bodies larger than this are parsed in a thread
# Parsed JSON takes up to ~25 times its text in Python objects (`[{},{},...]`): a body
# with more values than this (a bound from its commas and colons) is not parsed.
MAX_JSON_VALUES = 256 * 1024
LINGER_SECONDS = 1.0          # after an early answer, how long unread input is drained...
LINGER_BYTES = 1 * MIB        # ...and how much, so that the close does not reset the answer
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "upgrade", "transfer-encoding", "content-length", "expect",
                        TENANT_HEADER, CLIENT_HEADER, BACKEND_HEADER.lower(),
                        HANDOFF_HEADER})
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
UNACKED_PATHS = ("local", "relayed")  # tokenfabric_bridge_unacked_answers' path label


async def _parse_body(body: bytes, one_at_a_time: asyncio.Semaphore) -> dict | None:
    """The body as a JSON object (or None); a large one in a thread, off the event loop,
    one at a time so that the objects of only one large body exist at once."""
    if len(body) <= OFF_LOOP_JSON:
        return _json_object(body)
    if body.count(b",") + body.count(b":") > MAX_JSON_VALUES:
        return None
    async with one_at_a_time:
        return await asyncio.to_thread(_json_object, body)


class UpstreamBroken(Exception):
    """vLLM (or the peer a request was handed to) failed after the response head was sent
    to the client; `reason`: closed, stalled or malformed (handoff.RELAY_FAILURES with
    `peer_` before it)."""

    def __init__(self, message: str, reason: str = "closed") -> None:
        super().__init__(message)
        self.reason = reason


class ClientStalled(Exception):
    """The client took none of the answer for a while (a slow reader)."""


@dataclass
class BridgeSettings:
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 8000
    mode: str = "relay"                 # relay | overflow
    upstream_timeout: float = 30.0      # response head, and any gap between chunks
    connect_timeout: float = 5.0
    trust_tenant_header: bool = False
    overflow_request_tokens: int = 512
    request_timeout: float = 30.0       # a client must send its whole request within this
    head_timeout: float = 10.0          # ...and its request line and headers within this
    backend_name: str = ""              # X-Tokenfabric-Backend of every response
    priority_scheduling: bool = False   # set the body's `priority` from the tenant's contract
    charge_step: int = 16               # charge streamed completion tokens this many at a time
    delivery_wait: float = 2.0          # s the end of an answer written whole waits for
                                        # the client's TCP acknowledgement of its last
                                        # byte; still unacknowledged: logged and counted
                                        # (0: not checked)
    max_connections: int = 1024         # open client connections; more are answered 503
    max_body_bytes: int = 16 * MIB      # one request body, chunked included (413)
    max_buffered_bytes: int = 64 * MIB  # request bodies held across all connections (503)
    max_header_bytes: int = 64 * KIB    # request line and headers (431)
    max_headers: int = 100              # header lines (431)

    def limits(self) -> RequestLimits:
        return RequestLimits(max_head=self.max_header_bytes, max_headers=self.max_headers,
                             max_body=self.max_body_bytes, head_timeout=self.head_timeout,
                             request_timeout=self.request_timeout)


class HandoffRefused(HttpError):
    """This backend refuses a handoff at receipt (admit_check): 503, the reason named in
    REFUSED_HEADER, before anything went to vLLM."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, f"handoff refused here: {reason}", "handoff_refused")
        self.reason = reason


class PeerRefused(Exception):
    """The peer refused our handoff at receipt; the request is still whole here."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Exchange:
    """One relayed request and what the bridge worked out from its body."""
    __slots__ = ("request", "prompt_estimate", "max_tokens", "delay_key", "decision",
                 "handed_at", "added_s", "tenant", "client", "sse_done")

    def __init__(self, request: Request, body: dict | None, tenant: Tenant,
                 client: str) -> None:
        self.request = request
        self.client = client  # the client's address (a handed request: the signed one)
        self.prompt_estimate = _estimate_prompt_tokens(body)
        self.max_tokens = _max_tokens(body)
        self.delay_key: int | None = None
        self.tenant = tenant
        self.decision: Decision | None = None  # the prefix handoff's, when one was made
        self.handed_at: float | None = None    # set when the request went to a peer
        self.added_s = 0.0                     # what the handoff added: lookup + connect
        # `data: [DONE]` went to the client: an SSE client may close now, before the
        # chunked end (the OpenAI SDK and the lab's load generator stop there)
        self.sse_done = False


class _Counter:
    """Finds usage, or counts content chunks, in the payload of an SSE stream."""
    __slots__ = ("pending", "chunks", "usage", "on_chunks", "done")

    def __init__(self) -> None:
        self.pending = b""
        self.chunks = 0
        self.usage: dict | None = None
        self.on_chunks: Callable[[int], None] | None = None
        self.done = False  # `data: [DONE]` seen

    def feed(self, payload: bytes) -> None:
        data = self.pending + payload if self.pending else payload
        events = data.split(b"\n\n")
        self.pending = events.pop()
        for event in events:
            if not event.startswith(b"data:"):
                continue
            body = event[5:].strip()
            if body == b"[DONE]":
                self.done = True
                continue
            if _USAGE_OBJECT.search(body):
                with contextlib.suppress(ValueError, RecursionError):
                    usage = json.loads(body).get("usage")
                    if isinstance(usage, dict):
                        self.usage = usage
                        continue
            if is_token_payload(body):
                self.chunks += 1
        if self.on_chunks is not None:
            self.on_chunks(self.chunks)


def _unacknowledged(writer: asyncio.StreamWriter) -> int | None:
    """Bytes written to `writer` that its peer has not acknowledged yet: the transport's
    buffer plus the kernel's send queue (SIOCOUTQ, Linux); None where not known."""
    sock = writer.get_extra_info("socket")
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                b"\0\0\0\0"))[0]
    except (AttributeError, OSError, ValueError):
        return None
    return queued + writer.transport.get_write_buffer_size()


def _token_counts(usage: dict) -> tuple[int, int] | None:
    """`usage`'s prompt and completion tokens, or None when they are not counts (this
    runs after the answer went out: a bad figure must not skip the charge)."""
    out = []
    for key in ("prompt_tokens", "completion_tokens"):
        value = usage.get(key) or 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return None
        out.append(value)
    return out[0], out[1]


def _json_object(body: bytes) -> dict | None:
    """The request body as a JSON object, or None (not JSON, not an object, too deep)."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _max_tokens(request: dict | None) -> int | None:
    """The request's `max_tokens` (or `max_completion_tokens`), if it says."""
    if request is None:
        return None
    value = request.get("max_tokens", request.get("max_completion_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _estimate_prompt_tokens(request: dict | None) -> int:
    """About 4 bytes a token, over the prompt or the messages' content."""
    if request is None:
        return 0
    prompt = request.get("prompt")
    if prompt is None:
        messages = request.get("messages")
        prompt = " ".join(str(m.get("content", "")) for m in
                          (messages if isinstance(messages, list) else [])
                          if isinstance(m, dict))
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        prompt = " ".join(map(str, prompt))
    return (len(str(prompt).encode()) + 3) // 4


UsageCallback = Callable[[Tenant, TenantUsage], None]
ChargeCallback = Callable[[Tenant, int, int], None]  # tenant, prompt tokens, completion tokens


class _Charge:
    """What one request has been charged so far (see the module docstring). A request
    handed to a peer is `muted`: the peer's agent charges it, once."""
    __slots__ = ("tenant", "prompt", "completion", "muted")

    def __init__(self, tenant: Tenant) -> None:
        self.tenant, self.prompt, self.completion = tenant, 0, 0
        self.muted = False


class _Response:
    """httptools' callbacks for vLLM's answer: its head, then its body re-framed chunk by
    chunk (a chunk is passed on once complete, so the client's framing stays whole even
    when vLLM breaks off mid-chunk); SSE payloads are fed to the counter as they come."""

    def __init__(self, counter: _Counter, no_body: bool) -> None:
        self.counter, self.no_body = counter, no_body
        self.status, self.reason = 0, ""
        self.headers: list[tuple[str, str]] = []
        self.headers_done = self.complete = self.chunked = self.is_sse = False
        self.until_close = False
        self.kept = bytearray()        # a non-SSE body, to read `usage` from
        self.pieces: list[bytes] = []  # the chunk being read
        self.out: list[bytes] = []     # for the client, written after each read
        self.broken = ""
        self.parser: httptools.HttpResponseParser | None = None

    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # trailers are dropped
            self.headers.append((name.decode("latin-1").lower(),
                                 value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        values = dict(self.headers)
        self.chunked = "chunked" in values.get("transfer-encoding", "").lower()
        self.is_sse = values.get("content-type", "").startswith("text/event-stream")
        if self.no_body or self.status in (204, 304) or 100 <= self.status < 200:
            self.complete = True  # no body follows such a head
        else:
            self.until_close = not self.chunked and "content-length" not in values

    def on_chunk_header(self) -> None:
        self.pieces = []

    def on_body(self, data: bytes) -> None:
        if self.complete:
            return
        if self.chunked:
            self.pieces.append(data)
        else:
            self.out.append(data)
        if self.is_sse:
            self.counter.feed(data)
        elif len(self.kept) < MAX_KEPT_RESPONSE:
            self.kept += data

    def on_chunk_complete(self) -> None:
        if self.pieces and not self.complete:  # the last chunk (size 0) has none
            payload = b"".join(self.pieces)
            self.out.append(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.pieces = []

    def on_message_complete(self) -> None:
        if self.chunked and not self.complete:
            self.out.append(b"0\r\n\r\n")
        self.complete = True

    def take(self) -> bytes:
        out, self.out = self.out, []
        return out[0] if len(out) == 1 else b"".join(out)


class Bridge:
    def __init__(self, settings: BridgeSettings, tenants: TenantTable | None = None,
                 on_finish: UsageCallback | None = None,
                 on_charge: ChargeCallback | None = None,
                 delay: DelayEstimator | None = None, handoff: Handoff | None = None,
                 on_affinity: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        # told the client of each request served here for its cached prefix (never blocks)
        self.on_affinity = on_affinity
        # a shared client address (handoff.shared_in_flight requests of it in flight here
        # at once): its switch affinity is withdrawn (hostagent/affinity_reports.py)
        self.on_shared: Callable[[str], None] | None = None
        # told the block keys (or, for a handed request, the body) of every opted-in prompt
        # served here: claimed in the controller's index (never blocks)
        self.on_claim: Callable[[list[int]], None] | None = None
        self.on_claim_body: Callable[[dict], None] | None = None
        self.client_requests: collections.Counter[str] = collections.Counter()
        # prefix handoff (hostagent/handoff.py): hands requests to peers, takes theirs
        self.handoff = handoff
        self.handoff_server: asyncio.Server | None = None
        self.delay = delay  # told of every relayed request, for the beacons' LOAD
        self.tenants = tenants or TenantTable()
        self.on_finish = on_finish
        self.on_charge = on_charge
        self.limits = settings.limits()
        self.budget = BufferBudget(settings.max_buffered_bytes)
        self.in_flight = 0     # requests read whole and being relayed
        self.connections = 0   # open client connections, against max_connections
        self.refusing = 0      # connections over the cap being answered 503
        self.large_json = asyncio.Semaphore(1)
        self.server: asyncio.Server | None = None
        self.registry = CollectorRegistry()
        self.unacked = Counter(
            "tokenfabric_bridge_unacked_answers",
            "Answers written whole whose end the client's TCP had not acknowledged "
            "delivery_wait later (a stream cut in the network after the bridge's last "
            "write; a client that closed or reset its side is not counted), by path: "
            "local (served by this backend's vLLM), relayed (handed to a peer; also "
            "tokenfabric_handoff_relay_failures_total{reason=\"client_unacked\"}).",
            ["backend", "path"], registry=self.registry)
        for path in UNACKED_PATHS:  # both show, at 0 until it happens
            self.unacked.labels(settings.backend_name, path)

    async def start(self, host: str, port: int) -> asyncio.Server:
        self.server = await asyncio.start_server(self._handle, host, port, limit=64 * KIB,
                                                 reuse_address=True)
        return self.server

    async def start_handoff(self, host: str, port: int) -> asyncio.Server:
        """The listener peers' bridges hand requests to (signed; see hostagent/handoff.py)."""
        assert self.handoff is not None

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._handle(reader, writer, received=True)

        self.handoff_server = await asyncio.start_server(handle, host, port, limit=64 * KIB,
                                                         reuse_address=True)
        return self.handoff_server

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting; give the requests in flight up to `grace` seconds to finish."""
        if self.handoff_server:
            self.handoff_server.close()
        if self.server:
            self.server.close()
            deadline = asyncio.get_running_loop().time() + grace
            while self.in_flight and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            if self.in_flight:
                log.warning("bridge stopped with %d request(s) in flight", self.in_flight)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    # -- one connection ------------------------------------------------------------------
    def _client(self, request: Request, peer: str) -> str:
        """The client's address: the connection's source, or (trust_tenant_header: labs and
        tests, whose clients all come from 127.0.0.1) the X-Tokenfabric-Client header."""
        if self.settings.trust_tenant_header:
            named = request.header(CLIENT_HEADER)
            if named:
                with contextlib.suppress(ValueError):
                    return str(ipaddress.ip_address(named.strip()))
        return peer

    def _tenant(self, request: Request, client: str) -> Tenant:
        if self.settings.trust_tenant_header:
            named = request.header(TENANT_HEADER)
            if named:
                return self.tenants.by_name_or_id(named) or UNKNOWN
        return self.tenants.by_address(client)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      received: bool = False) -> None:
        if self.connections >= self.settings.max_connections:
            await self._refuse(reader, writer)
            return
        self.connections += 1
        try:
            await self._serve(reader, writer, received)
        except Exception:  # a bug must cost one connection, not an unretrieved task error
            log.exception("bridge connection failed")
        finally:
            self.connections -= 1
            writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Over the connection cap: a quick 503, unless even the refusals are over the cap."""
        if self.refusing >= self.settings.max_connections:
            writer.transport.abort()
            return
        self.refusing += 1
        try:
            self._send_error(writer, HttpError(
                503, f"the bridge has {self.settings.max_connections} connections open; "
                "retry shortly", "service_unavailable", retry_after=1))
            await self._linger(reader, writer)
        finally:
            self.refusing -= 1
            writer.close()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After answering before the whole request was read: end our side, and drain what
        the client still sends for a moment, so that closing with unread input (a TCP
        reset) does not destroy the answer before the client reads it."""
        try:
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(LINGER_SECONDS):
                drained = 0
                while drained < LINGER_BYTES:
                    data = await reader.read(65536)
                    if not data:
                        break
                    drained += len(data)
        except (TimeoutError, OSError):
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     received: bool = False) -> None:
        peer = (writer.get_extra_info("peername") or ("",))[0]
        try:
            request = await read_request(reader, writer, self.limits, self.budget)
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client left before sending a whole request
        except HttpError as exc:
            self._send_error(writer, exc)
            await self._linger(reader, writer)
            return
        self.in_flight += 1
        try:
            delivered = await self._serve_request(request, peer, reader, writer, received)
        finally:
            self.in_flight -= 1
            request.release()
        if delivered is not None and self.settings.delivery_wait > 0:
            # no longer in flight here (nor at the peer): only its delivery is awaited
            await self._confirm_delivery(reader, writer, delivered)

    async def _serve_request(self, request: Request, peer: str, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter, received: bool = False
                             ) -> _Exchange | None:
        """Serve one request; returns the exchange of an answer written to its end (served
        here or relayed from a peer), whose delivery to the client is then confirmed
        (`_confirm_delivery`)."""
        client = self._client(request, peer)
        tenant, usage = self._tenant(request, client), TenantUsage()
        charge = _Charge(tenant)
        upstream: asyncio.StreamWriter | None = None
        watcher: asyncio.Task | None = None
        client_gone = False
        exchange: _Exchange | None = None
        tracked: str | None = None
        written_whole = False  # an answer written to its end: was it delivered?
        try:
            if self.settings.mode == "overflow":
                usage.rejected = 1
                self._send_overflow(writer, tenant)
                return None
            me = asyncio.current_task()

            async def watch_client() -> None:
                nonlocal client_gone
                with contextlib.suppress(ConnectionError):
                    while await reader.read(4096):
                        pass
                client_gone = True
                if me is not None:
                    me.cancel()

            watcher = asyncio.create_task(watch_client())
            usage.requests = 1
            try:
                if received:
                    tenant, client = self._handed(request)
                    charge.tenant = tenant
                body = await _parse_body(request.body, self.large_json)
                if self.settings.priority_scheduling and request.body:
                    if body is None:
                        raise HttpError(400, "the body must be a JSON object of at most "
                                        f"{MAX_JSON_VALUES} values")
                    body["priority"] = -(tenant.request_priority or 0)
                    request.body = json.dumps(body, separators=(",", ":")).encode()
                exchange = _Exchange(request, body, tenant, client)
                tracked = self._track(exchange)
                if self.handoff is not None and not received and body is not None \
                        and self.handoff.wants(tenant, body):
                    exchange.decision = await self.handoff.choose(body, exchange.client)
                # a handed request's keys are worked out by the claim's sender, off this path
                claim_body = body if received and body is not None else None
                del body
                handed = await self._hand_off(exchange) if exchange.decision is not None \
                    and exchange.decision.peer is not None else None
                if handed is not None:
                    # the peer's agent serves, counts and charges it; here only the relay
                    upstream_reader, upstream = handed
                    charge.muted = True
                    usage.requests = 0
                    try:
                        written_whole = await self._relay(exchange, upstream_reader, writer,
                                                          usage, charge)
                    except PeerRefused as refused:
                        # the holder's exact queue said no (admit_check): nothing was sent
                        # to the client or charged yet, so this backend serves it now
                        upstream.close()
                        self._peer_refused(exchange, refused.reason)
                        charge.muted = False
                        usage.requests = 1
                        upstream_reader, upstream = await self._serve_here(
                            exchange, received, None, charge)
                        written_whole = await self._relay(exchange, upstream_reader, writer,
                                                          usage, charge)
                else:
                    upstream_reader, upstream = await self._serve_here(
                        exchange, received, claim_body, charge)
                    claim_body = None
                    written_whole = await self._relay(exchange, upstream_reader, writer,
                                                      usage, charge)
            except HandoffRefused as exc:
                usage.requests = 0  # the origin serves and accounts it
                self._send_error(writer, exc)
            except HttpError as exc:
                usage.errors = 1
                if exchange is not None and exchange.handed_at is not None:
                    self._relay_broke(exchange, "no_answer", exc.message)
                self._send_error(writer, exc)
            except asyncio.CancelledError:
                if not client_gone:
                    raise
                if exchange is not None and exchange.sse_done:
                    # it had the whole answer: closing before the chunked end is normal
                    log.debug("client %s closed after data: [DONE]", peer)
                else:
                    log.info("client %s left mid-request; upstream aborted", peer)
                    if exchange is not None and exchange.handed_at is not None:
                        self._relay_broke(exchange, "client_left", "the client went away")
            except (ClientStalled, ConnectionError) as exc:
                # The client stopped reading (or its connection broke while written to):
                # let vLLM go rather than hold its slot for a client that takes nothing.
                client_gone = True
                writer.transport.abort()
                log.info("client %s %s; upstream aborted", peer,
                         exc if isinstance(exc, ClientStalled) else "broke off")
                if exchange is not None and exchange.handed_at is not None \
                        and not exchange.sse_done:
                    stalled = isinstance(exc, ClientStalled)
                    self._relay_broke(exchange, "client_stalled" if stalled else "client_left",
                                      str(exc) if stalled else "the client's connection broke")
        finally:
            if tracked is not None:
                self._untrack(tracked)
            if self.delay is not None and exchange is not None \
                    and exchange.delay_key is not None:
                self.delay.end(exchange.delay_key)
            if exchange is not None and exchange.handed_at is not None:
                assert self.handoff is not None and exchange.decision is not None \
                    and exchange.decision.peer is not None
                self.handoff.end(exchange.decision.peer)
            if watcher is not None:
                watcher.cancel()
            if upstream is not None:
                if client_gone:
                    upstream.transport.abort()
                else:
                    upstream.close()
            if usage.requests or usage.rejected:
                self._account(tenant, usage)
        return exchange if written_whole and not client_gone else None

    async def _serve_here(self, exchange: _Exchange, received: bool,
                          claim_body: dict | None, charge: _Charge
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The request sent to this backend's vLLM, and its bookkeeping: affinity, claim,
        the first charge, the delay model."""
        upstream = await self._connect(exchange.request)
        if self._cached_here(exchange, received):
            self._affinity(exchange.client)
        self._claim(exchange, claim_body)
        self._charge(charge, exchange.prompt_estimate, 0)
        if self.delay is not None:
            exchange.delay_key = self.delay.start(exchange.max_tokens)
        return upstream

    async def _confirm_delivery(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter, exchange: _Exchange) -> None:
        """An answer was written whole (served here, or relayed from a peer): wait (at most
        `delivery_wait`) for the client's TCP stack to acknowledge its last byte. A stream
        cut in the network after the bridge's last write -- a reset from elsewhere, packets
        of the connection steered to another host -- is otherwise seen by no bridge: all
        the answer sat in the kernel's buffer when the bridge closed. Unacknowledged by
        then: logged and counted by path (and, relayed, as the relay's client_unacked). A
        client that closed its side (an SSE client stops at `data: [DONE]` and may close
        before the chunked end arrives; in the lab its reply to those last 5 bytes, after
        its FIN freed the switch's pin, goes elsewhere) or reset the connection ended it
        itself: not counted. Runs after the request left `in_flight`; our FIN goes first,
        so that a client reading to the close is not held by the wait either."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.delivery_wait
        pause = 0.001

        def ended() -> bool:
            return writer.transport.is_closing() or reader.at_eof()

        left = _unacknowledged(writer)
        if left and not ended() and writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()
        while left and not ended() and loop.time() < deadline:
            await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
            pause = min(pause * 2, 0.1)
            left = _unacknowledged(writer)
        if not left or ended():
            return
        detail = (f"{left} bytes not acknowledged after {self.settings.delivery_wait:g} s "
                  "(the answer's end, our FIN)")
        if exchange.handed_at is not None:
            self.unacked.labels(self.settings.backend_name, "relayed").inc()
            self._relay_broke(exchange, "client_unacked", detail)
        else:
            self.unacked.labels(self.settings.backend_name, "local").inc()
            log.warning("answer served here to client %s (tenant %s) not delivered: %s",
                        exchange.client, exchange.tenant.name, detail)

    def _relay_broke(self, exchange: _Exchange, reason: str, detail: str) -> None:
        """A handed request's relay ended abnormally (handoff.RELAY_FAILURES): one log line
        and the counter, so that no broken relayed stream goes unseen. The peer's side, if
        its bridge saw anything, logs its own."""
        assert self.handoff is not None and exchange.decision is not None \
            and exchange.decision.peer is not None
        # a client that leaves or stops reading is the client's doing; the rest is not
        level = logging.INFO if reason in ("client_left", "client_stalled") else logging.WARNING
        log.log(level, "relay of a request handed to %s (client %s, tenant %s) failed: "
                "%s: %s", exchange.decision.peer.name, exchange.client, exchange.tenant.name,
                reason, detail)
        self.handoff.broke(reason)

    def _peer_refused(self, exchange: _Exchange, reason: str) -> None:
        """The holder refused the handoff at receipt: no longer in flight there, and the
        decision is `peer_refused` (counted; served here)."""
        assert self.handoff is not None and exchange.decision is not None \
            and exchange.decision.peer is not None
        peer = exchange.decision.peer
        log.debug("handoff to %s refused (%s): serving here", peer.name, reason)
        self.handoff.end(peer)
        exchange.handed_at = None
        exchange.decision.decision = "peer_refused"
        exchange.decision.peer = None
        self.handoff.refused_by_peer()

    def exact_load(self) -> LocalLoad | None:
        """This backend's queue as the bridge knows it exactly: the requests it relays to
        vLLM now and the delay model's wait for a slot (None without the delay model)."""
        delay = self.delay
        if delay is None:
            return None
        busy = len(delay.requests)
        wait = max(0.0, delay.expected_ttft() - delay.prefill)
        return LocalLoad(min(busy, delay.capacity), max(0, busy - delay.capacity),
                         delay.capacity, wait, delay.typical_s(),
                         service_measured=delay.measured_typical_s() is not None)

    def _charge(self, charge: _Charge, prompt: int, completion: int) -> None:
        """Charge the tenant `prompt` and `completion` more tokens (USAGE beacons)."""
        if self.on_charge is None or charge.muted or (prompt <= 0 and completion <= 0):
            return
        charge.prompt += max(prompt, 0)
        charge.completion += max(completion, 0)
        try:
            self.on_charge(charge.tenant, max(prompt, 0), max(completion, 0))
        except Exception:  # accounting must never break the relay
            log.exception("charge callback failed")

    def _cached_here(self, exchange: _Exchange, received: bool) -> bool:
        """Served here for its prefix: handed here by a peer (whose index lookup chose this
        backend), or this backend holds at least `min_blocks` of the prompt and no peer
        markedly more (`local_longest`); with `report_local`, also any other local serve
        of a prompt of `min_blocks` (no match, a peer too busy or not worth it): its blocks
        are cached here once served, the longest copy of this conversation, so its next
        turn belongs here."""
        if self.on_affinity is None or self.handoff is None \
                or not exchange.tenant.prefix_affinity:
            return False
        if received:
            return True
        decision = exchange.decision
        if decision is None:
            return False
        if decision.decision == "local_longest":
            return decision.local_blocks >= self.handoff.settings.min_blocks
        return self.handoff.settings.report_local and decision.decision in LOCAL_AFTER_LOOKUP

    def _claim(self, exchange: _Exchange, handed_body: dict | None) -> None:
        """Served here: the prompt's blocks are this backend's to be (a looked-up prompt's
        keys from the decision; a handed request's body, the peer's decision)."""
        try:
            keys = exchange.decision.keys if exchange.decision is not None else None
            if keys is not None and self.on_claim is not None:
                self.on_claim(keys)
            elif handed_body is not None and self.on_claim_body is not None:
                self.on_claim_body(handed_body)
        except Exception:  # a claim must never break the relay
            log.exception("claim callback failed")

    def _track(self, exchange: _Exchange) -> str | None:
        """Count an opted-in client's requests in flight here; `shared_in_flight` at once
        make it a shared address (one conversation waits for each answer before its next
        turn; a replayed one may overlap two now and then)."""
        if self.handoff is None or not exchange.tenant.prefix_affinity:
            return None
        client = exchange.client
        self.client_requests[client] += 1
        if self.client_requests[client] == self.handoff.settings.shared_in_flight:
            # the reporter first: it withdraws the entry of a newly shared address
            if self.on_shared is not None:
                try:
                    self.on_shared(client)
                except Exception:  # a report must never break the relay
                    log.exception("shared-client callback failed")
            # its requests weigh the cache as a shared address's (handoff.decide)
            self.handoff.note_shared(client)
        return client

    def _untrack(self, client: str) -> None:
        left = self.client_requests[client] - 1
        if left > 0:
            self.client_requests[client] = left
        else:
            del self.client_requests[client]

    def _affinity(self, client: str) -> None:
        assert self.on_affinity is not None
        try:
            self.on_affinity(client)
        except Exception:  # a report must never break the relay
            log.exception("affinity callback failed")

    def _handed(self, request: Request) -> tuple[Tenant, str]:
        """The tenant and client of a request a peer's bridge handed here: its signed
        header names them; a request without a valid signature is refused (403)."""
        value = request.header(HANDOFF_HEADER)
        verified = None if self.handoff is None or value is None else \
            verify(self.handoff.settings.secret, value, request.body)
        if verified is None:
            if self.handoff is not None:
                self.handoff.metrics.refuse("signature")
            raise HttpError(403, "a handoff needs a valid X-Tokenfabric-Handoff signature",
                            "forbidden")
        assert self.handoff is not None
        if self.handoff.settings.admit_check and verified.valuation is not None:
            here = self.exact_load() or self.handoff.local_load()
            reason = admit(self.handoff.settings, verified.valuation, here)
            if reason is not None:
                self.handoff.metrics.refuse(reason)
                raise HandoffRefused(reason)
        tenant = self.tenants.by_name_or_id(str(verified.tenant_id)) or UNKNOWN
        self.handoff.metrics.took(verified.origin, tenant.name)
        return tenant, verified.client

    async def _hand_off(self, exchange: _Exchange) -> tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter] | None:
        """The request sent to the peer's handoff listener; None (serve here) when the peer
        cannot be reached."""
        assert self.handoff is not None and exchange.decision is not None
        peer = exchange.decision.peer
        assert peer is not None
        request = exchange.request
        signed = self.handoff.header(exchange.tenant, request.body, exchange.client,
                                     exchange.decision)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            handed = await self._connect(request, (peer.address, self.handoff.settings.port),
                                         [f"{HANDOFF_HEADER}: {signed}"], keep_body=True,
                                         connect_timeout=self.handoff.settings.connect_timeout)
        except HttpError as exc:
            log.warning("handoff to %s failed, serving here: %s", peer.name, exc.message)
            self.handoff.failed()
            return None
        exchange.handed_at = loop.time()
        # the handoff's own cost: the decision (keys, lookup) and reaching the peer; the
        # peer bridge's relay of the bytes adds what any bridge adds (bench_bridge.py)
        exchange.added_s = exchange.decision.lookup_ms / 1000 + exchange.handed_at - started
        self.handoff.begin(peer)
        if not self.handoff.settings.admit_check:
            request.body = b""
            request.release()
        # else the body stays until the peer's answer head: a refusal is served here
        return handed

    def _backend_headers(self) -> list[tuple[str, str]]:
        name = self.settings.backend_name
        return [(BACKEND_HEADER, name)] if name else []

    def _account(self, tenant: Tenant, usage: TenantUsage) -> None:
        if self.on_finish is not None:
            try:
                self.on_finish(tenant, usage)
            except Exception:  # accounting must never break the relay
                log.exception("usage callback failed")

    def _send_error(self, writer: asyncio.StreamWriter, exc: HttpError) -> None:
        body = error_body(exc.status, exc.message, exc.kind)
        retry = [] if exc.retry_after is None else [("Retry-After", str(exc.retry_after))]
        if isinstance(exc, HandoffRefused):
            retry.append((REFUSED_HEADER, exc.reason))
        writer.write(response_head(exc.status, [*retry,
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            *self._backend_headers(), ("Connection", "close")]) + body)

    def _send_overflow(self, writer: asyncio.StreamWriter, tenant: Tenant) -> None:
        seconds = retry_after_seconds(tenant, self.settings.overflow_request_tokens)
        body = error_body(429, f"tenant {tenant.name} is over its token budget; retry in "
                          f"{seconds} s", "rate_limit_exceeded")
        writer.write(response_head(429, [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("Retry-After", str(seconds)), *self._backend_headers(),
            ("Connection", "close")]) + body)

    async def _connect(self, request: Request, target: tuple[str, int] | None = None,
                       extra: list[str] | None = None, keep_body: bool = False,
                       connect_timeout: float | None = None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Send the request to vLLM (or to `target`, a peer's handoff listener, with the
        `extra` header lines); the body is dropped once sent unless `keep_body`."""
        s = self.settings
        host, port = target or (s.upstream_host, s.upstream_port)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=MAX_RESPONSE_HEAD),
                connect_timeout or s.connect_timeout)
        except TimeoutError as exc:
            raise HttpError(504, "vLLM did not accept the connection in time",
                            "gateway_timeout") from exc
        except OSError as exc:
            raise HttpError(502, f"vLLM is not reachable: {exc.strerror or exc}",
                            "bad_gateway") from exc
        # Re-serialised from the parsed, validated fields: no byte of the client's head
        # reaches vLLM as it was sent. Fields the client's Connection names are hop-by-hop.
        drop = HOP_BY_HOP | request.hop_by_hop
        lines = [f"{request.method} {request.target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in request.headers if k not in drop]
        lines += extra or []
        if request.header("host") is None or "host" in drop:
            lines.append(f"host: {host}:{port}")  # an HTTP/1.0 client
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(request.body)}")
        lines.append("connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
        try:
            # Once vLLM has the body the bridge need not hold it: its budget is free again.
            # (Usually the kernel took it all at once: no wait, no timer.)
            if writer.transport.get_write_buffer_size():
                async with asyncio.timeout(s.upstream_timeout):
                    await writer.drain()
        except TimeoutError as exc:
            writer.transport.abort()
            raise HttpError(504, "vLLM did not take the request in time",
                            "gateway_timeout") from exc
        except OSError as exc:
            writer.transport.abort()
            raise HttpError(502, "vLLM closed the connection while the request was sent",
                            "bad_gateway") from exc
        if not keep_body:
            request.body = b""
            request.release()
        return reader, writer

    async def _relay(self, exchange: _Exchange, upstream: asyncio.StreamReader,
                     client: asyncio.StreamWriter, usage: TenantUsage,
                     charge: _Charge) -> bool:
        """The answer relayed to the client; True when it was relayed to its end."""
        timeout = self.settings.upstream_timeout
        counter = _Counter()
        answer = _Response(counter, no_body=exchange.request.method == "HEAD")
        parser = httptools.HttpResponseParser(answer)
        answer.parser = parser
        try:
            async with asyncio.timeout(timeout):
                wire = 0
                while not answer.headers_done:
                    data = await upstream.read(65536)
                    if not data:
                        raise HttpError(502, "vLLM closed the connection without a valid "
                                        "response", "bad_gateway")
                    wire += len(data)
                    parser.feed_data(data)
                    if not answer.headers_done and wire > MAX_RESPONSE_HEAD:
                        raise HttpError(502, "vLLM sent a response head too large",
                                        "bad_gateway")
        except TimeoutError as exc:
            raise HttpError(504, f"vLLM sent no response within {timeout:g} s",
                            "gateway_timeout") from exc
        except ConnectionError as exc:
            raise HttpError(502, "vLLM closed the connection without a valid response",
                            "bad_gateway") from exc
        except httptools.HttpParserError as exc:
            if not answer.headers_done:
                raise HttpError(502, "vLLM sent a malformed response head",
                                "bad_gateway") from exc
            answer.broken = f"malformed framing ({exc})"
        status = answer.status
        if exchange.handed_at is not None:
            refused = next((v for k, v in answer.headers if k == REFUSED_HEADER.lower()),
                           None)
            if status == 503 and refused is not None and exchange.request.body:
                raise PeerRefused(refused[:32])
            exchange.request.body = b""  # taken: no longer needed here
            exchange.request.release()
        out = self._answer_headers(exchange, answer.headers)
        client.write(f"HTTP/1.1 {status} {answer.reason}\r\n".encode("latin-1")
                     + "".join(f"{k}: {v}\r\n" for k, v in out).encode("latin-1") + b"\r\n")
        if status == 200 and answer.is_sse:
            counter.on_chunks = lambda chunks: self._on_chunks(exchange, charge, chunks)
        try:
            try:
                await self._relay_body(exchange, upstream, parser, answer, client, timeout)
                return True
            except UpstreamBroken as exc:
                usage.errors = 1
                source = "vLLM"
                if exchange.handed_at is not None:
                    assert exchange.decision is not None and exchange.decision.peer is not None
                    source = f"peer {exchange.decision.peer.name}"
                    self._relay_broke(exchange, "peer_" + exc.reason, str(exc))
                else:
                    log.warning("vLLM failed mid-response: %s", exc)
                if answer.chunked and answer.is_sse:
                    event = b"data: " + error_body(502, f"{source} failed mid-stream: {exc}",
                                                   "bad_gateway") + b"\n\n"
                    done = b"data: [DONE]\n\n"
                    client.write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                                 % (len(event), event, len(done), done))
                elif answer.until_close:
                    # a body that the close delimits: a plain close would pass for its end
                    client.transport.abort()
                # else the close without the last chunk (or short of Content-Length) is
                # what tells the client's HTTP framing that the body is incomplete
                return False
        finally:
            # Count and charge the rest (exact usage, or counted chunks, minus what was
            # charged already) also when the client hangs up as the stream ends, which
            # cancels this task before it gets here otherwise.
            if status == 200:
                self._count(exchange, counter, answer.kept, answer.is_sse, usage)
            self._charge(charge, usage.prompt_tokens - charge.prompt,
                         max(usage.completion_tokens, counter.chunks) - charge.completion)

    def _answer_headers(self, exchange: _Exchange,
                        headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """vLLM's (or the peer bridge's) head for the client: our backend name -- the
        peer's, when it generated -- and the handoff's figures for the lab."""
        decision = exchange.decision
        if exchange.handed_at is None:
            out = [(k, v) for k, v in headers
                   if k not in ("connection", "keep-alive", BACKEND_HEADER.lower())]
            out += self._backend_headers()
            if decision is not None and decision.lookup_ms:
                out.append((LOOKUP_MS_HEADER, f"{decision.lookup_ms:.3f}"))
        else:
            assert self.handoff is not None and decision is not None \
                and decision.peer is not None
            added = exchange.added_s
            self.handoff.relayed(decision.peer, exchange.tenant, added, decision.home)
            out = [(k, v) for k, v in headers if k not in ("connection", "keep-alive")]
            out += [(HANDOFF_FROM_HEADER, self.settings.backend_name),
                    (HANDOFF_MS_HEADER, f"{added * 1000:.3f}")]
        if decision is not None and self.handoff is not None \
                and self.handoff.settings.decision_header:
            out.append((DECISION_HEADER, decision.describe()))
        out.append(("connection", "close"))
        return out

    def _on_chunks(self, exchange: _Exchange, charge: _Charge, chunks: int) -> None:
        if self.delay is not None and exchange.delay_key is not None:
            self.delay.tokens(exchange.delay_key, chunks)
        self._charge_progress(charge, chunks)

    def _charge_progress(self, charge: _Charge, chunks: int) -> None:
        step = self.settings.charge_step
        if step > 0 and chunks - charge.completion >= step:
            self._charge(charge, 0, chunks - charge.completion)

    @staticmethod
    async def _read(upstream: asyncio.StreamReader, timeout: float) -> bytes:
        # A read of buffered data does not suspend: without this yield, a relay that
        # falls behind a fast vLLM never lets the loop run, so a client that left goes
        # unnoticed (and vLLM unaborted) until the stream ends.
        await asyncio.sleep(0)
        try:
            async with asyncio.timeout(timeout):
                data = await upstream.read(65536)
        except TimeoutError as exc:
            raise UpstreamBroken(f"no data for {timeout:g} s", "stalled") from exc
        except ConnectionError as exc:
            raise UpstreamBroken(f"connection lost ({exc.__class__.__name__})") from exc
        return data

    async def _relay_body(self, exchange: _Exchange, upstream: asyncio.StreamReader,
                          parser: httptools.HttpResponseParser, answer: _Response,
                          client: asyncio.StreamWriter, timeout: float) -> None:
        """What the parser made of each read, written to the client at once."""
        while True:
            pending = answer.take()
            if pending:
                client.write(pending)
                if answer.counter.done:
                    exchange.sse_done = True
                if client.transport.get_write_buffer_size() > 256 * 1024:
                    try:
                        async with asyncio.timeout(self.settings.request_timeout):
                            await client.drain()
                    except TimeoutError:
                        raise ClientStalled("read nothing for "
                                            f"{self.settings.request_timeout:g} s") from None
            if answer.broken:
                raise UpstreamBroken(answer.broken, "malformed")
            if answer.complete:
                return
            data = await self._read(upstream, timeout)
            if not data:
                if answer.until_close:
                    return  # a body delimited by the close
                raise UpstreamBroken("connection closed before the end of the "
                                     + ("stream" if answer.chunked else "body"))
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                answer.broken = f"malformed framing ({exc})"

    @staticmethod
    def _count(exchange: _Exchange, counter: _Counter, kept: bytearray, is_sse: bool,
               usage: TenantUsage) -> None:
        found = counter.usage
        if not is_sse and kept:
            with contextlib.suppress(ValueError, AttributeError, RecursionError):
                found = json.loads(bytes(kept)).get("usage")
        exact = _token_counts(found) if isinstance(found, dict) else None
        if exact is not None:
            usage.prompt_tokens, usage.completion_tokens = exact
        elif is_sse and counter.chunks:
            usage.prompt_tokens = exchange.prompt_estimate
            usage.completion_tokens = counter.chunks
            usage.estimated = 1
