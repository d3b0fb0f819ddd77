"""Every endpoint of the localist API, written once, without I/O.

Each endpoint is a generator that yields the HTTP :class:`Call` it needs and receives the response
(a "sans-I/O" definition); :mod:`localist.clients.transport` drives the same generators with
``httpx.Client`` or ``httpx.AsyncClient``, so the sync and async clients cannot drift apart. Three
kinds exist: ``call`` (one result), ``paged`` (an iterator that fetches pages as it goes) and
``streamed`` (an SSE stream of tokens with their attribution). Answers are read with the contract's
reader (:func:`localist.clients.contract.read`): fields a newer server adds are tolerated.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from .contract import (
    AuditLevel,
    AuditList,
    AuditRecord,
    AuditReport,
    AuditSummary,
    BlockSpec,
    ChatCompletionChunk,
    DialScope,
    ChatCompletionResponse,
    CompletionResponse,
    Health,
    KeyCreated,
    KeyInfo,
    KeyList,
    ModelList,
    PurgeResult,
    ReplayResult,
    Rule,
    RuleList,
    VerifyResult,
    WireModel,
    read,
)
from .errors import APIConnectionError

T = TypeVar("T")


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


# --------------------------------------------------------------------------- request building


Messages = str | Sequence[Mapping[str, Any]]
Locality = float | Sequence[float] | str | None


def _messages(messages: Messages) -> list[dict[str, Any]]:
    """A bare string is one user message, the common case of a one-shot question."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def _blocks(blocks: Iterable[BlockSpec | Mapping[str, Any]] | Literal["auto"] | None
            ) -> list[dict[str, Any]] | Literal["auto"] | None:
    """Blocks checked field by field before sending, so a typo fails here with the field's name; `auto`
    (the server segments, docs/theory.md §6) as is."""
    if blocks is None or blocks == "auto":
        return blocks
    out = []
    for spec in blocks:
        spec = spec if isinstance(spec, BlockSpec) else BlockSpec.model_validate(dict(spec), extra="forbid")
        out.append(spec.model_dump(exclude_defaults=True) | {"label": spec.label})
    return out


def _generation_body(model: str, locality: Locality, blocks, target_block, audit, dial_scope,
                     sampling: dict) -> dict:
    body: dict[str, Any] = {"model": model}
    if locality is not None:
        body["locality"] = locality if isinstance(locality, (int, float, str)) else list(locality)
    if blocks is not None:
        body["blocks"] = _blocks(blocks)
    if target_block is not None:
        body["target_block"] = target_block
    if audit is not None:
        body["audit"] = audit
    if dial_scope is not None:
        body["dial_scope"] = dial_scope
    body.update({k: v for k, v in sampling.items() if v is not None})
    return body


def _json(response: httpx.Response, model: type[T]) -> T:
    return read(model, response.json())


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


