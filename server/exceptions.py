"""What the server's own code raises when a request cannot be served; no HTTP here.

``localist.server.errors`` gives each of these (and the model's ``BlockError``, the engine's
``EngineUnavailable``, the store's ``RecordError`` and ``NotFound``) its HTTP answer, in one place.
"""
from __future__ import annotations


class InvalidRequest(ValueError):
    """The request is malformed; ``field`` names the offending field (→ 400)."""

    def __init__(self, field: str | None, message: str, code: str = "invalid_value"):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.code = field, code


class UnknownModel(LookupError):
    """The request names a model this server does not serve (→ 404)."""


class Conflict(RuntimeError):
    """The record's state forbids the action (→ 409): not replayable, another model, already redacted."""

    def __init__(self, message: str, field: str | None, code: str):
        super().__init__(message)
        self.field, self.code = field, code


class GenerationFailed(RuntimeError):
    """The generation failed with ``cause`` and was stored as record ``record_id`` (→ 500, or 503 with
    Retry-After when the engine died under it)."""

    def __init__(self, cause: Exception, record_id: str):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause, self.record_id = cause, record_id


class ClientDisconnected(RuntimeError):
    """The caller left before the answer was complete; the request was stored as aborted (→ 499)."""
