"""Clients for the localist server: typed Python client (sync and async) and the `localist` CLI.

Needs only httpx and pydantic, so ``pip install localist`` (no extra) is enough to talk to a server.
"""
from .client import AsyncClient, AsyncStream, Client, Stream, StreamDelta
from .errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    LocalistError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
)
from .contract import BlockSpec

__all__ = [
    "APIConnectionError", "APIError", "AsyncClient", "AsyncStream", "AuthenticationError", "BadRequestError",
    "BlockSpec", "Client", "ConflictError", "LocalistError", "NotFoundError", "PermissionDeniedError", "RateLimitError",
    "ServerError", "Stream", "StreamDelta",
]
