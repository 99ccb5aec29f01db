"""The bridge: listens on VIP:port and relays each request to the local vLLM.

- One request per connection: the answer carries `Connection: close`, so that every request
  is a new TCP connection and therefore a new balancing decision in the switch.
- Unbuffered: every complete HTTP chunk from vLLM is written to the client as soon as it
  is read, framing untouched (SSE events are never held back).
- Tokens are counted per tenant, from `usage` (the final SSE chunk, or the JSON body), or,
  where the client did not ask for usage, by counting the content chunks of the stream
  (and estimating the prompt at 4 bytes a token); such requests are marked estimated.
- The tenant is the longest tenant prefix holding the client's source address; with
  `trust_tenant_header` (labs and tests only) an X-Tokenfabric-Tenant header may name it.
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
  and `data: [DONE]`, then a well-formed end of the chunked body.
- A client that goes away aborts the upstream connection, which makes vLLM abort the
  request; no half-open connection is left on either side.

Plain asyncio streams and a small HTTP/1.1 parser: the relay only needs the message
framing, and skipping a general HTTP stack keeps the added latency low.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from hostagent import log
from hostagent.delay import DelayEstimator
from hostagent.tenants import UNKNOWN, Tenant, TenantTable, TenantUsage, retry_after_seconds

TENANT_HEADER = "x-tokenfabric-tenant"
BACKEND_HEADER = "X-Tokenfabric-Backend"
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
MAX_KEPT_RESPONSE = 8 * 1024 * 1024   # non-streaming bodies kept to read `usage` from
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
              "transfer-encoding", "content-length", "expect", TENANT_HEADER,
              BACKEND_HEADER.lower()}
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_REASONS = {400: "Bad Request", 404: "Not Found", 408: "Request Timeout",
            411: "Length Required",
            413: "Payload Too Large", 429: "Too Many Requests", 431: "Header Too Large",
            502: "Bad Gateway", 504: "Gateway Timeout"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class UpstreamBroken(Exception):
    """vLLM failed after the response head was sent to the client."""


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
    backend_name: str = ""              # X-Tokenfabric-Backend of every response
    priority_scheduling: bool = False   # set the body's `priority` from the tenant's contract
    charge_step: int = 16               # charge streamed completion tokens this many at a time


def error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def _response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _parse_head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Start line and headers (names lower-cased); HttpError 400 when malformed."""
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError as exc:  # latin-1 decodes anything; kept for clarity
        raise HttpError(400, "undecodable head", "invalid_request_error") from exc
    lines = text[:-4].split("\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, f"malformed header line {line[:80]!r}", "invalid_request_error")
        headers.append((name.lower(), value.strip()))
    return lines[0], headers


class _Request:
    __slots__ = ("method", "target", "headers", "body", "started", "delay_key")

    def __init__(self, method: str, target: str, headers: list[tuple[str, str]],
                 body: bytes) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body
        self.started = time.monotonic()
        self.delay_key: int | None = None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise HttpError(431, "request head too large", "invalid_request_error") from exc


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise HttpError(400, "malformed chunk size", "invalid_request_error") from exc
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # skip trailers
                pass
            return bytes(body)
        if len(body) + size > limit:
            raise HttpError(413, f"request body larger than {limit} bytes",
                            "invalid_request_error")
        body += (await reader.readexactly(size + 2))[:-2]


async def read_request(reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter | None = None) -> _Request:
    start, headers = _parse_head(await _read_head(reader))
    parts = start.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"malformed request line {start[:80]!r}", "invalid_request_error")
    request = _Request(parts[0], parts[1], headers, b"")
    encoding = (request.header("transfer-encoding") or "").lower()
    length = request.header("content-length")
    if writer is not None and (request.header("expect") or "").lower() == "100-continue":
        # curl asks this for bodies over 1 KiB and would wait a second for the answer.
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise HttpError(413, f"request body larger than {MAX_BODY} bytes",
                            "invalid_request_error")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in encoding:
        request.body = await _read_chunked(reader, MAX_BODY)
    elif length is not None:
        if not length.isdigit():
            raise HttpError(400, "bad Content-Length", "invalid_request_error")
        if int(length) > MAX_BODY:
            raise HttpError(413, f"request body larger than {MAX_BODY} bytes",
                            "invalid_request_error")
        request.body = await reader.readexactly(int(length))
    return request


