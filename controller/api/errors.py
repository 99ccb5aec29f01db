"""Errors the controller raises for a bad request, and how the API turns them into JSON.

Every error body is {"error": {"code": str, "message": str, "details": [...]}}.
The controller raises ApiError subclasses for what the caller got wrong; the
API maps them to 4xx. Anything else is a bug: logged with its traceback, 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)


# One table, both ways: the body's code for each HTTP status, for the ApiError kinds
# below and for the errors FastAPI/Starlette raise themselves (405, 413, ...).
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
               413: "too_large", 415: "unsupported_media_type", 422: "invalid",
               502: "switch_failed", 503: "unavailable"}


class ApiError(Exception):
    """What the caller got wrong; a subclass names its HTTP status, the code follows."""

    status = 400
    code = "bad_request"

    def __init_subclass__(cls, status: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:  # else the parent's status and code
            cls.status, cls.code = status, _HTTP_CODES[status]

    def __init__(self, message: str, details: list[Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class NotFound(ApiError, status=404):
    """The named switch, backend, service, tenant or contract does not exist."""


class Conflict(ApiError, status=409):
    """The change clashes with what is there."""


class Invalid(ApiError, status=422):
    """Well-formed, but the model refuses it."""


class Unauthorized(ApiError, status=401):
    """No bearer token, or one the controller does not know."""


class Forbidden(ApiError, status=403):
    """A known token whose role is too low for this call."""


class Unavailable(ApiError, status=503):
    """Not now (e.g. this replica is a backup, or a part is not ready)."""


class SwitchFailed(ApiError, status=502):
    """The request was good, a switch refused it (and was rolled back)."""


def error_body(code: str, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or []}}


def _jsonable_details(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic's errors, reduced to what is safe to echo (ctx may hold exceptions)."""
    out = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        out.append({"field": loc, "message": str(err.get("msg", "")),
                    "type": str(err.get("type", ""))})
    return out


def _allowed_methods(request: Request) -> str:
    """Every method of every route at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.code, exc.message, exc.details),
                            status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _jsonable_details(list(exc.errors()))
        first = details[0] if details else {"field": "", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
        return JSONResponse(error_body("invalid", message, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A real bug: the caller did nothing wrong. Log it whole; tell the caller little.
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal", "internal error (logged by the controller)"),
                            status_code=500)
