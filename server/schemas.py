"""Wire models of the localist server: the single source of truth for the HTTP surface.

OpenAI's request and response shapes, plus the locality extensions (``locality``, ``blocks``,
``target_block``, ``audit`` in the request; the ``localist`` object in the response). The Python
client mirrors these models and ``openapi.yaml`` is generated from them, so a field changes here
and nowhere else.

Request models are strict (no string-to-number coercion) so that a wrong type is a 400 naming the
field; unknown OpenAI fields are ignored, as OpenAI's own SDK may send newer ones.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AuditLevel = Literal["summary", "per_token", "per_layer"]
Preset = Literal["distributed", "balanced", "localist"]
RecordStatus = Literal["completed", "aborted", "failed"]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- errors


class ErrorBody(_Response):
    message: str
    type: str = Field(description="invalid_request_error | authentication_error | permission_error | "
                      "not_found_error | rate_limit_error | server_error")
    param: str | None = Field(None, description="Dotted path of the offending request field, e.g. `locality[2]`.")
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorBody


# --------------------------------------------------------------------------- locality extensions (request)


class BlockSpec(_Request):
    """A labelled rule or document to place in the prompt, or a character span marking one.

    Exactly one form per block:
    - ``text``: the text is placed in the prompt as its own block (chat: inside one system message
      put before the conversation; completions: before the prompt), in the order given;
    - ``start``/``end``: a character span ``[start, end)`` inside an existing text — the content of
      ``messages[message]`` (chat) or the prompt (completions).
    """

    label: str = Field(min_length=1, max_length=128, description="Unique name of the block, e.g. `R12`.")
    kind: str = Field("document", min_length=1, max_length=32,
                      description="`rule` and `document` are candidate blocks for pointer fidelity; any other "
                      "kind is context unless `evidence` is set. `sink` and `response` are reserved.")
    text: str | None = Field(None, description="Text of the block, placed in the prompt.")
    message: int | None = Field(None, ge=0, description="Chat only: index of the message holding the span.")
    start: int | None = Field(None, ge=0, description="Character offset where the span starts (inclusive).")
    end: int | None = Field(None, ge=0, description="Character offset where the span ends (exclusive).")
    pinned: bool = Field(False, description="Keep this block's base attention mass whatever the dial.")
    evidence: bool = Field(False, description="Count this block as a candidate whatever its kind.")


class LocalityFields(_Request):
    """Extension fields shared by both generation endpoints (send them with `extra_body=`)."""

    locality: float | list[float] | Preset | str | None = Field(
        None,
        description="The dial ρ ∈ [0, 1]: one number for all layers, a list with one value per layer, or a "
        "preset (`distributed` = 0, `balanced` = 0.5, `localist` = 0.9). Default: the server's (0).",
    )
    blocks: list[BlockSpec] | None = Field(
        None, description="Labelled rules/documents. Default: one block per chat message (the prompt for completions)."
    )
    target_block: str | int | None = Field(
        None, description="Ground-truth block for pointer fidelity: a block label or a block id."
    )
    audit: AuditLevel = Field("summary", description="How much detail is returned and stored.")


# --------------------------------------------------------------------------- OpenAI request fields


class StreamOptions(_Request):
    include_usage: bool = False


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = Field(None, min_length=1, max_length=128)


class _Sampling(_Request):
    model: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: int | None = Field(None, ge=-(2**62), le=2**62, description="Choice i uses seed + i.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past end-of-sequence "
                             "(benchmarks, load tests).")


class ChatCompletionRequest(LocalityFields, _Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(LocalityFields, _Sampling):
    prompt: str | list[int] = Field(description="One prompt: a string or a list of token ids.")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


# --------------------------------------------------------------------------- the `localist` response object


class Dial(_Response):
    rho: list[float] = Field(description="ρ used at each layer.")
    preset: str | None = Field(None, description="The preset name when the request gave one.")


class BlockInfo(_Response):
    id: int
    label: str
    kind: str
    start: int = Field(description="First prompt token of the block.")
    end: int = Field(description="One past the last prompt token; the response block ends at the prompt's end "
                     "and also holds every generated token.")
    pinned: bool
    candidate: bool


class Entropy(_Response):
    total_nats: float | None = Field(description="H(a): attention entropy over tokens (mean over tokens, layers, heads).")
    total_bits: float | None
    block_nats: float | None = Field(description="H(π): entropy of the block distribution.")
    block_bits: float | None


class Theory(_Response):
    """SPEC §4 next to what was measured (``localist.model.theory.TheoryReport``)."""

    epsilon: float
    target: int | None
    num_heads_scored: int = Field(description="(token, layer, head) with ≥ 2 candidates and candidate mass.")
    lambda_star_median: float | None = Field(description="Candidate-mass-weighted median of λ*(ε) over heads with δ > 0.")
    lambda_star_p90: float | None
    rho_star_median: float | None = Field(description="λ*/(1+λ*) of the median.")
    rho_star_p90: float | None
    wrong_block_share: float | None = Field(description="Candidate-mass share of (token, layer, head) with δ ≤ 0.")
    target_not_top: bool | None = Field(description="The requested target is not the top candidate block.")
    fidelity_measured: float | None
    fidelity_predicted: float | None = Field(description="Exact fidelity from the block margins (SPEC §4).")
    fidelity_bound: float | None = Field(description="Candidate-mass-weighted lower bound on pointer fidelity.")
    fidelity_max_abs_error: float | None
    bound_held_fidelity: float | None = Field(description="Fraction of scored heads where the bound held (1.0).")
    entropy_measured_nats: float | None
    entropy_bound_nats: float | None = Field(description="Mean upper bound on candidate-part entropy.")
    bound_held_entropy: float | None


class TokenMetrics(_Response):
    """One generated token (``localist.model.metrics``, audit level per_token / per_layer)."""

    index: int
    token_id: int
    text: str
    attribution: list[float] = Field(description="π over blocks, mean over layers and heads.")
    sink_mass: float
    candidate_mass: float
    entropy_nats: float
    entropy_bits: float
    block_entropy_nats: float
    block_entropy_bits: float
    pointer_fidelity: float | None
    layers: list[list[list[float]]] | None = Field(None, description="per_layer: π per layer and head, [L][H][G].")
    layer_attribution: list[list[float]] | None = Field(None, description="per_layer: π per layer, [L][G].")
    layer_sink_mass: list[float] | None = None
    layer_entropy_nats: list[float] | None = None
    head_entropy_nats: list[list[float]] | None = None
    layer_block_entropy_nats: list[float] | None = None
    head_block_entropy_nats: list[list[float]] | None = None
    layer_pointer_fidelity: list[float | None] | None = None
    head_pointer_fidelity: list[list[float | None]] | None = None


class ResponseMetrics(_Response):
    """Metrics of one generated choice (SPEC §3/§4), as ``localist.model.metrics`` computes them."""

    index: int = Field(description="The choice's index.")
    num_tokens: int
    num_layers: int
    num_heads: int
    target_block: int | None
    target_source: Literal["request", "top_candidate"] | None
    attribution: list[float] | None = Field(description="Response-level π over blocks (mean over generated tokens).")
    sink_mass: float | None
    candidate_mass: float | None
    entropy: Entropy
    pointer_fidelity: float | None
    theory: Theory
    tokens: list[TokenMetrics] | None = Field(None, description="With `audit` = per_token or per_layer.")


class LocalistResult(_Response):
    audit_id: str
    audit: AuditLevel
    locality: Dial
    blocks: list[BlockInfo]
    choices: list[ResponseMetrics] = Field(description="One entry per generated choice, by index.")


class TokenAttribution(_Response):
    """Per-token attribution in a streaming chunk."""

    index: int = Field(description="Position of the token in the choice's output.")
    token_id: int
    attribution: list[float] = Field(description="π over blocks, mean over layers and heads.")
    pointer_fidelity: float | None = Field(description="Against the request's `target_block`; null without one "
                                           "(the default target is known only at the end).")


class LocalistDelta(_Response):
    tokens: list[TokenAttribution]


# --------------------------------------------------------------------------- OpenAI responses


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    localist: LocalistResult


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    localist: LocalistDelta | None = None


class ChatCompletionChunk(_Response):
    """One SSE event. The last event before `[DONE]` has no choices and carries `localist` (and `usage` when
    `stream_options.include_usage`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    localist: LocalistResult | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None
    localist: LocalistDelta | None = Field(None, description="Streaming only: per-token attribution of this delta.")


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = Field(description="Always set on full responses; on the last stream event only.")
    localist: LocalistResult | None = Field(description="Always set on full responses; on the last stream event only.")


# --------------------------------------------------------------------------- models, health


class ModelInfo(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    num_layers: int
    num_heads: int
    max_model_len: int
    weights_sha256: str
    stand_in: bool = Field(description="True for a generated, untrained stand-in model.")


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Health(_Response):
    status: Literal["ok", "degraded"]
    model: str
    engine: Literal["running", "restarting"] = Field(
        description="`restarting`: the engine died and a new one is starting; generation is answered 503 "
                    "with Retry-After meanwhile.")
    engine_requests: int = Field(description="Requests unfinished in the engine (running or waiting).")
    engine_restarts: int = Field(description="Engines started after the engine died, since the server started.")
    engine_down_since: float | None = Field(description="Unix time the current outage began; null while serving.")
    engine_last_failure: str | None = Field(description="Why the engine last died (kept after it is back).")
    audit_store: Literal["ok", "error"]
    dev_mode: bool = Field(description="Local dev mode: the audit store has never held an API key, so every caller "
                           "is the admin of tenant `default`. False for good once any process created a key.")


# --------------------------------------------------------------------------- keys


class KeyCreate(_Request):
    tenant: str = Field(min_length=1, max_length=128)
    name: str | None = Field(None, min_length=1, max_length=256)
    admin: bool = Field(False, description="May manage keys and read every tenant's records.")
    rate_limit_per_min: int | None = Field(None, ge=1, description="Requests per minute (per server process).")
    max_concurrency: int | None = Field(None, ge=1, description="Concurrent generations (per server process).")


class KeyInfo(_Response):
    key_id: str
    tenant: str
    name: str
    admin: bool
    created_us: int
    revoked_us: int | None
    rate_limit_per_min: int | None
    max_concurrency: int | None
    active: bool


class KeyCreated(_Response):
    token: str = Field(description="The secret, shown once: send it as `Authorization: Bearer <token>`.")
    key: KeyInfo


class KeyList(_Response):
    object: Literal["list"] = "list"
    data: list[KeyInfo]


# --------------------------------------------------------------------------- audit


class RecordHashes(_Response):
    payload: str = Field(description="SHA-256 of the payload (request, output, metrics, replay).")
    content: str = Field(description="SHA-256 over the indexed fields and the payload hash.")
    prev: str = Field(description="Chain hash of the previous record.")
    chain: str = Field(description="SHA-256 binding (seq, prev, content).")


class AuditSummary(_Response):
    """One audit record's header, as listed (hashes and indexed fields)."""

    model_config = ConfigDict(extra="allow")

    id: str
    seq: int
    kind: str = Field(description="request | key | redaction | retention")
    tenant: str
    created_us: int
    created_at: str
    status: RecordStatus | None
    model: str | None
    rho_min: float | None
    rho_max: float | None
    fidelity: float | None = Field(description="Response-level pointer fidelity (choice 0).")
    blocks: list[str] = Field(description="Labels of the request's blocks.")
    redacted: bool = Field(description="The payload was erased (the chain stays valid).")
    hashes: RecordHashes


class AuditRecord(AuditSummary):
    """A full audit record: what was asked, what came out, the metrics, and how to replay it.

    Payload fields are null once redacted."""

    request: dict[str, Any] | None = Field(None, description="Model, weights hash, dial, blocks, sampling params, "
                                           "messages/prompt as received.")
    output: dict[str, Any] | None = Field(None, description="Per choice: text, token ids, finish reason; usage.")
    metrics: dict[str, Any] | None = Field(None, description="The `localist` object returned to the caller.")
    error: str | None = None
    timestamps: dict[str, float | None] | None = None
    replay: dict[str, Any] | None = Field(None, description="Prompt token ids, block token spans, seed, tokenizer "
                                          "and chat-template hashes, software versions.")


class AuditList(_Response):
    object: Literal["list"] = "list"
    data: list[AuditSummary]
    has_more: bool
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page.")


class BrokenLink(_Response):
    seq: int
    record_id: str | None
    reason: str


class VerifyResult(_Response):
    ok: bool
    checked: int = Field(description="Records whose links were checked.")
    head_seq: int
    head_hash: str
    first_broken: BrokenLink | None
    signed_seq: int | None = Field(description="Highest seq covered by a valid trusted signature.")
    signatures_valid: int
    signatures_untrusted: int
    redacted: int


class ReplayChoice(_Response):
    index: int
    matches: bool
    original_token_ids: list[int]
    replay_token_ids: list[int]


class ReplayResult(_Response):
    """A stored request re-run on the served model from its replay data (itself stored as a new record)."""

    record_id: str
    replay_id: str = Field(description="Audit id of the replay's own record.")
    matches: bool = Field(description="Every choice produced the same tokens.")
    choices: list[ReplayChoice]
    localist: LocalistResult = Field(description="Metrics of the replay.")


class RecordVerification(_Response):
    """One record checked on its own: its hashes and the links from it up to the next signed checkpoint."""

    ok: bool
    record_id: str
    seq: int
    reason: str | None = Field(description="Why the check failed.")
    redacted: bool
    checkpoint_seq: int | None = Field(description="The trusted signed checkpoint committing to this record; "
                                       "null while none covers it yet.")
    links_checked: int


class AuditReport(_Response):
    """The JSON form of the compliance report (the HTML report shows the same)."""

    record: AuditRecord
    verification: RecordVerification


class PurgeRequest(_Request):
    before: float | str = Field(description="Erase payloads of request records created before this time "
                                "(unix seconds or ISO 8601 with a zone).")
    tenant: str | None = Field(None, min_length=1, max_length=128, description="Only this tenant (default: all).")


class PurgeResult(_Response):
    erased: int = Field(description="Payloads erased; one retention record lists them.")
