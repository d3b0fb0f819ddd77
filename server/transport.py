"""Limits of the HTTP transport: the size of a request's header section and of its body.

Both are refused before the request reaches a router, with an OpenAI-shaped error naming the limit:

- **header section** (request line and headers) over ``max_header_bytes``: 431. uvicorn's h11 protocol
  stops buffering an unfinished header section at that size (h11's ``max_incomplete_event_size``), so
  memory stays bounded; :class:`H11Protocol` answers that case 431 instead of uvicorn's plain 400. A
  section that arrived whole in one read is measured by :class:`RequestLimits`.
- **body** over ``max_body_bytes``: 413, at once when ``Content-Length`` says so, else (chunked) as soon
  as the bytes received pass the limit. The rest of the body is not kept: uvicorn reads it past and
  drops it, so that the client, which may still be sending, reads the answer (closing at once would
  reset the connection under it).
"""
from __future__ import annotations

import http
import json

import h11
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol as UvicornH11Protocol

from localist.clients import contract as C
from localist.server.errors import ApiError

MAX_HEADER_BYTES = 16 * 1024  # h11's and Node's default: far above what an API client sends
MAX_BODY_BYTES = 4 * 1024 * 1024  # a full 128k-token prompt as JSON text or token ids is under 1 MiB
# documented on every route: any request can meet them
RESPONSES = {413: {"model": C.ErrorResponse, "description": "Request body over the server's limit"},
             431: {"model": C.ErrorResponse, "description": "Request header section over the server's limit"}}


def headers_too_large(limit: int) -> ApiError:
    return ApiError(431, f"the request's header section is larger than the limit of {limit} bytes "
                    "(localist serve --max-header-bytes)", None, "headers_too_large")


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the limit of {limit} bytes "
                    "(localist serve --max-body-bytes)", None, "body_too_large")


class BodyTooLarge(StarletteHTTPException):
    """Raised from the body stream: FastAPI passes an HTTPException on while it reads a body (any other
    exception it turns into a 400)."""

    def __init__(self, limit: int) -> None:
        self.error = body_too_large(limit)
        super().__init__(413, self.error.message)


def _answer(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def header_section_bytes(scope: Scope) -> int:
    """The size of the header section as sent: request line and ``name: value\\r\\n`` lines."""
    line = len(scope["method"]) + len(scope.get("raw_path") or scope["path"].encode()) + len(scope["query_string"]) + 12
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


class RequestLimits:
    """431 for a header section over ``max_header_bytes``, 413 for a body over ``max_body_bytes``."""

    def __init__(self, app: ASGIApp, max_header_bytes: int, max_body_bytes: int) -> None:
        self.app, self.max_header_bytes, self.max_body_bytes = app, max_header_bytes, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if header_section_bytes(scope) > self.max_header_bytes:
            await _answer(headers_too_large(self.max_header_bytes))(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _answer(body_too_large(self.max_body_bytes))(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, receive_within_limit, send)


def install(app: FastAPI, max_header_bytes: int, max_body_bytes: int) -> None:
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _answer(exc.error)

    app.add_exception_handler(BodyTooLarge, _body_too_large)
    app.add_middleware(RequestLimits, max_header_bytes=max_header_bytes, max_body_bytes=max_body_bytes)


class H11Protocol(UvicornH11Protocol):
    """uvicorn's h11 protocol (``uvicorn.run(http=H11Protocol, h11_max_incomplete_event_size=LIMIT)``),
    answering 431 with an OpenAI-shaped error where h11 gave up on an unfinished header section over the
    limit; uvicorn answers every protocol error with the same plain 400."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size
        if limit is None or len(self.conn.trailing_data[0]) <= limit:  # another protocol error
            super().send_400_response(msg)
            return
        err = headers_too_large(limit)
        body = json.dumps(err.body()).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]
        for event in (h11.Response(status_code=431, headers=head, reason=http.HTTPStatus(431).phrase),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
