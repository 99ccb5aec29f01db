"""What the REST API checks before it does any work for a request (docs/rest.md, "Limits").

`RequestLimits` is a pure ASGI middleware in front of the app:
1. every /api/v1 request without a known bearer token is answered 401 before a
   byte of its body is read (no body, however sent, costs an unknown client anything);
2. a Content-Length over the route's limit is 413 at once, a malformed one 400;
3. the body is counted while it is read, chunked or not, and the request is 413
   the moment it passes the limit (`receive` raises; nothing more is read).
A request refused before its body was read gets `Connection: close`, so that the
server does not go on reading (and discarding) what the client still sends.

`LimitedJsonRoute` parses JSON bodies itself: not JSON, NaN/Infinity, nesting
deeper than MAX_JSON_DEPTH or more than MAX_JSON_VALUES values is 400 — before
pydantic or anything that recurses sees it. `bounded_json` limits the free-form
objects that the controller keeps and serves again (a report's `metrics`, `rdma`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenfabric.controller.api.errors import Invalid
from tokenfabric.controller.auth import TokenStore
from tokenfabric.wire import json_limits_problem

MAX_BODY_BYTES = 4 * 1024 * 1024  # a report of 10,000 usage items (and its totals) fits
MAX_POLICY_BODY_BYTES = 16 * 1024 * 1024  # a policy of thousands of tenants fits many times
POLICY_BODY_PATHS = ("/api/v1/policy/validate", "/api/v1/policy/apply")
MAX_JSON_DEPTH = 32  # the deepest body the API defines is 4 levels
MAX_JSON_VALUES = 250_000  # keys, values and items: two 10,000-item usage lists fit
OFF_LOOP_JSON_BYTES = 256 * 1024  # parse larger bodies in a thread


def body_limit(path: str) -> int:
    return MAX_POLICY_BODY_BYTES if path in POLICY_BODY_PATHS else MAX_BODY_BYTES


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body may be at most {limit} bytes")


class BadJson(HTTPException):
    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def _error(status: int, code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "details": []}}).encode()


class RequestLimits:
    """Auth before the body, and the body's size while it is read (see the module doc)."""

    def __init__(self, app: ASGIApp, tokens: TokenStore, api_prefix: str = "/api/v1") -> None:
        self.app = app
        self.tokens = tokens
        self.api_prefix = api_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        has_body = "transfer-encoding" in headers or headers.get("content-length", "0") != "0"
        path: str = scope["path"]
        if self.tokens.enabled and (path == self.api_prefix
                                    or path.startswith(self.api_prefix + "/")):
            problem = self._auth_problem(headers.get("authorization"))
            if problem:
                await _refuse(send, 401, "unauthorized", problem, has_body,
                              [(b"www-authenticate", b"Bearer")])
                return
        limit = body_limit(path)
        length = headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                await _refuse(send, 400, "bad_request", "Content-Length is not a number",
                              has_body)
                return
            if int(length) > limit:
                await _refuse(send, 413, "too_large", f"the body may be at most {limit} bytes",
                              has_body)
                return
        received = 0
        overrun = False

        async def counted_receive() -> Message:
            nonlocal received, overrun
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overrun = True
                    raise BodyTooLarge(limit)  # the app's error handler answers 413
            return message

        async def closing_send(message: Message) -> None:
            if overrun and message["type"] == "http.response.start":
                # The rest of the body is not wanted: close rather than read it to the end.
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted_receive, closing_send)

    def _auth_problem(self, header: str | None) -> str | None:
        if header is None:
            return "missing bearer token (Authorization: Bearer <token>)"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing bearer token (Authorization: Bearer <token>)"
        if self.tokens.lookup(token.strip()) is None:
            return "unknown token"
        return None


async def _refuse(send: Send, status: int, code: str, message: str, has_body: bool,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = _error(status, code, message)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *(extra or [])]
    if has_body:  # unread: do not let the server read it to the end for nothing
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- JSON bodies


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def parse_json(body: bytes) -> Any:
    """The body as JSON within the limits, or BadJson saying what is wrong."""
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise BadJson(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise BadJson(f"the body is not JSON: {exc.msg} at line {exc.lineno} column "
                      f"{exc.colno}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # NaN, a 5,000-digit number, not UTF-8
        raise BadJson(f"the body is not JSON: {exc}") from None
    problem = json_limits_problem(value, MAX_JSON_DEPTH, MAX_JSON_VALUES)
    if problem:
        raise BadJson(f"the body {problem}")
    return value


class LimitedJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > OFF_LOOP_JSON_BYTES:
                self._json = await asyncio.to_thread(parse_json, body)
            else:
                self._json = parse_json(body)
        return self._json


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a route and its dependencies define (FastAPI's Dependant)."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


class LimitedJsonRoute(APIRoute):
    """An APIRoute whose JSON bodies go through parse_json (FastAPI's documented hook),
    and which refuses query parameters it does not define (a typo is not a no-op)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        known = _query_names(self.dependant)

        async def limited(request: Request) -> Response:
            unknown = sorted(set(request.query_params) - known)
            if unknown:
                shown = ", ".join(repr(name)[:40] for name in unknown[:5])
                raise Invalid(f"unknown query parameter(s): {shown}"
                              + (f" (known: {', '.join(sorted(known))})" if known else ""))
            return await handler(LimitedJsonRequest(request.scope, request.receive))

        return limited
