"""The machinery of the localist client: endpoint definitions, streams, transport, retry policy.

:mod:`localist.clients.client` builds the public classes from it. Every endpoint is written once, in :class:`_Endpoints` and :class:`_AuditEndpoints`, as a generator
that yields the HTTP :class:`Call` it needs and receives the response (a "sans-I/O" definition). The
two clients are generated from those definitions by drivers that differ only in how they send a call
(``httpx.Client`` or ``httpx.AsyncClient``) and how they wait between retries, so the twins cannot
drift apart. Three kinds of endpoint exist: ``call`` (one result), ``paged`` (an iterator that fetches
pages as it goes) and ``streamed`` (an SSE stream of tokens with their attribution).
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel

from .errors import APIConnectionError, error_from_body, error_from_response
from .models import (
    AuditLevel,
    AuditList,
    AuditRecord,
    AuditReport,
    AuditSummary,
    BlockSpec,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    Health,
    KeyCreated,
    KeyInfo,
    KeyList,
    LocalistResult,
    ModelList,
    PurgeResult,
    ReplayResult,
    TokenAttribution,
    Usage,
    VerifyResult,
)

T = TypeVar("T")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Retried: the request was not processed (rate limit) or the server failed; never other 4xx.
# Not 500: the server answers a failure of the request itself (e.g. its localist attention failed)
# with 500, and sending it again fails the same way; an engine outage is a 503 with Retry-After.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class Call:
    """One HTTP request an endpoint needs."""

    method: str
    path: str
    params: Mapping[str, Any] | None = None
    json: Any = None
    accept: str = "application/json"
    stream: bool = False


@dataclass(frozen=True)
class Emit:
    """An item a ``paged`` endpoint hands to the caller between two calls."""

    value: Any


Op = Generator[Call | Emit, httpx.Response, T]


def call(fn):
    """An endpoint with one result: ``Op[Result]`` becomes ``Result`` (sync) or an awaitable of it."""
    fn._localist_kind = "call"
    return fn


def paged(item: type):
    """An endpoint that emits ``item`` objects: an iterator (sync) or async iterator of them."""
    def mark(fn):
        fn._localist_kind = "paged"
        fn._localist_item = item.__name__
        return fn
    return mark


def streamed(fn):
    """An endpoint whose last call is an SSE stream: a :class:`Stream` or :class:`AsyncStream`."""
    fn._localist_kind = "streamed"
    return fn


def _typed(run: Callable, fn: Callable, returns: str) -> Callable:
    """``run`` with ``fn``'s name, docs and parameters, and the driver's real return type."""
    functools.update_wrapper(run, fn)
    del run.__wrapped__  # so that inspect reports the return type below, not the generator's
    run.__signature__ = inspect.signature(fn).replace(return_annotation=returns)
    run.__annotations__ = {**fn.__annotations__, "return": returns}
    return run


def _result_type(fn: Callable) -> str:
    return re.fullmatch(r"Op\[(.+)\]", fn.__annotations__["return"]).group(1)


# --------------------------------------------------------------------------- request building


Messages = str | Sequence[Mapping[str, Any]]
Locality = float | Sequence[float] | str | None


def _messages(messages: Messages) -> list[dict[str, Any]]:
    """A bare string is one user message, the common case of a one-shot question."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def _blocks(blocks: Iterable[BlockSpec | Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Blocks checked field by field before sending, so a typo fails here with the field's name."""
    if blocks is None:
        return None
    out = []
    for spec in blocks:
        spec = spec if isinstance(spec, BlockSpec) else BlockSpec.model_validate(dict(spec))
        out.append(spec.model_dump(exclude_defaults=True) | {"label": spec.label})
    return out


def _generation_body(model: str, locality: Locality, blocks, target_block, audit, sampling: dict) -> dict:
    body: dict[str, Any] = {"model": model}
    if locality is not None:
        body["locality"] = locality if isinstance(locality, (int, float, str)) else list(locality)
    if blocks is not None:
        body["blocks"] = _blocks(blocks)
    if target_block is not None:
        body["target_block"] = target_block
    if audit is not None:
        body["audit"] = audit
    body.update({k: v for k, v in sampling.items() if v is not None})
    return body


def _json(response: httpx.Response, model: type[T]) -> T:
    return model.model_validate(response.json())


# --------------------------------------------------------------------------- streaming (shared state)


