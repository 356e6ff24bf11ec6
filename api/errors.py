"""The one place where domain errors become HTTP statuses and the JSON error shape."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference_server import errors as e
from inference_server.error_codes import lookup

log = logging.getLogger(__name__)

# Starlette's own refusals (routing, body parsing) get a code by status; others are `http_error`.
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON error shape; ``code`` must be catalogued (a typo raises here, not at a client)."""
    lookup(code)
    return {"error": {"code": code, "message": message}}


def error_response(
    code: str,
    message: str,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    """An error response whose status is the catalogue's for ``code`` (``status`` only for the
    framework's ``http_error``, whose status varies). ``extra`` adds top-level fields (``checks``)."""
    status = status or lookup(code).status or 500
    return JSONResponse({**error_body(code, message), **extra}, status_code=status, headers=headers)


def status_for(exc: e.InferenceError) -> int:
    """The HTTP status of an error's code, from the catalogue. A code catalogued as never an HTTP
    response (a job or command-line code) reaching a client is a server fault: 500."""
    return exc.status or 500


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(e.InferenceError)
    async def _domain(request: Request, exc: e.InferenceError) -> JSONResponse:
        status = status_for(exc)
        if status == 500:
            log.error("%s reached %s %s: %s", exc.code, request.method, request.url.path, exc.message)
            return error_response("internal_error", "an internal error occurred")
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after)))  # whole seconds (RFC 9110)
        return error_response(exc.code, exc.message, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response("validation_error", "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # api.edge's refusals carry their own code; Starlette's are known by status.
        code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(code, str(exc.detail), status=exc.status_code)

    # Connection-level failures, statement timeouts and an exhausted pool: the database, not the request.
    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return error_response("dependency_unavailable", "the database is unavailable")

    for db_error in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(db_error, _db_down)

    @app.exception_handler(DBAPIError)
    async def _db_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:  # a lost connection the driver reports as another error class
            return await _db_down(request, exc)
        return await _bug(request, exc)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response("internal_error", "an internal error occurred")
