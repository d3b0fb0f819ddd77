"""How the clients send: connection settings, the retry policy, and the sync and async drivers that
run the endpoint definitions of :mod:`localist.clients.endpoints`."""
from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from .endpoints import Call, Emit, Op
from .errors import APIConnectionError, error_from_response
from .streams import AsyncStream, Stream

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Retried: the request was not processed (rate limit) or the server failed; never other 4xx.
# Not 500: the server answers a failure of the request itself (e.g. its localist attention failed)
# with 500, and sending it again fails the same way; an engine outage is a 503 with Retry-After.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


def _typed(run: Callable, fn: Callable, returns: str) -> Callable:
    """``run`` with ``fn``'s name, docs and parameters, and the driver's real return type."""
    functools.update_wrapper(run, fn)
    del run.__wrapped__  # so that inspect reports the return type below, not the generator's
    run.__signature__ = inspect.signature(fn).replace(return_annotation=returns)
    run.__annotations__ = {**fn.__annotations__, "return": returns}
    return run


def _result_type(fn: Callable) -> str:
    return re.fullmatch(r"Op\[(.+)\]", fn.__annotations__["return"]).group(1)


class _Transport:
    """Connection settings, request building and the retry policy; the I/O is the subclass's."""

    _http_class: type  # httpx.Client or httpx.AsyncClient
    _audit_cls: type  # the endpoint groups, set by ``twin``
    _keys_cls: type
    _rules_cls: type

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 120.0,
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 20.0):
        self.base_url = (base_url or os.environ.get("LOCALIST_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected http(s)://host:port, got {self.base_url!r}")
        self.api_key = api_key if api_key is not None else os.environ.get("LOCALIST_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._http = self._http_class(base_url=self.base_url, headers=self._headers(), timeout=self.timeout)
        self.audit = self._audit_cls(self)
        self.keys = self._keys_cls(self)
        self.rules = self._rules_cls(self)

    def _headers(self) -> dict[str, str]:
        headers = {"user-agent": "localist-client"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, c: Call) -> httpx.Request:
        params = {k: v for k, v in (c.params or {}).items() if v is not None}
        return self._http.build_request(c.method, c.path, params=params, json=c.json, headers={"accept": c.accept})

    def _delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retry ``attempt`` (0-based), or None to give up.

        The server's Retry-After wins; otherwise exponential backoff with jitter, capped.
        """
        if attempt >= self.max_retries:
            return None
        if response is not None:
            if response.status_code not in RETRY_STATUSES:
                return None
            retry_after = response.headers.get("retry-after")
            if retry_after is not None:
                try:
                    return min(max(float(retry_after), 0.0), self.max_backoff)
                except ValueError:
                    pass
        return min(self.backoff * 2**attempt, self.max_backoff) * random.uniform(0.5, 1.0)

    def _after(self, attempt: int, outcome: httpx.Response | Exception) -> httpx.Response | float:
        """What attempt ``attempt`` of a call leads to: the response to use, or the seconds to wait before
        the next attempt; raises when the call has failed for good (an error response, read already)."""
        if isinstance(outcome, Exception):
            delay = self._delay(attempt, None)
            if delay is None:
                raise APIConnectionError(f"cannot reach {self.base_url}: {outcome}") from outcome
            return delay
        if outcome.status_code < 400:
            return outcome
        delay = self._delay(attempt, outcome)
        if delay is None:
            raise error_from_response(outcome)
        return delay


# Connection failures where the request cannot have reached the server, hence safe to repeat.
_RETRYABLE_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout)


def _advance(op: Op, reply: httpx.Response | None) -> tuple[str, Any]:
    """One step of an endpoint generator: ("call", Call), ("emit", item) or ("done", its result)."""
    try:
        step = op.send(reply)
    except StopIteration as done:
        return "done", done.value
    return ("emit", step.value) if isinstance(step, Emit) else ("call", step)


class _SyncConnection(_Transport):
    """Runs endpoint generators over ``httpx.Client``."""

    _http_class = httpx.Client
    ITERATOR = "Iterator"

    def _send(self, c: Call) -> httpx.Response:
        request = self._request(c)
        for attempt in itertools.count():
            try:
                outcome = self._http.send(request, stream=c.stream)
                if outcome.status_code >= 400:
                    outcome.read()
                    outcome.close()
            except _RETRYABLE_TRANSPORT as exc:
                outcome = exc
            if isinstance(step := self._after(attempt, outcome), httpx.Response):
                return step
            time.sleep(step)

    def _run(self, op: Op) -> tuple[Any, httpx.Response | None]:
        """Send each call the op yields until it returns; its value and the last response."""
        reply = None
        while (step := _advance(op, reply))[0] == "call":
            reply = self._send(step[1])
        return step[1], reply

    def _iterate(self, op: Op) -> Iterator[Any]:
        reply = None
        while (step := _advance(op, reply))[0] != "done":
            reply = self._send(step[1]) if step[0] == "call" else (yield step[1])  # an emitted item: no reply

    def _result(self, op: Op) -> Any:
        return self._run(op)[0]

    def _stream(self, op: Op) -> Stream:
        chunk_model, response = self._run(op)
        return Stream(response, chunk_model)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AsyncConnection(_Transport):
    """Runs the same endpoint generators over ``httpx.AsyncClient``."""

    _http_class = httpx.AsyncClient
    ITERATOR = "AsyncIterator"

    async def _send(self, c: Call) -> httpx.Response:
        request = self._request(c)
        for attempt in itertools.count():
            try:
                outcome = await self._http.send(request, stream=c.stream)
                if outcome.status_code >= 400:
                    await outcome.aread()
                    await outcome.aclose()
            except _RETRYABLE_TRANSPORT as exc:
                outcome = exc
            if isinstance(step := self._after(attempt, outcome), httpx.Response):
                return step
            await asyncio.sleep(step)

    async def _run(self, op: Op) -> tuple[Any, httpx.Response | None]:
        reply = None
        while (step := _advance(op, reply))[0] == "call":
            reply = await self._send(step[1])
        return step[1], reply

    async def _iterate(self, op: Op) -> AsyncIterator[Any]:
        reply = None
        while (step := _advance(op, reply))[0] != "done":
            reply = await self._send(step[1]) if step[0] == "call" else (yield step[1])  # an emitted item: no reply

    async def _result(self, op: Op) -> Any:
        return (await self._run(op))[0]

    async def _stream(self, op: Op) -> AsyncStream:
        chunk_model, response = await self._run(op)
        return AsyncStream(response, chunk_model)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class _Namespace:
    """A group of endpoints (``client.audit``): it runs on its parent client's connection."""

    def __init__(self, parent):
        self._parent = parent

    def __getattr__(self, name: str):
        return getattr(self._parent, name)


def _wrap(connection: type, kind: str, fn: Callable) -> Callable:
    """Endpoint ``fn`` as a method driven by ``connection``'s runner: an iterator (paged), or a call that
    returns the result or the stream (a coroutine function on the async connection)."""
    if kind == "paged":
        def run(self, *args, **kwargs):
            return self._iterate(fn(self, *args, **kwargs))
        return _typed(run, fn, f"{connection.ITERATOR}[{fn._localist_item}]")
    finish = "_stream" if kind == "streamed" else "_result"
    returns = inspect.signature(getattr(connection, finish)).return_annotation if kind == "streamed" else _result_type(fn)
    if inspect.iscoroutinefunction(getattr(connection, finish)):
        async def run(self, *args, **kwargs):
            return await getattr(self, finish)(fn(self, *args, **kwargs))
    else:
        def run(self, *args, **kwargs):
            return getattr(self, finish)(fn(self, *args, **kwargs))
    return _typed(run, fn, returns)


def twin(name: str, connection: type, endpoints: type, doc: str, namespace: bool = False, **attrs: Any) -> type:
    """A client class (or, with ``namespace``, a group of its endpoints): every endpoint of ``endpoints``
    driven by ``connection`` (:class:`_SyncConnection` or :class:`_AsyncConnection`)."""
    methods = {attr: _wrap(connection, fn._localist_kind, fn) for attr, fn in vars(endpoints).items()
               if hasattr(fn, "_localist_kind")}
    bases = (_Namespace, endpoints) if namespace else (connection, endpoints)
    return type(name, bases, methods | attrs | {"__doc__": doc, "__module__": "localist.clients.client"})
