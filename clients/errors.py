"""Exceptions of the localist client: one class per kind of failure, carrying the server's message."""
from __future__ import annotations

import httpx


class LocalistError(Exception):
    """Base class of every error the client raises."""


class APIConnectionError(LocalistError):
    """The server could not be reached (after retries)."""


class APIError(LocalistError):
    """The server answered with an error. ``message``, ``type``, ``param`` and ``code`` are the
    server's own OpenAI-shaped error fields; ``param`` names the offending request field."""

    def __init__(self, message: str, *, status_code: int | None, type: str | None = None,
                 param: str | None = None, code: str | None = None, request_id: str | None = None):
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.request_id = request_id
        where = f" (param: {param})" if param else ""
        status = f"HTTP {status_code}: " if status_code else ""
        super().__init__(f"{status}{message}{where}")


class BadRequestError(APIError):
    """400/422: the request was refused; ``param`` says which field."""


class AuthenticationError(APIError):
    """401: missing or unknown API key."""


class PermissionDeniedError(APIError):
    """403: the key may not do this (e.g. a tenant key on an admin endpoint)."""


class NotFoundError(APIError):
    """404: unknown audit id, model or path."""


class ConflictError(APIError):
    """409: the record's state forbids it (already redacted, not a replayable request)."""


class RateLimitError(APIError):
    """429: the key's rate or concurrency limit, still hit after the client's retries."""


class ServerError(APIError):
    """5xx, still failing after the client's retries."""


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
              404: NotFoundError, 409: ConflictError, 422: BadRequestError, 429: RateLimitError}
# Errors that arrive inside an SSE stream have no status of their own, only the OpenAI type.
_BY_TYPE = {"invalid_request_error": BadRequestError, "authentication_error": AuthenticationError,
            "permission_error": PermissionDeniedError, "not_found_error": NotFoundError,
            "rate_limit_error": RateLimitError, "server_error": ServerError}


def error_from_body(body: object, *, status_code: int | None, request_id: str | None = None,
                    fallback: str = "") -> APIError:
    """The exception for an error body ``{"error": {...}}`` (or whatever else the server sent)."""
    fields = body.get("error") if isinstance(body, dict) else None
    if not isinstance(fields, dict):
        fields = {"message": fallback or repr(body)}
    if status_code is not None:
        cls = _BY_STATUS.get(status_code, ServerError if status_code >= 500 else APIError)
    else:
        cls = _BY_TYPE.get(str(fields.get("type")), APIError)
    return cls(str(fields.get("message") or fallback or "unknown error"), status_code=status_code,
               type=fields.get("type"), param=fields.get("param"), code=fields.get("code"),
               request_id=request_id)


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an HTTP error response; the body must already be read."""
    try:
        body = response.json()
    except ValueError:
        body = None
    return error_from_body(body, status_code=response.status_code,
                           request_id=response.headers.get("x-request-id"),
                           fallback=response.text[:500] or response.reason_phrase)