@dataclass
class StreamDelta:
    """One streamed piece of a choice: its text and the generated tokens it carries, each with its
    attribution over the blocks (``LocalistResult.blocks`` gives their labels once the stream ends)."""

    choice: int
    text: str
    tokens: list[TokenAttribution]
    finish_reason: str | None = None


@dataclass
class _StreamState:
    """Decodes SSE lines into deltas; identical for the sync and async streams."""

    chunk_model: type
    texts: dict[int, str] = field(default_factory=dict)
    localist: LocalistResult | None = None
    usage: Usage | None = None
    id: str | None = None
    done: bool = False
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> list[StreamDelta]:
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
            return []
        if line or not self._data:  # comments, other fields, or a blank line between events
            return []
        data, self._data = "\n".join(self._data), []
        if data == "[DONE]":
            self.done = True
            return []
        payload = json.loads(data)
        if "error" in payload and "choices" not in payload:
            raise error_from_body(payload, status_code=None)
        chunk = self.chunk_model.model_validate(payload)
        self.id = chunk.id
        self.usage = chunk.usage or self.usage
        self.localist = chunk.localist or self.localist
        deltas = []
        for choice in chunk.choices:
            text = (choice.delta.content or "") if isinstance(chunk, ChatCompletionChunk) else choice.text
            self.texts[choice.index] = self.texts.get(choice.index, "") + text
            tokens = choice.localist.tokens if choice.localist else []
            if text or tokens or choice.finish_reason:
                deltas.append(StreamDelta(choice.index, text, list(tokens), choice.finish_reason))
        return deltas

    def text(self, choice: int = 0) -> str:
        return self.texts.get(choice, "")

    @property
    def audit_id(self) -> str | None:
        return self.localist.audit_id if self.localist else None