class _RulesEndpoints:
    """``client.rules``: the tenant's rules and rulebooks, each version immutable."""

    @call
    def create(self, label: str, text: str | None = None, *, anchor: str | None = None,
               rules: Sequence[str] | None = None) -> Op[Rule]:
        """A rule (``text``, optional ``anchor`` header) or a rulebook (``rules``: ``label`` or
        ``label@version`` each); posting an existing label makes its next version."""
        body = {"label": label, "text": text, "anchor": anchor, "rules": None if rules is None else list(rules)}
        response = yield Call("POST", "/v1/rules", json={k: v for k, v in body.items() if v is not None})
        return _json(response, Rule)

    @call
    def list(self, *, include_retired: bool = False) -> Op[RuleList]:
        """Every rule and rulebook of the tenant with all versions (and rulebooks' anchor probes)."""
        response = yield Call("GET", "/v1/rules", params={"include_retired": str(include_retired).lower()})
        return _json(response, RuleList)

    @call
    def get(self, label: str) -> Op[Rule]:
        response = yield Call("GET", f"/v1/rules/{label}")
        return _json(response, Rule)

    @call
    def retire(self, label: str) -> Op[Rule]:
        """Retire a rule or rulebook: requests can no longer use it; its versions stay readable."""
        response = yield Call("DELETE", f"/v1/rules/{label}")
        return _json(response, Rule)


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
             blocks: Iterable[BlockSpec | Mapping[str, Any]] | Literal["auto"] | None = None, target_block: str | int | None = None,
             audit: AuditLevel | None = None, dial_scope: DialScope | None = None, max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
             stop: str | list[str] | None = None, n: int | None = None, **extra: Any) -> Op[ChatCompletionResponse]:
        """A chat completion with the locality dial ``locality`` (ρ, a per-layer list or a preset),
        labelled ``blocks``, the ground-truth ``target_block``, the ``audit`` level and the ``dial_scope``
        (default: the model's). ``extra`` holds any other OpenAI field, sent as is."""
        body = _generation_body((yield from self._model(model)), locality, blocks, target_block, audit, dial_scope,
                                dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop=stop, n=n, **extra))
        response = yield Call("POST", "/v1/chat/completions", json=body | {"messages": _messages(messages)})
        return _json(response, ChatCompletionResponse)

    @call
    def complete(self, prompt: str | list[int], *, model: str | None = None, locality: Locality = None,
                 blocks: Iterable[BlockSpec | Mapping[str, Any]] | Literal["auto"] | None = None, target_block: str | int | None = None,
                 audit: AuditLevel | None = None, dial_scope: DialScope | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None, n: int | None = None, **extra: Any) -> Op[CompletionResponse]:
        """A text completion of ``prompt`` (text or token ids); locality fields as in :meth:`chat`."""
        body = _generation_body((yield from self._model(model)), locality, blocks, target_block, audit, dial_scope,
                                dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop=stop, n=n, **extra))
        response = yield Call("POST", "/v1/completions", json=body | {"prompt": prompt})
        return _json(response, CompletionResponse)

    @streamed
    def chat_stream(self, messages: Messages, *, model: str | None = None, locality: Locality = None,
                    blocks: Iterable[BlockSpec | Mapping[str, Any]] | Literal["auto"] | None = None,
                    target_block: str | int | None = None, audit: AuditLevel | None = None,
                    dial_scope: DialScope | None = None, max_tokens: int | None = None,
                    temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                    stop: str | list[str] | None = None, **extra: Any) -> Op[type[WireModel]]:
        """:meth:`chat`, streamed: a :class:`Stream` of tokens with their attribution."""
        body = _generation_body((yield from self._model(model)), locality, blocks, target_block, audit, dial_scope,
                                dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop=stop, **extra))
        yield Call("POST", "/v1/chat/completions", accept="text/event-stream", stream=True,
                   json=body | {"messages": _messages(messages), "stream": True,
                                "stream_options": {"include_usage": True}})
        return ChatCompletionChunk

    @streamed
    def complete_stream(self, prompt: str | list[int], *, model: str | None = None, locality: Locality = None,
                        blocks: Iterable[BlockSpec | Mapping[str, Any]] | Literal["auto"] | None = None,
                        target_block: str | int | None = None, audit: AuditLevel | None = None,
                        dial_scope: DialScope | None = None, max_tokens: int | None = None,
                        temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                        stop: str | list[str] | None = None, **extra: Any) -> Op[type[WireModel]]:
        """:meth:`complete`, streamed."""
        body = _generation_body((yield from self._model(model)), locality, blocks, target_block, audit, dial_scope,
                                dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop=stop, **extra))
        yield Call("POST", "/v1/completions", accept="text/event-stream", stream=True,
                   json=body | {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True}})
        return CompletionResponse


def endpoints(cls: type) -> dict[str, Callable]:
    """The endpoint definitions of a generated class, by name."""
    return {name: fn for klass in cls.__mro__ for name, fn in vars(klass).items() if hasattr(fn, "_localist_kind")}
