"""Reading one HTTP/1.1 request strictly (RFC 9112), for the bridge, on llhttp (httptools).

llhttp does the framing, strictly by default: it refuses a bare CR or LF anywhere in the
head, obs-fold, invalid header names, control characters in values and in the target,
Content-Length other than ASCII digits, two Content-Lengths (even equal ones),
Transfer-Encoding beside Content-Length, chunked applied twice, malformed, negative or
overflowing chunk sizes and malformed chunk extensions. What it leaves lenient is checked
here (see docs/agent.md, "Framing"):
- a Transfer-Encoding whose last coding is chunked but which has others before it
  (`gzip, chunked`): llhttp reads the body as plain chunked, dropping the coding. The
  bridge implements no other coding: 501. Chunked not last: 400 (the length cannot be
  known). Any Transfer-Encoding in an HTTP/1.0 request: 400 (RFC 9112 §6.1).
- a request line without a version (llhttp reads it as HTTP/0.9, even ended by a bare
  LF): 400; versions other than 1.0 and 1.1 (llhttp takes 2.0): 505.
- Host: none in an HTTP/1.1 request, more than one, or not a host[:port]: 400 (§3.2).
- CONNECT: 501. An Upgrade request with a body: 400 (llhttp stops before an upgrade's
  body); without one, the Upgrade is ignored, as a server may.
- `Expect` other than 100-continue: 417.
- kept lenient, as RFC 9112 allows and harmless once re-serialised: empty lines before
  the request line (§2.2), runs of spaces between the request line's parts (§3), HTAB
  and obs-text inside values (§5.5; forwarded as they are, Latin-1).
- limits llhttp does not keep: head size and header count (431), body size while it is
  read, chunked included (413), bytes held across all connections (503), chunk framing and
  extensions larger than their data (400), and the time to send the head and the request.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

import httptools

KIB, MIB = 1024, 1024 * 1024

_REASONS = {400: "Bad Request", 404: "Not Found", 408: "Request Timeout",
            411: "Length Required", 413: "Content Too Large", 417: "Expectation Failed",
            429: "Too Many Requests", 431: "Request Header Fields Too Large",
            501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout", 505: "HTTP Version Not Supported"}
# RFC 3986 host (reg-name, IPv4, or [IP-literal]) and an optional port.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.vV]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")
# A request line that is well formed but for its method: 501 rather than 400.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/1\.[01]\r\n")
# Chunk framing (sizes, extensions, CRLFs) may take this much more than the data itself.
FRAMING_ALLOWANCE = 64 * KIB


class HttpError(Exception):
    """An answer to send instead of relaying: status, message and error type (JSON body)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.retry_after = retry_after


def error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True)
class RequestLimits:
    max_head: int = 64 * KIB          # request line and headers (431)
    max_headers: int = 100            # header lines (431)
    max_body: int = 16 * MIB          # one request's body, chunked included (413)
    head_timeout: float = 10.0        # seconds to send the request line and headers (408)
    request_timeout: float = 30.0     # seconds to send the whole request (408)


