"""Typed results of the localist server, mirrored for a client that cannot import the server.

The server's wire models (``localist.server.schemas``, and ``openapi.yaml`` generated from them) are
the single source of truth; these classes repeat their field names, types and required-ness so that a
client install needs only httpx + pydantic. ``tests/test_client_models.py`` compares every class here
with both sources, so a field that changes there and not here fails the suite.

Unlike the server, the client accepts unknown fields (``extra="allow"``): a newer server may add a
field without breaking an older client.
"""
from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AuditLevel = Literal["summary", "per_token", "per_layer"]
Preset = Literal["distributed", "balanced", "localist"]
RecordStatus = Literal["completed", "aborted", "failed"]
FinishReason = Literal["stop", "length", "abort"]


def _nullable(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _absent_is_null(cls, data: Any) -> Any:
        """The server's SSE events omit null fields (``exclude_none``, as OpenAI does): read an absent
        nullable field as null rather than refuse the event."""
        if isinstance(data, dict):
            absent = [name for name, f in cls.model_fields.items()
                      if f.is_required() and name not in data and _nullable(f.annotation)]
            if absent:
                data = {**data, **dict.fromkeys(absent)}
        return data


# --------------------------------------------------------------------------- errors


class ErrorBody(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    error: ErrorBody


# --------------------------------------------------------------------------- request helper


class BlockSpec(_Model):
    """A labelled rule/document for ``blocks=``: give ``text``, or a character span ``start``/``end``
    (with ``message`` for chat). Plain dicts are accepted too; this class only checks them early."""

    model_config = ConfigDict(extra="forbid", strict=True)

    label: str = Field(min_length=1, max_length=128)
    kind: str = Field("document", min_length=1, max_length=32)
    text: str | None = None
    message: int | None = Field(None, ge=0)
    start: int | None = Field(None, ge=0)
    end: int | None = Field(None, ge=0)
    pinned: bool = False
    evidence: bool = False


# --------------------------------------------------------------------------- the `localist` object


class Dial(_Model):
    rho: list[float]
    preset: str | None = None


class BlockInfo(_Model):
    id: int
    label: str
    kind: str
    start: int
    end: int
    pinned: bool
    candidate: bool


class Entropy(_Model):
    total_nats: float | None
    total_bits: float | None
    block_nats: float | None
    block_bits: float | None


class Theory(_Model):
    """docs/theory.md §4: the threshold and bounds next to what was measured."""

    epsilon: float
    target: int | None
    num_heads_scored: int
    lambda_star_median: float | None
    lambda_star_p90: float | None
    rho_star_median: float | None
    rho_star_p90: float | None
    wrong_block_share: float | None
    target_not_top: bool | None
    fidelity_measured: float | None
    fidelity_predicted: float | None
    fidelity_bound: float | None
    fidelity_max_abs_error: float | None
    bound_held_fidelity: float | None
    entropy_measured_nats: float | None
    entropy_bound_nats: float | None
    bound_held_entropy: float | None


class TokenMetrics(_Model):
    index: int
    token_id: int
    text: str
    attribution: list[float]
    sink_mass: float
    candidate_mass: float
    entropy_nats: float
    entropy_bits: float
    block_entropy_nats: float
    block_entropy_bits: float
    pointer_fidelity: float | None
    layers: list[list[list[float]]] | None = None
    layer_attribution: list[list[float]] | None = None
    layer_sink_mass: list[float] | None = None
    layer_entropy_nats: list[float] | None = None
    head_entropy_nats: list[list[float]] | None = None
    layer_block_entropy_nats: list[float] | None = None
    head_block_entropy_nats: list[list[float]] | None = None
    layer_pointer_fidelity: list[float | None] | None = None
    head_pointer_fidelity: list[list[float | None]] | None = None


class ResponseMetrics(_Model):
    index: int
    num_tokens: int
    num_layers: int
    num_heads: int
    target_block: int | None
    target_source: Literal["request", "top_candidate"] | None
    attribution: list[float] | None
    sink_mass: float | None
    candidate_mass: float | None
    entropy: Entropy
    pointer_fidelity: float | None
    theory: Theory
    tokens: list[TokenMetrics] | None = None


class LocalistResult(_Model):
    audit_id: str
    audit: AuditLevel
    locality: Dial
    blocks: list[BlockInfo]
    choices: list[ResponseMetrics]


class TokenAttribution(_Model):
    index: int
    token_id: int
    attribution: list[float]
    pointer_fidelity: float | None


class LocalistDelta(_Model):
    tokens: list[TokenAttribution]


# --------------------------------------------------------------------------- OpenAI responses


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Model):
    content: list[TokenLogprob] | None


class AssistantMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(_Model):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    localist: LocalistResult

    @property
    def text(self) -> str:
        """The first choice's text, the common case."""
        return self.choices[0].message.content or ""


class ChatDelta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    localist: LocalistDelta | None = None


class ChatCompletionChunk(_Model):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    localist: LocalistResult | None = None


class CompletionLogprobs(_Model):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    localist: LocalistDelta | None = None


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None
    localist: LocalistResult | None

    @property
    def text(self) -> str:
        return self.choices[0].text


# --------------------------------------------------------------------------- models, health


class ModelInfo(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    num_layers: int
    num_heads: int
    max_model_len: int
    weights_sha256: str
    stand_in: bool


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Health(_Model):
    status: Literal["ok", "degraded"]
    model: str
    engine: Literal["running", "restarting"]
    engine_requests: int
    engine_restarts: int
    engine_down_since: float | None
    engine_last_failure: str | None
    audit_store: Literal["ok", "error"]
    dev_mode: bool


# --------------------------------------------------------------------------- API keys (admin)


class KeyInfo(_Model):
    key_id: str
    tenant: str
    name: str
    admin: bool
    created_us: int
    revoked_us: int | None
    rate_limit_per_min: int | None
    max_concurrency: int | None
    active: bool


class KeyCreated(_Model):
    """``token`` is the secret, shown once (the server keeps only its hash)."""

    token: str
    key: KeyInfo


class KeyList(_Model):
    object: Literal["list"] = "list"
    data: list[KeyInfo]


# --------------------------------------------------------------------------- audit


class RecordHashes(_Model):
    payload: str
    content: str
    prev: str
    chain: str


class AuditSummary(_Model):
    """One record's header as listed: kind is request | key | redaction | retention."""

    id: str
    seq: int
    kind: str
    tenant: str
    created_us: int
    created_at: str
    status: RecordStatus | None
    model: str | None
    rho_min: float | None
    rho_max: float | None
    fidelity: float | None
    blocks: list[str]
    redacted: bool
    hashes: RecordHashes


class AuditRecord(AuditSummary):
    """A full record: request, output, metrics (the returned ``localist`` object), replay info.
    Payload fields are None once redacted."""

    request: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    timestamps: dict[str, float | None] | None = None
    replay: dict[str, Any] | None = None

    def localist(self) -> LocalistResult | None:
        """The ``localist`` object the caller got, typed (None for a failed, aborted or redacted record)."""
        stored = (self.metrics or {}).get("localist")
        return LocalistResult.model_validate(stored) if stored else None


class AuditList(_Model):
    object: Literal["list"] = "list"
    data: list[AuditSummary]
    has_more: bool
    next_cursor: str | None


class BrokenLink(_Model):
    seq: int
    record_id: str | None
    reason: str


class VerifyResult(_Model):
    ok: bool
    checked: int
    head_seq: int
    head_hash: str
    first_broken: BrokenLink | None
    signed_seq: int | None
    signatures_valid: int
    signatures_untrusted: int
    redacted: int


class ReplayChoice(_Model):
    index: int
    matches: bool
    original_token_ids: list[int]
    replay_token_ids: list[int]


class ReplayResult(_Model):
    """A stored request re-run from its replay data; ``replay_id`` is the replay's own audit record."""

    record_id: str
    replay_id: str
    matches: bool
    choices: list[ReplayChoice]
    localist: LocalistResult


class RecordVerification(_Model):
    """One record checked on its own: its hashes and the links up to the signed checkpoint covering it."""

    ok: bool
    record_id: str
    seq: int
    reason: str | None
    redacted: bool
    checkpoint_seq: int | None
    links_checked: int


class AuditReport(_Model):
    record: AuditRecord
    verification: RecordVerification


class PurgeResult(_Model):
    erased: int


# Every class the drift test compares with the server's models, by the server's name.
WIRE_MODELS: tuple[type[BaseModel], ...] = (
    ErrorBody, ErrorResponse, BlockSpec, Dial, BlockInfo, Entropy, Theory, TokenMetrics, ResponseMetrics,
    LocalistResult, TokenAttribution, LocalistDelta, Usage, TopLogprob, TokenLogprob, ChatLogprobs,
    AssistantMessage, ChatChoice, ChatCompletionResponse, ChatDelta, ChatChunkChoice, ChatCompletionChunk,
    CompletionLogprobs, CompletionChoice, CompletionResponse, ModelInfo, ModelList, Health, KeyInfo, KeyCreated, KeyList,
    RecordHashes,
    AuditSummary, AuditRecord, AuditList, BrokenLink, VerifyResult, ReplayChoice,
    ReplayResult, RecordVerification, AuditReport, PurgeResult,
)