class _Counter:
    """Finds usage, or counts content chunks, in the payload of an SSE stream."""
    __slots__ = ("pending", "chunks", "usage", "on_chunks")

    def __init__(self) -> None:
        self.pending = b""
        self.chunks = 0
        self.usage: dict | None = None
        self.on_chunks: Callable[[int], None] | None = None

    def feed(self, payload: bytes) -> None:
        data = self.pending + payload if self.pending else payload
        events = data.split(b"\n\n")
        self.pending = events.pop()
        for event in events:
            if not event.startswith(b"data:"):
                continue
            body = event[5:].strip()
            if body == b"[DONE]":
                continue
            if _USAGE_OBJECT.search(body):
                with contextlib.suppress(ValueError):
                    usage = json.loads(body).get("usage")
                    if isinstance(usage, dict):
                        self.usage = usage
                        continue
            if _is_token_chunk(body):
                self.chunks += 1
        if self.on_chunks is not None:
            self.on_chunks(self.chunks)


def _is_token_chunk(body: bytes) -> bool:
    """A chunk that carries a generated token: vLLM sends one per token, with empty text
    while a multi-byte character is incomplete. Not the chat stream's opening chunk (the
    assistant role) nor a usage-only chunk (no choices)."""
    try:
        choices = json.loads(body).get("choices") or []
    except (ValueError, AttributeError):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if "text" in choice or (isinstance(delta, dict) and "role" not in delta):
            return True
    return False


