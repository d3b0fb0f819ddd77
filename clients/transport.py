"""How the clients send: connection settings, the retry policy, and the sync and async drivers that
run the endpoint definitions of :mod:`localist.clients.endpoints`."""
from __future__ import annotations

import asyncio
import functools
import inspect
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
    """Connection settings, request building and the retry policy; no I/O of its own."""

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

    def _headers(self) -> dict[str, str]:
        headers = {"user-agent": "localist-client"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, http: httpx.Client | httpx.AsyncClient, c: Call) -> httpx.Request:
        params = {k: v for k, v in (c.params or {}).items() if v is not None}
        return http.build_request(c.method, c.path, params=params, json=c.json, headers={"accept": c.accept})

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


# Connection failures where the request cannot have reached the server, hence safe to repeat.
_RETRYABLE_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout)


class _SyncRunner:
    """Runs endpoint generators with a blocking ``self._send``."""

    def _run(self, op: Op) -> tuple[Any, httpx.Response | None]:
        """Send each call the op yields until it returns; its value and the last response."""
        reply = None
        while True:
            try:
                step = op.send(reply)
            except StopIteration as done:
                return done.value, reply
            reply = self._send(step)

    def _iterate(self, op: Op) -> Iterator[Any]:
        reply = None
        while True:
            try:
                step = op.send(reply)
            except StopIteration:
                return
            if isinstance(step, Emit):
                reply = None
                yield step.value
            else:
                reply = self._send(step)

    @staticmethod
    def _wrap(kind: str, fn: Callable) -> Callable:
        if kind == "paged":
            def run(self, *args, **kwargs):
                return self._iterate(fn(self, *args, **kwargs))
            return _typed(run, fn, f"Iterator[{fn._localist_item}]")
        if kind == "streamed":
            def run(self, *args, **kwargs):
                chunk_model, response = self._run(fn(self, *args, **kwargs))
                return Stream(response, chunk_model)
            return _typed(run, fn, "Stream")

        def run(self, *args, **kwargs):
            return self._run(fn(self, *args, **kwargs))[0]
        return _typed(run, fn, _result_type(fn))


class _AsyncRunner:
    """Runs the same endpoint generators with an awaitable ``self._send``."""

    async def _run(self, op: Op) -> tuple[Any, httpx.Response | None]:
        reply = None
        while True:
            try:
                step = op.send(reply)
            except StopIteration as done:
                return done.value, reply
            reply = await self._send(step)

    async def _iterate(self, op: Op) -> AsyncIterator[Any]:
        reply = None
        while True:
            try:
                step = op.send(reply)
            except StopIteration:
                return
            if isinstance(step, Emit):
                reply = None
                yield step.value
            else:
                reply = await self._send(step)

    @staticmethod
    def _wrap(kind: str, fn: Callable) -> Callable:
        if kind == "paged":
            def run(self, *args, **kwargs):
                return self._iterate(fn(self, *args, **kwargs))
            return _typed(run, fn, f"AsyncIterator[{fn._localist_item}]")
        if kind == "streamed":
            async def run(self, *args, **kwargs):
                chunk_model, response = await self._run(fn(self, *args, **kwargs))
                return AsyncStream(response, chunk_model)
            return _typed(run, fn, "AsyncStream")

        async def run(self, *args, **kwargs):
            return (await self._run(fn(self, *args, **kwargs)))[0]
        return _typed(run, fn, _result_type(fn))


class _SyncConnection(_Transport, _SyncRunner):
    def __init__(self, base_url: str | None = None, api_key: str | None = None, **settings: Any):
        super().__init__(base_url, api_key, **settings)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers(), timeout=self.timeout)
        self.audit = self._audit_cls(self)
        self.keys = self._keys_cls(self)

    def _send(self, c: Call) -> httpx.Response:
        request = self._request(self._http, c)
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=c.stream)
            except _RETRYABLE_TRANSPORT as exc:
                delay = self._delay(attempt, None)
                if delay is None:
                    raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response
                response.read()
                response.close()
                delay = self._delay(attempt, response)
                if delay is None:
                    raise error_from_response(response)
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AsyncConnection(_Transport, _AsyncRunner):
    def __init__(self, base_url: str | None = None, api_key: str | None = None, **settings: Any):
        super().__init__(base_url, api_key, **settings)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers(), timeout=self.timeout)
        self.audit = self._audit_cls(self)
        self.keys = self._keys_cls(self)

    async def _send(self, c: Call) -> httpx.Response:
        request = self._request(self._http, c)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=c.stream)
            except _RETRYABLE_TRANSPORT as exc:
                delay = self._delay(attempt, None)
                if delay is None:
                    raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response
                await response.aread()
                await response.aclose()
                delay = self._delay(attempt, response)
                if delay is None:
                    raise error_from_response(response)
            await asyncio.sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class _Namespace:
    """A group of endpoints (``client.audit``) sending through its parent client's connection."""

    def __init__(self, parent):
        self._parent = parent

    def _send(self, c: Call):
        return self._parent._send(c)


def twin(name: str, bases: tuple[type, ...], endpoints: type, doc: str, **attrs: Any) -> type:
    """A client class: every endpoint of ``endpoints`` wrapped by the runner among ``bases``."""
    runner = next(b for b in bases if issubclass(b, (_SyncRunner, _AsyncRunner)))
    methods = {attr: runner._wrap(fn._localist_kind, fn) for attr, fn in vars(endpoints).items()
               if hasattr(fn, "_localist_kind")}
    return type(name, (*bases, endpoints), methods | attrs | {"__doc__": doc, "__module__": "localist.clients.client"})