class Stream(_StreamState):
    """Iterate for :class:`StreamDelta` items; afterwards ``localist``, ``usage``, ``text()`` and
    ``audit_id`` hold the whole response. Closing early (``close()`` or leaving a ``with``) aborts
    the generation on the server."""

    def __init__(self, response: httpx.Response, chunk_model: type):
        super().__init__(chunk_model)
        self._response = response

    def __iter__(self) -> Iterator[StreamDelta]:
        try:
            for line in self._response.iter_lines():
                yield from self.feed(line)
                if self.done:
                    break
        finally:
            self.close()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncStream(_StreamState):
    """The async twin of :class:`Stream` (``async for``, ``async with``)."""

    def __init__(self, response: httpx.Response, chunk_model: type):
        super().__init__(chunk_model)
        self._response = response

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        try:
            async for line in self._response.aiter_lines():
                for delta in self.feed(line):
                    yield delta
                if self.done:
                    break
        finally:
            await self.close()

    async def close(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


# --------------------------------------------------------------------------- the endpoints, once


ReportFormat = Literal["html", "json"]


class _AuditEndpoints:
    """``client.audit``: records, reports and the chain check."""

    @call
    def get(self, audit_id: str) -> Op[AuditRecord]:
        """One full audit record (the tenant's own only)."""
        response = yield Call("GET", f"/v1/audit/{audit_id}")
        return _json(response, AuditRecord)

    @paged(AuditSummary)
    def list(self, *, since: str | None = None, until: str | None = None, model: str | None = None,
             rho_min: float | None = None, rho_max: float | None = None,
             fidelity_min: float | None = None, fidelity_max: float | None = None,
             block: str | None = None, status: str | None = None, page_size: int = 100,
             max_items: int | None = None) -> Op[None]:
        """Record headers matching the filters, newest first, fetching page after page as iteration goes.

        ``since``/``until`` are ISO-8601 times; ``block`` is a block label; ``max_items`` stops early.
        """
        params = {"since": since, "until": until, "model": model, "rho_min": rho_min, "rho_max": rho_max,
                  "fidelity_min": fidelity_min, "fidelity_max": fidelity_max, "block": block,
                  "status": status, "limit": page_size}
        params = {k: v for k, v in params.items() if v is not None}
        emitted = 0
        cursor = None
        while True:
            response = yield Call("GET", "/v1/audit", params=params | ({"cursor": cursor} if cursor else {}))
            page = _json(response, AuditList)
            for summary in page.data:
                if max_items is not None and emitted >= max_items:
                    return
                yield Emit(summary)
                emitted += 1
            if not page.has_more or not page.next_cursor:
                return
            cursor = page.next_cursor

    @call
    def report(self, audit_id: str, *, format: ReportFormat = "json",
               path: str | os.PathLike | None = None) -> Op[AuditReport | str]:
        """The compliance report: an :class:`AuditReport` (``json``) or the self-contained HTML page.

        With ``path`` the report is also written there (the server's bytes, unchanged).
        """
        if format not in ("html", "json"):
            raise ValueError(f"format: expected 'html' or 'json', got {format!r}")
        accept = "text/html" if format == "html" else "application/json"
        response = yield Call("GET", f"/v1/audit/{audit_id}/report", params={"format": format}, accept=accept)
        if path is not None:
            Path(path).write_bytes(response.content)
        return response.text if format == "html" else _json(response, AuditReport)

    @call
    def redact(self, audit_id: str, reason: str) -> Op[AuditSummary]:
        """Erase a record's payload (e.g. on a data subject's request); the chain stays valid and a
        chained redaction record keeps who and why."""
        response = yield Call("POST", f"/v1/audit/{audit_id}/redact", json={"reason": reason})
        return _json(response, AuditSummary)

    @call
    def replay(self, audit_id: str) -> Op[ReplayResult]:
        """Re-run a stored request from its replay data; ``matches`` says whether every token came back."""
        response = yield Call("POST", f"/v1/audit/{audit_id}/replay")
        return _json(response, ReplayResult)

    @call
    def purge(self, before: float | str, *, tenant: str | None = None) -> Op[PurgeResult]:
        """Retention (admin key): erase the payloads of request records created before ``before``
        (unix seconds or ISO 8601), of one tenant or all; the chain keeps their hashes."""
        body = {"before": before} | ({"tenant": tenant} if tenant is not None else {})
        response = yield Call("POST", "/v1/audit/purge", json=body)
        return _json(response, PurgeResult)

    @call
    def public_key(self) -> Op[str]:
        """The PEM Ed25519 public key that signs the chain head, to check checkpoints elsewhere."""
        response = yield Call("GET", "/v1/audit/public-key", accept="application/x-pem-file")
        return response.text

    @call
    def verify(self) -> Op[VerifyResult]:
        """Check the hash chain and its signed heads; ``first_broken`` names the first bad link."""
        response = yield Call("POST", "/v1/audit/verify")
        return _json(response, VerifyResult)


class _KeysEndpoints:
    """``client.keys``: API keys, with an admin key (each action is itself an audit record)."""

    @call
    def create(self, tenant: str, *, name: str | None = None, admin: bool = False,
               rate_limit_per_min: int | None = None, max_concurrency: int | None = None) -> Op[KeyCreated]:
        """A new key for ``tenant``; its token is in the result, once."""
        body = {"tenant": tenant, "name": name, "admin": admin, "rate_limit_per_min": rate_limit_per_min,
                "max_concurrency": max_concurrency}
        response = yield Call("POST", "/v1/keys", json={k: v for k, v in body.items() if v is not None})
        return _json(response, KeyCreated)

    @call
    def list(self, *, include_revoked: bool = False) -> Op[KeyList]:
        response = yield Call("GET", "/v1/keys", params={"include_revoked": str(include_revoked).lower()})
        return _json(response, KeyList)

    @call
    def revoke(self, key_id: str) -> Op[KeyInfo]:
        """Revoke a key (idempotent); requests with it are refused from then on."""
        response = yield Call("DELETE", f"/v1/keys/{key_id}")
        return _json(response, KeyInfo)


class _Endpoints:
    """The generation, model and health endpoints."""

    _default_model: str | None = None

    def _model(self, model: str | None) -> Op[str]:
        """The model to ask for: the given one, else the server's first (fetched once)."""
        if model is not None:
            return model
        if self._default_model is None:
            response = yield Call("GET", "/v1/models")
            listed = _json(response, ModelList).data
            if not listed:
                raise APIConnectionError("the server lists no model; pass model=")
            self._default_model = listed[0].id
        return self._default_model

    @call
    def models(self) -> Op[ModelList]:
        response = yield Call("GET", "/v1/models")
        return _json(response, ModelList)

    @call
    def health(self) -> Op[Health]:
        response = yield Call("GET", "/health")
        return _json(response, Health)

    @call
    def chat(self, messages: Messages, *, model: str | None = None, locality: Locality = None,
             blocks: Iterable[BlockSpec | Mapping[str, Any]] | None = None, target_block: str | int | None = None,
             audit: AuditLevel | None = None, max_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None,
             n: int | None = None, **extra: Any) -> Op[ChatCompletionResponse]:
        """A chat completion with the locality dial ``locality`` (ρ, a per-layer list or a preset),
        labelled ``blocks``, the ground-truth ``target_block`` and the ``audit`` level. ``extra`` holds
        any other OpenAI field, sent as is."""
        body = _generation_body((yield from self._model(model)), locality, blocks, target_block, audit,
                                dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop=stop, n=n, **extra))
        response = yield Call("POST", "/v1/chat/completions", json=body | {"messages": _messages(messages)})
        return _json(response, ChatCompletionResponse)

    @call
    def complete(self, prompt: str | list[int], *, model: str | None = None, locality: Locality = None,
                 blocks: Iterable[BlockSpec | Mapping[str, Any]] | None = None, target_block: str | int | None = None,
                 audit: AuditLevel | None = None, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None,
                 n: int | None = None, **extra: Any) -> Op[CompletionResponse]:
        """A text completion of ``prompt`` (text or token ids); locality fields as in :meth:`chat`."""
        body = _generation_body((yield from self._model(model)), locality, blocks, target_block, audit,
                                dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop=stop, n=n, **extra))
        response = yield Call("POST", "/v1/completions", json=body | {"prompt": prompt})
        return _json(response, CompletionResponse)

    @streamed
    def chat_stream(self, messages: Messages, *, model: str | None = None, locality: Locality = None,
                    blocks: Iterable[BlockSpec | Mapping[str, Any]] | None = None,
                    target_block: str | int | None = None, audit: AuditLevel | None = None,
                    max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                    seed: int | None = None, stop: str | list[str] | None = None, **extra: Any) -> Op[type[BaseModel]]:
        """:meth:`chat`, streamed: a :class:`Stream` of tokens with their attribution."""
        body = _generation_body((yield from self._model(model)), locality, blocks, target_block, audit,
                                dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop=stop, **extra))
        yield Call("POST", "/v1/chat/completions", accept="text/event-stream", stream=True,
                   json=body | {"messages": _messages(messages), "stream": True,
                                "stream_options": {"include_usage": True}})
        return ChatCompletionChunk

    @streamed
    def complete_stream(self, prompt: str | list[int], *, model: str | None = None, locality: Locality = None,
                        blocks: Iterable[BlockSpec | Mapping[str, Any]] | None = None,
                        target_block: str | int | None = None, audit: AuditLevel | None = None,
                        max_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None,
                        **extra: Any) -> Op[type[BaseModel]]:
        """:meth:`complete`, streamed."""
        body = _generation_body((yield from self._model(model)), locality, blocks, target_block, audit,
                                dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop=stop, **extra))
        yield Call("POST", "/v1/completions", accept="text/event-stream", stream=True,
                   json=body | {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True}})
        return CompletionResponse