def _json_object(body: bytes) -> dict | None:
    """The request body as a JSON object, or None."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _max_tokens(body: bytes) -> int | None:
    """The request's `max_tokens` (or `max_completion_tokens`), if it says."""
    request = _json_object(body)
    if request is None:
        return None
    value = request.get("max_tokens", request.get("max_completion_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _estimate_prompt_tokens(body: bytes) -> int:
    """About 4 bytes a token, over the prompt or the messages' content."""
    request = _json_object(body)
    if request is None:
        return 0
    prompt = request.get("prompt")
    if prompt is None:
        prompt = " ".join(str(m.get("content", "")) for m in request.get("messages") or []
                          if isinstance(m, dict))
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        prompt = " ".join(map(str, prompt))
    return (len(str(prompt).encode()) + 3) // 4


UsageCallback = Callable[[Tenant, TenantUsage], None]
ChargeCallback = Callable[[Tenant, int, int], None]  # tenant, prompt tokens, completion tokens


class _Charge:
    """What one request has been charged so far (see the module docstring)."""
    __slots__ = ("tenant", "prompt", "completion")

    def __init__(self, tenant: Tenant) -> None:
        self.tenant, self.prompt, self.completion = tenant, 0, 0


def _with_priority(body: bytes, priority: int) -> bytes:
    """The JSON request body with `priority` set; unchanged if it is not a JSON object."""
    data = _json_object(body)
    if data is None:
        return body
    data["priority"] = priority
    return json.dumps(data, separators=(",", ":")).encode()


class Bridge:
    def __init__(self, settings: BridgeSettings, tenants: TenantTable | None = None,
                 on_finish: UsageCallback | None = None,
                 on_charge: ChargeCallback | None = None,
                 delay: DelayEstimator | None = None) -> None:
        self.settings = settings
        self.delay = delay  # told of every relayed request, for the beacons' LOAD
        self.tenants = tenants or TenantTable()
        self.on_finish = on_finish
        self.on_charge = on_charge
        self.in_flight = 0
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> asyncio.Server:
        self.server = await asyncio.start_server(self._handle, host, port, limit=MAX_HEAD,
                                                 reuse_address=True)
        return self.server

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting; give the requests in flight up to `grace` seconds to finish."""
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
    def _tenant(self, request: _Request, peer: str) -> Tenant:
        if self.settings.trust_tenant_header:
            named = request.header(TENANT_HEADER)
            if named:
                return self.tenants.by_name_or_id(named) or UNKNOWN
        return self.tenants.by_address(peer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("",))[0]
        tenant, usage = UNKNOWN, TenantUsage()
        upstream: asyncio.StreamWriter | None = None
        watcher: asyncio.Task | None = None
        client_gone = False
        request: _Request | None = None
        self.in_flight += 1
        try:
            try:
                async with asyncio.timeout(self.settings.request_timeout):
                    request = await read_request(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client left before sending a whole request
            except TimeoutError:
                self._send_error(writer, HttpError(
                    408, f"no complete request within {self.settings.request_timeout:g} s",
                    "invalid_request_error"))
                return
            except HttpError as exc:
                self._send_error(writer, exc)
                return
            tenant = self._tenant(request, peer)
            if self.settings.mode == "overflow":
                usage.rejected = 1
                self._send_overflow(writer, tenant)
                return
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
            charge = _Charge(tenant)
            try:
                if self.settings.priority_scheduling and request.body:
                    request.body = _with_priority(request.body,
                                                  -(tenant.request_priority or 0))
                upstream_reader, upstream = await self._connect(request)
                self._charge(charge, _estimate_prompt_tokens(request.body), 0)
                if self.delay is not None:
                    request.delay_key = self.delay.start(_max_tokens(request.body))
                await self._relay(request, upstream_reader, writer, usage, charge)
            except HttpError as exc:
                usage.errors = 1
                self._send_error(writer, exc)
            except asyncio.CancelledError:
                if not client_gone:
                    raise
                log.info("client %s left mid-request; upstream aborted", peer)
        finally:
            self.in_flight -= 1
            if self.delay is not None and request is not None \
                    and request.delay_key is not None:
                self.delay.end(request.delay_key)
            if watcher is not None:
                watcher.cancel()
            if upstream is not None:
                if client_gone:
                    upstream.transport.abort()
                else:
                    upstream.close()
            writer.close()
            if usage.requests or usage.rejected:
                self._account(tenant, usage)

    def _charge(self, charge: _Charge, prompt: int, completion: int) -> None:
        """Charge the tenant `prompt` and `completion` more tokens (USAGE beacons)."""
        if self.on_charge is None or (prompt <= 0 and completion <= 0):
            return
        charge.prompt += max(prompt, 0)
        charge.completion += max(completion, 0)
        try:
            self.on_charge(charge.tenant, max(prompt, 0), max(completion, 0))
        except Exception:  # accounting must never break the relay
            log.exception("charge callback failed")

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
        writer.write(_response_head(exc.status, [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            *self._backend_headers(), ("Connection", "close")]) + body)

    def _send_overflow(self, writer: asyncio.StreamWriter, tenant: Tenant) -> None:
        seconds = retry_after_seconds(tenant, self.settings.overflow_request_tokens)
        body = error_body(429, f"tenant {tenant.name} is over its token budget; retry in "
                          f"{seconds} s", "rate_limit_exceeded")
        writer.write(_response_head(429, [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("Retry-After", str(seconds)), *self._backend_headers(),
            ("Connection", "close")]) + body)

    async def _connect(self, request: _Request) -> tuple[asyncio.StreamReader,
                                                         asyncio.StreamWriter]:
        s = self.settings
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(s.upstream_host, s.upstream_port, limit=MAX_HEAD),
                s.connect_timeout)
        except TimeoutError as exc:
            raise HttpError(504, "vLLM did not accept the connection in time",
                            "gateway_timeout") from exc
        except OSError as exc:
            raise HttpError(502, f"vLLM is not reachable: {exc.strerror or exc}",
                            "bad_gateway") from exc
        lines = [f"{request.method} {request.target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in request.headers if k not in HOP_BY_HOP]
        if request.header("host") is None:  # HTTP/1.1 needs one; an HTTP/1.0 client may omit it
            lines.append(f"host: {s.upstream_host}:{s.upstream_port}")
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(request.body)}")
        lines.append("connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
        return reader, writer

    async def _relay(self, request: _Request, upstream: asyncio.StreamReader,
                     client: asyncio.StreamWriter, usage: TenantUsage,
                     charge: _Charge) -> None:
        timeout = self.settings.upstream_timeout
        try:
            async with asyncio.timeout(timeout):
                head = await upstream.readuntil(b"\r\n\r\n")
        except TimeoutError as exc:
            raise HttpError(504, f"vLLM sent no response within {timeout:g} s",
                            "gateway_timeout") from exc
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            raise HttpError(502, "vLLM closed the connection without a valid response",
                            "bad_gateway") from exc
        try:
            status_line, headers = _parse_head(head)
            status = int(status_line.split(" ", 2)[1])
        except (HttpError, ValueError, IndexError) as exc:
            raise HttpError(502, "vLLM sent a malformed response head", "bad_gateway") from exc
        values = dict(headers)
        chunked = "chunked" in values.get("transfer-encoding", "").lower()
        length = values.get("content-length")
        if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            chunked, length = False, "0"  # no body follows such a head
        is_sse = values.get("content-type", "").startswith("text/event-stream")
        out = [(k, v) for k, v in headers
               if k not in ("connection", "keep-alive", BACKEND_HEADER.lower())]
        out += [*self._backend_headers(), ("connection", "close")]
        client.write(status_line.encode("latin-1") + b"\r\n"
                     + "".join(f"{k}: {v}\r\n" for k, v in out).encode("latin-1") + b"\r\n")
        counter = _Counter()
        if status == 200 and is_sse:
            counter.on_chunks = lambda chunks: self._on_chunks(request, charge, chunks)
        kept = bytearray()
        try:
            try:
                if chunked:
                    await self._relay_chunked(upstream, client, counter, kept, is_sse, timeout)
                else:
                    remaining = int(length) if length and length.isdigit() else -1
                    await self._relay_plain(upstream, client, counter, kept, is_sse, remaining,
                                            timeout)
            except UpstreamBroken as exc:
                usage.errors = 1
                log.warning("vLLM failed mid-response: %s", exc)
                if chunked and is_sse:
                    event = b"data: " + error_body(502, f"vLLM failed mid-stream: {exc}",
                                                   "bad_gateway") + b"\n\n"
                    done = b"data: [DONE]\n\n"
                    client.write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                                 % (len(event), event, len(done), done))
        finally:
            # Count and charge the rest (exact usage, or counted chunks, minus what was
            # charged already) also when the client hangs up as the stream ends, which
            # cancels this task before it gets here otherwise.
            if status == 200:
                self._count(request, counter, kept, is_sse, usage)
            self._charge(charge, usage.prompt_tokens - charge.prompt,
                         max(usage.completion_tokens, counter.chunks) - charge.completion)

    def _on_chunks(self, request: _Request, charge: _Charge, chunks: int) -> None:
        if self.delay is not None and request.delay_key is not None:
            self.delay.tokens(request.delay_key, chunks)
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
            raise UpstreamBroken(f"no data for {timeout:g} s") from exc
        except ConnectionError as exc:
            raise UpstreamBroken(f"connection lost ({exc.__class__.__name__})") from exc
        return data

    async def _relay_chunked(self, upstream: asyncio.StreamReader,
                             client: asyncio.StreamWriter, counter: _Counter,
                             kept: bytearray, is_sse: bool, timeout: float) -> None:
        buf = b""
        while True:
            data = await self._read(upstream, timeout)
            if not data:
                raise UpstreamBroken("connection closed before the end of the stream")
            buf = buf + data if buf else data
            pos, end_of_body = 0, False
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError as exc:
                    raise UpstreamBroken("malformed chunk framing") from exc
                if size == 0:
                    # last-chunk; no trailers expected from vLLM: the body ends with CRLF.
                    if len(buf) < eol + 4:
                        break
                    pos, end_of_body = eol + 4, True
                    break
                end = eol + 2 + size + 2
                if len(buf) < end:
                    break
                payload = buf[eol + 2:end - 2]
                if is_sse:
                    counter.feed(payload)
                elif len(kept) < MAX_KEPT_RESPONSE:
                    kept += payload
                pos = end
            if pos:
                client.write(buf[:pos])
                buf = buf[pos:]
                if client.transport.get_write_buffer_size() > 256 * 1024:
                    await client.drain()
            if end_of_body:
                return

    async def _relay_plain(self, upstream: asyncio.StreamReader, client: asyncio.StreamWriter,
                           counter: _Counter, kept: bytearray, is_sse: bool, remaining: int,
                           timeout: float) -> None:
        while remaining != 0:
            data = await self._read(upstream, timeout)
            if not data:
                if remaining > 0:
                    raise UpstreamBroken("connection closed before the end of the body")
                return  # a body delimited by the close
            if remaining > 0:
                data = data[:remaining]
                remaining -= len(data)
            client.write(data)
            if is_sse:
                counter.feed(data)
            elif len(kept) < MAX_KEPT_RESPONSE:
                kept += data
            if client.transport.get_write_buffer_size() > 256 * 1024:
                await client.drain()

    @staticmethod
    def _count(request: _Request, counter: _Counter, kept: bytearray, is_sse: bool,
               usage: TenantUsage) -> None:
        found = counter.usage
        if not is_sse and kept:
            with contextlib.suppress(ValueError, AttributeError):
                found = json.loads(bytes(kept)).get("usage")
        if isinstance(found, dict):
            usage.prompt_tokens = int(found.get("prompt_tokens") or 0)
            usage.completion_tokens = int(found.get("completion_tokens") or 0)
        elif is_sse and counter.chunks:
            usage.prompt_tokens = _estimate_prompt_tokens(request.body)
            usage.completion_tokens = counter.chunks
            usage.estimated = 1
