"""HTTP answers: OpenAI-shaped errors ``{"error": {"message", "type", "param", "code"}}`` with the field named.

Every error the server sends goes through :class:`ApiError`, including pydantic validation errors and
malformed JSON, so a client can always read ``error.param`` to find the offending field. The domain
errors of the model, the engine, the store and the request service get their status here, in
:func:`api_error`, and nowhere else.
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from localist.model.blocks import BlockError
from localist.server.engine import EngineUnavailable
from localist.server.exceptions import ClientDisconnected, Conflict, GenerationFailed, InvalidRequest, UnknownModel
from localist.server.store import AlreadyRedacted, NotFound, RecordError, StoreUnavailable

log = logging.getLogger("localist.server")

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
}
DOMAIN_ERRORS = (BlockError, InvalidRequest, AlreadyRedacted, RecordError, UnknownModel, NotFound, Conflict, EngineUnavailable,
                 StoreUnavailable, GenerationFailed, ClientDisconnected)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def _unavailable(exc: EngineUnavailable, note: str = "") -> ApiError:
    return ApiError(503, f"{exc}{note}", None, "engine_unavailable", {"Retry-After": str(exc.retry_after)})


def api_error(exc: Exception) -> ApiError:
    """The HTTP answer to ``exc``: one of :data:`DOMAIN_ERRORS`, or an ApiError as it is."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BlockError):
        return ApiError(400, str(exc), exc.field, "invalid_value")
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), exc.field, exc.code)
    if isinstance(exc, AlreadyRedacted):
        return ApiError(409, str(exc), "id", "already_redacted")
    if isinstance(exc, RecordError):  # the store names the field before the first colon
        message = str(exc)
        return ApiError(400, message, message.split(":", 1)[0] if ":" in message else None, "invalid_value")
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), "model", "model_not_found")
    if isinstance(exc, NotFound):
        return ApiError(404, str(exc), exc.field, "not_found")
    if isinstance(exc, Conflict):
        return ApiError(409, str(exc), exc.field, exc.code)
    if isinstance(exc, EngineUnavailable):
        return _unavailable(exc)
    if isinstance(exc, StoreUnavailable):  # fail closed: nothing is answered that is not recorded
        return ApiError(503, f"{exc}; nothing was answered or stored, retry later", None, "store_unavailable",
                        {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, GenerationFailed):
        stored = f" (stored as audit record {exc.record_id})"
        if isinstance(exc.cause, EngineUnavailable):
            return _unavailable(exc.cause, stored)
        return ApiError(500, f"generation failed: {exc}{stored}", None, "generation_failed")
    if isinstance(exc, ClientDisconnected):
        return ApiError(499, "client disconnected", None, "client_disconnected")
    raise TypeError(f"not a domain error: {type(exc).__name__}") from exc


_TYPE_TAGS = {"float", "int", "str", "bool", "list", "dict", "none", "bytes", "literal"}


def _loc_to_param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content') → 'messages[0].content'; pydantic's union member tags
    ('float', 'list[float]', "literal['a','b']", 'function-after[...]') are dropped."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p not in _TYPE_TAGS and not any(c in p for c in "[-'("):
            out += ("." if out else "") + p
    return out or None


def _error_response(err: ApiError, request: Request) -> JSONResponse:
    headers = dict(err.headers or {})
    rid = getattr(request.state, "request_id", None)
    if rid:
        headers["x-request-id"] = rid
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def install(app: FastAPI) -> None:
    async def _answer(request: Request, exc: Exception):
        return _error_response(api_error(exc), request)

    for kind in (ApiError, *DOMAIN_ERRORS):
        app.add_exception_handler(kind, _answer)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        if first.get("type") == "json_invalid":
            return _error_response(ApiError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                                            None, "json_invalid"), request)
        param = _loc_to_param(tuple(first.get("loc", ())))
        if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
            return _error_response(ApiError(400, "the request body must be a JSON object", None, "invalid_type"), request)
        msg = f"{param}: {first['msg']}" if param else first["msg"]
        if len(errors) > 1 and param:
            others = {_loc_to_param(tuple(e.get("loc", ()))) for e in errors[1:]} - {param, None}
            if others:
                msg += f" (also: {', '.join(sorted(others))})"
        return _error_response(ApiError(400, msg, param, first.get("type")), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return _error_response(ApiError(exc.status_code, message, None, None, getattr(exc, "headers", None)), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")
        return _error_response(err, request)