class BufferBudget:
    """Request body bytes held in memory across all connections, bounded: a body that
    does not fit is refused (503) instead of growing the process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        self.peak = max(self.peak, self.used)
        return True

    def release(self, size: int) -> None:
        self.used -= size


class Request:
    """A complete, validated request. Header names are lower case; values are stripped of
    surrounding whitespace and hold no CR, LF or NUL (llhttp refuses those)."""
    __slots__ = ("method", "target", "version", "headers", "body", "started", "reserved",
                 "budget", "hop_by_hop")

    def __init__(self, method: str, target: str, version: str,
                 headers: list[tuple[str, str]], body: bytes, budget: BufferBudget | None,
                 reserved: int, hop_by_hop: frozenset[str]) -> None:
        self.method, self.target, self.version = method, target, version
        self.headers, self.body = headers, body
        self.started = time.monotonic()
        self.budget, self.reserved = budget, reserved
        self.hop_by_hop = hop_by_hop   # names listed in Connection: not forwarded

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def release(self) -> None:
        """The body is no longer held (sent upstream, or the request is over)."""
        if self.budget is not None and self.reserved:
            self.budget.release(self.reserved)
        self.reserved = 0


def _bad(message: str) -> HttpError:
    return HttpError(400, message)


def _tokens(value: str) -> list[str]:
    """The elements of a comma-separated header list, lower case, empty ones skipped."""
    return [t for t in (part.strip(" \t").lower() for part in value.split(",")) if t]


class _Reading:
    """httptools' callbacks for one request: collects it and enforces the limits."""

    def __init__(self, limits: RequestLimits, budget: BufferBudget | None,
                 writer: asyncio.StreamWriter | None) -> None:
        self.limits, self.budget, self.writer = limits, budget, writer
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.head_bytes = 0
        self.parts: list[bytes] = []
        self.body_size = 0
        self.reserved = 0
        self.expected_body = False
        self.upgrade = False
        self.headers_done = False
        self.complete = False
        self.hop_by_hop: frozenset[str] = frozenset()

    # -- httptools callbacks (an exception raised here stops the parser) ------------------
    # Once the request is complete, llhttp goes on with any bytes after it in the same
    # feed (a pipelined request): those callbacks are ignored, one request a connection.
    def on_url(self, url: bytes) -> None:
        if self.complete:
            return
        self.head_bytes += len(url)
        if self.head_bytes > self.limits.max_head:
            raise HttpError(431, f"request head larger than {self.limits.max_head} bytes")
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.limits.max_head:
            raise HttpError(431, f"request head larger than {self.limits.max_head} bytes")
        if self.headers_done:
            return  # a trailer field: counted, then dropped (RFC 9110 §6.5.1 allows it)
        if len(self.headers) >= self.limits.max_headers:
            raise HttpError(431, f"more than {self.limits.max_headers} header fields")
        # llhttp allows only token characters in names; values may carry obs-text.
        self.headers.append((name.decode("ascii").lower(), value.decode("latin-1").strip(" \t")))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        self.headers_done = True
        self._check_head()

    def on_body(self, data: bytes) -> None:
        if self.complete:
            return
        size = len(data)
        if self.body_size + size > self.limits.max_body:
            raise HttpError(413, f"request body larger than {self.limits.max_body} bytes")
        self.body_size += size
        # Reserved as it arrives, not as announced: a head announcing 16 MiB must not
        # hold the budget of bytes that may never come.
        self._reserve(size)
        self.parts.append(data)

    def on_message_complete(self) -> None:
        self.complete = True

    # -- checks --------------------------------------------------------------------------
    def _reserve(self, size: int) -> None:
        if self.budget is not None and not self.budget.reserve(size):
            raise HttpError(503, "the bridge holds too many request bodies; retry shortly",
                            "service_unavailable", retry_after=1)
        self.reserved += size

    def _check_head(self) -> None:
        version = self.parser.get_http_version()
        if version == "0.9":  # llhttp's name for a request line without a version
            raise _bad("malformed request line: no HTTP version")
        if version not in ("1.0", "1.1"):
            raise HttpError(505, f"HTTP/{version} is not supported; use HTTP/1.1")
        method = self.parser.get_method().decode("ascii")
        if method == "CONNECT":
            raise HttpError(501, "CONNECT is not implemented")
        values: dict[str, list[str]] = {}
        for name, value in self.headers:
            values.setdefault(name, []).append(value)
        hosts = values.get("host", [])
        if len(hosts) > 1:
            raise _bad("more than one Host header")
        if not hosts and version == "1.1":
            raise _bad("an HTTP/1.1 request needs a Host header")
        if hosts and not _HOST.fullmatch(hosts[0]):
            raise _bad("Host is not a host[:port]")
        connection = [t for v in values.get("connection", []) for t in _tokens(v)]
        self.hop_by_hop = frozenset(connection)
        self.upgrade = "upgrade" in connection and "upgrade" in values
        codings = [t for v in values.get("transfer-encoding", []) for t in _tokens(v)]
        lengths = values.get("content-length", [])
        if codings:
            if version == "1.0":
                raise _bad("Transfer-Encoding in an HTTP/1.0 request")
            if lengths:
                raise _bad("both Transfer-Encoding and Content-Length")
            if codings[-1] != "chunked":
                raise _bad("chunked is not the final transfer coding")
            if codings != ["chunked"]:
                raise HttpError(501, f"transfer coding {codings[0]!r} is not implemented; "
                                "send the body chunked only")
            self.expected_body = True
        elif lengths:
            if len(lengths) != 1 or not (lengths[0].isascii() and lengths[0].isdigit()):
                raise _bad("malformed Content-Length")
            length = int(lengths[0])
            if length > self.limits.max_body:
                raise HttpError(413, f"request body larger than {self.limits.max_body} bytes")
            self.expected_body = length > 0
        if self.upgrade and self.expected_body:
            raise _bad("an Upgrade request may not carry a body here")
        expect = values.get("expect")
        if expect is not None:
            if [v.lower() for v in expect] != ["100-continue"]:
                raise HttpError(417, "only Expect: 100-continue is supported")
            if self.expected_body and self.writer is not None:
                # curl asks this for bodies over 1 KiB and would wait a second for the answer.
                self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def target(self) -> str:
        url = self.url.decode("ascii")  # llhttp allows no byte above 0x7e in a target
        if url.startswith("/"):
            return url
        if url == "*" and self.parser.get_method() == b"OPTIONS":
            return url
        if url.startswith(("http://", "https://")):
            # absolute-form: forwarded in origin-form, its authority as the Host
            # (RFC 9112 §3.2.2: the Host the client sent beside it is ignored).
            try:
                parts = httptools.parse_url(self.url)
            except httptools.HttpParserInvalidURLError as exc:
                raise _bad(f"malformed absolute URI: {exc}") from None
            authority = (parts.host or b"").decode("ascii")
            if parts.port is not None:
                authority += f":{parts.port}"
            if not authority or not _HOST.fullmatch(authority):
                raise _bad("the absolute URI has no valid host")
            self.headers = [(k, v) for k, v in self.headers if k != "host"]
            self.headers.insert(0, ("host", authority))
            path = (parts.path or b"/").decode("ascii")
            return path + ("?" + parts.query.decode("ascii") if parts.query else "")
        raise _bad("the request target must be a path, an absolute URI, or * with OPTIONS")

    def request(self) -> Request:
        body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.parts = []
        target = self.target()  # before the headers: an absolute-form sets the Host
        return Request(self.parser.get_method().decode("ascii"), target,
                       self.parser.get_http_version(), self.headers, body, self.budget,
                       self.reserved, self.hop_by_hop)

    def abandon(self) -> None:
        """The request failed: give its reservation back."""
        if self.budget is not None and self.reserved:
            self.budget.release(self.reserved)
        self.reserved = 0
        self.parts = []