# --------------------------------------------------------------------------- transport and drivers


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


def endpoints(cls: type) -> dict[str, Callable]:
    """The endpoint definitions of a generated class, by name."""
    return {name: fn for klass in cls.__mro__ for name, fn in vars(klass).items() if hasattr(fn, "_localist_kind")}


AUDIT_DOC = ("Audit records of the caller's tenant: ``get``, ``list`` (auto-paginated), ``report``, ``verify``, "
             "``redact``, ``replay``; ``purge`` (admin) and ``public_key``.")
KEYS_DOC = "API keys (admin key only): ``create``, ``list``, ``revoke``."
CLIENT_DOC = """Client of a localist server{kind}.

``Client(base_url=None, api_key=None, *, timeout=120, max_retries=3, backoff=0.5, max_backoff=20)``;
``base_url`` and ``api_key`` default to ``$LOCALIST_BASE_URL`` (else http://127.0.0.1:8000) and
``$LOCALIST_API_KEY``. 429 and 5xx answers and refused connections are retried ``max_retries`` times
with exponential backoff (the server's Retry-After wins); other errors raise at once, as subclasses of
:class:`localist.clients.errors.APIError` carrying the server's message and the offending ``param``.
Endpoints: ``chat``, ``complete``, ``chat_stream``, ``complete_stream``, ``models``, ``health`` and
``audit.get/list/report/verify/redact/replay/purge/public_key`` and (admin key) ``keys.create/list/revoke``.
"""