def _feed(reading: _Reading, data: bytes, first: bytes) -> None:
    try:
        reading.parser.feed_data(data)
    except httptools.HttpParserCallbackError as exc:
        if isinstance(exc.__context__, HttpError):
            raise exc.__context__ from None
        raise
    except httptools.HttpParserUpgrade:
        # llhttp stops at the end of an upgrade's head (no body: checked above).
        reading.complete = reading.headers_done
    except httptools.HttpParserInvalidURLError as exc:
        raise _bad(f"malformed request target: {exc}") from None
    except httptools.HttpParserInvalidMethodError:
        if reading.complete:
            return  # bytes after the request: one request per connection, ignored
        if _REQUEST_LINE.match(first):
            raise HttpError(501, "method not implemented") from None
        raise _bad("malformed request line") from None
    except httptools.HttpParserError as exc:
        if reading.complete:
            return
        raise _bad(f"malformed request: {exc}") from None


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None,
                       limits: RequestLimits, budget: BufferBudget | None = None) -> Request:
    """One request, read within the limits. HttpError for an answer to send instead (408
    when the client is too slow); asyncio.IncompleteReadError when it leaves first. On any
    error the body's reservation in `budget` is given back."""
    reading = _Reading(limits, budget, writer)
    wire = 0
    first = b""
    started = asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(min(limits.head_timeout, limits.request_timeout)) as deadline:
            while not reading.complete:
                data = await reader.read(65536)
                if not data:
                    raise asyncio.IncompleteReadError(b"", None)
                wire += len(data)
                if not first:
                    first = data[:512]
                was_done = reading.headers_done
                _feed(reading, data, first)
                if not reading.headers_done:
                    if wire > limits.max_head + 4:
                        raise HttpError(431, f"request head larger than {limits.max_head} bytes")
                    continue
                if not was_done and not reading.complete:  # the body is yet to come
                    deadline.reschedule(started + limits.request_timeout)
                if wire - reading.body_size > (limits.max_head + FRAMING_ALLOWANCE
                                               + reading.body_size):
                    raise _bad("chunk framing larger than its data (chunk extensions?)")
            return reading.request()
    except TimeoutError:
        reading.abandon()
        if reading.headers_done:
            raise HttpError(408, f"no complete request within {limits.request_timeout:g} s") \
                from None
        raise HttpError(408, "no complete request head within "
                        f"{min(limits.head_timeout, limits.request_timeout):g} s") from None
    except BaseException:
        reading.abandon()
        raise
